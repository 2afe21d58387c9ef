// Copyright 2026 the vmabackup authors. MIT license.
/** The push target assembles what QEMU's backup job sends into whole clusters. */
import assert from "node:assert/strict";
import { PushTarget } from "../lib/live/push_target.ts";
import { RecordQueue } from "../lib/live/record_queue.ts";
import { CLUSTER_SIZE, type VmaRecord } from "../mod.ts";
import { randomBytes } from "./_utils.ts";

/** A target over a queue that is drained into an array. */
function target(size: number) {
  const queue = new RecordQueue<VmaRecord>(1 << 20);
  const push = new PushTarget(1, size, queue);
  const records = () => {
    queue.close();
    return Array.fromAsync(queue.readable);
  };
  const write = (offset: number, bytes: Uint8Array) =>
    push.write(offset, bytes.byteLength, (into) => Promise.resolve(into.set(bytes)));
  return { push, records, write };
}

Deno.test("PushTarget assembles 512-byte pieces, zero ranges and trims into whole clusters", async () => {
  const size = 2 * CLUSTER_SIZE + 512; // the last cluster holds one sector
  const { push, records, write } = target(size);
  const head = randomBytes(4096 + 512, 1);
  await write(0, head); // sectors 0..8 of cluster 0
  await push.writeZeroes(4096 + 512, 8192); // more of cluster 0, no whole cluster
  await push.trim(4096 + 512 + 8192, CLUSTER_SIZE - (4096 + 512 + 8192)); // the rest of it
  await push.writeZeroes(CLUSTER_SIZE, CLUSTER_SIZE + 512); // cluster 1 whole, cluster 2 whole
  const out = await records();
  const cluster0 = out.find((r) => r.type === "cluster" && r.cluster === 0);
  assert.ok(cluster0?.type === "cluster");
  assert.deepEqual(cluster0.data!.subarray(0, head.byteLength), head);
  assert.ok(cluster0.data!.subarray(head.byteLength).every((b) => b === 0));
  const zeros = out.find((r) => r.type === "zeros");
  assert.deepEqual(zeros, { type: "zeros", devId: 1, cluster: 1, count: 2 });
});

Deno.test("PushTarget rejects a cluster sent twice and writes past the end", async () => {
  const { push, write } = target(4 * CLUSTER_SIZE);
  await write(0, new Uint8Array(CLUSTER_SIZE));
  await assert.rejects(write(0, new Uint8Array(CLUSTER_SIZE)), /sent twice/);
  await push.writeZeroes(CLUSTER_SIZE + 512, 512);
  await assert.rejects(push.writeZeroes(CLUSTER_SIZE + 512, 512), /sent twice/);
  await assert.rejects(write(4 * CLUSTER_SIZE, new Uint8Array(512)), /Past the end/);
  await assert.rejects(write(CLUSTER_SIZE + 100, new Uint8Array(512)), /Not 512-byte aligned/);
});

Deno.test("PushTarget: queued copy-before-write writes pin buffers of their own size", async () => {
  // 64 single-cluster writes wait in the queue (the archive is slow): 4 MiB of data.
  const queue = new RecordQueue<VmaRecord>(64 + 3);
  const push = new PushTarget(1, 1 << 30, queue);
  const data = randomBytes(CLUSTER_SIZE, 2);
  for (let i = 0; i < 64; i++) {
    await push.write(
      i * 97 * CLUSTER_SIZE,
      CLUSTER_SIZE,
      (into) => Promise.resolve(into.set(data)),
    );
  }
  await push.write(
    64 * 97 * CLUSTER_SIZE,
    3 * CLUSTER_SIZE,
    (into) => Promise.resolve(void into.fill(1)),
  );
  queue.close();
  const records = await Array.fromAsync(queue.readable);
  const buffers = new Set(
    records.map((record) => record.type === "cluster" && record.data!.buffer),
  );
  const pinned = [...buffers].reduce((sum, buffer) => sum + (buffer ? buffer.byteLength : 0), 0);
  assert.equal(records.length, 64 + 3);
  assert.ok(pinned <= 64 * CLUSTER_SIZE + 4 * CLUSTER_SIZE, `${pinned / 2 ** 20} MiB pinned`);
});
