// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `backup --base`: the previous archive of an incremental backup, opened for random access.
 *
 * @module
 */
import { IndexedArchive, NotSeekableError } from "../access/indexed_archive.ts";
import { checkpointName } from "../live/checkpoints.ts";
import { fileRangeReader, type RangeReader } from "../storage/range_reader.ts";
import { isS3Url } from "../storage/s3_config.ts";
import { S3Error } from "../storage/s3_errors.ts";
import { VmaFormatError } from "../vma/errors.ts";
import { openS3RangeReader, readS3Object, type StorageOptions } from "./s3_files.ts";

/** The base of an incremental backup. */
export interface BaseArchive {
  /** The archive, open for random reads; its index digests and header were checked. */
  archive: IndexedArchive;
  /** As given to `--base`. */
  path: string;
  /** Its checkpoint: `vmabackup-<its UUID>`. */
  checkpoint: string;
  /** Incremental backups since the last full one, the base included (0: it is a full). */
  depth: number;
}

/**
 * Opens `path` (a file or `s3://BUCKET/KEY`) as the base of an incremental backup: a
 * seekable `.vma.zst` with its embedded index, or a plain `.vma` with its sidecar
 * `PATH.idx`. Resolves to `{ problem }` when it cannot serve as a base (a damaged index,
 * no index, not seekable): the backup is then a full one, and the problem says why. A base
 * that cannot be read at all (missing, no permission) throws.
 *
 * @example A plain archive without its sidecar is no base
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../mod.ts";
 * import { openBaseArchive } from "./base_archive.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma" });
 * await Deno.writeFile(path, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "zeros" as const, devId: 1, cluster: 0, count: 1 },
 * ]).pipeThrough(new VmaWriterStream()));
 * const opened = await openBaseArchive(path);
 * assert.ok("problem" in opened && /has no index/.test(opened.problem));
 * await Deno.remove(path);
 * await assert.rejects(openBaseArchive(path), Deno.errors.NotFound);
 * ```
 */
export async function openBaseArchive(
  path: string,
  storage: StorageOptions = {},
): Promise<{ base: BaseArchive } | { problem: string }> {
  const s3 = isS3Url(path);
  const reader: RangeReader = s3
    ? await openS3RangeReader(path, storage)
    : await fileRangeReader(path);
  let sidecar: Uint8Array | undefined;
  try {
    sidecar = await readSidecar(`${path}.idx`, s3, storage);
  } catch (error) {
    reader.close();
    throw error;
  }
  let archive: IndexedArchive;
  try {
    // Each extent is decoded once, a few ahead: a small cache, and one decoding thread
    // beside the compressing ones.
    archive = await IndexedArchive.open(reader, { sidecar, cacheBytes: 16 << 20, workers: 1 });
  } catch (error) {
    reader.close();
    if (
      error instanceof VmaFormatError || error instanceof NotSeekableError ||
      error instanceof Deno.errors.UnexpectedEof
    ) {
      return { problem: `the base archive ${path} cannot be used: ${error.message}` };
    }
    throw error;
  }
  if (archive.indexSource === "scan") {
    archive.close();
    return {
      problem:
        `the base archive ${path} has no index (a plain .vma needs its sidecar ${path}.idx: run 'cli.ts index')`,
    };
  }
  const depth = archive.index.base === undefined ? 0 : (archive.index.base.depth ?? 1);
  return {
    base: { archive, path, checkpoint: checkpointName(archive.index.uuid), depth },
  };
}

/** The sidecar index at `path`, or `undefined` when there is none. */
async function readSidecar(
  path: string,
  s3: boolean,
  storage: StorageOptions,
): Promise<Uint8Array | undefined> {
  try {
    return s3 ? await readS3Object(path, storage) : await Deno.readFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    if (error instanceof S3Error && error.code === "NoSuchKey") return undefined;
    throw error;
  }
}
