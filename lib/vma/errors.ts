// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The error type of the VMA reader.
 *
 * @module
 */

/** Why an archive was rejected; stable strings for scripts and tests. */
export type VmaFormatReason =
  | "compressed-input"
  | "bad-compression"
  | "truncated-header"
  | "bad-magic"
  | "bad-header-size"
  | "bad-header-checksum"
  | "bad-version"
  | "bad-blob-buffer"
  | "bad-config"
  | "bad-device"
  | "short-extent-header"
  | "bad-extent-checksum"
  | "bad-extent-uuid"
  | "bad-extent-magic"
  | "short-extent"
  | "bad-dev-id"
  | "cluster-out-of-range"
  | "duplicate-cluster"
  | "vmstate-order"
  | "write-beyond-end"
  | "block-count-mismatch"
  | "missing-cluster"
  | "bad-index"
  | "index-mismatch"
  | "bad-seek-table"
  | "bad-frame-checksum";

/**
 * A VMA archive is malformed, corrupt or incomplete.
 *
 * The message keeps the reference reader's wording (for example "wrong vma extent header
 * chechsum") so users can match it with Proxmox output, and `offset` is the archive byte
 * offset of the structure that failed the check.
 *
 * @example Inspect the reason and offset
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaFormatError } from "./errors.ts";
 *
 * const error = new VmaFormatError("bad-magic", 0, "not a vma file - wrong magic number");
 * assert.equal(error.reason, "bad-magic");
 * assert.match(error.message, /at byte 0/);
 * ```
 */
export class VmaFormatError extends SyntaxError {
  /** Machine-readable reason. */
  readonly reason: VmaFormatReason;
  /** Archive byte offset of the offending structure. */
  readonly offset: number;

  /** An error of `reason` at archive byte `offset`; `detail` says what is wrong. */
  constructor(reason: VmaFormatReason, offset: number, detail: string) {
    super(`Cannot read the VMA archive: ${detail} (at byte ${offset})`);
    this.name = "VmaFormatError";
    this.reason = reason;
    this.offset = offset;
  }
}
