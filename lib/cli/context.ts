// Copyright 2026 the vmabackup authors. MIT license.
/**
 * What a CLI command gets to talk to the world: stdout for data and results, stderr for
 * messages and progress, and the signal that stops it.
 *
 * @module
 */
import { writeAll } from "../_io.ts";
import type { ByteWriter } from "../sinks/file_sink.ts";

/** The I/O of one command run. */
export interface CliContext {
  stdout: ByteWriter;
  stderr: ByteWriter;
  /** Whether stderr is a terminal (progress bars only go to terminals). */
  stderrIsTerminal: boolean;
  /** Whether stdout is a terminal, which archive and disk bytes never go to (default no). */
  stdoutIsTerminal?: boolean;
  /** Aborted on SIGINT, SIGTERM or SIGHUP. */
  signal: AbortSignal;
}

const encoder = new TextEncoder();

/**
 * Writes all of `text` to `writer`.
 *
 * @example A writer that takes a few bytes per call
 * ```ts
 * import assert from "node:assert/strict";
 * import { writeText } from "./context.ts";
 *
 * const received: number[] = [];
 * const writer = { // takes at most 4 bytes per call, as a pipe may
 *   write(bytes: Uint8Array) {
 *     received.push(...bytes.subarray(0, 4));
 *     return Promise.resolve(Math.min(bytes.length, 4));
 *   },
 * };
 * await writeText(writer, "größe: 1\n");
 * assert.equal(new TextDecoder().decode(new Uint8Array(received)), "größe: 1\n");
 * ```
 */
export async function writeText(writer: ByteWriter, text: string): Promise<void> {
  await writeAll(writer, encoder.encode(text));
}

/**
 * The context of the real process.
 *
 * @example The real stdout and stderr
 * ```ts
 * import assert from "node:assert/strict";
 * import { processContext } from "./context.ts";
 *
 * const controller = new AbortController();
 * const context = processContext(controller.signal);
 * assert.equal(context.stdout, Deno.stdout);
 * assert.equal(context.stderr, Deno.stderr);
 * assert.equal(context.signal, controller.signal);
 * ```
 */
export function processContext(signal: AbortSignal): CliContext {
  return {
    stdout: Deno.stdout,
    stderr: Deno.stderr,
    stderrIsTerminal: Deno.stderr.isTerminal(),
    stdoutIsTerminal: Deno.stdout.isTerminal(),
    signal,
  };
}

/**
 * Formats a byte count for people: 1.50 GiB, 512.0 KiB, 17 B.
 *
 * @example Binary units
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatBytes } from "./context.ts";
 *
 * assert.equal(formatBytes(17), "17 B");
 * assert.equal(formatBytes(512 * 1024), "512.0 KiB");
 * assert.equal(formatBytes(1.5 * 2 ** 30), "1.50 GiB");
 * ```
 */
export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

/**
 * Formats a rate in MB/s (10^6 bytes per second, as benchmarks report it).
 *
 * @example Megabytes per second
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatRate } from "./context.ts";
 *
 * assert.equal(formatRate(250_000_000, 2), "125.0 MB/s");
 * assert.equal(formatRate(0, 0), "0.0 MB/s"); // no division by zero
 * ```
 */
export function formatRate(bytes: number, seconds: number): string {
  return `${(bytes / 1e6 / Math.max(seconds, 1e-9)).toFixed(1)} MB/s`;
}
