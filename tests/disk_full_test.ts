// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A backup to a disk that fills up fails as "disk full" (exit 4) every time, whatever stage
 * was flushing when the disk filled, and leaves nothing behind.
 */
import assert from "node:assert/strict";
import { CLI, withTempDir } from "./_cli.ts";
import { randomBytes } from "./_utils.ts";

/** True when this user may mount a tmpfs in a new user and mount namespace. */
const UNSHARE = await new Deno.Command("unshare", { args: ["-rm", "true"] }).output()
  .then((result) => result.success, () => false);
const CI = Deno.env.get("CI") === "true";

Deno.test({
  name:
    `cli: backup to a full disk is exit 4 "No space left", 10 times of 10, for .vma.zst and .vma${
      UNSHARE || CI ? "" : " (skipped: unshare -rm cannot mount a small tmpfs here)"
    }`,
  ignore: !UNSHARE && !CI,
  async fn() {
    if (!UNSHARE) throw new Error("unshare -rm (user namespaces) is required under CI=true");
    await withTempDir(async (dir) => {
      await Deno.writeFile(`${dir}/disk.raw`, randomBytes(20 << 20, 5)); // does not compress
      await Deno.mkdir(`${dir}/full`);
      for (const output of ["vm.vma.zst", "vm.vma"]) {
        // Ten runs in one namespace, each onto an emptied 8 MiB tmpfs.
        const script = [
          `mount -t tmpfs -o size=8m tmpfs '${dir}/full'`,
          ...Array.from({ length: 10 }, () => [
            `'${Deno.execPath()}' run -A '${CLI}' backup --disk '${dir}/disk.raw' -o '${dir}/full/${output}'`,
            `echo "code=$?"`,
            `ls -A '${dir}/full'`,
          ]).flat(),
        ].join("; ");
        const { stdout, stderr } = await new Deno.Command("unshare", {
          args: ["-rm", "sh", "-c", script],
          env: { NO_COLOR: "1" },
        }).output();
        const lines = new TextDecoder().decode(stdout).trim().split("\n");
        assert.deepEqual(lines, Array(10).fill("code=4"), "exit 4 and nothing left, every time");
        const errors = new TextDecoder().decode(stderr).trim().split("\n");
        assert.deepEqual(errors, Array(10).fill("error: No space left on device (os error 28)"));
      }
    });
  },
});
