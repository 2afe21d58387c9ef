// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Inputs and outputs of CLI commands: `-` for stdin or stdout, and outputs that appear
 * only when complete (written to `NAME.partial`, flushed and renamed on success, removed on
 * failure; see `durable.ts`).
 *
 * @module
 */
import { fileByteSource } from "../sources/file_bytes.ts";
import { ByteSink } from "../sinks/file_sink.ts";
import { FlushBehind } from "../sinks/flush_behind.ts";
import { isS3Url } from "../storage/s3_config.ts";
import type { CliContext } from "./context.ts";
import { commitFiles, type PendingFile } from "./durable.ts";
import { CliError, ExitCode, UsageError } from "./errors.ts";
import { openS3Input, openS3Output, type StorageOptions } from "./s3_files.ts";

/** An archive opened for reading. */
export interface Input {
  readable: ReadableStream<Uint8Array>;
  /** Size in bytes when the input is a regular file. */
  size?: number | undefined;
  /** Shown in messages: the path, or `stdin`. */
  name: string;
}

/**
 * Opens `path` for reading, stdin for `-`, or an S3 object for `s3://BUCKET/KEY`. With
 * `reuseBuffers`, file and stdin chunks are recycled once their final consumer calls
 * `releaseChunk` (for a pipeline without fan-out).
 *
 * @example Read a file
 * ```ts
 * import assert from "node:assert/strict";
 * import { openInput } from "./files.ts";
 *
 * const path = await Deno.makeTempFile();
 * await Deno.writeTextFile(path, "VMA\0");
 * const input = await openInput(path);
 * assert.deepEqual([input.name, input.size], [path, 4]);
 * assert.equal(await new Response(input.readable).text(), "VMA\0");
 * await Deno.remove(path);
 * ```
 */
export async function openInput(
  path: string,
  options: StorageOptions & { reuseBuffers?: boolean } = {},
): Promise<Input> {
  const { reuseBuffers = false, ...storage } = options;
  const chunks = { reuseBuffers };
  if (path === "-") return { readable: fileByteSource(Deno.stdin, chunks), name: "stdin" };
  if (isS3Url(path)) return await openS3Input(path, storage);
  const file = await Deno.open(path, { read: true });
  const info = await file.stat();
  if (info.isDirectory) {
    file.close();
    throw new Deno.errors.IsADirectory(`Cannot read archive ${path}: It is a directory`);
  }
  const size = info.isFile ? info.size : undefined;
  return { readable: fileByteSource(file, chunks), size, name: path };
}

/**
 * The one-line error for an output that exists, with its exit code.
 *
 * @example Exit code 6 and a hint
 * ```ts
 * import assert from "node:assert/strict";
 * import { existsError } from "./files.ts";
 *
 * const error = existsError("vm.vma.zst");
 * assert.equal(error.exitCode, 6);
 * assert.equal(error.message, "vm.vma.zst already exists (use --force to replace it)");
 * ```
 */
export function existsError(path: string): CliError {
  return new CliError(ExitCode.exists, `${path} already exists (use --force to replace it)`);
}

/**
 * Refuses to write binary data to a terminal, as `zstd` and `borg` do: the bytes would be
 * garbage on the screen and could drive the terminal. A usage error (exit code 2).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { refuseTerminal } from "./files.ts";
 *
 * const write = (bytes: Uint8Array) => Promise.resolve(bytes.length);
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false };
 * const signal = new AbortController().signal;
 * refuseTerminal({ ...context, signal }, "the archive"); // a pipe or a file: fine
 * assert.throws(
 *   () => refuseTerminal({ ...context, signal, stdoutIsTerminal: true }, "the archive"),
 *   { exitCode: 2, message: /not writing the archive to a terminal/ },
 * );
 * ```
 */
export function refuseTerminal(context: CliContext, what: string): void {
  if (context.stdoutIsTerminal) {
    throw new UsageError(
      `not writing ${what} to a terminal; redirect stdout to a file or a pipe`,
    );
  }
}

/**
 * True when something exists at `path` (a dangling symlink counts).
 *
 * @example Files, and dangling symlinks
 * ```ts
 * import assert from "node:assert/strict";
 * import { exists } from "./files.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.symlink(`${dir}/missing`, `${dir}/link`);
 * assert.equal(await exists(`${dir}/link`), true);
 * assert.equal(await exists(`${dir}/missing`), false);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** An output that is stdout, or a file or S3 object that only appears once complete. */
export interface Output {
  writable: WritableStream<Uint8Array> & { readonly bytesWritten: number };
  /** Final path, `-` for stdout, or the `s3://` URL. */
  path: string;
  /** Tells the output how many bytes to expect (S3 sizes its upload parts by it). */
  expectSize?(bytes: number): void;
  /**
   * Makes the output final. A file durably (see {@linkcode commitFiles}): its data are
   * flushed, it is renamed to `PATH` (one atomic rename, also over an existing `PATH`), and
   * the directory is flushed. To commit it together with sidecar outputs (its index), use
   * {@linkcode commitOutputs}.
   */
  commit(): Promise<void>;
  /** Removes the partial output; safe to call more than once, and after commit. */
  discard(): Promise<void>;
  /** The same as discard, for signal handlers that cannot wait. */
  discardSync(): void;
}

/**
 * Opens an output: stdout for `-` (refused when it is a terminal), an S3 upload for
 * `s3://BUCKET/KEY` (see `openS3Output`), otherwise `PATH.partial`, which
 * {@linkcode Output.commit} renames to `PATH`. An existing `PATH` is refused unless `force`.
 *
 * @example The file appears only on commit
 * ```ts
 * import assert from "node:assert/strict";
 * import { processContext } from "./context.ts";
 * import { exists, openOutput } from "./files.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const context = processContext(new AbortController().signal);
 * const output = await openOutput(`${dir}/out.vma`, context, { force: false });
 * await ReadableStream.from([new Uint8Array([1, 2, 3])]).pipeTo(output.writable);
 * assert.equal(await exists(`${dir}/out.vma`), false); // only out.vma.partial so far
 * await output.commit();
 * assert.deepEqual(await Deno.readFile(`${dir}/out.vma`), new Uint8Array([1, 2, 3]));
 * await assert.rejects(openOutput(`${dir}/out.vma`, context, { force: false }), /already exists/);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function openOutput(
  path: string,
  context: CliContext,
  options: { force: boolean } & StorageOptions,
): Promise<Output> {
  if (isS3Url(path)) return await openS3Output(path, context, options);
  if (path === "-") {
    refuseTerminal(context, "binary output");
    const noop = () => Promise.resolve();
    return {
      writable: new ByteSink(context.stdout),
      path,
      commit: noop,
      discard: noop,
      discardSync: () => {},
    };
  }
  if (!options.force && await exists(path)) throw existsError(path);
  const partial = `${path}.partial`;
  // Another run may be writing the same partial file: never share it without --force.
  const file = await Deno.open(
    partial,
    options.force
      ? { write: true, create: true, truncate: true }
      : { write: true, createNew: true },
  ).catch((error) => {
    throw error instanceof Deno.errors.AlreadyExists ? existsError(partial) : error;
  });
  // The data go to disk while more is written, so the flush at commit is short.
  const behind = await FlushBehind.open(partial).catch((error) => {
    file.close();
    throw error;
  });
  let state: "open" | "closed" | "committed" | "discarded" = "open";
  const close = () => {
    if (state === "open") file.close();
    behind.close();
    state = "closed";
  };
  const seal = (): Sealed => {
    if (state !== "open") throw new Error(`Cannot commit ${path}: It was committed or discarded`);
    state = "closed"; // commitFiles flushes and closes the file
    return {
      file: { partial, target: path, file },
      settle: () => behind.settle(),
      committed: () => void (state = "committed"),
    };
  };
  const output: Output = {
    writable: new ByteSink(file, { onWritten: (bytes) => behind.written(bytes) }),
    path,
    commit: () => commitSealed([seal()]),
    async discard() {
      if (state === "committed" || state === "discarded") return;
      close();
      state = "discarded";
      await Deno.remove(partial).catch(() => {});
    },
    discardSync() {
      if (state === "committed" || state === "discarded") return;
      close();
      state = "discarded";
      try {
        Deno.removeSync(partial);
      } catch { /* already gone */ }
    },
  };
  sealers.set(output, seal);
  return output;
}

/** A file output closed for committing, and how to mark it committed once it is. */
interface Sealed {
  file: PendingFile;
  /** Ends the file's background flushing (before its final flush). */
  settle(): Promise<void>;
  committed(): void;
}

/** How each file output is sealed when it is committed together with others. */
const sealers = new WeakMap<Output, () => Sealed>();

async function commitSealed(sealed: Sealed[]): Promise<void> {
  for (const entry of sealed) await entry.settle();
  await commitFiles(sealed.map((entry) => entry.file));
  for (const entry of sealed) entry.committed();
}

/**
 * Commits `output` together with `sidecars`, outputs written beside it (its index), so that
 * `output` never appears without them: files are all flushed first, then renamed, sidecars
 * before `output`, then their directories flushed (see {@linkcode commitFiles}); other
 * outputs (S3 objects) are committed one by one, sidecars first.
 *
 * @example An archive and its index
 * ```ts
 * import assert from "node:assert/strict";
 * import { processContext } from "./context.ts";
 * import { commitOutputs, openOutput } from "./files.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const context = processContext(new AbortController().signal);
 * const archive = await openOutput(`${dir}/vm.vma`, context, { force: false });
 * const index = await openOutput(`${dir}/vm.vma.idx`, context, { force: false });
 * await ReadableStream.from([new Uint8Array([1, 2, 3])]).pipeTo(archive.writable);
 * await ReadableStream.from([new Uint8Array([4])]).pipeTo(index.writable);
 * await commitOutputs(archive, index);
 * assert.deepEqual(await Deno.readFile(`${dir}/vm.vma`), new Uint8Array([1, 2, 3]));
 * assert.deepEqual(await Deno.readFile(`${dir}/vm.vma.idx`), new Uint8Array([4]));
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function commitOutputs(output: Output, ...sidecars: Output[]): Promise<void> {
  const all = [...sidecars, output];
  if (all.every((each) => sealers.has(each))) {
    return await commitSealed(all.map((each) => sealers.get(each)!()));
  }
  for (const each of all) await each.commit();
}
