// Copyright 2026 the vmabackup authors. MIT license.
/**
 * An archive's plain VMA bytes for a CLI command that handles extents rather than records
 * (`index`, `convert`): the file or stdin, its compression detected and undone, input bytes
 * counted, and decoding errors reported as a corrupt archive.
 *
 * @module
 */
import { type Compression, decompressInput, type ZstdEngine } from "../transforms/compression.ts";
import { VmaFormatError } from "../vma/errors.ts";
import { openInput } from "./files.ts";
import type { StorageOptions } from "./s3_files.ts";
import type { Progress } from "./progress.ts";

/** An archive being read as plain VMA bytes. */
export interface ArchiveBytes {
  /** The decompressed VMA bytes. */
  readable: ReadableStream<Uint8Array>;
  /** The compression found by the first bytes. */
  compression: Compression;
  /** Path or `stdin`. */
  name: string;
  /** Size of the (compressed) input when it is a regular file. */
  size?: number | undefined;
  /** Bytes of (compressed) input read so far. */
  bytesRead(): number;
}

/**
 * Opens `path` (or `-`, or `s3://BUCKET/KEY`) and undoes its compression. A zstd, gzip or lzop stream that does
 * not decode becomes a `VmaFormatError` (`bad-compression`, at the input byte reached); a
 * failed read of the input itself stays the I/O error it is. Throws a `VmaFormatError` at
 * once for an input that is neither compressed nor a VMA archive; `progress`, when given,
 * counts input bytes.
 *
 * @example The plain bytes of a gzip-compressed archive
 * ```ts
 * import assert from "node:assert/strict";
 * import { gzipSync } from "node:zlib";
 * import { openArchiveBytes } from "./archive_bytes.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma.gz" });
 * await Deno.writeFile(path, gzipSync(new TextEncoder().encode("VMA\0 and more")));
 * const archive = await openArchiveBytes(path, {});
 * assert.equal(archive.compression, "gzip");
 * assert.equal(await new Response(archive.readable).text(), "VMA\0 and more");
 * assert.equal(archive.bytesRead(), archive.size);
 * await Deno.writeFile(path, gzipSync("VMA\0 and more").subarray(0, 12)); // cut short
 * const cut = await openArchiveBytes(path, {});
 * await assert.rejects(new Response(cut.readable).bytes(), /gzip data: .*at byte 12/);
 * await Deno.remove(path);
 * ```
 */
export async function openArchiveBytes(
  path: string,
  options: {
    progress?: (size: number | undefined) => Progress;
    zstd?: ZstdEngine;
    /** How to reach S3 storage, for `s3://` archives. */
    storage?: StorageOptions;
  },
): Promise<ArchiveBytes> {
  const input = await openInput(path, options.storage);
  let read = 0;
  const failed: { error?: unknown } = {};
  const progress = options.progress?.(input.size);
  const source = input.readable.getReader();
  const watched = new ReadableStream<Uint8Array>({
    async pull(controller) {
      let next;
      try {
        next = await source.read();
      } catch (error) {
        failed.error = error; // reading the input failed: not the archive's fault
        throw error;
      }
      if (next.done) return controller.close();
      read += next.value.byteLength;
      progress?.add(next.value.byteLength);
      controller.enqueue(next.value);
    },
    cancel: (reason) => source.cancel(reason),
  }, { highWaterMark: 0 });
  const decompressed = await decompressInput(watched, options.zstd);
  const { compression } = decompressed;
  const plain = decompressed.readable.getReader();
  const readable = new ReadableStream<Uint8Array>({
    async pull(controller) {
      let next;
      try {
        next = await plain.read();
      } catch (error) {
        if ("error" in failed || compression === "none") throw failed.error ?? error;
        if (error instanceof Deno.errors.NotCapable) throw error; // lzop without --allow-run
        const detail = (error instanceof Error ? error.message : String(error))
          .replace(/^Cannot decode [^:]*: /, "");
        throw new VmaFormatError("bad-compression", read, `${compression} data: ${detail}`);
      }
      if (next.done) controller.close();
      else controller.enqueue(next.value);
    },
    cancel: (reason) => plain.cancel(reason),
  }, { highWaterMark: 0 });
  return { readable, compression, name: input.name, size: input.size, bytesRead: () => read };
}
