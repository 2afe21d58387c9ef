// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The 2 GiB sparse image with 5 % data: backup to `.vma.zst` and `.vma` against `zstd -T0 -3`
 * and `cp` (informational).
 *
 * @module
 */
import { join } from "node:path";
import { backup, cpSparse, extractsEqual, makeArchive, zstdCompress } from "../_commands.ts";
import { defineGroup, pair } from "../_group.ts";
import { SPARSE_2G } from "../_inputs.ts";

export default defineGroup({
  name: "sparse2g",
  description: SPARSE_2G.description,
  inputs: [SPARSE_2G],
  tools: ["zstd", "cp", "cmp"],
  rows(ctx) {
    const disk = ctx.pathOf(SPARSE_2G);
    const bytes = SPARSE_2G.size;
    return [
      pair({
        id: "backup.vma.zst",
        label: "backup 2 GiB 5 % → .vma.zst vs `zstd -T0 -3`",
        ours: backup(ctx, disk, join(ctx.out, "backup.vma.zst")),
        native: zstdCompress(ctx, disk),
        target: null,
        bytes,
      }),
      pair({
        id: "backup.vma",
        label: "backup 2 GiB 5 % → .vma vs `cp --sparse=always`",
        ours: backup(ctx, disk, join(ctx.out, "backup.vma")),
        native: cpSparse(ctx, disk, join(ctx.out, "copy.raw")),
        target: null,
        bytes,
      }),
    ];
  },
  checks(ctx) {
    return [{
      label: "sparse2g: extract of sparse2g.vma.zst equals sparse-2g.raw (cmp)",
      run: async () => {
        const disk = ctx.pathOf(SPARSE_2G);
        const archive = await makeArchive(ctx, disk, join(ctx.out, "sparse2g.vma.zst"));
        return await extractsEqual(ctx, archive, disk);
      },
    }];
  },
});
