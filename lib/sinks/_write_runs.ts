// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Turning cluster records into as few writes as possible (internal): the stored blocks of a
 * record, clipped to the device size, merged with neighbours that are contiguous both in
 * memory and on the target.
 *
 * @module
 */
import { forEachBlockRun } from "../_bytes.ts";
import { BLOCK_SIZE, CLUSTER_SIZE } from "../vma/format.ts";
import type { Lease, VmaClusterRecord } from "../vma/records.ts";

/**
 * Byte ranges of a cluster's stored blocks: runs of consecutive mask bits, cut at `size`.
 *
 * @example The last cluster of a device of 65536 + 14000 bytes
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VmaClusterRecord } from "../vma/records.ts";
 * import { storedRanges } from "./_write_runs.ts";
 *
 * const data = new Uint8Array(65536);
 * const record: VmaClusterRecord = { type: "cluster", devId: 1, cluster: 1, mask: 0b1011, data };
 * const ranges = storedRanges(record, 65536 + 14000);
 * assert.deepEqual(ranges.map(({ position, bytes }) => [position, bytes.byteLength]), [
 *   [65536, 8192], // blocks 0 and 1
 *   [65536 + 12288, 14000 - 12288], // block 3, cut at the device's end
 * ]);
 * ```
 */
export function storedRanges(
  record: VmaClusterRecord,
  deviceSize: number,
): { position: number; bytes: Uint8Array }[] {
  const ranges: { position: number; bytes: Uint8Array }[] = [];
  const data = record.data;
  if (data === null) return ranges;
  const base = record.cluster * CLUSTER_SIZE;
  const end = Math.min(CLUSTER_SIZE, deviceSize - base);
  forEachBlockRun(record.mask, (first, last) => {
    const start = first * BLOCK_SIZE;
    const stop = Math.min(last * BLOCK_SIZE, end);
    if (stop > start) ranges.push({ position: base + start, bytes: data.subarray(start, stop) });
  });
  return ranges;
}

/**
 * Collects writes for targets of type `T` and merges each with the previous one when both
 * are contiguous in memory and on the target, so an extent of neighbouring clusters becomes
 * one write. Leases are released once the bytes they cover are written.
 *
 * @example Two neighbouring clusters of one buffer become one write
 * ```ts
 * import assert from "node:assert/strict";
 * import { WriteCoalescer } from "./_write_runs.ts";
 *
 * const writes: [string, number, number][] = [];
 * const coalescer = new WriteCoalescer<string>((target, position, bytes) =>
 *   Promise.resolve(void writes.push([target, position, bytes.byteLength]))
 * );
 * const buffer = new Uint8Array(2 * 65536);
 * for (const cluster of [0, 1]) {
 *   const data = buffer.subarray(cluster * 65536, (cluster + 1) * 65536);
 *   const record = { type: "cluster", devId: 1, cluster, mask: 0xffff, data } as const;
 *   await coalescer.add("disk.raw", record, 2 * 65536);
 * }
 * await coalescer.flush();
 * assert.deepEqual(writes, [["disk.raw", 0, 2 * 65536]]);
 * ```
 */
export class WriteCoalescer<T> {
  #write: (target: T, position: number, bytes: Uint8Array) => Promise<void>;
  #run: { target: T; position: number; bytes: Uint8Array; leases: Lease[] } | undefined;

  constructor(write: (target: T, position: number, bytes: Uint8Array) => Promise<void>) {
    this.#write = write;
  }

  /** Adds the stored blocks of `record`; its lease goes with the write of its last bytes. */
  async add(target: T, record: VmaClusterRecord, deviceSize: number): Promise<void> {
    for (const { position, bytes } of storedRanges(record, deviceSize)) {
      const run = this.#run;
      if (
        run !== undefined && run.target === target &&
        run.position + run.bytes.byteLength === position &&
        run.bytes.buffer === bytes.buffer &&
        run.bytes.byteOffset + run.bytes.byteLength === bytes.byteOffset
      ) {
        run.bytes = new Uint8Array(
          bytes.buffer,
          run.bytes.byteOffset,
          run.bytes.byteLength + bytes.byteLength,
        );
      } else {
        await this.flush();
        this.#run = { target, position, bytes, leases: [] };
      }
    }
    if (record.lease === undefined) return;
    if (this.#run === undefined) record.lease.release();
    else this.#run.leases.push(record.lease);
  }

  /** Writes what is pending. */
  async flush(): Promise<void> {
    const run = this.#run;
    if (run === undefined) return;
    this.#run = undefined;
    await this.#write(run.target, run.position, run.bytes);
    for (const lease of run.leases) lease.release();
  }

  /** Drops what is pending (after a failure). */
  discard(): void {
    this.#run = undefined;
  }
}
