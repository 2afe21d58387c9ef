// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Push mode, the 2012 RFC design on stock QEMU: QEMU's backup job copies every cluster once,
 * old data first where the guest is about to overwrite it, into an NBD server of ours.
 *
 * @module
 */
import { NbdServer } from "../protocols/nbd_server.ts";
import type { QmpEvent } from "../protocols/qmp_client.ts";
import type { VmaRecord } from "../vma/records.ts";
import { checkArchiveLimits, findDrives } from "./drives.ts";
import { PushTarget } from "./push_target.ts";
import { RecordQueue } from "./record_queue.ts";
import { deviceRecords, type LiveBackup, type LiveBackupOptions, tearDown } from "./session.ts";

/** Options of {@linkcode startPushBackup}. */
export interface PushBackupOptions extends LiveBackupOptions {
  /** Rate limit of QEMU's copy in bytes per second (default: none). */
  speed?: number;
}

const PREFIX = "vmabackup";

/**
 * Starts a push backup of a running VM:
 *
 * 1. one NBD server of ours per drive, on a private unix socket;
 * 2. `blockdev-add driver=nbd` nodes pointing at them;
 * 3. one `transaction` of `blockdev-backup sync=full` for all drives: the snapshot point;
 * 4. QEMU writes each cluster exactly once, out of order where copy-before-write forces it,
 *    and the servers turn WRITE / WRITE_ZEROES / TRIM into records: one read and two writes
 *    per cluster, no snapshot and no temporary image;
 * 5. after `BLOCK_JOB_COMPLETED` for every job: `blockdev-del` of the nodes we added.
 *
 * The drive count and sizes are checked against the archive's limits (and by
 * `checkDrives`) before anything in the VM changes. If the record stream is cancelled (the
 * archive sink failed) or {@linkcode LiveBackup.abort} is called, QEMU's pending and later
 * writes are answered at once without waiting for the reader, the jobs are cancelled and
 * the nodes removed, so the graph is as before, also when the reader stopped reading.
 *
 * @example Back up a running VM to a file
 * ```ts ignore
 * import { QmpClient, startPushBackup, VmaWriterStream, ZeroFilterStream } from "../../mod.ts";
 *
 * using qmp = await QmpClient.connect("/run/vm-100.backup.qmp");
 * const backup = await startPushBackup({ qmp });
 * const out = await Deno.open("vm-100.vma", { write: true, createNew: true });
 * await backup.records.pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
 *   .pipeTo(out.writable);
 * await backup.finished;
 * ```
 */
export async function startPushBackup(options: PushBackupOptions): Promise<LiveBackup> {
  const { qmp } = options;
  const timeoutMs = (options.timeoutSeconds ?? 60) * 1000;
  const drives = await findDrives(qmp, options.drives);
  checkArchiveLimits(drives);
  await options.checkDrives?.(drives);
  const ownDir = options.workDir === undefined;
  const dir = options.workDir ?? await Deno.makeTempDir({ prefix: `${PREFIX}-` });
  const tag = crypto.randomUUID().slice(0, 8); // unique node and job names per backup
  const aborted = new AbortController();
  const queue = new RecordQueue<VmaRecord>(64, (reason) => aborted.abort(reason));
  const snapshot = Promise.withResolvers<void>();
  snapshot.promise.catch(() => {});

  const jobs = drives.map((drive, index) => ({
    drive,
    job: `${PREFIX}-${tag}-${index}`,
    node: `${PREFIX}-${tag}-target-${index}`,
    socket: `${dir}/push-${index}.sock`,
    server: undefined as NbdServer | undefined,
    nodeAdded: false,
    state: "none" as "none" | "running" | "done",
  }));

  const run = async () => {
    try {
      for (const record of deviceRecords(drives)) await queue.push(record);
      jobs.forEach((entry, index) => {
        // 512-byte requests, so disks whose size is not a multiple of 4 KiB work too.
        entry.server = NbdServer.listen(
          { path: entry.socket },
          { "": new PushTarget(index + 1, entry.drive.size, queue) },
          { blockSizes: { minimum: 512, preferred: 65536, maximum: 4 << 20 }, maxInFlight: 1 },
        );
      });
      for (const entry of jobs) {
        await qmp.execute("blockdev-add", {
          driver: "nbd",
          "node-name": entry.node,
          server: { type: "unix", path: entry.socket },
          export: "",
        });
        entry.nodeAdded = true;
      }
      aborted.signal.throwIfAborted();
      await qmp.execute("transaction", {
        actions: jobs.map((entry) => ({
          type: "blockdev-backup",
          data: {
            "job-id": entry.job,
            device: entry.drive.node,
            target: entry.node,
            sync: "full",
            "auto-finalize": true,
            "auto-dismiss": true,
            ...(options.speed && { speed: options.speed }),
          },
        })),
      });
      for (const entry of jobs) entry.state = "running";
      snapshot.resolve();
      for (const entry of jobs) {
        const event = await qmp.waitForEvent(jobEnded(entry.job), {
          timeoutMs: Infinity,
          signal: aborted.signal,
          description: `the end of backup job ${entry.job}`,
        });
        entry.state = "done";
        const error = event.data?.error;
        if (event.event === "BLOCK_JOB_CANCELLED") {
          throw new Error(`Backup job ${entry.job} was cancelled`);
        }
        if (typeof error === "string") {
          throw new Error(
            `Cannot back up drive "${entry.drive.name}": QEMU's backup job failed: ${error}`,
          );
        }
      }
      await removeTargets();
      queue.close();
    } catch (error) {
      snapshot.reject(error);
      const reason = aborted.signal.aborted ? aborted.signal.reason : error;
      try {
        await cancelAndRemove();
      } catch (teardown) {
        // Both matter: what went wrong, and that the graph could not be restored.
        throw new Error(`${messageOf(reason)}; ${messageOf(teardown)}`, { cause: reason });
      } finally {
        queue.error(reason); // the record stream ends whatever the teardown did
      }
      throw reason;
    } finally {
      await Promise.all(jobs.map((entry) => entry.server?.close()));
      if (ownDir) await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  };

  /** `blockdev-del` makes QEMU disconnect; then our servers have seen everything. */
  const removeTargets = async () => {
    for (const entry of jobs) {
      await qmp.execute("blockdev-del", { "node-name": entry.node });
      entry.nodeAdded = false;
    }
    await Promise.all(jobs.map((entry) => entry.server?.disconnected));
  };

  const cancelAndRemove = async () => {
    const failures = await tearDown([
      ...jobs.filter((entry) => entry.state === "running").map((entry) => async () => {
        await qmp.execute("block-job-cancel", { device: entry.job, force: true }).catch(() => {});
        await qmp.waitForEvent(jobEnded(entry.job), {
          timeoutMs,
          description: `job ${entry.job} to end`,
        });
        entry.state = "done";
      }),
      ...jobs.filter((entry) => entry.nodeAdded).map((entry) => async () => {
        await qmp.execute("blockdev-del", { "node-name": entry.node });
        entry.nodeAdded = false;
      }),
    ]);
    if (failures.length > 0) {
      throw new Error(
        `Cannot restore the VM's block graph: ${failures.map((e) => e.message).join("; ")}`,
      );
    }
  };

  const finished = run();
  finished.catch(() => {});
  return {
    drives,
    records: queue.readable,
    snapshot: snapshot.promise,
    finished,
    async abort(reason?: unknown) {
      const error = reason ?? new Error("The backup was aborted");
      // First every write QEMU has pending or still sends is answered, so its jobs never
      // wait for a reader that stopped (block-job-cancel drains them, and a drain that
      // waits for us stalls QEMU's main loop, its monitor and the guest), then the jobs go.
      queue.fail(error);
      aborted.abort(error);
      await finished.catch(() => {});
    },
  };
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function jobEnded(job: string) {
  return (event: QmpEvent) =>
    (event.event === "BLOCK_JOB_COMPLETED" || event.event === "BLOCK_JOB_CANCELLED") &&
    event.data?.device === job;
}
