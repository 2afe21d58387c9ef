// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The 512-byte extent header: its checks and its slots.
 *
 * @module
 */
import { md5 } from "../_bytes.ts";
import { VmaFormatError } from "./errors.ts";
import { EXTENT_HEADER_SIZE, EXTENT_MAGIC, ExtentOffset, SLOTS_PER_EXTENT } from "./format.ts";

/** One used blockinfo slot of an extent. */
export interface VmaExtentSlot {
  /** Slot position in the extent header, 0 to 58. */
  index: number;
  /** 16-bit mask of the stored 4 KiB blocks. */
  mask: number;
  /** Device id. */
  devId: number;
  /** Cluster number. */
  cluster: number;
}

/**
 * Consecutive used slots of one extent that hold consecutive clusters of one device, all
 * zero (mask 0) or all with data: how an index records where clusters are, at a cost per
 * run rather than per cluster.
 */
export interface SlotRun {
  /** Device id. */
  devId: number;
  /** The first slot's cluster. */
  cluster: number;
  /** Slots in the run. */
  count: number;
  /** Whether the run's clusters are all zero. */
  zero: boolean;
}

/**
 * The runs of `slots` (used slots, in slot order).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { slotRuns } from "./extent_header.ts";
 *
 * const slots = [0, 1, 2].map((cluster) => ({ index: cluster, mask: cluster === 2 ? 0 : 1, devId: 1, cluster }));
 * assert.deepEqual(slotRuns(slots), [
 *   { devId: 1, cluster: 0, count: 2, zero: false },
 *   { devId: 1, cluster: 2, count: 1, zero: true },
 * ]);
 * ```
 */
export function slotRuns(slots: VmaExtentSlot[]): SlotRun[] {
  const runs: SlotRun[] = [];
  for (const { devId, cluster, mask } of slots) {
    const zero = mask === 0;
    const last = runs.at(-1);
    if (
      last !== undefined && last.devId === devId && last.cluster + last.count === cluster &&
      last.zero === zero
    ) last.count++;
    else runs.push({ devId, cluster, count: 1, zero });
  }
  return runs;
}

/** What an extent header says. */
export interface DecodedExtentHeader {
  /** 4 KiB data blocks after the header. */
  blockCount: number;
  /** The used slots in slot order (dev_id 0 slots are left out, as readers skip them). */
  slots: VmaExtentSlot[];
}

/**
 * Checks an extent header as the reference reader does (MD5 of the header, the archive's
 * UUID, magic and reserved field) and lists its used slots. Throws a `VmaFormatError` with
 * the archive offset (`offset` is where the extent starts). Whether the masks add up to the
 * block count is for the caller, who knows when the data has arrived.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../mod.ts";
 * import { decodeExtentHeader } from "./extent_header.ts";
 *
 * const archive = await new Response(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "zeros" as const, devId: 1, cluster: 0, count: 1 },
 * ]).pipeThrough(new VmaWriterStream())).bytes();
 * const uuid = archive.subarray(8, 24);
 * const extent = decodeExtentHeader(archive.subarray(12800), 12800, uuid);
 * assert.deepEqual(extent, { blockCount: 0, slots: [{ index: 0, mask: 0, devId: 1, cluster: 0 }] });
 * assert.throws(() => decodeExtentHeader(new Uint8Array(512), 12800, uuid), /chechsum/);
 * ```
 */
export function decodeExtentHeader(
  bytes: Uint8Array,
  offset: number,
  uuid: Uint8Array,
): DecodedExtentHeader {
  if (bytes.byteLength < EXTENT_HEADER_SIZE) {
    throw new VmaFormatError(
      "short-extent-header",
      offset,
      `read short extent (${bytes.byteLength} bytes)`,
    );
  }
  const header = bytes.slice(0, EXTENT_HEADER_SIZE);
  const view = new DataView(header.buffer);
  const stored = header.slice(ExtentOffset.md5, ExtentOffset.md5 + 16);
  header.fill(0, ExtentOffset.md5, ExtentOffset.md5 + 16);
  if (md5(header).toHex() !== stored.toHex()) {
    throw new VmaFormatError(
      "bad-extent-checksum",
      offset + ExtentOffset.md5,
      "wrong vma extent header chechsum",
    );
  }
  for (let i = 0; i < 16; i++) {
    if (header[ExtentOffset.uuid + i] !== uuid[i]) {
      throw new VmaFormatError(
        "bad-extent-uuid",
        offset + ExtentOffset.uuid,
        "wrong vma extent uuid",
      );
    }
  }
  if (
    view.getUint32(ExtentOffset.magic) !== EXTENT_MAGIC ||
    view.getUint16(ExtentOffset.reserved) !== 0
  ) {
    throw new VmaFormatError("bad-extent-magic", offset, "wrong vma extent header magic");
  }
  const slots: VmaExtentSlot[] = [];
  for (let index = 0; index < SLOTS_PER_EXTENT; index++) {
    const entry = ExtentOffset.blockInfo + 8 * index;
    const high = view.getUint32(entry);
    // dev_id 0 marks an empty slot: skipped entirely, its mask claims no data.
    if ((high & 0xff) === 0) continue;
    // Byte 2 is reserved and ignored, as the reference reader does.
    slots.push({
      index,
      mask: high >>> 16,
      devId: high & 0xff,
      cluster: view.getUint32(entry + 4),
    });
  }
  return { blockCount: view.getUint16(ExtentOffset.blockCount), slots };
}

/**
 * The 512-byte header of an extent: magic, block count, the archive's UUID, its slots and
 * its MD5, as the reference writer lays them out. For copying an extent's stored data
 * into another archive, whose UUID differs.
 *
 * @example A header that decodes to what went in
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeExtentHeader, encodeExtentHeader } from "./extent_header.ts";
 *
 * const uuid = crypto.getRandomValues(new Uint8Array(16));
 * const slots = [{ index: 0, mask: 0xffff, devId: 1, cluster: 7 }];
 * const header = encodeExtentHeader(uuid, 16, slots);
 * assert.deepEqual(decodeExtentHeader(header, 0, uuid), { blockCount: 16, slots });
 * ```
 */
export function encodeExtentHeader(
  uuid: Uint8Array,
  blockCount: number,
  slots: VmaExtentSlot[],
): Uint8Array<ArrayBuffer> {
  const header = new Uint8Array(EXTENT_HEADER_SIZE);
  const view = new DataView(header.buffer);
  view.setUint32(ExtentOffset.magic, EXTENT_MAGIC);
  view.setUint16(ExtentOffset.blockCount, blockCount);
  header.set(uuid, ExtentOffset.uuid);
  for (const { index, mask, devId, cluster } of slots) {
    const entry = ExtentOffset.blockInfo + 8 * index;
    view.setUint16(entry, mask);
    view.setUint16(entry + 2, devId); // byte 2 reserved (0), byte 3 dev_id
    view.setUint32(entry + 4, cluster);
  }
  header.set(md5(header), ExtentOffset.md5);
  return header;
}
