// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A synthetic full backup: the clusters that changed since a previous archive, and every
 * other cluster from that archive, written as one complete archive that needs nothing else
 * to be restored.
 *
 * @module
 */
import { ClusterBitmap } from "../_bitmap.ts";
import type { VmaIndex } from "../index/index_format.ts";
import { indexedOutput } from "../transforms/archive_output.ts";
import type { WritableCompression, ZstdEngine } from "../transforms/compression.ts";
import { SeekableZstdStream, type StoredExtentPiece } from "../transforms/seekable_zstd.ts";
import { encodeExtentHeader, type SlotRun, slotRuns } from "../vma/extent_header.ts";
import type { VmaExtentPiece, VmaHeaderPiece } from "../vma/extent_stream.ts";
import { HeaderOffset } from "../vma/format.ts";
import type { VmaRecord } from "../vma/records.ts";
import { VmaExtentWriterStream } from "../vma/writer_stream.ts";
import type { IndexedArchive, StoredExtent } from "./indexed_archive.ts";

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
  /**
   * Recycle the writer's extent buffers (default `false`): only when every piece reaches
   * exactly one final consumer that calls `releaseChunk` on it (no `tee()`).
   */
  reuseBuffers?: boolean | undefined;
  /** Called when the changes have ended, before the rest is taken from the base. */
  onFill?: (() => void) | undefined;
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

/** Extents to copy that are read (and checked) ahead of the one being written. */
const COPIES_AHEAD = 4;
/** Extents to rewrite that are decoded ahead (the base's cache must hold them). */
const DECODES_AHEAD = 2;

/** What becomes of an extent of the base. */
const enum Fill {
  /** Copied as stored (none of its clusters changed). */
  Copy,
  /** Its unchanged clusters decoded and written again. */
  Rewrite,
  /** Nothing: every cluster of it changed. */
  Skip,
}

/**
 * Builds a complete archive from the clusters that changed and a base archive. The changed
 * clusters go through a `VmaExtentWriterStream` as they come (a live backup's order); when
 * their stream ends, every cluster not received is taken from `base`, in the base's order:
 * an extent of the base none of whose clusters changed is copied as stored (its compressed
 * data frame under a new header), the others' unchanged clusters are decoded and written
 * again (packed into full extents with the changed ones), and zero clusters cost nothing.
 * The next extents are read and decoded ahead, so copies, decoding and compression
 * overlap. Devices are matched with the base by name; the caller checks that their names
 * and sizes are the base's. The result is an archive like any other: `vma extract`,
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
  const writer = new VmaExtentWriterStream({
    ...(options.uuid !== undefined && { uuid: options.uuid }),
    ...(options.ctime !== undefined && { ctime: options.ctime }),
    reuseBuffers: options.reuseBuffers ?? false,
    requireComplete: false, // copied extents hold the rest: counted below instead
  });
  const records = writer.writable.getWriter();
  const merged = new TransformStream<SyntheticPiece, SyntheticPiece>();
  const output = merged.writable.getWriter();
  /** Received clusters, by the base's device id. */
  const received = new Map<number, ClusterBitmap>();
  /** The new archive's device id of each base device id, and the other way round. */
  const devIds = new Map<number, number>();
  const baseIds = new Map<number, number>();
  let header: VmaHeaderPiece | undefined;
  const headerOut = Promise.withResolvers<void>();

  // The writer's pieces go out as they come; the header's UUID is the new archive's.
  const pumping = writer.readable.pipeTo(
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
    const map = base.map;
    const extents = base.index.blockCounts.length;
    const plan = new Uint8Array(extents);
    for (let e = 0; e < extents; e++) {
      let changed = 0;
      const slots = map.slotsOf(e);
      for (const slot of slots) if (received.get(slot.devId)!.has(slot.cluster)) changed++;
      plan[e] = changed === slots.length && changed > 0
        ? Fill.Skip
        : changed === 0 && copyFrames && base.index.blockCounts[e]! > 0
        ? Fill.Copy
        : Fill.Rewrite;
    }
    // Copies are read (and checked) ahead; extents to rewrite are decoded ahead.
    const copies = new Map<number, Promise<StoredExtent | undefined>>();
    const reuseBuffers = options.reuseBuffers ?? false;
    const ahead = { copy: 0, decode: 0 };
    const decoding: number[] = [];
    const readAhead = (e: number) => {
      ahead.copy = Math.max(ahead.copy, e);
      while (copies.size < COPIES_AHEAD && ahead.copy < extents) {
        const next = ahead.copy++;
        if (plan[next] !== Fill.Copy) continue;
        const copy = base.storedExtent(next, { reuseBuffers });
        copy.catch(() => {}); // awaited in its turn
        copies.set(next, copy);
      }
      ahead.decode = Math.max(ahead.decode, e);
      while (decoding.length > 0 && decoding[0]! < e) decoding.shift();
      while (decoding.length < DECODES_AHEAD && ahead.decode < extents) {
        const next = ahead.decode++;
        if (plan[next] !== Fill.Rewrite || base.index.blockCounts[next] === 0) continue;
        base.prefetch(next);
        decoding.push(next);
      }
    };
    for (let e = 0; e < extents; e++) {
      readAhead(e);
      const copy = copies.get(e);
      copies.delete(e);
      if (plan[e] === Fill.Skip) continue;
      // The header comes out with the first cluster written: copies may follow from then on.
      const stored = copy === undefined || header === undefined ? undefined : await copy;
      if (stored !== undefined) {
        await copyExtent(stored);
      } else {
        await rewriteExtent(e);
        if (header === undefined) await headerOut.promise;
      }
    }
  };

  /** A stored extent of the base, under a new header. */
  const copyExtent = async (stored: StoredExtent) => {
    const uuid = header!.bytes.subarray(HeaderOffset.uuid, HeaderOffset.uuid + 16);
    const slots = stored.slots.map((slot) => ({ ...slot, devId: devIds.get(slot.devId)! }));
    await output.write({
      type: "stored-extent",
      header: encodeExtentHeader(uuid, stored.blockCount, slots),
      blockCount: stored.blockCount,
      slots,
      frame: stored.frame,
      checksum: stored.checksum,
      digest: stored.digest,
    });
    stats.copiedExtents++;
    stats.copiedClusters += slots.length;
    stats.copiedBytes += stored.frame.byteLength;
  };

  /** The unchanged clusters of extent `e` of the base, decoded and written again. */
  const rewriteExtent = async (e: number) => {
    if (base.index.blockCounts[e] === 0) { // zero clusters only: nothing to decode
      for (const { devId, cluster } of base.map.slotsOf(e)) {
        if (received.get(devId)!.has(cluster)) continue;
        stats.zeroClusters++;
        await records.write({ type: "zeros", devId: devIds.get(devId)!, cluster, count: 1 });
      }
      return;
    }
    const decoded = await base.extentClusters(e);
    // The writer copies each cluster's data and then releases it; the extent stays pinned
    // in the base's cache until the last one is copied.
    let pending = 1;
    const lease = { release: () => --pending === 0 && decoded.release() };
    try {
      for (const { devId, cluster, mask, data } of decoded.clusters) {
        if (received.get(devId)?.has(cluster)) continue;
        const target = devIds.get(devId)!;
        if (data === null) {
          stats.zeroClusters++;
          await records.write({ type: "zeros", devId: target, cluster, count: 1 });
        } else {
          stats.rewrittenClusters++;
          pending++;
          await records.write({ type: "cluster", devId: target, cluster, mask, data, lease });
        }
      }
    } finally {
      lease.release();
    }
  };

  /** A failure ends both sides: the pieces' reader sees it too. */
  const fail = async (error: unknown) => {
    await records.abort(error).catch(() => {});
    await output.abort(error).catch(() => {});
    return error;
  };

  const writable = new WritableStream<VmaRecord>({
    async write(record) {
      try {
        await take(record);
      } catch (error) {
        throw await fail(error);
      }
    },
    async close() {
      try {
        await finish();
      } catch (error) {
        throw await fail(error);
      }
    },
    async abort(reason) {
      await fail(reason);
    },
  });

  /** One record of the changes. */
  const take = async (record: VmaRecord) => {
    if (record.type === "device") {
      const known = baseDevice(record.name);
      if (known === undefined || known.size !== record.size) {
        throw new RangeError(
          `Cannot make a synthetic full backup: device ${record.name} (${record.size} bytes) is not in the base archive as it is`,
        );
      }
      devIds.set(known.devId, record.devId);
      baseIds.set(record.devId, known.devId);
      received.set(known.devId, new ClusterBitmap());
    } else if (record.type === "cluster" || record.type === "zeros") {
      const baseId = baseIds.get(record.devId);
      if (baseId === undefined) {
        throw new RangeError(
          `Cannot make a synthetic full backup: device ${record.devId} was not declared`,
        );
      }
      const seen = received.get(baseId)!;
      const count = record.type === "zeros" ? record.count : 1;
      for (let i = 0; i < count; i++) seen.add(record.cluster + i);
      stats.changedClusters += count;
    }
    await records.write(record);
  };

  /** The changes have ended: the rest from the base, then the end of the archive. */
  const finish = async () => {
    options.onFill?.();
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
  };
  return { writable, readable: merged.readable, stats };
}

/** Options of {@linkcode encodeSyntheticFull}. */
export interface EncodeSyntheticOptions {
  /** The previous archive, open for random access. */
  base: IndexedArchive;
  /** The new archive's UUID (default a random one). */
  uuid?: string | undefined;
  /** How the new archive is stored. */
  compression: WritableCompression;
  /** Compression level. */
  level?: number | undefined;
  /** zstd from node:zlib (default; unchanged extents are then copied as stored) or the system program. */
  zstd?: ZstdEngine | undefined;
  /** Whether zstd may compress on this thread (see `ZstdCompressStream`). */
  mainThread?: boolean | undefined;
  /** Recorded in the new index: the checkpoint the changed clusters came from. */
  checkpoint?: string | undefined;
  /** Recorded in the new index: incrementals since the last full, this one included. */
  depth?: number | undefined;
  /** Called with the clusters of each extent of the new archive as it goes out (progress). */
  onExtent?: ((runs: SlotRun[]) => void) | undefined;
  /**
   * Recycle the buffers of the stages inside (default `false`): only when every output chunk
   * reaches exactly one final consumer that calls `releaseChunk` on it (no `tee()`).
   */
  reuseBuffers?: boolean | undefined;
}

/** A synthetic full archive being written: its stored bytes, counters and index. */
export interface EncodedSyntheticFull {
  /** The stored bytes (with the index inside a seekable `.vma.zst`). */
  readable: ReadableStream<Uint8Array>;
  /** Counters of the synthetic full; final once `readable` has ended. */
  stats: SyntheticFullStats;
  /** Inside a seekable `.vma.zst`, or for a sidecar beside the archive. */
  readonly indexPlace: "embedded" | "sidecar";
  /** The new index (it records the base), once `readable` has ended. */
  index(): VmaIndex | undefined;
}

/**
 * Writes the changed clusters in `records` (device records first, as a live backup's) and
 * the rest of `base` as one new archive, the way `backup --base` does: for a seekable
 * `.vma.zst` (built-in zstd) the unchanged extents' frames are copied as stored; for every
 * other output (`.vma`, `.vma.gz`, `--zstd program`) all clusters are written again, with
 * a sidecar index. The index records the base's UUID, the checkpoint and the depth.
 *
 * @example An incremental of one changed cluster, as a .vma.gz
 * ```ts
 * import assert from "node:assert/strict";
 * import { archiveOutput, encodeSyntheticFull, fileRangeReader, IndexedArchive, VmaWriterStream } from "../../mod.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const device = { type: "device" as const, devId: 1, name: "drive-scsi0", size: 2 * 65536 };
 * const cluster = (index: number, fill: number) =>
 *   ({ type: "cluster" as const, devId: 1, cluster: index, mask: 0xffff, data: new Uint8Array(65536).fill(fill) });
 * await Deno.writeFile(`${dir}/base.vma.zst`, ReadableStream.from([device, cluster(0, 1), cluster(1, 2)])
 *   .pipeThrough(new VmaWriterStream()).pipeThrough(archiveOutput({ compression: "zstd" })));
 * const base = await IndexedArchive.open(await fileRangeReader(`${dir}/base.vma.zst`));
 * const encoded = encodeSyntheticFull(ReadableStream.from([device, cluster(1, 9)]), {
 *   base, compression: "gzip", checkpoint: `vmabackup-${base.index.uuid}`, depth: 1,
 * });
 * const bytes = await new Response(encoded.readable).bytes();
 * assert.deepEqual(bytes.subarray(0, 2), Uint8Array.of(0x1f, 0x8b));
 * assert.deepEqual(encoded.index()?.base, { uuid: base.index.uuid, checkpoint: `vmabackup-${base.index.uuid}`, depth: 1 });
 * assert.equal(encoded.stats.changedClusters, 1);
 * base.close();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export function encodeSyntheticFull(
  records: ReadableStream<VmaRecord>,
  options: EncodeSyntheticOptions,
): EncodedSyntheticFull {
  const { base, compression, level, zstd = "builtin" } = options;
  const copyFrames = compression === "zstd" && zstd === "builtin";
  const reuseBuffers = options.reuseBuffers ?? false;
  // A thread that serves QEMU (push mode) does not compress while the changes come; once
  // they have ended it does, beside one worker fewer than the cores: fewer threads than
  // cores cost less CPU for the same work (about 10 % for a 2 % incremental of 4 GiB).
  const later = copyFrames && options.mainThread === false;
  let seekable: SeekableZstdStream | undefined;
  const synthetic = syntheticFull({
    base,
    uuid: options.uuid,
    copyFrames,
    reuseBuffers,
    ...(later && { onFill: () => seekable?.allowMainThread() }),
  });
  const recorded = {
    uuid: base.index.uuid,
    ...(options.checkpoint !== undefined && { checkpoint: options.checkpoint }),
    ...(options.depth !== undefined && { depth: options.depth }),
  };
  const feeding = records.pipeTo(synthetic.writable);
  feeding.catch(() => {}); // its failure aborts the pieces, whose stream then fails
  const onExtent = options.onExtent;
  const pieces = onExtent === undefined ? synthetic.readable : synthetic.readable.pipeThrough(
    new TransformStream<SyntheticPiece, SyntheticPiece>({
      transform(piece, controller) {
        if (piece.type === "extent") onExtent(piece.runs);
        else if (piece.type === "stored-extent") onExtent(slotRuns(piece.slots));
        controller.enqueue(piece);
      },
    }),
  );
  if (copyFrames) {
    seekable = new SeekableZstdStream({
      ...(level !== undefined && { level }),
      ...(options.mainThread !== undefined && { mainThread: options.mainThread }),
      ...(later && { workers: Math.max(1, (navigator.hardwareConcurrency ?? 1) - 1) }),
      base: recorded,
      reuseBuffers,
    });
    return {
      readable: pieces.pipeThrough(seekable),
      stats: synthetic.stats,
      indexPlace: "embedded",
      index: () => seekable?.index,
    };
  }
  const output = indexedOutput({
    compression,
    level,
    zstd,
    mainThread: options.mainThread,
    base: recorded,
    reuseBuffers,
  });
  return {
    // Without copies, the pieces are only a header and extents.
    readable: (pieces as ReadableStream<VmaHeaderPiece | VmaExtentPiece>).pipeThrough(output),
    stats: synthetic.stats,
    indexPlace: output.indexPlace,
    index: output.index,
  };
}
