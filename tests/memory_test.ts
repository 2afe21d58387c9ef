// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Memory stays at about one extent per stage whatever the disk size: a synthetic 64 GiB
 * sparse device streams through filter → writer → reader → sink with a flat RSS. Measured
 * in a child process, so the test runner's own bookkeeping (--trace-leaks) does not count.
 */
import assert from "node:assert/strict";

Deno.test("a 64 GiB device streams end to end with flat memory", async () => {
  const probe = new URL("./fixtures/memory_probe.ts", import.meta.url);
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--v8-flags=--expose-gc", probe.pathname, "64"],
  }).output();
  assert.equal(code, 0, new TextDecoder().decode(stderr));
  const result = JSON.parse(new TextDecoder().decode(stdout));
  assert.equal(result.clusters, 64 * 2 ** 14);
  assert.equal(result.dataClusters, 64 * 2 ** 14 / 64);
  assert.equal(result.corrupt, 0, "recycled buffers never show stale data");
  const growth = (result.peak - result.baseline) / 2 ** 20;
  assert.ok(growth < 32, `RSS grew by ${growth.toFixed(1)} MiB after the first 4 GiB`);
  assert.ok(result.peak < 160 * 2 ** 20, `peak RSS ${(result.peak / 2 ** 20).toFixed(0)} MiB`);
});
