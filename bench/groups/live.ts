// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Live backups of a running QEMU 7.2 VM (q35, TCG, CPU halted, as in the tests) while the guest
 * writes without pause. A 1 GiB qcow2 disk of incompressible data is backed up with
 * `cli.ts backup --qmp ... -o -` (uncompressed, as `-o -` defaults to, and with `--compress
 * zstd`), in push and in pull mode, into a reader that takes at most 30 MB/s (a slow network),
 * while the guest keeps rounds of 64 writes of 64 KiB at random clusters all over the disk in
 * flight together (HMP `qemu-io aio_write`, waiting for all 64), as a guest's block layer queues
 * them.
 *
 * Figures per backup: the CLI's peak RSS (GNU time `%M`; target ≤ 128 MiB for the uncompressed
 * backups, the ones the copy-before-write buffers decide; with zstd it is informational, since
 * the compression stage alone takes a disk backup into such a reader past 128 MiB) and the
 * guest-visible write latency, p50 and p99 of qemu-io's own timing of each write, against the
 * same writes with no backup running. In push mode a write to a cluster not copied yet waits for
 * the copy, so for the reader: the design's trade-off, which pull mode avoids (the old data goes
 * to the fleece image on local disk). Each sample starts a new VM from the same image (the
 * guest's writes change the disk).
 *
 * @module
 */
import { join } from "node:path";
import { convertImage, startVm, type TestVm } from "../../tests/_qemu.ts";
import { defineGroup, type GroupContext, type Row, value } from "../_group.ts";

const MiB = 1024 * 1024;
const CLUSTER = 65536;
const DISK_BYTES = 1024 * MiB;
const SINK_MBPS = 30;

interface State {
  /** The prepared qcow2 image every sample's VM starts from. */
  image: string;
}

export default defineGroup<State>({
  name: "live",
  description:
    "live backup of a running QEMU VM (1 GiB qcow2) into a 30 MB/s reader under heavy guest writes: peak RSS, guest write latency",
  tools: ["qemu-system-x86_64", "qemu-img"],
  async setup(ctx) {
    const raw = join(ctx.out, "disk.raw");
    const image = join(ctx.out, "disk.qcow2");
    ctx.log(`[live] preparing a ${DISK_BYTES / MiB} MiB qcow2 image of incompressible data`);
    await Deno.writeFile(raw, noise(DISK_BYTES));
    await convertImage(raw, "qcow2", image);
    await Deno.remove(raw);
    return { image };
  },
  rows(ctx, { image }) {
    const withVm = async <T>(use: (vm: TestVm) => Promise<T>): Promise<T> => {
      const vm = await startVm([{ id: "vda", size: DISK_BYTES, format: "qcow2", image }]);
      try {
        return await use(vm);
      } finally {
        await vm.stop({ readBack: false }).catch(() => {});
      }
    };
    const latency = { p50: { unit: "ms" }, p99: { unit: "ms" }, writes: { unit: "" } };
    const rows: Row[] = [
      value({
        id: "guest-writes",
        label: "guest writes, no backup (8 rounds of 64 × 64 KiB in flight)",
        figures: latency,
        sample: () => withVm(async (vm) => summary(await guestWrites(vm, { rounds: 8 }))),
      }),
    ];
    for (const compress of ["none", "zstd"] as const) {
      for (const mode of ["push", "pull"] as const) {
        rows.push(value({
          id: `${mode}-${compress}`,
          label: `${mode} backup ${
            compress === "none" ? "uncompressed" : "→ zstd"
          } into a ${SINK_MBPS} MB/s reader, guest writing`,
          figures: {
            rss: {
              unit: "MiB",
              summary: "worst",
              ...(compress === "none" && { target: { max: 128 } }),
            },
            seconds: { unit: "s" },
            ...latency,
          },
          sample: () => withVm((vm) => backupWhileWriting(ctx, vm, mode, compress)),
        }));
      }
    }
    return rows;
  },
});

/**
 * Rounds of 64 guest writes of 64 KiB at random clusters, in flight together (qemu-io
 * `aio_write`); each write's latency in ms from qemu-io's own timing (its `ops/sec` for the one
 * request, on QEMU's stdout). Waits for the completion lines, not `aio_flush`: that drains
 * everything, which can wait for a backup job while it holds QEMU's main loop.
 */
async function guestWrites(
  vm: TestVm,
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
      const offset = random(DISK_BYTES / CLUSTER) * CLUSTER;
      await vm.io("vda", `aio_write -P ${1 + (round + i) % 250} ${offset} 64k`);
    }
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

/** One backup through the CLI, while the guest writes; its figures. */
async function backupWhileWriting(
  ctx: GroupContext,
  vm: TestVm,
  mode: "push" | "pull",
  compress: "none" | "zstd",
): Promise<Record<string, number>> {
  const timeFile = join(ctx.out, `${mode}-${compress}.time`);
  const child = new Deno.Command("/usr/bin/time", {
    args: [
      ...["-f", "%M", "-o", timeFile, Deno.execPath(), "run", "-A", ctx.cli, "backup"],
      ...["--qmp", vm.toolQmp, "--mode", mode, "-o", "-", "--compress", compress],
      ...["--progress", "json", ...(mode === "pull" ? ["--discard-read"] : [])],
    ],
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
  const reading = slowReader(child.stdout, SINK_MBPS).finally(() => running = false);
  const status = child.status.finally(() => {
    running = false;
    snapshot();
  });
  await snapshotTaken;
  const latencies = await guestWrites(vm, { while: () => running });
  const [{ code }] = await Promise.all([status, reading, messages]);
  const seconds = (performance.now() - started) / 1000;
  if (code !== 0) {
    const line = stderr.trim().split("\n").filter((text) => !text.startsWith("{")).at(-1);
    throw new Error(`${mode} backup: exit ${code}: ${line}`);
  }
  const rss = Number((await Deno.readTextFile(timeFile)).trim().split("\n").at(-1)) / 1024;
  ctx.log(
    `  ${mode} ${compress}: ${seconds.toFixed(1)} s, peak RSS ${rss.toFixed(1)} MiB, ` +
      `${latencies.length} guest writes`,
  );
  return { rss, seconds, ...summary(latencies) };
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

function summary(latencies: number[]): { p50: number; p99: number; writes: number } {
  const sorted = [...latencies].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? 0;
  return { p50: at(0.5), p99: at(0.99), writes: sorted.length };
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
