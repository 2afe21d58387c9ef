// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The strict VMA parser behind {@linkcode VmaReaderStream} and {@linkcode VmaExtentStream}
 * (internal): one state machine and one set of checks, two kinds of output.
 *
 * @module
 */
import { ClusterBitmap } from "../_bitmap.ts";
import { createHash, type Hash } from "node:crypto";
import { popcount16 } from "../_bytes.ts";
import { BufferPool, type PooledBuffer, releaseChunk } from "../_pool.ts";
import { detectCompression } from "../_compression_magic.ts";
import { VmaFormatError } from "./errors.ts";
import {
  BLOCK_SIZE,
  CLUSTER_SIZE,
  clusterCount,
  EXTENT_HEADER_SIZE,
  ExtentOffset,
  HEADER_FIXED_SIZE,
  HeaderOffset,
  MAX_EXTENT_SIZE,
  READER_MAX_HEADER_SIZE,
  SLOTS_PER_EXTENT,
  validMask,
  VMA_MAGIC,
  VMSTATE_NAME,
} from "./format.ts";
import { type DecodedVmaHeader, decodeHeader, headerSizeOf } from "./header.ts";
import type { VmaClusterRecord, VmaDeviceRecord, VmaRecord } from "./records.ts";
import { decodeExtentHeader, type SlotRun, slotRuns, type VmaExtentSlot } from "./extent_header.ts";

export type { VmaExtentSlot } from "./extent_header.ts";

/** Per-device counters of a read. */
export interface VmaReaderDeviceStats {
  /** Device id (1 to 254). */
  devId: number;
  /** Device name, such as `drive-scsi0`. */
  name: string;
  /** Device size in bytes. */
  size: number;
  /** Clusters the device spans. */
  clusters: number;
  /** Clusters found in the archive so far. */
  seenClusters: number;
  /** Clusters found with mask 0. */
  zeroClusters: number;
  /** 4 KiB data blocks found. */
  dataBlocks: number;
}

/** Counters of a read; complete once the stream has flushed. */
export interface VmaReaderStats {
  /** Archive bytes consumed. */
  bytes: number;
  /** Header size in bytes (0 until the header was read). */
  headerSize: number;
  /** The archive UUID ("" until the header was read). */
  uuid: string;
  /** The header's MD5 as stored, in hex ("" until the header was read). */
  headerMd5: string;
  /** Extents read. */
  extents: number;
  /** Cluster slots read. */
  clusters: number;
  /** Cluster slots with mask 0. */
  zeroClusters: number;
  /** 4 KiB data blocks read. */
  dataBlocks: number;
  /** Per-device counters, in header order. */
  devices: VmaReaderDeviceStats[];
}

/** The archive header as it was stored, with its decoded fields. */
export interface VmaHeaderPiece {
  /** Discriminator. */
  type: "header";
  /** The header's bytes (`header.headerSize` of them). */
  bytes: Uint8Array;
  /** What the header says. */
  header: DecodedVmaHeader;
}

/**
 * One extent as it was stored: its 512-byte header and its data blocks, contiguous, checked
 * by every rule of the reader. `bytes` belongs to the receiver, who gives it back with
 * `releaseChunk` once done (a buffer that is not given back is left to the garbage collector).
 */
export interface VmaExtentPiece {
  /** Discriminator. */
  type: "extent";
  /** Byte offset of the extent in the (decompressed) archive. */
  offset: number;
  /** Header and data: `512 + blockCount * 4096` bytes. */
  bytes: Uint8Array;
  /** 4 KiB data blocks after the header. */
  blockCount: number;
  /** Used slots (empty slots, dev_id 0, are left out). */
  slotCount: number;
  /** The used slots' clusters, in slot order, as runs. */
  runs: SlotRun[];
}

/** What the parser hands on: records, or header and extent pieces. */
export type ParserOutput =
  | { kind: "records"; enqueue(record: VmaRecord): void }
  | { kind: "pieces"; enqueue(piece: VmaHeaderPiece | VmaExtentPiece): void };

/** Options of the parser, shared by the reader and the extent stream. */
export interface ArchiveParserOptions {
  /** Which devices must be complete at the end (default all). */
  requireComplete?: boolean | ((device: VmaDeviceRecord) => boolean);
  /** Records mode: check everything but do not copy cluster data out. */
  skipData?: boolean;
  /** Told of every extent once it passed every check. */
  onExtent?: ((extent: VmaExtentInfo) => void) | undefined;
  /** Give `onExtent` the SHA-256 of each extent's data blocks. */
  digestData?: boolean | undefined;
  /** Recycle the buffers behind emitted cluster data and pieces (see `VmaReaderOptions`). */
  reuseBuffers?: boolean | undefined;
}

/** An extent that was read: where it is, what it holds, and the digest of its data. */
export interface VmaExtentInfo {
  /** Byte offset of the extent in the (decompressed) archive. */
  offset: number;
  /** 4 KiB data blocks after its header. */
  blockCount: number;
  /** The used slots, in slot order. */
  slots: VmaExtentSlot[];
  /** SHA-256 of its data blocks when asked for (`digestData`), else or without data `null`. */
  digest: Uint8Array | null;
}

type Output = ParserOutput;

interface DeviceState {
  record: VmaDeviceRecord;
  stats: VmaReaderDeviceStats;
  seen: ClusterBitmap;
  isVmstate: boolean;
}

type Slot = VmaExtentSlot;

const enum Phase {
  Header,
  ExtentHeader,
  ExtentData,
}

/**
 * The parser: `push` bytes, `end` at the end; it throws `VmaFormatError` with the offset.
 *
 * @example Parse an archive into pieces
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../mod.ts";
 * import { ArchiveParser, type VmaExtentPiece, type VmaHeaderPiece } from "./_archive_parser.ts";
 *
 * const archive = await new Response(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 1, data: new Uint8Array(65536).fill(1) },
 * ]).pipeThrough(new VmaWriterStream())).bytes();
 * const pieces: (VmaHeaderPiece | VmaExtentPiece)[] = [];
 * const parser = new ArchiveParser({});
 * parser.push(archive, { kind: "pieces", enqueue: (piece) => pieces.push(piece) });
 * parser.end();
 * assert.deepEqual(pieces.map((piece) => piece.type), ["header", "extent"]);
 * assert.equal((pieces[1] as VmaExtentPiece).blockCount, 1);
 * ```
 */
export class ArchiveParser {
  stats: VmaReaderStats = {
    bytes: 0,
    headerSize: 0,
    uuid: "",
    headerMd5: "",
    extents: 0,
    clusters: 0,
    zeroClusters: 0,
    dataBlocks: 0,
    devices: [],
  };
  #requireComplete: (device: VmaDeviceRecord) => boolean;
  #skipData: boolean;
  #onExtent: ((extent: VmaExtentInfo) => void) | undefined;
  #digestData: boolean;
  /** Hash of the current extent's data, when someone wants to know it. */
  #hash: Hash | undefined;
  #phase = Phase.Header;
  /** Header bytes collected so far; grows once the header size is known. */
  #header = new Uint8Array(HEADER_FIXED_SIZE);
  #headerFill = 0;
  #uuid = new Uint8Array(16);
  #devices: (DeviceState | undefined)[] = [];

  #extentHeader = new Uint8Array(EXTENT_HEADER_SIZE);
  #extentHeaderFill = 0;
  #extentOffset = 0;
  #slots: Slot[] = [];
  #blockCount = 0;
  /** Layout target of each stored block in data order: slot * 64 KiB + block * 4 KiB. */
  #blockTargets = new Int32Array(SLOTS_PER_EXTENT * 16);
  #mappedBlocks = 0;
  #dataFill = 0;
  /**
   * Extent data. Tracked, so that a cluster passed on as bytes (`DeviceBytesStream`) comes
   * back through the final byte consumer's `releaseChunk`, instead of its lease.
   */
  /** Layout buffers by size: 1, 4, 16 and 59 clusters. */
  #pools: BufferPool[];
  #layout: PooledBuffer | null = null;
  /** Clusters with data in the current extent. */
  #dataClusters = 0;

  /** The buffer of the extent being captured whole (pieces mode). */
  #capture: PooledBuffer | null = null;
  /** The input chunk that is exactly the extent being captured (pieces mode). */
  #wholeChunk: Uint8Array | null = null;
  /** Capture buffers of data extents; the receiver of a piece gives them back. */
  #capturePool: BufferPool;
  /** The input chunk holds exactly the extent being captured: it is passed on, not released. */
  #passChunk = false;

  constructor(options: ArchiveParserOptions) {
    // Emitted buffers come back only where the caller proved a single consumer.
    const recycle = options.reuseBuffers ?? false;
    this.#pools = [1, 4, 16, SLOTS_PER_EXTENT].map((clusters) =>
      new BufferPool(clusters * CLUSTER_SIZE, { maxFree: 2, trackChunks: true, recycle })
    );
    this.#capturePool = new BufferPool(MAX_EXTENT_SIZE, { maxFree: 2, trackChunks: true, recycle });
    const require = options.requireComplete ?? true;
    this.#requireComplete = typeof require === "function" ? require : () => require;
    this.#skipData = options.skipData ?? false;
    this.#onExtent = options.onExtent;
    this.#digestData = options.digestData ?? false;
  }

  /** Parses `chunk`; what it completes goes to `output`. */
  push(chunk: Uint8Array, output: Output): void {
    let position = 0;
    while (position < chunk.byteLength) {
      const rest = chunk.subarray(position);
      if (output.kind === "pieces" && this.#phase === Phase.ExtentHeader) {
        this.#startCapture(chunk, position);
      }
      let used: number;
      switch (this.#phase) {
        case Phase.Header:
          used = this.#pushHeader(rest, output);
          break;
        case Phase.ExtentHeader:
          if (this.#capture !== null) {
            const fill = this.#extentHeaderFill;
            this.#capture.bytes.set(rest.subarray(0, EXTENT_HEADER_SIZE - fill), fill);
          }
          used = this.#pushExtentHeader(rest, output);
          break;
        case Phase.ExtentData:
          used = this.#pushExtentData(rest, output);
          break;
      }
      position += used;
      this.stats.bytes += used;
    }
    // Every byte was copied, so the producer may reuse the chunk; unless the chunk is an
    // extent passed on whole, which its receiver gives back.
    if (!this.#passChunk) releaseChunk(chunk);
    this.#passChunk = false;
  }

  /** Checks the end of the archive: nothing cut short, no cluster missing. */
  end(): void {
    const at = this.stats.bytes;
    switch (this.#phase) {
      case Phase.Header: {
        const start = this.#header.subarray(0, this.#headerFill);
        this.#rejectCompressed(start);
        if (this.#headerFill >= 4 && !startsWithVmaMagic(start)) {
          throw new VmaFormatError("bad-magic", 0, "not a vma file - wrong magic number");
        }
        const what = this.#headerFill < HEADER_FIXED_SIZE ? "header" : "header data";
        throw new VmaFormatError(
          "truncated-header",
          at,
          `can't read vma ${what} - got EOF after ${this.#headerFill} bytes`,
        );
      }
      case Phase.ExtentHeader:
        if (this.#extentHeaderFill > 0) {
          throw new VmaFormatError(
            "short-extent-header",
            this.#extentOffset,
            `read short extent (${this.#extentHeaderFill} bytes)`,
          );
        }
        break;
      case Phase.ExtentData:
        throw new VmaFormatError(
          "short-extent",
          this.#extentOffset,
          `short vma extent (${EXTENT_HEADER_SIZE + this.#dataFill} < ${
            EXTENT_HEADER_SIZE + this.#blockCount * BLOCK_SIZE
          })`,
        );
    }
    for (const device of this.#devices) {
      if (device === undefined || device.isVmstate || !this.#requireComplete(device.record)) {
        continue;
      }
      const { clusters, seenClusters, name } = device.stats;
      if (seenClusters === clusters) continue;
      const first = device.seen.firstMissing(clusters);
      throw new VmaFormatError(
        "missing-cluster",
        at,
        `detected missing cluster ${first} for stream ${name} (${
          clusters - seenClusters
        } of ${clusters} clusters missing)`,
      );
    }
  }

  #rejectCompressed(start: Uint8Array): void {
    const format = detectCompression(start);
    if (format !== undefined && format !== "none") {
      throw new VmaFormatError(
        "compressed-input",
        0,
        `not a vma file - the input is ${format}-compressed, decompress it first`,
      );
    }
  }

  #pushHeader(chunk: Uint8Array, output: Output): number {
    const wanted = this.#header.byteLength - this.#headerFill;
    const used = Math.min(wanted, chunk.byteLength);
    this.#header.set(chunk.subarray(0, used), this.#headerFill);
    this.#headerFill += used;
    if (this.#headerFill < this.#header.byteLength) return used;

    if (this.#header.byteLength === HEADER_FIXED_SIZE) {
      this.#rejectCompressed(this.#header);
      const size = headerSizeOf(this.#header, READER_MAX_HEADER_SIZE);
      const grown = new Uint8Array(size);
      grown.set(this.#header);
      this.#header = grown;
      return used;
    }
    const header = decodeHeader(this.#header);
    this.#uuid.set(this.#header.subarray(8, 24));
    this.stats.headerSize = header.headerSize;
    this.stats.uuid = header.uuid;
    this.stats.headerMd5 = this.#header.subarray(HeaderOffset.md5, HeaderOffset.md5 + 16).toHex();
    if (output.kind === "pieces") output.enqueue({ type: "header", bytes: this.#header, header });
    else {
      output.enqueue({ type: "header", uuid: header.uuid, ctime: header.ctime });
      for (const { name, data } of header.configs) output.enqueue({ type: "config", name, data });
    }
    for (const { devId, name, size } of header.devices) {
      const record: VmaDeviceRecord = { type: "device", devId, name, size };
      const clusters = clusterCount(size);
      const stats = {
        devId,
        name,
        size,
        clusters,
        seenClusters: 0,
        zeroClusters: 0,
        dataBlocks: 0,
      };
      this.stats.devices.push(stats);
      this.#devices[devId] = {
        record,
        stats,
        seen: new ClusterBitmap(),
        isVmstate: name === VMSTATE_NAME,
      };
      if (output.kind === "records") output.enqueue({ ...record });
    }
    this.#header = new Uint8Array(0); // not needed any more
    this.#phase = Phase.ExtentHeader;
    return used;
  }

  #pushExtentHeader(chunk: Uint8Array, output: Output): number {
    if (this.#extentHeaderFill === 0) this.#extentOffset = this.stats.bytes;
    const used = Math.min(EXTENT_HEADER_SIZE - this.#extentHeaderFill, chunk.byteLength);
    this.#extentHeader.set(chunk.subarray(0, used), this.#extentHeaderFill);
    this.#extentHeaderFill += used;
    if (this.#extentHeaderFill < EXTENT_HEADER_SIZE) return used;
    this.#extentHeaderFill = 0;
    this.#parseExtentHeader();
    if (this.#blockCount === 0) this.#finishExtent(output);
    else this.#phase = Phase.ExtentData;
    return used;
  }

  #parseExtentHeader(): void {
    const { blockCount, slots } = decodeExtentHeader(
      this.#extentHeader,
      this.#extentOffset,
      this.#uuid,
    );
    this.#blockCount = blockCount;
    this.#slots = slots;
    this.#mappedBlocks = 0;
    // The layout holds the clusters with data only, one after another: an extent of one such
    // cluster among 58 needs 64 KiB, not 3.8 MB (a sparse disk's extents mostly are).
    let rank = 0;
    for (const { mask } of slots) {
      if (mask === 0) continue;
      for (let block = 0; block < 16; block++) {
        if ((mask & (1 << block)) && this.#mappedBlocks < blockCount) {
          this.#blockTargets[this.#mappedBlocks++] = rank * CLUSTER_SIZE + block * BLOCK_SIZE;
        }
      }
      rank++;
    }
    this.#dataClusters = rank;
    this.#dataFill = 0;
  }

  #pushExtentData(chunk: Uint8Array, output: Output): number {
    const total = this.#blockCount * BLOCK_SIZE;
    const used = Math.min(total - this.#dataFill, chunk.byteLength);
    if (output.kind === "pieces") {
      if (this.#capture !== null) {
        this.#capture.bytes.set(chunk.subarray(0, used), EXTENT_HEADER_SIZE + this.#dataFill);
      }
      this.#dataFill += used;
      if (this.#dataFill === total) this.#finishExtent(output);
      return used;
    }
    if (this.#digestData) {
      this.#hash ??= createHash("sha256");
      this.#hash.update(chunk.subarray(0, used));
    }
    if (this.#skipData) {
      this.#dataFill += used;
      if (this.#dataFill === total) this.#finishExtent(output);
      return used;
    }
    this.#layout ??= this.#layoutPool(this.#dataClusters).acquire();
    const layout = this.#layout.bytes;
    // Scatter each stored block to its place in the cluster layout; neighbouring blocks of
    // neighbouring slots are contiguous, so a full extent is copied in one go.
    let position = 0;
    while (position < used) {
      const block = (this.#dataFill + position) >>> 12;
      const within = (this.#dataFill + position) & (BLOCK_SIZE - 1);
      let length = Math.min(BLOCK_SIZE - within, used - position);
      if (block >= this.#mappedBlocks) { // data the masks do not account for: checked below
        position += length;
        continue;
      }
      const target = this.#blockTargets[block]! + within;
      let next = block + 1;
      while (
        within + length === (next - block) * BLOCK_SIZE && next < this.#mappedBlocks &&
        this.#blockTargets[next] === target - within + (next - block) * BLOCK_SIZE &&
        position + length < used
      ) {
        length = Math.min(length + BLOCK_SIZE, used - position);
        next++;
      }
      layout.set(chunk.subarray(position, position + length), target);
      position += length;
    }
    this.#dataFill += used;
    if (this.#dataFill === total) this.#finishExtent(output);
    return used;
  }

  #finishExtent(output: Output): void {
    const at = this.#extentOffset;
    let claimed = 0;
    for (const slot of this.#slots) {
      const entry = at + ExtentOffset.blockInfo + 8 * slot.index;
      const device = this.#devices[slot.devId];
      if (device === undefined) {
        throw new VmaFormatError("bad-dev-id", entry, `got wrong dev id ${slot.devId}`);
      }
      const { name, clusters } = device.stats;
      if (device.isVmstate) {
        if (slot.cluster !== device.stats.seenClusters) {
          throw new VmaFormatError("vmstate-order", entry, "found out of order vmstate data");
        }
      } else if (slot.cluster >= clusters) {
        throw new VmaFormatError(
          "cluster-out-of-range",
          entry,
          `cluster ${slot.cluster} is past the end of stream ${name} (${clusters} clusters)`,
        );
      }
      if (device.seen.has(slot.cluster)) {
        throw new VmaFormatError(
          "duplicate-cluster",
          entry,
          `found duplicated cluster ${slot.cluster} for stream ${name}`,
        );
      }
      if (!device.isVmstate && (slot.mask & ~validMask(device.stats.size, slot.cluster))) {
        throw new VmaFormatError(
          "write-beyond-end",
          entry,
          `got wrong block address - write beyond end (cluster ${slot.cluster} of stream ${name})`,
        );
      }
      device.seen.add(slot.cluster);
      device.stats.seenClusters++;
      claimed += popcount16(slot.mask);
    }
    if (claimed > this.#blockCount) {
      throw new VmaFormatError(
        "block-count-mismatch",
        at + ExtentOffset.blockCount,
        `short vma extent - too many blocks (masks name ${claimed}, block_count is ${this.#blockCount})`,
      );
    }
    if (claimed < this.#blockCount) {
      throw new VmaFormatError(
        "block-count-mismatch",
        at + ExtentOffset.blockCount,
        `vma extent error - missing blocks (masks name ${claimed}, block_count is ${this.#blockCount})`,
      );
    }
    if (this.#onExtent !== undefined) {
      const digest = this.#hash === undefined ? null : new Uint8Array(this.#hash.digest());
      this.#hash = undefined;
      this.#onExtent({ offset: at, blockCount: this.#blockCount, slots: this.#slots, digest });
    }
    if (output.kind === "pieces") this.#emitPiece(output);
    else this.#emitClusters(output);
    this.stats.extents++;
    this.#phase = Phase.ExtentHeader;
  }

  /**
   * Pieces mode, at an extent's first byte: the chunk is passed on as the piece when it is
   * exactly this extent (as `VmaWriterStream` emits them); otherwise the extent is copied
   * into a capture buffer as it arrives.
   */
  #startCapture(chunk: Uint8Array, position: number): void {
    if (this.#extentHeaderFill !== 0) return; // already capturing this extent
    const rest = chunk.byteLength - position;
    if (position === 0 && rest >= EXTENT_HEADER_SIZE) {
      const view = new DataView(chunk.buffer, chunk.byteOffset, EXTENT_HEADER_SIZE);
      if (rest === EXTENT_HEADER_SIZE + view.getUint16(ExtentOffset.blockCount) * BLOCK_SIZE) {
        this.#wholeChunk = chunk;
        this.#passChunk = true;
        return;
      }
    }
    this.#capture = this.#capturePool.acquire();
  }

  #emitPiece(output: Extract<Output, { kind: "pieces" }>): void {
    const length = EXTENT_HEADER_SIZE + this.#blockCount * BLOCK_SIZE;
    let bytes: Uint8Array;
    if (this.#wholeChunk !== null) bytes = this.#wholeChunk;
    else if (this.#blockCount === 0) {
      bytes = this.#capture!.bytes.slice(0, length); // small: a copy of its own
      this.#capture!.hold(0);
    } else {
      this.#capture!.hold(1);
      bytes = this.#capture!.view(0, length);
    }
    this.#capture = null;
    this.#wholeChunk = null;
    for (const slot of this.#slots) this.#count(slot);
    output.enqueue({
      type: "extent",
      offset: this.#extentOffset,
      bytes,
      blockCount: this.#blockCount,
      slotCount: this.#slots.length,
      runs: slotRuns(this.#slots),
    });
  }

  #count(slot: Slot): void {
    const device = this.#devices[slot.devId]!;
    const blocks = popcount16(slot.mask);
    this.stats.clusters++;
    this.stats.dataBlocks += blocks;
    device.stats.dataBlocks += blocks;
    if (slot.mask === 0) {
      this.stats.zeroClusters++;
      device.stats.zeroClusters++;
    }
  }

  /** The pool of the smallest layout that holds `clusters` clusters. */
  #layoutPool(clusters: number): BufferPool {
    return this.#pools.find((pool) => pool.size >= clusters * CLUSTER_SIZE)!;
  }

  #emitClusters(output: Extract<Output, { kind: "records" }>): void {
    const layout = this.#layout;
    this.#layout = null;
    // Lend before the first enqueue: a pipe may run its sink, and release, during enqueue.
    const leases = layout?.lend(
      this.#slots.reduce((holders, slot) => holders + (slot.mask === 0 ? 0 : 1), 0),
    );
    let lent = 0;
    let rank = 0;
    for (const slot of this.#slots) {
      const { mask, devId, cluster } = slot;
      this.#count(slot);
      if (mask === 0 || layout === null) {
        output.enqueue({ type: "cluster", devId, cluster, mask, data: null });
        continue;
      }
      const data = layout!.view(rank * CLUSTER_SIZE, (rank + 1) * CLUSTER_SIZE);
      rank++;
      if (mask !== 0xffff) {
        // The recycled buffer holds stale bytes where no block was stored.
        for (let block = 0; block < 16; block++) {
          if (!(mask & (1 << block))) data.fill(0, block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE);
        }
      }
      const record: VmaClusterRecord = { type: "cluster", devId, cluster, mask, data };
      if (leases !== undefined) record.lease = leases[lent++]!;
      output.enqueue(record);
    }
  }
}

function startsWithVmaMagic(bytes: Uint8Array): boolean {
  return new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0) === VMA_MAGIC;
}
