// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Incremental live backups with checkpoints (dirty bitmaps), push and pull, through the CLI
 * as users run them: a chain of a full and three incrementals while the guest writes, each
 * archive complete on its own and exactly its point in time; QEMU sends exactly the dirty
 * clusters; every reason to distrust a checkpoint gives a full backup that says why; a
 * failed incremental leaves no archive and the previous checkpoint, so the next one is
 * right. After every test the VM's graph is as before, with one checkpoint per drive.
 */
import assert from "node:assert/strict";
import { fileRangeReader, IndexedArchive, ZstdDecompressStream } from "../mod.ts";
import { cli, failingSinks, readUntil, shell, spawnCli } from "./_cli.ts";
import { diskContent, firstDifference, qemuTest, type TestVm, withVm } from "./_qemu.ts";
import { randomBytes, restoreInMemory } from "./_utils.ts";

const MiB = 2 ** 20;
const CLUSTER = 65536;
const PERMISSIONS = ["--allow-read", "--allow-write", "--allow-net"];
type Mode = "push" | "pull";

/** A qcow2 disk (persistent checkpoints) and a raw one of an odd size (kept in memory). */
function chainDisks() {
  return [
    { id: "vda", size: 32 * MiB, data: diskContent(32 * MiB, 3) },
    {
      id: "vdb",
      size: 16 * MiB + 3 * 4096 + 512,
      format: "raw" as const,
      data: diskContent(16 * MiB, 4),
    },
  ];
}

/** A guest write, as the test made it: to replay it over a restored archive. */
interface GuestOp {
  id: string;
  offset: number;
  length: number;
  /** The byte written, 0 for a write of zeros. */
  pattern: number;
}

/** Clusters written per disk since a point in time. */
type Dirty = Map<string, Set<number>>;

/**
 * Random guest writes (4 KiB to 128 KiB, unaligned) and writes of zeros, each recorded in
 * `dirty` and `ops`; with `hot`, every other one rewrites one of its clusters (during an
 * incremental: a cluster QEMU has to copy before the write goes through).
 */
async function guestWrites(
  vm: TestVm,
  count: number,
  seed: number,
  dirty: Dirty,
  ops: GuestOp[],
  hot?: Dirty,
): Promise<void> {
  let state = seed;
  const random = (n: number) => {
    state = (state * 1103515245 + 12345) & 0x7fffffff;
    return state % n;
  };
  const ids = [...vm.model.keys()];
  for (let i = 0; i < count; i++) {
    const id = ids[random(ids.length)]!;
    const size = vm.model.get(id)!.byteLength;
    let op: GuestOp;
    const hotClusters = [...hot?.get(id) ?? []];
    if (i % 2 === 0 && hotClusters.length > 0) {
      const offset = hotClusters[random(hotClusters.length)]! * CLUSTER;
      op = { id, offset, length: Math.min(CLUSTER, size - offset), pattern: 0xf0 + i % 16 };
      await vm.write(id, op.offset, op.length, op.pattern);
    } else if (i % 4 === 3) {
      const offset = random(Math.floor(size / CLUSTER)) * CLUSTER;
      op = { id, offset, length: CLUSTER, pattern: 0 };
      await vm.writeZeroes(id, offset, CLUSTER, random(2) === 0);
    } else {
      const length = (1 + random(32)) * 4096;
      const offset = Math.min(random(size / 4096) * 4096, size - length);
      op = { id, offset, length, pattern: 0x20 + (seed + i) % 200 };
      await vm.write(id, offset, length, op.pattern);
    }
    ops.push(op);
    const clusters = dirty.get(id) ?? new Set<number>();
    dirty.set(id, clusters);
    const last = Math.floor((op.offset + op.length - 1) / CLUSTER);
    for (let c = Math.floor(op.offset / CLUSTER); c <= last; c++) clusters.add(c);
  }
}

/** Bytes of the dirty clusters: whole clusters (QEMU's count), or within the disk (ours). */
function dirtyBytes(vm: TestVm, dirty: Dirty, within: boolean): number {
  let bytes = 0;
  for (const [id, clusters] of dirty) {
    const size = vm.model.get(id)!.byteLength;
    for (const c of clusters) bytes += within ? Math.min(CLUSTER, size - c * CLUSTER) : CLUSTER;
  }
  return bytes;
}

interface BackupRun {
  code: number;
  stderr: string;
  /** The `--json` result. */
  result: Record<string, unknown> & { kind?: string; readBytes?: number; uuid?: string };
}

/**
 * `cli.ts backup --qmp ... --json --progress json ARGS`; `during` runs once the snapshot
 * point is taken, while the backup goes on.
 */
async function backup(
  vm: TestVm,
  mode: Mode,
  args: string[],
  during?: () => Promise<void>,
): Promise<BackupRun> {
  const child = spawnCli(
    ["backup", "--qmp", vm.toolQmp, "--mode", mode, "--json", "--progress", "json", ...args],
    { permissions: PERMISSIONS },
  );
  await child.stdin.close();
  const stdout = new Response(child.stdout).text();
  let stderr = "";
  const snapshot = Promise.withResolvers<void>();
  const reading = child.stderr.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({
      write(text) {
        stderr += text;
        if (stderr.includes('"event":"snapshot"')) snapshot.resolve();
      },
    }),
  );
  const status = child.status.finally(() => snapshot.resolve());
  await snapshot.promise;
  if (during !== undefined && (await Promise.race([status.then(() => true), false])) === false) {
    await during();
  }
  const [{ code }, text] = await Promise.all([status, stdout, reading]);
  return { code, stderr, result: text.trim() === "" ? {} : JSON.parse(text) };
}

/** Restores a `.vma.zst` in memory: disk name → bytes. */
async function restore(path: string): Promise<Map<string, Uint8Array>> {
  const file = await Deno.readFile(path);
  const plain = await new Response(
    ReadableStream.from([file]).pipeThrough(new ZstdDecompressStream()),
  ).bytes();
  return await restoreInMemory(plain);
}

/** The model's disks, by archive name. */
function snapshotOf(vm: TestVm): Map<string, Uint8Array> {
  return new Map([...vm.model].map(([id, bytes]) => [`drive-${id}`, bytes.slice()]));
}

function assertSameDisks(
  actual: Map<string, Uint8Array>,
  expected: Map<string, Uint8Array>,
  what: string,
) {
  assert.deepEqual([...actual.keys()].sort(), [...expected.keys()].sort(), what);
  for (const [name, bytes] of expected) {
    assert.equal(firstDifference(actual.get(name)!, bytes), -1, `${what}: ${name}`);
  }
}

/** Every drive's node holds exactly `checkpoint` among our bitmaps, nothing else of ours. */
async function assertOneCheckpoint(vm: TestVm, checkpoint: string, nodes: number) {
  const bitmaps = await vm.bitmaps();
  const ours = [...bitmaps.values()].map((names) =>
    names.filter((name) => name.startsWith("vmabackup-"))
  ).filter((names) => names.length > 0);
  assert.deepEqual(ours, Array(nodes).fill([checkpoint]), JSON.stringify([...bitmaps]));
}

async function assertVerifies(path: string) {
  const verify = await cli(["verify", "--require-data", path]);
  assert.equal(verify.code, 0, verify.stderr);
}

async function exists(path: string): Promise<boolean> {
  return await Deno.lstat(path).then(() => true, () => false);
}

/** The BLOCK_JOB_COMPLETED lengths of the push jobs of the last backup, summed. */
async function jobBytes(vm: TestVm, jobs: number): Promise<number> {
  let total = 0;
  for (let i = 0; i < jobs; i++) {
    const event = await vm.qmp.waitForEvent(
      (e) => e.event === "BLOCK_JOB_COMPLETED" && String(e.data?.device).startsWith("vmabackup-"),
      { timeoutMs: 5000, description: "BLOCK_JOB_COMPLETED" },
    );
    assert.equal(event.data?.error, undefined);
    total += event.data!.len as number;
  }
  return total;
}

for (const mode of ["push", "pull"] as const) {
  qemuTest(
    `incremental ${mode}: a full and 3 incrementals while the guest writes, each archive exactly its point in time`,
    async () => {
      await withVm(chainDisks(), async (vm, dir) => {
        const before = await vm.nodes();
        // Push: slow jobs, so the guest's writes meet clusters not copied yet.
        const speed = (round: number) =>
          mode === "pull" ? [] : ["--speed", `${round === 0 ? 16 * MiB : MiB}`];
        let dirty: Dirty = new Map();
        const ops: GuestOp[] = [];
        const opsAt: number[] = []; // ops before each backup's snapshot point
        let full: Map<string, Uint8Array> | undefined;
        for (let round = 0; round < 4; round++) {
          if (round > 0) await guestWrites(vm, 12, 100 * round, dirty, ops);
          const snapshot = snapshotOf(vm);
          opsAt.push(ops.length);
          const expected = dirty;
          const expectedCount = dirtyBytes(vm, expected, false);
          // QEMU's own count of the base's checkpoint, before the backup uses it.
          if (round > 0) {
            let counted = 0;
            const nodes = await vm.qmp.execute("query-named-block-nodes", { flat: true }) as {
              "dirty-bitmaps"?: { name?: string; count: number }[];
            }[];
            for (const node of nodes) {
              for (const bitmap of node["dirty-bitmaps"] ?? []) {
                if (bitmap.name?.startsWith("vmabackup-")) counted += bitmap.count;
              }
            }
            assert.equal(
              counted,
              expectedCount,
              `round ${round}: the checkpoint holds the writes`,
            );
          }
          dirty = new Map();
          const out = `${dir}/${round}.vma.zst`;
          const base = round === 0 ? [] : ["--base", `${dir}/${round - 1}.vma.zst`];
          const run = await backup(
            vm,
            mode,
            [...base, ...speed(round), "-o", out],
            () => guestWrites(vm, 10, 1000 + round, dirty, ops, expected),
          );
          assert.equal(run.code, 0, run.stderr);
          assert.equal(run.result.kind, round === 0 ? "full" : "incremental", run.stderr);
          assert.doesNotMatch(run.stderr, /a full backup, not an incremental/);
          const disksBytes = [...vm.model.values()].reduce(
            (sum, bytes) => sum + bytes.byteLength,
            0,
          );
          if (round === 0) {
            assert.equal(run.result.readBytes, disksBytes);
          } else {
            assert.equal(
              run.result.readBytes,
              dirtyBytes(vm, expected, true),
              "read the dirty clusters",
            );
            assert.equal(run.result.baseBytes, disksBytes - run.result.readBytes!);
          }
          if (mode === "push") {
            const sent = await jobBytes(vm, 2);
            // QEMU counts whole clusters, the odd disk's last one too.
            const whole = [...vm.model.values()].reduce(
              (sum, bytes) => sum + Math.ceil(bytes.byteLength / CLUSTER) * CLUSTER,
              0,
            );
            assert.equal(sent, round === 0 ? whole : expectedCount, "QEMU's job length");
          }
          // On its own, the archive is the disks at its snapshot point.
          const restored = await restore(out);
          assertSameDisks(restored, snapshot, `archive ${round}`);
          await assertVerifies(out);
          if (round === 0) full = restored;
          await assertOneCheckpoint(vm, `vmabackup-${run.result.uuid}`, 2);
        }
        // The newest archive alone equals the full with every change up to its point.
        const replayed = new Map([...full!].map(([name, bytes]) => [name, bytes.slice()]));
        for (const op of ops.slice(0, opsAt[3])) {
          replayed.get(`drive-${op.id}`)!.fill(op.pattern, op.offset, op.offset + op.length);
        }
        assertSameDisks(await restore(`${dir}/3.vma.zst`), replayed, "the full + every change");
        assert.deepEqual(await vm.nodes(), before, "the block graph is as before");
        assert.equal(await vm.status(), "running");
        const disks = await vm.stop();
        for (const [id, bytes] of disks) assert.equal(vm.difference(id, bytes), -1, id);
      });
    },
  );
}

/** One qcow2 disk: checkpoints persist across restarts. */
function qcow2Disk(id = "vda", seed = 5) {
  return { id, size: 16 * MiB, data: diskContent(16 * MiB, seed) };
}

/**
 * An incremental backup of `base` into `out` that must read `readBytes` from the VM and
 * restore to what the guest's disks hold now.
 */
async function assertIncremental(
  vm: TestVm,
  mode: Mode,
  [base, out]: [string, string],
  readBytes: number,
  what: string,
): Promise<BackupRun> {
  const snapshot = snapshotOf(vm);
  const run = await backup(vm, mode, ["--base", base, "-o", out]);
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.result.kind, "incremental", run.stderr);
  assert.equal(run.result.readBytes, readBytes);
  assertSameDisks(await restore(out), snapshot, what);
  return run;
}

/** A backup that must be a full one, saying why in one line, and be right. */
async function assertFull(
  vm: TestVm,
  mode: Mode,
  args: string[],
  reason: RegExp,
): Promise<BackupRun> {
  const snapshot = snapshotOf(vm);
  const out = args[args.indexOf("-o") + 1]!;
  const run = await backup(vm, mode, args);
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.result.kind, "full", run.stderr);
  const notes = run.stderr.split("\n").filter((line) => line.startsWith("note: a full backup"));
  assert.equal(notes.length, 1, run.stderr);
  assert.match(notes[0]!, reason);
  assert.match(String(run.result.fullReason), reason);
  assertSameDisks(await restore(out), snapshot, out);
  return run;
}

qemuTest(
  "incremental: a checkpoint removed behind our back, or of another archive, gives a full",
  async () => {
    await withVm([qcow2Disk()], async (vm, dir) => {
      const before = await vm.nodes();
      const a = await backup(vm, "push", ["-o", `${dir}/a.vma.zst`]);
      assert.equal(a.code, 0, a.stderr);
      await vm.write("vda", 3 * MiB, 65536, 0x31);
      await vm.qmp.execute("block-dirty-bitmap-remove", {
        node: "vda-node",
        name: `vmabackup-${a.result.uuid}`,
      });
      const b = await assertFull(
        vm,
        "push",
        ["--base", `${dir}/a.vma.zst`, "-o", `${dir}/b.vma.zst`],
        new RegExp(`drive-vda \\(node vda-node\\) has no checkpoint vmabackup-${a.result.uuid}`),
      );
      await assertOneCheckpoint(vm, `vmabackup-${b.result.uuid}`, 1);
      // b's checkpoint is there, but a is not b: the UUID does not match the bitmap.
      const c = await assertFull(
        vm,
        "push",
        ["--base", `${dir}/a.vma.zst`, "-o", `${dir}/c.vma.zst`],
        new RegExp(`it has vmabackup-${b.result.uuid}, of another archive`),
      );
      // --full-every 2: an incremental after the full, then a full again.
      await vm.write("vda", 5 * MiB, 4096, 0x32);
      const d = await backup(vm, "push", [
        "--base",
        `${dir}/c.vma.zst`,
        "--full-every",
        "2",
        "-o",
        `${dir}/d.vma.zst`,
      ]);
      assert.equal(d.result.kind, "incremental", d.stderr);
      const archive = await IndexedArchive.open(await fileRangeReader(`${dir}/d.vma.zst`));
      archive.close();
      assert.deepEqual(archive.index.base, {
        uuid: c.result.uuid,
        checkpoint: `vmabackup-${c.result.uuid}`,
        depth: 1,
      });
      const e = await assertFull(
        vm,
        "push",
        ["--base", `${dir}/d.vma.zst`, "--full-every", "2", "-o", `${dir}/e.vma.zst`],
        /--full-every 2: the base is incremental 1 after a full one/,
      );
      await assertOneCheckpoint(vm, `vmabackup-${e.result.uuid}`, 1);
      assert.deepEqual(await vm.nodes(), before);
    });
  },
);

qemuTest(
  "incremental pull: after kill -9 a checkpoint is inconsistent or gone: a full each time",
  async () => {
    await withVm([qcow2Disk()], async (vm, dir) => {
      const a = await backup(vm, "pull", ["-o", `${dir}/a.vma.zst`]);
      assert.equal(a.code, 0, a.stderr);
      await vm.restart(); // a clean quit stores the checkpoint in the qcow2
      await vm.write("vda", 2 * MiB, 65536, 0x41);
      await vm.restart({ kill: true }); // and a crash leaves it in-use
      const before = await vm.nodes();
      const [bitmap] = (await vm.qmp.execute("query-named-block-nodes", { flat: true }) as {
        "node-name": string;
        "dirty-bitmaps"?: { name: string; inconsistent?: boolean }[];
      }[]).find((node) => node["node-name"] === "vda-node")!["dirty-bitmaps"]!;
      assert.deepEqual([bitmap!.name, bitmap!.inconsistent], [
        `vmabackup-${a.result.uuid}`,
        true,
      ]);
      const b = await assertFull(
        vm,
        "pull",
        ["--base", `${dir}/a.vma.zst`, "-o", `${dir}/b.vma.zst`],
        /checkpoint vmabackup-\S+ of drive-vda \(node vda-node\) is inconsistent: QEMU stopped without saving it/,
      );
      await assertOneCheckpoint(vm, `vmabackup-${b.result.uuid}`, 1);
      // A checkpoint added since the last start is only in QEMU's memory: a crash loses it.
      await vm.write("vda", 3 * MiB, 4096, 0x42);
      await vm.restart({ kill: true });
      await assertFull(
        vm,
        "pull",
        ["--base", `${dir}/b.vma.zst`, "-o", `${dir}/c.vma.zst`],
        new RegExp(`has no checkpoint vmabackup-${b.result.uuid}`),
      );
      // And the chain goes on from the new full.
      await vm.write("vda", 9 * MiB, 8192, 0x43);
      const files: [string, string] = [`${dir}/c.vma.zst`, `${dir}/d.vma.zst`];
      const d = await assertIncremental(vm, "pull", files, CLUSTER, "d");
      await assertOneCheckpoint(vm, `vmabackup-${d.result.uuid}`, 1);
      assert.deepEqual(await vm.nodes(), before);
    });
  },
);

qemuTest("incremental push: a disk grown with block_resize gives a full", async () => {
  await withVm([qcow2Disk()], async (vm, dir) => {
    const before = await vm.nodes();
    const a = await backup(vm, "push", ["-o", `${dir}/a.vma.zst`]);
    assert.equal(a.code, 0, a.stderr);
    await vm.qmp.execute("block_resize", { "node-name": "vda-node", size: 20 * MiB });
    const grown = new Uint8Array(20 * MiB);
    grown.set(vm.model.get("vda")!);
    vm.model.set("vda", grown);
    await vm.write("vda", 18 * MiB, 65536, 0x51); // in the grown area
    const b = await assertFull(
      vm,
      "push",
      ["--base", `${dir}/a.vma.zst`, "-o", `${dir}/b.vma.zst`],
      /drive-vda was resized \(20971520 bytes, 16777216 in the base archive/,
    );
    await assertOneCheckpoint(vm, `vmabackup-${b.result.uuid}`, 1);
    assert.deepEqual(await vm.nodes(), before);
  });
});

qemuTest(
  "incremental pull: checkpoints survive a clean restart; a disk added then gives a full",
  async () => {
    await withVm([qcow2Disk()], async (vm, dir) => {
      const a = await backup(vm, "pull", ["-o", `${dir}/a.vma.zst`]);
      assert.equal(a.code, 0, a.stderr);
      await vm.write("vda", 4 * MiB, 65536, 0x61);
      await vm.restart();
      await assertIncremental(vm, "pull", [`${dir}/a.vma.zst`, `${dir}/b.vma.zst`], CLUSTER, "b");
      await vm.restart({ addDisks: [qcow2Disk("vdb", 6)] });
      const before = await vm.nodes();
      const c = await assertFull(
        vm,
        "pull",
        ["--base", `${dir}/b.vma.zst`, "-o", `${dir}/c.vma.zst`],
        /drive-vdb is not in the base archive \(a disk was added/,
      );
      await assertOneCheckpoint(vm, `vmabackup-${c.result.uuid}`, 2);
      assert.deepEqual(await vm.nodes(), before);
    });
  },
);

qemuTest(
  "incremental push: a corrupt base archive gives a full; a damaged frame fails the incremental",
  async () => {
    await withVm([qcow2Disk()], async (vm, dir) => {
      const before = await vm.nodes();
      const a = await backup(vm, "push", ["-o", `${dir}/a.vma.zst`]);
      assert.equal(a.code, 0, a.stderr);
      // One byte of the embedded index (inside its skippable frame, before the seek table).
      const file = await Deno.readFile(`${dir}/a.vma.zst`);
      const bad = file.slice();
      const at = indexFrameOffset(file) + 8 + 40; // in the index's JSON header
      bad[at] = bad[at]! ^ 0x01;
      await Deno.writeFile(`${dir}/bad.vma.zst`, bad);
      await vm.write("vda", 7 * MiB, 4096, 0x71);
      const b = await assertFull(
        vm,
        "push",
        ["--base", `${dir}/bad.vma.zst`, "-o", `${dir}/b.vma.zst`],
        /the base archive .*bad\.vma\.zst cannot be used: .*index/,
      );
      await assertOneCheckpoint(vm, `vmabackup-${b.result.uuid}`, 1);
      // A truncated one too.
      await Deno.writeFile(`${dir}/cut.vma.zst`, file.subarray(0, file.byteLength - 100));
      const c = await assertFull(
        vm,
        "push",
        ["--base", `${dir}/cut.vma.zst`, "-o", `${dir}/c.vma.zst`],
        /the base archive .*cut\.vma\.zst cannot be used/,
      );
      await assertOneCheckpoint(vm, `vmabackup-${c.result.uuid}`, 1);
      // A data frame damaged, its index intact: found only when it is copied, so the
      // incremental fails (exit 3, one line) and leaves no archive; c's checkpoint stays.
      const good = await Deno.readFile(`${dir}/c.vma.zst`);
      const damaged = good.slice();
      damaged[damaged.byteLength >> 1]! ^= 0x10;
      await Deno.writeFile(`${dir}/c-damaged.vma.zst`, damaged);
      await vm.write("vda", 0, 4096, 0x72);
      const d = await backup(vm, "push", [
        "--base",
        `${dir}/c-damaged.vma.zst`,
        "-o",
        `${dir}/d.vma.zst`,
      ]);
      assert.equal(d.code, 3, d.stderr);
      const errors = d.stderr.split("\n").filter((line) => line.startsWith("error:"));
      assert.equal(errors.length, 1, d.stderr);
      assert.match(errors[0]!, /c-damaged\.vma\.zst.*(checksum|SHA-256).*at byte \d+/);
      assert.equal(await exists(`${dir}/d.vma.zst`), false);
      assert.equal(await exists(`${dir}/d.vma.zst.partial`), false);
      await assertOneCheckpoint(vm, `vmabackup-${c.result.uuid}`, 1);
      const e = await backup(vm, "push", [
        "--base",
        `${dir}/c.vma.zst`,
        "-o",
        `${dir}/e.vma.zst`,
      ]);
      assert.equal(e.code, 0, e.stderr);
      assert.equal(e.result.kind, "incremental", e.stderr);
      await assertVerifies(`${dir}/e.vma.zst`);
      assert.deepEqual(await vm.nodes(), before);
    });
  },
);

/** Where the index's skippable frame starts in a seekable `.vma.zst`. */
function indexFrameOffset(file: Uint8Array): number {
  const view = new DataView(file.buffer, file.byteOffset, file.byteLength);
  // The seek table is the last frame: its footer says how many entries of 12 bytes it has.
  const entries = view.getUint32(file.byteLength - 9, true);
  const tableStart = file.byteLength - (8 + entries * 12 + 9);
  // The index frame's entry is the table's last; its compressed size is the frame's size.
  const indexSize = view.getUint32(tableStart + 8 + (entries - 1) * 12, true);
  return tableStart - indexSize;
}

for (const mode of ["push", "pull"] as const) {
  qemuTest(
    `incremental ${mode}: a failed incremental (closed pipe, full disk, SIGINT) leaves no archive and the previous checkpoint; the next one is right`,
    async () => {
      // Random data, so re-encoding the changed extents at level 19 takes seconds.
      const size = 48 * MiB;
      await withVm([{ id: "vda", size, data: [[0, randomBytes(size, 12)]] }], async (vm, dir) => {
        const before = await vm.nodes();
        const a = await backup(vm, mode, ["-o", `${dir}/a.vma.zst`, "--level", "1"]);
        assert.equal(a.code, 0, a.stderr);
        const checkpoint = `vmabackup-${a.result.uuid}`;
        // A cluster in every extent (58 clusters each): each one is written again.
        const dirty: Dirty = new Map();
        const ops: GuestOp[] = [];
        for (let at = 0; at < size; at += 3 * MiB) {
          await vm.write("vda", at + 65536, 65536, 0x80 + at / MiB);
          ops.push({ id: "vda", offset: at + 65536, length: 65536, pattern: 0 });
        }
        dirty.set("vda", new Set(ops.map((op) => op.offset / CLUSTER)));
        const slow = ["--base", `${dir}/a.vma.zst`, "--level", "19"];
        const command = [
          Deno.execPath(),
          "run",
          ...PERMISSIONS,
          "cli.ts",
          "backup",
          "--qmp",
          vm.toolQmp,
          "--mode",
          mode,
          ...slow,
          "-o",
          "-",
          "--compress",
          "zstd",
        ].join(" ");
        for (const [script, message] of failingSinks(command)) {
          const { code, stderr } = await shell(script);
          assert.equal(code, 4, stderr);
          assert.match(stderr, message);
          await assertOneCheckpoint(vm, checkpoint, 1);
          assert.deepEqual(await vm.nodes(), before);
        }
        // SIGINT while QEMU sends (push, slowed down), and while the archive is made.
        const interrupts = mode === "push" ? [["--speed", "65536"], []] : [[]];
        for (const extra of interrupts) {
          const out = `${dir}/x.vma.zst`;
          const child = spawnCli(
            [
              "backup",
              "--qmp",
              vm.toolQmp,
              "--mode",
              mode,
              ...slow,
              ...extra,
              "-o",
              out,
              "--progress",
              "json",
            ],
            { permissions: PERMISSIONS },
          );
          await child.stdin.close();
          const lines = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
          let seen = await readUntil(lines, '"event":"snapshot"');
          await new Promise((resolve) => setTimeout(resolve, 700));
          child.kill("SIGINT");
          seen = await readUntil(lines, undefined, seen);
          const { code } = await child.status;
          assert.equal(code, 130, seen);
          assert.match(seen, /error: interrupted by SIGINT/);
          assert.ok(!(await exists(out)) && !(await exists(`${out}.partial`)), "no archive");
          await assertOneCheckpoint(vm, checkpoint, 1);
          assert.deepEqual(await vm.nodes(), before);
        }
        // The next one starts from the same checkpoint: every change since a.
        const files: [string, string] = [`${dir}/a.vma.zst`, `${dir}/b.vma.zst`];
        const b = await assertIncremental(vm, mode, files, dirtyBytes(vm, dirty, true), "b");
        await assertVerifies(`${dir}/b.vma.zst`);
        await assertOneCheckpoint(vm, `vmabackup-${b.result.uuid}`, 1);
        assert.deepEqual(await vm.nodes(), before);
        assert.equal(await vm.status(), "running");
      });
    },
  );
}

qemuTest(
  "incremental push and pull of a VM started as Proxmox VE 9 does (throttle filters; push with an iothread)",
  async () => {
    for (const mode of ["push", "pull"] as const) {
      // Pull mode refuses a throttle filter in an iothread (see live_backup_test.ts).
      await withVm(
        [
          {
            id: "scsi0",
            bus: "scsi",
            throttle: true,
            size: 16 * MiB,
            data: diskContent(16 * MiB, 8),
          },
          { id: "efidisk0", bus: "pflash", throttle: true, format: "raw", size: 540672 },
        ],
        async (vm, dir) => {
          const before = await vm.nodes();
          const a = await backup(vm, mode, ["-o", `${dir}/a.vma.zst`]);
          assert.equal(a.code, 0, a.stderr);
          // The checkpoints are on the format nodes below the filters.
          const bitmaps = await vm.bitmaps();
          assert.ok(
            ![...bitmaps.keys()].some((node) => node.startsWith("drive-")),
            [...bitmaps].join(),
          );
          await assertOneCheckpoint(vm, `vmabackup-${a.result.uuid}`, 2);
          const dirty: Dirty = new Map();
          await guestWrites(vm, 8, 77, dirty, []);
          const files: [string, string] = [`${dir}/a.vma.zst`, `${dir}/b.vma.zst`];
          const b = await assertIncremental(
            vm,
            mode,
            files,
            dirtyBytes(vm, dirty, true),
            `${mode}: b`,
          );
          await assertOneCheckpoint(vm, `vmabackup-${b.result.uuid}`, 2);
          assert.deepEqual(await vm.nodes(), before);
          assert.equal(await vm.status(), "running");
        },
        { iothread: mode === "push" },
      );
    }
  },
);

qemuTest(
  "examples/incremental_backup.ts: a full, then an incremental that restores on its own",
  async () => {
    await withVm(chainDisks(), async (vm, dir) => {
      const before = await vm.nodes();
      const example = new URL("../examples/incremental_backup.ts", import.meta.url).pathname;
      const run = async (...args: string[]) => {
        const result = await new Deno.Command(Deno.execPath(), {
          args: ["run", ...PERMISSIONS, example, vm.toolQmp, ...args],
          env: { NO_COLOR: "1" },
        }).output();
        assert.equal(result.code, 0, new TextDecoder().decode(result.stderr));
        return new TextDecoder().decode(result.stdout);
      };
      assert.match(
        await run(`${dir}/a.vma.zst`),
        /a\.vma\.zst: full backup of drive-vda, drive-vdb/,
      );
      const a = await IndexedArchive.open(await fileRangeReader(`${dir}/a.vma.zst`));
      a.close();
      await assertOneCheckpoint(vm, `vmabackup-${a.index.uuid}`, 2);
      await vm.write("vda", 5 * MiB, 3 * CLUSTER, 0x61);
      await vm.writeZeroes("vdb", 2 * MiB, CLUSTER);
      const snapshot = snapshotOf(vm);
      assert.match(
        await run(`${dir}/b.vma.zst`, `${dir}/a.vma.zst`),
        /b\.vma\.zst: incremental backup of drive-vda, drive-vdb/,
      );
      assertSameDisks(await restore(`${dir}/b.vma.zst`), snapshot, "b");
      await assertVerifies(`${dir}/b.vma.zst`);
      const b = await IndexedArchive.open(await fileRangeReader(`${dir}/b.vma.zst`));
      b.close();
      assert.equal(b.index.base?.uuid, a.index.uuid);
      await assertOneCheckpoint(vm, `vmabackup-${b.index.uuid}`, 2);
      assert.deepEqual(await vm.nodes(), before);
    });
  },
);
