// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Random access to a stored archive through its index: any byte range of any disk, reading
 * and decoding only the extents that hold it.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { popcount16 } from "../_bytes.ts";
import { readEmbeddedIndex } from "../index/embedded_index.ts";
import { decodeIndex, type VmaIndex, type VmaIndexDevice } from "../index/index_format.ts";
import { type AllocationExtent, IndexMap } from "../index/index_map.ts";

export type { AllocationExtent } from "../index/index_map.ts";
import type { SeekTable } from "../index/seek_table.ts";
import type { RangeReader } from "../storage/range_reader.ts";
import { FrameDecoderPool } from "../transforms/_frame_decoder.ts";
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
  /** Check every extent read against its digest in the index (default true). */
  checkDigests?: boolean | undefined;
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
  #cacheBytes: number;
  #cached = 0;
  #cache = new Map<number, Promise<DecodedExtent>>();
  #sizes = new Map<number, number>();
  #map: IndexMap;
  /** Per frame: compressed and decompressed start offsets (one more entry: the ends). */
  #frameStored = new Float64Array(0);
  #frameDecoded = new Float64Array(0);
  #reads: { active: number; waiting: (() => void)[]; limit: number };
  /** Where each device's last read ended, to see sequential readers. */
  #lastEnd = new Map<number, number>();
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
      this.#decoders = new FrameDecoderPool();
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
    const extent = await this.#extent(place.extent);
    const data = new Uint8Array(CLUSTER_SIZE);
    copyCluster(extent, place.slot, devId, cluster, 0, data, 0, CLUSTER_SIZE, this.name);
    return { mask: extent.masks[place.slot]!, data };
  }

  /** The device of `name` (exactly, or with the `drive-` prefix added), if there is one. */
  device(name: string): VmaIndexDevice | undefined {
    return this.index.devices.find((device) => device.name === name) ??
      this.index.devices.find((device) => device.name === `drive-${name}`);
  }

  /**
   * The bytes `offset` to `offset + length` of device `devId`. Throws a `RangeError` past
   * the device's end, a `VmaFormatError` when stored data fails its checks, and the
   * reader's own error (for example `UnexpectedEof` for a file cut while it was open).
   */
  async read(devId: number, offset: number, length: number): Promise<Uint8Array> {
    const device = this.#deviceOf(devId);
    if (offset < 0 || length < 0 || offset + length > device.size) {
      throw new RangeError(
        `Cannot read ${offset}+${length} of ${device.name}: It is ${device.size} bytes`,
      );
    }
    const out = new Uint8Array(length);
    const end = offset + length;
    const reads: Promise<void>[] = [];
    for (let cluster = Math.floor(offset / CLUSTER_SIZE); cluster * CLUSTER_SIZE < end; cluster++) {
      const place = this.#map.locate(devId, cluster);
      if (place === null) continue; // a zero cluster: nothing stored, nothing to read
      const from = Math.max(offset, cluster * CLUSTER_SIZE);
      const to = Math.min(end, (cluster + 1) * CLUSTER_SIZE);
      reads.push(
        this.#extent(place.extent).then((extent) => {
          copyCluster(
            extent,
            place.slot,
            devId,
            cluster,
            from - cluster * CLUSTER_SIZE,
            out,
            from - offset,
            to - from,
            this.name,
          );
        }),
      );
    }
    // A reader that goes on where it stopped gets the extents of the next clusters of this
    // disk read ahead (the archive's next extents may hold another disk).
    if (this.#lastEnd.get(devId) === offset) this.#readAhead(devId, end, device.size);
    this.#lastEnd.set(devId, end);
    await Promise.all(reads);
    return out;
  }

  /** Starts reading the extents that hold the two extents' worth of clusters after `from`. */
  #readAhead(devId: number, from: number, size: number): void {
    const first = Math.ceil(from / CLUSTER_SIZE);
    const last = Math.min(Math.ceil(size / CLUSTER_SIZE), first + 2 * SLOTS_PER_EXTENT);
    const seen = new Set<number>();
    for (let cluster = first; cluster < last; cluster++) {
      const place = this.#map.locate(devId, cluster);
      if (place === null || seen.has(place.extent)) continue;
      seen.add(place.extent);
      if (seen.size > 2) return;
      if (!this.#cache.has(place.extent)) {
        this.#load(place.extent).catch(() => {}); // a failed read-ahead fails the read that needs it
      }
    }
  }

  /**
   * Extent `e` as stored in a seekable `.vma.zst`, for a copy that does not re-encode it:
   * its decoded 512-byte header and slots, and its data frame exactly as stored, with the
   * frame's checksum and SHA-256 (checked against the index). `undefined` when the
   * extent's data is not one frame of its own (a plain archive, another layout) or it has
   * no data.
   */
  async storedExtent(e: number): Promise<StoredExtent | undefined> {
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
    const [header] = await this.#archiveBytes(start, start + EXTENT_HEADER_SIZE);
    const { slots } = decodeExtentHeader(header!, start, this.#uuidBytes());
    const from = this.#frameStored[dataFrame]!;
    const frame = await this.#reader.read(from, this.#frameStored[dataFrame + 1]! - from);
    this.stats.storedBytesRead += frame.byteLength;
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
    this.#cache.clear();
  }

  #deviceOf(devId: number): VmaIndexDevice {
    const device = this.index.devices.find((candidate) => candidate.devId === devId);
    if (device === undefined) throw new RangeError(`The archive has no device ${devId}`);
    return device;
  }

  /** A decoded extent, from the cache or read now; reads ahead for sequential readers. */
  #extent(e: number): Promise<DecodedExtent> {
    const cached = this.#cache.get(e);
    if (cached !== undefined) {
      this.stats.cacheHits++;
      this.#cache.delete(e); // most recently used last
      this.#cache.set(e, cached);
      return cached;
    }
    return this.#load(e);
  }

  #load(e: number): Promise<DecodedExtent> {
    const loading = this.#limited(() => this.#readExtent(e));
    this.#cache.set(e, loading);
    loading.then((extent) => {
      if (this.#cache.get(e) !== loading) return;
      this.#sizes.set(e, extent.data.byteLength);
      this.#cached += extent.data.byteLength;
      this.#evict();
    }, () => this.#cache.delete(e));
    return loading;
  }

  #evict(): void {
    for (const e of this.#cache.keys()) {
      if (this.#cached <= this.#cacheBytes) break;
      const size = this.#sizes.get(e);
      if (size === undefined) continue; // still loading
      this.#cache.delete(e);
      this.#sizes.delete(e);
      this.#cached -= size;
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
  async #archiveBytes(start: number, end: number, digestOf?: number): Promise<Uint8Array[]> {
    if (this.#seekTable === undefined) {
      this.stats.storedBytesRead += end - start;
      return [await this.#reader.read(start, end - start)];
    }
    const table = this.#seekTable;
    const f0 = this.#frameAt(start);
    const f1 = this.#frameAt(end - 1);
    const from = this.#frameStored[f0]!;
    const stored = await this.#reader.read(from, this.#frameStored[f1 + 1]! - from);
    this.stats.storedBytesRead += stored.byteLength;
    const pieces: Promise<Uint8Array>[] = [];
    for (let f = f0; f <= f1; f++) {
      const size = table.decompressedSizes[f]!;
      if (size === 0) continue; // a skippable frame
      const at = this.#frameStored[f]! - from;
      const frame = stored.slice(at, at + table.compressedSizes[f]!);
      this.#checkFrameChecksum(frame, f);
      const digest = digestOf !== undefined && this.#frameDecoded[f] === start + EXTENT_HEADER_SIZE;
      const begin = Math.max(start, this.#frameDecoded[f]!) - this.#frameDecoded[f]!;
      const finish = Math.min(end, this.#frameDecoded[f + 1]!) - this.#frameDecoded[f]!;
      pieces.push(
        this.#decoders!.decode({ input: frame, size, digest }).then(
          ({ output, digest: sha }) => {
            if (sha !== undefined) this.#checkDigest(digestOf!, sha);
            return output.subarray(begin, finish);
          },
          (error) => {
            throw new VmaFormatError(
              "bad-frame-checksum",
              this.#frameStored[f]!,
              `zstd frame ${f} of ${this.name}: ${(error as Error).message}${
                this.#map.describe(digestOf)
              }`,
            );
          },
        ),
      );
    }
    return await Promise.all(pieces);
  }

  async #readExtent(e: number): Promise<DecodedExtent> {
    const start = this.#map.extentOffsets[e]!;
    const end = this.#map.extentOffsets[e + 1]!;
    const pieces = await this.#archiveBytes(start, end, e);
    this.stats.extentsRead++;
    const joined = pieces.length === 1 ? pieces[0]! : concat(pieces, end - start);
    const header = pieces[0]!.byteLength >= EXTENT_HEADER_SIZE
      ? pieces[0]!.subarray(0, EXTENT_HEADER_SIZE)
      : joined.subarray(0, EXTENT_HEADER_SIZE);
    const data = pieces.length === 2 && pieces[0]!.byteLength === EXTENT_HEADER_SIZE
      ? pieces[1]!
      : joined.subarray(EXTENT_HEADER_SIZE);
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
        `extent ${e}${this.#map.describe(e)}: its data does not match the SHA-256 in the index`,
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
    const bytes = pieces.length === 1 ? pieces[0]! : concat(pieces, this.index.headerSize);
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

/** The archive cannot be read at random (it is not seekable). */
export class NotSeekableError extends Error {
  /** An error with `message`. */
  constructor(message: string) {
    super(message);
    this.name = "NotSeekableError";
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
  const mask = extent.masks[slot]!;
  let stored = extent.starts[slot]!;
  for (let block = 0; block < 16; block++) {
    if (!(mask & (1 << block))) continue;
    const blockStart = block * BLOCK_SIZE;
    const lo = Math.max(within, blockStart);
    const hi = Math.min(within + length, blockStart + BLOCK_SIZE);
    if (lo < hi) {
      out.set(
        extent.data.subarray(stored + lo - blockStart, stored + hi - blockStart),
        outAt + lo - within,
      );
    }
    stored += BLOCK_SIZE;
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
