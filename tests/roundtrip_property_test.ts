// Copyright 2026 the vmabackup authors. MIT license.
/** Property-based round trips: records → writer → reader → identical device bytes. */
import assert from "node:assert/strict";
import fc from "fast-check";
import { RestoreSink, VmaReaderStream, type VmaRecord, VmaWriterStream } from "../mod.ts";
import { diskClusters, randomBytes, restoreInMemory, writeArchive } from "./_utils.ts";

const MiB = 1 << 20;

/** Sizes that stress the edges: tiny, sector-sized, around 4 KiB and 64 KiB, several MiB. */
const sizeArb = fc.oneof(
  fc.integer({ min: 1, max: 4 * MiB }),
  fc.integer({ min: 1, max: 64 }).map((n) => n * 65536),
  fc.integer({ min: 1, max: 256 }).map((n) => n * 4096 + 512),
  fc.constantFrom(1, 511, 512, 4095, 4096, 4097, 65535, 65536, 65537, 540672),
);

/** Content: zero by default, with random, constant and zero runs laid over it. */
const segmentArb = fc.record({
  at: fc.double({ min: 0, max: 1, noNaN: true }),
  length: fc.integer({ min: 1, max: 300_000 }),
  kind: fc.constantFrom("random", "constant", "zero"),
  seed: fc.integer({ min: 1, max: 1 << 30 }),
});

const diskArb = fc.record({ size: sizeArb, segments: fc.array(segmentArb, { maxLength: 6 }) })
  .map(({ size, segments }) => {
    const bytes = new Uint8Array(size);
    for (const { at, length, kind, seed } of segments) {
      const start = Math.floor(at * size);
      const end = Math.min(size, start + length);
      if (kind === "random") bytes.set(randomBytes(end - start, seed), start);
      else bytes.fill(kind === "constant" ? (seed & 0xff) | 1 : 0, start, end);
    }
    return bytes;
  });

const caseArb = fc.record({
  disks: fc.array(diskArb, { minLength: 1, maxLength: 8 }),
  orderSeed: fc.integer(),
  clustersPerExtent: fc.integer({ min: 1, max: 59 }),
  readChunk: fc.oneof(fc.integer({ min: 1, max: 5000 }), fc.integer({ min: 5000, max: 4 * MiB })),
});

/** A seeded shuffle, so every failure is reproducible from its seed. */
function shuffled<T>(items: T[], seed: number): T[] {
  const out = [...items];
  let state = seed | 1;
  for (let i = out.length - 1; i > 0; i--) {
    state = (state * 1103515245 + 12345) & 0x7fffffff;
    const j = state % (i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

/** Every device's clusters in a random order, devices randomly interleaved. */
function scrambledRecords(disks: Uint8Array[], seed: number): VmaRecord[] {
  const queues = disks.map((disk, i) => {
    const count = Math.ceil(disk.byteLength / 65536);
    // 0xee past each device end: the writer must neither store it nor leak it.
    return diskClusters(i + 1, disk, shuffled([...Array(count).keys()], seed + i), 0xee);
  });
  const tags = shuffled(queues.flatMap((queue, i) => queue.map(() => i)), seed);
  return tags.map((i) => queues[i]!.shift()!);
}

Deno.test("round trip: 1-8 devices, odd sizes, random data and order give identical bytes", async () => {
  await fc.assert(
    fc.asyncProperty(caseArb, async ({ disks, orderSeed, clustersPerExtent, readChunk }) => {
      const records: VmaRecord[] = [
        { type: "config", name: "qemu-server.conf", data: new TextEncoder().encode("cores: 1\n") },
        ...disks.map((disk, i): VmaRecord => ({
          type: "device",
          devId: i + 1,
          name: `drive-scsi${i}`,
          size: disk.byteLength,
        })),
        ...scrambledRecords(disks, orderSeed),
      ];
      const archive = await writeArchive(records, { clustersPerExtent });
      const restored = await restoreInMemory(archive, {}, readChunk);
      assert.equal(restored.size, disks.length);
      disks.forEach((disk, i) => assert.deepEqual(restored.get(`drive-scsi${i}`), disk));
    }),
    { numRuns: 60 },
  );
});

Deno.test("round trip through RestoreSink: files equal the disks and have their exact size", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(diskArb, { minLength: 1, maxLength: 3 }),
      fc.integer(),
      async (disks, seed) => {
        const dir = await Deno.makeTempDir();
        try {
          const records: VmaRecord[] = [
            ...disks.map((disk, i): VmaRecord => ({
              type: "device",
              devId: i + 1,
              name: `disk${i}`,
              size: disk.byteLength,
            })),
            ...scrambledRecords(disks, seed),
          ];
          await ReadableStream.from([await writeArchive(records)])
            .pipeThrough(new VmaReaderStream())
            .pipeTo(new RestoreSink({ target: (device) => `${dir}/${device.name}.raw` }));
          for (const [i, disk] of disks.entries()) {
            assert.deepEqual(await Deno.readFile(`${dir}/disk${i}.raw`), disk);
          }
        } finally {
          await Deno.remove(dir, { recursive: true });
        }
      },
    ),
    { numRuns: 20 },
  );
});

Deno.test("round trip: a device of size 0 is rejected, since VMA cannot store it", async () => {
  const records: VmaRecord[] = [{ type: "device", devId: 1, name: "drive-scsi0", size: 0 }];
  await assert.rejects(
    new Response(ReadableStream.from(records).pipeThrough(new VmaWriterStream())).bytes(),
    { name: "RangeError", message: /VMA cannot store an empty device/ },
  );
});
