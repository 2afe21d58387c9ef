// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `qemu-nbd` child processes that serve an image to one connection of this process over a
 * private unix socket, and are always stopped: on success, on error, when the process exits,
 * and when it dies.
 *
 * @module
 */
import type { ImageFormat } from "./image_format.ts";
import { spawnQemuTool } from "./spawn.ts";

/** A running `qemu-nbd` with its one connection. */
export interface QemuNbdExport<T> {
  /** The connection `connect` made: the only one the export takes. */
  connection: T;
  /** Stops qemu-nbd (if the connection's close did not already end it); safe to call twice. */
  stop(): Promise<void>;
}

/** Options of {@linkcode serveImage}. */
export interface ServeImageOptions {
  /** Format of the image, passed to `qemu-nbd --format`. */
  format: ImageFormat;
  /** Serve read-only (default `true`). */
  readOnly?: boolean;
  /** Most milliseconds to wait for the export (default 10 s). */
  timeoutMs?: number;
  /**
   * A persistent dirty bitmap of the image to export too, as metadata context
   * `qemu:dirty-bitmap:NAME` (`qemu-nbd --bitmap`).
   */
  bitmap?: string | undefined;
}

/** Children still running: stopped if the process exits normally. */
const running = new Set<Deno.ChildProcess>();
globalThis.addEventListener("unload", () => {
  for (const child of running) {
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
  }
});

/**
 * Serves `path` with a private `qemu-nbd` and makes its one connection: a unix socket
 * connection, retried until qemu-nbd listens, over which `connect` (given the export's
 * `nbd+unix://` URI and the open connection) runs the NBD handshake. Fails with qemu-nbd's
 * own message when it cannot open the image (an unknown or corrupt format, a locked image).
 * Needs `--allow-run=qemu-nbd`.
 *
 * The child cannot outlive this process: it runs without `--persistent`, so it exits when
 * that connection closes, and the kernel closes it when this process dies, even by SIGKILL.
 * Its socket and private directory are removed as soon as the socket is connected, and its
 * stdin is closed, so it never holds a pipe that feeds this process. (Only a SIGKILL while
 * qemu-nbd starts, before it listens, leaves it waiting, and its directory behind.)
 *
 * @example Read a qcow2 image over NBD
 * ```ts ignore
 * import { NbdClient } from "../protocols/nbd_client.ts";
 * import { serveImage } from "./qemu_nbd.ts";
 *
 * const nbd = await serveImage(
 *   "disk.qcow2",
 *   { format: "qcow2" },
 *   (uri, conn) => NbdClient.connect(uri, { conn }),
 * );
 * try {
 *   console.log(nbd.connection.info.size);
 * } finally {
 *   await nbd.connection.close(); // qemu-nbd exits
 *   await nbd.stop();
 * }
 * ```
 */
export async function serveImage<T>(
  path: string,
  options: ServeImageOptions,
  connect: (uri: string, conn: Deno.UnixConn) => Promise<T>,
): Promise<QemuNbdExport<T>> {
  const dir = await Deno.makeTempDir({ prefix: "vmabackup-nbd-" });
  const socket = `${dir}/nbd.sock`;
  const exportName = "disk";
  const args = [
    `--format=${options.format}`,
    `--socket=${socket}`,
    `--export-name=${exportName}`,
    "--allocation-depth",
    ...(options.bitmap === undefined ? [] : [`--bitmap=${options.bitmap}`]),
    ...(options.readOnly === false ? ["--discard=unmap"] : ["--read-only"]),
    path,
  ];
  const removeDir = () => Deno.remove(dir, { recursive: true }).catch(() => {});
  let child: Deno.ChildProcess;
  try {
    child = spawnQemuTool("qemu-nbd", args, { stdin: "null", stdout: "null", stderr: "piped" });
  } catch (error) {
    await removeDir();
    throw error;
  }
  running.add(child);
  const stderr = new Response(child.stderr).text();
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    try {
      child.kill("SIGTERM");
    } catch { /* already exited */ }
    await child.status;
    running.delete(child);
    await stderr.catch(() => {});
    await removeDir();
  };
  let exited = false;
  child.status.then(() => (exited = true));
  const failed = async (error: unknown, otherwise: string) => {
    const died = exited;
    await stop();
    const message = (await stderr.catch(() => "")).trim().split("\n").at(-1) ?? "";
    return new Deno.errors.InvalidData(
      died
        ? `Cannot serve ${path} as ${options.format}: ${message.replace(/^qemu-nbd: /, "")}`
        : `Cannot serve ${path}: ${otherwise}`,
      { cause: error },
    );
  };
  const deadline = Date.now() + (options.timeoutMs ?? 10_000);
  let conn: Deno.UnixConn;
  for (;;) {
    try {
      conn = await Deno.connect({ transport: "unix", path: socket });
      break;
    } catch (error) {
      if (exited || Date.now() > deadline) {
        throw await failed(error, "qemu-nbd did not start listening in time");
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  await removeDir(); // connected: nothing else may connect, and nothing is left behind
  try {
    const connection = await connect(`nbd+unix:///${exportName}?socket=${socket}`, conn);
    return { connection, stop };
  } catch (error) {
    // qemu-nbd could not open the image and closed the connection, or refused the handshake.
    await new Promise((resolve) => setTimeout(resolve, 50)); // let its exit be seen
    throw await failed(error, error instanceof Error ? error.message : String(error));
  }
}
