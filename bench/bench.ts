// deno-lint-ignore-file no-console
// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Benchmark of the vmabackup CLI against the native tools, measured in the same run as
 * interleaved pairs. This file is the runner: flags, the environment, the pairing, the results;
 * the measurements live in `bench/groups/NAME.ts`, one group per file.
 *
 * ```sh
 * deno task bench                        # every group, 5 pairs per row
 * deno task bench --runs 9               # 9 pairs per row
 * deno task bench --only dense,holes     # some groups (--list names them)
 * deno task bench --quick                # smoke test: 1 pair per row, results in the work dir
 * deno task bench --work /tmp/vmabench   # inputs and outputs elsewhere (default bench/work/)
 * deno task bench --cli /tmp/snap/cli.ts # another copy of the CLI, e.g. a `git archive` snapshot
 * deno task bench --clean                # delete the inputs and outputs, then exit
 * ```
 *
 * Needs GNU time at `/usr/bin/time` and `sync`; each group names the programs it needs (`tools`)
 * and is skipped with a note without them.
 *
 * **Method.** A row compares ours with a yardstick (a native tool, or our own baseline command).
 * It runs N pairs (`--runs`, default 5): ours then the yardstick, then the yardstick then ours, and
 * so on (A B, B A, ...), each command as its own process with `NO_COLOR=1` under
 * `/usr/bin/time -f %M` (peak RSS); the wall time is taken around the process, so ours includes
 * Deno's start-up. Each pair gives a speed ratio, native s ÷ ours s; the row reports the median of
 * the N ratios with their min–max, against its target, and best-of-N seconds and peak RSS of each
 * side. Pairing keeps the ratio honest when the shared machine's speed drifts: both sides of a
 * pair see about the same load. The rows of a group take turns (round 1 runs one pair of every
 * row, then round 2, ...), so noise spreads over all of them.
 *
 * **Isolation** (untimed, see `_timing.ts`): after every run `sync` writes its dirty pages back,
 * its outputs are deleted and `sync` runs again (the deletion's journal commit and trims), so one
 * run's write-back never lands in the next one's timing. The page cache is not dropped
 * (`drop_caches` is machine-wide and would evict the inputs too). Each input is read once before
 * its group's measurements to warm the page cache (holes included where a tool reads them); an
 * archive made in a group's `setup` is warmed the same way. The `Dirty` + `Writeback` memory at
 * each start is recorded: other users' writes still land in our timing, which only pairing evens
 * out. The load average is recorded at the start and end of the run and of every group.
 *
 * **Targets**: each row's minimum median speed ratio (see the groups), figures' `{ max }` or
 * `{ min }` bounds, and our peak RSS ≤ 128 MiB in every timed run. Correctness checks run once per
 * group, untimed. The exit code is 1 when a command, a set-up or a check failed; a missed target
 * is only reported.
 *
 * Results: markdown tables on stdout (pasteable into README.md) and JSON in
 * `bench/results/<date>-<hostname>.json` (`-<HHMM>` added if a run of the day has that name) and
 * `bench/results/latest.json` (with `--quick`:
 * `WORK/quick.json` only, so a smoke test never replaces the committed figures).
 *
 * **Adding a group**: create `bench/groups/NAME.ts` (any name not starting with `_`; files
 * starting with `_` are helpers) whose default export is a {@linkcode Group} made with
 * `defineGroup`; the runner finds it, `--only NAME` runs it alone, and nothing else needs editing.
 * `bench/groups/example.ts` is a runnable template (`--only example`) with every kind of row and
 * a server started once around the measurements. In short:
 *
 * ```ts ignore
 * import { join } from "node:path";
 * import { backup, zstdCompress } from "../_commands.ts";
 * import { defineGroup, pair, value } from "../_group.ts";
 * import { DENSE_1G } from "../_inputs.ts";
 *
 * export default defineGroup({
 *   name: "mine",                          // = the file name
 *   description: "what it measures",
 *   inputs: [DENSE_1G],                    // built when missing, warmed before setup
 *   tools: ["zstd"],                       // skipped with a note when one is missing
 *   // setup(ctx) { start a server or a VM; return its state },  teardown(ctx, state) { stop it },
 *   rows: (ctx) => [
 *     pair({                               // (a) ours against a native tool
 *       id: "backup",
 *       label: "backup → .vma.zst vs `zstd -T0 -3`",
 *       ours: backup(ctx, ctx.pathOf(DENSE_1G), join(ctx.out, "a.vma.zst")),
 *       native: zstdCompress(ctx, ctx.pathOf(DENSE_1G)),
 *       target: 1.0,                       // minimum median speed ratio; null: informational
 *       bytes: DENSE_1G.size,              // for MB/s
 *     }),
 *     // (b) ours/ours: `native: ctx.ours([...the baseline's args], [outputs])`
 *     value({                              // (c) figures measured by the group itself
 *       id: "rss",
 *       label: "backup → .vma",
 *       figures: { rss: { unit: "MiB", target: { max: 128 }, summary: "worst" } },
 *       sample: async (run) => {
 *         const archive = join(ctx.out, "b.vma");
 *         const timed = await run.time(backup(ctx, ctx.pathOf(DENSE_1G), archive));
 *         return { rss: timed.rssMiB };
 *       },
 *     }),
 *   ],
 *   checks: (ctx) => [{ label: "…", run: async () => "detail; throws on failure" }],
 * });
 * ```
 *
 * Commands come from `ctx.ours(args, outputs)` (our CLI) and `ctx.native(script, outputs)`
 * (`sh -c`), or the helpers in `_commands.ts`; everything a command writes goes under `ctx.out`
 * and is listed in `outputs`, so it is flushed and deleted after each run. `deno task check`
 * type-checks the groups; `deno test -A --doc bench/` runs the examples of the bench's helpers. No
 * test and no CI step runs the benchmark.
 *
 * @module
 */
import { basename, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { pathToFileURL } from "node:url";
import type {
  Check,
  Command,
  Group,
  GroupContext,
  PairRow,
  Row,
  RunContext,
  ValueRow,
} from "./_group.ts";
import { type Input, prepareInputs } from "./_inputs.ts";
import { type Environment, environment, loadAverage } from "./_env.ts";
import {
  type CheckResult,
  type FigureResult,
  type GroupResult,
  markdown,
  type PairResult,
  type RowResult,
  type RssResult,
  type SideResult,
  type ValueResult,
} from "./_report.ts";
import { median, meets, pairOrder, type Side, speedRatio, spread } from "./_stats.ts";
import { type Timed, timeRun } from "./_timing.ts";
import {
  DENO,
  exists,
  haveTool,
  log,
  messageOf,
  MiB,
  quote,
  relative,
  remove,
  RESULTS_DIR,
  ROOT,
  round,
  run,
} from "./_util.ts";

const RSS_LIMIT_MIB = 128;
const GROUPS_DIR = join(ROOT, "bench", "groups");
const DEFAULT_RUNS = 5;

const USAGE = `Benchmark of the vmabackup CLI against native tools, as interleaved pairs.

usage: deno task bench [--runs N] [--only GROUP,...] [--quick] [--work DIR] [--cli FILE]
       deno task bench --list | --clean | --help

  --runs N        pairs per row: ours and the yardstick, alternating who goes first (default ${DEFAULT_RUNS})
  --only GROUP,.. these groups only, in this order (--list names them)
  --quick         smoke test: 1 pair per row (unless --runs), results only in WORK/quick.json
  --work DIR      inputs and outputs (default bench/work/, git-ignored)
  --cli FILE      the cli.ts to measure (default this checkout's), e.g. of a snapshot made with
                  git archive HEAD | tar -x -C /tmp/vmabackup-head
  --list          the groups, with what they measure, then exit
  --clean         delete the generated inputs and outputs in the work directory, then exit
  --help          this text

Writes bench/results/<date>-<hostname>.json (-<HHMM> added when taken) and bench/results/latest.json.`;

interface Options {
  cli: string;
  runs: number;
  work: string;
  quick: boolean;
  only: string[] | null;
  list: boolean;
  clean: boolean;
}

type AnyGroup = Group<unknown>;

// ---------------------------------------------------------------------------------------------
// Groups

/** Every `bench/groups/*.ts` not starting with `_`, by name; its default export is the group. */
async function discoverGroups(): Promise<AnyGroup[]> {
  const files = [];
  for await (const entry of Deno.readDir(GROUPS_DIR)) {
    if (entry.isFile && entry.name.endsWith(".ts") && !entry.name.startsWith("_")) {
      files.push(entry.name);
    }
  }
  const groups = [];
  for (const file of files.sort()) {
    const module = await import(pathToFileURL(join(GROUPS_DIR, file)).href);
    const group = module.default as AnyGroup | undefined;
    const name = basename(file, ".ts");
    if (group === undefined || typeof group.rows !== "function") {
      throw new Error(`bench/groups/${file}: the default export is not a group (defineGroup)`);
    }
    if (group.name !== name) {
      throw new Error(`bench/groups/${file}: the group is named '${group.name}', not '${name}'`);
    }
    groups.push(group);
  }
  return groups;
}

/** The context of one group: paths, command builders, untimed helpers. */
function groupContext(group: AnyGroup, options: Options, signal: AbortSignal): GroupContext {
  const work = options.work;
  const ourArgv = (args: readonly string[]) => [DENO, "run", "-A", options.cli, ...args];
  const runUntimed = (argv: readonly string[]) => run([...argv], signal);
  return {
    name: group.name,
    work,
    out: join(work, "out", group.name),
    runs: options.runs,
    quick: options.quick,
    cli: options.cli,
    signal,
    pathOf(input: Input) {
      if (!(group.inputs ?? []).includes(input)) {
        throw new Error(`group ${group.name}: input ${input.name} is not in its inputs`);
      }
      return join(work, input.name);
    },
    ours(args, outputs = []): Command {
      return {
        kind: "ours",
        display: ["deno run -A cli.ts", ...args.map((arg) => relative(arg, work))].join(" "),
        argv: ourArgv(args),
        outputs,
      };
    },
    native(script, outputs = []): Command {
      return {
        kind: "native",
        display: script((path) => relative(path, work)),
        argv: ["sh", "-c", `exec ${script(quote)}`],
        outputs,
      };
    },
    run: runUntimed,
    runOurs: (args) => runUntimed(ourArgv(args)),
    async warm(path) {
      using file = await Deno.open(path);
      const buffer = new Uint8Array(8 * MiB);
      while ((await file.read(buffer)) !== null) { /* read on */ }
    },
    log: (message) => log(`  ${message}`),
  };
}

// ---------------------------------------------------------------------------------------------
// Measuring

/** Every timed run of ours, for the RSS bound. */
interface OursRun {
  id: string;
  rssMiB: number;
}

class Measurer {
  #timeDir: string;
  #signal: AbortSignal;
  readonly oursRuns: OursRun[] = [];

  constructor(timeDir: string, signal: AbortSignal) {
    this.#timeDir = timeDir;
    this.#signal = signal;
  }

  async time(id: string, command: Command): Promise<Timed> {
    const file = join(this.#timeDir, `${id.replace(/[^A-Za-z0-9._-]/g, "_")}.txt`);
    const timed = await timeRun(command, file, this.#signal);
    if (command.kind === "ours" && timed.error === undefined) {
      this.oursRuns.push({ id, rssMiB: timed.rssMiB });
    }
    return timed;
  }

  /** Pair `index` of a row: both sides in `pairOrder(index)`; a failure ends the row. */
  async pair(row: PairRow, result: PairResult, index: number): Promise<void> {
    const load1 = loadAverage()[0]!;
    const timed: Partial<Record<Side, Timed>> = {};
    for (const side of pairOrder(index)) {
      const outcome = await this.time(`${result.id}.${side}`, row[side]);
      const figures = `${outcome.seconds.toFixed(3)} s, ${outcome.rssMiB.toFixed(1)} MiB`;
      if (outcome.error !== undefined) {
        result.errors.push(`${side}: ${outcome.error}`);
        log(`  ${result.id} ${side}: FAILED (${figures}): ${outcome.error}`);
        return;
      }
      timed[side] = outcome;
    }
    const ours = timed.ours!;
    const native = timed.native!;
    for (const [side, outcome] of [[result.ours, ours], [result.native, native]] as const) {
      side.seconds.push(outcome.seconds);
      side.rssMiB.push(outcome.rssMiB);
      side.cpuSeconds.push(outcome.cpuSeconds);
    }
    const ratio = round(speedRatio({ ours: ours.seconds, native: native.seconds }), 3);
    result.pairs.push({
      first: pairOrder(index)[0],
      ours: ours.seconds,
      native: native.seconds,
      ratio,
      load1,
      dirtyKiBAtStart: { ours: ours.dirtyKiBAtStart, native: native.dirtyKiBAtStart },
    });
    log(
      `  ${result.id.padEnd(36)} ours ${ours.seconds.toFixed(3)} s ${ours.rssMiB.toFixed(1)} MiB` +
        ` | native ${native.seconds.toFixed(3)} s ${native.rssMiB.toFixed(1)} MiB` +
        ` | ratio ${ratio.toFixed(3)}`,
    );
  }

  /** One sample of a value row. */
  async sample(row: ValueRow, result: ValueResult, ctx: GroupContext, round: number) {
    let timedRuns = 0;
    const runContext: RunContext = {
      ...ctx,
      round,
      time: async (command) => {
        const timed = await this.time(`${result.id}.${++timedRuns}`, command);
        if (timed.error !== undefined) throw new Error(timed.error);
        return timed;
      },
    };
    try {
      const sample = await row.sample(runContext);
      for (const name of Object.keys(row.figures)) {
        const figure = sample[name];
        if (typeof figure !== "number" || !Number.isFinite(figure)) {
          throw new Error(`the sample has no number for figure '${name}'`);
        }
      }
      for (const [index, name] of Object.keys(row.figures).entries()) {
        result.figures[index]!.samples.push(sample[name]!);
      }
      const text = Object.keys(row.figures).map((name) => `${name} ${sample[name]}`).join(", ");
      log(`  ${result.id.padEnd(36)} ${text}`);
    } catch (error) {
      if (this.#signal.aborted) throw error;
      result.errors.push(messageOf(error));
      log(`  ${result.id} FAILED: ${messageOf(error)}`);
    }
  }
}

function emptyResult(group: string, row: Row): RowResult {
  const id = `${group}.${row.id}`;
  if (row.kind === "value") {
    return {
      kind: "value",
      id,
      group,
      label: row.label,
      figures: Object.entries(row.figures).map(([name, figure]) => ({
        name,
        unit: figure.unit,
        samples: [],
        spread: null,
        summary: figure.summary ?? "median",
        value: null,
        target: figure.target ?? null,
        met: null,
      })),
      errors: [],
    };
  }
  const side = (command: Command): SideResult => ({
    kind: command.kind,
    command: command.display,
    seconds: [],
    rssMiB: [],
    cpuSeconds: [],
    bestSeconds: null,
    mbPerSecond: null,
    peakRssMiB: null,
  });
  return {
    kind: "pair",
    id,
    group,
    label: row.label,
    bytes: row.bytes ?? null,
    ours: side(row.ours),
    native: side(row.native),
    pairs: [],
    ratio: null,
    target: row.target,
    met: null,
    errors: [],
  };
}

/** Best seconds, MB/s, peak RSS, the ratio spread and the target's outcome. */
function summarize(result: RowResult): void {
  if (result.kind === "value") {
    for (const figure of result.figures) summarizeFigure(figure, result.errors.length > 0);
    return;
  }
  for (const side of [result.ours, result.native]) {
    if (side.seconds.length === 0) continue;
    side.bestSeconds = Math.min(...side.seconds);
    side.peakRssMiB = Math.max(...side.rssMiB);
    if (result.bytes !== null) side.mbPerSecond = round(result.bytes / 1e6 / side.bestSeconds, 1);
  }
  const ratios = result.pairs.map((pair) => pair.ratio);
  if (ratios.length > 0) {
    const { median, min, max, n } = spread(ratios);
    result.ratio = { median: round(median, 3), min, max, n };
  }
  if (result.target !== null) {
    result.met = result.ratio !== null && result.errors.length === 0 &&
      meets(result.ratio.median, { min: result.target })!;
  }
}

/** A row that failed misses its targets, whatever its samples so far say. */
function summarizeFigure(figure: FigureResult, failed: boolean): void {
  if (figure.samples.length === 0) {
    figure.met = figure.target === null ? null : false;
    return;
  }
  figure.spread = spread(figure.samples);
  const worst = figure.target !== null && "min" in figure.target
    ? figure.spread.min
    : figure.spread.max;
  figure.value = figure.summary === "worst"
    ? worst
    : figure.summary === "last"
    ? figure.samples.at(-1)!
    : figure.spread.median;
  figure.met = failed && figure.target !== null ? false : meets(figure.value, figure.target);
}

interface GroupRun {
  group: GroupResult;
  rows: RowResult[];
  checks: CheckResult[];
}

/** Warms the inputs, runs setup, the rounds of pairs and samples, the checks, then teardown. */
async function runGroup(
  group: AnyGroup,
  options: Options,
  measurer: Measurer,
  signal: AbortSignal,
): Promise<GroupRun> {
  const started = performance.now();
  const result: GroupResult = {
    name: group.name,
    description: group.description,
    seconds: 0,
    loadAverage: { start: loadAverage(), end: [] },
    pairLoads: [],
  };
  const rows: RowResult[] = [];
  const checks: CheckResult[] = [];
  const finish = (): GroupRun => {
    result.seconds = Math.round((performance.now() - started) / 1000);
    result.loadAverage.end = loadAverage();
    return { group: result, rows, checks };
  };
  const missing = [];
  for (const tool of group.tools ?? []) if (!(await haveTool(tool))) missing.push(tool);
  if (missing.length > 0) {
    result.skipped = `missing ${missing.join(", ")}`;
    log(`[${group.name}] skipped: ${result.skipped}`);
    return finish();
  }

  const ctx = groupContext(group, options, signal);
  await remove(ctx.out);
  await Deno.mkdir(ctx.out, { recursive: true });
  for (const input of group.inputs ?? []) {
    log(`[${group.name}] warming the page cache: ${input.name}`);
    await input.warm(ctx.pathOf(input));
  }
  let state: { value: unknown } | null = null;
  try {
    if (group.setup !== undefined) log(`[${group.name}] setup`);
    state = { value: await group.setup?.(ctx) };
    const definitions = group.rows(ctx, state.value);
    const ids = new Set<string>();
    for (const row of definitions) {
      if (ids.has(row.id)) throw new Error(`two rows have the id '${row.id}'`);
      ids.add(row.id);
      rows.push(emptyResult(group.name, row));
    }
    for (let round = 1; round <= options.runs; round++) {
      log(`[${group.name}] round ${round}/${options.runs} (load ${loadAverage().join(" ")})`);
      for (const [index, row] of definitions.entries()) {
        const rowResult = rows[index]!;
        if (rowResult.errors.length > 0) continue; // a failing command fails again
        if (row.kind === "pair") {
          await measurer.pair(row, rowResult as PairResult, round - 1);
        } else {
          await measurer.sample(row, rowResult as ValueResult, ctx, round);
        }
      }
    }
    rows.forEach(summarize);
    for (const row of rows) {
      if (row.kind === "pair") result.pairLoads.push(...row.pairs.map((p) => p.load1));
    }
    for (const check of group.checks?.(ctx, state.value) ?? []) {
      checks.push(await runCheck(group.name, check, signal));
    }
  } catch (error) {
    if (signal.aborted) throw error;
    result.error = messageOf(error);
    log(`[${group.name}] FAILED: ${result.error}`);
  } finally {
    if (state !== null && group.teardown !== undefined) {
      log(`[${group.name}] teardown`);
      await group.teardown(ctx, state.value).catch((error) => {
        result.error ??= `teardown: ${messageOf(error)}`;
        log(`[${group.name}] teardown FAILED: ${messageOf(error)}`);
      });
    }
    await remove(ctx.out);
  }
  return finish();
}

async function runCheck(group: string, check: Check, signal: AbortSignal): Promise<CheckResult> {
  const result = await check.run().then(
    (detail) => ({ group, label: check.label, ok: true, detail }),
    (error) => {
      if (signal.aborted) throw error;
      return { group, label: check.label, ok: false, detail: messageOf(error) };
    },
  );
  log(`  check: ${result.ok ? "ok" : "FAILED"}: ${result.label}: ${result.detail}`);
  return result;
}

/** The RSS bound over every timed run of ours, the largest one named. */
function rssResult(runs: readonly OursRun[]): RssResult {
  const largest = runs.reduce<OursRun | null>(
    (max, run) => max === null || run.rssMiB > max.rssMiB ? run : max,
    null,
  );
  return {
    targetMiB: RSS_LIMIT_MIB,
    largest: largest === null ? null : { id: largest.id, peakRssMiB: largest.rssMiB },
    met: largest === null ? null : largest.rssMiB <= RSS_LIMIT_MIB,
  };
}

// ---------------------------------------------------------------------------------------------
// Main

function parseOptions(args: string[]): Options | "help" {
  const { values } = parseArgs({
    args,
    options: {
      runs: { type: "string" },
      work: { type: "string", default: join(ROOT, "bench", "work") },
      quick: { type: "boolean", default: false },
      only: { type: "string" },
      cli: { type: "string", default: join(ROOT, "cli.ts") },
      list: { type: "boolean", default: false },
      clean: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return "help";
  const runs = Number(values.runs ?? (values.quick ? 1 : DEFAULT_RUNS));
  if (!Number.isInteger(runs) || runs < 1) throw new TypeError(`--runs: not a positive integer`);
  const only = values.only?.split(",").map((name) => name.trim()).filter((name) => name !== "");
  if (only !== undefined && only.length === 0) throw new TypeError("--only: no group named");
  return {
    cli: resolve(values.cli),
    runs,
    work: resolve(values.work),
    quick: values.quick,
    only: only ?? null,
    list: values.list,
    clean: values.clean,
  };
}

function selectGroups(all: AnyGroup[], only: string[] | null): AnyGroup[] {
  if (only === null) return all.filter((group) => group.byDefault !== false);
  const byName = new Map(all.map((group) => [group.name, group]));
  return only.map((name) => {
    const group = byName.get(name);
    if (group === undefined) {
      throw new TypeError(`--only: '${name}' is not one of ${[...byName.keys()].join(", ")}`);
    }
    return group;
  });
}

/** Every input of `groups` and what they are made from. */
function allInputs(groups: readonly AnyGroup[]): Input[] {
  const inputs = new Map<string, Input>();
  const add = (input: Input) => {
    if (inputs.has(input.name)) return;
    for (const required of input.requires) add(required);
    inputs.set(input.name, input);
  };
  for (const group of groups) for (const input of group.inputs ?? []) add(input);
  return [...inputs.values()];
}

/** Deletes what the benchmark generated in `work`, and `work` itself when it is then empty. */
async function clean(work: string, groups: readonly AnyGroup[]): Promise<void> {
  const names = ["out", "time", "quick.json"];
  for (const input of allInputs(groups)) {
    names.push(input.name, `${input.name}.tmp`, ...(input.scratch ?? []));
  }
  for (const name of names) await remove(join(work, name));
  await Deno.remove(work).catch(() => {}); // not empty: someone else's files stay
  log(`cleaned ${work}`);
}

async function describeInputs(work: string, inputs: readonly Input[]) {
  const described = [];
  for (const input of inputs) {
    const { size, blocks } = await Deno.stat(join(work, input.name));
    described.push({
      name: input.name,
      description: input.description,
      bytes: size,
      allocatedBytes: (blocks ?? 0) * 512,
    });
  }
  return described;
}

function heading(
  startedAt: Date,
  env: Environment,
  options: Options,
  endLoad: number[],
  groups: readonly GroupResult[],
): string[] {
  const { tools } = env;
  const version = env.git === null
    ? env.cli
    : `commit ${env.git.commit.slice(0, 12)}${env.git.dirty ? " with uncommitted changes" : ""}`;
  const quick = options.quick ? " (--quick: a smoke test, not figures to quote)" : "";
  return [
    `vmabackup benchmark (${version}), ${startedAt.toISOString()}, ${
      plural(options.runs, "pair")
    } per row${quick}`,
    `Deno ${env.deno.deno}, ${env.nproc} CPUs (${env.cpuModel}), ${env.memoryGiB} GiB RAM, ` +
    `zstd ${tools.zstd}, ${tools.cp}${tools.qemuImg ? `, ${tools.qemuImg}` : ""}`,
    `load average (1/5/15 min) at the start ${env.loadAverageAtStart.join(" / ")}, ` +
    `at the end ${endLoad.join(" / ")}`,
    "speed ratio: native s ÷ ours s of one pair (ours, native / native, ours alternating); " +
    "MB/s: 10^6 bytes of the input image per best second; RSS: peak resident set (GNU time %M)",
    ...loadWarning(env.nproc, groups),
    ...groups.flatMap((group) => [
      ...(group.skipped === undefined ? [] : [`group ${group.name} skipped: ${group.skipped}`]),
      ...(group.error === undefined ? [] : [`group ${group.name} **FAILED**: ${group.error}`]),
    ]),
  ];
}

/**
 * The name of a run's results in `bench/results/`: `<date>-<hostname>.json`, or, when a run of
 * the same day has that name already, `<date>-<hostname>-<HHMM>.json` (UTC start time), so a
 * second run never overwrites the first.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { resultsName } from "./bench.ts";
 *
 * const start = new Date("2026-12-02T04:17:00Z");
 * assert.equal(await resultsName(start, "vm", () => Promise.resolve(false)), "2026-12-02-vm.json");
 * assert.equal(await resultsName(start, "vm", () => Promise.resolve(true)), "2026-12-02-vm-0417.json");
 * ```
 */
export async function resultsName(
  startedAt: Date,
  hostname: string,
  taken: (name: string) => Promise<boolean> = (name) => exists(join(RESULTS_DIR, name)),
): Promise<string> {
  const iso = startedAt.toISOString();
  const name = `${iso.slice(0, 10)}-${hostname}.json`;
  if (!await taken(name)) return name;
  return `${iso.slice(0, 10)}-${hostname}-${iso.slice(11, 13)}${iso.slice(14, 16)}.json`;
}

async function writeResults(report: object, options: Options, name: string): Promise<void> {
  const json = `${JSON.stringify(report, null, 2)}\n`;
  if (options.quick) {
    const path = join(options.work, "quick.json");
    await Deno.writeTextFile(path, json);
    log(`wrote ${path} (--quick: bench/results/ is left alone)`);
    return;
  }
  await Deno.mkdir(RESULTS_DIR, { recursive: true });
  await Deno.writeTextFile(join(RESULTS_DIR, name), json);
  await Deno.writeTextFile(join(RESULTS_DIR, "latest.json"), json);
  log(`wrote bench/results/${name} and bench/results/latest.json`);
}

/** Signals abort the running command; teardowns run; the exit code says which signal. */
function interruption(): { signal: AbortSignal; code: () => number | null } {
  const controller = new AbortController();
  let code: number | null = null;
  for (const [name, exit] of [["SIGINT", 130], ["SIGTERM", 143], ["SIGHUP", 129]] as const) {
    Deno.addSignalListener(name, () => {
      if (code !== null) Deno.exit(exit); // a second signal: at once
      code = exit;
      log(`${name}: stopping (the running command is killed, teardowns run)`);
      controller.abort(new Error(`interrupted by ${name}`));
    });
  }
  return { signal: controller.signal, code: () => code };
}

async function main(args: string[]): Promise<number> {
  let options: Options | "help";
  try {
    options = parseOptions(args);
  } catch (error) {
    console.error(`error: ${messageOf(error)}\n\n${USAGE}`);
    return 2;
  }
  if (options === "help") {
    console.log(USAGE);
    return 0;
  }
  const all = await discoverGroups();
  if (options.list) {
    for (const group of all) {
      const notes = [
        ...(group.byDefault === false ? ["only with --only"] : []),
        ...(group.tools?.length ? [`needs ${group.tools.join(", ")}`] : []),
      ];
      console.log(
        `${group.name.padEnd(12)} ${group.description}` +
          (notes.length > 0 ? ` (${notes.join("; ")})` : ""),
      );
    }
    return 0;
  }
  if (options.clean) {
    await clean(options.work, all);
    return 0;
  }
  let groups: AnyGroup[];
  try {
    groups = selectGroups(all, options.only);
  } catch (error) {
    console.error(`error: ${messageOf(error)}\n\n${USAGE}`);
    return 2;
  }
  for (const tool of ["/usr/bin/time", "sync"]) {
    if (!(await haveTool(tool))) throw new Error(`missing ${tool} (Debian: time, coreutils)`);
  }
  if (!(await exists(options.cli))) throw new Error(`--cli: no such file: ${options.cli}`);

  const { signal, code } = interruption();
  const startedAt = new Date();
  const env = await environment(options.cli);
  const inputs = allInputs(groups);
  await prepareInputs(options.work, inputs);
  await run([DENO, "run", "-A", options.cli, "--version"]); // fills Deno's module cache, untimed
  const timeDir = join(options.work, "time");
  await Deno.mkdir(timeDir, { recursive: true });

  const measurer = new Measurer(timeDir, signal);
  const runs: GroupRun[] = [];
  try {
    for (const group of groups) runs.push(await runGroup(group, options, measurer, signal));
  } catch (error) {
    if (code() !== null) return code()!;
    throw error;
  }
  const rows = runs.flatMap((run) => run.rows);
  const checks = runs.flatMap((run) => run.checks);
  const rss = rssResult(measurer.oursRuns);
  const table = markdown(rows, checks, rss, options.runs);
  const endLoad = loadAverage();
  console.log(
    ["", ...heading(startedAt, env, options, endLoad, runs.map((run) => run.group)), "", table, ""]
      .join("\n"),
  );

  const report = {
    date: startedAt.toISOString(),
    durationSeconds: Math.round((Date.now() - startedAt.getTime()) / 1000),
    ...env,
    loadAverageAtEnd: endLoad,
    options: { runs: options.runs, quick: options.quick, groups: groups.map((g) => g.name) },
    method: {
      pairs: "per row N pairs; pair i runs ours first when i is even, native first when odd",
      ratio: "speed ratio native s ÷ ours s per pair; the row reports median, min and max",
      seconds: "wall seconds around each process, ours with Deno's start-up; best of N per side",
      isolation: "untimed after each run: sync, delete the outputs, sync; page cache not dropped",
      warm: "each input read once before its group; archives made in setup warmed too",
    },
    units: { seconds: "wall", mbPerSecond: "1e6 bytes of input per best second", rss: "MiB" },
    inputs: await describeInputs(options.work, inputs),
    groups: runs.map((run) => run.group),
    rows,
    rss,
    checks,
    markdown: table,
  };
  await writeResults(report, options, await resultsName(startedAt, env.hostname));

  const failed = rows.some((row) => row.errors.length > 0) ||
    runs.some((run) => run.group.error !== undefined) ||
    checks.some((check) => !check.ok);
  return failed ? 1 : 0;
}

/** The median 1-minute load at the pairs' starts, when it was above the CPU count. */
function loadWarning(cpus: number, groups: readonly GroupResult[]): string[] {
  const loads = groups.flatMap((group) => group.pairLoads);
  if (loads.length === 0 || !(median(loads) > cpus)) return [];
  return [
    `**noisy**: the 1-minute load at the pairs' starts was ${Math.min(...loads)} to ` +
    `${Math.max(...loads)} (median ${
      round(median(loads), 2)
    }) on ${cpus} CPUs: other processes took most ` +
    "of the machine, so the seconds are inflated and the ratios uncertain",
  ];
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

if (import.meta.main) {
  const code = await main(Deno.args).catch((error) => {
    console.error(`error: ${messageOf(error)}`);
    return 1;
  });
  Deno.exit(code);
}
