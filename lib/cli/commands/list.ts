// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `list` and `config`: what the archive header holds, in the exact format of Proxmox's
 * `vma list` (qemu-server parses it) or as JSON, and the raw bytes of one config.
 *
 * @module
 */
import { writeAll } from "../../_io.ts";
import type { VmaConfigRecord, VmaDeviceRecord, VmaHeaderRecord } from "../../vma/records.ts";
import { VMSTATE_NAME } from "../../vma/format.ts";
import { openArchive } from "../archive_input.ts";
import {
  type Command,
  expectPositionals,
  jsonLine,
  parseCommandArgs,
  printHelp,
} from "../command.ts";
import { type CliContext, writeText } from "../context.ts";
import { CliError, ExitCode } from "../errors.ts";
import { S3_HELP, S3_OPTIONS, type StorageOptions, storageOptions } from "../s3_files.ts";

const LIST_HELP =
  `List the configs and devices of a VMA archive, as Proxmox's 'vma list' prints them.

usage: cli.ts list ARCHIVE|- [--json]

  ARCHIVE            a .vma, .vma.zst, .vma.gz or .vma.lzo file, s3://BUCKET/KEY, or '-'
                     for stdin
  --json             print one JSON object instead of the vma list lines
${S3_HELP}

Output lines (CTIME last, in local time as C's ctime() prints it):
  CFG: size: <bytes> name: <name>
  DEV: dev_id=<id> size: <bytes> devname: <name>
  VMSTATE: dev_id=<id> memory: <bytes>
  CTIME: <ctime>

Only the header is read. permissions: --allow-read (none for stdin; --allow-run=lzop for .lzo);
s3:// needs --allow-net=HOST --allow-env (and --allow-read of ~/.aws/credentials for a profile)`;

const CONFIG_HELP = `Print the raw bytes of a config file stored in a VMA archive.

usage: cli.ts config ARCHIVE|- [-c NAME]

  -c, --config NAME   the config to print (default qemu-server.conf)
${S3_HELP}

permissions: --allow-read (none for stdin); s3:// needs --allow-net=HOST --allow-env`;

/** The archive header: identity, configs and devices. */
export interface ArchiveHeader {
  header: VmaHeaderRecord;
  configs: VmaConfigRecord[];
  devices: VmaDeviceRecord[];
}

/**
 * Reads only the header records of an archive, then stops reading.
 *
 * @example The header of a small archive
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../../mod.ts";
 * import { readArchiveHeader } from "./list.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma" });
 * const uuid = "00000000-0000-4000-8000-000000000000";
 * await Deno.writeFile(path, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0, data: null },
 * ]).pipeThrough(new VmaWriterStream({ uuid, ctime: 1700000000 })));
 * const { header, configs, devices, name } = await readArchiveHeader(path);
 * assert.deepEqual(header, { type: "header", uuid, ctime: 1700000000 });
 * assert.deepEqual(devices, [{ type: "device", devId: 1, name: "drive-scsi0", size: 65536 }]);
 * assert.deepEqual([configs, name], [[], path]);
 * await Deno.remove(path);
 * ```
 */
export async function readArchiveHeader(
  path: string,
  storage: StorageOptions = {},
): Promise<ArchiveHeader & { name: string }> {
  const archive = await openArchive(path, { storage });
  const reader = archive.records.getReader();
  const result: ArchiveHeader = {
    header: { type: "header", uuid: "", ctime: 0 },
    configs: [],
    devices: [],
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      if (value.type === "header") result.header = value;
      else if (value.type === "config") result.configs.push(value);
      else if (value.type === "device") result.devices.push(value);
      else break; // the first cluster: the header is complete
    }
  } finally {
    await reader.cancel().catch(() => {});
  }
  return { ...result, name: archive.name };
}

/**
 * C's `ctime()` text (without the newline), in the process's local time zone.
 *
 * @example In the local time zone
 * ```ts
 * import assert from "node:assert/strict";
 * import { ctimeText } from "./list.ts";
 *
 * const seconds = new Date(2024, 0, 5, 9, 3, 7).getTime() / 1000; // local time
 * assert.equal(ctimeText(seconds), "Fri Jan  5 09:03:07 2024");
 * ```
 */
export function ctimeText(seconds: number): string {
  const date = new Date(seconds * 1000);
  const day = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"][date.getDay()];
  const month =
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][
      date.getMonth()
    ];
  const two = (n: number) => String(n).padStart(2, "0");
  const time = `${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
  return `${day} ${month}${String(date.getDate()).padStart(3)} ${time} ${date.getFullYear()}`;
}

/**
 * The `vma list` lines of a header.
 *
 * @example The lines qemu-server parses
 * ```ts
 * import assert from "node:assert/strict";
 * import { vmaListLines } from "./list.ts";
 *
 * const lines = vmaListLines({
 *   header: { type: "header", uuid: "00000000-0000-4000-8000-000000000000", ctime: 0 },
 *   configs: [{ type: "config", name: "qemu-server.conf", data: new Uint8Array(42) }],
 *   devices: [{ type: "device", devId: 1, name: "drive-scsi0", size: 1073741824 }],
 * }).split("\n");
 * assert.equal(lines[0], "CFG: size: 42 name: qemu-server.conf");
 * assert.equal(lines[1], "DEV: dev_id=1 size: 1073741824 devname: drive-scsi0");
 * assert.match(lines[2]!, /^CTIME: \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d 19(69|70)$/);
 * ```
 */
export function vmaListLines({ header, configs, devices }: ArchiveHeader): string {
  const lines = configs.map((config) =>
    `CFG: size: ${config.data.byteLength} name: ${config.name}`
  );
  for (const device of devices) {
    lines.push(
      device.name === VMSTATE_NAME
        ? `VMSTATE: dev_id=${device.devId} memory: ${device.size}`
        : `DEV: dev_id=${device.devId} size: ${device.size} devname: ${device.name}`,
    );
  }
  lines.push(`CTIME: ${ctimeText(header.ctime)}`);
  return lines.map((line) => `${line}\n`).join("");
}

/**
 * `cli.ts list`: prints an archive's configs and devices as `vma list` does, or as JSON.
 *
 * @example List a small archive
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../../mod.ts";
 * import { listCommand } from "./list.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma" });
 * await Deno.writeFile(path, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0, data: null },
 * ]).pipeThrough(new VmaWriterStream()));
 * let out = "";
 * const write = (bytes: Uint8Array) => {
 *   out += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * assert.equal(await listCommand.run([path], context), 0);
 * assert.match(out, /^DEV: dev_id=1 size: 65536 devname: drive-scsi0\nCTIME: /);
 * await Deno.remove(path);
 * ```
 */
export const listCommand: Command = {
  name: "list",
  help: LIST_HELP,
  async run(args, context) {
    const { values, positionals } = parseCommandArgs("list", args, {
      json: { type: "boolean" },
      ...S3_OPTIONS,
    });
    if (values.help) return await printHelp(context, LIST_HELP);
    expectPositionals("list", positionals, 1);
    const header = await readArchiveHeader(positionals[0]!, storageOptions(values));
    if (!values.json) {
      await writeText(context.stdout, vmaListLines(header));
      return ExitCode.ok;
    }
    await writeText(
      context.stdout,
      jsonLine({
        archive: header.name,
        uuid: header.header.uuid,
        ctime: header.header.ctime,
        ctimeIso: new Date(header.header.ctime * 1000).toISOString(),
        configs: header.configs.map(({ name, data }) => ({ name, size: data.byteLength })),
        devices: header.devices.map(({ devId, name, size }) => ({ devId, name, size })),
      }),
    );
    return ExitCode.ok;
  },
};

/**
 * `cli.ts config`: prints the raw bytes of one config stored in an archive.
 *
 * @example Print a stored config
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../../mod.ts";
 * import { configCommand } from "./list.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma" });
 * const data = new TextEncoder().encode("cores: 2\nmemory: 2048\n");
 * const config = { type: "config" as const, name: "qemu-server.conf", data };
 * await Deno.writeFile(path, ReadableStream.from([config]).pipeThrough(new VmaWriterStream()));
 * let out = "";
 * const write = (bytes: Uint8Array) => {
 *   out += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * assert.equal(await configCommand.run([path], context), 0);
 * assert.equal(out, "cores: 2\nmemory: 2048\n");
 * const missing = configCommand.run([path, "-c", "qemu-server.fw"], context);
 * await assert.rejects(missing, { exitCode: 7, message: /unable to find .*'qemu-server\.fw'/ });
 * await Deno.remove(path);
 * ```
 */
export const configCommand: Command = {
  name: "config",
  help: CONFIG_HELP,
  async run(args, context: CliContext) {
    const { values, positionals } = parseCommandArgs("config", args, {
      config: { type: "string", short: "c" },
      ...S3_OPTIONS,
    });
    if (values.help) return await printHelp(context, CONFIG_HELP);
    expectPositionals("config", positionals, 1);
    const wanted = values.config ?? "qemu-server.conf";
    const { configs } = await readArchiveHeader(positionals[0]!, storageOptions(values));
    const config = configs.find((candidate) => candidate.name === wanted);
    if (config === undefined) {
      throw new CliError(ExitCode.notFound, `unable to find configuration data '${wanted}'`);
    }
    await writeAll(context.stdout, config.data);
    return ExitCode.ok;
  },
};
