// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Decoding a seekable `.vma.zst` on every core: its seek table says where each frame is,
 * so independent frames decode side by side and come out in order.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { BufferPool, releaseChunk } from "../_pool.ts";
import type { SeekTable } from "../index/seek_table.ts";
import { VmaFormatError } from "../vma/errors.ts";
import { FrameDecoderPool } from "./_frame_decoder.ts";
import { deliver } from "./_deliver.ts";

/** Options of {@linkcode SeekableZstdDecompressStream}. */
export interface SeekableDecodeOptions {
  /** The file's seek table (see `readEmbeddedIndex`). */
  seekTable: SeekTable;
  /**
   * The SHA-256 the compressed frame `frame` must have (the index's digests of data frames),
   * or `undefined` for a frame without one; `decodedOffset` is where its content starts in
   * the archive.
   */
  expectedDigest?: (frame: number, decodedOffset: number) => Uint8Array | undefined;
  /** Words that say what a frame holds, for error messages: `" (drive-scsi0 clusters 0-57)"`. */
  describe?: (frame: number, decodedOffset: number) => string;
  /** Decoding workers (default one per core). */
  workers?: number;
  /**
   * Whether this thread decodes frames too when the workers are busy (default true): right
   * when it has little else to do (verify); a restore, whose thread copies and writes every
   * byte, is faster with a Worker per core.
   */
  mainThread?: boolean;
  /** SHA-256 (hex) of every frame without an expected digest, in order (the index's). */
  framesDigest?: string | undefined;
  /**
   * Decode the extents' data frames (those with an expected digest) only to check them, and
   * emit each as a view of one shared buffer of zeros (default `false`): for a reader that
   * skips the data (`VmaReaderStream({ skipData: true })`, as verify does). Only compressed
   * frames are then in flight, so more of them are, in less memory.
   */
  discardData?: boolean | undefined;
  /**
   * Recycle the decoded chunks (default `false`); only for a pipeline in which every chunk
   * reaches exactly one final consumer that calls `releaseChunk` on it (no `tee()`).
   */
  reuseBuffers?: boolean | undefined;
}

/** Counters of a decode. */
export interface SeekableDecodeStats {
  /** Frames decoded (each with its XXH64 checked when it carries one). */
  frames: number;
  /** Of those, the frames that carry a content checksum. */
  checksummedFrames: number;
  /** Frames whose compressed bytes matched their SHA-256 in the index. */
  digestsChecked: number;
}

type Output = TransformStreamDefaultController<Uint8Array>;

/**
 * Decodes a seekable `.vma.zst`, read from its first byte, into its VMA bytes: frames are
 * cut by the seek table's sizes and decoded by a pool of Workers, several at once, and
 * emitted in order. Each frame's checksum trailer must be the one the table lists, zstd
 * checks each frame's XXH64 as it decodes, and a frame with an expected digest must have
 * it. The index frame and the table at the end are skipped. A failure is a
 * `VmaFormatError` (`bad-frame-checksum`) naming the frame, its byte offset in the file and,
 * with `describe`, what it holds. Memory: a few frames in flight per worker; with
 * `reuseBuffers`, decoded frames come from a pool, and a final consumer gives them back with
 * `releaseChunk`.
 *
 * @example Decode a seekable archive in parallel
 * ```ts
 * import assert from "node:assert/strict";
 * import {
 *   decodeSeekTable, SeekableZstdDecompressStream, SeekableZstdStream, seekTableSize, VmaExtentStream,
 *   VmaWriterStream,
 * } from "../../mod.ts";
 *
 * const records = () => ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 2 * 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0xffff, data: new Uint8Array(65536).fill(8) },
 *   { type: "zeros" as const, devId: 1, cluster: 1, count: 1 },
 * ]).pipeThrough(new VmaWriterStream({ uuid: "2f1e6b0c-1c0a-4f9e-9d6e-3b1d5c7a9e10", ctime: 0 }));
 * const plain = await new Response(records()).bytes();
 * const file = await new Response(
 *   records().pipeThrough(new VmaExtentStream()).pipeThrough(new SeekableZstdStream()),
 * ).bytes();
 * const seekTable = decodeSeekTable(file.subarray(-seekTableSize(file.subarray(-9))!), file.byteLength);
 * const decoded = await new Response(
 *   ReadableStream.from([file]).pipeThrough(new SeekableZstdDecompressStream({ seekTable })),
 * ).bytes();
 * assert.deepEqual(decoded, plain);
 * ```
 */
export class SeekableZstdDecompressStream extends TransformStream<Uint8Array, Uint8Array> {
  /** Counters so far; final once the stream has flushed. */
  readonly stats: SeekableDecodeStats;

  /** A decoder for one file with this seek table. */
  constructor(options: SeekableDecodeOptions) {
    const stats: SeekableDecodeStats = { frames: 0, checksummedFrames: 0, digestsChecked: 0 };
    const table = options.seekTable;
    const frames = table.compressedSizes.length;
    // Workers for the cores but one, and this thread decodes when they are all busy: each
    // frame in flight holds its input and output (about 5 MB for a full extent), and each
    // Worker about 15 MiB.
    const mainThread = options.mainThread ?? true;
    const decoders = new FrameDecoderPool(options.workers, undefined, { mainThread });
    // A data frame for each worker and one for this thread; twice that many entries, since
    // every data frame comes after its small header frame (decoded at once). Frames that
    // are only checked hold no output: three times as many keep every thread busy.
    const discardData = options.discardData ?? false;
    const maxInFlight = 2 * (decoders.size + 1) * (discardData ? 3 : 1);
    // Buffers of the sizes this file needs: its largest frame, compressed and decoded.
    let largest = 0;
    let largestDecoded = 0;
    for (let f = 0; f < frames; f++) {
      if (table.decompressedSizes[f] === 0) continue;
      largest = Math.max(largest, table.compressedSizes[f]!);
      largestDecoded = Math.max(largestDecoded, table.decompressedSizes[f]!);
    }
    const inputs = new BufferPool(largest, { maxFree: maxInFlight });
    /** What checked-only data frames come out as (never written: its pages stay unmapped). */
    let zeros: Uint8Array | undefined;
    const outputs = new BufferPool(largestDecoded, {
      maxFree: maxInFlight + 2, // and the chunks the reader holds
      trackChunks: true,
      recycle: options.reuseBuffers ?? false,
    });
    /** The frame being assembled, and where the next ones start. */
    let frame = 0;
    let offset = 0; // file offset of `frame`
    let decodedAt = 0; // archive offset of its content
    let input: Uint8Array<ArrayBuffer> | undefined;
    let fill = 0;
    let cancelled: { reason: unknown } | undefined;
    const inflight: Promise<Uint8Array>[] = [];
    const framesHash = options.framesDigest === undefined ? undefined : createHash("sha256");

    /** Skips skippable frames (the index) and stops at the table. */
    const skipEmpty = () => {
      while (frame < frames && table.decompressedSizes[frame] === 0 && fill === 0) {
        offset += table.compressedSizes[frame++]!;
      }
    };
    const fail = (f: number, at: number, decoded: number, detail: string): never => {
      throw new VmaFormatError(
        "bad-frame-checksum",
        at,
        `zstd frame ${f}: ${detail}${options.describe?.(f, decoded) ?? ""}`,
      );
    };
    const submit = (f: number, at: number, bytes: Uint8Array<ArrayBuffer>) => {
      const size = table.decompressedSizes[f]!;
      const decodedOffset = decodedAt;
      decodedAt += size;
      stats.frames++;
      const checksums = table.checksums;
      const checksummed = bytes.byteLength >= 9 && (bytes[4]! & 0x04) !== 0;
      if (checksummed) stats.checksummedFrames++;
      if (checksums !== null && checksummed) {
        const trailer = new DataView(bytes.buffer, bytes.byteLength - 4, 4).getUint32(0, true);
        if (trailer !== checksums[f]) {
          fail(f, at, decodedOffset, "its checksum is not the seek table's (corrupt frame)");
        }
      }
      const expected = options.expectedDigest?.(f, decodedOffset);
      if (expected === undefined) framesHash?.update(bytes);
      const checkDigest = (digest: Uint8Array) => {
        if (digest.length !== expected!.length || digest.some((byte, i) => byte !== expected![i])) {
          fail(f, at, decodedOffset, "its data does not match the SHA-256 in the index");
        }
        stats.digestsChecked++;
      };
      // A thread that does not decode hashes the frames itself, so that the decoding
      // Workers (the slower side of a restore) only decode.
      const hashHere = !mainThread && expected !== undefined;
      if (hashHere) checkDigest(createHash("sha256").update(bytes).digest());
      const discard = discardData && expected !== undefined;
      const job = {
        input: bytes,
        size,
        digest: expected !== undefined && !hashHere,
        ...(discard ? { discard } : { output: outputs.acquire().bytes }),
      };
      const result = decoders.decode(job).then(({ input: back, output: decoded, digest }) => {
        inputs.adopt(back);
        if (expected !== undefined && !hashHere) checkDigest(digest!);
        if (discard) return (zeros ??= new Uint8Array(largestDecoded)).subarray(0, size);
        outputs.wrap(decoded).hold(1); // the final consumer's releaseChunk() gives it back
        return decoded.subarray(0, size);
      }, (error) => fail(f, at, decodedOffset, (error as Error).message));
      result.catch(() => {}); // awaited in order; a later one may fail while an earlier waits
      inflight.push(result);
    };
    const emitOldest = async (controller: Output) => {
      const decoded = await inflight.shift()!;
      if (cancelled !== undefined) throw cancelled.reason;
      return deliver(controller, decoded);
    };

    super({
      async transform(chunk, controller) {
        try {
          for (let at = 0; at < chunk.byteLength;) {
            skipEmpty();
            if (frame >= frames) break; // the index frame and the table: not VMA bytes
            const size = table.compressedSizes[frame]!;
            input ??= inputs.acquire().bytes;
            const take = Math.min(size - fill, chunk.byteLength - at);
            input.set(chunk.subarray(at, at + take), fill);
            fill += take;
            at += take;
            if (fill < size) break;
            submit(frame, offset, input.subarray(0, size) as Uint8Array<ArrayBuffer>);
            input = undefined;
            offset += size;
            frame++;
            fill = 0;
            while (inflight.length >= maxInFlight) await emitOldest(controller);
          }
          releaseChunk(chunk);
        } catch (error) {
          decoders.stop();
          throw error;
        }
      },
      async flush(controller) {
        try {
          skipEmpty();
          if (frame < frames && table.decompressedSizes.subarray(frame).some((size) => size > 0)) {
            fail(frame, offset, decodedAt, "the file ends inside it (truncated)");
          }
          while (inflight.length > 0) {
            if (!await emitOldest(controller)) return; // the consumer failed; its error counts
          }
          if (framesHash !== undefined && framesHash.digest("hex") !== options.framesDigest) {
            throw new VmaFormatError(
              "bad-frame-checksum",
              0,
              "the frames of the archive's headers do not match their SHA-256 in the index",
            );
          }
        } finally {
          decoders.stop();
        }
      },
      cancel(reason) {
        cancelled = { reason };
        decoders.stop();
      },
    });
    this.stats = stats;
  }
}
