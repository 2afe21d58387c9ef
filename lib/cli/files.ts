// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Inputs and outputs of CLI commands: `-` for stdin or stdout, and outputs that appear
 * only when complete (written to `NAME.partial`, renamed on success, removed on failure).
 *
 * @module
 */
import { fileByteSource } from "../sources/file_bytes.ts";
import { ByteSink } from "../sinks/file_sink.ts";
import type { CliContext } from "./context.ts";
import { CliError, ExitCode } from "./errors.ts";

/** An archive opened for reading. */
export interface Input {
  readable: ReadableStream<Uint8Array>;
  /** Size in bytes when the input is a regular file. */
  size?: number | undefined;
  /** Shown in messages: the path, or `stdin`. */
  name: string;
}

/** Opens `path` for reading, or stdin for `-`. */
export async function openInput(path: string): Promise<Input> {
  if (path === "-") return { readable: fileByteSource(Deno.stdin), name: "stdin" };
  const file = await Deno.open(path, { read: true });
  const info = await file.stat();
  if (info.isDirectory) {
    file.close();
    throw new Deno.errors.IsADirectory(`Cannot read archive ${path}: It is a directory`);
  }
  return { readable: fileByteSource(file), size: info.isFile ? info.size : undefined, name: path };
}

/** True when something exists at `path` (a dangling symlink counts). */
export async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** An output that is either stdout or a file that only appears once complete. */
export interface Output {
  writable: ByteSink;
  /** Final path, or `-` for stdout. */
  path: string;
  /** Makes the output final (renames `NAME.partial` to `NAME`). */
  commit(): Promise<void>;
  /** Removes the partial output; safe to call more than once, and after commit. */
  discard(): Promise<void>;
  /** The same as discard, for signal handlers that cannot wait. */
  discardSync(): void;
}

/**
 * Opens an output: stdout for `-`, otherwise `PATH.partial`, which {@linkcode Output.commit}
 * renames to `PATH`. An existing `PATH` is refused unless `force`.
 */
export async function openOutput(
  path: string,
  context: CliContext,
  options: { force: boolean },
): Promise<Output> {
  if (path === "-") {
    const noop = () => Promise.resolve();
    return {
      writable: new ByteSink(context.stdout),
      path,
      commit: noop,
      discard: noop,
      discardSync: () => {},
    };
  }
  if (!options.force && await exists(path)) {
    throw new CliError(ExitCode.exists, `${path} already exists (use --force to replace it)`);
  }
  const partial = `${path}.partial`;
  const file = await Deno.open(partial, { write: true, create: true, truncate: true });
  let state: "open" | "committed" | "discarded" = "open";
  const close = () => {
    try {
      file.close();
    } catch { /* already closed */ }
  };
  return {
    writable: new ByteSink(file),
    path,
    async commit() {
      close();
      await Deno.rename(partial, path);
      state = "committed";
    },
    async discard() {
      if (state !== "open") return;
      state = "discarded";
      close();
      await Deno.remove(partial).catch(() => {});
    },
    discardSync() {
      if (state !== "open") return;
      state = "discarded";
      close();
      try {
        Deno.removeSync(partial);
      } catch { /* already gone */ }
    },
  };
}
