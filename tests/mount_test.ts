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
// debugfs and mkfs.ext4 are in /usr/sbin, which a user's PATH may lack.
const SBIN = "/usr/sbin:/sbin";
Deno.env.set("PATH", `${Deno.env.get("PATH") ?? ""}:${SBIN}`);

/** Known files: text, a binary of several MiB, a nested directory. */
const FILES: Record<string, Uint8Array> = {
  "etc/hostname": new TextEncoder().encode("vm-100\n"),
  "etc/fstab": new TextEncoder().encode("UUID=1234 / ext4 defaults 0 1\n"),
  "srv/data/blob.bin": randomBytes(3 * MiB + 1234, 99),
  "srv/data/empty": new Uint8Array(0),
  "README.txt": new TextEncoder().encode("restored through NBD and FUSE\n".repeat(1000)),
};

/** A DOS partition table with one Linux partition of `sectors` from `first`. */
function mbr(first: number, sectors: number): Uint8Array {
  const sector = new Uint8Array(512);
  const view = new DataView(sector.buffer);
  sector[0x1be + 4] = 0x83; // Linux
  view.setUint32(0x1be + 8, first, true);
  view.setUint32(0x1be + 12, sectors, true);
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

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
    "mount: ext4 disks made with mkfs.ext4 -d (whole disk, and in an MBR partition), backed up and served, show their files through nbdfuse and debugfs",
    ["nbdfuse", "fusermount3", "debugfs", "mkfs.ext4"],
    async () => {
      assert.ok(FUSE, "/dev/fuse is required under CI=true");
      const dir = await Deno.makeTempDir({ prefix: "vmabackup-mount-" });
      const fuses: { mnt: string; child: Deno.ChildProcess }[] = [];
      let serve: Deno.ChildProcess | undefined;
      try {
        for (const [path, bytes] of Object.entries(FILES)) {
          await Deno.mkdir(`${dir}/tree/${path.replace(/\/?[^/]*$/, "")}`, { recursive: true });
          await Deno.writeFile(`${dir}/tree/${path}`, bytes);
        }
        // scsi0: the file system on the whole disk; scsi1: in partition 1, from 1 MiB.
        await tool("mkfs.ext4", ["-q", "-F", "-d", `${dir}/tree`, `${dir}/whole.raw`, "32M"]);
        await tool("mkfs.ext4", [
          "-q",
          "-F",
          "-d",
          `${dir}/tree`,
          "-E",
          `offset=${MiB}`,
          `${dir}/parted.raw`,
          "30M",
        ]);
        await Deno.truncate(`${dir}/parted.raw`, 32 * MiB);
        const file = await Deno.open(`${dir}/parted.raw`, { write: true });
        await file.write(mbr(MiB / 512, 30 * MiB / 512));
        file.close();
        const backup = await cli([
          "backup",
          "--disk",
          `drive-scsi0=${dir}/whole.raw`,
          "--disk",
          `drive-scsi1=${dir}/parted.raw`,
          "-o",
          `${dir}/vm.vma.zst`,
        ]);
        assert.equal(backup.code, 0, backup.stderr);
        for (const raw of ["whole.raw", "parted.raw"]) await Deno.remove(`${dir}/${raw}`);

        // 1. serve the backup; 2. nbdfuse shows each disk as a file; 3. debugfs reads it.
        serve = spawnCli(["serve", `${dir}/vm.vma.zst`, "--socket", `${dir}/nbd.sock`], {
          permissions: ["--allow-read", "--allow-write", "--allow-net"],
        });
        const output = serve.stdout.pipeThrough(new TextDecoderStream()).values();
        const uris = (await output.next()).value!.trim().split("\n");
        await output.return?.();
        assert.equal(uris.length, 2);
        const images: string[] = [];
        for (const [i, uri] of uris.entries()) {
          const mnt = `${dir}/mnt${i}`;
          await Deno.mkdir(mnt);
          const child = new Deno.Command("nbdfuse", {
            args: ["-r", "-P", `${dir}/nbdfuse${i}.pid`, `${mnt}/disk.raw`, uri],
            stdout: "null",
            stderr: "piped",
          }).spawn();
          fuses.push({ mnt, child });
          await waitFor(
            () => Deno.stat(`${dir}/nbdfuse${i}.pid`).then(() => true, () => false),
            "nbdfuse",
          );
          assert.equal((await Deno.stat(`${mnt}/disk.raw`)).size, 32 * MiB);
          images.push(`${mnt}/disk.raw`);
        }
        // The partition's start, from the partition table, in bytes: debugfs IMAGE?offset=N.
        const table = new Uint8Array(512);
        using disk1 = await Deno.open(images[1]!);
        await disk1.read(table);
        const start = new DataView(table.buffer).getUint32(0x1be + 8, true) * 512;
        assert.equal(start, MiB);
        for (const image of [images[0]!, `${images[1]!}?offset=${start}`]) {
          const listing = new TextDecoder().decode(
            await tool("debugfs", ["-R", "ls -p /srv/data", image]),
          );
          const names = listing.trim().split("\n").map((line) => line.split("/")[5]);
          assert.deepEqual(names.sort(), [".", "..", "blob.bin", "empty"], image);
          for (const [path, bytes] of Object.entries(FILES)) {
            const copy = `${dir}/out-${path.replaceAll("/", "_")}`;
            await tool("debugfs", ["-R", `dump /${path} ${copy}`, image]);
            assert.deepEqual(await Deno.readFile(copy), bytes, `${image}: ${path}`);
            await Deno.remove(copy);
          }
          const cat = await tool("debugfs", ["-R", "cat /etc/hostname", image]);
          assert.equal(new TextDecoder().decode(cat), "vm-100\n");
        }
      } finally {
        const codes: string[] = [];
        for (const { mnt, child } of fuses) {
          await new Deno.Command("fusermount3", { args: ["-u", mnt] }).output();
          const [status, stderr] = await Promise.all([
            child.status,
            new Response(child.stderr).text(),
          ]);
          if (status.code !== 0) codes.push(`nbdfuse exited ${status.code}: ${stderr}`);
        }
        if (serve !== undefined) {
          serve.kill("SIGTERM");
          const [status, stderr] = await Promise.all([
            serve.status,
            new Response(serve.stderr).text(),
          ]);
          if (status.code !== 0) codes.push(`serve exited ${status.code}: ${stderr}`);
        }
        await Deno.remove(dir, { recursive: true });
        assert.deepEqual(codes, [], "nbdfuse and serve exit cleanly");
      }
    },
  );
}
