// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Opening an archive file for random reads, for the commands that serve its disks: the
 * index inside a seekable `.vma.zst`, a sidecar `ARCHIVE.idx` (or `--index FILE`), or for
 * a plain `.vma` a map built by scanning its extent headers.
 *
 * @module
 */
import { IndexedArchive, type IndexedArchiveOptions } from "../access/indexed_archive.ts";
import { fileRangeReader } from "../storage/range_reader.ts";
import { UsageError } from "./errors.ts";

/**
 * What bounds the memory of a process that reads an archive at random (`serve`, `restore
 * --live`, `extract --disk` and `--stdout` of an indexed archive;
 * README "Serving an archive"): 3 decoded extents of about 3.8 MB kept, one zstd decoding
 * thread with two extents in flight, and at most 16 clients holding at most 512 KiB of
 * replies each.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { SERVE_LIMITS } from "./random_access.ts";
 *
 * assert.equal(SERVE_LIMITS.cacheBytes, 12 << 20);
 * ```
 */
export const SERVE_LIMITS = {
  cacheBytes: 12 << 20,
  workers: 1,
  readsInFlight: 2,
  maxConnections: 16,
  maxRead: 512 << 10,
  maxInFlightBytes: 512 << 10,
} as const;

/** Options of {@linkcode openIndexedArchive}. */
export interface OpenIndexedOptions {
  /** The sidecar index (`--index FILE`); default `ARCHIVE.idx` when it exists. */
  indexPath?: string | undefined;
}

/**
 * Opens `path` for random reads, within {@linkcode SERVE_LIMITS}. A `.vma.zst` without a seek table (from the `zstd` CLI, or
 * written before the index existed), gzip or lzop is a `NotSeekableError` that says to run
 * `convert` (exit code 9); stdin is a usage error.
 *
 * @example A plain archive without a sidecar is mapped by a scan
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../mod.ts";
 * import { openIndexedArchive } from "./random_access.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma" });
 * await Deno.writeFile(path, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 1, data: new Uint8Array(65536).fill(9) },
 * ]).pipeThrough(new VmaWriterStream()));
 * const archive = await openIndexedArchive(path);
 * assert.equal(archive.indexSource, "scan");
 * assert.equal((await archive.read(1, 4095, 2))[0], 9);
 * archive.close();
 * await Deno.remove(path);
 * ```
 */
export async function openIndexedArchive(
  path: string,
  options: OpenIndexedOptions = {},
): Promise<IndexedArchive> {
  if (path === "-") {
    throw new UsageError("a disk can only be served from a file, not from stdin");
  }
  const sidecar = await readSidecar(path, options.indexPath);
  const reader = await fileRangeReader(path);
  const archiveOptions: IndexedArchiveOptions = {
    sidecar,
    cacheBytes: SERVE_LIMITS.cacheBytes,
    workers: SERVE_LIMITS.workers,
    readsInFlight: SERVE_LIMITS.readsInFlight,
    trustFrameChecksums: true, // every byte is still checked, by zstd's own checksum
  };
  try {
    return await IndexedArchive.open(reader, archiveOptions);
  } catch (error) {
    reader.close();
    throw error;
  }
}

async function readSidecar(
  path: string,
  indexPath: string | undefined,
): Promise<Uint8Array | undefined> {
  try {
    return await Deno.readFile(indexPath ?? `${path}.idx`);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound && indexPath === undefined) return undefined;
    throw error;
  }
}
