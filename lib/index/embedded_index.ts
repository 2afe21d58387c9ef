// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Finding the index inside a seekable `.vma.zst`: the seek table at the end of the file,
 * and the index frame just before it.
 *
 * @module
 */
import type { RangeReader } from "../storage/range_reader.ts";
import { VmaFormatError } from "../vma/errors.ts";
import { decodeIndex, INDEX_TAG, MAX_INDEX_SIZE, type VmaIndex } from "./index_format.ts";
import {
  decodeSeekTable,
  SEEK_TABLE_FOOTER_SIZE,
  type SeekTable,
  seekTableSize,
} from "./seek_table.ts";

/** Magic of the skippable frame that carries the archive index (`0x184D2A50 | 0xB`). */
export const INDEX_FRAME_MAGIC = 0x184d2a5b;
/** Seek-table checksum of a frame without content: the low 32 bits of XXH64 of nothing. */
export const EMPTY_CHECKSUM = 0x51d8e999;

/** A seekable file's table, and its index if it has one. */
export interface EmbeddedIndex {
  /** The seek table. */
  seekTable: SeekTable;
  /** The index, or `undefined` for a seekable file without one (written by another tool). */
  index: VmaIndex | undefined;
  /** File offset of the index frame. */
  indexOffset: number;
  /** Frame number of the index frame in the seek table. */
  indexFrame: number;
}

/**
 * Reads the seek table and the index frame at the end of `reader`; `null` when the file
 * does not end with a zstd seek table (it is not seekable). A damaged table or index frame
 * is a `VmaFormatError` with its file offset.
 *
 * @example A plain file is not seekable
 * ```ts
 * import assert from "node:assert/strict";
 * import { readEmbeddedIndex } from "./embedded_index.ts";
 *
 * const bytes = new Uint8Array(100);
 * const reader = { name: "x", size: 100, read: (o: number, n: number) => Promise.resolve(bytes.subarray(o, o + n)), close() {} };
 * assert.equal(await readEmbeddedIndex(reader), null);
 * ```
 */
export async function readEmbeddedIndex(reader: RangeReader): Promise<EmbeddedIndex | null> {
  if (reader.size < SEEK_TABLE_FOOTER_SIZE) return null;
  const footer = await reader.read(reader.size - SEEK_TABLE_FOOTER_SIZE, SEEK_TABLE_FOOTER_SIZE);
  const tableSize = seekTableSize(footer);
  if (tableSize === null) return null;
  if (tableSize > reader.size) {
    throw new VmaFormatError(
      "bad-seek-table",
      reader.size - SEEK_TABLE_FOOTER_SIZE,
      `bad zstd seek table: it says it is ${tableSize} bytes, more than the file`,
    );
  }
  const seekTable = decodeSeekTable(
    await reader.read(reader.size - tableSize, tableSize),
    reader.size,
  );
  // The index frame is the last frame before the table that decompresses to nothing.
  const { compressedSizes, decompressedSizes } = seekTable;
  let frame = compressedSizes.length - 1;
  let offset = reader.size - tableSize;
  while (frame >= 0 && decompressedSizes[frame] !== 0) offset -= compressedSizes[frame--]!;
  if (frame < 0) return { seekTable, index: undefined, indexOffset: -1, indexFrame: -1 };
  offset -= compressedSizes[frame]!;
  const size = compressedSizes[frame]!;
  if (size < 8 + INDEX_TAG.length || size > MAX_INDEX_SIZE) {
    return { seekTable, index: undefined, indexOffset: -1, indexFrame: -1 };
  }
  const bytes = await reader.read(offset, size);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const tag = new TextDecoder().decode(bytes.subarray(8, 8 + INDEX_TAG.length));
  const ours = view.getUint32(0, true) === INDEX_FRAME_MAGIC;
  if (!ours && tag !== INDEX_TAG) {
    return { seekTable, index: undefined, indexOffset: -1, indexFrame: -1 }; // another tool's
  }
  if (!ours || tag !== INDEX_TAG) {
    throw new VmaFormatError(
      "bad-index",
      offset,
      `the index frame is damaged (its ${ours ? "tag" : "magic"} is wrong)`,
    );
  }
  if (view.getUint32(4, true) !== size - 8) {
    throw new VmaFormatError(
      "bad-index",
      offset + 4,
      `the index frame says it holds ${view.getUint32(4, true)} bytes, the seek table ${size - 8}`,
    );
  }
  // This project writes the index frame's entry and the table's descriptor just so; any
  // other value is a changed byte, even where a reader would not care.
  const descriptor = footer[footer.byteLength - 5]!;
  const checksum = seekTable.checksums?.[frame];
  if (descriptor !== 0x80 || (checksum !== undefined && checksum !== EMPTY_CHECKSUM)) {
    throw new VmaFormatError(
      "bad-seek-table",
      reader.size - tableSize,
      "bad zstd seek table: its descriptor or the index frame's entry is not as written",
    );
  }
  const index = decodeIndex(bytes.subarray(8), offset + 8);
  return { seekTable, index, indexOffset: offset, indexFrame: frame };
}
