// Copyright 2026 the vmabackup authors. MIT license.
/** The scripts in examples/ run as users would run them. */
import assert from "node:assert/strict";
import { randomBytes } from "./_utils.ts";

const root = new URL("../", import.meta.url).pathname;

async function run(script: string, ...args: string[]) {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-read", "--allow-write", `${root}examples/${script}`, ...args],
    env: { NO_COLOR: "1" },
  }).output();
  return {
    code,
    stdout: new TextDecoder().decode(stdout),
    stderr: new TextDecoder().decode(stderr),
  };
}

Deno.test("examples: back up a raw image, verify it, and catch a corrupted copy", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const disk = new Uint8Array(3 * 65536 + 4096);
    disk.set(randomBytes(70000, 5), 10000);
    await Deno.writeFile(`${dir}/disk.raw`, disk);

    const backup = await run("backup_raw_image.ts", `${dir}/disk.raw`, `${dir}/backup.vma`);
    assert.equal(backup.code, 0, backup.stderr);
    assert.match(backup.stdout, /backup\.vma: 4 clusters \(2 all zero\), \d+ bytes/);

    const verify = await run("verify_archive.ts", `${dir}/backup.vma`);
    assert.equal(verify.code, 0, verify.stderr);
    assert.match(verify.stdout, new RegExp(`device drive-scsi0: ${disk.byteLength} bytes`));
    assert.match(verify.stdout, /ok: 1 extents, 4 clusters/);

    const archive = await Deno.readFile(`${dir}/backup.vma`);
    await Deno.writeFile(`${dir}/cut.vma`, archive.subarray(0, archive.byteLength - 4096));
    const cut = await run("verify_archive.ts", `${dir}/cut.vma`);
    assert.equal(cut.code, 1);
    assert.match(cut.stderr, /invalid: .*short vma extent/);

    // The backup example refuses to overwrite an existing archive.
    const again = await run("backup_raw_image.ts", `${dir}/disk.raw`, `${dir}/backup.vma`);
    assert.notEqual(again.code, 0);
    assert.match(again.stderr, /AlreadyExists/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("examples: serve an in-memory disk over NBD until SIGTERM", async () => {
  const { NbdClient } = await import("../mod.ts");
  const dir = await Deno.makeTempDir();
  const socket = `${dir}/disk.sock`;
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-write",
      "--allow-net",
      `${root}examples/serve_memory_disk.ts`,
      socket,
    ],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).values();
  try {
    const uri = (await lines.next()).value!.trim();
    assert.equal(uri, `nbd+unix:///drive-scsi0?socket=${socket}`);
    await using client = await NbdClient.connect(uri, { metaContexts: ["base:allocation"] });
    const data = [];
    for await (const extent of client.extents("base:allocation")) {
      if (extent.flags === 0) data.push([extent.offset, extent.length]);
    }
    assert.deepEqual(data, [[1 << 20, 1 << 20], [32 << 20, 65536]]);
    const buffer = new Uint8Array(65536);
    await client.read(32 << 20, buffer);
    assert.ok(buffer.every((byte) => byte === 0x22));
  } finally {
    child.kill("SIGTERM");
    const [status, stderr] = await Promise.all([child.status, new Response(child.stderr).text()]);
    await lines.return?.();
    assert.equal(status.code, 0, stderr);
    assert.match(stderr, /connection 1 opened/);
    await assert.rejects(Deno.lstat(socket), Deno.errors.NotFound, "the socket is removed");
    await Deno.remove(dir, { recursive: true });
  }
});
