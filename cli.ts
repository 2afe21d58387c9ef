#!/usr/bin/env -S deno run --allow-read --allow-write
// Copyright 2026 the vmabackup authors. MIT license.
/**
 * vmabackup: back up VM disks into Proxmox VMA archives, and read them back.
 *
 * ```sh
 * deno run --allow-read --allow-write cli.ts backup --disk drive-scsi0=disk.raw -o vm.vma.zst
 * deno run --allow-read cli.ts verify vm.vma.zst
 * deno run --allow-read --allow-write cli.ts extract vm.vma.zst restored/
 * ```
 *
 * Every command has `--help`; exit codes are listed in the README.
 *
 * @module
 */
import denoJson from "./deno.json" with { type: "json" };
import { COMMANDS } from "./lib/cli/catalog.ts";
import { type CliContext, processContext, writeText } from "./lib/cli/context.ts";
import { describeError, ExitCode, InterruptedError, signalExitCode } from "./lib/cli/errors.ts";
import { checkBufferReuse } from "./lib/_pool.ts";
import { zstdFallbackNote } from "./lib/transforms/_zstd_note.ts";

function usage(): string {
  const width = Math.max(...COMMANDS.map((command) => command.name.length));
  return [
    `vmabackup ${denoJson.version}: VM disk backups in the Proxmox VMA format`,
    "",
    "usage: cli.ts COMMAND [options]     (cli.ts COMMAND --help for details)",
    "",
    ...COMMANDS.map((command) => `  ${command.name.padEnd(width)}  ${command.summary}`),
    "",
    "  --version  print the version",
  ].join("\n");
}

/**
 * Runs the CLI with `args`; resolves to the process exit code. Errors become one line.
 *
 * @example Run the CLI in-process
 * ```ts
 * import assert from "node:assert/strict";
 * import { main } from "./cli.ts";
 *
 * let out = "";
 * const write = (bytes: Uint8Array) => {
 *   out += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * assert.equal(await main(["--version"], context), 0);
 * assert.match(out, /^vmabackup \d+\.\d+\.\d+\n$/);
 * assert.equal(await main(["list", "--nope"], context), 2); // a usage error, reported on stderr
 * assert.match(out, /^error: Unknown option '--nope'.*\(see 'cli\.ts list --help'\)\n$/m);
 * ```
 */
export async function main(args: string[], context: CliContext): Promise<number> {
  const [name, ...rest] = args;
  if (name === "--version" || name === "-V") {
    await writeText(context.stdout, `vmabackup ${denoJson.version}\n`);
    return ExitCode.ok;
  }
  if (name === undefined || name === "--help" || name === "-h" || name === "help") {
    await writeText(name === undefined ? context.stderr : context.stdout, `${usage()}\n`);
    return name === undefined ? ExitCode.usage : ExitCode.ok;
  }
  const command = COMMANDS.find((candidate) => candidate.name === name);
  if (debugEnabled()) checkBufferReuse(true); // a buffer reused too early becomes an error
  if (command === undefined) {
    await writeText(context.stderr, `error: unknown command '${name}' (see 'cli.ts --help')\n`);
    return ExitCode.usage;
  }
  try {
    return await (await command.load()).run(rest, context);
  } catch (error) {
    const { exitCode, message } = describeError(error);
    // deno-lint-ignore no-console
    if (debugEnabled()) console.error(error);
    await writeText(context.stderr, `error: ${message}\n`).catch(() => {});
    return exitCode;
  } finally {
    const note = zstdFallbackNote(); // a Deno upgrade changed node:zlib: slower, still correct
    if (note !== undefined) await writeText(context.stderr, `note: ${note}\n`).catch(() => {});
  }
}

/** `VMABACKUP_DEBUG=1` prints stack traces, when the environment may be read at all. */
function debugEnabled(): boolean {
  const query = { name: "env", variable: "VMABACKUP_DEBUG" } as const;
  return Deno.permissions.querySync(query).state === "granted" &&
    Deno.env.get("VMABACKUP_DEBUG") === "1";
}

if (import.meta.main) {
  const controller = new AbortController();
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM", "SIGHUP"];
  let received = 0;
  const onSignal = (signal: Deno.Signal) => () => {
    received++;
    if (received === 1) return controller.abort(new InterruptedError(signal));
    // Cleaning up may take a moment (a live backup restores the VM's block graph): a second
    // signal does not cut it short; a third one does.
    if (received === 2) {
      writeText(Deno.stderr, "still cleaning up; send the signal once more to quit at once\n")
        .catch(() => {});
      return;
    }
    Deno.exit(signalExitCode(signal));
  };
  const listeners = signals.map((signal) => [signal, onSignal(signal)] as const);
  for (const [signal, listener] of listeners) Deno.addSignalListener(signal, listener);
  const code = await main(Deno.args, processContext(controller.signal));
  for (const [signal, listener] of listeners) Deno.removeSignalListener(signal, listener);
  Deno.exit(code);
}
