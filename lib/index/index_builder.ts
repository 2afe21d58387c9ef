// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Builds an archive index while the archive streams by, extent after extent, with no
 * seeking back: what `backup`, `index` and `convert` write, and what `verify` compares.
 *
 * @module
 */
import type { VmaHeaderPiece } from "../vma/extent_stream.ts";
import type { SlotRun } from "../vma/extent_header.ts";
import { BLOCK_SIZE, EXTENT_HEADER_SIZE, HeaderOffset } from "../vma/format.ts";
import { Growable } from "./_growable.ts";
import type { DigestScope, VmaIndex, VmaIndexBase } from "./index_format.ts";

interface OpenRun {
  first: number;
  count: number;
  slot: number;
  zero: number;
}

/**
 * Collects the index of one archive. Memory: 4 + 32 bytes per extent (its counts and
 * digest) and 18 bytes per run of clusters that lie in consecutive slots; an archive
 * written in order has a few runs per device, so a 1 TiB disk (289,262 extents) takes about
 * 10 MiB.
 *
 * @example Index a small archive
 * ```ts
 * import assert from "node:assert/strict";
 * import { IndexBuilder, VmaExtentStream, VmaWriterStream } from "../../mod.ts";
 *
 * const data = new Uint8Array(65536).fill(1);
 * const pieces = ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 3 * 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0xffff, data },
 *   { type: "zeros" as const, devId: 1, cluster: 1, count: 2 },
 * ]).pipeThrough(new VmaWriterStream()).pipeThrough(new VmaExtentStream());
 * let builder: IndexBuilder | undefined;
 * for await (const piece of pieces) {
 *   if (piece.type === "header") builder = new IndexBuilder(piece);
 *   else builder!.addExtent(piece, new Uint8Array(32));
 * }
 * const index = builder!.finish({ digestScope: "vma-data" });
 * assert.deepEqual([...index.blockCounts], [16]);
 * assert.deepEqual([...index.runs.counts], [1, 2]); // a data run, then a zero run
 * assert.deepEqual([...index.runs.zero], [0, 1]);
 * ```
 */
export class IndexBuilder {
  #header: VmaHeaderPiece["header"];
  #headerMd5: string;
  #blockCounts = new Growable(Uint16Array);
  #slotCounts = new Growable(Uint8Array);
  #digests = new Growable(Uint8Array);
  #open: (OpenRun | undefined)[] = [];
  #runDevIds = new Growable(Uint8Array);
  #runFirst = new Growable(Uint32Array);
  #runCounts = new Growable(Uint32Array);
  #runSlots = new Growable(Float64Array);
  #runZero = new Growable(Uint8Array);
  #slots = 0;
  #bytes: number;
  static readonly #noDigest = new Uint8Array(32);

  /** A builder for the archive that `header` starts (its bytes are read only here). */
  constructor(header: VmaHeaderPiece) {
    this.#header = header.header;
    this.#headerMd5 = header.bytes.subarray(HeaderOffset.md5, HeaderOffset.md5 + 16).toHex();
    this.#bytes = header.header.headerSize;
  }

  /** Extents added so far. */
  get extents(): number {
    return this.#blockCounts.length;
  }

  /** Bytes of index state held: about 36 per extent, plus 18 per run. */
  get memoryBytes(): number {
    return this.#blockCounts.capacityBytes + this.#slotCounts.capacityBytes +
      this.#digests.capacityBytes + this.#runDevIds.capacityBytes + this.#runFirst.capacityBytes +
      this.#runCounts.capacityBytes + this.#runSlots.capacityBytes + this.#runZero.capacityBytes +
      18 * this.#open.length;
  }

  /** Archive bytes covered so far (header and extents). */
  get archiveBytes(): number {
    return this.#bytes;
  }

  /**
   * Adds the next extent of the archive, with the digest of its stored data (32 bytes), or
   * `null` for an extent without data.
   */
  addExtent(
    extent: { blockCount: number; slotCount: number; runs: readonly SlotRun[] },
    digest: Uint8Array | null,
  ): void {
    this.#blockCounts.push(extent.blockCount);
    this.#slotCounts.push(extent.slotCount);
    this.#digests.pushAll(digest ?? IndexBuilder.#noDigest);
    this.#bytes += EXTENT_HEADER_SIZE + extent.blockCount * BLOCK_SIZE;
    for (const { devId, cluster, count, zero: isZero } of extent.runs) {
      const zero = isZero ? 1 : 0;
      const slot = this.#slots;
      this.#slots += count;
      const run = this.#open[devId];
      if (
        run !== undefined && cluster === run.first + run.count && slot === run.slot + run.count &&
        zero === run.zero
      ) {
        run.count += count;
        continue;
      }
      if (run !== undefined) this.#close(devId, run);
      this.#open[devId] = { first: cluster, count, slot, zero };
    }
  }

  /** The finished index; call once, after the last extent. */
  finish(
    options: { digestScope: DigestScope; base?: VmaIndexBase; framesDigest?: string },
  ): VmaIndex {
    this.#open.forEach((run, devId) => run && this.#close(devId, run));
    this.#open = [];
    const header = this.#header;
    return {
      uuid: header.uuid,
      ctime: header.ctime,
      headerSize: header.headerSize,
      headerMd5: this.#headerMd5,
      archiveBytes: this.#bytes,
      devices: header.devices.map(({ devId, name, size }) => ({ devId, name, size })),
      digestScope: options.digestScope,
      ...(options.base && { base: options.base }),
      ...(options.framesDigest && { framesDigest: options.framesDigest }),
      blockCounts: this.#blockCounts.view().slice(),
      slotCounts: this.#slotCounts.view().slice(),
      digests: this.#digests.view().slice(),
      runs: this.#sortedRuns(),
    };
  }

  #close(devId: number, run: OpenRun): void {
    this.#runDevIds.push(devId);
    this.#runFirst.push(run.first);
    this.#runCounts.push(run.count);
    this.#runSlots.push(run.slot);
    this.#runZero.push(run.zero);
  }

  /** Runs by device, then by first cluster, as the index stores them. */
  #sortedRuns(): VmaIndex["runs"] {
    const devIds = this.#runDevIds.view();
    const first = this.#runFirst.view();
    const order = Uint32Array.from({ length: devIds.length }, (_, i) => i)
      .sort((a, b) => devIds[a]! - devIds[b]! || first[a]! - first[b]!);
    const pick = <T extends Uint8Array | Uint32Array | Float64Array>(values: T): T => {
      const sorted = new (values.constructor as { new (length: number): T })(order.length);
      order.forEach((from, to) => (sorted[to] = values[from]!));
      return sorted;
    };
    return {
      devIds: pick(devIds),
      firstClusters: pick(first),
      counts: pick(this.#runCounts.view()),
      slots: pick(this.#runSlots.view()),
      zero: pick(this.#runZero.view()),
    };
  }
}
