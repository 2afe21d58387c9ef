// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The buffer ownership rule: what a stage emits belongs to its receiver unless the pipeline
 * opted in to `reuseBuffers`. So `tee()` and any fan-out are safe with default options,
 * whatever the timing of the consumers. Every cluster of the test disks has content of its
 * own, so a buffer reused too early shows as different bytes.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  CLUSTER_SIZE,
  fileByteSource,
  rawDiskSource,
  releaseChunk,
  VmaReaderStream,
  type VmaRecord,
  VmaWriterStream,
  ZeroFilterStream,
  ZstdCompressStream,
  ZstdDecompressStream,
} from "../mod.ts";
import { randomBytes } from "./_utils.ts";
import { withTempDir } from "./_cli.ts";

/** How a consumer waits before each item: not, a microtask, a macrotask, or 1 ms. */
const timingArb = fc.array(fc.constantFrom(0, 1, 2, 3), { minLength: 1, maxLength: 12 });

/** A pass-through that waits as `timing` says before each item, cycling through it. */
function jitter<T>(timing: number[]): TransformStream<T, T> {
  let i = 0;
  return new TransformStream<T, T>({
    async transform(item, controller) {
      const wait = timing[i++ % timing.length];
      if (wait === 1) await Promise.resolve();
      else if (wait === 2) await new Promise((resolve) => setTimeout(resolve, 0));
      else if (wait === 3) await new Promise((resolve) => setTimeout(resolve, 1));
      controller.enqueue(item);
    },
  });
}

/** A disk whose clusters all differ: random bytes with a few zero runs laid over them. */
function testDisk(size: number, seed: number): Uint8Array<ArrayBuffer> {
  const bytes = randomBytes(size, seed);
  for (let at = (seed % 5) * CLUSTER_SIZE; at < size; at += 7 * CLUSTER_SIZE) {
    bytes.fill(0, at, Math.min(size, at + 2 * CLUSTER_SIZE + 4096));
  }
  return bytes;
}

/** The first device of a record stream, rebuilt from copies of its cluster data. */
async function deviceBytes(records: ReadableStream<VmaRecord>): Promise<Uint8Array> {
  let bytes = new Uint8Array(0);
  await records.pipeTo(
    new WritableStream({
      write(record) {
        if (record.type === "device") bytes = new Uint8Array(record.size);
        if (record.type !== "cluster" || record.data === null) return;
        const start = record.cluster * CLUSTER_SIZE;
        bytes.set(record.data.subarray(0, Math.min(CLUSTER_SIZE, bytes.byteLength - start)), start);
        record.lease?.release();
      },
    }),
  );
  return bytes;
}

/** Archive bytes → the first device's bytes. */
function restore(archive: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  return deviceBytes(archive.pipeThrough(new VmaReaderStream()));
}

/** Records → zero filter → writer: the archive of one branch. */
function archiveOf(records: ReadableStream<VmaRecord>): ReadableStream<Uint8Array> {
  return records.pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream());
}

/** First differing byte, or -1, for a short assertion message. */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.byteLength !== b.byteLength) return Math.min(a.byteLength, b.byteLength);
  return a.findIndex((byte, i) => byte !== b[i]);
}

const diskArb = fc.record({
  clusters: fc.integer({ min: 1, max: 96 }),
  tail: fc.constantFrom(0, 512, 4096, 40_000),
  seed: fc.integer({ min: 1, max: 1 << 30 }),
});

Deno.test("rawDiskSource() → tee() → two zero filter → writer chains restore identically", async () => {
  await withTempDir(async (dir) => {
    await fc.assert(
      fc.asyncProperty(
        diskArb,
        fc.constantFrom(1, 2, 16),
        timingArb,
        timingArb,
        async ({ clusters, tail, seed }, readClusters, timingA, timingB) => {
          const disk = testDisk(clusters * CLUSTER_SIZE + tail, seed);
          const path = `${dir}/disk-${seed}.raw`;
          await Deno.writeFile(path, disk);
          const source = rawDiskSource(path, {
            name: "drive-scsi0",
            readSize: readClusters * CLUSTER_SIZE,
          });
          const [a, b] = source.tee();
          const restored = await Promise.all([
            restore(archiveOf(a.pipeThrough(jitter(timingA)))),
            restore(archiveOf(b.pipeThrough(jitter(timingB)))),
          ]);
          await Deno.remove(path);
          assert.equal(firstDifference(restored[0], disk), -1, "branch A");
          assert.equal(firstDifference(restored[1], disk), -1, "branch B");
        },
      ),
      { numRuns: 25 },
    );
  });
});

Deno.test("fan-out to three consumers at every stage: records, archive bytes, file chunks", async () => {
  await withTempDir(async (dir) => {
    await fc.assert(
      fc.asyncProperty(
        diskArb,
        fc.array(timingArb, { minLength: 3, maxLength: 3 }),
        async ({ clusters, tail, seed }, timings) => {
          const disk = testDisk(clusters * CLUSTER_SIZE + tail, seed);
          const path = `${dir}/disk-${seed}.raw`;
          await Deno.writeFile(path, disk);
          const archive = await new Response(
            archiveOf(rawDiskSource(path, { name: "drive-scsi0", readSize: 4 * CLUSTER_SIZE })),
          ).bytes();
          await Deno.writeFile(`${path}.vma`, archive);
          /** Three branches of one stream: a tee of a tee. */
          const three = <T>(stream: ReadableStream<T>) => {
            const [first, rest] = stream.tee();
            const [second, third] = rest.tee();
            return [first, second, third].map((branch, i) =>
              branch.pipeThrough(jitter(timings[i]!))
            );
          };
          const results = await Promise.all([
            // The writer's extents, each read by its own reader.
            ...three(archiveOf(rawDiskSource(path, { name: "d" }))).map(restore),
            // A file's chunks, each branch with its own reader.
            ...three(fileByteSource(await Deno.open(`${path}.vma`), { chunkSize: 100_000 }))
              .map(restore),
            // The reader's records, to three consumers.
            ...three(
              fileByteSource(await Deno.open(`${path}.vma`)).pipeThrough(new VmaReaderStream()),
            ).map(deviceBytes),
          ]);
          await Deno.remove(path);
          await Deno.remove(`${path}.vma`);
          results.forEach((restored, i) => {
            assert.equal(firstDifference(restored, disk), -1, `consumer ${i}`);
          });
        },
      ),
      { numRuns: 15 },
    );
  });
});

Deno.test("ZstdCompressStream() and ZstdDecompressStream() output can be tee()d", async () => {
  await fc.assert(
    fc.asyncProperty(
      diskArb,
      timingArb,
      timingArb,
      async ({ clusters, seed }, timingA, timingB) => {
        const data = testDisk(clusters * CLUSTER_SIZE, seed);
        const chunks = Array.from(
          { length: Math.ceil(data.byteLength / 300_000) },
          (_, i) => data.subarray(i * 300_000, (i + 1) * 300_000),
        );
        const compressed = ReadableStream.from(chunks)
          .pipeThrough(new ZstdCompressStream({ frameSize: 256 << 10, workers: 1 }));
        const [a, b] = compressed.tee();
        // Final consumers as this library's are: copy (write) a chunk, then release it.
        const collect = async (stream: ReadableStream<Uint8Array>, timing: number[]) => {
          const copies: Uint8Array[] = [];
          await stream.pipeThrough(jitter(timing)).pipeTo(
            new WritableStream({
              write(chunk) {
                copies.push(chunk.slice());
                releaseChunk(chunk);
              },
            }),
          );
          return await new Response(ReadableStream.from(copies)).bytes();
        };
        const [packedA, packedB] = await Promise.all([collect(a, timingA), collect(b, timingB)]);
        assert.equal(firstDifference(packedA, packedB), -1, "both branches got the same bytes");
        const decoded = ReadableStream.from([packedA]).pipeThrough(new ZstdDecompressStream());
        const [c, d] = decoded.tee();
        const [plainC, plainD] = await Promise.all([collect(c, timingB), collect(d, timingA)]);
        assert.equal(firstDifference(plainC, data), -1, "first decoded branch");
        assert.equal(firstDifference(plainD, data), -1, "second decoded branch");
      },
    ),
    { numRuns: 10 },
  );
});
