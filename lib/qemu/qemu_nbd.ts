// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `qemu-nbd` child processes that serve an image on a private unix socket, and are always
 * stopped: on success, on error, and when the process exits.
 *
 * @module
 */
import type { ImageFormat } from "./image_format.ts";
import { spawnQemuTool } from "./spawn.ts";

/** A running `qemu-nbd`. */
export interface QemuNbdExport {
  /** `nbd+unix:///EXPORT?socket=PATH` of the export. */
  uri: string;
  /** Path of the unix socket. */
  socket: string;
  /** Name of the export (`disk`). */
  exportName: string;
  /** Stops qemu-nbd and removes its socket; safe to call more than once. */
  stop(): Promise<void>;
}

/** Options of {@linkcode serveImage}. */
export interface ServeImageOptions {
  /** Format of the image, passed to `qemu-nbd --format`. */
  format: ImageFormat;
  /** Serve read-only (default `true`). */
  readOnly?: boolean;
  /** Directory for the socket (default a new temporary directory). */
  socketDir?: string;
  /** Most milliseconds to wait for the socket (default 10 s). */
  timeoutMs?: number;
}

/** Children still running, and their private directories: cleaned up if the process exits. */
const running = new Map<Deno.ChildProcess, string | undefined>();
globalThis.addEventListener("unload", () => {
  for (const [child, dir] of running) {
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
    try {
      if (dir !== undefined) Deno.removeSync(dir, { recursive: true });
    } catch { /* already gone */ }
  }
});

/**
 * Starts `qemu-nbd --persistent` for `path` on a private unix socket and waits until it
 * listens. Fails with qemu-nbd's own message when it cannot open the image (an unknown or
 * corrupt format, a locked image).
 *
 * @example Serve a qcow2 image read-only
 * ```ts ignore
 * import { serveImage } from "./qemu_nbd.ts";
 *
 * const nbd = await serveImage("disk.qcow2", { format: "qcow2" });
 * try {
 *   console.log(nbd.uri); // nbd+unix:///disk?socket=/tmp/.../nbd.sock
 * } finally {
 *   await nbd.stop();
 * }
 * ```
 */
export async function serveImage(
  path: string,
  options: ServeImageOptions,
): Promise<QemuNbdExport> {
  const ownDir = options.socketDir === undefined;
  const dir = options.socketDir ?? await Deno.makeTempDir({ prefix: "vmabackup-nbd-" });
  const socket = `${dir}/nbd-${crypto.randomUUID().slice(0, 8)}.sock`;
  const exportName = "disk";
  const args = [
    `--format=${options.format}`,
    "--persistent",
    "--shared=4",
    `--socket=${socket}`,
    `--export-name=${exportName}`,
    "--allocation-depth",
    ...(options.readOnly === false ? ["--discard=unmap"] : ["--read-only"]),
    path,
  ];
  let child: Deno.ChildProcess;
  try {
    child = spawnQemuTool("qemu-nbd", args, { stdout: "null", stderr: "piped" });
  } catch (error) {
    if (ownDir) await Deno.remove(dir, { recursive: true }).catch(() => {});
    throw error;
  }
  running.set(child, ownDir ? dir : undefined);
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
    await Deno.remove(socket).catch(() => {});
    if (ownDir) await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  const deadline = Date.now() + (options.timeoutMs ?? 10_000);
  let exited = false;
  child.status.then(() => (exited = true));
  // Ready means a client gets the NBD greeting: qemu-nbd may create its socket and only then
  // find that it cannot open the image.
  while (!await greets(socket)) {
    if (exited || Date.now() > deadline) {
      await stop();
      const message = (await stderr.catch(() => "")).trim().split("\n").at(-1) ?? "";
      throw new Deno.errors.InvalidData(
        exited
          ? `Cannot serve ${path} as ${options.format}: ${message.replace(/^qemu-nbd: /, "")}`
          : `Cannot serve ${path}: qemu-nbd did not start listening in time`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return { uri: `nbd+unix:///${exportName}?socket=${socket}`, socket, exportName, stop };
}

/** True when a server on `socket` sends the 8-byte NBD magic. */
async function greets(socket: string): Promise<boolean> {
  let conn: Deno.UnixConn | undefined;
  try {
    conn = await Deno.connect({ transport: "unix", path: socket });
    const magic = new Uint8Array(8);
    for (let filled = 0; filled < magic.byteLength;) {
      const count = await conn.read(magic.subarray(filled));
      if (count === null) return false;
      filled += count;
    }
    return new TextDecoder().decode(magic) === "NBDMAGIC";
  } catch {
    return false;
  } finally {
    conn?.close();
  }
}
