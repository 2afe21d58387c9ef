// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Persistent dirty bitmaps of qcow2 images, through `qemu-img`: what an image holds
 * (`qemu-img info`), and adding and removing one (`qemu-img bitmap`). An image that a running
 * QEMU has open is locked: every call then fails with qemu-img's message.
 *
 * @module
 */
import { ImageFileError } from "./qemu_img.ts";
import { spawnQemuTool } from "./spawn.ts";

/** A persistent dirty bitmap of a qcow2 image. */
export interface ImageBitmap {
  /** Its name. */
  name: string;
  /** Bytes per bit. */
  granularity: number;
  /** Whether it records the image's writes (qemu-img's `auto` flag). */
  enabled: boolean;
  /**
   * Whether a QEMU that had the image open did not store it on exit (killed, crashed): its
   * content cannot be trusted (qemu-img's `in-use` flag).
   */
  inUse: boolean;
}

/** What `qemu-img info` says about an image. */
export interface ImageInfo {
  /** Its format, as qemu-img names it (`qcow2`, `raw`, ...). */
  format: string;
  /** The size of the disk it holds, in bytes. */
  virtualSize: number;
  /** Its persistent dirty bitmaps (only qcow2 images have any). */
  bitmaps: ImageBitmap[];
}

/**
 * The format, size and persistent dirty bitmaps of an image, from `qemu-img info
 * --output=json`. Fails with qemu-img's message (an `ImageFileError` when the file system
 * is at fault), for example for an image a running QEMU has locked. Needs
 * `--allow-run=qemu-img`.
 *
 * @example A new qcow2 image and one bitmap
 * ```ts
 * import assert from "node:assert/strict";
 * import { addImageBitmap, imageInfo, removeImageBitmap } from "./image_bitmaps.ts";
 * import { createImage } from "./qemu_img.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await createImage(`${dir}/disk.qcow2`, "qcow2", 1 << 20);
 * await addImageBitmap(`${dir}/disk.qcow2`, "vmabackup-a", 65536);
 * const info = await imageInfo(`${dir}/disk.qcow2`);
 * assert.deepEqual([info.format, info.virtualSize], ["qcow2", 1 << 20]);
 * assert.deepEqual(info.bitmaps, [{ name: "vmabackup-a", granularity: 65536, enabled: true, inUse: false }]);
 * await removeImageBitmap(`${dir}/disk.qcow2`, "vmabackup-a");
 * assert.deepEqual((await imageInfo(`${dir}/disk.qcow2`)).bitmaps, []);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function imageInfo(path: string): Promise<ImageInfo> {
  const stdout = await qemuImg(`Cannot read the image ${path}`, [
    ...["info", "--output=json", path],
  ]);
  const info = JSON.parse(stdout) as {
    format: string;
    "virtual-size": number;
    "format-specific"?: {
      data?: { bitmaps?: { name: string; granularity: number; flags: string[] }[] };
    };
  };
  const bitmaps = info["format-specific"]?.data?.bitmaps ?? [];
  return {
    format: info.format,
    virtualSize: info["virtual-size"],
    bitmaps: bitmaps.map(({ name, granularity, flags }) => ({
      name,
      granularity,
      enabled: flags.includes("auto"),
      inUse: flags.includes("in-use"),
    })),
  };
}

/**
 * Adds an enabled persistent dirty bitmap `name` of `granularity` bytes per bit to a qcow2
 * image (`qemu-img bitmap --add`). Fails with qemu-img's message, for example when it exists.
 *
 * @example A bitmap cannot be added twice
 * ```ts
 * import assert from "node:assert/strict";
 * import { addImageBitmap } from "./image_bitmaps.ts";
 * import { createImage } from "./qemu_img.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await createImage(`${dir}/disk.qcow2`, "qcow2", 1 << 20);
 * await addImageBitmap(`${dir}/disk.qcow2`, "b", 65536);
 * await assert.rejects(addImageBitmap(`${dir}/disk.qcow2`, "b", 65536), /Cannot add the dirty bitmap b/);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function addImageBitmap(
  path: string,
  name: string,
  granularity: number,
): Promise<void> {
  await qemuImg(`Cannot add the dirty bitmap ${name} to ${path}`, [
    ...["bitmap", "--add", "-g", `${granularity}`, "-f", "qcow2", path, name],
  ]);
}

/**
 * Removes the persistent dirty bitmap `name` of a qcow2 image (`qemu-img bitmap --remove`).
 *
 * @example A bitmap that is not there
 * ```ts
 * import assert from "node:assert/strict";
 * import { removeImageBitmap } from "./image_bitmaps.ts";
 * import { createImage } from "./qemu_img.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await createImage(`${dir}/disk.qcow2`, "qcow2", 1 << 20);
 * await assert.rejects(removeImageBitmap(`${dir}/disk.qcow2`, "c"), /Cannot remove the dirty bitmap c/);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function removeImageBitmap(path: string, name: string): Promise<void> {
  await qemuImg(`Cannot remove the dirty bitmap ${name} of ${path}`, [
    ...["bitmap", "--remove", "-f", "qcow2", path, name],
  ]);
}

/** Runs qemu-img; its stdout, or an error that starts with `what` and ends with its message. */
async function qemuImg(what: string, args: string[]): Promise<string> {
  const child = spawnQemuTool("qemu-img", args, { stdout: "piped", stderr: "piped" });
  const [status, stdout, stderr] = await Promise.all([
    child.status,
    new Response(child.stdout).text(),
    new Response(child.stderr).text(),
  ]);
  if (!status.success) {
    // One line, however many qemu-img printed ("Failed to get "write" lock" and a hint).
    const line = stderr.trim().split("\n").map((text) => text.replace(/^qemu-img: /, ""))
      .join(" ");
    const message = `${what}: ${line}`;
    throw FILE_SYSTEM_ERRORS.test(line) ? new ImageFileError(message) : new Error(message);
  }
  return stdout;
}

/** What qemu-img says when the file system, not the request, is at fault. */
const FILE_SYSTEM_ERRORS =
  /No space left on device|Disk quota exceeded|Input\/output error|Read-only file system|Permission denied/;
