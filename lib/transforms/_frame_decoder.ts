// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Decoding of whole zstd frames of known size, here and in a pool of Workers (internal):
 * what random access and parallel restores are built on. zstd itself decodes a stream on
 * one core; independent frames decode on all of them.
 *
 * Each frame is decoded by `node:zlib`'s native handle straight into a buffer of exactly
 * its decompressed size, which checks its XXH64 content checksum on the way. As for
 * compression, each thread first round-trips a test frame through that internal path and
 * falls back to `zstdDecompressSync` when it misbehaves.
 *
 * @module
 */
import { createHash } from "node:crypto";
import * as zlib from "node:zlib";
import { noteFallback } from "./_zstd_note.ts";

/** A frame to decode. */
export interface DecodeJob {
  /** The compressed frame, exactly; its buffer travels to the worker and back. */
  input: Uint8Array<ArrayBuffer>;
  /** Its decompressed size (from the seek table). */
  size: number;
  /** Also compute the SHA-256 of the compressed frame. */
  digest?: boolean;
  /** A buffer of at least `size` bytes to decode into (lent, and given back as `output`). */
  output?: Uint8Array<ArrayBuffer>;
  /**
   * Decode only to check the frame, into a scratch buffer the decoding thread keeps: the
   * result's `output` is then empty, and nothing but the input travels back.
   */
  discard?: boolean;
}

/** A decoded frame. */
export interface DecodeResult {
  /** The compressed frame, given back. */
  input: Uint8Array<ArrayBuffer>;
  /**
   * The frame's content, `size` bytes (at the start of the lent buffer, if one was lent);
   * empty for a `discard` job.
   */
  output: Uint8Array<ArrayBuffer>;
  /** SHA-256 of the compressed frame, when asked for. */
  digest?: Uint8Array;
}

/** Decodes one frame into `output` (exactly its size); throws on any corruption. */
type DecodeFrame = (input: Uint8Array, output: Uint8Array) => void;

/**
 * A frame decoder for this thread, with the self-test and the fallback; `onFallback` hears
 * why when the native path fails. The workers run this very function from its source.
 *
 * @example Decode a frame, and catch a flipped bit
 * ```ts
 * import assert from "node:assert/strict";
 * import * as zlib from "node:zlib";
 * import { frameDecoder } from "./_frame_decoder.ts";
 *
 * const decode = frameDecoder(zlib, () => assert.fail("the native path works here"));
 * const params = { [zlib.constants.ZSTD_c_checksumFlag]: 1 };
 * const frame = new Uint8Array(zlib.zstdCompressSync("vma ".repeat(5000), { params }));
 * const output = new Uint8Array(20_000);
 * decode(frame, output);
 * assert.equal(new TextDecoder().decode(output.subarray(0, 4)), "vma ");
 * frame[frame.length - 1]! ^= 1; // the checksum
 * assert.throws(() => decode(frame, output), /checksum/);
 * ```
 */
export function frameDecoder(
  zlib: {
    createZstdDecompress: typeof import("node:zlib").createZstdDecompress;
    zstdDecompressSync: typeof import("node:zlib").zstdDecompressSync;
  },
  onFallback: (why: string) => void,
): DecodeFrame {
  // deno-lint-ignore no-explicit-any
  let decoder: any;
  const native: DecodeFrame = (input, output) => {
    decoder ??= zlib.createZstdDecompress();
    const handle = decoder._handle;
    const state: Uint32Array = decoder._writeState; // [output left, input left]
    handle.reset();
    let [outputLeft, inputLeft] = [0, 0];
    try {
      handle.writeSync(0, input, 0, input.byteLength, output, 0, output.byteLength);
      [outputLeft, inputLeft] = state;
      if (outputLeft === 0 && inputLeft !== 0) {
        // zstd stops once the output is full. A frame may still hold an empty last block
        // and its checksum (zlib's one-shot compressor ends frames so): read those into a
        // spare byte, which must stay unused.
        const spare = new Uint8Array(1);
        handle.writeSync(0, input, input.byteLength - inputLeft!, inputLeft!, spare, 0, 1);
        inputLeft = state[0] === 1 ? state[1]! : 1;
      }
    } catch (error) {
      decoder = undefined; // a fresh context for the next frame
      throw new Error(
        String((error as Error)?.message ?? error).replace(/^Zstd decompress error: /, ""),
      );
    }
    if (outputLeft !== 0) {
      throw new Error(
        `the frame holds ${
          output.byteLength - outputLeft!
        } bytes, not ${output.byteLength} (truncated)`,
      );
    }
    if (inputLeft !== 0) throw new Error(`the frame holds more than ${output.byteLength} bytes`);
  };
  const fallback: DecodeFrame = (input, output) => {
    let decoded: Uint8Array;
    try {
      decoded = zlib.zstdDecompressSync(input);
    } catch (error) {
      throw new Error(
        String((error as Error)?.message ?? error).replace(/^Zstd decompress error: /, ""),
      );
    }
    if (decoded.byteLength !== output.byteLength) {
      throw new Error(`the frame holds ${decoded.byteLength} bytes, not ${output.byteLength}`);
    }
    output.set(decoded);
  };
  let chosen: DecodeFrame | undefined;
  return (input, output) => {
    if (chosen === undefined) {
      // "vmabacku" as the zstd CLI stores it: one raw block, with its content checksum.
      const probe = new Uint8Array([
        0x28,
        0xb5,
        0x2f,
        0xfd,
        0x04,
        0x48,
        0x41,
        0x00,
        0x00,
        0x76,
        0x6d,
        0x61,
        0x62,
        0x61,
        0x63,
        0x6b,
        0x75,
        0xc7,
        0xe6,
        0x14,
        0x49,
      ]);
      let why: string | undefined;
      try {
        const back = new Uint8Array(8);
        native(probe, back);
        if (new TextDecoder().decode(back) !== "vmabacku") why = "a test frame did not round-trip";
      } catch (error) {
        why = String((error as Error)?.message ?? error);
      }
      chosen = why === undefined ? native : fallback;
      if (why !== undefined) onFallback(why);
    }
    chosen(input, output);
  };
}

/** Where `discard` jobs decode into: one buffer per thread, grown as needed. */
interface Scratch {
  bytes: Uint8Array;
}

/**
 * Runs a decode job on this thread with `decode`: the same work a worker does (the workers
 * run this very function, from its source text, so it refers to nothing outside itself).
 *
 * @example Decode a frame only to check it, with its digest
 * ```ts
 * import assert from "node:assert/strict";
 * import { createHash } from "node:crypto";
 * import * as zlib from "node:zlib";
 * import { frameDecoder, runDecodeJob } from "./_frame_decoder.ts";
 *
 * const params = { [zlib.constants.ZSTD_c_checksumFlag]: 1 };
 * const input = new Uint8Array(zlib.zstdCompressSync("vma ".repeat(5000), { params }));
 * const sha256 = (bytes: Uint8Array) => new Uint8Array(createHash("sha256").update(bytes).digest());
 * const scratch = { bytes: new Uint8Array(0) };
 * const decode = frameDecoder(zlib, () => {});
 * const result = runDecodeJob({ input, size: 20_000, digest: true, discard: true }, decode, scratch, sha256);
 * assert.deepEqual([result.output.byteLength, result.digest?.byteLength], [0, 32]);
 * assert.equal(scratch.bytes.byteLength, 20_000);
 * ```
 */
export function runDecodeJob(
  job: DecodeJob,
  decode: DecodeFrame,
  scratch: Scratch,
  sha256: (bytes: Uint8Array) => Uint8Array,
): DecodeResult {
  const { input, size, output: lent, discard, digest } = job;
  if (discard && scratch.bytes.byteLength < size) scratch.bytes = new Uint8Array(size);
  const output = discard
    ? scratch.bytes.subarray(0, size)
    : lent
    ? new Uint8Array(lent.buffer, 0, size)
    : new Uint8Array(size);
  decode(input, output);
  const result: DecodeResult = {
    input,
    output: discard ? new Uint8Array(0) : output as Uint8Array<ArrayBuffer>,
  };
  if (digest) result.digest = sha256(input);
  return result;
}

const WORKER_SOURCE = `
import * as zlib from "node:zlib";
import { createHash } from "node:crypto";
let fallback;
const decode = (${frameDecoder})(zlib, (why) => (fallback = why));
const run = ${runDecodeJob};
const scratch = { bytes: new Uint8Array(0) };
const sha256 = (bytes) => new Uint8Array(createHash("sha256").update(bytes).digest());
self.onmessage = ({ data }) => {
  const { id, input, output: lent } = data;
  try {
    const result = run(data, decode, scratch, sha256);
    const transfer = data.discard ? [input.buffer] : [input.buffer, result.output.buffer];
    self.postMessage({ id, result, fallback }, transfer);
    fallback = undefined;
  } catch (error) {
    const transfer = lent ? [input.buffer, lent.buffer] : [input.buffer];
    self.postMessage({ id, error: String(error?.message ?? error), input }, transfer);
  }
};
`;
let workerUrl: string | undefined;

function sha256(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(bytes).digest());
}

/** Frames up to this size decode on this thread: a worker round trip costs more. */
export const INLINE_SIZE = 64 * 1024;

/**
 * Decodes frames on a pool of Workers (frames up to 64 KiB on this thread). Rejections
 * are `Error`s whose message says what is wrong with the frame ("Restored data doesn't
 * match checksum", "truncated").
 *
 * @example Decode two frames at once
 * ```ts
 * import assert from "node:assert/strict";
 * import { zstdCompressSync } from "node:zlib";
 * import { FrameDecoderPool } from "./_frame_decoder.ts";
 *
 * const pool = new FrameDecoderPool(2);
 * try {
 *   const a = new Uint8Array(zstdCompressSync(new Uint8Array(100_000).fill(1)));
 *   const b = new Uint8Array(zstdCompressSync(new Uint8Array(100_000).fill(2)));
 *   const [x, y] = await Promise.all([
 *     pool.decode({ input: a, size: 100_000 }),
 *     pool.decode({ input: b, size: 100_000, digest: true }),
 *   ]);
 *   assert.deepEqual([x.output[0], y.output[99_999], y.digest?.byteLength], [1, 2, 32]);
 * } finally {
 *   pool.stop();
 * }
 * ```
 */
export class FrameDecoderPool {
  /** Most workers. */
  readonly size: number;
  #workers: Worker[] = [];
  #waiting = new Map<number, PromiseWithResolvers<DecodeResult>>();
  #nextId = 0;
  #here: DecodeFrame | undefined;
  /** What `discard` jobs decode into on this thread. */
  #scratch: Scratch = { bytes: new Uint8Array(0) };
  #onFallback: (why: string) => void;
  #mainThread: boolean;
  /** Whether this thread decoded a frame since the last reply of a worker. */
  #decodedHere = false;

  /**
   * A pool of at most `size` workers (default one per core; with `mainThread`, one per core
   * but one). With `mainThread`, this thread decodes a frame itself whenever every worker
   * has one: all cores decode without one more Worker's memory (about 15 MiB).
   */
  constructor(
    size?: number,
    onFallback: (why: string) => void = noteFallback,
    options: { mainThread?: boolean } = {},
  ) {
    const cores = navigator.hardwareConcurrency ?? 1;
    this.#mainThread = options.mainThread ?? false;
    this.size = Math.max(1, size ?? cores - (this.#mainThread ? 1 : 0));
    this.#onFallback = onFallback;
  }

  /** Frames being decoded. */
  get pending(): number {
    return this.#waiting.size;
  }

  /** Decodes a frame; its input buffer is transferred until the result (or the failure). */
  decode(job: DecodeJob): Promise<DecodeResult> {
    // This thread decodes only when every worker has a frame queued behind the one it
    // decodes: a worker never waits for the next while this thread is busy. And only one
    // frame until a worker replies: replies are not seen while this thread decodes, so the
    // workers' queues would look full while they run dry (verify: this thread decoded 1.4 s
    // of frames while the Worker sat idle for part of its 0.9 s).
    const busy = this.#mainThread && !this.#decodedHere && this.#waiting.size >= 2 * this.size;
    if (job.size <= INLINE_SIZE || busy) {
      if (job.size > INLINE_SIZE) this.#decodedHere = true;
      try {
        this.#here ??= frameDecoder(zlib, this.#onFallback);
        return Promise.resolve(runDecodeJob(job, this.#here, this.#scratch, sha256));
      } catch (error) {
        return Promise.reject(error);
      }
    }
    const id = this.#nextId++;
    const worker = this.#workers[id % this.size] ?? this.#start(id % this.size);
    const pending = Promise.withResolvers<DecodeResult>();
    pending.promise.catch(() => {});
    this.#waiting.set(id, pending);
    const transfer = job.output === undefined || job.discard
      ? [job.input.buffer]
      : [job.input.buffer, job.output.buffer];
    worker.postMessage({ id, ...job, ...(job.discard && { output: undefined }) }, transfer);
    return pending.promise;
  }

  /** Terminates the workers; pending frames fail. */
  stop(): void {
    for (const worker of this.#workers.splice(0)) worker?.terminate();
    for (const pending of this.#waiting.values()) pending.reject(new Error("zstd decoder stopped"));
    this.#waiting.clear();
  }

  #start(slot: number): Worker {
    workerUrl ??= URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
    const worker = new Worker(workerUrl, { type: "module" });
    worker.onmessage = (
      { data }: MessageEvent<
        { id: number; result?: DecodeResult; error?: string; fallback?: string }
      >,
    ) => {
      const pending = this.#waiting.get(data.id);
      this.#waiting.delete(data.id);
      this.#decodedHere = false;
      if (data.fallback !== undefined) this.#onFallback(data.fallback);
      if (data.error !== undefined) pending?.reject(new Error(data.error));
      else pending?.resolve(data.result!);
    };
    worker.onerror = (event) => {
      event.preventDefault();
      for (const pending of this.#waiting.values()) pending.reject(new Error(event.message));
      this.#waiting.clear();
    };
    // Idle workers must not keep the process alive.
    (worker as unknown as { unref?: () => void }).unref?.();
    this.#workers[slot] = worker;
    return worker;
  }
}
