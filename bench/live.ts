// deno-lint-ignore-file no-console
// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The live-backup rows of `deno task bench` (`--only live`), also runnable alone:
 *
 * ```sh
 * deno run -A bench/live.ts                     # 1 GiB disk, 30 MB/s sink
 * deno run -A bench/live.ts --size-mib 256 --sink-mbps 20
 * ```
 *
 * A QEMU 7.2 VM (q35, TCG, CPU halted, as in the tests) with a 1 GiB qcow2 disk of non-zero
 * data is backed up with `cli.ts backup --qmp ... -o -` (uncompressed, as `-o -` defaults to,
 * and with `--compress zstd`), in push and in pull mode, into a reader that takes at most
 * 30 MB/s (a slow network). While the backup runs,
 * the guest writes without pause: rounds of 64 writes of 64 KiB at random clusters all over
 * the disk, in flight together (HMP `qemu-io aio_write`, waiting for all 64). Reported per
 * mode: the CLI's peak RSS (GNU time `%M`, target ≤ 128 MiB) and the guest-visible write
 * latency, p50 and p99 from qemu-io's own timing of each write, against the same writes
 * with no backup running. In push mode a write to a cluster
 * not copied yet waits for the copy, so for the sink: that is the design's trade-off, and
 * what pull mode avoids (the old data goes to the fleece image on local disk).
 *
 * @module
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { QEMU, startVm, type TestVm } from "../tests/_qemu.ts";

const MiB = 1024 * 1024;
const CLUSTER = 65536;
const RSS_LIMIT_MIB = 128;
const ROOT = fileURLToPath(new URL("..", import.meta.url));

/** Options of {@linkcode liveBench}. */
export interface LiveBenchOptions {
  /** The cli.ts to measure. */
  cli: string;
  /** Where GNU time's output goes. */
  work: string;
  /** Disk size in MiB (default 1024). */
  sizeMiB?: number;
  /** Rate of the reader of the archive, 10^6 bytes per second (default 30). */
  sinkMBps?: number;
}

/** One row: a backup mode, or the guest's writes without a backup. */
export interface LiveRow {
  label: string;
  mode: "none" | "push" | "pull";
  compress: "none" | "zstd" | null;
  peakRssMiB: number | null;
  seconds: number | null;
  archiveBytes: number | null;
  guestWrites: number;
  latencyP50Ms: number;
  latencyP99Ms: number;
  error?: string;
}

/** What {@linkcode liveBench} measured. */
export interface LiveBenchResult {
  rows: LiveRow[];
  /** Whether every backup's peak RSS met the target. */
  rssMet: boolean;
  /** A backup failed. */
  failed: boolean;
  markdown: string;
  setup: { diskMiB: number; sinkMBps: number; writesPerRound: number; writeBytes: number };
}

/**
 * Runs the live-backup measurements (push, pull, and the guest's writes alone).
 *
 * @example
 * ```ts ignore
 * import { liveBench } from "./live.ts";
 *
 * const result = await liveBench({ cli: "cli.ts", work: "bench/work", sizeMiB: 256 });
 * console.log(result.markdown);
 * ```
 */
export async function liveBench(options: LiveBenchOptions): Promise<LiveBenchResult> {
  const sizeMiB = options.sizeMiB ?? 1024;
  const sinkMBps = options.sinkMBps ?? 30;
  const size = sizeMiB * MiB;
  const rows: LiveRow[] = [];
  await Deno.mkdir(options.work, { recursive: true });
  // Every row gets a new VM with the same disk: the guest's writes change it.
  const content = noise(size);
  const withVm = async <T>(use: (vm: TestVm) => Promise<T>): Promise<T> => {
    const vm = await startVm([{ id: "vda", size, format: "qcow2", data: [[0, content]] }]);
    try {
      return await use(vm);
    } finally {
      await vm.stop({ readBack: false }).catch(() => {});
    }
  };
  log(`[live] guest writes without a backup (a VM with a ${sizeMiB} MiB qcow2 disk)`);
  const alone = await withVm((vm) => guestWrites(vm, size, { rounds: 8 }));
  rows.push({
    label: "guest writes, no backup",
    mode: "none",
    compress: null,
    peakRssMiB: null,
    seconds: null,
    archiveBytes: null,
    ...summary(alone),
  });
  for (const compress of ["none", "zstd"] as const) {
    for (const mode of ["push", "pull"] as const) {
      log(`[live] ${mode} backup (${compress}) into a ${sinkMBps} MB/s reader, guest writing`);
      rows.push(
        await withVm((vm) => backupWhileWriting(vm, size, mode, compress, sinkMBps, options)),
      );
    }
  }
  const backups = rows.filter((row) => row.mode !== "none");
  const rssMet = backups.every((row) => row.peakRssMiB !== null && row.peakRssMiB <= RSS_LIMIT_MIB);
  const failed = backups.some((row) => row.error !== undefined);
  const setup = { diskMiB: sizeMiB, sinkMBps, writesPerRound: 64, writeBytes: CLUSTER };
  return { rows, rssMet, failed, markdown: markdown(rows, rssMet, setup), setup };
}

/**
 * Rounds of 64 guest writes of 64 KiB at random clusters, in flight together (qemu-io
 * `aio_write`), as a guest's block layer queues them; each write's latency
 * in ms from qemu-io's own timing (its `ops/sec` for the one request, on QEMU's stdout).
 */
async function guestWrites(
  vm: TestVm,
  size: number,
  until: { rounds: number } | { while: () => boolean },
): Promise<number[]> {
  const latencies: number[] = [];
  let seen = vm.output().length;
  let state = 0x2545f491;
  const random = (n: number) => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) % n;
  };
  for (let round = 0;; round++) {
    if ("rounds" in until ? round >= until.rounds : !until.while()) break;
    for (let i = 0; i < 64; i++) {
      const offset = random(size / CLUSTER) * CLUSTER;
      await vm.io("vda", `aio_write -P ${1 + (round + i) % 250} ${offset} 64k`);
    }
    // Wait for the 64 lines on QEMU's stdout (aio_flush drains everything, which can wait
    // for a backup job while it holds QEMU's main loop).
    const completed = () => [...vm.output().slice(seen).matchAll(TIMING)];
    while (completed().length < 64) await new Promise((resolve) => setTimeout(resolve, 2));
    const matches = completed().slice(0, 64);
    const last = matches.at(-1)!;
    seen += last.index + last[0].length;
    for (const match of matches) latencies.push(1000 / Number(match[1]));
  }
  return latencies;
}

/**
 * qemu-io's line after each write: `64 KiB, 1 ops; 00.00 sec (8.2 MiB/sec and 131.8 ops/sec)`,
 * or `0:00:02.19 (29.2 KiB/sec and 0.4564 ops/sec)` from a second on.
 */
const TIMING =
  /^64 KiB, 1 ops; [\d.:]+(?: sec)? \([\d.]+ (?:bytes|[KMGT]iB)\/sec and ([\d.]+) ops\/sec\)$/gm;

async function backupWhileWriting(
  vm: TestVm,
  size: number,
  mode: "push" | "pull",
  compress: "none" | "zstd",
  sinkMBps: number,
  options: LiveBenchOptions,
): Promise<LiveRow> {
  const timeFile = join(options.work, `live-${mode}-${compress}.time`);
  const extra = mode === "pull" ? ["--discard-read"] : [];
  const child = new Deno.Command("/usr/bin/time", {
    args: [
      "-f",
      "%M",
      "-o",
      timeFile,
      Deno.execPath(),
      "run",
      "-A",
      options.cli,
      "backup",
      "--qmp",
      vm.toolQmp,
      "--mode",
      mode,
      "-o",
      "-",
      "--compress",
      compress,
      "--progress",
      "json",
      ...extra,
    ],
    cwd: ROOT,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const started = performance.now();
  let stderr = "";
  let snapshot!: () => void;
  const snapshotTaken = new Promise<void>((resolve) => snapshot = resolve);
  const messages = child.stderr.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({
      write(text) {
        stderr += text;
        if (stderr.includes('"event":"snapshot"')) snapshot();
      },
    }),
  );
  let running = true;
  const archiveBytes = slowReader(child.stdout, sinkMBps).finally(() => running = false);
  const status = child.status.finally(() => {
    running = false;
    snapshot();
  });
  await snapshotTaken;
  const latencies = await guestWrites(vm, size, { while: () => running });
  const [{ code }, bytes] = await Promise.all([status, archiveBytes, messages]);
  const seconds = (performance.now() - started) / 1000;
  const rss = Number((await Deno.readTextFile(timeFile)).trim().split("\n").at(-1)) / 1024;
  const row: LiveRow = {
    label: `${mode} backup, ${compress === "none" ? "uncompressed" : "zstd"}`,
    mode,
    compress,
    peakRssMiB: Number.isFinite(rss) ? Math.round(rss * 10) / 10 : null,
    seconds: Math.round(seconds * 10) / 10,
    archiveBytes: bytes,
    ...summary(latencies),
  };
  if (code !== 0) {
    row.error = `exit ${code}: ${
      stderr.trim().split("\n").filter((l) => !l.startsWith("{")).at(-1)
    }`;
  }
  log(
    `  ${mode}: ${row.seconds} s, peak RSS ${row.peakRssMiB} MiB, ${row.guestWrites} guest writes, ` +
      `p50 ${row.latencyP50Ms} ms, p99 ${row.latencyP99Ms} ms${row.error ? `, ${row.error}` : ""}`,
  );
  return row;
}

/** Reads a stream at most `mbps` 10^6 bytes per second; resolves to the bytes read. */
async function slowReader(stream: ReadableStream<Uint8Array>, mbps: number): Promise<number> {
  const started = performance.now();
  let total = 0;
  for await (const chunk of stream) {
    total += chunk.byteLength;
    const due = total / (mbps * 1e6) * 1000 - (performance.now() - started);
    if (due > 0) await new Promise((resolve) => setTimeout(resolve, due));
  }
  return total;
}

function summary(latencies: number[]) {
  const sorted = [...latencies].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? 0;
  const round = (ms: number) => Math.round(ms * 100) / 100;
  return {
    guestWrites: sorted.length,
    latencyP50Ms: round(at(0.5)),
    latencyP99Ms: round(at(0.99)),
  };
}

/** Incompressible bytes with no zero block, fast (xorshift over 32-bit words). */
function noise(size: number): Uint8Array {
  const words = new Uint32Array(size / 4);
  let state = 0x9e3779b9;
  for (let i = 0; i < words.length; i++) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    words[i] = state;
  }
  return new Uint8Array(words.buffer);
}

function markdown(rows: LiveRow[], rssMet: boolean, setup: LiveBenchResult["setup"]): string {
  const cell = (value: number | null, unit = "") => value === null ? "—" : `${value}${unit}`;
  return [
    `Live backup of a ${setup.diskMiB} MiB qcow2 disk into a ${setup.sinkMBps} MB/s reader, ` +
    `while the guest writes rounds of ${setup.writesPerRound} × 64 KiB at random clusters:`,
    "",
    "| measurement | peak RSS MiB (target ≤ 128) | status | seconds | guest writes | write p50 ms | write p99 ms |",
    "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ...rows.map((row) => {
      const status = row.peakRssMiB === null
        ? "—"
        : row.peakRssMiB <= RSS_LIMIT_MIB
        ? "met"
        : "missed";
      return `| ${row.label}${row.error ? ` (failed: ${row.error})` : ""} | ${
        cell(row.peakRssMiB)
      } | ${status} | ${
        cell(row.seconds)
      } | ${row.guestWrites} | ${row.latencyP50Ms} | ${row.latencyP99Ms} |`;
    }),
    "",
    `Peak RSS target (every backup): ${rssMet ? "met" : "missed"}.`,
  ].join("\n");
}

function log(message: string): void {
  console.error(message);
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      "size-mib": { type: "string", default: "1024" },
      "sink-mbps": { type: "string", default: "30" },
      cli: { type: "string", default: join(ROOT, "cli.ts") },
      work: { type: "string", default: join(ROOT, "bench", "work") },
    },
  });
  if (!QEMU) {
    console.error("error: the live benchmark needs QEMU (apt-get install qemu-system-x86)");
    Deno.exit(1);
  }
  const result = await liveBench({
    cli: values.cli,
    work: values.work,
    sizeMiB: Number(values["size-mib"]),
    sinkMBps: Number(values["sink-mbps"]),
  });
  console.log(result.markdown);
  Deno.exit(result.failed ? 1 : 0);
}
