// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A runnable template for new groups (`deno task bench --only example`; not run by default):
 * a server started once around the measurements (a read-only `qemu-nbd` serving the 2 GiB sparse
 * image), a pair ours/native, a pair ours/ours and a value row. Its figures are informational.
 *
 * @module
 */
import { join } from "node:path";
import { backup } from "../_commands.ts";
import { defineGroup, pair, value } from "../_group.ts";
import { SPARSE_2G } from "../_inputs.ts";

/** What `setup` started, for the rows and `teardown`. */
interface Server {
  process: Deno.ChildProcess;
  uri: string;
}

export default defineGroup<Server>({
  name: "example",
  description: "template: backup over NBD from a qemu-nbd started once, vs nbdcopy and vs a file",
  inputs: [SPARSE_2G],
  tools: ["qemu-nbd", "nbdcopy"],
  byDefault: false,
  async setup(ctx) {
    const socket = join(ctx.out, "nbd.sock");
    const process = new Deno.Command("qemu-nbd", {
      args: [
        ...["--read-only", "--persistent", "--shared=0", "--format=raw"],
        ...["--socket", socket, "--export-name", "disk", ctx.pathOf(SPARSE_2G)],
      ],
      stdin: "null",
      stdout: "null",
      stderr: "inherit",
    }).spawn();
    for (let waited = 0; !(await Deno.lstat(socket).then(() => true, () => false)); waited++) {
      if (waited === 100) {
        process.kill();
        await process.status;
        throw new Error("qemu-nbd did not create its socket within 10 s");
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    return { process, uri: `nbd+unix:///disk?socket=${socket}` };
  },
  rows(ctx, { uri }) {
    const viaNbd = () => backup(ctx, uri, join(ctx.out, "nbd.vma"));
    return [
      // (a) ours against a native tool reading the same export.
      pair({
        id: "backup-nbd/nbdcopy",
        label: "backup over NBD → .vma vs `nbdcopy` to a file",
        ours: viaNbd(),
        native: ctx.native(
          (p) => `nbdcopy --connections=1 '${uri}' ${p(join(ctx.out, "copy.raw"))}`,
          [
            join(ctx.out, "copy.raw"),
          ],
        ),
        target: null,
        bytes: SPARSE_2G.size,
      }),
      // (b) ours/ours: the same backup from the file, as the yardstick.
      pair({
        id: "backup-nbd/backup-file",
        label: "backup over NBD vs backup of the file → .vma",
        ours: viaNbd(),
        native: backup(ctx, ctx.pathOf(SPARSE_2G), join(ctx.out, "file.vma")),
        target: null,
        bytes: SPARSE_2G.size,
      }),
      // (c) figures the group measures itself, each with an optional bound.
      value({
        id: "backup-nbd",
        label: "backup over NBD → .vma",
        figures: {
          seconds: { unit: "s" },
          rss: { unit: "MiB", target: { max: 128 }, summary: "worst" },
        },
        sample: async (run) => {
          const timed = await run.time(viaNbd());
          return { seconds: timed.seconds, rss: timed.rssMiB };
        },
      }),
    ];
  },
  // (d) stop what setup started; the runner then removes ctx.out.
  async teardown(_ctx, { process }) {
    try {
      process.kill("SIGTERM");
    } catch { /* it has exited already */ }
    await process.status;
  },
});
