// Copyright 2026 the vmabackup authors. MIT license.
/**
 * What serving an archive relies on: random reads that recycle their buffers (decoded
 * extents, stored frames, replies) and still equal the source bytes under concurrent
 * readers and a cache too small to keep anything; reads into reused buffers; the NBD
 * server's afterReply hook; the archive exports against NbdClient; zstd checksums that
 * still catch corruption when the index's SHA-256 is skipped.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  archiveExports,
  IndexedArchive,
  NbdClient,
  NbdServer,
  type RangeReader,
  SeekableZstdStream,
  VmaExtentStream,
  type VmaRecord,
  VmaWriterStream,
  ZeroFilterStream,
} from "../mod.ts";
import { diskArb } from "./_arbitraries.ts";
import { FIXED, randomBytes } from "./_utils.ts";

const MiB = 1 << 20;

/** A range reader over bytes in memory, with readInto, as files have it. */
function memoryReader(bytes: Uint8Array): RangeReader & { cut(at: number): void } {
  let size = bytes.byteLength;
  const check = (offset: number, length: number) => {
    if (offset + length > size) throw new Deno.errors.UnexpectedEof(`memory ends at ${size}`);
  };
  return {
    name: "memory",
    size: bytes.byteLength,
    async read(offset, length) {
      await Promise.resolve();
      check(offset, length);
      return bytes.slice(offset, offset + length);
    },
    async readInto(offset, target) {
      await Promise.resolve();
      check(offset, target.byteLength);
      target.set(bytes.subarray(offset, offset + target.byteLength));
    },
    cut(at) {
      size = at;
    },
    close() {},
  };
}

function records(disks: Uint8Array[]): VmaRecord[] {
  return [
    ...disks.map((disk, i): VmaRecord => ({
      type: "device",
      devId: i + 1,
      name: `drive-scsi${i}`,
      size: disk.byteLength,
    })),
    ...disks.flatMap((disk, i) =>
      [...Array(Math.ceil(disk.byteLength / 65536)).keys()].map((c): VmaRecord => {
        const data = new Uint8Array(65536);
        data.set(disk.subarray(c * 65536, (c + 1) * 65536));
        return { type: "cluster", devId: i + 1, cluster: c, mask: 0xffff, data };
      })
    ),
  ];
}

async function seekable(disks: Uint8Array[], clustersPerExtent = 58): Promise<Uint8Array> {
  return await new Response(
    ReadableStream.from(records(disks)).pipeThrough(new ZeroFilterStream())
      .pipeThrough(new VmaWriterStream({ ...FIXED, clustersPerExtent, reuseBuffers: true }))
      .pipeThrough(new VmaExtentStream()).pipeThrough(new SeekableZstdStream({ workers: 1 })),
  ).bytes();
}

Deno.test("archive reads: a sequential reader's empty reads at the end of a disk of whole clusters", async () => {
  // The second read continues the first: there is no next cluster to look up. (It threw
  // "the index does not map cluster 1"; the property below found it now and then.)
  for (const size of [65536, 131072, 100000]) {
    const disk = new Uint8Array(size).fill(7, 0, 4096);
    const archive = await IndexedArchive.open(memoryReader(await seekable([disk], 2)), {
      cacheBytes: 1,
      workers: 1,
    });
    try {
      for (let i = 0; i < 2; i++) assert.equal((await archive.read(1, size, 0)).byteLength, 0);
      assert.deepEqual(await archive.read(1, 0, 4097), disk.subarray(0, 4097));
    } finally {
      archive.close();
    }
  }
});

Deno.test("archive reads with recycled buffers: many at once, a cache too small to keep anything, reused target buffers", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(diskArb, { minLength: 1, maxLength: 3 }),
      fc.integer({ min: 2, max: 59 }),
      fc.array(fc.tuple(fc.nat(), fc.double({ min: 0, max: 1, noNaN: true }), fc.nat()), {
        minLength: 1,
        maxLength: 24,
      }),
      fc.constantFrom(1, 300_000, 16 * MiB),
      fc.boolean(),
      async (disks, clustersPerExtent, reads, cacheBytes, trust) => {
        const bytes = await seekable(disks, clustersPerExtent);
        const archive = await IndexedArchive.open(memoryReader(bytes), {
          cacheBytes,
          readsInFlight: 2,
          workers: 1,
          trustFrameChecksums: trust,
        });
        try {
          // Twice, all at once: the second round hits extents whose buffers were reused.
          for (let round = 0; round < 2; round++) {
            await Promise.all(reads.map(async ([which, at, span], k) => {
              const i = which % disks.length;
              const disk = disks[i]!;
              const offset = Math.floor(at * disk.byteLength);
              const length = Math.min(disk.byteLength - offset, span % 400_000);
              const into = k % 2 === 0 ? randomBytes(length + 17, k) : undefined; // dirty
              const got = await archive.read(i + 1, offset, length, into);
              assert.deepEqual(got, disk.subarray(offset, offset + length));
            }));
          }
        } finally {
          archive.close();
        }
      },
    ),
    { numRuns: 40 },
  );
});

Deno.test("archive reads: a stored frame cut away or corrupted is an error, with or without the SHA-256 check", async () => {
  const disk = randomBytes(4 * MiB, 5);
  const bytes = await seekable([disk]);
  for (const trust of [false, true]) {
    const cut = memoryReader(bytes);
    const archive = await IndexedArchive.open(cut, { trustFrameChecksums: trust });
    try {
      cut.cut(200_000);
      await assert.rejects(archive.read(1, 3 * MiB, 4096), Deno.errors.UnexpectedEof);
    } finally {
      archive.close();
    }
    const flipped = bytes.slice();
    flipped[100_000]! ^= 0x40; // inside the first data frame
    const bad = await IndexedArchive.open(memoryReader(flipped), { trustFrameChecksums: trust });
    try {
      await assert.rejects(bad.read(1, 0, 65536), { name: "VmaFormatError" });
    } finally {
      bad.close();
    }
  }
});

Deno.test("NbdServer: afterReply callbacks run once each, after the reply is written or dropped", async () => {
  const events: string[] = [];
  let replies = 0;
  const server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
    d: {
      size: 4 * MiB,
      read(offset, length, context) {
        context.afterReply!(() => events.push(`after ${offset} (${replies} replies seen)`));
        return new Uint8Array(length).fill(1);
      },
    },
  });
  try {
    const client = await NbdClient.connect(server.uri("d"));
    const buffer = new Uint8Array(MiB);
    await client.read(0, buffer);
    replies++;
    await client.read(MiB, buffer);
    replies++;
    await client.close();
    await server.disconnected;
    assert.deepEqual(events, ["after 0 (0 replies seen)", "after 1048576 (1 replies seen)"]);
  } finally {
    await server.close();
  }
});

Deno.test("archiveExports: each disk as a read-only export; holes where the archive has zero clusters; an unknown disk is refused", async () => {
  const a = new Uint8Array(3 * MiB);
  a.set(randomBytes(MiB, 1), MiB);
  const b = randomBytes(65536 + 4096, 2);
  const archive = await IndexedArchive.open(memoryReader(await seekable([a, b])));
  try {
    assert.throws(() => archiveExports(archive, { disks: ["scsi7"] }), /no disk named 'scsi7'/);
    const exports = archiveExports(archive, { disks: ["scsi1"] });
    assert.deepEqual([...exports.keys()], ["drive-scsi1"]);
    const all = archiveExports(archive);
    await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, all);
    await using client = await NbdClient.connect(server.uri("drive-scsi0"), {
      metaContexts: ["base:allocation"],
    });
    const extents = await Array.fromAsync(client.extents("base:allocation"));
    assert.deepEqual(extents.map((e) => [e.offset, e.length, e.flags]), [
      [0, MiB, 3],
      [MiB, MiB, 0],
      [2 * MiB, MiB, 3],
    ]);
    const bytes = new Uint8Array(a.byteLength);
    await client.read(0, bytes);
    assert.deepEqual(bytes, a);
    await using second = await NbdClient.connect(server.uri("drive-scsi1"));
    const tail = new Uint8Array(b.byteLength);
    await second.read(0, tail);
    assert.deepEqual(tail, b);
    await assert.rejects(second.write(0, new Uint8Array(512)));
  } finally {
    archive.close();
  }
});
