// Copyright 2026 the vmabackup authors. MIT license.
/**
 * One device of a record stream as plain bytes, in order.
 *
 * @module
 */
import { CLUSTER_SIZE, clusterCount } from "../vma/format.ts";
import type { VmaDeviceRecord, VmaRecord } from "../vma/records.ts";

/** Options of {@linkcode DeviceBytesStream}. */
export interface DeviceBytesOptions {
  /**
   * Most bytes of out-of-order clusters held back while waiting for an earlier cluster
   * (default 64 MiB). Copy-before-write archives are only locally out of order.
   */
  maxBufferedBytes?: number;
}

const ZERO_RUN = 16; // zero clusters per emitted zero chunk (1 MiB)

/**
 * Emits the raw bytes of one device (by name, or the first device `device` matches),
 * from byte 0 to its exact size, so a disk
 * can be streamed to stdout or any WritableStream. Zero clusters become zero bytes.
 * Clusters that arrive ahead of their turn are held back, within `maxBufferedBytes`.
 * Cluster data is passed on uncopied, so that its buffer comes back to its producer, a
 * final consumer calls `releaseChunk` on each chunk (as `ByteSink` does); clusters that are
 * not passed on are released here.
 *
 * @example Stream a device's bytes
 * ```ts
 * import assert from "node:assert/strict";
 * import { DeviceBytesStream, type VmaRecord } from "../../mod.ts";
 *
 * const data = new Uint8Array(65536).fill(5);
 * const bytes = await new Response(
 *   ReadableStream.from<VmaRecord>([
 *     { type: "device", devId: 1, name: "drive-scsi0", size: 100_000 },
 *     { type: "cluster", devId: 1, cluster: 1, mask: 0xffff, data },
 *     { type: "cluster", devId: 1, cluster: 0, mask: 0, data: null },
 *   ]).pipeThrough(new DeviceBytesStream("drive-scsi0")),
 * ).bytes();
 * assert.equal(bytes.byteLength, 100_000);
 * assert.equal(bytes[65536], 5);
 * ```
 */
export class DeviceBytesStream extends TransformStream<VmaRecord, Uint8Array> {
  /** Streams the device named `device`, or the first one the predicate `device` accepts. */
  constructor(
    device: string | ((device: VmaDeviceRecord) => boolean),
    options: DeviceBytesOptions = {},
  ) {
    const matches = typeof device === "string"
      ? (record: VmaDeviceRecord) => record.name === device
      : device;
    let deviceName = typeof device === "string" ? device : "(matching)";
    const maxBuffered = options.maxBufferedBytes ?? 64 << 20;
    let devId: number | undefined;
    let size = 0;
    let clusters = 0;
    let next = 0;
    let zerosPending = 0;
    /** Clusters that came early: data, or null for a zero cluster. */
    const early = new Map<number, Uint8Array | null>();
    let bufferedBytes = 0;

    const emitZeros = (controller: TransformStreamDefaultController<Uint8Array>) => {
      while (zerosPending > 0) {
        const count = Math.min(zerosPending, ZERO_RUN);
        const start = (next - zerosPending) * CLUSTER_SIZE;
        const length = Math.min(count * CLUSTER_SIZE, size - start);
        controller.enqueue(new Uint8Array(length));
        zerosPending -= count;
      }
    };
    const emit = (
      data: Uint8Array | null,
      controller: TransformStreamDefaultController<Uint8Array>,
    ) => {
      if (data === null) {
        zerosPending++;
        next++;
        if (zerosPending === ZERO_RUN) emitZeros(controller);
        return;
      }
      emitZeros(controller);
      const length = Math.min(CLUSTER_SIZE, size - next * CLUSTER_SIZE);
      controller.enqueue(length === CLUSTER_SIZE ? data : data.subarray(0, length));
      next++;
    };

    /** Takes one cluster of the device: emits it in turn, or holds it back. */
    const accept = (
      cluster: number,
      data: Uint8Array | null,
      controller: TransformStreamDefaultController<Uint8Array>,
    ) => {
      if (cluster !== next) {
        if (cluster < next || early.has(cluster)) {
          throw new RangeError(
            `Cannot stream device "${deviceName}": Cluster ${cluster} came twice`,
          );
        }
        early.set(cluster, data);
        bufferedBytes += data?.byteLength ?? 0;
        if (bufferedBytes > maxBuffered) {
          throw new RangeError(
            `Cannot stream device "${deviceName}": The archive is too far out of order (more than ${maxBuffered} bytes held back); extract it to a file instead`,
          );
        }
        return;
      }
      emit(data, controller);
      while (early.has(next)) {
        const held = early.get(next)!;
        early.delete(next);
        bufferedBytes -= held?.byteLength ?? 0;
        emit(held, controller);
      }
    };

    super({
      transform(record, controller) {
        if (record.type === "device" && devId === undefined && matches(record)) {
          deviceName = record.name;
          devId = record.devId;
          size = record.size;
          clusters = clusterCount(size);
        } else if (record.type === "zeros" && record.devId === devId) {
          for (let i = 0; i < record.count; i++) accept(record.cluster + i, null, controller);
        } else if (record.type === "cluster" && record.devId === devId && record.mask !== 0) {
          // The data goes on as a chunk: its final consumer releases it with releaseChunk().
          accept(record.cluster, record.data, controller);
        } else if (record.type === "cluster") {
          if (record.devId === devId) accept(record.cluster, null, controller);
          record.lease?.release();
        }
      },
      flush(controller) {
        if (devId === undefined) {
          throw new RangeError(
            `Cannot stream device "${deviceName}": The archive has no such device`,
          );
        }
        emitZeros(controller);
        if (next < clusters) {
          throw new RangeError(
            `Cannot stream device "${deviceName}": Cluster ${next} is missing`,
          );
        }
      },
    });
  }
}
