// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A pool of Workers that compress or decompress whole zstd frames (internal).
 *
 * The workers are created from a Blob URL, so they need no read permission on this
 * package's folder, and they are started lazily and stopped with {@linkcode stop}.
 *
 * @module
 */

/** A job: the input travels to the worker and back, without copies. */
export interface FrameJob {
  op: "compress" | "decompress";
  input: Uint8Array<ArrayBuffer>;
  /** Bytes of `input` to use. */
  length: number;
  /** Compression level (compress only). */
  level?: number;
}

/** A finished job: the output, and the input buffer given back. */
export interface FrameResult {
  output: Uint8Array<ArrayBuffer>;
  input: Uint8Array<ArrayBuffer>;
}

const WORKER_SOURCE = `
import { constants, zstdCompressSync, zstdDecompressSync } from "node:zlib";
self.onmessage = (event) => {
  const { id, op, input, length, level } = event.data;
  try {
    const data = input.subarray(0, length);
    const result = op === "compress"
      ? zstdCompressSync(data, { params: { [constants.ZSTD_c_compressionLevel]: level } })
      : zstdDecompressSync(data);
    const whole = result.byteOffset === 0 && result.byteLength === result.buffer.byteLength;
    const output = whole ? new Uint8Array(result.buffer) : new Uint8Array(result);
    self.postMessage({ id, output, input }, [output.buffer, input.buffer]);
  } catch (error) {
    self.postMessage({ id, input, error: String(error && error.message || error) }, [input.buffer]);
  }
};
`;
let workerUrl: string | undefined;

interface Reply {
  id: number;
  output?: Uint8Array<ArrayBuffer>;
  input: Uint8Array<ArrayBuffer>;
  error?: string;
}

/** Up to `size` workers; jobs go round-robin. */
export class ZstdWorkerPool {
  readonly size: number;
  #workers: Worker[] = [];
  #waiting = new Map<number, PromiseWithResolvers<FrameResult>>();
  #nextId = 0;

  constructor(size: number) {
    this.size = Math.max(1, size);
  }

  /** Runs a job; `input`'s buffer is transferred until the result comes back. */
  run(job: FrameJob): Promise<FrameResult> {
    const id = this.#nextId++;
    const slot = id % this.size;
    const worker = this.#workers[slot] ?? this.#start(slot);
    const pending = Promise.withResolvers<FrameResult>();
    // A stream that is cancelled stops awaiting its frames: their rejection is expected.
    pending.promise.catch(() => {});
    this.#waiting.set(id, pending);
    worker.postMessage({ id, ...job }, [job.input.buffer]);
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
      if (data.error !== undefined || data.output === undefined) {
        pending?.reject(new Error(data.error ?? "no output"));
      } else {
        pending?.resolve({ output: data.output, input: data.input });
      }
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
