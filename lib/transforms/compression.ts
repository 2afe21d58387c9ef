// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Compression formats of VMA archives: detection by magic bytes, compressors and
 * decompressors as transform streams.
 *
 * @module
 */
import { constants, createGunzip, createGzip } from "node:zlib";
import { type Compression, detectCompression } from "../_compression_magic.ts";
import { nodeTransformer } from "./node_transform.ts";
import { programTransform } from "./program_transform.ts";
import { VmaFormatError } from "../vma/errors.ts";
import { type ZstdCompressOptions, ZstdCompressStream, ZstdDecompressStream } from "./zstd.ts";
import {
  type SeekableDecodeOptions,
  SeekableZstdDecompressStream,
} from "./seekable_zstd_decoder.ts";

export { type Compression, detectCompression } from "../_compression_magic.ts";

/** Compressions this toolkit can write. */
export type WritableCompression = "none" | "zstd" | "gzip";

/**
 * The compression an output file name implies: `.zst`, `.gz`, or none.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { compressionForPath } from "./compression.ts";
 *
 * assert.equal(compressionForPath("vzdump-qemu-100.vma.zst"), "zstd");
 * assert.equal(compressionForPath("backup.vma.gz"), "gzip");
 * assert.equal(compressionForPath("backup.vma"), "none");
 * assert.equal(compressionForPath("BACKUP.VMA.ZST"), "zstd");
 * ```
 */
export function compressionForPath(path: string): WritableCompression {
  if (/\.(zst|zstd)$/i.test(path)) return "zstd";
  if (/\.(gz|gzip)$/i.test(path)) return "gzip";
  return "none";
}

/**
 * A compressor for `compression`. zstd runs on every core (see `ZstdCompressStream`);
 * gzip uses `CompressionStream` at its default level, or `node:zlib` when a level is given.
 *
 * @example gzip at level 9
 * ```ts
 * import assert from "node:assert/strict";
 * import { compressor, GzipDecompressStream } from "./compression.ts";
 *
 * const packed = ReadableStream.from([new TextEncoder().encode("VMA")])
 *   .pipeThrough(compressor("gzip", 9));
 * const unpacked = packed.pipeThrough(new GzipDecompressStream());
 * assert.equal(await new Response(unpacked).text(), "VMA");
 * assert.throws(() => compressor("gzip", 10), RangeError);
 * ```
 */
export function compressor(
  compression: WritableCompression,
  level?: number,
  engine: ZstdEngine = "builtin",
  zstdOptions: Omit<ZstdCompressOptions, "level"> = {},
): ReadableWritablePair<Uint8Array, Uint8Array> {
  switch (compression) {
    case "zstd":
      if (engine === "program") {
        const strength = (level ?? 3) < 0 ? `--fast=${-level!}` : `-${level ?? 3}`;
        return zstdProgram([strength, "-T0"], "encode zstd", zstdOptions.reuseBuffers);
      }
      return new ZstdCompressStream(level === undefined ? zstdOptions : { ...zstdOptions, level });
    case "gzip":
      if (level === undefined) {
        return new CompressionStream("gzip") as TransformStream<Uint8Array, Uint8Array>;
      }
      if (!Number.isInteger(level) || level < 1 || level > 9) {
        throw new RangeError(`Cannot compress with gzip: level ${level} is not within 1..9`);
      }
      return new TransformStream(nodeTransformer(createGzip({ level })));
    case "none":
      return new TransformStream();
  }
}

/**
 * Decompresses gzip, including files of several gzip members (as `pigz` and concatenation
 * produce them), which `DecompressionStream("gzip")` rejects.
 *
 * @example Two gzip members, one after the other
 * ```ts
 * import assert from "node:assert/strict";
 * import { gzipSync } from "node:zlib";
 * import { GzipDecompressStream } from "./compression.ts";
 *
 * const members = new Uint8Array([...gzipSync("VMA "), ...gzipSync("archive")]);
 * const readable = ReadableStream.from([members]).pipeThrough(new GzipDecompressStream());
 * assert.equal(await new Response(readable).text(), "VMA archive");
 * ```
 */
export class GzipDecompressStream extends TransformStream<Uint8Array, Uint8Array> {
  constructor() {
    super(nodeTransformer(createGunzip({ chunkSize: 256 << 10, flush: constants.Z_SYNC_FLUSH })));
  }
}

/**
 * Decompresses lzop through the `lzop` program (Debian package `lzop`), which needs
 * `--allow-run=lzop`. No TypeScript lzop decoder is known to be reliable.
 *
 * @example Decode what `lzop -c` wrote (needs the lzop program)
 * ```ts
 * import assert from "node:assert/strict";
 * import { lzopDecompress } from "./compression.ts";
 * import { programTransform } from "./program_transform.ts";
 *
 * const options = { purpose: "encode lzop", debianPackage: "lzop" };
 * const lzop = programTransform("lzop", ["-c"], options);
 * const packed = ReadableStream.from([new TextEncoder().encode("VMA")]).pipeThrough(lzop);
 * assert.equal(await new Response(packed.pipeThrough(lzopDecompress())).text(), "VMA");
 * ```
 */
export function lzopDecompress(
  options: { reuseBuffers?: boolean } = {},
): ReadableWritablePair<Uint8Array, Uint8Array> {
  return programTransform("lzop", ["-d", "-c", "-q"], {
    purpose: "decode the lzop-compressed archive",
    debianPackage: "lzop",
    ...options,
  });
}

/**
 * Which zstd implementation to use: `builtin` (`node:zlib` in Workers, no permission
 * needed) or `program` (the system `zstd`, multi-threaded, through pipes; needs
 * `--allow-run=zstd`).
 */
export type ZstdEngine = "builtin" | "program";

function zstdProgram(args: string[], purpose: string, reuseBuffers = false) {
  const options = { purpose, debianPackage: "zstd", reuseBuffers };
  return programTransform("zstd", ["-q", "-c", ...args], options);
}

/**
 * A decompressor for `compression`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { gzipSync } from "node:zlib";
 * import { decompressor } from "./compression.ts";
 *
 * const readable = ReadableStream.from([gzipSync("VMA")]).pipeThrough(decompressor("gzip"));
 * assert.equal(await new Response(readable).text(), "VMA");
 * const plain = ReadableStream.from([gzipSync("VMA")]).pipeThrough(decompressor("none"));
 * assert.equal((await new Response(plain).bytes())[0], 0x1f); // passed through as is
 * ```
 */
export function decompressor(
  compression: Compression,
  engine: ZstdEngine = "builtin",
  options: { reuseBuffers?: boolean } = {},
): ReadableWritablePair<Uint8Array, Uint8Array> {
  switch (compression) {
    case "zstd":
      if (engine === "program") {
        return zstdProgram(["-d", "--long=31"], "decode zstd", options.reuseBuffers);
      }
      return new ZstdDecompressStream(options);
    case "gzip":
      return new GzipDecompressStream();
    case "lzop":
      return lzopDecompress(options);
    case "none":
      return new TransformStream();
  }
}

/** An archive byte stream, decompressed, with the compression that was found. */
export interface DecompressedInput {
  /** The compression found by the first bytes. */
  compression: Compression;
  /** The plain VMA bytes. */
  readable: ReadableStream<Uint8Array>;
  /**
   * For zstd (built in): the frames decoded so far, and how many carry a checksum (which
   * the decoder checked). Final once `readable` has ended.
   */
  frames?: () => { frames: number; checksummedFrames: number };
}

/**
 * Looks at the first bytes of `input` and decompresses it accordingly, so plain, zstd,
 * gzip and lzop archives all come out as plain VMA bytes. A corrupt or truncated compressed
 * stream fails the readable with a `VmaFormatError` (`bad-compression`, at the input offset
 * reached); a failed read of `input` with its own error. With `seekable` (a seekable
 * `.vma.zst`'s table, read first from the file's end), zstd frames decode on every core. Throws a `VmaFormatError`
 * (`bad-magic`, naming the first bytes, or `truncated-header` for an empty input) when the
 * input is none of these.
 *
 * @example Read a gzip-compressed archive
 * ```ts
 * import assert from "node:assert/strict";
 * import { decompressInput } from "./compression.ts";
 *
 * const vma = new TextEncoder().encode("VMA\0 and the rest");
 * const gzipped = ReadableStream.from([vma]).pipeThrough(new CompressionStream("gzip"));
 * const { compression, readable } = await decompressInput(gzipped);
 * assert.equal(compression, "gzip");
 * assert.equal(await new Response(readable).text(), "VMA\0 and the rest");
 * ```
 */
export async function decompressInput(
  input: ReadableStream<Uint8Array>,
  engine: ZstdEngine = "builtin",
  seekable?: SeekableDecodeOptions,
  options: { reuseBuffers?: boolean } = {},
): Promise<DecompressedInput> {
  const reader = input.getReader();
  const head: Uint8Array[] = [];
  let length = 0;
  while (length < 4) {
    const { value, done } = await reader.read();
    if (done) break;
    head.push(value);
    length += value.byteLength;
  }
  const first = new Uint8Array(Math.min(length, 4));
  let at = 0;
  for (const chunk of head) {
    if (at >= first.byteLength) break;
    first.set(chunk.subarray(0, first.byteLength - at), at);
    at += Math.min(chunk.byteLength, first.byteLength - at);
  }
  const compression = detectCompression(first);
  if (compression === undefined) {
    await reader.cancel();
    const shown = [...first].map((byte) => byte.toString(16).padStart(2, "0")).join(" ");
    if (length === 0) throw new VmaFormatError("truncated-header", 0, "the input is empty");
    throw new VmaFormatError(
      "bad-magic",
      0,
      `unknown compression or not a VMA archive (first bytes: ${shown})`,
    );
  }
  // Put the bytes that were looked at back in front of the rest, counting what was read
  // and keeping a read error apart from the decoder's own.
  const read = { bytes: 0, failure: undefined as { error: unknown } | undefined };
  const replayed = new ReadableStream<Uint8Array>({
    pull: async (controller) => {
      let chunk = head.shift();
      if (chunk === undefined) {
        let next;
        try {
          next = await reader.read();
        } catch (error) {
          read.failure = { error };
          throw error;
        }
        if (next.done) return controller.close();
        chunk = next.value;
      }
      read.bytes += chunk.byteLength;
      controller.enqueue(chunk);
    },
    cancel: (reason) => reader.cancel(reason),
  }, { highWaterMark: 0 });
  if (compression === "zstd" && engine === "builtin") {
    const decoder = seekable === undefined
      ? new ZstdDecompressStream(options)
      : new SeekableZstdDecompressStream({ ...seekable, ...options });
    const readable = asFormatErrors(replayed.pipeThrough(decoder), compression, read);
    return { compression, readable, frames: () => decoder.stats };
  }
  const decoded = replayed.pipeThrough(decompressor(compression, engine, options));
  return { compression, readable: asFormatErrors(decoded, compression, read) };
}

/**
 * Decoded bytes whose decoding errors (a truncated or corrupt zstd, gzip or lzop stream)
 * become `VmaFormatError`s (`bad-compression`) at the input offset reached: the archive is
 * bad, and the error says how and where. A failed read of the input stays what it was (an
 * I/O error), and so do permission errors and errors that already are format errors.
 */
function asFormatErrors(
  readable: ReadableStream<Uint8Array>,
  compression: Compression,
  input: { bytes: number; failure: { error: unknown } | undefined },
): ReadableStream<Uint8Array> {
  const reader = readable.getReader();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      let next;
      try {
        next = await reader.read();
      } catch (error) {
        if (input.failure !== undefined) throw input.failure.error;
        if (
          compression === "none" || error instanceof Deno.errors.NotCapable ||
          error instanceof VmaFormatError
        ) throw error;
        const detail = (error instanceof Error ? error.message : String(error))
          .replace(/^Cannot decode [^:]*: /, "");
        throw new VmaFormatError("bad-compression", input.bytes, `${compression} data: ${detail}`);
      }
      if (next.done) controller.close();
      else controller.enqueue(next.value);
    },
    cancel: (reason) => reader.cancel(reason),
  }, { highWaterMark: 0 });
}
