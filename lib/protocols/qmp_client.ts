// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A QMP (QEMU Machine Protocol) client over a unix socket.
 *
 * @module
 */
import { writeAll } from "../_io.ts";

/** An asynchronous event QEMU sent, such as `BLOCK_JOB_COMPLETED`. */
export interface QmpEvent {
  /** Event name, such as `JOB_STATUS_CHANGE`. */
  event: string;
  /** Event arguments, as QEMU sent them. */
  data?: Record<string, unknown>;
  /** When QEMU emitted the event. */
  timestamp?: { seconds: number; microseconds: number };
}

/**
 * QEMU answered a command with an error.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { QmpError } from "./qmp_client.ts";
 *
 * const error = new QmpError("blockdev-del", "GenericError", "Node 'fleece0' is busy");
 * assert.equal(error.errorClass, "GenericError");
 * assert.match(error.message, /^QMP command blockdev-del failed: Node 'fleece0' is busy/);
 * ```
 */
export class QmpError extends Error {
  /** QMP error class, such as `GenericError` or `DeviceNotFound`. */
  readonly errorClass: string;
  /** QEMU's description of the error. */
  readonly description: string;
  /** The command that failed. */
  readonly command: string;

  /** The error QEMU answered `command` with. */
  constructor(command: string, errorClass: string, description: string) {
    super(`QMP command ${command} failed: ${description} (${errorClass})`);
    this.name = "QmpError";
    this.command = command;
    this.errorClass = errorClass;
    this.description = description;
  }
}

/** Options of {@linkcode QmpClient.connect}. */
export interface QmpConnectOptions {
  /** Most milliseconds to wait for a command's answer or an event (default 60 s). */
  timeoutMs?: number;
}

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(error: Error): void;
}

/**
 * A QMP connection: capabilities negotiation on connect, commands matched to their answers
 * by id, and every event queued until someone takes it, so an event that arrives before
 * anyone waits for it is never lost (a client that drops events hangs waiting for a
 * `BLOCK_JOB_COMPLETED` that already came).
 *
 * @example Ask a QEMU for its status
 * ```ts ignore
 * import { QmpClient } from "./qmp_client.ts";
 *
 * using qmp = await QmpClient.connect("/run/vm-100.qmp");
 * const status = await qmp.execute("query-status") as { status: string };
 * console.log(status.status); // "running"
 * ```
 */
export class QmpClient implements Disposable {
  /** The greeting QEMU sent (version and capabilities). */
  readonly greeting: Record<string, unknown>;
  #conn: Deno.UnixConn;
  #timeoutMs: number;
  #nextId = 1;
  #pending = new Map<string, Pending>();
  #events: QmpEvent[] = [];
  #eventWaiters = new Set<() => void>();
  #closed: Error | undefined;
  #reading: Promise<void>;

  private constructor(
    conn: Deno.UnixConn,
    greeting: Record<string, unknown>,
    lines: AsyncIterator<string>,
    timeoutMs: number,
  ) {
    this.#conn = conn;
    this.greeting = greeting;
    this.#timeoutMs = timeoutMs;
    this.#reading = this.#readLoop(lines);
  }

  /** Connects to a QMP unix socket and negotiates capabilities. */
  static async connect(path: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? 60_000;
    const conn = await Deno.connect({ transport: "unix", path });
    const lines = jsonLines(conn.readable);
    let greeting: Record<string, unknown>;
    try {
      const first = await withTimeout(lines.next(), timeoutMs, "the QMP greeting");
      const parsed = first.done ? undefined : JSON.parse(first.value);
      if (!parsed || typeof parsed.QMP !== "object") {
        throw new Error(`Cannot connect to QMP at ${path}: No QMP greeting (is it a QMP socket?)`);
      }
      greeting = parsed.QMP;
    } catch (error) {
      conn.close();
      throw error;
    }
    const client = new QmpClient(conn, greeting, lines, timeoutMs);
    try {
      await client.execute("qmp_capabilities");
    } catch (error) {
      client.close();
      throw error;
    }
    return client;
  }

  /** QEMU's version as `major.minor.micro`. */
  get version(): string {
    const version = (this.greeting.version as { qemu?: Record<string, number> } | undefined)?.qemu;
    return version ? `${version.major}.${version.minor}.${version.micro}` : "unknown";
  }

  /**
   * Runs a command and resolves to its `return` value; an error answer rejects with a
   * {@linkcode QmpError}.
   */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.#closed) return Promise.reject(this.#closed);
    const id = `vmabackup-${this.#nextId++}`;
    const message = JSON.stringify({ execute: command, ...(args && { arguments: args }), id });
    const answer = new Promise<unknown>((resolve, reject) => {
      this.#pending.set(id, { command, resolve, reject });
    });
    const sent = this.#write(`${message}\n`).catch((error) => {
      this.#pending.delete(id);
      throw error;
    });
    return sent.then(() =>
      withTimeout(answer, this.#timeoutMs, `the answer to ${command}`).finally(() =>
        this.#pending.delete(id)
      )
    );
  }

  /** Runs an HMP command line (for example `qemu-io ...`) and resolves to its output. */
  async humanMonitorCommand(commandLine: string): Promise<string> {
    return await this.execute("human-monitor-command", { "command-line": commandLine }) as string;
  }

  /**
   * Takes the first queued or future event that `matches`, waiting up to `timeoutMs`
   * (`Infinity` for no limit) or until `signal` aborts. Events that do not match stay queued
   * for later callers.
   */
  async waitForEvent(
    matches: (event: QmpEvent) => boolean,
    options: { timeoutMs?: number; signal?: AbortSignal; description?: string } = {},
  ): Promise<QmpEvent> {
    const { timeoutMs = this.#timeoutMs, signal, description = "a QMP event" } = options;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const index = this.#events.findIndex(matches);
      if (index >= 0) return this.#events.splice(index, 1)[0]!;
      if (this.#closed) throw this.#closed;
      signal?.throwIfAborted();
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new Deno.errors.TimedOut(`Timed out waiting for ${description}`);
      await new Promise<void>((resolve) => {
        const waiters = this.#eventWaiters;
        const timer = Number.isFinite(remaining) ? setTimeout(wake, remaining) : undefined;
        signal?.addEventListener("abort", wake, { once: true });
        function wake() {
          clearTimeout(timer);
          signal?.removeEventListener("abort", wake);
          waiters.delete(wake);
          resolve();
        }
        waiters.add(wake);
      });
    }
  }

  /** Closes the connection; pending commands fail. */
  close(): void {
    if (!this.#closed) this.#fail(new Error("QMP connection closed"));
    try {
      this.#conn.close();
    } catch { /* already closed */ }
  }

  /** Closes the connection, as {@linkcode QmpClient.close} does. */
  [Symbol.dispose](): void {
    this.close();
  }

  /** Resolves when the read loop has stopped (after close or a dropped connection). */
  get finished(): Promise<void> {
    return this.#reading;
  }

  async #write(text: string): Promise<void> {
    await writeAll(this.#conn, new TextEncoder().encode(text));
  }

  async #readLoop(lines: AsyncIterator<string>): Promise<void> {
    try {
      for (;;) {
        const { value, done } = await lines.next();
        if (done) break;
        let message: Record<string, unknown>;
        try {
          message = JSON.parse(value);
        } catch {
          continue; // not JSON: ignore the line
        }
        if (typeof message.event === "string") {
          this.#events.push(message as unknown as QmpEvent);
          for (const wake of [...this.#eventWaiters]) wake();
          continue;
        }
        const pending = typeof message.id === "string" ? this.#pending.get(message.id) : undefined;
        if (pending === undefined) continue;
        if ("error" in message) {
          const error = message.error as { class?: string; desc?: string };
          pending.reject(new QmpError(pending.command, error.class ?? "Unknown", error.desc ?? ""));
        } else {
          pending.resolve(message.return);
        }
      }
      this.#fail(new Deno.errors.ConnectionReset("QMP connection closed by QEMU"));
    } catch (error) {
      this.#fail(error instanceof Error ? error : new Error(String(error)));
    }
  }

  #fail(error: Error): void {
    this.#closed ??= error;
    for (const pending of this.#pending.values()) pending.reject(error);
    this.#pending.clear();
    for (const wake of [...this.#eventWaiters]) wake();
  }
}

/** Splits a byte stream into text lines. */
async function* jsonLines(readable: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let buffered = "";
  for await (const text of readable.pipeThrough(new TextDecoderStream())) {
    buffered += text;
    let newline: number;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline).trim();
      buffered = buffered.slice(newline + 1);
      if (line !== "") yield line;
    }
  }
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Deno.errors.TimedOut(`Timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
