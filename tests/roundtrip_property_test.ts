// Copyright 2026 the vmabackup authors. MIT license.
/** Property-based round trips: records → writer → reader → identical device bytes. */
import assert from "node:assert/strict";
import fc from "fast-check";
import { RestoreSink, VmaReaderStream, type VmaRecord, VmaWriterStream } from "../mod.ts";
import { restoreInMemory, writeArchive } from "./_utils.ts";
import { diskArb, MiB, scrambledRecords } from "./_arbitraries.ts";

const caseArb = fc.record({
  disks: fc.array(diskArb, { minLength: 1, maxLength: 8 }),
  orderSeed: fc.integer(),
  clustersPerExtent: fc.integer({ min: 1, max: 59 }),
  readChunk: fc.oneof(fc.integer({ min: 1, max: 5000 }), fc.integer({ min: 5000, max: 4 * MiB })),
});

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
