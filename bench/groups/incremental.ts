// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Incremental live backups: what a synthetic full costs against a full backup of the same disk.
 *
 * A running QEMU 7.2 VM (q35, TCG, CPU halted, as in the tests) has one 4 GiB disk: a qcow2
 * overlay on `dense-4g.raw`. In `setup` (untimed) it gets a full backup that adds a checkpoint
 * (the base, `.vma.zst`), and then guest writes change 2 % of its clusters with data from
 * elsewhere in the image (as compressible as the rest): in runs of 1 MiB (16 clusters), or as
 * scattered single clusters, one VM each. Each round then runs, as separate processes, one
 * after the other (the order alternating between rounds):
 *
 * - the incremental: `cli.ts backup --qmp SOCKET --base BASE --no-checkpoint -o OUT.vma.zst`:
 *   QEMU sends only the dirty clusters, every other cluster comes from BASE (extents without a
 *   change copied as stored, the unchanged clusters of the others decoded and written again);
 * - the full backup of the same VM in the same state: `cli.ts backup --qmp SOCKET
 *   --no-checkpoint -o OUT.vma.zst`.
 *
 * `--no-checkpoint` on both leaves the base's checkpoint as it is, so every round starts from
 * the same state (the guest does not write meanwhile). Figures: `time` and `cpu`, the
 * incremental's best-of-N wall seconds and least CPU seconds (user + system of the CLI's
 * process, GNU time) over the full backup's, over the rounds so far (the last sample is held
 * against the target, ≤ 0.2); each round's seconds and CPU seconds of both; the incremental's
 * peak RSS. QEMU's own work (it reads the whole disk for the full backup, the dirty clusters
 * for the incremental) is not in the CPU figures. The checks restore each incremental archive
 * and compare it, byte for byte, with the image the guest's writes made, and run `verify
 * --require-data` on it.
 *
 * @module
 */
import { Buffer } from "node:buffer";
import { join } from "node:path";
import { startVm, type TestVm } from "../../tests/_qemu.ts";
import { type Check, defineGroup, type GroupContext, type Row, value } from "../_group.ts";
import { DENSE_4G } from "../_inputs.ts";
import { readAt } from "../_util.ts";

const MiB = 1024 * 1024;
const CLUSTER = 65536;
const DISK_BYTES = DENSE_4G.size;
const CLUSTERS = DISK_BYTES / CLUSTER;
/** 2 % of the clusters change. */
const CHANGED = Math.round(CLUSTERS * 0.02);
/** A run of the `runs` variant: 1 MiB. */
const RUN_CLUSTERS = 16;

type Variant = "runs" | "scattered";

/** A VM of one variant, its base archive, and what its guest wrote since. */
interface Prepared {
  vm: TestVm;
  base: string;
  /** Changed cluster → the cluster of `dense-4g.raw` whose data it got. */
  changes: Map<number, number>;
}

type State = Partial<Record<Variant, Prepared>>;

export default defineGroup<State>({
  name: "incremental",
  description:
    "incremental live backup (synthetic full from a base .vma.zst) of a 4 GiB disk with 2 % of its clusters changed, in 1 MiB runs or scattered, vs a full backup of it: time and CPU",
  inputs: [DENSE_4G],
  tools: ["qemu-system-x86_64", "qemu-img"],
  async setup(ctx) {
    const state: State = {};
    for (const variant of ["runs", "scattered"] as const) {
      state[variant] = await prepare(ctx, variant);
    }
    return state;
  },
  async teardown(_ctx, state) {
    for (const prepared of Object.values(state)) {
      await prepared.vm.stop({ readBack: false }).catch(() => {});
    }
  },
  rows(ctx, state) {
    const rows: Row[] = [];
    for (
      const [variant, mode] of [["runs", "push"], ["runs", "pull"], ["scattered", "push"]] as const
    ) {
      const { vm, base } = state[variant]!;
      const backup = (name: string, extra: string[]) =>
        ctx.ours(
          [
            ...["backup", "--qmp", vm.toolQmp, "--mode", mode, "--no-checkpoint"],
            ...[...extra, "-o", join(ctx.out, name)],
          ],
          [join(ctx.out, name), join(ctx.out, `${name}.partial`)],
        );
      const incremental = backup(`incremental-${variant}.vma.zst`, ["--base", base]);
      const full = backup(`full-${variant}.vma.zst`, []);
      const best = {
        incremental: Infinity,
        full: Infinity,
        incrementalCpu: Infinity,
        fullCpu: Infinity,
      };
      rows.push(value({
        id: `${variant}-${mode}`,
        label: `${mode} incremental, 2 % changed ${
          variant === "runs" ? "in 1 MiB runs" : "as scattered clusters"
        }, vs a full backup (4 GiB)`,
        figures: {
          time: { unit: "×", target: { max: 0.2 }, summary: "last" },
          cpu: { unit: "×", target: { max: 0.2 }, summary: "last" },
          incremental: { unit: "s" },
          full: { unit: "s" },
          incrementalCpu: { unit: "s" },
          fullCpu: { unit: "s" },
          rss: { unit: "MiB", summary: "worst" },
        },
        async sample(run) {
          const order = run.round % 2 === 1 ? [full, incremental] : [incremental, full];
          const [first, second] = [await run.time(order[0]!), await run.time(order[1]!)];
          const [i, f] = order[0] === incremental ? [first, second] : [second, first];
          best.incremental = Math.min(best.incremental, i.seconds);
          best.full = Math.min(best.full, f.seconds);
          best.incrementalCpu = Math.min(best.incrementalCpu, i.cpuSeconds);
          best.fullCpu = Math.min(best.fullCpu, f.cpuSeconds);
          return {
            time: round(best.incremental / best.full),
            cpu: round(best.incrementalCpu / best.fullCpu),
            incremental: i.seconds,
            full: f.seconds,
            incrementalCpu: i.cpuSeconds,
            fullCpu: f.cpuSeconds,
            rss: i.rssMiB,
          };
        },
      }));
    }
    return rows;
  },
  checks(ctx, state) {
    const checks: Check[] = [];
    for (const variant of ["runs", "scattered"] as const) {
      const { vm, base, changes } = state[variant]!;
      for (const mode of ["push", "pull"] as const) {
        if (variant === "scattered" && mode === "pull") continue;
        const archive = join(ctx.out, `check-${variant}-${mode}.vma.zst`);
        checks.push({
          label:
            `incremental: the ${mode} incremental of the ${variant} VM restores to the guest's image byte for byte, and verify --require-data passes`,
          run: async () => {
            await ctx.runOurs([
              ...["backup", "--qmp", vm.toolQmp, "--mode", mode, "--no-checkpoint"],
              ...["--base", base, "-o", archive, "--force", "--json"],
            ]).then((json) => {
              const result = JSON.parse(json);
              if (result.kind !== "incremental") throw new Error(`a ${result.kind} backup`);
            });
            await ctx.runOurs(["verify", "--require-data", archive]);
            const compared = await restoresTo(ctx, archive, changes);
            await Deno.remove(archive);
            return `${compared} bytes equal; ${changes.size} clusters changed`;
          },
        });
      }
    }
    return checks;
  },
});

/** A VM on an overlay of the dense image, its base archive, then 2 % of it rewritten. */
async function prepare(ctx: GroupContext, variant: Variant): Promise<Prepared> {
  const image = join(ctx.out, `${variant}.qcow2`);
  await ctx.run([
    ...["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw"],
    ...["-b", ctx.pathOf(DENSE_4G), image],
  ]);
  const vm = await startVm([{ id: "vda", size: DISK_BYTES, format: "qcow2", image }]);
  try {
    const base = join(ctx.out, `base-${variant}.vma.zst`);
    ctx.log(`[incremental] ${variant}: the base, a full backup with a checkpoint`);
    await ctx.runOurs(["backup", "--qmp", vm.toolQmp, "-o", base]);
    const changes = chooseChanges(variant);
    ctx.log(`[incremental] ${variant}: the guest rewrites ${changes.size} clusters`);
    using source = await Deno.open(ctx.pathOf(DENSE_4G));
    const piece = join(vm.dir, "piece");
    const sorted = [...changes.keys()].sort((a, b) => a - b);
    for (let i = 0; i < sorted.length;) {
      // A run of consecutive changed clusters is one guest write.
      let end = i + 1;
      while (end < sorted.length && sorted[end] === sorted[end - 1]! + 1) end++;
      const data = new Uint8Array((end - i) * CLUSTER);
      for (let k = i; k < end; k++) {
        await readAt(
          source,
          changes.get(sorted[k]!)! * CLUSTER,
          data.subarray((k - i) * CLUSTER, (k - i + 1) * CLUSTER),
        );
      }
      await Deno.writeFile(piece, data);
      await vm.io("vda", `write -q -s ${piece} ${sorted[i]! * CLUSTER} ${data.byteLength}`);
      i = end;
    }
    await ctx.warm(base);
    return { vm, base, changes };
  } catch (error) {
    await vm.stop({ readBack: false }).catch(() => {});
    throw error;
  }
}

/** The changed clusters of a variant (2 %), each with the cluster its data comes from. */
function chooseChanges(variant: Variant): Map<number, number> {
  let state = variant === "runs" ? 0x2545f491 : 0x1b873593;
  const random = (n: number) => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) % n;
  };
  const changes = new Map<number, number>();
  while (changes.size < CHANGED) {
    if (variant === "runs") {
      const first = random(CLUSTERS - RUN_CLUSTERS);
      const from = random(CLUSTERS - RUN_CLUSTERS);
      for (let i = 0; i < RUN_CLUSTERS && changes.size < CHANGED; i++) {
        if (!changes.has(first + i)) changes.set(first + i, from + i);
      }
    } else {
      const cluster = random(CLUSTERS);
      if (!changes.has(cluster)) changes.set(cluster, random(CLUSTERS));
    }
  }
  return changes;
}

/**
 * Restores the archive's disk with `extract --stdout` and compares it, as it streams, with the
 * dense image where the changed clusters have their new data; returns the bytes compared.
 */
async function restoresTo(
  ctx: GroupContext,
  archive: string,
  changes: Map<number, number>,
): Promise<number> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ctx.cli, "extract", archive, "--stdout", "drive-vda"],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const stderr = new Response(child.stderr).text();
  using image = await Deno.open(ctx.pathOf(DENSE_4G));
  const window = new Uint8Array(8 * MiB);
  let windowStart = -1;
  let position = 0;
  let mismatch: number | undefined;
  const expectedAt = async (offset: number) => {
    const start = offset - offset % window.byteLength;
    if (start !== windowStart) {
      await readAt(
        image,
        start,
        window.subarray(0, Math.min(window.byteLength, DISK_BYTES - start)),
      );
      for (
        let cluster = start / CLUSTER;
        cluster < (start + window.byteLength) / CLUSTER;
        cluster++
      ) {
        const from = changes.get(cluster);
        if (from === undefined) continue;
        const at = cluster * CLUSTER - start;
        await readAt(image, from * CLUSTER, window.subarray(at, at + CLUSTER));
      }
      windowStart = start;
    }
    return window.subarray(offset - start);
  };
  for await (const chunk of child.stdout) {
    for (let done = 0; done < chunk.byteLength && mismatch === undefined;) {
      const expected = await expectedAt(position);
      const length = Math.min(expected.byteLength, chunk.byteLength - done);
      const got = Buffer.from(chunk.buffer, chunk.byteOffset + done, length);
      if (!got.equals(Buffer.from(expected.buffer, expected.byteOffset, length))) {
        mismatch = position;
        while (got[mismatch - position] === expected[mismatch - position]) mismatch++;
      }
      done += length;
      position += length;
    }
  }
  const status = await child.status;
  if (!status.success) throw new Error(`extract exited ${status.code}: ${(await stderr).trim()}`);
  if (mismatch !== undefined) throw new Error(`the restored disk differs at byte ${mismatch}`);
  if (position !== DISK_BYTES) throw new Error(`the restored disk has ${position} bytes`);
  return position;
}

function round(value: number): number {
  return Math.round(value * 1000) / 1000;
}
