// Copyright 2026 the vmabackup authors. MIT license.
/** The writer rejects bad record streams with clear errors. */
import assert from "node:assert/strict";
import { type VmaRecord, VmaWriterStream } from "../mod.ts";

const device = (devId: number, size = 3 * 65536, name = `drive-scsi${devId}`): VmaRecord => ({
  type: "device",
  devId,
  name,
  size,
});
const zero = (devId: number, cluster: number): VmaRecord => ({
  type: "cluster",
  devId,
  cluster,
  mask: 0,
  data: null,
});

async function write(records: VmaRecord[]): Promise<Uint8Array> {
  return await new Response(ReadableStream.from(records).pipeThrough(new VmaWriterStream()))
    .bytes();
}

Deno.test("VmaWriterStream() rejects a duplicate cluster", async () => {
  await assert.rejects(write([device(1), zero(1, 1), zero(1, 1)]), {
    name: "RangeError",
    message: /cluster 1 of device "drive-scsi1": It was already written/,
  });
});

Deno.test("VmaWriterStream() rejects a cluster past the device end", async () => {
  await assert.rejects(write([device(1), zero(1, 3)]), {
    name: "RangeError",
    message: /cluster 3 of device "drive-scsi1": It is past the device end \(3 clusters\)/,
  });
});

Deno.test("VmaWriterStream() rejects an undeclared device id", async () => {
  await assert.rejects(write([device(1), zero(2, 0)]), {
    name: "RangeError",
    message: /Device id 2 was not declared/,
  });
});

Deno.test("VmaWriterStream() reports every incomplete device at close", async () => {
  const records = [device(1), device(2, 65536 * 5), device(3, 100), zero(1, 0), zero(3, 0)];
  await assert.rejects(write(records), {
    message:
      /Incomplete devices: "drive-scsi1" \(2 of 3 clusters missing\), "drive-scsi2" \(5 of 5 clusters missing\)$/,
  });
});

Deno.test("VmaWriterStream() rejects configs and devices after cluster data", async () => {
  await assert.rejects(write([device(1, 65536), zero(1, 0), device(2)]), {
    name: "TypeError",
    message: /Configs and devices must come before cluster data/,
  });
  await assert.rejects(
    write([device(1, 65536), zero(1, 0), { type: "config", name: "a", data: new Uint8Array(1) }]),
    { name: "TypeError" },
  );
});

Deno.test("VmaWriterStream() validates the header: ids, names, sizes, configs", async () => {
  await assert.rejects(write([device(255)]), { message: /Device id 255 is not within 1..254/ });
  await assert.rejects(write([device(1), device(1, 65536, "other")]), {
    message: /Device id 1 is already in use/,
  });
  await assert.rejects(write([device(1), device(2, 65536, "drive-scsi1")]), {
    message: /A device with this name was already added/,
  });
  await assert.rejects(write([device(1, 0)]), { message: /VMA cannot store an empty device/ });
  await assert.rejects(write([device(1, 65536, "bad\0name")]), { message: /without NUL/ });
  await assert.rejects(write([]), { message: /An archive needs a config or a device/ });
  await assert.rejects(write([{ type: "config", name: "empty.conf", data: new Uint8Array(0) }]), {
    message: /Its size 0 is not within 1..65535 bytes/,
  });
  await assert.rejects(
    write([{ type: "config", name: "big.conf", data: new Uint8Array(65536) }]),
    { message: /Its size 65536 is not within 1..65535 bytes/ },
  );
  const many = Array.from({ length: 257 }, (_, i): VmaRecord => ({
    type: "config",
    name: `c${i}`,
    data: new Uint8Array(1),
  }));
  await assert.rejects(write(many), { message: /257 configs exceed the limit of 256/ });
});

Deno.test("VmaWriterStream() rejects data of the wrong size and bad options", async () => {
  await assert.rejects(
    write([device(1, 65536), {
      type: "cluster",
      devId: 1,
      cluster: 0,
      mask: 0xffff,
      data: new Uint8Array(4096),
    }]),
    { name: "TypeError", message: /Data is 4096 bytes, not 65536/ },
  );
  assert.throws(() => new VmaWriterStream({ uuid: "not-a-uuid" }), TypeError);
});

Deno.test("VmaWriterStream() stores configs under their basename", async () => {
  const archive = await write([
    { type: "config", name: "/etc/pve/qemu-server/100.conf", data: new Uint8Array([49]) },
  ]);
  assert.ok(new TextDecoder().decode(archive.subarray(12288, 12800)).includes("100.conf\0"));
  assert.ok(!new TextDecoder().decode(archive.subarray(12288, 12800)).includes("/etc"));
});
