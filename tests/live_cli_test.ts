// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `backup --qmp` as users run it, push and pull, and the faults that must leave the VM as it
 * was: Ctrl-C, a closed pipe, a full disk. After each, the block graph is the original one,
 * the VM runs, its disks take writes, the partial archive is gone and the exit code is not 0.
 */
import assert from "node:assert/strict";
import { cli, failingSinks, readUntil, shell, spawnCli, withTempDir } from "./_cli.ts";
import { diskContent, firstDifference, qemuTest, startVm, type TestVm } from "./_qemu.ts";
import { randomBytes } from "./_utils.ts";

const MiB = 2 ** 20;
const PERMISSIONS = [
  "--allow-read",
  "--allow-write",
  "--allow-net",
  "--allow-run=qemu-nbd,qemu-img",
];

function disks(size = 32 * MiB) {
  return [{ id: "scsi0", size, data: diskContent(size, 4) }];
}

/** A VM whose 128 MiB disk is random data: slow to compress at level 19, easy to interrupt. */
function bigDisk() {
  return [{
    id: "scsi0",
    size: 128 * MiB,
    data: [[0, randomBytes(128 * MiB, 8)]] as [number, Uint8Array][],
  }];
}

const SLOW = ["--level", "19"];

async function assertVmUntouched(vm: TestVm, before: string[]) {
  assert.deepEqual(await vm.nodes(), before, "the block graph is the original one");
  assert.equal(await vm.status(), "running");
  await vm.write("scsi0", 65536, 4096, 0x77);
  const contents = await vm.stop();
  assert.equal(vm.difference("scsi0", contents.get("scsi0")!), -1, "the disk is intact");
}

for (const mode of ["push", "pull"] as const) {
  qemuTest(`cli backup --qmp --mode ${mode}: a consistent archive of a running VM`, async () => {
    const vm = await startVm(disks());
    await withTempDir(async (dir) => {
      try {
        const before = await vm.nodes();
        const snapshot = vm.model.get("scsi0")!.slice();
        const fleece = `${dir}/fleece`;
        await Deno.mkdir(fleece);
        const extra = mode === "pull"
          ? ["--fleece-dir", fleece, "--discard-read"]
          : ["--speed", `${16 * MiB}`];
        const child = spawnCli(
          [
            "backup",
            "--qmp",
            vm.toolQmp,
            "--mode",
            mode,
            "-o",
            `${dir}/vm.vma.zst`,
            "--progress",
            "json",
            ...extra,
          ],
          { permissions: PERMISSIONS },
        );
        await child.stdin.close();
        const lines = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
        const seen = await readUntil(lines, '"event":"snapshot"');
        // The guest writes after the snapshot point: none of this may reach the archive.
        for (let i = 0; i < 40; i++) {
          await vm.write("scsi0", (i * 7 % 500) * 65536, 65536, 0xa0 + i);
        }
        const status = await child.status;
        assert.equal(status.code, 0, seen);
        const extract = await cli(["extract", `${dir}/vm.vma.zst`, `${dir}/out`]);
        assert.equal(extract.code, 0, extract.stderr);
        const restored = await Deno.readFile(`${dir}/out/disk-drive-scsi0.raw`);
        assert.equal(firstDifference(restored, snapshot), -1, "the archive is the snapshot");
        assert.deepEqual([...Deno.readDirSync(fleece)], [], "the fleece images are removed");
        await assertVmUntouched(vm, before);
      } finally {
        await vm.stop().catch(() => {});
      }
    });
  });

  qemuTest(
    `cli backup --qmp --mode ${mode}: Ctrl-C cancels, restores the VM, removes the partial file`,
    async () => {
      const vm = await startVm(bigDisk());
      await withTempDir(async (dir) => {
        try {
          const before = await vm.nodes();
          const out = `${dir}/vm.vma.zst`;
          const child = spawnCli([
            "backup",
            "--qmp",
            vm.toolQmp,
            "--mode",
            mode,
            "-o",
            out,
            ...SLOW,
          ], {
            permissions: PERMISSIONS,
          });
          await child.stdin.close();
          for (let i = 0; i < 200 && !(await exists(`${out}.partial`)); i++) await sleep(50);
          await sleep(500);
          child.kill("SIGINT");
          const result = await child.output();
          assert.equal(result.code, 130, new TextDecoder().decode(result.stderr));
          assert.match(new TextDecoder().decode(result.stderr), /error: interrupted by SIGINT/);
          assert.ok(!(await exists(`${out}.partial`)) && !(await exists(out)));
          await assertVmUntouched(vm, before);
        } finally {
          await vm.stop().catch(() => {});
        }
      });
    },
  );

  qemuTest(
    `cli backup --qmp --mode ${mode}: a closed pipe and a full disk fail cleanly`,
    async () => {
      const vm = await startVm(bigDisk());
      try {
        const before = await vm.nodes();
        const deno = Deno.execPath();
        const command = `${deno} run ${
          PERMISSIONS.join(" ")
        } cli.ts backup --qmp ${vm.toolQmp} --mode ${mode} -o - --compress zstd ${SLOW.join(" ")}`;
        for (const [script, message] of failingSinks(command)) {
          const { code, stderr } = await shell(script);
          assert.equal(code, 4, stderr);
          assert.match(stderr, message);
          assert.deepEqual(await vm.nodes(), before, "the graph is restored after each failure");
          assert.equal(await vm.status(), "running");
        }
        await assertVmUntouched(vm, before);
      } finally {
        await vm.stop().catch(() => {});
      }
    },
  );
}

for (const mode of ["push", "pull"] as const) {
  qemuTest(
    `cli backup --qmp --mode ${mode}: Ctrl-C while the pipe stalls exits at once, the VM unharmed`,
    async () => {
      const vm = await startVm(bigDisk());
      try {
        const before = await vm.nodes();
        const child = spawnCli(
          ["backup", "--qmp", vm.toolQmp, "--mode", mode, "-o", "-", "--compress", "none"],
          { permissions: PERMISSIONS },
        );
        await child.stdin.close();
        const stderr = new Response(child.stderr).text();
        // A reader that takes 1 MiB and then stops reading, the pipe left open (a stalled ssh).
        const stdout = child.stdout.getReader();
        for (let got = 0; got < MiB;) got += (await stdout.read()).value?.byteLength ?? MiB;
        // QEMU's monitor must answer within a second all along.
        let slowest = 0;
        let watching = true;
        const watchdog = (async () => {
          while (watching) {
            const started = performance.now();
            await Promise.race([vm.status().catch(() => {}), sleep(5000)]);
            slowest = Math.max(slowest, performance.now() - started);
            await sleep(100);
          }
        })();
        // Pull mode: guest writes do not wait for the backup, so they go on during the stall.
        if (mode === "pull") {
          for (let i = 0; i < 8; i++) await vm.write("scsi0", (64 + i) * MiB, 65536, 0x60 + i);
        }
        await sleep(1500); // the pipeline fills up and waits for the pipe
        const interrupted = performance.now();
        child.kill("SIGINT");
        let timer: ReturnType<typeof setTimeout> | undefined;
        const status = await Promise.race([
          child.status,
          new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), 10_000)),
        ]).finally(() => {
          clearTimeout(timer);
          watching = false;
        });
        const seconds = (performance.now() - interrupted) / 1000;
        await watchdog;
        if (status === null) {
          child.kill("SIGKILL");
          await child.status;
        }
        await stdout.cancel();
        const messages = await stderr;
        assert.ok(status !== null, `the backup did not exit within 10 s of SIGINT: ${messages}`);
        assert.equal(status.code, 130, messages);
        assert.match(messages, /error: interrupted by SIGINT/);
        assert.ok(seconds < 10, `exited ${seconds.toFixed(1)} s after SIGINT`);
        assert.ok(slowest < 1000, `QEMU's monitor answered within ${slowest.toFixed(0)} ms`);
        await assertVmUntouched(vm, before);
      } finally {
        await vm.stop().catch(() => {});
      }
    },
  );
}

qemuTest("cli backup --qmp with a bad flag fails before it touches the VM", async () => {
  const vm = await startVm(disks(16 * MiB));
  await withTempDir(async (dir) => {
    try {
      const before = await vm.nodes();
      const out = `${dir}/vm.vma.zst`;
      const result = await cli(
        ["backup", "--qmp", vm.toolQmp, "-o", out, "--zstd", "bogus"],
        { permissions: PERMISSIONS },
      );
      assert.equal(result.code, 2, result.stderr);
      assert.match(result.stderr, /--zstd/);
      assert.ok(!(await exists(out)) && !(await exists(`${out}.partial`)));
      await assertVmUntouched(vm, before);
    } finally {
      await vm.stop().catch(() => {});
    }
  });
});

qemuTest("cli backup --qmp: too many drives or configs fail before the VM is touched", async () => {
  // 255 drives: one more than an archive holds (null-co drives cost nothing).
  const extraArgs = Array.from(
    { length: 254 },
    (_, i) => ["-drive", `if=none,id=null${i},driver=null-co,size=1M`],
  ).flat();
  const vm = await startVm(disks(16 * MiB), { extraArgs });
  await withTempDir(async (dir) => {
    try {
      const before = await vm.nodes();
      const out = `${dir}/vm.vma`;
      const many = await cli(["backup", "--qmp", vm.toolQmp, "-o", out], {
        permissions: PERMISSIONS,
      });
      assert.equal(many.code, 1, many.stderr);
      assert.match(
        many.stderr,
        /^error: Cannot back up the VM \(nothing was changed\): It has 255 drives, but a VMA archive holds at most 254/,
      );
      // Nine configs of 64 KiB: the header would pass its 512 KiB.
      const configs: string[] = [];
      for (let i = 0; i < 9; i++) {
        await Deno.writeFile(`${dir}/${i}.conf`, new Uint8Array(65535).fill(0x61));
        configs.push("--config", `${dir}/${i}.conf`);
      }
      const big = await cli(
        [
          "backup",
          "--qmp",
          vm.toolQmp,
          "--drive",
          "scsi0",
          "--mode",
          "pull",
          ...configs,
          "-o",
          out,
        ],
        { permissions: PERMISSIONS },
      );
      assert.equal(big.code, 1, big.stderr);
      assert.match(
        big.stderr,
        /nothing was changed.*VMA header: Its size \d+ exceeds 524288 bytes/,
      );
      assert.ok(!(await exists(out)) && !(await exists(`${out}.partial`)));
      // Pull mode pauses the VM for its snapshot point: it never got that far.
      await assert.rejects(
        vm.qmp.waitForEvent((event) => event.event === "STOP", { timeoutMs: 1 }),
        Deno.errors.TimedOut,
      );
      await assertVmUntouched(vm, before);
    } finally {
      await vm.stop().catch(() => {});
    }
  });
});

async function exists(path: string): Promise<boolean> {
  return await Deno.lstat(path).then(() => true, () => false);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

qemuTest("examples/live_backup.ts backs up a running VM in a few lines", async () => {
  const vm = await startVm(disks(16 * MiB));
  await withTempDir(async (dir) => {
    try {
      const snapshot = vm.model.get("scsi0")!.slice();
      const before = await vm.nodes();
      const example = new URL("../examples/live_backup.ts", import.meta.url).pathname;
      const run = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "--allow-read",
          "--allow-write",
          "--allow-net",
          example,
          vm.toolQmp,
          `${dir}/vm.vma.zst`,
        ],
        env: { NO_COLOR: "1" },
      }).output();
      assert.equal(run.code, 0, new TextDecoder().decode(run.stderr));
      assert.match(new TextDecoder().decode(run.stdout), /vm\.vma\.zst: drive-scsi0/);
      const out = await cli(["extract", `${dir}/vm.vma.zst`, "--stdout", "scsi0"]);
      assert.equal(firstDifference(out.stdout, snapshot), -1);
      await assertVmUntouched(vm, before);
    } finally {
      await vm.stop().catch(() => {});
    }
  });
});

qemuTest(
  "cli backup --qmp --mode pull: a snapshot broken by a copy that timed out says so in one line",
  async () => {
    // Proxmox's graph: a throttle filter over the disk. Throttling its reads makes QEMU's
    // copy of a cluster the guest overwrites take longer than --cbw-timeout 1.
    const size = 64 * MiB;
    const vm = await startVm([
      { id: "scsi0", bus: "scsi", throttle: true, size, data: diskContent(size, 6) },
    ]);
    try {
      const before = await vm.nodes();
      const child = spawnCli(
        [
          "backup",
          "--qmp",
          vm.toolQmp,
          "--mode",
          "pull",
          "--cbw-timeout",
          "1",
          "-o",
          "-",
          "--compress",
          "none",
        ],
        { permissions: PERMISSIONS },
      );
      await child.stdin.close();
      const stderr = new Response(child.stderr).text();
      const stdout = child.stdout.getReader();
      for (let got = 0; got < MiB;) got += (await stdout.read()).value?.byteLength ?? MiB;
      await sleep(1000); // the reader waits for the pipe: no read of the snapshot in flight
      const limits = (value: number) =>
        vm.qmp.execute("qom-set", {
          path: "/objects/throttle-drive-scsi0",
          property: "limits",
          value: { "bps-read": value },
        });
      await limits(16 * 1024);
      await vm.io("scsi0", "read 40M 64k"); // passes, and fills the bucket for 4 s
      await vm.write("scsi0", 48 * MiB, 65536, 0x99); // its copy waits; after 1 s it goes on
      await limits(0);
      for (;;) if ((await stdout.read()).done) break;
      const { code } = await child.status;
      const messages = await stderr;
      assert.equal(code, 1, messages);
      const lines = messages.trim().split("\n").filter((line) => line.startsWith("error:"));
      assert.equal(lines.length, 1, messages);
      assert.match(lines[0]!, /^error: The snapshot broke: QEMU could not copy the old data/);
      assert.match(lines[0]!, /within 1 s \(--cbw-timeout\)/);
      assert.match(lines[0]!, /the VM was not affected: its writes went through and it is running/);
      // By default the fleece images go to a new directory in /var/tmp (on disk), named,
      // and removed afterwards.
      const fleeceDir = messages.match(
        /note: the fleece images .* go to (\/var\/tmp\/vmabackup-fleece-\w+),/,
      )
        ?.[1];
      assert.ok(fleeceDir !== undefined, messages);
      assert.equal(await exists(fleeceDir), false, `${fleeceDir} is removed`);
      await assertVmUntouched(vm, before);
    } finally {
      await vm.stop().catch(() => {});
    }
  },
);
