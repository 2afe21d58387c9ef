// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `restore --live`: a VM boots on its backup at once, and its disks are copied back while
 * it runs, with stock QEMU.
 *
 * @module
 */
import {
  LiveRestoreError,
  type LiveRestoreMode,
  type LiveRestoreProgress,
  startLiveRestore,
} from "../../live/live_restore.ts";
import { QmpClient } from "../../protocols/qmp_client.ts";
import {
  type Command,
  expectPositionals,
  parseCommandArgs,
  printHelp,
  progressMode,
} from "../command.ts";
import { formatBytes, writeText } from "../context.ts";
import { CliError, ExitCode, InterruptedError, UsageError } from "../errors.ts";
import { Progress } from "../progress.ts";
import { openIndexedArchive } from "../random_access.ts";

const HELP = `Restore a VM from its backup while it runs (live restore, stock QEMU 7.2 or later).

The archive is served read-only over NBD, each disk gets a qcow2 overlay whose backing file
is the served disk, and the VM, started paused on the overlays, runs at once. QEMU copies
the data in the background: block-stream into the overlay when the target is a .qcow2 (the
overlay is the target), or blockdev-mirror to a raw file or block device, to which the VM is
switched once in sync (block-job-complete). Then the NBD nodes are removed and the serving
stops. Guest writes made meanwhile are kept.

usage: cli.ts restore --live ARCHIVE --qmp SOCKET --drive NAME=TARGET...
                      [--mode stream|mirror] [--speed BYTES] [--force] [--index FILE]
                      [--wait SECONDS] [--work-dir DIR] [--progress auto|json|none]

  ARCHIVE            a seekable .vma.zst or a plain .vma (see 'cli.ts serve --help')
  --qmp SOCKET       the VM's QMP monitor for this tool. Start QEMU with
                     -S -qmp unix:SOCKET,server=on,wait=on: it then waits for this tool
                     before it opens its disks, so the two may start in any order
  --drive NAME=TARGET  the archive's disk NAME (with or without drive-) goes to TARGET:
                     a new .qcow2 (stream; start the VM on TARGET) or a raw file or block
                     device (mirror; start the VM on the overlay this prints). Repeatable
  --mode MODE        stream or mirror for every drive (default: by the target, as above)
  --speed BYTES      most bytes per second QEMU copies (default: no limit)
  --force            replace existing targets (needed for block devices, always written)
  --index FILE       the sidecar index of a plain .vma (default ARCHIVE.idx if it exists)
  --wait SECONDS     how long to wait for the VM's monitor (default 300)
  --work-dir DIR     the private NBD socket and mirror overlays (default: a temporary one)
  --progress MODE    auto, json or none

If anything fails (a read error, a QEMU job error, Ctrl-C), the VM is stopped, never left
running on half-copied disks, and the message says what is where.
permissions: --allow-read --allow-write --allow-net --allow-run=qemu-img`;

/**
 * `cli.ts restore --live`: serves the archive, prepares the overlays, attaches the VM and
 * copies the disks back while it runs.
 *
 * @example Without --live there is nothing to do
 * ```ts
 * import assert from "node:assert/strict";
 * import { restoreCommand } from "./restore.ts";
 *
 * let err = "";
 * const write = (bytes: Uint8Array) => {
 *   err += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * await assert.rejects(restoreCommand.run(["vm.vma.zst"], context), /needs --live/);
 * ```
 */
export const restoreCommand: Command = {
  name: "restore",
  help: HELP,
  async run(args, context) {
    const { values, positionals } = parseCommandArgs("restore", args, {
      live: { type: "boolean" },
      qmp: { type: "string" },
      drive: { type: "string", multiple: true },
      mode: { type: "string" },
      speed: { type: "string" },
      force: { type: "boolean" },
      index: { type: "string" },
      wait: { type: "string" },
      "work-dir": { type: "string" },
      progress: { type: "string" },
    });
    if (values.help) return await printHelp(context, HELP);
    if (!values.live) {
      throw new UsageError(
        "restore needs --live (for an offline restore use 'cli.ts extract', see 'cli.ts restore --help')",
      );
    }
    expectPositionals("restore", positionals, 1);
    if (values.qmp === undefined) throw new UsageError("restore --live needs --qmp SOCKET");
    if (!values.drive?.length) throw new UsageError("restore --live needs --drive NAME=TARGET");
    const drives = values.drive.map(parseDriveSpec);
    const mode = parseMode(values.mode);
    const speed = positiveNumber("--speed", values.speed);
    const waitSeconds = positiveNumber("--wait", values.wait) ?? 300;
    const progressKind = progressMode(values.progress);

    const archive = await openIndexedArchive(positionals[0]!, { indexPath: values.index });
    try {
      const restore = await startLiveRestore({
        archive,
        drives: drives.map((drive) => ({ ...drive, ...(mode && { mode }) })),
        force: values.force === true,
        workDir: values["work-dir"],
      }).catch((error) => {
        if (error instanceof RangeError) {
          const notFound = /has no disk named/.test(error.message);
          throw new CliError(notFound ? ExitCode.notFound : ExitCode.usage, error.message);
        }
        throw error;
      });
      try {
        for (const drive of restore.drives) {
          await writeText(
            context.stderr,
            drive.mode === "stream"
              ? `${drive.disk}: start the VM on ${drive.overlay} (qcow2); it reads the backup until the copy is done\n`
              : `${drive.disk}: start the VM on the overlay ${drive.overlay} (qcow2); it moves to ${drive.target} once copied\n`,
          );
        }
        await writeText(
          context.stderr,
          `waiting for the VM's monitor at ${values.qmp} (start QEMU paused: -S -qmp unix:${values.qmp},server=on,wait=on ${
            restore.qemuOptions().join(" ")
          })\n`,
        );
        using qmp = await connectWhenReady(values.qmp, waitSeconds, context.signal);
        const total = restore.drives.reduce((sum, drive) => sum + drive.size, 0);
        const progress = new Progress(context, { mode: progressKind, command: "restore", total });
        const phases = new Map<string, string>();
        let reported = 0;
        const onProgress = async (drives: readonly LiveRestoreProgress[]) => {
          for (const drive of drives) {
            if (phases.get(drive.disk) === drive.phase) continue;
            phases.set(drive.disk, drive.phase);
            await writeText(context.stderr, phaseLine(drive, restore.drives));
          }
          const done = drives.reduce((sum, drive) => sum + drive.done, 0);
          progress.add(Math.max(0, done - reported));
          reported = Math.max(reported, done);
        };
        let result;
        try {
          result = await restore.complete(qmp, {
            onProgress,
            signal: context.signal,
            ...(speed !== undefined && { speed }),
          });
        } catch (error) {
          await progress.finish(false);
          throw asCliError(error, context.signal);
        }
        await progress.finish(true);
        for (const warning of result.warnings) {
          await writeText(context.stderr, `warning: ${warning}\n`);
        }
        await writeText(
          context.stderr,
          `restored ${result.drives.length} disk(s) of ${formatBytes(total)}; the VM runs on ${
            result.drives.map((drive) => drive.target).join(", ")
          } and the backup is no longer served\n`,
        );
        return ExitCode.ok;
      } finally {
        await restore.close();
      }
    } finally {
      archive.close();
    }
  },
};

function phaseLine(
  progress: LiveRestoreProgress,
  drives: readonly { disk: string; mode: LiveRestoreMode; target: string }[],
): string {
  const drive = drives.find((candidate) => candidate.disk === progress.disk)!;
  switch (progress.phase) {
    case "copying":
      return `${drive.disk}: copying (${
        drive.mode === "stream" ? "block-stream into" : "blockdev-mirror to"
      } ${drive.target}); the VM is running\n`;
    case "ready":
      return `${drive.disk}: in sync, switching the VM over to ${drive.target}\n`;
    case "done":
      return `${drive.disk}: done, ${formatBytes(progress.total)} copied\n`;
  }
}

/** The one-line error of a failed restore, with the signal's exit code when there was one. */
function asCliError(error: unknown, signal: AbortSignal): unknown {
  if (!(error instanceof LiveRestoreError)) return error;
  const reason = signal.reason;
  if (signal.aborted && reason instanceof InterruptedError) {
    return new CliError(
      reason.exitCode,
      error.message.replace(/^live restore failed: [^;]*/, `live restore ${reason.message}`),
    );
  }
  return new CliError(ExitCode.failure, error.message);
}

/**
 * Connects to the VM's monitor once QEMU has created it, for up to `seconds`. QEMU started
 * with `wait=on` opens its disks only after this connection, so the overlays exist by then.
 */
async function connectWhenReady(
  path: string,
  seconds: number,
  signal: AbortSignal,
): Promise<QmpClient> {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    signal.throwIfAborted();
    try {
      return await QmpClient.connect(path);
    } catch (error) {
      const absent = error instanceof Deno.errors.NotFound ||
        error instanceof Deno.errors.ConnectionRefused;
      if (!absent) {
        throw new CliError(
          ExitCode.failure,
          `cannot talk to the VM at ${path}: ${error instanceof Error ? error.message : error}`,
        );
      }
      if (Date.now() > deadline) {
        throw new CliError(
          ExitCode.failure,
          `no VM monitor appeared at ${path} within ${seconds} s (nothing was changed)`,
        );
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/**
 * Reads `--drive NAME=TARGET`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseDriveSpec } from "./restore.ts";
 *
 * assert.deepEqual(parseDriveSpec("scsi0=/var/lib/vz/disk.qcow2"), {
 *   disk: "scsi0",
 *   target: "/var/lib/vz/disk.qcow2",
 * });
 * assert.throws(() => parseDriveSpec("disk.qcow2"), /NAME=TARGET/);
 * ```
 */
export function parseDriveSpec(value: string): { disk: string; target: string } {
  const at = value.indexOf("=");
  if (at <= 0 || at === value.length - 1) {
    throw new UsageError(`--drive must be NAME=TARGET, not '${value}'`);
  }
  return { disk: value.slice(0, at), target: value.slice(at + 1) };
}

function parseMode(value: string | undefined): LiveRestoreMode | undefined {
  if (value === undefined || value === "stream" || value === "mirror") return value;
  throw new UsageError(`--mode must be stream or mirror, not '${value}'`);
}

function positiveNumber(flag: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const number = Number(value);
  if (!Number.isSafeInteger(number) || number <= 0) {
    throw new UsageError(`${flag} must be a positive whole number, not '${value}'`);
  }
  return number;
}
