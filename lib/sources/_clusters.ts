// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Records over what a disk source found at an offset (internal): cluster records over a
 * buffer of freshly read bytes, or a zero run over a hole; and the walk over a dirty bitmap's
 * block status that says which ranges an incremental reads.
 *
 * @module
 */
import type { PooledBuffer } from "../_pool.ts";
import { type NbdExtent, NbdStateFlag } from "../protocols/nbd_client.ts";
import { CLUSTER_SIZE, clusterCount, validMask } from "../vma/format.ts";
import type { VmaClusterRecord, VmaZerosRecord } from "../vma/records.ts";

/**
 * The cluster records for `length` bytes of a device read into `buffer` from `offset` (a
 * multiple of 64 KiB). The last cluster is zero-padded past the data, its mask covers only
 * blocks inside the device, and every record holds a lease of its own on the buffer (none when
 * the buffer's pool does not recycle: the data then belong to the receiver).
 *
 * @example The whole device of 65536 + 4096 bytes in one buffer
 * ```ts
 * import assert from "node:assert/strict";
 * import { BufferPool } from "../_pool.ts";
 * import { bufferClusters } from "./_clusters.ts";
 *
 * const buffer = new BufferPool(2 * 65536).acquire();
 * buffer.bytes.fill(1);
 * const where = { devId: 1, deviceSize: 65536 + 4096, offset: 0, length: 65536 + 4096 };
 * const records = bufferClusters(buffer, where);
 * assert.deepEqual(records.map((record) => [record.cluster, record.mask]), [[0, 0xffff], [1, 1]]);
 * assert.equal(records[1]?.data?.[5000], 0); // zero-padded past the data
 * assert.notEqual(records[0]?.lease, records[1]?.lease); // one release each
 * ```
 */
export function bufferClusters(
  buffer: PooledBuffer,
  where: { devId: number; deviceSize: number; offset: number; length: number },
): VmaClusterRecord[] {
  const { devId, deviceSize, offset, length } = where;
  const bytes = buffer.bytes;
  const count = clusterCount(length);
  bytes.fill(0, length, count * CLUSTER_SIZE);
  const leases = buffer.lend(count);
  const first = offset / CLUSTER_SIZE;
  return Array.from({ length: count }, (_, i): VmaClusterRecord => {
    const record: VmaClusterRecord = {
      type: "cluster",
      devId,
      cluster: first + i,
      mask: validMask(deviceSize, first + i),
      data: bytes.subarray(i * CLUSTER_SIZE, (i + 1) * CLUSTER_SIZE),
    };
    if (leases !== undefined) record.lease = leases[i]!;
    return record;
  });
}

/** Largest zero run in one record: 64 GiB, so progress keeps moving on huge holes. */
const MAX_ZEROS_PER_RECORD = 1 << 20;

/**
 * The `zeros` record for a range of zeros from `offset` (a multiple of 64 KiB) to `zeroEnd`:
 * its whole clusters, or also the partial last cluster when the range reaches the device's
 * end, at most 64 GiB. `undefined` when the range holds no whole cluster, so the cluster
 * at `offset` must be read.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { zeroRun } from "./_clusters.ts";
 *
 * const run = zeroRun({ devId: 1, deviceSize: 1 << 20, offset: 65536, zeroEnd: 300_000 });
 * assert.deepEqual(run, { type: "zeros", devId: 1, cluster: 1, count: 3 });
 * assert.equal(zeroRun({ devId: 1, deviceSize: 1 << 20, offset: 0, zeroEnd: 4096 }), undefined);
 * ```
 */
export function zeroRun(
  where: { devId: number; deviceSize: number; offset: number; zeroEnd: number },
): VmaZerosRecord | undefined {
  const { devId, deviceSize, offset, zeroEnd } = where;
  const clusters = zeroEnd >= deviceSize
    ? clusterCount(deviceSize - offset)
    : Math.floor((zeroEnd - offset) / CLUSTER_SIZE);
  if (clusters <= 0) return undefined;
  const count = Math.min(clusters, MAX_ZEROS_PER_RECORD);
  return { type: "zeros", devId, cluster: offset / CLUSTER_SIZE, count };
}

/** A range of bytes marked dirty. */
export interface DirtyRange {
  start: number;
  end: number;
}

/**
 * Walks the block status of a `qemu:dirty-bitmap:NAME` context forward: `at(position)`
 * gives the next dirty range that ends after `position`, or `null` when none is left.
 * Positions must not go backwards (the extents are read once).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdStateFlag } from "../protocols/nbd_client.ts";
 * import { DirtyRanges } from "./_clusters.ts";
 *
 * const ranges = new DirtyRanges((async function* () {
 *   yield { offset: 0, length: 65536, flags: 0 };
 *   yield { offset: 65536, length: 131072, flags: NbdStateFlag.DIRTY };
 * })());
 * assert.deepEqual(await ranges.at(0), { start: 65536, end: 196608 });
 * assert.equal(await ranges.at(196608), null);
 * ```
 */
export class DirtyRanges {
  #extents: AsyncIterator<NbdExtent>;
  #dirty: DirtyRange | null | undefined;

  /** A walk over `extents`, the dirty bitmap context's block status in order. */
  constructor(extents: AsyncIterator<NbdExtent>) {
    this.#extents = extents;
  }

  /** The next dirty range that ends after `position`, or `null`. */
  async at(position: number): Promise<DirtyRange | null> {
    while (this.#dirty === undefined || (this.#dirty !== null && this.#dirty.end <= position)) {
      const next = await this.#extents.next();
      if (next.done) this.#dirty = null;
      else if (next.value.flags & NbdStateFlag.DIRTY) {
        this.#dirty = { start: next.value.offset, end: next.value.offset + next.value.length };
      }
    }
    return this.#dirty;
  }
}
