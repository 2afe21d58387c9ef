// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Recycling of large buffers between pipeline stages.
 *
 * A producer acquires a buffer, hands out views of it, and the buffer comes back to the
 * pool once every holder has released it. A view that is never released only costs a
 * fresh allocation later: correctness never depends on a release. This matters because
 * freshly allocated multi-MiB buffers stay resident long after they became garbage.
 *
 * Record streams carry the hold explicitly (`VmaClusterRecord.lease`). Byte streams cannot,
 * so byte chunks from a pool created with `trackChunks` are found again by their
 * `ArrayBuffer`: a final consumer calls {@linkcode releaseChunk} once it has copied or
 * written a chunk. Stages that pass chunks on never release them.
 *
 * @module
 */
import type { Lease } from "./vma/records.ts";

/** Buffers whose chunks consumers give back with {@linkcode releaseChunk}. */
const tracked = new WeakMap<ArrayBufferLike, PooledBuffer>();

/**
 * A buffer with a reference count; it returns to its pool when the count reaches zero.
 *
 * @example Two holders share one buffer
 * ```ts
 * import assert from "node:assert/strict";
 * import { BufferPool } from "./_pool.ts";
 *
 * const pool = new BufferPool(1024);
 * const buffer = pool.acquire();
 * buffer.hold(2);
 * buffer.release();
 * assert.notEqual(pool.acquire(), buffer); // one holder left: not back yet
 * buffer.release();
 * assert.equal(pool.acquire(), buffer);
 * ```
 */
export class PooledBuffer implements Lease {
  readonly bytes: Uint8Array<ArrayBuffer>;
  #pool: BufferPool;
  #holds = 0;

  constructor(pool: BufferPool, bytes: Uint8Array<ArrayBuffer>) {
    this.#pool = pool;
    this.bytes = bytes;
  }

  /** Sets the number of holders before the views are handed out. */
  hold(count: number): void {
    this.#holds = count;
    if (count === 0) this.#pool.recycle(this);
  }

  release(): void {
    if (this.#holds <= 0) return;
    if (--this.#holds === 0) this.#pool.recycle(this);
  }

  /** True when exactly one holder has it: that holder may transfer its memory away. */
  get exclusive(): boolean {
    return this.#holds === 1;
  }

  /** Gives the memory back after it was transferred away (to a Worker) and returned. */
  giveBack(bytes: Uint8Array<ArrayBuffer>): void {
    this.#holds = 0;
    this.#pool.adopt(bytes);
  }
}

/** Options of {@linkcode BufferPool}. */
export interface BufferPoolOptions {
  /** Most free buffers kept for reuse (default 4). */
  maxFree?: number;
  /** Let consumers release byte chunks of these buffers with {@linkcode releaseChunk}. */
  trackChunks?: boolean;
}

/**
 * A small free list of equally sized buffers.
 *
 * @example Reuse a buffer once it was released
 * ```ts
 * import assert from "node:assert/strict";
 * import { BufferPool } from "./_pool.ts";
 *
 * const pool = new BufferPool(4096, { maxFree: 1 });
 * const first = pool.acquire();
 * assert.equal(first.bytes.byteLength, 4096);
 * first.hold(1);
 * first.release();
 * assert.equal(pool.acquire(), first);
 * ```
 */
export class BufferPool {
  readonly size: number;
  #free: PooledBuffer[] = [];
  #maxFree: number;
  #trackChunks: boolean;

  constructor(size: number, options: BufferPoolOptions = {}) {
    this.size = size;
    this.#maxFree = options.maxFree ?? 4;
    this.#trackChunks = options.trackChunks ?? false;
  }

  /** A free buffer, or a new one. Its content is whatever the last user left in it. */
  acquire(): PooledBuffer {
    const reused = this.#free.pop();
    if (reused !== undefined) return reused;
    const buffer = new PooledBuffer(this, new Uint8Array(this.size));
    if (this.#trackChunks) tracked.set(buffer.bytes.buffer, buffer);
    return buffer;
  }

  /**
   * Takes back the memory of a buffer whose `ArrayBuffer` was transferred away (to a Worker)
   * and has now come back.
   */
  adopt(bytes: Uint8Array<ArrayBuffer>): void {
    const whole = new Uint8Array(bytes.buffer); // the view that came back may be shorter
    if (whole.byteLength !== this.size || this.#free.length >= this.#maxFree) return;
    this.#free.push(this.wrap(whole));
  }

  /**
   * A pooled buffer around `bytes`, for memory that came back under a new `ArrayBuffer`
   * (a transfer, a BYOB read); it joins the free list when its holds are released.
   */
  wrap(bytes: Uint8Array<ArrayBuffer>): PooledBuffer {
    const buffer = new PooledBuffer(this, bytes);
    if (this.#trackChunks) tracked.set(bytes.buffer, buffer);
    return buffer;
  }

  /** Called by {@linkcode PooledBuffer} when its last hold is released. */
  recycle(buffer: PooledBuffer): void {
    if (this.#free.length < this.#maxFree) this.#free.push(buffer);
  }
}

/**
 * Gives a byte chunk back to the pool it came from, if it came from a tracking pool;
 * otherwise does nothing. Call it only as the chunk's final consumer, once done with it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { BufferPool, releaseChunk } from "./_pool.ts";
 *
 * const pool = new BufferPool(1024, { trackChunks: true });
 * const buffer = pool.acquire();
 * buffer.hold(1);
 * releaseChunk(buffer.bytes.subarray(100, 200)); // found again by its ArrayBuffer
 * assert.equal(pool.acquire(), buffer);
 * ```
 */
export function releaseChunk(chunk: Uint8Array): void {
  tracked.get(chunk.buffer)?.release();
}

/**
 * The pooled buffer behind `chunk` when the caller, as its final consumer, holds it alone
 * and it starts at byte 0: its memory may then be transferred (to a Worker) instead of
 * copied, and handed back with {@linkcode PooledBuffer.giveBack}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { BufferPool, exclusiveChunk } from "./_pool.ts";
 *
 * const buffer = new BufferPool(1024, { trackChunks: true }).acquire();
 * buffer.hold(1);
 * assert.equal(exclusiveChunk(buffer.bytes.subarray(0, 512)), buffer);
 * assert.equal(exclusiveChunk(buffer.bytes.subarray(512)), undefined); // not at byte 0
 * buffer.hold(2);
 * assert.equal(exclusiveChunk(buffer.bytes), undefined); // shared
 * ```
 */
export function exclusiveChunk(chunk: Uint8Array): PooledBuffer | undefined {
  const buffer = tracked.get(chunk.buffer);
  return buffer?.exclusive && chunk.byteOffset === 0 ? buffer : undefined;
}

/**
 * Buffers in size classes: powers of 4 from `smallest` up to `largest` (the last class is
 * exactly `largest`), each class a {@linkcode BufferPool}, so that requests of varying
 * sizes reuse buffers close to their size.
 *
 * @example A 100 KiB request gets a 256 KiB buffer, and gets it again once released
 * ```ts
 * import assert from "node:assert/strict";
 * import { SizedBufferPool } from "./_pool.ts";
 *
 * const pool = new SizedBufferPool(64 << 10, 1 << 20, 4);
 * const buffer = pool.acquire(100 << 10);
 * assert.equal(buffer.bytes.byteLength, 256 << 10);
 * buffer.hold(1);
 * buffer.release();
 * assert.equal(pool.acquire(200 << 10), buffer);
 * assert.equal(pool.acquire(1 << 20).bytes.byteLength, 1 << 20);
 * assert.throws(() => pool.acquire((1 << 20) + 1), RangeError);
 * ```
 */
export class SizedBufferPool {
  #classes: BufferPool[] = [];

  /** Classes from `smallest` to `largest`, each keeping up to `maxFree` free buffers. */
  constructor(smallest: number, largest: number, maxFree: number) {
    for (let size = smallest;; size *= 4) {
      const top = size >= largest;
      this.#classes.push(new BufferPool(top ? largest : size, { maxFree }));
      if (top) break;
    }
  }

  /** The largest buffer this pool gives. */
  get largest(): number {
    return this.#classes.at(-1)!.size;
  }

  /** A buffer of at least `length` bytes, from the smallest class that fits. */
  acquire(length: number): PooledBuffer {
    const pool = this.#classes.find((candidate) => candidate.size >= length);
    if (pool === undefined) {
      throw new RangeError(`Cannot pool ${length} bytes: The largest buffer is ${this.largest}`);
    }
    return pool.acquire();
  }

  /** Takes back a buffer that was transferred away and came back (see BufferPool.adopt). */
  adopt(bytes: Uint8Array<ArrayBuffer>): void {
    const size = bytes.buffer.byteLength;
    this.#classes.find((candidate) => candidate.size === size)?.adopt(bytes);
  }
}
