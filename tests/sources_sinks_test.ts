// Copyright 2026 the vmabackup authors. MIT license.
/** The raw-disk source, the combiner, the restore sink and the device byte stream. */
import assert from "node:assert/strict";
import {
  ByteSink,
  CLUSTER_SIZE,
  combineRecordStreams,
  DeviceBytesStream,
  rawDiskSource,
  RestoreSink,
  type VmaClusterRecord,
  VmaReaderStream,
  type VmaRecord,
  VmaWriterStream,
  ZeroFilterStream,
} from "../mod.ts";
import { diskClusters, randomBytes } from "./_utils.ts";

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir();
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("rawDiskSource() emits every cluster in order with masks clipped to the size", async () => {
  await withTempDir(async (dir) => {
    const bytes = randomBytes(5 * CLUSTER_SIZE + 5000, 1);
    await Deno.writeFile(`${dir}/d.raw`, bytes);
    const records = await Array.fromAsync(
      rawDiskSource(`${dir}/d.raw`, {
        name: "drive-virtio0",
        devId: 7,
        readSize: 2 * CLUSTER_SIZE,
      }),
    );
    assert.deepEqual(records[0], {
      type: "device",
      devId: 7,
      name: "drive-virtio0",
      size: bytes.byteLength,
    });
    const clusters = records.slice(1) as VmaClusterRecord[];
    assert.deepEqual(clusters.map((c) => c.cluster), [0, 1, 2, 3, 4, 5]);
    assert.deepEqual(clusters.map((c) => c.mask), [0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0b11]);
    // Every read buffer is still held (nobody released), so the data are intact copies.
    assert.deepEqual(
      clusters[4]!.data!.subarray(0, 100),
      bytes.subarray(4 * CLUSTER_SIZE, 4 * CLUSTER_SIZE + 100),
    );
    assert.ok(
      clusters[5]!.data!.subarray(5000).every((b) => b === 0),
      "the last cluster is zero-padded",
    );
  });
});

Deno.test("rawDiskSource() recycles its read buffers only after they are released", async () => {
  await withTempDir(async (dir) => {
    const bytes = randomBytes(64 * CLUSTER_SIZE, 2);
    await Deno.writeFile(`${dir}/d.raw`, bytes);
    const seenBuffers = new Set<ArrayBufferLike>();
    let mismatches = 0;
    const options = { name: "d", readSize: 4 * CLUSTER_SIZE, reuseBuffers: true };
    await rawDiskSource(`${dir}/d.raw`, options).pipeTo(
      new WritableStream({
        write(record) {
          if (record.type !== "cluster") return;
          seenBuffers.add(record.data!.buffer);
          const expected = bytes.subarray(
            record.cluster * CLUSTER_SIZE,
            (record.cluster + 1) * CLUSTER_SIZE,
          );
          if (record.data!.some((b, i) => b !== expected[i])) mismatches++;
          record.lease?.release();
        },
      }),
    );
    assert.equal(mismatches, 0);
    // Up to four reads run ahead of the consumer; beyond that, buffers come back and are reused.
    assert.ok(seenBuffers.size <= 6, `buffers are reused (${seenBuffers.size} used for 16 reads)`);
  });
});

Deno.test("rawDiskSource() keeps the buffers that come back an extent at a time (as the writer releases them)", async () => {
  await withTempDir(async (dir) => {
    const readSize = 16 * CLUSTER_SIZE;
    await Deno.writeFile(`${dir}/d.raw`, randomBytes(64 * readSize, 3));
    const seenBuffers = new Set<ArrayBufferLike>();
    const held: VmaClusterRecord[] = [];
    await rawDiskSource(`${dir}/d.raw`, { name: "d", readSize, reuseBuffers: true }).pipeTo(
      new WritableStream({
        write(record) {
          if (record.type !== "cluster") return;
          seenBuffers.add(record.data!.buffer);
          held.push(record);
          // Clusters wait in the writer and the compressor, then come back together.
          if (held.length === 128) { for (const each of held.splice(0)) each.lease?.release(); }
        },
      }),
    );
    // 128 held records span 8 or 9 read buffers, and 4 reads run ahead: what comes back must
    // be kept for the next reads, not dropped and allocated again (garbage that stays
    // resident; with a free list of 6, 22 buffers).
    assert.ok(seenBuffers.size <= 12, `${seenBuffers.size} buffers for 64 reads`);
  });
});

Deno.test("rawDiskSource() reports a missing file and an empty file", async () => {
  await assert.rejects(
    Array.fromAsync(rawDiskSource("/nonexistent/disk.raw", { name: "d" })),
    Deno.errors.NotFound,
  );
  await withTempDir(async (dir) => {
    await Deno.writeFile(`${dir}/empty.raw`, new Uint8Array(0));
    await assert.rejects(Array.fromAsync(rawDiskSource(`${dir}/empty.raw`, { name: "d" })), {
      message: /is empty, and VMA cannot store an empty device/,
    });
  });
  assert.throws(() => rawDiskSource("x", { name: "d", readSize: 1000 }), RangeError);
});

Deno.test("combineRecordStreams() renumbers devices and interleaves in turns", async () => {
  const disk = (size: number): ReadableStream<VmaRecord> =>
    ReadableStream.from<VmaRecord>([
      { type: "device", devId: 1, name: `d${size}`, size },
      ...diskClusters(1, new Uint8Array(size)),
    ]);
  const records = await Array.fromAsync(
    combineRecordStreams([disk(3 * CLUSTER_SIZE), disk(CLUSTER_SIZE)], { clustersPerTurn: 2 }),
  );
  const order = records.map((r) =>
    r.type === "cluster"
      ? `${r.devId}:${r.cluster}`
      : r.type === "device"
      ? `dev${r.devId}`
      : r.type
  );
  assert.deepEqual(order, ["dev1", "dev2", "1:0", "1:1", "2:0", "1:2"]);
});

Deno.test("RestoreSink() writes sparse files and refuses to overwrite", async () => {
  await withTempDir(async (dir) => {
    const size = 64 * CLUSTER_SIZE;
    const disk = new Uint8Array(size);
    disk.set(randomBytes(CLUSTER_SIZE, 3), 10 * CLUSTER_SIZE);
    const archive = await new Response(
      ReadableStream.from<VmaRecord>([
        { type: "config", name: "qemu-server.conf", data: new Uint8Array([1, 2, 3]) },
        { type: "device", devId: 1, name: "drive-scsi0", size },
        ...diskClusters(1, disk),
      ]).pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream()),
    ).bytes();
    const restore = (overwrite: boolean) =>
      ReadableStream.from([archive]).pipeThrough(new VmaReaderStream()).pipeTo(
        new RestoreSink({
          target: (device) => `${dir}/${device.name}.raw`,
          configTarget: (config) => `${dir}/${config.name}`,
          overwrite,
        }),
      );
    await restore(false);
    assert.deepEqual(await Deno.readFile(`${dir}/drive-scsi0.raw`), disk);
    assert.deepEqual(await Deno.readFile(`${dir}/qemu-server.conf`), new Uint8Array([1, 2, 3]));
    const stat = await Deno.stat(`${dir}/drive-scsi0.raw`);
    assert.equal(stat.size, size);
    if (stat.blocks !== null) {
      assert.ok(stat.blocks * 512 < size / 2, `sparse: ${stat.blocks * 512} bytes allocated`);
    }
    await assert.rejects(restore(false), Deno.errors.AlreadyExists);
    await restore(true);
    assert.deepEqual(await Deno.readFile(`${dir}/drive-scsi0.raw`), disk);
  });
});

Deno.test("DeviceBytesStream() orders clusters, and bounds what it holds back", async () => {
  const disk = randomBytes(10 * CLUSTER_SIZE + 100, 4);
  const records: VmaRecord[] = [
    { type: "device", devId: 1, name: "a", size: disk.byteLength },
    ...diskClusters(1, disk, [3, 0, 1, 2, 10, 9, 4, 5, 6, 7, 8]),
  ];
  const bytes = await new Response(
    ReadableStream.from(records).pipeThrough(new DeviceBytesStream("a")),
  ).bytes();
  assert.deepEqual(bytes, disk);

  const far = ReadableStream.from(records).pipeThrough(
    new DeviceBytesStream("a", { maxBufferedBytes: CLUSTER_SIZE }),
  );
  await assert.rejects(new Response(far).bytes(), { message: /too far out of order/ });
  const missing = ReadableStream.from(records.slice(0, -1)).pipeThrough(new DeviceBytesStream("a"));
  await assert.rejects(new Response(missing).bytes(), { message: /Cluster 8 is missing/ });
  const unknown = ReadableStream.from(records).pipeThrough(new DeviceBytesStream("b"));
  await assert.rejects(new Response(unknown).bytes(), { message: /has no such device/ });
});

Deno.test("DeviceBytesStream() passes the reader's buffers on, and a ByteSink gives them back", async () => {
  // Two disks in 20 extents of 4 clusters each; disk b is dropped, disk a goes to a ByteSink.
  const a = randomBytes(40 * CLUSTER_SIZE, 7);
  const b = randomBytes(40 * CLUSTER_SIZE, 8);
  const records: VmaRecord[] = [
    { type: "device", devId: 1, name: "a", size: a.byteLength },
    { type: "device", devId: 2, name: "b", size: b.byteLength },
    ...diskClusters(1, a).flatMap((record, i) => [record, diskClusters(2, b)[i]!]),
  ];
  const archive = await new Response(
    ReadableStream.from(records).pipeThrough(new VmaWriterStream({ clustersPerExtent: 4 })),
  ).bytes();
  const written = new Uint8Array(a.byteLength);
  let at = 0;
  const buffers = new Set<ArrayBufferLike>();
  const chunks = [];
  for (let at = 0; at < archive.byteLength; at += 65536) {
    chunks.push(archive.subarray(at, at + 65536));
  }
  await ReadableStream.from(chunks)
    .pipeThrough(new VmaReaderStream({ reuseBuffers: true }))
    .pipeThrough(new DeviceBytesStream("a"))
    .pipeThrough(
      new TransformStream({
        transform(chunk, controller) {
          buffers.add(chunk.buffer);
          controller.enqueue(chunk);
        },
      }),
    )
    .pipeTo(
      new ByteSink({
        write: (bytes) => {
          written.set(bytes, at);
          at += bytes.byteLength;
          return Promise.resolve(bytes.byteLength);
        },
      }),
    );
  assert.deepEqual(written, a);
  // Without the releases, every one of the 20 extents would need a buffer of its own.
  assert.ok(buffers.size <= 4, `${buffers.size} extent buffers for 20 extents`);
});

Deno.test("VmaReaderStream() reuses its extent buffers when a pipe's sink releases them at once", async () => {
  const disk = randomBytes(80 * CLUSTER_SIZE, 9);
  const records: VmaRecord[] = [
    { type: "device", devId: 1, name: "a", size: disk.byteLength },
    ...diskClusters(1, disk),
  ];
  const archive = await new Response(
    ReadableStream.from(records).pipeThrough(new VmaWriterStream({ clustersPerExtent: 4 })),
  ).bytes();
  const chunks = [];
  for (let at = 0; at < archive.byteLength; at += 65536) {
    chunks.push(archive.subarray(at, at + 65536));
  }
  const buffers = new Set<ArrayBufferLike>();
  let clusters = 0;
  // pipeTo may run write() inside the reader's enqueue, before the reader returns.
  await ReadableStream.from(chunks).pipeThrough(new VmaReaderStream({ reuseBuffers: true })).pipeTo(
    new WritableStream<VmaRecord>({
      write(record) {
        if (record.type !== "cluster") return;
        const expected = disk.subarray(record.cluster * CLUSTER_SIZE).subarray(0, CLUSTER_SIZE);
        assert.deepEqual(record.data, expected, `cluster ${record.cluster}`);
        buffers.add(record.data!.buffer);
        clusters++;
        record.lease?.release();
      },
    }),
  );
  assert.equal(clusters, 80);
  assert.ok(buffers.size <= 2, `${buffers.size} extent buffers for 20 extents`);
});

Deno.test("combineRecordStreams() cancels the other disks when one fails", async () => {
  let cancelled: unknown;
  const healthy = new ReadableStream<VmaRecord>({
    start(controller) {
      controller.enqueue({ type: "device", devId: 1, name: "a", size: 4 * CLUSTER_SIZE });
      controller.enqueue({ type: "cluster", devId: 1, cluster: 0, mask: 0, data: null });
    },
    pull() {}, // never more: only a cancel ends it
    cancel(reason) {
      cancelled = reason;
    },
  });
  let pulls = 0;
  const failing = new ReadableStream<VmaRecord>({
    start(controller) {
      controller.enqueue({ type: "device", devId: 1, name: "b", size: CLUSTER_SIZE });
    },
    pull() {
      if (++pulls > 0) throw new Error("disk b: read error");
    },
  });
  await assert.rejects(
    Array.fromAsync(combineRecordStreams([failing, healthy], { clustersPerTurn: 1 })),
    /disk b: read error/,
  );
  assert.match(String(cancelled), /disk b: read error/);
});
