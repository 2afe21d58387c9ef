// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The zstd seekable format's seek table (v0.1.0, facebook/zstd
 * `contrib/seekable_format/zstd_seekable_compression_format.md`): the last frame of a
 * seekable `.vma.zst`, a skippable frame that lists every frame's compressed and
 * decompressed size and checksum, so a reader finds any byte with one frame read.
 *
 * Stock tools skip it: `zstd -d`, `zstd -t` and `pzstd -d` read the file as usual.
 *
 * @module
 */
import { VmaFormatError } from "../vma/errors.ts";
import { Growable } from "./_growable.ts";

/** Magic of the skippable frame that holds the table (`0x184D2A50 | 0xE`). */
export const SEEK_TABLE_MAGIC = 0x184d2a5e;
/** Magic at the very end of a seekable file. */
export const SEEKABLE_MAGIC = 0x8f92eab1;
/** Size of the table's footer: frame count, descriptor, magic. */
export const SEEK_TABLE_FOOTER_SIZE = 9;
/** The table's `Checksum_Flag`. */
const CHECKSUM_FLAG = 0x80;
/** Entries with checksums: compressed size, decompressed size, checksum. */
const ENTRY_SIZE = 12;

/** The frames of a seekable file, as parallel arrays. */
export interface SeekTable {
  /** Compressed size of each frame, in file order. */
  compressedSizes: Uint32Array;
  /** Decompressed size of each frame (0 for skippable frames). */
  decompressedSizes: Uint32Array;
  /** Low 32 bits of each frame's XXH64 (its `Content_Checksum`), when the table has them. */
  checksums: Uint32Array | null;
  /** Size of the table frame itself, at the end of the file. */
  tableSize: number;
}

/**
 * Collects frame entries as they are written and encodes the table frame at the end.
 * Memory: 10 bytes per frame.
 *
 * @example A table of two frames
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeSeekTable, SeekTableWriter } from "./seek_table.ts";
 *
 * const writer = new SeekTableWriter();
 * writer.add(100, 4096, 0xdeadbeef);
 * writer.add(40, 512, 0x12345678);
 * const table = writer.encode();
 * const decoded = decodeSeekTable(table, 140 + table.byteLength);
 * assert.deepEqual([...decoded.compressedSizes], [100, 40]);
 * assert.deepEqual([...decoded.checksums!], [0xdeadbeef, 0x12345678]);
 * ```
 */
export class SeekTableWriter {
  #compressed = new Growable(Uint32Array);
  #checksums = new Growable(Uint32Array);
  /** Decompressed sizes in 512-byte units: every VMA piece is a multiple of 512 bytes. */
  #decompressed = new Growable(Uint16Array);
  /** The few sizes that are not (none from this project's writer). */
  #odd = new Map<number, number>();

  /** Frames so far. */
  get frames(): number {
    return this.#compressed.length;
  }

  /** Bytes of entries held: 10 per frame. */
  get memoryBytes(): number {
    return this.#compressed.capacityBytes + this.#checksums.capacityBytes +
      this.#decompressed.capacityBytes;
  }

  /** Adds the next frame of the file. */
  add(compressedSize: number, decompressedSize: number, checksum: number): void {
    const units = decompressedSize / 512;
    if (Number.isInteger(units) && units < 65536) this.#decompressed.push(units);
    else {
      this.#odd.set(this.frames, decompressedSize);
      this.#decompressed.push(0);
    }
    this.#compressed.push(compressedSize);
    this.#checksums.push(checksum);
  }

  /** The table frame, to be written as the file's last bytes. */
  encode(): Uint8Array<ArrayBuffer> {
    const compressed = this.#compressed.view();
    const decompressed = this.#decompressed.view();
    const checksums = this.#checksums.view();
    const frames = compressed.length;
    const size = 8 + frames * ENTRY_SIZE + SEEK_TABLE_FOOTER_SIZE;
    const bytes = new Uint8Array(size);
    const view = new DataView(bytes.buffer);
    view.setUint32(0, SEEK_TABLE_MAGIC, true);
    view.setUint32(4, size - 8, true);
    for (let i = 0; i < frames; i++) {
      const at = 8 + i * ENTRY_SIZE;
      view.setUint32(at, compressed[i]!, true);
      view.setUint32(at + 4, this.#odd.get(i) ?? decompressed[i]! * 512, true);
      view.setUint32(at + 8, checksums[i]!, true);
    }
    view.setUint32(size - 9, frames, true);
    view.setUint8(size - 5, CHECKSUM_FLAG);
    view.setUint32(size - 4, SEEKABLE_MAGIC, true);
    return bytes;
  }
}

/**
 * Reads the footer of a file's last bytes: the size of the seek table to read, or `null`
 * when the file does not end with a seekable magic (it is not seekable).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { seekTableSize, SeekTableWriter } from "./seek_table.ts";
 *
 * const table = new SeekTableWriter().encode();
 * assert.equal(seekTableSize(table.subarray(-9)), table.byteLength);
 * assert.equal(seekTableSize(new Uint8Array(9)), null);
 * ```
 */
export function seekTableSize(footer: Uint8Array): number | null {
  if (footer.byteLength < SEEK_TABLE_FOOTER_SIZE) return null;
  const view = new DataView(footer.buffer, footer.byteOffset + footer.byteLength - 9, 9);
  if (view.getUint32(5, true) !== SEEKABLE_MAGIC) return null;
  const frames = view.getUint32(0, true);
  const entry = view.getUint8(4) & CHECKSUM_FLAG ? ENTRY_SIZE : 8;
  return 8 + frames * entry + SEEK_TABLE_FOOTER_SIZE;
}

/**
 * Decodes the seek table that ends a file of `fileSize` bytes, from the table's bytes, with
 * the checks real seekable readers make (zstd's contrib reader and pyzstd): the frame magic,
 * the frame size, reserved bits, and compressed sizes that add up to the rest of the file.
 * Throws a `VmaFormatError` (`bad-seek-table`) with the file offset.
 *
 * @example Sizes that do not add up
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeSeekTable, SeekTableWriter } from "./seek_table.ts";
 *
 * const writer = new SeekTableWriter();
 * writer.add(100, 4096, 0);
 * const table = writer.encode();
 * assert.throws(() => decodeSeekTable(table, 99 + table.byteLength), /add up to 100 bytes, not 99/);
 * ```
 */
export function decodeSeekTable(table: Uint8Array, fileSize: number): SeekTable {
  const at = fileSize - table.byteLength;
  const fail = (detail: string, offset = 0): never => {
    throw new VmaFormatError("bad-seek-table", at + offset, `bad zstd seek table: ${detail}`);
  };
  if (table.byteLength < 8 + SEEK_TABLE_FOOTER_SIZE || at < 0) fail("it is truncated");
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const size = table.byteLength;
  if (view.getUint32(size - 4, true) !== SEEKABLE_MAGIC) fail("no seekable magic", size - 4);
  const descriptor = view.getUint8(size - 5);
  if ((descriptor >> 2) & 0x1f) fail("reserved descriptor bits are set", size - 5);
  const frames = view.getUint32(size - 9, true);
  const entry = descriptor & CHECKSUM_FLAG ? ENTRY_SIZE : 8;
  if (8 + frames * entry + SEEK_TABLE_FOOTER_SIZE !== size) {
    fail(`${frames} entries do not fit its ${size} bytes`);
  }
  if (view.getUint32(0, true) !== SEEK_TABLE_MAGIC) fail("wrong frame magic");
  if (view.getUint32(4, true) !== size - 8) fail("wrong frame size", 4);
  const compressedSizes = new Uint32Array(frames);
  const decompressedSizes = new Uint32Array(frames);
  const checksums = entry === ENTRY_SIZE ? new Uint32Array(frames) : null;
  let total = 0;
  for (let i = 0; i < frames; i++) {
    const position = 8 + i * entry;
    compressedSizes[i] = view.getUint32(position, true);
    decompressedSizes[i] = view.getUint32(position + 4, true);
    if (checksums !== null) checksums[i] = view.getUint32(position + 8, true);
    if (compressedSizes[i] === 0 && decompressedSizes[i] !== 0) {
      fail(`frame ${i} has no compressed bytes but ${decompressedSizes[i]} decompressed`, position);
    }
    total += compressedSizes[i]!;
  }
  if (total !== at) fail(`its frames add up to ${total} bytes, not ${at}`);
  return { compressedSizes, decompressedSizes, checksums, tableSize: size };
}
