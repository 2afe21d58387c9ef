// Copyright 2026 the vmabackup authors. MIT license.
/** Shared test helpers. */
import { AssertionError } from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  CLUSTER_SIZE,
  FULL_MASK,
  validMask,
  type VmaClusterRecord,
  type VmaReaderOptions,
  VmaReaderStream,
  type VmaRecord,
  type VmaWriterOptions,
  VmaWriterStream,
  ZeroFilterStream,
} from "../mod.ts";

/** The real Proxmox sample archive, decompressed. */
export async function loadProxmoxSample(): Promise<Uint8Array<ArrayBuffer>> {
  const url = new URL("../../shared/vectors/dissect-proxmox-sample.vma.gz", import.meta.url);
  using file = await Deno.open(url);
  return await new Response(file.readable.pipeThrough(new DecompressionStream("gzip"))).bytes();
}

export function sha256Hex(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

export function md5Hex(bytes: Uint8Array): string {
  return createHash("md5").update(bytes).digest("hex");
}

/** Fixed identity, so archives are reproducible in tests. */
export const FIXED: VmaWriterOptions = {
  uuid: "0badc0de-0000-4000-8000-00000000feed",
  ctime: 1700000000,
};

/** A disk for tests: name and content. */
export interface TestDisk {
  name: string;
  bytes: Uint8Array;
}

/**
 * Cluster records of a disk in memory, in the given cluster order. The bytes of the last
 * cluster past the device end are `padding` (garbage a writer must not store).
 */
export function diskClusters(
  devId: number,
  disk: Uint8Array,
  order?: number[],
  padding = 0,
): VmaClusterRecord[] {
  const count = Math.ceil(disk.byteLength / CLUSTER_SIZE);
  return (order ?? [...Array(count).keys()]).map((cluster) => {
    const data = new Uint8Array(CLUSTER_SIZE).fill(padding);
    data.set(disk.subarray(cluster * CLUSTER_SIZE, (cluster + 1) * CLUSTER_SIZE));
    return { type: "cluster", devId, cluster, mask: validMask(disk.byteLength, cluster), data };
  });
}

/** Writes records through the zero filter and writer, returning the archive bytes. */
export async function writeArchive(
  records: VmaRecord[],
  options: VmaWriterOptions = FIXED,
): Promise<Uint8Array<ArrayBuffer>> {
  return await new Response(
    ReadableStream.from(records).pipeThrough(new ZeroFilterStream()).pipeThrough(
      new VmaWriterStream(options),
    ),
  ).bytes();
}

/** Reads an archive (given in chunks of `chunkSize` bytes) into records. */
export async function readArchive(
  archive: Uint8Array,
  options: VmaReaderOptions = {},
  chunkSize = 1 << 20,
): Promise<VmaRecord[]> {
  const chunks: Uint8Array[] = [];
  for (let i = 0; i < archive.byteLength; i += chunkSize) {
    chunks.push(archive.subarray(i, i + chunkSize));
  }
  if (chunks.length === 0) chunks.push(new Uint8Array(0));
  return await Array.fromAsync(
    ReadableStream.from(chunks).pipeThrough(new VmaReaderStream(options)),
  );
}

/**
 * Reads an archive and rebuilds each device while the records stream, releasing every
 * lease at once so the reader recycles its buffers. Also checks that cluster bytes past a
 * device's end read as zero.
 */
export async function restoreInMemory(
  archive: Uint8Array,
  options: VmaReaderOptions = {},
  chunkSize = 1 << 20,
): Promise<Map<string, Uint8Array>> {
  // Clusters are kept until the end, so a corrupt header's huge size is never allocated.
  const devices = new Map<
    number,
    { name: string; size: number; clusters: Map<number, Uint8Array> }
  >();
  const chunks: Uint8Array[] = [];
  for (let i = 0; i < archive.byteLength; i += chunkSize) {
    chunks.push(archive.subarray(i, i + chunkSize));
  }
  await ReadableStream.from(chunks).pipeThrough(new VmaReaderStream(options)).pipeTo(
    new WritableStream({
      write(record) {
        if (record.type === "device") {
          const { name, size } = record;
          devices.set(record.devId, { name, size, clusters: new Map() });
        } else if (record.type === "cluster" && record.data !== null) {
          const device = devices.get(record.devId)!;
          const length = Math.min(CLUSTER_SIZE, device.size - record.cluster * CLUSTER_SIZE);
          if (!record.data.subarray(length).every((b) => b === 0)) {
            throw new Error(`cluster ${record.cluster} has bytes past the device end`);
          }
          device.clusters.set(record.cluster, record.data.slice(0, length));
          record.lease?.release();
        }
      },
    }),
  );
  return new Map([...devices.values()].map(({ name, size, clusters }) => {
    const bytes = new Uint8Array(size);
    for (const [cluster, data] of clusters) bytes.set(data, cluster * CLUSTER_SIZE);
    return [name, bytes];
  }));
}

/** Rebuilds each device's bytes from records (copying data, so leases do not matter). */
export function devicesFromRecords(records: VmaRecord[]): Map<string, Uint8Array> {
  const devices = new Map<number, { name: string; bytes: Uint8Array }>();
  for (const record of records) {
    if (record.type === "device") {
      devices.set(record.devId, { name: record.name, bytes: new Uint8Array(record.size) });
    } else if (record.type === "cluster" && record.data !== null) {
      const device = devices.get(record.devId)!;
      const start = record.cluster * CLUSTER_SIZE;
      const length = Math.min(CLUSTER_SIZE, device.bytes.byteLength - start);
      device.bytes.set(record.data.subarray(0, length), start);
      record.lease?.release();
    }
  }
  return new Map([...devices.values()].map(({ name, bytes }) => [name, bytes]));
}

/** Random bytes, seeded, fast (xorshift). */
export function randomBytes(length: number, seed: number): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(length);
  let state = seed | 1;
  for (let i = 0; i < length; i++) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    bytes[i] = state & 0xff;
  }
  return bytes;
}

export { FULL_MASK };

/**
 * Asserts that two byte arrays are equal, naming the first difference; unlike `deepEqual`,
 * fast to fail on megabytes (its diff of large typed arrays takes minutes).
 */
export function assertBytes(actual: Uint8Array, expected: Uint8Array, what = "bytes"): void {
  const length = Math.min(actual.byteLength, expected.byteLength);
  let at = 0;
  while (at < length && actual[at] === expected[at]) at++;
  if (at === length && actual.byteLength === expected.byteLength) return;
  throw new AssertionError({
    message:
      `${what} differ from byte ${at} (${actual.byteLength} bytes, expected ${expected.byteLength})`,
  });
}
