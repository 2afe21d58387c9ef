// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Reading an archive for a CLI command: open the file or stdin, detect and undo the
 * compression, count progress, and parse it with the strict reader.
 *
 * @module
 */
import { type Compression, decompressInput, type ZstdEngine } from "../transforms/compression.ts";
import type { VmaRecord } from "../vma/records.ts";
import { type VmaReaderOptions, VmaReaderStream } from "../vma/reader_stream.ts";
import { VmaFormatError } from "../vma/errors.ts";
import { openInput } from "./files.ts";
import { tapStream } from "../transforms/tap.ts";
import type { Progress } from "./progress.ts";

/** An archive being read. */
export interface ArchiveInput {
  records: ReadableStream<VmaRecord>;
  reader: VmaReaderStream;
  compression: Compression;
  /** Path or `stdin`. */
  name: string;
  /** Size of the (compressed) input when it is a regular file. */
  size?: number | undefined;
  /** Bytes of (compressed) input read so far. */
  bytesRead(): number;
}

/**
 * Opens `path` (or `-`) as a record stream; `progress`, when given, counts input bytes. The
 * records' buffers are recycled: each record must reach one final consumer, which releases
 * it (no `tee()`).
 *
 * @example Read a small archive from a file
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../mod.ts";
 * import { openArchive } from "./archive_input.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma" });
 * await Deno.writeFile(path, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0, data: null },
 * ]).pipeThrough(new VmaWriterStream()));
 * const archive = await openArchive(path, {});
 * const types = (await Array.fromAsync(archive.records)).map((record) => record.type);
 * assert.deepEqual([archive.compression, archive.bytesRead()], ["none", archive.size]);
 * assert.deepEqual(types, ["header", "device", "cluster"]);
 * await Deno.remove(path);
 * ```
 */
export async function openArchive(
  path: string,
  options: {
    reader?: VmaReaderOptions;
    progress?: (size: number | undefined) => Progress;
    zstd?: ZstdEngine;
  },
): Promise<ArchiveInput> {
  // The CLI's pipelines give every chunk and record one final consumer: buffers are reused.
  const input = await openInput(path, { reuseBuffers: true });
  let read = 0;
  const progress = options.progress?.(input.size);
  const failure: { error?: unknown } = {};
  const counted = noteFailure(input.readable, failure).pipeThrough(
    tapStream<Uint8Array>((chunk) => {
      read += chunk.byteLength;
      progress?.add(chunk.byteLength);
    }),
  );
  const decompressed = await decompressInput(counted, options.zstd, { reuseBuffers: true });
  const reader = new VmaReaderStream({ ...options.reader, reuseBuffers: true });
  return {
    records: asArchiveErrors(decompressed, () => read, failure).pipeThrough(reader),
    reader,
    compression: decompressed.compression,
    name: input.name,
    size: input.size,
    bytesRead: () => read,
  };
}

/** The same bytes; a read error is also kept in `failure.error`. */
function noteFailure(
  input: ReadableStream<Uint8Array>,
  failure: { error?: unknown },
): ReadableStream<Uint8Array> {
  const reader = input.getReader();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const { value, done } = await reader.read();
        if (done) controller.close();
        else controller.enqueue(value);
      } catch (error) {
        failure.error = error;
        throw error;
      }
    },
    cancel: (reason) => reader.cancel(reason),
  }, { highWaterMark: 0 });
}

/**
 * Decompressed bytes whose decoding errors (a truncated or corrupt zstd, gzip or lzop stream)
 * become {@linkcode VmaFormatError}s: the archive is bad, and the error says how and where.
 */
function asArchiveErrors(
  { readable, compression }: { readable: ReadableStream<Uint8Array>; compression: Compression },
  bytesRead: () => number,
  input: { error?: unknown },
): ReadableStream<Uint8Array> {
  const reader = readable.getReader();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      let next;
      try {
        next = await reader.read();
      } catch (error) {
        // Reading the input failed (EIO, a closed pipe): an I/O error, not a corrupt archive.
        if ("error" in input) throw input.error;
        if (compression === "none" || error instanceof Deno.errors.NotCapable) throw error;
        const detail = (error instanceof Error ? error.message : String(error))
          .replace(/^Cannot decode [^:]*: /, "");
        throw new VmaFormatError("bad-compression", bytesRead(), `${compression} data: ${detail}`);
      }
      if (next.done) controller.close();
      else controller.enqueue(next.value);
    },
    cancel: (reason) => reader.cancel(reason),
  }, { highWaterMark: 0 });
}

/**
 * A sink that drops records, giving their buffers back to the reader.
 *
 * @example Drop records, releasing their buffers
 * ```ts
 * import assert from "node:assert/strict";
 * import { discardRecords } from "./archive_input.ts";
 *
 * let released = 0;
 * const lease = { release: () => void released++ };
 * const data = new Uint8Array(65536);
 * await ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0xffff, data, lease },
 * ]).pipeTo(discardRecords());
 * assert.equal(released, 1);
 * ```
 */
export function discardRecords(): WritableStream<VmaRecord> {
  return new WritableStream({
    write(record) {
      if (record.type === "cluster") record.lease?.release();
    },
  });
}
