// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The machine, the tools and the checkout a benchmark run measured, for its results.
 *
 * @module
 */
import { dirname, resolve } from "node:path";
import { firstLine, MiB, round, tryRun } from "./_util.ts";

export interface Environment {
  hostname: string;
  deno: typeof Deno.version;
  os: string;
  hardwareConcurrency: number;
  nproc: number;
  cpuModel: string | null;
  memoryGiB: number | null;
  /** 1, 5 and 15 minute load averages when the run started. */
  loadAverageAtStart: number[];
  tools: { zstd: string | null; cp: string | null; qemuImg: string | null; time: string | null };
  cli: string;
  /** The commit of the measured CLI's checkout, `null` when it is not a git checkout. */
  git: { commit: string; dirty: boolean } | null;
}

export async function environment(cli: string): Promise<Environment> {
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo").catch(() => "");
  const meminfo = await Deno.readTextFile("/proc/meminfo").catch(() => "");
  const memKiB = Number(/^MemTotal:\s+(\d+)/m.exec(meminfo)?.[1] ?? NaN);
  return {
    hostname: hostname(),
    deno: Deno.version,
    os: `${Deno.build.os} ${Deno.osRelease()} ${Deno.build.arch}`,
    hardwareConcurrency: navigator.hardwareConcurrency,
    nproc: Number(await tryRun(["nproc"])),
    cpuModel: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ?? null,
    memoryGiB: Number.isNaN(memKiB) ? null : round(memKiB / MiB, 1),
    loadAverageAtStart: loadAverage(),
    tools: {
      zstd: /v\d+\.\d+\.\d+/.exec(await tryRun(["zstd", "--version"]))?.[0] ?? null,
      cp: firstLine(await tryRun(["cp", "--version"])) || null,
      qemuImg: firstLine(await tryRun(["qemu-img", "--version"])) || null,
      time: firstLine(await tryRun(["/usr/bin/time", "--version"])) || null,
    },
    cli,
    git: await gitState(dirname(cli)),
  };
}

/** Read-only: `--no-optional-locks` keeps `git status` from writing the index. */
async function gitState(directory: string): Promise<Environment["git"]> {
  const git = ["git", "--no-optional-locks", "-C", directory];
  const top = await tryRun([...git, "rev-parse", "--show-toplevel"]);
  if (top === "" || resolve(top) !== resolve(directory)) return null;
  const commit = await tryRun([...git, "rev-parse", "HEAD"]);
  return { commit, dirty: (await tryRun([...git, "status", "--porcelain"])) !== "" };
}

/** The 1, 5 and 15 minute load averages, to two decimals. */
export function loadAverage(): number[] {
  return Deno.loadavg().map((load) => round(load, 2));
}

/** The host name, safe in a file name. */
export function hostname(): string {
  try {
    return Deno.hostname().replace(/[^A-Za-z0-9._-]/g, "-") || "local";
  } catch {
    return "local";
  }
}
