// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A byte sink for files and stdout that gives recycled chunks back.
 *
 * @module
 */
import { type ByteWriter, writeAll } from "../_io.ts";
import { releaseChunk } from "../_pool.ts";

export type { ByteWriter } from "../_io.ts";

/**
 * Writes every chunk completely to `target` and then releases it (see `releaseChunk`),
 * so producers such as `VmaWriterStream({ reuseBuffers: true })` can reuse their buffers.
 * Closing the stream does not close `target`.
 *
 * @example Write to a file
 * ```ts
 * import assert from "node:assert/strict";
 * import { ByteSink } from "./file_sink.ts";
 *
 * const path = await Deno.makeTempFile();
 * using file = await Deno.open(path, { write: true });
 * await ReadableStream.from([new TextEncoder().encode("hi")]).pipeTo(new ByteSink(file));
 * assert.equal(await Deno.readTextFile(path), "hi");
 * await Deno.remove(path);
 * ```
 */
export class ByteSink extends WritableStream<Uint8Array> {
  #written = 0;

  /**
   * A sink into `target`; `queuedChunks` chunks (default 4) may wait while one is written,
   * and `onWritten` hears of each chunk once it is written (see `FlushBehind`).
   */
  constructor(
    target: ByteWriter,
    options: { queuedChunks?: number; onWritten?: (bytes: number) => void } = {},
  ) {
    const onWritten = options.onWritten;
    super({
      write: async (chunk) => {
        await writeAll(target, chunk);
        this.#written += chunk.byteLength;
        onWritten?.(chunk.byteLength);
        releaseChunk(chunk);
      },
      // A few chunks may wait while one is written, so upstream keeps working meanwhile.
    }, { highWaterMark: options.queuedChunks ?? 4 });
  }

  /** Bytes written so far. */
  get bytesWritten(): number {
    return this.#written;
  }
}
