// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Typed records that flow between the pipeline stages.
 *
 * A record stream always starts with the archive-level records (an optional `header`,
 * then `config` and `device` records) and continues with `cluster` records, in any order
 * and with devices interleaved. A `zeros` record stands for a run of all-zero clusters.
 *
 * @example A complete, tiny record stream
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VmaRecord } from "./records.ts";
 *
 * const records: VmaRecord[] = [
 *   { type: "config", name: "qemu-server.conf", data: new TextEncoder().encode("memory: 512\n") },
 *   { type: "device", devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster", devId: 1, cluster: 0, mask: 0, data: null },
 * ];
 * assert.equal(records.length, 3);
 * ```
 *
 * @module
 */

/**
 * A hold on a recycled buffer, one per record. The final consumer of a record (one that
 * copies or writes its `data`) calls {@linkcode Lease.release} once it is done with it, so the
 * producer can reuse the buffer. Producers attach leases only when their caller opted in
 * with `reuseBuffers: true`, promising that each record reaches exactly one final consumer.
 */
export interface Lease {
  /** Gives the hold back. A second call counts nothing (or throws with `checkBufferReuse`). */
  release(): void;
}

/** Archive identity, as read from a header or chosen for a new archive. */
export interface VmaHeaderRecord {
  /** Record kind. */
  type: "header";
  /** Archive UUID in the canonical `8-4-4-4-12` lower-case hex form. */
  uuid: string;
  /** Creation time in Unix seconds. */
  ctime: number;
}

/** A configuration file stored in the archive header (for example `qemu-server.conf`). */
export interface VmaConfigRecord {
  /** Record kind. */
  type: "config";
  /** File name, without directories. */
  name: string;
  /** Raw file content (1 to 65535 bytes). */
  data: Uint8Array;
}

/** A device (disk) stream of the archive. */
export interface VmaDeviceRecord {
  /** Record kind. */
  type: "device";
  /** Device id, 1 to 254. */
  devId: number;
  /** Device name, such as `drive-scsi0`. */
  name: string;
  /** Exact device size in bytes (at least 1). */
  size: number;
}

/**
 * One 64 KiB cluster of a device.
 *
 * `data` is the whole cluster (65536 bytes) or `null` for a cluster known to be all zero.
 * Bit `j` of `mask` (bit 0 = lowest address) is set when 4 KiB block `j` is stored; blocks
 * outside the mask read as zeros. A `null` cluster has mask 0, except from a reader told to
 * skip data (`VmaReaderStream({ skipData: true })`), which keeps the mask.
 *
 * `data` belongs to the receiver, unless the producer was told to recycle its buffers
 * (`reuseBuffers: true`): then `data` is a view into a buffer the producer wants back, and the
 * record's final consumer (the VMA writer, the restore sinks) calls `lease.release()` after it
 * copied or wrote it. Such records must not be fanned out (`tee()`).
 */
export interface VmaClusterRecord {
  /** Record kind. */
  type: "cluster";
  /** Device id of a device record that came before. */
  devId: number;
  /** Cluster number: byte offset / 65536. */
  cluster: number;
  /** 16-bit mask of stored 4 KiB blocks. */
  mask: number;
  /** Cluster content (65536 bytes) or `null` for an all-zero cluster. */
  data: Uint8Array | null;
  /** Hold on the buffer behind `data`, if the producer recycles it. */
  lease?: Lease;
}

/**
 * A run of `count` consecutive all-zero clusters of a device, starting at `cluster`: the
 * same as `count` cluster records with mask 0, in one record. Sources emit it for holes, so
 * the cost of a backup follows the data, not the virtual disk size.
 */
export interface VmaZerosRecord {
  /** Record kind. */
  type: "zeros";
  /** Device id of a device record that came before. */
  devId: number;
  /** First cluster of the run. */
  cluster: number;
  /** Number of clusters (at least 1). */
  count: number;
}

/** Any record of a VMA record stream. */
export type VmaRecord =
  | VmaHeaderRecord
  | VmaConfigRecord
  | VmaDeviceRecord
  | VmaClusterRecord
  | VmaZerosRecord;
