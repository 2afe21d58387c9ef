// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The disks of an archive as read-only NBD exports: what `serve` and live restores put on
 * the NBD server.
 *
 * @module
 */
import type { NbdExportHandler, NbdReadChunk } from "../protocols/nbd_server.ts";
import type { VmaIndexDevice } from "../index/index_format.ts";
import { SizedBufferPool } from "../_pool.ts";
import type { IndexedArchive } from "./indexed_archive.ts";

/** Options of {@linkcode archiveExports}. */
export interface ArchiveExportsOptions {
  /**
   * The disks to export, by name with or without `drive-` (default: every disk). A name
   * the archive does not have is a `RangeError`.
   */
  disks?: readonly string[] | undefined;
  /** Largest READ a client may send (default 4 MiB; it bounds the memory of a request). */
  maximumRead?: number | undefined;
}

/** `NbdStateFlag.HOLE | NbdStateFlag.ZERO`: what a zero cluster reports. */
const HOLE_AND_ZERO = 3;
/** Block status looks at the index this many bytes at a time, so a reply stays small. */
const STATUS_WINDOW = 1 << 30;

/**
 * One read-only NBD export per disk of `archive`, named after the disk (`drive-scsi0`):
 * reads come from the archive through its index (only the extents that hold the range are
 * read and decoded), zero clusters go out as holes without being read, and
 * `base:allocation` reports them as `HOLE | ZERO`, so `qemu-img convert`, `nbdcopy` and QEMU
 * copy the disk sparse. A read the archive cannot serve (a file cut while serving, data
 * that fails its checksum) is answered `EIO`; the export and the other reads go on.
 *
 * @example Serve an archive's disk and read it back over NBD
 * ```ts
 * import assert from "node:assert/strict";
 * import {
 *   archiveExports, archiveOutput, fileRangeReader, IndexedArchive, NbdClient, NbdServer,
 *   rawDiskSource, VmaWriterStream, ZeroFilterStream,
 * } from "../../mod.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const disk = new Uint8Array(2 << 20);
 * disk.fill(7, 65536, 3 * 65536);
 * await Deno.writeFile(`${dir}/disk.raw`, disk);
 * await Deno.writeFile(`${dir}/vm.vma.zst`, rawDiskSource(`${dir}/disk.raw`, { name: "drive-scsi0" })
 *   .pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
 *   .pipeThrough(archiveOutput({ compression: "zstd" })));
 * const archive = await IndexedArchive.open(await fileRangeReader(`${dir}/vm.vma.zst`));
 * const server = NbdServer.listen({ path: `${dir}/nbd.sock` }, archiveExports(archive));
 * try {
 *   await using client = await NbdClient.connect(server.uri("drive-scsi0"), {
 *     metaContexts: ["base:allocation"],
 *   });
 *   const bytes = new Uint8Array(disk.byteLength);
 *   await client.read(0, bytes);
 *   assert.deepEqual(bytes, disk);
 *   const extents = await Array.fromAsync(client.extents("base:allocation"));
 *   assert.deepEqual(extents.map((e) => [e.offset, e.length, e.flags]), [
 *     [0, 65536, 3], [65536, 131072, 0], [196608, disk.byteLength - 196608, 3],
 *   ]);
 * } finally {
 *   await server.close();
 *   archive.close();
 *   await Deno.remove(dir, { recursive: true });
 * }
 * ```
 */
export function archiveExports(
  archive: IndexedArchive,
  options: ArchiveExportsOptions = {},
): Map<string, NbdExportHandler> {
  const devices = options.disks === undefined || options.disks.length === 0
    ? archive.devices
    : options.disks.map((name) => {
      const device = archive.device(name);
      if (device === undefined) {
        const names = archive.devices.map((d) => d.name).join(", ");
        throw new RangeError(`The archive has no disk named '${name}' (it has ${names})`);
      }
      return device;
    });
  const maximum = options.maximumRead ?? 4 << 20;
  // Replies are built in recycled buffers: fresh multi-MiB ones stay resident.
  const buffers = new SizedBufferPool(64 << 10, maximum, 8);
  const exports = new Map<string, NbdExportHandler>();
  for (const device of devices) {
    exports.set(device.name, diskExport(archive, device, maximum, buffers));
  }
  return exports;
}

function diskExport(
  archive: IndexedArchive,
  device: VmaIndexDevice,
  maximum: number,
  buffers: SizedBufferPool,
): NbdExportHandler {
  const { devId, size } = device;
  return {
    size,
    readOnly: true,
    description: `${device.name} of ${archive.name}`,
    blockSizes: { minimum: 1, preferred: 65536, maximum },
    async read(offset, length, context) {
      const parts = archive.allocation(devId, offset, length);
      if (parts.every((part) => part.zero)) return [{ type: "hole", offset, length }];
      // The reply is built in a recycled buffer, given back once the server wrote it.
      const lease = context.afterReply === undefined ? undefined : buffers.acquire(length);
      let data: Uint8Array;
      try {
        data = await archive.read(devId, offset, length, lease?.bytes);
      } catch (error) {
        lease?.hold(0);
        throw error;
      }
      if (lease !== undefined) {
        lease.hold(1);
        context.afterReply!(() => lease.release());
      }
      return parts.map((part): NbdReadChunk =>
        part.zero ? { type: "hole", offset: part.offset, length: part.length } : {
          type: "data",
          offset: part.offset,
          data: data.subarray(part.offset - offset, part.offset - offset + part.length),
        }
      );
    },
    blockStatus(offset, length, context) {
      const extents: { length: number; flags: number }[] = [];
      const end = offset + length;
      let lastZero: boolean | undefined;
      for (let at = offset; at < end && extents.length <= context.maxExtents;) {
        const window = Math.min(end - at, STATUS_WINDOW);
        for (const part of archive.allocation(devId, at, window)) {
          if (part.zero === lastZero) extents.at(-1)!.length += part.length;
          else extents.push({ length: part.length, flags: part.zero ? HOLE_AND_ZERO : 0 });
          lastZero = part.zero;
        }
        at += window;
      }
      return extents;
    },
  };
}
