// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Compression of independent zstd frames, here and in a pool of Workers (internal).
 *
 * Each job brings its own output buffer: `node:zlib`'s native zstd handle writes the frame
 * straight into it, and both buffers travel back without copies. The public
 * `zstdCompressSync` collects 16 KiB output pieces and concatenates them instead; that
 * garbage kept each Worker's isolate about 80 MiB bigger (a 1 GiB backup peaked at 267 MiB
 * against 104-114 MiB this way, with the same speed).
 *
 * The workers are created from a Blob URL, so they need no read permission on this
 * package's folder, and they are started lazily and stopped with {@linkcode stop}.
 *
 * @module
 */
import type { createZstdCompress } from "node:zlib";

/** A frame to compress: `input` and `output` travel to the worker and back, without copies. */
export interface FrameJob {
  input: Uint8Array<ArrayBuffer>;
  /** Bytes of `input` to compress. */
  length: number;
  /** Receives the frame; at least {@linkcode frameBound}`(length)` bytes. */
  output: Uint8Array<ArrayBuffer>;
  /** zstd compression level. */
  level: number;
}

/** A compressed frame: its first `length` bytes of `output`, and the input given back. */
export interface FrameResult {
  input: Uint8Array<ArrayBuffer>;
  output: Uint8Array<ArrayBuffer>;
  length: number;
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
  constants: { ZSTD_c_compressionLevel: number };
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

/**
 * A function that compresses `length` bytes of `input` into one zstd frame in `output`
 * (at least {@linkcode frameBound}`(length)` bytes) and returns the frame's length. It
 * drives node:zlib's native handle, which writes straight into `output`: no pieces to
 * collect and concatenate. One context serves every frame, reset in between: a new context
 * per frame kept about 8 MiB more resident. A reset forgets the pledged size, so the frames
 * carry no content size. The workers run this very function, from its source text, so it
 * refers to nothing outside itself.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import * as zlib from "node:zlib";
 * import { frameBound, frameCompressor } from "./_zstd_workers.ts";
 *
 * const compress = frameCompressor(zlib);
 * const input = new TextEncoder().encode("frame ".repeat(1000));
 * const output = new Uint8Array(frameBound(input.byteLength));
 * const length = compress(input, input.byteLength, output, 3);
 * assert.deepEqual(new Uint8Array(zlib.zstdDecompressSync(output.subarray(0, length))), input);
 * ```
 */
export function frameCompressor(
  zlib: Zlib,
): (input: Uint8Array, length: number, output: Uint8Array, level: number) => number {
  let compressor: NativeZstd | undefined;
  let compressorLevel: number | undefined;
  return (input, length, output, level) => {
    try {
      if (compressor === undefined || compressorLevel !== level) {
        const params = { [zlib.constants.ZSTD_c_compressionLevel]: level };
        compressor = zlib.createZstdCompress({ params }) as unknown as NativeZstd;
        compressorLevel = level;
      }
      compressor._handle.reset();
      const ZSTD_e_end = 2;
      compressor._handle.writeSync(ZSTD_e_end, input, 0, length, output, 0, output.byteLength);
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
}

const WORKER_SOURCE = `
import * as zlib from "node:zlib";
const compress = (${frameCompressor})(zlib);
self.onmessage = ({ data }) => {
  const { id, input, length, output, level } = data;
  try {
    const written = compress(input, length, output, level);
    self.postMessage({ id, input, output, length: written }, [input.buffer, output.buffer]);
  } catch (error) {
    self.postMessage({ id, error: String(error?.message ?? error) });
  }
};
`;
let workerUrl: string | undefined;

interface Reply {
  id: number;
  input: Uint8Array<ArrayBuffer>;
  output: Uint8Array<ArrayBuffer>;
  length: number;
  error?: string;
}

/**
 * Up to `size` workers; jobs go round-robin.
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
 *   const frame = await pool.run({ input, length: text.byteLength, output, level: 3 });
 *   assert.deepEqual(frame.input, text); // given back
 *   const decoded = zstdDecompressSync(frame.output.subarray(0, frame.length));
 *   assert.deepEqual(new Uint8Array(decoded), text);
 * } finally {
 *   pool.stop();
 * }
 * ```
 */
export class ZstdWorkerPool {
  readonly size: number;
  #workers: Worker[] = [];
  #waiting = new Map<number, PromiseWithResolvers<FrameResult>>();
  #nextId = 0;

  constructor(size: number) {
    this.size = Math.max(1, size);
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
    worker.postMessage({ id, ...job }, [job.input.buffer, job.output.buffer]);
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
      if (data.error !== undefined) pending?.reject(new Error(`zstd: ${data.error}`));
      else pending?.resolve({ input: data.input, output: data.output, length: data.length });
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
