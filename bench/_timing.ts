// Copyright 2026 the vmabackup authors. MIT license.
/**
 * One timed run of one command, isolated from the runs around it.
 *
 * Wall seconds are taken around the process (`/usr/bin/time -f '%M %U %S'` writes the peak RSS
 * and the CPU seconds into a file), so ours includes Deno's start-up. Untimed, before the run: leftover outputs are deleted
 * and `sync` runs; after it: `sync` (the run's dirty pages are written back now, not during the
 * next run), the outputs are deleted, and `sync` again (the deletion's journal commit, and with
 * ext4's `discard` the trims of the freed blocks, happen now too). The page cache is not dropped:
 * `drop_caches` is machine-wide and would also evict the warmed inputs (and other users' files);
 * deleting a file drops its cached pages anyway.
 *
 * @module
 */
import { ENV, errorLine, exists, KiB, remove, ROOT, round, run } from "./_util.ts";

/** A command line to time, with the files it writes. */
export interface Command {
  /** `ours` (our CLI) or `native` (anything else): which side the report names. */
  readonly kind: "ours" | "native";
  /** The command as shown in the report, paths relative to the work directory. */
  readonly display: string;
  /** What runs under `/usr/bin/time`. */
  readonly argv: readonly string[];
  /** Files and directories the command writes: deleted after every run (untimed). */
  readonly outputs: readonly string[];
}

/** The outcome of one timed run. */
export interface Timed {
  seconds: number;
  /** Peak resident set of the process, GNU time's `%M`. */
  rssMiB: number;
  /** User + system CPU seconds of the process and its children (`%U` + `%S`). */
  cpuSeconds: number;
  /** `Dirty` + `Writeback` of /proc/meminfo right before the start (other users' writes too). */
  dirtyKiBAtStart: number | null;
  stdout: string;
  stderr: string;
  /** Set when the command failed: its exit code and error line. */
  error?: string;
}

/** Runs `command` once, timed and isolated; `timeFile` receives GNU time's figure. */
export async function timeRun(
  command: Command,
  timeFile: string,
  signal: AbortSignal,
): Promise<Timed> {
  let leftovers = false;
  for (const path of command.outputs) {
    if (await exists(path)) leftovers = true;
    await remove(path);
  }
  await run(["sync"], signal);
  if (leftovers) await run(["sync"], signal);
  const dirtyKiBAtStart = await dirtyKiB();
  signal.throwIfAborted();
  const start = performance.now();
  // In its own process group, so that an interruption stops all of it (time, sh, the tool).
  const child = new Deno.Command("/usr/bin/time", {
    args: ["-f", "%M %U %S", "-o", timeFile, ...command.argv],
    cwd: ROOT,
    env: ENV,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    detached: true,
  }).spawn();
  const stop = () => {
    try {
      Deno.kill(-child.pid, "SIGTERM");
    } catch { /* it has exited */ }
  };
  signal.addEventListener("abort", stop, { once: true });
  let output: Deno.CommandOutput;
  try {
    output = await child.output();
  } finally {
    signal.removeEventListener("abort", stop);
  }
  const seconds = (performance.now() - start) / 1000;
  signal.throwIfAborted();
  await flushAndDelete(command.outputs, signal);
  const timeLines = (await Deno.readTextFile(timeFile).catch(() => "")).trim().split("\n");
  const [maxKiB, user, system] = (timeLines.at(-1) ?? "").split(" ").map(Number);
  const rssMiB = round(Number(maxKiB) / KiB, 1);
  const cpuSeconds = round(Number(user) + Number(system), 2);
  const decoder = new TextDecoder();
  const timed: Timed = {
    seconds: round(seconds, 3),
    rssMiB,
    cpuSeconds,
    dirtyKiBAtStart,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
  if (!output.success) {
    const reason = errorLine(output.stderr) || timeLines[0] || "no message";
    timed.error = `exit ${output.code}: ${reason}`;
  }
  return timed;
}

/** `sync`, delete `outputs`, `sync`: the write-back and the deletion, both outside the timing. */
export async function flushAndDelete(
  outputs: readonly string[],
  signal?: AbortSignal,
): Promise<void> {
  await run(["sync"], signal);
  if (outputs.length === 0) return;
  for (const path of outputs) await remove(path);
  await run(["sync"], signal);
}

/** `Dirty` + `Writeback` in KiB from /proc/meminfo, `null` where there is none. */
async function dirtyKiB(): Promise<number | null> {
  const meminfo = await Deno.readTextFile("/proc/meminfo").catch(() => "");
  const dirty = /^Dirty:\s+(\d+)/m.exec(meminfo)?.[1];
  const writeback = /^Writeback:\s+(\d+)/m.exec(meminfo)?.[1];
  return dirty === undefined || writeback === undefined ? null : Number(dirty) + Number(writeback);
}
