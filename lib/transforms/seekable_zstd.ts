// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The seekable, self-checking `.vma.zst`: an archive's extents as zstd frames on every
 * core, then the archive index and a zstd seek table.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { BufferPool, exclusiveChunk } from "../_pool.ts";
import { EMPTY_CHECKSUM, INDEX_FRAME_MAGIC } from "../index/embedded_index.ts";
import { encodeIndex, type VmaIndex, type VmaIndexBase } from "../index/index_format.ts";
import { IndexBuilder } from "../index/index_builder.ts";
import { SeekTableWriter } from "../index/seek_table.ts";
import type { VmaExtentPiece, VmaHeaderPiece } from "../vma/extent_stream.ts";
import { BLOCK_SIZE, EXTENT_HEADER_SIZE, MAX_EXTENT_SIZE } from "../vma/format.ts";
import { slotRuns, type VmaExtentSlot } from "../vma/extent_header.ts";
import { FrameEncoder } from "./_frame_encoder.ts";
import { frameBound } from "./_zstd_workers.ts";
import { deliver } from "./_deliver.ts";
import { checkLevel } from "./zstd.ts";

/** Consecutive extents without data share one frame of up to this many bytes. */
const ZERO_BATCH = 64 * 1024;

/** Options of {@linkcode SeekableZstdStream}. */
export interface SeekableZstdOptions {
  /** zstd level, -7 to 19 (default 3). */
  level?: number;
  /** Worker threads (default: the cores but one; with `mainThread: false` one per core). */
  workers?: number;
  /** Whether this thread compresses when the workers are busy (default true). */
  mainThread?: boolean;
  /** For a synthetic full backup: the base archive, recorded in the index. */
  base?: VmaIndexBase;
  /**
   * Recycle the output chunks (default `false`); only for a pipeline in which every chunk
   * reaches exactly one final consumer that calls `releaseChunk` on it (no `tee()`).
   */
  reuseBuffers?: boolean;
}

type Output = TransformStreamDefaultController<Uint8Array>;

/**
 * An extent whose data is copied, compressed, from another seekable archive (a synthetic
 * full backup's unchanged extents): a new 512-byte header (this archive's UUID) and the
 * data frame as it was stored, with its checksum and digest. Only the header is compressed.
 */
export interface StoredExtentPiece {
  /** Discriminator. */
  type: "stored-extent";
  /** The extent's new 512-byte header. */
  header: Uint8Array;
  /** Its 4 KiB data blocks. */
  blockCount: number;
  /** Its used slots. */
  slots: VmaExtentSlot[];
  /** Its data frame, compressed, exactly as stored before. */
  frame: Uint8Array;
  /** The frame's content checksum (low 32 bits of XXH64). */
  checksum: number;
  /** SHA-256 of `frame`. */
  digest: Uint8Array;
}

/** What a job covers, for the index once its frames are back. */
interface JobEntry {
  /** The extents in the job's frames (none for the archive header). */
  extents: VmaExtentPiece[];
  /** Decompressed size of each frame. */
  sizes: number[];
  /** The archive header's job: nothing may go out before it. */
  header?: true;
}

/**
 * Compresses an archive's pieces (from `VmaExtentStream`) into a seekable `.vma.zst`:
 *
 * - the VMA header in one frame; each extent as two frames, its 512-byte header and its data,
 *   so any cluster is one frame read away and a later backup can copy a frame whose
 *   clusters did not change, writing only a new header frame; runs of extents without data
 *   share a frame;
 * - every frame with its XXH64 content checksum, as the `zstd` CLI writes them;
 * - then the archive index (see `encodeIndex`) in a skippable frame (magic `0x184D2A5B`),
 *   with a SHA-256 of each extent's compressed data frame;
 * - and last, the zstd seekable format's seek table (v0.1.0, with checksums), with an
 *   entry for every frame including the index frame.
 *
 * The decompressed bytes are exactly the input archive's: `zstd -d`, `pzstd -d` and the
 * Proxmox tools read the file as any `.vma.zst`. Only a stored extent (a synthetic full's
 * copy, {@linkcode StoredExtentPiece}) may go out ahead of extents still being compressed:
 * its header frame is compressed on this thread, and the order of extents is free. Frames are compressed in Workers and on
 * this thread, in order, with the memory of a few extents; the index grows by about 50
 * bytes per extent (about 14 MiB for a 1 TiB disk).
 *
 * @example A seekable archive that decodes to the plain one
 * ```ts
 * import assert from "node:assert/strict";
 * import { zstdDecompressSync } from "node:zlib";
 * import { SeekableZstdStream, VmaExtentStream, VmaWriterStream } from "../../mod.ts";
 *
 * const records = () => ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0xffff, data: new Uint8Array(65536).fill(3) },
 * ]);
 * const identity = { uuid: "1c5bd9b0-5aa2-4a31-8d2c-7e0bfe2b1d90", ctime: 0 };
 * const plain = await new Response(records().pipeThrough(new VmaWriterStream(identity))).bytes();
 * const seekable = new SeekableZstdStream();
 * const file = await new Response(
 *   records().pipeThrough(new VmaWriterStream(identity)).pipeThrough(new VmaExtentStream())
 *     .pipeThrough(seekable),
 * ).bytes();
 * assert.deepEqual(new Uint8Array(zstdDecompressSync(file)).subarray(0, 12800), plain.subarray(0, 12800));
 * assert.equal(seekable.index?.uuid, identity.uuid);
 * assert.deepEqual(file.subarray(-4), Uint8Array.of(0xb1, 0xea, 0x92, 0x8f)); // seekable magic
 * ```
 */
export class SeekableZstdStream
  extends TransformStream<VmaHeaderPiece | VmaExtentPiece | StoredExtentPiece, Uint8Array> {
  #done: { index?: VmaIndex };
  #table: SeekTableWriter;
  #encoder: FrameEncoder;

  /** A compressor for one archive; throws `RangeError` on a bad level. */
  constructor(options: SeekableZstdOptions = {}) {
    const encoder = new FrameEncoder({
      level: checkLevel(options.level ?? 3),
      outputSize: frameBound(MAX_EXTENT_SIZE) + frameBound(EXTENT_HEADER_SIZE),
      workers: options.workers,
      mainThread: options.mainThread,
      reuseBuffers: options.reuseBuffers,
    });
    // One more than the jobs out at once, and two for this thread if it joins in later.
    const inputs = new BufferPool(MAX_EXTENT_SIZE, { maxFree: encoder.maxInFlight + 3 });
    const table = new SeekTableWriter();
    const framesHash = createHash("sha256");
    const jobs: JobEntry[] = [];
    let builder: IndexBuilder | undefined;
    let batch: { bytes: Uint8Array<ArrayBuffer>; fill: number; extents: VmaExtentPiece[] } | null =
      null;
    let cancelled: { reason: unknown } | undefined;
    const done: { index?: VmaIndex } = {};

    const submit = async (
      input: Uint8Array<ArrayBuffer>,
      ranges: [number, number][],
      entry: JobEntry,
      digest: number[],
      giveBack: (bytes: Uint8Array<ArrayBuffer>) => void,
      controller: Output,
    ) => {
      await encoder.submit(input, ranges, digest, giveBack);
      jobs.push(entry);
      while (encoder.inFlight >= encoder.maxInFlight) await emitOldest(controller);
    };
    const emitOldest = async (controller: Output) => {
      const { chunk, lengths, checksums, digests } = await encoder.shift();
      const { extents, sizes } = jobs.shift()!;
      if (cancelled !== undefined) throw cancelled.reason;
      // Every frame but a data frame goes into one digest, so each byte has one.
      const dataFrame = extents.length === 1 && extents[0]!.blockCount > 0;
      framesHash.update(chunk.subarray(0, dataFrame ? lengths[0] : chunk.byteLength));
      lengths.forEach((length, i) => table.add(length, sizes[i]!, checksums[i]!));
      for (const extent of extents) {
        builder!.addExtent(extent, extent.blockCount === 0 ? null : digests.shift()!);
      }
      return deliver(controller, chunk);
    };
    /**
     * A stored extent goes out at once, ahead of the extents still being compressed (the
     * order of extents is free): only its 512-byte header is compressed, here.
     */
    const emitStored = async (stored: StoredExtentPiece, controller: Output) => {
      while (jobs[0]?.header) await emitOldest(controller); // the archive header first
      const { frame, checksum } = encoder.compressNow(stored.header);
      framesHash.update(frame);
      table.add(frame.byteLength, EXTENT_HEADER_SIZE, checksum);
      table.add(stored.frame.byteLength, stored.blockCount * BLOCK_SIZE, stored.checksum);
      const { blockCount, slots } = stored;
      builder!.addExtent(
        { blockCount, slotCount: slots.length, runs: slotRuns(slots) },
        stored.digest,
      );
      if (!deliver(controller, frame) || !deliver(controller, stored.frame)) return;
      // Extents compressed meanwhile go out too, so their buffers come back.
      while (encoder.oldestDone && !jobs[0]?.header) {
        if (!await emitOldest(controller)) return;
      }
    };
    const flushBatch = async (controller: Output) => {
      if (batch === null) return;
      const { bytes, fill, extents } = batch;
      batch = null;
      await submit(bytes, [[0, fill]], { extents, sizes: [fill] }, [], () => {}, controller);
    };

    super({
      async transform(piece, controller) {
        try {
          if (piece.type === "header") {
            builder = new IndexBuilder(piece);
            const bytes = piece.bytes.slice(); // small; the builder keeps the original
            const entry = { extents: [], sizes: [bytes.byteLength], header: true as const };
            await submit(bytes, [[0, bytes.byteLength]], entry, [], () => {}, controller);
            return;
          }
          if (builder === undefined) {
            throw new TypeError("Cannot compress the archive: An extent came before the header");
          }
          if (piece.type === "stored-extent") {
            await emitStored(piece, controller);
            return;
          }
          if (piece.blockCount === 0) {
            if (batch !== null && batch.fill + piece.bytes.byteLength > ZERO_BATCH) {
              await flushBatch(controller);
            }
            batch ??= { bytes: new Uint8Array(ZERO_BATCH), fill: 0, extents: [] };
            batch.bytes.set(piece.bytes, batch.fill);
            batch.fill += piece.bytes.byteLength;
            batch.extents.push(piece);
            return;
          }
          await flushBatch(controller);
          const length = piece.bytes.byteLength;
          const owned = exclusiveChunk(piece.bytes);
          let input: Uint8Array<ArrayBuffer>;
          let giveBack: (bytes: Uint8Array<ArrayBuffer>) => void;
          if (owned !== undefined) {
            input = piece.bytes as Uint8Array<ArrayBuffer>; // travels to a worker uncopied
            giveBack = (bytes) => owned.giveBack(bytes);
          } else {
            const buffer = inputs.acquire();
            buffer.bytes.set(piece.bytes);
            input = buffer.bytes;
            giveBack = (bytes) => inputs.adopt(bytes);
          }
          const extent = { ...piece, bytes: new Uint8Array(0) }; // the index needs no bytes
          const ranges: [number, number][] = [[0, EXTENT_HEADER_SIZE], [
            EXTENT_HEADER_SIZE,
            length,
          ]];
          const sizes = [EXTENT_HEADER_SIZE, length - EXTENT_HEADER_SIZE];
          await submit(input, ranges, { extents: [extent], sizes }, [1], giveBack, controller);
        } catch (error) {
          encoder.stop(); // a failed stream gets neither flush nor cancel: stop them here
          throw error;
        }
      },
      async flush(controller) {
        try {
          if (builder === undefined) {
            throw new TypeError("Cannot compress the archive: It has no header");
          }
          await flushBatch(controller);
          while (encoder.inFlight > 0) {
            if (!await emitOldest(controller)) return; // the consumer failed; its error counts
          }
          const index = builder.finish({
            digestScope: "zstd-frame",
            framesDigest: framesHash.digest("hex"),
            ...(options.base && { base: options.base }),
          });
          const payload = encodeIndex(index);
          const frame = new Uint8Array(8 + payload.byteLength);
          const view = new DataView(frame.buffer);
          view.setUint32(0, INDEX_FRAME_MAGIC, true);
          view.setUint32(4, payload.byteLength, true);
          frame.set(payload, 8);
          table.add(frame.byteLength, 0, EMPTY_CHECKSUM);
          if (deliver(controller, frame) && deliver(controller, table.encode())) done.index = index;
        } finally {
          encoder.stop();
        }
      },
      cancel(reason) {
        cancelled = { reason };
        encoder.stop();
      },
    });
    this.#done = done;
    this.#table = table;
    this.#encoder = encoder;
  }

  /**
   * Lets this thread compress too from now on (a stream made with `mainThread: false` while
   * this thread served QEMU, once it no longer does).
   */
  allowMainThread(): void {
    this.#encoder.allowMainThread();
  }

  /** The archive index, once the stream has flushed. */
  get index(): VmaIndex | undefined {
    return this.#done.index;
  }

  /** Frames written so far (the seek table's entries). */
  get frames(): number {
    return this.#table.frames;
  }
}
