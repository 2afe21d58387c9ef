// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The drives of a running VM, as QMP `query-block` describes them.
 *
 * @module
 */
import type { QmpClient } from "../protocols/qmp_client.ts";
import { configName } from "../vma/format.ts";
import { encodeHeader } from "../vma/header.ts";

/** A drive of a running VM. */
export interface LiveDrive {
  /** Device name in the archive, Proxmox style: `drive-<id>`. */
  name: string;
  /** Block node the guest device reads and writes (`inserted.node-name`). */
  node: string;
  /** Virtual size in bytes. */
  size: number;
  /** QOM path of the guest device, when there is one (for `qom-set ... drive`). */
  qdev?: string | undefined;
  /** The BlockBackend name, empty for devices set up with `-blockdev`. */
  device: string;
  /** Block driver of `node`, such as `qcow2` or `throttle` (`inserted.drv`). */
  driver?: string | undefined;
}

interface BlockInfo {
  device: string;
  qdev?: string;
  removable?: boolean;
  inserted?: {
    "node-name": string;
    ro?: boolean;
    drv?: string;
    image: { "virtual-size": number };
  };
}

/**
 * The id of a guest device from what `query-block` says: a QOM path
 * (`/machine/peripheral/vda/virtio-backend` → `vda`), or the id itself (scsi-hd says `scsi0`).
 */
function qdevId(qdev: string | undefined): string | undefined {
  if (qdev !== undefined && qdev !== "" && !qdev.startsWith("/")) return qdev;
  return qdev?.match(/^\/machine\/peripheral\/([^/]+)/)?.[1];
}

/**
 * The QOM paths that may take a drive's `drive` property, most likely first: virtio-blk-pci
 * takes it on its proxy `/machine/peripheral/<id>`, not on the inner `virtio-backend` that
 * `query-block` names; scsi-hd is named by its id alone; the EFI flash is `/machine/system.flash1`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { devicePaths } from "./drives.ts";
 *
 * const vda = { name: "drive-vda", node: "n", size: 1, device: "" };
 * assert.deepEqual(devicePaths({ ...vda, qdev: "/machine/peripheral/vda/virtio-backend" }), [
 *   "/machine/peripheral/vda",
 *   "/machine/peripheral/vda/virtio-backend",
 * ]);
 * assert.deepEqual(devicePaths({ ...vda, qdev: "scsi0" }), ["/machine/peripheral/scsi0"]);
 * assert.deepEqual(devicePaths(vda), []);
 * ```
 */
export function devicePaths(drive: LiveDrive): string[] {
  const qdev = drive.qdev;
  if (qdev === undefined || qdev === "") return [];
  if (!qdev.startsWith("/")) return [`/machine/peripheral/${qdev}`];
  return [...new Set([qdev.replace(/\/virtio-backend$/, ""), qdev])];
}

/**
 * The iothread a drive's guest device runs in (its id), or `undefined` for the main loop:
 * the device's `iothread` property, or its controller's (scsi-hd sits on a virtio-scsi bus).
 * Pull mode asks, because QEMU 7.2 often aborts (`qemu_mutex_unlock_impl: Operation not
 * permitted`) when `blockdev-add` attaches a copy-before-write filter to a graph with a
 * throttle filter in an iothread.
 *
 * @example With canned `qom-get` answers instead of a VM
 * ```ts
 * import assert from "node:assert/strict";
 * import type { QmpClient } from "../protocols/qmp_client.ts";
 * import { driveIothread } from "./drives.ts";
 *
 * const properties: Record<string, unknown> = {
 *   "/machine/peripheral/scsi0 parent_bus": "/machine/peripheral/virtioscsi0/virtio-backend/virtioscsi0.0",
 *   "/machine/peripheral/virtioscsi0/virtio-backend iothread": "/objects/iothread-virtioscsi0",
 *   "/machine/peripheral/vda iothread": "",
 * };
 * const qmp = {
 *   execute: (_: string, args: { path: string; property: string }) => {
 *     const value = properties[`${args.path} ${args.property}`];
 *     return value === undefined ? Promise.reject(new Error("not found")) : Promise.resolve(value);
 *   },
 * } as unknown as QmpClient;
 * const drive = { name: "drive-scsi0", node: "n", size: 1, device: "", qdev: "scsi0" };
 * assert.equal(await driveIothread(qmp, drive), "iothread-virtioscsi0");
 * assert.equal(await driveIothread(qmp, { ...drive, qdev: "/machine/peripheral/vda" }), undefined);
 * ```
 */
export async function driveIothread(qmp: QmpClient, drive: LiveDrive): Promise<string | undefined> {
  const get = (path: string, property: string) =>
    qmp.execute("qom-get", { path, property }).then((value) => value, () => undefined);
  let path: string | undefined = devicePaths(drive)[0];
  for (let depth = 0; path !== undefined && depth < 4; depth++) {
    const iothread = await get(path, "iothread");
    if (typeof iothread === "string") return iothread.split("/").at(-1) || undefined;
    const bus = await get(path, "parent_bus");
    // The device that owns the bus: the bus path without its last component.
    path = typeof bus === "string" && bus.lastIndexOf("/") > 0
      ? bus.slice(0, bus.lastIndexOf("/"))
      : undefined;
  }
  return undefined;
}

/**
 * Throws unless `drives` and `configs` fit into one VMA archive (at most 254 devices, configs
 * of 1 to 65535 bytes, a header of at most 512 KiB), so a live backup can refuse before it
 * changes anything in the VM.
 *
 * @example 255 drives are one too many
 * ```ts
 * import assert from "node:assert/strict";
 * import { checkArchiveLimits } from "./drives.ts";
 *
 * const drive = (i: number) => ({ name: `drive-d${i}`, node: `n${i}`, size: 65536, device: "" });
 * checkArchiveLimits([drive(0)], [{ name: "qemu-server.conf", data: new Uint8Array(9) }]);
 * assert.throws(
 *   () => checkArchiveLimits(Array.from({ length: 255 }, (_, i) => drive(i))),
 *   /255 drives, but a VMA archive holds at most 254/,
 * );
 * const big = Array.from({ length: 9 }, (_, i) => ({ name: `${i}.conf`, data: new Uint8Array(65535) }));
 * assert.throws(() => checkArchiveLimits([drive(0)], big), /VMA header: Its size \d+ exceeds 524288 bytes/);
 * ```
 */
export function checkArchiveLimits(
  drives: LiveDrive[],
  configs: { name: string; data: Uint8Array }[] = [],
): void {
  if (drives.length > 254) {
    throw new RangeError(
      `Cannot back up the VM (nothing was changed): It has ${drives.length} drives, but a VMA archive holds at most 254 (choose some with --drive)`,
    );
  }
  try {
    encodeHeader({
      uuid: "00000000-0000-4000-8000-000000000000",
      ctime: 0,
      configs: configs.map(({ name, data }) => ({ name: configName(name), data })),
      devices: drives.map(({ name, size }, index) => ({ devId: index + 1, name, size })),
    });
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    throw new RangeError(`Cannot back up the VM (nothing was changed): ${message}`, {
      cause: error,
    });
  }
}

/**
 * Lists the drives to back up: all drives with a medium that is not read-only (so not CD-ROMs)
 * when `selection` is empty, otherwise the ones named by BlockBackend name, device id, node
 * name or archive name. Throws for a selected drive that does not exist.
 *
 * @example With canned `query-block` answers instead of a VM
 * ```ts
 * import assert from "node:assert/strict";
 * import type { QmpClient } from "../protocols/qmp_client.ts";
import { configName } from "../vma/format.ts";
import { encodeHeader } from "../vma/header.ts";
 * import { findDrives } from "./drives.ts";
 *
 * const image = { "virtual-size": 1 << 30 };
 * const blocks = [
 *   { device: "", qdev: "/machine/peripheral/vda/virtio-backend",
 *     inserted: { "node-name": "disk0", image } },
 *   { device: "ide2-cd0", inserted: { "node-name": "cd0", ro: true, image } },
 * ];
 * const qmp = { execute: () => Promise.resolve(blocks) } as unknown as QmpClient;
 * const names = (await findDrives(qmp)).map((drive) => drive.name);
 * assert.deepEqual(names, ["drive-vda"]); // not the read-only CD-ROM
 * assert.equal((await findDrives(qmp, ["cd0"]))[0]?.name, "drive-ide2-cd0");
 * await assert.rejects(findDrives(qmp, ["vdb"]), /no such drive/);
 * await assert.rejects(findDrives(qmp, ["vda", "drive-vda"]), /already selected as "vda"/);
 * ```
 */
export async function findDrives(qmp: QmpClient, selection: string[] = []): Promise<LiveDrive[]> {
  const blocks = await qmp.execute("query-block") as BlockInfo[];
  const drives = blocks.flatMap((block): (LiveDrive & { ro: boolean })[] => {
    if (!block.inserted) return [];
    const base = block.device || qdevId(block.qdev) || block.inserted["node-name"];
    return [{
      name: base.startsWith("drive-") ? base : `drive-${base}`,
      node: block.inserted["node-name"],
      size: block.inserted.image["virtual-size"],
      qdev: block.qdev,
      device: block.device,
      driver: block.inserted.drv,
      ro: block.inserted.ro === true,
    }];
  });
  if (selection.length === 0) {
    const writable = drives.filter((drive) => !drive.ro);
    if (writable.length === 0) throw new Error("Cannot back up the VM: It has no writable drive");
    return writable.map(({ ro: _, ...drive }) => drive);
  }
  const chosen = new Map<string, string>(); // drive name → the selection that chose it
  return selection.map((wanted) => {
    const drive = drives.find((candidate) =>
      [candidate.name, candidate.node, candidate.device, qdevId(candidate.qdev)].includes(wanted) ||
      candidate.name === `drive-${wanted}`
    );
    if (drive === undefined) {
      const known = drives.map((candidate) => candidate.name).join(", ");
      throw new Error(
        `Cannot back up drive "${wanted}": The VM has no such drive (it has ${known})`,
      );
    }
    const earlier = chosen.get(drive.name);
    if (earlier !== undefined) {
      throw new Error(
        `Cannot back up drive "${wanted}": It is ${drive.name}, already selected as "${earlier}"`,
      );
    }
    chosen.set(drive.name, wanted);
    const { ro: _, ...rest } = drive;
    return rest;
  });
}
