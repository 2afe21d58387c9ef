// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The VMA writer: typed records in, archive bytes out.
 *
 * @module
 */
import { ClusterBitmap } from "../_bitmap.ts";
import { forEachBlockRun, md5, popcount16, uuidToBytes } from "../_bytes.ts";
import { BufferPool, type PooledBuffer } from "../_pool.ts";
import {
  BLOCK_SIZE,
  CLUSTER_SIZE,
  clusterCount,
  configName,
  EXTENT_HEADER_SIZE,
  EXTENT_MAGIC,
  ExtentOffset,
  SLOTS_PER_EXTENT,
  validMask,
  VMSTATE_NAME,
  WRITER_SLOTS_PER_EXTENT,
} from "./format.ts";
import { encodeHeader, validateConfig, validateDevice, type VmaHeader } from "./header.ts";
import type { VmaClusterRecord, VmaRecord, VmaZerosRecord } from "./records.ts";
import type { SlotRun } from "./extent_header.ts";
import type { VmaExtentPiece, VmaHeaderPiece } from "./_archive_parser.ts";

/** Options of {@linkcode VmaWriterStream}. */
export interface VmaWriterOptions {
  /** Archive UUID; default a random one. Fix it (with `ctime`) for reproducible output. */
  uuid?: string;
  /** Creation time in Unix seconds; default the time the header is written. */
  ctime?: number;
  /**
   * Cluster slots filled per extent, 1 to 59. The default 58 is what Proxmox writes;
   * other values give valid archives with a different extent layout.
   */
  clustersPerExtent?: number;
  /**
   * Fail at the end when a device misses clusters (default `true`). Turn it off only to
   * re-encode a partial archive.
   */
  requireComplete?: boolean;
  /**
   * Recycle extent buffers (default `false`). An emitted chunk is then reused once its
   * consumer calls `releaseChunk` on it, which this library's final consumers do (the
   * reader, the compressors, the file sinks). Leave it off when the output goes to code
   * that keeps chunks (such as `tee()` or `new Response(stream)`); then every extent gets
   * a fresh buffer and ownership passes downstream.
   */
  reuseBuffers?: boolean;
}

/** Counters of a finished (or running) write. */
export interface VmaWriterStats {
  /** Archive bytes emitted so far. */
  bytes: number;
  /** Extents emitted. */
  extents: number;
  /** Cluster records written. */
  clusters: number;
  /** Clusters stored without any data block. */
  zeroClusters: number;
  /** 4 KiB data blocks stored. */
  dataBlocks: number;
}

interface DeviceState {
  name: string;
  size: number;
  clusters: number;
  written: ClusterBitmap;
  isVmstate: boolean;
}

/**
 * Turns a record stream into a VMA archive byte stream.
 *
 * Records must start with the configs and devices (and optionally a `header` record, whose
 * UUID and ctime are used unless the options fix them); cluster records follow in any
 * order, with devices interleaved. Each cluster's blocks are copied once, into the extent
 * being built; a full extent (58 slots, as Proxmox writes) is handed downstream and never
 * touched again. The writer rejects unknown devices, clusters past a device's end and
 * duplicate clusters, and at the end it reports every device that is incomplete.
 *
 * @example Write a one-cluster archive with a fixed identity
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../mod.ts";
 *
 * const archive = await new Response(
 *   ReadableStream.from([
 *     { type: "config" as const, name: "qemu-server.conf", data: new TextEncoder().encode("cores: 1\n") },
 *     { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *     { type: "cluster" as const, devId: 1, cluster: 0, mask: 0, data: null },
 *   ]).pipeThrough(new VmaWriterStream({ uuid: "00000000-0000-4000-8000-000000000000", ctime: 0 })),
 * ).bytes();
 * assert.equal(archive.byteLength, 12800 + 512); // header, then one extent header
 * ```
 */
export class VmaWriterStream extends TransformStream<VmaRecord, Uint8Array> {
  #writer: ArchiveWriter;

  /** A writer for one archive; see {@linkcode VmaWriterOptions}. */
  constructor(options: VmaWriterOptions = {}) {
    const writer = new ArchiveWriter(options);
    let output: Output;
    super({
      start: (controller) => {
        output = { kind: "bytes", enqueue: (bytes) => controller.enqueue(bytes) };
      },
      transform: (record) => writer.write(record, output),
      flush: () => writer.finish(output),
    });
    this.#writer = writer;
  }

  /** Counters so far; final once the stream has flushed. */
  get stats(): VmaWriterStats {
    return { ...this.#writer.stats };
  }
}

/**
 * The VMA writer handing on the archive as pieces instead of bytes: a `header` piece, then
 * one `extent` piece per extent, as `VmaExtentStream` would parse them from
 * `VmaWriterStream`'s bytes, but without parsing them again: what an index or a seekable
 * compressor needs, for the cost of writing. Each data extent's bytes are the receiver's to
 * give back with `releaseChunk` (with `reuseBuffers`).
 *
 * @example The pieces of a one-cluster archive
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaExtentWriterStream } from "../../mod.ts";
 *
 * const pieces = await Array.fromAsync(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 3 * 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 1, data: new Uint8Array(65536).fill(2) },
 *   { type: "zeros" as const, devId: 1, cluster: 1, count: 2 },
 * ]).pipeThrough(new VmaExtentWriterStream()));
 * assert.deepEqual(pieces.map((piece) => piece.type), ["header", "extent"]);
 * const extent = pieces[1]!;
 * assert.ok(extent.type === "extent");
 * assert.deepEqual(extent.runs, [
 *   { devId: 1, cluster: 0, count: 1, zero: false },
 *   { devId: 1, cluster: 1, count: 2, zero: true },
 * ]);
 * ```
 */
export class VmaExtentWriterStream
  extends TransformStream<VmaRecord, VmaHeaderPiece | VmaExtentPiece> {
  #writer: ArchiveWriter;

  /** A writer for one archive; see {@linkcode VmaWriterOptions}. */
  constructor(options: VmaWriterOptions = {}) {
    const writer = new ArchiveWriter(options);
    let output: Output;
    super({
      start: (controller) => {
        output = { kind: "pieces", enqueue: (piece) => controller.enqueue(piece) };
      },
      transform: (record) => writer.write(record, output),
      flush: () => writer.finish(output),
    });
    this.#writer = writer;
  }

  /** Counters so far; final once the stream has flushed. */
  get stats(): VmaWriterStats {
    return { ...this.#writer.stats };
  }
}

/** Where the writer's output goes: bytes, or pieces. */
type Output =
  | { kind: "bytes"; enqueue(bytes: Uint8Array): void }
  | { kind: "pieces"; enqueue(piece: VmaHeaderPiece | VmaExtentPiece): void };

class ArchiveWriter {
  stats: VmaWriterStats = { bytes: 0, extents: 0, clusters: 0, zeroClusters: 0, dataBlocks: 0 };
  #options: VmaWriterOptions;
  #slotsPerExtent: number;
  #identity: { uuid?: string; ctime?: number } = {};
  #configs: VmaHeader["configs"] = [];
  #devices = new Map<number, DeviceState>();
  #uuidBytes: Uint8Array | undefined;
  #headerWritten = false;
  /** Blockinfo table and fixed fields of the extent being built. */
  #extentHeader = new Uint8Array(EXTENT_HEADER_SIZE);
  #extentView = new DataView(this.#extentHeader.buffer);
  #slots = 0;
  /** The extent being built's slots, as runs (for pieces). */
  #runs: SlotRun[] = [];
  #offset = 0;
  #small = new Uint8Array(64 * 1024);
  #smallLength = 0;
  /** Data of the extent being built, acquired at its first data block. */
  #extentData: Uint8Array<ArrayBuffer> | null = null;
  #extentBuffer: PooledBuffer | undefined;
  #extentPool: BufferPool;
  #dataLength = 0;

  constructor(options: VmaWriterOptions) {
    this.#options = options;
    this.#slotsPerExtent = options.clustersPerExtent ?? WRITER_SLOTS_PER_EXTENT;
    if (
      !Number.isInteger(this.#slotsPerExtent) || this.#slotsPerExtent < 1 ||
      this.#slotsPerExtent > SLOTS_PER_EXTENT
    ) {
      throw new RangeError(
        `Cannot create the VMA writer: clustersPerExtent ${this.#slotsPerExtent} is not within 1..${SLOTS_PER_EXTENT}`,
      );
    }
    if (options.uuid !== undefined) uuidToBytes(options.uuid); // fail early on a bad UUID
    this.#extentPool = new BufferPool(
      EXTENT_HEADER_SIZE + this.#slotsPerExtent * CLUSTER_SIZE,
      { trackChunks: true, recycle: options.reuseBuffers ?? false },
    );
  }

  write(record: VmaRecord, output: Output): void {
    switch (record.type) {
      case "cluster":
        if (!this.#headerWritten) this.#writeHeader(output);
        this.#writeCluster(record, output);
        return;
      case "zeros":
        if (!this.#headerWritten) this.#writeHeader(output);
        this.#writeZeros(record, output);
        return;
      case "header":
        this.#beforeData("header");
        this.#identity = { uuid: record.uuid, ctime: record.ctime };
        return;
      case "config":
        this.#beforeData(`config "${record.name}"`);
        this.#addConfig(configName(record.name), record.data);
        return;
      case "device":
        this.#beforeData(`device "${record.name}"`);
        this.#addDevice(record.devId, record.name, record.size);
        return;
      default:
        throw new TypeError(
          `Cannot write record: Unknown record type "${(record as { type: unknown }).type}"`,
        );
    }
  }

  finish(output: Output): void {
    const incomplete = [...this.#devices.values()]
      .filter((device) => !device.isVmstate && device.written.count < device.clusters)
      .map((device) =>
        `"${device.name}" (${
          device.clusters - device.written.count
        } of ${device.clusters} clusters missing)`
      );
    if (incomplete.length > 0 && this.#options.requireComplete !== false) {
      throw new Error(
        `Cannot finish the VMA archive: Incomplete devices: ${incomplete.join(", ")}`,
      );
    }
    if (!this.#headerWritten) this.#writeHeader(output);
    // A diskless archive still gets one (empty) extent, as `vma create` writes it.
    if (this.#slots > 0 || this.stats.extents === 0) this.#flushExtent(output);
    this.#flushSmall(output);
  }

  #beforeData(what: string): void {
    if (this.#headerWritten) {
      throw new TypeError(`Cannot add ${what}: Configs and devices must come before cluster data`);
    }
  }

  #addConfig(name: string, data: Uint8Array): void {
    validateConfig({ name, data }, new Set(this.#configs.map((config) => config.name)));
    this.#configs.push({ name, data });
  }

  #addDevice(devId: number, name: string, size: number): void {
    const names = new Set([...this.#devices.values()].map((device) => device.name));
    validateDevice({ devId, name, size }, new Set(this.#devices.keys()), names);
    const clusters = clusterCount(size);
    this.#devices.set(devId, {
      name,
      size,
      clusters,
      written: new ClusterBitmap(),
      isVmstate: name === VMSTATE_NAME,
    });
  }

  #writeHeader(output: Output): void {
    const uuid = this.#options.uuid ?? this.#identity.uuid ?? crypto.randomUUID();
    const ctime = this.#options.ctime ?? this.#identity.ctime ?? Math.floor(Date.now() / 1000);
    const devices = [...this.#devices].map(([devId, { name, size }]) => ({ devId, name, size }));
    const header = encodeHeader({ uuid, ctime, configs: this.#configs, devices });
    this.#uuidBytes = uuidToBytes(uuid);
    this.#headerWritten = true;
    if (output.kind === "pieces") {
      const decoded = {
        uuid,
        ctime,
        configs: this.#configs,
        devices,
        headerSize: header.byteLength,
      };
      this.stats.bytes += header.byteLength;
      this.#offset = header.byteLength;
      output.enqueue({ type: "header", bytes: header, header: decoded });
      return;
    }
    this.#emit(header, output);
  }

  #writeCluster(record: VmaClusterRecord, output: Output): void {
    const { devId, cluster, data } = record;
    const device = this.#claim(devId, cluster);
    if (data !== null && data.byteLength !== CLUSTER_SIZE) {
      throw new TypeError(
        `Cannot write cluster ${cluster} of device "${device.name}": Data is ${data.byteLength} bytes, not ${CLUSTER_SIZE}`,
      );
    }
    if (this.#slots === this.#slotsPerExtent) this.#flushExtent(output);
    // Blocks past the device end are never stored, whatever the mask says.
    const mask = data === null ? 0 : record.mask & validMask(device.size, cluster);
    if (mask !== 0) this.#copyBlocks(data!, mask, device.size - cluster * CLUSTER_SIZE);
    record.lease?.release();
    this.#addSlot(mask, devId, cluster);
  }

  /** A run of zero clusters: one mask-0 slot each, in a tight loop. */
  #writeZeros({ devId, cluster, count }: VmaZerosRecord, output: Output): void {
    if (!Number.isInteger(count) || count < 1) {
      throw new RangeError(
        `Cannot write zero clusters from ${cluster}: count ${count} is not positive`,
      );
    }
    for (let i = cluster; i < cluster + count; i++) {
      this.#claim(devId, i);
      if (this.#slots === this.#slotsPerExtent) this.#flushExtent(output);
      this.#addSlot(0, devId, i);
    }
  }

  /** Checks that `cluster` of `devId` may be written now, and marks it written. */
  #claim(devId: number, cluster: number): DeviceState {
    const device = this.#devices.get(devId);
    if (device === undefined) {
      throw new RangeError(`Cannot write cluster ${cluster}: Device id ${devId} was not declared`);
    }
    if (!Number.isInteger(cluster) || cluster < 0 || cluster >= device.clusters) {
      throw new RangeError(
        `Cannot write cluster ${cluster} of device "${device.name}": It is past the device end (${device.clusters} clusters)`,
      );
    }
    if (device.written.has(cluster)) {
      throw new RangeError(
        `Cannot write cluster ${cluster} of device "${device.name}": It was already written`,
      );
    }
    if (device.isVmstate && cluster !== device.written.count) {
      throw new RangeError(
        `Cannot write cluster ${cluster} of "${VMSTATE_NAME}": non sequential vmstate write`,
      );
    }
    device.written.add(cluster);
    return device;
  }

  #addSlot(mask: number, devId: number, cluster: number): void {
    const slot = ExtentOffset.blockInfo + 8 * this.#slots++;
    this.#extentView.setUint16(slot, mask);
    this.#extentView.setUint16(slot + 2, devId); // byte 2 reserved (0), byte 3 dev_id
    this.#extentView.setUint32(slot + 4, cluster);
    this.stats.clusters++;
    if (mask === 0) this.stats.zeroClusters++;
    const zero = mask === 0;
    const last = this.#runs.at(-1);
    if (
      last !== undefined && last.devId === devId && last.cluster + last.count === cluster &&
      last.zero === zero
    ) last.count++;
    else this.#runs.push({ devId, cluster, count: 1, zero });
  }

  /** Appends the masked blocks, in runs of consecutive blocks, to the extent data. */
  #copyBlocks(data: Uint8Array, mask: number, bytesLeftInDevice: number): void {
    if (this.#extentData === null) {
      const buffer = this.#extentPool.acquire();
      buffer.hold(1); // the consumer's releaseChunk() gives it back
      this.#extentBuffer = buffer;
      this.#extentData = buffer.bytes;
    }
    const target = this.#extentData;
    forEachBlockRun(mask, (first, last) => {
      const start = first * BLOCK_SIZE;
      const end = last * BLOCK_SIZE;
      const at = EXTENT_HEADER_SIZE + this.#dataLength;
      target.set(data.subarray(start, end), at);
      if (end > bytesLeftInDevice) {
        // Zero the tail of a partial last block, so no stale buffer bytes leak out.
        target.fill(0, at + bytesLeftInDevice - start, at + end - start);
      }
      this.#dataLength += end - start;
    });
    this.stats.dataBlocks += popcount16(mask);
  }

  #flushExtent(output: Output): void {
    const header = this.#extentHeader;
    const view = this.#extentView;
    view.setUint32(ExtentOffset.magic, EXTENT_MAGIC);
    view.setUint16(ExtentOffset.reserved, 0);
    view.setUint16(ExtentOffset.blockCount, this.#dataLength / BLOCK_SIZE);
    header.set(this.#uuidBytes!, ExtentOffset.uuid);
    header.fill(0, ExtentOffset.md5, ExtentOffset.md5 + 16);
    header.set(md5(header), ExtentOffset.md5);

    if (output.kind === "pieces") {
      const blockCount = this.#dataLength / BLOCK_SIZE;
      let bytes: Uint8Array;
      if (this.#extentData === null) bytes = header.slice(); // zero clusters: its header alone
      else {
        bytes = this.#extentData.subarray(0, EXTENT_HEADER_SIZE + this.#dataLength);
        bytes.set(header);
        this.#extentData = null; // handed downstream until released
      }
      const piece = { offset: this.#offset, bytes, blockCount, slotCount: this.#slots };
      output.enqueue({ type: "extent", ...piece, runs: this.#runs });
      this.#offset += bytes.byteLength;
      this.stats.bytes += bytes.byteLength;
    } else if (this.#extentData === null) {
      this.#emitSmall(header, output); // an extent of zero clusters: its header alone
    } else {
      const extent = this.#extentBuffer!.view(0, EXTENT_HEADER_SIZE + this.#dataLength);
      extent.set(header);
      this.#extentData = null; // handed downstream until released
      this.#emit(extent, output);
    }
    header.fill(0);
    this.#slots = 0;
    this.#runs = [];
    this.#dataLength = 0;
    this.stats.extents++;
  }

  #emit(bytes: Uint8Array, output: Extract<Output, { kind: "bytes" }>): void {
    this.#flushSmall(output);
    this.stats.bytes += bytes.byteLength;
    output.enqueue(bytes);
  }

  /**
   * Header-only extents (512 bytes each, thousands on a sparse disk) are batched into chunks
   * of up to 64 KiB, so a sink makes one write for many of them.
   */
  #emitSmall(bytes: Uint8Array, output: Extract<Output, { kind: "bytes" }>): void {
    if (this.#smallLength + bytes.byteLength > this.#small.byteLength) this.#flushSmall(output);
    this.#small.set(bytes, this.#smallLength);
    this.#smallLength += bytes.byteLength;
    this.stats.bytes += bytes.byteLength;
  }

  #flushSmall(output: Output): void {
    if (this.#smallLength === 0 || output.kind === "pieces") return;
    output.enqueue(this.#small.slice(0, this.#smallLength)); // the receiver keeps the copy
    this.#smallLength = 0;
  }
}
