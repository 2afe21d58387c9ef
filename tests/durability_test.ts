// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Outputs survive a power loss: the order of the system calls that make them final, seen
 * with `strace` (Debian package `strace`): data flushed (`fdatasync`), then one `rename`,
 * then the directory flushed (`fsync`); `--force` never renames the old output aside.
 */
import assert from "node:assert/strict";
import { CLI, hasProgram, withTempDir } from "./_cli.ts";
import { randomBytes } from "./_utils.ts";

const STRACE = await hasProgram("strace");

/** `Deno.test` for tests that need strace: skipped without it, failing under CI=true. */
function straceTest(name: string, fn: () => Promise<void>): void {
  const ci = Deno.env.get("CI") === "true";
  if (!STRACE && !ci) {
    Deno.test({ name: `${name} (skipped: strace is not installed)`, ignore: true, fn });
    return;
  }
  Deno.test(name, async () => {
    if (!STRACE) throw new Error("strace is required under CI=true (apt-get install strace)");
    await fn();
  });
}

/** One traced call: `fdatasync`/`fsync` with the path of its fd, or `rename` from → to. */
interface Call {
  call: string;
  paths: string[];
}

/** Runs the CLI under strace; the calls that touch `dir`, in order. */
async function traced(args: string[], dir: string): Promise<Call[]> {
  const log = `${dir}/strace.log`;
  const { code, stderr } = await new Deno.Command("strace", {
    args: [
      "-f",
      "-y",
      "-qq",
      "-e",
      "trace=fsync,fdatasync,rename,renameat,renameat2",
      "-o",
      log,
      Deno.execPath(),
      "run",
      "--allow-read",
      "--allow-write",
      CLI,
      ...args,
    ],
    env: { NO_COLOR: "1" },
    stdout: "null",
  }).output();
  assert.equal(code, 0, new TextDecoder().decode(stderr));
  const calls: Call[] = [];
  for (const line of (await Deno.readTextFile(log)).split("\n")) {
    const match = line.match(/^\d+\s+(\w+)\((.*)\)\s+= 0$/);
    if (match === null || !line.includes(dir)) continue;
    const paths = [...match[2]!.matchAll(/<([^>]*)>|"([^"]*)"/g)].map((m) => m[1] ?? m[2]!);
    calls.push({ call: match[1]!.replace(/^renameat2?$/, "rename"), paths });
  }
  await Deno.remove(log);
  return calls;
}

function indexOf(calls: Call[], call: string, ...paths: string[]): number {
  const at = calls.findIndex((c) => c.call === call && paths.every((p, i) => c.paths[i] === p));
  assert.ok(at >= 0, `no ${call}(${paths.join(", ")}) in:\n${describe(calls)}`);
  return at;
}

/** `file` was flushed at least twice (behind its writes), the last time before `from` → `to`. */
function assertFlushedBehind(calls: Call[], file: string, from: string, to: string): void {
  const syncs = calls.flatMap((c, i) => c.call === "fdatasync" && c.paths[0] === file ? [i] : []);
  assert.ok(syncs.length >= 2, `a flush behind the writes, and the last:\n${describe(calls)}`);
  assert.ok(syncs.at(-1)! < indexOf(calls, "rename", from, to), describe(calls));
}

function describe(calls: Call[]): string {
  return calls.map((c) => `${c.call}(${c.paths.join(", ")})`).join("\n");
}

async function disk(dir: string): Promise<string> {
  await Deno.writeFile(`${dir}/d.raw`, randomBytes(300_000, 5));
  await Deno.writeTextFile(`${dir}/qemu-server.conf`, "cores: 1\n");
  return `${dir}/d.raw`;
}

for (const force of [false, true]) {
  straceTest(
    `backup${
      force ? " --force" : ""
    }: fdatasync of OUT.partial, one rename, fsync of the directory`,
    async () => {
      await withTempDir(async (dir) => {
        const out = `${dir}/vm.vma.zst`;
        if (force) await Deno.writeTextFile(out, "the last good backup");
        const args = [
          "backup",
          "--disk",
          await disk(dir),
          "-o",
          out,
          ...(force ? ["--force"] : []),
        ];
        const calls = await traced(args, dir);
        const sync = indexOf(calls, "fdatasync", `${out}.partial`);
        const rename = indexOf(calls, "rename", `${out}.partial`, out);
        const dirSync = indexOf(calls, "fsync", dir);
        assert.ok(sync < rename && rename < dirSync, describe(calls));
        const renames = calls.filter((c) => c.call === "rename");
        assert.equal(
          renames.length,
          1,
          `the old archive is never renamed aside:\n${describe(calls)}`,
        );
      });
    },
  );
}

straceTest(
  "backup to .vma: the sidecar index is flushed with the archive and renamed first",
  async () => {
    await withTempDir(async (dir) => {
      const out = `${dir}/vm.vma`;
      const index = `${out}.idx`;
      await Deno.writeTextFile(out, "the last good backup");
      await Deno.writeTextFile(index, "its index");
      const calls = await traced(["backup", "--disk", await disk(dir), "-o", out, "--force"], dir);
      const syncs = [
        indexOf(calls, "fdatasync", `${index}.partial`),
        indexOf(calls, "fdatasync", `${out}.partial`),
      ];
      const renameIndex = indexOf(calls, "rename", `${index}.partial`, index);
      const renameArchive = indexOf(calls, "rename", `${out}.partial`, out);
      const dirSync = calls.findLastIndex((c) => c.call === "fsync" && c.paths[0] === dir);
      assert.ok(Math.max(...syncs) < renameIndex, describe(calls));
      assert.ok(renameIndex < renameArchive && renameArchive < dirSync, describe(calls));
      assert.equal(calls.filter((c) => c.call === "rename").length, 2, describe(calls));
    });
  },
);

straceTest(
  "extract: every file flushed, then the directory, one rename, then its parent",
  async () => {
    await withTempDir(async (dir) => {
      const archive = `${dir}/vm.vma`;
      const backup = ["backup", "--disk", await disk(dir), "--config", `${dir}/qemu-server.conf`];
      await traced([...backup, "-o", archive], dir);
      const target = `${dir}/restored`;
      const calls = await traced(["extract", archive, target], dir);
      const partial = `${target}.partial`;
      const rename = indexOf(calls, "rename", partial, target);
      for (const name of ["disk-drive-scsi0.raw", "qemu-server.conf"]) {
        assert.ok(indexOf(calls, "fdatasync", `${partial}/${name}`) < rename, describe(calls));
      }
      assert.ok(indexOf(calls, "fsync", partial) < rename, describe(calls));
      assert.ok(calls.findLastIndex((c) => c.call === "fsync" && c.paths[0] === dir) > rename);
    });
  },
);

straceTest(
  "extract --force onto a directory: each file renamed over its namesake, no rename aside",
  async () => {
    await withTempDir(async (dir) => {
      const archive = `${dir}/vm.vma`;
      const backup = ["backup", "--disk", await disk(dir), "--config", `${dir}/qemu-server.conf`];
      await traced([...backup, "-o", archive], dir);
      const target = `${dir}/restored`;
      await Deno.mkdir(target);
      await Deno.writeTextFile(`${target}/disk-drive-scsi0.raw`, "old disk");
      await Deno.writeTextFile(`${target}/stale.conf`, "old");
      const calls = await traced(["extract", archive, target, "--force"], dir);
      const partial = `${target}.partial`;
      const names = ["disk-drive-scsi0.raw", "qemu-server.conf"];
      const renames = names.map((name) =>
        indexOf(calls, "rename", `${partial}/${name}`, `${target}/${name}`)
      );
      for (const name of names) {
        assert.ok(indexOf(calls, "fdatasync", `${partial}/${name}`) < Math.min(...renames));
      }
      assert.ok(indexOf(calls, "fsync", target) > Math.max(...renames), describe(calls));
      assert.equal(calls.filter((c) => c.call === "rename").length, 2, describe(calls));
      const names_ = await Array.fromAsync(Deno.readDir(target), (entry) => entry.name);
      assert.deepEqual(names_.sort(), names);
      assert.equal((await Deno.stat(`${target}/disk-drive-scsi0.raw`)).size, 300_000);
      assert.ok(!await Deno.stat(partial).then(() => true, () => false), "no partial is left");
    });
  },
);

straceTest(
  "backup of 160 MiB: OUT.partial is flushed while it is written, and once more before the rename",
  async () => {
    await withTempDir(async (dir) => {
      // Plain .vma stores the data as it is: 160 MiB of output, over two flush intervals.
      await Deno.writeFile(`${dir}/d.raw`, new Uint8Array(160 << 20).fill(7));
      const out = `${dir}/vm.vma`;
      const calls = await traced(
        ["backup", "--disk", `${dir}/d.raw`, "-o", out, "--no-index"],
        dir,
      );
      assertFlushedBehind(calls, `${out}.partial`, `${out}.partial`, out);
      assert.equal((await Deno.stat(out)).size > 160 << 20, true);
    });
  },
);

straceTest(
  "extract of 160 MiB: each disk file is flushed while it is written, and once more before the rename",
  async () => {
    await withTempDir(async (dir) => {
      await Deno.writeFile(`${dir}/d.raw`, new Uint8Array(160 << 20).fill(7));
      const archive = `${dir}/vm.vma`;
      await traced(["backup", "--disk", `${dir}/d.raw`, "-o", archive, "--no-index"], dir);
      const target = `${dir}/restored`;
      const calls = await traced(["extract", archive, target], dir);
      const file = `${target}.partial/disk-drive-scsi0.raw`;
      assertFlushedBehind(calls, file, `${target}.partial`, target);
      assert.equal((await Deno.stat(`${target}/disk-drive-scsi0.raw`)).size, 160 << 20);
    });
  },
);
