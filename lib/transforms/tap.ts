// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A pass-through stage that lets a callback see every chunk.
 *
 * @module
 */

/**
 * Passes every chunk on unchanged after calling `see` with it, for counting, collecting or
 * checking along the way. An exception in `see` fails the stream.
 *
 * @example Count records on their way
 * ```ts
 * import assert from "node:assert/strict";
 * import { tapStream } from "./tap.ts";
 *
 * let seen = 0;
 * const out = await Array.fromAsync(ReadableStream.from([1, 2, 3]).pipeThrough(tapStream(() => seen++)));
 * assert.deepEqual(out, [1, 2, 3]);
 * assert.equal(seen, 3);
 * ```
 */
export function tapStream<T>(see: (chunk: T) => void): TransformStream<T, T> {
  return new TransformStream<T, T>({
    transform(chunk, controller) {
      see(chunk);
      controller.enqueue(chunk);
    },
  });
}
