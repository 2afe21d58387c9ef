// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The qemu-nbd children of image backups and restores never outlive the CLI, even when it
 * is killed with SIGKILL (no cleanup code runs then): they exit, leave no temporary
 * directory, and do not hold the CLI's stdin, so a producer piping into `extract -` gets
 * EPIPE instead of hanging.
 */
import assert from "node:assert/strict";
import { spawnCli, withTempDir } from "./_cli.ts";
import { convertImage, qemuTest } from "./_qemu.ts";
import { randomBytes } from "./_utils.ts";

const MiB = 1 << 20;
const PERMISSIONS = [
  "--allow-read",
  "--allow-write",
  "--allow-run=qemu-nbd,qemu-img",
  "--allow-net",
];

/** The qemu-nbd child of process `parent`, waiting up to 10 s for it to appear. */
async function qemuNbdChild(parent: number): Promise<{ pid: number; dir: string }> {
  for (let i = 0; i < 200; i++) {
    for await (const entry of Deno.readDir("/proc")) {
      if (!/^\d+$/.test(entry.name)) continue;
      const stat = await Deno.readTextFile(`/proc/${entry.name}/stat`).catch(() => "");
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (!stat.includes("(qemu-nbd)") || Number(fields[1]) !== parent) continue;
      const args = (await Deno.readTextFile(`/proc/${entry.name}/cmdline`)).split("\0");
      const socket = args.find((arg) => arg.startsWith("--socket="))!.slice("--socket=".length);
      return { pid: Number(entry.name), dir: socket.slice(0, socket.lastIndexOf("/")) };
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`no qemu-nbd child of ${parent} appeared`);
}

/** True while `pid` runs (a zombie, which nobody may reap here, counts as gone). */
async function running(pid: number): Promise<boolean> {
  const stat = await Deno.readTextFile(`/proc/${pid}/stat`).catch(() => undefined);
  return stat !== undefined &&
    stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
}

async function waitGone(pid: number): Promise<boolean> {
  for (let i = 0; i < 100 && await running(pid); i++) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return !await running(pid);
}

const exists = (path: string) => Deno.lstat(path).then(() => true, () => false);

/**
 * Waits until the CLI is connected to its qemu-nbd: it removes the socket directory then.
 * (A SIGKILL before that, while qemu-nbd starts, is the one moment the README says is open.)
 */
async function connected(nbd: { dir: string }): Promise<boolean> {
  for (let i = 0; i < 200 && await exists(nbd.dir); i++) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return !await exists(nbd.dir);
}

qemuTest(
  "SIGKILL of backup (qcow2 input) takes its qemu-nbd along and leaves no temp dir",
  async () => {
    await withTempDir(async (dir) => {
      // Incompressible data at zstd level 19: slow enough to be killed in the middle.
      await Deno.writeFile(`${dir}/big.raw`, randomBytes(128 * MiB, 11));
      await convertImage(`${dir}/big.raw`, "qcow2", `${dir}/big.qcow2`);
      const args = [
        "backup",
        "--disk",
        `${dir}/big.qcow2`,
        "-o",
        `${dir}/big.vma.zst`,
        "--level",
        "19",
      ];
      const child = spawnCli(args, { permissions: PERMISSIONS });
      try {
        const nbd = await qemuNbdChild(child.pid);
        assert.ok(await connected(nbd), `${nbd.dir} is still there once connected`);
        await new Promise((resolve) => setTimeout(resolve, 300)); // reading is under way
        assert.ok(await running(nbd.pid));
        child.kill("SIGKILL");
        await child.output();
        assert.ok(await waitGone(nbd.pid), `qemu-nbd ${nbd.pid} still runs after its parent died`);
        assert.ok(!await exists(nbd.dir), `${nbd.dir} was left behind`);
      } finally {
        try {
          child.kill("SIGKILL");
        } catch { /* already gone */ }
      }
    });
  },
);

qemuTest(
  "SIGKILL of extract - --format qcow2: qemu-nbd exits and the producer gets EPIPE",
  async () => {
    await withTempDir(async (dir) => {
      await Deno.writeFile(`${dir}/d.raw`, randomBytes(32 * MiB, 12));
      const backup = spawnCli(["backup", "--disk", `${dir}/d.raw`, "-o", `${dir}/d.vma`]);
      await backup.stdin.close();
      assert.equal((await backup.output()).code, 0);
      const archive = await Deno.readFile(`${dir}/d.vma`);
      const child = spawnCli(["extract", "-", `${dir}/out`, "--format", "qcow2"], {
        permissions: PERMISSIONS,
      });
      const producer = child.stdin.getWriter();
      try {
        // The header and a few MiB: the restore starts and qemu-nbd serves the new image.
        await producer.write(archive.subarray(0, 4 * MiB));
        const nbd = await qemuNbdChild(child.pid);
        assert.ok(await connected(nbd), `${nbd.dir} is still there once connected`);
        child.kill("SIGKILL");
        await child.status;
        assert.ok(await waitGone(nbd.pid), `qemu-nbd ${nbd.pid} still runs after its parent died`);
        assert.ok(!await exists(nbd.dir), `${nbd.dir} was left behind`);
        // Nobody reads the pipe any more: writing fails at once instead of blocking forever.
        const rest = producer.write(archive.subarray(4 * MiB)).then(() => "written", (e) => e);
        const timeout = new Promise((resolve) => setTimeout(() => resolve("hung"), 5000));
        const outcome = await Promise.race([rest, timeout]);
        assert.ok(outcome instanceof Error, `the producer's write ${outcome}`);
      } finally {
        try {
          child.kill("SIGKILL");
        } catch { /* already gone */ }
        await child.stdout.cancel().catch(() => {});
        await child.stderr.cancel().catch(() => {});
      }
    });
  },
);
