// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Checkpoints of offline backups (`backup --disk IMAGE.qcow2 --base PREVIOUS`): persistent
 * dirty bitmaps `vmabackup-<UUID>` stored in the qcow2 images themselves, added with
 * `qemu-img bitmap` before the images are read, and rotated once the archive is durable. A
 * VM that runs on the image later keeps the bitmap recording its writes (QEMU loads and
 * stores persistent bitmaps with the image), so the next backup reads only what changed,
 * through `qemu-nbd --bitmap`.
 *
 * @module
 */
import {
  CHECKPOINT_GRANULARITY,
  CHECKPOINT_PREFIX,
  type CheckpointNode,
  checkpointProblem,
  deviceSetProblem,
} from "../live/checkpoints.ts";
import { detectImageFormat } from "../qemu/image_format.ts";
import {
  addImageBitmap,
  type ImageInfo,
  imageInfo,
  removeImageBitmap,
} from "../qemu/image_bitmaps.ts";

/** A disk of an offline backup. */
export interface ImageDisk {
  /** Its name in the archive (`drive-scsi0`). */
  name: string;
  /** The image file, or an NBD URI. */
  path: string;
}

/** A checkpoint added to the images, kept or removed with the archive. */
export interface ImageCheckpoint {
  /** Its name, `vmabackup-<archive UUID>`. */
  name: string;
  /** Once the archive is durable: removes every other checkpoint of the images; notes on failures. */
  commit(): Promise<string[]>;
  /** On failure: removes the new checkpoint from the images (the previous one stays). */
  discard(): Promise<void>;
}

/** What an offline backup does with checkpoints, decided before any image is read. */
export interface ImageCheckpointPlan {
  /** `incremental` only when `since` was asked for and every image has it, intact. */
  kind: "full" | "incremental";
  /** Why a full backup, when an incremental was asked for. */
  fullReason?: string | undefined;
  /** The bitmap whose dirty clusters are read (an incremental). */
  since?: string | undefined;
  /** The checkpoint added, if one was asked for and an image can hold it. */
  checkpoint?: ImageCheckpoint | undefined;
  /** What the backup should say: disks that get no checkpoint, and why. */
  notes: string[];
}

/**
 * Looks at the images of an offline backup, decides whether it can be an incremental from
 * checkpoint `since` (every disk a qcow2 image with that bitmap, enabled, not `in-use`, of
 * 64 KiB granularity, and the same disks and sizes as the base archive), and adds the new
 * checkpoint `checkpoint` to every qcow2 image. An image that a running VM has open is
 * locked: adding fails with qemu-img's message. Needs `--allow-run=qemu-img` and write
 * access to the qcow2 images when a checkpoint is added.
 *
 * @example A raw image holds no checkpoint
 * ```ts
 * import assert from "node:assert/strict";
 * import { planImageCheckpoints } from "./image_checkpoints.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".raw" });
 * await Deno.writeFile(path, new Uint8Array(65536));
 * const plan = await planImageCheckpoints([{ name: "drive-scsi0", path }], {
 *   checkpoint: "vmabackup-new",
 *   since: { checkpoint: "vmabackup-old", devices: [{ name: "drive-scsi0", size: 65536 }] },
 * });
 * assert.equal(plan.kind, "full");
 * assert.match(plan.fullReason!, /raw image: only qcow2 images hold a checkpoint/);
 * assert.equal(plan.checkpoint, undefined);
 * assert.match(plan.notes[0]!, /gets no checkpoint/);
 * await Deno.remove(path);
 * ```
 */
export async function planImageCheckpoints(
  disks: ImageDisk[],
  options: {
    checkpoint?: string | undefined;
    since?: { checkpoint: string; devices: { name: string; size: number }[] } | undefined;
  },
): Promise<ImageCheckpointPlan> {
  if (options.checkpoint === undefined && options.since === undefined) {
    return { kind: "full", notes: [] };
  }
  const images: { disk: ImageDisk; format: string; info?: ImageInfo }[] = [];
  for (const disk of disks) {
    if (/^nbd(\+unix)?:\/\//.test(disk.path)) {
      images.push({ disk, format: "NBD export" });
      continue;
    }
    const format = await detectImageFormat(disk.path);
    images.push({
      disk,
      format: `${format} image`,
      ...(format === "qcow2" && { info: await imageInfo(disk.path) }),
    });
  }
  const qcow2 = images.filter((image) => image.info !== undefined);
  const notes = images.filter((image) => image.info === undefined).map(({ disk, format }) =>
    `${disk.name} (${disk.path}) gets no checkpoint: it is a ${format}, and only qcow2 images hold one`
  );
  let fullReason: string | undefined;
  if (options.since !== undefined) {
    const other = images.find((image) => image.info === undefined);
    fullReason = other === undefined
      ? deviceSetProblem(
        qcow2.map(({ disk, info }) => ({ name: disk.name, size: info!.virtualSize })),
        options.since.devices,
      ) ?? checkpointProblem(qcow2.map(asNode), options.since.checkpoint)
      : `${other.disk.name} (${other.disk.path}) is a ${other.format}: only qcow2 images hold a checkpoint`;
  }
  const plan: ImageCheckpointPlan = {
    kind: options.since !== undefined && fullReason === undefined ? "incremental" : "full",
    fullReason,
    ...(options.since !== undefined && fullReason === undefined &&
      { since: options.since.checkpoint }),
    notes: options.checkpoint === undefined ? [] : notes,
  };
  if (options.checkpoint === undefined || qcow2.length === 0) return plan;
  const name = options.checkpoint;
  const paths = qcow2.map(({ disk }) => disk.path);
  const added: string[] = [];
  const removeAdded = async () => {
    const failures: string[] = [];
    for (const path of added.splice(0)) {
      await removeImageBitmap(path, name).catch((error) => failures.push(messageOf(error)));
    }
    if (failures.length > 0) throw new Error(failures.join("; "));
  };
  try {
    for (const path of paths) {
      await addImageBitmap(path, name, CHECKPOINT_GRANULARITY);
      added.push(path);
    }
  } catch (error) {
    await removeAdded().catch(() => {});
    throw error;
  }
  let state: "added" | "committed" | "discarded" = "added";
  plan.checkpoint = {
    name,
    async commit() {
      if (state !== "added") return [];
      state = "committed";
      const failures: string[] = [];
      for (const path of paths) {
        try {
          for (const bitmap of (await imageInfo(path)).bitmaps) {
            if (bitmap.name === name || !bitmap.name.startsWith(CHECKPOINT_PREFIX)) continue;
            await removeImageBitmap(path, bitmap.name);
          }
        } catch (error) {
          failures.push(`could not remove the old checkpoints of ${path}: ${messageOf(error)}`);
        }
      }
      return failures;
    },
    async discard() {
      if (state !== "added") return;
      state = "discarded";
      await removeAdded();
    },
  };
  return plan;
}

/** A qcow2 image's bitmaps as the live checks see a node's. */
function asNode({ disk, info }: { disk: ImageDisk; info?: ImageInfo }): CheckpointNode {
  return {
    drive: { name: disk.name, node: disk.path, size: info!.virtualSize, device: "" },
    node: disk.path,
    driver: "qcow2",
    persistent: true,
    bitmaps: info!.bitmaps.map((bitmap) => ({
      name: bitmap.name,
      recording: bitmap.enabled,
      busy: false,
      persistent: true,
      ...(bitmap.inUse && { inconsistent: true }),
      granularity: bitmap.granularity,
      count: 0,
    })),
  };
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
