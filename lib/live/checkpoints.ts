// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Checkpoints of live backups: QEMU dirty bitmaps named after an archive's UUID, added at
 * its snapshot point, that record every guest write from then on, so the next backup reads
 * only the clusters that changed.
 *
 * @module
 */
import type { QmpClient } from "../protocols/qmp_client.ts";
import { CLUSTER_SIZE } from "../vma/format.ts";
import type { LiveDrive } from "./drives.ts";

/** Every checkpoint's name starts with this. */
export const CHECKPOINT_PREFIX = "vmabackup-";
/** Granularity of every checkpoint: one VMA cluster. */
export const CHECKPOINT_GRANULARITY: number = CLUSTER_SIZE;

/**
 * The checkpoint of the archive with UUID `uuid`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { checkpointName } from "./checkpoints.ts";
 *
 * assert.equal(checkpointName("0b7c6f4e-28a4-4d9a-9c43-7c1f8c1d2e3f"), "vmabackup-0b7c6f4e-28a4-4d9a-9c43-7c1f8c1d2e3f");
 * ```
 */
export function checkpointName(uuid: string): string {
  return `${CHECKPOINT_PREFIX}${uuid}`;
}

/** A dirty bitmap as `query-named-block-nodes` describes it (anonymous ones have no name). */
export interface DirtyBitmapInfo {
  /** Its name. */
  name?: string;
  /** Whether it records the guest's writes (not disabled). */
  recording: boolean;
  /** Whether a job or an export uses it now. */
  busy: boolean;
  /** Whether QEMU stores it in the image (qcow2). */
  persistent: boolean;
  /** Present (true) only for a persistent bitmap QEMU did not close cleanly. */
  inconsistent?: boolean;
  /** Bytes per bit. */
  granularity: number;
  /** Dirty bytes. */
  count: number;
}

/** Where a drive's checkpoints live. */
export interface CheckpointNode {
  /** The drive. */
  drive: LiveDrive;
  /**
   * The node that holds them: the drive's node, or below its filters (a throttle filter
   * cannot store a bitmap) the format node that does.
   */
  node: string;
  /** The node's block driver. */
  driver: string;
  /** Whether a bitmap there survives QEMU's restart (only qcow2 stores them). */
  persistent: boolean;
  /** The node's dirty bitmaps now. */
  bitmaps: DirtyBitmapInfo[];
}

/** Block drivers that only pass requests on to their `file` child. */
const FILTERS = new Set(["throttle", "copy-on-read", "preallocate", "compress", "blklogwrites"]);

interface NamedNode {
  "node-name": string;
  drv: string;
  "dirty-bitmaps"?: DirtyBitmapInfo[];
}

interface BlockGraph {
  nodes: { id: number; type: string; name: string }[];
  edges: { parent: number; child: number; name: string }[];
}

/**
 * The node of each drive where its checkpoints go, with the bitmaps it has now: the drive's
 * own node, or for a filter on top (Proxmox VE 9 puts a throttle filter there) the first
 * node below it that is not a filter, found through `x-debug-query-block-graph`.
 *
 * @example With canned QMP answers instead of a VM
 * ```ts
 * import assert from "node:assert/strict";
 * import type { QmpClient } from "../protocols/qmp_client.ts";
 * import { checkpointNodes } from "./checkpoints.ts";
 *
 * const answers: Record<string, unknown> = {
 *   "query-named-block-nodes": [
 *     { "node-name": "drive-scsi0", drv: "throttle" },
 *     { "node-name": "#block185", drv: "qcow2", "dirty-bitmaps": [] },
 *     { "node-name": "#block019", drv: "file" },
 *   ],
 *   "x-debug-query-block-graph": {
 *     nodes: [
 *       { id: 6, type: "block-driver", name: "drive-scsi0" },
 *       { id: 10, type: "block-driver", name: "#block185" },
 *       { id: 9, type: "block-driver", name: "#block019" },
 *     ],
 *     edges: [{ parent: 6, child: 10, name: "file" }, { parent: 10, child: 9, name: "file" }],
 *   },
 * };
 * const qmp = { execute: (command: string) => Promise.resolve(answers[command]) } as unknown as QmpClient;
 * const drive = { name: "drive-scsi0", node: "drive-scsi0", size: 65536, device: "" };
 * const [found] = await checkpointNodes(qmp, [drive]);
 * assert.deepEqual([found!.node, found!.driver, found!.persistent], ["#block185", "qcow2", true]);
 * ```
 */
export async function checkpointNodes(
  qmp: QmpClient,
  drives: LiveDrive[],
): Promise<CheckpointNode[]> {
  const nodes = new Map(
    (await qmp.execute("query-named-block-nodes", { flat: true }) as NamedNode[])
      .map((node) => [node["node-name"], node]),
  );
  let graph: BlockGraph | undefined;
  const fileChild = async (name: string) => {
    graph ??= await qmp.execute("x-debug-query-block-graph").then(
      (answer) => answer as BlockGraph,
      () => ({ nodes: [], edges: [] }),
    );
    const id = graph.nodes.find((node) => node.type === "block-driver" && node.name === name)?.id;
    const child = graph.edges.find((edge) => edge.parent === id && edge.name === "file")?.child;
    return graph.nodes.find((node) => node.id === child)?.name;
  };
  const found: CheckpointNode[] = [];
  for (const drive of drives) {
    let name = drive.node;
    for (let depth = 0; depth < 8 && FILTERS.has(nodes.get(name)?.drv ?? ""); depth++) {
      const below = await fileChild(name);
      if (below === undefined || !nodes.has(below)) break;
      name = below;
    }
    const node = nodes.get(name);
    const driver = node?.drv ?? drive.driver ?? "";
    found.push({
      drive,
      node: name,
      driver,
      persistent: driver === "qcow2",
      bitmaps: node?.["dirty-bitmaps"] ?? [],
    });
  }
  return found;
}

/**
 * Why the drives cannot be backed up incrementally from the archive with these devices, or
 * `undefined` when they can: every drive must be in it, none more, each of the same size (a
 * resize does not mark the grown area dirty).
 *
 * @example A drive was resized
 * ```ts
 * import assert from "node:assert/strict";
 * import { deviceSetProblem } from "./checkpoints.ts";
 *
 * const drive = { name: "drive-scsi0", node: "n", size: 2 << 20, device: "" };
 * assert.equal(deviceSetProblem([drive], [{ name: "drive-scsi0", size: 2 << 20 }]), undefined);
 * assert.match(deviceSetProblem([drive], [{ name: "drive-scsi0", size: 1 << 20 }])!, /was resized/);
 * assert.match(deviceSetProblem([drive], [])!, /drive-scsi0 is not in the base archive/);
 * ```
 */
export function deviceSetProblem(
  drives: { name: string; size: number }[],
  devices: { name: string; size: number }[],
): string | undefined {
  for (const drive of drives) {
    const device = devices.find((candidate) => candidate.name === drive.name);
    if (device === undefined) {
      return `${drive.name} is not in the base archive (a disk was added or chosen)`;
    }
    if (device.size !== drive.size) {
      return `${drive.name} was resized (${drive.size} bytes, ${device.size} in the base archive; the grown area is not in any checkpoint)`;
    }
  }
  for (const device of devices) {
    if (!drives.some((drive) => drive.name === device.name)) {
      return `${device.name} of the base archive is not backed up now (a disk was removed or left out)`;
    }
  }
  return undefined;
}

/**
 * Why checkpoint `name` cannot be trusted on every drive, or `undefined` when it can: it
 * must exist, be recording, not busy, not inconsistent (QEMU was killed while it was open),
 * with a granularity of 64 KiB.
 *
 * @example An inconsistent bitmap
 * ```ts
 * import assert from "node:assert/strict";
 * import { checkpointProblem } from "./checkpoints.ts";
 *
 * const drive = { name: "drive-scsi0", node: "n", size: 65536, device: "" };
 * const bitmap = { name: "vmabackup-a", recording: true, busy: false, persistent: true, granularity: 65536, count: 0 };
 * const node = { drive, node: "n", driver: "qcow2", persistent: true, bitmaps: [bitmap] };
 * assert.equal(checkpointProblem([node], "vmabackup-a"), undefined);
 * const broken = { ...bitmap, recording: false, inconsistent: true };
 * assert.match(checkpointProblem([{ ...node, bitmaps: [broken] }], "vmabackup-a")!, /inconsistent/);
 * assert.match(checkpointProblem([node], "vmabackup-b")!, /has no checkpoint vmabackup-b.*vmabackup-a/);
 * ```
 */
export function checkpointProblem(nodes: CheckpointNode[], name: string): string | undefined {
  for (const { drive, node, bitmaps } of nodes) {
    const bitmap = bitmaps.find((candidate) => candidate.name === name);
    const on = `${drive.name} (node ${node})`;
    if (bitmap === undefined) {
      const others = bitmaps.map((other) => other.name)
        .filter((other) => other?.startsWith(CHECKPOINT_PREFIX));
      const also = others.length === 0 ? "" : ` (it has ${others.join(", ")}, of another archive)`;
      return `${on} has no checkpoint ${name}, the base archive's${also}`;
    }
    if (bitmap.inconsistent) {
      return `checkpoint ${name} of ${on} is inconsistent: QEMU stopped without saving it (killed or crashed)`;
    }
    if (bitmap.busy) return `checkpoint ${name} of ${on} is busy (in use by another job)`;
    if (!bitmap.recording) return `checkpoint ${name} of ${on} is disabled (not recording)`;
    if (bitmap.granularity !== CHECKPOINT_GRANULARITY) {
      return `checkpoint ${name} of ${on} has a granularity of ${bitmap.granularity} bytes, not ${CHECKPOINT_GRANULARITY}`;
    }
  }
  return undefined;
}

/**
 * The checkpoint a live backup adds at its snapshot point, on every drive: the transaction
 * actions that add it, then, once the archive is durable, {@linkcode NewCheckpoint.commit}
 * removes every other checkpoint of these drives (the previous one, and any a failed or
 * killed run left), or on failure {@linkcode NewCheckpoint.discard} removes the new one,
 * so the previous checkpoint stays the base of the next incremental.
 *
 * @example The actions that add a checkpoint
 * ```ts
 * import assert from "node:assert/strict";
 * import type { QmpClient } from "../protocols/qmp_client.ts";
 * import { NewCheckpoint } from "./checkpoints.ts";
 *
 * const drive = { name: "drive-vda", node: "vda", size: 65536, device: "" };
 * const nodes = [{ drive, node: "vda", driver: "raw", persistent: false, bitmaps: [] }];
 * const checkpoint = new NewCheckpoint({} as QmpClient, nodes, "vmabackup-a");
 * assert.deepEqual(checkpoint.addActions(), [{
 *   type: "block-dirty-bitmap-add",
 *   data: { node: "vda", name: "vmabackup-a", persistent: false, granularity: 65536 },
 * }]);
 * ```
 */
export class NewCheckpoint {
  /** The checkpoint's name. */
  readonly name: string;
  #qmp: QmpClient;
  #nodes: CheckpointNode[];
  #state: "none" | "added" | "committed" | "discarded" = "none";

  /** The checkpoint `name` for the drives' checkpoint `nodes`, added through `qmp`. */
  constructor(qmp: QmpClient, nodes: CheckpointNode[], name: string) {
    this.#qmp = qmp;
    this.#nodes = nodes;
    this.name = name;
  }

  /** The transaction actions that add the checkpoint; they go before the snapshot's. */
  addActions(): { type: string; data: Record<string, unknown> }[] {
    return this.#nodes.map(({ node, persistent }) => ({
      type: "block-dirty-bitmap-add",
      data: { node, name: this.name, persistent, granularity: CHECKPOINT_GRANULARITY },
    }));
  }

  /** Call once the transaction with {@linkcode NewCheckpoint.addActions} succeeded. */
  added(): void {
    this.#state = "added";
  }

  /** Whether the checkpoint is in the VM and not yet committed. */
  get pending(): boolean {
    return this.#state === "added";
  }

  /**
   * After the archive is durable: removes every other `vmabackup-*` bitmap of the drives.
   * Resolves to notes on what could not be removed (the archive is good in any case).
   */
  async commit(): Promise<string[]> {
    if (this.#state !== "added") return [];
    this.#state = "committed";
    const notes: string[] = [];
    const now = new Map(
      (await this.#qmp.execute("query-named-block-nodes", { flat: true }) as NamedNode[])
        .map((node) => [node["node-name"], node["dirty-bitmaps"] ?? []]),
    );
    for (const { drive, node } of this.#nodes) {
      for (const bitmap of now.get(node) ?? []) {
        const name = bitmap.name;
        if (name === undefined || name === this.name || !name.startsWith(CHECKPOINT_PREFIX)) {
          continue;
        }
        try {
          await this.#qmp.execute("block-dirty-bitmap-remove", { node, name });
        } catch (error) {
          notes.push(
            `could not remove the old checkpoint ${name} of ${drive.name}: ${
              error instanceof Error ? error.message : error
            }`,
          );
        }
      }
    }
    return notes;
  }

  /** Removes the new checkpoint (a failed backup); the previous one is left as it is. */
  async discard(): Promise<void> {
    if (this.#state !== "added") return;
    this.#state = "discarded";
    const failures: string[] = [];
    for (const { drive, node } of this.#nodes) {
      try {
        await this.#qmp.execute("block-dirty-bitmap-remove", { node, name: this.name });
      } catch (error) {
        failures.push(`${drive.name}: ${error instanceof Error ? error.message : error}`);
      }
    }
    if (failures.length > 0) {
      throw new Error(`Cannot remove the new checkpoint ${this.name}: ${failures.join("; ")}`);
    }
  }
}

/** What a live backup does with checkpoints, decided before the VM changes. */
export interface CheckpointPlan {
  /** `incremental` only when `since` was asked for and can be trusted on every drive. */
  kind: "full" | "incremental";
  /** Why a full backup, when an incremental was asked for. */
  fullReason?: string | undefined;
  /** The checkpoint the changed clusters come from (an incremental). */
  since?: string | undefined;
  /** The nodes of the drives' checkpoints, in drive order (when checkpoints are used). */
  nodes: CheckpointNode[];
  /** The checkpoint to add at the snapshot point, if one was asked for. */
  checkpoint?: NewCheckpoint | undefined;
}

/**
 * Decides, before the VM changes, whether a live backup can be incremental and where its
 * checkpoints go (see {@linkcode checkpointNodes}, {@linkcode deviceSetProblem} and
 * {@linkcode checkpointProblem}).
 *
 * @example No checkpoints asked for: nothing to ask QEMU
 * ```ts
 * import assert from "node:assert/strict";
 * import type { QmpClient } from "../protocols/qmp_client.ts";
 * import { planCheckpoints } from "./checkpoints.ts";
 *
 * const plan = await planCheckpoints({} as QmpClient, [], {});
 * assert.deepEqual([plan.kind, plan.nodes, plan.checkpoint], ["full", [], undefined]);
 * ```
 */
export async function planCheckpoints(
  qmp: QmpClient,
  drives: LiveDrive[],
  options: {
    checkpoint?: string | undefined;
    since?: { checkpoint: string; devices: { name: string; size: number }[] } | undefined;
  },
): Promise<CheckpointPlan> {
  if (options.checkpoint === undefined && options.since === undefined) {
    return { kind: "full", nodes: [] };
  }
  const nodes = await checkpointNodes(qmp, drives);
  const checkpoint = options.checkpoint === undefined
    ? undefined
    : new NewCheckpoint(qmp, nodes, options.checkpoint);
  if (options.since === undefined) return { kind: "full", nodes, checkpoint };
  const problem = deviceSetProblem(drives, options.since.devices) ??
    checkpointProblem(nodes, options.since.checkpoint);
  if (problem !== undefined) return { kind: "full", fullReason: problem, nodes, checkpoint };
  return { kind: "incremental", since: options.since.checkpoint, nodes, checkpoint };
}
