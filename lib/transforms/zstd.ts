// Copyright 2026 the vmabackup authors. MIT license.
/**
 * zstd with `node:zlib` in Workers: compression into independent frames on every core, and
 * decompression of any zstd stream beside the stages that read it.
 *
 * @module
 */
import { BufferPool, exclusiveChunk, type PooledBuffer, releaseChunk } from "../_pool.ts";
import { FrameEncoder } from "./_frame_encoder.ts";
import { deliver } from "./_deliver.ts";
import { ZstdDecoderWorker } from "./_zstd_decoder.ts";
import { ZstdFrameSplitter } from "./_zstd_frames.ts";
import { frameBound } from "./_zstd_workers.ts";

/** Chunks from this size on may be compressed as frames of their own, without a copy. */
const DIRECT_FRAME_MIN = 1 << 20;

/** Options of {@linkcode ZstdCompressStream}. */
export interface ZstdCompressOptions {
  /** zstd level, -7 to 19 (default 3, zstd's default). */
  level?: number;
  /**
   * Worker threads (default: one less than the cores, at least one; with `mainThread: false`
   * one per core). This thread compresses a frame too whenever every worker has one queued,
   * so all cores work without one more Worker's memory.
   */
  workers?: number;
  /**
   * Whether this thread compresses frames when the workers are busy (default true). Each
   * such frame keeps it busy for about 15 ms: a stream whose thread must answer quickly,
   * such as the NBD server of a push-mode live backup, sets this to false.
   */
  mainThread?: boolean;
  /** Bytes per independent zstd frame (default 4 MiB). */
  frameSize?: number;
  /**
   * Recycle the output buffers (default `false`); only for a pipeline in which every output
   * chunk reaches exactly one final consumer that calls `releaseChunk` on it (no `tee()`).
   */
  reuseBuffers?: boolean;
}

type Output = TransformStreamDefaultController<Uint8Array>;

/**
 * Compresses a byte stream into independent zstd frames (4 MiB of input each), compressed in
 * parallel by a pool of Workers, and by this thread when they are all busy, and emitted in
 * order. Concatenated frames are one valid zstd stream: `zstd -d` and every zstd decoder
 * read it. At most two frames per worker and two more are in flight, so memory stays
 * bounded; input and output buffers travel to the workers and back without copies and are
 * reused (with `reuseBuffers`, an output chunk returns to the pool once its final consumer
 * calls `releaseChunk`).
 * A large recycled chunk that this stage alone holds (the extents of
 * `VmaWriterStream({ reuseBuffers: true })`) is compressed as a frame of its own, uncopied.
 *
 * @example Compress into several frames and decode them
 * ```ts
 * import assert from "node:assert/strict";
 * import { ZstdCompressStream, ZstdDecompressStream } from "./zstd.ts";
 *
 * const input = new TextEncoder().encode("vma ".repeat(100_000));
 * const compressed = await new Response(
 *   ReadableStream.from([input]).pipeThrough(new ZstdCompressStream({ frameSize: 65536 })),
 * ).bytes();
 * assert.ok(compressed.byteLength < input.byteLength / 100);
 * const output = await new Response(
 *   ReadableStream.from([compressed]).pipeThrough(new ZstdDecompressStream()),
 * ).bytes();
 * assert.deepEqual(output, input);
 * ```
 */
export class ZstdCompressStream extends TransformStream<Uint8Array, Uint8Array> {
  /** A compressor; see {@linkcode ZstdCompressOptions}. Throws `RangeError` on a bad level. */
  constructor(options: ZstdCompressOptions = {}) {
    const level = checkLevel(options.level ?? 3);
    const frameSize = options.frameSize ?? 4 << 20;
    const encoder = new FrameEncoder({
      level,
      outputSize: frameBound(frameSize),
      workers: options.workers,
      mainThread: options.mainThread,
      reuseBuffers: options.reuseBuffers,
    });
    const inputs = new BufferPool(frameSize, { maxFree: encoder.maxInFlight + 1 });
    let frame: PooledBuffer | undefined;
    let fill = 0;
    /** Why the output side was cancelled: nothing more may be enqueued. */
    let cancelled: { reason: unknown } | undefined;

    const sendFrame = async () => {
      const input = frame!.bytes;
      const length = fill;
      frame = undefined;
      fill = 0;
      await encoder.submit(input, [[0, length]], [], (bytes) => inputs.adopt(bytes));
    };
    const emitOldest = async (controller: Output) => {
      const { chunk } = await encoder.shift();
      if (cancelled !== undefined) throw cancelled.reason;
      return deliver(controller, chunk);
    };

    super({
      async transform(chunk, controller) {
        try {
          await compress(chunk, controller);
        } catch (error) {
          encoder.stop(); // a failed stream gets neither flush nor cancel: stop them here
          throw error;
        }
      },
      async flush(controller) {
        try {
          if (frame !== undefined && fill > 0) await sendFrame();
          while (encoder.inFlight > 0) {
            if (!await emitOldest(controller)) return; // the consumer failed; its error counts
          }
        } finally {
          encoder.stop();
        }
      },
      cancel(reason) {
        cancelled = { reason };
        encoder.stop();
      },
    });

    async function compress(chunk: Uint8Array, controller: Output) {
      const direct = chunk.byteLength >= DIRECT_FRAME_MIN && chunk.byteLength <= frameSize;
      const owned = direct ? exclusiveChunk(chunk) : undefined;
      if (owned !== undefined) {
        // A large chunk we alone hold (a writer's extent) becomes a frame as it is: no copy.
        if (frame !== undefined && fill > 0) await sendFrame(); // bytes before it, in order
        const input = chunk as Uint8Array<ArrayBuffer>;
        await encoder.submit(input, [[0, chunk.byteLength]], [], (bytes) => owned.giveBack(bytes));
        while (encoder.inFlight >= encoder.maxInFlight) await emitOldest(controller);
        return;
      }
      for (let position = 0; position < chunk.byteLength;) {
        frame ??= inputs.acquire();
        const count = Math.min(frameSize - fill, chunk.byteLength - position);
        frame.bytes.set(chunk.subarray(position, position + count), fill);
        fill += count;
        position += count;
        if (fill === frameSize) {
          await sendFrame();
          while (encoder.inFlight >= encoder.maxInFlight) await emitOldest(controller);
        }
      }
      releaseChunk(chunk);
    }
  }
}

/**
 * Checks a zstd level: an integer within -7..19.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { checkLevel } from "./zstd.ts";
 *
 * assert.equal(checkLevel(19), 19);
 * assert.throws(() => checkLevel(20), /level 20 is not within -7\.\.19/);
 * ```
 */
export function checkLevel(level: number): number {
  if (!Number.isInteger(level) || level < -7 || level > 19) {
    throw new RangeError(`Cannot compress with zstd: level ${level} is not within -7..19`);
  }
  return level;
}

/**
 * Decompresses a zstd stream of any number of frames (ours, the `zstd` CLI's, skippable
 * ones) in one Worker, in order, as `zstd -d` does; this thread stays free for the stages
 * after it. The frames are also walked here by their headers, which names the byte offset
 * of bad framing and finds a stream that ends inside a frame. Decoded chunks (up to 1 MiB)
 * are fresh, or with `reuseBuffers` come from a pool: a final consumer that calls
 * `releaseChunk` lets the next chunk reuse the memory (only without `tee()` or fan-out). Not a `TransformStream`, but a pair for `pipeThrough` with backpressure on
 * both sides: however far a frame expands, at most three decoded chunks wait.
 *
 * @example Round trip
 * ```ts
 * import assert from "node:assert/strict";
 * import { ZstdCompressStream, ZstdDecompressStream } from "./zstd.ts";
 *
 * const input = new Uint8Array(300_000).map((_, i) => i % 7);
 * const output = await new Response(
 *   ReadableStream.from([input])
 *     .pipeThrough(new ZstdCompressStream({ frameSize: 100_000 }))
 *     .pipeThrough(new ZstdDecompressStream()),
 * ).bytes();
 * assert.deepEqual(output, input);
 * ```
 */
export class ZstdDecompressStream implements ReadableWritablePair<Uint8Array, Uint8Array> {
  /** The decoded bytes. */
  readonly readable: ReadableStream<Uint8Array>;
  /** The zstd stream goes in here. */
  readonly writable: WritableStream<Uint8Array>;
  #framing: ZstdFrameSplitter;

  /**
   * A decompressor whose decoding runs in a Worker of its own. `publicApi` decodes through
   * node:zlib's public streaming API, which the Worker falls back to by itself when the
   * native handle fails its start-up self-test (set it to test that path). `reuseBuffers`
   * recycles the decoded chunks that their only consumer releases (no `tee()`).
   */
  constructor(options: { publicApi?: boolean; reuseBuffers?: boolean } = {}) {
    const decoder = new ZstdDecoderWorker(options);
    const framing = new ZstdFrameSplitter();
    this.#framing = framing;
    let input!: WritableStreamDefaultController;
    let output!: ReadableStreamDefaultController<Uint8Array>;
    /** Stops the worker, and errors both sides, as a TransformStream would. */
    const fail = (reason: unknown) => {
      decoder.stop(reason);
      input.error(reason);
      output.error(reason);
      return reason;
    };
    this.writable = new WritableStream({
      start(controller) {
        input = controller;
      },
      async write(chunk) {
        try {
          // The worker gets the frames' bytes with where each starts (skippable ones left out).
          for (const segment of framing.push(chunk)) {
            await decoder.write(segment.bytes, segment.start);
          }
        } catch (error) {
          throw fail(error);
        }
        releaseChunk(chunk); // copied: the producer may reuse it
      },
      async close() {
        try {
          if (!framing.atFrameBoundary) {
            throw new TypeError("Cannot decode zstd: The stream ends inside a frame (truncated)");
          }
          await decoder.end();
        } catch (error) {
          throw fail(error);
        }
      },
      abort(reason) {
        fail(reason);
      },
    });
    this.readable = new ReadableStream<Uint8Array>({
      start(controller: ReadableStreamDefaultController<Uint8Array>) {
        output = controller;
      },
      async pull(controller) {
        const chunk = await decoder.read();
        if (chunk === null) controller.close();
        else controller.enqueue(chunk);
      },
      cancel(reason) {
        fail(reason);
      },
    }, { highWaterMark: 0 });
  }

  /** Frames seen so far: how many, how many carry a checksum, how many were skippable. */
  get stats(): { frames: number; checksummedFrames: number; skippableFrames: number } {
    const { frames, checksummedFrames, skippableFrames } = this.#framing;
    return { frames, checksummedFrames, skippableFrames };
  }
}
