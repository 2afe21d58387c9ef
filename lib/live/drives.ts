// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The drives of a running VM, as QMP `query-block` describes them.
 *
 * @module
 */
import type { QmpClient } from "../protocols/qmp_client.ts";

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
}

interface BlockInfo {
  device: string;
  qdev?: string;
  removable?: boolean;
  inserted?: { "node-name": string; ro?: boolean; image: { "virtual-size": number } };
}

/** The id of a device from its QOM path: `/machine/peripheral/vda/virtio-backend` → `vda`. */
function qdevId(qdev: string | undefined): string | undefined {
  return qdev?.match(/^\/machine\/peripheral\/([^/]+)/)?.[1];
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
