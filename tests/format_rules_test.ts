// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The writer's output checked against every rule of vma-format.md, one by one. The test
 * parses the bytes itself with DataView and node:crypto, not with the library's reader.
 */
import assert from "node:assert/strict";
import { type VmaRecord, VmaWriterStream } from "../mod.ts";
import { diskClusters, md5Hex, randomBytes, writeArchive } from "./_utils.ts";

const UUID = "12345678-9abc-4def-8123-456789abcdef";
const CTIME = 1635680622;
const text = (s: string) => new TextEncoder().encode(s);

/** Two devices: a 540672-byte EFI disk (not a multiple of 64 KiB) and a 3-MiB disk. */
function sampleDisks() {
  const efi = new Uint8Array(540672);
  efi.set(randomBytes(8192, 1), 0); // blocks 0-1 of cluster 0
  efi.set(randomBytes(4096, 2), 540672 - 4096); // the last 4 KiB block of the device
  const big = new Uint8Array(3 << 20);
  big.set(randomBytes(65536, 3), 5 * 65536); // one full cluster
  big.set(randomBytes(4096, 4), 20 * 65536 + 3 * 4096); // block 3 of cluster 20
  return { efi, big };
}

async function sampleArchive() {
  const { efi, big } = sampleDisks();
  const records: VmaRecord[] = [
    { type: "config", name: "/tmp/job/qemu-server.conf", data: text("cores: 2\nmemory: 2048\n") },
    { type: "config", name: "qemu-server.fw", data: text("[OPTIONS]\nenable: 1\n") },
    { type: "device", devId: 1, name: "drive-efidisk0", size: efi.byteLength },
    { type: "device", devId: 2, name: "drive-scsi0", size: big.byteLength },
    // Interleaved and out of order, as copy-before-write delivers them.
    ...interleave(diskClusters(1, efi).reverse(), diskClusters(2, big)),
  ];
  return { efi, big, archive: await writeArchive(records, { uuid: UUID, ctime: CTIME }) };
}

function interleave<T>(a: T[], b: T[]): T[] {
  const out: T[] = [];
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (i < a.length) out.push(a[i]!);
    if (i < b.length) out.push(b[i]!);
  }
  return out;
}

interface Blob {
  pointer: number;
  length: number;
  payload: Uint8Array;
}

/** Walks the blob area independently: returns the blobs in order. */
function blobChain(archive: Uint8Array, offset: number, size: number): Blob[] {
  const blobs: Blob[] = [];
  let position = 1;
  while (position + 2 <= size) {
    const length = archive[offset + position]! + (archive[offset + position + 1]! << 8);
    blobs.push({
      pointer: position,
      length,
      payload: archive.subarray(offset + position + 2, offset + position + 2 + length),
    });
    position += 2 + length;
  }
  assert.equal(position, size, "blobs end exactly at blob_buffer_size");
  return blobs;
}

Deno.test("writer output follows every rule of the format, one by one", async (t) => {
  const { efi, big, archive } = await sampleArchive();
  const view = new DataView(archive.buffer, archive.byteOffset, archive.byteLength);
  const headerSize = view.getUint32(56);
  const blobOffset = view.getUint32(48);
  const blobSize = view.getUint32(52);

  await t.step("§2.1 magic is VMA\\0 and version is 1 (big-endian)", () => {
    assert.deepEqual([...archive.subarray(0, 4)], [0x56, 0x4d, 0x41, 0x00]);
    assert.deepEqual([...archive.subarray(4, 8)], [0, 0, 0, 1]);
  });
  await t.step("§2.1 uuid is the raw 16 bytes, ctime a signed big-endian int64", () => {
    assert.equal(archive.subarray(8, 24).toHex(), UUID.replaceAll("-", ""));
    assert.equal(view.getBigInt64(24), BigInt(CTIME));
  });
  await t.step("§2.1 blob_buffer_offset is 12288", () => assert.equal(blobOffset, 12288));
  await t.step("§2.3 header_size is 12288 plus the blob area, a multiple of 512", () => {
    assert.ok(headerSize > 12288);
    assert.equal(headerSize % 512, 0);
  });
  await t.step("§2.3 blob_buffer_size is the used length, within header_size", () => {
    assert.ok(blobOffset + blobSize <= headerSize);
    assert.ok(headerSize - (blobOffset + blobSize) < 512 + 512);
  });
  await t.step("§2.2 header MD5 covers header_size bytes with bytes 32..47 zeroed", () => {
    const zeroed = archive.slice(0, headerSize);
    zeroed.fill(0, 32, 48);
    assert.equal(md5Hex(zeroed), archive.subarray(32, 48).toHex());
  });
  await t.step("§2.1 reserved areas are zero", () => {
    assert.ok(archive.subarray(60, 2044).every((b) => b === 0));
    assert.ok(archive.subarray(4092, 4096).every((b) => b === 0));
    assert.ok(archive.subarray(4096, 4128).every((b) => b === 0), "dev_info[0] unused");
    for (let id = 1; id < 256; id++) {
      const entry = 4096 + 32 * id;
      assert.equal(view.getUint32(entry + 4), 0);
      assert.ok(archive.subarray(entry + 16, entry + 32).every((b) => b === 0));
    }
  });

  const blobs = blobChain(archive, blobOffset, blobSize);
  await t.step("§2.3 blob byte 0 is unused and lengths are little-endian", () => {
    assert.equal(archive[blobOffset], 0);
    assert.equal(blobs[0]!.pointer, 1);
    const first = blobs[0]!;
    assert.equal(archive[blobOffset + 1], first.length & 0xff);
    assert.equal(archive[blobOffset + 2], first.length >> 8);
  });
  await t.step("§2.3 blob order: each config's name then data, then device names by id", () => {
    const decoded = blobs.map((b) => new TextDecoder().decode(b.payload));
    assert.deepEqual(decoded, [
      "qemu-server.conf\0",
      "cores: 2\nmemory: 2048\n",
      "qemu-server.fw\0",
      "[OPTIONS]\nenable: 1\n",
      "drive-efidisk0\0",
      "drive-scsi0\0",
    ]);
  });
  await t.step("§2.3 the area grows in 512-byte steps, as the reference writer's", () => {
    let allocated = 0;
    let position = 1;
    for (const { length } of blobs) {
      if (allocated < position + length + 2) allocated += Math.ceil((length + 2) / 512) * 512;
      position += length + 2;
    }
    assert.equal(headerSize, 12288 + allocated);
    assert.ok(archive.subarray(blobOffset + blobSize, headerSize).every((b) => b === 0));
  });
  await t.step("§2.4 config pointers fill slots 0, 1, ... and point at length prefixes", () => {
    assert.deepEqual(
      [view.getUint32(2044), view.getUint32(3068), view.getUint32(2048), view.getUint32(3072)],
      blobs.slice(0, 4).map((b) => b.pointer),
    );
    assert.equal(view.getUint32(2052), 0);
    assert.equal(view.getUint32(3076), 0);
  });
  await t.step("§2.1 device table: index is the dev_id, name pointer and u64 size", () => {
    assert.equal(view.getUint32(4096 + 32), blobs[4]!.pointer);
    assert.equal(view.getBigUint64(4096 + 32 + 8), BigInt(efi.byteLength));
    assert.equal(view.getUint32(4096 + 64), blobs[5]!.pointer);
    assert.equal(view.getBigUint64(4096 + 64 + 8), BigInt(big.byteLength));
    for (let id = 3; id < 256; id++) assert.equal(view.getBigUint64(4096 + 32 * id + 8), 0n);
  });

  // Extents follow until EOF, each 512 + block_count * 4096 bytes.
  const extents: { offset: number; blockCount: number }[] = [];
  for (let offset = headerSize; offset < archive.byteLength;) {
    const blockCount = view.getUint16(offset + 6);
    extents.push({ offset, blockCount });
    offset += 512 + blockCount * 4096;
    assert.ok(offset <= archive.byteLength, "no extent runs past EOF");
  }
  const seen = new Map<string, { mask: number; data: Uint8Array }>();

  await t.step(
    "§3.1 each extent: magic VMAE, reserved1 zero, header uuid, MD5 of 512 bytes",
    () => {
      for (const { offset } of extents) {
        assert.deepEqual([...archive.subarray(offset, offset + 4)], [0x56, 0x4d, 0x41, 0x45]);
        assert.equal(view.getUint16(offset + 4), 0);
        assert.equal(archive.subarray(offset + 8, offset + 24).toHex(), UUID.replaceAll("-", ""));
        const header = archive.slice(offset, offset + 512);
        header.fill(0, 24, 40);
        assert.equal(md5Hex(header), archive.subarray(offset + 24, offset + 40).toHex());
      }
    },
  );
  await t.step(
    "§3.2 blockinfo: mask, zero reserved byte, dev_id, cluster; at most 58 slots",
    () => {
      for (const { offset, blockCount } of extents) {
        let slots = 0;
        let blocks = 0;
        let data = offset + 512;
        for (let slot = 0; slot < 59; slot++) {
          const info = view.getBigUint64(offset + 40 + 8 * slot);
          if (info === 0n) continue;
          slots++;
          const mask = Number(info >> 48n);
          assert.equal(Number((info >> 40n) & 0xffn), 0, "reserved byte");
          const devId = Number((info >> 32n) & 0xffn);
          const cluster = Number(info & 0xffffffffn);
          const content = new Uint8Array(65536);
          for (let block = 0; block < 16; block++) {
            if (mask & (1 << block)) { // bit 0 is the lowest-addressed block
              content.set(archive.subarray(data, data + 4096), block * 4096);
              data += 4096;
              blocks++;
            }
          }
          const key = `${devId}:${cluster}`;
          assert.ok(!seen.has(key), `cluster ${key} appears once`);
          seen.set(key, { mask, data: content });
        }
        assert.ok(slots <= 58, "the writer fills at most 58 slots");
        assert.equal(blocks, blockCount, "block_count counts 4 KiB blocks of the masks");
        assert.equal(data, offset + 512 + blockCount * 4096, "data follow in slot order");
      }
    },
  );
  await t.step("§3.3 every cluster is recorded once, zero clusters as mask 0", () => {
    assert.equal(seen.size, Math.ceil(efi.byteLength / 65536) + big.byteLength / 65536);
    assert.equal(seen.get("2:0")!.mask, 0);
    assert.equal(seen.get("2:5")!.mask, 0xffff);
    assert.equal(seen.get("2:20")!.mask, 1 << 3);
    assert.equal(seen.get("1:0")!.mask, 0b11);
  });
  await t.step("§8 the last partial cluster stores only blocks inside the device", () => {
    const last = seen.get(`1:${Math.floor(efi.byteLength / 65536)}`)!;
    const blocksInside = (efi.byteLength % 65536) / 4096;
    assert.equal(last.mask, 1 << (blocksInside - 1));
  });
  await t.step("stored data equal the disks", () => {
    for (const [devId, disk] of [[1, efi], [2, big]] as const) {
      for (let cluster = 0; cluster * 65536 < disk.byteLength; cluster++) {
        const expected = new Uint8Array(65536);
        expected.set(disk.subarray(cluster * 65536, (cluster + 1) * 65536));
        assert.deepEqual(seen.get(`${devId}:${cluster}`)!.data, expected);
      }
    }
  });
  await t.step("§3.5 the archive ends exactly at an extent boundary", () => {
    const last = extents.at(-1)!;
    assert.equal(last.offset + 512 + last.blockCount * 4096, archive.byteLength);
  });
});

Deno.test("writer: a diskless archive is the header plus one empty extent", async () => {
  const archive = await writeArchive(
    [{ type: "config", name: "qemu-server.conf", data: text("memory: 512\n") }],
    { uuid: UUID, ctime: CTIME },
  );
  const headerSize = new DataView(archive.buffer).getUint32(56);
  assert.equal(archive.byteLength, headerSize + 512);
  assert.equal(new DataView(archive.buffer).getUint16(headerSize + 6), 0);
  assert.ok(archive.subarray(headerSize + 40, headerSize + 512).every((b) => b === 0));
});

Deno.test("writer: the same input and identity give byte-identical output", async () => {
  const a = await sampleArchive();
  const b = await sampleArchive();
  assert.deepEqual(a.archive, b.archive);
});

Deno.test("writer: clustersPerExtent changes only the extent layout", async () => {
  const disk = randomBytes(20 * 65536, 9);
  const records: VmaRecord[] = [
    { type: "device", devId: 1, name: "drive-scsi0", size: disk.byteLength },
    ...diskClusters(1, disk),
  ];
  for (const perExtent of [1, 7, 59]) {
    const archive = await writeArchive(records, {
      uuid: UUID,
      ctime: CTIME,
      clustersPerExtent: perExtent,
    });
    const headerSize = new DataView(archive.buffer).getUint32(56);
    const extents = Math.ceil(20 / perExtent);
    assert.equal(archive.byteLength, headerSize + extents * 512 + 20 * 65536);
  }
  assert.throws(() => new VmaWriterStream({ clustersPerExtent: 60 }), RangeError);
});
