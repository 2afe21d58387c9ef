// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Corrupt and truncated archives: the reader must raise a VmaFormatError (with a byte
 * offset), or, for bytes the reference reader ignores, accept the archive consistently.
 * It must never crash, hang, or leak a RangeError from a DataView.
 */
import assert from "node:assert/strict";
import { CLUSTER_SIZE, VmaFormatError, type VmaRecord } from "../mod.ts";
import { diskClusters, md5Hex, randomBytes, restoreInMemory, writeArchive } from "./_utils.ts";

/** Two devices, 4 extents of 5 slots, data and zero clusters, an odd-sized device. */
async function smallArchive() {
  const a = new Uint8Array(8 * CLUSTER_SIZE);
  a.set(randomBytes(3 * CLUSTER_SIZE, 7), CLUSTER_SIZE);
  a.set(randomBytes(4096, 8), 6 * CLUSTER_SIZE + 8192);
  const b = new Uint8Array(540672);
  b.set(randomBytes(20000, 9), 500000);
  const clustersA = diskClusters(1, a, [3, 0, 7, 1, 2, 6, 5, 4]);
  const clustersB = diskClusters(2, b, [8, 7, 6, 5, 4, 3, 2, 1, 0]);
  const records: VmaRecord[] = [
    { type: "config", name: "qemu-server.conf", data: new TextEncoder().encode("cores: 4\n") },
    { type: "device", devId: 1, name: "drive-scsi0", size: a.byteLength },
    { type: "device", devId: 2, name: "drive-efidisk0", size: b.byteLength },
    ...clustersA.flatMap((record, i) => [record, ...(clustersB[i] ? [clustersB[i]] : [])]),
    clustersB[8]!,
  ];
  const archive = await writeArchive(records, { clustersPerExtent: 5 });
  const view = new DataView(archive.buffer);
  const headerSize = view.getUint32(56);
  const extents: number[] = [];
  for (let at = headerSize; at < archive.byteLength; at += 512 + view.getUint16(at + 6) * 4096) {
    extents.push(at);
  }
  return {
    archive,
    headerSize,
    extents,
    devices: new Map([["drive-scsi0", a], ["drive-efidisk0", b]]),
  };
}

type Outcome = { ok: true; devices: Map<string, Uint8Array> } | {
  ok: false;
  error: VmaFormatError;
};

/** Reads with a deadline; anything but success or a VmaFormatError fails the test. */
async function outcome(archive: Uint8Array, chunk = 4096): Promise<Outcome> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error("reader hung")), 5000);
  });
  try {
    return {
      ok: true,
      devices: await Promise.race([restoreInMemory(archive, {}, chunk), deadline]),
    };
  } catch (error) {
    if (!(error instanceof VmaFormatError)) throw error;
    assert.ok(error.offset >= 0 && error.offset <= archive.byteLength, "offset inside the input");
    assert.match(error.message, /^Cannot read the VMA archive: .+ \(at byte \d+\)$/);
    return { ok: false, error };
  } finally {
    clearTimeout(timer);
  }
}

/** Recomputes the MD5 of the header (0..headerSize) or of the extent header at `extent`. */
function rehash(archive: Uint8Array, headerSize: number, extent?: number): void {
  const [start, end, md5At] = extent === undefined
    ? [0, headerSize, 32]
    : [extent, extent + 512, extent + 24];
  const copy = archive.slice(start, end);
  copy.fill(0, md5At - start, md5At - start + 16);
  archive.set(Uint8Array.fromHex(md5Hex(copy)), md5At);
}

/** Accepted archives must give the original device bytes (a size byte may change length). */
function assertConsistent(result: Map<string, Uint8Array>, original: Map<string, Uint8Array>) {
  for (const [name, bytes] of result) {
    const before = original.get(name);
    if (before === undefined) continue; // a renamed device: content checked under its old name
    const common = Math.min(bytes.byteLength, before.byteLength);
    assert.deepEqual(bytes.subarray(0, common), before.subarray(0, common));
    assert.ok(bytes.subarray(common).every((b) => b === 0));
  }
}

Deno.test("bad input: the small archive itself reads back", async () => {
  const { archive, devices, extents } = await smallArchive();
  assert.equal(extents.length, 4);
  const result = await outcome(archive);
  assert.ok(result.ok);
  assert.deepEqual(result.devices, devices);
});

Deno.test("bad input: every flipped header or extent-header byte is caught by a checksum", async () => {
  const { archive, headerSize, extents } = await smallArchive();
  const offsets = [
    ...Array.from({ length: headerSize }, (_, i) => i),
    ...extents.flatMap((at) => Array.from({ length: 512 }, (_, i) => at + i)),
  ];
  for (const offset of offsets) {
    const bad = archive.slice();
    bad[offset]! ^= 0xff;
    const result = await outcome(bad, 65536);
    assert.ok(!result.ok, `flip at ${offset} must be rejected`);
    const inHeader = offset < headerSize;
    // A damaged magic or header size is reported before any checksum can be computed.
    if (inHeader && (offset < 4 || (offset >= 56 && offset < 60))) continue;
    assert.equal(
      result.error.reason,
      inHeader ? "bad-header-checksum" : "bad-extent-checksum",
      `flip at ${offset}`,
    );
  }
});

Deno.test("bad input: flips with a repaired checksum are rejected, or accepted consistently where the reference ignores the byte", async () => {
  const { archive, headerSize, extents, devices } = await smallArchive();
  const view = new DataView(archive.buffer);
  const blobEnd = view.getUint32(48) + view.getUint32(52);
  // Bytes the reference reader ignores: reserved header areas, unused dev_info[0], the
  // reserved fields of each device entry, blob padding, and blockinfo byte 2 of used slots.
  const ignored = new Set<number>();
  const range = (start: number, end: number) => {
    for (let i = start; i < end; i++) ignored.add(i);
  };
  range(60, 2044);
  range(4092, 4128);
  for (let id = 1; id < 256; id++) {
    range(4096 + 32 * id + 4, 4096 + 32 * id + 8);
    range(4096 + 32 * id + 16, 4096 + 32 * id + 32);
  }
  range(blobEnd, headerSize);
  for (const at of extents) {
    for (let slot = 0; slot < 59; slot++) {
      if (view.getBigUint64(at + 40 + 8 * slot) !== 0n) ignored.add(at + 40 + 8 * slot + 2);
    }
  }
  const reasons = new Set<string>();
  let accepted = 0;
  const flip = async (offset: number, extent?: number) => {
    if (offset >= 32 && offset < 48 && extent === undefined) return; // the header MD5 itself
    if (extent !== undefined && offset >= extent + 24 && offset < extent + 40) return;
    const bad = archive.slice();
    // Odd offsets get a one-bit flip (a cluster number off by one), even ones a wider one.
    bad[offset]! ^= offset & 1 ? 0x01 : 0x5a;
    rehash(bad, headerSize, extent);
    const first = await outcome(bad, 3000);
    if (offset % 8 === 0) {
      const again = await outcome(bad, 100_000);
      assert.equal(first.ok, again.ok, `flip at ${offset}: the outcome depends on chunking`);
    }
    if (first.ok) {
      accepted++;
      assertConsistent(first.devices, devices);
    } else {
      reasons.add(first.error.reason);
      assert.ok(!ignored.has(offset), `flip at ${offset} is in an ignored byte but was rejected`);
    }
  };
  for (let offset = 0; offset < headerSize; offset++) await flip(offset);
  for (const at of extents) for (let i = 0; i < 512; i++) await flip(at + i, at);
  assert.ok(accepted >= ignored.size, "every ignored byte was accepted");
  // The repaired checksums let the deeper checks show.
  for (
    const reason of [
      "bad-magic",
      "bad-header-size",
      "bad-version",
      "bad-blob-buffer",
      "bad-config",
      "bad-device",
      "bad-extent-uuid",
      "bad-extent-magic",
      "bad-dev-id",
      "cluster-out-of-range",
      "duplicate-cluster",
      "write-beyond-end",
      "block-count-mismatch",
      "missing-cluster",
    ]
  ) {
    assert.ok(reasons.has(reason), `some flip triggers ${reason}`);
  }
});

Deno.test("bad input: truncation at every 512-byte boundary and at random offsets is reported", async () => {
  const { archive, headerSize, extents } = await smallArchive();
  const cuts = new Set<number>();
  for (let cut = 0; cut < archive.byteLength; cut += 512) cuts.add(cut);
  const random = randomBytes(400, 3);
  for (let i = 0; i < 200; i++) {
    cuts.add(((random[2 * i]! << 8) | random[2 * i + 1]!) * 17 % archive.byteLength);
  }
  for (const cut of cuts) {
    const result = await outcome(archive.subarray(0, cut), 777);
    assert.ok(!result.ok, `cut at ${cut} must be rejected`);
    const expected = cut < headerSize
      ? (cut >= 4 ? "truncated-header" : ["truncated-header", "bad-magic"])
      : extents.includes(cut) || cut === headerSize
      ? "missing-cluster"
      : extents.some((at) => cut > at && cut < at + 512)
      ? "short-extent-header"
      : "short-extent";
    if (Array.isArray(expected)) assert.ok(expected.includes(result.error.reason));
    else assert.equal(result.error.reason, expected, `cut at ${cut}`);
  }
});

Deno.test("bad input: compressed and foreign files get a clear error", async () => {
  const { archive } = await smallArchive();
  const gzip = await new Response(
    ReadableStream.from([archive]).pipeThrough(new CompressionStream("gzip")),
  ).bytes();
  const gz = await outcome(gzip);
  assert.ok(!gz.ok && gz.error.reason === "compressed-input");
  assert.match(gz.ok ? "" : gz.error.message, /gzip-compressed, decompress it first/);
  const zstdMagic = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3]);
  const zst = await outcome(zstdMagic);
  assert.ok(!zst.ok && zst.error.reason === "compressed-input");
  const text = await outcome(new TextEncoder().encode("hello world, not an archive at all"));
  assert.ok(!text.ok && text.error.reason === "bad-magic");
  const empty = await outcome(new Uint8Array(0));
  assert.ok(!empty.ok && empty.error.reason === "truncated-header");
});

Deno.test("bad input: trailing garbage shorter than an extent header is reported", async () => {
  const { archive } = await smallArchive();
  const longer = new Uint8Array(archive.byteLength + 100);
  longer.set(archive);
  const result = await outcome(longer);
  assert.ok(!result.ok);
  assert.equal(result.error.reason, "short-extent-header");
  assert.equal(result.error.offset, archive.byteLength);
  assert.match(result.error.message, /read short extent \(100 bytes\)/);
});

Deno.test("bad input: a slot with dev_id 0 is an empty slot, skipped like the reference reader", async () => {
  const { archive, headerSize, extents, devices } = await smallArchive();
  const bad = archive.slice();
  const view = new DataView(bad.buffer);
  // The last slot of the first extent is unused: give it a cluster number and a reserved byte.
  const slot = extents[0]! + 40 + 8 * 58;
  assert.equal(view.getBigUint64(slot), 0n);
  view.setUint32(slot + 4, 7);
  bad[slot + 2] = 0x55;
  rehash(bad, headerSize, extents[0]!);
  const result = await outcome(bad);
  assert.ok(result.ok, result.ok ? "" : result.error.message);
  assert.deepEqual(result.devices, devices);
});
