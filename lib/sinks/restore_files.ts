// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The restore sink: devices to sparse raw files.
 *
 * @module
 */
import { writeAll } from "../_io.ts";
import type { VmaConfigRecord, VmaDeviceRecord, VmaRecord } from "../vma/records.ts";
import { WriteCoalescer } from "./_write_runs.ts";
import { FlushBehind } from "./flush_behind.ts";

/** Options of {@linkcode RestoreSink}. */
export interface RestoreSinkOptions {
  /** Path for a device's raw image, or `undefined` to skip the device. */
  target(device: VmaDeviceRecord): string | URL | undefined;
  /** Path for a config file, or `undefined` (the default) to skip it. */
  configTarget?(config: VmaConfigRecord): string | URL | undefined;
  /** Replace existing files instead of failing on them (default `false`). */
  overwrite?: boolean;
}

/** What the sink wrote for one device. */
export interface RestoredDevice {
  /** Device name, such as `drive-scsi0`. */
  name: string;
  /** Where the device was written. */
  path: string | URL;
  /** Device size in bytes. */
  size: number;
  /** Bytes of data written; the rest of the file is holes. */
  dataBytes: number;
}

interface OpenDevice {
  file: Deno.FsFile;
  /** Flushes the file to disk while it is written, so the final flush is short. */
  behind: FlushBehind;
  info: RestoredDevice;
}

/**
 * Writes each device of a record stream to a raw file of exactly the device size. The file
 * is created sparse: only stored blocks are written, zero blocks stay holes. Clusters may
 * come in any order; neighbouring clusters of one extent are written with one call. Each
 * file is flushed to disk in the background while it is written (see
 * {@linkcode FlushBehind}), so whoever makes it durable at the end finds little to flush.
 *
 * The sink does not check the archive; put a {@linkcode VmaReaderStream} in front of it.
 *
 * @example Restore a device to a file
 * ```ts
 * import assert from "node:assert/strict";
 * import { RestoreSink, type VmaRecord } from "../../mod.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const data = new Uint8Array(65536).fill(9);
 * await ReadableStream.from<VmaRecord>([
 *   { type: "device", devId: 1, name: "drive-scsi0", size: 70_000 },
 *   { type: "cluster", devId: 1, cluster: 1, mask: 0b11, data },
 *   { type: "cluster", devId: 1, cluster: 0, mask: 0, data: null },
 * ]).pipeTo(new RestoreSink({ target: (device) => `${dir}/${device.name}.raw` }));
 * const restored = await Deno.readFile(`${dir}/drive-scsi0.raw`);
 * assert.equal(restored.byteLength, 70_000);
 * assert.equal(restored[65536], 9);
 * assert.equal(restored[0], 0);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export class RestoreSink extends WritableStream<VmaRecord> {
  #restored: RestoredDevice[];

  /** A sink that writes where `options.target` says; see {@linkcode RestoreSinkOptions}. */
  constructor(options: RestoreSinkOptions) {
    const devices = new Map<number, OpenDevice | null>();
    const restored: RestoredDevice[] = [];
    const openOptions: Deno.OpenOptions = options.overwrite
      ? { write: true, create: true, truncate: true }
      : { write: true, createNew: true };
    const writes = new WriteCoalescer<OpenDevice>(async (device, position, bytes) => {
      await device.file.seek(position, Deno.SeekMode.Start);
      await writeAll(device.file, bytes);
      device.info.dataBytes += bytes.byteLength;
      device.behind.written(bytes.byteLength);
    });
    const closeAll = () => {
      for (const device of devices.values()) {
        device?.file.close();
        device?.behind.close();
      }
      devices.clear();
    };

    const write = async (record: VmaRecord) => {
      switch (record.type) {
        case "config": {
          const path = options.configTarget?.(record);
          if (path !== undefined) {
            await Deno.writeFile(path, record.data, { createNew: !options.overwrite });
          }
          return;
        }
        case "device": {
          const path = options.target(record);
          if (path === undefined) {
            devices.set(record.devId, null);
            return;
          }
          const file = await Deno.open(path, openOptions);
          const behind = await FlushBehind.open(path).catch((error) => {
            file.close();
            throw error;
          });
          const info = { name: record.name, path, size: record.size, dataBytes: 0 };
          devices.set(record.devId, { file, behind, info }); // closed with the others, also on failure
          restored.push(info);
          await file.truncate(record.size); // exact size, all holes for now
          return;
        }
        case "cluster": {
          const device = devices.get(record.devId);
          if (device) await writes.add(device, record, device.info.size);
          else record.lease?.release();
          return;
        }
      }
    };

    super({
      async write(record) {
        try {
          await write(record);
        } catch (error) {
          // A sink whose write fails gets neither close() nor abort(): clean up here.
          writes.discard();
          closeAll();
          throw error;
        }
      },
      async close() {
        try {
          await writes.flush();
          for (const device of devices.values()) await device?.behind.settle();
        } finally {
          closeAll();
        }
      },
      abort() {
        writes.discard();
        closeAll();
      },
      // An extent of records waits while a write is in flight, so decoding goes on (two held
      // about 15 MiB more with the whole frames of a seekable archive).
    }, { highWaterMark: 59 });
    this.#restored = restored;
  }

  /** The devices written so far, with their data byte counts. */
  get restored(): RestoredDevice[] {
    return this.#restored.map((device) => ({ ...device }));
  }
}
