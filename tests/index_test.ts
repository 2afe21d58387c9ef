// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The archive index and the seekable `.vma.zst`: pieces that rebuild the archive, indexes
 * that round-trip, random reads that equal the source bytes (seekable, plain with a
 * sidecar, plain scanned), the system zstd tools reading our files, and the memory bound.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  decodeIndex,
  decodeSeekTable,
  encodeIndex,
  IndexBuilder,
  IndexedArchive,
  NotSeekableError,
  type RangeReader,
  readEmbeddedIndex,
  SeekableZstdStream,
  seekTableSize,
  SeekTableWriter,
  VmaExtentStream,
  type VmaHeaderPiece,
  VmaIndexStream,
  type VmaRecord,
  VmaWriterStream,
  ZeroFilterStream,
  ZstdDecompressStream,
} from "../mod.ts";
import { diskArb, scrambledRecords } from "./_arbitraries.ts";
import { tool, toolTest, withTempDir } from "./_cli.ts";
import { FIXED, randomBytes } from "./_utils.ts";

/** A range reader over bytes in memory, counting what it reads. */
function memoryReader(bytes: Uint8Array, name = "memory"): RangeReader & { bytesRead: number } {
  return {
    name,
    size: bytes.byteLength,
    bytesRead: 0,
    read(offset, length) {
      if (offset + length > bytes.byteLength) {
        return Promise.reject(new Deno.errors.UnexpectedEof(`${name} ends at ${bytes.byteLength}`));
      }
      this.bytesRead += length;
      return Promise.resolve(bytes.slice(offset, offset + length));
    },
    close() {},
  };
}

function recordsOf(disks: Uint8Array[], seed: number, inOrder: boolean): VmaRecord[] {
  const devices = disks.map((disk, i): VmaRecord => ({
    type: "device",
    devId: i + 1,
    name: `drive-scsi${i}`,
    size: disk.byteLength,
  }));
  const clusters = inOrder
    ? disks.flatMap((disk, i) =>
      [...Array(Math.ceil(disk.byteLength / 65536)).keys()].map((c): VmaRecord => {
        const data = new Uint8Array(65536);
        data.set(disk.subarray(c * 65536, (c + 1) * 65536));
        return { type: "cluster", devId: i + 1, cluster: c, mask: 0xffff, data };
      })
    )
    : scrambledRecords(disks, seed);
  return [...devices, ...clusters];
}

function archiveStream(records: VmaRecord[], clustersPerExtent = 58) {
  return ReadableStream.from(records).pipeThrough(new ZeroFilterStream())
    .pipeThrough(new VmaWriterStream({ ...FIXED, clustersPerExtent, reuseBuffers: true }));
}

function chunked(bytes: Uint8Array, size: number): ReadableStream<Uint8Array> {
  const chunks: Uint8Array[] = [];
  for (let i = 0; i < bytes.byteLength; i += size) chunks.push(bytes.slice(i, i + size));
  return ReadableStream.from(chunks);
}

const caseArb = fc.record({
  disks: fc.array(diskArb, { minLength: 1, maxLength: 4 }),
  seed: fc.integer(),
  inOrder: fc.boolean(),
  clustersPerExtent: fc.integer({ min: 1, max: 59 }),
  chunk: fc.oneof(fc.integer({ min: 1, max: 3000 }), fc.integer({ min: 3000, max: 5 << 20 })),
  reads: fc.array(fc.tuple(fc.nat(), fc.double({ min: 0, max: 1, noNaN: true }), fc.nat()), {
    minLength: 1,
    maxLength: 12,
  }),
});

/** Random byte ranges of random devices, read through `archive`, equal the disks. */
async function assertReads(
  archive: IndexedArchive,
  disks: Uint8Array[],
  reads: [number, number, number][],
): Promise<void> {
  for (const [which, at, span] of reads) {
    const i = which % disks.length;
    const disk = disks[i]!;
    const offset = Math.floor(at * disk.byteLength);
    const length = Math.min(disk.byteLength - offset, span % (300_000));
    const device = archive.device(`drive-scsi${i}`)!;
    assert.deepEqual(
      await archive.read(device.devId, offset, length),
      disk.subarray(offset, offset + length),
    );
  }
  for (const [i, disk] of disks.entries()) {
    const device = archive.device(`drive-scsi${i}`)!;
    const map = archive.allocation(device.devId, 0, disk.byteLength);
    assert.equal(map.reduce((sum, part) => sum + part.length, 0), disk.byteLength);
    for (const part of map.filter((part) => part.zero)) {
      assert.ok(disk.subarray(part.offset, part.offset + part.length).every((b) => b === 0));
    }
  }
}

Deno.test("index: pieces rebuild the archive, in any chunking, and the index round-trips", async () => {
  await fc.assert(
    fc.asyncProperty(caseArb, async ({ disks, seed, inOrder, clustersPerExtent, chunk }) => {
      const records = recordsOf(disks, seed, inOrder);
      const archive = await new Response(archiveStream(records, clustersPerExtent)).bytes();
      const pieces = await Array.fromAsync(
        chunked(archive, chunk).pipeThrough(new VmaExtentStream()),
      );
      const rebuilt = new Uint8Array(archive.byteLength);
      let at = 0;
      for (const piece of pieces) {
        if (piece.type === "extent") assert.equal(piece.offset, at);
        rebuilt.set(piece.bytes, at);
        at += piece.bytes.byteLength;
      }
      assert.deepEqual(rebuilt, archive);
      const indexer = new VmaIndexStream();
      await chunked(archive, chunk).pipeThrough(new VmaExtentStream()).pipeThrough(indexer)
        .pipeTo(new WritableStream());
      const index = indexer.index!;
      assert.deepEqual(decodeIndex(encodeIndex(index)), index);
      assert.equal(index.archiveBytes, archive.byteLength);
    }),
    { numRuns: 40 },
  );
});

Deno.test("index: random reads through a seekable .vma.zst, a plain .vma with its sidecar, and a scan", async () => {
  await fc.assert(
    fc.asyncProperty(caseArb, async ({ disks, seed, inOrder, clustersPerExtent, reads }) => {
      const records = recordsOf(disks, seed, inOrder);
      const plain = await new Response(archiveStream(records, clustersPerExtent)).bytes();
      const seekable = await new Response(
        archiveStream(records, clustersPerExtent).pipeThrough(new VmaExtentStream())
          .pipeThrough(new SeekableZstdStream({ workers: 1 })),
      ).bytes();
      // The decompressed stream is the plain archive, byte for byte.
      const decoded = await new Response(
        ReadableStream.from([seekable]).pipeThrough(new ZstdDecompressStream()),
      ).bytes();
      assert.deepEqual(decoded, plain);
      const indexer = new VmaIndexStream();
      await ReadableStream.from([plain]).pipeThrough(new VmaExtentStream()).pipeThrough(indexer)
        .pipeTo(new WritableStream());
      const sidecar = encodeIndex(indexer.index!);
      for (
        const archive of [
          await IndexedArchive.open(memoryReader(seekable)),
          await IndexedArchive.open(memoryReader(plain), { sidecar }),
          await IndexedArchive.open(memoryReader(plain)),
        ]
      ) {
        try {
          await assertReads(archive, disks, reads);
        } finally {
          archive.close();
        }
      }
    }),
    { numRuns: 30 },
  );
});

Deno.test("index: a scan and a sidecar map the same clusters to the same places", async () => {
  const disks = [randomBytes(3 << 20, 1), new Uint8Array(200_000)];
  const plain = await new Response(archiveStream(recordsOf(disks, 5, false))).bytes();
  const indexer = new VmaIndexStream();
  await ReadableStream.from([plain]).pipeThrough(new VmaExtentStream()).pipeThrough(indexer)
    .pipeTo(new WritableStream());
  const scanned = await IndexedArchive.open(memoryReader(plain));
  try {
    const built = indexer.index!;
    assert.equal(scanned.indexSource, "scan");
    assert.deepEqual(scanned.index.runs, built.runs);
    assert.deepEqual(scanned.index.blockCounts, built.blockCounts);
  } finally {
    scanned.close();
  }
});

Deno.test("index: a read decodes only the extents it needs", async () => {
  const disk = randomBytes(16 << 20, 7);
  const seekable = await new Response(
    archiveStream(recordsOf([disk], 0, true)).pipeThrough(new VmaExtentStream())
      .pipeThrough(new SeekableZstdStream()),
  ).bytes();
  const reader = memoryReader(seekable);
  const archive = await IndexedArchive.open(reader);
  try {
    const opened = reader.bytesRead;
    const bytes = await archive.read(1, 9 << 20, 4096);
    assert.deepEqual(bytes, disk.subarray(9 << 20, (9 << 20) + 4096));
    // Random data does not compress: one extent's frames, about 3.8 MB, plus read-ahead at most.
    assert.ok(reader.bytesRead - opened < 3 * 3_900_000, `${reader.bytesRead - opened} bytes read`);
    assert.equal(archive.stats.extentsRead >= 1, true);
  } finally {
    archive.close();
  }
});

Deno.test("index: the seek table and frames follow the seekable format", async () => {
  const disk = randomBytes(5 << 20, 3);
  disk.fill(0, 1 << 20, 3 << 20);
  const file = await new Response(
    archiveStream(recordsOf([disk], 0, true)).pipeThrough(new VmaExtentStream())
      .pipeThrough(new SeekableZstdStream()),
  ).bytes();
  const tableSize = seekTableSize(file.subarray(-9))!;
  const table = decodeSeekTable(file.subarray(-tableSize), file.byteLength);
  let at = 0;
  for (let f = 0; f < table.compressedSizes.length; f++) {
    const frame = file.subarray(at, at + table.compressedSizes[f]!);
    const magic = new DataView(frame.buffer, frame.byteOffset).getUint32(0, true);
    if (table.decompressedSizes[f] === 0) {
      assert.equal(magic, 0x184d2a5b, "the only frame without content is the index");
    } else {
      assert.equal(magic, 0xfd2fb528);
      assert.equal(frame[4]! & 0x04, 0x04, `frame ${f} has a content checksum`);
      const trailer = new DataView(frame.buffer, frame.byteOffset + frame.byteLength - 4).getUint32(
        0,
        true,
      );
      assert.equal(trailer, table.checksums![f], `frame ${f}: the table has its checksum`);
    }
    at += frame.byteLength;
  }
  const embedded = await readEmbeddedIndex(memoryReader(file));
  assert.equal(embedded?.index?.digestScope, "zstd-frame");
  assert.equal(embedded?.indexFrame, table.compressedSizes.length - 1);
});

await toolTest("index: the system zstd and pzstd read a seekable archive as the plain one", [
  "zstd",
  "pzstd",
], async () => {
  await withTempDir(async (dir) => {
    const disk = randomBytes(6 << 20, 9);
    disk.fill(0, 0, 2 << 20);
    const records = recordsOf([disk, new Uint8Array(70_000).fill(1)], 4, false);
    const plain = await new Response(archiveStream(records)).bytes();
    await Deno.writeFile(
      `${dir}/x.vma.zst`,
      archiveStream(records).pipeThrough(new VmaExtentStream()).pipeThrough(
        new SeekableZstdStream(),
      ),
    );
    await Deno.writeFile(`${dir}/x.vma`, plain);
    await tool("zstd", ["-q", "-t", `${dir}/x.vma.zst`]); // throws unless it exits 0
    const listing = new TextDecoder().decode(await tool("zstd", ["-lv", `${dir}/x.vma.zst`]));
    assert.match(listing, /Check: XXH64/);
    assert.match(listing, /Skippable Frames: 2/);
    for (const program of ["zstd", "pzstd"]) {
      const decoded = await tool(program, ["-q", "-d", "-c", `${dir}/x.vma.zst`]);
      assert.deepEqual(decoded, plain, `${program} decodes to the plain archive`);
    }
  });
});

Deno.test("index: hostile indexes and tables are refused with one clear error", async () => {
  const disk = randomBytes(1 << 20, 2);
  const plain = await new Response(archiveStream(recordsOf([disk], 0, true))).bytes();
  const indexer = new VmaIndexStream();
  await ReadableStream.from([plain]).pipeThrough(new VmaExtentStream()).pipeThrough(indexer)
    .pipeTo(new WritableStream());
  const sidecar = encodeIndex(indexer.index!);
  const reject = async (
    reader: RangeReader,
    sidecarBytes: Uint8Array | undefined,
    pattern: RegExp,
  ) => {
    await assert.rejects(IndexedArchive.open(reader, { sidecar: sidecarBytes }), (error: Error) => {
      assert.match(error.message, pattern);
      assert.equal(error.message.split("\n").length, 1);
      return true;
    });
  };
  await reject(memoryReader(plain), sidecar.subarray(0, sidecar.byteLength - 1), /truncated/);
  const flipped = sidecar.slice();
  flipped[100]! ^= 1;
  await reject(memoryReader(plain), flipped, /index digest does not match/);
  // Another archive's index: same shape, another UUID.
  const foreign = encodeIndex({ ...indexer.index!, uuid: "00000000-0000-4000-8000-000000000001" });
  await reject(memoryReader(plain), foreign, /belongs to another archive/);
  await reject(
    memoryReader(plain.subarray(0, plain.byteLength - 4096)),
    sidecar,
    /truncated, or a stale index/,
  );
  // A seek table whose sizes do not add up.
  const table = new SeekTableWriter();
  table.add(100, 512, 0);
  await reject(
    memoryReader(new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, ...table.encode()])),
    undefined,
    /add up to 100 bytes, not 4/,
  );
  // A zstd file without a seek table cannot be read at random.
  await assert.rejects(
    IndexedArchive.open(memoryReader(Uint8Array.of(0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0, 0, 0))),
    NotSeekableError,
  );
});

Deno.test("index: a 1 TiB disk written in order keeps at most 16 MiB of index state", () => {
  // 2^24 clusters of 64 KiB in extents of 58, as Proxmox writes them, all data.
  const extents = Math.ceil(2 ** 24 / 58);
  const header: VmaHeaderPiece = {
    type: "header",
    bytes: new Uint8Array(12800),
    header: {
      uuid: FIXED.uuid!,
      ctime: 0,
      configs: [],
      devices: [{ devId: 1, name: "drive-scsi0", size: 2 ** 40 }],
      headerSize: 12800,
    },
  };
  const builder = new IndexBuilder(header);
  const table = new SeekTableWriter();
  const digest = new Uint8Array(32).fill(7);
  table.add(300, 12800, 0);
  for (let e = 0, cluster = 0; e < extents; e++) {
    const count = Math.min(58, 2 ** 24 - cluster);
    const runs = [{ devId: 1, cluster, count, zero: false }];
    cluster += count;
    builder.addExtent({ blockCount: 16 * count, slotCount: count, runs }, digest);
    table.add(120, 512, e); // the extent header's frame
    table.add(1_900_000, count * 65536, e); // its data frame
  }
  const bytes = builder.memoryBytes + table.memoryBytes;
  assert.ok(bytes <= 16 * 2 ** 20, `${(bytes / 2 ** 20).toFixed(2)} MiB`);
  const index = builder.finish({ digestScope: "zstd-frame" });
  assert.equal(index.runs.counts.length, 1, "one run for the whole disk");
  assert.equal(index.blockCounts.length, extents);
});

Deno.test("index: extract --disk and --stdout of an indexed archive read only that disk's extents", async () => {
  const { main } = await import("../cli.ts");
  await withTempDir(async (dir) => {
    const disks = [randomBytes(8 << 20, 21), randomBytes(8 << 20, 22)];
    await Deno.writeFile(`${dir}/a.raw`, disks[0]!);
    await Deno.writeFile(`${dir}/b.raw`, disks[1]!);
    let out = "";
    const decoder = new TextDecoder();
    const collect = (bytes: Uint8Array) =>
      Promise.resolve((out += decoder.decode(bytes), bytes.length));
    const context = {
      stdout: { write: collect },
      stderr: { write: (bytes: Uint8Array) => Promise.resolve(bytes.length) },
      stderrIsTerminal: false,
      signal: new AbortController().signal,
    };
    for (const name of ["vm.vma.zst", "vm.vma"]) {
      const backup = ["backup", "--disk", `scsi0=${dir}/a.raw`, "--disk", `scsi1=${dir}/b.raw`];
      assert.equal(await main([...backup, "-o", `${dir}/${name}`], context), 0);
      const size = (await Deno.stat(`${dir}/${name}`)).size;
      out = "";
      const target = `${dir}/out-${name}`;
      assert.equal(
        await main(["extract", `${dir}/${name}`, target, "--disk", "scsi1", "--json"], context),
        0,
      );
      const report = JSON.parse(out);
      assert.equal(report.access, "random");
      assert.ok(report.bytesRead < 0.6 * size, `${report.bytesRead} of ${size} bytes read`);
      assert.deepEqual(await Deno.readFile(`${target}/disk-drive-scsi1.raw`), disks[1]);
    }
  });
});
