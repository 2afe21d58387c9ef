// Copyright 2026 the vmabackup authors. MIT license.
/** FlushBehind: background flushes of a file being written, one at a time, and their end. */
import assert from "node:assert/strict";
import { FlushBehind } from "../mod.ts";
import { withTempDir } from "./_cli.ts";

Deno.test("FlushBehind: a flush per interval written, never two at once", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/out`;
    using file = await Deno.open(path, { write: true, create: true });
    const behind = await FlushBehind.open(path, { interval: 4096 });
    await file.write(new Uint8Array(4095));
    behind.written(4095);
    assert.equal(behind.flushes, 0, "less than an interval: no flush");
    await file.write(new Uint8Array(1));
    behind.written(1);
    assert.equal(behind.flushes, 1);
    behind.written(8192); // the first is still running
    assert.equal(behind.flushes, 1);
    await behind.settle();
    behind.written(8192); // settled: nothing more starts
    assert.equal(behind.flushes, 1);
    assert.equal((await Deno.stat(path)).size, 4096);
  });
});

Deno.test("FlushBehind: close() during a flush leaves no handle open", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/out`;
    await Deno.writeFile(path, new Uint8Array(4096));
    const behind = await FlushBehind.open(path, { interval: 1 });
    behind.written(1);
    behind.close(); // the running flush closes the handle when it is done
    await behind.settle(); // and this waits for it
    assert.equal(behind.flushes, 1);
  });
});
