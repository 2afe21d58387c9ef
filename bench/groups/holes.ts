// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Raw images of 8 GiB and 64 GiB holding the same 256 MiB of data: with SEEK_DATA the backup time
 * follows the data, so the 64 GiB one may take at most 1.5 times as long. An ours/ours pair: the
 * 8 GiB backup is the yardstick, and the target is the speed ratio 8 GiB s ÷ 64 GiB s ≥ 1 / 1.5.
 *
 * @module
 */
import { join } from "node:path";
import { backup, makeArchive, verifies } from "../_commands.ts";
import { defineGroup, pair } from "../_group.ts";
import { HOLES_64G, HOLES_8G } from "../_inputs.ts";

export default defineGroup({
  name: "holes",
  description: "8 GiB and 64 GiB sparse images with the same 256 MiB of data (warmed data only)",
  inputs: [HOLES_8G, HOLES_64G],
  rows(ctx) {
    return [pair({
      id: "backup-64g/backup-8g",
      label:
        "time of the 8 GiB ÷ the 64 GiB backup → .vma, same 256 MiB of data (64 GiB at most 1.5× as long)",
      ours: backup(ctx, ctx.pathOf(HOLES_64G), join(ctx.out, "backup-64g.vma")),
      native: backup(ctx, ctx.pathOf(HOLES_8G), join(ctx.out, "backup-8g.vma")),
      target: 1 / 1.5,
    })];
  },
  checks(ctx) {
    return [{
      label: "holes: `cli.ts verify holes-64g.vma` passes",
      run: async () => {
        const archive = join(ctx.out, "holes-64g.vma");
        return await verifies(ctx, await makeArchive(ctx, ctx.pathOf(HOLES_64G), archive));
      },
    }];
  },
});
