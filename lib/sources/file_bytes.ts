// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A file as a byte stream in large, recycled chunks.
 *
 * @module
 */
import { type ByteReader, readUpTo } from "../_io.ts";
import { BufferPool } from "../_pool.ts";

export type { ByteReader } from "../_io.ts";

/** A reader the source closes when the input ends or fails: an `FsFile`, `Deno.stdin`. */
export interface ClosableByteReader extends ByteReader {
  /** Closes the reader; the source calls it at most once. */
  close(): void;
}

/** Options of {@linkcode fileByteSource}. */
export interface FileByteSourceOptions {
  /** Bytes per read (default 1 MiB). `FsFile.readable` reads 64 KiB, which costs about 3×. */
  chunkSize?: number;
  /**
   * Recycle the chunk buffers (default `false`); only for a pipeline in which every chunk
   * reaches exactly one final consumer that calls `releaseChunk` on it (no `tee()`).
   */
  reuseBuffers?: boolean;
}

/**
 * Reads an open file (or stdin) from its current position to the end in chunks of `chunkSize`,
 * and closes it at the end or on cancel. Each chunk is a fresh buffer that belongs to its
 * receiver; with `reuseBuffers`, chunks come from recycled buffers instead, and the final
 * consumer calls `releaseChunk` on them when done (this library's readers and
 * decompressors do).
 *
 * @example Read a file
 * ```ts
 * import assert from "node:assert/strict";
 * import { fileByteSource } from "./file_bytes.ts";
 *
 * const path = await Deno.makeTempFile();
 * await Deno.writeTextFile(path, "hello");
 * const text = await new Response(fileByteSource(await Deno.open(path))).text();
 * assert.equal(text, "hello");
 * await Deno.remove(path);
 * ```
 */
export function fileByteSource(
  file: ClosableByteReader,
  options: FileByteSourceOptions = {},
): ReadableStream<Uint8Array> {
  const pool = new BufferPool(options.chunkSize ?? 1 << 20, {
    trackChunks: true,
    recycle: options.reuseBuffers ?? false,
  });
  let closed = false;
  const close = () => {
    if (!closed) file.close();
    closed = true;
  };
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const buffer = pool.acquire();
      let filled: number;
      try {
        filled = await readUpTo(file, buffer.bytes);
      } catch (error) {
        close();
        throw error;
      }
      if (filled > 0) {
        buffer.hold(1);
        controller.enqueue(buffer.view(0, filled));
      } else {
        buffer.hold(0);
      }
      if (filled < buffer.bytes.byteLength) {
        close();
        controller.close();
      }
    },
    cancel: close,
  }, { highWaterMark: 0 });
}
