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
 * cancels (the archive sink failed) or {@linkcode RecordQueue.fail} is called (the backup
 * is aborted), every waiting `push` rejects at once, and so does every later one, so no
 * producer is left waiting for a reader that will never come.
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
 *
 * @example Failing wakes the producers that wait for room
 * ```ts
 * import assert from "node:assert/strict";
 * import { RecordQueue } from "./record_queue.ts";
 *
 * const queue = new RecordQueue<number>(1);
 * await queue.push(1);
 * const waiting = queue.push(2); // full, and nobody reads
 * queue.fail(new Error("aborted"));
 * await assert.rejects(waiting, /aborted/);
 * await assert.rejects(queue.push(3), /aborted/);
 * await assert.rejects(queue.readable.getReader().read(), /aborted/);
 * ```
 */
export class RecordQueue<T> {
  readonly readable: ReadableStream<T>;
  #items: T[] = [];
  #capacity: number;
  #spaceWaiters: (() => void)[] = [];
  #dataWaiter: (() => void) | undefined;
  #closed = false;
  /** Why the stream ends with an error after the queued records (the producers' failure). */
  #failure: unknown;
  /** Why pushes are refused: the reader cancelled, or the queue was failed. */
  #stopped: unknown;
  #onCancel: ((reason: unknown) => void) | undefined;

  constructor(capacity: number, onCancel?: (reason: unknown) => void) {
    this.#capacity = capacity;
    this.#onCancel = onCancel;
    this.readable = new ReadableStream<T>({
      pull: async (controller) => {
        while (this.#items.length === 0 || this.#stopped !== undefined) {
          if (this.#stopped !== undefined) throw this.#stopped;
          if (this.#failure !== undefined) throw this.#failure;
          if (this.#closed) return controller.close();
          await new Promise<void>((resolve) => (this.#dataWaiter = resolve));
        }
        controller.enqueue(this.#items.shift()!);
        this.#spaceWaiters.shift()?.();
      },
      cancel: (reason) => {
        this.#stop(reason ?? new Error("The record stream was cancelled"));
        this.#onCancel?.(this.#stopped);
      },
    }, { highWaterMark: 0 });
  }

  /** Most records queued at once. */
  get capacity(): number {
    return this.#capacity;
  }

  /** Whether pushes are refused now (the reader cancelled, or the queue was failed). */
  get stopped(): boolean {
    return this.#stopped !== undefined;
  }

  /** Adds a record, waiting while the queue is full; rejects once the queue stopped. */
  async push(item: T): Promise<void> {
    while (this.#items.length >= this.#capacity && this.#stopped === undefined) {
      await new Promise<void>((resolve) => this.#spaceWaiters.push(resolve));
    }
    if (this.#stopped !== undefined) throw this.#stopped;
    if (this.#closed) throw new Error("Cannot push: The record queue is closed");
    this.#items.push(item);
    this.#wake();
  }

  /** Ends the stream after the queued records. */
  close(): void {
    this.#closed = true;
    this.#wake();
  }

  /** Fails the stream after the queued records (what the producers had is still read). */
  error(reason: unknown): void {
    this.#failure = reason;
    this.#wake();
  }

  /**
   * Stops at once: queued records are dropped, every waiting and later `push` rejects with
   * `reason`, and so does the next read.
   */
  fail(reason: unknown): void {
    this.#stop(reason);
    this.#wake();
  }

  #stop(reason: unknown): void {
    this.#stopped ??= reason;
    this.#items = [];
    for (const wake of this.#spaceWaiters.splice(0)) wake();
  }

  #wake(): void {
    const wake = this.#dataWaiter;
    this.#dataWaiter = undefined;
    wake?.();
  }
}
