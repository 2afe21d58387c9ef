// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The shape of a CLI command and argument parsing with one-line usage errors.
 *
 * @module
 */
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import { type CliContext, writeText } from "./context.ts";
import { UsageError } from "./errors.ts";
import type { ProgressMode } from "./progress.ts";
import type { ZstdEngine } from "../transforms/compression.ts";

/** One subcommand of `cli.ts`. */
export interface Command {
  name: string;
  /** The full `--help` text. */
  help: string;
  /** Runs the command; resolves to the exit code. */
  run(args: string[], context: CliContext): Promise<number>;
}

/**
 * `node:util` `parseArgs` with the flags every command has (`--help`), turning parse errors
 * into a {@linkcode UsageError} that points at `--help`.
 *
 * @example Flags, positionals and a usage error
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseCommandArgs } from "./command.ts";
 *
 * const options = { json: { type: "boolean" as const } };
 * const { values, positionals } = parseCommandArgs("list", ["vm.vma", "--json"], options);
 * assert.deepEqual([values.json, values.help, positionals], [true, undefined, ["vm.vma"]]);
 * assert.throws(() => parseCommandArgs("list", ["--nope"], options), {
 *   name: "UsageError",
 *   message: /'--nope'.*\(see 'cli\.ts list --help'\)$/,
 * });
 * ```
 */
export function parseCommandArgs<T extends ParseArgsOptionsConfig>(
  command: string,
  args: string[],
  options: T,
) {
  try {
    return parseArgs({
      args,
      options: { ...options, help: { type: "boolean", short: "h" } },
      allowPositionals: true,
      strict: true,
    });
  } catch (error) {
    const message = error instanceof Error ? error.message.split("\n")[0]! : String(error);
    throw new UsageError(`${message.replace(/\.$/, "")} (see 'cli.ts ${command} --help')`);
  }
}

/**
 * Throws a usage error unless between `min` and `max` (default: exactly `min`) positionals
 * were given.
 *
 * @example One or two arguments
 * ```ts
 * import assert from "node:assert/strict";
 * import { expectPositionals } from "./command.ts";
 *
 * expectPositionals("extract", ["vm.vma", "restore"], 1, 2); // fine
 * assert.throws(
 *   () => expectPositionals("extract", [], 1, 2),
 *   /^UsageError: extract expects 1 to 2 argument\(s\), got 0/,
 * );
 * ```
 */
export function expectPositionals(
  command: string,
  positionals: string[],
  min: number,
  max = min,
): void {
  if (positionals.length < min || positionals.length > max) {
    const expected = min === max ? `${min}` : `${min} to ${max}`;
    throw new UsageError(
      `${command} expects ${expected} argument(s), got ${positionals.length} (see 'cli.ts ${command} --help')`,
    );
  }
}

/**
 * Reads `--progress`.
 *
 * @example Default and bad values
 * ```ts
 * import assert from "node:assert/strict";
 * import { progressMode } from "./command.ts";
 * import { UsageError } from "./errors.ts";
 *
 * assert.equal(progressMode(undefined), "auto");
 * assert.equal(progressMode("json"), "json");
 * assert.throws(() => progressMode("bar"), UsageError);
 * ```
 */
export function progressMode(value: string | undefined): ProgressMode {
  const mode = value ?? "auto";
  if (mode !== "auto" && mode !== "json" && mode !== "none") {
    throw new UsageError(`--progress must be auto, json or none, not '${mode}'`);
  }
  return mode;
}

/**
 * Reads `--zstd`.
 *
 * @example Default and bad values
 * ```ts
 * import assert from "node:assert/strict";
 * import { zstdEngine } from "./command.ts";
 * import { UsageError } from "./errors.ts";
 *
 * assert.equal(zstdEngine(undefined), "builtin");
 * assert.equal(zstdEngine("program"), "program");
 * assert.throws(() => zstdEngine("zstdmt"), UsageError);
 * ```
 */
export function zstdEngine(value: string | undefined): ZstdEngine {
  const engine = value ?? "builtin";
  if (engine !== "builtin" && engine !== "program") {
    throw new UsageError(`--zstd must be builtin or program, not '${engine}'`);
  }
  return engine;
}

/**
 * The `--zstd` lines of a command's help.
 *
 * @example Part of every help text that reads or writes zstd
 * ```ts
 * import assert from "node:assert/strict";
 * import { ZSTD_HELP } from "./command.ts";
 *
 * assert.match(ZSTD_HELP, /^ {2}--zstd ENGINE {6}builtin \(default\)/);
 * assert.ok(ZSTD_HELP.includes("--allow-run=zstd"));
 * ```
 */
export const ZSTD_HELP =
  `  --zstd ENGINE      builtin (default): node:zlib on Worker threads, no permission needed;
                     program: the system zstd (Debian package zstd, --allow-run=zstd),
                     multi-threaded and with less memory in this process`;

/**
 * Prints a command's `--help` text on stdout; resolves to exit code 0.
 *
 * @example Help goes to stdout
 * ```ts
 * import assert from "node:assert/strict";
 * import { printHelp } from "./command.ts";
 *
 * let out = "";
 * const write = (bytes: Uint8Array) => {
 *   out += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * assert.equal(await printHelp(context, "usage: cli.ts demo"), 0);
 * assert.equal(out, "usage: cli.ts demo\n");
 * ```
 */
export async function printHelp(context: CliContext, text: string): Promise<number> {
  await writeText(context.stdout, `${text}\n`);
  return 0;
}

/**
 * A JSON result object as one line; the caller writes it to stdout, or stderr when stdout
 * carries data.
 *
 * @example One line of JSON
 * ```ts
 * import assert from "node:assert/strict";
 * import { jsonLine } from "./command.ts";
 *
 * const line = jsonLine({ ok: true, disks: ["drive-scsi0"] });
 * assert.equal(line, '{"ok":true,"disks":["drive-scsi0"]}\n');
 * ```
 */
export function jsonLine(value: unknown): string {
  return `${JSON.stringify(value)}\n`;
}
