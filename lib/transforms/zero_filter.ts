// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The sparse filter: leaves all-zero 4 KiB blocks out of cluster masks.
 *
 * @module
 */
import { zeroBlockMask } from "../_bytes.ts";
import type { VmaRecord } from "../vma/records.ts";

/**
 * Computes each cluster's mask from its content: a block that is all zero is not stored.
 * A cluster with no data block left becomes a mask-0 record with `data: null`, which the
 * writer still records, as the format requires; its buffer lease is released at once.
 * Other records pass through unchanged.
 *
 * @example Drop zero blocks
 * ```ts
 * import assert from "node:assert/strict";
 * import { ZeroFilterStream, type VmaRecord } from "../../mod.ts";
 *
 * const data = new Uint8Array(65536);
 * data[4096] = 1; // only block 1 holds data
 * const input: VmaRecord[] = [
 *   { type: "cluster", devId: 1, cluster: 0, mask: 0xffff, data },
 *   { type: "cluster", devId: 1, cluster: 1, mask: 0xffff, data: new Uint8Array(65536) },
 * ];
 * const [first, second] = await Array.fromAsync(
 *   ReadableStream.from(input).pipeThrough(new ZeroFilterStream()),
 * );
 * assert.equal(first?.type === "cluster" && first.mask, 0b10);
 * assert.equal(second?.type === "cluster" && second.data, null);
 * ```
 */
export class ZeroFilterStream extends TransformStream<VmaRecord, VmaRecord> {
  constructor() {
    super({
      transform(record, controller) {
        if (record.type !== "cluster" || record.data === null) {
          controller.enqueue(record);
          return;
        }
        const mask = zeroBlockMask(record.data, record.mask);
        if (mask !== 0) {
          controller.enqueue(mask === record.mask ? record : { ...record, mask });
          return;
        }
        record.lease?.release();
        const { devId, cluster } = record;
        controller.enqueue({ type: "cluster", devId, cluster, mask: 0, data: null });
      },
    });
  }
}
