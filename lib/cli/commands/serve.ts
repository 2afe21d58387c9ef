// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `serve`: the disks of an archive as read-only NBD exports, until SIGINT or SIGTERM.
 *
 * @module
 */
import { archiveExports } from "../../access/archive_exports.ts";
import type { IndexedArchive } from "../../access/indexed_archive.ts";
import { type NbdListenAddress, NbdServer } from "../../protocols/nbd_server.ts";
import { type Command, expectPositionals, parseCommandArgs, printHelp } from "../command.ts";
import { type CliContext, formatBytes, writeText } from "../context.ts";
import { CliError, ExitCode, UsageError } from "../errors.ts";
import { openIndexedArchive, SERVE_LIMITS } from "../random_access.ts";

const HELP = `Serve the disks of an archive as read-only NBD exports, named after the disks
(drive-scsi0, ...), for QEMU, qemu-img, nbdcopy, nbdinfo or nbdfuse. Reads decode only the
extents that hold the range; zero clusters are holes. Runs in the foreground, prints one
NBD URI per export on stdout, and stops on Ctrl-C or SIGTERM, removing its socket.

usage: cli.ts serve ARCHIVE [--socket PATH | --listen HOST:PORT] [--disk NAME]...
                    [--index FILE] [--quiet]

  ARCHIVE            a seekable .vma.zst (written by backup or convert), or a plain .vma
                     (with its sidecar ARCHIVE.idx, or mapped by reading its extent headers)
  --socket PATH      listen on a new unix socket (default: one in a new temporary directory)
  --listen HOST:PORT listen on TCP instead (no authentication: bind to localhost or a
                     private network)
  --disk NAME        serve only this disk (repeatable; with or without drive-)
  --index FILE       the sidecar index of a plain .vma (default ARCHIVE.idx if it exists)
  --quiet            no log lines for connections, only failed requests

Boot a VM on the backup: qemu-img create -f qcow2 -b URI -F raw overlay.qcow2, or see
'cli.ts restore --help' for a live restore.

A .vma.zst written by the zstd program (no seek table) is refused with exit code 9: make it
seekable with 'cli.ts convert'.
permissions: --allow-read --allow-write --allow-net (unix socket); --allow-read --allow-net
(TCP)`;

/**
 * `cli.ts serve`: serves an archive's disks over NBD until the signal aborts.
 *
 * @example Serve a plain archive until the signal, then leave nothing behind
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdClient, VmaWriterStream } from "../../../mod.ts";
 * import { serveCommand } from "./serve.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeFile(`${dir}/vm.vma`, ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 1, data: new Uint8Array(65536).fill(5) },
 * ]).pipeThrough(new VmaWriterStream()));
 * let out = "";
 * const stdout = {
 *   write(bytes: Uint8Array) {
 *     out += new TextDecoder().decode(bytes);
 *     return Promise.resolve(bytes.length);
 *   },
 * };
 * const stderr = { write: (bytes: Uint8Array) => Promise.resolve(bytes.length) };
 * const stop = new AbortController();
 * const context = { stdout, stderr, stderrIsTerminal: false, signal: stop.signal };
 * const serving = serveCommand.run([`${dir}/vm.vma`, "--socket", `${dir}/nbd.sock`], context);
 * while (!out.includes("\n")) await new Promise((resolve) => setTimeout(resolve, 10));
 * const uri = out.split("\n")[0]!;
 * assert.equal(uri, `nbd+unix:///drive-scsi0?socket=${dir}/nbd.sock`);
 * await using client = await NbdClient.connect(uri);
 * const bytes = new Uint8Array(4096);
 * await client.read(0, bytes);
 * assert.equal(bytes[4095], 5);
 * stop.abort();
 * assert.equal(await serving, 0);
 * assert.deepEqual(await Array.fromAsync(Deno.readDir(dir), (e) => e.name), ["vm.vma"]);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export const serveCommand: Command = {
  name: "serve",
  help: HELP,
  async run(args, context) {
    const { values, positionals } = parseCommandArgs("serve", args, {
      socket: { type: "string" },
      listen: { type: "string" },
      disk: { type: "string", multiple: true },
      index: { type: "string" },
      quiet: { type: "boolean" },
    });
    if (values.help) return await printHelp(context, HELP);
    expectPositionals("serve", positionals, 1);
    if (values.socket !== undefined && values.listen !== undefined) {
      throw new UsageError("--socket and --listen cannot be combined");
    }
    const tcp = values.listen === undefined ? undefined : parseListen(values.listen);
    const archive = await openIndexedArchive(positionals[0]!, {
      indexPath: values.index,
    });
    let tempDir: string | undefined;
    let server: NbdServer | undefined;
    try {
      const exports = diskExports(archive, values.disk ?? []);
      let address: NbdListenAddress;
      if (tcp !== undefined) address = tcp;
      else if (values.socket !== undefined) address = { path: values.socket };
      else {
        tempDir = await Deno.makeTempDir({ prefix: "vmabackup-serve-" });
        address = { path: `${tempDir}/nbd.sock` };
      }
      server = listen(address, exports, context, values.quiet === true);
      await writeText(
        context.stderr,
        `serving ${exports.size} disk(s) of ${archive.name} (${
          describeIndex(archive)
        }), read-only; stop with Ctrl-C\n`,
      );
      const lines = [...exports.keys()].map((name) => `${server!.uri(name)}\n`);
      for (const [name, handler] of exports) {
        await writeText(context.stderr, `  ${name}: ${formatBytes(handler.size)}\n`);
      }
      await writeText(context.stdout, lines.join(""));
      await untilAborted(context.signal);
      const { stats } = server;
      const { extentsRead, storedBytesRead, cacheHits } = archive.stats;
      await writeText(
        context.stderr,
        `stopped: ${stats.connections} connection(s), ${stats.reads} reads of ${
          formatBytes(stats.bytesRead)
        } (${stats.errors} failed); ${extentsRead} extents decoded from ${
          formatBytes(storedBytesRead)
        } of the archive, ${cacheHits} cache hits\n`,
      ).catch(() => {}); // a closed stderr does not make a clean stop fail
      return ExitCode.ok;
    } finally {
      await server?.close();
      archive.close();
      if (tempDir !== undefined) await Deno.remove(tempDir, { recursive: true }).catch(() => {});
    }
  },
};

/** The exports of the chosen disks; an unknown name is exit code 7. */
function diskExports(archive: IndexedArchive, disks: string[]) {
  try {
    return archiveExports(archive, { disks, maximumRead: SERVE_LIMITS.maxRead });
  } catch (error) {
    if (error instanceof RangeError) {
      throw new CliError(ExitCode.notFound, error.message.replace(/^The/, "the"));
    }
    throw error;
  }
}

function listen(
  address: NbdListenAddress,
  exports: ReturnType<typeof archiveExports>,
  context: CliContext,
  quiet: boolean,
): NbdServer {
  const log = (line: string) => {
    if (quiet && !/failed|dropped|refused/.test(line)) return;
    writeText(context.stderr, `${line}\n`).catch(() => {});
  };
  try {
    return NbdServer.listen(address, exports, {
      logger: log,
      maxConnections: SERVE_LIMITS.maxConnections,
      maxInFlightBytes: SERVE_LIMITS.maxInFlightBytes,
    });
  } catch (error) {
    if (error instanceof Deno.errors.AddrInUse) {
      const where = "path" in address ? address.path : `${address.hostname}:${address.port}`;
      throw new CliError(
        ExitCode.io,
        `cannot listen on ${where}: it is in use${
          "path" in address ? " (another server, or a stale socket to remove)" : ""
        }`,
      );
    }
    throw error;
  }
}

function describeIndex(archive: IndexedArchive): string {
  if (archive.indexSource === "embedded") return "seekable zstd, embedded index";
  if (archive.indexSource === "sidecar") return "plain VMA, sidecar index";
  return "plain VMA, mapped by its extent headers";
}

/**
 * Reads `--listen HOST:PORT` (`[::1]:10809` for IPv6).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseListen } from "./serve.ts";
 *
 * assert.deepEqual(parseListen("127.0.0.1:10809"), { hostname: "127.0.0.1", port: 10809 });
 * assert.deepEqual(parseListen("[::1]:0"), { hostname: "::1", port: 0 });
 * assert.throws(() => parseListen("localhost"), /HOST:PORT/);
 * ```
 */
export function parseListen(value: string): { hostname: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(value);
  const port = Number(match?.[3]);
  if (match === null || port > 65535) {
    throw new UsageError(`--listen must be HOST:PORT, not '${value}'`);
  }
  return { hostname: match[1] ?? match[2]!, port };
}

function untilAborted(signal: AbortSignal): Promise<void> {
  if (signal.aborted) return Promise.resolve();
  return new Promise((resolve) =>
    signal.addEventListener("abort", () => resolve(), { once: true })
  );
}
