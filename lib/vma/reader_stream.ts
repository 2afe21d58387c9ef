// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The strict, streaming VMA reader: archive bytes in, typed records out.
 *
 * @module
 */
import { ArchiveParser, type VmaReaderStats } from "./_archive_parser.ts";
import type { VmaDeviceRecord, VmaRecord } from "./records.ts";

import type { VmaExtentInfo } from "./_archive_parser.ts";

export type { VmaExtentInfo, VmaReaderDeviceStats, VmaReaderStats } from "./_archive_parser.ts";

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
  /** Called for every extent once it passed every check: what verify compares with an index. */
  onExtent?: ((extent: VmaExtentInfo) => void) | undefined;
  /**
   * Give `onExtent` the SHA-256 of each extent's data blocks, hashed as they stream by,
   * without a copy (default false).
   */
  digestData?: boolean | undefined;
  /**
   * Recycle the extent buffers behind cluster data (default `false`). Only for a pipeline in
   * which every cluster record reaches exactly one final consumer that releases it (its
   * `lease`, or `releaseChunk` on the data passed on as bytes), and no `tee()`. Off, every
   * extent's data are a fresh buffer that belongs to the records' receiver.
   */
  reuseBuffers?: boolean | undefined;
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
    let output: { kind: "records"; enqueue(record: VmaRecord): void };
    super({
      start: (controller) => {
        output = { kind: "records", enqueue: (record) => controller.enqueue(record) };
      },
      transform: (chunk) => parser.push(chunk, output),
      flush: () => parser.end(),
    });
    this.#parser = parser;
  }

  /** Counters so far; complete once the stream has flushed. */
  get stats(): VmaReaderStats {
    const stats = this.#parser.stats;
    return { ...stats, devices: stats.devices.map((device) => ({ ...device })) };
  }
}
