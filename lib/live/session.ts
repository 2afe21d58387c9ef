// Copyright 2026 the vmabackup authors. MIT license.
/**
 * What a running live backup gives its caller, and the options both modes share.
 *
 * @module
 */
import type { QmpClient } from "../protocols/qmp_client.ts";
import type { VmaRecord } from "../vma/records.ts";
import type { LiveDrive } from "./drives.ts";

/** Options of a live backup, push or pull. */
export interface LiveBackupOptions {
  /** A connected QMP client of the running VM (its own monitor socket). */
  qmp: QmpClient;
  /** Drives to back up (by name, device id or node name); default every writable drive. */
  drives?: string[];
  /** Directory for the private sockets (and fleece images); default a new temporary one. */
  workDir?: string;
  /** Most seconds to wait for QEMU when setting up and tearing down (default 60). */
  timeoutSeconds?: number;
  /**
   * Called with the drives found, before anything in the VM changes: throw to refuse the
   * backup (the CLI checks that the drives and its config files fit into one archive). The
   * archive's own limits on the drives (at most 254) are always checked.
   */
  checkDrives?: (drives: LiveDrive[]) => void | Promise<void>;
}

/** A live backup in progress. */
export interface LiveBackup {
  /** The drives being backed up, with their archive names (devIds 1, 2, ... in this order). */
  readonly drives: LiveDrive[];
  /** `device` records, then every cluster of every drive as of the snapshot point. */
  readonly records: ReadableStream<VmaRecord>;
  /** Resolves once the snapshot point was taken: the instant the archive shows. */
  readonly snapshot: Promise<void>;
  /**
   * Resolves when the backup is over and the VM's block graph is as it was before; rejects
   * with what went wrong (the graph is restored in any case).
   */
  readonly finished: Promise<void>;
  /** Pull mode: the directory of the fleece images. */
  readonly fleeceDir?: string;
  /**
   * Stops the backup: every write QEMU has pending or sends from now on is answered at once
   * (push mode), then QEMU's work is cancelled and the graph restored; resolves when done,
   * also while the record stream is not being read.
   */
  abort(reason?: unknown): Promise<void>;
}

/**
 * A pull backup's snapshot broke: a copy-before-write to the fleece image failed or took too
 * long, so QEMU let the guest's write through and gave up the point-in-time view.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { SnapshotBrokenError } from "./session.ts";
 *
 * const error = new SnapshotBrokenError("The snapshot broke: ...", { fleeceFull: true });
 * assert.equal(error.name, "SnapshotBrokenError");
 * assert.equal(error.fleeceFull, true);
 * ```
 */
export class SnapshotBrokenError extends Error {
  /** Whether the file system of the fleece images had no space left. */
  readonly fleeceFull: boolean;

  constructor(message: string, options: { cause?: unknown; fleeceFull: boolean }) {
    super(message, { cause: options.cause });
    this.name = "SnapshotBrokenError";
    this.fleeceFull = options.fleeceFull;
  }
}

/**
 * The device records that start a live backup's record stream.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { deviceRecords } from "./session.ts";
 *
 * const records = deviceRecords([{ name: "drive-vda", node: "disk0", size: 65536, device: "" }]);
 * assert.deepEqual(records, [{ type: "device", devId: 1, name: "drive-vda", size: 65536 }]);
 * ```
 */
export function deviceRecords(drives: LiveDrive[]): VmaRecord[] {
  return drives.map((drive, index) => ({
    type: "device",
    devId: index + 1,
    name: drive.name,
    size: drive.size,
  }));
}

/**
 * Runs QMP commands of a teardown one by one; failures are collected, never thrown early.
 *
 * @example A failing step does not stop the next one
 * ```ts
 * import assert from "node:assert/strict";
 * import { tearDown } from "./session.ts";
 *
 * const done: string[] = [];
 * const failures = await tearDown([
 *   () => Promise.reject(new Error("Job 'backup' not found")),
 *   () => Promise.resolve(done.push("blockdev-del")),
 * ]);
 * assert.deepEqual(done, ["blockdev-del"]);
 * assert.deepEqual(failures.map((error) => error.message), ["Job 'backup' not found"]);
 * ```
 */
export async function tearDown(steps: (() => Promise<unknown>)[]): Promise<Error[]> {
  const failures: Error[] = [];
  for (const step of steps) {
    try {
      await step();
    } catch (error) {
      failures.push(error instanceof Error ? error : new Error(String(error)));
    }
  }
  return failures;
}
