// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A bounded queue that producers push records into and a pipeline reads as a stream.
 *
 * @module
 */

/**
 * Records pushed by any number of producers (for example one NBD connection per disk), read
 * as one `ReadableStream`. `push` waits while the queue is full, which is how backpressure
 * reaches QEMU: a write is only acknowledged once its clusters are queued. When the reader
 * cancels (the archive sink failed), `push` rejects at once and `onCancel` runs.
 *
 * @example Two producers, one stream
 * ```ts
 * import assert from "node:assert/strict";
 * import { RecordQueue } from "./record_queue.ts";
 *
 * const queue = new RecordQueue<number>(2);
 * const producer = (async () => {
 *   for (let i = 0; i < 5; i++) await queue.push(i);
 *   queue.close();
 * })();
 * assert.deepEqual(await Array.fromAsync(queue.readable), [0, 1, 2, 3, 4]);
 * await producer;
 * ```
 */
export class RecordQueue<T> {
  readonly readable: ReadableStream<T>;
  #items: T[] = [];
  #capacity: number;
  #spaceWaiters: (() => void)[] = [];
  #dataWaiter: (() => void) | undefined;
  #closed = false;
  #failure: unknown;
  #cancelled: unknown;
  #onCancel: ((reason: unknown) => void) | undefined;

  constructor(capacity: number, onCancel?: (reason: unknown) => void) {
    this.#capacity = capacity;
    this.#onCancel = onCancel;
    this.readable = new ReadableStream<T>({
      pull: async (controller) => {
        while (this.#items.length === 0) {
          if (this.#failure !== undefined) throw this.#failure;
          if (this.#closed) return controller.close();
          await new Promise<void>((resolve) => (this.#dataWaiter = resolve));
        }
        controller.enqueue(this.#items.shift()!);
        this.#spaceWaiters.shift()?.();
      },
      cancel: (reason) => {
        this.#cancelled = reason ?? new Error("The record stream was cancelled");
        this.#items = [];
        for (const wake of this.#spaceWaiters.splice(0)) wake();
        this.#onCancel?.(this.#cancelled);
      },
    }, { highWaterMark: 0 });
  }

  /** Adds a record, waiting while the queue is full; rejects once the reader cancelled. */
  async push(item: T): Promise<void> {
    while (this.#items.length >= this.#capacity && this.#cancelled === undefined) {
      await new Promise<void>((resolve) => this.#spaceWaiters.push(resolve));
    }
    if (this.#cancelled !== undefined) throw this.#cancelled;
    if (this.#closed) throw new Error("Cannot push: The record queue is closed");
    this.#items.push(item);
    this.#wake();
  }

  /** Ends the stream after the queued records. */
  close(): void {
    this.#closed = true;
    this.#wake();
  }

  /** Fails the stream (after nothing more is read). */
  error(reason: unknown): void {
    this.#failure = reason;
    this.#wake();
  }

  #wake(): void {
    const wake = this.#dataWaiter;
    this.#dataWaiter = undefined;
    wake?.();
  }
}
