// deno-lint-ignore-file no-console
// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Benchmark of backups to and reads from S3 storage: a fresh Ceph RGW 16.2 on this machine
 * (`tests/_rgw.ts`), the dense 1 GiB image of `deno task bench`.
 *
 * ```sh
 * deno task bench:s3              # 3 interleaved pairs per row
 * deno task bench:s3 --runs 5
 * ```
 *
 * Rows, each timed as interleaved pairs (ours, then the yardstick, `--runs` times; the median
 * of the per-pair speed ratios counts, native seconds ÷ ours):
 *
 * - upload: `backup -o s3://…` (streaming multipart upload) against `backup -o FILE` followed
 *   by `/usr/bin/aws s3 cp FILE s3://…` (staging a file first); target ≥ 0.9.
 * - download: `verify s3://…` against `verify FILE` of the same archive; target ≥ 0.8.
 * - peak RSS of every run of ours (GNU time), target ≤ 128 MiB.
 *
 * Needs Ceph (ceph-mon, ceph-osd, radosgw, ceph-common), the AWS CLI at `/usr/bin/aws`, GNU time
 * at `/usr/bin/time`, and `bench/work/dense-1g.raw` (built by `deno task bench --only dense`).
 * Writes `bench/results/s3-latest.json`.
 *
 * @module
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { freePort, rgwDown, type RgwServer, rgwUp } from "../tests/_rgw.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const CLI = join(ROOT, "cli.ts");
const RSS_LIMIT_MIB = 128;

interface Run {
  seconds: number;
  rssMiB: number;
}

/** Runs `argv` under GNU time; its wall seconds and peak RSS. Throws when it fails. */
async function timed(argv: string[], env: Record<string, string>): Promise<Run> {
  const timeFile = await Deno.makeTempFile();
  try {
    const started = performance.now();
    const { code, stderr } = await new Deno.Command("/usr/bin/time", {
      args: ["-f", "%M", "-o", timeFile, ...argv],
      env: { NO_COLOR: "1", ...env },
      stdout: "null",
      stderr: "piped",
    }).output();
    const seconds = (performance.now() - started) / 1000;
    if (code !== 0) {
      throw new Error(`${argv.join(" ")} failed: ${new TextDecoder().decode(stderr)}`);
    }
    const kib = Number((await Deno.readTextFile(timeFile)).trim().split("\n").at(-1));
    return { seconds, rssMiB: kib / 1024 };
  } finally {
    await Deno.remove(timeFile);
  }
}

/** The 1-minute load average (the machine is shared: a load above the cores means noise). */
async function loadAverage(): Promise<number> {
  return Number((await Deno.readTextFile("/proc/loadavg")).split(" ")[0]);
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/** One row: `runs` pairs of ours and the yardstick, interleaved. */
async function pairs(
  runs: number,
  ours: () => Promise<Run>,
  native: () => Promise<Run>,
): Promise<{ ours: Run[]; native: Run[]; ratios: number[] }> {
  const result = { ours: [] as Run[], native: [] as Run[], ratios: [] as number[] };
  for (let i = 0; i < runs; i++) {
    const a = await ours();
    const b = await native();
    result.ours.push(a);
    result.native.push(b);
    result.ratios.push(b.seconds / a.seconds);
  }
  return result;
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: { runs: { type: "string" }, work: { type: "string" } },
  });
  const runs = Number(values.runs ?? 3);
  const work = values.work ?? join(ROOT, "bench", "work");
  const image = join(work, "dense-1g.raw");
  if ((await Deno.stat(image).catch(() => undefined))?.size !== 1 << 30) {
    console.error(`error: ${image} is missing; build it with: deno task bench --only dense`);
    return 1;
  }
  const loadAtStart = await loadAverage();
  const out = join(work, "out", "s3");
  await Deno.mkdir(out, { recursive: true });
  const state = join(work, "rgw");
  console.error("starting Ceph RGW …");
  let server: RgwServer;
  try {
    server = await rgwUp(state, { mon: freePort(), rgw: freePort() });
  } catch (error) {
    console.error(`error: ${(error as Error).message.split("\n")[0]}`);
    return 1;
  }
  try {
    const env = {
      AWS_ACCESS_KEY_ID: server.accessKeyId,
      AWS_SECRET_ACCESS_KEY: server.secretAccessKey,
      AWS_REGION: server.region,
      AWS_ENDPOINT_URL: server.endpoint,
    };
    const aws = ["/usr/bin/aws", "--endpoint-url", server.endpoint];
    await timed([...aws, "s3", "mb", "s3://bench"], env);
    const deno = [Deno.execPath(), "run", "-A", CLI];
    const quiet = ["--force", "--progress", "none"];
    const file = join(out, "dense.vma.zst");
    const backupFile = [...deno, "backup", "--disk", image, "-o", file, ...quiet];
    // Warm the page cache, and leave an archive for the download row.
    await Deno.readFile(image);
    await timed(backupFile, env);
    await timed(
      [...deno, "backup", "--disk", image, "-o", "s3://bench/read.vma.zst", ...quiet],
      env,
    );

    console.error(`upload: ${runs} pairs …`);
    const upload = await pairs(
      runs,
      () =>
        timed([...deno, "backup", "--disk", image, "-o", "s3://bench/up.vma.zst", ...quiet], env),
      async () => {
        const backup = await timed(backupFile, env);
        const copy = await timed(
          [...aws, "s3", "cp", "--quiet", file, "s3://bench/staged.vma.zst"],
          env,
        );
        return {
          seconds: backup.seconds + copy.seconds,
          rssMiB: Math.max(backup.rssMiB, copy.rssMiB),
        };
      },
    );
    console.error(`download: ${runs} pairs …`);
    const verify = ["verify", "--progress", "none"];
    const download = await pairs(
      runs,
      () => timed([...deno, ...verify, "s3://bench/read.vma.zst"], env),
      () => timed([...deno, ...verify, file], env),
    );

    const rows = [
      {
        id: "s3.upload",
        label: "backup dense → s3:// vs backup → file + `aws s3 cp`",
        target: 0.9,
        ...upload,
      },
      { id: "s3.download", label: "verify s3:// vs verify of the file", target: 0.8, ...download },
    ].map((row) => ({
      id: row.id,
      label: row.label,
      target: row.target,
      ratio: Number(median(row.ratios).toFixed(2)),
      ratioRange: [Math.min(...row.ratios), Math.max(...row.ratios)].map((r) =>
        Number(r.toFixed(2))
      ),
      oursSeconds: Number(Math.min(...row.ours.map((r) => r.seconds)).toFixed(2)),
      nativeSeconds: Number(Math.min(...row.native.map((r) => r.seconds)).toFixed(2)),
      oursPeakRssMiB: Number(Math.max(...row.ours.map((r) => r.rssMiB)).toFixed(1)),
      nativePeakRssMiB: Number(Math.max(...row.native.map((r) => r.rssMiB)).toFixed(1)),
    }));
    const status = (met: boolean) => met ? "met" : "missed";
    console.log(
      "| measurement | ours s | yardstick s | ratio (min–max) | target | speed | peak RSS MiB ours / yardstick | RSS ≤ 128 |",
    );
    console.log("| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |");
    for (const row of rows) {
      const range = row.ratioRange.join("–");
      const rss = `${row.oursPeakRssMiB} / ${row.nativePeakRssMiB}`;
      console.log(
        `| ${row.label} | ${row.oursSeconds} | ${row.nativeSeconds} | ${row.ratio} (${range}) | ≥ ${row.target} | ${
          status(row.ratio >= row.target)
        } | ${rss} | ${status(row.oursPeakRssMiB <= RSS_LIMIT_MIB)} |`,
      );
    }
    const results = {
      date: new Date().toISOString(),
      host: Deno.hostname(),
      cores: navigator.hardwareConcurrency,
      deno: Deno.version.deno,
      runs,
      loadAverage: { start: loadAtStart, end: await loadAverage() },
      rssLimitMiB: RSS_LIMIT_MIB,
      rows,
    };
    await Deno.mkdir(join(ROOT, "bench", "results"), { recursive: true });
    await Deno.writeTextFile(
      join(ROOT, "bench", "results", "s3-latest.json"),
      `${JSON.stringify(results, null, 2)}\n`,
    );
    return 0;
  } finally {
    await rgwDown(state);
    await Deno.remove(state, { recursive: true }).catch(() => {});
    await Deno.remove(out, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) Deno.exit(await main());
