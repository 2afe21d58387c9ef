// Copyright 2026 the vmabackup authors. MIT license.
/** End-to-end tests of cli.ts, run as a subprocess with pipes, as users and scripts run it. */
import assert from "node:assert/strict";
import { type VmaRecord, VmaWriterStream } from "../mod.ts";
import { COMMANDS } from "../lib/cli/catalog.ts";
import { CLI as CLI_PATH, cli, hasProgram, spawnCli, tool, withTempDir } from "./_cli.ts";
import { diskClusters, loadProxmoxSample, randomBytes } from "./_utils.ts";

const CONFIG = "cores: 2\nmemory: 2048\n#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:\n";

/** Two disks (one of an odd size) and a config file in `dir`. */
async function makeVm(dir: string) {
  const system = new Uint8Array(3 * 2 ** 20 + 3 * 4096 + 512);
  system.set(randomBytes(200_000, 1), 10_000);
  system.set(new TextEncoder().encode("x".repeat(70_000)), 2 ** 20);
  system.set(randomBytes(4096, 2), system.byteLength - 4096);
  const efi = new Uint8Array(540672);
  efi.set(randomBytes(8192, 3), 0);
  await Deno.writeFile(`${dir}/system.raw`, system);
  await Deno.writeFile(`${dir}/efi.raw`, efi);
  await Deno.writeTextFile(`${dir}/qemu-server.conf`, CONFIG);
  const args = [
    "--disk",
    `drive-scsi0=${dir}/system.raw`,
    "--disk",
    `efidisk0=${dir}/efi.raw`,
    "--config",
    `${dir}/qemu-server.conf`,
  ];
  return { system, efi, args };
}

async function assertExtracted(target: string, vm: { system: Uint8Array; efi: Uint8Array }) {
  assert.deepEqual(await Deno.readFile(`${target}/disk-drive-scsi0.raw`), vm.system);
  assert.deepEqual(await Deno.readFile(`${target}/disk-drive-efidisk0.raw`), vm.efi);
  assert.equal(await Deno.readTextFile(`${target}/qemu-server.conf`), CONFIG);
}

/** Pipes each process's stdout into the next one's stdin; returns every exit code and stderr. */
async function pipeline(...children: Deno.ChildProcess[]) {
  const pumps = children.slice(1).map((child, i) => children[i]!.stdout.pipeTo(child.stdin));
  await children[0]!.stdin.close();
  const last = children.at(-1)!;
  const [stdout, ...statuses] = await Promise.all([
    new Response(last.stdout).bytes(),
    ...children.map(async (child) => ({
      code: (await child.status).code,
      stderr: child.stderr ? await new Response(child.stderr).text() : "",
    })),
  ]);
  await Promise.allSettled(pumps);
  return { stdout, statuses };
}

Deno.test("cli: backup to .vma.zst, the zstd CLI decodes it, verify and extract restore it", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    const backup = await cli(["backup", ...vm.args, "-o", `${dir}/vm.vma.zst`]);
    assert.equal(backup.code, 0, backup.stderr);
    assert.match(backup.stderr, /vm\.vma\.zst: 2 disk\(s\), .* zstd in/);
    const plain = await tool("zstd", ["-d", "-c", `${dir}/vm.vma.zst`]);
    assert.deepEqual([...plain.subarray(0, 4)], [0x56, 0x4d, 0x41, 0]);
    await Deno.writeFile(`${dir}/vm.vma`, plain);
    for (const archive of ["vm.vma.zst", "vm.vma"]) {
      const verify = await cli(["verify", `${dir}/${archive}`]);
      assert.equal(verify.code, 0, verify.stderr);
      assert.match(verify.text, /ok \((zstd|uncompressed)\)\n {2}2 device\(s\)/);
    }
    const extract = await cli(["extract", `${dir}/vm.vma.zst`, `${dir}/out`]);
    assert.equal(extract.code, 0, extract.stderr);
    await assertExtracted(`${dir}/out`, vm);
    const entries = [...Deno.readDirSync(dir)].map((entry) => entry.name);
    assert.ok(!entries.some((name) => name.endsWith(".partial")), "no partial files remain");
  });
});

Deno.test("cli: backup -o - | verify - and backup | zstd -d | extract - work through pipes", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    const { stdout, statuses } = await pipeline(
      spawnCli(["backup", ...vm.args, "-o", "-"]),
      spawnCli(["verify", "-", "--json"]),
    );
    assert.deepEqual(statuses.map((status) => status.code), [0, 0], JSON.stringify(statuses));
    const report = JSON.parse(new TextDecoder().decode(stdout));
    assert.equal(report.ok, true);
    assert.equal(report.compression, "none");
    assert.deepEqual(report.devices.map((d: { name: string }) => d.name), [
      "drive-scsi0",
      "drive-efidisk0",
    ]);

    const zstd = new Deno.Command("zstd", {
      args: ["-d", "-c"],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const piped = await pipeline(
      spawnCli(["backup", ...vm.args, "-o", "-", "--compress", "zstd"]),
      zstd,
      spawnCli(["extract", "-", `${dir}/piped`]),
    );
    assert.deepEqual(
      piped.statuses.map((status) => status.code),
      [0, 0, 0],
      JSON.stringify(piped.statuses),
    );
    await assertExtracted(`${dir}/piped`, vm);
  });
});

Deno.test("cli: list prints the exact vma list lines of the Proxmox sample", async () => {
  await withTempDir(async (dir) => {
    const sample = await loadProxmoxSample();
    await Deno.writeFile(`${dir}/sample.vma`, sample);
    const list = await cli(["list", `${dir}/sample.vma`]);
    assert.equal(list.code, 0, list.stderr);
    assert.equal(
      list.text,
      "CFG: size: 417 name: qemu-server.conf\n" +
        "DEV: dev_id=1 size: 10737418240 devname: drive-scsi0\n" +
        "CTIME: Sun Oct 31 11:43:42 2021\n",
    );
    // The regular expression qemu-server uses on these lines.
    const dev = list.text.split("\n").find((line) => line.startsWith("DEV:"))!;
    assert.match(dev, /^DEV:\sdev_id=(\d+)\ssize:\s(\d+)\sdevname:\s(\S+)$/);
    // C's ctime() pads single-digit days with a space, in the local time zone.
    const shifted = await cli(["list", `${dir}/sample.vma`], { env: { TZ: "Pacific/Kiritimati" } });
    assert.match(shifted.text, /CTIME: Mon Nov {2}1 01:43:42 2021\n$/);
    // The gzip-compressed original reads the same, from stdin too.
    const gz = await Deno.readFile(
      new URL("../../shared/vectors/dissect-proxmox-sample.vma.gz", import.meta.url),
    );
    const fromStdin = await cli(["list", "-"], { stdin: gz, permissions: [] });
    assert.equal(fromStdin.code, 0, fromStdin.stderr);
    assert.equal(fromStdin.text, list.text);
    const json = JSON.parse((await cli(["list", `${dir}/sample.vma`, "--json"])).text);
    assert.equal(json.uuid, "04fc12eb-0fed-4322-9aaa-f4e412f68096");
    assert.deepEqual(json.devices, [{ devId: 1, name: "drive-scsi0", size: 10737418240 }]);
    assert.deepEqual(json.configs, [{ name: "qemu-server.conf", size: 417 }]);
  });
});

Deno.test("cli: list and config of a fresh backup; config -c of a missing name", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    assert.equal((await cli(["backup", ...vm.args, "-o", `${dir}/vm.vma.gz`])).code, 0);
    const list = await cli(["list", `${dir}/vm.vma.gz`]);
    const lines = list.text.trimEnd().split("\n");
    assert.equal(lines[0], `CFG: size: ${CONFIG.length} name: qemu-server.conf`);
    assert.equal(lines[1], `DEV: dev_id=1 size: ${vm.system.byteLength} devname: drive-scsi0`);
    assert.equal(lines[2], `DEV: dev_id=2 size: 540672 devname: drive-efidisk0`);
    assert.match(lines[3]!, /^CTIME: \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}$/);
    const config = await cli(["config", `${dir}/vm.vma.gz`]);
    assert.equal(config.code, 0);
    assert.equal(config.text, CONFIG);
    const missing = await cli(["config", `${dir}/vm.vma.gz`, "-c", "qemu-server.fw"]);
    assert.equal(missing.code, 7);
    assert.equal(missing.stderr, "error: unable to find configuration data 'qemu-server.fw'\n");
  });
});

Deno.test("cli: extract --stdout streams one disk, --disk selects disks, existing targets are refused", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    assert.equal((await cli(["backup", ...vm.args, "-o", `${dir}/vm.vma`])).code, 0);
    const stdout = await cli(["extract", `${dir}/vm.vma`, "--stdout", "efidisk0"]);
    assert.equal(stdout.code, 0, stdout.stderr);
    assert.deepEqual(stdout.stdout, vm.efi);
    const system = await cli(["extract", "-", "--stdout", "drive-scsi0"], {
      stdin: await Deno.readFile(`${dir}/vm.vma`),
    });
    assert.deepEqual(system.stdout, vm.system);

    const one = await cli(["extract", `${dir}/vm.vma`, `${dir}/one`, "--disk", "scsi0"]);
    assert.equal(one.code, 0, one.stderr);
    assert.deepEqual([...Deno.readDirSync(`${dir}/one`)].map((e) => e.name).sort(), [
      "disk-drive-scsi0.raw",
      "qemu-server.conf",
    ]);
    const again = await cli(["extract", `${dir}/vm.vma`, `${dir}/one`]);
    assert.equal(again.code, 6);
    assert.match(again.stderr, /^error: .*one already exists \(use --force to replace it\)\n$/);
    const forced = await cli(["extract", `${dir}/vm.vma`, `${dir}/one`, "--force"]);
    assert.equal(forced.code, 0);
    await assertExtracted(`${dir}/one`, vm);

    const unknown = await cli(["extract", `${dir}/vm.vma`, `${dir}/two`, "--disk", "sata3"]);
    assert.equal(unknown.code, 7);
    assert.match(unknown.stderr, /no disk named 'sata3'/);
    assert.ok(!(await exists(`${dir}/two`)) && !(await exists(`${dir}/two.partial`)));
    const noDisk = await cli(["extract", `${dir}/vm.vma`, "--stdout", "sata3"]);
    assert.equal(noDisk.code, 7);
    const withJson = await cli(["extract", `${dir}/vm.vma`, "--stdout", "scsi0", "--json"]);
    assert.equal(withJson.code, 2, "--json would mix a report into the disk's bytes");
    assert.match(withJson.stderr, /--stdout cannot be combined with .*--json/);
    assert.equal(withJson.stdout.byteLength, 0);
  });
});

async function exists(path: string): Promise<boolean> {
  return await Deno.lstat(path).then(() => true, () => false);
}

Deno.test("cli: the output is never overwritten without --force", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    await Deno.writeTextFile(`${dir}/vm.vma`, "precious");
    const refused = await cli(["backup", ...vm.args, "-o", `${dir}/vm.vma`]);
    assert.equal(refused.code, 6);
    assert.equal(await Deno.readTextFile(`${dir}/vm.vma`), "precious");
    const forced = await cli(["backup", ...vm.args, "-o", `${dir}/vm.vma`, "--force"]);
    assert.equal(forced.code, 0, forced.stderr);
    assert.equal((await cli(["verify", `${dir}/vm.vma`])).code, 0);
  });
});

Deno.test("cli: archives from the zstd, gzip and lzop CLIs, multi-frame and multi-member, read back", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    assert.equal((await cli(["backup", ...vm.args, "-o", `${dir}/vm.vma`])).code, 0);
    const plain = await Deno.readFile(`${dir}/vm.vma`);
    const half = Math.floor(plain.byteLength / 2);
    const concat = (parts: Uint8Array[]) => new Uint8Array(parts.flatMap((part) => [...part]));
    const variants: Record<string, Uint8Array> = {
      "cli.vma.zst": await tool("zstd", ["-q", "-c", "-T2", "-3"], plain),
      "frames.vma.zst": concat([
        await tool("zstd", ["-q", "-c"], plain.subarray(0, half)),
        await tool("zstd", ["-q", "-c"], plain.subarray(half)),
      ]),
      "cli.vma.gz": await tool("gzip", ["-c"], plain),
      "members.vma.gz": concat([
        await tool("gzip", ["-c"], plain.subarray(0, half)),
        await tool("gzip", ["-c"], plain.subarray(half)),
      ]),
    };
    if (await hasProgram("lzop")) variants["cli.vma.lzo"] = await tool("lzop", ["-c"], plain);
    else if (Deno.env.get("CI")) throw new Error("lzop is required in CI");
    for (const [name, bytes] of Object.entries(variants)) {
      await Deno.writeFile(`${dir}/${name}`, bytes);
      const permissions = ["--allow-read", "--allow-write", "--allow-run=lzop"];
      const verify = await cli(["verify", `${dir}/${name}`], { permissions });
      assert.equal(verify.code, 0, `${name}: ${verify.stderr}`);
      const extract = await cli(["extract", `${dir}/${name}`, `${dir}/x-${name}`], { permissions });
      assert.equal(extract.code, 0, `${name}: ${extract.stderr}`);
      await assertExtracted(`${dir}/x-${name}`, vm);
    }
    // Our own multi-frame output (frames of 4 MiB) through our own reader, larger than a frame.
    const big = randomBytes(9 * 2 ** 20, 5);
    await Deno.writeFile(`${dir}/big.raw`, big);
    assert.equal(
      (await cli(["backup", "--disk", `${dir}/big.raw`, "-o", `${dir}/big.vma.zst`])).code,
      0,
    );
    const out = await cli(["extract", `${dir}/big.vma.zst`, "--stdout", "scsi0"]);
    assert.equal(out.code, 0, out.stderr);
    assert.deepEqual(out.stdout, big);
  });
});

Deno.test("cli: every bad input gets one error line and its documented exit code", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    assert.equal((await cli(["backup", ...vm.args, "-o", `${dir}/vm.vma`])).code, 0);
    const archive = await Deno.readFile(`${dir}/vm.vma`);
    const extentMd5 = new DataView(archive.buffer).getUint32(56) + 24; // the first extent's MD5
    const corrupt = archive.slice();
    corrupt[13000]! ^= 0xff; // inside the first extent header
    await Deno.writeFile(`${dir}/corrupt.vma`, corrupt);
    await Deno.writeFile(`${dir}/cut.vma`, archive.subarray(0, archive.byteLength - 4096));
    await Deno.writeFile(`${dir}/noise.bin`, randomBytes(5000, 9));
    await Deno.mkdir(`${dir}/adir`);

    const cases: [string[], number, RegExp, string[]?][] = [
      [[], 2, /usage: cli\.ts COMMAND/],
      [["frobnicate"], 2, /^error: unknown command 'frobnicate'/],
      [["backup", "--bogus"], 2, /^error: Unknown option '--bogus'.*--help/],
      [["backup", "--disk", `${dir}/system.raw`], 2, /needs -o OUT/],
      [
        ["backup", "--disk", `${dir}/system.raw`, "-o", `${dir}/x.vma`, "--level", "99"],
        2,
        /--level/,
      ],
      [["verify"], 2, /verify expects 1 argument/],
      [
        ["backup", "--disk", `${dir}/missing.raw`, "-o", `${dir}/x.vma`],
        4,
        /No such file.*missing\.raw/,
      ],
      [["backup", "--disk", `${dir}/adir`, "-o", `${dir}/x.vma`], 4, /adir: It is a directory/],
      [["verify", `${dir}/missing.vma`], 4, /No such file/],
      [
        ["verify", `${dir}/corrupt.vma`],
        3,
        new RegExp(`wrong vma extent header chechsum \\(at byte ${extentMd5}\\)`),
      ],
      [["verify", `${dir}/cut.vma`], 3, /short vma extent .* \(at byte \d+\)/],
      [
        ["verify", `${dir}/noise.bin`],
        3,
        /unknown compression or not a VMA archive \(first bytes: [0-9a-f ]+\) \(at byte 0\)/,
      ],
      [["extract", `${dir}/cut.vma`, `${dir}/cut`], 3, /short vma extent/],
      [["backup", "--disk", `${dir}/system.raw`, "-o", `${dir}/x.vma`], 5, /--allow-write/, [
        "--allow-read",
      ]],
      [["verify", `${dir}/vm.vma`], 5, /--allow-read/, []],
    ];
    for (const [args, code, message, permissions] of cases) {
      const result = await cli(args, permissions ? { permissions } : {});
      assert.equal(result.code, code, `${args.join(" ")}: ${result.stderr}`);
      assert.match(result.stderr, message, args.join(" "));
      if (args.length > 0) {
        assert.equal(result.stderr.trimEnd().split("\n").length, 1, `one line: ${result.stderr}`);
        assert.ok(!result.stderr.includes("    at "), "no stack trace");
      }
    }
    assert.ok(!(await exists(`${dir}/x.vma`)) && !(await exists(`${dir}/x.vma.partial`)));
    assert.ok(!(await exists(`${dir}/cut`)) && !(await exists(`${dir}/cut.partial`)));
  });
});

Deno.test("cli: extract refuses names that would leave the target directory", async () => {
  await withTempDir(async (dir) => {
    const records: VmaRecord[] = [
      { type: "device", devId: 1, name: "../escape", size: 65536 },
      ...diskClusters(1, new Uint8Array(65536).fill(1)),
    ];
    const archive = await new Response(
      ReadableStream.from(records).pipeThrough(new VmaWriterStream()),
    ).bytes();
    await Deno.writeFile(`${dir}/evil.vma`, archive);
    const result = await cli(["extract", `${dir}/evil.vma`, `${dir}/target`]);
    assert.equal(result.code, 3);
    assert.match(
      result.stderr,
      /device named '\.\.\/escape', which would leave the target directory/,
    );
    assert.ok(!(await exists(`${dir}/disk-..`)) && !(await exists(`${dir}/escape`)));
    assert.ok(!(await exists(`${dir}/target`)) && !(await exists(`${dir}/target.partial`)));
  });
});

Deno.test("cli: SIGINT, SIGTERM and SIGHUP during a backup leave no partial file", async () => {
  await withTempDir(async (dir) => {
    using file = await Deno.open(`${dir}/huge.raw`, { write: true, create: true });
    await file.truncate(64 * 2 ** 30); // sparse 64 GiB: takes long enough to interrupt
    const signals = [["SIGINT", 130], ["SIGTERM", 143], ["SIGHUP", 129]] as const;
    for (const [signal, code] of signals) {
      const out = `${dir}/huge-${signal}.vma.zst`;
      const child = spawnCli(["backup", "--disk", `${dir}/huge.raw`, "-o", out]);
      await child.stdin.close();
      for (let i = 0; i < 200 && !(await exists(`${out}.partial`)); i++) {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      assert.ok(await exists(`${out}.partial`), "the backup started");
      await new Promise((resolve) => setTimeout(resolve, 300));
      child.kill(signal);
      const result = await child.output();
      assert.equal(result.code, code);
      assert.match(new TextDecoder().decode(result.stderr), new RegExp(`interrupted by ${signal}`));
      assert.ok(!(await exists(`${out}.partial`)), "the partial file is removed");
      assert.ok(!(await exists(out)), "no output appears");
    }
  });
});

Deno.test("cli: --progress json writes JSON lines on stderr, and stdout stays data", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    const result = await cli(["backup", ...vm.args, "-o", "-", "--progress", "json", "--json"]);
    assert.equal(result.code, 0);
    assert.deepEqual([...result.stdout.subarray(0, 4)], [0x56, 0x4d, 0x41, 0]); // only archive bytes
    const events = result.stderr.trim().split("\n").map((line) => JSON.parse(line));
    assert.equal(events[0].event, "start");
    assert.equal(events[0].total, vm.system.byteLength + vm.efi.byteLength);
    assert.ok(events.some((event) => event.event === "done" && event.done === events[0].total));
    assert.ok(events.some((event) => event.ok === true && event.command === "backup"));
    // Not a terminal and no --progress: nothing but the summary line.
    const quiet = await cli(["backup", ...vm.args, "-o", `${dir}/q.vma`]);
    assert.equal(quiet.stderr.trimEnd().split("\n").length, 1);
  });
});

Deno.test("cli: --help for every command and --version", async () => {
  const list = await cli(["--help"]);
  for (const { name, summary } of COMMANDS) {
    assert.ok(list.text.includes(`  ${name}`) && list.text.includes(summary), name);
    const help = await cli([name, "--help"]);
    assert.equal(help.code, 0);
    assert.match(help.text, new RegExp(`usage: cli\\.ts ${name}`));
    assert.match(help.text, /permissions: /);
  }
  const version = await cli(["--version"]);
  assert.match(version.text, /^vmabackup \d+\.\d+\.\d+\n$/);
});

Deno.test("cli: the demo backs up, verifies, extracts and compares its sample VM", async () => {
  const demo = await cli(["demo"]);
  assert.equal(demo.code, 0, demo.stderr);
  assert.match(demo.text, /backup: {2}2 disks, 1\.00 GiB/);
  assert.match(demo.text, /verify: {2}ok/);
  assert.match(demo.text, /compare: every restored byte equals the original/);
});

Deno.test("cli: --zstd program uses the system zstd, and says which permission it needs", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    const permissions = ["--allow-read", "--allow-write", "--allow-run=zstd"];
    const backup = await cli(
      ["backup", ...vm.args, "-o", `${dir}/vm.vma.zst`, "--zstd", "program"],
      {
        permissions,
      },
    );
    assert.equal(backup.code, 0, backup.stderr);
    const plain = await tool("zstd", ["-d", "-c", `${dir}/vm.vma.zst`]);
    assert.deepEqual([...plain.subarray(0, 4)], [0x56, 0x4d, 0x41, 0]);
    const verify = await cli(["verify", `${dir}/vm.vma.zst`, "--zstd", "program"], { permissions });
    assert.equal(verify.code, 0, verify.stderr);
    const extract = await cli(["extract", `${dir}/vm.vma.zst`, `${dir}/out`, "--zstd", "program"], {
      permissions,
    });
    assert.equal(extract.code, 0, extract.stderr);
    await assertExtracted(`${dir}/out`, vm);
    const denied = await cli(["verify", `${dir}/vm.vma.zst`, "--zstd", "program"]);
    assert.equal(denied.code, 5);
    assert.match(denied.stderr, /--allow-run/);
    const bad = await cli(["verify", `${dir}/vm.vma.zst`, "--zstd", "fast"]);
    assert.equal(bad.code, 2);
  });
});

Deno.test("cli: a sparse raw disk without --allow-ffi gets a hint, and the same archive", async () => {
  await withTempDir(async (dir) => {
    using file = await Deno.open(`${dir}/sparse.raw`, { write: true, create: true });
    await file.truncate(64 * 2 ** 20);
    await file.write(randomBytes(4096, 3));
    const plain = await cli(["backup", "--disk", `${dir}/sparse.raw`, "-o", `${dir}/a.vma`]);
    assert.equal(plain.code, 0, plain.stderr);
    assert.match(plain.stderr, /note: .*sparse\.raw is sparse; add --allow-ffi/);
    const ffi = await cli(["backup", "--disk", `${dir}/sparse.raw`, "-o", `${dir}/b.vma`], {
      permissions: ["--allow-read", "--allow-write", "--allow-ffi"],
    });
    assert.equal(ffi.code, 0, ffi.stderr);
    assert.ok(!ffi.stderr.includes("note:"));
    const a = await cli(["extract", `${dir}/a.vma`, "--stdout", "scsi0"]);
    const b = await cli(["extract", `${dir}/b.vma`, "--stdout", "scsi0"]);
    assert.deepEqual(a.stdout, b.stdout);
  });
});

// util-linux's script gives the CLI a pseudo-terminal; without it the test is reported ignored.
const hasScript = await new Deno.Command("script", { args: ["--version"], stdout: "null" })
  .output().then((result) => result.success, () => false);

Deno.test({
  name: "cli: a progress bar on a terminal (through script's pseudo-terminal)",
  ignore: !hasScript,
}, async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    const command = [
      Deno.execPath(),
      "run",
      "-A",
      CLI_PATH,
      "backup",
      ...vm.args,
      "-o",
      `${dir}/t.vma`,
    ]
      .map((part) => `'${part}'`).join(" ");
    const { code, stdout } = await new Deno.Command("script", {
      args: ["-qfec", command, "/dev/null"],
      env: { NO_COLOR: "1" },
    }).output();
    assert.equal(code, 0);
    const screen = new TextDecoder().decode(stdout);
    // The bar redraws its line: carriage return, then ESC [K (erase to the end of the line).
    // deno-lint-ignore no-control-regex
    assert.match(screen, /\r\x1b\[Kbackup 100% \[#{24}\] .* MB\/s/);
    assert.match(screen, /t\.vma: 2 disk\(s\)/);
  });
});

Deno.test("cli: extract targets: a trailing slash works, the current directory is refused, --force replaces", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    assert.equal((await cli(["backup", ...vm.args, "-o", `${dir}/vm.vma`])).code, 0);
    const slash = await cli(["extract", `${dir}/vm.vma`, `${dir}/restored/`]);
    assert.equal(slash.code, 0, slash.stderr);
    await assertExtracted(`${dir}/restored`, vm);
    await Deno.writeTextFile(`${dir}/restored/stale`, "old");
    const forced = await cli(["extract", `${dir}/vm.vma`, `${dir}/restored/`, "--force"]);
    assert.equal(forced.code, 0, forced.stderr);
    await assertExtracted(`${dir}/restored`, vm);
    assert.ok(!(await exists(`${dir}/restored/stale`)), "the old directory was replaced");
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), [
      "efi.raw",
      "qemu-server.conf",
      "restored",
      "system.raw",
      "vm.vma",
      "vm.vma.idx", // the sidecar index
    ]);
    // Replacing the current directory (or one holding the archive) is refused, with nothing lost.
    for (const target of [".", dir, `${dir}/`]) {
      const refused = await cli(["extract", `${dir}/vm.vma`, target, "--force"], { cwd: dir });
      assert.equal(refused.code, 2, refused.stderr);
      assert.match(refused.stderr, /holds the current directory or the archive/);
      assert.ok(await exists(`${dir}/vm.vma`) && await exists(`${dir}/system.raw`));
    }
  });
});

Deno.test("cli: an existing OUT.partial is not shared without --force", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    await Deno.writeTextFile(`${dir}/vm.vma.partial`, "another run is writing this");
    const refused = await cli(["backup", ...vm.args, "-o", `${dir}/vm.vma`]);
    assert.equal(refused.code, 6);
    assert.match(refused.stderr, /vm\.vma\.partial already exists/);
    assert.equal(await Deno.readTextFile(`${dir}/vm.vma.partial`), "another run is writing this");
    const forced = await cli(["backup", ...vm.args, "-o", `${dir}/vm.vma`, "--force"]);
    assert.equal(forced.code, 0, forced.stderr);
    assert.ok(!(await exists(`${dir}/vm.vma.partial`)));
  });
});

Deno.test("cli: truncated zstd and gzip archives are corrupt archives (exit 3), also with --json", async () => {
  await withTempDir(async (dir) => {
    const vm = await makeVm(dir);
    for (
      const [name, pattern] of [["vm.vma.zst", /zstd data: .*truncated/], [
        "vm.vma.gz",
        /gzip data: /,
      ]] as const
    ) {
      assert.equal((await cli(["backup", ...vm.args, "-o", `${dir}/${name}`])).code, 0);
      const bytes = await Deno.readFile(`${dir}/${name}`);
      await Deno.writeFile(`${dir}/cut-${name}`, bytes.subarray(0, bytes.byteLength - 100));
      const verify = await cli(["verify", `${dir}/cut-${name}`]);
      assert.equal(verify.code, 3, verify.stderr);
      assert.match(verify.stderr, pattern);
      const json = await cli(["verify", `${dir}/cut-${name}`, "--json"]);
      assert.equal(json.code, 3);
      const report = JSON.parse(json.text);
      assert.equal(report.ok, false);
      assert.equal(report.error.reason, "bad-compression");
    }
  });
});

Deno.test("cli: verify --json reports inputs that are not archives at all", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/noise.bin`, randomBytes(5000, 3));
    await Deno.writeFile(`${dir}/empty.vma`, new Uint8Array(0));
    for (
      const [name, reason] of [["noise.bin", "bad-magic"], ["empty.vma", "truncated-header"]]
    ) {
      const result = await cli(["verify", `${dir}/${name}`, "--json"]);
      assert.equal(result.code, 3, result.stderr);
      const report = JSON.parse(result.text);
      assert.deepEqual(
        [report.ok, report.error.reason, report.error.offset, report.compression],
        [false, reason, 0, null],
      );
      assert.deepEqual(report.devices, []);
    }
  });
});
