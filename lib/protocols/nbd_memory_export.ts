// Copyright 2026 the vmabackup authors. MIT license.
/**
 * An NBD export that keeps its disk in memory: for tests, examples and small scratch disks.
 *
 * @module
 */
import { isZeroRange } from "../_bytes.ts";
import type {
  NbdBlockDescriptor,
  NbdBlockSizes,
  NbdBlockStatusContext,
  NbdExportHandler,
  NbdReadChunk,
} from "./nbd_server.ts";

/** Options of {@linkcode NbdMemoryExport}. */
export interface NbdMemoryExportOptions {
  /** Refuse writes (`NBD_FLAG_READ_ONLY`). */
  readOnly?: boolean;
  /** Free text for `NBD_OPT_LIST` and `nbdinfo`. */
  description?: string;
  /** Block size constraints (default: the server's). */
  blockSizes?: NbdBlockSizes;
  /** Runs of all-zero blocks of this many bytes read as holes (default 4096). */
  granularity?: number;
}

const HOLE_AND_ZERO = 3; // NbdStateFlag.HOLE | NbdStateFlag.ZERO

/**
 * An export over a `Uint8Array` the server reads and writes in place. Reads send the
 * all-zero blocks as holes without copying anything (the data chunks are views of the
 * array), `base:allocation` reports the same zero blocks as `HOLE | ZERO`, and WRITE,
 * WRITE_ZEROES and TRIM change the array. Several connections share it (`CAN_MULTI_CONN`).
 *
 * @example Serve a disk with a hole and look at its allocation
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdClient } from "./nbd_client.ts";
 * import { NbdMemoryExport } from "./nbd_memory_export.ts";
 * import { NbdServer } from "./nbd_server.ts";
 *
 * const disk = new NbdMemoryExport(1 << 20);
 * disk.data.fill(1, 0, 65536);
 * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, { disk });
 * await using client = await NbdClient.connect(server.uri("disk"), {
 *   metaContexts: ["base:allocation"],
 * });
 * assert.deepEqual(await Array.fromAsync(client.extents("base:allocation")), [
 *   { offset: 0, length: 65536, flags: 0 },
 *   { offset: 65536, length: (1 << 20) - 65536, flags: 3 },
 * ]);
 * await client.write(65536, new Uint8Array(512).fill(2));
 * assert.equal(disk.data[65536], 2);
 * ```
 */
export class NbdMemoryExport implements NbdExportHandler {
  /** The disk's bytes, shared with whoever passed them in. */
  readonly data: Uint8Array;
  /** Export size in bytes. */
  readonly size: number;
  /** Whether writes are refused. */
  readonly readOnly: boolean;
  /** Always true: every connection sees the same array. */
  readonly multiConn = true;
  /** Free text for `NBD_OPT_LIST`. */
  readonly description: string;
  /** Block size constraints, when set. */
  readonly blockSizes?: NbdBlockSizes;
  #granularity: number;

  /**
   * Creates an export over `data` (used in place), or over `size` zero bytes.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   *
   * const bytes = new Uint8Array(8192);
   * assert.equal(new NbdMemoryExport(bytes).data, bytes);
   * assert.equal(new NbdMemoryExport(4096).size, 4096);
   * ```
   *
   * @throws {RangeError} for a size that is not a byte count or a bad granularity.
   */
  constructor(data: Uint8Array | number, options: NbdMemoryExportOptions = {}) {
    if (typeof data === "number" && (!Number.isSafeInteger(data) || data < 0)) {
      throw new RangeError(`Cannot create a memory export: ${data} is not a byte count`);
    }
    const granularity = options.granularity ?? 4096;
    if (!Number.isInteger(granularity) || granularity < 1) {
      throw new RangeError(`Cannot create a memory export: Granularity ${granularity} < 1`);
    }
    this.data = typeof data === "number" ? new Uint8Array(data) : data;
    this.size = this.data.byteLength;
    this.readOnly = options.readOnly ?? false;
    this.description = options.description ?? "";
    if (options.blockSizes !== undefined) this.blockSizes = options.blockSizes;
    this.#granularity = granularity;
  }

  /**
   * The range as chunks: views of the array for data, holes for all-zero blocks.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   *
   * const disk = new NbdMemoryExport(8192);
   * disk.data[4096] = 9;
   * const chunks = disk.read(0, 8192);
   * assert.deepEqual(chunks.map((c) => c.type), ["hole", "data"]);
   * ```
   */
  read(offset: number, length: number): NbdReadChunk[] {
    return this.#runs(offset, offset + length, Infinity).map((run) =>
      run.zero
        ? { type: "hole", offset: run.start, length: run.end - run.start }
        : { type: "data", offset: run.start, data: this.data.subarray(run.start, run.end) }
    );
  }

  /**
   * Receives a write straight into the array.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   *
   * const disk = new NbdMemoryExport(4096);
   * await disk.write(10, 2, (target) => Promise.resolve(void target.set([4, 5])));
   * assert.deepEqual([...disk.data.subarray(10, 12)], [4, 5]);
   * ```
   */
  async write(
    offset: number,
    length: number,
    read: (target: Uint8Array) => Promise<void>,
  ): Promise<void> {
    await read(this.data.subarray(offset, offset + length));
  }

  /**
   * Zeroes a range.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   *
   * const disk = new NbdMemoryExport(new Uint8Array(4096).fill(1));
   * disk.writeZeroes(0, 512);
   * assert.equal(disk.data[511], 0);
   * assert.equal(disk.data[512], 1);
   * ```
   */
  writeZeroes(offset: number, length: number): void {
    this.data.fill(0, offset, offset + length);
  }

  /**
   * Trims a range: it reads as zeroes afterwards.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   *
   * const disk = new NbdMemoryExport(new Uint8Array(4096).fill(1));
   * disk.trim(0, 4096);
   * assert.ok(disk.data.every((byte) => byte === 0));
   * ```
   */
  trim(offset: number, length: number): void {
    this.data.fill(0, offset, offset + length);
  }

  /**
   * Nothing to persist: memory is all there is.
   *
   * @example
   * ```ts
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   *
   * new NbdMemoryExport(4096).flush();
   * ```
   */
  flush(): void {}

  /**
   * `base:allocation`: all-zero blocks are `HOLE | ZERO` (3), the others data (0).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   *
   * const disk = new NbdMemoryExport(16384);
   * disk.data[8192] = 1;
   * assert.deepEqual(disk.blockStatus(0, 16384, { maxExtents: 2 }), [
   *   { length: 8192, flags: 3 },
   *   { length: 4096, flags: 0 },
   * ]);
   * ```
   */
  blockStatus(
    offset: number,
    length: number,
    context: Pick<NbdBlockStatusContext, "maxExtents">,
  ): NbdBlockDescriptor[] {
    return this.#runs(offset, offset + length, context.maxExtents).map((run) => ({
      length: run.end - run.start,
      flags: run.zero ? HOLE_AND_ZERO : 0,
    }));
  }

  /** Runs of all-zero or data blocks within [start, end), at most `limit` of them. */
  #runs(start: number, end: number, limit: number) {
    const granularity = this.#granularity;
    const runs: { start: number; end: number; zero: boolean }[] = [];
    for (let at = start; at < end;) {
      const stop = Math.min(end, (Math.floor(at / granularity) + 1) * granularity);
      const zero = isZeroRange(this.data, at, stop - at);
      const last = runs[runs.length - 1];
      if (last !== undefined && last.zero === zero) last.end = stop;
      else if (runs.length === limit) break;
      else runs.push({ start: at, end: stop, zero });
      at = stop;
    }
    return runs;
  }
}
