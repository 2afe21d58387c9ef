// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The arithmetic of the benchmark's figures: medians, spreads, the order of the two sides of a
 * pair and the speed ratio of one pair. Pure functions; `deno test -A --doc bench/` runs
 * their examples.
 *
 * @module
 */

/** The median with the smallest and largest value of a set of samples. */
export interface Spread {
  median: number;
  min: number;
  max: number;
  /** How many samples. */
  n: number;
}

/**
 * The median of `values` (the mean of the middle two when there is an even number of them).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { median } from "./_stats.ts";
 *
 * assert.equal(median([3, 1, 2]), 2);
 * assert.equal(median([4, 1, 3, 2]), 2.5);
 * assert.throws(() => median([]), /no values/);
 * ```
 */
export function median(values: readonly number[]): number {
  if (values.length === 0) throw new RangeError("median of no values");
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/**
 * Median, minimum and maximum of `values`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { spread } from "./_stats.ts";
 *
 * assert.deepEqual(spread([0.9, 0.5, 1.1, 0.7, 0.8]), { median: 0.8, min: 0.5, max: 1.1, n: 5 });
 * ```
 */
export function spread(values: readonly number[]): Spread {
  return {
    median: median(values),
    min: Math.min(...values),
    max: Math.max(...values),
    n: values.length,
  };
}

/** One side of a pair. */
export type Side = "ours" | "native";

/**
 * Which side of pair `index` (0-based) runs first: ours, native, then native, ours, and so on
 * (A B, B A, A B, ...), so neither side always runs right after the other's write-back, start-up
 * or cache effects.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { pairOrder } from "./_stats.ts";
 *
 * assert.deepEqual([0, 1, 2].map(pairOrder), [
 *   ["ours", "native"],
 *   ["native", "ours"],
 *   ["ours", "native"],
 * ]);
 * ```
 */
export function pairOrder(index: number): [Side, Side] {
  return index % 2 === 0 ? ["ours", "native"] : ["native", "ours"];
}

/**
 * The speed ratio of one pair: ours ÷ native speed, which is native seconds ÷ our seconds
 * (above 1: ours is faster).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { speedRatio } from "./_stats.ts";
 *
 * assert.equal(speedRatio({ ours: 2, native: 1 }), 0.5);
 * assert.equal(speedRatio({ ours: 1, native: 1.5 }), 1.5);
 * ```
 */
export function speedRatio(seconds: { ours: number; native: number }): number {
  return seconds.native / seconds.ours;
}

/** A target: the summary of the samples must be at least `min` or at most `max`. */
export type Target = { readonly min: number } | { readonly max: number };

/**
 * Whether `value` meets `target`; `null` when there is no target (an informational figure).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { meets } from "./_stats.ts";
 *
 * assert.equal(meets(0.95, { min: 0.9 }), true);
 * assert.equal(meets(130, { max: 128 }), false);
 * assert.equal(meets(1, null), null);
 * ```
 */
export function meets(value: number, target: Target | null): boolean | null {
  if (target === null) return null;
  return "min" in target ? value >= target.min : value <= target.max;
}
