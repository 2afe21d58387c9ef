// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Archive bytes in, the archive's stored structure out: its header, then each extent whole.
 *
 * @module
 */
import type { VmaDeviceRecord } from "./records.ts";
import {
  ArchiveParser,
  type ParserOutput,
  type VmaExtentPiece,
  type VmaHeaderPiece,
  type VmaReaderStats,
} from "./_archive_parser.ts";

export type { VmaExtentPiece, VmaExtentSlot, VmaHeaderPiece } from "./_archive_parser.ts";

/** Options of {@linkcode VmaExtentStream}. */
export interface VmaExtentStreamOptions {
  /** Which devices must be complete at the end (default all), as for `VmaReaderStream`. */
  requireComplete?: boolean | ((device: VmaDeviceRecord) => boolean);
  /**
   * Recycle the capture buffers of the pieces (default `false`); only for a pipeline in
   * which every piece reaches exactly one final consumer that calls `releaseChunk` on it.
   */
  reuseBuffers?: boolean;
}

/**
 * Parses a VMA archive with every check of `VmaReaderStream`, but hands on the archive as
 * it is stored: a `header` piece, then one `extent` piece per extent with its bytes
 * (header and data, contiguous) and its used slots as runs of clusters. That is what an index, a seekable
 * compressor or a copy needs. An extent that arrives as one chunk of exactly its size (as
 * `VmaWriterStream` emits them) is passed on without a copy; otherwise it is assembled in a
 * recycled buffer. The receiver gives each extent's bytes back with `releaseChunk`.
 *
 * @example The pieces of a two-cluster archive
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaExtentStream, VmaWriterStream } from "../../mod.ts";
 *
 * const pieces = await Array.fromAsync(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 2 * 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 1, mask: 0b11, data: new Uint8Array(65536).fill(9) },
 *   { type: "zeros" as const, devId: 1, cluster: 0, count: 1 },
 * ]).pipeThrough(new VmaWriterStream()).pipeThrough(new VmaExtentStream()));
 * assert.equal(pieces[0]?.type === "header" && pieces[0].header.devices[0]?.name, "drive-scsi0");
 * const extent = pieces[1]!;
 * assert.ok(extent.type === "extent");
 * assert.equal(extent.bytes.byteLength, 512 + 2 * 4096);
 * assert.deepEqual(extent.runs.map((run) => [run.cluster, run.count, run.zero]), [[1, 1, false], [0, 1, true]]);
 * ```
 */
export class VmaExtentStream extends TransformStream<Uint8Array, VmaHeaderPiece | VmaExtentPiece> {
  #parser: ArchiveParser;

  /** An extent stream for one archive. */
  constructor(options: VmaExtentStreamOptions = {}) {
    const parser = new ArchiveParser({
      ...(options.requireComplete !== undefined && { requireComplete: options.requireComplete }),
      reuseBuffers: options.reuseBuffers ?? false,
    });
    let output: ParserOutput;
    super({
      start: (controller) => {
        output = { kind: "pieces", enqueue: (piece) => controller.enqueue(piece) };
      },
      transform: (chunk) => parser.push(chunk, output),
      flush: () => parser.end(),
    });
    this.#parser = parser;
  }

  /** Counters so far, as `VmaReaderStream` keeps them; complete once the stream has flushed. */
  get stats(): VmaReaderStats {
    const stats = this.#parser.stats;
    return { ...stats, devices: stats.devices.map((device) => ({ ...device })) };
  }
}
