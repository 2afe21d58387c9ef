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
  /** Aborted on SIGINT or SIGTERM. */
  signal: AbortSignal;
}

const encoder = new TextEncoder();

/** Writes all of `text` to `writer`. */
export async function writeText(writer: ByteWriter, text: string): Promise<void> {
  await writeAll(writer, encoder.encode(text));
}

/** The context of the real process. */
export function processContext(signal: AbortSignal): CliContext {
  return {
    stdout: Deno.stdout,
    stderr: Deno.stderr,
    stderrIsTerminal: Deno.stderr.isTerminal(),
    signal,
  };
}

/** Formats a byte count for people: 1.5 GiB, 512 KiB, 17 B. */
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

/** Formats a rate in MB/s (10^6 bytes per second, as benchmarks report it). */
export function formatRate(bytes: number, seconds: number): string {
  return `${(bytes / 1e6 / Math.max(seconds, 1e-9)).toFixed(1)} MB/s`;
}
