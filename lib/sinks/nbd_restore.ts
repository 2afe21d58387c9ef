// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Restore into any image format QEMU writes, through a writable `qemu-nbd` export.
 *
 * @module
 */
import { NbdClient } from "../protocols/nbd_client.ts";
import type { ImageFormat } from "../qemu/image_format.ts";
import { createImage } from "../qemu/qemu_img.ts";
import { type QemuNbdExport, serveImage } from "../qemu/qemu_nbd.ts";
import type { VmaDeviceRecord, VmaRecord } from "../vma/records.ts";
import { WriteCoalescer } from "./_write_runs.ts";
import type { RestoredDevice } from "./restore_files.ts";

/** Options of {@linkcode ImageRestoreSink}. */
export interface ImageRestoreOptions {
  /** Format of the images to write. */
  format: ImageFormat;
  /** Path of a device's image, or `undefined` to skip the device. */
  target(device: VmaDeviceRecord): string | undefined;
}

interface OpenImage {
  served: QemuNbdExport<NbdClient>;
  client: NbdClient;
  info: RestoredDevice;
}

/**
 * Writes each device into a new image of `format` (qcow2, vmdk, vdi, vhdx, vpc, qed):
 * `qemu-img create` makes an empty image of the exact size, a writable `qemu-nbd` serves
 * it on a private socket, and only stored blocks are written over NBD, so zero clusters
 * stay unallocated. No raw copy is staged on disk. Needs `--allow-run=qemu-img,qemu-nbd`
 * and `--allow-net`.
 *
 * @example Restore an archive to qcow2
 * ```ts ignore
 * import { ImageRestoreSink, VmaReaderStream } from "../../mod.ts";
 *
 * await (await Deno.open("vm.vma")).readable.pipeThrough(new VmaReaderStream())
 *   .pipeTo(new ImageRestoreSink({ format: "qcow2", target: (d) => `restored/${d.name}.qcow2` }));
 * ```
 */
export class ImageRestoreSink extends WritableStream<VmaRecord> {
  #restored: RestoredDevice[];

  /** A sink that creates images where `options.target` says; see {@linkcode ImageRestoreOptions}. */
  constructor(options: ImageRestoreOptions) {
    const images = new Map<number, OpenImage | null>();
    const restored: RestoredDevice[] = [];
    const writes = new WriteCoalescer<OpenImage>(async (image, position, bytes) => {
      const step = image.client.maxRequestSize;
      for (let at = 0; at < bytes.byteLength; at += step) {
        await image.client.write(position + at, bytes.subarray(at, at + step));
      }
      image.info.dataBytes += bytes.byteLength;
    });
    const closeAll = async () => {
      for (const image of images.values()) {
        if (image === null) continue;
        await image.client.close().catch(() => {});
        await image.served.stop();
      }
      images.clear();
    };

    const write = async (record: VmaRecord) => {
      if (record.type === "device") {
        const path = options.target(record);
        if (path === undefined) return void images.set(record.devId, null);
        await createImage(path, options.format, record.size);
        const served = await serveImage(
          path,
          { format: options.format, readOnly: false },
          (uri, conn) => NbdClient.connect(uri, { conn }),
        );
        const info = { name: record.name, path, size: record.size, dataBytes: 0 };
        images.set(record.devId, { served, client: served.connection, info });
        restored.push(info);
        return;
      }
      if (record.type !== "cluster") return;
      const image = images.get(record.devId);
      if (image) await writes.add(image, record, image.info.size);
      else record.lease?.release();
    };

    super({
      async write(record) {
        try {
          await write(record);
        } catch (error) {
          // A sink whose write fails gets neither close() nor abort(): clean up here.
          writes.discard();
          await closeAll();
          throw error;
        }
      },
      async close() {
        try {
          await writes.flush();
          for (const image of images.values()) await image?.client.flush();
        } finally {
          await closeAll();
        }
      },
      async abort() {
        writes.discard();
        await closeAll();
      },
    });
    this.#restored = restored;
  }

  /** The images written so far, with the bytes of data written into each. */
  get restored(): RestoredDevice[] {
    return this.#restored.map((device) => ({ ...device }));
  }
}
