// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Combining several disks (record streams) and config files into one archive stream.
 *
 * @module
 */
import { MAX_DEV_ID, WRITER_SLOTS_PER_EXTENT } from "../vma/format.ts";
import type { VmaConfigRecord, VmaRecord } from "../vma/records.ts";

/** Options of {@linkcode combineRecordStreams}. */
export interface CombineOptions {
  /** Config files to put first, such as `qemu-server.conf`. */
  configs?: { name: string; data: Uint8Array }[];
  /**
   * Clusters taken from one source per turn (default 58, one extent as `VmaWriterStream`
   * writes them by default). Turns end where the combined stream reaches a multiple of this,
   * a run of zero clusters split there if need be, so each extent holds one disk: reading one
   * disk of an indexed archive then reads its extents alone.
   */
  clustersPerTurn?: number;
}

interface Source {
  reader: ReadableStreamDefaultReader<VmaRecord>;
  /** Device id in the source → device id in the combined stream. */
  devIds: Map<number, number>;
  /** The first cluster record, read while looking for device records. */
  pending: VmaRecord | undefined;
}

/**
 * Merges record streams (one per disk, for example from {@linkcode rawDiskSource}) into one
 * stream for the writer. Configs come first, then every source's devices, renumbered
 * 1, 2, 3... in source order as Proxmox assigns them, then the clusters, taken from the
 * sources in turns of one extent each, so the archive interleaves the devices by extent. `header` records of the
 * sources are dropped.
 *
 * @example Two disks in one archive
 * ```ts
 * import assert from "node:assert/strict";
 * import { combineRecordStreams, type VmaRecord } from "../../mod.ts";
 *
 * const disk = (name: string): ReadableStream<VmaRecord> =>
 *   ReadableStream.from<VmaRecord>([
 *     { type: "device", devId: 1, name, size: 65536 },
 *     { type: "cluster", devId: 1, cluster: 0, mask: 0, data: null },
 *   ]);
 * const records = await Array.fromAsync(
 *   combineRecordStreams([disk("drive-scsi0"), disk("drive-scsi1")], {
 *     configs: [{ name: "qemu-server.conf", data: new TextEncoder().encode("cores: 1\n") }],
 *   }),
 * );
 * assert.deepEqual(records.map((r) => r.type === "device" ? r.devId : r.type), [
 *   "config", 1, 2, "cluster", "cluster",
 * ]);
 * ```
 */
export function combineRecordStreams(
  streams: ReadableStream<VmaRecord>[],
  options: CombineOptions = {},
): ReadableStream<VmaRecord> {
  const clustersPerTurn = options.clustersPerTurn ?? WRITER_SLOTS_PER_EXTENT;
  /** Clusters emitted so far: turns end at multiples of `clustersPerTurn`. */
  let emitted = 0;
  let sources: Source[] = streams.map((stream) => ({
    reader: stream.getReader(),
    devIds: new Map(),
    pending: undefined,
  }));
  let turn = 0;

  const cancelAll = async (reason: unknown) => {
    await Promise.allSettled(sources.map(({ reader }) => reader.cancel(reason)));
  };

  /** Takes up to `clustersPerTurn` clusters from the next source with any left. */
  const pullTurn = async (controller: ReadableStreamDefaultController<VmaRecord>) => {
    for (;;) {
      if (sources.length === 0) {
        controller.close();
        return;
      }
      const source = sources[turn % sources.length]!;
      let taken = 0;
      while (taken === 0 || emitted % clustersPerTurn !== 0) {
        let record = source.pending;
        source.pending = undefined;
        if (record === undefined) {
          const next = await source.reader.read();
          if (next.done) {
            sources = sources.filter((other) => other !== source);
            break;
          }
          record = next.value;
        }
        if (record.type !== "cluster" && record.type !== "zeros") {
          throw new TypeError(
            `Cannot combine disks: A ${record.type} record came after cluster data`,
          );
        }
        const devId = source.devIds.get(record.devId);
        if (devId === undefined) {
          throw new RangeError(
            `Cannot combine disks: Cluster ${record.cluster} has undeclared device id ${record.devId}`,
          );
        }
        if (record.type === "zeros") {
          const room = clustersPerTurn - (emitted % clustersPerTurn);
          if (record.count > room) {
            // The turn ends inside this run: the rest waits for the source's next turn.
            source.pending = {
              ...record,
              cluster: record.cluster + room,
              count: record.count - room,
            };
            record = { ...record, count: room };
          }
        }
        controller.enqueue(devId === record.devId ? record : { ...record, devId });
        emitted += record.type === "zeros" ? record.count : 1;
        taken++;
      }
      turn++;
      if (taken > 0) return;
    }
  };

  return new ReadableStream<VmaRecord>({
    async start(controller) {
      const configs: VmaConfigRecord[] = (options.configs ?? []).map(({ name, data }) => ({
        type: "config",
        name,
        data,
      }));
      const devices: VmaRecord[] = [];
      try {
        for (const source of sources) {
          for (;;) {
            const { value, done } = await source.reader.read();
            if (done) break;
            if (value.type === "cluster" || value.type === "zeros") {
              source.pending = value;
              break;
            }
            if (value.type === "config") configs.push(value);
            if (value.type === "device") {
              const devId = devices.length + 1;
              if (devId > MAX_DEV_ID) {
                throw new RangeError(`Cannot combine disks: More than ${MAX_DEV_ID} devices`);
              }
              source.devIds.set(value.devId, devId);
              devices.push({ ...value, devId });
            }
          }
        }
      } catch (error) {
        await cancelAll(error);
        throw error;
      }
      for (const record of [...configs, ...devices]) controller.enqueue(record);
    },
    async pull(controller) {
      try {
        await pullTurn(controller);
      } catch (error) {
        await cancelAll(error); // one disk failed: stop reading the others too
        throw error;
      }
    },
    async cancel(reason) {
      await cancelAll(reason);
    },
  }, { highWaterMark: 0 });
}
