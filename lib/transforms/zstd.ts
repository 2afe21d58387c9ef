// Copyright 2026 the vmabackup authors. MIT license.
/**
 * zstd with `node:zlib` on every core: compression into independent frames, and
 * decompression frame by frame.
 *
 * @module
 */
import { createZstdDecompress } from "node:zlib";
import { BufferPool, exclusiveChunk, type PooledBuffer, releaseChunk } from "../_pool.ts";
import { ZstdFrameSplitter } from "./_zstd_frames.ts";
import { FrameJobError, type FrameResult, ZstdWorkerPool } from "./_zstd_workers.ts";

/** Chunks from this size on may be compressed as frames of their own, without a copy. */
const DIRECT_FRAME_MIN = 1 << 20;

/** Options of {@linkcode ZstdCompressStream}. */
export interface ZstdCompressOptions {
  /** zstd level, -7 to 19 (default 3, zstd's default). */
  level?: number;
  /** Worker threads (default: the number of cores). */
  workers?: number;
  /** Bytes per independent zstd frame (default 4 MiB). */
  frameSize?: number;
}

type Output = TransformStreamDefaultController<Uint8Array>;

/**
 * Compresses a byte stream into independent zstd frames (4 MiB of input each), compressed in
 * parallel by a pool of Workers and emitted in order. Concatenated frames are one valid
 * zstd stream: `zstd -d` and every zstd decoder read it. At most two frames per worker are in
 * flight, so memory stays bounded; input buffers travel to the workers and back without
 * copies and are reused. A large recycled chunk that this stage alone holds (the extents of
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
  constructor(options: ZstdCompressOptions = {}) {
    const level = options.level ?? 3;
    const frameSize = options.frameSize ?? 4 << 20;
    const workers = new ZstdWorkerPool(options.workers ?? navigator.hardwareConcurrency ?? 1);
    if (!Number.isInteger(level) || level < -7 || level > 19) {
      throw new RangeError(`Cannot compress with zstd: level ${level} is not within -7..19`);
    }
    const pool = new BufferPool(frameSize, { maxFree: 2 * workers.size + 1 });
    /** Frames being compressed, oldest first, each with where its input buffer goes back. */
    const inflight: {
      result: Promise<FrameResult>;
      giveBack(bytes: Uint8Array<ArrayBuffer>): void;
    }[] = [];
    let frame: PooledBuffer | undefined;
    let fill = 0;

    const send = () => {
      const result = workers.run({ op: "compress", input: frame!.bytes, length: fill, level });
      inflight.push({ result, giveBack: (bytes) => pool.adopt(bytes) });
      frame = undefined;
      fill = 0;
    };
    const emitOldest = async (controller: Output) => {
      const { result, giveBack } = inflight.shift()!;
      const { input, output } = await result;
      giveBack(input); // the input came back with the transfer: reuse it
      controller.enqueue(output);
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
          if (frame !== undefined && fill > 0) send();
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
      const owned = chunk.byteLength >= DIRECT_FRAME_MIN ? exclusiveChunk(chunk) : undefined;
      if (owned !== undefined) {
        // A large chunk we alone hold (a writer's extent) becomes a frame as it is: no copy.
        if (frame !== undefined && fill > 0) send(); // bytes before it, in order
        const input = chunk as Uint8Array<ArrayBuffer>;
        const result = workers.run({ op: "compress", input, length: chunk.byteLength, level });
        inflight.push({ result, giveBack: (bytes) => owned.giveBack(bytes) });
        while (inflight.length >= 2 * workers.size) await emitOldest(controller);
        return;
      }
      for (let position = 0; position < chunk.byteLength;) {
        frame ??= pool.acquire();
        const count = Math.min(frameSize - fill, chunk.byteLength - position);
        frame.bytes.set(chunk.subarray(position, position + count), fill);
        fill += count;
        position += count;
        if (fill === frameSize) {
          send();
          while (inflight.length >= 2 * workers.size) await emitOldest(controller);
        }
      }
      releaseChunk(chunk);
    }
  }
}

/** Options of {@linkcode ZstdDecompressStream}. */
export interface ZstdDecompressOptions {
  /** Worker threads for frames decoded in parallel (default: the number of cores). */
  workers?: number;
  /** Frames whose header declares at most this many bytes are decoded in parallel (16 MiB). */
  maxParallelFrameSize?: number;
}

/**
 * Decompresses a zstd stream of any number of frames. The stream is split at frame
 * boundaries by walking the frame and block headers: frames up to 16 MiB (such as
 * {@linkcode ZstdCompressStream}'s) are decoded in parallel by Workers; bigger frames (a
 * `zstd` CLI file is often one frame) stream through `node:zlib`, a fresh decoder per frame. Splitting also avoids a Deno bug: its `node:zlib` decoder stops after the first
 * frame of `zstd` CLI output.
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
export class ZstdDecompressStream extends TransformStream<Uint8Array, Uint8Array> {
  constructor(options: ZstdDecompressOptions = {}) {
    const workers = new ZstdWorkerPool(options.workers ?? navigator.hardwareConcurrency ?? 1);
    const maxParallel = options.maxParallelFrameSize ?? 16 << 20;
    const splitter = new ZstdFrameSplitter();
    /** Decoded frames in stream order: worker results, awaited when emitted. */
    const inflight: { result: Promise<FrameResult>; length: number }[] = [];
    /** The current frame: collected whole for a worker, or streamed through a decoder. */
    let frame: Uint8Array<ArrayBuffer> | undefined;
    let frameLength = 0;
    let decoder: FrameDecoder | undefined;

    const emitOldest = async (controller: Output) => {
      const { result, length } = inflight.shift()!;
      try {
        controller.enqueue((await result).output);
      } catch (error) {
        if (!(error instanceof FrameJobError && error.tooLarge)) throw error;
        // A frame of unknown size that turned out big: stream it here instead.
        const big = new FrameDecoder(controller);
        await big.write(error.input.subarray(0, length));
        await big.end();
      }
    };
    const startStreaming = async (controller: Output) => {
      while (inflight.length > 0) await emitOldest(controller); // keep the order
      decoder = new FrameDecoder(controller);
      if (frame !== undefined && frameLength > 0) {
        await decoder.write(frame.subarray(0, frameLength));
      }
      frame = undefined;
    };
    /** Appends to the frame being collected, growing its buffer by doubling. */
    const append = (bytes: Uint8Array) => {
      if (frameLength + bytes.byteLength > frame!.byteLength) {
        const size = Math.max(2 * frame!.byteLength, frameLength + bytes.byteLength);
        const grown = new Uint8Array(size);
        grown.set(frame!.subarray(0, frameLength));
        frame = grown;
      }
      frame!.set(bytes, frameLength);
      frameLength += bytes.byteLength;
    };

    super({
      async transform(chunk, controller) {
        try {
          await decode(chunk, controller);
        } catch (error) {
          workers.stop(); // a failed stream gets neither flush nor cancel: stop them here
          decoder?.destroy();
          throw error;
        }
      },
      async flush(controller) {
        try {
          if (!splitter.atFrameBoundary) {
            throw new TypeError("Cannot decode zstd: The stream ends inside a frame (truncated)");
          }
          while (inflight.length > 0) await emitOldest(controller);
        } finally {
          workers.stop();
        }
      },
      cancel() {
        workers.stop();
        decoder?.destroy();
      },
    });

    async function decode(chunk: Uint8Array, controller: Output) {
      for (const segment of splitter.push(chunk)) {
        if (segment.start) {
          // Frames of unknown size go to the workers too, with an output cap and a fallback.
          const parallel = segment.contentSize === undefined ||
            segment.contentSize <= maxParallel;
          // Our frames compress 4 MiB to 1-2 MiB: start with room for a whole frame.
          frame = parallel ? new Uint8Array(2 << 20) : undefined;
          frameLength = 0;
          if (!parallel) await startStreaming(controller);
        }
        if (frame !== undefined) {
          append(segment.bytes); // a copy: the chunk goes back to its producer
          if (frameLength > maxParallel) await startStreaming(controller); // a poor ratio
        } else {
          await decoder!.write(segment.bytes);
        }
        if (!segment.end) continue;
        if (frame !== undefined) {
          const input = frame;
          frame = undefined;
          const result = workers.run({
            op: "decompress",
            input,
            length: frameLength,
            maxOutput: maxParallel,
          });
          inflight.push({ result, length: frameLength });
          while (inflight.length >= 2 * workers.size) await emitOldest(controller);
        } else {
          await decoder!.end();
          decoder = undefined;
        }
      }
      releaseChunk(chunk);
    }
  }
}

/** One frame through a `node:zlib` decoder, its output enqueued as it comes. */
class FrameDecoder {
  #node = createZstdDecompress({ chunkSize: 256 << 10 });
  #ended: Promise<void>;
  #failure: Error | undefined;

  constructor(controller: Output) {
    // Listen for the end at once: the decoder may end before end() is called.
    this.#ended = new Promise((resolve, reject) => {
      this.#node.once("end", resolve);
      this.#node.once("error", (error: Error) => {
        this.#failure = error;
        reject(error);
      });
    });
    this.#ended.catch(() => {});
    this.#node.on("data", (chunk: Uint8Array) => controller.enqueue(chunk));
  }

  write(bytes: Uint8Array): Promise<void> {
    if (this.#failure) return Promise.reject(this.#failure);
    return new Promise((resolve, reject) => {
      this.#node.write(bytes, (error) => (error ? reject(error) : resolve()));
    });
  }

  async end(): Promise<void> {
    this.#node.end();
    await this.#ended;
  }

  destroy(): void {
    this.#node.destroy();
  }
}
