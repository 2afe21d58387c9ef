// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Random access to a stored archive through its index: any byte range of any disk, reading
 * and decoding only the extents that hold it.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { popcount16 } from "../_bytes.ts";
import { BufferPool, type PooledBuffer, SizedBufferPool } from "../_pool.ts";
import { readEmbeddedIndex } from "../index/embedded_index.ts";
import { decodeIndex, type VmaIndex, type VmaIndexDevice } from "../index/index_format.ts";
import { type AllocationExtent, IndexMap } from "../index/index_map.ts";

export type { AllocationExtent } from "../index/index_map.ts";
import type { SeekTable } from "../index/seek_table.ts";
import type { RangeReader } from "../storage/range_reader.ts";
import { FrameDecoderPool, INLINE_SIZE } from "../transforms/_frame_decoder.ts";
import { VmaFormatError } from "../vma/errors.ts";
import { decodeExtentHeader, type VmaExtentSlot } from "../vma/extent_header.ts";
import { type DecodedVmaHeader, decodeHeader } from "../vma/header.ts";
import {
  BLOCK_SIZE,
  CLUSTER_SIZE,
  EXTENT_HEADER_SIZE,
  HEADER_FIXED_SIZE,
  HeaderOffset,
  SLOTS_PER_EXTENT,
  VMA_MAGIC,
} from "../vma/format.ts";
import { scanPlainArchive } from "./scan_plain.ts";

/** Options of {@linkcode IndexedArchive.open}. */
export interface IndexedArchiveOptions {
  /** The index of a plain `.vma`, from its sidecar file. Without it, one is built by scanning. */
  sidecar?: Uint8Array | undefined;
  /** The same, already decoded (`decodeIndex`). */
  index?: VmaIndex | undefined;
  /** Bytes of decoded extents kept for reuse (default 64 MiB). */
  cacheBytes?: number | undefined;
  /** Reads of the stored archive in flight at once (default 4). */
  readsInFlight?: number | undefined;
  /** Worker threads that decode zstd frames (default one per core). */
  workers?: number | undefined;
  /** Check every extent read against its digest in the index (default true). */
  checkDigests?: boolean | undefined;
  /**
   * Skip the index's SHA-256 for zstd frames that carry a content checksum: the decoder
   * checks every byte against that one already (XXH64), and the seek table's copy of it
   * ties the frame to its place (default false: check both).
   */
  trustFrameChecksums?: boolean | undefined;
}

/** Counters of an open archive. */
export interface IndexedArchiveStats {
  /** Bytes read from the stored archive (compressed bytes for `.vma.zst`). */
  storedBytesRead: number;
  /** Extents read and decoded. */
  extentsRead: number;
  /** Extent lookups served from the cache. */
  cacheHits: number;
}

/** A decoded extent: where each used slot's blocks are in `data`. */
interface DecodedExtent {
  masks: Uint16Array;
  /** Byte offset of each used slot's first stored block in `data`. */
  starts: Uint32Array;
  devIds: Uint8Array;
  clusters: Uint32Array;
  data: Uint8Array;
  /** The pooled buffer `data` lives in, recycled once the extent leaves the cache. */
  lease: PooledBuffer | undefined;
}

/** An extent in the cache: loading, or loaded; pinned while reads copy out of it. */
interface CacheEntry {
  promise: Promise<DecodedExtent>;
  extent: DecodedExtent | undefined;
  /** Reads that will copy out of it: its buffer is recycled only when none is left. */
  pins: number;
  evicted: boolean;
}

/** A decoded piece of the archive, in a pooled buffer or not. */
interface Piece {
  bytes: Uint8Array;
  lease?: PooledBuffer | undefined;
}

/**
 * An archive opened for random reads: a seekable `.vma.zst` with its embedded index, or a
 * plain `.vma` with its sidecar index (or, without one, a map built by scanning its extent
 * headers and seeking over the data). Reads decode only the extents they need, each one
 * frame of a seekable `.vma.zst`, checked against its zstd checksum and the index digest;
 * decoded extents are cached up to a byte budget, and a sequential reader's next extents
 * are read ahead. Several reads may run at once.
 *
 * @example Read a byte range of a disk from a seekable archive
 * ```ts
 * import assert from "node:assert/strict";
 * import {
 *   archiveOutput, fileRangeReader, IndexedArchive, rawDiskSource, VmaWriterStream, ZeroFilterStream,
 * } from "../../mod.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = new Uint8Array(4 << 20).map((_, i) => (i >> 12) % 7);
 * await Deno.writeFile(`${dir}/disk.raw`, disk);
 * await Deno.writeFile(`${dir}/vm.vma.zst`, rawDiskSource(`${dir}/disk.raw`, { name: "drive-scsi0" })
 *   .pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
 *   .pipeThrough(archiveOutput({ compression: "zstd" })));
 * const archive = await IndexedArchive.open(await fileRangeReader(`${dir}/vm.vma.zst`));
 * try {
 *   const drive = archive.device("scsi0")!;
 *   assert.deepEqual(await archive.read(drive.devId, 1_000_000, 100_000), disk.subarray(1_000_000, 1_100_000));
 *   assert.ok(archive.stats.storedBytesRead < 100_000); // one small frame, not the whole file
 * } finally {
 *   archive.close();
 *   await Deno.remove(dir, { recursive: true });
 * }
 * ```
 */
export class IndexedArchive {
  /** Shown in messages: the stored archive's name. */
  readonly name: string;
  /** The index. */
  readonly index: VmaIndex;
  /** How the archive is stored. */
  readonly layout: "zstd-seekable" | "vma";
  /** Where the index came from. */
  readonly indexSource: "embedded" | "sidecar" | "scan";
  /** Counters so far. */
  readonly stats: IndexedArchiveStats = { storedBytesRead: 0, extentsRead: 0, cacheHits: 0 };

  #reader: RangeReader;
  #seekTable: SeekTable | undefined;
  #decoders: FrameDecoderPool | undefined;
  #checkDigests: boolean;
  #trustFrameChecksums: boolean;
  #cacheBytes: number;
  #cached = 0;
  /** Decoded extents in least recently used order. */
  #cache = new Map<number, CacheEntry>();
  /** Buffers that frames are decoded into, reused once their extent left the cache. */
  #outputs: BufferPool | undefined;
  /** Buffers that an extent's stored frames are read into, by size. */
  #inputs: SizedBufferPool | undefined;
  /** Buffers of frames handed out for copies (`storedExtent` with `reuseBuffers`). */
  #storedFrames: SizedBufferPool | undefined;
  #map: IndexMap;
  /** Per frame: compressed and decompressed start offsets (one more entry: the ends). */
  #frameStored = new Float64Array(0);
  #frameDecoded = new Float64Array(0);
  #reads: { active: number; waiting: (() => void)[]; limit: number };
  /** Data bytes of the extents being read and decoded. */
  #loadingBytes = 0;
  /** Cached extents that a sequential reader has moved past: evicted first. */
  #passed = new Set<number>();
  /** Per device, where its last reads ended (several readers at once), to see sequential ones. */
  #lastEnds = new Map<number, number[]>();
  #header: DecodedVmaHeader | undefined;

  private constructor(
    reader: RangeReader,
    index: VmaIndex,
    layout: "zstd-seekable" | "vma",
    source: "embedded" | "sidecar" | "scan",
    seekTable: SeekTable | undefined,
    options: IndexedArchiveOptions,
  ) {
    this.name = reader.name;
    this.#reader = reader;
    this.index = index;
    this.layout = layout;
    this.indexSource = source;
    this.#seekTable = seekTable;
    this.#checkDigests = options.checkDigests ?? true;
    this.#trustFrameChecksums = options.trustFrameChecksums ?? false;
    this.#cacheBytes = options.cacheBytes ?? 64 << 20;
    this.#reads = { active: 0, waiting: [], limit: options.readsInFlight ?? 4 };
    this.#map = new IndexMap(index);
    if (seekTable !== undefined) {
      const frames = seekTable.compressedSizes.length;
      this.#frameStored = new Float64Array(frames + 1);
      this.#frameDecoded = new Float64Array(frames + 1);
      for (let f = 0; f < frames; f++) {
        this.#frameStored[f + 1] = this.#frameStored[f]! + seekTable.compressedSizes[f]!;
        this.#frameDecoded[f + 1] = this.#frameDecoded[f]! + seekTable.decompressedSizes[f]!;
      }
      this.#decoders = new FrameDecoderPool(options.workers);
      const largest = Math.max(0, ...seekTable.decompressedSizes);
      // Evicted extents hand their buffers to the next decodes. Enough of them stay free
      // that none is dropped: a dropped one means a fresh one later, and the memory of
      // both stays resident.
      this.#outputs = new BufferPool(largest, { maxFree: 8 });
      let span = 0;
      for (let e = 0; e < index.blockCounts.length; e++) {
        const [from, to] = [this.#map.extentOffsets[e]!, this.#map.extentOffsets[e + 1]!];
        if (to <= from) continue;
        const stored = this.#frameStored[this.#frameAt(to - 1) + 1]! -
          this.#frameStored[this.#frameAt(from)]!;
        span = Math.max(span, stored);
      }
      this.#inputs = new SizedBufferPool(256 << 10, Math.max(span, 1), this.#reads.limit + 2);
    }
  }

  /**
   * Opens `reader` for random reads. Throws a `VmaFormatError` for a damaged or foreign
   * index (`bad-index`, `bad-seek-table`, `index-mismatch`), and a `NotSeekableError` for an
   * archive that cannot be read at random (a `.vma.zst` without a seek table, gzip, lzop).
   */
  static async open(
    reader: RangeReader,
    options: IndexedArchiveOptions = {},
  ): Promise<IndexedArchive> {
    const head = await reader.read(0, Math.min(4, reader.size));
    const magic = head.byteLength === 4
      ? new DataView(head.buffer, head.byteOffset).getUint32(0)
      : 0;
    let archive: IndexedArchive;
    if (magic === VMA_MAGIC) {
      const given = options.index ??
        (options.sidecar === undefined ? undefined : decodeIndex(options.sidecar));
      const index = given ?? await scanPlainArchive(reader);
      const source = given === undefined ? "scan" : "sidecar";
      archive = new IndexedArchive(reader, index, "vma", source, undefined, options);
      if (index.archiveBytes !== reader.size) {
        throw new VmaFormatError(
          "index-mismatch",
          Math.min(index.archiveBytes, reader.size),
          `the index describes ${index.archiveBytes} archive bytes, but ${reader.name} holds ${reader.size} (truncated, or a stale index)`,
        );
      }
    } else {
      const embedded = await readEmbeddedIndex(reader);
      if (embedded === null || embedded.index === undefined) {
        throw new NotSeekableError(
          `${reader.name} cannot be read at random: it is not a seekable .vma.zst with an index (run 'cli.ts convert' to make one)`,
        );
      }
      const { index, seekTable } = embedded;
      const decoded = seekTable.decompressedSizes.reduce((sum, size) => sum + size, 0);
      if (decoded !== index.archiveBytes) {
        throw new VmaFormatError(
          "index-mismatch",
          embedded.indexOffset,
          `the index describes ${index.archiveBytes} archive bytes, the seek table ${decoded}`,
        );
      }
      archive = new IndexedArchive(reader, index, "zstd-seekable", "embedded", seekTable, options);
    }
    try {
      await archive.#checkHeader();
    } catch (error) {
      archive.close();
      throw error;
    }
    return archive;
  }

  /** The archive's devices. */
  get devices(): VmaIndexDevice[] {
    return this.index.devices;
  }

  /** Lookups over the index. */
  get map(): IndexMap {
    return this.#map;
  }

  /** The archive header: identity, configs and devices. */
  get header(): DecodedVmaHeader {
    return this.#header!;
  }

  /**
   * Cluster `cluster` of `devId` as a record would carry it: its mask and its 64 KiB (zeros
   * where no block is stored), or `null` data for a zero cluster.
   */
  async cluster(
    devId: number,
    cluster: number,
  ): Promise<{ mask: number; data: Uint8Array | null }> {
    const place = this.#map.locate(devId, cluster);
    if (place === null) return { mask: 0, data: null };
    const entry = this.#extent(place.extent);
    entry.pins++;
    try {
      const extent = await entry.promise;
      const data = new Uint8Array(CLUSTER_SIZE);
      copyCluster(extent, place.slot, devId, cluster, 0, data, 0, CLUSTER_SIZE, this.name, false);
      return { mask: extent.masks[place.slot]!, data };
    } finally {
      this.#unpin(entry);
    }
  }

  /**
   * Every used slot of extent `e`, decoded, for a reader that takes whole extents (the
   * unchanged clusters of a synthetic full): each slot's device, cluster, mask and 64 KiB
   * as a record would carry them, `null` data for a zero cluster. The data of a cluster
   * with every block stored is a view into the cached extent, kept from reuse until
   * {@linkcode ExtentClusters.release}; the others are copies.
   */
  async extentClusters(e: number): Promise<ExtentClusters> {
    if (!(e >= 0 && e < this.index.blockCounts.length)) {
      throw new RangeError(`The archive has no extent ${e}`);
    }
    const entry = this.#extent(e);
    entry.pins++;
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this.#unpin(entry);
    };
    let extent: DecodedExtent;
    try {
      extent = await entry.promise;
    } catch (error) {
      release();
      throw error;
    }
    const clusters: ExtentCluster[] = [];
    for (let k = 0; k < extent.masks.length; k++) {
      const devId = extent.devIds[k]!;
      const cluster = extent.clusters[k]!;
      const mask = extent.masks[k]!;
      let data: Uint8Array | null = null;
      if (mask === 0xffff) {
        data = extent.data.subarray(extent.starts[k]!, extent.starts[k]! + CLUSTER_SIZE);
      } else if (mask !== 0) {
        data = new Uint8Array(CLUSTER_SIZE);
        copyCluster(extent, k, devId, cluster, 0, data, 0, CLUSTER_SIZE, this.name, false);
      }
      clusters.push({ devId, cluster, mask, data });
    }
    return { clusters, release };
  }

  /**
   * Starts reading and decoding extent `e` into the cache, if it has data and is not there
   * yet: for a reader that knows which extents it will need next (a failed read fails the
   * read that needs it).
   */
  prefetch(e: number): void {
    if (!(this.index.blockCounts[e]! > 0) || this.#cache.has(e)) return;
    this.#load(e).promise.catch(() => {});
  }

  /** The device of `name` (exactly, or with the `drive-` prefix added), if there is one. */
  device(name: string): VmaIndexDevice | undefined {
    return this.index.devices.find((device) => device.name === name) ??
      this.index.devices.find((device) => device.name === `drive-${name}`);
  }

  /**
   * The bytes `offset` to `offset + length` of device `devId`: in a new buffer, or in
   * `into` (at its start; it must hold `length` bytes; what it held is overwritten, zero
   * ranges included). Throws a `RangeError` past the device's end, a `VmaFormatError` when
   * stored data fails its checks, and the reader's own error (for example `UnexpectedEof`
   * for a file cut while it was open).
   */
  async read(
    devId: number,
    offset: number,
    length: number,
    into?: Uint8Array,
  ): Promise<Uint8Array> {
    const device = this.#deviceOf(devId);
    if (offset < 0 || length < 0 || offset + length > device.size) {
      throw new RangeError(
        `Cannot read ${offset}+${length} of ${device.name}: It is ${device.size} bytes`,
      );
    }
    if (into !== undefined && into.byteLength < length) {
      throw new RangeError(`Cannot read ${length} bytes into a buffer of ${into.byteLength}`);
    }
    const out = into === undefined ? new Uint8Array(length) : into.subarray(0, length);
    const dirty = into !== undefined; // a reused buffer: its zero ranges must be written
    const end = offset + length;
    // The clusters to copy, grouped by extent: [slot, cluster, from, to] for each.
    const groups = new Map<number, { entry: CacheEntry; jobs: number[] }>();
    for (let cluster = Math.floor(offset / CLUSTER_SIZE); cluster * CLUSTER_SIZE < end; cluster++) {
      const place = this.#map.locate(devId, cluster);
      const from = Math.max(offset, cluster * CLUSTER_SIZE);
      const to = Math.min(end, (cluster + 1) * CLUSTER_SIZE);
      if (place === null) { // a zero cluster: nothing stored, nothing to read
        if (dirty) out.fill(0, from - offset, to - offset);
        continue;
      }
      let group = groups.get(place.extent);
      if (group === undefined) {
        const entry = this.#extent(place.extent);
        entry.pins++; // kept from reuse until its clusters are copied
        group = { entry, jobs: [] };
        groups.set(place.extent, group);
      }
      group.jobs.push(place.slot, cluster, from, to);
    }
    const copyAll = (extent: DecodedExtent, jobs: number[]) => {
      for (let j = 0; j < jobs.length; j += 4) {
        const [slot, cluster, from, to] = [jobs[j]!, jobs[j + 1]!, jobs[j + 2]!, jobs[j + 3]!];
        const within = from - cluster * CLUSTER_SIZE;
        copyCluster(
          extent,
          slot,
          devId,
          cluster,
          within,
          out,
          from - offset,
          to - from,
          this.name,
          dirty,
        );
      }
    };
    // Extents in the cache are copied at once, without a promise per request (most reads).
    const waits: Promise<void>[] = [];
    let failure: { error: unknown } | undefined;
    for (const { entry, jobs } of groups.values()) {
      if (entry.extent === undefined) {
        waits.push(
          entry.promise.then((extent) => copyAll(extent, jobs)).finally(() => this.#unpin(entry)),
        );
        continue;
      }
      try {
        if (failure === undefined) copyAll(entry.extent, jobs);
      } catch (error) {
        failure = { error };
      } finally {
        this.#unpin(entry);
      }
    }
    // A reader that goes on where it stopped gets the extents of the next clusters of this
    // disk read ahead (the archive's next extents may hold another disk). Several readers
    // of one disk at once (nbdcopy's connections) are each seen as sequential.
    const ends = this.#lastEnds.get(devId) ?? [];
    const stream = ends.indexOf(offset);
    if (stream >= 0) {
      ends.splice(stream, 1);
      this.#passedBefore(devId, offset, device.size);
      this.#readAhead(devId, end, device.size);
    }
    ends.push(end);
    if (ends.length > 8) ends.shift();
    this.#lastEnds.set(devId, ends);
    if (waits.length > 0) {
      const settled = await Promise.allSettled(waits);
      const rejected = settled.find((result) => result.status === "rejected");
      if (failure === undefined && rejected !== undefined) failure = { error: rejected.reason };
    }
    if (failure !== undefined) throw failure.error;
    return out;
  }

  /** A sequential reader that starts a new extent at `offset` is done with the one before. */
  #passedBefore(devId: number, offset: number, size: number): void {
    // At the disk's end there is no next cluster to look up (a read of 0 bytes there).
    if (offset === 0 || offset >= size) return;
    const before = this.#map.locate(devId, Math.floor((offset - 1) / CLUSTER_SIZE));
    const now = this.#map.locate(devId, Math.floor(offset / CLUSTER_SIZE));
    if (before !== null && before.extent !== now?.extent && this.#cache.has(before.extent)) {
      this.#passed.add(before.extent);
    }
  }

  /**
   * Starts reading the extents that hold the next clusters after `from` (up to
   * {@linkcode READ_AHEAD} of them), only into free cache room: extents sequential readers
   * have moved past may go for it, but not what other readers still use.
   */
  #readAhead(devId: number, from: number, size: number): void {
    const first = Math.ceil(from / CLUSTER_SIZE);
    const last = Math.min(Math.ceil(size / CLUSTER_SIZE), first + READ_AHEAD * SLOTS_PER_EXTENT);
    const seen = new Set<number>();
    for (let cluster = first; cluster < last; cluster++) {
      const place = this.#map.locate(devId, cluster);
      if (place === null || seen.has(place.extent)) continue;
      seen.add(place.extent);
      if (seen.size > READ_AHEAD) return;
      if (this.#cache.has(place.extent)) continue;
      const bytes = this.index.blockCounts[place.extent]! * BLOCK_SIZE;
      const room = () => this.#cacheBytes - this.#cached - this.#loadingBytes;
      if (room() < bytes) this.#evict(bytes - room(), true);
      if (room() < bytes) return;
      this.#load(place.extent).promise.catch(() => {}); // a failed read-ahead fails its reader
    }
  }

  /**
   * Extent `e` as stored in a seekable `.vma.zst`, for a copy that does not re-encode it:
   * its decoded 512-byte header and slots, and its data frame exactly as stored, with the
   * frame's checksum and SHA-256 (checked against the index). `undefined` when the
   * extent's data is not one frame of its own (a plain archive, another layout) or it has
   * no data. With `reuseBuffers`, the frame is a view of a recycled buffer that its final
   * consumer gives back with `releaseChunk` (see the ownership rule in `_pool.ts`).
   */
  async storedExtent(
    e: number,
    options: { reuseBuffers?: boolean } = {},
  ): Promise<StoredExtent | undefined> {
    const table = this.#seekTable;
    if (table === undefined || this.index.digestScope !== "zstd-frame") return undefined;
    if (this.index.blockCounts[e] === 0) return undefined;
    const start = this.#map.extentOffsets[e]!;
    const end = this.#map.extentOffsets[e + 1]!;
    const headerFrame = this.#frameAt(start);
    const dataFrame = headerFrame + 1;
    if (
      this.#frameDecoded[headerFrame] !== start ||
      this.#frameDecoded[dataFrame] !== start + EXTENT_HEADER_SIZE ||
      this.#frameDecoded[dataFrame + 1] !== end
    ) return undefined;
    // Both frames in one read; the header's (512 bytes) is decoded on this thread.
    const from = this.#frameStored[headerFrame]!;
    const split = this.#frameStored[dataFrame]! - from;
    const length = this.#frameStored[dataFrame + 1]! - from;
    let both: Uint8Array;
    if (options.reuseBuffers && this.#reader.readInto !== undefined) {
      // A pooled buffer, which the frame's final consumer gives back with releaseChunk.
      this.#storedFrames ??= new SizedBufferPool(1 << 20, this.#inputs!.largest, 16, {
        trackChunks: true,
      });
      const buffer = this.#storedFrames.acquire(length);
      both = buffer.bytes.subarray(0, length);
      await this.#limited(() => this.#reader.readInto!(from, both));
      buffer.hold(1);
    } else {
      both = await this.#limited(() => this.#reader.read(from, length));
    }
    this.stats.storedBytesRead += both.byteLength;
    const headerFrameBytes = both.subarray(0, split);
    this.#checkFrameChecksum(headerFrameBytes, headerFrame);
    const header = await this.#decoders!.decode({
      input: headerFrameBytes as Uint8Array<ArrayBuffer>, // decoded here: never transferred
      size: EXTENT_HEADER_SIZE,
    }).then(({ output }) => output, (error) => {
      throw new VmaFormatError(
        "bad-frame-checksum",
        from,
        `zstd frame ${headerFrame} of ${this.name}: ${(error as Error).message}${
          this.#map.describe(e)
        }`,
      );
    });
    const { slots } = decodeExtentHeader(header, start, this.#uuidBytes());
    const frame = both.subarray(split);
    this.#checkFrameChecksum(frame, dataFrame);
    const digest = new Uint8Array(createHash("sha256").update(frame).digest());
    this.#checkDigest(e, digest);
    return {
      blockCount: this.index.blockCounts[e]!,
      slots,
      frame,
      checksum: table.checksums?.[dataFrame] ?? 0,
      digest,
    };
  }

  /** Which parts of `devId`'s range `offset`..`offset + length` are zero, by the index alone. */
  allocation(devId: number, offset: number, length: number): AllocationExtent[] {
    return this.#map.allocation(devId, offset, length);
  }

  /** Releases the reader and the decoders. */
  close(): void {
    this.#decoders?.stop();
    this.#reader.close();
    for (const entry of this.#cache.values()) entry.evicted = true;
    this.#cache.clear();
    this.#passed.clear();
  }

  #deviceOf(devId: number): VmaIndexDevice {
    const device = this.index.devices.find((candidate) => candidate.devId === devId);
    if (device === undefined) throw new RangeError(`The archive has no device ${devId}`);
    return device;
  }

  /** A decoded extent, from the cache or read now; reads ahead for sequential readers. */
  #extent(e: number): CacheEntry {
    let entry = this.#cache.get(e);
    if (entry !== undefined) {
      this.stats.cacheHits++;
      this.#passed.delete(e); // read again: not done with after all
      this.#cache.delete(e); // most recently used last
      this.#cache.set(e, entry);
    } else {
      entry = this.#load(e);
    }
    return entry;
  }

  #load(e: number): CacheEntry {
    const size = this.index.blockCounts[e]! * BLOCK_SIZE;
    this.#loadingBytes += size;
    const entry: CacheEntry = {
      promise: this.#limited(() => this.#readExtent(e)).finally(() => this.#loadingBytes -= size),
      extent: undefined,
      pins: 0,
      evicted: false,
    };
    this.#cache.set(e, entry);
    entry.promise.then((extent) => {
      entry.extent = extent;
      if (entry.evicted) return; // the archive was closed meanwhile
      this.#cached += extent.data.byteLength;
      this.#evict();
    }, () => {
      if (this.#cache.get(e) === entry) this.#cache.delete(e);
    });
    return entry;
  }

  /**
   * Evicts until the cache is within its budget (or, with `passedOnly`, until `bytes` are
   * freed from extents sequential readers have moved past): those first, then the least
   * recently used.
   */
  #evict(bytes = 0, passedOnly = false): void {
    const over = () => this.#cached - this.#cacheBytes;
    let freed = 0;
    const done = () => passedOnly ? freed >= bytes : over() <= 0;
    const candidates = [
      ...[...this.#passed].map((e) => [e, this.#cache.get(e)] as const),
      ...(passedOnly ? [] : this.#cache),
    ];
    for (const [e, entry] of candidates) {
      if (done()) break;
      // Still loading, or being copied out of: reads that need it now must not decode it again.
      if (entry?.extent === undefined || entry.pins > 0 || entry.evicted) continue;
      this.#cache.delete(e);
      this.#passed.delete(e);
      this.#cached -= entry.extent.data.byteLength;
      freed += entry.extent.data.byteLength;
      entry.evicted = true;
      entry.extent.lease?.release();
    }
  }

  /** A read is done with `entry`: an evicted extent's buffer can be reused now. */
  #unpin(entry: CacheEntry): void {
    if (entry.pins > 0) entry.pins--;
    if (entry.pins > 0) return;
    if (entry.evicted) {
      const lease = entry.extent?.lease;
      if (entry.extent !== undefined) entry.extent.lease = undefined;
      lease?.release();
    } else if (this.#cached > this.#cacheBytes) {
      this.#evict(); // it may have been kept over the budget while it was pinned
    }
  }

  async #limited<T>(task: () => Promise<T>): Promise<T> {
    while (this.#reads.active >= this.#reads.limit) {
      await new Promise<void>((resolve) => this.#reads.waiting.push(resolve));
    }
    this.#reads.active++;
    try {
      return await task();
    } finally {
      this.#reads.active--;
      this.#reads.waiting.shift()?.();
    }
  }

  /** Reads the stored bytes `start` to `end` of the (decompressed) archive. */
  async #archiveBytes(start: number, end: number, digestOf?: number): Promise<Piece[]> {
    if (this.#seekTable === undefined) {
      this.stats.storedBytesRead += end - start;
      return [{ bytes: await this.#reader.read(start, end - start) }];
    }
    const table = this.#seekTable;
    const f0 = this.#frameAt(start);
    const f1 = this.#frameAt(end - 1);
    const from = this.#frameStored[f0]!;
    const span = this.#frameStored[f1 + 1]! - from;
    // An extent's frames (a small header frame, one data frame) are read into a pooled
    // buffer and decoded from it: the small ones here, at once, and then the data frame in
    // a worker, which takes the whole buffer along and gives it back.
    const order: number[] = [];
    let toWorker = 0;
    for (let f = f0; f <= f1; f++) {
      if (table.decompressedSizes[f]! > INLINE_SIZE) toWorker++;
      else order.push(f);
    }
    for (let f = f0; f <= f1; f++) if (table.decompressedSizes[f]! > INLINE_SIZE) order.push(f);
    const inputs = this.#inputs!;
    const pooled = toWorker <= 1 && span <= inputs.largest && this.#reader.readInto !== undefined
      ? inputs.acquire(span)
      : undefined;
    let stored: Uint8Array<ArrayBuffer>;
    if (pooled !== undefined) {
      stored = pooled.bytes.subarray(0, span);
      await this.#reader.readInto!(from, stored).catch((error) => {
        pooled.hold(0);
        throw error;
      });
    } else {
      stored = await this.#reader.read(from, span) as Uint8Array<ArrayBuffer>;
    }
    this.stats.storedBytesRead += stored.byteLength;
    const pieces: Promise<Piece>[] = [];
    for (const f of order) {
      const size = table.decompressedSizes[f]!;
      if (size === 0) continue; // a skippable frame
      const at = this.#frameStored[f]! - from;
      const view = stored.subarray(at, at + table.compressedSizes[f]!);
      const frame = pooled !== undefined ? view : view.slice();
      try {
        this.#checkFrameChecksum(frame, f); // the worker frame comes last: still ours here
      } catch (error) {
        pooled?.hold(0);
        for (const piece of pieces) piece.then((p) => p.lease?.release(), () => {});
        throw error;
      }
      const checksummed = frame.byteLength >= 9 && (frame[4]! & 0x04) !== 0;
      const digest = digestOf !== undefined && this.#checkDigests &&
        !(checksummed && this.#trustFrameChecksums) &&
        this.#frameDecoded[f] === start + EXTENT_HEADER_SIZE;
      const begin = Math.max(start, this.#frameDecoded[f]!) - this.#frameDecoded[f]!;
      const finish = Math.min(end, this.#frameDecoded[f + 1]!) - this.#frameDecoded[f]!;
      // Data frames decode into recycled buffers: fresh multi-MiB ones stay resident.
      const lent = size > INLINE_SIZE ? this.#outputs!.acquire() : undefined;
      pieces.push(
        this.#decoders!.decode({ input: frame, size, digest, ...(lent && { output: lent.bytes }) })
          .then(({ input, output, digest: sha }) => {
            if (pooled !== undefined && size > INLINE_SIZE) inputs.adopt(input);
            const lease = lent && this.#outputs!.wrap(new Uint8Array(output.buffer));
            lease?.hold(1);
            if (sha !== undefined) {
              try {
                this.#checkDigest(digestOf!, sha);
              } catch (error) {
                lease?.release();
                throw error;
              }
            }
            return { bytes: output.subarray(begin, finish), lease };
          }, (error) => {
            throw new VmaFormatError(
              "bad-frame-checksum",
              this.#frameStored[f]!,
              `zstd frame ${f} of ${this.name}: ${(error as Error).message}${
                this.#map.describe(digestOf)
              }`,
            );
          }),
      );
    }
    // Without a data frame, the buffer was only read here: it can be reused now.
    if (pooled !== undefined && toWorker === 0) pooled.hold(0);
    const settled = await Promise.allSettled(pieces);
    const failed = settled.find((result) => result.status === "rejected");
    if (failed !== undefined) {
      for (const result of settled) {
        if (result.status === "fulfilled") result.value.lease?.release();
      }
      throw failed.reason;
    }
    return settled.map((result) => (result as PromiseFulfilledResult<Piece>).value);
  }

  async #readExtent(e: number): Promise<DecodedExtent> {
    const start = this.#map.extentOffsets[e]!;
    const end = this.#map.extentOffsets[e + 1]!;
    const pieces = await this.#archiveBytes(start, end, e);
    this.stats.extentsRead++;
    // The usual seekable layout is [header frame, data frame]: no need to join them.
    const split = pieces.length === 2 && pieces[0]!.bytes.byteLength === EXTENT_HEADER_SIZE;
    const joined = pieces.length === 1 || split
      ? undefined
      : concat(pieces.map((piece) => piece.bytes), end - start);
    const first = joined ?? pieces[0]!.bytes;
    const header = first.subarray(0, EXTENT_HEADER_SIZE);
    const data = split ? pieces[1]!.bytes : first.subarray(EXTENT_HEADER_SIZE);
    // The buffer that holds `data` stays leased with the extent; the others go back now.
    const kept = split ? pieces[1]!.lease : pieces.length === 1 ? pieces[0]!.lease : undefined;
    for (const piece of pieces) if (piece.lease !== kept) piece.lease?.release();
    try {
      return this.#decodeSlots(e, start, header, data, kept);
    } catch (error) {
      kept?.release();
      throw error;
    }
  }

  #decodeSlots(
    e: number,
    start: number,
    header: Uint8Array,
    data: Uint8Array,
    lease: PooledBuffer | undefined,
  ): DecodedExtent {
    const { blockCount, slots } = decodeExtentHeader(header, start, this.#uuidBytes());
    if (blockCount !== this.index.blockCounts[e] || slots.length !== this.index.slotCounts[e]) {
      throw new VmaFormatError(
        "index-mismatch",
        start,
        `extent ${e} has ${blockCount} blocks in ${slots.length} slots, the index says ${
          this.index.blockCounts[e]
        } in ${this.index.slotCounts[e]}`,
      );
    }
    if (this.layout === "vma" && this.index.digestScope === "vma-data") {
      this.#checkDigest(e, new Uint8Array(createHash("sha256").update(data).digest()));
    }
    const decoded: DecodedExtent = {
      masks: new Uint16Array(slots.length),
      starts: new Uint32Array(slots.length),
      devIds: new Uint8Array(slots.length),
      clusters: new Uint32Array(slots.length),
      data,
      lease,
    };
    let at = 0;
    slots.forEach((slot, k) => {
      decoded.masks[k] = slot.mask;
      decoded.starts[k] = at;
      decoded.devIds[k] = slot.devId;
      decoded.clusters[k] = slot.cluster;
      at += popcount16(slot.mask) * BLOCK_SIZE;
    });
    return decoded;
  }

  #checkDigest(e: number, digest: Uint8Array): void {
    if (!this.#checkDigests || this.index.digestScope === "none") return;
    const expected = this.index.digests.subarray(32 * e, 32 * e + 32);
    if (digest.toHex() !== expected.toHex()) {
      throw new VmaFormatError(
        "bad-frame-checksum",
        this.#map.extentOffsets[e]!,
        `extent ${e} of ${this.name}${
          this.#map.describe(e)
        }: its data does not match the SHA-256 in the index`,
      );
    }
  }

  /** A frame's own checksum trailer must be the one the seek table lists. */
  #checkFrameChecksum(frame: Uint8Array, f: number): void {
    const checksums = this.#seekTable?.checksums;
    if (checksums == null || frame.byteLength < 9 || (frame[4]! & 0x04) === 0) return;
    const trailer = new DataView(frame.buffer, frame.byteOffset + frame.byteLength - 4, 4)
      .getUint32(0, true);
    if (trailer !== checksums[f]) {
      throw new VmaFormatError(
        "bad-frame-checksum",
        this.#frameStored[f + 1]! - 4,
        `zstd frame ${f} of ${this.name}: its checksum ${hex(trailer)} is not the seek table's ${
          hex(checksums[f]!)
        }`,
      );
    }
  }

  #frameAt(position: number): number {
    let lo = 0;
    let hi = this.#frameDecoded.length - 1;
    while (hi - lo > 1) {
      const mid = (lo + hi) >>> 1;
      if (this.#frameDecoded[mid]! <= position) lo = mid;
      else hi = mid;
    }
    while (this.#seekTable!.decompressedSizes[lo] === 0) lo++; // skippable frames hold nothing
    return lo;
  }

  #uuidBytes(): Uint8Array {
    return Uint8Array.fromHex(this.index.uuid.replaceAll("-", ""));
  }

  /** The stored header must be the one the index was made for. */
  async #checkHeader(): Promise<void> {
    const pieces = await this.#archiveBytes(0, this.index.headerSize);
    const bytes = concat(pieces.map((piece) => piece.bytes), this.index.headerSize);
    for (const piece of pieces) piece.lease?.release();
    const uuid = bytes.subarray(HeaderOffset.uuid, HeaderOffset.uuid + 16).toHex();
    const md5 = bytes.subarray(HeaderOffset.md5, HeaderOffset.md5 + 16).toHex();
    const want = this.index.uuid.replaceAll("-", "");
    if (bytes.byteLength < HEADER_FIXED_SIZE || uuid !== want) {
      throw new VmaFormatError(
        "index-mismatch",
        HeaderOffset.uuid,
        `the index belongs to another archive (index UUID ${this.index.uuid}, archive UUID ${
          formatUuid(uuid)
        })`,
      );
    }
    if (md5 !== this.index.headerMd5) {
      throw new VmaFormatError(
        "index-mismatch",
        HeaderOffset.md5,
        "the index does not match this archive's header (a stale index of an archive with the same UUID)",
      );
    }
    this.#header = decodeHeader(bytes); // checks its MD5, and gives the configs
  }
}

/** Extents read ahead of a sequential reader: the ones that hold the next clusters. */
const READ_AHEAD = 3;

/** An extent of a seekable archive as stored, for a verbatim copy. */
export interface StoredExtent {
  /** Its 4 KiB data blocks. */
  blockCount: number;
  /** Its used slots, from its header. */
  slots: VmaExtentSlot[];
  /** Its data frame, compressed, exactly as stored. */
  frame: Uint8Array;
  /** The frame's content checksum (low 32 bits of XXH64). */
  checksum: number;
  /** SHA-256 of `frame`, as the index lists it. */
  digest: Uint8Array;
}

/** One used slot of a decoded extent (see {@linkcode IndexedArchive.extentClusters}). */
export interface ExtentCluster {
  /** Device id. */
  devId: number;
  /** Cluster number. */
  cluster: number;
  /** Its stored 4 KiB blocks. */
  mask: number;
  /** Its 64 KiB, zeros where no block is stored; `null` for a zero cluster. */
  data: Uint8Array | null;
}

/** A decoded extent's clusters, valid until released. */
export interface ExtentClusters {
  /** Its used slots, in slot order. */
  clusters: ExtentCluster[];
  /** The data views may be reused once this is called (calling it again does nothing). */
  release(): void;
}

/** The archive cannot be read at random (it is not seekable). */
export class NotSeekableError extends Error {
  /** An error with `message`. */
  constructor(message: string) {
    super(message);
    this.name = "NotSeekableError";
  }
}

/** The slot must hold the cluster the index says it does. */
function checkSlot(
  extent: DecodedExtent,
  slot: number,
  devId: number,
  cluster: number,
  name: string,
): void {
  if (extent.devIds[slot] !== devId || extent.clusters[slot] !== cluster) {
    throw new VmaFormatError(
      "index-mismatch",
      0,
      `the index of ${name} points cluster ${cluster} of device ${devId} at a slot that holds cluster ${
        extent.clusters[slot]
      } of device ${extent.devIds[slot]}`,
    );
  }
}

/** Copies part of one cluster out of a decoded extent, zeros where no block is stored. */
function copyCluster(
  extent: DecodedExtent,
  slot: number,
  devId: number,
  cluster: number,
  within: number,
  out: Uint8Array,
  outAt: number,
  length: number,
  name: string,
  dirty: boolean,
): void {
  checkSlot(extent, slot, devId, cluster, name);
  const mask = extent.masks[slot]!;
  let stored = extent.starts[slot]!;
  // Runs of stored blocks are contiguous in the extent: one copy per run, not per block.
  for (let block = 0; block < 16;) {
    if (!(mask & (1 << block))) {
      if (dirty) {
        const lo = Math.max(within, block * BLOCK_SIZE);
        const hi = Math.min(within + length, (block + 1) * BLOCK_SIZE);
        if (lo < hi) out.fill(0, outAt + lo - within, outAt + hi - within);
      }
      block++;
      continue;
    }
    let last = block;
    while (last < 15 && mask & (1 << (last + 1))) last++;
    const runStart = block * BLOCK_SIZE;
    const runEnd = (last + 1) * BLOCK_SIZE;
    const lo = Math.max(within, runStart);
    const hi = Math.min(within + length, runEnd);
    if (lo < hi) {
      out.set(
        extent.data.subarray(stored + lo - runStart, stored + hi - runStart),
        outAt + lo - within,
      );
    }
    stored += runEnd - runStart;
    block = last + 1;
  }
}

function concat(pieces: Uint8Array[], length: number): Uint8Array {
  const joined = new Uint8Array(length);
  let at = 0;
  for (const piece of pieces) {
    joined.set(piece, at);
    at += piece.byteLength;
  }
  return joined;
}

function hex(value: number): string {
  return `0x${value.toString(16).padStart(8, "0")}`;
}

function formatUuid(hex: string): string {
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${
    hex.slice(20)
  }`;
}
