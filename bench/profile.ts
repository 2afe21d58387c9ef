// deno-lint-ignore-file no-console
// Copyright 2026 the vmabackup authors. MIT license.
/**
 * CPU profiles of the CLI on the benchmark's inputs, summarized per thread: where the main
 * thread and each Worker spend their time, by self time.
 *
 * ```sh
 * deno task bench --only dense    # builds bench/work/dense-1g.raw and the archives first
 * deno task profile               # profiles backup, extract and verify of the dense image
 * deno task profile --top 8       # fewer functions per thread
 * ```
 *
 * Each command runs once under `deno run --cpu-prof` (V8's sampling profiler, 1 ms
 * intervals by default; it slows the run down, so compare shares, not seconds). The summary is
 * Markdown on stdout: a table per command and thread, with `(idle)` for time spent waiting.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";

const ROOT = new URL("..", import.meta.url).pathname;
const WORK = join(ROOT, "bench", "work");

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

/**
 * Milliseconds of self time per function (`name file:line`), largest first.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { selfTimes } from "./profile.ts";
 *
 * const frame = (functionName: string) => ({ functionName, url: "file:///a/b.ts", lineNumber: 4 });
 * const profile = {
 *   nodes: [{ id: 1, callFrame: frame("") }, { id: 2, callFrame: frame("hot") }],
 *   samples: [2, 2, 1],
 *   timeDeltas: [1000, 3000, 500],
 * };
 * assert.deepEqual(selfTimes(profile), [["hot b.ts:4", 4], ["(anonymous) b.ts:4", 0.5]]);
 * ```
 */
export function selfTimes(profile: CpuProfile): [string, number][] {
  const microseconds = new Map<number, number>();
  profile.samples.forEach((id, i) => {
    microseconds.set(id, (microseconds.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0));
  });
  const byFunction = new Map<string, number>();
  for (const { id, callFrame } of profile.nodes) {
    const file = callFrame.url.split("/").at(-1) || "(native)";
    const key = `${callFrame.functionName || "(anonymous)"} ${file}:${callFrame.lineNumber}`;
    byFunction.set(key, (byFunction.get(key) ?? 0) + (microseconds.get(id) ?? 0) / 1000);
  }
  return [...byFunction].filter(([, ms]) => ms > 0).sort((a, b) => b[1] - a[1]);
}

async function profileCommand(label: string, args: string[], top: number): Promise<string> {
  const directory = await Deno.makeTempDir({ prefix: "vmabackup-profile-" });
  try {
    const { success, stderr } = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--cpu-prof", `--cpu-prof-dir=${directory}`, "cli.ts", ...args],
      cwd: ROOT,
      env: { NO_COLOR: "1" },
      stdout: "null",
      stderr: "piped",
    }).output();
    if (!success) throw new Error(`${label} failed: ${new TextDecoder().decode(stderr).trim()}`);
    const lines = [`### ${label}`, "", `\`deno run -A --cpu-prof cli.ts ${args.join(" ")}\``, ""];
    const files = [...Deno.readDirSync(directory)].map((entry) => entry.name).sort();
    for (const name of files) {
      const profile: CpuProfile = JSON.parse(await Deno.readTextFile(join(directory, name)));
      const times = selfTimes(profile);
      const total = times.reduce((sum, [, ms]) => sum + ms, 0);
      const thread = /worker-\d+/.exec(name)?.[0] ?? "main thread";
      lines.push(`| ${thread}: function | self ms | share |`, "| --- | ---: | ---: |");
      for (const [key, ms] of times.slice(0, top)) {
        lines.push(`| ${key} | ${ms.toFixed(0)} | ${(100 * ms / total).toFixed(1)} % |`);
      }
      lines.push(`| total | ${total.toFixed(0)} | |`, "");
    }
    return lines.join("\n");
  } finally {
    await Deno.remove(directory, { recursive: true });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({ options: { top: { type: "string", default: "12" } } });
  const top = Number(values.top);
  const dense = join(WORK, "dense-1g.raw");
  const out = join(WORK, "out");
  const archive = join(out, "dense.vma.zst");
  await Deno.mkdir(out, { recursive: true });
  const commands: [string, string[]][] = [
    ["backup → .vma.zst", [
      "backup",
      "--disk",
      dense,
      "-o",
      archive,
      "--force",
      "--progress",
      "none",
    ]],
    ["backup → .vma", [
      "backup",
      "--disk",
      dense,
      "-o",
      join(out, "dense.vma"),
      "--force",
      "--progress",
      "none",
    ]],
    ["extract .vma.zst", [
      "extract",
      archive,
      join(out, "dense-restored"),
      "--force",
      "--progress",
      "none",
    ]],
    ["verify .vma.zst", ["verify", archive, "--progress", "none"]],
  ];
  console.log(
    `## CPU profiles (${
      new Date().toISOString().slice(0, 10)
    }, ${navigator.hardwareConcurrency} cores)\n`,
  );
  for (const [label, args] of commands) console.log(await profileCommand(label, args, top));
}
