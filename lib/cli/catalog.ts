// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The commands of `cli.ts`, each loaded only when it runs: a command's module graph (node:zlib,
 * node:crypto, the S3 client, QEMU) costs start-up time and memory, and a run needs just one.
 *
 * @module
 */
import type { Command } from "./command.ts";

/** A command of the CLI: its name and one line for the list, and how to load it. */
export interface CommandEntry {
  name: string;
  /** One line for the command list. */
  summary: string;
  /** Imports the command's module. */
  load(): Promise<Command>;
}

/**
 * Every command, in the order `cli.ts --help` lists them.
 *
 * @example Load a command by name
 * ```ts
 * import assert from "node:assert/strict";
 * import { COMMANDS } from "./catalog.ts";
 *
 * const entry = COMMANDS.find((candidate) => candidate.name === "verify")!;
 * const command = await entry.load();
 * assert.equal(command.name, entry.name);
 * assert.match(command.help, /verify/);
 * ```
 */
export const COMMANDS: readonly CommandEntry[] = [
  {
    name: "backup",
    summary: "back up disks (and configs) into a VMA archive",
    load: async () => (await import("./commands/backup.ts")).backupCommand,
  },
  {
    name: "extract",
    summary: "restore configs and sparse raw disks into a new directory (or one disk to stdout)",
    load: async () => (await import("./commands/extract.ts")).extractCommand,
  },
  {
    name: "list",
    summary: "list configs and devices (the exact 'vma list' output, or --json)",
    load: async () => (await import("./commands/list.ts")).listCommand,
  },
  {
    name: "config",
    summary: "print the raw bytes of a stored config (default qemu-server.conf)",
    load: async () => (await import("./commands/list.ts")).configCommand,
  },
  {
    name: "verify",
    summary: "check every rule of the format, missing clusters included",
    load: async () => (await import("./commands/verify.ts")).verifyCommand,
  },
  {
    name: "index",
    summary: "build the index of an existing archive, as a sidecar ARCHIVE.idx",
    load: async () => (await import("./commands/index.ts")).indexCommand,
  },
  {
    name: "convert",
    summary: "rewrite any archive as a seekable, indexed .vma.zst (the same VMA bytes)",
    load: async () => (await import("./commands/convert.ts")).convertCommand,
  },
  {
    name: "serve",
    summary: "serve the disks of an archive as read-only NBD exports",
    load: async () => (await import("./commands/serve.ts")).serveCommand,
  },
  {
    name: "restore",
    summary: "restore a VM from its backup while it runs (--live)",
    load: async () => (await import("./commands/restore.ts")).restoreCommand,
  },
  {
    name: "demo",
    summary: "back up, verify, extract and compare a built-in sample VM",
    load: async () => (await import("./commands/demo.ts")).demoCommand,
  },
];
