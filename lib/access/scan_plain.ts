// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The map of a plain `.vma` without a sidecar, from its extent headers alone.
 *
 * @module
 */
import type { VmaIndex } from "../index/index_format.ts";
import { IndexBuilder } from "../index/index_builder.ts";
import type { RangeReader } from "../storage/range_reader.ts";
import { VmaFormatError } from "../vma/errors.ts";
import { decodeExtentHeader, slotRuns } from "../vma/extent_header.ts";
import {
  BLOCK_SIZE,
  EXTENT_HEADER_SIZE,
  HEADER_FIXED_SIZE,
  READER_MAX_HEADER_SIZE,
} from "../vma/format.ts";
import { decodeHeader, headerSizeOf } from "../vma/header.ts";

/**
 * Builds the map of a plain `.vma` by reading its header and each extent header, seeking
 * over the data: 512 bytes read per 3.8 MB extent. The result is an index without digests
 * (`digestScope: "none"`), enough to read any cluster at random. Every extent header is
 * checked (MD5, UUID, magic); an archive cut short is a `VmaFormatError`.
 *
 * @example Map an archive without reading its data
 * ```ts
 * import assert from "node:assert/strict";
 * import { fileRangeReader, VmaWriterStream } from "../../mod.ts";
 * import { scanPlainArchive } from "./scan_plain.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma" });
 * await Deno.writeFile(path, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 3 * 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 2, mask: 1, data: new Uint8Array(65536).fill(1) },
 *   { type: "zeros" as const, devId: 1, cluster: 0, count: 2 },
 * ]).pipeThrough(new VmaWriterStream()));
 * const reader = await fileRangeReader(path);
 * const index = await scanPlainArchive(reader);
 * assert.equal(index.digestScope, "none");
 * assert.deepEqual([...index.runs.firstClusters], [0, 2]);
 * reader.close();
 * await Deno.remove(path);
 * ```
 */
export async function scanPlainArchive(reader: RangeReader): Promise<VmaIndex> {
  if (reader.size < HEADER_FIXED_SIZE) {
    throw new VmaFormatError(
      "truncated-header",
      reader.size,
      `can't read vma header - got EOF after ${reader.size} bytes`,
    );
  }
  const fixed = await reader.read(0, HEADER_FIXED_SIZE);
  const headerSize = headerSizeOf(fixed, READER_MAX_HEADER_SIZE);
  if (headerSize > reader.size) {
    throw new VmaFormatError(
      "truncated-header",
      reader.size,
      `can't read vma header data - got EOF after ${reader.size} bytes`,
    );
  }
  const bytes = await reader.read(0, headerSize);
  const header = decodeHeader(bytes);
  const builder = new IndexBuilder({ type: "header", bytes, header });
  const uuid = bytes.subarray(8, 24);
  let offset = headerSize;
  while (offset < reader.size) {
    // Each header says where the next one starts, so they are read one after another.
    if (reader.size - offset < EXTENT_HEADER_SIZE) {
      throw new VmaFormatError(
        "short-extent-header",
        offset,
        `read short extent (${reader.size - offset} bytes)`,
      );
    }
    const extent = decodeExtentHeader(await reader.read(offset, EXTENT_HEADER_SIZE), offset, uuid);
    const length = EXTENT_HEADER_SIZE + extent.blockCount * BLOCK_SIZE;
    if (offset + length > reader.size) {
      throw new VmaFormatError(
        "short-extent",
        offset,
        `short vma extent (${reader.size - offset} < ${length})`,
      );
    }
    builder.addExtent(
      {
        blockCount: extent.blockCount,
        slotCount: extent.slots.length,
        runs: slotRuns(extent.slots),
      },
      null,
    );
    offset += length;
  }
  return builder.finish({ digestScope: "none" });
}
