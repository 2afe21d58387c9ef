// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Recycling of large buffers between pipeline stages (internal).
 *
 * A producer acquires a buffer, hands out views of it with a shared lease, and the buffer
 * comes back to the pool once every view has been released. A view that is never released
 * only costs a fresh allocation later: correctness never depends on a release.
 *
 * @module
 */
import type { Lease } from "./vma/records.ts";

/** A buffer with a reference count; it returns to its pool when the count reaches zero. */
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
}

/** A small free list of equally sized buffers. */
export class BufferPool {
  readonly size: number;
  #free: PooledBuffer[] = [];
  #maxFree: number;

  constructor(size: number, maxFree = 4) {
    this.size = size;
    this.#maxFree = maxFree;
  }

  /** A free buffer, or a new one. Its content is whatever the last user left in it. */
  acquire(): PooledBuffer {
    return this.#free.pop() ?? new PooledBuffer(this, new Uint8Array(this.size));
  }

  /** Called by {@linkcode PooledBuffer} when its last hold is released. */
  recycle(buffer: PooledBuffer): void {
    if (this.#free.length < this.#maxFree) this.#free.push(buffer);
  }
}
