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
  /** One line for the command list. */
  summary: string;
  /** The full `--help` text. */
  help: string;
  /** Runs the command; resolves to the exit code. */
  run(args: string[], context: CliContext): Promise<number>;
}

/**
 * `node:util` `parseArgs` with the flags every command has (`--help`), turning parse errors
 * into a {@linkcode UsageError} that points at `--help`.
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

/** Throws a usage error unless exactly `count` positionals (or between min and max) were given. */
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

/** Reads `--progress`. */
export function progressMode(value: string | undefined): ProgressMode {
  const mode = value ?? "auto";
  if (mode !== "auto" && mode !== "json" && mode !== "none") {
    throw new UsageError(`--progress must be auto, json or none, not '${mode}'`);
  }
  return mode;
}

/** Reads `--zstd`. */
export function zstdEngine(value: string | undefined): ZstdEngine {
  const engine = value ?? "builtin";
  if (engine !== "builtin" && engine !== "program") {
    throw new UsageError(`--zstd must be builtin or program, not '${engine}'`);
  }
  return engine;
}

/** The `--zstd` lines of a command's help. */
export const ZSTD_HELP =
  `  --zstd ENGINE      builtin (default): node:zlib on Worker threads, no permission needed;
                     program: the system zstd (Debian package zstd, --allow-run=zstd),
                     multi-threaded and with less memory in this process`;

/** Prints a command's `--help` text on stdout; resolves to exit code 0. */
export async function printHelp(context: CliContext, text: string): Promise<number> {
  await writeText(context.stdout, `${text}\n`);
  return 0;
}

/** A JSON result object as one line; the caller writes it to stdout, or stderr when stdout carries data. */
export function jsonLine(value: unknown): string {
  return `${JSON.stringify(value)}\n`;
}
