// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `backup`: disks and configs into one VMA archive, compressed or not, to a file or stdout.
 *
 * @module
 */
import { checkArchiveLimits, type LiveDrive } from "../../live/drives.ts";
import { startPullBackup } from "../../live/pull_backup.ts";
import { startPushBackup } from "../../live/push_backup.ts";
import type { LiveBackup } from "../../live/session.ts";
import { QmpClient } from "../../protocols/qmp_client.ts";
import { combineRecordStreams } from "../../sources/combine.ts";
import { imageDiskSource } from "../../sources/image_disk.ts";
import { nbdDiskSource } from "../../sources/nbd_disk.ts";
import { encodeArchive, type EncodedArchive } from "../../transforms/archive_output.ts";
import { type EncodedSyntheticFull, encodeSyntheticFull } from "../../access/synthetic_full.ts";
import type { VmaWriterStats } from "../../vma/writer_stream.ts";
import { type WritableCompression, type ZstdEngine } from "../../transforms/compression.ts";
import { encodeIndex, type VmaIndex } from "../../index/index_format.ts";
import { ZeroFilterStream } from "../../transforms/zero_filter.ts";
import { CLUSTER_SIZE, configName, MAX_BLOB_SIZE } from "../../vma/format.ts";
import { checkHeaderLimits } from "../../vma/header.ts";
import type { VmaRecord } from "../../vma/records.ts";
import {
  type Command,
  jsonLine,
  parseCommandArgs,
  printHelp,
  progressMode,
  ZSTD_HELP,
  zstdEngine,
} from "../command.ts";
import { type CliContext, formatBytes, formatRate, writeText } from "../context.ts";
import { UsageError } from "../errors.ts";
import { isDeviceFileLike } from "../file_names.ts";
import { commitOutputs, openOutput } from "../files.ts";
import { type BaseArchive, openBaseArchive } from "../base_archive.ts";
import { checkpointName } from "../../live/checkpoints.ts";
import { planImageCheckpoints } from "../image_checkpoints.ts";
import { S3_HELP, S3_OPTIONS, type StorageOptions, storageOptions } from "../s3_files.ts";
import { Progress } from "../progress.ts";
import { tapStream } from "../../transforms/tap.ts";

const HELP = `Back up disks, or the drives of a running VM, into a VMA archive.

usage: cli.ts backup --disk [NAME=]PATH [--disk ...] [--config FILE]... -o OUT|-
                     [--compress zstd|gzip|none] [--level N] [--force]
                     [--base PREVIOUS] [--checkpoint] [--no-checkpoint] [--full-every N]
                     [--progress auto|json|none] [--json]
       cli.ts backup --qmp SOCKET [--drive ID]... [--mode push|pull] [--config FILE]...
                     -o OUT|- [--base PREVIOUS] [--no-checkpoint] [--full-every N]
                     [--speed BYTES] [--fleece-dir DIR] [--discard-read]
                     [--cbw-timeout SECONDS] [...]

  --disk [NAME=]PATH   a disk: an image file of any format QEMU reads (raw, qcow2, vmdk,
                       vdi, vhdx, vpc, qed; recognised by its magic bytes), a block device,
                       or an NBD URI (nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT).
                       NAME is the Proxmox device name (drive-scsi0, drive-efidisk0, ...); a
                       bare name such as scsi0 gets the drive- prefix. Without NAME: the
                       first free of drive-scsi0, drive-scsi1, ...
  --config FILE        a config file to store (qemu-server.conf, qemu-server.fw); repeatable.
                       Names like disk files (disk-..., vmstate.bin) are refused
  -o, --output OUT     the archive; '-' writes to stdout (not to a terminal); s3://BUCKET/KEY
                       uploads it (a multipart upload: the key appears only once complete).
                       A file is written to OUT.partial, flushed to disk, then renamed to OUT
  --compress C         zstd, gzip or none; by default from OUT: .vma.zst, .vma.gz, .vma
                       (any other extension is an error without --compress)
  --level N            compression level (zstd -7..19, default 3; gzip 1..9)
${ZSTD_HELP}
  --no-index           write no archive index (see "Archive index" in the README)
  --index FILE         where the sidecar index of a .vma or .vma.gz goes (default OUT.idx;
                       with -o - none unless given). A .vma.zst carries its index inside
  --force              replace an existing OUT (and its sidecar index), in one atomic rename
  --s3-part-size SIZE  bytes per part of an S3 upload, 5M..5G (default 5M, more when the
                       disks need it to stay within 10,000 parts); memory holds 3 parts
${S3_HELP}
  --progress MODE      auto (a bar when stderr is a terminal), json (JSON lines), none
  --json               print a JSON result object instead of the summary line

Live backup of a running QEMU VM (the archive holds the disks as of the moment it starts,
while the VM keeps running and writing):
  --qmp SOCKET         a QMP monitor socket of the VM, for this tool only
                       (start QEMU with an extra -qmp unix:SOCKET,server=on,wait=off)
  --drive ID           a drive to back up: BlockBackend name, device id or node name;
                       default every writable drive. Archive names are drive-<id>
  --mode push          (default) QEMU's backup job copies each cluster once into an NBD
                       server of this tool: one read and two writes, no temporary image
  --mode pull          fleecing: a copy-before-write filter keeps the old data of clusters
                       the guest overwrites in a fleece image, read over NBD
  --speed BYTES        rate limit of QEMU's copy in push mode (bytes per second)
  --fleece-dir DIR     where pull mode keeps the fleece images: the old data of clusters the
                       guest overwrites during the backup, up to the drives' size (default
                       a new directory in /var/tmp, on disk: /tmp is often a small tmpfs);
                       removed afterwards
  --discard-read       pull mode: discard fleece data once archived, so the image stays small
  --cbw-timeout SECONDS  pull mode: how long a guest write may wait for its old data to be
                       copied before the snapshot breaks (the write then goes on, the backup
                       fails; default 30)

Incremental backups (each archive is still complete on its own; see the README):
  --base PREVIOUS      read from the VM (or the qcow2 images) only the clusters written
                       since PREVIOUS was made (a seekable .vma.zst, or a .vma with its
                       PREVIOUS.idx; a file or s3://) and take every other cluster from
                       PREVIOUS. When the checkpoint cannot be trusted, a full backup, with
                       one line saying why
  --no-checkpoint      add no checkpoint: the next backup cannot be an incremental of this
                       one, and the previous checkpoint is kept. By default each live backup
                       adds checkpoint vmabackup-<UUID> at its snapshot point and, once the
                       archive is complete, removes the previous one
  --checkpoint         --disk backups: add checkpoint vmabackup-<UUID>, a persistent dirty
                       bitmap, to each qcow2 image (qemu-img bitmap; the image must not be
                       in use), for a later --base. Implied by --base
  --full-every N       a full backup when the base is the full or incremental backup N-1 of
                       its chain (a qcow2 snapshot revert does not update checkpoints)

permissions: --allow-read (disks, configs) --allow-write (OUT); add --allow-ffi to skip the
holes of sparse raw images without reading them (SEEK_DATA through libc). Non-raw images
also need --allow-run=qemu-nbd and --allow-net (qemu-nbd serves them on a private socket);
NBD URIs need --allow-net. Checkpoints of --disk images need --allow-run=qemu-img and
--allow-write of the images. A live backup needs --allow-net (the QMP and NBD sockets).
An s3:// OUT needs --allow-net=HOST and --allow-env (credentials), and --allow-read of
~/.aws/credentials for a profile

example: deno run --allow-read --allow-write cli.ts backup \\
           --disk drive-scsi0=vm-100-disk-0.raw --config qemu-server.conf -o vm-100.vma.zst`;

/** A `--disk` value: `NAME=PATH` or `PATH`. */
export interface DiskSpec {
  name: string;
  path: string;
}

/**
 * Parses the `--disk` values. Unnamed disks get the first free names of drive-scsi0,
 * drive-scsi1, ..., skipping names given to other disks.
 *
 * @example Named and unnamed disks
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseDiskSpecs } from "./backup.ts";
 *
 * assert.deepEqual(parseDiskSpecs(["efidisk0=/dev/vg/efi", "vm-100-disk-0.raw", "scsi0=b.raw"]), [
 *   { name: "drive-efidisk0", path: "/dev/vg/efi" },
 *   { name: "drive-scsi1", path: "vm-100-disk-0.raw" },
 *   { name: "drive-scsi0", path: "b.raw" },
 * ]);
 * assert.throws(() => parseDiskSpecs(["scsi0=a.raw", "scsi0=b.raw"]), /drive-scsi0 is used twice/);
 * ```
 */
export function parseDiskSpecs(values: string[]): DiskSpec[] {
  const parsed = values.map((value) => {
    const equals = value.indexOf("=");
    const looksNamed = equals > 0 && !value.slice(0, equals).includes("/");
    const path = looksNamed ? value.slice(equals + 1) : value;
    if (path === "") throw new UsageError(`--disk ${value}: the path is missing`);
    if (!looksNamed) return { name: undefined, path };
    const name = value.slice(0, equals);
    return { name: name.startsWith("drive-") ? name : `drive-${name}`, path };
  });
  const names = new Set<string>();
  for (const { name } of parsed) {
    if (name === undefined) continue;
    if (names.has(name)) throw new UsageError(`--disk: the name ${name} is used twice`);
    names.add(name);
  }
  let next = 0;
  return parsed.map(({ name, path }) => {
    if (name !== undefined) return { name, path };
    while (names.has(`drive-scsi${next}`)) next++;
    names.add(`drive-scsi${next}`);
    return { name: `drive-scsi${next}`, path };
  });
}

/**
 * The compression an archive's file name says, by its extension: `.vma` none, `.zst` or
 * `.zstd` zstd, `.gz` or `.gzip` gzip. `lzop` for `.lzo` (read, never written); `undefined`
 * for any other name.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { compressionOfName } from "./backup.ts";
 *
 * assert.equal(compressionOfName("vzdump-qemu-100.vma.zst"), "zstd");
 * assert.equal(compressionOfName("BACKUP.VMA"), "none");
 * assert.equal(compressionOfName("x.vma.lzo"), "lzop");
 * assert.equal(compressionOfName("x.img"), undefined);
 * ```
 */
export function compressionOfName(path: string): WritableCompression | "lzop" | undefined {
  if (/\.(zst|zstd)$/i.test(path)) return "zstd";
  if (/\.(gz|gzip)$/i.test(path)) return "gzip";
  if (/\.lzo$/i.test(path)) return "lzop";
  if (/\.vma$/i.test(path)) return "none";
  return undefined;
}

/**
 * Reads the `--compress` and `--level` values for an output path. Without `--compress` the
 * compression comes from OUT's extension, and any other extension is an error rather than a
 * silently uncompressed archive; `--compress` must agree with a known extension.
 *
 * @example From the file name, or given
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseCompression } from "./backup.ts";
 *
 * const zstd = parseCompression("vm.vma.zst", undefined, "5");
 * assert.deepEqual(zstd, { compression: "zstd", level: 5 });
 * assert.equal(parseCompression("-", "gzip", undefined).compression, "gzip");
 * assert.equal(parseCompression("-", undefined, undefined).compression, "none");
 * assert.throws(() => parseCompression("vm.vma.gz", undefined, "12"), /within 1\.\.9 for gzip/);
 * assert.throws(() => parseCompression("vm.vma", undefined, "50"), /--level needs --compress/);
 * assert.throws(() => parseCompression("vm.img", undefined, undefined), { exitCode: 2 });
 * assert.throws(() => parseCompression("vm.vma.lzo", undefined, undefined), /lzop/);
 * assert.throws(() => parseCompression("vm.vma.gz", "zstd", undefined), /does not match/);
 * ```
 */
export function parseCompression(
  output: string,
  compress: string | undefined,
  level: string | undefined,
): { compression: WritableCompression; level: number | undefined } {
  const named = output === "-" ? undefined : compressionOfName(output);
  if (named === "lzop") {
    throw new UsageError(
      `-o ${output}: lzop archives are read but not written; name it .vma.zst, .vma.gz or .vma`,
    );
  }
  if (compress === undefined && named === undefined && output !== "-") {
    throw new UsageError(
      `-o ${output}: unknown extension; name the archive .vma.zst, .vma.gz or .vma, or give --compress`,
    );
  }
  const compression = compress ?? named ?? "none";
  if (compression !== "zstd" && compression !== "gzip" && compression !== "none") {
    throw new UsageError(`--compress must be zstd, gzip or none, not '${compression}'`);
  }
  if (named !== undefined && named !== compression) {
    throw new UsageError(`--compress ${compression} does not match the name ${output}`);
  }
  if (level === undefined) return { compression, level: undefined };
  if (compression === "none") throw new UsageError("--level needs --compress zstd or gzip");
  const parsed = Number(level);
  const range = compression === "gzip" ? [1, 9] : [-7, 19];
  if (!Number.isInteger(parsed) || parsed < range[0]! || parsed > range[1]!) {
    throw new UsageError(
      `--level must be an integer within ${range[0]}..${range[1]} for ${compression}`,
    );
  }
  return { compression, level: parsed };
}

/**
 * Reads config files whole; the writer rejects one that is too big for the archive header.
 *
 * @example Names are the paths as given
 * ```ts
 * import assert from "node:assert/strict";
 * import { readConfigs } from "./backup.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".conf" });
 * await Deno.writeTextFile(path, "cores: 2\n");
 * const [config] = await readConfigs([path]);
 * assert.equal(config!.name, path); // the writer keeps only the file name
 * assert.equal(new TextDecoder().decode(config!.data), "cores: 2\n");
 * await Deno.remove(path);
 * ```
 */
export async function readConfigs(paths: string[]): Promise<{ name: string; data: Uint8Array }[]> {
  return await Promise.all(paths.map(async (path) => {
    const { size } = await Deno.stat(path);
    if (size > MAX_BLOB_SIZE) { // not read at all: it cannot be stored
      throw new UsageError(
        `--config ${path}: ${size} bytes is too big for an archive header (at most ${MAX_BLOB_SIZE})`,
      );
    }
    return { name: path, data: await Deno.readFile(path) };
  }));
}

/**
 * Refuses, before any output is opened, configs and disks that one archive cannot hold (see
 * `checkHeaderLimits`: 254 disks, 256 configs of 1 to 65535 bytes, a 512 KiB header), and
 * config names that `extract` would have to rename (`disk-...`, `vmstate.bin`; see
 * `isDeviceFileLike`). A usage error (exit code 2).
 *
 * @example A config that would pass for a disk image
 * ```ts
 * import assert from "node:assert/strict";
 * import { checkArchiveContents } from "./backup.ts";
 *
 * const data = new TextEncoder().encode("cores: 1\n");
 * checkArchiveContents([{ name: "/etc/pve/qemu-server/100.conf", data }], ["drive-scsi0"]);
 * assert.throws(
 *   () => checkArchiveContents([{ name: "disk-drive-scsi0.raw", data }], ["drive-scsi0"]),
 *   { exitCode: 2, message: /could be taken for a disk image/ },
 * );
 * ```
 */
export function checkArchiveContents(
  configs: { name: string; data: Uint8Array }[],
  diskNames: string[],
): void {
  const stored = configs.map((config) => ({ name: configName(config.name), data: config.data }));
  for (const { name } of stored) {
    if (isDeviceFileLike(name)) {
      throw new UsageError(
        `--config ${name}: the name could be taken for a disk image when extracted; rename the file`,
      );
    }
  }
  try {
    checkHeaderLimits(stored, diskNames);
  } catch (error) {
    if (!(error instanceof RangeError || error instanceof TypeError)) throw error;
    throw new UsageError(error.message);
  }
}

/** Checkpoint hooks of a backup: a dirty bitmap that the next incremental starts from. */
export interface BackupCheckpoint {
  /** Its name, `vmabackup-<archive UUID>`. */
  name: string;
  /**
   * Once the archive is durable: keep the new checkpoint, remove the previous ones;
   * resolves to notes on what could not be removed.
   */
  commit(): Promise<string[]>;
  /** On failure: remove the new checkpoint (the previous one stays). */
  discard(): Promise<void>;
}

/** What a backup reads: started only once the output is open and every flag was checked. */
export interface BackupSources {
  sources: ReadableStream<VmaRecord>[];
  /** Shown in the summary and JSON result. */
  disks: { name: string; path: string }[];
  /** Sum of the disk sizes, for progress (undefined: learnt from the device records). */
  totalBytes?: number | undefined;
  /** A live backup feeding `sources`: aborted when the pipeline fails, awaited at the end. */
  live?: LiveBackup | undefined;
  /**
   * This thread serves QEMU (push mode's NBD server): zstd must not compress on it, or the
   * guest's writes wait for a frame.
   */
  servesQemu?: boolean;
  /**
   * An incremental: `sources` hold the device records and only the changed clusters; every
   * other cluster comes from this base archive.
   */
  base?: BaseArchive | undefined;
  /** Why the backup is a full one although `--base` asked for an incremental. */
  fullReason?: string | undefined;
  /** The checkpoint this backup adds, committed or discarded with the archive. */
  checkpoint?: BackupCheckpoint | undefined;
}

/** What {@linkcode runBackup} needs: where the archive goes, how it is written, what it reads. */
export interface BackupPlan {
  /**
   * Starts the sources (qemu-nbd children, a live backup): only after the output is open.
   * `uuid` is the new archive's, chosen first so a checkpoint can be named after it.
   */
  start(identity: { uuid: string }): Promise<BackupSources>;
  configs: { name: string; data: Uint8Array }[];
  output: string;
  compression: WritableCompression;
  level?: number | undefined;
  zstd?: ZstdEngine | undefined;
  force: boolean;
  progress: "auto" | "json" | "none";
  json: boolean;
  /** Build the archive index (default true): embedded in `.vma.zst`, else a sidecar. */
  index?: boolean | undefined;
  /** Where a sidecar index goes (default `OUT.idx`; with `-o -` only when given). */
  indexPath?: string | undefined;
  /** How to reach S3 storage, for `s3://` outputs. */
  storage?: StorageOptions | undefined;
}

/**
 * Runs the backup pipeline of a plan: sources → zero filter → writer → compressor → output,
 * with progress, and the partial output removed on any failure or signal.
 *
 * @example Back up a record stream into a file
 * ```ts
 * import assert from "node:assert/strict";
 * import { runBackup } from "./backup.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const write = (bytes: Uint8Array) => Promise.resolve(bytes.length); // drops the summary line
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * const disk = ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "zeros" as const, devId: 1, cluster: 0, count: 1 },
 * ]);
 * const disks = [{ name: "drive-scsi0", path: "(in memory)" }]; // for the summary line
 * const start = () => Promise.resolve({ sources: [disk], disks });
 * const options = { progress: "none", compression: "gzip", force: false, json: false } as const;
 * const output = `${dir}/vm.vma.gz`;
 * assert.equal(await runBackup({ ...options, start, configs: [], output }, context), 0);
 * assert.deepEqual((await Deno.readFile(output)).subarray(0, 2), new Uint8Array([0x1f, 0x8b]));
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function runBackup(plan: BackupPlan, context: CliContext): Promise<number> {
  const sidecarPath = plan.index === false || plan.compression === "zstd" && plan.zstd !== "program"
    ? undefined
    : plan.indexPath ?? (plan.output === "-" ? undefined : `${plan.output}.idx`);
  const outputOptions = { force: plan.force, ...plan.storage };
  const output = await openOutput(plan.output, context, outputOptions);
  let sidecar: Awaited<ReturnType<typeof openOutput>> | undefined;
  let started: BackupSources;
  const uuid = crypto.randomUUID();
  try {
    if (sidecarPath !== undefined) {
      sidecar = await openOutput(sidecarPath, context, outputOptions);
    }
    started = await plan.start({ uuid });
  } catch (error) {
    await output.discard();
    await sidecar?.discard();
    throw error;
  }
  const { live, disks, totalBytes, base } = started;
  if (started.fullReason !== undefined) {
    await writeText(
      context.stderr,
      `note: a full backup, not an incremental: ${started.fullReason}\n`,
    );
  }
  const progress = new Progress(context, {
    mode: plan.progress,
    command: "backup",
    total: totalBytes,
  });
  const sizes = new Map<number, number>();
  let expected = 0;
  /** Bytes of the disks the sources gave: all of them for a full, the changes otherwise. */
  let readBytes = 0;
  const startTime = performance.now();
  live?.snapshot.then(() => progress.note("snapshot"), () => {});
  const onAbort = () => {
    output.discardSync();
    sidecar?.discardSync();
  };
  context.signal.addEventListener("abort", onAbort);
  let encoded: EncodedArchive | EncodedSyntheticFull | undefined;
  let checkpointNotes: string[] = [];
  try {
    const records = combineRecordStreams(started.sources, { configs: plan.configs })
      .pipeThrough(tapStream<VmaRecord>((record) => {
        if (record.type === "device") {
          sizes.set(record.devId, record.size);
          output.expectSize?.(expected += record.size); // sizes S3 parts; all come first
          if (totalBytes === undefined) progress.addTotal(record.size);
        }
        if (record.type !== "cluster" && record.type !== "zeros") return;
        const count = record.type === "zeros" ? record.count : 1;
        const bytes = clusterBytes(sizes, record.devId, record.cluster, count);
        readBytes += bytes;
        if (base === undefined) progress.add(bytes);
      }))
      .pipeThrough(new ZeroFilterStream());
    const outputOptions = {
      compression: plan.compression,
      level: plan.level,
      zstd: plan.zstd,
      mainThread: !started.servesQemu,
      // every stage of this pipeline is its chunks' only consumer
      reuseBuffers: true,
    };
    encoded = base === undefined
      ? encodeArchive(records, { uuid, ...outputOptions, index: plan.index !== false })
      : encodeSyntheticFull(records, {
        base: base.archive,
        uuid,
        ...outputOptions,
        checkpoint: base.checkpoint,
        depth: base.depth + 1,
        // Every cluster of the new archive, changed or from the base, in one extent.
        onExtent: (runs) => {
          for (const run of runs) {
            progress.add(clusterBytes(sizes, run.devId, run.cluster, run.count));
          }
        },
      });
    const pipeline = encoded.readable.pipeTo(output.writable, { signal: context.signal });
    // A live backup is aborted straight from the signal, not once the pipeline noticed it:
    // the pipeline may wait forever for a write to a stalled pipe, and QEMU must not.
    await (live
      ? Promise.race([pipeline, abortOnSignal(live, context.signal, pipeline)])
      : pipeline);
    await live?.finished;
    if (sidecar !== undefined) {
      await ReadableStream.from([encodeIndex(encoded.index()!)]).pipeTo(sidecar.writable);
    }
    // Both durably, the index renamed first: the archive never appears without it.
    await commitOutputs(output, ...(sidecar === undefined ? [] : [sidecar]));
    // Only now, with the archive durable, may the previous checkpoint go.
    checkpointNotes = await started.checkpoint?.commit().catch((error) => [
      `the archive is complete, but the checkpoints could not be rotated: ${
        error instanceof Error ? error.message : error
      }`,
    ]) ?? [];
    await progress.finish(true);
  } catch (error) {
    await output.discard();
    await sidecar?.discard();
    // Whatever failed, QEMU's graph is put back before the command ends, and the new
    // checkpoint is removed: the previous one stays the base of the next incremental.
    await live?.abort(error);
    await started.checkpoint?.discard().catch(() => {});
    await progress.finish(false);
    throw context.signal.aborted ? context.signal.reason : error;
  } finally {
    context.signal.removeEventListener("abort", onAbort);
  }
  for (const note of checkpointNotes) await writeText(context.stderr, `note: ${note}\n`);

  const seconds = (performance.now() - startTime) / 1000;
  const index = encoded!.index();
  const stats = "stats" in encoded! && typeof encoded.stats === "function"
    ? encoded.stats()
    : statsOfIndex(index!);
  const diskBytes = [...sizes.values()].reduce((a, b) => a + b, 0);
  const written = output.writable.bytesWritten;
  const synthetic = base === undefined ? undefined : (encoded as EncodedSyntheticFull).stats;
  const result = {
    ok: true,
    command: "backup",
    output: plan.output,
    uuid,
    kind: base === undefined ? "full" : "incremental",
    ...(started.fullReason !== undefined && { fullReason: started.fullReason }),
    checkpoint: started.checkpoint?.name ?? null,
    ...(base !== undefined && {
      base: {
        path: base.path,
        uuid: base.archive.index.uuid,
        checkpoint: base.checkpoint,
        depth: base.depth + 1,
      },
    }),
    readBytes,
    baseBytes: diskBytes - readBytes,
    ...(synthetic !== undefined && {
      copiedExtents: synthetic.copiedExtents,
      copiedBytes: synthetic.copiedBytes,
      rewrittenClusters: synthetic.rewrittenClusters,
      baseBytesRead: base!.archive.stats.storedBytesRead,
    }),
    compression: plan.compression,
    index: encoded!.indexPlace === "sidecar"
      ? (sidecarPath === undefined ? "none" : "sidecar")
      : encoded!.indexPlace,
    ...(sidecarPath !== undefined && { indexPath: sidecarPath }),
    disks: disks.map((disk, i) => ({ ...disk, size: sizes.get(i + 1) ?? 0 })),
    configs: plan.configs.map((config) => configName(config.name)),
    diskBytes,
    archiveBytes: stats.bytes,
    outputBytes: written,
    clusters: stats.clusters,
    zeroClusters: stats.zeroClusters,
    dataBytes: stats.dataBlocks * 4096,
    seconds: Number(seconds.toFixed(3)),
  };
  const target = plan.output === "-" ? context.stderr : context.stdout;
  if (plan.json) {
    await writeText(target, jsonLine(result));
  } else {
    const sparse = diskBytes > 0
      ? Math.max(0, 100 * (1 - result.dataBytes / diskBytes)).toFixed(1)
      : "0";
    const name = plan.output === "-" ? "stdout" : plan.output;
    // The kind only where an incremental was asked for: other summaries stay as they were.
    const asked = base !== undefined || started.fullReason !== undefined;
    const kind = asked ? `${result.kind} backup, ` : "";
    const from = base === undefined
      ? ""
      : `; ${formatBytes(readBytes)} read, ${formatBytes(diskBytes - readBytes)} from the base (${
        synthetic!.copiedExtents
      } extents copied as stored)`;
    await writeText(
      context.stderr,
      `${name}: ${kind}${disks.length} disk(s), ${formatBytes(diskBytes)} (${sparse}% sparse) → ${
        formatBytes(written)
      } ${plan.compression === "none" ? "" : `${plan.compression} `}in ${seconds.toFixed(1)} s, ${
        formatRate(diskBytes, seconds)
      }${from}\n`,
    );
  }
  return 0;
}

const OPTIONS = {
  disk: { type: "string", multiple: true },
  config: { type: "string", multiple: true },
  output: { type: "string", short: "o" },
  compress: { type: "string" },
  level: { type: "string" },
  force: { type: "boolean" },
  progress: { type: "string" },
  json: { type: "boolean" },
  qmp: { type: "string" },
  drive: { type: "string", multiple: true },
  mode: { type: "string" },
  speed: { type: "string" },
  "fleece-dir": { type: "string" },
  "discard-read": { type: "boolean" },
  "cbw-timeout": { type: "string" },
  base: { type: "string" },
  checkpoint: { type: "boolean" },
  "no-checkpoint": { type: "boolean" },
  "full-every": { type: "string" },
  zstd: { type: "string" },
  "no-index": { type: "boolean" },
  index: { type: "string" },
  "s3-part-size": { type: "string" },
  ...S3_OPTIONS,
} as const;

type BackupValues = ReturnType<typeof parseCommandArgs<typeof OPTIONS>>["values"];

/** The checked flags of a backup's output side, the same for disks and live VMs. */
async function outputPlan(values: BackupValues): Promise<Omit<BackupPlan, "start">> {
  if (values.output === undefined) throw new UsageError("backup needs -o OUT (or -o - for stdout)");
  const { compression, level } = parseCompression(values.output, values.compress, values.level);
  const zstd = zstdEngine(values.zstd);
  if (values.index !== undefined && values["no-index"]) {
    throw new UsageError("--index FILE and --no-index cannot be combined");
  }
  if (values.index !== undefined && compression === "zstd" && zstd === "builtin") {
    throw new UsageError(
      "a .vma.zst carries its index inside; --index FILE is for .vma and .vma.gz archives",
    );
  }
  return {
    configs: await readConfigs(values.config ?? []),
    output: values.output,
    compression,
    level,
    zstd,
    force: values.force ?? false,
    progress: progressMode(values.progress),
    json: values.json ?? false,
    index: !(values["no-index"] ?? false),
    indexPath: values.index,
    storage: storageOptions(values),
  };
}

/**
 * `cli.ts backup`: backs up disk images, NBD exports or a running VM into a VMA archive.
 *
 * @example Back up a raw image
 * ```ts
 * import assert from "node:assert/strict";
 * import { backupCommand } from "./backup.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeFile(`${dir}/disk.raw`, new Uint8Array(100_000).fill(7, 70_000));
 * let out = "";
 * const write = (bytes: Uint8Array) => {
 *   out += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * const args = ["--disk", `scsi0=${dir}/disk.raw`, "-o", `${dir}/vm.vma.zst`, "--json"];
 * assert.equal(await backupCommand.run(args, context), 0);
 * const result = JSON.parse(out);
 * assert.deepEqual([result.diskBytes, result.dataBytes], [100_000, 8 * 4096]); // 8 blocks hold 7s
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export const backupCommand: Command = {
  name: "backup",
  help: HELP,
  async run(args, context) {
    const { values, positionals } = parseCommandArgs("backup", args, OPTIONS);
    if (values.help) return await printHelp(context, HELP);
    if (values.qmp !== undefined) return await runLiveBackup(values, context);
    if (positionals.length > 0) {
      throw new UsageError(`backup takes no positional arguments, got '${positionals[0]}'`);
    }
    if (
      values.drive || values.mode || values.speed || values["fleece-dir"] ||
      values["cbw-timeout"]
    ) {
      throw new UsageError(
        "--drive, --mode, --speed, --fleece-dir and --cbw-timeout need --qmp SOCKET",
      );
    }
    if (!values.disk?.length && !values.config?.length) {
      throw new UsageError(
        "backup needs at least one --disk (or --config) (see 'cli.ts backup --help')",
      );
    }
    const incremental = incrementalOptions(values);
    // Offline, a checkpoint changes the images: only when asked for, or to go on a chain.
    const checkpoint = incremental.checkpoint &&
      (values.checkpoint === true || incremental.base !== undefined);
    const plan = await outputPlan(values);
    const disks = parseDiskSpecs(values.disk ?? []);
    checkArchiveContents(plan.configs, disks.map((disk) => disk.name));
    for (const { path } of disks) {
      if (isNbdUri(path)) continue;
      const info = await checkReadable(path);
      if (isSparse(info) && Deno.permissions.querySync({ name: "ffi" }).state !== "granted") {
        await writeText(
          context.stderr,
          `note: ${path} is sparse; add --allow-ffi to skip its holes instead of reading them\n`,
        );
      }
    }
    const chosen = await chooseBase(incremental, plan);
    try {
      return await runBackup({
        ...plan,
        async start({ uuid }) {
          const base = chosen.base;
          const checkpoints = await planImageCheckpoints(disks, {
            checkpoint: checkpoint ? checkpointName(uuid) : undefined,
            since: base && { checkpoint: base.checkpoint, devices: base.archive.devices },
          });
          for (const note of checkpoints.notes) await writeText(context.stderr, `note: ${note}\n`);
          const bitmap = checkpoints.since;
          return {
            // Each record goes through one linear pipeline to the writer, which releases it.
            sources: disks.map(({ name, path }) =>
              isNbdUri(path)
                ? nbdDiskSource(path, { name, reuseBuffers: true })
                : imageDiskSource(path, { name, reuseBuffers: true, bitmap })
            ),
            disks,
            base: checkpoints.kind === "incremental" ? base : undefined,
            fullReason: checkpoints.fullReason ?? chosen.fullReason,
            checkpoint: checkpoints.checkpoint,
          };
        },
      }, context);
    } finally {
      chosen.base?.archive.close();
    }
  },
};

/** `backup --qmp`: a live backup of a running VM, push or pull. */
async function runLiveBackup(values: BackupValues, context: CliContext): Promise<number> {
  if (values.disk?.length) throw new UsageError("--disk and --qmp cannot be combined");
  if (values.checkpoint) {
    throw new UsageError(
      "--checkpoint is for --disk images (a live backup adds one unless --no-checkpoint)",
    );
  }
  const mode = values.mode ?? "push";
  if (mode !== "push" && mode !== "pull") {
    throw new UsageError(`--mode must be push or pull, not '${mode}'`);
  }
  const speed = values.speed === undefined ? undefined : Number(values.speed);
  if (speed !== undefined && (!Number.isSafeInteger(speed) || speed <= 0)) {
    throw new UsageError(`--speed must be a positive number of bytes per second`);
  }
  const cbwTimeout = values["cbw-timeout"] === undefined
    ? undefined
    : Number(values["cbw-timeout"]);
  if (cbwTimeout !== undefined && (!Number.isInteger(cbwTimeout) || cbwTimeout < 1)) {
    throw new UsageError("--cbw-timeout must be a whole number of seconds, at least 1");
  }
  if (mode === "pull" && speed !== undefined) throw new UsageError("--speed is for --mode push");
  if (
    mode === "push" &&
    (values["fleece-dir"] || values["discard-read"] || cbwTimeout !== undefined)
  ) {
    throw new UsageError("--fleece-dir, --discard-read and --cbw-timeout are for --mode pull");
  }
  const incremental = incrementalOptions(values);
  const plan = await outputPlan(values);
  // Every flag is checked before QMP is connected; the VM is touched only in start(), once
  // the output is open, and only after the drives and configs were found to fit an archive.
  using qmp = await QmpClient.connect(values.qmp!);
  const chosen = await chooseBase(incremental, plan);
  try {
    const options = {
      qmp,
      ...(values.drive && { drives: values.drive }),
      checkDrives: (drives: LiveDrive[]) => checkArchiveLimits(drives, plan.configs),
    };
    return await runBackup({
      ...plan,
      async start({ uuid }) {
        const base = chosen.base;
        const checkpoints = {
          checkpoint: incremental.checkpoint ? checkpointName(uuid) : undefined,
          since: base && { checkpoint: base.checkpoint, devices: base.archive.devices },
        };
        const live = mode === "push"
          ? await startPushBackup({ ...options, ...checkpoints, ...(speed && { speed }) })
          : await startPullBackup({
            ...options,
            ...checkpoints,
            ...(values["fleece-dir"] && { fleeceDir: values["fleece-dir"] }),
            ...(cbwTimeout && { cbwTimeoutSeconds: cbwTimeout }),
            discardRead: values["discard-read"] ?? false,
          });
        if (live.fleeceDir !== undefined && values["fleece-dir"] === undefined) {
          await writeText(
            context.stderr,
            `note: the fleece images (the old data of clusters the guest overwrites during the backup) go to ${live.fleeceDir}, removed afterwards; choose with --fleece-dir\n`,
          );
        }
        return {
          sources: [live.records],
          totalBytes: live.drives.reduce((sum, drive) => sum + drive.size, 0),
          disks: live.drives.map((drive) => ({ name: drive.name, path: `qmp:${drive.node}` })),
          live,
          servesQemu: mode === "push",
          base: live.kind === "incremental" ? base : undefined,
          fullReason: live.fullReason ?? chosen.fullReason,
          checkpoint: live.checkpoint === undefined ? undefined : {
            name: live.checkpoint,
            commit: () => live.commitCheckpoint(),
            discard: () => live.abort(),
          },
        };
      },
    }, context);
  } finally {
    chosen.base?.archive.close();
  }
}

/** The flags of incremental backups: `--base`, `--no-checkpoint`, `--full-every`. */
interface IncrementalOptions {
  base?: string | undefined;
  /** Add a checkpoint for the next incremental (not with `--no-checkpoint`). */
  checkpoint: boolean;
  fullEvery?: number | undefined;
}

function incrementalOptions(values: BackupValues): IncrementalOptions {
  if (values.checkpoint && values["no-checkpoint"]) {
    throw new UsageError("--checkpoint and --no-checkpoint cannot be combined");
  }
  const fullEvery = values["full-every"] === undefined ? undefined : Number(values["full-every"]);
  if (fullEvery !== undefined && (!Number.isSafeInteger(fullEvery) || fullEvery < 1)) {
    throw new UsageError("--full-every must be a whole number of backups, at least 1");
  }
  if (values.base !== undefined && values["no-index"]) {
    throw new UsageError(
      "--base and --no-index cannot be combined (the archive's index finds what the base holds)",
    );
  }
  return { base: values.base, checkpoint: !(values["no-checkpoint"] ?? false), fullEvery };
}

/**
 * Opens the `--base` archive, or says why the backup will be a full one: the base cannot
 * be used, or `--full-every` says so. Without `--config`, the base's configs are kept.
 */
async function chooseBase(
  options: IncrementalOptions,
  plan: Omit<BackupPlan, "start">,
): Promise<{ base?: BaseArchive; fullReason?: string }> {
  if (options.base === undefined) return {};
  const opened = await openBaseArchive(options.base, plan.storage);
  if ("problem" in opened) return { fullReason: opened.problem };
  const { base } = opened;
  if (plan.configs.length === 0) plan.configs = base.archive.header.configs;
  if (options.fullEvery !== undefined && base.depth + 1 >= options.fullEvery) {
    base.archive.close();
    return {
      fullReason: `--full-every ${options.fullEvery}: the base is ${
        base.depth === 0 ? "a full backup" : `incremental ${base.depth} after a full one`
      }`,
    };
  }
  return { base };
}

/**
 * Aborts `live` as soon as `signal` fires, and then rejects with the signal's reason; the
 * `pipeline` it races against is left behind (its rejection handled), since it may never
 * settle while a write to a stalled pipe is pending.
 */
function abortOnSignal(
  live: LiveBackup,
  signal: AbortSignal,
  pipeline: Promise<void>,
): Promise<never> {
  pipeline.catch(() => {});
  return new Promise<never>((_, reject) => {
    const abort = () => {
      live.abort(signal.reason).finally(() => reject(signal.reason));
    };
    if (signal.aborted) return abort();
    signal.addEventListener("abort", abort, { once: true });
    // Once the pipeline settled on its own, the signal is runBackup's concern again.
    const forget = () => signal.removeEventListener("abort", abort);
    pipeline.then(forget, forget);
  });
}

/** Bytes of `count` clusters from `cluster` on, within the device's size. */
function clusterBytes(sizes: Map<number, number>, devId: number, cluster: number, count: number) {
  const size = sizes.get(devId) ?? 0;
  return Math.max(0, Math.min(count * CLUSTER_SIZE, size - cluster * CLUSTER_SIZE));
}

/** A synthetic full's counters as the writer's would be, from its index. */
function statsOfIndex(index: VmaIndex): VmaWriterStats {
  let zeroClusters = 0;
  index.runs.counts.forEach((count, r) => zeroClusters += index.runs.zero[r] ? count : 0);
  return {
    bytes: index.archiveBytes,
    extents: index.blockCounts.length,
    clusters: index.slotCounts.reduce((sum, count) => sum + count, 0),
    zeroClusters,
    dataBlocks: index.blockCounts.reduce((sum, count) => sum + count, 0),
  };
}

function isNbdUri(path: string): boolean {
  return path.startsWith("nbd://") || path.startsWith("nbd+unix://");
}

/** Fails early, with a clear error, for a disk path that cannot be read. */
async function checkReadable(path: string): Promise<Deno.FileInfo> {
  using file = await Deno.open(path, { read: true });
  const info = await file.stat();
  if (info.isDirectory) {
    throw new Deno.errors.IsADirectory(`Cannot back up ${path}: It is a directory`);
  }
  return info;
}

/** A regular file with less than half of its size allocated. */
function isSparse(info: Deno.FileInfo): boolean {
  return info.isFile && info.blocks !== null && info.blocks * 512 < info.size / 2;
}
