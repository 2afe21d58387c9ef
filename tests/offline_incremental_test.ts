// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Incremental backups of qcow2 images (`backup --disk IMAGE --base PREVIOUS`): checkpoints
 * are persistent dirty bitmaps in the images, added with `qemu-img bitmap` and read through
 * `qemu-nbd --bitmap`. The guest's writes come from `qemu-io`, QEMU's own block layer, which
 * loads and stores the bitmaps as a VM does (and leaves them `in-use` when killed).
 */
import assert from "node:assert/strict";
import { cli, shell, toolTest, withTempDir } from "./_cli.ts";
import { randomBytes } from "./_utils.ts";

const MiB = 2 ** 20;
const CLUSTER = 65536;
const PERMISSIONS = [
  "--allow-read",
  "--allow-write",
  "--allow-run=qemu-nbd,qemu-img",
  "--allow-net",
];
const TOOLS = ["qemu-img", "qemu-nbd", "qemu-io"];

async function run(program: string, args: string[]): Promise<string> {
  const { code, stdout, stderr } = await new Deno.Command(program, { args }).output();
  const text = new TextDecoder();
  if (code !== 0) throw new Error(`${program} ${args.join(" ")}: ${text.decode(stderr)}`);
  return text.decode(stdout);
}

/** The image's checkpoints (its `vmabackup-*` bitmaps). */
async function checkpoints(image: string): Promise<string[]> {
  const info = JSON.parse(await run("qemu-img", ["info", "--output=json", image]));
  return (info["format-specific"]?.data?.bitmaps ?? [])
    .map((bitmap: { name: string }) => bitmap.name)
    .filter((name: string) => name.startsWith("vmabackup-"));
}

/** What the image holds. */
async function content(dir: string, image: string): Promise<Uint8Array> {
  await run("qemu-img", ["convert", "-U", "-O", "raw", image, `${dir}/content.raw`]);
  return await Deno.readFile(`${dir}/content.raw`);
}

/** A disk's bytes in an archive. */
async function restored(archive: string, disk: string): Promise<Uint8Array> {
  const result = await cli(["extract", archive, "--stdout", disk]);
  assert.equal(result.code, 0, result.stderr);
  return result.stdout;
}

interface Run {
  code: number;
  stderr: string;
  result: Record<string, unknown>;
}

async function backup(args: string[]): Promise<Run> {
  const result = await cli(["backup", "--json", ...args], { permissions: PERMISSIONS });
  const text = new TextDecoder().decode(result.stdout);
  return { code: result.code, stderr: result.stderr, result: text ? JSON.parse(text) : {} };
}

/** Guest writes through QEMU's block layer: data at each offset, and a write of zeros. */
async function guestWrites(image: string, offsets: number[], pattern: number, zero?: number) {
  const commands = offsets.flatMap((at) => ["-c", `write -P ${pattern} ${at} 4k`]);
  if (zero !== undefined) commands.push("-c", `write -z ${zero} 128k`);
  await run("qemu-io", ["-f", "qcow2", ...commands, image]);
}

await toolTest(
  "offline incremental: a chain of a full and 2 incrementals of two qcow2 images; each archive restores to its images",
  TOOLS,
  async () => {
    await withTempDir(async (dir) => {
      const images = [`${dir}/d0.qcow2`, `${dir}/d1.qcow2`];
      const sizes = [8 * MiB, 4 * MiB + 3 * 4096];
      for (const [i, image] of images.entries()) {
        await Deno.writeFile(`${dir}/init.raw`, randomBytes(sizes[i]!, 40 + i));
        await run("qemu-img", ["convert", "-O", "qcow2", `${dir}/init.raw`, image]);
      }
      const disks = images.flatMap((image, i) => ["--disk", `scsi${i}=${image}`]);
      const a = await backup([...disks, "--checkpoint", "-o", `${dir}/a.vma.zst`]);
      assert.equal(a.code, 0, a.stderr);
      assert.equal(a.result.kind, "full");
      for (const image of images) assert.deepEqual(await checkpoints(image), [a.result.checkpoint]);
      let base = `${dir}/a.vma.zst`;
      for (const [round, writes] of [[0, 3 * MiB + 100], [2 * MiB, 5 * CLUSTER]].entries()) {
        await guestWrites(images[0]!, writes, 0x30 + round, 6 * MiB);
        await guestWrites(images[1]!, [4 * MiB + 4096], 0x40 + round); // the odd last cluster
        const dirtyBytes = 2 * CLUSTER + 2 * CLUSTER + (3 * 4096);
        const out = `${dir}/${round}.vma.zst`;
        const b = await backup([...disks, "--base", base, "-o", out]);
        assert.equal(b.code, 0, b.stderr);
        assert.equal(b.result.kind, "incremental", b.stderr);
        assert.equal(b.result.readBytes, dirtyBytes, "only the dirty clusters were read");
        for (const [i, image] of images.entries()) {
          assert.deepEqual(await restored(out, `drive-scsi${i}`), await content(dir, image));
          assert.deepEqual(await checkpoints(image), [b.result.checkpoint], "rotated");
        }
        const verify = await cli(["verify", "--require-data", out]);
        assert.equal(verify.code, 0, verify.stderr);
        base = out;
      }
    });
  },
);

await toolTest(
  "offline incremental: every reason to distrust a checkpoint gives a full, in one line; a failed one keeps the previous checkpoint",
  TOOLS,
  async () => {
    await withTempDir(async (dir) => {
      const image = `${dir}/d.qcow2`;
      await Deno.writeFile(`${dir}/init.raw`, randomBytes(4 * MiB, 50));
      await run("qemu-img", ["convert", "-O", "qcow2", `${dir}/init.raw`, image]);
      const disk = ["--disk", `scsi0=${image}`];
      let base = `${dir}/a.vma.zst`;
      let previous = await backup([...disk, "--checkpoint", "-o", base]);
      assert.equal(previous.code, 0, previous.stderr);
      let n = 0;
      const assertFull = async (args: string[], reason: RegExp) => {
        const out = `${dir}/full-${n++}.vma.zst`;
        const full = await backup([...args, "--base", base, "-o", out]);
        assert.equal(full.code, 0, full.stderr);
        assert.equal(full.result.kind, "full", full.stderr);
        const notes = full.stderr.split("\n").filter((line) => line.startsWith("note: a full"));
        assert.equal(notes.length, 1, full.stderr);
        assert.match(notes[0]!, reason);
        assert.deepEqual(await restored(out, "drive-scsi0"), await content(dir, image));
        [base, previous] = [out, full];
      };
      // The checkpoint removed behind our back.
      await run("qemu-img", ["bitmap", "--remove", image, String(previous.result.checkpoint)]);
      await assertFull(disk, /has no checkpoint vmabackup-/);
      // QEMU killed with the image open: the bitmap is left in-use.
      const holder = new Deno.Command("qemu-io", {
        args: ["-f", "qcow2", image],
        stdin: "piped",
        stdout: "null",
        stderr: "null",
      }).spawn();
      const writer = holder.stdin.getWriter();
      await writer.write(new TextEncoder().encode("write -P 7 0 4k\n"));
      await new Promise((resolve) => setTimeout(resolve, 500));
      holder.kill("SIGKILL");
      await holder.status;
      await writer.close().catch(() => {});
      await assertFull(disk, /inconsistent: QEMU stopped without saving it/);
      // The disk grown.
      await run("qemu-img", ["resize", "-f", "qcow2", image, `${5 * MiB}`]);
      await assertFull(disk, /was resized/);
      // A raw disk beside it.
      await Deno.writeFile(`${dir}/r.raw`, new Uint8Array(CLUSTER));
      await assertFull([...disk, "--disk", `scsi1=${dir}/r.raw`], /raw image: only qcow2 images/);
      // Back to one disk: the base has two now, so first a full of one.
      await assertFull(disk, /drive-scsi1 of the base archive is not backed up now/);
      assert.deepEqual(await checkpoints(image), [previous.result.checkpoint]);
      // A failed incremental (a full disk): no archive, the previous checkpoint only.
      await guestWrites(image, [MiB], 0x51);
      const command = [
        Deno.execPath(),
        "run",
        ...PERMISSIONS,
        "cli.ts",
        "backup",
        ...disk,
        "--base",
        base,
        "-o",
        "-",
        "--compress",
        "zstd",
        "> /dev/full",
      ].join(" ");
      const failed = await shell(command, "sh");
      assert.equal(failed.code, 4, failed.stderr);
      assert.deepEqual(await checkpoints(image), [previous.result.checkpoint]);
      // --no-checkpoint: an incremental that leaves the checkpoint as it is.
      const kept = await backup([
        ...disk,
        "--base",
        base,
        "--no-checkpoint",
        "-o",
        `${dir}/k.vma.zst`,
      ]);
      assert.equal(kept.code, 0, kept.stderr);
      assert.equal(kept.result.kind, "incremental", kept.stderr);
      assert.equal(kept.result.readBytes, CLUSTER);
      assert.deepEqual(await checkpoints(image), [previous.result.checkpoint]);
      // An image in use (locked by a running qemu-io) is refused, in one line, unchanged.
      const user = new Deno.Command("qemu-io", {
        args: ["-f", "qcow2", image],
        stdin: "piped",
        stdout: "null",
        stderr: "null",
      }).spawn();
      try {
        await new Promise((resolve) => setTimeout(resolve, 500));
        const locked = await backup([...disk, "--base", base, "-o", `${dir}/l.vma.zst`]);
        assert.equal(locked.code, 1, locked.stderr);
        const errors = locked.stderr.split("\n").filter((line) => line.startsWith("error:"));
        assert.equal(errors.length, 1, locked.stderr);
        assert.match(errors[0]!, /lock/);
      } finally {
        await user.stdin.close();
        await user.status;
      }
      assert.deepEqual(await checkpoints(image), [previous.result.checkpoint]);
      // And the next one is a right incremental of the last base.
      const next = await backup([...disk, "--base", base, "-o", `${dir}/n.vma.zst`]);
      assert.equal(next.code, 0, next.stderr);
      assert.equal(next.result.kind, "incremental", next.stderr);
      assert.deepEqual(
        await restored(`${dir}/n.vma.zst`, "drive-scsi0"),
        await content(dir, image),
      );
      assert.deepEqual(await checkpoints(image), [next.result.checkpoint]);
    });
  },
);

Deno.test("offline incremental: --checkpoint is for --disk images, and not with --no-checkpoint", async () => {
  for (
    const [args, message] of [
      [["--disk", "d.qcow2", "--checkpoint", "--no-checkpoint"], /cannot be combined/],
      [["--qmp", "/nonexistent.sock", "--checkpoint"], /--checkpoint is for --disk images/],
    ] as const
  ) {
    const result = await cli(["backup", ...args, "-o", "x.vma.zst"]);
    assert.equal(result.code, 2, result.stderr);
    assert.match(result.stderr, message);
  }
});
