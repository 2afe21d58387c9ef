// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The magic bytes of the compressions vzdump uses, in one place: the decompressor picks its
 * decoder by them, and the VMA reader names them when it is handed a compressed stream.
 * No dependencies, so the lowest layers can use it.
 *
 * @module
 */

/** A compression vzdump uses for VMA archives, or `none`. */
export type Compression = "none" | "zstd" | "gzip" | "lzop";

/**
 * The compression of a stream from its first bytes (at least 4 are needed): zstd frames
 * (also skippable frames, which `pzstd` writes first), gzip, lzop, or a plain VMA archive.
 * `undefined` when the bytes are none of these.
 *
 * @example Detect a zstd stream
 * ```ts
 * import assert from "node:assert/strict";
 * import { detectCompression } from "./_compression_magic.ts";
 *
 * assert.equal(detectCompression(new Uint8Array([0x28, 0xb5, 0x2f, 0xfd])), "zstd");
 * assert.equal(detectCompression(new TextEncoder().encode("VMA\0")), "none");
 * assert.equal(detectCompression(new TextEncoder().encode("PK\x03\x04")), undefined);
 * ```
 */
export function detectCompression(head: Uint8Array): Compression | undefined {
  const [a, b, c, d] = head;
  if (a === 0x28 && b === 0xb5 && c === 0x2f && d === 0xfd) return "zstd";
  if (d === 0x18 && c === 0x4d && b === 0x2a && a !== undefined && (a & 0xf0) === 0x50) {
    return "zstd"; // a skippable frame (0x184D2A5?)
  }
  if (a === 0x1f && b === 0x8b) return "gzip";
  if (a === 0x89 && b === 0x4c && c === 0x5a && d === 0x4f) return "lzop";
  if (a === 0x56 && b === 0x4d && c === 0x41 && d === 0x00) return "none";
  return undefined;
}
