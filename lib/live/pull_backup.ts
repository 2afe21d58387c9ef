// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Pull mode ("fleecing"): QEMU freezes a point-in-time view of each drive with a
 * copy-before-write filter and exports it over NBD; we read it at our own pace.
 *
 * @module
 */
import { NbdClient } from "../protocols/nbd_client.ts";
import { NbdError } from "../protocols/nbd_protocol.ts";
import type { QmpClient } from "../protocols/qmp_client.ts";
import { combineRecordStreams } from "../sources/combine.ts";
import type { VmaRecord } from "../vma/records.ts";
import {
  checkArchiveLimits,
  devicePaths,
  driveIothread,
  findDrives,
  type LiveDrive,
} from "./drives.ts";
import { planCheckpoints } from "./checkpoints.ts";
import { SnapshotReadError, snapshotSource } from "./snapshot_source.ts";
import {
  type LiveBackup,
  type LiveBackupOptions,
  SnapshotBrokenError,
  tearDown,
} from "./session.ts";

/** Options of {@linkcode startPullBackup}. */
export interface PullBackupOptions extends LiveBackupOptions {
  /**
   * Where the fleece images go. Default: a new private directory in `/var/tmp` (on disk;
   * `/tmp` is a small tmpfs on many systems), removed afterwards; each image is removed too.
   */
  fleeceDir?: string;
  /** Discard fleece data as soon as it is archived, so the images stay small (default false). */
  discardRead?: boolean;
  /** Seconds a guest write may wait for its copy before the snapshot breaks (default 30). */
  cbwTimeoutSeconds?: number;
}

const PREFIX = "vmabackup";
/** Where fleece images go by default: on disk, and kept across reboots only by accident. */
export const DEFAULT_FLEECE_PARENT = "/var/tmp";

/**
 * Starts a pull backup of a running VM, following QEMU 7.2's fleecing graph for each drive:
 *
 * 1. a sparse fleece image, added as a `file` node with `discard: unmap`;
 * 2. a `copy-before-write` filter over the drive with `on-cbw-error: break-snapshot`, so a
 *    failed copy breaks the backup, never a guest write (guest discards pass through it);
 * 3. the snapshot point: the guest devices are pointed at the filters (`qom-set ... drive`),
 *    all in one pause of the VM (`stop` … `cont`) so several drives are consistent; in the
 *    same pause, one `transaction` adds the `checkpoint` (if asked for) and, for an
 *    incremental, a disabled copy of the `since` checkpoint (`block-dirty-bitmap-add`
 *    `disabled`, `-merge`), which the export then carries as `qemu:dirty-bitmap:NAME` so
 *    only the dirty clusters are read;
 * 4. a `snapshot-access` node and an NBD export of it on a private unix socket, read with
 *    `base:allocation` block status, TRIMmed behind the reader when `discardRead` is set;
 * 5. a read-only NBD export of the fleece node itself, so {@linkcode snapshotSource} can
 *    work around QEMU 7.2's copy-before-write filter, which serves a run of copied clusters
 *    from the live drive when a request goes past the run's end: reads of one cluster
 *    each, and block-status zeros taken as zeros only where the fleece image has a hole.
 *
 * The drive count and sizes are checked against the archive's limits (and by
 * `checkDrives`) before anything in the VM changes, and so is a drive QEMU 7.2 cannot take a
 * filter over (a throttle filter in an iothread: `blockdev-add` aborts QEMU; push mode,
 * whose backup job inserts its filter itself, works there). Teardown, on success, failure or abort:
 * the exports (waiting for `BLOCK_EXPORT_DELETED`), the NBD server, snapshot-access, the
 * devices back to their drives, the filters, the fleece nodes, and the fleece files. A step
 * that fails does not stop the later ones, and the error names it.
 *
 * A read error with a snapshot that no longer answers anywhere means a copy-before-write
 * failed (the fleece file system was full, or a copy took longer than `cbwTimeoutSeconds`):
 * the backup fails with a {@linkcode SnapshotBrokenError} that says so.
 *
 * @example Back up a running VM in pull mode
 * ```ts ignore
 * import { QmpClient, startPullBackup, VmaWriterStream, ZeroFilterStream } from "../../mod.ts";
 *
 * using qmp = await QmpClient.connect("/run/vm-100.backup.qmp");
 * const backup = await startPullBackup({ qmp, discardRead: true });
 * await backup.records.pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
 *   .pipeTo((await Deno.open("vm-100.vma", { write: true, createNew: true })).writable);
 * await backup.finished;
 * ```
 */
export async function startPullBackup(options: PullBackupOptions): Promise<LiveBackup> {
  const { qmp } = options;
  const timeoutMs = (options.timeoutSeconds ?? 60) * 1000;
  const cbwTimeout = options.cbwTimeoutSeconds ?? 30;
  const drives = await findDrives(qmp, options.drives);
  checkArchiveLimits(drives);
  await options.checkDrives?.(drives);
  for (const drive of drives) {
    if (devicePaths(drive).length === 0) {
      throw new Error(
        `Cannot back up drive "${drive.name}" in pull mode: It has no guest device to redirect (use --mode push)`,
      );
    }
    // Seen in 3 to 7 of 8 tries: a blockdev-add over such a graph kills the VM, so refuse.
    if (drive.driver === "throttle" && await driveIothread(qmp, drive) !== undefined) {
      throw new Error(
        `Cannot back up drive "${drive.name}" in pull mode (nothing was changed): It is a throttle filter in an iothread, and QEMU 7.2 aborts when a copy-before-write filter is added to such a graph (use --mode push)`,
      );
    }
  }
  const plan = await planCheckpoints(qmp, drives, options);
  const ownDir = options.workDir === undefined;
  const dir = options.workDir ?? await Deno.makeTempDir({ prefix: `${PREFIX}-` });
  const ownFleeceDir = options.fleeceDir === undefined;
  let fleeceDir: string;
  try {
    fleeceDir = options.fleeceDir ?? await defaultFleeceDir(dir);
  } catch (error) {
    if (ownDir) await Deno.remove(dir, { recursive: true }).catch(() => {});
    throw error;
  }
  const tag = crypto.randomUUID().slice(0, 8);
  const socket = `${dir}/pull-${tag}.sock`;
  const nodes = drives.map((drive, index) => ({
    drive,
    fleeceFile: `${fleeceDir}/${PREFIX}-${tag}-${index}.fleece`,
    fleece: `${PREFIX}-${tag}-fleece-${index}`,
    cbw: `${PREFIX}-${tag}-cbw-${index}`,
    access: `${PREFIX}-${tag}-access-${index}`,
    exportId: `${PREFIX}-${tag}-export-${index}`,
    exportName: `${PREFIX}-${index}`,
    fleeceExportId: `${PREFIX}-${tag}-fleece-export-${index}`,
    fleeceExportName: `${PREFIX}-${index}-fleece`,
    devicePath: undefined as string | undefined,
    /** An incremental: the frozen copy of the `since` checkpoint, and where it is. */
    dirty: plan.since === undefined
      ? undefined
      : { node: plan.nodes[index]!.node, name: `${PREFIX}-${tag}-dirty-${index}` },
    added: {
      fleece: false,
      cbw: false,
      redirected: false,
      access: false,
      exported: false,
      fleeceExported: false,
      dirty: false,
    },
  }));
  const uri = (name: string) => `nbd+unix:///${name}?socket=${socket}`;
  let serverStarted = false;
  let filesCreated = 0;

  const deleteExport = async (id: string) => {
    await qmp.execute("block-export-del", { id, mode: "hard" });
    await qmp.waitForEvent(
      (event) => event.event === "BLOCK_EXPORT_DELETED" && event.data?.id === id,
      { timeoutMs, description: `export ${id} to go away` },
    );
  };
  const teardown = async () => {
    const failures = await tearDown([
      ...nodes.flatMap((node) => [
        async () => {
          if (node.added.exported) await deleteExport(node.exportId);
          node.added.exported = false;
        },
        async () => {
          if (node.added.fleeceExported) await deleteExport(node.fleeceExportId);
          node.added.fleeceExported = false;
        },
      ]),
      async () => {
        if (serverStarted) await qmp.execute("nbd-server-stop");
        serverStarted = false;
      },
      ...nodes.map((node) => async () => {
        if (node.added.dirty) await qmp.execute("block-dirty-bitmap-remove", node.dirty!);
        node.added.dirty = false;
      }),
      ...nodes.flatMap((node) => [
        async () => {
          if (node.added.access) await qmp.execute("blockdev-del", { "node-name": node.access });
          node.added.access = false;
        },
        async () => {
          if (node.added.redirected) await setDrive(qmp, node.devicePath!, node.drive.node);
          node.added.redirected = false;
        },
        async () => {
          if (node.added.cbw) await qmp.execute("blockdev-del", { "node-name": node.cbw });
          node.added.cbw = false;
        },
        async () => {
          if (node.added.fleece) await qmp.execute("blockdev-del", { "node-name": node.fleece });
          node.added.fleece = false;
        },
      ]),
      async () => {
        for (const node of nodes.slice(0, filesCreated)) await Deno.remove(node.fleeceFile);
        if (ownFleeceDir) await Deno.remove(fleeceDir, { recursive: true });
        if (ownDir) await Deno.remove(dir, { recursive: true });
      },
    ]);
    if (failures.length > 0) {
      throw new Error(
        `Cannot restore the VM's block graph: ${failures.map((e) => e.message).join("; ")}`,
      );
    }
  };

  try {
    for (const node of nodes) {
      using file = await Deno.open(node.fleeceFile, { write: true, createNew: true });
      filesCreated++;
      await file.truncate(node.drive.size); // sparse: it fills only with overwritten clusters
      await qmp.execute("blockdev-add", {
        driver: "file",
        "node-name": node.fleece,
        filename: node.fleeceFile,
        discard: "unmap",
      });
      node.added.fleece = true;
      await qmp.execute("blockdev-add", {
        driver: "copy-before-write",
        "node-name": node.cbw,
        file: node.drive.node,
        target: node.fleece,
        discard: "unmap", // the guest's discards reach its disk during the backup too
        "on-cbw-error": "break-snapshot",
        "cbw-timeout": cbwTimeout,
      });
      node.added.cbw = true;
    }
    // The snapshot point: every guest device moves to its filter while the VM is paused.
    const { running } = await qmp.execute("query-status") as { running: boolean };
    if (running) await qmp.execute("stop");
    try {
      // No guest write in the pause: the new checkpoint starts, and the dirty copy is
      // frozen, exactly at the snapshot point.
      const actions = [
        ...plan.checkpoint?.addActions() ?? [],
        ...nodes.flatMap((node) =>
          node.dirty === undefined ? [] : [
            {
              type: "block-dirty-bitmap-add",
              data: { ...node.dirty, persistent: false, disabled: true, granularity: 65536 },
            },
            {
              type: "block-dirty-bitmap-merge",
              data: { node: node.dirty.node, target: node.dirty.name, bitmaps: [plan.since] },
            },
          ]
        ),
      ];
      if (actions.length > 0) {
        await qmp.execute("transaction", { actions });
        plan.checkpoint?.added();
        for (const node of nodes) node.added.dirty = node.dirty !== undefined;
      }
      for (const node of nodes) {
        node.devicePath = await redirectDevice(qmp, node.drive, node.cbw);
        node.added.redirected = true;
      }
    } finally {
      if (running) await qmp.execute("cont");
    }
    for (const node of nodes) {
      await qmp.execute("blockdev-add", {
        driver: "snapshot-access",
        "node-name": node.access,
        file: node.cbw,
        discard: "unmap",
      });
      node.added.access = true;
    }
    await qmp.execute("nbd-server-start", { addr: { type: "unix", data: { path: socket } } });
    serverStarted = true;
    for (const node of nodes) {
      await qmp.execute("block-export-add", {
        type: "nbd",
        id: node.exportId,
        "node-name": node.access,
        name: node.exportName,
        writable: options.discardRead ?? false,
        ...(node.dirty && { bitmaps: [node.dirty] }),
      });
      node.added.exported = true;
      await qmp.execute("block-export-add", {
        type: "nbd",
        id: node.fleeceExportId,
        "node-name": node.fleece,
        name: node.fleeceExportName,
        writable: false,
      });
      node.added.fleeceExported = true;
    }
  } catch (error) {
    try {
      await teardown();
      await plan.checkpoint?.discard();
    } catch (teardownError) {
      // Both matter: why the setup failed, and that the graph could not be restored.
      throw new Error(`${messageOf(error)}; ${messageOf(teardownError)}`, { cause: error });
    }
    throw error;
  }

  const readers = nodes.map((node, index) =>
    snapshotSource({
      name: node.drive.name,
      devId: index + 1,
      snapshot: uri(node.exportName),
      fleece: uri(node.fleeceExportName),
      trimAfterRead: options.discardRead ?? false,
      ...(node.dirty && { dirtyBitmap: `qemu:dirty-bitmap:${node.dirty.name}` }),
    })
  );
  /** Connections QEMU must drop before we close them (see SnapshotReader.close). */
  const probes: NbdClient[] = [];
  const closeConnections = async () => {
    await Promise.all(readers.map((reader) => reader.close()));
    await Promise.all(probes.splice(0).map((client) => client.close().catch(() => {})));
  };
  const combined = combineRecordStreams(readers.map((reader) => reader.records)).getReader();
  const finished = Promise.withResolvers<void>();
  finished.promise.catch(() => {});
  let done = false;
  let abortReason: unknown;
  const finish = async (failure?: unknown) => {
    if (done) return await finished.promise;
    done = true;
    try {
      await teardown();
      if (failure !== undefined) await plan.checkpoint?.discard();
      if (failure === undefined) finished.resolve();
      else finished.reject(failure);
    } catch (error) {
      finished.reject(failure ?? error);
    } finally {
      await closeConnections(); // QEMU has dropped them (or could not be asked to)
    }
    return await finished.promise;
  };
  const diagnose = (error: unknown) =>
    diagnoseReadError(error, {
      qmp,
      fleeceDir,
      cbwTimeout,
      snapshots: nodes.map((node) => ({ uri: uri(node.exportName), size: node.drive.size })),
      probes,
    });

  const records = new ReadableStream<VmaRecord>({
    async pull(controller) {
      try {
        const { value, done: end } = await combined.read();
        if (abortReason !== undefined) throw abortReason;
        if (!end) return controller.enqueue(value);
      } catch (error) {
        if (error === abortReason) throw error;
        const failure = await diagnose(error);
        await finish(failure).catch(() => {});
        throw failure;
      }
      await finish().catch(() => {});
      controller.close();
    },
    async cancel(reason) {
      // Set before the readers stop: a pull waiting on them must not take their end for a
      // finished backup and resolve `finished`.
      abortReason ??= reason ?? new Error("The backup was cancelled");
      await combined.cancel(abortReason).catch(() => {});
      await finish(abortReason).catch(() => {});
    },
  }, { highWaterMark: 0 });

  return {
    drives,
    records,
    snapshot: Promise.resolve(),
    finished: finished.promise,
    fleeceDir,
    kind: plan.kind,
    fullReason: plan.fullReason,
    checkpoint: plan.checkpoint?.name,
    async commitCheckpoint() {
      await finished.promise;
      return await plan.checkpoint?.commit() ?? [];
    },
    async abort(reason?: unknown) {
      abortReason ??= reason ?? new Error("The backup was aborted");
      await combined.cancel(abortReason).catch(() => {});
      await finish(abortReason).catch(() => {});
      // Also after a backup that finished but whose archive did not land (see push mode).
      await plan.checkpoint?.discard().catch(() => {});
    },
  };
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** A new private directory for fleece images: in /var/tmp, or `fallback` without one. */
async function defaultFleeceDir(fallback: string): Promise<string> {
  const parent = await Deno.stat(DEFAULT_FLEECE_PARENT).then(
    (info) => info.isDirectory ? DEFAULT_FLEECE_PARENT : fallback,
    () => fallback,
  );
  return await Deno.makeTempDir({ dir: parent, prefix: `${PREFIX}-fleece-` });
}

/** Points a guest device at `node`; resolves to the QOM path that took the property. */
async function redirectDevice(qmp: QmpClient, drive: LiveDrive, node: string): Promise<string> {
  let failure: unknown;
  for (const path of devicePaths(drive)) {
    try {
      await setDrive(qmp, path, node);
      return path;
    } catch (error) {
      failure = error;
    }
  }
  throw failure;
}

async function setDrive(qmp: QmpClient, path: string, node: string): Promise<void> {
  await qmp.execute("qom-set", { path, property: "drive", value: node });
}

interface Diagnosis {
  qmp: QmpClient;
  fleeceDir: string;
  cbwTimeout: number;
  /** Each drive's snapshot export. */
  snapshots: { uri: string; size: number }[];
  /** Where the probe's connection goes, to be closed after teardown. */
  probes: NbdClient[];
}

/**
 * Tells a broken snapshot from other read errors. After a copy-before-write failed, QEMU 7.2
 * refuses every read of the snapshot (EACCES inside QEMU, EINVAL on the wire, the same code
 * as a read of a trimmed range), so the last sector of a drive, not read yet, is probed: if
 * it fails too, the snapshot broke. QMP then tells the VM's state, and a probe write tells a
 * full fleece file system from a copy that failed or timed out.
 */
async function diagnoseReadError(error: unknown, diagnosis: Diagnosis): Promise<unknown> {
  if (!(error instanceof SnapshotReadError)) return error;
  const cause = error.cause;
  if (!(cause instanceof NbdError) || cause.reason !== "command-failed") return cause;
  // Reads run ahead of the records by a batch: stay clear of what may be trimmed already.
  const probe = diagnosis.snapshots.find((snapshot) => error.offset + (2 << 20) < snapshot.size);
  if (probe === undefined) return cause;
  try {
    const client = await NbdClient.connect(probe.uri, { timeoutMs: 10_000 });
    diagnosis.probes.push(client);
    const at = Math.floor((probe.size - 1) / 512) * 512;
    await client.read(at, new Uint8Array(probe.size - at));
    return cause; // the snapshot still answers: some other read error
  } catch (probeError) {
    if (!(probeError instanceof NbdError) || probeError.reason !== "command-failed") return cause;
  }
  const status = await diagnosis.qmp.execute("query-status").then(
    (answer) => (answer as { status: string }).status,
    () => undefined,
  );
  const full = await fileSystemIsFull(diagnosis.fleeceDir);
  const why = full
    ? `the file system of the fleece images (${diagnosis.fleeceDir}) is full, so QEMU could not keep the old data of a cluster the guest overwrote (give --fleece-dir a file system with room for what the guest writes during a backup)`
    : `QEMU could not copy the old data of a cluster the guest overwrote into the fleece image within ${diagnosis.cbwTimeout} s (--cbw-timeout), or writing the fleece image in ${diagnosis.fleeceDir} failed`;
  const vm = status === undefined
    ? "the guest's writes went through (QMP did not answer the status query)"
    : `the VM was not affected: its writes went through and it is ${status}`;
  return new SnapshotBrokenError(
    `The snapshot broke: ${why}; ${vm}; this backup is incomplete`,
    { cause, fleeceFull: full },
  );
}

/** Whether writing 1 MiB into `dir` fails for lack of space. */
async function fileSystemIsFull(dir: string): Promise<boolean> {
  const path = `${dir}/${PREFIX}-space-probe-${crypto.randomUUID().slice(0, 8)}`;
  try {
    await Deno.writeFile(path, new Uint8Array(1 << 20), { createNew: true });
    return false;
  } catch (error) {
    return error instanceof Error && /No space left|os error 28|quota/i.test(error.message);
  } finally {
    await Deno.remove(path).catch(() => {});
  }
}
