// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Memory stays at about one extent per stage whatever the disk size: a synthetic 64 GiB
 * sparse device (1 GiB of it data) streams through zero filter → writer → reader → sink,
 * in memory (no file I/O, no compression), with recycled buffers and a flat RSS. Measured
 * in a child process, so the test runner's own bookkeeping (--trace-leaks) does not count.
 */
import assert from "node:assert/strict";

const probe = new URL("./fixtures/memory_probe.ts", import.meta.url);

async function runProbe(...args: string[]) {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--v8-flags=--expose-gc", probe.pathname, ...args],
  }).output();
  assert.equal(code, 0, new TextDecoder().decode(stderr));
  return JSON.parse(new TextDecoder().decode(stdout));
}

Deno.test("a 64 GiB device streams end to end with flat memory", async () => {
  const result = await runProbe("64");
  assert.equal(result.clusters, 64 * 2 ** 14);
  assert.equal(result.dataClusters, 64 * 2 ** 14 / 64);
  assert.equal(result.corrupt, 0, "recycled buffers never show stale data");
  const growth = (result.peak - result.baseline) / 2 ** 20;
  assert.ok(growth < 32, `RSS grew by ${growth.toFixed(1)} MiB after the first 4 GiB`);
  assert.ok(result.peak < 160 * 2 ** 20, `peak RSS ${(result.peak / 2 ** 20).toFixed(0)} MiB`);
});

Deno.test("the memory probe sees stale data when recycled records are tee()d", async () => {
  // Two consumers of one recycled record break the ownership rule on purpose: the first
  // releases, the buffer is refilled, the second reads another cluster's bytes. Every
  // cluster has content of its own, so the probe notices.
  const result = await runProbe("1", "fanout");
  assert.equal(result.dataClusters, 2 ** 14 / 64);
  assert.ok(result.corrupt > 0, "a stale buffer is detected");
});

Deno.test("with the index: a 64 GiB device, and a scrambled one, stream with bounded memory", async () => {
  // Writer → index and seekable zstd → decoder → reader → sink. The probe's layout is the
  // worst case for per-extent costs: one data cluster per 4 MiB, so almost every extent holds
  // one cluster. Scrambled, as copy-before-write sends clusters, the index holds a run per
  // cluster (18 bytes each).
  const inOrder = await runProbe("64", "index");
  assert.equal(inOrder.clusters, 64 * 2 ** 14);
  assert.equal(inOrder.corrupt, 0);
  // The compressor's workers make spikes on a busy machine (peaks 59 MiB apart were seen in a
  // full parallel suite): compare the medians of the RSS sampled every GiB over the first and
  // the last 16 GiB (0-6 MiB apart alone); a state of 100 bytes per cluster would add 75 MiB
  // in between.
  const growth = (inOrder.lateMedian - inOrder.earlyMedian) / 2 ** 20;
  assert.ok(growth < 32, `RSS grew by ${growth.toFixed(1)} MiB from the first 16 GiB to the last`);
  assert.ok(inOrder.peak < 256 * 2 ** 20, `peak RSS ${(inOrder.peak / 2 ** 20).toFixed(0)} MiB`);
  const scrambled = await runProbe("32", "index-scrambled");
  assert.equal(scrambled.clusters, 32 * 2 ** 14);
  assert.equal(scrambled.corrupt, 0);
  assert.ok(
    scrambled.peak < 320 * 2 ** 20,
    `peak RSS ${(scrambled.peak / 2 ** 20).toFixed(0)} MiB`,
  );
});
