// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Synthetic full backups: the changed clusters and a base archive make a complete archive
 * that restores, on its own, to the base with the changes applied; unchanged extents are
 * copied as stored.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  archiveOutput,
  fileRangeReader,
  IndexedArchive,
  SeekableZstdStream,
  syntheticFull,
  VmaIndexStream,
  type VmaRecord,
  VmaWriterStream,
  ZeroFilterStream,
  ZstdDecompressStream,
} from "../mod.ts";
import { main } from "../cli.ts";
import { diskArb, scrambledRecords } from "./_arbitraries.ts";
import { withTempDir } from "./_cli.ts";
import { randomBytes, restoreInMemory } from "./_utils.ts";

const CLUSTER = 65536;

function devices(disks: Uint8Array[]): VmaRecord[] {
  return disks.map((disk, i) => ({
    type: "device",
    devId: i + 1,
    name: `drive-scsi${i}`,
    size: disk.byteLength,
  }));
}

/** The changes: for each chosen cluster, new random content or zeros. */
function changedRecords(
  disks: Uint8Array[],
  picks: [number, number, boolean][],
  seed: number,
): { records: VmaRecord[]; after: Uint8Array[] } {
  const after = disks.map((disk) => disk.slice());
  const records: VmaRecord[] = [];
  const done = new Set<string>();
  for (const [which, at, zero] of picks) {
    const d = which % disks.length;
    const clusters = Math.ceil(disks[d]!.byteLength / CLUSTER);
    const cluster = Math.floor(at * clusters);
    if (done.has(`${d}:${cluster}`)) continue;
    done.add(`${d}:${cluster}`);
    const start = cluster * CLUSTER;
    const length = Math.min(CLUSTER, disks[d]!.byteLength - start);
    if (zero) {
      after[d]!.fill(0, start, start + length);
      records.push({ type: "zeros", devId: d + 1, cluster, count: 1 });
    } else {
      const data = new Uint8Array(CLUSTER);
      data.set(randomBytes(length, seed + records.length));
      after[d]!.set(data.subarray(0, length), start);
      records.push({ type: "cluster", devId: d + 1, cluster, mask: 0xffff, data });
    }
  }
  return { records, after };
}

const caseArb = fc.record({
  disks: fc.array(diskArb, { minLength: 1, maxLength: 3 }),
  seed: fc.integer({ min: 1, max: 1 << 30 }),
  picks: fc.array(
    fc.tuple(fc.nat(), fc.double({ min: 0, max: 0.999, noNaN: true }), fc.boolean()),
    { maxLength: 20 },
  ),
});

Deno.test("synthetic full: base + changes restore to the base with the changes, on their own", async () => {
  await fc.assert(
    fc.asyncProperty(caseArb, async ({ disks, seed, picks }) => {
      await withTempDir(async (dir) => {
        await Deno.writeFile(
          `${dir}/base.vma.zst`,
          ReadableStream.from([...devices(disks), ...scrambledRecords(disks, seed)])
            .pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
            .pipeThrough(archiveOutput({ compression: "zstd" })),
        );
        const { records, after } = changedRecords(disks, picks, seed);
        for (const copyFrames of [true, false]) {
          const base = await IndexedArchive.open(await fileRangeReader(`${dir}/base.vma.zst`));
          const synthetic = syntheticFull({ base, copyFrames });
          const output = copyFrames
            ? synthetic.readable.pipeThrough(new SeekableZstdStream({ workers: 1 }))
            : synthetic.readable.pipeThrough(new VmaIndexStream());
          const name = `${dir}/next-${copyFrames}.vma${copyFrames ? ".zst" : ""}`;
          const writing = Deno.writeFile(name, output);
          await ReadableStream.from([...devices(disks), ...records])
            .pipeThrough(new ZeroFilterStream()).pipeTo(synthetic.writable);
          await writing;
          base.close();
          // Decoded sequentially by the strict reader: complete, and the new disk contents.
          const file = await Deno.readFile(name);
          const plain = copyFrames
            ? await new Response(
              ReadableStream.from([file]).pipeThrough(new ZstdDecompressStream()),
            )
              .bytes()
            : file;
          const restored = await restoreInMemory(plain);
          after.forEach((disk, i) => assert.deepEqual(restored.get(`drive-scsi${i}`), disk));
        }
      });
    }),
    { numRuns: 25 },
  );
});

Deno.test("synthetic full: unchanged extents are copied, the rest rewritten; verify checks all", async () => {
  await withTempDir(async (dir) => {
    const disk = randomBytes(32 << 20, 11); // 512 clusters: 9 extents
    const disks = [disk];
    await Deno.writeFile(
      `${dir}/base.vma.zst`,
      ReadableStream.from([
        ...devices(disks),
        ...scrambledRecords(disks, 0).sort((a, b) =>
          (a as { cluster: number }).cluster - (b as { cluster: number }).cluster
        ),
      ]).pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
        .pipeThrough(archiveOutput({ compression: "zstd" })),
    );
    // Two changed clusters, in the first and the fifth extent.
    const { records, after } = changedRecords(
      disks,
      [[0, 10 / 512, false], [0, 240 / 512, true]],
      3,
    );
    const base = await IndexedArchive.open(await fileRangeReader(`${dir}/base.vma.zst`));
    const synthetic = syntheticFull({ base });
    const writing = Deno.writeFile(
      `${dir}/next.vma.zst`,
      synthetic.readable.pipeThrough(new SeekableZstdStream()),
    );
    await ReadableStream.from([...devices(disks), ...records]).pipeTo(synthetic.writable);
    await writing;
    base.close();
    assert.deepEqual(synthetic.stats.changedClusters, 2);
    assert.equal(synthetic.stats.copiedExtents, 7, "the 7 unchanged extents were copied");
    assert.equal(synthetic.stats.rewrittenClusters, 2 * 58 - 2);
    const next = await IndexedArchive.open(await fileRangeReader(`${dir}/next.vma.zst`));
    try {
      assert.deepEqual(await next.read(1, 0, disk.byteLength), after[0]);
    } finally {
      next.close();
    }
    const write = (bytes: Uint8Array) => Promise.resolve(bytes.length);
    const context = {
      stdout: { write },
      stderr: { write },
      stderrIsTerminal: false,
      signal: new AbortController().signal,
    };
    assert.equal(await main(["verify", `${dir}/next.vma.zst`, "--require-data"], context), 0);
  });
});

Deno.test("synthetic full: a device the base does not have, or of another size, is refused", async () => {
  await withTempDir(async (dir) => {
    const disks = [randomBytes(200_000, 1)];
    await Deno.writeFile(
      `${dir}/base.vma.zst`,
      ReadableStream.from([...devices(disks), ...scrambledRecords(disks, 1)])
        .pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
        .pipeThrough(archiveOutput({ compression: "zstd" })),
    );
    const base = await IndexedArchive.open(await fileRangeReader(`${dir}/base.vma.zst`));
    try {
      const synthetic = syntheticFull({ base });
      synthetic.readable.pipeTo(new WritableStream()).catch(() => {});
      const grown: VmaRecord = { type: "device", devId: 1, name: "drive-scsi0", size: 300_000 };
      await assert.rejects(
        ReadableStream.from([grown]).pipeTo(synthetic.writable),
        /not in the base archive as it is/,
      );
    } finally {
      base.close();
    }
  });
});

Deno.test("synthetic full: a base frame damaged after the base was indexed fails both sides, at once", async () => {
  await withTempDir(async (dir) => {
    const disks = [randomBytes(16 << 20, 5)]; // 256 clusters: 5 extents
    const path = `${dir}/base.vma.zst`;
    await Deno.writeFile(
      path,
      ReadableStream.from([...devices(disks), ...scrambledRecords(disks, 5)])
        .pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
        .pipeThrough(archiveOutput({ compression: "zstd" })),
    );
    // A byte in the middle of the file: inside a data frame, far from the index at the end.
    const bytes = await Deno.readFile(path);
    bytes[bytes.byteLength >> 1]! ^= 0x40;
    await Deno.writeFile(path, bytes);
    const base = await IndexedArchive.open(await fileRangeReader(path));
    try {
      const synthetic = syntheticFull({ base });
      const writing = new Response(synthetic.readable.pipeThrough(new SeekableZstdStream()))
        .bytes();
      const feeding = ReadableStream.from([
        ...devices(disks),
        { type: "zeros", devId: 1, cluster: 0, count: 1 },
      ]).pipeTo(synthetic.writable);
      // Before, the failure stayed on the writable side and the pieces never ended.
      let timer: ReturnType<typeof setTimeout> | undefined;
      const hang = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error("the synthetic full hung")), 20_000);
      });
      try {
        for (const side of [feeding, writing]) {
          await assert.rejects(
            Promise.race([side, hang]),
            /does not match the SHA-256 in the index|checksum/,
          );
        }
      } finally {
        clearTimeout(timer);
      }
    } finally {
      base.close();
    }
  });
});
