// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A synthetic full backup: the clusters that changed since a previous archive, and every
 * other cluster from that archive, written as one complete archive that needs nothing else
 * to be restored.
 *
 * @module
 */
import { ClusterBitmap } from "../_bitmap.ts";
import type { StoredExtentPiece } from "../transforms/seekable_zstd.ts";
import { encodeExtentHeader } from "../vma/extent_header.ts";
import type { VmaExtentPiece, VmaHeaderPiece } from "../vma/extent_stream.ts";
import { VmaExtentStream } from "../vma/extent_stream.ts";
import type { VmaRecord } from "../vma/records.ts";
import { VmaWriterStream } from "../vma/writer_stream.ts";
import type { IndexedArchive } from "./indexed_archive.ts";

/** Options of {@linkcode syntheticFull}. */
export interface SyntheticFullOptions {
  /** The previous archive, open for random access. */
  base: IndexedArchive;
  /** The new archive's UUID (default a random one). */
  uuid?: string | undefined;
  /** The new archive's creation time (default now). */
  ctime?: number | undefined;
  /**
   * Copy the compressed data frames of unchanged extents as they are (default true): for a
   * seekable `.vma.zst` output (`SeekableZstdStream`). Without it every unchanged cluster
   * is re-encoded, for any other output.
   */
  copyFrames?: boolean | undefined;
}

/** Counters of a synthetic full backup; final once its output has ended. */
export interface SyntheticFullStats {
  /** Clusters that came in as changed. */
  changedClusters: number;
  /** Extents of the base copied without decoding. */
  copiedExtents: number;
  /** Clusters in those extents. */
  copiedClusters: number;
  /** Compressed bytes of those extents' data frames. */
  copiedBytes: number;
  /** Clusters of the base decoded and written again (neighbours of changed ones). */
  rewrittenClusters: number;
  /** Zero clusters of the base written again (they cost no data). */
  zeroClusters: number;
}

/** Pieces of the new archive, for `SeekableZstdStream` (or `VmaIndexStream` without copies). */
export type SyntheticPiece = VmaHeaderPiece | VmaExtentPiece | StoredExtentPiece;

/** The two sides of a synthetic full backup, and its counters. */
export interface SyntheticFull {
  /** The changes: device records (the base's devices), configs, changed clusters. */
  writable: WritableStream<VmaRecord>;
  /** The new archive's pieces. */
  readable: ReadableStream<SyntheticPiece>;
  /** Counters so far. */
  stats: SyntheticFullStats;
}

/**
 * Builds a complete archive from the clusters that changed and a base archive. The changed
 * clusters go through a `VmaWriterStream` as they come (a live backup's order); when their
 * stream ends, every cluster not received is taken from `base`: an extent of the base none
 * of whose clusters changed is copied as stored (its compressed data frame under a new
 * header), the others' unchanged clusters are decoded and written again, and zero clusters
 * cost nothing. Devices are matched with the base by name; the caller checks that their
 * names and sizes are the base's. The result is an archive like any other: `vma extract`,
 * `verify` and every reader restore it on its own.
 *
 * @example Change one cluster of three
 * ```ts
 * import assert from "node:assert/strict";
 * import {
 *   archiveOutput, fileRangeReader, IndexedArchive, SeekableZstdStream, syntheticFull, VmaWriterStream,
 * } from "../../mod.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const device = { type: "device" as const, devId: 1, name: "drive-scsi0", size: 3 * 65536 };
 * const cluster = (index: number, fill: number) =>
 *   ({ type: "cluster" as const, devId: 1, cluster: index, mask: 0xffff, data: new Uint8Array(65536).fill(fill) });
 * await Deno.writeFile(`${dir}/base.vma.zst`, ReadableStream.from([device, cluster(0, 1), cluster(1, 2), cluster(2, 3)])
 *   .pipeThrough(new VmaWriterStream()).pipeThrough(archiveOutput({ compression: "zstd" })));
 * const base = await IndexedArchive.open(await fileRangeReader(`${dir}/base.vma.zst`));
 * const synthetic = syntheticFull({ base });
 * const writing = Deno.writeFile(`${dir}/next.vma.zst`, synthetic.readable.pipeThrough(new SeekableZstdStream()));
 * await ReadableStream.from([device, cluster(1, 9)]).pipeTo(synthetic.writable);
 * await writing;
 * base.close();
 * const next = await IndexedArchive.open(await fileRangeReader(`${dir}/next.vma.zst`));
 * assert.deepEqual([...await next.read(1, 65536 - 1, 3)], [1, 9, 9]);
 * assert.equal(synthetic.stats.changedClusters, 1);
 * next.close();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function syntheticFull(options: SyntheticFullOptions): SyntheticFull {
  const { base } = options;
  const copyFrames = options.copyFrames ?? true;
  const stats: SyntheticFullStats = {
    changedClusters: 0,
    copiedExtents: 0,
    copiedClusters: 0,
    copiedBytes: 0,
    rewrittenClusters: 0,
    zeroClusters: 0,
  };
  const writer = new VmaWriterStream({
    ...(options.uuid !== undefined && { uuid: options.uuid }),
    ...(options.ctime !== undefined && { ctime: options.ctime }),
    reuseBuffers: true,
    requireComplete: false, // copied extents hold the rest: counted below instead
  });
  const pieces = writer.readable.pipeThrough(new VmaExtentStream({ requireComplete: false }));
  const records = writer.writable.getWriter();
  const merged = new TransformStream<SyntheticPiece, SyntheticPiece>();
  const output = merged.writable.getWriter();
  /** Received clusters, by the base's device id. */
  const received = new Map<number, ClusterBitmap>();
  /** The new archive's device id of each base device id. */
  const devIds = new Map<number, number>();
  let header: VmaHeaderPiece | undefined;
  const headerOut = Promise.withResolvers<void>();

  // The writer's pieces go out as they come; the header's UUID is the new archive's.
  const pumping = pieces.pipeTo(
    new WritableStream<VmaHeaderPiece | VmaExtentPiece>({
      async write(piece) {
        if (piece.type === "header") {
          header = piece;
          headerOut.resolve();
        }
        await output.write(piece);
      },
    }),
  );
  pumping.catch((error) => headerOut.reject(error));
  headerOut.promise.catch(() => {});

  const baseDevice = (name: string) => base.devices.find((device) => device.name === name);

  /** Everything the changes did not bring, from the base, in the base's order. */
  const fillFromBase = async () => {
    const { index } = base;
    const map = base.map;
    for (let e = 0; e < index.blockCounts.length; e++) {
      const slots = map.slotsOf(e);
      const changed = slots.some((slot) => received.get(slot.devId)?.has(slot.cluster));
      if (!changed && copyFrames && header !== undefined) {
        const stored = await base.storedExtent(e);
        if (stored !== undefined) {
          const uuid = header.bytes.subarray(8, 24);
          const newSlots = stored.slots.map((slot) => ({
            ...slot,
            devId: devIds.get(slot.devId)!,
          }));
          await output.write({
            type: "stored-extent",
            header: encodeExtentHeader(uuid, stored.blockCount, newSlots),
            blockCount: stored.blockCount,
            slots: newSlots,
            frame: stored.frame,
            checksum: stored.checksum,
            digest: stored.digest,
          });
          stats.copiedExtents++;
          stats.copiedClusters += newSlots.length;
          stats.copiedBytes += stored.frame.byteLength;
          continue;
        }
      }
      for (const { devId, cluster, zero } of slots) {
        if (received.get(devId)?.has(cluster)) continue;
        const target = devIds.get(devId)!;
        if (zero) {
          stats.zeroClusters++;
          await records.write({ type: "zeros", devId: target, cluster, count: 1 });
        } else {
          const { mask, data } = await base.cluster(devId, cluster);
          stats.rewrittenClusters++;
          await records.write({ type: "cluster", devId: target, cluster, mask, data });
        }
        // The header comes out with the first cluster: copies may follow from then on.
        if (header === undefined) await headerOut.promise;
      }
    }
  };

  const writable = new WritableStream<VmaRecord>({
    async write(record) {
      if (record.type === "device") {
        const known = baseDevice(record.name);
        if (known === undefined || known.size !== record.size) {
          throw new RangeError(
            `Cannot make a synthetic full backup: device ${record.name} (${record.size} bytes) is not in the base archive as it is`,
          );
        }
        devIds.set(known.devId, record.devId);
        received.set(known.devId, new ClusterBitmap());
      } else if (record.type === "cluster" || record.type === "zeros") {
        const name = [...devIds].find(([, target]) => target === record.devId);
        if (name === undefined) {
          throw new RangeError(
            `Cannot make a synthetic full backup: device ${record.devId} was not declared`,
          );
        }
        const seen = received.get(name[0])!;
        const count = record.type === "zeros" ? record.count : 1;
        for (let i = 0; i < count; i++) seen.add(record.cluster + i);
        stats.changedClusters += count;
      }
      await records.write(record);
    },
    async close() {
      for (const device of base.devices) {
        if (!devIds.has(device.devId)) {
          throw new RangeError(
            `Cannot make a synthetic full backup: device ${device.name} of the base is missing`,
          );
        }
      }
      await fillFromBase();
      // Every cluster exactly once: the changes, and the base's others, copied or written.
      const clusters = base.index.slotCounts.reduce((sum, count) => sum + count, 0);
      const written = stats.changedClusters + stats.rewrittenClusters + stats.zeroClusters +
        stats.copiedClusters;
      if (written !== clusters) {
        throw new RangeError(
          `Cannot make a synthetic full backup: ${written} clusters written, the base has ${clusters}`,
        );
      }
      await records.close();
      await pumping;
      await output.close();
    },
    async abort(reason) {
      await records.abort(reason).catch(() => {});
      await output.abort(reason).catch(() => {});
    },
  });
  return { writable, readable: merged.readable, stats };
}
