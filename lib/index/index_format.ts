// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The archive index: what it holds, and its bytes (the payload of the skippable frame in a
 * seekable `.vma.zst`, and the whole of an `ARCHIVE.idx` sidecar).
 *
 * Layout, little-endian:
 *
 * | bytes      | field                                                                      |
 * | ---------- | -------------------------------------------------------------------------- |
 * | 8          | tag `VMAIDX01`                                                             |
 * | 4          | length `J` of the JSON header                                              |
 * | J          | JSON header (UTF-8): identity, devices, counts, what the digests cover     |
 * | pad        | zeros up to a multiple of 8                                                |
 * | 4 × E      | per extent: u16 data blocks, u8 used slots, u8 zero                        |
 * | 32 × E     | per extent: SHA-256 of its stored data (zeros for an extent without data)  |
 * | 16 × R     | runs: u32 first cluster, u32 count, u32 + u16 first slot, u8 dev id, u8 flags |
 * | 8          | total length of the index, trailer included                                |
 * | 32         | SHA-256 of every byte before it                                             |
 *
 * Slots are counted over the whole archive, used slots only, in archive order: cluster
 * `first + i` of a run is in slot `slot + i`. Flag bit 0 marks a run of zero clusters
 * (mask 0). Runs are sorted by device, then by first cluster.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { BLOCK_SIZE, clusterCount, EXTENT_HEADER_SIZE, SLOTS_PER_EXTENT } from "../vma/format.ts";
import { VmaFormatError } from "../vma/errors.ts";

/** The first bytes of every index. */
export const INDEX_TAG = "VMAIDX01";
const TAG_BYTES = new TextEncoder().encode(INDEX_TAG);
const EXTENT_ENTRY = 4;
const DIGEST_SIZE = 32;
const RUN_ENTRY = 16;
const TRAILER = 8 + DIGEST_SIZE;
/** An index larger than this is refused before it is read (about 3.5 PiB of disks). */
export const MAX_INDEX_SIZE = 2 ** 31;

/**
 * What each extent digest covers: the extent's data blocks as the VMA stream holds them
 * (`vma-data`, for plain `.vma` and for sidecars of any archive), or the compressed zstd
 * frame that holds them (`zstd-frame`, inside a seekable `.vma.zst`, so a copied frame keeps
 * its digest and verify can check the file's bytes at the speed they are read), or nothing
 * (`none`: a map built by scanning the extent headers of a plain `.vma`, for random access).
 */
export type DigestScope = "vma-data" | "zstd-frame" | "none";

/** A device as the index lists it. */
export interface VmaIndexDevice {
  /** Device id, 1 to 254. */
  devId: number;
  /** Device name, such as `drive-scsi0`. */
  name: string;
  /** Size in bytes. */
  size: number;
}

/** Where a synthetic full backup took its unchanged clusters from. */
export interface VmaIndexBase {
  /** UUID of the base archive. */
  uuid: string;
  /** The dirty bitmap the changed clusters came from. */
  checkpoint?: string;
}

/** Runs of clusters: parallel arrays, one entry per run. */
export interface VmaIndexRuns {
  /** Device id of each run. */
  devIds: Uint8Array;
  /** First cluster of each run. */
  firstClusters: Uint32Array;
  /** Clusters in each run. */
  counts: Uint32Array;
  /** Archive-wide used-slot number of the run's first cluster. */
  slots: Float64Array;
  /** 1 when the run's clusters are all zero (mask 0). */
  zero: Uint8Array;
}

/** An archive index, decoded. */
export interface VmaIndex {
  /** Archive UUID (the VMA header's). */
  uuid: string;
  /** Archive creation time, Unix seconds. */
  ctime: number;
  /** Size of the VMA header in bytes: the first extent starts here. */
  headerSize: number;
  /** The VMA header's MD5 (hex), binding the index to one exact header. */
  headerMd5: string;
  /** Length of the (decompressed) VMA stream. */
  archiveBytes: number;
  /** The devices of the archive. */
  devices: VmaIndexDevice[];
  /** What the extent digests cover. */
  digestScope: DigestScope;
  /** For a synthetic full backup: the base it was made from. */
  base?: VmaIndexBase | undefined;
  /**
   * In a seekable `.vma.zst`: SHA-256 (hex) of every frame that has no digest of its own
   * (the VMA header's, the extent headers', the runs of empty extents), in file order, so
   * that each stored byte is under a digest.
   */
  framesDigest?: string | undefined;
  /** Per extent: its 4 KiB data blocks. */
  blockCounts: Uint16Array;
  /** Per extent: its used slots. */
  slotCounts: Uint8Array;
  /** Per extent, 32 bytes each: SHA-256 of its stored data, zeros when it has none. */
  digests: Uint8Array;
  /** Where every cluster is. */
  runs: VmaIndexRuns;
}

interface JsonHeader {
  format: "vmabackup-index";
  version: 1;
  uuid: string;
  ctime: number;
  headerSize: number;
  headerMd5: string;
  archiveBytes: number;
  devices: VmaIndexDevice[];
  digestScope: DigestScope;
  base?: VmaIndexBase;
  framesDigest?: string;
  extents: number;
  runs: number;
}

/**
 * The bytes of `index`.
 *
 * @example Encode and decode
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeIndex, encodeIndex, type VmaIndex } from "./index_format.ts";
 *
 * const index: VmaIndex = {
 *   uuid: "0b7c6f4e-28a4-4d9a-9c43-7c1f8c1d2e3f", ctime: 0, headerSize: 12800,
 *   headerMd5: "00".repeat(16), archiveBytes: 12800 + 512 + 4096,
 *   devices: [{ devId: 1, name: "drive-scsi0", size: 65536 }], digestScope: "vma-data",
 *   blockCounts: Uint16Array.of(1), slotCounts: Uint8Array.of(1), digests: new Uint8Array(32),
 *   runs: {
 *     devIds: Uint8Array.of(1), firstClusters: Uint32Array.of(0), counts: Uint32Array.of(1),
 *     slots: Float64Array.of(0), zero: Uint8Array.of(0),
 *   },
 * };
 * const bytes = encodeIndex(index);
 * assert.deepEqual(decodeIndex(bytes), index);
 * bytes[20] ^= 1; // any change is caught by the digest
 * assert.throws(() => decodeIndex(bytes), /index digest/);
 * ```
 */
export function encodeIndex(index: VmaIndex): Uint8Array<ArrayBuffer> {
  const extents = index.blockCounts.length;
  const runs = index.runs.counts.length;
  const header: JsonHeader = {
    format: "vmabackup-index",
    version: 1,
    uuid: index.uuid,
    ctime: index.ctime,
    headerSize: index.headerSize,
    headerMd5: index.headerMd5,
    archiveBytes: index.archiveBytes,
    devices: index.devices.map(({ devId, name, size }) => ({ devId, name, size })),
    digestScope: index.digestScope,
    ...(index.base && { base: index.base }),
    ...(index.framesDigest && { framesDigest: index.framesDigest }),
    extents,
    runs,
  };
  const json = new TextEncoder().encode(JSON.stringify(header));
  const jsonEnd = align8(12 + json.byteLength);
  const length = jsonEnd + extents * (EXTENT_ENTRY + DIGEST_SIZE) + runs * RUN_ENTRY + TRAILER;
  const bytes = new Uint8Array(length);
  const view = new DataView(bytes.buffer);
  bytes.set(TAG_BYTES);
  view.setUint32(8, json.byteLength, true);
  bytes.set(json, 12);
  let at = jsonEnd;
  for (let e = 0; e < extents; e++, at += EXTENT_ENTRY) {
    view.setUint16(at, index.blockCounts[e]!, true);
    view.setUint8(at + 2, index.slotCounts[e]!);
  }
  bytes.set(index.digests, at);
  at += extents * DIGEST_SIZE;
  const { devIds, firstClusters, counts, slots, zero } = index.runs;
  for (let r = 0; r < runs; r++, at += RUN_ENTRY) {
    view.setUint32(at, firstClusters[r]!, true);
    view.setUint32(at + 4, counts[r]!, true);
    view.setUint32(at + 8, slots[r]! % 2 ** 32, true);
    view.setUint16(at + 12, Math.floor(slots[r]! / 2 ** 32), true);
    view.setUint8(at + 14, devIds[r]!);
    view.setUint8(at + 15, zero[r]!);
  }
  view.setBigUint64(at, BigInt(length), true);
  bytes.set(sha256(bytes.subarray(0, at + 8)), at + 8);
  return bytes;
}

/**
 * Decodes and checks an index: its digest, its sizes, and that it describes a complete,
 * consistent archive (every cluster of every device exactly once, slots and extents that
 * add up). Throws a `VmaFormatError` (`bad-index`) naming what is wrong; `at` is where the
 * index starts in its file, for the error's offset.
 *
 * @example A truncated index
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeIndex } from "./index_format.ts";
 *
 * assert.throws(() => decodeIndex(new TextEncoder().encode("VMAIDX01"), 4096), (error: Error) => {
 *   assert.match(error.message, /the index is truncated .*at byte 4096/);
 *   return true;
 * });
 * ```
 */
export function decodeIndex(bytes: Uint8Array, at = 0): VmaIndex {
  const fail = (detail: string, offset = 0): never => {
    throw new VmaFormatError("bad-index", at + offset, detail);
  };
  if (bytes.byteLength < 12 + TRAILER) fail(`the index is truncated (${bytes.byteLength} bytes)`);
  for (let i = 0; i < TAG_BYTES.byteLength; i++) {
    if (bytes[i] !== TAG_BYTES[i]) fail(`not a vmabackup index (no ${INDEX_TAG} tag)`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const end = bytes.byteLength - TRAILER;
  const stated = Number(view.getBigUint64(end, true));
  if (stated !== bytes.byteLength) {
    fail(`the index is ${bytes.byteLength} bytes but says it is ${stated} (truncated?)`, end);
  }
  if (sha256(bytes.subarray(0, end + 8)).toHex() !== bytes.subarray(end + 8).toHex()) {
    fail("the index digest does not match its content (corrupt index)", end + 8);
  }
  const jsonLength = view.getUint32(8, true);
  if (12 + jsonLength > end) fail("the index header is longer than the index", 8);
  let header: JsonHeader;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(
      bytes.subarray(12, 12 + jsonLength),
    ));
  } catch {
    return fail("the index header is not valid JSON", 12);
  }
  checkJsonHeader(header, fail);
  const { extents, runs } = header;
  const jsonEnd = align8(12 + jsonLength);
  if (jsonEnd + extents * (EXTENT_ENTRY + DIGEST_SIZE) + runs * RUN_ENTRY !== end) {
    fail(
      `the index holds ${
        end - jsonEnd
      } bytes of tables, not what ${extents} extents and ${runs} runs take`,
      jsonEnd,
    );
  }
  const blockCounts = new Uint16Array(extents);
  const slotCounts = new Uint8Array(extents);
  let position = jsonEnd;
  for (let e = 0; e < extents; e++, position += EXTENT_ENTRY) {
    blockCounts[e] = view.getUint16(position, true);
    slotCounts[e] = view.getUint8(position + 2);
  }
  const digests = bytes.slice(position, position + extents * DIGEST_SIZE);
  position += extents * DIGEST_SIZE;
  const table: VmaIndexRuns = {
    devIds: new Uint8Array(runs),
    firstClusters: new Uint32Array(runs),
    counts: new Uint32Array(runs),
    slots: new Float64Array(runs),
    zero: new Uint8Array(runs),
  };
  const runsAt = position;
  for (let r = 0; r < runs; r++, position += RUN_ENTRY) {
    table.firstClusters[r] = view.getUint32(position, true);
    table.counts[r] = view.getUint32(position + 4, true);
    table.slots[r] = view.getUint32(position + 8, true) +
      view.getUint16(position + 12, true) * 2 ** 32;
    table.devIds[r] = view.getUint8(position + 14);
    table.zero[r] = view.getUint8(position + 15);
  }
  const index: VmaIndex = {
    uuid: header.uuid,
    ctime: header.ctime,
    headerSize: header.headerSize,
    headerMd5: header.headerMd5,
    archiveBytes: header.archiveBytes,
    devices: header.devices.map(({ devId, name, size }) => ({ devId, name, size })),
    digestScope: header.digestScope,
    base: header.base,
    framesDigest: header.framesDigest,
    blockCounts,
    slotCounts,
    digests,
    runs: table,
  };
  if (index.base === undefined) delete index.base;
  if (index.framesDigest === undefined) delete index.framesDigest;
  checkConsistency(index, (detail) => fail(detail, runsAt));
  return index;
}

function checkJsonHeader(header: JsonHeader, fail: (detail: string) => never): void {
  const count = (value: unknown) => Number.isSafeInteger(value) && (value as number) >= 0;
  if (header?.format !== "vmabackup-index" || header.version !== 1) {
    fail(`unknown index format or version (${JSON.stringify(header?.format)} ${header?.version})`);
  }
  if (
    typeof header.uuid !== "string" ||
    !/^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$/.test(header.uuid)
  ) {
    fail("the index has no valid archive UUID");
  }
  if (typeof header.headerMd5 !== "string" || !/^[0-9a-f]{32}$/.test(header.headerMd5)) {
    fail("the index has no valid header MD5");
  }
  if (header.framesDigest !== undefined && !/^[0-9a-f]{64}$/.test(header.framesDigest)) {
    fail("the index has a malformed frames digest");
  }
  if (!["vma-data", "zstd-frame", "none"].includes(header.digestScope)) {
    fail(`unknown digest scope ${JSON.stringify(header.digestScope)}`);
  }
  for (const field of ["ctime", "headerSize", "archiveBytes", "extents", "runs"] as const) {
    if (!Number.isSafeInteger(header[field]) || (field !== "ctime" && header[field] < 0)) {
      fail(`the index field ${field} is not a valid number`);
    }
  }
  if (!Array.isArray(header.devices)) fail("the index lists no devices");
  for (const device of header.devices) {
    if (
      !count(device?.devId) || device.devId < 1 || device.devId > 255 ||
      typeof device.name !== "string" || !count(device.size) || device.size < 1
    ) {
      fail(`the index lists a bad device ${JSON.stringify(device)}`);
    }
  }
}

/** Slots, clusters and extents must add up, or the index points somewhere wrong. */
function checkConsistency(index: VmaIndex, fail: (detail: string) => never): void {
  let slots = 0;
  let bytes = index.headerSize;
  for (let e = 0; e < index.blockCounts.length; e++) {
    if (index.slotCounts[e]! > SLOTS_PER_EXTENT || index.blockCounts[e]! > 16 * SLOTS_PER_EXTENT) {
      fail(
        `extent ${e} of the index has ${index.slotCounts[e]} slots and ${
          index.blockCounts[e]
        } blocks`,
      );
    }
    slots += index.slotCounts[e]!;
    bytes += EXTENT_HEADER_SIZE + index.blockCounts[e]! * BLOCK_SIZE;
  }
  if (bytes !== index.archiveBytes) {
    fail(`the index extents add up to ${bytes} archive bytes, not ${index.archiveBytes}`);
  }
  const devices = new Map(index.devices.map((device) => [device.devId, device]));
  const covered = new Map<number, number>();
  const { devIds, firstClusters, counts, slots: firstSlots } = index.runs;
  let previous = { devId: 0, end: 0 };
  for (let r = 0; r < counts.length; r++) {
    const device = devices.get(devIds[r]!);
    if (device === undefined) fail(`run ${r} of the index names unknown device ${devIds[r]}`);
    const first = firstClusters[r]!;
    const count = counts[r]!;
    if (count < 1 || first + count > clusterCount(device!.size)) {
      fail(`run ${r} of the index points past the end of ${device!.name}`);
    }
    if (firstSlots[r]! + count > slots) fail(`run ${r} of the index points past the last slot`);
    if (devIds[r]! < previous.devId || (devIds[r] === previous.devId && first < previous.end)) {
      fail(`run ${r} of the index is out of order or overlaps the one before`);
    }
    previous = { devId: devIds[r]!, end: first + count };
    covered.set(devIds[r]!, (covered.get(devIds[r]!) ?? 0) + count);
  }
  let total = 0;
  for (const device of index.devices) {
    const clusters = covered.get(device.devId) ?? 0;
    total += clusters;
    if (device.name !== "vmstate" && clusters !== clusterCount(device.size)) {
      fail(
        `the index maps ${clusters} of the ${clusterCount(device.size)} clusters of ${device.name}`,
      );
    }
  }
  if (total !== slots) fail(`the index maps ${total} clusters to ${slots} slots`);
}

function align8(value: number): number {
  return Math.ceil(value / 8) * 8;
}

function sha256(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(bytes).digest());
}
