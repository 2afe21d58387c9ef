// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `extract`: configs and sparse raw disks into a new directory, or one disk to stdout.
 *
 * @module
 */
import { resolve } from "node:path";
import { DeviceBytesStream } from "../../sinks/device_stream.ts";
import { ByteSink } from "../../sinks/file_sink.ts";
import { ImageRestoreSink } from "../../sinks/nbd_restore.ts";
import { RestoreSink } from "../../sinks/restore_files.ts";
import { IMAGE_FORMATS, type ImageFormat } from "../../qemu/image_format.ts";
import type { VmaConfigRecord, VmaDeviceRecord, VmaRecord } from "../../vma/records.ts";
import { openArchive, openRandomAccess } from "../archive_input.ts";
import { archiveRecords } from "../../access/archive_records.ts";
import type { IndexedArchive } from "../../access/indexed_archive.ts";
import {
  type Command,
  expectPositionals,
  jsonLine,
  parseCommandArgs,
  printHelp,
  progressMode,
  ZSTD_HELP,
  zstdEngine,
} from "../command.ts";
import type { ZstdEngine } from "../../transforms/compression.ts";
import { type CliContext, formatBytes, formatRate, writeText } from "../context.ts";
import { CliError, ExitCode, UsageError } from "../errors.ts";
import { commitDirectory } from "../durable.ts";
import { configFileName, deviceFileName, findDevice } from "../file_names.ts";
import { exists, existsError, refuseTerminal } from "../files.ts";
import { Progress } from "../progress.ts";
import { S3_HELP, S3_OPTIONS, type StorageOptions, storageOptions } from "../s3_files.ts";

const HELP = `Extract a VMA archive: configs and one sparse raw image per disk.

usage: cli.ts extract ARCHIVE|- TARGETDIR [--disk NAME[,NAME]...] [--format FMT] [--force]
       cli.ts extract ARCHIVE|- --stdout NAME

  ARCHIVE            a .vma, .vma.zst, .vma.gz or .vma.lzo file, s3://BUCKET/KEY, or '-'
  TARGETDIR          a new directory; gets the configs and disk-<name>.raw per disk
                     (vmstate.bin for a VM state stream). Built in TARGETDIR.partial and
                     renamed when complete
  --disk NAMES       extract only these disks (comma-separated, repeatable); the others
                     are not written and not checked for missing clusters
  --stdout NAME      stream one disk's raw bytes to stdout (not to a terminal) and
                     write nothing else
  --format FMT       write disk-<name>.FMT images: raw (default, sparse files), qcow2,
                     vmdk, vdi, vhdx, vpc or qed. Non-raw images are created with qemu-img
                     and written through a writable qemu-nbd (only stored blocks; no raw
                     copy is staged)
  --force            replace an existing TARGETDIR
  --progress MODE    auto, json or none
  --json             print a JSON result object
${ZSTD_HELP}
${S3_HELP}

Disk names match with or without the drive- prefix (scsi0 = drive-scsi0, unless a disk
is named scsi0). A config named like a disk file (disk-..., vmstate.bin) is written as
config-NAME. Names that would leave TARGETDIR ('/', '..') or are too long for a file name
are refused (exit code 3).
permissions: --allow-read (ARCHIVE) --allow-write (TARGETDIR); --format other than raw also
needs --allow-run=qemu-img,qemu-nbd and --allow-net; an s3:// ARCHIVE needs --allow-net=HOST
--allow-env (and --allow-read of ~/.aws/credentials for a profile)`;

/** What the archive header holds: its configs and devices. */
interface HeaderRecords {
  configs: VmaConfigRecord[];
  devices: VmaDeviceRecord[];
}

/**
 * A pass-through that holds the header records back until the header is complete (the
 * first cluster, or the end), then calls `check` with all configs and devices, so a
 * decision that needs every name (which device a name means, whether all names can be file
 * names) is made before anything is written. Only header records wait.
 *
 * @example Choose a device once all are known
 * ```ts
 * import assert from "node:assert/strict";
 * import { afterHeader } from "./extract.ts";
 *
 * const seen: string[] = [];
 * const records = ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "device" as const, devId: 2, name: "scsi0", size: 65536 },
 *   { type: "zeros" as const, devId: 1, cluster: 0, count: 1 },
 * ]).pipeThrough(afterHeader(({ devices }) => void seen.push(...devices.map((d) => d.name))));
 * const types = await Array.fromAsync(records, (record) => record.type);
 * assert.deepEqual(seen, ["drive-scsi0", "scsi0"]);
 * assert.deepEqual(types, ["device", "device", "zeros"]);
 * ```
 */
export function afterHeader(
  check: (header: HeaderRecords) => void,
): TransformStream<VmaRecord, VmaRecord> {
  let held: VmaRecord[] | undefined = [];
  const header: HeaderRecords = { configs: [], devices: [] };
  const release = (controller: TransformStreamDefaultController<VmaRecord>) => {
    if (held === undefined) return;
    check(header);
    for (const record of held) controller.enqueue(record);
    held = undefined;
  };
  return new TransformStream({
    transform(record, controller) {
      if (held !== undefined && record.type !== "cluster" && record.type !== "zeros") {
        if (record.type === "config") header.configs.push(record);
        if (record.type === "device") header.devices.push(record);
        held.push(record);
        return;
      }
      release(controller);
      controller.enqueue(record);
    },
    flush: release,
  });
}

/** The devices `wanted` names (all of them without names); exit code 7 for a missing one. */
function chooseDevices(devices: VmaDeviceRecord[], wanted: string[] | undefined): Set<number> {
  if (wanted === undefined) return new Set(devices.map((device) => device.devId));
  return new Set(wanted.map((name) => {
    const device = findDevice(devices, name);
    if (device === undefined) {
      throw new CliError(ExitCode.notFound, `the archive has no disk named '${name}'`);
    }
    return device.devId;
  }));
}

/** A pass-through that writes config records into `dir`, under their file names. */
function writeConfigs(dir: string) {
  return new TransformStream<VmaRecord, VmaRecord>({
    async transform(record, controller) {
      if (record.type === "config") {
        const path = `${dir}/${configFileName(record.name)}`;
        await Deno.writeFile(path, record.data, { createNew: true });
      }
      controller.enqueue(record);
    },
  });
}

/**
 * `cli.ts extract`: restores configs and disks into a new directory, or one disk to stdout.
 *
 * @example Extract a small archive into a new directory
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../../mod.ts";
 * import { extractCommand } from "./extract.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeFile(`${dir}/vm.vma`, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 5000 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0, data: null },
 * ]).pipeThrough(new VmaWriterStream()));
 * const write = (bytes: Uint8Array) => Promise.resolve(bytes.length); // drops the summary line
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * assert.equal(await extractCommand.run([`${dir}/vm.vma`, `${dir}/restore`], context), 0);
 * const disk = await Deno.readFile(`${dir}/restore/disk-drive-scsi0.raw`);
 * assert.deepEqual(disk, new Uint8Array(5000)); // a sparse raw image of the exact size
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export const extractCommand: Command = {
  name: "extract",
  help: HELP,
  async run(args, context) {
    const { values, positionals } = parseCommandArgs("extract", args, {
      disk: { type: "string", multiple: true },
      stdout: { type: "string" },
      force: { type: "boolean" },
      progress: { type: "string" },
      json: { type: "boolean" },
      format: { type: "string" },
      zstd: { type: "string" },
      ...S3_OPTIONS,
    });
    if (values.help) return await printHelp(context, HELP);
    const zstd = zstdEngine(values.zstd);
    const storage = storageOptions(values);
    const mode = progressMode(values.progress);
    const format = (values.format ?? "raw") as ImageFormat;
    if (!IMAGE_FORMATS.includes(format)) {
      throw new UsageError(`--format must be one of ${IMAGE_FORMATS.join(", ")}, not '${format}'`);
    }
    if (values.stdout !== undefined) {
      expectPositionals("extract", positionals, 1);
      if (values.disk || values.format || values.json || values.force) {
        // stdout carries the disk, and nothing is written that --force could replace.
        throw new UsageError(
          "--stdout cannot be combined with --disk, --format, --json or --force",
        );
      }
      refuseTerminal(context, "the disk");
      return await extractToStdout(positionals[0]!, values.stdout, context, {
        mode,
        zstd,
        storage,
      });
    }
    expectPositionals("extract", positionals, 2);
    const wanted = values.disk?.flatMap((list) => list.split(",")).filter((name) => name !== "");
    return await extractToDirectory({
      archive: positionals[0]!,
      target: positionals[1]!,
      wanted,
      force: values.force ?? false,
      json: values.json ?? false,
      progress: mode,
      format,
      zstd,
      storage,
    }, context);
  },
};

async function extractToStdout(
  path: string,
  name: string,
  context: CliContext,
  { mode, zstd, storage }: {
    mode: "auto" | "json" | "none";
    zstd: ZstdEngine;
    storage: StorageOptions;
  },
): Promise<number> {
  let progress: Progress | undefined;
  let chosen: number | undefined; // the device's id, once the header is complete
  const isChosen = (device: VmaDeviceRecord) => device.devId === chosen;
  // With an index, only the extents of this disk are read; otherwise the whole archive.
  const random = await openRandomAccess(path, { storage });
  const records = random !== undefined ? randomRecords(random, [name]) : (await openArchive(path, {
    zstd,
    storage,
    reader: { requireComplete: isChosen },
    progress: (total) => (progress = new Progress(context, { mode, command: "extract", total })),
  })).records;
  try {
    await records
      .pipeThrough(afterHeader(({ devices }) => {
        [chosen] = chooseDevices(devices, [name]);
      }))
      .pipeThrough(new DeviceBytesStream(isChosen))
      .pipeTo(new ByteSink(context.stdout), { signal: context.signal });
  } catch (error) {
    await progress?.finish(false);
    throw context.signal.aborted ? context.signal.reason : error;
  } finally {
    random?.close();
  }
  await progress?.finish(true);
  return ExitCode.ok;
}

interface ExtractPlan {
  archive: string;
  target: string;
  wanted: string[] | undefined;
  force: boolean;
  json: boolean;
  progress: "auto" | "json" | "none";
  format: ImageFormat;
  zstd: ZstdEngine;
  storage: StorageOptions;
}

/**
 * TARGETDIR without trailing slashes, refused when replacing it would remove the current
 * directory or the archive being read.
 */
function checkedTarget(target: string, archive: string): string {
  const trimmed = target.replace(/\/+$/, "") || "/";
  const full = resolve(trimmed);
  const inside = (path: string) => path === full || path.startsWith(`${full}/`);
  if (full === "/" || inside(resolve(".")) || (archive !== "-" && inside(resolve(archive)))) {
    throw new UsageError(
      `TARGETDIR ${target} holds the current directory or the archive; extract into a new directory`,
    );
  }
  return trimmed;
}

async function extractToDirectory(plan: ExtractPlan, context: CliContext): Promise<number> {
  const { wanted } = plan;
  const target = checkedTarget(plan.target, plan.archive);
  if (!plan.force && await exists(target)) throw existsError(target);
  const partial = `${target}.partial`;
  if (await exists(partial)) {
    if (!plan.force) throw existsError(partial);
    await Deno.remove(partial, { recursive: true });
  }
  let chosen = new Set<number>(); // the devices to write, once the header is complete
  const selected = (device: VmaDeviceRecord) => chosen.has(device.devId);
  let progress: Progress | undefined;
  // Some disks of an indexed archive: read only their extents. All disks, or no index:
  // one pass over the whole archive.
  const random = wanted === undefined
    ? undefined
    : await openRandomAccess(plan.archive, { storage: plan.storage });
  const archive = random !== undefined ? undefined : await openArchive(plan.archive, {
    zstd: plan.zstd,
    storage: plan.storage,
    reader: { requireComplete: selected },
    progress: (
      total,
    ) => (progress = new Progress(context, { mode: plan.progress, command: "extract", total })),
  });
  const records = random !== undefined ? randomRecords(random, wanted!) : archive!.records;
  const started = performance.now();
  let found: HeaderRecords = { configs: [], devices: [] };
  /** Picks the devices and checks that every name to write is a file name, before writing. */
  const check = (header: HeaderRecords) => {
    found = header;
    chosen = chooseDevices(header.devices, wanted);
    for (const config of header.configs) configFileName(config.name);
    for (const device of header.devices.filter(selected)) deviceFileName(device, plan.format);
  };
  const pathOf = (device: VmaDeviceRecord) =>
    selected(device) ? `${partial}/${deviceFileName(device, plan.format)}` : undefined;
  const sink = new RestoreSink({
    target: pathOf,
    configTarget: (config) => `${partial}/${configFileName(config.name)}`,
  });
  const imageSink = plan.format === "raw"
    ? undefined
    : new ImageRestoreSink({ format: plan.format, target: pathOf });
  const onAbort = () => {
    try {
      Deno.removeSync(partial, { recursive: true });
    } catch { /* already gone */ }
  };
  await Deno.mkdir(partial);
  context.signal.addEventListener("abort", onAbort);
  try {
    const checked = records.pipeThrough(afterHeader(check));
    if (imageSink === undefined) {
      await checked.pipeTo(sink, { signal: context.signal });
    } else {
      await checked.pipeThrough(writeConfigs(partial)).pipeTo(imageSink, {
        signal: context.signal,
      });
    }
    await commitDirectory(partial, target);
    await progress?.finish(true);
  } catch (error) {
    await Deno.remove(partial, { recursive: true }).catch(() => {});
    await progress?.finish(false);
    throw context.signal.aborted ? context.signal.reason : error;
  } finally {
    context.signal.removeEventListener("abort", onAbort);
    random?.close();
  }
  const seconds = (performance.now() - started) / 1000;
  const restored = found.devices.filter(selected).map((device) => ({
    name: device.name,
    path: `${target}/${deviceFileName(device, plan.format)}`,
    size: device.size,
    dataBytes: (imageSink ?? sink).restored.find((done) => done.name === device.name)?.dataBytes ??
      null,
  }));
  const diskBytes = restored.reduce((sum, device) => sum + device.size, 0);
  if (plan.json) {
    await writeText(
      context.stdout,
      jsonLine({
        ok: true,
        command: "extract",
        archive: random?.name ?? archive!.name,
        compression: random === undefined
          ? archive!.compression
          : random.layout === "vma"
          ? "none"
          : "zstd",
        access: random === undefined ? "sequential" : "random",
        bytesRead: random?.stats.storedBytesRead ?? archive!.bytesRead(),
        target,
        configs: found.configs.map((config) => `${target}/${configFileName(config.name)}`),
        disks: restored,
        seconds: Number(seconds.toFixed(3)),
      }),
    );
  } else {
    await writeText(
      context.stderr,
      `${target}: ${found.configs.length} config(s), ${restored.length} disk(s), ${
        formatBytes(diskBytes)
      } in ${seconds.toFixed(1)} s, ${formatRate(diskBytes, seconds)}\n`,
    );
  }
  return ExitCode.ok;
}

/** The records of the disks named `wanted`, read at random (exit code 7 for a missing one). */
function randomRecords(archive: IndexedArchive, wanted: string[]): ReadableStream<VmaRecord> {
  const devices = archive.header.devices.map(({ devId, name, size }) => ({
    type: "device" as const,
    devId,
    name,
    size,
  }));
  return archiveRecords(archive, [...chooseDevices(devices, wanted)]);
}
