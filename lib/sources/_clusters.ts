// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Cluster records over a buffer of freshly read device bytes (internal).
 *
 * @module
 */
import type { PooledBuffer } from "../_pool.ts";
import { CLUSTER_SIZE, clusterCount, validMask } from "../vma/format.ts";
import type { VmaClusterRecord } from "../vma/records.ts";

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
