// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Progress on stderr: a bar on terminals, JSON lines for scripts, or nothing.
 *
 * @module
 */
import { type CliContext, formatBytes, writeText } from "./context.ts";

/** How progress is shown: `auto` draws a bar when stderr is a terminal. */
export type ProgressMode = "auto" | "json" | "none";

/**
 * Counts processed bytes and reports them at most a few times per second.
 *
 * @example JSON lines on stderr
 * ```ts
 * import assert from "node:assert/strict";
 * import { Progress } from "./progress.ts";
 *
 * let err = "";
 * const write = (bytes: Uint8Array) => {
 *   err += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * const progress = new Progress(context, { mode: "json", command: "verify", total: 1000 });
 * progress.add(1000);
 * await progress.finish(true);
 * const events = err.trim().split("\n").map((line) => JSON.parse(line));
 * assert.deepEqual(events[0], { event: "start", total: 1000, command: "verify" });
 * assert.deepEqual([events.at(-1).event, events.at(-1).done], ["done", 1000]);
 * ```
 */
export class Progress {
  #context: CliContext;
  #command: string;
  #kind: "bar" | "json" | "none";
  #total: number | undefined;
  #done = 0;
  #started = performance.now();
  #lastReport = 0;
  #pending: Promise<void> = Promise.resolve();
  #startSent = false;

  constructor(
    context: CliContext,
    options: { mode: ProgressMode; command: string; total?: number | undefined },
  ) {
    this.#context = context;
    this.#command = options.command;
    this.#total = options.total;
    this.#kind = options.mode === "json"
      ? "json"
      : options.mode === "auto" && context.stderrIsTerminal
      ? "bar"
      : "none";
  }

  /** Adds to the total (for example when a device record shows its size). */
  addTotal(bytes: number): void {
    this.#total = (this.#total ?? 0) + bytes;
  }

  /** Writes a JSON-lines event (only in `json` mode), such as the snapshot point of a live backup. */
  note(event: string, data: Record<string, unknown> = {}): void {
    if (this.#kind !== "json") return;
    this.#start();
    this.#emit({ event, ...data });
  }

  /** Adds `bytes` to the count. */
  add(bytes: number): void {
    if (bytes === 0) return; // device records: only their total counts
    this.#done += bytes;
    if (this.#kind === "none") return;
    this.#start();
    const now = performance.now();
    if (now - this.#lastReport < (this.#kind === "bar" ? 100 : 500)) return;
    this.#lastReport = now;
    this.#report(false);
  }

  #start(): void {
    if (this.#kind === "json" && !this.#startSent) {
      this.#startSent = true;
      this.#emit({ event: "start", total: this.#total ?? null });
    }
  }

  /** Writes the final report and waits for all progress output to be written. */
  async finish(ok: boolean): Promise<void> {
    this.#start();
    if (this.#kind === "bar") this.#report(true);
    if (this.#kind === "json") {
      this.#emit({ event: ok ? "done" : "failed", done: this.#done, seconds: this.#seconds() });
    }
    await this.#pending;
  }

  #seconds(): number {
    return (performance.now() - this.#started) / 1000;
  }

  #report(final: boolean): void {
    const seconds = this.#seconds();
    const rate = this.#done / Math.max(seconds, 1e-3);
    const total = this.#total;
    const percent = total ? Math.min(100, (100 * this.#done) / total) : undefined;
    const eta = total && rate > 0 ? Math.max(0, (total - this.#done) / rate) : undefined;
    if (this.#kind === "json") {
      this.#emit({
        event: "progress",
        done: this.#done,
        total: total ?? null,
        percent: percent === undefined ? null : Number(percent.toFixed(1)),
        bytesPerSecond: Math.round(rate),
        etaSeconds: eta === undefined ? null : Math.round(eta),
      });
      return;
    }
    const width = 24;
    const filled = percent === undefined ? 0 : Math.round((width * percent) / 100);
    const bar = percent === undefined
      ? ""
      : `${percent.toFixed(0).padStart(3)}% [${"#".repeat(filled)}${" ".repeat(width - filled)}] `;
    const amount = total
      ? `${formatBytes(this.#done)} / ${formatBytes(total)}`
      : formatBytes(this.#done);
    const speed = `${(rate / 1e6).toFixed(1)} MB/s`;
    const etaText = eta === undefined || final ? "" : `  ETA ${formatDuration(eta)}`;
    this.#write(`\r\x1b[K${this.#command} ${bar}${amount}  ${speed}${etaText}${final ? "\n" : ""}`);
  }

  #emit(event: Record<string, unknown>): void {
    this.#write(`${JSON.stringify({ ...event, command: this.#command })}\n`);
  }

  #write(text: string): void {
    const stderr = this.#context.stderr;
    this.#pending = this.#pending.then(() => writeText(stderr, text)).catch(() => {});
  }
}

function formatDuration(seconds: number): string {
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${rest}` : `${m}:${rest}`;
}
