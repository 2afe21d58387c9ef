// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The NBD export QEMU's backup job writes into: requests become VMA cluster records.
 *
 * @module
 */
import { ClusterBitmap } from "../_bitmap.ts";
import { BufferPool } from "../_pool.ts";
import type { NbdExportHandler } from "../protocols/nbd_server.ts";
import { CLUSTER_SIZE, clusterCount, validMask } from "../vma/format.ts";
import type { VmaRecord } from "../vma/records.ts";
import { bufferClusters } from "../sources/_clusters.ts";
import type { RecordQueue } from "./record_queue.ts";

/** A cluster that arrived in pieces: its bytes and which 512-byte sectors are in. */
interface PartialCluster {
  data: Uint8Array;
  sectors: Uint8Array;
  filled: number;
}

const SECTOR = 512;
const SECTORS = CLUSTER_SIZE / SECTOR;
/** Buffer sizes for whole-cluster writes: 64 KiB, 128 KiB, ... 4 MiB (the largest write). */
const SIZE_CLASSES = [0, 1, 2, 3, 4, 5, 6].map((shift) => CLUSTER_SIZE << shift);

/**
 * Turns what a `blockdev-backup` job sends into records for one device: a WRITE of whole
 * clusters becomes cluster records (views of one pooled buffer, no copy); WRITE_ZEROES and
 * TRIM become zero runs. The buffer is the smallest of 64 KiB, 128 KiB, ... 4 MiB that
 * holds the write, so the 64 KiB writes of copy-before-write pin 64 KiB each while they
 * wait in the queue, not 4 MiB. Each class keeps as many free buffers as the queue holds
 * clusters' worth, plus two. Smaller pieces (512-byte aligned) are assembled until a cluster is
 * complete. A cluster sent twice is an error, since VMA readers reject duplicates. Each
 * request is acknowledged only after its records are queued.
 *
 * @example One written cluster, two zeroed ones
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VmaRecord } from "../vma/records.ts";
 * import { PushTarget } from "./push_target.ts";
 * import { RecordQueue } from "./record_queue.ts";
 *
 * const queue = new RecordQueue<VmaRecord>(16);
 * const target = new PushTarget(1, 3 * 65536, queue);
 * await target.write(0, 65536, (into) => Promise.resolve(void into.fill(7)));
 * await target.writeZeroes(65536, 2 * 65536);
 * await assert.rejects(target.writeZeroes(0, 65536), /sent twice/);
 * queue.close();
 * const records = await Array.fromAsync(queue.readable);
 * assert.deepEqual(records.map((record) => record.type), ["cluster", "zeros"]);
 * ```
 */
export class PushTarget implements NbdExportHandler {
  readonly size: number;
  #devId: number;
  #queue: RecordQueue<VmaRecord>;
  #clusters: number;
  #seen = new ClusterBitmap();
  #partial = new Map<number, PartialCluster>();
  #pools: BufferPool[];

  constructor(devId: number, size: number, queue: RecordQueue<VmaRecord>) {
    this.#devId = devId;
    this.size = size;
    this.#queue = queue;
    this.#clusters = clusterCount(size);
    // Enough free buffers of a class for what the queue can hold, and two more for the stages
    // after it: buffers that do not fit the free list become garbage, and garbage buffers
    // stay resident until V8 collects them (1 MiB writes: 122 MiB peak RSS with 2 free, 101
    // MiB with 6, in a 512 MiB push backup).
    const queued = queue.capacity * CLUSTER_SIZE;
    this.#pools = SIZE_CLASSES.map((size) =>
      new BufferPool(size, { maxFree: Math.ceil(queued / size) + 2 })
    );
  }

  async write(offset: number, length: number, read: (target: Uint8Array) => Promise<void>) {
    this.#checkRange(offset, length);
    const end = offset + length;
    if (offset % CLUSTER_SIZE === 0 && (end % CLUSTER_SIZE === 0 || end === this.size)) {
      // Whole clusters: read straight into a pooled buffer of the write's size class (the
      // server refuses writes larger than the 4 MiB it advertises) and hand out views.
      const pool = this.#pools.find((candidate) => candidate.size >= length) ??
        this.#pools.at(-1)!;
      const buffer = pool.acquire();
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
    if (endWhole <= firstWhole) return await this.#pieces(offset, length, null); // no whole cluster
    const head = firstWhole * CLUSTER_SIZE;
    if (head > offset) await this.#pieces(offset, head - offset, null);
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

  /**
   * Pieces of clusters (512-byte aligned, as the server advertises): assembled until every
   * sector of the cluster inside the device is in.
   */
  async #pieces(offset: number, length: number, data: Uint8Array | null): Promise<void> {
    if (offset % SECTOR !== 0 || (length % SECTOR !== 0 && offset + length !== this.size)) {
      throw new RangeError(`Cannot store a write at ${offset}+${length}: Not 512-byte aligned`);
    }
    for (let at = offset; at < offset + length;) {
      const cluster = Math.floor(at / CLUSTER_SIZE);
      const base = cluster * CLUSTER_SIZE;
      const clusterEnd = Math.min(base + CLUSTER_SIZE, offset + length);
      let partial = this.#partial.get(cluster);
      if (partial === undefined) {
        if (this.#seen.has(cluster)) throw new RangeError(`Cluster ${cluster} was sent twice`);
        partial = {
          data: new Uint8Array(CLUSTER_SIZE),
          sectors: new Uint8Array(SECTORS),
          filled: 0,
        };
        this.#partial.set(cluster, partial);
      }
      for (; at < clusterEnd; at += SECTOR) {
        const sector = (at - base) / SECTOR;
        if (partial.sectors[sector]) throw new RangeError(`Cluster ${cluster} was sent twice`);
        partial.sectors[sector] = 1;
        partial.filled++;
      }
      if (data !== null) {
        const from = Math.max(offset, base);
        partial.data.set(data.subarray(from - offset, clusterEnd - offset), from - base);
      }
      const inside = Math.ceil(Math.min(CLUSTER_SIZE, this.size - base) / SECTOR);
      if (partial.filled === inside) {
        this.#partial.delete(cluster);
        this.#claim(cluster);
        const mask = validMask(this.size, cluster);
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
