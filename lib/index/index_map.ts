// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Arithmetic over an index: where each extent starts, where a cluster is stored, which
 * ranges of a disk are zero, and what an extent holds (for messages).
 *
 * @module
 */
import { VmaFormatError } from "../vma/errors.ts";
import { BLOCK_SIZE, CLUSTER_SIZE, EXTENT_HEADER_SIZE } from "../vma/format.ts";
import type { VmaIndex, VmaIndexDevice } from "./index_format.ts";

/** Part of a disk, and whether it reads as zeros without being stored. */
export interface AllocationExtent {
  /** Byte offset in the disk. */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** True when the range is all zero (its clusters have no data blocks). */
  zero: boolean;
}

/**
 * Lookups over a decoded index. Memory: 16 bytes per extent (two prefix sums).
 *
 * @example Where the clusters of a two-extent archive are
 * ```ts
 * import assert from "node:assert/strict";
 * import { IndexMap, type VmaIndex } from "../../mod.ts";
 *
 * const index: VmaIndex = {
 *   uuid: "0b7c6f4e-28a4-4d9a-9c43-7c1f8c1d2e3f", ctime: 0, headerSize: 12800,
 *   headerMd5: "00".repeat(16), archiveBytes: 12800 + 2 * 512 + 4096,
 *   devices: [{ devId: 1, name: "drive-scsi0", size: 3 * 65536 }], digestScope: "none",
 *   blockCounts: Uint16Array.of(1, 0), slotCounts: Uint8Array.of(2, 1), digests: new Uint8Array(64),
 *   runs: { // cluster 0 has data, clusters 1 and 2 are zero
 *     devIds: Uint8Array.of(1, 1), firstClusters: Uint32Array.of(0, 1), counts: Uint32Array.of(1, 2),
 *     slots: Float64Array.of(0, 1), zero: Uint8Array.of(0, 1),
 *   },
 * };
 * const map = new IndexMap(index);
 * assert.deepEqual(map.locate(1, 0), { extent: 0, slot: 0 });
 * assert.equal(map.locate(1, 2), null);
 * assert.equal(map.extentOffsets[1], 12800 + 512 + 4096);
 * assert.deepEqual(map.allocation(1, 0, 3 * 65536).map((part) => part.zero), [false, true]);
 * assert.equal(map.describe(1), " (drive-scsi0 clusters 2-2)");
 * assert.deepEqual(map.slotsOf(0).map((slot) => [slot.cluster, slot.zero]), [[0, false], [1, true]]);
 * ```
 */
export class IndexMap {
  /** The index. */
  readonly index: VmaIndex;
  /** Per extent: its archive offset; one more entry, the end of the archive. */
  readonly extentOffsets: Float64Array;
  /** Per extent: archive-wide number of its first used slot; one more entry, the total. */
  readonly slotStarts: Float64Array;
  /** Per device: its range of runs in the index. */
  #runRanges = new Map<number, [number, number]>();
  /** Run numbers sorted by their first slot, made when first needed. */
  #bySlot: Uint32Array | undefined;

  /** Lookups over `index`. */
  constructor(index: VmaIndex) {
    this.index = index;
    const extents = index.blockCounts.length;
    this.extentOffsets = new Float64Array(extents + 1);
    this.slotStarts = new Float64Array(extents + 1);
    let offset = index.headerSize;
    let slots = 0;
    for (let e = 0; e < extents; e++) {
      this.extentOffsets[e] = offset;
      this.slotStarts[e] = slots;
      offset += EXTENT_HEADER_SIZE + index.blockCounts[e]! * BLOCK_SIZE;
      slots += index.slotCounts[e]!;
    }
    this.extentOffsets[extents] = offset;
    this.slotStarts[extents] = slots;
    const { devIds } = index.runs;
    for (let r = 0; r < devIds.length; r++) {
      const range = this.#runRanges.get(devIds[r]!);
      if (range === undefined) this.#runRanges.set(devIds[r]!, [r, r + 1]);
      else range[1] = r + 1;
    }
  }

  /** Which parts of `devId`'s range `offset`..`offset + length` are zero, by the index alone. */
  allocation(devId: number, offset: number, length: number): AllocationExtent[] {
    const device = this.#device(devId);
    const end = Math.min(offset + length, device.size);
    const result: AllocationExtent[] = [];
    const { firstClusters, counts, zero } = this.index.runs;
    const [lo, hi] = this.#runRanges.get(devId) ?? [0, 0];
    let r = this.#runAt(lo, hi, Math.floor(offset / CLUSTER_SIZE));
    for (let at = offset; at < end && r < hi; r++) {
      const runEnd = Math.min(end, (firstClusters[r]! + counts[r]!) * CLUSTER_SIZE);
      if (runEnd <= at) continue;
      const isZero = zero[r] === 1;
      const last = result.at(-1);
      if (last !== undefined && last.zero === isZero) last.length += runEnd - at;
      else result.push({ offset: at, length: runEnd - at, zero: isZero });
      at = runEnd;
    }
    return result;
  }
  /** The run that holds `cluster`: binary search within the device's runs. */
  #runAt(lo: number, hi: number, cluster: number): number {
    const first = this.index.runs.firstClusters;
    while (hi - lo > 1) {
      const mid = (lo + hi) >>> 1;
      if (first[mid]! <= cluster) lo = mid;
      else hi = mid;
    }
    return lo;
  }
  /**
   * The archive-wide used-slot number of cluster `cluster` of `devId`, and whether the
   * index says it is a zero cluster. Throws a `VmaFormatError` for a cluster it does not map.
   */
  slotOf(devId: number, cluster: number): { slot: number; zero: boolean } {
    const [lo, hi] = this.#runRanges.get(devId) ?? [0, 0];
    const { firstClusters, counts, slots, zero } = this.index.runs;
    const r = lo < hi ? this.#runAt(lo, hi, cluster) : -1;
    if (r < 0 || cluster < firstClusters[r]! || cluster >= firstClusters[r]! + counts[r]!) {
      throw new VmaFormatError(
        "bad-index",
        0,
        `the index does not map cluster ${cluster} of device ${devId}`,
      );
    }
    return { slot: slots[r]! + cluster - firstClusters[r]!, zero: zero[r] === 1 };
  }

  /**
   * Where cluster `cluster` of `devId` is stored: its extent and its position among that
   * extent's used slots; `null` for a zero cluster, which is not stored.
   */
  locate(devId: number, cluster: number): { extent: number; slot: number } | null {
    const { slot, zero } = this.slotOf(devId, cluster);
    if (zero) return null;
    const extent = this.extentOfSlot(slot);
    return { extent, slot: slot - this.slotStarts[extent]! };
  }

  /**
   * The clusters in extent `e`'s used slots, in slot order: device, cluster, and whether
   * it is a zero cluster. Walks the runs by slot (sorted once, 4 bytes per run).
   */
  slotsOf(e: number): { devId: number; cluster: number; zero: boolean }[] {
    const { devIds, firstClusters, counts, slots, zero } = this.index.runs;
    this.#bySlot ??= Uint32Array.from({ length: counts.length }, (_, r) => r)
      .sort((a, b) => slots[a]! - slots[b]!);
    const order = this.#bySlot;
    const from = this.slotStarts[e]!;
    const to = this.slotStarts[e + 1]!;
    let lo = 0;
    let hi = order.length;
    while (hi - lo > 1) {
      const mid = (lo + hi) >>> 1;
      if (slots[order[mid]!]! <= from) lo = mid;
      else hi = mid;
    }
    const result: { devId: number; cluster: number; zero: boolean }[] = [];
    for (let i = lo; i < order.length && result.length < to - from; i++) {
      const r = order[i]!;
      const first = Math.max(from, slots[r]!);
      const last = Math.min(to, slots[r]! + counts[r]!);
      for (let slot = first; slot < last; slot++) {
        result.push({
          devId: devIds[r]!,
          cluster: firstClusters[r]! + slot - slots[r]!,
          zero: zero[r] === 1,
        });
      }
    }
    return result;
  }

  /** The extent that holds archive-wide used slot `slot`. */
  extentOfSlot(slot: number): number {
    let e0 = 0;
    let e1 = this.slotStarts.length - 1;
    while (e1 - e0 > 1) {
      const mid = (e0 + e1) >>> 1;
      if (this.slotStarts[mid]! <= slot) e0 = mid;
      else e1 = mid;
    }
    return e0;
  }

  /** The extent whose bytes include archive offset `offset` (-1 inside the header). */
  extentAt(offset: number): number {
    if (offset < this.index.headerSize) return -1;
    let e0 = 0;
    let e1 = this.extentOffsets.length - 1;
    while (e1 - e0 > 1) {
      const mid = (e0 + e1) >>> 1;
      if (this.extentOffsets[mid]! <= offset) e0 = mid;
      else e1 = mid;
    }
    return e0;
  }
  /** `" (drive-scsi0 clusters 58-115)"`: what extent `e` holds, for messages. */
  describe(e: number | undefined): string {
    if (e === undefined) return "";
    const first = this.slotStarts[e]!;
    const last = this.slotStarts[e + 1]! - 1;
    const { devIds, firstClusters, counts, slots } = this.index.runs;
    const held = new Map<number, [number, number]>();
    for (let r = 0; r < counts.length; r++) {
      const lo = Math.max(first, slots[r]!);
      const hi = Math.min(last, slots[r]! + counts[r]! - 1);
      if (lo > hi) continue;
      const a = firstClusters[r]! + lo - slots[r]!;
      const b = firstClusters[r]! + hi - slots[r]!;
      const range = held.get(devIds[r]!);
      held.set(
        devIds[r]!,
        range === undefined ? [a, b] : [Math.min(range[0], a), Math.max(range[1], b)],
      );
    }
    const parts = [...held].map(([devId, [a, b]]) =>
      `${
        this.index.devices.find((device) => device.devId === devId)?.name ?? devId
      } clusters ${a}-${b}`
    );
    return parts.length === 0 ? "" : ` (${parts.join(", ")})`;
  }

  #device(devId: number): VmaIndexDevice {
    const device = this.index.devices.find((candidate) => candidate.devId === devId);
    if (device === undefined) throw new RangeError(`The archive has no device ${devId}`);
    return device;
  }
}
