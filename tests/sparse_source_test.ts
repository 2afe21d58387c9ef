// Copyright 2026 the vmabackup authors. MIT license.
/** Holes of sparse raw images are skipped (SEEK_DATA through FFI) and become zero runs. */
import assert from "node:assert/strict";
import {
  CLUSTER_SIZE,
  rawDiskSource,
  type VmaRecord,
  VmaWriterStream,
  ZeroFilterStream,
} from "../mod.ts";
import { randomBytes, restoreInMemory } from "./_utils.ts";
import { withTempDir } from "./_cli.ts";

const MiB = 2 ** 20;

/** A sparse file: data pieces at unaligned offsets, holes elsewhere. */
async function sparseFile(path: string, size: number, pieces: [number, Uint8Array][]) {
  using file = await Deno.open(path, { write: true, create: true, truncate: true });
  await file.truncate(size);
  for (const [offset, bytes] of pieces) {
    await file.seek(offset, Deno.SeekMode.Start);
    for (let done = 0; done < bytes.byteLength;) done += await file.write(bytes.subarray(done));
  }
}

Deno.test("rawDiskSource() turns holes into zero runs and reads only around the data", async () => {
  await withTempDir(async (dir) => {
    const size = 256 * MiB + 12345;
    const pieces: [number, Uint8Array][] = [
      [5000, randomBytes(70_000, 1)],
      [100 * MiB + 4096, randomBytes(3 * MiB, 2)],
      [size - 3000, randomBytes(3000, 3)],
    ];
    await sparseFile(`${dir}/sparse.raw`, size, pieces);
    const records = await Array.fromAsync(rawDiskSource(`${dir}/sparse.raw`, { name: "d" }));
    const zeros = records.filter((r) => r.type === "zeros");
    const clusters = records.filter((r) => r.type === "cluster");
    const covered = zeros.reduce((sum, r) => sum + (r.type === "zeros" ? r.count : 0), 0) +
      clusters.length;
    assert.equal(covered, Math.ceil(size / CLUSTER_SIZE), "every cluster is covered once");
    assert.ok(zeros.length >= 2, "holes came as zero runs");
    assert.ok(clusters.length < 100, `only ${clusters.length} clusters were read`);

    // The backup of these records restores the file exactly.
    const archive = await new Response(
      ReadableStream.from(records).pipeThrough(new ZeroFilterStream()).pipeThrough(
        new VmaWriterStream(),
      ),
    ).bytes();
    const restored = (await restoreInMemory(archive)).get("d")!;
    assert.deepEqual(restored, await Deno.readFile(`${dir}/sparse.raw`));

    const dense = await Array.fromAsync(
      rawDiskSource(`${dir}/sparse.raw`, { name: "d", skipHoles: false }),
    );
    assert.equal(dense.filter((r) => r.type === "zeros").length, 0);
    assert.equal(dense.length - 1, Math.ceil(size / CLUSTER_SIZE));
  });
});

Deno.test("VmaWriterStream() writes a zeros record exactly as the mask-0 clusters it stands for", async () => {
  const head: VmaRecord[] = [{ type: "device", devId: 1, name: "d", size: 200 * CLUSTER_SIZE + 1 }];
  const data = randomBytes(CLUSTER_SIZE, 4);
  const runs: VmaRecord[] = [
    ...head,
    { type: "zeros", devId: 1, cluster: 0, count: 100 },
    { type: "cluster", devId: 1, cluster: 100, mask: 0xffff, data },
    { type: "zeros", devId: 1, cluster: 101, count: 100 },
  ];
  const single: VmaRecord[] = [
    ...head,
    ...Array.from(
      { length: 201 },
      (_, cluster): VmaRecord =>
        cluster === 100
          ? { type: "cluster", devId: 1, cluster, mask: 0xffff, data }
          : { type: "cluster", devId: 1, cluster, mask: 0, data: null },
    ),
  ];
  const write = (records: VmaRecord[]) =>
    new Response(
      ReadableStream.from(records).pipeThrough(
        new VmaWriterStream({ uuid: "00000000-0000-4000-8000-000000000001", ctime: 1 }),
      ),
    ).bytes();
  assert.deepEqual(await write(runs), await write(single));
  await assert.rejects(
    write([...head, { type: "zeros", devId: 1, cluster: 150, count: 60 }]),
    { message: /cluster 201 of device "d": It is past the device end/ },
  );
  await assert.rejects(
    write([...runs, { type: "zeros", devId: 1, cluster: 5, count: 1 }]),
    { message: /cluster 5 of device "d": It was already written/ },
  );
});
