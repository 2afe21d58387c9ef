// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A plain archive and its sidecar index: pieces in, the archive's bytes out unchanged, and
 * the index of what went by.
 *
 * @module
 */
import { createHash } from "node:crypto";
import type { VmaExtentPiece, VmaHeaderPiece } from "../vma/extent_stream.ts";
import { EXTENT_HEADER_SIZE } from "../vma/format.ts";
import { type VmaIndex, type VmaIndexBase } from "./index_format.ts";
import { IndexBuilder } from "./index_builder.ts";

/** Bytes of small pieces gathered into one chunk. */
const SMALL_BATCH = 64 * 1024;

/**
 * Turns an archive's pieces (from `VmaExtentStream`) back into its exact bytes, and builds
 * its index on the way, with a SHA-256 of each extent's data blocks: the index of a plain
 * `.vma` (which cannot carry a trailer: readers take trailing bytes for a short extent) or
 * of a `.vma.gz`, written beside it as `ARCHIVE.idx`. Chunks pass on as they came, so the
 * receiver gives them back with `releaseChunk` as before.
 *
 * @example Index a plain archive
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeIndex, VmaExtentStream, VmaIndexStream, VmaWriterStream } from "../../mod.ts";
 *
 * const archive = await new Response(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 1, data: new Uint8Array(65536).fill(5) },
 * ]).pipeThrough(new VmaWriterStream())).bytes();
 * const indexer = new VmaIndexStream();
 * const again = await new Response(
 *   ReadableStream.from([archive]).pipeThrough(new VmaExtentStream()).pipeThrough(indexer),
 * ).bytes();
 * assert.deepEqual(again, archive);
 * assert.equal(indexer.index?.digestScope, "vma-data");
 * assert.ok(encodeIndex(indexer.index!).byteLength > 0);
 * ```
 */
export class VmaIndexStream extends TransformStream<VmaHeaderPiece | VmaExtentPiece, Uint8Array> {
  #done: { index?: VmaIndex };

  /** An indexer for one archive; `base` is recorded for a synthetic full backup. */
  constructor(options: { base?: VmaIndexBase } = {}) {
    let builder: IndexBuilder | undefined;
    const done: { index?: VmaIndex } = {};
    // Extents without data (512 bytes each, thousands on a sparse disk) go out together in
    // chunks of up to 64 KiB, as the writer batches them: one write each, not thousands.
    const small = new Uint8Array(SMALL_BATCH);
    let fill = 0;
    const flushSmall = (controller: TransformStreamDefaultController<Uint8Array>) => {
      if (fill > 0) controller.enqueue(small.slice(0, fill));
      fill = 0;
    };
    super({
      transform(piece, controller) {
        if (piece.type === "header") {
          builder = new IndexBuilder(piece);
        } else if (builder === undefined) {
          throw new TypeError("Cannot index the archive: An extent came before the header");
        } else {
          const digest = piece.blockCount === 0 ? null : new Uint8Array(
            createHash("sha256").update(piece.bytes.subarray(EXTENT_HEADER_SIZE)).digest(),
          );
          builder.addExtent(piece, digest);
        }
        if (piece.bytes.byteLength <= EXTENT_HEADER_SIZE) {
          if (fill + piece.bytes.byteLength > SMALL_BATCH) flushSmall(controller);
          small.set(piece.bytes, fill);
          fill += piece.bytes.byteLength;
          return;
        }
        flushSmall(controller);
        controller.enqueue(piece.bytes);
      },
      flush(controller) {
        flushSmall(controller);
        if (builder === undefined) {
          throw new TypeError("Cannot index the archive: It has no header");
        }
        done.index = builder.finish({
          digestScope: "vma-data",
          ...(options.base && { base: options.base }),
        });
      },
    });
    this.#done = done;
  }

  /** The index, once the stream has flushed. */
  get index(): VmaIndex | undefined {
    return this.#done.index;
  }
}
