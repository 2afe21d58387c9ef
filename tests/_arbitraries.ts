// Copyright 2026 the vmabackup authors. MIT license.
/** fast-check arbitraries for archives: disks of edge-case sizes and content, any cluster order. */
import fc from "fast-check";
import type { VmaRecord } from "../mod.ts";
import { diskClusters, randomBytes } from "./_utils.ts";

export const MiB = 1 << 20;

/** Sizes that stress the edges: tiny, sector-sized, around 4 KiB and 64 KiB, several MiB. */
export const sizeArb = fc.oneof(
  fc.integer({ min: 1, max: 4 * MiB }),
  fc.integer({ min: 1, max: 64 }).map((n) => n * 65536),
  fc.integer({ min: 1, max: 256 }).map((n) => n * 4096 + 512),
  fc.constantFrom(1, 511, 512, 4095, 4096, 4097, 65535, 65536, 65537, 540672),
);

/** Content: zero by default, with random, constant and zero runs laid over it. */
export const segmentArb = fc.record({
  at: fc.double({ min: 0, max: 1, noNaN: true }),
  length: fc.integer({ min: 1, max: 300_000 }),
  kind: fc.constantFrom("random", "constant", "zero"),
  seed: fc.integer({ min: 1, max: 1 << 30 }),
});

export const diskArb = fc.record({
  size: sizeArb,
  segments: fc.array(segmentArb, { maxLength: 6 }),
})
  .map(({ size, segments }) => {
    const bytes = new Uint8Array(size);
    for (const { at, length, kind, seed } of segments) {
      const start = Math.floor(at * size);
      const end = Math.min(size, start + length);
      if (kind === "random") bytes.set(randomBytes(end - start, seed), start);
      else bytes.fill(kind === "constant" ? (seed & 0xff) | 1 : 0, start, end);
    }
    return bytes;
  });

/** A seeded shuffle, so every failure is reproducible from its seed. */
export function shuffled<T>(items: T[], seed: number): T[] {
  const out = [...items];
  let state = seed | 1;
  for (let i = out.length - 1; i > 0; i--) {
    state = (state * 1103515245 + 12345) & 0x7fffffff;
    const j = state % (i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

/** Every device's clusters in a random order, devices randomly interleaved. */
export function scrambledRecords(disks: Uint8Array[], seed: number): VmaRecord[] {
  const queues = disks.map((disk, i) => {
    const count = Math.ceil(disk.byteLength / 65536);
    // 0xee past each device end: the writer must neither store it nor leak it.
    return diskClusters(i + 1, disk, shuffled([...Array(count).keys()], seed + i), 0xee);
  });
  const tags = shuffled(queues.flatMap((queue, i) => queue.map(() => i)), seed);
  return tags.map((i) => queues[i]!.shift()!);
}
