// Copyright 2026 the vmabackup authors. MIT license.
/**
 * An indexed archive read as a record stream, one disk after another, reading only the
 * extents of the disks asked for.
 *
 * @module
 */
import type { VmaRecord } from "../vma/records.ts";
import { CLUSTER_SIZE } from "../vma/format.ts";
import type { IndexedArchive } from "./indexed_archive.ts";

/** Clusters read ahead of the consumer: about one extent, so extents decode in parallel. */
const AHEAD = 64;

/**
 * The records of `archive` as `VmaReaderStream` would give them, but in device and cluster
 * order and with the clusters of the `devices` asked for only (default all): a `header`
 * record, every `config` and `device` record, then runs of zero clusters as `zeros` records
 * and the other clusters one by one. Only the extents holding those clusters are read and
 * decoded, so a restore of one disk reads a fraction of the archive.
 *
 * @example Restore one disk of two
 * ```ts
 * import assert from "node:assert/strict";
 * import {
 *   archiveOutput, archiveRecords, fileRangeReader, IndexedArchive, VmaWriterStream,
 * } from "../../mod.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma.zst" });
 * const data = new Uint8Array(65536).fill(6);
 * await Deno.writeFile(path, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "device" as const, devId: 2, name: "drive-scsi1", size: 2 * 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0xffff, data },
 *   { type: "cluster" as const, devId: 2, cluster: 1, mask: 0xffff, data },
 *   { type: "zeros" as const, devId: 2, cluster: 0, count: 1 },
 * ]).pipeThrough(new VmaWriterStream()).pipeThrough(archiveOutput({ compression: "zstd" })));
 * const archive = await IndexedArchive.open(await fileRangeReader(path));
 * const records = await Array.fromAsync(archiveRecords(archive, [2]));
 * archive.close();
 * const clusters = records.filter((record) => record.type === "cluster" || record.type === "zeros");
 * assert.deepEqual(clusters.map((record) => [record.type, record.devId, record.cluster]), [
 *   ["zeros", 2, 0],
 *   ["cluster", 2, 1],
 * ]);
 * await Deno.remove(path);
 * ```
 */
export function archiveRecords(
  archive: IndexedArchive,
  devices?: number[],
): ReadableStream<VmaRecord> {
  const header = archive.header;
  const wanted = devices ?? header.devices.map((device) => device.devId);
  async function* generate(): AsyncGenerator<VmaRecord> {
    yield { type: "header", uuid: header.uuid, ctime: header.ctime };
    for (const { name, data } of header.configs) yield { type: "config", name, data };
    for (const { devId, name, size } of header.devices) yield { type: "device", devId, name, size };
    for (const devId of wanted) {
      const device = archive.devices.find((candidate) => candidate.devId === devId)!;
      for (const part of archive.allocation(devId, 0, device.size)) {
        const first = Math.floor(part.offset / CLUSTER_SIZE);
        const end = Math.ceil((part.offset + part.length) / CLUSTER_SIZE);
        if (part.zero) {
          yield { type: "zeros", devId, cluster: first, count: end - first };
          continue;
        }
        const ahead: Promise<{ mask: number; data: Uint8Array | null }>[] = [];
        for (let next = first, cluster = first; cluster < end; cluster++) {
          while (next < end && next < cluster + AHEAD) {
            const reading = archive.cluster(devId, next++);
            reading.catch(() => {}); // awaited in order below
            ahead.push(reading);
          }
          const { mask, data } = await ahead.shift()!;
          yield { type: "cluster", devId, cluster, mask, data };
        }
      }
    }
  }
  return ReadableStream.from(generate());
}
