// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Live restore on real QEMU 7.2 (TCG, small disks): the VM starts paused on an overlay of
 * the served backup, runs at once, and its disk is copied back by block-stream or
 * blockdev-mirror while the test writes through the guest device (HMP qemu-io). The final
 * image must hold the archive with those writes; the NBD node and the serving must be gone.
 */
import assert from "node:assert/strict";
import {
  archiveOutput,
  fileRangeReader,
  IndexedArchive,
  LiveRestoreError,
  rawDiskSource,
  startLiveRestore,
  VmaWriterStream,
  ZeroFilterStream,
} from "../mod.ts";
import { cli, spawnCli, tool } from "./_cli.ts";
import { connectQmp, diskContent, firstDifference, qemuTest, run, startPausedVm } from "./_qemu.ts";

const MiB = 1 << 20;
const SIZE = 24 * MiB;

interface Fixture {
  dir: string;
  archive: string;
  content: Uint8Array;
}

/** A backup of a 24 MiB disk `drive-vda` with data, a fill pattern and zero runs. */
async function withArchive(fn: (fixture: Fixture) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vmabackup-live-restore-" });
  try {
    const content = new Uint8Array(SIZE);
    for (const [offset, bytes] of diskContent(SIZE, 77)) content.set(bytes, offset);
    await Deno.writeFile(`${dir}/disk.raw`, content);
    const archive = `${dir}/vm.vma.zst`;
    await Deno.writeFile(
      archive,
      rawDiskSource(`${dir}/disk.raw`, { name: "drive-vda" })
        .pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
        .pipeThrough(archiveOutput({ compression: "zstd" })),
    );
    await Deno.remove(`${dir}/disk.raw`);
    await fn({ dir, archive, content });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function readImage(path: string, format: "qcow2" | "raw"): Promise<Uint8Array> {
  if (format === "raw") return await Deno.readFile(path);
  const raw = `${path}.check.raw`;
  await run("qemu-img", ["convert", "-q", "-f", format, "-O", "raw", path, raw]);
  const bytes = await Deno.readFile(raw);
  await Deno.remove(raw);
  return bytes;
}

function assertSameDisk(actual: Uint8Array, expected: Uint8Array): void {
  assert.equal(actual.byteLength, expected.byteLength);
  const at = firstDifference(actual, expected);
  assert.equal(at, -1, `the restored disk differs at byte ${at}`);
}

async function socketGone(path: string): Promise<boolean> {
  return await Deno.lstat(path).then(() => false, () => true);
}

qemuTest(
  "live restore (CLI, stream into qcow2): the VM runs at once, guest writes during the copy are kept, the NBD node and the serving are gone",
  async () => {
    await withArchive(async ({ dir, archive, content }) => {
      const target = `${dir}/vm-disk.qcow2`;
      // QEMU first: with wait=on it waits for the tool before it opens its disk.
      await Deno.mkdir(`${dir}/work`);
      const vm = startPausedVm([{ id: "vda", image: target, style: "drive" }]);
      const child = spawnCli([
        "restore",
        "--live",
        archive,
        "--qmp",
        vm.toolQmp,
        "--drive",
        `vda=${target}`,
        "--speed",
        `${8 * MiB}`,
        "--work-dir",
        `${dir}/work`,
      ], { permissions: ["-A"] });
      const stderr = new Response(child.stderr).text();
      try {
        const expected = content.slice();
        // Wait until the copy runs, then write through the guest device, ahead of the copy
        // and behind it.
        const qmp = await vm.connect();
        let jobs: { offset: number; len: number }[] = [];
        for (let i = 0; jobs.length === 0; i++) {
          assert.ok(i < 400, "the copy job never started");
          jobs = await qmp.execute("query-block-jobs") as typeof jobs;
          if (jobs.length === 0) await new Promise((resolve) => setTimeout(resolve, 25));
        }
        assert.equal(await vm.status(), "running", "the VM runs while its disk is copied");
        for (const [offset, length, pattern] of [[20 * MiB, 65536, 0xa1], [4096, 8192, 0xb2]]) {
          await vm.write("vda", offset!, length!, pattern!);
          expected.fill(pattern!, offset!, offset! + length!);
        }
        const [during] = await qmp.execute("query-block-jobs") as typeof jobs;
        assert.ok(
          during !== undefined && during.offset < during.len,
          "the writes came during the copy",
        );

        const status = await child.status;
        const log = await stderr;
        assert.equal(status.code, 0, log);
        assert.match(log, /drive-vda: start the VM on .*vm-disk\.qcow2 \(qcow2\)/);
        assert.match(log, /drive-vda: copying \(block-stream into .*\); the VM is running/);
        assert.match(log, /drive-vda: done, 24\.0 MiB copied/);
        assert.match(log, /the backup is no longer served/);
        const nodes = await vm.nodes();
        assert.deepEqual(nodes.filter((node) => node.driver === "nbd"), [], "no NBD node is left");
        assert.equal(await vm.status(), "running");
        assert.ok(await socketGone(`${dir}/work/nbd.sock`), "the NBD socket is removed");
        const info = JSON.parse(new TextDecoder().decode(
          await run("qemu-img", ["info", "-U", "--output=json", target]),
        ));
        assert.equal(info["backing-filename"], undefined, "the backing link left the qcow2 header");
        await vm.stop();
        assertSameDisk(await readImage(target, "qcow2"), expected);
      } finally {
        await vm.stop();
        try {
          child.kill("SIGKILL");
        } catch { /* exited */ }
        await child.status;
        await stderr;
      }
    });
  },
);

qemuTest(
  "live restore (library, mirror to raw): writes before and after READY are kept, the VM moves to the target, the overlay and NBD nodes are deleted",
  async () => {
    await withArchive(async ({ dir, archive: path, content }) => {
      const archive = await IndexedArchive.open(await fileRangeReader(path));
      const target = `${dir}/vm-disk.raw`;
      const restore = await startLiveRestore({
        archive,
        drives: [{ disk: "vda", target }],
      });
      const [drive] = restore.drives;
      assert.equal(drive!.mode, "mirror");
      const socket = (restore.server.address as { path: string }).path;
      const vm = startPausedVm([{
        id: "vda",
        image: drive!.overlay,
        style: "blockdev-nbd",
        nbd: { socket, export: "drive-vda" },
      }]);
      try {
        const qmp = await connectQmp(vm.toolQmp);
        const expected = content.slice();
        const phases: string[] = [];
        const result = await restore.complete(qmp, {
          speed: 8 * MiB,
          pollMs: 100,
          async onProgress([progress]) {
            if (phases.at(-1) === progress!.phase) return;
            phases.push(progress!.phase);
            if (progress!.phase === "done") return;
            // While copying: ahead of the copy; once READY: anywhere, before the switch.
            const [offset, pattern] = progress!.phase === "copying"
              ? [22 * MiB, 0xc3]
              : [MiB, 0xd4];
            await vm.write("vda", offset, 65536, pattern);
            expected.fill(pattern, offset, offset + 65536);
          },
        });
        qmp.close();
        assert.deepEqual(phases, ["copying", "ready", "done"]);
        assert.deepEqual(result.warnings, []);
        const nodes = await vm.nodes();
        assert.deepEqual(
          nodes.filter((node) => node.driver === "nbd" || node.file === drive!.overlay),
          [],
          `the NBD and overlay nodes are deleted: ${JSON.stringify(nodes)}`,
        );
        assert.ok(
          nodes.some((node) => node.name === result.drives[0]!.node && node.driver === "raw"),
        );
        assert.ok(await socketGone(socket), "the serving stopped");
        await assert.rejects(Deno.lstat(drive!.overlay), Deno.errors.NotFound);
        await vm.stop();
        assertSameDisk(await readImage(target, "raw"), expected);
        const { blocks } = await Deno.stat(target);
        assert.ok(
          (blocks ?? 0) * 512 < 20 * MiB,
          `the raw target is sparse: ${(blocks ?? 0) * 512}`,
        );
      } finally {
        await vm.stop();
        await restore.close();
        archive.close();
      }
    });
  },
);

qemuTest(
  "live restore fails safe: a backup cut while the copy runs stops the VM and says so",
  async () => {
    await withArchive(async ({ dir, archive: path }) => {
      const archive = await IndexedArchive.open(await fileRangeReader(path), { cacheBytes: 0 });
      const target = `${dir}/vm-disk.qcow2`;
      const restore = await startLiveRestore({ archive, drives: [{ disk: "drive-vda", target }] });
      const vm = startPausedVm([{ id: "vda", image: target, style: "blockdev" }]);
      try {
        const qmp = await connectQmp(vm.toolQmp);
        let cut = false;
        const error = await restore.complete(qmp, {
          speed: 4 * MiB,
          pollMs: 100,
          async onProgress() {
            if (cut) return;
            cut = true;
            const { size } = await Deno.stat(path);
            await Deno.truncate(path, Math.floor(size / 4)); // the rest of the backup is lost
          },
        }).then(() => undefined, (error) => error);
        qmp.close();
        assert.ok(error instanceof LiveRestoreError, `a LiveRestoreError, not ${error}`);
        assert.equal(error.vmStopped, true);
        assert.match(error.message, /^live restore failed: QEMU's copy of drive-vda failed: /);
        assert.match(error.message, /the VM is stopped: its disks are not fully restored/);
        assert.match(error.message, /do not continue it/);
        assert.equal(await vm.status(), "paused", "the VM does not run on a half-copied disk");
        const jobs = await (await vm.connect()).execute("query-block-jobs") as unknown[];
        assert.deepEqual(jobs, [], "no job is left running");
        await restore.close();
        assert.ok(await Deno.stat(target), "the overlay the stopped VM uses is kept");
      } finally {
        await vm.stop();
        await restore.close();
        archive.close();
      }
    });
  },
);

qemuTest("live restore (CLI): SIGTERM during the copy stops the VM, exit code 143", async () => {
  await withArchive(async ({ dir, archive }) => {
    const target = `${dir}/vm-disk.raw`;
    const child = spawnCli([
      "restore",
      "--live",
      archive,
      "--qmp",
      `${dir}/tool.qmp.link`,
      "--drive",
      `drive-vda=${target}`,
      "--speed",
      `${2 * MiB}`,
      "--work-dir",
      dir,
    ], { permissions: ["-A"] });
    const stderr = new Response(child.stderr).text();
    // The CLI first; it prints the overlay to start the VM on and waits for the monitor.
    const overlay = `${dir}/drive-vda.overlay.qcow2`;
    for (let i = 0; !(await Deno.stat(overlay).then(() => true, () => false)); i++) {
      assert.ok(i < 400, "the CLI never created the overlay");
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    const vm = startPausedVm([{ id: "vda", image: overlay, style: "drive" }]);
    await Deno.symlink(vm.toolQmp, `${dir}/tool.qmp.link`);
    try {
      const qmp = await vm.connect();
      for (let i = 0; (await qmp.execute("query-block-jobs") as unknown[]).length === 0; i++) {
        assert.ok(i < 400, "the copy job never started");
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
      child.kill("SIGTERM");
      const status = await child.status;
      const log = await stderr;
      assert.equal(status.code, 143, log);
      assert.match(log, /error: live restore interrupted by SIGTERM; the VM is stopped: /);
      assert.equal(await vm.status(), "paused");
      assert.deepEqual(await qmp.execute("query-block-jobs"), []);
      await assert.rejects(
        Deno.lstat(target),
        Deno.errors.NotFound,
        "the partial target is removed",
      );
    } finally {
      await vm.stop();
      try {
        child.kill("SIGKILL");
      } catch { /* exited */ }
      await child.status;
      await stderr;
    }
  });
});

qemuTest("examples/live_restore.ts boots a VM on its backup and restores it", async () => {
  await withArchive(async ({ dir, archive, content }) => {
    const target = `${dir}/example.qcow2`;
    const vm = startPausedVm([{ id: "vda", image: target, style: "drive" }]);
    try {
      const script = new URL("../examples/live_restore.ts", import.meta.url).pathname;
      const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", script, archive, vm.toolQmp, `drive-vda=${target}`],
        env: { NO_COLOR: "1" },
      }).output();
      const out = new TextDecoder().decode(stdout);
      assert.equal(code, 0, new TextDecoder().decode(stderr));
      assert.match(out, new RegExp(`^drive-vda: start the VM on ${target}$`, "m"));
      assert.match(out, new RegExp(`^drive-vda: done ${SIZE}/${SIZE}$`, "m"));
      assert.match(out, new RegExp(`^drive-vda: restored to ${target}$`, "m"));
      assert.equal(await vm.status(), "running");
      await vm.stop();
      assertSameDisk(await readImage(target, "qcow2"), content);
    } finally {
      await vm.stop();
    }
  });
});

Deno.test("restore: usage errors, an unknown disk (7), an existing target (6), an archive that is not seekable (9), nothing left behind", async () => {
  await withArchive(async ({ dir, archive }) => {
    const run = (args: string[]) => cli(["restore", ...args], { permissions: ["-A"] });
    const noLive = await run([archive, "--qmp", "x", "--drive", "vda=t.qcow2"]);
    assert.equal(noLive.code, 2);
    assert.match(
      noLive.stderr,
      /restore needs --live \(for an offline restore use 'cli\.ts extract'/,
    );
    const badDrive = await run(["--live", archive, "--qmp", "x", "--drive", "t.qcow2"]);
    assert.equal(badDrive.code, 2);
    assert.match(badDrive.stderr, /--drive must be NAME=TARGET/);
    const unknown = await run(["--live", archive, "--qmp", "x", "--drive", `vdz=${dir}/t.qcow2`]);
    assert.equal(unknown.code, 7);
    assert.match(unknown.stderr, /no disk named 'vdz' \(it has drive-vda\)/);
    await Deno.writeTextFile(`${dir}/exists.qcow2`, "keep me");
    const exists = await run([
      "--live",
      archive,
      "--qmp",
      "x",
      "--drive",
      `vda=${dir}/exists.qcow2`,
    ]);
    assert.equal(exists.code, 6, exists.stderr);
    assert.equal(await Deno.readTextFile(`${dir}/exists.qcow2`), "keep me");
    const stream = await run([
      "--live",
      archive,
      "--qmp",
      "x",
      "--drive",
      `vda=${dir}/t.raw`,
      "--mode",
      "stream",
    ]);
    assert.equal(stream.code, 2);
    assert.match(stream.stderr, /block-stream needs a \.qcow2 target/);
    const plain = `${dir}/plain.vma.zst`;
    await tool("zstd", ["-q", "-dc", archive, "-o", `${dir}/plain.vma`]);
    await tool("zstd", ["-q", `${dir}/plain.vma`, "-o", plain]);
    const notSeekable = await run(["--live", plain, "--qmp", "x", "--drive", `vda=${dir}/t.qcow2`]);
    assert.equal(notSeekable.code, 9);
    assert.match(notSeekable.stderr, /cannot be read at random.*convert/);
    const names = await Array.fromAsync(Deno.readDir(dir), (entry) => entry.name);
    assert.deepEqual(names.sort(), ["exists.qcow2", "plain.vma", "plain.vma.zst", "vm.vma.zst"]);
  });
});
