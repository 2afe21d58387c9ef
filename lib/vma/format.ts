// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Constants of the Proxmox VMA format (version 1), as the reference code uses them.
 *
 * Offsets and sizes follow `vma.h` of pve-qemu; see the project's `vma-format.md` notes.
 *
 * @example Cluster arithmetic and the header layout
 * ```ts
 * import assert from "node:assert/strict";
 * import {
 *   BLOCK_SIZE, BLOCKS_PER_CLUSTER, CLUSTER_SIZE, EXTENT_HEADER_SIZE, ExtentOffset, FULL_MASK,
 *   HEADER_FIXED_SIZE, HeaderOffset, SLOTS_PER_EXTENT, VMA_MAGIC, VMA_VERSION,
 * } from "./format.ts";
 * import { encodeHeader } from "./header.ts";
 *
 * assert.equal(CLUSTER_SIZE / BLOCK_SIZE, BLOCKS_PER_CLUSTER);
 * assert.equal(FULL_MASK, 2 ** BLOCKS_PER_CLUSTER - 1);
 * assert.equal(ExtentOffset.blockInfo + SLOTS_PER_EXTENT * 8, EXTENT_HEADER_SIZE); // u64 slots
 * const devices = [{ devId: 1, name: "drive-scsi0", size: CLUSTER_SIZE }];
 * const header = encodeHeader({ uuid: crypto.randomUUID(), ctime: 0, configs: [], devices });
 * const view = new DataView(header.buffer);
 * assert.equal(view.getUint32(HeaderOffset.magic), VMA_MAGIC);
 * assert.equal(view.getUint32(HeaderOffset.version), VMA_VERSION);
 * assert.equal(view.getUint32(HeaderOffset.blobBufferOffset), HEADER_FIXED_SIZE);
 * ```
 *
 * @module
 */

/** Size of one VMA block: the unit of sparseness (4 KiB). */
export const BLOCK_SIZE = 4096;
/** Size of one VMA cluster: the unit of copy (64 KiB = 16 blocks). */
export const CLUSTER_SIZE = 65536;
/** Number of 4 KiB blocks in a cluster, which is also the width of a cluster mask. */
export const BLOCKS_PER_CLUSTER = 16;
/** Mask of a cluster whose 16 blocks all hold data. */
export const FULL_MASK = 0xffff;

/** `"VMA\0"`, the archive magic. */
export const VMA_MAGIC = 0x564d4100;
/** `"VMAE"`, the extent magic. */
export const EXTENT_MAGIC = 0x564d4145;
/** The only format version there is. */
export const VMA_VERSION = 1;

/** Size of the fixed part of the archive header (`sizeof(VmaHeader)`). */
export const HEADER_FIXED_SIZE = 12288;
/** Largest header the reference writer produces (`HEADERBUF_SIZE`, 8 clusters). */
export const WRITER_MAX_HEADER_SIZE = 524288;
/** Largest header this reader accepts: the format allows more than the writer makes. */
export const READER_MAX_HEADER_SIZE = 16 * 1024 * 1024;
/** Maximum number of config blobs. */
export const MAX_CONFIGS = 256;
/** Highest device id a writer assigns (255 is reserved "for safety"). */
export const MAX_DEV_ID = 254;
/** Largest payload of one header blob (the u16 length prefix). */
export const MAX_BLOB_SIZE = 65535;
/** Device sizes are limited by 32-bit cluster numbers: 2^32 clusters of 64 KiB. */
export const MAX_DEVICE_SIZE = 2 ** 32 * CLUSTER_SIZE;
/** Reserved device name of a VM RAM-state stream, written in cluster order. */
export const VMSTATE_NAME = "vmstate";

/** Size of an extent header. */
export const EXTENT_HEADER_SIZE = 512;
/** Number of blockinfo slots in an extent header. */
export const SLOTS_PER_EXTENT = 59;
/** Number of slots the Proxmox writer fills before it flushes an extent. */
export const WRITER_SLOTS_PER_EXTENT = 58;
/** Largest possible extent on disk. */
export const MAX_EXTENT_SIZE: number = EXTENT_HEADER_SIZE + SLOTS_PER_EXTENT * CLUSTER_SIZE;

/** Byte offsets inside the fixed header. */
export const HeaderOffset = {
  magic: 0,
  version: 4,
  uuid: 8,
  ctime: 24,
  md5: 32,
  blobBufferOffset: 48,
  blobBufferSize: 52,
  headerSize: 56,
  configNames: 2044,
  configData: 3068,
  devInfo: 4096,
} as const;

/** Size of one `VmaDeviceInfoHeader` entry. */
export const DEV_INFO_SIZE = 32;

/** Byte offsets inside an extent header. */
export const ExtentOffset = {
  magic: 0,
  reserved: 4,
  blockCount: 6,
  uuid: 8,
  md5: 24,
  blockInfo: 40,
} as const;

/**
 * Number of clusters a device of `size` bytes spans.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { clusterCount } from "./format.ts";
 *
 * assert.equal(clusterCount(65536), 1);
 * assert.equal(clusterCount(65537), 2); // a partial last cluster counts
 * ```
 */
export function clusterCount(size: number): number {
  return Math.ceil(size / CLUSTER_SIZE);
}

/**
 * The mask of blocks of `cluster` that lie (at least partly) inside a device of `size` bytes.
 * Blocks wholly past the end must never be stored.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { validMask } from "./format.ts";
 *
 * assert.equal(validMask(65536 + 4097, 1), 0b11); // 4097 bytes touch two 4 KiB blocks
 * assert.equal(validMask(65536, 0), 0xffff);
 * ```
 */
export function validMask(size: number, cluster: number): number {
  const remaining = size - cluster * CLUSTER_SIZE;
  if (remaining >= CLUSTER_SIZE) return FULL_MASK;
  if (remaining <= 0) return 0;
  return (1 << Math.ceil(remaining / BLOCK_SIZE)) - 1;
}

/**
 * The name a config file is stored under: the last component of its path, as
 * `g_path_get_basename` gives it to the reference writer.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { configName } from "./format.ts";
 *
 * assert.equal(configName("/etc/pve/qemu-server/100.conf"), "100.conf");
 * assert.equal(configName("qemu-server.conf"), "qemu-server.conf");
 * ```
 */
export function configName(path: string): string {
  const trimmed = path.replace(/\/+$/, "");
  return trimmed === "" ? path : trimmed.slice(trimmed.lastIndexOf("/") + 1);
}
