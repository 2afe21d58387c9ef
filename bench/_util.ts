// deno-lint-ignore-file no-console
// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Small helpers of the benchmark: running programs, paths, files, formatting.
 *
 * @module
 */
import { basename, join } from "node:path";
import { fileURLToPath } from "node:url";

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
/** The checkout the benchmark belongs to; commands run here. */
export const ROOT: string = fileURLToPath(new URL("..", import.meta.url));
export const RESULTS_DIR: string = join(ROOT, "bench", "results");
export const DENO: string = Deno.execPath();
/** The environment of every command: no colours in what they print. */
export const ENV: Readonly<Record<string, string>> = { NO_COLOR: "1" };

/**
 * Runs a command to completion in the project root; throws with its `error:` line (or last stderr
 * line) on failure and returns its trimmed stdout.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { run } from "./_util.ts";
 *
 * assert.equal(await run(["echo", "hi"]), "hi");
 * await assert.rejects(run(["sh", "-c", "echo 'error: no' >&2; exit 3"]), /exited 3: error: no/);
 * ```
 */
export async function run(argv: string[], signal?: AbortSignal): Promise<string> {
  const [program, ...args] = argv;
  const output = await new Deno.Command(program!, {
    args,
    cwd: ROOT,
    env: ENV,
    stdin: "null",
    ...(signal === undefined ? {} : { signal }),
  }).output();
  if (!output.success) {
    const command = argv.map((arg) => basename(arg)).join(" ");
    throw new Error(`'${command}' exited ${output.code}: ${errorLine(output.stderr)}`);
  }
  return new TextDecoder().decode(output.stdout).trim();
}

/** {@linkcode run}, but "" when the command fails or does not exist. */
export async function tryRun(argv: string[]): Promise<string> {
  return await run(argv).catch(() => "");
}

/** Runs a shell script with `sh -c`. */
export async function sh(script: string): Promise<void> {
  await run(["sh", "-c", script]);
}

/** Whether a program is on PATH (or an absolute path that exists). */
export async function haveTool(tool: string): Promise<boolean> {
  return (await tryRun(["sh", "-c", `command -v ${quote(tool)}`])) !== "";
}

/** Writes `path` through `path.tmp` and a rename, so an interrupted build leaves no wrong input. */
export async function writeAtomically(
  path: string,
  write: (file: Deno.FsFile) => Promise<void>,
): Promise<void> {
  const temporary = `${path}.tmp`;
  {
    using file = await Deno.open(temporary, { write: true, create: true, truncate: true });
    await write(file);
  }
  await Deno.rename(temporary, path);
}

export async function writeAll(file: Deno.FsFile, data: Uint8Array): Promise<void> {
  for (let done = 0; done < data.length;) done += await file.write(data.subarray(done));
}

export async function readAt(file: Deno.FsFile, offset: number, buffer: Uint8Array): Promise<void> {
  await file.seek(offset, Deno.SeekMode.Start);
  for (let done = 0; done < buffer.length;) {
    const n = await file.read(buffer.subarray(done));
    if (n === null) throw new Error(`unexpected end of file at ${offset + done}`);
    done += n;
  }
}

/** The size of a file, `null` when it does not exist. */
export async function fileSize(path: string): Promise<number | null> {
  try {
    return (await Deno.stat(path)).size;
  } catch (error) {
    ignoreNotFound(error);
    return null;
  }
}

export async function remove(path: string): Promise<void> {
  await Deno.remove(path, { recursive: true }).catch(ignoreNotFound);
}

export async function exists(path: string): Promise<boolean> {
  return await Deno.lstat(path).then(() => true, (error) => {
    ignoreNotFound(error);
    return false;
  });
}

export function ignoreNotFound(error: unknown): void {
  if (!(error instanceof Deno.errors.NotFound)) throw error;
}

/**
 * A shell word.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { quote } from "./_util.ts";
 *
 * assert.equal(quote("it's"), `'it'\\''s'`);
 * ```
 */
export function quote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/** `path` relative to `work` when it lies inside, for display. */
export function relative(path: string, work: string): string {
  return path.startsWith(`${work}/`) ? path.slice(work.length + 1) : path;
}

/** The line of a command's stderr that says what went wrong: `error: ...`, else the last one. */
export function errorLine(bytes: Uint8Array): string {
  const lines = new TextDecoder().decode(bytes).trim().split("\n");
  return (lines.find((line) => /^error\b/i.test(line)) ?? lines.at(-1) ?? "").trim();
}

export function firstLine(text: string): string {
  return text.split("\n")[0]!.trim();
}

export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

export function mib(bytes: number): string {
  return (bytes / MiB).toFixed(1);
}

/**
 * `value` rounded to `digits` decimals.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { round } from "./_util.ts";
 *
 * assert.equal(round(0.6666, 2), 0.67);
 * ```
 */
export function round(value: number, digits: number): number {
  const scale = 10 ** digits;
  return Math.round(value * scale) / scale;
}

/** Progress on stderr, so stdout holds only the markdown. */
export function log(message: string): void {
  console.error(message);
}
