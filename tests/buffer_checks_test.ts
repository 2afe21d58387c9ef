// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The debug mode of buffer reuse (`checkBufferReuse`, `VMABACKUP_DEBUG=1` in the CLI): a
 * pipeline that opted in to `reuseBuffers` and still fans out fails with a
 * `BufferReuseError` instead of corrupting data, and the pipelines that follow the rule
 * (the CLI's among them) pass the checks.
 */
import assert from "node:assert/strict";
import {
  BufferReuseError,
  ByteSink,
  checkBufferReuse,
  CLUSTER_SIZE,
  fileByteSource,
  rawDiskSource,
  RestoreSink,
  VmaReaderStream,
  VmaWriterStream,
  ZeroFilterStream,
  ZstdCompressStream,
  ZstdDecompressStream,
} from "../mod.ts";
import { assertBytes, randomBytes } from "./_utils.ts";
import { cli, withTempDir } from "./_cli.ts";

async function withChecks(fn: () => Promise<void>): Promise<void> {
  checkBufferReuse(true);
  try {
    await fn();
  } finally {
    checkBufferReuse(false);
  }
}

/** A disk of `clusters` random clusters with a zero cluster every fifth. */
async function writeDisk(path: string, clusters: number): Promise<Uint8Array> {
  const disk = randomBytes(clusters * CLUSTER_SIZE + 1000, clusters);
  for (let at = 0; at < disk.byteLength; at += 5 * CLUSTER_SIZE) {
    disk.fill(0, at, at + CLUSTER_SIZE);
  }
  await Deno.writeFile(path, disk);
  return disk;
}

const discard = () => new WritableStream<Uint8Array>();

Deno.test("checkBufferReuse(): tee() of records from a reusing source is a BufferReuseError", async () => {
  await withTempDir(async (dir) => {
    await writeDisk(`${dir}/d.raw`, 40);
    await withChecks(async () => {
      const [a, b] = rawDiskSource(`${dir}/d.raw`, { name: "d", reuseBuffers: true }).tee();
      const chain = (records: ReadableStream) =>
        records.pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
          .pipeTo(discard());
      const results = await Promise.allSettled([chain(a), chain(b)]);
      const failure = results.find((result) => result.status === "rejected");
      assert.ok(failure, "one branch fails");
      assert.ok(failure.reason instanceof BufferReuseError, String(failure.reason));
      assert.match(failure.reason.message, /already released.*two consumers/);
    });
  });
});

Deno.test("checkBufferReuse(): tee() of reused file chunks is a BufferReuseError", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/f`, randomBytes(3 << 20, 3));
    await withChecks(async () => {
      const chunks = fileByteSource(await Deno.open(`${dir}/f`), { reuseBuffers: true });
      const [a, b] = chunks.tee();
      const slow = new TransformStream<Uint8Array, Uint8Array>({
        async transform(chunk, controller) {
          await new Promise((resolve) => setTimeout(resolve, 5));
          controller.enqueue(chunk);
        },
      });
      const sink = () => new ByteSink({ write: (bytes) => Promise.resolve(bytes.byteLength) });
      const results = await Promise.allSettled([
        a.pipeTo(sink()),
        b.pipeThrough(slow).pipeTo(sink()),
      ]);
      const failure = results.find((result) => result.status === "rejected");
      assert.ok(failure, "one branch fails");
      assert.ok(failure.reason instanceof BufferReuseError, String(failure.reason));
    });
  });
});

Deno.test("checkBufferReuse(): a linear pipeline that reuses every buffer passes the checks", async () => {
  await withTempDir(async (dir) => {
    const disk = await writeDisk(`${dir}/d.raw`, 300);
    await withChecks(async () => {
      const reuseBuffers = true;
      const extents = new Set<ArrayBufferLike>();
      await rawDiskSource(`${dir}/d.raw`, { name: "d", reuseBuffers })
        .pipeThrough(new ZeroFilterStream())
        .pipeThrough(new VmaWriterStream({ reuseBuffers, clustersPerExtent: 8 }))
        .pipeThrough(new ZstdCompressStream({ reuseBuffers, frameSize: 1 << 20, workers: 1 }))
        .pipeThrough(new ZstdDecompressStream({ reuseBuffers }))
        .pipeThrough(new VmaReaderStream({ reuseBuffers }))
        .pipeThrough(
          new TransformStream({
            transform(record, controller) {
              if (record.type === "cluster" && record.data) extents.add(record.data.buffer);
              controller.enqueue(record);
            },
          }),
        )
        .pipeTo(new RestoreSink({ target: () => `${dir}/restored.raw` }));
      assertBytes(await Deno.readFile(`${dir}/restored.raw`), disk);
      // The sink queues up to 118 records (15 of these small extents) while it writes.
      assert.ok(extents.size < 30, `${extents.size} extent buffers for 38 extents`);
    });
  });
});

Deno.test("the CLI's pipelines pass the buffer checks (VMABACKUP_DEBUG=1)", async () => {
  await withTempDir(async (dir) => {
    const disk = await writeDisk(`${dir}/d.raw`, 200);
    const permissions = ["--allow-read", "--allow-write", "--allow-env"];
    const env = { VMABACKUP_DEBUG: "1" };
    for (const archive of ["vm.vma.zst", "vm.vma"]) {
      const run = (args: string[]) => cli(args, { permissions, env });
      const backup = await run(["backup", "--disk", `${dir}/d.raw`, "-o", `${dir}/${archive}`]);
      assert.equal(backup.code, 0, backup.stderr);
      const extract = await run(["extract", `${dir}/${archive}`, `${dir}/out-${archive}`]);
      assert.equal(extract.code, 0, extract.stderr);
      assertBytes(await Deno.readFile(`${dir}/out-${archive}/disk-drive-scsi0.raw`), disk);
      const stdout = await run(["extract", `${dir}/${archive}`, "--stdout", "scsi0"]);
      assert.equal(stdout.code, 0, stdout.stderr);
      assertBytes(stdout.stdout, disk);
      const verify = await run(["verify", `${dir}/${archive}`]);
      assert.equal(verify.code, 0, verify.stderr);
    }
  });
});
