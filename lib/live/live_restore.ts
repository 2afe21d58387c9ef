// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Live restore on stock QEMU: a VM boots on its backup at once and runs while its disks are
 * copied in the background. The archive is served read-only over NBD; each disk of the VM
 * is a qcow2 overlay whose backing file is the served disk; once the VM is attached, QEMU
 * copies the data (`block-stream` into the overlay, or `blockdev-mirror` to any target), the
 * NBD nodes are removed, and the serving stops. Nothing of QEMU is patched.
 *
 * @module
 */
import { isAbsolute, resolve } from "node:path";
import { archiveExports } from "../access/archive_exports.ts";
import type { IndexedArchive } from "../access/indexed_archive.ts";
import { NbdServer } from "../protocols/nbd_server.ts";
import type { QmpClient, QmpEvent } from "../protocols/qmp_client.ts";
import { createImage } from "../qemu/qemu_img.ts";
import { spawnQemuTool } from "../qemu/spawn.ts";
import { tearDown } from "./session.ts";

/**
 * How a disk is copied: `stream` pulls the data into the overlay, which becomes the final
 * qcow2 image (`block-stream`); `mirror` copies the overlay to another target, raw file,
 * block device or qcow2, and moves the VM's disk there (`blockdev-mirror`).
 */
export type LiveRestoreMode = "stream" | "mirror";

/** One disk of a live restore. */
export interface LiveRestoreDriveOptions {
  /** The archive's disk, with or without `drive-`. */
  disk: string;
  /** Where the disk ends up: a new `.qcow2` image, a raw file or a block device. */
  target: string;
  /** Default: `stream` for a `.qcow2` target, `mirror` for anything else. */
  mode?: LiveRestoreMode | undefined;
}

/** Options of {@linkcode startLiveRestore}. */
export interface LiveRestoreOptions {
  /** The archive, opened for random reads. */
  archive: IndexedArchive;
  /** The disks to restore and their targets. */
  drives: readonly LiveRestoreDriveOptions[];
  /** Private socket and mirror overlays; default a new temporary directory. */
  workDir?: string | undefined;
  /** Replace existing targets (a block device is always overwritten, so it needs this too). */
  force?: boolean | undefined;
}

/** A disk being restored, as the VM must be started for it. */
export interface LiveRestoreDrive {
  /** The archive's name of the disk (`drive-scsi0`). */
  readonly disk: string;
  /** Its size in bytes. */
  readonly size: number;
  /** How it is copied. */
  readonly mode: LiveRestoreMode;
  /** The final image (absolute path). */
  readonly target: string;
  /** Format of the final image. */
  readonly targetFormat: "qcow2" | "raw";
  /**
   * The qcow2 image the VM must be started on (absolute path): the target itself for
   * `stream`, a temporary overlay in the work directory for `mirror`.
   */
  readonly overlay: string;
  /** The NBD URI its overlay's backing file points at. */
  readonly uri: string;
}

/** How far the copy of one disk is. */
export interface LiveRestoreProgress {
  /** The archive's name of the disk. */
  disk: string;
  /** `copying`, `ready` (a mirror in sync, about to switch), `done`. */
  phase: "copying" | "ready" | "done";
  /** Bytes copied so far, as QEMU counts them. */
  done: number;
  /** Bytes to copy, as QEMU counts them. */
  total: number;
}

/** Options of {@linkcode LiveRestore.complete}. */
export interface LiveRestoreCompleteOptions {
  /**
   * Hears how far each disk is: once the copies run, every `pollMs`, and at each phase
   * change (before a mirror is switched over). A returned promise is waited for.
   */
  onProgress?:
    | ((progress: readonly LiveRestoreProgress[]) => void | Promise<void>)
    | undefined;
  /** Most bytes per second QEMU copies (default: no limit), to spare the archive's storage. */
  speed?: number | undefined;
  /** Stops the restore: the VM is stopped, the jobs cancelled. */
  signal?: AbortSignal | undefined;
  /** Milliseconds between progress reports (default 1000). */
  pollMs?: number | undefined;
  /** Seconds to wait for QEMU to set up and tear down (default 60). */
  timeoutSeconds?: number | undefined;
}

/** What a finished live restore left to know. */
export interface LiveRestoreResult {
  /** Per disk, where the VM's disk is now. */
  drives: { disk: string; target: string; node: string }[];
  /** Things that went wrong but did not stop the restore (a node that could not be removed). */
  warnings: string[];
}

/**
 * A live restore failed. `vmStopped` says whether the VM was stopped (it then must not be
 * continued: its disks are incomplete); the message says what is where.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { LiveRestoreError } from "./live_restore.ts";
 *
 * const error = new LiveRestoreError("live restore failed: ...; the VM is stopped", true);
 * assert.equal(error.name, "LiveRestoreError");
 * assert.ok(error.vmStopped);
 * ```
 */
export class LiveRestoreError extends Error {
  /** The VM was stopped. */
  readonly vmStopped: boolean;
  /** An error with `message`; `vmStopped` as it is. */
  constructor(message: string, vmStopped: boolean, options?: ErrorOptions) {
    super(message, options);
    this.name = "LiveRestoreError";
    this.vmStopped = vmStopped;
  }
}

interface NodeInfo {
  "node-name": string;
  drv: string;
  file: string;
  backing_file?: string;
  image?: { filename?: string; "backing-filename"?: string };
}

interface Job {
  drive: LiveRestoreDrive;
  id: string;
  overlayNode: string;
  targetNode: string | undefined;
  state: "none" | "running" | "ready" | "done" | "failed";
  done: number;
  total: number;
}

const PREFIX = "vmabackup-restore";
/** Node names and job ids: QEMU allows 31 characters. */
const NODE_PREFIX = "vmab-restore";

/**
 * Prepares a live restore: serves the archive's disks over NBD on a private unix socket
 * and creates, for each disk, the qcow2 overlay whose backing file is the served disk (and,
 * for `mirror`, the empty target). The VM is then started paused (`-S`) on the overlays,
 * and {@linkcode LiveRestore.complete} attaches it. Needs `--allow-run=qemu-img`.
 *
 * @example Serve a backup, start the VM on it, copy it back while it runs
 * ```ts ignore
 * import { fileRangeReader, IndexedArchive, QmpClient, startLiveRestore } from "../../mod.ts";
 *
 * const archive = await IndexedArchive.open(await fileRangeReader("vm-100.vma.zst"));
 * await using restore = await startLiveRestore({
 *   archive,
 *   drives: [{ disk: "drive-scsi0", target: "/var/lib/vz/vm-100-disk-0.qcow2" }],
 * });
 * // qemu-system-x86_64 -S -qmp unix:/run/vm-100.qmp,server=on,wait=on \
 * //   -drive file=/var/lib/vz/vm-100-disk-0.qcow2,format=qcow2,if=virtio ...
 * using qmp = await QmpClient.connect("/run/vm-100.qmp");
 * await restore.complete(qmp, { onProgress: (p) => console.log(p) });
 * ```
 */
export async function startLiveRestore(options: LiveRestoreOptions): Promise<LiveRestore> {
  const { archive } = options;
  const drives = options.drives.map((spec) => {
    const device = archive.device(spec.disk);
    if (device === undefined) {
      const names = archive.devices.map((d) => d.name).join(", ");
      throw new RangeError(`The archive has no disk named '${spec.disk}' (it has ${names})`);
    }
    const target = isAbsolute(spec.target) ? spec.target : resolve(spec.target);
    const targetFormat = /\.qcow2$/i.test(target) ? "qcow2" as const : "raw" as const;
    const mode = spec.mode ?? (targetFormat === "qcow2" ? "stream" : "mirror");
    if (mode === "stream" && targetFormat !== "qcow2") {
      throw new RangeError(
        `Cannot stream ${device.name} into ${spec.target}: block-stream needs a .qcow2 target (use mirror for raw files and block devices)`,
      );
    }
    return { device, target, targetFormat, mode };
  });
  if (drives.length === 0) throw new RangeError("A live restore needs at least one disk");
  for (const [i, drive] of drives.entries()) {
    const twice = drives.findIndex((other) =>
      other.device.devId === drive.device.devId || other.target === drive.target
    );
    if (twice !== i) {
      throw new RangeError(
        `Cannot restore ${drive.device.name} to ${drive.target}: the disk or the target is given twice`,
      );
    }
  }
  const ownDir = options.workDir === undefined;
  const dir = options.workDir ?? await Deno.makeTempDir({ prefix: `${PREFIX}-` });
  const created: string[] = [];
  let server: NbdServer | undefined;
  try {
    // QEMU reads 64 KiB (guest reads) to 512 KiB (block-stream) at a time: 512 KiB requests at
    // most, half a MiB in flight per connection, keep the replies' memory small.
    const exports = archiveExports(archive, {
      disks: drives.map((d) => d.device.name),
      maximumRead: 512 << 10,
    });
    server = NbdServer.listen({ path: `${dir}/nbd.sock` }, exports, {
      maxConnections: 16,
      maxInFlightBytes: 512 << 10,
    });
    const prepared: LiveRestoreDrive[] = [];
    for (const drive of drives) {
      const { device, target, targetFormat, mode } = drive;
      const uri = server.uri(device.name);
      const overlay = mode === "stream" ? target : `${dir}/${device.name}.overlay.qcow2`;
      await prepareTarget(target, targetFormat, device.size, options.force === true, mode, created);
      await createOverlay(overlay, uri, device.size);
      created.push(overlay);
      prepared.push({
        disk: device.name,
        size: device.size,
        mode,
        target,
        targetFormat,
        overlay,
        uri,
      });
    }
    return new LiveRestore(prepared, server, dir, ownDir, created);
  } catch (error) {
    await server?.close();
    for (const path of created.reverse()) await Deno.remove(path).catch(() => {});
    if (ownDir) await Deno.remove(dir, { recursive: true }).catch(() => {});
    throw error;
  }
}

/**
 * A prepared live restore: the archive is being served and the overlays exist. Start the
 * VM paused on {@linkcode LiveRestoreDrive.overlay} for every drive, then call
 * {@linkcode LiveRestore.complete}. {@linkcode LiveRestore.close} stops serving (and,
 * before the VM was attached, removes what was created).
 *
 * @example Prepare a restore: the overlay's backing file is the served disk
 * ```ts
 * import assert from "node:assert/strict";
 * import {
 *   archiveOutput, fileRangeReader, IndexedArchive, rawDiskSource, startLiveRestore,
 *   VmaWriterStream, ZeroFilterStream,
 * } from "../../mod.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeFile(`${dir}/disk.raw`, new Uint8Array(1 << 20).fill(3));
 * await Deno.writeFile(`${dir}/vm.vma.zst`, rawDiskSource(`${dir}/disk.raw`, { name: "drive-vda" })
 *   .pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
 *   .pipeThrough(archiveOutput({ compression: "zstd" })));
 * const archive = await IndexedArchive.open(await fileRangeReader(`${dir}/vm.vma.zst`));
 * const restore = await startLiveRestore({
 *   archive,
 *   drives: [{ disk: "vda", target: `${dir}/vda.qcow2` }],
 * });
 * const [drive] = restore.drives;
 * assert.deepEqual([drive!.mode, drive!.overlay], ["stream", `${dir}/vda.qcow2`]);
 * assert.match(drive!.uri, /^nbd\+unix:\/\/\/drive-vda\?socket=/);
 * assert.deepEqual(restore.qemuOptions(), ["-drive", `file=${dir}/vda.qcow2,format=qcow2,if=virtio`]);
 * await restore.close(); // the VM never came: the overlay goes again
 * await assert.rejects(Deno.stat(`${dir}/vda.qcow2`), Deno.errors.NotFound);
 * archive.close();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export class LiveRestore implements AsyncDisposable {
  /** The disks, with the overlay the VM must use for each. */
  readonly drives: readonly LiveRestoreDrive[];
  /** The NBD server of the archive's disks. */
  readonly server: NbdServer;
  /** The work directory (private socket, mirror overlays). */
  readonly workDir: string;
  #ownDir: boolean;
  #created: string[];
  #state: "prepared" | "attaching" | "done" | "failed" = "prepared";
  #closing: Promise<void> | undefined;

  /** Made by {@linkcode startLiveRestore}. */
  constructor(
    drives: LiveRestoreDrive[],
    server: NbdServer,
    workDir: string,
    ownDir: boolean,
    created: string[],
  ) {
    this.drives = drives;
    this.server = server;
    this.workDir = workDir;
    this.#ownDir = ownDir;
    this.#created = created;
  }

  /**
   * QEMU options that attach the overlays, one `-drive` per disk on virtio, for a VM that
   * has no disk configuration of its own; with one, point its drives at the overlays.
   *
   * @example
   * ```ts ignore
   * console.log(restore.qemuOptions().join(" "));
   * // -drive file=/var/lib/vz/vm-100-disk-0.qcow2,format=qcow2,if=virtio
   * ```
   */
  qemuOptions(): string[] {
    return this.drives.flatMap((drive) => [
      "-drive",
      `file=${drive.overlay.replaceAll(",", ",,")},format=qcow2,if=virtio`,
    ]);
  }

  /**
   * Attaches the VM at `qmp`, which must have been started on the overlays, paused (`-S`)
   * or running: starts QEMU's copy jobs (`block-stream`, or `blockdev-add` of the target and
   * `blockdev-mirror`), then `cont`; waits for the copies (a mirror is switched over with
   * `block-job-complete` once in sync), removes the NBD nodes (`blockdev-del` where they
   * are the monitor's), and stops serving. Guest writes made meanwhile are in the final
   * images.
   *
   * On any failure (a job error, a read the archive could not serve, QEMU gone, `signal`)
   * the VM is stopped and the jobs cancelled, so it never runs on disks that are partly
   * copied, and a {@linkcode LiveRestoreError} says so. The overlays are kept: the stopped
   * VM uses them, and they hold what the guest wrote.
   */
  async complete(
    qmp: QmpClient,
    options: LiveRestoreCompleteOptions = {},
  ): Promise<LiveRestoreResult> {
    if (this.#state !== "prepared") {
      throw new Error(`Cannot attach the VM: This restore is ${this.#state}`);
    }
    this.#state = "attaching";
    const timeoutMs = (options.timeoutSeconds ?? 60) * 1000;
    const pollMs = options.pollMs ?? 1000;
    const tag = crypto.randomUUID().slice(0, 8);
    const jobs: Job[] = [];
    let continued = false;
    try {
      const status = (await qmp.execute("query-status") as { status: string }).status;
      if (!["prelaunch", "paused", "running", "suspended"].includes(status)) {
        throw new Error(`the VM is ${status}, not paused or running`);
      }
      const nodes = await qmp.execute("query-named-block-nodes", { flat: true }) as NodeInfo[];
      this.drives.forEach((drive, index) => {
        jobs.push({
          drive,
          id: `${NODE_PREFIX}-${tag}-${index}`,
          overlayNode: this.#overlayNode(nodes, drive),
          targetNode: drive.mode === "mirror" ? `${NODE_PREFIX}-${tag}-t${index}` : undefined,
          state: "none",
          done: 0,
          total: drive.size,
        });
      });
      for (const job of jobs) await this.#startJob(qmp, job, options.speed);
      if (status !== "running") {
        await qmp.execute("cont");
        continued = true;
      }
      await this.#waitForJobs(qmp, jobs, options, pollMs);
      const warnings = await this.#removeNodes(qmp, jobs);
      await this.server.close();
      for (const job of jobs) {
        if (job.drive.mode === "mirror") await Deno.remove(job.drive.overlay).catch(() => {});
      }
      this.#state = "done";
      return {
        drives: jobs.map((job) => ({
          disk: job.drive.disk,
          target: job.drive.target,
          node: job.targetNode ?? job.overlayNode,
        })),
        warnings,
      };
    } catch (error) {
      const touched = continued || jobs.some((job) => job.state !== "none");
      // A VM that never ran and has no job left the overlays unused: as if never attached.
      this.#state = touched ? "failed" : "prepared";
      throw await this.#fail(qmp, jobs, error, continued, timeoutMs);
    }
  }

  /** Stops serving; removes what was created if the VM was never attached. */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  /** Same as {@linkcode LiveRestore.close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  async #close(): Promise<void> {
    await this.server.close();
    if (this.#state === "prepared") {
      for (const path of [...this.#created].reverse()) await Deno.remove(path).catch(() => {});
    }
    if (this.#ownDir) {
      // After a failure the stopped VM may still use the mirror overlays in it.
      await Deno.remove(this.workDir, { recursive: this.#state !== "failed" }).catch(() => {});
    }
  }

  /** The VM's node of `drive`'s overlay: the qcow2 node on its file or its backing URI. */
  #overlayNode(nodes: NodeInfo[], drive: LiveRestoreDrive): string {
    const node = nodes.find((candidate) =>
      candidate.drv === "qcow2" &&
      (candidate.file === drive.overlay || candidate.image?.filename === drive.overlay ||
        candidate.backing_file === drive.uri ||
        candidate.image?.["backing-filename"] === drive.uri)
    );
    if (node === undefined) {
      throw new Error(
        `the VM does not use ${drive.overlay} for ${drive.disk}: start it on that image (for example -drive file=${drive.overlay},format=qcow2,if=virtio)`,
      );
    }
    return node["node-name"];
  }

  async #startJob(qmp: QmpClient, job: Job, speed: number | undefined): Promise<void> {
    const { drive } = job;
    const limit = speed === undefined ? {} : { speed };
    if (drive.mode === "stream") {
      await qmp.execute("block-stream", { "job-id": job.id, device: job.overlayNode, ...limit });
    } else {
      const device = await isBlockDevice(drive.target);
      await qmp.execute("blockdev-add", {
        "node-name": job.targetNode,
        driver: drive.targetFormat,
        discard: "unmap",
        file: { driver: device ? "host_device" : "file", filename: drive.target },
      });
      await qmp.execute("blockdev-mirror", {
        "job-id": job.id,
        device: job.overlayNode,
        target: job.targetNode,
        sync: "full",
        ...limit,
      });
    }
    job.state = "running";
  }

  async #waitForJobs(
    qmp: QmpClient,
    jobs: Job[],
    options: LiveRestoreCompleteOptions,
    pollMs: number,
  ): Promise<void> {
    const byId = new Map(jobs.map((job) => [job.id, job]));
    const report = async () => await options.onProgress?.(jobs.map(progressOf));
    const poll = async () => {
      const running = await qmp.execute("query-block-jobs") as {
        device: string;
        offset: number;
        len: number;
      }[];
      for (const info of running) {
        const job = byId.get(info.device);
        if (job === undefined || job.state === "done") continue;
        job.done = info.offset;
        job.total = info.len;
      }
      await report();
    };
    await report();
    while (jobs.some((job) => job.state !== "done")) {
      let event: QmpEvent;
      try {
        event = await qmp.waitForEvent(
          (e) => byId.has(e.data?.device as string) && JOB_EVENTS.includes(e.event),
          {
            timeoutMs: pollMs,
            description: "a block job event",
            ...(options.signal !== undefined && { signal: options.signal }),
          },
        );
      } catch (error) {
        if (!(error instanceof Deno.errors.TimedOut)) throw error;
        await poll();
        continue;
      }
      options.signal?.throwIfAborted();
      const job = byId.get(event.data!.device as string)!;
      const data = event.data as { offset?: number; len?: number; error?: string };
      if (typeof data.offset === "number") job.done = data.offset;
      if (typeof data.len === "number") job.total = data.len;
      switch (event.event) {
        case "BLOCK_JOB_ERROR":
          continue; // the job ends with BLOCK_JOB_COMPLETED and the error
        case "BLOCK_JOB_READY":
          if (job.state === "running") {
            job.state = "ready";
            await report();
            await qmp.execute("block-job-complete", { device: job.id });
          }
          continue;
        case "BLOCK_JOB_CANCELLED":
          job.state = "failed";
          throw new Error(`QEMU's copy of ${job.drive.disk} was cancelled`);
        case "BLOCK_JOB_COMPLETED":
          if (data.error !== undefined) {
            job.state = "failed";
            throw new Error(`QEMU's copy of ${job.drive.disk} failed: ${data.error}`);
          }
          job.state = "done";
          await report();
      }
    }
  }

  /**
   * Deletes what is left of the overlays and NBD nodes: nodes QEMU opened itself (from
   * `-drive` or the overlay's backing file) went away with the job; ones from `-blockdev`
   * belong to the monitor and are deleted here, innermost last.
   */
  async #removeNodes(qmp: QmpClient, jobs: Job[]): Promise<string[]> {
    const socket = "path" in this.server.address ? this.server.address.path : "";
    const ours = (node: NodeInfo) =>
      (node.drv === "nbd" && node.file.includes(`socket=${socket}`)) ||
      jobs.some((job) =>
        job.drive.mode === "mirror" &&
        (node["node-name"] === job.overlayNode || node.file === job.drive.overlay)
      );
    const order = (node: NodeInfo) => node.drv === "qcow2" ? 0 : node.drv === "nbd" ? 2 : 1;
    const warnings: string[] = [];
    const left = (await qmp.execute("query-named-block-nodes", { flat: true }) as NodeInfo[])
      .filter(ours).sort((a, b) => order(a) - order(b));
    const failures = await tearDown(
      left.map((node) => () => qmp.execute("blockdev-del", { "node-name": node["node-name"] })),
    );
    if (failures.length > 0) {
      const still = (await qmp.execute("query-named-block-nodes", { flat: true }) as NodeInfo[])
        .filter(ours);
      for (const node of still) {
        warnings.push(
          `node ${
            node["node-name"]
          } (${node.drv}, ${node.file}) is still in the VM's block graph: ${failures[0]!.message}`,
        );
      }
    }
    return warnings;
  }

  /** Stops the VM and cancels the jobs; the error that says what state things are in. */
  async #fail(
    qmp: QmpClient,
    jobs: Job[],
    error: unknown,
    continued: boolean,
    timeoutMs: number,
  ): Promise<LiveRestoreError> {
    const reason = error instanceof Error ? error.message : String(error);
    let stopError: string | undefined;
    try {
      await qmp.execute("stop");
    } catch (failure) {
      stopError = failure instanceof Error ? failure.message : String(failure);
    }
    const running = jobs.filter((job) => job.state === "running" || job.state === "ready");
    await tearDown(running.map((job) => async () => {
      await qmp.execute("block-job-cancel", { device: job.id, force: true });
      await qmp.waitForEvent(
        (e) => e.data?.device === job.id && END_EVENTS.includes(e.event),
        { timeoutMs, description: `the end of job ${job.id}` },
      );
    }));
    // A cancelled mirror leaves the VM on its overlay: the target node and file can go.
    const unfinished = jobs.filter((job) => job.drive.mode === "mirror" && job.state !== "done");
    await tearDown(
      unfinished.filter((job) => job.state !== "none")
        .map((job) => () => qmp.execute("blockdev-del", { "node-name": job.targetNode })),
    );
    for (const job of unfinished) {
      if (this.#created.includes(job.drive.target)) {
        await Deno.remove(job.drive.target).catch(() => {});
        this.#created = this.#created.filter((path) => path !== job.drive.target);
      }
    }
    const copied = jobs.filter((job) => job.state !== "none").map((job) =>
      `${job.drive.disk} ${
        job.total > 0 ? Math.floor((100 * job.done) / job.total) : 0
      }% copied, the VM's disk is ${job.drive.overlay}`
    );
    const where = copied.length > 0 ? ` (${copied.join("; ")})` : "";
    const vm = stopError === undefined
      ? continued
        ? `the VM is stopped: its disks are not fully restored${where}, so do not continue it; quit it`
        : `the VM is stopped and was never continued${where}`
      : `the VM could not be stopped (${stopError}); it may have exited`;
    return new LiveRestoreError(`live restore failed: ${reason}; ${vm}`, stopError === undefined, {
      cause: error,
    });
  }
}

const JOB_EVENTS = [
  "BLOCK_JOB_COMPLETED",
  "BLOCK_JOB_CANCELLED",
  "BLOCK_JOB_READY",
  "BLOCK_JOB_ERROR",
];
const END_EVENTS = ["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"];

function progressOf(job: Job): LiveRestoreProgress {
  return {
    disk: job.drive.disk,
    phase: job.state === "done" ? "done" : job.state === "ready" ? "ready" : "copying",
    done: job.state === "done" ? job.total : job.done,
    total: job.total,
  };
}

/** Creates the final target: refuses to replace one without `force`. */
async function prepareTarget(
  target: string,
  format: "qcow2" | "raw",
  size: number,
  force: boolean,
  mode: LiveRestoreMode,
  created: string[],
): Promise<void> {
  const info = await Deno.stat(target).catch((error) => {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  });
  if (info !== undefined && !force) {
    throw new Deno.errors.AlreadyExists(`Cannot restore to ${target}: It already exists`);
  }
  if (info?.isBlockDevice) {
    if (mode === "stream" || format !== "raw") {
      throw new RangeError(`Cannot restore to block device ${target} as ${format}: use raw`);
    }
    const length = await deviceLength(target);
    if (length < size) {
      throw new RangeError(
        `Cannot restore a ${size}-byte disk to ${target}: It holds only ${length} bytes`,
      );
    }
    return;
  }
  if (info !== undefined && !info.isFile) {
    throw new Deno.errors.AlreadyExists(`Cannot restore to ${target}: It is not a regular file`);
  }
  if (mode === "stream") return; // the overlay is the target; created by the caller
  const partial = `${target}.partial`;
  if (format === "qcow2") {
    await createImage(partial, "qcow2", size);
  } else {
    const file = await Deno.open(partial, { write: true, create: true, truncate: true });
    try {
      await file.truncate(size); // sparse: QEMU skips the zero ranges of a fresh file
    } finally {
      file.close();
    }
  }
  await Deno.rename(partial, target);
  created.push(target);
}

/**
 * Creates the qcow2 overlay whose backing file is the served disk (`qemu-img create -b URI
 * -F raw`), at `path.partial` first, so that a half-made overlay never appears at `path`.
 */
async function createOverlay(path: string, uri: string, size: number): Promise<void> {
  const partial = `${path}.partial`;
  const child = spawnQemuTool("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-u", // the size is given: qemu-img need not open the backing file to learn it
    "-b",
    uri,
    "-F",
    "raw",
    partial,
    `${size}`,
  ], { stdout: "null", stderr: "piped" });
  const [status, stderr] = await Promise.all([child.status, new Response(child.stderr).text()]);
  if (!status.success) {
    await Deno.remove(partial).catch(() => {});
    throw new Error(
      `Cannot create the overlay ${path}: ${stderr.trim().replace(/^qemu-img: /, "")}`,
    );
  }
  await Deno.rename(partial, path);
}

async function isBlockDevice(path: string): Promise<boolean> {
  return (await Deno.stat(path)).isBlockDevice === true;
}

async function deviceLength(path: string): Promise<number> {
  using file = await Deno.open(path, { read: true });
  return await file.seek(0, Deno.SeekMode.End);
}
