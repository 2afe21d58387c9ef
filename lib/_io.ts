// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Whole reads and writes over Deno's reader and writer calls, which may move fewer bytes
 * than asked (internal).
 *
 * @module
 */

/** Something bytes can be written to: an `FsFile`, `Deno.stdout`, a socket. */
export interface ByteWriter {
  /** Writes some of `bytes` and resolves with how many. */
  write(bytes: Uint8Array): Promise<number>;
}

/** Something bytes can be read from: an `FsFile`, `Deno.stdin`, a socket. */
export interface ByteReader {
  /** Reads into `into` and resolves with how many bytes, or `null` at the end. */
  read(into: Uint8Array): Promise<number | null>;
}

/**
 * Writes all of `bytes`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { writeAll } from "./_io.ts";
 *
 * const parts: number[] = [];
 * const writer = { write: (bytes: Uint8Array) => Promise.resolve(parts.push(1) && 1) };
 * await writeAll(writer, new Uint8Array(3)); // a writer that takes one byte at a time
 * assert.equal(parts.length, 3);
 * ```
 */
export async function writeAll(writer: ByteWriter, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.byteLength;) done += await writer.write(bytes.subarray(done));
}

/**
 * Reads until `target` is full or the input ends; returns how many bytes were read.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { readUpTo } from "./_io.ts";
 *
 * const source = [new Uint8Array([1, 2]), new Uint8Array([3])];
 * const reader = {
 *   read(into: Uint8Array) {
 *     const next = source.shift();
 *     if (next === undefined) return Promise.resolve(null);
 *     into.set(next);
 *     return Promise.resolve(next.byteLength);
 *   },
 * };
 * const target = new Uint8Array(8);
 * assert.equal(await readUpTo(reader, target), 3);
 * assert.deepEqual(target.subarray(0, 3), new Uint8Array([1, 2, 3]));
 * ```
 */
export async function readUpTo(reader: ByteReader, target: Uint8Array): Promise<number> {
  let filled = 0;
  while (filled < target.byteLength) {
    const count = await reader.read(target.subarray(filled));
    if (count === null) break;
    filled += count;
  }
  return filled;
}
