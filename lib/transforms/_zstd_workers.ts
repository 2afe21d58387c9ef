// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Compression of independent zstd frames, here and in a pool of Workers (internal).
 *
 * Each job brings its own output buffer: `node:zlib`'s native zstd handle writes the frames
 * straight into it, and both buffers travel back without copies. The public
 * `zstdCompressSync` collects 16 KiB output pieces and concatenates them instead; that
 * garbage kept each Worker's isolate about 80 MiB bigger (a 1 GiB backup peaked at 267 MiB
 * against 104-114 MiB this way, with the same speed). The native handle is an internal of
 * Deno's node:zlib, so each thread first round-trips one frame through it, and falls back
 * to `zstdCompressSync` (slower, always correct) when that fails.
 *
 * Every frame carries its XXH64 content checksum, as the `zstd` CLI writes them: decoders
 * check it, and a seek table copies its low 32 bits.
 *
 * The workers are created from a Blob URL, so they need no read permission on this
 * package's folder, and they are started lazily and stopped with {@linkcode stop}.
 *
 * @module
 */
import { createHash } from "node:crypto";
import type { createZstdCompress, zstdCompressSync, zstdDecompressSync } from "node:zlib";

/** A job: compress ranges of `input` into one frame each, written one after another into `output`. */
export interface FrameJob {
  /** The input; its buffer travels to the worker and back. */
  input: Uint8Array<ArrayBuffer>;
  /** `[start, end)` ranges of `input`, each compressed into a frame of its own. */
  ranges: [number, number][];
  /** Receives the frames; at least the sum of {@linkcode frameBound} of the ranges. */
  output: Uint8Array<ArrayBuffer>;
  /** zstd compression level. */
  level: number;
  /** Ranges (by position in `ranges`) whose compressed frame gets a SHA-256 digest. */
  digest?: number[];
}

/** The frames of a job, and its buffers given back. */
export interface FrameResult {
  input: Uint8Array<ArrayBuffer>;
  output: Uint8Array<ArrayBuffer>;
  /** Length of each frame in `output`, in range order; frame i starts after frames 0..i-1. */
  lengths: number[];
  /** SHA-256 of each frame asked for in `digest`, in that order. */
  digests: Uint8Array[];
}

/**
 * The most bytes a zstd frame of `length` input bytes can take: `ZSTD_COMPRESSBOUND`
 * plus room for the frame header and checksum, so the frame always fits in one call.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { frameBound } from "./_zstd_workers.ts";
 *
 * assert.ok(frameBound(4 << 20) > 4 << 20);
 * ```
 */
export function frameBound(length: number): number {
  const small = length < 128 << 10 ? ((128 << 10) - length) >>> 11 : 0;
  return length + (length >>> 8) + small + 64;
}

/** The parts of `node:zlib` that {@linkcode frameCompressor} uses. */
interface Zlib {
  createZstdCompress: typeof createZstdCompress;
  zstdCompressSync: typeof zstdCompressSync;
  zstdDecompressSync: typeof zstdDecompressSync;
  constants: { ZSTD_c_compressionLevel: number; ZSTD_c_checksumFlag: number };
}

/** node:zlib's internals: the native zstd handle, and where it reports what is left. */
interface NativeZstd {
  _handle: {
    reset(): void;
    writeSync(
      flush: number,
      input: Uint8Array,
      inputOffset: number,
      inputLength: number,
      output: Uint8Array,
      outputOffset: number,
      outputLength: number,
    ): void;
  };
  /** [output bytes left, input bytes left] after a write. */
  _writeState: Uint32Array;
}

/** Compresses `input` into one frame at the start of `output`; returns the frame's length. */
export type CompressFrame = (input: Uint8Array, output: Uint8Array, level: number) => number;

/**
 * A function that compresses `input` into one checksummed zstd frame at the start of
 * `output` (at least {@linkcode frameBound}`(input.byteLength)` bytes) and returns the
 * frame's length. It drives node:zlib's native handle, which writes straight into `output`:
 * no pieces to collect and concatenate. One context serves every frame, reset in between: a
 * new context per frame kept about 8 MiB more resident. A reset forgets the pledged size, so
 * the frames carry no content size. Before its first frame it round-trips a test frame; if
 * the internals do not behave (a Deno upgrade changed them), it uses `zstdCompressSync`
 * instead and `onFallback` is told why. The workers run this very function, from its source
 * text, so it refers to nothing outside itself.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import * as zlib from "node:zlib";
 * import { frameBound, frameCompressor } from "./_zstd_workers.ts";
 *
 * const compress = frameCompressor(zlib, () => assert.fail("the native path works here"));
 * const input = new TextEncoder().encode("frame ".repeat(1000));
 * const output = new Uint8Array(frameBound(input.byteLength));
 * const length = compress(input, output, 3);
 * assert.equal(output[4]! & 0x04, 0x04); // Content_Checksum_flag
 * assert.deepEqual(new Uint8Array(zlib.zstdDecompressSync(output.subarray(0, length))), input);
 * ```
 */
export function frameCompressor(zlib: Zlib, onFallback: (why: string) => void): CompressFrame {
  let compressor: NativeZstd | undefined;
  let compressorLevel: number | undefined;
  const params = (level: number) => ({
    [zlib.constants.ZSTD_c_compressionLevel]: level,
    [zlib.constants.ZSTD_c_checksumFlag]: 1,
  });
  const native: CompressFrame = (input, output, level) => {
    try {
      if (compressor === undefined || compressorLevel !== level) {
        compressor = zlib.createZstdCompress({ params: params(level) }) as unknown as NativeZstd;
        compressorLevel = level;
      }
      compressor._handle.reset();
      const ZSTD_e_end = 2;
      compressor._handle.writeSync(
        ZSTD_e_end,
        input,
        0,
        input.byteLength,
        output,
        0,
        output.byteLength,
      );
      const [outputLeft, inputLeft] = compressor._writeState;
      if (inputLeft !== 0 || outputLeft === 0) {
        throw new Error("the frame did not fit its buffer");
      }
      return output.byteLength - outputLeft!;
    } catch (error) {
      compressor = undefined; // start the next frame afresh
      throw error;
    }
  };
  const fallback: CompressFrame = (input, output, level) => {
    const frame = zlib.zstdCompressSync(input, { params: params(level) });
    if (frame.byteLength > output.byteLength) throw new Error("the frame did not fit its buffer");
    output.set(frame);
    return frame.byteLength;
  };
  let chosen: CompressFrame | undefined;
  return (input, output, level) => {
    if (chosen === undefined) {
      const probe = new TextEncoder().encode("vmabackup zstd self-test ".repeat(64));
      let why: string | undefined;
      try {
        const frame = new Uint8Array(probe.byteLength + 1024);
        const length = native(probe, frame, 3);
        const back = new Uint8Array(zlib.zstdDecompressSync(frame.subarray(0, length)));
        if (back.byteLength !== probe.byteLength || back.some((byte, i) => byte !== probe[i])) {
          why = "a test frame did not round-trip";
        }
      } catch (error) {
        why = String((error as Error)?.message ?? error);
      }
      chosen = why === undefined ? native : fallback;
      if (why !== undefined) onFallback(why);
    }
    return chosen(input, output, level);
  };
}

/**
 * Runs a job on this thread with `compress`: the same work a worker does.
 *
 * @example Two frames, the second with a digest
 * ```ts
 * import assert from "node:assert/strict";
 * import * as zlib from "node:zlib";
 * import { encodeFrames, frameCompressor } from "./_zstd_workers.ts";
 *
 * const compress = frameCompressor(zlib, () => {});
 * const input = new Uint8Array(20_000).map((_, i) => i % 13);
 * const output = new Uint8Array(30_000);
 * const job = { input, ranges: [[0, 512], [512, 20_000]] as [number, number][], output, level: 3 };
 * const { lengths, digests } = encodeFrames({ ...job, digest: [1] }, compress);
 * const second = output.subarray(lengths[0]!, lengths[0]! + lengths[1]!);
 * assert.deepEqual(new Uint8Array(zlib.zstdDecompressSync(second)), input.subarray(512));
 * assert.equal(digests[0]!.byteLength, 32);
 * ```
 */
export function encodeFrames(job: FrameJob, compress: CompressFrame): FrameResult {
  return encodeFramesWith(job, compress, sha256);
}

function sha256(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(bytes).digest());
}

/** The job loop itself, shared with the workers through its source text. */
function encodeFramesWith(
  job: FrameJob,
  compress: CompressFrame,
  digestOf: (bytes: Uint8Array) => Uint8Array,
): FrameResult {
  const lengths: number[] = [];
  const digests: Uint8Array[] = [];
  let at = 0;
  job.ranges.forEach(([start, end], position) => {
    const length = compress(job.input.subarray(start, end), job.output.subarray(at), job.level);
    if (job.digest?.includes(position)) {
      digests.push(digestOf(job.output.subarray(at, at + length)));
    }
    lengths.push(length);
    at += length;
  });
  return { input: job.input, output: job.output, lengths, digests };
}

const WORKER_SOURCE = `
import * as zlib from "node:zlib";
import { createHash } from "node:crypto";
let fallback;
const compress = (${frameCompressor})(zlib, (why) => (fallback = why));
const encodeFramesWith = ${encodeFramesWith};
const sha256 = (bytes) => new Uint8Array(createHash("sha256").update(bytes).digest());
self.onmessage = ({ data }) => {
  const { id, job } = data;
  try {
    const result = encodeFramesWith(job, compress, sha256);
    const transfer = [result.input.buffer, result.output.buffer];
    self.postMessage({ id, result, fallback }, transfer);
    fallback = undefined;
  } catch (error) {
    self.postMessage({ id, error: String(error?.message ?? error) });
  }
};
`;
let workerUrl: string | undefined;

interface Reply {
  id: number;
  result?: FrameResult;
  error?: string;
  fallback?: string;
}

/**
 * Up to `size` workers; jobs go round-robin. `onFallback` hears once per worker when its
 * native zstd path failed its self-test.
 *
 * @example Compress a frame, and decode it with node:zlib
 * ```ts
 * import assert from "node:assert/strict";
 * import { zstdDecompressSync } from "node:zlib";
 * import { frameBound, ZstdWorkerPool } from "./_zstd_workers.ts";
 *
 * const pool = new ZstdWorkerPool(1);
 * try {
 *   const text = new TextEncoder().encode("hello, zstd");
 *   const input = text.slice(); // its buffer travels to the worker
 *   const output = new Uint8Array(frameBound(text.byteLength));
 *   const ranges: [number, number][] = [[0, text.byteLength]];
 *   const frame = await pool.run({ input, ranges, output, level: 3 });
 *   assert.deepEqual(frame.input, text); // given back
 *   const decoded = zstdDecompressSync(frame.output.subarray(0, frame.lengths[0]));
 *   assert.deepEqual(new Uint8Array(decoded), text);
 * } finally {
 *   pool.stop();
 * }
 * ```
 */
export class ZstdWorkerPool {
  /** Most workers. */
  readonly size: number;
  #workers: Worker[] = [];
  #waiting = new Map<number, PromiseWithResolvers<FrameResult>>();
  #nextId = 0;
  #onFallback: (why: string) => void;

  /** A pool of at most `size` workers (at least one). */
  constructor(size: number, onFallback: (why: string) => void = () => {}) {
    this.size = Math.max(1, size);
    this.#onFallback = onFallback;
  }

  /** Jobs sent and not yet answered. */
  get pending(): number {
    return this.#waiting.size;
  }

  /** Runs a job; the buffers of `input` and `output` are transferred until the result. */
  run(job: FrameJob): Promise<FrameResult> {
    const id = this.#nextId++;
    const slot = id % this.size;
    const worker = this.#workers[slot] ?? this.#start(slot);
    const pending = Promise.withResolvers<FrameResult>();
    // A stream that is cancelled stops awaiting its frames: their rejection is expected.
    pending.promise.catch(() => {});
    this.#waiting.set(id, pending);
    worker.postMessage({ id, job }, [job.input.buffer, job.output.buffer]);
    return pending.promise;
  }

  /** Terminates the workers; pending jobs fail. */
  stop(): void {
    for (const worker of this.#workers.splice(0)) worker?.terminate();
    this.#fail("zstd worker stopped");
  }

  #start(slot: number): Worker {
    workerUrl ??= URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
    const worker = new Worker(workerUrl, { type: "module" });
    worker.onmessage = ({ data }: MessageEvent<Reply>) => {
      const pending = this.#waiting.get(data.id);
      this.#waiting.delete(data.id);
      if (data.fallback !== undefined) this.#onFallback(data.fallback);
      if (data.error !== undefined) pending?.reject(new Error(`zstd: ${data.error}`));
      else pending?.resolve(data.result!);
    };
    worker.onerror = (event) => {
      event.preventDefault();
      this.#fail(event.message);
    };
    this.#workers[slot] = worker;
    return worker;
  }

  #fail(message: string): void {
    for (const pending of this.#waiting.values()) pending.reject(new Error(message));
    this.#waiting.clear();
  }
}
