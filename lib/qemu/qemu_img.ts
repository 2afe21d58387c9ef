// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `qemu-img create`: the empty image a restore into a non-raw format writes into.
 *
 * @module
 */
import type { ImageFormat } from "./image_format.ts";
import { spawnQemuTool } from "./spawn.ts";

/**
 * Creates an empty image of `size` bytes with `qemu-img create`, or fails with qemu-img's
 * own message (an {@linkcode ImageFileError} when the file system is at fault). qemu-img replaces a file already at `path`: callers that must not overwrite
 * check first. Needs `--allow-run=qemu-img`.
 *
 * @example Create a qcow2 image
 * ```ts
 * import assert from "node:assert/strict";
 * import { createImage } from "./qemu_img.ts";
 * import { detectImageFormat } from "./image_format.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await createImage(`${dir}/disk.qcow2`, "qcow2", 1 << 20);
 * assert.equal(await detectImageFormat(`${dir}/disk.qcow2`), "qcow2");
 * await assert.rejects(createImage(`${dir}/disk.vdi`, "vdi", -1), /Cannot create/);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function createImage(path: string, format: ImageFormat, size: number): Promise<void> {
  const options = format === "vpc" ? ["-o", "force_size=on"] : []; // keep the exact size
  const child = spawnQemuTool("qemu-img", [
    "create",
    "-q",
    "-f",
    format,
    ...options,
    path,
    `${size}`,
  ], {
    stdout: "null",
    stderr: "piped",
  });
  const [status, stderr] = await Promise.all([child.status, new Response(child.stderr).text()]);
  if (!status.success) {
    const message = `Cannot create ${path} as ${format}: ${
      stderr.trim().replace(/^qemu-img: /, "")
    }`;
    throw FILE_SYSTEM_ERRORS.test(stderr) ? new ImageFileError(message) : new Error(message);
  }
}

/** What qemu-img says when the file system, not the request, is at fault. */
const FILE_SYSTEM_ERRORS =
  /No space left on device|Disk quota exceeded|Input\/output error|Read-only file system|Permission denied/;

/**
 * qemu-img could not write the image file: the disk is full, read-only, failing, or not
 * writable for us. An I/O error, unlike a bad request (an unknown format, a bad size).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ImageFileError } from "./qemu_img.ts";
 *
 * assert.equal(new ImageFileError("Cannot create x: No space left on device").name, "ImageFileError");
 * ```
 */
export class ImageFileError extends Error {
  /** An error with `message`. */
  constructor(message: string) {
    super(message);
    this.name = "ImageFileError";
  }
}
