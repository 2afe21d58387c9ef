// Copyright 2026 the vmabackup authors. MIT license.
/**
 * What a backup writes for each compression: the archive's stored bytes and its index.
 *
 * @module
 */
import type { VmaIndex, VmaIndexBase } from "../index/index_format.ts";
import { VmaIndexStream } from "../index/vma_index_stream.ts";
import { type VmaExtentPiece, VmaExtentStream, type VmaHeaderPiece } from "../vma/extent_stream.ts";
import { compressor, type WritableCompression, type ZstdEngine } from "./compression.ts";
import type { VmaRecord } from "../vma/records.ts";
import {
  VmaExtentWriterStream,
  type VmaWriterStats,
  VmaWriterStream,
} from "../vma/writer_stream.ts";
import { SeekableZstdStream } from "./seekable_zstd.ts";

/** Options of {@linkcode archiveOutput}. */
export interface ArchiveOutputOptions {
  /** How the archive is stored. */
  compression: WritableCompression;
  /** Compression level. */
  level?: number | undefined;
  /** zstd from node:zlib in Workers (default) or the system `zstd`. */
  zstd?: ZstdEngine | undefined;
  /** Whether zstd may compress on this thread (see `ZstdCompressStream`). */
  mainThread?: boolean | undefined;
  /** Build an index (default true). */
  index?: boolean | undefined;
  /** For a synthetic full backup: the base archive, recorded in the index. */
  base?: VmaIndexBase | undefined;
  /**
   * Recycle the buffers of the stages inside (default `false`): only when every output chunk
   * reaches exactly one final consumer that calls `releaseChunk` on it (no `tee()`).
   */
  reuseBuffers?: boolean | undefined;
}

/** Archive bytes in, stored bytes out, and the index once the output has ended. */
export interface ArchiveOutput extends ReadableWritablePair<Uint8Array, Uint8Array> {
  /**
   * Where the index goes: `embedded` in a seekable `.vma.zst`, a `sidecar` file beside the
   * archive (plain `.vma`, `.vma.gz`, and zstd through the system program), or `none`.
   */
  readonly indexPlace: "embedded" | "sidecar" | "none";
  /** The index, once the readable side has ended. */
  index(): VmaIndex | undefined;
}

/**
 * The stage between `VmaWriterStream` and the sink: for zstd (built in) a seekable
 * `.vma.zst` with its index and seek table inside; for the other compressions the archive
 * as it is (or compressed) with an index for a sidecar; without an index, the plain
 * compressor. The decompressed bytes are the writer's in every case.
 *
 * @example A plain archive and its sidecar index
 * ```ts
 * import assert from "node:assert/strict";
 * import { archiveOutput, VmaWriterStream } from "../../mod.ts";
 *
 * const output = archiveOutput({ compression: "none" });
 * const bytes = await new Response(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "zeros" as const, devId: 1, cluster: 0, count: 1 },
 * ]).pipeThrough(new VmaWriterStream()).pipeThrough(output)).bytes();
 * assert.equal(bytes.byteLength, 12800 + 512);
 * assert.equal(output.indexPlace, "sidecar");
 * assert.equal(output.index()?.devices[0]?.name, "drive-scsi0");
 * ```
 */
export function archiveOutput(options: ArchiveOutputOptions): ArchiveOutput {
  const { compression, level, zstd = "builtin" } = options;
  const reuseBuffers = options.reuseBuffers ?? false;
  if (options.index === false) {
    const mainThread = options.mainThread ?? true;
    const pair = compressor(compression, level, zstd, { mainThread, reuseBuffers });
    return {
      readable: pair.readable,
      writable: pair.writable,
      indexPlace: "none",
      index: () => undefined,
    };
  }
  const pieces = new VmaExtentStream({ reuseBuffers });
  const output = indexedOutput(options);
  return {
    writable: pieces.writable,
    readable: pieces.readable.pipeThrough(output),
    indexPlace: output.indexPlace,
    index: output.index,
  };
}

/** Pieces in, stored bytes out, and the index once the output has ended. */
export interface IndexedOutput
  extends ReadableWritablePair<Uint8Array, VmaHeaderPiece | VmaExtentPiece> {
  /** Inside a seekable `.vma.zst`, or in a sidecar file beside the archive. */
  readonly indexPlace: "embedded" | "sidecar";
  /** The index, once the readable side has ended. */
  index(): VmaIndex | undefined;
}

/**
 * The same as {@linkcode archiveOutput} with an index, for the pieces of
 * `VmaExtentWriterStream` (or `VmaExtentStream`): the archive needs no parsing again.
 *
 * @example A seekable archive from the writer's pieces
 * ```ts
 * import assert from "node:assert/strict";
 * import { indexedOutput, VmaExtentWriterStream } from "../../mod.ts";
 *
 * const output = indexedOutput({ compression: "zstd" });
 * const file = await new Response(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "zeros" as const, devId: 1, cluster: 0, count: 1 },
 * ]).pipeThrough(new VmaExtentWriterStream()).pipeThrough(output)).bytes();
 * assert.deepEqual(file.subarray(0, 4), Uint8Array.of(0x28, 0xb5, 0x2f, 0xfd)); // a zstd frame
 * assert.equal(output.indexPlace, "embedded");
 * assert.equal(output.index()?.runs.counts[0], 1);
 * ```
 */
export function indexedOutput(options: ArchiveOutputOptions): IndexedOutput {
  const { compression, level, zstd = "builtin" } = options;
  const base = options.base && { base: options.base };
  if (compression === "zstd" && zstd === "builtin") {
    const seekable = new SeekableZstdStream({
      ...(level !== undefined && { level }),
      ...(options.mainThread !== undefined && { mainThread: options.mainThread }),
      ...base,
      reuseBuffers: options.reuseBuffers ?? false,
    });
    return {
      writable: seekable.writable,
      readable: seekable.readable,
      indexPlace: "embedded",
      index: () => seekable.index,
    };
  }
  const indexer = new VmaIndexStream(base ?? {});
  return {
    writable: indexer.writable,
    readable: indexer.readable.pipeThrough(
      compressor(compression, level, zstd, { reuseBuffers: options.reuseBuffers ?? false }),
    ),
    indexPlace: "sidecar",
    index: () => indexer.index,
  };
}

/** An archive being written from records: its stored bytes, counters and index. */
export interface EncodedArchive {
  /** The stored bytes (compressed, with the index inside a seekable `.vma.zst`). */
  readable: ReadableStream<Uint8Array>;
  /** The writer's counters; final once `readable` has ended. */
  stats(): VmaWriterStats;
  /** Where the index goes. */
  readonly indexPlace: "embedded" | "sidecar" | "none";
  /** The index, once `readable` has ended. */
  index(): VmaIndex | undefined;
}

/**
 * Writes `records` (configs, devices, clusters, with their masks) as an archive the way
 * `backup` does: with an index, the writer hands its extents straight to the indexing
 * stage (`VmaExtentWriterStream` and {@linkcode indexedOutput}); without, `VmaWriterStream`
 * and a compressor. The writer recycles its extent buffers.
 *
 * @example A .vma.gz and its sidecar index
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeArchive } from "../../mod.ts";
 *
 * const archive = encodeArchive(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "zeros" as const, devId: 1, cluster: 0, count: 1 },
 * ]), { compression: "gzip" });
 * const bytes = await new Response(archive.readable).bytes();
 * assert.deepEqual(bytes.subarray(0, 2), Uint8Array.of(0x1f, 0x8b));
 * assert.equal(archive.indexPlace, "sidecar");
 * assert.equal(archive.stats().clusters, 1);
 * assert.equal(archive.index()?.blockCounts.length, 1);
 * ```
 */
export function encodeArchive(
  records: ReadableStream<VmaRecord>,
  options: ArchiveOutputOptions & { uuid?: string | undefined },
): EncodedArchive {
  const writerOptions = {
    ...(options.uuid && { uuid: options.uuid }),
    reuseBuffers: options.reuseBuffers ?? false, // only where the caller proved one consumer
  };
  if (options.index === false) {
    const writer = new VmaWriterStream(writerOptions);
    const output = archiveOutput(options);
    return {
      readable: records.pipeThrough(writer).pipeThrough(output),
      stats: () => writer.stats,
      indexPlace: "none",
      index: () => undefined,
    };
  }
  const writer = new VmaExtentWriterStream(writerOptions);
  const output = indexedOutput(options);
  return {
    readable: records.pipeThrough(writer).pipeThrough(output),
    stats: () => writer.stats,
    indexPlace: output.indexPlace,
    index: output.index,
  };
}
