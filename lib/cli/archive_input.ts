// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Reading an archive for a CLI command: open the file or stdin, detect and undo the
 * compression, count progress, and parse it with the strict reader.
 *
 * @module
 */
import { type Compression, decompressInput, type ZstdEngine } from "../transforms/compression.ts";
import { readEmbeddedIndex } from "../index/embedded_index.ts";
import { decodeIndex, type VmaIndex } from "../index/index_format.ts";
import { IndexedArchive, NotSeekableError } from "../access/indexed_archive.ts";
import { IndexChecker } from "../index/index_checker.ts";
import { IndexMap } from "../index/index_map.ts";
import type { SeekTable } from "../index/seek_table.ts";
import { fileRangeReader } from "../storage/range_reader.ts";
import { EXTENT_HEADER_SIZE } from "../vma/format.ts";
import type { VmaRecord } from "../vma/records.ts";
import { type VmaReaderOptions, VmaReaderStream } from "../vma/reader_stream.ts";
import { openInput } from "./files.ts";
import { SERVE_LIMITS } from "./random_access.ts";
import { openS3RangeReader, readS3Object, type StorageOptions } from "./s3_files.ts";
import { isS3Url } from "../storage/s3_config.ts";
import { S3Error } from "../storage/s3_errors.ts";
import { tapStream } from "../transforms/tap.ts";
import type { Progress } from "./progress.ts";

/** The index an archive is read with, and where it came from. */
export interface FoundIndex {
  /** The index. */
  index: VmaIndex;
  /** Inside a seekable `.vma.zst`, or a sidecar file. */
  source: "embedded" | "sidecar";
  /** The sidecar's path. */
  path?: string | undefined;
  /** The seek table of a seekable `.vma.zst`. */
  seekTable?: SeekTable | undefined;
}

/** What a read checked about the stored data, beyond the structure. */
export interface DataChecks {
  /**
   * `sha256`: every extent's data against its SHA-256 in the index (and zstd checksums);
   * `frame-checksums`: every zstd frame against its XXH64 content checksum; `structure`:
   * only the format's own checks (plain VMA has no data checksums).
   */
  level: "structure" | "frame-checksums" | "sha256";
  /** zstd frames decoded, and how many carry a checksum. */
  frames: number;
  /** zstd frames that carry a content checksum, checked as they were decoded. */
  checksummedFrames: number;
  /** Extents with data, and how many matched their SHA-256 in the index. */
  extentsWithData: number;
  /** Extents whose data matched their SHA-256 in the index. */
  digestsChecked: number;
}

/** An archive being read. */
export interface ArchiveInput {
  /** The records, from the strict reader. */
  records: ReadableStream<VmaRecord>;
  /** The reader, for its counters. */
  reader: VmaReaderStream;
  /** How the archive is stored. */
  compression: Compression;
  /** Path or `stdin`. */
  name: string;
  /** Size of the (compressed) input when it is a regular file. */
  size?: number | undefined;
  /** Bytes of (compressed) input read so far. */
  bytesRead(): number;
  /** The index the archive is checked against while it is read, if one was found. */
  index: FoundIndex | undefined;
  /** What was checked about the data; final once `records` has ended. */
  checks(): DataChecks;
}

/** Options of {@linkcode openArchive}. */
export interface OpenArchiveOptions {
  /** Options of the strict reader. */
  reader?: VmaReaderOptions;
  /** Makes the progress display once the input size is known; it counts input bytes. */
  progress?: (size: number | undefined) => Progress;
  /** zstd built in or the system program. */
  zstd?: ZstdEngine;
  /** `ignore` reads without an index (`--no-index`): a damaged one cannot stop the read. */
  index?: "auto" | "ignore";
  /** A sidecar index to use instead of `ARCHIVE.idx` (`--index FILE`; also for stdin). */
  indexPath?: string | undefined;
  /** Hash the data of a plain archive to check its sidecar's digests (a cost; for verify). */
  digestData?: boolean;
  /** How to reach S3 storage, for `s3://` archives (and sidecars). */
  storage?: StorageOptions;
}

/**
 * Opens `path` (or `-`, or `s3://BUCKET/KEY`) as a record stream; `progress`, when given, counts input bytes.
 *
 * @example Read a small archive from a file
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../mod.ts";
 * import { openArchive } from "./archive_input.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma" });
 * await Deno.writeFile(path, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0, data: null },
 * ]).pipeThrough(new VmaWriterStream()));
 * const archive = await openArchive(path, {});
 * const types = (await Array.fromAsync(archive.records)).map((record) => record.type);
 * assert.deepEqual([archive.compression, archive.bytesRead()], ["none", archive.size]);
 * assert.deepEqual(types, ["header", "device", "cluster"]);
 * await Deno.remove(path);
 * ```
 */
export async function openArchive(
  path: string,
  options: OpenArchiveOptions,
): Promise<ArchiveInput> {
  const found = options.index === "ignore"
    ? undefined
    : await findIndex(path, options.indexPath, options.storage);
  // The CLI's pipelines give every chunk and record one final consumer: buffers are reused.
  const input = await openInput(path, { ...options.storage, reuseBuffers: true });
  let read = 0;
  const progress = options.progress?.(input.size);
  const counted = input.readable.pipeThrough(
    tapStream<Uint8Array>((chunk) => {
      read += chunk.byteLength;
      progress?.add(chunk.byteLength);
    }),
  );
  const checker = found && new IndexChecker(found.index);
  const map = found && new IndexMap(found.index);
  const seekable = found?.seekTable && {
    seekTable: found.seekTable,
    expectedDigest: (_frame: number, decodedOffset: number) => {
      // A data frame starts 512 bytes into its extent; the index has its digest.
      if (found.index.digestScope !== "zstd-frame") return undefined;
      const e = map!.extentAt(decodedOffset);
      if (e < 0 || map!.extentOffsets[e]! + EXTENT_HEADER_SIZE !== decodedOffset) return undefined;
      return found.index.digests.subarray(32 * e, 32 * e + 32);
    },
    describe: (_frame: number, decodedOffset: number) => checker!.describeOffset(decodedOffset),
    framesDigest: found.index.framesDigest,
    // Reading without copying the data (verify) leaves this thread free to decode too, beside
    // a Worker per core. A restore's thread copies and writes every byte: one Worker beside it
    // was as fast as two (4.7 s against 6.0 s, median of 7 pairs on a busy machine) and 24 MiB
    // smaller (118 against 142 MiB).
    mainThread: options.reader?.skipData === true,
    ...(options.reader?.skipData !== true && { workers: 1 }),
    // A reader that skips the data needs the data frames checked, not their content.
    discardData: options.reader?.skipData === true && found.index.digestScope === "zstd-frame",
  };
  const decompressed = await decompressInput(counted, options.zstd, seekable || undefined, {
    reuseBuffers: true,
  });
  const digestData = options.digestData === true && found?.index.digestScope === "vma-data";
  const reader: VmaReaderStream = new VmaReaderStream({
    ...options.reader,
    reuseBuffers: true,
    ...(checker && {
      onExtent: (extent) => checker.extent(extent, reader.stats),
      digestData,
    }),
  });
  const records = decompressed.readable
    .pipeThrough(reader)
    .pipeThrough(new TransformStream({ flush: () => checker?.finish(reader.stats.bytes) }));
  return {
    records,
    reader,
    compression: decompressed.compression,
    name: input.name,
    size: input.size,
    bytesRead: () => read,
    index: found,
    checks(): DataChecks {
      const { frames = 0, checksummedFrames = 0 } = decompressed.frames?.() ?? {};
      const extentsWithData = checker?.extentsWithData ?? 0;
      const digestsChecked = found?.index.digestScope === "zstd-frame"
        ? (decompressed.frames?.() as { digestsChecked?: number } | undefined)?.digestsChecked ?? 0
        : checker?.digestsChecked ?? 0;
      const level = checker !== undefined && extentsWithData > 0 &&
          digestsChecked === extentsWithData
        ? "sha256"
        : frames > 0 && checksummedFrames === frames
        ? "frame-checksums"
        : "structure";
      return { level, frames, checksummedFrames, extentsWithData, digestsChecked };
    },
  };
}

/**
 * Opens the archive at `path` (a file or an `s3://` object) for random access through its
 * index, for commands that need a part of it: a seekable `.vma.zst`, or a plain `.vma` with
 * its sidecar (or mapped by a scan of its extent headers). `undefined` for stdin and for
 * archives that can only be read from the start (gzip, lzop, zstd without a seek table).
 * A damaged or foreign index is a `VmaFormatError`.
 *
 * @example A plain archive, mapped by a scan
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../mod.ts";
 * import { openRandomAccess } from "./archive_input.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma" });
 * await Deno.writeFile(path, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "zeros" as const, devId: 1, cluster: 0, count: 1 },
 * ]).pipeThrough(new VmaWriterStream()));
 * const archive = await openRandomAccess(path, {});
 * assert.equal(archive?.indexSource, "scan");
 * archive?.close();
 * assert.equal(await openRandomAccess("-", {}), undefined);
 * await Deno.remove(path);
 * ```
 */
export async function openRandomAccess(
  path: string,
  options: { indexPath?: string | undefined; storage?: StorageOptions | undefined },
): Promise<IndexedArchive | undefined> {
  if (path === "-") return undefined;
  const s3 = isS3Url(path);
  if (!s3 && !(await Deno.stat(path).catch(() => undefined))?.isFile) return undefined;
  const reader = s3 ? await openS3RangeReader(path, options.storage) : await fileRangeReader(path);
  try {
    const found = await findIndex(path, options.indexPath, options.storage);
    const index = found?.source === "sidecar" ? found.index : undefined;
    // A disk read from start to end needs no more than serving does: a larger cache, more
    // Workers or more reads in flight made `extract --stdout` slower and 40-80 MiB bigger.
    return await IndexedArchive.open(reader, {
      index,
      cacheBytes: SERVE_LIMITS.cacheBytes,
      workers: SERVE_LIMITS.workers,
      readsInFlight: SERVE_LIMITS.readsInFlight,
    });
  } catch (error) {
    reader.close();
    if (error instanceof NotSeekableError) return undefined;
    throw error;
  }
}

/**
 * The index of the archive at `path`: embedded in a seekable `.vma.zst`, or in a sidecar
 * (`indexPath`, or `PATH.idx` when it exists). A damaged index is a `VmaFormatError`;
 * `--no-index` skips this.
 */
async function findIndex(
  path: string,
  indexPath: string | undefined,
  storage: StorageOptions | undefined,
): Promise<FoundIndex | undefined> {
  if (path !== "-" && indexPath === undefined) {
    const s3 = isS3Url(path);
    const info = s3 ? undefined : await Deno.stat(path).catch(() => undefined);
    if (s3 || info?.isFile) {
      const file = s3 ? await openS3RangeReader(path, storage) : await fileRangeReader(path);
      try {
        const embedded = await readEmbeddedIndex(file);
        if (embedded?.index !== undefined) {
          return { index: embedded.index, source: "embedded", seekTable: embedded.seekTable };
        }
      } finally {
        file.close();
      }
    }
  }
  const sidecar = indexPath ?? (path === "-" ? undefined : `${path}.idx`);
  if (sidecar === undefined) return undefined;
  let bytes: Uint8Array;
  try {
    bytes = isS3Url(sidecar) ? await readS3Object(sidecar, storage) : await Deno.readFile(sidecar);
  } catch (error) {
    const missing = error instanceof Deno.errors.NotFound ||
      error instanceof S3Error && error.code === "NoSuchKey";
    if (missing && indexPath === undefined) return undefined;
    throw error;
  }
  return { index: decodeIndex(bytes), source: "sidecar", path: sidecar };
}

/**
 * A sink that drops records, giving their buffers back to the reader.
 *
 * @example Drop records, releasing their buffers
 * ```ts
 * import assert from "node:assert/strict";
 * import { discardRecords } from "./archive_input.ts";
 *
 * let released = 0;
 * const lease = { release: () => void released++ };
 * const data = new Uint8Array(65536);
 * await ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0xffff, data, lease },
 * ]).pipeTo(discardRecords());
 * assert.equal(released, 1);
 * ```
 */
export function discardRecords(): WritableStream<VmaRecord> {
  return new WritableStream({
    write(record) {
      if (record.type === "cluster") record.lease?.release();
    },
  });
}
