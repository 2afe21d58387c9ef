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
 * Archives in S3 object storage take the place of files: {@linkcode s3Sink} uploads a stream,
 * {@linkcode s3Source} reads one back, {@linkcode s3RangeReader} reads ranges.
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
  VmaExtentWriterStream,
  type VmaWriterOptions,
  type VmaWriterStats,
  VmaWriterStream,
} from "./lib/vma/writer_stream.ts";
export {
  type VmaExtentInfo,
  type VmaReaderDeviceStats,
  type VmaReaderOptions,
  type VmaReaderStats,
  VmaReaderStream,
} from "./lib/vma/reader_stream.ts";
export {
  type VmaExtentPiece,
  type VmaExtentSlot,
  VmaExtentStream,
  type VmaExtentStreamOptions,
  type VmaHeaderPiece,
} from "./lib/vma/extent_stream.ts";
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
export { FLUSH_INTERVAL, FlushBehind } from "./lib/sinks/flush_behind.ts";
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
  type SeekableZstdOptions,
  SeekableZstdStream,
  type StoredExtentPiece,
} from "./lib/transforms/seekable_zstd.ts";
export {
  checkLevel,
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
export {
  addImageBitmap,
  type ImageBitmap,
  type ImageInfo,
  imageInfo,
  removeImageBitmap,
} from "./lib/qemu/image_bitmaps.ts";
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
  type NbdBlockDescriptor,
  type NbdBlockSizes,
  type NbdBlockStatusContext,
  NbdCmdFlag,
  NbdErrno,
  type NbdExportHandler,
  type NbdExports,
  type NbdListenAddress,
  type NbdReadChunk,
  type NbdReadResult,
  type NbdRequest,
  type NbdRequestContext,
  NbdServer,
  type NbdServerOptions,
  type NbdServerStats,
  NbdStateFlag,
  type NbdTraceEvent,
} from "./lib/protocols/nbd_server.ts";
export { NbdMemoryExport, type NbdMemoryExportOptions } from "./lib/protocols/nbd_memory_export.ts";
export {
  QmpClient,
  type QmpConnectOptions,
  QmpError,
  type QmpEvent,
} from "./lib/protocols/qmp_client.ts";
export { findDrives, type LiveDrive } from "./lib/live/drives.ts";
export type { LiveBackup, LiveBackupOptions } from "./lib/live/session.ts";
export {
  CHECKPOINT_GRANULARITY,
  CHECKPOINT_PREFIX,
  checkpointName,
  type CheckpointNode,
  checkpointNodes,
  type CheckpointPlan,
  checkpointProblem,
  deviceSetProblem,
  type DirtyBitmapInfo,
  NewCheckpoint,
  planCheckpoints,
} from "./lib/live/checkpoints.ts";
export { type PushBackupOptions, startPushBackup } from "./lib/live/push_backup.ts";
export { type PullBackupOptions, startPullBackup } from "./lib/live/pull_backup.ts";
export {
  decodeIndex,
  type DigestScope,
  encodeIndex,
  INDEX_TAG,
  type VmaIndex,
  type VmaIndexBase,
  type VmaIndexDevice,
  type VmaIndexRuns,
} from "./lib/index/index_format.ts";
export { IndexBuilder } from "./lib/index/index_builder.ts";
export { VmaIndexStream } from "./lib/index/vma_index_stream.ts";
export {
  decodeSeekTable,
  type SeekTable,
  seekTableSize,
  SeekTableWriter,
} from "./lib/index/seek_table.ts";
export { fileRangeReader, type RangeReader } from "./lib/storage/range_reader.ts";
export {
  type ArchiveOutput,
  archiveOutput,
  type ArchiveOutputOptions,
  encodeArchive,
  type EncodedArchive,
  type IndexedOutput,
  indexedOutput,
} from "./lib/transforms/archive_output.ts";
export {
  type EmbeddedIndex,
  INDEX_FRAME_MAGIC,
  readEmbeddedIndex,
} from "./lib/index/embedded_index.ts";
export {
  type DecodedExtentHeader,
  decodeExtentHeader,
  encodeExtentHeader,
  type SlotRun,
  slotRuns,
} from "./lib/vma/extent_header.ts";
export { type AllocationExtent, IndexMap } from "./lib/index/index_map.ts";
export {
  type ExtentCluster,
  type ExtentClusters,
  IndexedArchive,
  type IndexedArchiveOptions,
  type IndexedArchiveStats,
  NotSeekableError,
  type StoredExtent,
} from "./lib/access/indexed_archive.ts";
export { scanPlainArchive } from "./lib/access/scan_plain.ts";
export {
  type SeekableDecodeOptions,
  type SeekableDecodeStats,
  SeekableZstdDecompressStream,
} from "./lib/transforms/seekable_zstd_decoder.ts";
export { IndexChecker } from "./lib/index/index_checker.ts";
export { archiveRecords } from "./lib/access/archive_records.ts";
export {
  type EncodedSyntheticFull,
  encodeSyntheticFull,
  type EncodeSyntheticOptions,
  type SyntheticFull,
  syntheticFull,
  type SyntheticFullOptions,
  type SyntheticFullStats,
  type SyntheticPiece,
} from "./lib/access/synthetic_full.ts";
export {
  formatS3Url,
  isS3Url,
  parseS3Url,
  resolveS3Config,
  type S3Config,
  type S3Credentials,
  type S3Location,
  type S3Options,
} from "./lib/storage/s3_config.ts";
export { S3Error, type S3ErrorInit } from "./lib/storage/s3_errors.ts";
export {
  DEFAULT_RETRY,
  type RetryPolicy,
  S3Client,
  type S3ClientOptions,
  type S3Request,
} from "./lib/storage/s3_client.ts";
export {
  DEFAULT_PART_SIZE,
  DEFAULT_QUEUE_SIZE,
  S3Sink,
  s3Sink,
  type S3SinkOptions,
  type S3UploadResult,
} from "./lib/storage/s3_upload.ts";
export {
  S3ByteSource,
  type S3ObjectInfo,
  s3RangeReader,
  type S3RangeReaderOptions,
  type S3ReadOptions,
  s3Source,
} from "./lib/storage/s3_download.ts";
export { archiveExports, type ArchiveExportsOptions } from "./lib/access/archive_exports.ts";
export {
  LiveRestore,
  type LiveRestoreCompleteOptions,
  type LiveRestoreDrive,
  type LiveRestoreDriveOptions,
  LiveRestoreError,
  type LiveRestoreMode,
  type LiveRestoreOptions,
  type LiveRestoreProgress,
  type LiveRestoreResult,
  startLiveRestore,
} from "./lib/live/live_restore.ts";
