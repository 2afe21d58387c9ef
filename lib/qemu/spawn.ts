// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Spawning the QEMU command-line tools (`qemu-nbd`, `qemu-img`), in one place, so that a
 * missing tool always fails with the same message.
 *
 * @module
 */

/**
 * Runs a qemu tool, turning "not installed" into a line that names the Debian package.
 *
 * @example A missing tool names its package
 * ```ts
 * import assert from "node:assert/strict";
 * import { spawnQemuTool } from "./spawn.ts";
 *
 * assert.throws(
 *   () => spawnQemuTool("qemu-no-such-tool", ["--version"]),
 *   { name: "NotFound", message: /not installed \(Debian package qemu-utils\)/ },
 * );
 * ```
 */
export function spawnQemuTool(program: string, args: string[], options: Deno.CommandOptions = {}) {
  try {
    return new Deno.Command(program, { ...options, args }).spawn();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new Deno.errors.NotFound(
        `Cannot run ${program}: It is not installed (Debian package qemu-utils)`,
      );
    }
    throw error;
  }
}
