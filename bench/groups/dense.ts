// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The dense 1 GiB image: backup to `.vma.zst` and `.vma`, restore and verify of a `.vma.zst`,
 * with the built-in zstd and with `--zstd program`, against `zstd` and `cp`; and what the
 * archive index costs a backup (with it against `--no-index`).
 *
 * @module
 */
import { join } from "node:path";
import {
  backup,
  cpSparse,
  cpSparseDurable,
  extract,
  extractsEqual,
  makeArchive,
  verifies,
  verifiesThroughZstd,
  verify,
  zstdCompress,
  zstdDecompress,
  zstdDecompressDurable,
} from "../_commands.ts";
import { defineGroup, pair } from "../_group.ts";
import { DENSE_1G } from "../_inputs.ts";

/** The archives restore and verify read, made once in `setup` (untimed) and warmed. */
interface Archives {
  zst: string;
  vma: string;
}

export default defineGroup<Archives>({
  name: "dense",
  description: DENSE_1G.description,
  inputs: [DENSE_1G],
  tools: ["zstd", "cp", "cmp"],
  async setup(ctx) {
    const disk = ctx.pathOf(DENSE_1G);
    const zst = await makeArchive(ctx, disk, join(ctx.out, "dense.vma.zst"));
    const vma = await makeArchive(ctx, disk, join(ctx.out, "dense.vma"));
    await ctx.warm(zst);
    return { zst, vma };
  },
  rows(ctx, { zst }) {
    const disk = ctx.pathOf(DENSE_1G);
    const bytes = DENSE_1G.size;
    const out = (name: string) => join(ctx.out, name);
    const zstd = () => zstdCompress(ctx, disk);
    const zstdD = () => zstdDecompress(ctx, zst);
    return [
      pair({
        id: "backup.vma.zst",
        label: "backup dense → .vma.zst vs `zstd -T0 -3`",
        ours: backup(ctx, disk, out("backup.vma.zst")),
        native: zstd(),
        target: 1.0,
        bytes,
      }),
      pair({
        id: "backup.vma.zst/zstd-file",
        label: "backup dense → .vma.zst vs `zstd -T0 -3 > file`",
        ours: backup(ctx, disk, out("backup.vma.zst")),
        native: zstdCompress(ctx, disk, out("zstd.raw.zst")),
        target: null,
        bytes,
      }),
      pair({
        id: "backup.vma",
        label: "backup dense → .vma vs `cp --sparse=always`",
        ours: backup(ctx, disk, out("backup.vma")),
        native: cpSparse(ctx, disk, out("copy.raw")),
        target: 0.8,
        bytes,
      }),
      pair({
        id: "backup.vma/cp-sync",
        label: "backup dense → .vma vs `cp --sparse=always && sync` (both durable)",
        ours: backup(ctx, disk, out("backup.vma")),
        native: cpSparseDurable(ctx, disk, out("copy.raw")),
        target: null,
        bytes,
      }),
      pair({
        id: "extract",
        label: "restore .vma.zst → sparse raw vs `zstd -d`",
        ours: extract(ctx, zst, out("restored")),
        native: zstdD(),
        target: 1.0,
        bytes,
      }),
      pair({
        id: "extract/zstd-d-file",
        label: "restore .vma.zst → sparse raw vs `zstd -d > file`",
        ours: extract(ctx, zst, out("restored")),
        native: zstdDecompress(ctx, zst, out("zstd-d.vma")),
        target: null,
        bytes,
      }),
      pair({
        id: "extract/zstd-d-file-sync",
        label: "restore .vma.zst → sparse raw vs `zstd -d > file && sync file` (both durable)",
        ours: extract(ctx, zst, out("restored")),
        native: zstdDecompressDurable(ctx, zst, out("zstd-d.vma")),
        target: null,
        bytes,
      }),
      pair({
        id: "verify",
        label: "verify .vma.zst vs `zstd -d`",
        ours: verify(ctx, zst),
        native: zstdD(),
        target: 1.2,
        bytes,
      }),
      pair({
        id: "backup.vma.zst/index",
        label: "backup dense → .vma.zst with the index vs without (--no-index)",
        ours: backup(ctx, disk, out("indexed.vma.zst")),
        native: backup(ctx, disk, out("plain.vma.zst"), {}, ["--no-index"]),
        target: 0.97,
        bytes,
      }),
      pair({
        id: "backup.vma/index",
        label: "backup dense → .vma with its sidecar index (SHA-256 of the data) vs without",
        ours: backup(ctx, disk, out("indexed.vma")),
        native: backup(ctx, disk, out("plain.vma"), {}, ["--no-index"]),
        target: null,
        bytes,
      }),
      pair({
        id: "backup.vma.zst-program",
        label: "backup dense → .vma.zst (--zstd program) vs `zstd -T0 -3`",
        ours: backup(ctx, disk, out("backup-program.vma.zst"), { program: true }),
        native: zstd(),
        target: 1.0,
        bytes,
      }),
      pair({
        id: "extract-program",
        label: "restore .vma.zst → sparse raw (--zstd program) vs `zstd -d`",
        ours: extract(ctx, zst, out("restored-program"), { program: true }),
        native: zstdD(),
        target: 0.9,
        bytes,
      }),
      pair({
        id: "verify-program",
        label: "verify .vma.zst (--zstd program) vs `zstd -d`",
        ours: verify(ctx, zst, { program: true }),
        native: zstdD(),
        target: 0.9,
        bytes,
      }),
    ];
  },
  checks(ctx, { zst, vma }) {
    return [
      {
        label: "dense: extract of dense.vma.zst equals dense-1g.raw (cmp)",
        run: () => extractsEqual(ctx, zst, ctx.pathOf(DENSE_1G)),
      },
      {
        label: "dense: `zstd -d -c dense.vma.zst | cli.ts verify -` passes",
        run: () => verifiesThroughZstd(ctx, zst),
      },
      { label: "dense: `cli.ts verify dense.vma` passes", run: () => verifies(ctx, vma) },
    ];
  },
});
