// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `cli.ts serve` of the dense 1 GiB `.vma.zst` (made in `setup` with `cli.ts backup`, untimed):
 *
 * - `nbdcopy URI null:` (4 connections, multi-conn) from the running server against
 *   `zstd -d -q -c ARCHIVE > /dev/null`; target ≥ 0.8. The server's cache holds 3 extents of
 *   the 283, so every pass starts cold.
 * - random 4 KiB reads, one at a time through one NBD connection (NbdClient in this process):
 *   p50 and p99 with the cache cold (each read in an extent not read before: a stored frame
 *   read and decoded) and warm (reads within the extents just read).
 * - the serve process's peak RSS (VmHWM from /proc, worst of the rounds); target ≤ 128 MiB.
 *
 * Checks: `nbdcopy` of the export equals the image (`cmp`), and a fresh server decodes each
 * extent about once for it (its summary line: read-ahead does not thrash the cache).
 *
 * @module
 */
import { join } from "node:path";
import { NbdClient } from "../../mod.ts";
import { makeArchive, zstdDecompress } from "../_commands.ts";
import { defineGroup, type GroupContext, pair, value } from "../_group.ts";
import { DENSE_1G } from "../_inputs.ts";

/** A running `cli.ts serve`. */
interface Serving {
  uri: string;
  /** VmHWM of the serve process, MiB. */
  peakMiB(): Promise<number>;
  /** SIGTERM; its last stderr line (the summary). */
  stop(): Promise<string>;
}

interface State {
  archive: string;
  server: Serving;
}

/** Extents of the writer hold 58 clusters: 3.8 MB of the disk each, in order. */
const EXTENT_BYTES = 58 * 65536;

export default defineGroup<State>({
  name: "serve",
  description: "serve of the dense 1 GiB .vma.zst: nbdcopy vs zstd -d, 4 KiB read latency, RSS",
  inputs: [DENSE_1G],
  tools: ["zstd", "nbdcopy", "cmp"],
  async setup(ctx) {
    const archive = await makeArchive(ctx, ctx.pathOf(DENSE_1G), join(ctx.out, "dense.vma.zst"));
    await ctx.warm(archive);
    return { archive, server: await startServe(ctx, archive, "bench.sock") };
  },
  rows(ctx, { archive, server }) {
    return [
      pair({
        id: "nbdcopy",
        label: "nbdcopy of the served dense 1 GiB `.vma.zst` vs `zstd -d -c > /dev/null`",
        ours: ctx.native((p) => `nbdcopy --connections=4 ${p(server.uri)} null:`),
        native: zstdDecompress(ctx, archive),
        target: 0.8,
        bytes: DENSE_1G.size,
      }),
      value({
        id: "read-4k",
        label: "random 4 KiB reads, one at a time: cold (a new extent each) and warm",
        figures: {
          coldP50: { unit: "ms" },
          coldP99: { unit: "ms" },
          warmP50: { unit: "ms" },
          warmP99: { unit: "ms" },
        },
        sample: (run) => latencies(server.uri, run.round),
      }),
      value({
        id: "rss",
        label: "peak RSS of serve (nbdcopy passes and the random reads so far)",
        figures: { rss: { unit: "MiB", summary: "worst", target: { max: 128 } } },
        sample: async () => ({ rss: await server.peakMiB() }),
      }),
    ];
  },
  checks(ctx) {
    return [{
      label: "serve: nbdcopy of the export equals dense-1g.raw (cmp); each extent decoded once",
      async run() {
        const fresh = await startServe(ctx, join(ctx.out, "dense.vma.zst"), "check.sock");
        const copy = join(ctx.out, "copy.raw");
        let summary = "";
        try {
          await Deno.writeFile(copy, new Uint8Array(0));
          await ctx.run(["nbdcopy", fresh.uri, copy]);
          await ctx.run(["cmp", copy, ctx.pathOf(DENSE_1G)]);
        } finally {
          summary = await fresh.stop();
          await Deno.remove(copy).catch(() => {});
        }
        const decoded = Number(summary.match(/(\d+) extents decoded/)?.[1]);
        if (!(decoded <= 300)) throw new Error(`more extents decoded than stored: ${summary}`);
        return `identical; ${summary}`;
      },
    }];
  },
  async teardown(_ctx, { server }) {
    await server.stop();
  },
});

/** One round of random 4 KiB reads through a new connection: the latency percentiles. */
async function latencies(uri: string, round: number): Promise<Record<string, number>> {
  await using client = await NbdClient.connect(uri);
  const buffer = new Uint8Array(4096);
  const extents = Math.floor(DENSE_1G.size / EXTENT_BYTES);
  const order = shuffled([...Array(extents).keys()], round * 7 + 1).slice(0, 100);
  const at = (e: number, k: number) =>
    e * EXTENT_BYTES + ((k * 7919 * 4096) % (EXTENT_BYTES - 4096));
  const cold: number[] = [];
  for (const [k, e] of order.entries()) {
    const started = performance.now();
    await client.read(at(e, k), buffer);
    cold.push(performance.now() - started);
  }
  const warm: number[] = [];
  const hot = order.slice(-2); // the last extents read are in the cache
  for (let k = 0; k < 200; k++) {
    const started = performance.now();
    await client.read(at(hot[k % 2]!, k + 1), buffer);
    warm.push(performance.now() - started);
  }
  return {
    coldP50: percentile(cold, 50),
    coldP99: percentile(cold, 99),
    warmP50: percentile(warm, 50),
    warmP99: percentile(warm, 99),
  };
}

async function startServe(ctx: GroupContext, archive: string, socket: string): Promise<Serving> {
  const path = join(ctx.out, socket);
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ctx.cli, "serve", archive, "--socket", path, "--quiet"],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).values();
  const first = await lines.next();
  if (first.done) throw new Error(`serve did not start: ${await stderr}`);
  let stopped: Promise<string> | undefined;
  return {
    uri: first.value.split("\n")[0]!,
    async peakMiB() {
      const status = await Deno.readTextFile(`/proc/${child.pid}/status`);
      return Number(status.match(/VmHWM:\s+(\d+)/)?.[1] ?? NaN) / 1024;
    },
    stop() {
      stopped ??= (async () => {
        child.kill("SIGTERM");
        const [{ code }, text] = await Promise.all([child.status, stderr]);
        await lines.return?.();
        if (code !== 0) throw new Error(`serve exited ${code}: ${text.trim()}`);
        return text.trim().split("\n").at(-1) ?? "";
      })();
      return stopped;
    },
  };
}

function percentile(samples: number[], p: number): number {
  const sorted = [...samples].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

function shuffled<T>(items: T[], seed: number): T[] {
  let state = seed;
  for (let i = items.length - 1; i > 0; i--) {
    state = (state * 1103515245 + 12345) & 0x7fffffff;
    const j = state % (i + 1);
    [items[i], items[j]] = [items[j]!, items[i]!];
  }
  return items;
}
