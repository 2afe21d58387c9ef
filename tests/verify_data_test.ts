// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `verify` sees data corruption: bit flips anywhere in a seekable `.vma.zst` or in the data
 * blocks of a plain `.vma` with its sidecar fail it; without an index it says that only the
 * structure was checked; damaged, foreign and stale indexes are one clear line, exit 3.
 */
import assert from "node:assert/strict";
import { decodeSeekTable, seekTableSize } from "../mod.ts";
import { main } from "../cli.ts";
import { tool, toolTest, withTempDir } from "./_cli.ts";
import { randomBytes } from "./_utils.ts";

const MiB = 1 << 20;

/** Runs the CLI in this process (it is much faster than a process per run). */
async function run(args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = "";
  let err = "";
  const decoder = new TextDecoder();
  const context = {
    stdout: {
      write: (bytes: Uint8Array) => Promise.resolve((out += decoder.decode(bytes), bytes.length)),
    },
    stderr: {
      write: (bytes: Uint8Array) => Promise.resolve((err += decoder.decode(bytes), bytes.length)),
    },
    stderrIsTerminal: false,
    signal: new AbortController().signal,
  };
  const code = await main(args, context);
  return { code, out, err };
}

/** A sparse 64 MiB disk: one random cluster in every 58, so each extent holds one. */
async function sparseDisk(path: string): Promise<void> {
  using file = await Deno.open(path, { write: true, create: true });
  await file.truncate(64 * MiB);
  for (let cluster = 0, i = 0; cluster < 1024; cluster += 58, i++) {
    await file.seek(cluster * 65536, Deno.SeekMode.Start);
    await file.write(randomBytes(65536, i + 1));
  }
}

/** A seeded generator of positions. */
function positions(seed: number, count: number, pick: (random: number) => number): number[] {
  let state = seed;
  return Array.from({ length: count }, () => {
    state = (state * 1103515245 + 12345) % 2 ** 31;
    return pick(state / 2 ** 31);
  });
}

/** The byte ranges of a seekable file's zstd frames (not the index frame, not the table). */
function frameRanges(file: Uint8Array): [number, number][] {
  const table = decodeSeekTable(file.subarray(-seekTableSize(file.subarray(-9))!), file.byteLength);
  const ranges: [number, number][] = [];
  let at = 0;
  table.compressedSizes.forEach((size, f) => {
    if (table.decompressedSizes[f]! > 0) ranges.push([at, at + size]);
    at += size;
  });
  return ranges;
}

await toolTest(
  "verify: 1000 bit flips in the zstd frames of a .vma.zst all fail verify, and zstd -t",
  ["zstd"],
  async () => {
    await withTempDir(async (dir) => {
      await sparseDisk(`${dir}/disk.raw`);
      assert.equal(
        (await run(["backup", "--disk", `${dir}/disk.raw`, "-o", `${dir}/vm.vma.zst`])).code,
        0,
      );
      const original = await Deno.readFile(`${dir}/vm.vma.zst`);
      assert.equal((await run(["verify", `${dir}/vm.vma.zst`])).code, 0);
      // Flips go into the frames' blocks and checksums. The first 6 bytes of a frame (magic,
      // descriptor, window) hold bits that zstd itself ignores or cannot check (an unused
      // bit, a larger window): those are flipped in the next test, for verify alone.
      const ranges = frameRanges(original);
      const total = ranges.reduce((sum, [a, b]) => sum + (b - a - 6), 0);
      const flips = positions(17, 1000, (random) => Math.floor(random * total * 8));
      let zstdMissed = 0;
      for (const bit of flips) {
        let byte = Math.floor(bit / 8);
        const range = ranges.find(([a, b]) => byte < b - a - 6 || (byte -= b - a - 6, false))!;
        const at = range[0] + 6 + byte;
        const flipped = original.slice();
        flipped[at]! ^= 1 << (bit % 8);
        await Deno.writeFile(`${dir}/flip.vma.zst`, flipped);
        const { code, err } = await run(["verify", `${dir}/flip.vma.zst`]);
        assert.equal(code, 3, `the flip of bit ${bit % 8} at byte ${at} passed verify`);
        assert.equal(err.trim().split("\n").length, 1, err);
        const zstd = await new Deno.Command("zstd", {
          args: ["-q", "-t", `${dir}/flip.vma.zst`],
          stdout: "null",
          stderr: "null",
        }).output();
        if (zstd.code === 0) zstdMissed++;
      }
      assert.equal(zstdMissed, 0, "zstd -t noticed every flip too");
    });
  },
);

Deno.test("verify: flips in frame headers, the index frame and the seek table fail verify", async () => {
  await withTempDir(async (dir) => {
    await sparseDisk(`${dir}/disk.raw`);
    assert.equal(
      (await run(["backup", "--disk", `${dir}/disk.raw`, "-o", `${dir}/vm.vma.zst`])).code,
      0,
    );
    const original = await Deno.readFile(`${dir}/vm.vma.zst`);
    const ranges = frameRanges(original);
    const tail = ranges.at(-1)![1]; // the index frame and the seek table start here
    const targets = [
      ...ranges.slice(0, 8).flatMap(([start]) => [0, 1, 2, 3, 4, 5].map((i) => start + i)),
      ...positions(5, 60, (random) => tail + Math.floor(random * (original.byteLength - tail))),
    ];
    for (const at of targets) {
      for (const bit of [0, 4, 7]) {
        const flipped = original.slice();
        flipped[at]! ^= 1 << bit;
        await Deno.writeFile(`${dir}/flip.vma.zst`, flipped);
        const { code, err } = await run(["verify", `${dir}/flip.vma.zst`]);
        assert.equal(code, 3, `the flip of bit ${bit} at byte ${at} passed verify`);
        assert.match(err, /^error: /);
      }
    }
  });
});

Deno.test("verify: data flips in a plain .vma fail with its sidecar; without one it says so", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/disk.raw`, randomBytes(2 * MiB, 3));
    assert.equal(
      (await run(["backup", "--disk", `${dir}/disk.raw`, "-o", `${dir}/vm.vma`])).code,
      0,
    );
    const original = await Deno.readFile(`${dir}/vm.vma`);
    const sidecar = await Deno.readFile(`${dir}/vm.vma.idx`);
    // The data blocks: everything after the 12800-byte header but the 512-byte extent headers.
    const dataStart = 12800 + 512;
    const dataLength = original.byteLength - dataStart; // one extent of 32 clusters
    for (const at of positions(9, 200, (random) => dataStart + Math.floor(random * dataLength))) {
      const flipped = original.slice();
      flipped[at]! ^= 0x10;
      await Deno.writeFile(`${dir}/flip.vma`, flipped);
      await Deno.writeFile(`${dir}/flip.vma.idx`, sidecar);
      const checked = await run(["verify", `${dir}/flip.vma`]);
      assert.equal(checked.code, 3, `a flip at ${at} passed verify with the sidecar`);
      assert.match(checked.err, /does not match the SHA-256 in the index/);
      await Deno.remove(`${dir}/flip.vma.idx`);
      const unchecked = await run(["verify", `${dir}/flip.vma`, "--json"]);
      assert.equal(unchecked.code, 0, "without an index, data flips cannot be seen");
      assert.equal(JSON.parse(unchecked.out).checked.level, "structure");
    }
    const strict = await run(["verify", `${dir}/vm.vma`, "--require-data"]);
    assert.equal(strict.code, 0, strict.err);
    await Deno.rename(`${dir}/vm.vma.idx`, `${dir}/elsewhere.idx`);
    assert.equal((await run(["verify", `${dir}/vm.vma`, "--require-data"])).code, 3);
    const given = await run([
      "verify",
      `${dir}/vm.vma`,
      "--index",
      `${dir}/elsewhere.idx`,
      "--json",
    ]);
    assert.equal(given.code, 0, given.err);
    const report = JSON.parse(given.out);
    assert.equal(report.checked.level, "sha256");
    assert.deepEqual(report.checked.index, { source: "sidecar", path: `${dir}/elsewhere.idx` });
    assert.equal(report.checked.digestsChecked, report.checked.extentsWithData);
  });
});

Deno.test("verify: foreign, stale, truncated and corrupt indexes are exit 3; --no-index still reads", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/a.raw`, randomBytes(4 * MiB, 1)); // two extents
    await Deno.writeFile(`${dir}/b.raw`, randomBytes(MiB, 2));
    for (const name of ["a", "b"]) {
      const result = await run([
        "backup",
        "--disk",
        `${dir}/${name}.raw`,
        "-o",
        `${dir}/${name}.vma`,
      ]);
      assert.equal(result.code, 0);
      await run(["backup", "--disk", `${dir}/${name}.raw`, "-o", `${dir}/${name}.vma.zst`]);
    }
    const expectOne = async (args: string[], pattern: RegExp) => {
      const { code, err } = await run(["verify", ...args]);
      assert.equal(code, 3, err);
      assert.match(err, pattern);
      assert.equal(err.trim().split("\n").length, 1);
    };
    await expectOne([`${dir}/a.vma`, "--index", `${dir}/b.vma.idx`], /belongs to another archive/);
    const index = await Deno.readFile(`${dir}/a.vma.idx`);
    await Deno.writeFile(`${dir}/cut.idx`, index.subarray(0, index.byteLength - 7));
    await expectOne([`${dir}/a.vma`, "--index", `${dir}/cut.idx`], /truncated/);
    const corrupt = index.slice();
    corrupt[40]! ^= 2;
    await Deno.writeFile(`${dir}/corrupt.idx`, corrupt);
    await expectOne([`${dir}/a.vma`, "--index", `${dir}/corrupt.idx`], /digest does not match/);
    // An archive cut at an extent boundary, with the index of the whole one: stale.
    const archive = await Deno.readFile(`${dir}/a.vma`);
    await Deno.writeFile(`${dir}/short.vma`, archive.subarray(0, 12800 + 512 + 58 * 65536));
    await expectOne([`${dir}/short.vma`, "--index", `${dir}/a.vma.idx`], /missing cluster|index/);
    // A seek table whose sizes do not add up.
    const file = await Deno.readFile(`${dir}/a.vma.zst`);
    const bad = file.slice();
    const table = bad.byteLength - seekTableSize(bad.subarray(-9))!;
    bad[table + 8]! ^= 1; // the first frame's compressed size
    await Deno.writeFile(`${dir}/bad-table.vma.zst`, bad);
    await expectOne([`${dir}/bad-table.vma.zst`], /seek table: its frames add up/);
    const sequential = await run(["verify", `${dir}/bad-table.vma.zst`, "--no-index", "--json"]);
    assert.equal(sequential.code, 0, sequential.err);
    assert.equal(JSON.parse(sequential.out).checked.level, "frame-checksums");
    // A missing sidecar given by name is an I/O error.
    const missing = await run(["verify", `${dir}/a.vma`, "--index", `${dir}/none.idx`]);
    assert.equal(missing.code, 4);
  });
});

await toolTest("verify: a zstd-CLI archive has its frame checksums checked", ["zstd"], async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/disk.raw`, randomBytes(MiB, 4));
    assert.equal(
      (await run(["backup", "--disk", `${dir}/disk.raw`, "-o", `${dir}/vm.vma`, "--no-index"]))
        .code,
      0,
    );
    await Deno.writeFile(`${dir}/vm.vma.zst`, await tool("zstd", ["-q", "-c", `${dir}/vm.vma`]));
    const { code, out } = await run(["verify", `${dir}/vm.vma.zst`, "--json"]);
    assert.equal(code, 0);
    assert.deepEqual(
      [JSON.parse(out).checked.level, JSON.parse(out).checked.index],
      ["frame-checksums", null],
    );
    const text = await run(["verify", `${dir}/vm.vma.zst`]);
    assert.match(text.out, /every zstd frame's content checksum/);
  });
});
