// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A disk image of any format QEMU reads, as cluster records, through `qemu-nbd`.
 *
 * @module
 */
import type { VmaRecord } from "../vma/records.ts";
import { detectImageFormat, type ImageFormat } from "../qemu/image_format.ts";
import { nbdDiskSource, type NbdDiskSourceOptions } from "./nbd_disk.ts";
import { rawDiskSource } from "./raw_disk.ts";
import { type QemuNbdExport, serveImage } from "../qemu/qemu_nbd.ts";
import { NbdClient } from "../protocols/nbd_client.ts";

const BASE_ALLOCATION = "base:allocation";

/** Options of {@linkcode imageDiskSource}. */
export interface ImageDiskSourceOptions extends NbdDiskSourceOptions {
  /** The image format; default: recognised from the magic bytes. */
  format?: ImageFormat;
  /**
   * An incremental: read only the clusters that the image's persistent dirty bitmap of this
   * name marks dirty (a qcow2 image; served with `qemu-nbd --bitmap`).
   */
  bitmap?: string | undefined;
}

/**
 * Reads a disk image of any format QEMU knows (raw, qcow2, vmdk, vdi, vhdx, vpc, qed).
 * Raw images are read directly (see {@linkcode rawDiskSource}); the others are served by a
 * read-only `qemu-nbd` on a private unix socket and read with block status, so only
 * allocated data is read. The `qemu-nbd` child is stopped when the stream ends, fails or is
 * cancelled, and when the process exits or dies (see `serveImage`). Needs `--allow-run=qemu-nbd` and `--allow-net`.
 *
 * @example Back up a qcow2 image
 * ```ts ignore
 * import { imageDiskSource, VmaWriterStream, ZeroFilterStream } from "../../mod.ts";
 *
 * await imageDiskSource("vm-100-disk-0.qcow2", { name: "drive-scsi0" })
 *   .pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
 *   .pipeTo((await Deno.open("vm-100.vma", { write: true, createNew: true })).writable);
 * ```
 */
export function imageDiskSource(
  path: string,
  options: ImageDiskSourceOptions,
): ReadableStream<VmaRecord> {
  let served: QemuNbdExport<NbdClient> | undefined;
  let reader: ReadableStreamDefaultReader<VmaRecord> | undefined;
  const stop = async () => {
    const running = served;
    served = undefined;
    await running?.stop();
  };
  return new ReadableStream<VmaRecord>({
    async start() {
      const format = options.format ?? await detectImageFormat(path);
      if (format === "raw" && options.bitmap === undefined) {
        reader = rawDiskSource(path, options).getReader();
        return;
      }
      const dirty = options.bitmap === undefined
        ? undefined
        : `qemu:dirty-bitmap:${options.bitmap}`;
      const metaContexts = dirty === undefined ? [BASE_ALLOCATION] : [BASE_ALLOCATION, dirty];
      const connect = (uri: string, conn: Deno.UnixConn) =>
        NbdClient.connect(uri, { conn, metaContexts });
      served = await serveImage(path, { format, bitmap: options.bitmap }, connect);
      reader = nbdDiskSource(served.connection, { ...options, dirtyBitmap: dirty }).getReader();
    },
    async pull(controller) {
      try {
        const { value, done } = await reader!.read();
        if (done) {
          await stop();
          controller.close();
        } else {
          controller.enqueue(value);
        }
      } catch (error) {
        await stop();
        throw error;
      }
    },
    async cancel(reason) {
      await reader?.cancel(reason);
      await stop();
    },
  }, { highWaterMark: 0 });
}
