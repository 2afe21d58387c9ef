// Copyright 2026 the vmabackup authors. MIT license.
/** Golden tests against the real Proxmox archive in ../shared/vectors. */
import assert from "node:assert/strict";
import {
  CLUSTER_SIZE,
  decodeHeader,
  RestoreSink,
  type VmaClusterRecord,
  VmaFormatError,
  VmaReaderStream,
  type VmaRecord,
  VmaWriterStream,
} from "../mod.ts";
import { loadProxmoxSample, md5Hex, readArchive, sha256Hex } from "./_utils.ts";

const TEN_GIB = 10737418240;

Deno.test("Proxmox sample: the vector file is the documented one", async () => {
  const archive = await loadProxmoxSample();
  assert.equal(archive.byteLength, 538112);
  assert.equal(
    sha256Hex(archive),
    "9c649a8f6ddd65034b6e24f76f104b2ab213f43015fd36a6d49477b9b8841ad4",
  );
});

Deno.test("Proxmox sample: header fields match vectors/README.md", async () => {
  const archive = await loadProxmoxSample();
  const view = new DataView(archive.buffer);
  assert.equal(view.getUint32(48), 12288); // blob_buffer_offset
  assert.equal(view.getUint32(52), 453); // blob_buffer_size
  assert.equal(view.getUint32(56), 12800); // header_size
  assert.equal(archive.subarray(32, 48).toHex(), "d597f75ac4bd4e2eb3699dd13c4b9605");
  assert.equal(view.getUint32(2044), 1); // config_names[0]
  assert.equal(view.getUint32(3068), 20); // config_data[0]
  assert.equal(view.getUint32(4096 + 32), 439); // dev_info[1].devname_ptr

  const header = decodeHeader(archive.subarray(0, 12800));
  assert.equal(header.uuid, "04fc12eb-0fed-4322-9aaa-f4e412f68096");
  assert.equal(header.ctime, 1635680622);
  assert.equal(header.headerSize, 12800);
  assert.deepEqual(header.devices, [{ devId: 1, name: "drive-scsi0", size: TEN_GIB }]);
  assert.equal(header.configs.length, 1);
  assert.equal(header.configs[0]!.name, "qemu-server.conf");
  assert.equal(header.configs[0]!.data.byteLength, 417);
  const config = new TextDecoder().decode(header.configs[0]!.data);
  assert.match(config, /#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:\n?$/);

  // The header MD5 recomputed with its own field zeroed.
  const zeroed = archive.slice(0, 12800);
  zeroed.fill(0, 32, 48);
  assert.equal(md5Hex(zeroed), "d597f75ac4bd4e2eb3699dd13c4b9605");
});

Deno.test("Proxmox sample: both extents validate and carry the documented clusters", async () => {
  const archive = await loadProxmoxSample();
  const reader = new VmaReaderStream({ requireComplete: false });
  const records: VmaRecord[] = await Array.fromAsync(
    ReadableStream.from([archive]).pipeThrough(reader),
  );
  const clusters = records.filter((r): r is VmaClusterRecord => r.type === "cluster");
  assert.equal(reader.stats.extents, 2);
  assert.equal(clusters.length, 116); // 58 used slots in each extent
  assert.equal(reader.stats.bytes, 538112);
  assert.equal(reader.stats.dataBlocks, 16 + 112);

  const first = clusters.slice(0, 58).map((c) => c.cluster);
  const expectedFirst = [
    ...Array.from({ length: 16 }, (_, i) => i),
    ...Array.from({ length: 16 }, (_, i) => 32 + i),
    ...Array.from({ length: 26 }, (_, i) => 64 + i),
  ];
  assert.deepEqual(first, expectedFirst);
  assert.deepEqual(
    clusters.slice(58, 67).map((c) => c.cluster),
    [90, 96, 112, 128, 144, 48, 160, 16, 91],
  );
  const withData = clusters.filter((c) => c.mask !== 0).map((c) => c.cluster).sort((a, b) => a - b);
  assert.deepEqual(withData, [0, 16, 17, 18, 19, 20, 21, 22]);
  assert.ok(clusters.every((c) => c.mask === 0 || c.mask === 0xffff));
  assert.ok(clusters.every((c) => c.devId === 1));
  assert.equal(Math.max(...clusters.map((c) => c.cluster)), 166);

  // Extent MD5s recomputed independently of the reader.
  for (const offset of [12800, 78848]) {
    const header = archive.slice(offset, offset + 512);
    const stored = header.slice(24, 40).toHex();
    header.fill(0, 24, 40);
    assert.equal(md5Hex(header), stored);
  }
});

Deno.test("Proxmox sample: restored data matches the documented hashes", async () => {
  const archive = await loadProxmoxSample();
  const dir = await Deno.makeTempDir();
  try {
    const sink = new RestoreSink({ target: (device) => `${dir}/${device.name}.raw` });
    await ReadableStream.from([archive])
      .pipeThrough(new VmaReaderStream({ requireComplete: false }))
      .pipeTo(sink);
    const path = `${dir}/drive-scsi0.raw`;
    assert.equal((await Deno.stat(path)).size, TEN_GIB); // exact size, sparse
    assert.deepEqual(sink.restored.map((d) => d.dataBytes), [8 * CLUSTER_SIZE]);
    using file = await Deno.open(path);
    const head = new Uint8Array(10944512);
    for (let filled = 0; filled < head.byteLength;) {
      filled += (await file.read(head.subarray(filled)))!;
    }
    assert.equal(
      sha256Hex(head.subarray(0, CLUSTER_SIZE)),
      "cf4adcf1933a8c9a0a3ff5588e1400e6beea8a32212b3a35ba08c7b08e4e6b1f",
    );
    assert.ok(head.subarray(CLUSTER_SIZE, 16 * CLUSTER_SIZE).every((b) => b === 0));
    assert.equal(
      sha256Hex(head.subarray(16 * CLUSTER_SIZE, 23 * CLUSTER_SIZE)),
      "8c989a3aa590795fa919ccb7d1f28651c85f8a0d9ba00ab22cdd9fb760fa7955",
    );
    assert.equal(
      sha256Hex(head),
      "aab5065ff973dd7d21c09e966546635e95c28be6dd1e4e01ae742420a1fbd825",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("Proxmox sample: the strict completeness check reports the truncated archive", async () => {
  const archive = await loadProxmoxSample();
  await assert.rejects(readArchive(archive), (error: unknown) => {
    assert.ok(error instanceof VmaFormatError);
    assert.equal(error.reason, "missing-cluster");
    assert.equal(error.offset, 538112);
    assert.match(error.message, /detected missing cluster 23 for stream drive-scsi0/);
    return true;
  });
});

Deno.test("Proxmox sample: re-encoding its records reproduces the archive byte for byte", async () => {
  const archive = await loadProxmoxSample();
  const copy = await new Response(
    ReadableStream.from([archive])
      .pipeThrough(new VmaReaderStream({ requireComplete: false }))
      .pipeThrough(new VmaWriterStream({ requireComplete: false })),
  ).bytes();
  assert.equal(copy.byteLength, archive.byteLength);
  assert.equal(sha256Hex(copy), sha256Hex(archive));
});
