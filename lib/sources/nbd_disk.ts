// Copyright 2026 the vmabackup authors. MIT license.
/**
 * An NBD export as a stream of cluster records, reading only what is allocated.
 *
 * @module
 */
import { BufferPool } from "../_pool.ts";
import { NbdClient, type NbdExtent, NbdStateFlag } from "../protocols/nbd_client.ts";
import { CLUSTER_SIZE } from "../vma/format.ts";
import type { VmaRecord } from "../vma/records.ts";
import { bufferClusters, DirtyRanges, zeroRun } from "./_clusters.ts";

/** Options of {@linkcode nbdDiskSource}. */
export interface NbdDiskSourceOptions {
  /** Device name in the archive, such as `drive-scsi0`. */
  name: string;
  /** Device id of the records (default 1); {@linkcode combineRecordStreams} renumbers. */
  devId?: number;
  /** Bytes per read: a multiple of 64 KiB (default 1 MiB, lowered to the server's maximum). */
  readSize?: number;
  /** TRIM every range once it has been read, to free a fleece image (default `false`). */
  trimAfterRead?: boolean;
  /**
   * An incremental: a dirty bitmap's metadata context the server offers
   * (`qemu:dirty-bitmap:NAME`); only the clusters it marks dirty are read and emitted.
   */
  dirtyBitmap?: string | undefined;
  /** Called with the client once connected (for counters such as `bytesReceived`). */
  onConnect?: (client: NbdClient) => void;
  /** Milliseconds any NBD wait may last (default 30 s). */
  timeoutMs?: number;
  /**
   * Recycle the read buffers (default `false`); only for a pipeline in which every record
   * reaches exactly one final consumer that releases its lease (see `rawDiskSource`).
   */
  reuseBuffers?: boolean;
}

const BASE_ALLOCATION = "base:allocation";

/**
 * Connects to an NBD export (`nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`), or
 * takes a connected client (which it closes at the end), and emits a `device` record and then the export's clusters in order. With the server's
 * `base:allocation` block status, ranges that read as zeros become `zeros` records and are
 * never read; the rest is read in large requests (into recycled buffers with
 * `reuseBuffers`). Servers without block status are read in full (zero blocks are still
 * found by the zero filter).
 *
 * @example Back up an export served by qemu-nbd
 * ```ts ignore
 * import { nbdDiskSource, VmaWriterStream, ZeroFilterStream } from "../../mod.ts";
 *
 * const records = nbdDiskSource("nbd+unix:///disk?socket=/tmp/nbd.sock", { name: "drive-scsi0" });
 * await records.pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
 *   .pipeTo((await Deno.open("disk.vma", { write: true, createNew: true })).writable);
 * ```
 */
export function nbdDiskSource(
  target: string | NbdClient,
  options: NbdDiskSourceOptions,
): ReadableStream<VmaRecord> {
  const { name, devId = 1 } = options;
  let client: NbdClient | undefined;
  let pool: BufferPool;
  let size = 0;
  let offset = 0;
  let extents: AsyncGenerator<NbdExtent> | undefined;
  /** The block-status extent that covers `offset` (with zero extents merged), if known. */
  let current: { start: number; end: number; zero: boolean } | undefined;
  let upcoming: NbdExtent | undefined;
  let dirtyExtents: AsyncGenerator<NbdExtent> | undefined;
  /** The dirty range at or after `offset`; `null` once there is none left. */
  let dirtyRanges: DirtyRanges | undefined;

  const close = async () => {
    const open = client;
    client = undefined;
    await extents?.return(undefined).catch(() => {});
    await dirtyExtents?.return(undefined).catch(() => {});
    await open?.close();
  };

  /** The extent at `offset`, zero ranges merged, from the block-status walk. */
  const extentAt = async (position: number) => {
    while (current === undefined || current.end <= position) {
      const next = upcoming ?? (await extents!.next()).value as NbdExtent | undefined;
      upcoming = undefined;
      if (next === undefined) return { start: position, end: size, zero: false };
      current = {
        start: next.offset,
        end: next.offset + next.length,
        zero: (next.flags & NbdStateFlag.ZERO) !== 0,
      };
      // Merge neighbouring extents of the same kind (hole-and-zero next to plain zero).
      for (;;) {
        const after = await extents!.next();
        if (after.done) break;
        const zero = (after.value.flags & NbdStateFlag.ZERO) !== 0;
        if (zero !== current.zero) {
          upcoming = after.value;
          break;
        }
        current.end = after.value.offset + after.value.length;
      }
    }
    return current;
  };

  return new ReadableStream<VmaRecord>({
    async start(controller) {
      const connect = (uri: string, metaContexts: string[]) =>
        NbdClient.connect(uri, {
          metaContexts,
          ...(options.timeoutMs !== undefined && { timeoutMs: options.timeoutMs }),
        });
      if (typeof target !== "string") {
        client = target; // connected already; block status if it was negotiated
        const negotiated = [...client.metaContexts.values()].includes(BASE_ALLOCATION);
        if (negotiated) extents = client.extents(BASE_ALLOCATION);
      } else {
        try {
          const dirty = options.dirtyBitmap === undefined ? [] : [options.dirtyBitmap];
          client = await connect(target, [BASE_ALLOCATION, ...dirty]);
          extents = client.extents(BASE_ALLOCATION);
        } catch (error) {
          if ((error as { reason?: string }).reason !== "unsupported") throw error;
          client = await connect(target, []); // no block status: read everything
        }
      }
      if (options.dirtyBitmap !== undefined) {
        if (![...client.metaContexts.values()].includes(options.dirtyBitmap)) {
          await close();
          throw new Deno.errors.InvalidData(
            `Cannot read the dirty clusters of ${name}: the server does not offer ${options.dirtyBitmap}`,
          );
        }
        dirtyExtents = client.extents(options.dirtyBitmap);
        dirtyRanges = new DirtyRanges(dirtyExtents);
      }
      options.onConnect?.(client);
      size = client.info.size;
      const readSize = Math.max(
        CLUSTER_SIZE,
        Math.floor(Math.min(options.readSize ?? 1 << 20, client.maxRequestSize) / CLUSTER_SIZE) *
          CLUSTER_SIZE,
      );
      pool = new BufferPool(readSize, { recycle: options.reuseBuffers ?? false });
      controller.enqueue({ type: "device", devId, name, size });
    },
    async pull(controller) {
      try {
        if (offset >= size) {
          await close();
          controller.close();
          return;
        }
        let limit = size;
        if (dirtyExtents !== undefined) {
          const range = await dirtyRanges!.at(offset);
          if (range === null) {
            offset = size;
            await close();
            controller.close();
            return;
          }
          offset = Math.max(offset, range.start); // dirty ranges are whole clusters
          limit = Math.min(size, range.end);
        }
        let length = Math.min(pool.size, limit - offset);
        if (extents !== undefined) {
          const extent = await extentAt(offset);
          if (extent.zero) {
            const zeroEnd = Math.min(extent.end, limit);
            const zeros = zeroRun({ devId, deviceSize: size, offset, zeroEnd });
            if (zeros !== undefined) {
              controller.enqueue(zeros);
              offset = Math.min(size, offset + zeros.count * CLUSTER_SIZE);
              return;
            }
            // A zero range shorter than this cluster: read the cluster.
            length = Math.min(length, CLUSTER_SIZE);
          } else {
            // Read up to the cluster where this data extent ends.
            const end = Math.ceil(extent.end / CLUSTER_SIZE) * CLUSTER_SIZE;
            length = Math.min(length, end - offset);
          }
        }
        const buffer = pool.acquire();
        const bytes = buffer.bytes;
        await client!.read(offset, bytes.subarray(0, length));
        if (options.trimAfterRead) await client!.trim(offset, length);
        const where = { devId, deviceSize: size, offset, length };
        for (const record of bufferClusters(buffer, where)) controller.enqueue(record);
        offset += length;
      } catch (error) {
        await close();
        throw error;
      }
    },
    cancel: close,
  }, { highWaterMark: 0 });
}
