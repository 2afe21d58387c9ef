// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A Node.js transform (such as a `node:zlib` codec) as a Web Streams transformer.
 *
 * @module
 */
import type { Transform } from "node:stream";
import { releaseChunk } from "../_pool.ts";

/**
 * A `Transformer` that drives a Node.js `Transform`: input chunks go to `write()` with
 * backpressure, output chunks are enqueued as they come, errors and cancellation propagate
 * both ways. Input chunks are released (see `releaseChunk`) once the transform consumed them.
 *
 * @example Gunzip with node:zlib
 * ```ts
 * import assert from "node:assert/strict";
 * import { createGunzip } from "node:zlib";
 * import { nodeTransformer } from "./node_transform.ts";
 *
 * const gzipped = await new Response(
 *   ReadableStream.from([new TextEncoder().encode("hello")]).pipeThrough(new CompressionStream("gzip")),
 * ).bytes();
 * const text = await new Response(
 *   ReadableStream.from([gzipped]).pipeThrough(new TransformStream(nodeTransformer(createGunzip()))),
 * ).text();
 * assert.equal(text, "hello");
 * ```
 */
export function nodeTransformer(node: Transform): Transformer<Uint8Array, Uint8Array> {
  let failure: Error | undefined;
  // Listen for the end from the start: Deno's zstd decoder can end before flush() runs.
  const ended = new Promise<void>((resolve) => node.once("end", resolve));
  return {
    start(controller) {
      node.on("data", (chunk: Uint8Array) => controller.enqueue(chunk));
      node.on("error", (error: Error) => {
        failure = error;
        controller.error(error);
      });
    },
    transform(chunk) {
      if (failure) throw failure;
      return new Promise<void>((resolve, reject) => {
        node.write(chunk, (error) => {
          if (error) return reject(error);
          releaseChunk(chunk);
          resolve();
        });
      });
    },
    flush() {
      if (failure) throw failure;
      return new Promise<void>((resolve, reject) => {
        node.once("error", reject);
        ended.then(resolve);
        node.end();
      });
    },
    cancel(reason) {
      node.destroy(reason instanceof Error ? reason : undefined);
    },
  };
}
