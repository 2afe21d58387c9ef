// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Byte utilities shared by the stages (internal).
 *
 * @module
 */
import { createHash } from "node:crypto";
import { BLOCK_SIZE } from "./vma/format.ts";

/**
 * True when `length` bytes from `start` are all zero. Scans 32-bit words when aligned.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { isZeroRange } from "./_bytes.ts";
 *
 * const bytes = new Uint8Array(64);
 * bytes[40] = 1;
 * assert.ok(isZeroRange(bytes, 0, 32));
 * assert.ok(!isZeroRange(bytes, 32, 32));
 * ```
 */
export function isZeroRange(bytes: Uint8Array, start: number, length: number): boolean {
  const offset = bytes.byteOffset + start;
  if ((offset & 3) === 0 && (length & 15) === 0 && length > 0) {
    const words = new Uint32Array(bytes.buffer, offset, length >>> 2);
    if (words[0] !== 0) return false; // cheap exit for data blocks
    let acc = 0;
    for (let i = 0; i < words.length; i += 4) {
      acc |= words[i]! | words[i + 1]! | words[i + 2]! | words[i + 3]!;
      if (acc !== 0) return false;
    }
    return true;
  }
  for (let i = start; i < start + length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/**
 * Clears the bits of `mask` whose 4 KiB block of `cluster` (a 64 KiB view) is all zero.
 * Uses one word view for the whole cluster instead of one per block.
 *
 * @example Drop the all-zero blocks of a cluster from its mask
 * ```ts
 * import assert from "node:assert/strict";
 * import { zeroBlockMask } from "./_bytes.ts";
 *
 * const cluster = new Uint8Array(65536);
 * cluster[4096 * 3 + 10] = 7; // only block 3 holds data
 * assert.equal(zeroBlockMask(cluster, 0xffff), 1 << 3);
 * assert.equal(zeroBlockMask(cluster, 0b0111), 0);
 * ```
 */
export function zeroBlockMask(cluster: Uint8Array, mask: number): number {
  if (mask === 0) return 0;
  if ((cluster.byteOffset & 3) !== 0) {
    for (let block = 0; block < 16; block++) {
      const bit = 1 << block;
      if ((mask & bit) && isZeroRange(cluster, block * BLOCK_SIZE, BLOCK_SIZE)) mask &= ~bit;
    }
    return mask;
  }
  const words = new Uint32Array(cluster.buffer, cluster.byteOffset, cluster.byteLength >>> 2);
  const wordsPerBlock = BLOCK_SIZE >>> 2;
  for (let block = 0; block < 16; block++) {
    const bit = 1 << block;
    if (!(mask & bit)) continue;
    const start = block * wordsPerBlock;
    if (words[start] !== 0) continue;
    let acc = 0;
    for (let i = start; i < start + wordsPerBlock; i += 8) {
      acc |= words[i]! | words[i + 1]! | words[i + 2]! | words[i + 3]! |
        words[i + 4]! | words[i + 5]! | words[i + 6]! | words[i + 7]!;
      if (acc !== 0) break;
    }
    if (acc === 0) mask &= ~bit;
  }
  return mask;
}

/**
 * Number of set bits of a 16-bit mask.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { popcount16 } from "./_bytes.ts";
 *
 * assert.equal(popcount16(0b1010_0000_0000_0111), 5);
 * assert.equal(popcount16(0xffff), 16);
 * ```
 */
export function popcount16(mask: number): number {
  mask = mask - ((mask >>> 1) & 0x5555);
  mask = (mask & 0x3333) + ((mask >>> 2) & 0x3333);
  mask = (mask + (mask >>> 4)) & 0x0f0f;
  return (mask + (mask >>> 8)) & 0x1f;
}

/**
 * Calls `visit(first, end)` for each run of consecutive set bits of a 16-bit block mask,
 * lowest first: blocks `first` to `end - 1` are stored.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { forEachBlockRun } from "./_bytes.ts";
 *
 * const runs: number[][] = [];
 * forEachBlockRun(0b1110_0000_0000_0011, (first, end) => runs.push([first, end]));
 * assert.deepEqual(runs, [[0, 2], [13, 16]]);
 * ```
 */
export function forEachBlockRun(mask: number, visit: (first: number, end: number) => void): void {
  let remaining = mask & 0xffff;
  while (remaining !== 0) {
    const first = 31 - Math.clz32(remaining & -remaining);
    let end = first + 1;
    while (end < 16 && (remaining & (1 << end))) end++;
    remaining &= ~(((1 << (end - first)) - 1) << first);
    visit(first, end);
  }
}

/**
 * MD5 digest of `bytes`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { md5 } from "./_bytes.ts";
 *
 * assert.equal(md5(new TextEncoder().encode("abc")).toHex(), "900150983cd24fb0d6963f7d28e17f72");
 * ```
 */
export function md5(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("md5").update(bytes).digest());
}

/**
 * Parses a canonical UUID string into 16 bytes, or throws a `TypeError`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { uuidToBytes } from "./_bytes.ts";
 *
 * const bytes = uuidToBytes("04FC12EB-0FED-4322-9AAA-F4E412F68096");
 * assert.deepEqual([...bytes.subarray(0, 3)], [0x04, 0xfc, 0x12]);
 * assert.throws(() => uuidToBytes("04fc12eb0fed43229aaaf4e412f68096"), TypeError);
 * ```
 */
export function uuidToBytes(uuid: string): Uint8Array {
  const hex = uuid.replaceAll("-", "");
  if (!/^[0-9a-fA-F]{32}$/.test(hex) || !/^[0-9a-fA-F-]{36}$/.test(uuid)) {
    throw new TypeError(`Cannot use UUID "${uuid}": Expected the form 8-4-4-4-12 hex digits`);
  }
  return Uint8Array.fromHex(hex.toLowerCase());
}

/**
 * Formats 16 bytes as a canonical lower-case UUID string.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { bytesToUuid } from "./_bytes.ts";
 *
 * const bytes = Uint8Array.fromHex("04fc12eb0fed43229aaaf4e412f68096");
 * assert.equal(bytesToUuid(bytes), "04fc12eb-0fed-4322-9aaa-f4e412f68096");
 * ```
 */
export function bytesToUuid(bytes: Uint8Array): string {
  const hex = bytes.toHex();
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${
    hex.slice(20)
  }`;
}

/**
 * Shared UTF-8 coders. The decoder is fatal, so invalid names are rejected, not mangled.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { utf8 } from "./_bytes.ts";
 *
 * assert.equal(utf8.decoder.decode(utf8.encoder.encode("drive-scsi0")), "drive-scsi0");
 * assert.throws(() => utf8.decoder.decode(new Uint8Array([0xff])), TypeError);
 * ```
 */
export const utf8 = {
  encoder: new TextEncoder(),
  decoder: new TextDecoder("utf-8", { fatal: true }),
};
