// Copyright 2026 the vmabackup authors. MIT license.
/**
 * CLI behaviour users expect, and the exit codes the README promises: no binary to a
 * terminal, no archive under a name whose extension means something else, limits reported
 * before any output exists, and I/O errors (a failing read, an NBD server's EIO, a full
 * disk under qemu-nbd) as exit code 4 rather than "corrupt" or "other failure".
 */
import assert from "node:assert/strict";
import { CLI, cli, hasProgram, withTempDir } from "./_cli.ts";
import { qemuTest } from "./_qemu.ts";
import { randomBytes } from "./_utils.ts";
import { startMemoryNbdServer } from "./fixtures/nbd_memory_server.ts";

const MiB = 1 << 20;
const STRACE = await hasProgram("strace");
const CI = Deno.env.get("CI") === "true";

/** A test that needs `program`: skipped without it, failing under CI=true. */
function toolTest(program: string, available: boolean, name: string, fn: () => Promise<void>) {
  if (!available && !CI) {
    Deno.test({ name: `${name} (skipped: ${program} is not installed)`, ignore: true, fn });
    return;
  }
  Deno.test(name, async () => {
    if (!available) throw new Error(`${program} is required under CI=true`);
    await fn();
  });
}

const exists = (path: string) => Deno.lstat(path).then(() => true, () => false);

async function disk(dir: string, size = 300_000): Promise<string> {
  await Deno.writeFile(`${dir}/d.raw`, randomBytes(size, 21));
  return `${dir}/d.raw`;
}

/** Runs `deno run -A cli.ts ...args` with stdout on a pseudo-terminal (`script`). */
async function onTerminal(args: string[]): Promise<{ code: number; output: string }> {
  const command = [Deno.execPath(), "run", "-A", CLI, ...args].map((arg) => `'${arg}'`).join(" ");
  const { code, stdout } = await new Deno.Command("script", {
    args: ["-qec", command, "/dev/null"],
    env: { NO_COLOR: "1" },
    stdin: "null",
  }).output();
  return { code, output: new TextDecoder().decode(stdout) };
}

Deno.test("cli: -o - and extract --stdout refuse to write binary to a terminal (exit 2)", async () => {
  await withTempDir(async (dir) => {
    const backup = await onTerminal(["backup", "--disk", await disk(dir), "-o", "-"]);
    assert.equal(backup.code, 2, backup.output);
    assert.match(backup.output, /^error: not writing binary output to a terminal; redirect stdout/);
    assert.ok(!backup.output.includes("VMA"), "no archive bytes on the terminal");
    assert.equal((await cli(["backup", "--disk", `${dir}/d.raw`, "-o", `${dir}/vm.vma`])).code, 0);
    const extract = await onTerminal(["extract", `${dir}/vm.vma`, "--stdout", "scsi0"]);
    assert.equal(extract.code, 2, extract.output);
    assert.match(extract.output, /^error: not writing the disk to a terminal/);
    const list = await onTerminal(["list", `${dir}/vm.vma`]);
    assert.equal(list.code, 0, "text output still goes to terminals");
  });
});

Deno.test("cli: an unknown or unwritable extension of OUT is an error, not a plain VMA", async () => {
  await withTempDir(async (dir) => {
    const source = await disk(dir);
    for (const name of ["x.img", "x.vma.lzo", "backup", "x.vma.xz"]) {
      const result = await cli(["backup", "--disk", source, "-o", `${dir}/${name}`]);
      assert.equal(result.code, 2, `${name}: ${result.stderr}`);
      assert.match(result.stderr, name.endsWith(".lzo") ? /lzop/ : /unknown extension/);
      assert.ok(!await exists(`${dir}/${name}`) && !await exists(`${dir}/${name}.partial`));
    }
    const mismatch = await cli([
      "backup",
      "--disk",
      source,
      "-o",
      `${dir}/x.vma.gz`,
      "--compress",
      "zstd",
    ]);
    assert.equal(mismatch.code, 2);
    const explicit = await cli([
      "backup",
      "--disk",
      source,
      "-o",
      `${dir}/x.img`,
      "--compress",
      "none",
    ]);
    assert.equal(explicit.code, 0, "--compress names the format whatever the name");
  });
});

Deno.test("cli: 255 disks and configs over the header budget are refused before the output is opened", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/d.raw`, new Uint8Array(512));
    // In a directory that does not exist: opening the output first would fail with exit 4.
    const out = `${dir}/missing/vm.vma`;
    const disks = Array.from({ length: 255 }, (_, i) => ["--disk", `scsi${i}=${dir}/d.raw`]).flat();
    const many = await cli(["backup", ...disks, "-o", out]);
    assert.equal(many.code, 2, many.stderr);
    assert.match(many.stderr, /255 devices exceed the limit of 254/);
    const configs = [];
    for (let i = 0; i < 9; i++) {
      await Deno.writeFile(`${dir}/${i}.conf`, new Uint8Array(65535).fill(0x61));
      configs.push("--config", `${dir}/${i}.conf`);
    }
    const big = await cli(["backup", "--disk", `${dir}/d.raw`, ...configs, "-o", out]);
    assert.equal(big.code, 2, big.stderr);
    assert.match(big.stderr, /header: Its size \d+ exceeds 524288 bytes/);
    await Deno.writeFile(`${dir}/huge.conf`, new Uint8Array(65536));
    const huge = await cli([
      "backup",
      "--disk",
      `${dir}/d.raw`,
      "--config",
      `${dir}/huge.conf`,
      "-o",
      out,
    ]);
    assert.equal(huge.code, 2, huge.stderr);
    assert.match(huge.stderr, /65536 bytes is too big for an archive header/);
  });
});

toolTest(
  "strace",
  STRACE,
  "cli: a read error (EIO) of a compressed archive is exit 4, not 3",
  async () => {
    await withTempDir(async (dir) => {
      const source = await disk(dir, 6 * MiB);
      for (const archive of [`${dir}/vm.vma.zst`, `${dir}/vm.vma.gz`]) {
        assert.equal((await cli(["backup", "--disk", source, "-o", archive])).code, 0);
        // The kernel's answer to the third read of the archive, and every later one: EIO.
        const { code, stderr } = await new Deno.Command("strace", {
          args: [
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-P",
            archive,
            "-e",
            "trace=read,readv,pread64",
            "-e",
            "inject=read,readv,pread64:error=EIO:when=3+",
            Deno.execPath(),
            "run",
            "--allow-read",
            CLI,
            "verify",
            archive,
          ],
          env: { NO_COLOR: "1" },
        }).output();
        const message = new TextDecoder().decode(stderr);
        assert.equal(code, 4, message);
        assert.match(message, /^error: Input\/output error \(os error 5\)\n$/);
      }
    });
  },
);

Deno.test("cli: a read error reported by an NBD server is exit 4", async () => {
  await withTempDir(async (dir) => {
    await using server = await startMemoryNbdServer({
      data: randomBytes(4 * MiB, 22),
      failReadAt: 3 * MiB,
    });
    const result = await cli(["backup", "--disk", server.uri, "-o", `${dir}/vm.vma`], {
      permissions: ["--allow-read", "--allow-write", "--allow-net"],
    });
    assert.equal(result.code, 4, result.stderr);
    assert.match(result.stderr, /EIO/);
    assert.ok(!await exists(`${dir}/vm.vma.partial`));
  });
});

/** True when this user may mount a tmpfs in a new user and mount namespace. */
const UNSHARE = await new Deno.Command("unshare", { args: ["-rm", "true"] }).output()
  .then((result) => result.success, () => false);

qemuTest(
  "cli: extract --format qcow2 onto a full disk is exit 4 and leaves nothing behind",
  async () => {
    if (!UNSHARE) {
      if (CI) throw new Error("unshare -rm (user namespaces) is required under CI=true");
      // deno-lint-ignore no-console
      console.warn("skipped: unshare -rm cannot mount a small tmpfs here");
      return;
    }
    await withTempDir(async (dir) => {
      await Deno.writeFile(`${dir}/d.raw`, randomBytes(16 * MiB, 23));
      assert.equal(
        (await cli(["backup", "--disk", `${dir}/d.raw`, "-o", `${dir}/vm.vma`])).code,
        0,
      );
      await Deno.mkdir(`${dir}/full`);
      // 100 KiB: too small for qemu-img's qcow2 header. 8 MiB: qemu-nbd's writes fail.
      for (const size of ["100k", "8m"]) {
        const script = [
          `mount -t tmpfs -o size=${size} tmpfs '${dir}/full'`,
          `'${Deno.execPath()}' run -A '${CLI}' extract '${dir}/vm.vma' '${dir}/full/out' --format qcow2`,
          `code=$?; ls -A '${dir}/full'; exit $code`,
        ].join("; ");
        const { code, stdout, stderr } = await new Deno.Command("unshare", {
          args: ["-rm", "sh", "-c", script],
          env: { NO_COLOR: "1" },
        }).output();
        const message = new TextDecoder().decode(stderr);
        assert.equal(code, 4, `tmpfs of ${size}: ${message}`);
        assert.match(message, /No space left on device|ENOSPC/);
        assert.equal(new TextDecoder().decode(stdout), "", "no partial output is left");
      }
    });
  },
);
