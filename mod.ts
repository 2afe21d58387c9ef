// Copyright 2026 the vmabackup authors. MIT license.
/**
 * vmabackup: efficient, consistent VM disk backups in the Proxmox VMA format, built from
 * composable Web Streams.
 *
 * A backup is a chain of stages that pass typed {@linkcode VmaRecord}s:
 * source ({@linkcode rawDiskSource}, {@linkcode imageDiskSource}, {@linkcode nbdDiskSource},
 * or a running VM with {@linkcode startPushBackup} / {@linkcode startPullBackup}) →
 * sparse filter ({@linkcode ZeroFilterStream}) → {@linkcode VmaWriterStream} → compressor
 * ({@linkcode ZstdCompressStream}) → any WritableStream. A restore goes back:
 * decompressor ({@linkcode decompressInput}) → {@linkcode VmaReaderStream} →
 * {@linkcode RestoreSink}, {@linkcode ImageRestoreSink} or {@linkcode DeviceBytesStream}.
 *
 * @example Back up a raw image and restore it
 * ```ts
 * import assert from "node:assert/strict";
 * import {
 *   combineRecordStreams, rawDiskSource, RestoreSink, VmaReaderStream, VmaWriterStream,
 *   ZeroFilterStream,
 * } from "./mod.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = new Uint8Array(300_000);
 * disk.fill(42, 70_000, 80_000);
 * await Deno.writeFile(`${dir}/disk.raw`, disk);
 *
 * const archive = await new Response(
 *   combineRecordStreams([rawDiskSource(`${dir}/disk.raw`, { name: "drive-scsi0" })])
 *     .pipeThrough(new ZeroFilterStream())
 *     .pipeThrough(new VmaWriterStream()),
 * ).bytes();
 *
 * await ReadableStream.from([archive])
 *   .pipeThrough(new VmaReaderStream())
 *   .pipeTo(new RestoreSink({ target: (device) => `${dir}/${device.name}.raw` }));
 * assert.deepEqual(await Deno.readFile(`${dir}/drive-scsi0.raw`), disk);
 * await Deno.remove(dir, { recursive: true });
 * ```
 *
 * @module
 */

export * from "./lib/vma/format.ts";
export type {
  Lease,
  VmaClusterRecord,
  VmaConfigRecord,
  VmaDeviceRecord,
  VmaHeaderRecord,
  VmaRecord,
  VmaZerosRecord,
} from "./lib/vma/records.ts";
export { VmaFormatError, type VmaFormatReason } from "./lib/vma/errors.ts";
export {
  type DecodedVmaHeader,
  decodeHeader,
  encodeHeader,
  type VmaHeader,
} from "./lib/vma/header.ts";
export {
  type VmaWriterOptions,
  type VmaWriterStats,
  VmaWriterStream,
} from "./lib/vma/writer_stream.ts";
export {
  type VmaReaderDeviceStats,
  type VmaReaderOptions,
  type VmaReaderStats,
  VmaReaderStream,
} from "./lib/vma/reader_stream.ts";
export { rawDiskSource, type RawDiskSourceOptions } from "./lib/sources/raw_disk.ts";
export { type CombineOptions, combineRecordStreams } from "./lib/sources/combine.ts";
export { ZeroFilterStream } from "./lib/transforms/zero_filter.ts";
export {
  type RestoredDevice,
  RestoreSink,
  type RestoreSinkOptions,
} from "./lib/sinks/restore_files.ts";
export { type DeviceBytesOptions, DeviceBytesStream } from "./lib/sinks/device_stream.ts";
export {
  type ByteReader,
  type ClosableByteReader,
  fileByteSource,
  type FileByteSourceOptions,
} from "./lib/sources/file_bytes.ts";
export { ByteSink, type ByteWriter } from "./lib/sinks/file_sink.ts";
export { BufferReuseError, checkBufferReuse, releaseChunk } from "./lib/_pool.ts";
export {
  type Compression,
  compressionForPath,
  compressor,
  type DecompressedInput,
  decompressInput,
  decompressor,
  detectCompression,
  GzipDecompressStream,
  type WritableCompression,
  type ZstdEngine,
} from "./lib/transforms/compression.ts";
export {
  type ZstdCompressOptions,
  ZstdCompressStream,
  ZstdDecompressStream,
} from "./lib/transforms/zstd.ts";
export {
  detectImageFormat,
  formatFromMagic,
  IMAGE_FORMATS,
  type ImageFormat,
} from "./lib/qemu/image_format.ts";
export { type QemuNbdExport, serveImage, type ServeImageOptions } from "./lib/qemu/qemu_nbd.ts";
export { nbdDiskSource, type NbdDiskSourceOptions } from "./lib/sources/nbd_disk.ts";
export { imageDiskSource, type ImageDiskSourceOptions } from "./lib/sources/image_disk.ts";
export { type ImageRestoreOptions, ImageRestoreSink } from "./lib/sinks/nbd_restore.ts";
export {
  type NbdAddress,
  type NbdBlockStatusOptions,
  NbdClient,
  type NbdConnectOptions,
  NbdError,
  type NbdErrorOptions,
  type NbdErrorReason,
  type NbdExportEntry,
  type NbdExportInfo,
  type NbdExtent,
  type NbdExtentsOptions,
  type NbdOpenOptions,
  type NbdUri,
  type NbdWriteOptions,
  type NbdWriteZeroesOptions,
  parseNbdUri,
} from "./lib/protocols/nbd_client.ts";
export {
  type NbdExportHandler,
  NbdServer,
  type NbdServerOptions,
  type NbdServerStats,
} from "./lib/protocols/nbd_server.ts";
export {
  QmpClient,
  type QmpConnectOptions,
  QmpError,
  type QmpEvent,
} from "./lib/protocols/qmp_client.ts";
export { findDrives, type LiveDrive } from "./lib/live/drives.ts";
export type { LiveBackup, LiveBackupOptions } from "./lib/live/session.ts";
export { type PushBackupOptions, startPushBackup } from "./lib/live/push_backup.ts";
export { type PullBackupOptions, startPullBackup } from "./lib/live/pull_backup.ts";
