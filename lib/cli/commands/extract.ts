// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `extract`: configs and sparse raw disks into a new directory, or one disk to stdout.
 *
 * @module
 */
import { resolve } from "node:path";
import { DeviceBytesStream } from "../../sinks/device_stream.ts";
import { tapStream } from "../../transforms/tap.ts";
import { ByteSink } from "../../sinks/file_sink.ts";
import { ImageRestoreSink } from "../../sinks/nbd_restore.ts";
import { RestoreSink } from "../../sinks/restore_files.ts";
import { IMAGE_FORMATS, type ImageFormat } from "../../qemu/image_format.ts";
import { VmaFormatError } from "../../vma/errors.ts";
import type { VmaConfigRecord, VmaDeviceRecord, VmaRecord } from "../../vma/records.ts";
import { VMSTATE_NAME } from "../../vma/format.ts";
import { openArchive } from "../archive_input.ts";
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
import { exists, existsError } from "../files.ts";
import { Progress } from "../progress.ts";

const HELP = `Extract a VMA archive: configs and one sparse raw image per disk.

usage: cli.ts extract ARCHIVE|- TARGETDIR [--disk NAME[,NAME]...] [--format FMT] [--force]
       cli.ts extract ARCHIVE|- --stdout NAME

  TARGETDIR          a new directory; gets the configs and disk-<name>.raw per disk
                     (vmstate.bin for a VM state stream). Built in TARGETDIR.partial and
                     renamed when complete
  --disk NAMES       extract only these disks (comma-separated, repeatable); the others
                     are not written and not checked for missing clusters
  --stdout NAME      stream one disk's raw bytes to stdout and write nothing else
  --format FMT       write disk-<name>.FMT images: raw (default, sparse files), qcow2,
                     vmdk, vdi, vhdx, vpc or qed. Non-raw images are created with qemu-img
                     and written through a writable qemu-nbd (only stored blocks; no raw
                     copy is staged)
  --force            replace an existing TARGETDIR
  --progress MODE    auto, json or none
  --json             print a JSON result object
${ZSTD_HELP}

Disk names match with or without the drive- prefix (scsi0 = drive-scsi0).
Names that would leave TARGETDIR ('/', '..', NUL) are refused.
permissions: --allow-read (ARCHIVE) --allow-write (TARGETDIR); --format other than raw also
needs --allow-run=qemu-img,qemu-nbd and --allow-net`;

/**
 * True when `name` names a device given as `wanted` (with or without `drive-`).
 *
 * @example With or without the prefix
 * ```ts
 * import assert from "node:assert/strict";
 * import { deviceMatches } from "./extract.ts";
 *
 * assert.ok(deviceMatches("drive-scsi0", "scsi0"));
 * assert.ok(deviceMatches("drive-scsi0", "drive-scsi0"));
 * assert.ok(!deviceMatches("drive-scsi0", "scsi"));
 * ```
 */
export function deviceMatches(name: string, wanted: string): boolean {
  return name === wanted || name === `drive-${wanted}`;
}

/**
 * Refuses a name from the archive that is not a plain file name.
 *
 * @example Names that would leave the directory
 * ```ts
 * import assert from "node:assert/strict";
 * import { safeFileName } from "./extract.ts";
 *
 * assert.equal(safeFileName("config", "qemu-server.conf"), "qemu-server.conf");
 * assert.throws(() => safeFileName("config", "../../etc/passwd"), { exitCode: 3 });
 * assert.throws(() => safeFileName("device", ".."), /a device named '\.\.'/);
 * ```
 */
export function safeFileName(kind: string, name: string): string {
  if (name === "" || name === "." || name === ".." || name.includes("/") || name.includes("\0")) {
    throw new CliError(
      ExitCode.corrupt,
      `the archive has a ${kind} named '${name}', which would leave the target directory`,
    );
  }
  return name;
}

/**
 * The file name of a device inside TARGETDIR, as `vma extract` names it.
 *
 * @example Disk images and the VM state
 * ```ts
 * import assert from "node:assert/strict";
 * import { deviceFileName } from "./extract.ts";
 *
 * const disk = { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 };
 * assert.equal(deviceFileName(disk), "disk-drive-scsi0.raw");
 * assert.equal(deviceFileName(disk, "qcow2"), "disk-drive-scsi0.qcow2");
 * assert.equal(deviceFileName({ ...disk, name: "vmstate" }), "vmstate.bin");
 * ```
 */
export function deviceFileName(device: VmaDeviceRecord, format: ImageFormat = "raw"): string {
  return device.name === VMSTATE_NAME
    ? "vmstate.bin"
    : `disk-${safeFileName("device", device.name)}.${format}`;
}

/** A pass-through that writes config records into `dir`. */
function writeConfigs(dir: string) {
  return new TransformStream<VmaRecord, VmaRecord>({
    async transform(record, controller) {
      if (record.type === "config") {
        await Deno.writeFile(`${dir}/${record.name}`, record.data, { createNew: true });
      }
      controller.enqueue(record);
    },
  });
}

/** Checks every name from the archive and collects the configs and devices. */
function inspect(found: { configs: VmaConfigRecord[]; devices: VmaDeviceRecord[] }) {
  return tapStream<VmaRecord>((record) => {
    if (record.type === "config") {
      found.configs.push({ ...record, name: safeFileName("config", record.name) });
    }
    if (record.type === "device") found.devices.push(record);
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
  summary: "restore configs and sparse raw disks into a new directory (or one disk to stdout)",
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
    });
    if (values.help) return await printHelp(context, HELP);
    const zstd = zstdEngine(values.zstd);
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
      return await extractToStdout(positionals[0]!, values.stdout, context, { mode, zstd });
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
    }, context);
  },
};

async function extractToStdout(
  path: string,
  name: string,
  context: CliContext,
  { mode, zstd }: { mode: "auto" | "json" | "none"; zstd: ZstdEngine },
): Promise<number> {
  let progress: Progress | undefined;
  let found = false;
  const matches = (device: VmaDeviceRecord) => deviceMatches(device.name, name);
  const archive = await openArchive(path, {
    zstd,
    reader: { requireComplete: matches },
    progress: (total) => (progress = new Progress(context, { mode, command: "extract", total })),
  });
  try {
    await archive.records
      .pipeThrough(tapStream<VmaRecord>((record) => {
        if (record.type === "device") found ||= matches(record);
      }))
      .pipeThrough(new DeviceBytesStream(matches))
      .pipeTo(new ByteSink(context.stdout), { signal: context.signal });
  } catch (error) {
    await progress?.finish(false);
    if (context.signal.aborted) throw context.signal.reason;
    if (!found && !(error instanceof VmaFormatError)) {
      throw new CliError(ExitCode.notFound, `the archive has no disk named '${name}'`);
    }
    throw error;
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
  const selected = (device: VmaDeviceRecord) =>
    wanted === undefined || wanted.some((name) => deviceMatches(device.name, name));
  let progress: Progress | undefined;
  const archive = await openArchive(plan.archive, {
    zstd: plan.zstd,
    reader: { requireComplete: selected },
    progress: (
      total,
    ) => (progress = new Progress(context, { mode: plan.progress, command: "extract", total })),
  });
  const started = performance.now();
  const found = { configs: [] as VmaConfigRecord[], devices: [] as VmaDeviceRecord[] };
  const pathOf = (device: VmaDeviceRecord) =>
    selected(device) ? `${partial}/${deviceFileName(device, plan.format)}` : undefined;
  const sink = new RestoreSink({
    target: pathOf,
    configTarget: (config) => `${partial}/${config.name}`,
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
    const checked = archive.records.pipeThrough(inspect(found));
    if (imageSink === undefined) {
      await checked.pipeTo(sink, { signal: context.signal });
    } else {
      await checked.pipeThrough(writeConfigs(partial)).pipeTo(imageSink, {
        signal: context.signal,
      });
    }
    for (const name of wanted ?? []) {
      if (!found.devices.some((device) => deviceMatches(device.name, name))) {
        throw new CliError(ExitCode.notFound, `the archive has no disk named '${name}'`);
      }
    }
    await commitDirectory(partial, target);
    await progress?.finish(true);
  } catch (error) {
    await Deno.remove(partial, { recursive: true }).catch(() => {});
    await progress?.finish(false);
    throw context.signal.aborted ? context.signal.reason : error;
  } finally {
    context.signal.removeEventListener("abort", onAbort);
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
        archive: archive.name,
        compression: archive.compression,
        target,
        configs: found.configs.map((config) => `${target}/${config.name}`),
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
