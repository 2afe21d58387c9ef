// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The strict, streaming VMA reader: archive bytes in, typed records out.
 *
 * @module
 */
import { ClusterBitmap } from "../_bitmap.ts";
import { md5, popcount16 } from "../_bytes.ts";
import { BufferPool, type PooledBuffer, releaseChunk } from "../_pool.ts";
import { detectCompression } from "../_compression_magic.ts";
import { VmaFormatError } from "./errors.ts";
import {
  BLOCK_SIZE,
  CLUSTER_SIZE,
  clusterCount,
  EXTENT_HEADER_SIZE,
  EXTENT_MAGIC,
  ExtentOffset,
  HEADER_FIXED_SIZE,
  READER_MAX_HEADER_SIZE,
  SLOTS_PER_EXTENT,
  validMask,
  VMA_MAGIC,
  VMSTATE_NAME,
} from "./format.ts";
import { decodeHeader, headerSizeOf } from "./header.ts";
import type { VmaClusterRecord, VmaDeviceRecord, VmaRecord } from "./records.ts";

/** Options of {@linkcode VmaReaderStream}. */
export interface VmaReaderOptions {
  /**
   * Which devices must be complete at the end of the archive (every cluster present).
   * Default `true`: all of them. An archive cut exactly at an extent boundary is only
   * caught by this check, which Proxmox's `vma verify` does not make.
   */
  requireComplete?: boolean | ((device: VmaDeviceRecord) => boolean);
  /**
   * Check everything but do not copy cluster data out of the archive (default `false`):
   * cluster records then carry their mask with `data: null`. For verification, where only the
   * structure matters.
   */
  skipData?: boolean;
  /**
   * Recycle the extent buffers behind cluster data (default `false`). Only for a pipeline in
   * which every cluster record reaches exactly one final consumer that releases it (its
   * `lease`, or `releaseChunk` on the data passed on as bytes), and no `tee()`. Off, every
   * extent's data are a fresh buffer that belongs to the records' receiver.
   */
  reuseBuffers?: boolean;
}

/** Per-device counters of {@linkcode VmaReaderStats}. */
export interface VmaReaderDeviceStats {
  /** Device id. */
  devId: number;
  /** Device name. */
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
  /** Extents read. */
  extents: number;
  /** Cluster records emitted, of all devices. */
  clusters: number;
  /** Clusters found with mask 0, of all devices. */
  zeroClusters: number;
  /** 4 KiB data blocks found, of all devices. */
  dataBlocks: number;
  /** Counters per device, in header order. */
  devices: VmaReaderDeviceStats[];
}

/**
 * Parses a VMA archive from a byte stream without seeking, so it works on pipes, and
 * emits a `header` record, the `config` and `device` records, then one `cluster` record per
 * blockinfo slot, in archive order.
 *
 * It checks every rule of the reference reader (header and extent MD5, magic, version,
 * blob pointers and NUL terminators, extent UUID, block_count against the masks, dev ids,
 * duplicate clusters, writes beyond the end) and more: clusters past a device's end, and,
 * at the end, missing clusters. Every problem is a {@linkcode VmaFormatError} that carries
 * the byte offset. Extents are emitted only once complete and valid; cluster data are views
 * of one buffer per extent, recycled with `reuseBuffers`, so memory stays at about one extent.
 *
 * @example Read an archive back into records
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaReaderStream, VmaWriterStream, type VmaRecord } from "../../mod.ts";
 *
 * const data = new Uint8Array(65536).fill(7);
 * const input: VmaRecord[] = [
 *   { type: "device", devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster", devId: 1, cluster: 0, mask: 0xffff, data },
 * ];
 * const records = await Array.fromAsync(
 *   ReadableStream.from(input).pipeThrough(new VmaWriterStream()).pipeThrough(new VmaReaderStream()),
 * );
 * const cluster = records.find((record) => record.type === "cluster");
 * assert.deepEqual(cluster?.type === "cluster" && cluster.data, data);
 * ```
 */
export class VmaReaderStream extends TransformStream<Uint8Array, VmaRecord> {
  #parser: ArchiveParser;

  /** A reader for one archive; see {@linkcode VmaReaderOptions}. */
  constructor(options: VmaReaderOptions = {}) {
    const parser = new ArchiveParser(options);
    super({
      transform: (chunk, controller) => parser.push(chunk, controller),
      flush: (controller) => parser.end(controller),
    });
    this.#parser = parser;
  }

  /** Counters so far; complete once the stream has flushed. */
  get stats(): VmaReaderStats {
    const stats = this.#parser.stats;
    return { ...stats, devices: stats.devices.map((device) => ({ ...device })) };
  }
}

type Output = TransformStreamDefaultController<VmaRecord>;

interface DeviceState {
  record: VmaDeviceRecord;
  stats: VmaReaderDeviceStats;
  seen: ClusterBitmap;
  isVmstate: boolean;
}

/** One blockinfo slot of the current extent. */
interface Slot {
  index: number;
  mask: number;
  devId: number;
  cluster: number;
}

const enum Phase {
  Header,
  ExtentHeader,
  ExtentData,
}

class ArchiveParser {
  stats: VmaReaderStats = {
    bytes: 0,
    headerSize: 0,
    extents: 0,
    clusters: 0,
    zeroClusters: 0,
    dataBlocks: 0,
    devices: [],
  };
  #requireComplete: (device: VmaDeviceRecord) => boolean;
  #skipData: boolean;
  #phase = Phase.Header;
  /** Header bytes collected so far; grows once the header size is known. */
  #header = new Uint8Array(HEADER_FIXED_SIZE);
  #headerFill = 0;
  #uuid = new Uint8Array(16);
  #devices: (DeviceState | undefined)[] = [];

  #extentHeader = new Uint8Array(EXTENT_HEADER_SIZE);
  #extentHeaderView = new DataView(this.#extentHeader.buffer);
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
  #pool: BufferPool;
  #layout: PooledBuffer | null = null;

  constructor(options: VmaReaderOptions) {
    this.#pool = new BufferPool(SLOTS_PER_EXTENT * CLUSTER_SIZE, {
      maxFree: 2,
      trackChunks: true,
      recycle: options.reuseBuffers ?? false,
    });
    const require = options.requireComplete ?? true;
    this.#requireComplete = typeof require === "function" ? require : () => require;
    this.#skipData = options.skipData ?? false;
  }

  push(chunk: Uint8Array, output: Output): void {
    let position = 0;
    while (position < chunk.byteLength) {
      const rest = chunk.subarray(position);
      let used: number;
      switch (this.#phase) {
        case Phase.Header:
          used = this.#pushHeader(rest, output);
          break;
        case Phase.ExtentHeader:
          used = this.#pushExtentHeader(rest, output);
          break;
        case Phase.ExtentData:
          used = this.#pushExtentData(rest, output);
          break;
      }
      position += used;
      this.stats.bytes += used;
    }
    releaseChunk(chunk); // every byte was copied: the producer may reuse the chunk
  }

  end(_output: Output): void {
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
    output.enqueue({ type: "header", uuid: header.uuid, ctime: header.ctime });
    for (const { name, data } of header.configs) output.enqueue({ type: "config", name, data });
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
      output.enqueue({ ...record });
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
    const header = this.#extentHeader;
    const view = this.#extentHeaderView;
    const at = this.#extentOffset;
    const stored = header.slice(ExtentOffset.md5, ExtentOffset.md5 + 16);
    header.fill(0, ExtentOffset.md5, ExtentOffset.md5 + 16);
    if (md5(header).toHex() !== stored.toHex()) {
      throw new VmaFormatError(
        "bad-extent-checksum",
        at + ExtentOffset.md5,
        "wrong vma extent header chechsum",
      );
    }
    for (let i = 0; i < 16; i++) {
      if (header[ExtentOffset.uuid + i] !== this.#uuid[i]) {
        throw new VmaFormatError(
          "bad-extent-uuid",
          at + ExtentOffset.uuid,
          "wrong vma extent uuid",
        );
      }
    }
    if (
      view.getUint32(ExtentOffset.magic) !== EXTENT_MAGIC ||
      view.getUint16(ExtentOffset.reserved) !== 0
    ) {
      throw new VmaFormatError("bad-extent-magic", at, "wrong vma extent header magic");
    }
    this.#blockCount = view.getUint16(ExtentOffset.blockCount);
    this.#slots = [];
    this.#mappedBlocks = 0;
    for (let index = 0; index < SLOTS_PER_EXTENT; index++) {
      const entry = ExtentOffset.blockInfo + 8 * index;
      const high = view.getUint32(entry);
      const cluster = view.getUint32(entry + 4);
      // dev_id 0 marks an empty slot: skipped entirely, its mask claims no data.
      if ((high & 0xff) === 0) continue;
      const mask = high >>> 16;
      // Byte 2 is reserved and ignored, as the reference reader does.
      this.#slots.push({ index, mask, devId: high & 0xff, cluster });
      for (let block = 0; block < 16; block++) {
        if ((mask & (1 << block)) && this.#mappedBlocks < this.#blockCount) {
          this.#blockTargets[this.#mappedBlocks++] = index * CLUSTER_SIZE + block * BLOCK_SIZE;
        }
      }
    }
    this.#dataFill = 0;
  }

  #pushExtentData(chunk: Uint8Array, output: Output): number {
    const total = this.#blockCount * BLOCK_SIZE;
    const used = Math.min(total - this.#dataFill, chunk.byteLength);
    if (this.#skipData) {
      this.#dataFill += used;
      if (this.#dataFill === total) this.#finishExtent(output);
      return used;
    }
    this.#layout ??= this.#pool.acquire();
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
    this.#emitClusters(output);
    this.stats.extents++;
    this.#phase = Phase.ExtentHeader;
  }

  #emitClusters(output: Output): void {
    const layout = this.#layout;
    this.#layout = null;
    // Lend before the first enqueue: a pipe may run its sink, and release, during enqueue.
    const leases = layout?.lend(
      this.#slots.reduce((holders, slot) => holders + (slot.mask === 0 ? 0 : 1), 0),
    );
    let lent = 0;
    for (const { index, mask, devId, cluster } of this.#slots) {
      const device = this.#devices[devId]!;
      const blocks = popcount16(mask);
      this.stats.clusters++;
      this.stats.dataBlocks += blocks;
      device.stats.dataBlocks += blocks;
      if (mask === 0 || layout === null) {
        if (mask === 0) {
          this.stats.zeroClusters++;
          device.stats.zeroClusters++;
        }
        output.enqueue({ type: "cluster", devId, cluster, mask, data: null });
        continue;
      }
      const data = layout!.view(index * CLUSTER_SIZE, (index + 1) * CLUSTER_SIZE);
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
