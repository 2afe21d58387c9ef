// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Records over what a disk source found at an offset (internal): cluster records over a
 * buffer of freshly read bytes, or a zero run over a hole.
 *
 * @module
 */
import type { PooledBuffer } from "../_pool.ts";
import { CLUSTER_SIZE, clusterCount, validMask } from "../vma/format.ts";
import type { VmaClusterRecord, VmaZerosRecord } from "../vma/records.ts";

/**
 * The cluster records for `length` bytes of a device read into `buffer` from `offset` (a
 * multiple of 64 KiB). The last cluster is zero-padded past the data, its mask covers only
 * blocks inside the device, and every record holds the buffer's lease once.
 */
export function bufferClusters(
  buffer: PooledBuffer,
  where: { devId: number; deviceSize: number; offset: number; length: number },
): VmaClusterRecord[] {
  const { devId, deviceSize, offset, length } = where;
  const bytes = buffer.bytes;
  const count = clusterCount(length);
  bytes.fill(0, length, count * CLUSTER_SIZE);
  buffer.hold(count);
  const first = offset / CLUSTER_SIZE;
  return Array.from({ length: count }, (_, i): VmaClusterRecord => ({
    type: "cluster",
    devId,
    cluster: first + i,
    mask: validMask(deviceSize, first + i),
    data: bytes.subarray(i * CLUSTER_SIZE, (i + 1) * CLUSTER_SIZE),
    lease: buffer,
  }));
}

/** Largest zero run in one record: 64 GiB, so progress keeps moving on huge holes. */
const MAX_ZEROS_PER_RECORD = 1 << 20;

/**
 * The `zeros` record for a range of zeros from `offset` (a multiple of 64 KiB) to `zeroEnd`:
 * its whole clusters, or also the partial last cluster when the range reaches the device's
 * end, at most 64 GiB. `undefined` when the range holds no whole cluster, so the cluster
 * at `offset` must be read.
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
