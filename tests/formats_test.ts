// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Format independence through qemu-nbd: every image format QEMU writes backs up and restores
 * bit-exact, holes are not read, restores into qcow2 compare identical, and qemu-nbd children
 * never outlive the command.
 */
import assert from "node:assert/strict";
import { NbdClient } from "../lib/protocols/nbd_client.ts";
import { nbdDiskSource } from "../lib/sources/nbd_disk.ts";
import { serveImage } from "../lib/qemu/qemu_nbd.ts";
import { type VmaRecord, VmaWriterStream, ZeroFilterStream } from "../mod.ts";
import { cli, spawnCli, withTempDir } from "./_cli.ts";
import { convertImage, diskContent, firstDifference, qemuTest } from "./_qemu.ts";
import { randomBytes, restoreInMemory } from "./_utils.ts";

const MiB = 2 ** 20;
const FORMATS = ["qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed", "raw"] as const;
const PERMISSIONS = [
  "--allow-read",
  "--allow-write",
  "--allow-run=qemu-nbd,qemu-img",
  "--allow-net",
  "--allow-ffi",
];

async function run(program: string, ...args: string[]): Promise<string> {
  const { code, stdout, stderr } = await new Deno.Command(program, { args }).output();
  const text = new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr);
  if (code !== 0) throw new Error(`${program} ${args.join(" ")}: ${text}`);
  return text;
}

/** A raw reference image: data pieces, zero runs and holes, size not a multiple of 64 KiB. */
async function reference(dir: string, size = 40 * MiB + 7 * 4096): Promise<Uint8Array> {
  const bytes = new Uint8Array(size);
  for (const [offset, piece] of diskContent(Math.min(24 * MiB, size), 3)) bytes.set(piece, offset);
  bytes.fill(0xab, size - 3 * 4096, size);
  await Deno.writeFile(`${dir}/reference.raw`, bytes);
  return bytes;
}

async function convert(dir: string, format: string): Promise<string> {
  const path = `${dir}/disk.${format}`;
  await convertImage(`${dir}/reference.raw`, format, path);
  return path;
}

/** qemu-nbd processes serving an image in `dir` (tests in parallel run their own). */
async function qemuNbdProcesses(dir: string): Promise<number> {
  const { stdout } = await new Deno.Command("pgrep", { args: ["-f", `qemu-nbd.*${dir}/`] })
    .output();
  return new TextDecoder().decode(stdout).trim().split("\n").filter((line) => line !== "").length;
}

qemuTest("formats: every format round-trips bit-exact in one archive that mixes them", async () => {
  await withTempDir(async (dir) => {
    const bytes = await reference(dir);
    const disks = [];
    for (const format of FORMATS) disks.push("--disk", `${format}=${await convert(dir, format)}`);
    const backup = await cli(["backup", ...disks, "-o", `${dir}/all.vma.zst`], {
      permissions: PERMISSIONS,
    });
    assert.equal(backup.code, 0, backup.stderr);
    const extract = await cli(["extract", `${dir}/all.vma.zst`, `${dir}/out`], {
      permissions: PERMISSIONS,
    });
    assert.equal(extract.code, 0, extract.stderr);
    for (const format of FORMATS) {
      const restored = await Deno.readFile(`${dir}/out/disk-drive-${format}.raw`);
      assert.equal(firstDifference(restored, bytes), -1, `${format} round-trips`);
    }
    assert.equal(await qemuNbdProcesses(dir), 0, "no qemu-nbd is left running");
  });
});

qemuTest(
  "formats: extract --format qcow2 (and the others) gives images qemu-img compare finds identical",
  async () => {
    await withTempDir(async (dir) => {
      await reference(dir);
      const source = await convert(dir, "qcow2");
      assert.equal(
        (await cli(["backup", "--disk", source, "-o", `${dir}/a.vma`], {
          permissions: PERMISSIONS,
        })).code,
        0,
      );
      const dataBytes = async (target: string, format: string) => {
        const args = ["extract", `${dir}/a.vma`, target, "--format", format, "--json"];
        const extract = await cli(args, { permissions: PERMISSIONS });
        assert.equal(extract.code, 0, extract.stderr);
        return JSON.parse(extract.text).disks[0].dataBytes;
      };
      // The JSON report counts the data written, as for raw files.
      const rawData = await dataBytes(`${dir}/to-raw`, "raw");
      assert.ok(rawData > 0);
      for (const format of ["qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed"]) {
        assert.equal(await dataBytes(`${dir}/to-${format}`, format), rawData, format);
        const image = `${dir}/to-${format}/disk-drive-scsi0.${format}`;
        assert.match(await run("qemu-img", "info", image), new RegExp(`file format: ${format}`));
        await run("qemu-img", "compare", "-q", image, source); // exits 1 when they differ
      }
      // The qcow2 restore stays thin: holes are not written.
      const info = JSON.parse(
        await run("qemu-img", "info", "--output=json", `${dir}/to-qcow2/disk-drive-scsi0.qcow2`),
      );
      assert.ok(info["actual-size"] < 20 * MiB, `allocated ${info["actual-size"]} bytes`);
      assert.equal(await qemuNbdProcesses(dir), 0);
    });
  },
);

qemuTest("formats: the NBD source reads only allocated data (bytes on the socket)", async () => {
  await withTempDir(async (dir) => {
    const size = 512 * MiB;
    await run("qemu-img", "create", "-q", "-f", "qcow2", `${dir}/sparse.qcow2`, `${size}`);
    await run(
      "qemu-io",
      "-f",
      "qcow2",
      "-c",
      "write -P 0x11 0 1M",
      "-c",
      "write -z 100M 8M",
      "-c",
      "write -P 0x22 300M 2M",
      `${dir}/sparse.qcow2`,
    );
    const served = await serveImage(
      `${dir}/sparse.qcow2`,
      { format: "qcow2" },
      (uri, conn) => NbdClient.connect(uri, { conn, metaContexts: ["base:allocation"] }),
    );
    try {
      let client: NbdClient | undefined;
      const records: VmaRecord[] = [];
      const archive = await new Response(
        nbdDiskSource(served.connection, { name: "d", onConnect: (c) => (client = c) })
          .pipeThrough(
            new TransformStream({ transform: (r, c) => (records.push(r), c.enqueue(r)) }),
          )
          .pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream()),
      ).bytes();
      const received = client!.bytesReceived;
      assert.ok(
        received < 4 * MiB,
        `${received} bytes came over the socket for a ${size}-byte disk`,
      );
      assert.ok(received >= 3 * MiB, "the 3 MiB of data were read");
      assert.ok(
        records.some((r) => r.type === "zeros" && r.count > 1000),
        "holes came as zero runs",
      );
      const restored = (await restoreInMemory(archive)).get("d")!;
      assert.ok(restored.subarray(0, MiB).every((b) => b === 0x11));
      assert.ok(restored.subarray(300 * MiB, 302 * MiB).every((b) => b === 0x22));
      assert.ok(restored.subarray(MiB, 300 * MiB).every((b) => b === 0));
    } finally {
      await served.stop();
    }
  });
});

qemuTest("formats: bad images and missing tools get one clear line", async () => {
  await withTempDir(async (dir) => {
    const corrupt = new Uint8Array(1 * MiB);
    corrupt.set([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3, 0xff, 0xff]); // qcow2 magic, garbage header
    await Deno.writeFile(`${dir}/corrupt.qcow2`, corrupt);
    const bad = await cli(["backup", "--disk", `${dir}/corrupt.qcow2`, "-o", `${dir}/x.vma`], {
      permissions: PERMISSIONS,
    });
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /^error: Cannot serve .*corrupt\.qcow2 as qcow2: .+\n$/);
    assert.ok(!(await Deno.lstat(`${dir}/x.vma.partial`).then(() => true, () => false)));

    await reference(dir, 4 * MiB);
    const qcow2 = await convert(dir, "qcow2");
    const missing = await cli(["backup", "--disk", qcow2, "-o", `${dir}/y.vma`], {
      permissions: PERMISSIONS,
      env: { PATH: "/nonexistent" },
    });
    assert.equal(missing.code, 4);
    // Deno itself first notes that it cannot resolve the --allow-run binaries; ours is last.
    assert.equal(
      missing.stderr.trimEnd().split("\n").at(-1),
      "error: Cannot run qemu-nbd: It is not installed (Debian package qemu-utils)",
    );
    const noRun = await cli(["backup", "--disk", qcow2, "-o", `${dir}/z.vma`]);
    assert.equal(noRun.code, 5);
    assert.match(noRun.stderr, /--allow-run/);
    assert.equal(await qemuNbdProcesses(dir), 0);
  });
});

qemuTest(
  "formats: SIGINT during an image backup stops qemu-nbd and removes the partial file",
  async () => {
    await withTempDir(async (dir) => {
      // Incompressible data at zstd level 19: slow enough to interrupt.
      await Deno.writeFile(`${dir}/big.raw`, randomBytes(256 * MiB, 5));
      await convertImage(`${dir}/big.raw`, "qcow2", `${dir}/big.qcow2`);
      const child = spawnCli(
        ["backup", "--disk", `${dir}/big.qcow2`, "-o", `${dir}/big.vma.zst`, "--level", "19"],
        { permissions: PERMISSIONS },
      );
      await child.stdin.close();
      for (let i = 0; i < 200 && await qemuNbdProcesses(dir) === 0; i++) {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      assert.equal(await qemuNbdProcesses(dir), 1, "qemu-nbd serves the image");
      await new Promise((resolve) => setTimeout(resolve, 300));
      child.kill("SIGINT");
      const result = await child.output();
      assert.equal(result.code, 130);
      assert.equal(await qemuNbdProcesses(dir), 0, "qemu-nbd was stopped");
      assert.ok(!(await Deno.lstat(`${dir}/big.vma.zst.partial`).then(() => true, () => false)));
    });
  },
);
