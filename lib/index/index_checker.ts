// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Checks, while an archive streams by, that its index describes it: the same header,
 * every extent where the index says, every cluster in the slot the index gives it, and
 * (for `vma-data` digests) the same data.
 *
 * @module
 */
import type { VmaExtentInfo } from "../vma/_archive_parser.ts";
import { VmaFormatError } from "../vma/errors.ts";
import type { VmaIndex } from "./index_format.ts";
import { IndexMap } from "./index_map.ts";

/**
 * Compares an archive with its index, extent by extent, without holding either: feed it
 * the header's identity, then each extent from `VmaReaderStream({ onExtent })`, then call
 * `finish` with the archive's length. A difference is a `VmaFormatError`
 * (`index-mismatch`) at the offset where the archive and the index part ways: a foreign,
 * stale or tampered index.
 *
 * @example An index checked against its own archive
 * ```ts
 * import assert from "node:assert/strict";
 * import {
 *   IndexChecker, VmaExtentStream, VmaIndexStream, VmaReaderStream, VmaWriterStream,
 * } from "../../mod.ts";
 *
 * const archive = await new Response(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 1, data: new Uint8Array(65536).fill(4) },
 * ]).pipeThrough(new VmaWriterStream())).bytes();
 * const indexer = new VmaIndexStream();
 * await ReadableStream.from([archive]).pipeThrough(new VmaExtentStream()).pipeThrough(indexer)
 *   .pipeTo(new WritableStream());
 * const checker = new IndexChecker(indexer.index!);
 * const reader = new VmaReaderStream({
 *   skipData: true,
 *   digestData: true,
 *   onExtent: (extent) => checker.extent(extent, reader.stats),
 * });
 * await ReadableStream.from([archive]).pipeThrough(reader).pipeTo(new WritableStream());
 * checker.finish(reader.stats.bytes);
 * assert.equal(checker.digestsChecked, 1);
 * ```
 */
export class IndexChecker {
  /** The index being checked. */
  readonly index: VmaIndex;
  /** Extents whose data matched their `vma-data` digest. */
  digestsChecked = 0;
  /** Extents with data blocks seen. */
  extentsWithData = 0;
  #map: IndexMap;
  #extent = 0;
  #slot = 0;
  #headerChecked = false;

  /** A checker for `index`. */
  constructor(index: VmaIndex) {
    this.index = index;
    this.#map = new IndexMap(index);
  }

  /**
   * Checks the next extent; `header` is the reader's stats, whose `uuid` and `headerMd5`
   * identify the archive (they are known before the first extent).
   */
  extent(extent: VmaExtentInfo, header: { uuid: string; headerMd5: string }): void {
    if (!this.#headerChecked) {
      this.#checkHeader(header);
      this.#headerChecked = true;
    }
    const e = this.#extent++;
    const { index } = this;
    const fail = (detail: string): never => {
      throw new VmaFormatError(
        "index-mismatch",
        extent.offset,
        `extent ${e} does not match the index: ${detail}`,
      );
    };
    if (e >= index.blockCounts.length) {
      fail(`the index lists only ${index.blockCounts.length} extents`);
    }
    if (extent.offset !== this.#map.extentOffsets[e]) {
      fail(`the index puts it at byte ${this.#map.extentOffsets[e]}`);
    }
    if (extent.blockCount !== index.blockCounts[e] || extent.slots.length !== index.slotCounts[e]) {
      fail(
        `it has ${extent.blockCount} blocks in ${extent.slots.length} slots, the index ${
          index.blockCounts[e]
        } in ${index.slotCounts[e]}`,
      );
    }
    for (const { devId, cluster, mask } of extent.slots) {
      const place = this.#map.slotOf(devId, cluster);
      if (place.slot !== this.#slot || place.zero !== (mask === 0)) {
        fail(`cluster ${cluster} of device ${devId} is elsewhere in the index`);
      }
      this.#slot++;
    }
    if (extent.blockCount > 0) this.extentsWithData++;
    if (extent.digest !== null && index.digestScope === "vma-data") {
      if (extent.digest.toHex() !== index.digests.subarray(32 * e, 32 * e + 32).toHex()) {
        throw new VmaFormatError(
          "bad-frame-checksum",
          extent.offset,
          `extent ${e}${this.#map.describe(e)}: its data does not match the SHA-256 in the index`,
        );
      }
      this.digestsChecked++;
    }
  }

  /** Checks the end: every extent was there, and the archive has the index's length. */
  finish(archiveBytes: number): void {
    if (
      this.#extent !== this.index.blockCounts.length || archiveBytes !== this.index.archiveBytes
    ) {
      throw new VmaFormatError(
        "index-mismatch",
        archiveBytes,
        `the archive ends after ${this.#extent} extents and ${archiveBytes} bytes, the index after ${this.index.blockCounts.length} and ${this.index.archiveBytes} (a stale index?)`,
      );
    }
  }

  /** What extent holds archive offset `offset`, for messages: `" (drive-scsi0 clusters 0-57)"`. */
  describeOffset(offset: number): string {
    const e = this.#map.extentAt(offset);
    return e < 0 ? " (the archive header)" : this.#map.describe(e);
  }

  #checkHeader({ uuid, headerMd5 }: { uuid: string; headerMd5: string }): void {
    if (uuid !== this.index.uuid) {
      throw new VmaFormatError(
        "index-mismatch",
        8,
        `the index belongs to another archive (index UUID ${this.index.uuid}, archive UUID ${uuid})`,
      );
    }
    if (headerMd5 !== this.index.headerMd5) {
      throw new VmaFormatError(
        "index-mismatch",
        32,
        "the index does not match this archive's header (a stale index of an archive with the same UUID)",
      );
    }
  }
}
