// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The NBD export QEMU's backup job writes into: requests become VMA cluster records.
 *
 * @module
 */
import { ClusterBitmap } from "../_bitmap.ts";
import { BufferPool } from "../_pool.ts";
import type { NbdExportHandler } from "../protocols/nbd_server.ts";
import { BLOCK_SIZE, CLUSTER_SIZE, clusterCount, validMask } from "../vma/format.ts";
import type { VmaRecord } from "../vma/records.ts";
import { bufferClusters } from "../sources/_clusters.ts";
import type { RecordQueue } from "./record_queue.ts";

/** A cluster that arrived in pieces: its bytes and which 4 KiB blocks are in. */
interface PartialCluster {
  data: Uint8Array;
  blocks: number;
}

/**
 * Turns what a `blockdev-backup` job sends into records for one device: a WRITE of whole
 * clusters becomes cluster records (views of one pooled buffer, no copy); WRITE_ZEROES and
 * TRIM become zero runs. Smaller pieces (4 KiB aligned) are assembled until a cluster is
 * complete. A cluster sent twice is an error, since VMA readers reject duplicates. Each
 * request is acknowledged only after its records are queued.
 */
export class PushTarget implements NbdExportHandler {
  readonly size: number;
  #devId: number;
  #queue: RecordQueue<VmaRecord>;
  #clusters: number;
  #seen = new ClusterBitmap();
  #partial = new Map<number, PartialCluster>();
  #pool = new BufferPool(4 << 20, { maxFree: 4 });

  constructor(devId: number, size: number, queue: RecordQueue<VmaRecord>) {
    this.#devId = devId;
    this.size = size;
    this.#queue = queue;
    this.#clusters = clusterCount(size);
  }

  async write(offset: number, length: number, read: (target: Uint8Array) => Promise<void>) {
    this.#checkRange(offset, length);
    const end = offset + length;
    if (offset % CLUSTER_SIZE === 0 && (end % CLUSTER_SIZE === 0 || end === this.size)) {
      // Whole clusters: read straight into a pooled buffer (the server refuses writes larger
      // than the 4 MiB it advertises) and hand out views.
      const buffer = this.#pool.acquire();
      await read(buffer.bytes.subarray(0, length));
      const where = { devId: this.#devId, deviceSize: this.size, offset, length };
      for (const record of bufferClusters(buffer, where)) {
        this.#claim(record.cluster);
        await this.#queue.push(record);
      }
      return;
    }
    const data = new Uint8Array(length);
    await read(data);
    await this.#pieces(offset, length, data);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.#checkRange(offset, length);
    const end = offset + length;
    const firstWhole = Math.ceil(offset / CLUSTER_SIZE);
    const endWhole = end === this.size ? clusterCount(end) : Math.floor(end / CLUSTER_SIZE);
    if (firstWhole * CLUSTER_SIZE > offset || endWhole <= firstWhole) {
      // Pieces of clusters at the edges.
      const headEnd = Math.min(end, firstWhole * CLUSTER_SIZE);
      if (headEnd > offset) await this.#pieces(offset, headEnd - offset, null);
      if (endWhole <= firstWhole) return;
    }
    for (let cluster = firstWhole; cluster < endWhole; cluster++) this.#claim(cluster);
    await this.#queue.push({
      type: "zeros",
      devId: this.#devId,
      cluster: firstWhole,
      count: endWhole - firstWhole,
    });
    const tail = endWhole * CLUSTER_SIZE;
    if (tail < end) await this.#pieces(tail, end - tail, null);
  }

  /** A trim during a backup means "this range is unallocated": it reads as zeros. */
  async trim(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }

  flush(): Promise<void> {
    return Promise.resolve(); // the archive is complete only at the end anyway
  }

  /** Blocks of partly sent clusters: assembled until every block inside the device is in. */
  async #pieces(offset: number, length: number, data: Uint8Array | null): Promise<void> {
    if (offset % BLOCK_SIZE !== 0 || (length % BLOCK_SIZE !== 0 && offset + length !== this.size)) {
      throw new RangeError(`Cannot store a write at ${offset}+${length}: Not 4 KiB aligned`);
    }
    for (let at = offset; at < offset + length;) {
      const cluster = Math.floor(at / CLUSTER_SIZE);
      const clusterEnd = Math.min((cluster + 1) * CLUSTER_SIZE, offset + length);
      let partial = this.#partial.get(cluster);
      if (partial === undefined) {
        if (this.#seen.has(cluster)) throw new RangeError(`Cluster ${cluster} was sent twice`);
        partial = { data: new Uint8Array(CLUSTER_SIZE), blocks: 0 };
        this.#partial.set(cluster, partial);
      }
      for (let block = (at % CLUSTER_SIZE) / BLOCK_SIZE; at < clusterEnd; block++) {
        if (partial.blocks & (1 << block)) {
          throw new RangeError(`Cluster ${cluster} was sent twice`);
        }
        partial.blocks |= 1 << block;
        const blockEnd = Math.min(at + BLOCK_SIZE, clusterEnd);
        if (data !== null) {
          partial.data.set(data.subarray(at - offset, blockEnd - offset), at % CLUSTER_SIZE);
        }
        at = blockEnd;
      }
      const mask = validMask(this.size, cluster);
      if ((partial.blocks & mask) === mask) {
        this.#partial.delete(cluster);
        this.#claim(cluster);
        await this.#queue.push({
          type: "cluster",
          devId: this.#devId,
          cluster,
          mask,
          data: partial.data,
        });
      }
    }
  }

  #claim(cluster: number): void {
    if (cluster >= this.#clusters || !this.#seen.add(cluster) || this.#partial.has(cluster)) {
      throw new RangeError(`Cluster ${cluster} was sent twice or is past the end`);
    }
  }

  #checkRange(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`Cannot store ${offset}+${length}: Past the end (${this.size})`);
    }
  }
}
