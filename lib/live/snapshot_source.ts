// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Reading a pull backup's point-in-time view: QEMU 7.2's `snapshot-access` export, read so
 * that neither of its two faults reaches the archive.
 *
 * @module
 */
import { BufferPool } from "../_pool.ts";
import { NbdClient, type NbdExtent, NbdStateFlag } from "../protocols/nbd_client.ts";
import { bufferClusters, DirtyRanges, zeroRun } from "../sources/_clusters.ts";
import { CLUSTER_SIZE } from "../vma/format.ts";
import type { VmaRecord } from "../vma/records.ts";

/** Options of {@linkcode snapshotSource}. */
export interface SnapshotSourceOptions {
  /** Device name in the archive, such as `drive-scsi0`. */
  name: string;
  /** Device id of the records. */
  devId: number;
  /** The `snapshot-access` export, `nbd+unix:///NAME?socket=PATH`. */
  snapshot: string;
  /** A read-only export of the fleece node (the copy-before-write target) itself. */
  fleece: string;
  /**
   * An incremental: the metadata context of a dirty bitmap the snapshot export carries
   * (`qemu:dirty-bitmap:NAME`); only the clusters it marks dirty are read and emitted.
   */
  dirtyBitmap?: string | undefined;
  /** TRIM every range once it has been read, to free the fleece image (default `false`). */
  trimAfterRead?: boolean;
  /** Connections reading in parallel (default 4). */
  connections?: number;
  /** Milliseconds any NBD wait may last (default 30 s). */
  timeoutMs?: number;
}

/** A read of the snapshot failed at `offset` (where nothing was trimmed yet). */
export class SnapshotReadError extends Error {
  /** Offset of the range whose read or block status failed. */
  readonly offset: number;

  constructor(offset: number, cause: unknown) {
    super(cause instanceof Error ? cause.message : String(cause), { cause });
    this.name = "SnapshotReadError";
    this.offset = offset;
  }
}

const BASE_ALLOCATION = "base:allocation";
/** Clusters read per pull, across the connections: 1 MiB. */
const BATCH_CLUSTERS = 16;

/** A drive's snapshot being read: the records, and the connections to close at the end. */
export interface SnapshotReader {
  /** `device` record, then the clusters in order (`zeros` records for the holes). */
  records: ReadableStream<VmaRecord>;
  /**
   * Closes the NBD connections. Call it only after QEMU dropped them (`block-export-del`
   * with `mode: hard`): QEMU 7.2 aborts (`nbd_blockdev_client_closed: Assertion
   * qemu_in_main_thread()`) when a client leaves an export whose node runs in an iothread,
   * so the records stream never closes them itself.
   */
  close(): Promise<void>;
}

/**
 * The records of one drive as of the snapshot point, from a `copy-before-write` +
 * `snapshot-access` graph on QEMU 7.2, whose copy-before-write filter answers wrongly for a
 * request that starts in a run of clusters already copied to the fleece image and goes past
 * its end: it serves that run from the live drive instead of the fleece image (its
 * `hbitmap_status()` says "not copied" for a copied run that ends inside the request). Reads
 * then return what the guest wrote after the snapshot, and block status shows what the
 * drive holds now, for example a hole where the guest zeroed or discarded data. So:
 *
 * - every read covers exactly one 64 KiB cluster, the copy-before-write granularity, for
 *   which the answer is right; 16 of them run at a time over several connections;
 * - block status is trusted where it says "data" (the cluster is read), but a zero or hole
 *   is taken as zeros only where the fleece image (asked through its own export, after the
 *   snapshot's status was taken) has a hole too. A cluster the guest changed was copied to
 *   the fleece image before the change; if it holds a hole there, the old data was zeros.
 *   A cluster not copied when its status was taken was unchanged then, so its status was
 *   right.
 *
 * Emits a `device` record, then the clusters in order (`zeros` records for the holes); with
 * `dirtyBitmap`, only the dirty clusters, by the same rules. A failed read or status
 * request rejects with a {@linkcode SnapshotReadError}. The connections stay open until
 * {@linkcode SnapshotReader.close}.
 *
 * @example Read a drive's snapshot (set up by startPullBackup)
 * ```ts ignore
 * import { snapshotSource } from "./snapshot_source.ts";
 *
 * const { records, close } = snapshotSource({
 *   name: "drive-scsi0",
 *   devId: 1,
 *   snapshot: "nbd+unix:///vmabackup-0?socket=/tmp/pull.sock",
 *   fleece: "nbd+unix:///vmabackup-0-fleece?socket=/tmp/pull.sock",
 * });
 * ```
 */
export function snapshotSource(options: SnapshotSourceOptions): SnapshotReader {
  const { name, devId } = options;
  const connect = (uri: string, metaContexts: string[]) =>
    NbdClient.connect(uri, {
      metaContexts,
      ...(options.timeoutMs !== undefined && { timeoutMs: options.timeoutMs }),
    });
  const clients: NbdClient[] = [];
  let status: NbdClient;
  let fleece: NbdClient;
  let readers: NbdClient[];
  let extents: AsyncGenerator<NbdExtent>;
  let dirtyExtents: AsyncGenerator<NbdExtent> | undefined;
  /** The dirty range at or after `offset`; `null` once there is none left. */
  let dirtyRanges: DirtyRanges | undefined;
  const pool = new BufferPool(BATCH_CLUSTERS * CLUSTER_SIZE);
  let size = 0;
  let offset = 0;
  /** The status extent that covers `offset`, neighbours of the same kind merged. */
  let current: { end: number; zero: boolean } | undefined;
  let upcoming: NbdExtent | undefined;

  /** Stops reading; the connections stay open for close(). */
  const stop = async () => {
    await extents?.return(undefined).catch(() => {});
    await dirtyExtents?.return(undefined).catch(() => {});
  };
  const close = async () => {
    await stop();
    await Promise.all(clients.splice(0).map((client) => client.close().catch(() => {})));
  };

  const extentAt = async (position: number) => {
    while (current === undefined || current.end <= position) {
      const next = upcoming ?? (await extents.next()).value as NbdExtent | undefined;
      upcoming = undefined;
      if (next === undefined) return { end: size, zero: false };
      current = { end: next.offset + next.length, zero: (next.flags & NbdStateFlag.ZERO) !== 0 };
      for (;;) {
        const after = await extents.next();
        if (after.done) break;
        if (((after.value.flags & NbdStateFlag.ZERO) !== 0) !== current.zero) {
          upcoming = after.value;
          break;
        }
        current.end = after.value.offset + after.value.length;
      }
    }
    return current;
  };

  /** Whether the fleece image has a hole at `position`, and how far that holds. */
  const fleeceHole = async (position: number, end: number) => {
    const length = Math.min(end - position, fleece.maxRequestSize);
    const answer = await fleece.blockStatus(position, length, { reqOne: true });
    const first = answer.get(BASE_ALLOCATION)?.[0];
    if (first === undefined) return { hole: false, end: Math.min(end, position + CLUSTER_SIZE) };
    return {
      hole: (first.flags & NbdStateFlag.ZERO) !== 0,
      end: Math.min(end, first.offset + first.length),
    };
  };

  const records = new ReadableStream<VmaRecord>({
    async start(controller) {
      try {
        status = await connect(options.snapshot, [BASE_ALLOCATION]);
        clients.push(status);
        fleece = await connect(options.fleece, [BASE_ALLOCATION]);
        clients.push(fleece);
        if (options.dirtyBitmap !== undefined) {
          const client = await connect(options.snapshot, [options.dirtyBitmap]);
          clients.push(client);
          dirtyExtents = client.extents(options.dirtyBitmap);
          dirtyRanges = new DirtyRanges(dirtyExtents);
        }
        readers = [];
        for (let i = 0; i < (options.connections ?? 4); i++) {
          readers.push(await connect(options.snapshot, []));
          clients.push(readers.at(-1)!);
        }
      } catch (error) {
        throw new SnapshotReadError(0, error);
      }
      size = status.info.size;
      extents = status.extents(BASE_ALLOCATION);
      controller.enqueue({ type: "device", devId, name, size });
    },
    async pull(controller) {
      try {
        let limit = size;
        if (dirtyExtents !== undefined && offset < size) {
          const range = await dirtyRanges!.at(offset);
          if (range === null) offset = size;
          else {
            offset = Math.max(offset, range.start); // dirty ranges are whole clusters
            limit = Math.min(size, range.end);
          }
        }
        if (offset >= size) {
          await stop();
          controller.close();
          return;
        }
        const extent = await extentAt(offset);
        let dataEnd = Math.min(extent.end, limit);
        if (extent.zero) {
          const checked = await fleeceHole(offset, dataEnd);
          if (checked.hole) {
            const zeros = zeroRun({ devId, deviceSize: size, offset, zeroEnd: checked.end });
            if (zeros !== undefined) {
              controller.enqueue(zeros);
              offset = Math.min(size, offset + zeros.count * CLUSTER_SIZE);
              return;
            }
          }
          // Changed since the snapshot (or zeros shorter than a cluster): read it.
          dataEnd = Math.max(checked.end, offset + 1);
        }
        const end = Math.min(size, Math.ceil(dataEnd / CLUSTER_SIZE) * CLUSTER_SIZE);
        const length = Math.min(pool.size, end - offset);
        const buffer = pool.acquire();
        const clusters = Math.ceil(length / CLUSTER_SIZE);
        await Promise.all(readers.map(async (reader, lane) => {
          for (let i = lane; i < clusters; i += readers.length) {
            const from = i * CLUSTER_SIZE;
            const to = Math.min(length, from + CLUSTER_SIZE);
            await reader.read(offset + from, buffer.bytes.subarray(from, to));
          }
        }));
        if (options.trimAfterRead) await status.trim(offset, length);
        for (const record of bufferClusters(buffer, { devId, deviceSize: size, offset, length })) {
          controller.enqueue(record);
        }
        offset += length;
      } catch (error) {
        await stop();
        throw error instanceof SnapshotReadError ? error : new SnapshotReadError(offset, error);
      }
    },
    cancel: stop,
  }, { highWaterMark: 0 });
  return { records, close };
}
