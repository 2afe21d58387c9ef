// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `demo`: builds a sample VM, backs it up to .vma.zst, verifies, extracts and compares.
 *
 * @module
 */
import { readUpTo, writeAll } from "../../_io.ts";
import { type Command, parseCommandArgs, printHelp } from "../command.ts";
import { type CliContext, formatBytes, formatRate, writeText } from "../context.ts";
import { CliError, ExitCode } from "../errors.ts";
import { backupCommand } from "./backup.ts";
import { extractCommand } from "./extract.ts";
import { verifyCommand } from "./verify.ts";

const HELP = `Run the whole job on a built-in sample VM: a sparse 1 GiB system disk holding a few
MiB of varied data, a 540672-byte EFI vars disk and a qemu-server.conf. Backs it up to
.vma.zst, verifies the archive, extracts it and compares every byte.

usage: cli.ts demo [--dir DIR] [--keep]

  --dir DIR   work in DIR (created; must not exist) instead of a temporary directory
  --keep      keep the work directory

permissions: --allow-read --allow-write (deno task demo adds --allow-ffi, to skip the holes)`;

const GiB = 2 ** 30;
const MiB = 2 ** 20;

/**
 * Writes the sample VM's files into `dir`.
 *
 * @example A 1 GiB disk that takes a few MiB
 * ```ts
 * import assert from "node:assert/strict";
 * import { createSampleVm } from "./demo.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const vm = await createSampleVm(dir);
 * assert.deepEqual(vm.disks, [
 *   `drive-scsi0=${dir}/vm-100-disk-0.raw`,
 *   `drive-efidisk0=${dir}/vm-100-disk-1.raw`,
 * ]);
 * assert.equal((await Deno.stat(`${dir}/vm-100-disk-0.raw`)).size, 2 ** 30);
 * assert.match(await Deno.readTextFile(vm.config), /^scsi0: local-lvm:vm-100-disk-0,size=1G$/m);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function createSampleVm(dir: string): Promise<{ disks: string[]; config: string }> {
  const system = `${dir}/vm-100-disk-0.raw`;
  const efi = `${dir}/vm-100-disk-1.raw`;
  const config = `${dir}/qemu-server.conf`;
  {
    using file = await Deno.open(system, { write: true, createNew: true });
    await file.truncate(GiB); // sparse: only the pieces below take space
    const pieces: [number, Uint8Array][] = [
      [0, bootSector()],
      [1 * MiB, text(2 * MiB)],
      [100 * MiB, noise(1 * MiB, 7)],
      [300 * MiB, pattern(1 * MiB)],
      [512 * MiB + 12288, noise(20_000, 9)], // not cluster-aligned, partial blocks
      [GiB - 65536, text(65536)],
    ];
    for (const [offset, bytes] of pieces) {
      await file.seek(offset, Deno.SeekMode.Start);
      await writeAll(file, bytes);
    }
  }
  const vars = new Uint8Array(540672); // not a multiple of 64 KiB, like OVMF's vars store
  vars.set(noise(8192, 3), 0);
  vars.set(text(4096), 540672 - 4096);
  await Deno.writeFile(efi, vars, { createNew: true });
  await Deno.writeTextFile(
    config,
    [
      "boot: order=scsi0",
      "cores: 2",
      "efidisk0: local-lvm:vm-100-disk-1,efitype=4m,size=528K",
      "memory: 2048",
      "name: demo",
      "scsi0: local-lvm:vm-100-disk-0,size=1G",
      "scsihw: virtio-scsi-single",
      "#qmdump#map:efidisk0:drive-efidisk0:local-lvm:raw:",
      "#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:",
      "",
    ].join("\n"),
    { createNew: true },
  );
  return { disks: [`drive-scsi0=${system}`, `drive-efidisk0=${efi}`], config };
}

function bootSector(): Uint8Array {
  const sector = noise(512, 1);
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

function text(length: number): Uint8Array {
  const words = ["backup", "cluster", "extent", "vzdump", "qemu", "zstd", "disk", "sparse", "copy"];
  let line = 0;
  let out = "";
  while (out.length < length) {
    out += `${line} ${words[line % words.length]} ${words[(line * 7) % words.length]} ok\n`;
    line++;
  }
  return new TextEncoder().encode(out.slice(0, length));
}

function noise(length: number, seed: number): Uint8Array {
  const bytes = new Uint8Array(length);
  let state = seed * 2654435761 | 1;
  for (let i = 0; i < length; i++) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    bytes[i] = state;
  }
  return bytes;
}

function pattern(length: number): Uint8Array {
  return new Uint8Array(length).map((_, i) => (i % 251) & 0xff);
}

/**
 * Compares two files byte for byte in 1 MiB steps; returns the first differing offset.
 *
 * @example Equal files, and a changed byte
 * ```ts
 * import assert from "node:assert/strict";
 * import { firstDifference } from "./demo.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const bytes = new Uint8Array(3_000_000);
 * await Deno.writeFile(`${dir}/a`, bytes);
 * await Deno.writeFile(`${dir}/b`, bytes);
 * assert.equal(await firstDifference(`${dir}/a`, `${dir}/b`), undefined);
 * bytes[2_500_000] = 1;
 * await Deno.writeFile(`${dir}/b`, bytes);
 * assert.equal(await firstDifference(`${dir}/a`, `${dir}/b`), 2_500_000);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function firstDifference(a: string, b: string): Promise<number | undefined> {
  using fileA = await Deno.open(a);
  using fileB = await Deno.open(b);
  const bufferA = new Uint8Array(MiB);
  const bufferB = new Uint8Array(MiB);
  for (let offset = 0;;) {
    const [countA, countB] = [await readUpTo(fileA, bufferA), await readUpTo(fileB, bufferB)];
    if (countA !== countB) return offset + Math.min(countA, countB);
    for (let i = 0; i < countA; i++) if (bufferA[i] !== bufferB[i]) return offset + i;
    if (countA < MiB) return undefined;
    offset += countA;
  }
}

/** Runs a command with `--json` in-process and returns its JSON result. */
async function runJson(command: Command, args: string[], context: CliContext) {
  const chunks: Uint8Array<ArrayBuffer>[] = [];
  const capture = {
    write(bytes: Uint8Array) {
      chunks.push(bytes.slice());
      return Promise.resolve(bytes.byteLength);
    },
  };
  const code = await command.run([...args, "--json", "--progress", "none"], {
    ...context,
    stdout: capture,
  });
  const result = JSON.parse(new TextDecoder().decode(await new Blob(chunks).bytes()));
  if (code !== 0) {
    throw new CliError(code, `demo: ${command.name} failed: ${JSON.stringify(result)}`);
  }
  return result;
}

/**
 * `cli.ts demo`: backs up, verifies, extracts and compares a built-in sample VM.
 *
 * @example Its help (a full run backs up and compares a 1 GiB disk, which takes seconds)
 * ```ts
 * import assert from "node:assert/strict";
 * import { demoCommand } from "./demo.ts";
 *
 * let out = "";
 * const write = (bytes: Uint8Array) => {
 *   out += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * assert.equal(await demoCommand.run(["--help"], context), 0);
 * assert.match(out, /^usage: cli\.ts demo \[--dir DIR\] \[--keep\]$/m);
 * ```
 */
export const demoCommand: Command = {
  name: "demo",
  help: HELP,
  async run(args, context) {
    const { values } = parseCommandArgs("demo", args, {
      dir: { type: "string" },
      keep: { type: "boolean" },
    });
    if (values.help) return await printHelp(context, HELP);
    const dir = values.dir ?? await Deno.makeTempDir({ prefix: "vmabackup-demo-" });
    if (values.dir !== undefined) await Deno.mkdir(dir);
    const say = (line: string) => writeText(context.stdout, `${line}\n`);
    try {
      await say(`demo: working in ${dir}`);
      const vm = await createSampleVm(dir);
      const archive = `${dir}/vzdump-qemu-100-demo.vma.zst`;
      const backup = await runJson(
        backupCommand,
        [...vm.disks.flatMap((disk) => ["--disk", disk]), "--config", vm.config, "-o", archive],
        context,
      );
      await say(
        `backup:  ${backup.disks.length} disks, ${formatBytes(backup.diskBytes)} (${
          formatBytes(backup.dataBytes)
        } of data) → ${formatBytes(backup.outputBytes)} zstd, ratio ${
          (backup.dataBytes / backup.outputBytes).toFixed(2)
        } on data, ${
          (backup.diskBytes / backup.outputBytes).toFixed(0)
        } on disk size; ${backup.seconds} s, ${formatRate(backup.diskBytes, backup.seconds)}`,
      );
      const verify = await runJson(verifyCommand, [archive], context);
      await say(
        `verify:  ok, ${verify.extents} extents, ${verify.clusters} clusters (${verify.zeroClusters} zero); ${verify.seconds} s, ${
          formatRate(verify.diskBytes, verify.seconds)
        }`,
      );
      const extract = await runJson(extractCommand, [archive, `${dir}/restore`], context);
      await say(
        `extract: ${extract.disks.length} disks and ${extract.configs.length} config into ${dir}/restore; ${extract.seconds} s`,
      );
      const pairs = [
        [`${dir}/vm-100-disk-0.raw`, `${dir}/restore/disk-drive-scsi0.raw`],
        [`${dir}/vm-100-disk-1.raw`, `${dir}/restore/disk-drive-efidisk0.raw`],
        [vm.config, `${dir}/restore/qemu-server.conf`],
      ];
      for (const [original, restored] of pairs) {
        const difference = await firstDifference(original!, restored!);
        if (difference !== undefined) {
          throw new CliError(
            ExitCode.failure,
            `demo: ${restored} differs from ${original} at byte ${difference}`,
          );
        }
      }
      await say("compare: every restored byte equals the original");
      return ExitCode.ok;
    } finally {
      if (!values.keep) await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
};
