// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Handing a chunk to a transform's readable side when it may have gone away (internal).
 *
 * @module
 */
import { releaseChunk } from "../_pool.ts";

/**
 * Enqueues `chunk` unless the readable side is closed or errored, which it is when the
 * consumer failed (a full disk) while this stage was flushing: then the chunk goes back to
 * its pool and `false` says to stop. Enqueueing anyway throws a `TypeError` ("Readable
 * stream is unavailable") that the pipe reports instead of the consumer's own error.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { deliver } from "./_deliver.ts";
 *
 * let seen = 0;
 * const stream = new TransformStream<number, Uint8Array>({
 *   transform(_, controller) {
 *     seen++;
 *     assert.equal(deliver(controller, new Uint8Array(1)), true);
 *   },
 * });
 * const writer = stream.writable.getWriter();
 * const reading = new Response(stream.readable).bytes();
 * await writer.write(1);
 * await writer.close();
 * assert.equal((await reading).byteLength, 1);
 * assert.equal(seen, 1);
 * ```
 */
export function deliver(
  controller: TransformStreamDefaultController<Uint8Array>,
  chunk: Uint8Array,
): boolean {
  try {
    controller.enqueue(chunk);
    return true;
  } catch (error) {
    // The readable side was cancelled or errored: closed is not told apart from full by
    // desiredSize, so the enqueue's own TypeError is the sign.
    if (!(error instanceof TypeError)) throw error;
    releaseChunk(chunk);
    return false;
  }
}
