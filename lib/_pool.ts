// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Recycling of large buffers between pipeline stages.
 *
 * The ownership rule: whatever a stage emits belongs to its receiver, unless the code that
 * builds the pipeline opts in with `reuseBuffers: true`, and so promises that every emitted
 * record or chunk reaches exactly one final consumer (no `tee()`, no fan-out, nobody keeps
 * a reference after releasing it). Only then does a producer hand out views of recycled
 * buffers, and a buffer comes back once every holder has released it. A view that is never
 * released only costs a fresh allocation later. This matters because freshly allocated
 * multi-MiB buffers stay resident long after they became garbage.
 *
 * Record streams carry the hold explicitly (`VmaClusterRecord.lease`, one per record, good
 * for one release). Byte streams cannot, so byte chunks from a pool created with
 * `trackChunks` are found again by their `ArrayBuffer`: a final consumer calls
 * {@linkcode releaseChunk} once it has copied or written a chunk. Stages that pass chunks
 * on never release them.
 *
 * With {@linkcode checkBufferReuse} on, every buffer counts its generations and a misuse
 * (a lease released twice, a release after the buffer was recycled, more releases than
 * holders) throws a {@linkcode BufferReuseError} instead of corrupting data later, and
 * recycled buffers are filled with a poison byte.
 *
 * @module
 */
import type { Lease } from "./vma/records.ts";

/** Buffers whose chunks consumers give back with {@linkcode releaseChunk}. */
const tracked = new WeakMap<ArrayBufferLike, PooledBuffer>();
/** With checks on: the generation each chunk view was lent in. */
const lentViews = new WeakMap<Uint8Array, number>();
/** What recycled buffers are filled with while checks are on. */
const POISON = 0xdb;
let checking = false;

/**
 * Turns the buffer-reuse checks on or off (default off), for finding pipelines that break
 * the ownership rule: with checks on, a lease released twice (a record that reached two
 * consumers), a release after its buffer was recycled, or more releases than holders throws
 * a {@linkcode BufferReuseError}, and recycled buffers are poisoned with `0xdb` bytes. The
 * CLI turns them on with `VMABACKUP_DEBUG=1`. They cost time: leave them off in production.
 *
 * @example A record that reaches two consumers is an error
 * ```ts
 * import assert from "node:assert/strict";
 * import { BufferPool, BufferReuseError, checkBufferReuse } from "./_pool.ts";
 *
 * checkBufferReuse(true);
 * try {
 *   const buffer = new BufferPool(1024).acquire();
 *   const [lease] = buffer.lend(1)!;
 *   lease!.release();
 *   assert.throws(() => lease!.release(), BufferReuseError);
 * } finally {
 *   checkBufferReuse(false);
 * }
 * ```
 */
export function checkBufferReuse(enabled: boolean): void {
  checking = enabled;
}

/**
 * A pipeline broke the buffer ownership rule (thrown only while {@linkcode checkBufferReuse}
 * is on): a recycled buffer was still in use.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { BufferReuseError } from "./_pool.ts";
 *
 * const error = new BufferReuseError("Cannot release a lease: It was released before");
 * assert.equal(error.name, "BufferReuseError");
 * ```
 */
export class BufferReuseError extends Error {
  /** An error with `message`. */
  constructor(message: string) {
    super(message);
    this.name = "BufferReuseError";
  }
}

/** One holder's claim on one generation of a buffer: good for one release. */
class BufferLease implements Lease {
  #buffer: PooledBuffer | undefined;
  #generation: number;

  constructor(buffer: PooledBuffer, generation: number) {
    this.#buffer = buffer;
    this.#generation = generation;
  }

  release(): void {
    const buffer = this.#buffer;
    if (buffer === undefined) {
      if (checking) {
        throw new BufferReuseError(
          "Cannot release a buffer lease: It was already released (did one record reach " +
            "two consumers? Producers recycle buffers only with reuseBuffers: true)",
        );
      }
      return; // a second release must never count against the buffer's next use
    }
    this.#buffer = undefined;
    buffer.releaseGeneration(this.#generation);
  }
}

/**
 * A buffer with a reference count; it returns to its pool when the count reaches zero. Each
 * time it is recycled its generation advances, so holds of an earlier use can never release
 * a later one.
 *
 * @example Two holders share one buffer
 * ```ts
 * import assert from "node:assert/strict";
 * import { BufferPool } from "./_pool.ts";
 *
 * const pool = new BufferPool(1024);
 * const buffer = pool.acquire();
 * const [first, second] = buffer.lend(2)!;
 * first!.release();
 * first!.release(); // a second release of one lease counts nothing
 * assert.notEqual(pool.acquire(), buffer); // one holder left: not back yet
 * second!.release();
 * assert.equal(pool.acquire(), buffer);
 * ```
 */
export class PooledBuffer {
  readonly bytes: Uint8Array<ArrayBuffer>;
  #pool: BufferPool;
  #holds = 0;
  #generation = 0;

  constructor(pool: BufferPool, bytes: Uint8Array<ArrayBuffer>) {
    this.#pool = pool;
    this.bytes = bytes;
  }

  /** Whether this buffer comes back to its pool at all (see `BufferPoolOptions.recycle`). */
  get recycled(): boolean {
    return this.#pool.recycles;
  }

  /**
   * Sets the number of holders before views are handed out, for holders that give it back
   * with {@linkcode releaseChunk} or {@linkcode PooledBuffer.release}. Does nothing for a
   * buffer of a pool that does not recycle.
   */
  hold(count: number): void {
    if (!this.recycled) return;
    if (checking && this.#holds !== 0) {
      throw new BufferReuseError(
        `Cannot hold a pooled buffer: ${this.#holds} holders of its last use did not release it`,
      );
    }
    this.#holds = count;
    if (count === 0) this.#recycle();
  }

  /**
   * Sets the number of holders to `count` and returns one lease per holder, each good for
   * one release; `undefined` for a pool that does not recycle (the memory then belongs to
   * whoever receives it, and records carry no lease).
   */
  lend(count: number): Lease[] | undefined {
    if (!this.recycled) return undefined;
    this.hold(count);
    return Array.from({ length: count }, () => new BufferLease(this, this.#generation));
  }

  /**
   * A view of `start..end`, for a chunk handed out under a hold; with checks on, a release
   * of the view after the buffer was recycled is then caught.
   */
  view(start: number, end: number): Uint8Array<ArrayBuffer> {
    const view = this.bytes.subarray(start, end);
    if (checking && this.recycled) lentViews.set(view, this.#generation);
    return view;
  }

  /** Gives one hold of the current use back. */
  release(): void {
    if (!this.recycled) return;
    if (this.#holds <= 0) {
      if (checking) {
        throw new BufferReuseError(
          "Cannot release a pooled buffer: It has no holders left (a chunk released twice?)",
        );
      }
      return;
    }
    if (--this.#holds === 0) this.#recycle();
  }

  /** Gives back a hold of generation `generation`; a hold of an earlier use counts nothing. */
  releaseGeneration(generation: number): void {
    if (generation === this.#generation) return this.release();
    if (checking) {
      throw new BufferReuseError(
        "Cannot release a pooled buffer: It was recycled since this hold was taken " +
          "(a record or chunk was used after its buffer was reused)",
      );
    }
  }

  /** True when exactly one holder has it: that holder may transfer its memory away. */
  get exclusive(): boolean {
    return this.recycled && this.#holds === 1;
  }

  /** Gives the memory back after it was transferred away (to a Worker) and returned. */
  giveBack(bytes: Uint8Array<ArrayBuffer>): void {
    this.#holds = 0;
    this.#generation++;
    this.#pool.adopt(bytes);
  }

  #recycle(): void {
    this.#generation++;
    if (checking) this.bytes.fill(POISON);
    this.#pool.recycle(this);
  }
}

/** Options of {@linkcode BufferPool}. */
export interface BufferPoolOptions {
  /** Most free buffers kept for reuse (default 4). */
  maxFree?: number;
  /** Let consumers release byte chunks of these buffers with {@linkcode releaseChunk}. */
  trackChunks?: boolean;
  /**
   * Recycle at all (default `true`, for buffers that never leave their owner). A producer
   * whose caller did not opt in to `reuseBuffers` passes `false`: every buffer is then new,
   * {@linkcode PooledBuffer.lend} gives no leases, and releases do nothing.
   */
  recycle?: boolean;
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
 * const fresh = new BufferPool(4096, { recycle: false });
 * assert.equal(fresh.acquire().lend(1), undefined); // ownership passes downstream
 * ```
 */
export class BufferPool {
  readonly size: number;
  #free: PooledBuffer[] = [];
  #maxFree: number;
  #trackChunks: boolean;
  #recycle: boolean;

  constructor(size: number, options: BufferPoolOptions = {}) {
    this.size = size;
    this.#recycle = options.recycle ?? true;
    this.#maxFree = this.#recycle ? options.maxFree ?? 4 : 0;
    this.#trackChunks = this.#recycle && (options.trackChunks ?? false);
  }

  /** Whether released buffers come back (see {@linkcode BufferPoolOptions.recycle}). */
  get recycles(): boolean {
    return this.#recycle;
  }

  /** A free buffer, or a new one. Its content is whatever the last user left in it. */
  acquire(): PooledBuffer {
    const reused = this.#free.pop();
    if (reused !== undefined) return reused;
    return this.wrap(new Uint8Array(this.size));
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
  const buffer = tracked.get(chunk.buffer);
  if (buffer === undefined) return;
  const generation = checking ? lentViews.get(chunk) : undefined;
  if (generation === undefined) buffer.release();
  else buffer.releaseGeneration(generation);
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
 * buffer.release();
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

  /**
   * Classes from `smallest` to `largest`, each keeping up to `maxFree` free buffers; the
   * other options as for {@linkcode BufferPool}.
   */
  constructor(
    smallest: number,
    largest: number,
    maxFree: number,
    options: Omit<BufferPoolOptions, "maxFree"> = {},
  ) {
    for (let size = smallest;; size *= 4) {
      const top = size >= largest;
      this.#classes.push(new BufferPool(top ? largest : size, { ...options, maxFree }));
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
