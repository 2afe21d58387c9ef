// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Typed arrays that grow as values are appended (internal): an index of a terabyte disk
 * keeps its per-extent numbers in a few megabytes instead of arrays of objects. Values go
 * into fixed chunks, so growing never copies and at most one chunk is allocated unused.
 *
 * @module
 */

type TypedArray = Uint8Array | Uint16Array | Uint32Array | Float64Array;

/** Values per chunk. */
const CHUNK = 16384;

/**
 * An append-only typed array.
 *
 * @example Append and read back
 * ```ts
 * import assert from "node:assert/strict";
 * import { Growable } from "./_growable.ts";
 *
 * const values = new Growable(Uint32Array);
 * for (let i = 0; i < 40_000; i++) values.push(i * 3);
 * assert.equal(values.length, 40_000);
 * assert.equal(values.view()[39_999], 119_997);
 * ```
 */
export class Growable<T extends TypedArray> {
  #make: (length: number) => T;
  #chunks: T[] = [];
  #fill = CHUNK; // of the last chunk
  #length = 0;

  /** An empty array of `type`. */
  constructor(type: { new (length: number): T }) {
    this.#make = (length) => new type(length);
  }

  /** Number of values. */
  get length(): number {
    return this.#length;
  }

  /** Bytes allocated for the values, used or not yet. */
  get capacityBytes(): number {
    return this.#chunks.reduce((sum, chunk) => sum + chunk.byteLength, 0);
  }

  /** Appends one value. */
  push(value: number): void {
    if (this.#fill === CHUNK) this.#addChunk();
    this.#chunks.at(-1)![this.#fill++] = value;
    this.#length++;
  }

  /** Appends every value of `values`. */
  pushAll(values: ArrayLike<number>): void {
    for (let i = 0; i < values.length; i++) this.push(values[i]!);
  }

  /** The values so far, as one array (a copy when they fill more than one chunk). */
  view(): T {
    if (this.#chunks.length <= 1) {
      return (this.#chunks[0] ?? this.#make(0)).subarray(0, this.#length) as T;
    }
    const all = this.#make(this.#length);
    this.#chunks.forEach((chunk, i) => {
      all.set(chunk.subarray(0, Math.min(CHUNK, this.#length - i * CHUNK)), i * CHUNK);
    });
    return all;
  }

  #addChunk(): void {
    this.#chunks.push(this.#make(CHUNK));
    this.#fill = 0;
  }
}
