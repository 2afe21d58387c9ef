// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `index` and `convert` end to end, as subprocesses: the real Proxmox sample, archives
 * compressed by the zstd, gzip and lzop programs, plain archives; outputs checked by the
 * system zstd and by random reads; corrupt inputs, usage errors and signals leaving nothing.
 */
import assert from "node:assert/strict";
import {
  CLUSTER_SIZE,
  decodeIndex,
  fileRangeReader,
  IndexedArchive,
  type VmaClusterRecord,
  VmaExtentStream,
  VmaReaderStream,
  type VmaRecord,
  VmaWriterStream,
} from "../mod.ts";
import { cli, type CliOptions, spawnCli, tool, toolTest, withTempDir } from "./_cli.ts";
import { loadProxmoxSample, randomBytes, sha256Hex } from "./_utils.ts";

const TEN_GIB = 10737418240;
const SAMPLE_GZ = new URL("../../shared/vectors/dissect-proxmox-sample.vma.gz", import.meta.url);

/** Two disks with data, holes and an odd size, backed up by the CLI into `dir/vm.vma`. */
async function makeArchive(dir: string) {
  const system = new Uint8Array(5 * 2 ** 20 + 3 * 4096);
  system.set(randomBytes(2 ** 20, 1), 0);
  system.set(new TextEncoder().encode("x".repeat(300_000)), 3 * 2 ** 20);
  system.set(randomBytes(4096, 2), system.byteLength - 4096);
  const efi = new Uint8Array(540672);
  efi.set(randomBytes(8192, 3), 65536);
  await Deno.writeFile(`${dir}/system.raw`, system);
  await Deno.writeFile(`${dir}/efi.raw`, efi);
  const backup = await cli([
    "backup",
    "--disk",
    `scsi0=${dir}/system.raw`,
    "--disk",
    `efidisk0=${dir}/efi.raw`,
    "-o",
    `${dir}/vm.vma`,
    "--no-index",
  ]);
  assert.equal(backup.code, 0, backup.stderr);
  await Deno.remove(`${dir}/system.raw`);
  await Deno.remove(`${dir}/efi.raw`);
  const plain = await Deno.readFile(`${dir}/vm.vma`);
  return { plain, disks: new Map([["drive-scsi0", system], ["drive-efidisk0", efi]]) };
}

/** Opens `path` for random reads and checks every disk, whole and in a few ranges. */
async function assertRandomAccess(
  path: string,
  disks: Map<string, Uint8Array>,
  options: { sidecar?: Uint8Array; source: "embedded" | "sidecar" },
): Promise<void> {
  const archive = await IndexedArchive.open(await fileRangeReader(path), options);
  try {
    assert.equal(archive.indexSource, options.source);
    for (const [name, disk] of disks) {
      const device = archive.device(name)!;
      assert.equal(device.size, disk.byteLength);
      assert.ok(equalBytes(await archive.read(device.devId, 0, disk.byteLength), disk), name);
      for (const [offset, length] of [[1, 70_000], [disk.byteLength - 5000, 5000]] as const) {
        const part = await archive.read(device.devId, offset, length);
        assert.ok(equalBytes(part, disk.subarray(offset, offset + length)), `${name} ${offset}`);
      }
    }
  } finally {
    archive.close();
  }
}

/** Byte equality without assert.deepEqual's slow diff of megabytes. */
function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteLength === b.byteLength && sha256Hex(a) === sha256Hex(b);
}

async function listing(dir: string): Promise<string[]> {
  return (await Array.fromAsync(Deno.readDir(dir), (entry) => entry.name)).sort();
}

/** A command that must fail with `code` and one error line, leaving `dir` as it was. */
async function assertFailsCleanly(
  dir: string,
  args: string[],
  code: number,
  pattern: RegExp,
  options: CliOptions = {},
): Promise<void> {
  const before = await listing(dir);
  const result = await cli(args, options);
  assert.equal(result.code, code, `${args.join(" ")}: ${result.stderr}`);
  assert.match(result.stderr, /^error: [^\n]*\n$/, `one line: ${result.stderr}`);
  assert.match(result.stderr, pattern);
  assert.deepEqual(await listing(dir), before, `${args.join(" ")} left files behind`);
}

/**
 * The Proxmox sample made complete: it was cut after two extents, so the clusters it lacks
 * are appended as zero clusters, in extents of the sample's UUID. Its first 538112 bytes
 * are the real Proxmox archive.
 */
async function completedSample(): Promise<Uint8Array> {
  const sample = await loadProxmoxSample();
  const reader = new VmaReaderStream({ requireComplete: false, skipData: true });
  const present = new Set<number>();
  for await (const record of ReadableStream.from([sample]).pipeThrough(reader)) {
    if (record.type === "cluster") present.add((record as VmaClusterRecord).cluster);
  }
  const records: VmaRecord[] = [{ type: "device", devId: 1, name: "drive-scsi0", size: TEN_GIB }];
  for (let cluster = 0; cluster < TEN_GIB / CLUSTER_SIZE;) {
    if (present.has(cluster)) {
      cluster++;
      continue;
    }
    let count = 0;
    while (cluster + count < TEN_GIB / CLUSTER_SIZE && !present.has(cluster + count)) count++;
    records.push({ type: "zeros", devId: 1, cluster, count });
    cluster += count;
  }
  const identity = { uuid: "04fc12eb-0fed-4322-9aaa-f4e412f68096", ctime: 1635680622 };
  const extents: Uint8Array[] = [];
  const pieces = ReadableStream.from(records)
    .pipeThrough(new VmaWriterStream({ ...identity, requireComplete: false }))
    .pipeThrough(new VmaExtentStream({ requireComplete: false }));
  for await (const piece of pieces) if (piece.type === "extent") extents.push(piece.bytes.slice());
  const total = extents.reduce((sum, bytes) => sum + bytes.byteLength, sample.byteLength);
  const complete = new Uint8Array(total);
  complete.set(sample);
  let at = sample.byteLength;
  for (const bytes of extents) {
    complete.set(bytes, at);
    at += bytes.byteLength;
  }
  return complete;
}

await toolTest(
  "index and convert: the real Proxmox sample (.vma.gz)",
  ["zstd", "gzip"],
  async () => {
    await withTempDir(async (dir) => {
      // As stored, the sample was cut after its second extent: both commands refuse it.
      await Deno.copyFile(SAMPLE_GZ, `${dir}/cut.vma.gz`);
      const missing = /missing cluster 23 for stream drive-scsi0 .*at byte 538112\)/;
      await assertFailsCleanly(dir, ["index", `${dir}/cut.vma.gz`], 3, missing);
      await assertFailsCleanly(
        dir,
        ["convert", `${dir}/cut.vma.gz`, `${dir}/x.vma.zst`],
        3,
        missing,
      );

      const complete = await completedSample();
      assert.equal(sha256Hex(complete.subarray(0, 538112)), sha256Hex(await loadProxmoxSample()));
      await Deno.writeFile(`${dir}/vzdump.vma.gz`, await tool("gzip", ["-c"], complete));
      const index = await cli(["index", `${dir}/vzdump.vma.gz`]);
      assert.equal(index.code, 0, index.stderr);
      assert.match(
        index.stderr,
        /note: .*vzdump\.vma\.gz is gzip-compressed: .*needs 'cli\.ts convert/,
      );
      const sidecar = decodeIndex(await Deno.readFile(`${dir}/vzdump.vma.gz.idx`));
      assert.equal(sidecar.uuid, "04fc12eb-0fed-4322-9aaa-f4e412f68096");
      assert.equal(sidecar.ctime, 1635680622);
      assert.equal(sidecar.archiveBytes, complete.byteLength);
      assert.equal(sidecar.digestScope, "vma-data");

      const convert = await cli(["convert", `${dir}/vzdump.vma.gz`, `${dir}/vzdump.vma.zst`]);
      assert.equal(convert.code, 0, convert.stderr);
      await tool("zstd", ["-q", "-t", `${dir}/vzdump.vma.zst`]);
      const decoded = await tool("zstd", ["-q", "-d", "-c", `${dir}/vzdump.vma.zst`]);
      assert.ok(equalBytes(decoded, complete), "zstd -dc gives the input's VMA bytes");
      // The documented content of drive-scsi0, read at random.
      const archive = await IndexedArchive.open(await fileRangeReader(`${dir}/vzdump.vma.zst`));
      try {
        assert.equal(archive.indexSource, "embedded");
        const devId = archive.device("scsi0")!.devId;
        assert.equal(
          sha256Hex(await archive.read(devId, 0, 10944512)),
          "aab5065ff973dd7d21c09e966546635e95c28be6dd1e4e01ae742420a1fbd825",
        );
        assert.equal(
          sha256Hex(await archive.read(devId, 16 * 65536, 7 * 65536)),
          "8c989a3aa590795fa919ccb7d1f28651c85f8a0d9ba00ab22cdd9fb760fa7955",
        );
        const tail = await archive.read(devId, TEN_GIB - 3 * 2 ** 20, 3 * 2 ** 20);
        assert.ok(tail.every((byte) => byte === 0));
      } finally {
        archive.close();
      }
    });
  },
);

await toolTest("index and convert: archives compressed by the zstd and gzip programs", [
  "zstd",
  "gzip",
], async () => {
  await withTempDir(async (dir) => {
    const { plain, disks } = await makeArchive(dir);
    await Deno.writeFile(`${dir}/vm.vma.zst`, await tool("zstd", ["-q", "-c"], plain));
    await Deno.writeFile(`${dir}/vm.vma.gz`, await tool("gzip", ["-c"], plain));
    const plainIndex = await cli(["index", `${dir}/vm.vma`, "-o", `${dir}/plain.idx`]);
    assert.equal(plainIndex.code, 0, plainIndex.stderr);
    assert.doesNotMatch(plainIndex.stderr, /note:/, "a plain .vma is random-accessible");
    const expected = await Deno.readFile(`${dir}/plain.idx`);
    for (const [name, compression] of [["vm.vma.zst", "zstd"], ["vm.vma.gz", "gzip"]]) {
      const index = await cli(["index", `${dir}/${name}`, "--json", "--progress", "json"]);
      assert.equal(index.code, 0, index.stderr);
      assert.match(index.stderr, /^note: .* random access needs 'cli\.ts convert /m);
      const result = JSON.parse(index.text);
      assert.equal(result.compression, compression);
      assert.equal(result.randomAccess, false);
      assert.equal(result.archiveBytes, plain.byteLength);
      const size = (await Deno.stat(`${dir}/${name}`)).size;
      assert.equal(result.inputBytes, size);
      const done = index.stderr.split("\n").filter((line) => line.startsWith("{"))
        .map((line) => JSON.parse(line)).find((event) => event.event === "done");
      assert.equal(done?.done, size, "--progress counts input bytes");
      // The same VMA bytes give the same index, whatever compressed them.
      assert.deepEqual(await Deno.readFile(`${dir}/${name}.idx`), expected, name);
      // verify finds the sidecar and checks every extent's data against it.
      const verify = await cli(["verify", `${dir}/${name}`, "--json"]);
      assert.equal(verify.code, 0, verify.stderr);
      const checked = JSON.parse(verify.text).checked;
      assert.deepEqual([checked.level, checked.index?.source], ["sha256", "sidecar"], name);

      const out = `${dir}/${name}.seekable.vma.zst`;
      const convert = await cli(["convert", `${dir}/${name}`, out, "--json", "--level", "5"]);
      assert.equal(convert.code, 0, convert.stderr);
      const converted = JSON.parse(convert.text);
      assert.equal(converted.outputBytes, (await Deno.stat(out)).size);
      assert.equal(converted.inputBytes, size);
      assert.equal(converted.archiveBytes, plain.byteLength);
      assert.equal(converted.level, 5);
      assert.ok(converted.frames >= 4, `${converted.frames} frames`);
      await tool("zstd", ["-q", "-t", out]);
      assert.ok(equalBytes(await tool("zstd", ["-q", "-d", "-c", out]), plain), name);
      await assertRandomAccess(out, disks, { source: "embedded" });
      const verifyOut = await cli(["verify", out, "--json"]);
      assert.equal(verifyOut.code, 0, verifyOut.stderr);
      const outChecked = JSON.parse(verifyOut.text).checked;
      assert.deepEqual([outChecked.level, outChecked.index?.source], ["sha256", "embedded"]);
    }
    // zstd decoded by the system program gives the same index.
    const program = await cli(
      ["index", `${dir}/vm.vma.zst`, "-o", `${dir}/program.idx`, "--zstd", "program"],
      { permissions: ["--allow-read", "--allow-write", "--allow-run=zstd"] },
    );
    assert.equal(program.code, 0, program.stderr);
    assert.deepEqual(await Deno.readFile(`${dir}/program.idx`), expected);
  });
});

await toolTest("index and convert: an archive compressed by lzop", ["lzop", "zstd"], async () => {
  await withTempDir(async (dir) => {
    const { plain, disks } = await makeArchive(dir);
    await Deno.writeFile(`${dir}/vm.vma.lzo`, await tool("lzop", ["-c"], plain));
    const permissions = ["--allow-read", "--allow-write", "--allow-run=lzop"];
    const index = await cli(["index", `${dir}/vm.vma.lzo`], { permissions });
    assert.equal(index.code, 0, index.stderr);
    assert.match(index.stderr, /note: .*vm\.vma\.lzo is lzop-compressed/);
    assert.equal(
      decodeIndex(await Deno.readFile(`${dir}/vm.vma.lzo.idx`)).archiveBytes,
      plain.length,
    );
    const out = `${dir}/vm.vma.zst`;
    const convert = await cli(["convert", `${dir}/vm.vma.lzo`, out], { permissions });
    assert.equal(convert.code, 0, convert.stderr);
    await tool("zstd", ["-q", "-t", out]);
    assert.ok(equalBytes(await tool("zstd", ["-q", "-d", "-c", out]), plain));
    await assertRandomAccess(out, disks, { source: "embedded" });
    // Without --allow-run, one line names the flag and nothing is left.
    await assertFailsCleanly(dir, ["index", `${dir}/vm.vma.lzo`, "--force"], 5, /--allow-run/);
  });
});

Deno.test("index: the sidecar of a plain .vma gives random access, and equals backup's own", async () => {
  await withTempDir(async (dir) => {
    const { disks } = await makeArchive(dir);
    const index = await cli(["index", `${dir}/vm.vma`]);
    assert.equal(index.code, 0, index.stderr);
    assert.match(index.stderr, /vm\.vma\.idx: index of .*vm\.vma \(uncompressed\): 2 device\(s\)/);
    const sidecar = await Deno.readFile(`${dir}/vm.vma.idx`);
    await assertRandomAccess(`${dir}/vm.vma`, disks, { sidecar, source: "sidecar" });
    // Run again: the sidecar exists (exit 6, untouched); --force replaces it.
    await assertFailsCleanly(dir, ["index", `${dir}/vm.vma`], 6, /vm\.vma\.idx already exists/);
    assert.deepEqual(await Deno.readFile(`${dir}/vm.vma.idx`), sidecar);
    assert.equal((await cli(["index", `${dir}/vm.vma`, "--force"])).code, 0);
    assert.deepEqual(await Deno.readFile(`${dir}/vm.vma.idx`), sidecar);
    // The same archive backed up with its sidecar: index rebuilds exactly that sidecar.
    await Deno.writeFile(`${dir}/system.raw`, disks.get("drive-scsi0")!);
    const backup = await cli(["backup", "--disk", `${dir}/system.raw`, "-o", `${dir}/b.vma`]);
    assert.equal(backup.code, 0, backup.stderr);
    const rebuilt = await cli(["index", `${dir}/b.vma`, "-o", `${dir}/again.idx`]);
    assert.equal(rebuilt.code, 0, rebuilt.stderr);
    assert.deepEqual(
      await Deno.readFile(`${dir}/again.idx`),
      await Deno.readFile(`${dir}/b.vma.idx`),
    );
  });
});

Deno.test("index and convert: a seekable .vma.zst keeps its index; convert re-frames it to the same bytes", async () => {
  await withTempDir(async (dir) => {
    const { plain } = await makeArchive(dir);
    const first = await cli(["convert", `${dir}/vm.vma`, `${dir}/a.vma.zst`]);
    assert.equal(first.code, 0, first.stderr);
    assert.match(
      first.stderr,
      /a\.vma\.zst: .*vm\.vma \(uncompressed, .*\) → seekable zstd, .* frames/,
    );
    const before = await listing(dir);
    const index = await cli(["index", `${dir}/a.vma.zst`, "--json"]);
    assert.equal(index.code, 0, index.stderr);
    assert.match(
      index.stderr,
      /^note: .*a\.vma\.zst is a seekable \.vma\.zst that carries its index inside; nothing written\n$/,
    );
    const result = JSON.parse(index.text);
    assert.deepEqual([result.index, result.indexPath, result.digestScope], [
      "embedded",
      null,
      "zstd-frame",
    ]);
    assert.deepEqual(await listing(dir), before, "no sidecar for a seekable archive");
    // Converting the seekable archive again gives it back byte for byte: the VMA bytes and
    // their framing are the same.
    const again = await cli(["convert", `${dir}/a.vma.zst`, `${dir}/b.vma.zst`]);
    assert.equal(again.code, 0, again.stderr);
    assert.ok(
      equalBytes(await Deno.readFile(`${dir}/b.vma.zst`), await Deno.readFile(`${dir}/a.vma.zst`)),
    );
    assert.ok(equalBytes(await tool("zstd", ["-q", "-d", "-c", `${dir}/b.vma.zst`]), plain));
  });
});

Deno.test("index and convert: corrupt and truncated inputs exit 3 with one line and leave nothing", async () => {
  await withTempDir(async (dir) => {
    const { plain } = await makeArchive(dir);
    await Deno.remove(`${dir}/vm.vma`);
    const headerSize = new DataView(plain.buffer).getUint32(56);
    const flipped = plain.slice();
    flipped[headerSize + 40]! ^= 0x01; // inside the first extent header
    const cut = plain.subarray(0, plain.byteLength - 70_000); // inside the last extent
    const inputs: [string, Uint8Array, RegExp][] = [
      ["flipped.vma", flipped, /wrong vma extent header chechsum .*at byte \d+\)/],
      ["cut.vma", cut, /short vma extent .*at byte \d+\)/],
      ["flipped.vma.gz", await tool("gzip", ["-c"], flipped), /extent header chechsum/],
      ["cut.vma.gz", await tool("gzip", ["-c"], cut), /short vma extent/],
      ["cut-gzip.vma.gz", (await tool("gzip", ["-c"], plain)).subarray(0, 500_000), /gzip data/],
      ["not-an-archive.vma", new TextEncoder().encode("hello, world"), /not a VMA archive/],
    ];
    for (const [name, bytes] of inputs) await Deno.writeFile(`${dir}/${name}`, bytes);
    for (const [name, , pattern] of inputs) {
      await assertFailsCleanly(dir, ["index", `${dir}/${name}`], 3, pattern);
      await assertFailsCleanly(
        dir,
        ["convert", `${dir}/${name}`, `${dir}/out.vma.zst`],
        3,
        pattern,
      );
      // From stdin too, and with --force (nothing to replace, and still nothing left).
      await assertFailsCleanly(dir, ["index", "-", "-o", `${dir}/out.idx`, "--force"], 3, pattern, {
        stdin: await Deno.readFile(`${dir}/${name}`),
      });
    }
  });
});

Deno.test("index and convert: usage errors and existing outputs", async () => {
  await withTempDir(async (dir) => {
    await makeArchive(dir);
    const vma = `${dir}/vm.vma`;
    await assertFailsCleanly(dir, ["convert", vma, `${dir}/out.vma`], 2, /must end in \.vma\.zst/);
    await assertFailsCleanly(dir, ["convert", vma, `${dir}/out.zst`], 2, /must end in \.vma\.zst/);
    await assertFailsCleanly(dir, ["convert", vma], 2, /expects 2 argument/);
    await assertFailsCleanly(
      dir,
      ["convert", vma, `${dir}/o.vma.zst`, "--level", "20"],
      2,
      /-7\.\.19/,
    );
    await assertFailsCleanly(dir, ["index", "-"], 2, /index - needs -o FILE/);
    await assertFailsCleanly(dir, ["index", vma, "-o", vma, "--force"], 2, /is the archive itself/);
    await assertFailsCleanly(dir, ["index", `${dir}/missing.vma`], 4, /No such file/);
    await assertFailsCleanly(
      dir,
      ["convert", `${dir}/missing.vma`, `${dir}/o.vma.zst`],
      4,
      /No such file/,
    );
    await Deno.writeTextFile(`${dir}/taken.vma.zst`, "keep me");
    await assertFailsCleanly(dir, ["convert", vma, `${dir}/taken.vma.zst`], 6, /already exists/);
    assert.equal(await Deno.readTextFile(`${dir}/taken.vma.zst`), "keep me");
    const forced = await cli(["convert", vma, `${dir}/taken.vma.zst`, "--force"]);
    assert.equal(forced.code, 0, forced.stderr);
    assert.deepEqual(
      await tool("zstd", ["-q", "-d", "-c", `${dir}/taken.vma.zst`]),
      await Deno.readFile(vma),
    );
    for (const command of ["index", "convert"]) {
      const help = await cli([command, "--help"]);
      assert.equal(help.code, 0);
      assert.match(help.text, new RegExp(`^usage: cli\\.ts ${command} `, "m"));
      assert.match(help.text, /permissions: --allow-read/);
    }
  });
});

Deno.test("index and convert: stdin and stdout", async () => {
  await withTempDir(async (dir) => {
    const { plain } = await makeArchive(dir);
    const gz = await tool("gzip", ["-c"], plain);
    const index = await cli(["index", "-", "-o", `${dir}/stdin.idx`], { stdin: gz });
    assert.equal(index.code, 0, index.stderr);
    assert.match(index.stderr, /note: stdin is gzip-compressed/);
    const toStdout = await cli(["index", `${dir}/vm.vma`, "-o", "-", "--json"]);
    assert.equal(toStdout.code, 0, toStdout.stderr);
    assert.deepEqual(toStdout.stdout, await Deno.readFile(`${dir}/stdin.idx`));
    assert.equal(JSON.parse(toStdout.stderr).indexPath, "-", "the result goes to stderr");
    const convert = await cli(["convert", "-", "-", "--json"], { stdin: gz, permissions: [] });
    assert.equal(convert.code, 0, convert.stderr);
    assert.equal(JSON.parse(convert.stderr).outputBytes, convert.stdout.byteLength);
    assert.ok(equalBytes(await tool("zstd", ["-q", "-d", "-c"], convert.stdout), plain));
  });
});

Deno.test("index and convert: SIGTERM while reading removes the partial output", async () => {
  await withTempDir(async (dir) => {
    const { plain } = await makeArchive(dir);
    for (
      const [args, partial] of [
        [["convert", "-", `${dir}/out.vma.zst`], `${dir}/out.vma.zst.partial`],
        [["index", "-", "-o", `${dir}/out.idx`], `${dir}/out.idx.partial`],
      ] as const
    ) {
      const child = spawnCli([...args]);
      const writer = child.stdin.getWriter();
      // Stdin is read in chunks of 1 MiB: more than one chunk, and then nothing more.
      assert.ok(plain.byteLength > 1_200_000);
      await writer.write(plain.subarray(0, 1_100_000));
      while (!await Deno.stat(partial).then(() => true, () => false)) {
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      child.kill("SIGTERM");
      const [{ code }, stderr] = await Promise.all([
        child.status,
        new Response(child.stderr).text(),
        new Response(child.stdout).bytes(),
      ]);
      await writer.close().catch(() => {});
      assert.equal(code, 143);
      assert.equal(stderr, "error: interrupted by SIGTERM\n");
      assert.deepEqual(await listing(dir), ["vm.vma"], `${args[0]} left files behind`);
    }
  });
});
