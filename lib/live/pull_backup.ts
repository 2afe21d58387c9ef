// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Pull mode ("fleecing"): QEMU freezes a point-in-time view of each drive with a
 * copy-before-write filter and exports it over NBD; we read it at our own pace.
 *
 * @module
 */
import type { QmpClient } from "../protocols/qmp_client.ts";
import { combineRecordStreams } from "../sources/combine.ts";
import { nbdDiskSource } from "../sources/nbd_disk.ts";
import type { VmaRecord } from "../vma/records.ts";
import { findDrives, type LiveDrive } from "./drives.ts";
import { type LiveBackup, type LiveBackupOptions, tearDown } from "./session.ts";

/** Options of {@linkcode startPullBackup}. */
export interface PullBackupOptions extends LiveBackupOptions {
  /** Where the fleece images go (default `workDir`); each is removed afterwards. */
  fleeceDir?: string;
  /** Discard fleece data as soon as it is archived, so the images stay small (default false). */
  discardRead?: boolean;
  /** Seconds a guest write may wait for its copy before the snapshot breaks (default 30). */
  cbwTimeoutSeconds?: number;
}

const PREFIX = "vmabackup";

/**
 * Starts a pull backup of a running VM, following QEMU 7.2's fleecing graph for each drive:
 *
 * 1. a sparse fleece image, added as a `file` node with `discard: unmap`;
 * 2. a `copy-before-write` filter over the drive with `on-cbw-error: break-snapshot`, so a
 *    failed copy breaks the backup, never a guest write;
 * 3. the snapshot point: the guest devices are pointed at the filters (`qom-set ... drive`),
 *    all in one pause of the VM (`stop` … `cont`) so several drives are consistent;
 * 4. a `snapshot-access` node and an NBD export of it on a private unix socket, read with
 *    `base:allocation` block status (holes are not read), TRIMmed behind the reader when
 *    `discardRead` is set.
 *
 * Teardown runs in the exact order: export, NBD server, snapshot-access, the devices back
 * to their drives, the filters, the fleece nodes, and the fleece files.
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
  const drives = await findDrives(qmp, options.drives);
  for (const drive of drives) {
    if (!drive.qdev) {
      throw new Error(
        `Cannot back up drive "${drive.name}" in pull mode: It has no guest device to redirect (use --mode push)`,
      );
    }
  }
  const ownDir = options.workDir === undefined;
  const dir = options.workDir ?? await Deno.makeTempDir({ prefix: `${PREFIX}-` });
  const fleeceDir = options.fleeceDir ?? dir;
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
    devicePath: undefined as string | undefined,
    added: { fleece: false, cbw: false, redirected: false, access: false, exported: false },
  }));
  let serverStarted = false;
  let filesCreated = 0;

  const teardown = async () => {
    const failures = await tearDown([
      ...nodes.filter((node) => node.added.exported).map((node) => async () => {
        await qmp.execute("block-export-del", { id: node.exportId, mode: "hard" });
        await qmp.waitForEvent(
          (event) => event.event === "BLOCK_EXPORT_DELETED" && event.data?.id === node.exportId,
          { timeoutMs, description: `export ${node.exportId} to go away` },
        );
        node.added.exported = false;
      }),
      async () => {
        if (serverStarted) await qmp.execute("nbd-server-stop");
        serverStarted = false;
      },
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
        "on-cbw-error": "break-snapshot",
        "cbw-timeout": options.cbwTimeoutSeconds ?? 30,
      });
      node.added.cbw = true;
    }
    // The snapshot point: every guest device moves to its filter while the VM is paused.
    const { running } = await qmp.execute("query-status") as { running: boolean };
    if (running) await qmp.execute("stop");
    try {
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
      });
      node.added.exported = true;
    }
  } catch (error) {
    try {
      await teardown();
    } catch (teardownError) {
      // Both matter: why the setup failed, and that the graph could not be restored.
      throw new Error(`${messageOf(error)}; ${messageOf(teardownError)}`, { cause: error });
    }
    throw error;
  }

  const sources = nodes.map((node, index) =>
    nbdDiskSource(`nbd+unix:///${node.exportName}?socket=${socket}`, {
      name: node.drive.name,
      devId: index + 1,
      trimAfterRead: options.discardRead ?? false,
    })
  );
  const combined = combineRecordStreams(sources).getReader();
  const finished = Promise.withResolvers<void>();
  finished.promise.catch(() => {});
  let done = false;
  let abortReason: unknown;
  const finish = async (failure?: unknown) => {
    if (done) return await finished.promise;
    done = true;
    try {
      await teardown();
      if (failure === undefined) finished.resolve();
      else finished.reject(failure);
    } catch (error) {
      finished.reject(failure ?? error);
    }
    return await finished.promise;
  };

  const records = new ReadableStream<VmaRecord>({
    async pull(controller) {
      try {
        const { value, done: end } = await combined.read();
        if (abortReason !== undefined) throw abortReason;
        if (!end) return controller.enqueue(value);
      } catch (error) {
        if (error === abortReason) throw error;
        const broken = snapshotBroken(error);
        await finish(broken).catch(() => {});
        throw broken;
      }
      await finish().catch(() => {});
      controller.close();
    },
    async cancel(reason) {
      await combined.cancel(reason).catch(() => {});
      await finish(reason ?? new Error("The backup was cancelled")).catch(() => {});
    },
  }, { highWaterMark: 0 });

  return {
    drives,
    records,
    snapshot: Promise.resolve(),
    finished: finished.promise,
    async abort(reason?: unknown) {
      abortReason = reason ?? new Error("The backup was aborted");
      await combined.cancel(abortReason).catch(() => {});
      await finish(abortReason).catch(() => {});
    },
  };
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Points a guest device at `node`; resolves to the QOM path that took the property. */
async function redirectDevice(qmp: QmpClient, drive: LiveDrive, node: string): Promise<string> {
  // virtio-blk-pci takes the property on its proxy, /machine/peripheral/<id>, not on the
  // inner virtio-backend that query-block names.
  const candidates = [drive.qdev!.replace(/\/virtio-backend$/, ""), drive.qdev!];
  let failure: unknown;
  for (const path of new Set(candidates)) {
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

/** A read error of the fleecing export means the snapshot broke: say so. */
function snapshotBroken(error: unknown): unknown {
  const code = (error as { code?: number }).code;
  if (code === 1 || code === 13) {
    return new Error(
      `Cannot read the point-in-time view: The snapshot broke (a copy-before-write failed, for example a full fleece disk): ${
        error instanceof Error ? error.message : error
      }`,
    );
  }
  return error;
}
