// Copyright 2026 the vmabackup authors. MIT license.
/**
 * zstd frame jobs on every core, results in order (internal): what both zstd compressors
 * (plain and seekable) are built on.
 *
 * @module
 */
import * as zlib from "node:zlib";
import { BufferPool } from "../_pool.ts";
import { noteFallback } from "./_zstd_note.ts";
import {
  type CompressFrame,
  encodeFrames,
  frameBound,
  frameCompressor,
  type FrameResult,
  ZstdWorkerPool,
} from "./_zstd_workers.ts";

/** Options of {@linkcode FrameEncoder}. */
export interface FrameEncoderOptions {
  /** zstd level, -7 to 19. */
  level: number;
  /** Largest output of one job: the sum of `frameBound` over its ranges. */
  outputSize: number;
  /** Worker threads (default: the cores but one, with `mainThread`; else one per core). */
  workers?: number | undefined;
  /** Whether this thread compresses a job when every worker has two queued (default true). */
  mainThread?: boolean | undefined;
  /**
   * Recycle the output chunks that their final consumer gives back with `releaseChunk`
   * (default `false`: only for a pipeline without fan-out).
   */
  reuseBuffers?: boolean | undefined;
}

/** Jobs of up to this many output bytes are compressed on this thread (with `mainThread`). */
const SMALL_JOB = 256 << 10;

/** A finished job: its frames, contiguous in one recycled chunk, and what they carry. */
export interface EncodedJob {
  /**
   * The frames, one after another. The chunk belongs to the receiver, who gives it back
   * with `releaseChunk` once written (recycled with `reuseBuffers`).
   */
  chunk: Uint8Array;
  /** Length of each frame in `chunk`. */
  lengths: number[];
  /** Each frame's `Content_Checksum`: the low 32 bits of its content's XXH64. */
  checksums: number[];
  /** SHA-256 of the frames the job asked for. */
  digests: Uint8Array[];
}

/**
 * Compresses jobs on a pool of Workers, and on this thread when they are all busy, and
 * hands the results back in submission order. At most {@linkcode maxInFlight} jobs are
 * out: callers take the oldest with {@linkcode shift} before they submit more.
 *
 * @example Two jobs, in order
 * ```ts
 * import assert from "node:assert/strict";
 * import { zstdDecompressSync } from "node:zlib";
 * import { FrameEncoder } from "./_frame_encoder.ts";
 *
 * const encoder = new FrameEncoder({ level: 3, outputSize: 70_000, workers: 1 });
 * try {
 *   for (const fill of [1, 2]) {
 *     encoder.submit(new Uint8Array(65536).fill(fill), [[0, 65536]], [], () => {});
 *   }
 *   for (const fill of [1, 2]) {
 *     const { chunk } = await encoder.shift();
 *     assert.equal(new Uint8Array(zstdDecompressSync(chunk))[0], fill);
 *   }
 * } finally {
 *   encoder.stop();
 * }
 * ```
 */
export class FrameEncoder {
  #level: number;
  #workers: ZstdWorkerPool;
  #workerQueue: number;
  #mainThread: boolean;
  #outputs: BufferPool[];
  #compressHere: CompressFrame | undefined;
  #inflight: {
    result: Promise<FrameResult>;
    giveBack(bytes: Uint8Array<ArrayBuffer>): void;
    pool: BufferPool;
    done: boolean;
  }[] = [];

  /** An encoder; {@linkcode stop} ends its workers. */
  constructor(options: FrameEncoderOptions) {
    const cores = navigator.hardwareConcurrency ?? 1;
    this.#mainThread = options.mainThread ?? true;
    this.#level = options.level;
    this.#workers = new ZstdWorkerPool(
      options.workers ?? Math.max(1, cores - (this.#mainThread ? 1 : 0)),
      noteFallback,
    );
    // Each worker compresses one job and has the next queued; more only costs memory.
    this.#workerQueue = 2 * this.#workers.size;
    // Outputs by size: a job of a few small frames (a sparse disk's extents, headers) gets a
    // buffer of its size, not one for the largest job.
    const sizes = [...new Set([128 << 10, 1 << 20, options.outputSize])]
      .filter((size) => size <= options.outputSize).sort((a, b) => a - b);
    this.#outputs = sizes.map((size) =>
      new BufferPool(size, {
        maxFree: this.maxInFlight + 5, // and the chunks queued downstream
        trackChunks: true,
        recycle: options.reuseBuffers ?? false,
      })
    );
  }

  /** Jobs that may be out at once. */
  get maxInFlight(): number {
    // Two more, for this thread: with one, it waited for the worker's oldest frame instead of
    // compressing (94 of 284 frames here; with two, 119, and a 1 GiB backup 7 % faster).
    return this.#workerQueue + (this.#mainThread ? 2 : 0);
  }

  /**
   * Lets this thread compress too from now on, as with `mainThread` (an encoder made without
   * it while this thread had other work, such as serving QEMU).
   */
  allowMainThread(): void {
    this.#mainThread = true;
  }

  /** Jobs submitted and not yet taken with {@linkcode shift}. */
  get inFlight(): number {
    return this.#inflight.length;
  }

  /**
   * Submits a job: compress each `[start, end)` range of `input` into a frame, and digest
   * the frames at the positions in `digest`. `input`'s buffer travels to a worker, so the
   * caller must own all of it; it comes back through `giveBack`.
   */
  async submit(
    input: Uint8Array<ArrayBuffer>,
    ranges: [number, number][],
    digest: number[],
    giveBack: (bytes: Uint8Array<ArrayBuffer>) => void,
  ): Promise<void> {
    const needed = ranges.reduce((sum, [start, end]) => sum + frameBound(end - start), 0);
    const pool = this.#outputs.find((candidate) => candidate.size >= needed) ??
      this.#outputs.at(-1)!;
    const output = pool.acquire().bytes;
    const job = { input, ranges, output, level: this.#level, digest };
    // A small job costs less here than a Worker's round trip (a sparse disk's extents hold a
    // cluster or two): with thousands of them, the round trips were most of the time.
    const small = this.#mainThread && needed <= SMALL_JOB;
    // Let finished workers report first: while this thread compresses, their replies wait.
    if (!small && this.#mainThread && this.#workers.pending >= this.#workerQueue) {
      await new Promise((resolve) => setTimeout(resolve, 0));
    }
    if (!small && (!this.#mainThread || this.#workers.pending < this.#workerQueue)) {
      const entry = { result: this.#workers.run(job), giveBack, pool, done: false };
      entry.result.then(() => entry.done = true, () => entry.done = true);
      this.#inflight.push(entry);
      return;
    }
    this.#compressHere ??= frameCompressor(zlib, noteFallback);
    this.#inflight.push({
      result: Promise.resolve(encodeFrames(job, this.#compressHere)),
      giveBack,
      pool,
      done: true,
    });
  }

  /** Whether the oldest job's frames are ready ({@linkcode shift} would not wait). */
  get oldestDone(): boolean {
    return this.#inflight[0]?.done ?? false;
  }

  /**
   * Compresses `input` into one frame on this thread, now, outside the order of the jobs:
   * for a few hundred bytes (an extent header), which take microseconds here and would
   * wait behind the jobs in flight otherwise. Returns the frame and its `Content_Checksum`.
   */
  compressNow(input: Uint8Array): { frame: Uint8Array<ArrayBuffer>; checksum: number } {
    this.#compressHere ??= frameCompressor(zlib, noteFallback);
    const output = new Uint8Array(frameBound(input.byteLength));
    const length = this.#compressHere(input, output, this.#level);
    const frame = output.subarray(0, length);
    return { frame, checksum: new DataView(output.buffer).getUint32(length - 4, true) };
  }

  /** The oldest job's frames, once done. */
  async shift(): Promise<EncodedJob> {
    const { result, giveBack, pool } = this.#inflight.shift()!;
    const { input, output, lengths, digests } = await result;
    giveBack(input); // the input came back with the transfer: reuse it
    pool.wrap(output).hold(1); // the final consumer's releaseChunk() gives it back
    const view = new DataView(output.buffer);
    let end = 0;
    const checksums = lengths.map((length) => {
      end += length;
      return view.getUint32(end - 4, true);
    });
    return { chunk: output.subarray(0, end), lengths, checksums, digests };
  }

  /** Terminates the workers; jobs still out fail. */
  stop(): void {
    this.#workers.stop();
  }
}
