// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Disk image formats, recognised by their magic bytes as QEMU's probes do.
 *
 * @module
 */
import { readUpTo } from "../_io.ts";

/** Image formats QEMU reads that this toolkit backs up and restores. */
export type ImageFormat = "raw" | "qcow2" | "vmdk" | "vdi" | "vhdx" | "vpc" | "qed";

/**
 * Formats `extract --format` can write (all of them).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatFromMagic, IMAGE_FORMATS } from "./image_format.ts";
 *
 * assert.ok(IMAGE_FORMATS.includes("qcow2"));
 * assert.ok(IMAGE_FORMATS.includes(formatFromMagic(new TextEncoder().encode("vhdxfile"))));
 * ```
 */
export const IMAGE_FORMATS: readonly ImageFormat[] = [
  "raw",
  "qcow2",
  "vmdk",
  "vdi",
  "vhdx",
  "vpc",
  "qed",
];

const ascii = (text: string) => [...text].map((char) => char.charCodeAt(0));
const MAGICS: [ImageFormat, number, number[]][] = [
  ["qcow2", 0, [0x51, 0x46, 0x49, 0xfb]], // "QFI\xfb"; qcow version 1 too, which qemu-nbd refuses
  ["vmdk", 0, ascii("KDMV")], // hosted sparse extent
  ["vmdk", 0, ascii("# Disk DescriptorFile")], // a descriptor file
  ["vdi", 64, [0x7f, 0x10, 0xda, 0xbe]], // signature 0xbeda107f, little-endian
  ["vhdx", 0, ascii("vhdxfile")],
  ["vpc", 0, ascii("conectix")], // dynamic VHD; a fixed VHD reads as raw, for QEMU too
  ["qed", 0, ascii("QED\0")],
];

/**
 * The format of an image from its first 512 bytes: a known magic, or `raw` for anything
 * else, as QEMU's own probing treats it.
 *
 * @example Recognise a qcow2 header
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatFromMagic } from "./image_format.ts";
 *
 * assert.equal(formatFromMagic(new Uint8Array([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3])), "qcow2");
 * assert.equal(formatFromMagic(new Uint8Array(512)), "raw");
 * ```
 */
export function formatFromMagic(head: Uint8Array): ImageFormat {
  for (const [format, offset, magic] of MAGICS) {
    if (magic.every((byte, i) => head[offset + i] === byte)) return format;
  }
  return "raw";
}

/**
 * Reads the first 512 bytes of `path` and recognises its format.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { detectImageFormat } from "./image_format.ts";
 *
 * const path = await Deno.makeTempFile();
 * await Deno.writeFile(path, new TextEncoder().encode("conectix"));
 * assert.equal(await detectImageFormat(path), "vpc");
 * await Deno.remove(path);
 * ```
 */
export async function detectImageFormat(path: string | URL): Promise<ImageFormat> {
  using file = await Deno.open(path, { read: true });
  const head = new Uint8Array(512);
  return formatFromMagic(head.subarray(0, await readUpTo(file, head)));
}
