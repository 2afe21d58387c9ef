// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The one note about node:zlib's internals (internal): the zstd Workers drive its native
 * handle, and fall back to its public API, slower, when a self-test says it changed.
 *
 * @module
 */

let note: string | undefined;

/**
 * Why zstd runs through `node:zlib`'s public API (slower) instead of its native handle, if
 * it does: set when a thread's self-test failed, for the CLI to print once.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { zstdFallbackNote } from "./_zstd_note.ts";
 *
 * assert.equal(zstdFallbackNote(), undefined); // Deno 2.9.6: the fast path works
 * ```
 */
export function zstdFallbackNote(): string | undefined {
  return note;
}

/**
 * Records why a thread fell back (the first reason is kept).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { noteFallback } from "./_zstd_note.ts";
 *
 * assert.equal(typeof noteFallback, "function");
 * ```
 */
export function noteFallback(why: string): void {
  note ??= `zstd: node:zlib's native handle failed its self-test (${why}); ` +
    "using its public API, which is slower";
}
