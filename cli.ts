#!/usr/bin/env -S deno run --allow-read --allow-write
// Copyright 2026 the vmabackup authors. MIT license.
/**
 * vmabackup command-line tool (placeholder until the CLI lands).
 *
 * @module
 */
// deno-lint-ignore no-console
if (import.meta.main) console.error("usage: cli.ts COMMAND ... (not implemented yet)");
