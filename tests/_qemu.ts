// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A real QEMU 7.2 VM for tests: q35 under TCG (no KVM, no guest OS), virtio-blk disks made
 * with qemu-img, two QMP monitors (one for the test, one for the tool), and guest writes
 * through the device's BlockBackend with HMP qemu-io, the same path as guest I/O.
 */
import { QmpClient } from "../lib/protocols/qmp_client.ts";
import { randomBytes } from "./_utils.ts";

/** True when QEMU and qemu-img can run here. */
export const QEMU = await (async () => {
  try {
    for (const program of ["qemu-system-x86_64", "qemu-img", "qemu-nbd"]) {
      await new Deno.Command(program, { args: ["--version"], stdout: "null", stderr: "null" })
        .output();
    }
    return true;
  } catch {
    return false;
  }
})();

/**
 * `Deno.test` for tests that need QEMU: skipped (and saying so) on a machine without it,
 * failing instead under CI=true, where .ci/run installs it.
 */
export function qemuTest(name: string, fn: () => Promise<void>): void {
  const ci = Deno.env.get("CI") === "true";
  if (!QEMU && !ci) {
    Deno.test({ name: `${name} (skipped: QEMU is not installed)`, ignore: true, fn });
    return;
  }
  Deno.test(name, async () => {
    if (!QEMU) {
      throw new Error(
        "QEMU is required under CI=true (apt-get install qemu-utils qemu-system-x86)",
      );
    }
    await fn();
  });
}

/** A disk of the test VM. */
export interface DiskSpec {
  id: string;
  size: number;
  format?: "qcow2" | "raw";
  /** Data written before the VM starts: [offset, bytes]. */
  data?: [number, Uint8Array][];
}

/** A running test VM. */
export interface TestVm {
  dir: string;
  /** The test's own QMP connection. */
  qmp: QmpClient;
  /** A second monitor socket, for the tool under test. */
  toolQmp: string;
  /** What each disk holds now, as far as the test wrote it (the model). */
  model: Map<string, Uint8Array>;
  /** A guest write of a byte pattern (qemu-io write -P), applied to the model too. */
  write(id: string, offset: number, length: number, pattern: number): Promise<void>;
  /** Node names of the block graph, sorted. */
  nodes(): Promise<string[]>;
  /** The VM's run state (for example "running"). */
  status(): Promise<string>;
  /** Quits QEMU and returns each disk's content read back with qemu-img. */
  stop(): Promise<Map<string, Uint8Array>>;
}

/** Runs a program to completion; its output, or an error with its stderr. */
export async function run(program: string, args: string[]): Promise<Uint8Array> {
  const { code, stdout, stderr } = await new Deno.Command(program, { args }).output();
  if (code !== 0) throw new Error(`${program} failed: ${new TextDecoder().decode(stderr)}`);
  return stdout;
}

/** Random content with zero runs: realistic enough, and compressible in parts. */
export function diskContent(size: number, seed: number): [number, Uint8Array][] {
  const pieces: [number, Uint8Array][] = [];
  for (let offset = 0, i = 0; offset < size; offset += 4 << 20, i++) {
    const length = Math.min(1 << 20, size - offset);
    pieces.push([
      offset,
      i % 3 === 2 ? new Uint8Array(length).fill(0x5d) : randomBytes(length, seed + i),
    ]);
  }
  return pieces;
}

/** Starts a VM with `disks` in a new temporary directory. */
export async function startVm(disks: DiskSpec[]): Promise<TestVm> {
  const dir = await Deno.makeTempDir({ prefix: "vmabackup-vm-" });
  const model = new Map<string, Uint8Array>();
  const args = [
    "-nodefaults",
    "-display",
    "none",
    "-machine",
    "q35",
    "-accel",
    "tcg",
    "-m",
    "64",
    "-qmp",
    `unix:${dir}/test.qmp,server=on,wait=off`,
    "-qmp",
    `unix:${dir}/tool.qmp,server=on,wait=off`,
  ];
  for (const disk of disks) {
    const format = disk.format ?? "qcow2";
    const image = `${dir}/${disk.id}.${format}`;
    const content = new Uint8Array(disk.size);
    for (const [offset, bytes] of disk.data ?? []) content.set(bytes, offset);
    await Deno.writeFile(`${dir}/${disk.id}.init.raw`, content);
    await convertImage(`${dir}/${disk.id}.init.raw`, format, image);
    await Deno.remove(`${dir}/${disk.id}.init.raw`);
    model.set(disk.id, content);
    args.push(
      "-blockdev",
      `driver=file,filename=${image},node-name=${disk.id}-file`,
      "-blockdev",
      `driver=${format},file=${disk.id}-file,node-name=${disk.id}-node`,
      "-device",
      `virtio-blk-pci,drive=${disk.id}-node,id=${disk.id}`,
    );
  }
  const process = new Deno.Command("qemu-system-x86_64", { args, stdout: "piped", stderr: "piped" })
    .spawn();
  const output = new Response(process.stdout).text();
  const errors = new Response(process.stderr).text();
  let qmp: QmpClient;
  try {
    for (let i = 0; !(await Deno.stat(`${dir}/tool.qmp`).then(() => true, () => false)); i++) {
      if (i === 200) throw new Error("QEMU did not open its QMP socket within 5 s");
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    qmp = await QmpClient.connect(`${dir}/test.qmp`);
  } catch (error) {
    try {
      process.kill();
    } catch { /* it exited on its own */ }
    await Promise.all([process.status, output]);
    await Deno.remove(dir, { recursive: true });
    throw new Error(`${error instanceof Error ? error.message : error}: ${(await errors).trim()}`);
  }
  let stopped = false;
  const stop = async () => {
    if (!stopped) {
      stopped = true;
      await qmp.execute("quit").catch(() => {});
      qmp.close();
      await process.status;
      await output;
      await errors;
    }
  };
  return {
    dir,
    qmp,
    toolQmp: `${dir}/tool.qmp`,
    model,
    async write(id, offset, length, pattern) {
      const line =
        `qemu-io -d /machine/peripheral/${id}/virtio-backend "write -P ${pattern} ${offset} ${length}"`;
      const answer = await qmp.humanMonitorCommand(line);
      if (answer.trim() !== "") throw new Error(`guest write failed: ${answer}`);
      model.get(id)!.fill(pattern, offset, offset + length);
    },
    async nodes() {
      const nodes = await qmp.execute("query-named-block-nodes", { flat: true }) as {
        "node-name": string;
      }[];
      return nodes.map((node) => node["node-name"]).sort();
    },
    async status() {
      return ((await qmp.execute("query-status")) as { status: string }).status;
    },
    async stop() {
      await stop();
      const contents = new Map<string, Uint8Array>();
      for (const disk of disks) {
        const format = disk.format ?? "qcow2";
        await run("qemu-img", [
          "convert",
          "-q",
          "-f",
          format,
          "-O",
          "raw",
          `${dir}/${disk.id}.${format}`,
          `${dir}/${disk.id}.out.raw`,
        ]);
        contents.set(disk.id, await Deno.readFile(`${dir}/${disk.id}.out.raw`));
      }
      await Deno.remove(dir, { recursive: true });
      return contents;
    },
  };
}

/** Converts a raw image to `format` with qemu-img (vpc at the exact size). */
export async function convertImage(raw: string, format: string, target: string): Promise<void> {
  const options = format === "vpc" ? ["-o", "force_size=on"] : [];
  await run("qemu-img", ["convert", "-q", "-f", "raw", "-O", format, ...options, raw, target]);
}

/** The first offset where two byte arrays differ, or -1. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.byteLength !== b.byteLength) return Math.min(a.byteLength, b.byteLength);
  for (let i = 0; i < a.byteLength; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/** A disk of a VM started on an existing image (a live restore's overlay). */
export interface ImageDiskSpec {
  /** Device id (`-device virtio-blk-pci,id=ID`). */
  id: string;
  /** The qcow2 image to start on. */
  image: string;
  /**
   * How the disk is set up: `drive` (`-drive`; QEMU opens the backing file itself),
   * `blockdev` (`-blockdev` file and qcow2 nodes), or `blockdev-nbd` (also an explicit
   * `-blockdev driver=nbd` backing node, as next-wave.md §3.3 does).
   */
  style: "drive" | "blockdev" | "blockdev-nbd";
  /** For `blockdev-nbd`: the served export. */
  nbd?: { socket: string; export: string };
}

/** A VM started paused (`-S`) that waits for its tool monitor before it opens its disks. */
export interface PausedVm {
  dir: string;
  /** The monitor QEMU waits for (`wait=on`): the tool under test connects here first. */
  toolQmp: string;
  /** Connects the test's own monitor (after the tool connected). */
  connect(): Promise<QmpClient>;
  /** A guest write of a byte pattern through the device (HMP qemu-io). */
  write(id: string, offset: number, length: number, pattern: number): Promise<void>;
  /** Node names and drivers of the block graph. */
  nodes(): Promise<{ name: string; driver: string; file: string }[]>;
  /** The VM's run state. */
  status(): Promise<string>;
  /** Quits QEMU (kills it if it does not answer) and removes the directory. */
  stop(): Promise<string>;
}

/** Starts a VM paused on `disks`, waiting for a connection to `toolQmp` first. */
export function startPausedVm(disks: ImageDiskSpec[]): PausedVm {
  const dir = Deno.makeTempDirSync({ prefix: "vmabackup-restore-vm-" });
  const args = [
    "-nodefaults",
    "-display",
    "none",
    "-machine",
    "q35",
    "-accel",
    "tcg",
    "-m",
    "64",
    "-S",
    "-qmp",
    `unix:${dir}/test.qmp,server=on,wait=off`,
    "-qmp",
    `unix:${dir}/tool.qmp,server=on,wait=on`,
  ];
  for (const disk of disks) {
    if (disk.style === "drive") {
      args.push("-drive", `file=${disk.image},format=qcow2,if=none,id=${disk.id}-drive`);
      args.push("-device", `virtio-blk-pci,drive=${disk.id}-drive,id=${disk.id}`);
      continue;
    }
    args.push("-blockdev", `driver=file,filename=${disk.image},node-name=${disk.id}-file`);
    let backing = "";
    if (disk.style === "blockdev-nbd") {
      const { socket, export: name } = disk.nbd!;
      args.push(
        "-blockdev",
        `driver=nbd,node-name=${disk.id}-nbd,server.type=unix,server.path=${socket},export=${name},read-only=on`,
      );
      backing = `,backing=${disk.id}-nbd`;
    }
    args.push(
      "-blockdev",
      `driver=qcow2,file=${disk.id}-file,node-name=${disk.id}-node${backing}`,
      "-device",
      `virtio-blk-pci,drive=${disk.id}-node,id=${disk.id}`,
    );
  }
  const process = new Deno.Command("qemu-system-x86_64", { args, stdout: "null", stderr: "piped" })
    .spawn();
  const errors = new Response(process.stderr).text();
  let qmp: QmpClient | undefined;
  const connect = async () => {
    qmp ??= await connectQmp(`${dir}/test.qmp`);
    return qmp;
  };
  let stopped: Promise<string> | undefined;
  return {
    dir,
    toolQmp: `${dir}/tool.qmp`,
    connect,
    async write(id, offset, length, pattern) {
      const line =
        `qemu-io -d /machine/peripheral/${id}/virtio-backend "write -P ${pattern} ${offset} ${length}"`;
      const answer = await (await connect()).humanMonitorCommand(line);
      if (answer.trim() !== "") throw new Error(`guest write failed: ${answer}`);
    },
    async nodes() {
      const nodes = await (await connect()).execute("query-named-block-nodes", { flat: true }) as {
        "node-name": string;
        drv: string;
        file: string;
      }[];
      return nodes.map((node) => ({ name: node["node-name"], driver: node.drv, file: node.file }));
    },
    async status() {
      return ((await (await connect()).execute("query-status")) as { status: string }).status;
    },
    stop() {
      stopped ??= (async () => {
        const quit = qmp?.execute("quit").catch(() => {});
        const timer = setTimeout(() => {
          try {
            process.kill("SIGKILL");
          } catch { /* gone */ }
        }, qmp === undefined ? 0 : 5000);
        await quit;
        await process.status;
        clearTimeout(timer);
        qmp?.close();
        await Deno.remove(dir, { recursive: true }).catch(() => {});
        return await errors;
      })();
      return stopped;
    },
  };
}

/** Connects to a QMP socket once it exists (QEMU creates it as it starts). */
export async function connectQmp(path: string): Promise<QmpClient> {
  for (let i = 0;; i++) {
    try {
      return await QmpClient.connect(path);
    } catch (error) {
      if (i === 400 || !(error instanceof Deno.errors.NotFound)) throw error;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }
}
