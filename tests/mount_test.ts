// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The README's recipe for the files inside a backup, without extracting the disk and
 * without the nbd kernel module: `serve` exports the disk, `nbdfuse` (libnbd-bin) shows it
 * as a file over FUSE, and e2fsprogs' `debugfs` lists and copies files out of it.
 */
import assert from "node:assert/strict";
import { cli, spawnCli, tool, toolTest } from "./_cli.ts";
import { randomBytes } from "./_utils.ts";

const MiB = 1 << 20;
const FUSE = await Deno.stat("/dev/fuse").then((info) => info.isCharDevice === true, () => false);

/** Known files: text, a binary of several MiB, a nested directory. */
const FILES: Record<string, Uint8Array> = {
  "etc/hostname": new TextEncoder().encode("vm-100\n"),
  "etc/fstab": new TextEncoder().encode("UUID=1234 / ext4 defaults 0 1\n"),
  "srv/data/blob.bin": randomBytes(3 * MiB + 1234, 99),
  "srv/data/empty": new Uint8Array(0),
  "README.txt": new TextEncoder().encode("restored through NBD and FUSE\n".repeat(1000)),
};

async function waitFor(condition: () => Promise<boolean>, what: string): Promise<void> {
  for (let i = 0; !(await condition()); i++) {
    assert.ok(i < 400, `timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

if (!FUSE && Deno.env.get("CI") !== "true") {
  Deno.test({
    name: "mount: nbdfuse + debugfs (skipped: /dev/fuse is missing)",
    ignore: true,
    fn() {},
  });
} else {
  await toolTest(
    "mount: an ext4 disk made with mkfs.ext4 -d, backed up and served, shows its files through nbdfuse and debugfs",
    ["nbdfuse", "fusermount3", "debugfs", "mkfs.ext4"],
    async () => {
      assert.ok(FUSE, "/dev/fuse is required under CI=true");
      const dir = await Deno.makeTempDir({ prefix: "vmabackup-mount-" });
      const mnt = `${dir}/mnt`;
      let fuse: Deno.ChildProcess | undefined;
      let serve: Deno.ChildProcess | undefined;
      try {
        for (const [path, bytes] of Object.entries(FILES)) {
          await Deno.mkdir(`${dir}/tree/${path.replace(/\/?[^/]*$/, "")}`, { recursive: true });
          await Deno.writeFile(`${dir}/tree/${path}`, bytes);
        }
        await tool("mkfs.ext4", ["-q", "-F", "-d", `${dir}/tree`, `${dir}/disk.raw`, "32M"]);
        const backup = await cli([
          "backup",
          "--disk",
          `drive-scsi0=${dir}/disk.raw`,
          "-o",
          `${dir}/vm.vma.zst`,
        ]);
        assert.equal(backup.code, 0, backup.stderr);
        await Deno.remove(`${dir}/disk.raw`); // only the backup is left

        // 1. serve the backup; 2. nbdfuse shows the disk as a file; 3. debugfs reads it.
        serve = spawnCli(["serve", `${dir}/vm.vma.zst`, "--socket", `${dir}/nbd.sock`], {
          permissions: ["--allow-read", "--allow-write", "--allow-net"],
        });
        const uris = serve.stdout.pipeThrough(new TextDecoderStream()).values();
        const uri = (await uris.next()).value!.trim();
        await uris.return?.();
        await Deno.mkdir(mnt);
        fuse = new Deno.Command("nbdfuse", {
          args: ["-r", "-P", `${dir}/nbdfuse.pid`, `${mnt}/disk.raw`, uri],
          stdout: "null",
          stderr: "piped",
        }).spawn();
        await waitFor(
          () => Deno.stat(`${dir}/nbdfuse.pid`).then(() => true, () => false),
          "nbdfuse",
        );
        assert.equal((await Deno.stat(`${mnt}/disk.raw`)).size, 32 * MiB);

        const listing = new TextDecoder().decode(
          await tool("debugfs", ["-R", "ls -p /srv/data", `${mnt}/disk.raw`]),
        );
        const names = listing.trim().split("\n").map((line) => line.split("/")[5]);
        assert.deepEqual(names.sort(), [".", "..", "blob.bin", "empty"]);
        for (const [path, bytes] of Object.entries(FILES)) {
          const copy = `${dir}/out-${path.replaceAll("/", "_")}`;
          await tool("debugfs", ["-R", `dump /${path} ${copy}`, `${mnt}/disk.raw`]);
          assert.deepEqual(await Deno.readFile(copy), bytes, path);
        }
        const cat = await tool("debugfs", ["-R", "cat /etc/hostname", `${mnt}/disk.raw`]);
        assert.equal(new TextDecoder().decode(cat), "vm-100\n");
      } finally {
        if (fuse !== undefined) {
          await new Deno.Command("fusermount3", { args: ["-u", mnt] }).output();
          const [status, stderr] = await Promise.all([
            fuse.status,
            new Response(fuse.stderr).text(),
          ]);
          assert.equal(status.code, 0, `nbdfuse exits cleanly once unmounted: ${stderr}`);
        }
        if (serve !== undefined) {
          serve.kill("SIGTERM");
          const [status] = await Promise.all([serve.status, serve.stderr.cancel()]);
          assert.equal(status.code, 0);
        }
        await Deno.remove(dir, { recursive: true });
      }
    },
  );
}
