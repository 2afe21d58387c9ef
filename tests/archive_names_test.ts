// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Names stored in archives, crafted in the test: every archive that `verify` accepts
 * extracts (device files and config files never collide), names that cannot be file names
 * are exit code 3, names with control characters never reach the output raw (a forged
 * `DEV:` line of `vma list` is a security bug: qemu-server parses those lines), and a disk
 * name means the device of exactly that name first.
 */
import assert from "node:assert/strict";
import { md5 } from "../lib/_bytes.ts";
import { CLUSTER_SIZE, type VmaRecord, VmaWriterStream } from "../mod.ts";
import { cli, withTempDir } from "./_cli.ts";
import { assertBytes, randomBytes } from "./_utils.ts";

const encoder = new TextEncoder();

interface Disk {
  name: string;
  bytes: Uint8Array;
}

/** An archive of `disks` and `configs`, written by the writer (which takes these names). */
async function archive(disks: Disk[], configs: Record<string, string> = {}): Promise<Uint8Array> {
  const records: VmaRecord[] = [
    ...Object.entries(configs).map(([name, text]): VmaRecord => ({
      type: "config",
      name,
      data: encoder.encode(text),
    })),
    ...disks.map(({ name, bytes }, i): VmaRecord => ({
      type: "device",
      devId: i + 1,
      name,
      size: bytes.byteLength,
    })),
  ];
  disks.forEach(({ bytes }, i) => {
    for (let cluster = 0; cluster * CLUSTER_SIZE < bytes.byteLength; cluster++) {
      const data = new Uint8Array(CLUSTER_SIZE);
      data.set(bytes.subarray(cluster * CLUSTER_SIZE, (cluster + 1) * CLUSTER_SIZE));
      records.push({ type: "cluster", devId: i + 1, cluster, mask: 0xffff, data });
    }
  });
  return await new Response(ReadableStream.from(records).pipeThrough(new VmaWriterStream()))
    .bytes();
}

/**
 * Replaces `from` by `to` (of the same length in bytes) in the archive header and repairs
 * the header checksum: names the writer refuses, such as ones with a newline.
 */
function patchHeader(bytes: Uint8Array, from: string, to: string): Uint8Array {
  const [a, b] = [encoder.encode(from), encoder.encode(to)];
  assert.equal(a.byteLength, b.byteLength);
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  const headerSize = view.getUint32(56);
  const header = bytes.subarray(0, headerSize);
  const at = header.findIndex((_, i) => a.every((byte, j) => header[i + j] === byte));
  assert.ok(at >= 0, `"${from}" is in the header`);
  const patched = bytes.slice();
  patched.set(b, at);
  patched.fill(0, 32, 48);
  patched.set(md5(patched.subarray(0, headerSize)), 32);
  return patched;
}

const disk = (name: string, seed: number, size = 100_000) => ({
  name,
  bytes: randomBytes(size, seed),
});

async function files(dir: string): Promise<string[]> {
  return (await Array.fromAsync(Deno.readDir(dir), (entry) => entry.name)).sort();
}

Deno.test("names: a config named like a device file extracts beside it, also with --force", async () => {
  await withTempDir(async (dir) => {
    const scsi0 = disk("drive-scsi0", 1);
    const vmstate = disk("vmstate", 2, CLUSTER_SIZE);
    const configs = {
      "qemu-server.conf": "cores: 1\n",
      "disk-drive-scsi0.raw": "a config, not a disk\n",
      "vmstate.bin": "not the VM state\n",
      "config-disk-drive-scsi0.raw": "a third config\n",
    };
    await Deno.writeFile(`${dir}/vm.vma`, await archive([scsi0, vmstate], configs));
    assert.equal((await cli(["verify", `${dir}/vm.vma`])).code, 0);
    for (const force of [[], ["--force"]]) {
      const extract = await cli(["extract", `${dir}/vm.vma`, `${dir}/out`, ...force]);
      assert.equal(extract.code, 0, extract.stderr);
      assert.deepEqual(await files(`${dir}/out`), [
        "config-config-disk-drive-scsi0.raw",
        "config-disk-drive-scsi0.raw",
        "config-vmstate.bin",
        "disk-drive-scsi0.raw",
        "qemu-server.conf",
        "vmstate.bin",
      ]);
      assertBytes(await Deno.readFile(`${dir}/out/disk-drive-scsi0.raw`), scsi0.bytes);
      assertBytes(await Deno.readFile(`${dir}/out/vmstate.bin`), vmstate.bytes);
      const config = await Deno.readTextFile(`${dir}/out/config-disk-drive-scsi0.raw`);
      assert.equal(config, "a config, not a disk\n");
      const third = await Deno.readTextFile(`${dir}/out/config-config-disk-drive-scsi0.raw`);
      assert.equal(third, "a third config\n");
    }
  });
});

Deno.test("names: backup refuses config names that extract would have to rename", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/d.raw`, randomBytes(10_000, 3));
    for (const name of ["disk-drive-scsi0.raw", "vmstate.bin", "config-disk-x"]) {
      await Deno.writeTextFile(`${dir}/${name}`, "cores: 1\n");
      const out = `${dir}/vm.vma`;
      const result = await cli([
        "backup",
        "--disk",
        `${dir}/d.raw`,
        "--config",
        `${dir}/${name}`,
        "-o",
        out,
      ]);
      assert.equal(result.code, 2, result.stderr);
      assert.match(result.stderr, /could be taken for a disk image/);
      assert.ok(!await Deno.lstat(`${out}.partial`).then(() => true, () => false), "no output");
    }
  });
});

Deno.test("names: a name with a newline cannot forge a vma list line (exit 3, escaped)", async () => {
  await withTempDir(async (dir) => {
    const forged = "drive-scsi0\nDEV: dev_id=9 size: 1 devname: forged";
    const base = await archive([disk(forged.replace("\n", "X"), 4)], {
      "qemu-server.conf": "cores: 1\n",
      "notesX[2J": "x\n",
    });
    const hostile = [
      patchHeader(base, forged.replace("\n", "X"), forged),
      patchHeader(base, "notesX[2J", "notes\x1b[2J"),
    ];
    for (const [i, bytes] of hostile.entries()) {
      await Deno.writeFile(`${dir}/hostile-${i}.vma`, bytes);
      for (const command of [["list"], ["list", "--json"], ["verify"], ["config"]]) {
        const result = await cli([...command, `${dir}/hostile-${i}.vma`]);
        assert.equal(result.code, 3, `${command.join(" ")}: ${result.stderr}`);
        assert.ok(!result.text.includes("forged"), `${command.join(" ")} prints no forged line`);
        assert.match(result.stderr, /^error: .*contains control characters/);
        // deno-lint-ignore no-control-regex
        assert.ok(!/[\x00-\x09\x0b-\x1f\x7f]/.test(result.stderr), `raw control: ${result.stderr}`);
        assert.equal(result.stderr.split("\n").length, 2, "one line");
      }
      const extract = await cli(["extract", `${dir}/hostile-${i}.vma`, `${dir}/out-${i}`]);
      assert.equal(extract.code, 3, extract.stderr);
    }
    const list = await cli(["list", `${dir}/hostile-0.vma`]);
    assert.match(list.stderr, /drive-scsi0\\x0aDEV: dev_id=9/);
  });
});

Deno.test("names: a device name too long for a file name is exit 3, and only if it is extracted", async () => {
  await withTempDir(async (dir) => {
    const long = disk(`drive-${"x".repeat(300)}`, 5);
    const other = disk("drive-scsi1", 6);
    await Deno.writeFile(`${dir}/vm.vma`, await archive([long, other]));
    assert.equal((await cli(["verify", `${dir}/vm.vma`])).code, 0);
    const all = await cli(["extract", `${dir}/vm.vma`, `${dir}/all`]);
    assert.equal(all.code, 3, all.stderr);
    assert.match(all.stderr, /too long for a file name \(315 bytes, at most 255\)/);
    assert.ok(!await Deno.lstat(`${dir}/all.partial`).then(() => true, () => false));
    const some = await cli(["extract", `${dir}/vm.vma`, `${dir}/some`, "--disk", "scsi1"]);
    assert.equal(some.code, 0, some.stderr);
    assert.deepEqual(await files(`${dir}/some`), ["disk-drive-scsi1.raw"]);
    const stdout = await cli(["extract", `${dir}/vm.vma`, "--stdout", long.name]);
    assert.equal(stdout.code, 0, "streaming needs no file name");
    assertBytes(stdout.stdout, long.bytes);
  });
});

Deno.test("names: --stdout and --disk prefer the device of exactly the name given", async () => {
  await withTempDir(async (dir) => {
    const prefixed = disk("drive-scsi0", 7);
    const bare = disk("scsi0", 8, 70_000);
    await Deno.writeFile(`${dir}/vm.vma`, await archive([prefixed, bare]));
    const exact = await cli(["extract", `${dir}/vm.vma`, "--stdout", "scsi0"]);
    assert.equal(exact.code, 0, exact.stderr);
    assertBytes(exact.stdout, bare.bytes);
    const full = await cli(["extract", `${dir}/vm.vma`, "--stdout", "drive-scsi0"]);
    assertBytes(full.stdout, prefixed.bytes);
    const one = await cli(["extract", `${dir}/vm.vma`, `${dir}/one`, "--disk", "scsi0"]);
    assert.equal(one.code, 0, one.stderr);
    assert.deepEqual(await files(`${dir}/one`), ["disk-scsi0.raw"]);
    assertBytes(await Deno.readFile(`${dir}/one/disk-scsi0.raw`), bare.bytes);
  });
});
