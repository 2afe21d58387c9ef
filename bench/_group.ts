// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The group-definition API: what a file in `bench/groups/` exports (see the header of
 * `bench/bench.ts` for an example). A group names its inputs, may start something once around its
 * measurements (`setup`/`teardown`), and lists rows:
 *
 * - {@linkcode pair}: ours against a yardstick, timed as interleaved pairs; the yardstick is a
 *   native tool (`ctx.native`) or our own baseline command (`ctx.ours`, e.g. "without index").
 *   Reported: median of the per-pair speed ratios (native s ÷ ours s) with min–max, best-of-N
 *   seconds and peak RSS of each side; the target is a minimum of the median ratio.
 * - {@linkcode value}: figures the group measures itself, one sample per round (latency
 *   percentiles, an RSS, a size), each with an optional `{ max }` or `{ min }` target.
 *
 * Checks run once after the measurements, untimed; a failed check makes the exit code 1.
 *
 * @module
 */
import type { Input } from "./_inputs.ts";
import type { Target } from "./_stats.ts";
import type { Command, Timed } from "./_timing.ts";

export type { Input } from "./_inputs.ts";
export type { Target } from "./_stats.ts";
export type { Command, Timed } from "./_timing.ts";

/** A native command line; `path` inserts a path: quoted to run it, relative to display it. */
export type Script = (path: (path: string) => string) => string;

/** What a group's hooks and row builders get from the runner. */
export interface GroupContext {
  /** The group's name (its file name without `.ts`). */
  readonly name: string;
  /** The work directory (`--work`, default `bench/work/`): inputs live here. */
  readonly work: string;
  /** The group's own directory for outputs, `WORK/out/NAME`: empty at the start, removed after. */
  readonly out: string;
  /** Pairs per row (`--runs`, 1 with `--quick`). */
  readonly runs: number;
  readonly quick: boolean;
  /** The `cli.ts` measured (`--cli`, default this checkout's). */
  readonly cli: string;
  /** Aborted on SIGINT/SIGTERM: pass it to long-running set-up work. */
  readonly signal: AbortSignal;
  /** The path of an input listed in the group's `inputs`. */
  pathOf(input: Input): string;
  /** Our CLI, `deno run -A cli.ts ARGS...`; `outputs` are deleted after each timed run. */
  ours(args: readonly string[], outputs?: readonly string[]): Command;
  /** A native command, run as `sh -c 'exec SCRIPT'` (pipes and redirections allowed). */
  native(script: Script, outputs?: readonly string[]): Command;
  /** Runs a command untimed (set-up, checks); throws on failure, returns its stdout. */
  run(argv: readonly string[]): Promise<string>;
  /** Runs our CLI untimed; throws on failure, returns its stdout. */
  runOurs(args: readonly string[]): Promise<string>;
  /** Reads a file once, to bring it into the page cache (e.g. an archive made in `setup`). */
  warm(path: string): Promise<void>;
  /** A progress line on stderr. */
  log(message: string): void;
}

/** What a value row's `sample` gets: the group context, the round, and a timer. */
export interface RunContext extends GroupContext {
  /** 1 to `runs`. */
  readonly round: number;
  /**
   * Runs `command` once, timed and isolated like a pair's sides (outputs flushed and deleted
   * after it, untimed); an `ours` command's peak RSS counts for the RSS target. A failed command
   * throws.
   */
  time(command: Command): Promise<Timed>;
}

/** A row timed as pairs: ours and the yardstick, one after the other, `runs` times. */
export interface PairRow {
  readonly kind: "pair";
  /** Unique within the group; the report's id is `GROUP.ID`. */
  readonly id: string;
  readonly label: string;
  readonly ours: Command;
  /** The yardstick: a native tool, or our own baseline for an ours/ours comparison. */
  readonly native: Command;
  /** Minimum median speed ratio (native s ÷ ours s); `null`: informational. */
  readonly target: number | null;
  /** Bytes of the input, for the MB/s columns (e.g. the image's apparent size). */
  readonly bytes?: number;
}

/** How a figure of a value row is declared. */
export interface Figure {
  readonly unit: string;
  readonly target?: Target;
  /**
   * Which summary of the samples is held against the target: the median (default), the worst
   * sample (the largest for a `max` target, the smallest for a `min` one), or the last one (a
   * figure that each sample works out over all rounds so far, such as a ratio of best-of-N
   * times).
   */
  readonly summary?: "median" | "worst" | "last";
}

/** A row of figures the group measures itself, one sample of each per round. */
export interface ValueRow {
  readonly kind: "value";
  readonly id: string;
  readonly label: string;
  /** The figures by name (`p50`, `p99`, `rss`): each sample returns a number for each. */
  readonly figures: Readonly<Record<string, Figure>>;
  sample(run: RunContext): Promise<Readonly<Record<string, number>>>;
}

export type Row = PairRow | ValueRow;

/** A correctness check, untimed; throws on failure, returns a short detail. */
export interface Check {
  readonly label: string;
  run(): Promise<string>;
}

/**
 * A group of measurements: the default export of `bench/groups/NAME.ts`. Methods, so that a
 * group with its own `State` is still a `Group` to the runner.
 */
export interface Group<State = undefined> {
  /** Equal to the file name without `.ts`; `--only NAME` selects it. */
  readonly name: string;
  /** One line for `--list` and the results. */
  readonly description: string;
  /** Built when missing, read once (warmed) before `setup`. */
  readonly inputs?: readonly Input[];
  /** Programs the group needs: without one, the group is skipped with a note. */
  readonly tools?: readonly string[];
  /** `false`: run only when named with `--only` (e.g. a group that needs a server farm). */
  readonly byDefault?: boolean;
  /** Runs once before the measurements, untimed: make archives, start a server or a VM. */
  setup?(ctx: GroupContext): Promise<State>;
  /** The rows, built once after `setup`. */
  rows(ctx: GroupContext, state: State): readonly Row[];
  checks?(ctx: GroupContext, state: State): readonly Check[];
  /**
   * Runs once when `setup` has returned, whatever happens next (a failure, Ctrl-C): stop what
   * `setup` started. The runner then removes `ctx.out`.
   */
  teardown?(ctx: GroupContext, state: State): Promise<void>;
}

/**
 * Declares a group (only for the types: returns `group` as it is).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { defineGroup, pair } from "./_group.ts";
 *
 * const group = defineGroup({
 *   name: "example",
 *   description: "true against sh -c true",
 *   rows: (ctx) => [pair({
 *     id: "true",
 *     label: "our true vs sh's",
 *     ours: ctx.ours(["--version"]),
 *     native: ctx.native(() => "true"),
 *     target: null,
 *   })],
 * });
 * assert.equal(group.name, "example");
 * ```
 */
export function defineGroup<State = undefined>(group: Group<State>): Group<State> {
  return group;
}

/**
 * A pair row (see {@linkcode PairRow}).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { pair } from "./_group.ts";
 *
 * const command = { kind: "native" as const, display: "true", argv: ["true"], outputs: [] };
 * const row = pair({ id: "t", label: "t", ours: command, native: command, target: 1 });
 * assert.equal(row.kind, "pair");
 * ```
 */
export function pair(row: Omit<PairRow, "kind">): PairRow {
  return { kind: "pair", ...row };
}

/**
 * A value row (see {@linkcode ValueRow}).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { value } from "./_group.ts";
 *
 * const row = value({
 *   id: "answer",
 *   label: "the answer",
 *   figures: { n: { unit: "", target: { min: 42 } } },
 *   sample: () => Promise.resolve({ n: 42 }),
 * });
 * assert.equal(row.kind, "value");
 * ```
 */
export function value(row: Omit<ValueRow, "kind">): ValueRow {
  return { kind: "value", ...row };
}
