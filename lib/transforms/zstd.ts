// Copyright 2026 the vmabackup authors. MIT license.
/**
 * zstd with `node:zlib` in Workers: compression into independent frames on every core, and
 * decompression of any zstd stream beside the stages that read it.
 *
 * @module
 */
import * as zlib from "node:zlib";
import { BufferPool, exclusiveChunk, type PooledBuffer, releaseChunk } from "../_pool.ts";
import { ZstdDecoderWorker } from "./_zstd_decoder.ts";
import { ZstdFrameSplitter } from "./_zstd_frames.ts";
import { frameBound, frameCompressor, type FrameResult, ZstdWorkerPool } from "./_zstd_workers.ts";

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
    const level = options.level ?? 3;
    const frameSize = options.frameSize ?? 4 << 20;
    const cores = navigator.hardwareConcurrency ?? 1;
    const mainThread = options.mainThread ?? true;
    const workers = new ZstdWorkerPool(
      options.workers ?? Math.max(1, cores - (mainThread ? 1 : 0)),
    );
    if (!Number.isInteger(level) || level < -7 || level > 19) {
      throw new RangeError(`Cannot compress with zstd: level ${level} is not within -7..19`);
    }
    /** Each worker compresses one frame and has the next queued; more only costs memory. */
    const workerQueue = 2 * workers.size;
    // Two more, for this thread: with one, it waited for the worker's oldest frame instead of
    // compressing (94 of 284 frames here; with two, 119, and a 1 GiB backup 7 % faster).
    const maxInFlight = workerQueue + (mainThread ? 2 : 0);
    const inputs = new BufferPool(frameSize, { maxFree: maxInFlight + 1 });
    const outputs = new BufferPool(frameBound(frameSize), {
      maxFree: maxInFlight + 5, // and the chunks queued downstream
      trackChunks: true,
      recycle: options.reuseBuffers ?? false,
    });
    let compressHere: ReturnType<typeof frameCompressor> | undefined;
    /** Frames being compressed, oldest first, each with where its input buffer goes back. */
    const inflight: {
      result: Promise<FrameResult>;
      giveBack(bytes: Uint8Array<ArrayBuffer>): void;
    }[] = [];
    let frame: PooledBuffer | undefined;
    let fill = 0;

    /** To a worker, or, when they all have a frame queued, compressed on this thread. */
    const send = async (
      input: Uint8Array<ArrayBuffer>,
      length: number,
      giveBack: (bytes: Uint8Array<ArrayBuffer>) => void,
    ) => {
      const output = outputs.acquire().bytes;
      // Let finished workers report first: while this thread compresses, their replies wait.
      if (mainThread && workers.pending >= workerQueue) {
        await new Promise((resolve) => setTimeout(resolve, 0));
      }
      if (!mainThread || workers.pending < workerQueue) {
        inflight.push({ result: workers.run({ input, length, output, level }), giveBack });
        return;
      }
      compressHere ??= frameCompressor(zlib);
      const written = compressHere(input, length, output, level);
      inflight.push({ result: Promise.resolve({ input, output, length: written }), giveBack });
    };
    const sendFrame = async () => {
      const input = frame!.bytes;
      const length = fill;
      frame = undefined;
      fill = 0;
      await send(input, length, (bytes) => inputs.adopt(bytes));
    };
    const emitOldest = async (controller: Output) => {
      const { result, giveBack } = inflight.shift()!;
      const { input, output, length } = await result;
      giveBack(input); // the input came back with the transfer: reuse it
      outputs.wrap(output).hold(1); // the final consumer's releaseChunk() gives it back
      controller.enqueue(output.subarray(0, length));
    };

    super({
      async transform(chunk, controller) {
        try {
          await compress(chunk, controller);
        } catch (error) {
          workers.stop(); // a failed stream gets neither flush nor cancel: stop them here
          throw error;
        }
      },
      async flush(controller) {
        try {
          if (frame !== undefined && fill > 0) await sendFrame();
          while (inflight.length > 0) await emitOldest(controller);
        } finally {
          workers.stop();
        }
      },
      cancel() {
        workers.stop();
      },
    });

    async function compress(chunk: Uint8Array, controller: Output) {
      const direct = chunk.byteLength >= DIRECT_FRAME_MIN && chunk.byteLength <= frameSize;
      const owned = direct ? exclusiveChunk(chunk) : undefined;
      if (owned !== undefined) {
        // A large chunk we alone hold (a writer's extent) becomes a frame as it is: no copy.
        if (frame !== undefined && fill > 0) await sendFrame(); // bytes before it, in order
        const input = chunk as Uint8Array<ArrayBuffer>;
        await send(input, chunk.byteLength, (bytes) => owned.giveBack(bytes));
        while (inflight.length >= maxInFlight) await emitOldest(controller);
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
          while (inflight.length >= maxInFlight) await emitOldest(controller);
        }
      }
      releaseChunk(chunk);
    }
  }
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

  /** A decompressor whose decoding runs in a Worker of its own. */
  constructor(options: { reuseBuffers?: boolean } = {}) {
    const decoder = new ZstdDecoderWorker(options);
    const framing = new ZstdFrameSplitter();
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
          framing.push(chunk); // only to check the framing
          await decoder.write(chunk);
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
}
