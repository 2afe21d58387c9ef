// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The 16 GiB sparse image with 512 MiB of data: backup to `.vma.zst` and `.vma` against
 * `zstd -T0 -3` (which reads the 15.5 GiB of holes, from a warm page cache) and `cp`.
 *
 * @module
 */
import { join } from "node:path";
import { backup, cpSparse, makeArchive, verifies, zstdCompress } from "../_commands.ts";
import { defineGroup, pair } from "../_group.ts";
import { SPARSE_16G } from "../_inputs.ts";

export default defineGroup({
  name: "sparse16g",
  description: SPARSE_16G.description,
  inputs: [SPARSE_16G],
  tools: ["zstd", "cp"],
  rows(ctx) {
    const disk = ctx.pathOf(SPARSE_16G);
    const bytes = SPARSE_16G.size;
    return [
      pair({
        id: "backup.vma.zst",
        label: "backup 16 GiB sparse → .vma.zst vs `zstd -T0 -3`",
        ours: backup(ctx, disk, join(ctx.out, "backup.vma.zst")),
        native: zstdCompress(ctx, disk),
        target: 8,
        bytes,
      }),
      pair({
        id: "backup.vma",
        label: "backup 16 GiB sparse → .vma vs `cp --sparse=always`",
        ours: backup(ctx, disk, join(ctx.out, "backup.vma")),
        native: cpSparse(ctx, disk, join(ctx.out, "copy.raw")),
        target: null,
        bytes,
      }),
    ];
  },
  checks(ctx) {
    return [{
      label: "sparse16g: `cli.ts verify sparse16g.vma.zst` passes",
      run: async () => {
        const archive = join(ctx.out, "sparse16g.vma.zst");
        return await verifies(ctx, await makeArchive(ctx, ctx.pathOf(SPARSE_16G), archive));
      },
    }];
  },
});
