// deno-lint-ignore-file no-console
// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Benchmark of `cli.ts serve` (the `serve` group of `deno task bench`; also runnable alone:
 * `deno run -A bench/serve.ts --work bench/work --runs 5`).
 *
 * Input: `dense.vma.zst`, the backup of the 1 GiB dense image (`dense-1g.raw`, built by
 * bench.ts), made once with `cli.ts backup` (untimed) and kept in the work directory.
 *
 * - **Throughput**: `nbdcopy URI null:` (4 connections, multi-conn) from a freshly started
 *   `serve` (its cache empty, the archive in the page cache) against
 *   `zstd -d -q -c ARCHIVE > /dev/null`, in interleaved pairs; the speed ratio (zstd's time ÷
 *   nbdcopy's) of the best of each and the median of the pairs. Target ≥ 0.8.
 * - **Random 4 KiB reads**, one at a time through one NBD connection (NbdClient): latency
 *   percentiles p50 and p99 with the cache cold (a fresh server, every read in an extent not
 *   read before: a stored frame read and decoded) and warm (reads within the extents just
 *   read).
 * - **Peak RSS** of the serve process (VmHWM from /proc) over all of it. Target ≤ 128 MiB.
 *
 * This is a separate module because bench/ is being split into bench/groups/ on another
 * branch; bench.ts only calls {@linkcode runServeBench} for `--only serve` and at the end of a
 * full run.
 *
 * @module
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { NbdClient } from "../mod.ts";

const MiB = 1 << 20;
const ROOT = fileURLToPath(new URL("..", import.meta.url));
const DENO = Deno.execPath();

/** One measured figure of the serve group. */
export interface ServeFigure {
  label: string;
  value: number;
  unit: string;
  target: string | null;
  met: boolean | null;
  detail: string;
}

/** What {@linkcode runServeBench} found. */
export interface ServeBenchResult {
  archive: { path: string; bytes: number; diskBytes: number };
  runs: number;
  nbdcopySeconds: number[];
  zstdSeconds: number[];
  latencyMs: {
    cold: { p50: number; p99: number; n: number };
    warm: { p50: number; p99: number; n: number };
  };
  peakRssMiB: number;
  figures: ServeFigure[];
  checks: { label: string; ok: boolean; detail: string }[];
  markdown: string;
}

/** Runs the serve group; `dense` is the 1 GiB dense image, `work` the work directory. */
export async function runServeBench(
  options: { work: string; dense: string; runs: number; cli?: string },
): Promise<ServeBenchResult> {
  const cli = options.cli ?? join(ROOT, "cli.ts");
  const dir = join(options.work, "out", "serve");
  await Deno.mkdir(dir, { recursive: true });
  const archive = join(dir, "dense.vma.zst");
  if (!await exists(archive)) {
    log(`[serve] backing up ${options.dense} to ${archive} (untimed)`);
    await run([
      DENO,
      "run",
      "-A",
      cli,
      "backup",
      "--disk",
      `drive-scsi0=${options.dense}`,
      "-o",
      archive,
    ]);
  }
  await run(["cat", archive], "/dev/null"); // into the page cache, as for zstd
  const diskBytes = (await Deno.stat(options.dense)).size;
  let peak = 0;
  const nbdcopy: number[] = [];
  const zstd: number[] = [];
  const checks: ServeBenchResult["checks"] = [];
  for (let round = 0; round < options.runs; round++) {
    const server = await startServe(cli, archive, dir);
    try {
      const started = performance.now();
      await run(["nbdcopy", "--connections=4", server.uri, "null:"]);
      nbdcopy.push((performance.now() - started) / 1000);
      const hwm = await server.hwm();
      log(`[serve] peak RSS after nbdcopy: ${(hwm / 1024).toFixed(1)} MiB`);
      peak = Math.max(peak, hwm);
    } finally {
      const summary = await server.stop();
      if (round === 0) checks.push(decodedOnce(summary));
    }
    const started = performance.now();
    await run(["zstd", "-d", "-q", "-c", archive], "/dev/null");
    zstd.push((performance.now() - started) / 1000);
    log(
      `[serve] round ${round + 1}: nbdcopy ${nbdcopy.at(-1)!.toFixed(2)} s, zstd -d ${
        zstd.at(-1)!.toFixed(2)
      } s`,
    );
  }
  checks.push(await copyEquals(cli, archive, dir, options.dense));

  // Random 4 KiB reads of stored data, cold (every read in a new extent) and warm.
  const server = await startServe(cli, archive, dir);
  let cold: number[] = [];
  let warm: number[] = [];
  try {
    await using client = await NbdClient.connect(server.uri);
    const buffer = new Uint8Array(4096);
    const extent = 58 * 65536; // an extent of the writer holds 58 clusters
    const extents = Math.floor(diskBytes / extent);
    const order = shuffled([...Array(extents).keys()], 7).slice(0, Math.min(200, extents));
    const at = (e: number, k: number) => e * extent + ((k * 7919 * 4096) % (extent - 4096));
    for (const [k, e] of order.entries()) {
      const t = performance.now();
      await client.read(at(e, k), buffer);
      cold.push(performance.now() - t);
    }
    const hot = order.slice(-2); // the last extents read are in the cache
    for (let k = 0; k < 400; k++) {
      const t = performance.now();
      await client.read(at(hot[k % 2]!, k + 1), buffer);
      warm.push(performance.now() - t);
    }
    const hwm = await server.hwm();
    log(`[serve] peak RSS after the random reads: ${(hwm / 1024).toFixed(1)} MiB`);
    peak = Math.max(peak, hwm);
  } finally {
    await server.stop();
  }
  cold = cold.sort((a, b) => a - b);
  warm = warm.sort((a, b) => a - b);
  const latency = {
    cold: { p50: percentile(cold, 50), p99: percentile(cold, 99), n: cold.length },
    warm: { p50: percentile(warm, 50), p99: percentile(warm, 99), n: warm.length },
  };

  const best = Math.min(...zstd) / Math.min(...nbdcopy);
  const median = percentile(nbdcopy.map((s, i) => zstd[i]! / s).sort((a, b) => a - b), 50);
  const peakMiB = peak / 1024;
  const figures: ServeFigure[] = [
    {
      label:
        "nbdcopy of the served dense 1 GiB `.vma.zst` vs `zstd -d -c > /dev/null` (speed ratio)",
      value: round(best, 2),
      unit: "×",
      target: "≥ 0.8",
      met: best >= 0.8,
      detail: `best ${Math.min(...nbdcopy).toFixed(2)} s vs ${
        Math.min(...zstd).toFixed(2)
      } s; median of pairs ${median.toFixed(2)}`,
    },
    {
      label: "random 4 KiB read, cache cold: p50 / p99",
      value: round(latency.cold.p50, 2),
      unit: "ms",
      target: null,
      met: null,
      detail: `p99 ${latency.cold.p99.toFixed(2)} ms over ${cold.length} reads`,
    },
    {
      label: "random 4 KiB read, cache warm: p50 / p99",
      value: round(latency.warm.p50, 3),
      unit: "ms",
      target: null,
      met: null,
      detail: `p99 ${latency.warm.p99.toFixed(3)} ms over ${warm.length} reads`,
    },
    {
      label: "peak RSS of serve",
      value: round(peakMiB, 1),
      unit: "MiB",
      target: "≤ 128",
      met: peakMiB <= 128,
      detail: "VmHWM over the nbdcopy runs and the random reads",
    },
  ];
  const rows = figures.map((f) =>
    `| ${f.label} | ${f.value} ${f.unit} | ${f.detail} | ${f.target ?? "—"} | ${
      f.met === null ? "info" : f.met ? "met" : "missed"
    } |`
  );
  const markdown = [
    "| serve (dense 1 GiB `.vma.zst`) | value | detail | target | status |",
    "| --- | ---: | --- | ---: | --- |",
    ...rows,
  ].join("\n");
  return {
    archive: { path: archive, bytes: (await Deno.stat(archive)).size, diskBytes },
    runs: options.runs,
    nbdcopySeconds: nbdcopy.map((s) => round(s, 3)),
    zstdSeconds: zstd.map((s) => round(s, 3)),
    latencyMs: latency,
    peakRssMiB: round(peakMiB, 1),
    figures,
    checks,
    markdown,
  };
}

interface Serving {
  uri: string;
  /** VmHWM of the serve process, KiB. */
  hwm(): Promise<number>;
  /** SIGTERM, and its last stderr line (the summary). */
  stop(): Promise<string>;
}

async function startServe(cli: string, archive: string, dir: string): Promise<Serving> {
  const socket = join(dir, "serve.sock");
  await Deno.remove(socket).catch(() => {});
  const child = new Deno.Command(DENO, {
    args: ["run", "-A", cli, "serve", archive, "--socket", socket, "--quiet"],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).values();
  const first = await lines.next();
  if (first.done) throw new Error(`serve did not start: ${await stderr}`);
  const uri = first.value.split("\n")[0]!;
  return {
    uri,
    async hwm() {
      const status = await Deno.readTextFile(`/proc/${child.pid}/status`);
      return Number(status.match(/VmHWM:\s+(\d+)/)?.[1] ?? 0);
    },
    async stop() {
      child.kill("SIGTERM");
      const [{ code }, text] = await Promise.all([child.status, stderr]);
      await lines.return?.();
      if (code !== 0) throw new Error(`serve exited ${code}: ${text}`);
      return text.trim().split("\n").at(-1) ?? "";
    },
  };
}

/** nbdcopy decoded every extent once: the read-ahead did not thrash the cache. */
function decodedOnce(summary: string): { label: string; ok: boolean; detail: string } {
  const decoded = Number(summary.match(/(\d+) extents decoded/)?.[1]);
  return {
    label: "serve: nbdcopy made it decode each extent about once",
    ok: Number.isFinite(decoded) && decoded <= 300,
    detail: summary,
  };
}

async function copyEquals(cli: string, archive: string, dir: string, dense: string) {
  const label = "serve: nbdcopy of the export equals dense-1g.raw (cmp)";
  const server = await startServe(cli, archive, dir);
  const copy = join(dir, "copy.raw");
  try {
    await Deno.writeFile(copy, new Uint8Array(0));
    await run(["nbdcopy", server.uri, copy]);
    await run(["cmp", copy, dense]);
    return { label, ok: true, detail: "identical" };
  } catch (error) {
    return { label, ok: false, detail: error instanceof Error ? error.message : String(error) };
  } finally {
    await server.stop();
    await Deno.remove(copy).catch(() => {});
  }
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
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

function round(value: number, digits: number): number {
  return Number(value.toFixed(digits));
}

async function exists(path: string): Promise<boolean> {
  return await Deno.stat(path).then(() => true, () => false);
}

/** Runs a program; stdout to `stdoutPath` when given. Throws on failure. */
async function run(argv: string[], stdoutPath?: string): Promise<void> {
  const [program, ...args] = argv;
  const out = stdoutPath === undefined
    ? undefined
    : await Deno.open(stdoutPath, { write: true, create: true, truncate: true });
  const child = new Deno.Command(program!, {
    args,
    stdin: "null",
    stdout: out === undefined ? "null" : "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const piping = out === undefined ? Promise.resolve() : child.stdout.pipeTo(out.writable);
  const [{ code }, stderr] = await Promise.all([
    child.status,
    new Response(child.stderr).text(),
    piping,
  ]);
  if (code !== 0) throw new Error(`${argv.join(" ")} exited ${code}: ${stderr.trim()}`);
}

function log(message: string): void {
  console.error(message);
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      work: { type: "string", default: join(ROOT, "bench", "work") },
      runs: { type: "string", default: "3" },
    },
  });
  const result = await runServeBench({
    work: values.work,
    dense: join(values.work, "dense-1g.raw"),
    runs: Number(values.runs),
  });
  console.log(result.markdown);
  for (const check of result.checks) {
    console.log(`check: ${check.ok ? "ok" : "FAILED"}: ${check.label}: ${check.detail}`);
  }
  console.log(
    JSON.stringify({
      latencyMs: result.latencyMs,
      nbdcopy: result.nbdcopySeconds,
      zstd: result.zstdSeconds,
    }),
  );
}
