// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Random access to stored archive bytes: the one interface that files and objects in S3
 * storage share, so that an index can read just the frames it needs.
 *
 * @module
 */

/** Bytes that can be read at any offset: an archive file, an S3 object. */
export interface RangeReader {
  /** Shown in messages: a path or an `s3://` URL. */
  readonly name: string;
  /** Total size in bytes. */
  readonly size: number;
  /**
   * Reads exactly `length` bytes at `offset`; rejects with `Deno.errors.UnexpectedEof` when
   * the stored bytes end first (the archive was truncated after it was opened).
   */
  read(offset: number, length: number): Promise<Uint8Array>;
  /**
   * Reads exactly `target.byteLength` bytes at `offset` into `target`, so that a caller can
   * reuse its buffers (optional; callers fall back to `read`). Rejects as `read` does.
   */
  readInto?(offset: number, target: Uint8Array): Promise<void>;
  /** Releases the file handle or connections. */
  close(): void;
}

/**
 * Opens a regular file for random reads. Concurrent reads are queued on its one file
 * position, so callers may issue them freely.
 *
 * @example Read a range of a file
 * ```ts
 * import assert from "node:assert/strict";
 * import { fileRangeReader } from "./range_reader.ts";
 *
 * const path = await Deno.makeTempFile();
 * await Deno.writeTextFile(path, "0123456789");
 * const reader = await fileRangeReader(path);
 * assert.equal(reader.size, 10);
 * assert.equal(new TextDecoder().decode(await reader.read(3, 4)), "3456");
 * const into = new Uint8Array(2);
 * await reader.readInto!(8, into);
 * assert.equal(new TextDecoder().decode(into), "89");
 * await assert.rejects(reader.read(8, 4), Deno.errors.UnexpectedEof);
 * reader.close();
 * await Deno.remove(path);
 * ```
 */
export async function fileRangeReader(path: string): Promise<RangeReader> {
  const file = await Deno.open(path, { read: true });
  const info = await file.stat();
  if (!info.isFile) {
    file.close();
    throw new Deno.errors.InvalidData(`Cannot read ${path} at random: It is not a regular file`);
  }
  // One position for the file: reads take turns (each is a seek and a read loop).
  let turn = Promise.resolve();
  const readInto = (offset: number, bytes: Uint8Array): Promise<void> => {
    const result = turn.then(async () => {
      const length = bytes.byteLength;
      await file.seek(offset, Deno.SeekMode.Start);
      for (let filled = 0; filled < length;) {
        const count = await file.read(bytes.subarray(filled));
        if (count === null) {
          throw new Deno.errors.UnexpectedEof(
            `Cannot read ${length} bytes at ${offset} of ${path}: It ends at ${offset + filled}`,
          );
        }
        filled += count;
      }
    });
    turn = result.then(() => {}, () => {});
    return result;
  };
  return {
    name: path,
    size: info.size,
    async read(offset, length) {
      const bytes = new Uint8Array(length);
      await readInto(offset, bytes);
      return bytes;
    },
    readInto,
    close() {
      try {
        file.close();
      } catch { /* already closed */ }
    },
  };
}
