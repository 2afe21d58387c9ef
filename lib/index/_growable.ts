// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Typed arrays that grow as values are appended (internal): an index of a terabyte disk
 * keeps its per-extent numbers in a few megabytes instead of arrays of objects.
 *
 * @module
 */

type TypedArray = Uint8Array | Uint16Array | Uint32Array | Float64Array;

/**
 * An append-only typed array.
 *
 * @example Append and read back
 * ```ts
 * import assert from "node:assert/strict";
 * import { Growable } from "./_growable.ts";
 *
 * const values = new Growable(Uint32Array);
 * for (let i = 0; i < 1000; i++) values.push(i * 3);
 * assert.equal(values.length, 1000);
 * assert.equal(values.view()[999], 2997);
 * ```
 */
export class Growable<T extends TypedArray> {
  #make: (length: number) => T;
  #data: T;
  #length = 0;

  /** An empty array of `type`, room for `initial` values before it first grows. */
  constructor(type: { new (length: number): T }, initial = 1024) {
    this.#make = (length) => new type(length);
    this.#data = this.#make(initial);
  }

  /** Number of values. */
  get length(): number {
    return this.#length;
  }

  /** Appends one value. */
  push(value: number): void {
    if (this.#length === this.#data.length) this.#grow(this.#length + 1);
    this.#data[this.#length++] = value;
  }

  /** Appends every value of `values`. */
  pushAll(values: ArrayLike<number>): void {
    if (this.#length + values.length > this.#data.length) this.#grow(this.#length + values.length);
    this.#data.set(values, this.#length);
    this.#length += values.length;
  }

  /** The values so far, as a view (valid until the next push). */
  view(): T {
    return this.#data.subarray(0, this.#length) as T;
  }

  #grow(needed: number): void {
    const grown = this.#make(Math.max(needed, Math.ceil(this.#data.length * 1.5)));
    grown.set(this.#data.subarray(0, this.#length));
    this.#data = grown;
  }
}
