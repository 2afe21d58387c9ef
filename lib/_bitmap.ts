// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A paged bitmap of cluster numbers (internal). Pages are allocated on first use, so a
 * header that declares a huge device costs nothing until its clusters arrive.
 *
 * @module
 */

const PAGE_BITS = 1 << 16; // 8 KiB per page, 4 GiB of disk

/**
 * One bit per cluster, 0 to 2^32 - 1.
 *
 * @example Track which clusters arrived
 * ```ts
 * import assert from "node:assert/strict";
 * import { ClusterBitmap } from "./_bitmap.ts";
 *
 * const seen = new ClusterBitmap();
 * assert.ok(seen.add(0) && seen.add(1) && seen.add(70_000));
 * assert.equal(seen.add(1), false); // already set
 * assert.ok(seen.has(70_000) && !seen.has(2));
 * assert.equal(seen.firstMissing(100), 2);
 * assert.equal(seen.count, 3);
 * ```
 */
export class ClusterBitmap {
  #pages = new Map<number, Uint8Array>();
  /** Number of bits set. */
  count = 0;

  /** Sets bit `cluster`; returns `false` when it was already set. */
  add(cluster: number): boolean {
    const pageIndex = Math.floor(cluster / PAGE_BITS);
    let page = this.#pages.get(pageIndex);
    if (page === undefined) {
      page = new Uint8Array(PAGE_BITS / 8);
      this.#pages.set(pageIndex, page);
    }
    const bit = cluster % PAGE_BITS;
    const mask = 1 << (bit & 7);
    if (page[bit >>> 3]! & mask) return false;
    page[bit >>> 3]! |= mask;
    this.count++;
    return true;
  }

  /** True when bit `cluster` is set. */
  has(cluster: number): boolean {
    const page = this.#pages.get(Math.floor(cluster / PAGE_BITS));
    const bit = cluster % PAGE_BITS;
    return page !== undefined && (page[bit >>> 3]! & (1 << (bit & 7))) !== 0;
  }

  /** The lowest unset bit below `limit`, or `undefined` when all are set. */
  firstMissing(limit: number): number | undefined {
    for (let start = 0; start < limit; start += PAGE_BITS) {
      const page = this.#pages.get(start / PAGE_BITS);
      if (page === undefined) return start;
      for (let byte = 0; byte < page.byteLength; byte++) {
        if (page[byte] === 0xff) continue;
        for (let bit = 0; bit < 8; bit++) {
          const cluster = start + byte * 8 + bit;
          if (cluster >= limit) return undefined;
          if (!(page[byte]! & (1 << bit))) return cluster;
        }
      }
    }
    return undefined;
  }
}
