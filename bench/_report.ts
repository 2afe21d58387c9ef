// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The results of a benchmark run (the JSON in `bench/results/`) and their markdown tables.
 *
 * @module
 */
import type { Side, Spread, Target } from "./_stats.ts";

/** The runs of one side of a pair row. */
export interface SideResult {
  kind: "ours" | "native";
  /** The command, paths relative to the work directory. */
  command: string;
  /** Wall seconds of each successful run, in pair order. */
  seconds: number[];
  /** Peak RSS of each successful run. */
  rssMiB: number[];
  /** User + system CPU seconds of each successful run: less sensitive to load than wall time. */
  cpuSeconds: number[];
  bestSeconds: number | null;
  /** 10^6 bytes of the row's input per best second; `null` without `bytes`. */
  mbPerSecond: number | null;
  peakRssMiB: number | null;
}

/** One pair: both sides' seconds, who ran first, and the speed ratio native s ÷ ours s. */
export interface PairRun {
  first: Side;
  ours: number;
  native: number;
  ratio: number;
  /** The 1-minute load average when the pair started. */
  load1: number;
  /** Dirty + Writeback KiB in /proc/meminfo at each side's start (other users' writes too). */
  dirtyKiBAtStart: { ours: number | null; native: number | null };
}

export interface PairResult {
  kind: "pair";
  id: string;
  group: string;
  label: string;
  bytes: number | null;
  ours: SideResult;
  native: SideResult;
  pairs: PairRun[];
  /** Median, min and max of the pairs' speed ratios. */
  ratio: Spread | null;
  /** Minimum median ratio; `null` when informational. */
  target: number | null;
  met: boolean | null;
  errors: string[];
}

export interface FigureResult {
  name: string;
  unit: string;
  samples: number[];
  spread: Spread | null;
  summary: "median" | "worst" | "last";
  /** The summary held against the target. */
  value: number | null;
  target: Target | null;
  met: boolean | null;
}

export interface ValueResult {
  kind: "value";
  id: string;
  group: string;
  label: string;
  figures: FigureResult[];
  errors: string[];
}

export type RowResult = PairResult | ValueResult;

export interface CheckResult {
  group: string;
  label: string;
  ok: boolean;
  detail: string;
}

export interface GroupResult {
  name: string;
  description: string;
  /** Why the group did not run (a missing tool). */
  skipped?: string;
  /** Set-up, teardown or a row builder failed. */
  error?: string;
  seconds: number;
  loadAverage: { start: number[]; end: number[] };
  /** The 1-minute load average at the start of each of the group's pairs. */
  pairLoads: number[];
}

/** The peak-RSS bound on every timed run of ours. */
export interface RssResult {
  targetMiB: number;
  largest: { id: string; peakRssMiB: number } | null;
  met: boolean | null;
}

/**
 * The tables: pair rows, value figures with the RSS bound, the commands, the checks.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { markdown, type PairResult } from "./_report.ts";
 *
 * const side = (kind: "ours" | "native", seconds: number[]) => ({
 *   kind, command: kind, seconds, rssMiB: [10], cpuSeconds: [1], bestSeconds: Math.min(...seconds),
 *   mbPerSecond: null, peakRssMiB: 10,
 * });
 * const row: PairResult = {
 *   kind: "pair", id: "g.r", group: "g", label: "r", bytes: null,
 *   ours: side("ours", [2, 2.2]), native: side("native", [1, 1.3]), pairs: [],
 *   ratio: { median: 0.55, min: 0.5, max: 0.6, n: 2 }, target: 0.9, met: false, errors: [],
 * };
 * const text = markdown([row], [], { targetMiB: 128, largest: null, met: null }, 2);
 * assert.match(text, /\| g: r \| 2\.00 \| 1\.00 \| 0\.55 \(0\.50–0\.60\) \| ≥ 0\.9 \| \*\*MISSED\*\* \|/);
 * ```
 */
export function markdown(
  rows: readonly RowResult[],
  checks: readonly CheckResult[],
  rss: RssResult,
  runs: number,
): string {
  const pairs = rows.filter((row): row is PairResult => row.kind === "pair");
  const values = rows.filter((row): row is ValueResult => row.kind === "value");
  const lines = [
    `| measurement (group: row) | ours best s | native best s | speed ratio, median (min–max) of ${runs} pair${
      runs === 1 ? "" : "s"
    } | target | status |`,
    "| --- | ---: | ---: | ---: | ---: | --- |",
  ];
  for (const row of pairs) {
    const ratio = row.ratio === null
      ? "—"
      : `${row.ratio.median.toFixed(2)} (${row.ratio.min.toFixed(2)}–${row.ratio.max.toFixed(2)})` +
        (row.ratio.n === runs ? "" : ` of ${row.ratio.n}`);
    const target = row.target === null ? "—" : `≥ ${Number(row.target.toFixed(2))}`;
    lines.push(
      `| ${row.group}: ${cell(row.label)}${failure(row.errors)} | ${
        fixed(row.ours.bestSeconds, 2)
      } | ` +
        `${fixed(row.native.bestSeconds, 2)} | ${ratio} | ${target} | ${status(row.met)} |`,
    );
  }
  lines.push(
    "",
    "| figure | median (min–max) | held against target | target | status |",
    "| --- | ---: | ---: | ---: | --- |",
  );
  for (const row of values) {
    if (row.figures.length === 0) {
      lines.push(`| ${row.group}: ${cell(row.label)}${failure(row.errors)} | — | — | — | — |`);
    }
    for (const figure of row.figures) {
      const spread = figure.spread === null ? "—" : `${number(figure.spread.median)} ` +
        `(${number(figure.spread.min)}–${number(figure.spread.max)})`;
      const held = figure.value === null ? "—" : `${number(figure.value)} (${figure.summary})`;
      lines.push(
        `| ${row.group}: ${cell(row.label)}, ${figure.name} ${figure.unit}${
          failure(row.errors)
        } | ` +
          `${spread} | ${held} | ${targetText(figure.target)} | ${status(figure.met)} |`,
      );
    }
  }
  const largest = rss.largest === null ? "" : ` (largest: ${rss.largest.id})`;
  lines.push(
    `| peak RSS of every timed run of ours${largest}, MiB | — | ` +
      `${rss.largest === null ? "—" : rss.largest.peakRssMiB.toFixed(1)} (worst) | ` +
      `≤ ${rss.targetMiB} | ${status(rss.met)} |`,
    "",
    "| command | side | best s | MB/s | peak RSS MiB | least CPU s | runs s (in pair order) |",
    "| --- | --- | ---: | ---: | ---: | ---: | --- |",
  );
  for (const row of pairs) {
    for (const side of [row.ours, row.native]) {
      lines.push(
        `| ${row.group}: \`${cell(side.command)}\` | ${side.kind} | ${
          fixed(side.bestSeconds, 2)
        } | ` +
          `${fixed(side.mbPerSecond, 0)} | ${fixed(side.peakRssMiB, 1)} | ` +
          `${fixed(side.cpuSeconds.length > 0 ? Math.min(...side.cpuSeconds) : null, 2)} | ` +
          `${side.seconds.map((seconds) => seconds.toFixed(2)).join(", ")} |`,
      );
    }
  }
  lines.push(
    "",
    "| correctness check | result |",
    "| --- | --- |",
    ...checks.map((check) =>
      `| ${cell(check.label)} | ${check.ok ? "ok" : "**FAILED**"}: ${cell(check.detail)} |`
    ),
  );
  return lines.join("\n");
}

function failure(errors: readonly string[]): string {
  return errors.length > 0 ? ` **FAILED**: ${cell(errors[0]!)}` : "";
}

function targetText(target: Target | null): string {
  if (target === null) return "—";
  return "min" in target ? `≥ ${target.min}` : `≤ ${target.max}`;
}

function status(met: boolean | null): string {
  return met === null ? "(info)" : met ? "met" : "**MISSED**";
}

function cell(text: string): string {
  return text.replaceAll("|", "\\|").replaceAll("\n", " ");
}

function fixed(value: number | null, digits: number): string {
  return value === null ? "—" : value.toFixed(digits);
}

/** Up to 3 significant decimals, for figures of any unit. */
function number(value: number): string {
  return Math.abs(value) >= 100 ? value.toFixed(1) : Number(value.toPrecision(3)).toString();
}
