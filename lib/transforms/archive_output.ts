// Copyright 2026 the vmabackup authors. MIT license.
/**
 * What a backup writes for each compression: the archive's stored bytes and its index.
 *
 * @module
 */
import type { VmaIndex, VmaIndexBase } from "../index/index_format.ts";
import { VmaIndexStream } from "../index/vma_index_stream.ts";
import { VmaExtentStream } from "../vma/extent_stream.ts";
import { compressor, type WritableCompression, type ZstdEngine } from "./compression.ts";
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
  const base = options.base && { base: options.base };
  const pieces = new VmaExtentStream({ reuseBuffers });
  if (compression === "zstd" && zstd === "builtin") {
    const seekable = new SeekableZstdStream({
      ...(level !== undefined && { level }),
      ...(options.mainThread !== undefined && { mainThread: options.mainThread }),
      ...base,
      reuseBuffers,
    });
    return {
      writable: pieces.writable,
      readable: pieces.readable.pipeThrough(seekable),
      indexPlace: "embedded",
      index: () => seekable.index,
    };
  }
  const indexer = new VmaIndexStream(base ?? {});
  return {
    writable: pieces.writable,
    readable: pieces.readable.pipeThrough(indexer).pipeThrough(
      compressor(compression, level, zstd, { reuseBuffers }),
    ),
    indexPlace: "sidecar",
    index: () => indexer.index,
  };
}
