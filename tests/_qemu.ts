// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A real QEMU 7.2 VM for tests: q35 under TCG (no KVM, no guest OS), disks made with qemu-img
 * (virtio-blk, or attached the way Proxmox VE attaches them: scsi-hd on virtio-scsi with an
 * iothread, `-drive if=none,id=drive-scsi0`, a throttle filter, the EFI vars flash), two QMP
 * monitors (one for the test, one for the tool), and guest writes, write-zeroes and discards
 * through the device's BlockBackend with HMP qemu-io, the same path as guest I/O.
 */
import { QmpClient } from "../lib/protocols/qmp_client.ts";
import { withTempDir } from "./_cli.ts";
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
  /** The guest device's id: `vda`, `scsi0`, `efidisk0`. */
  id: string;
  size: number;
  format?: "qcow2" | "raw";
  /** Data written before the VM starts: [offset, bytes]. */
  data?: [number, Uint8Array][];
  /**
   * An image of `format` to start from, copied (a benchmark's prepared disk); `data` then only
   * describes its content for the model.
   */
  image?: string;
  /**
   * The guest device: virtio-blk (default), `scsi`: scsi-hd on the VM's virtio-scsi controller
   * (as Proxmox attaches scsiN), `pflash`: the EFI variable store (Proxmox's efidisk0), with a
   * code flash of HLT instructions in front of it so the CPU halts at once.
   */
  bus?: "virtio" | "scsi" | "pflash";
  /**
   * `blockdev` (default): `-blockdev` file and format nodes named `<id>-file` and `<id>-node`;
   * `drive`: `-drive if=none,id=drive-<id>,...` as Proxmox starts VMs, with QEMU's generated
   * `#blockNNN` node names.
   */
  attach?: "blockdev" | "drive";
  /**
   * A `throttle` filter node named `drive-<id>` on top, in throttle group `throttle-drive-<id>`
   * (the `-blockdev` graph of Proxmox VE 9); the format and file nodes get generated names.
   */
  throttle?: boolean;
}

/** Options of {@linkcode startVm}. */
export interface VmOptions {
  /** Run the virtio-scsi controller in an iothread, as Proxmox does with `iothread=1`. */
  iothread?: boolean;
  /** More QEMU arguments, for example drives that are not part of the model. */
  extraArgs?: string[];
}

/** The result of one HMP qemu-io command. */
export interface GuestIo {
  /** Milliseconds the human-monitor-command round trip took (the guest-visible latency). */
  ms: number;
}

/** A running test VM. */
export interface TestVm {
  dir: string;
  /** The test's own QMP connection (guest I/O goes through a third one). */
  qmp: QmpClient;
  /** A second monitor socket, for the tool under test. */
  toolQmp: string;
  /** What each disk holds now, as far as the test wrote it (the model). */
  model: Map<string, Uint8Array>;
  /** A guest write of a byte pattern (qemu-io write -P), applied to the model too. */
  write(id: string, offset: number, length: number, pattern: number): Promise<GuestIo>;
  /**
   * A guest write of zeros (qemu-io `write -z`, what BLKZEROOUT and many discards become);
   * `unmap` also lets QEMU deallocate (`write -z -u`). Applied to the model.
   */
  writeZeroes(id: string, offset: number, length: number, unmap?: boolean): Promise<GuestIo>;
  /**
   * A guest discard (qemu-io `discard`, what fstrim sends) of whole 64 KiB clusters. The disks
   * are opened with `discard=unmap`, so it usually reads back as zeros, but a discard is only
   * a hint (QEMU's own backup filter drops them): the model is zeroed and
   * {@linkcode TestVm.difference} also accepts the content from before. On a device in an
   * iothread it is a `write -z -u` instead (see {@linkcode TestVm.io}).
   */
  discard(id: string, offset: number, length: number): Promise<GuestIo>;
  /**
   * The first offset where `bytes` differs from what disk `id` holds per the model, or -1;
   * a discarded cluster may hold zeros or what it held before the discard.
   */
  difference(id: string, bytes: Uint8Array): number;
  /**
   * Any qemu-io command on disk `id`'s guest device, for example `aio_write -P 7 0 64k`
   * (which returns at once; its result line comes on {@linkcode TestVm.output}). Not
   * applied to the model. On a device in an iothread, `write ...` runs as `aio_write ...`
   * and waits for its completion line: a synchronous HMP write there that has to wait
   * kills QEMU 7.2.
   */
  io(id: string, command: string): Promise<GuestIo>;
  /** Node names of the block graph, sorted. */
  nodes(): Promise<string[]>;
  /** The VM's run state (for example "running"). */
  status(): Promise<string>;
  /** What QEMU printed on stdout and stderr so far (HMP qemu-io output may land there). */
  output(): string;
  /** The named dirty bitmaps of each node that has any: node name → bitmap names, sorted. */
  bitmaps(): Promise<Map<string, string[]>>;
  /**
   * Stops QEMU (with `quit`, or with SIGKILL as a crash does: persistent bitmaps are then
   * left `in-use`) and starts it again on the same images, with `addDisks` attached too.
   * The model stays: before a kill, the guest's writes are flushed.
   */
  restart(options?: { kill?: boolean; addDisks?: DiskSpec[] }): Promise<void>;
  /**
   * Quits QEMU and returns each disk's content read back with qemu-img (none with
   * `readBack: false`, for big disks whose content does not matter).
   */
  stop(options?: { readBack?: boolean }): Promise<Map<string, Uint8Array>>;
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

/** The QOM path HMP `qemu-io -d` takes for a disk's guest device. */
function devicePath(disk: DiskSpec): string {
  if (disk.bus === "pflash") return "/machine/system.flash1";
  if (disk.bus === "scsi") return `/machine/peripheral/${disk.id}`;
  return `/machine/peripheral/${disk.id}/virtio-backend`;
}

/** The QEMU arguments that attach one disk whose image is `image`. */
function diskArgs(disk: DiskSpec, image: string, format: string): string[] {
  const bus = disk.bus ?? "virtio";
  const device = bus === "scsi"
    ? [
      "-device",
      `scsi-hd,bus=virtioscsi0.0,channel=0,scsi-id=0,lun=${disk.id.replace(/\D/g, "") || 0}`,
    ]
    : bus === "virtio"
    ? ["-device", `virtio-blk-pci`]
    : [];
  const withDrive = (drive: string) =>
    device.length === 0 ? [] : ["-device", `${device[1]},drive=${drive},id=${disk.id}`];
  if (disk.attach === "drive") {
    // As qemu-server writes it (cache=none is O_DIRECT; writeback here keeps tmpfs usable).
    const common =
      `file=${image},id=drive-${disk.id},format=${format},discard=on,detect-zeroes=unmap`;
    if (bus === "pflash") return ["-drive", `if=pflash,unit=1,${common}`];
    return ["-drive", `if=none,${common},aio=threads`, ...withDrive(`drive-${disk.id}`)];
  }
  const file = { driver: "file", filename: image, discard: "unmap" };
  const formatNode = { driver: format, discard: "unmap", file };
  const top = disk.throttle
    ? {
      driver: "throttle",
      "node-name": `drive-${disk.id}`,
      "throttle-group": `throttle-drive-${disk.id}`,
      file: formatNode,
    }
    : {
      ...formatNode,
      "node-name": `${disk.id}-node`,
      file: { ...file, "node-name": `${disk.id}-file` },
    };
  const node = top["node-name"];
  return [
    ...(disk.throttle ? ["-object", `throttle-group,id=throttle-drive-${disk.id}`] : []),
    "-blockdev",
    JSON.stringify(top),
    ...(bus === "pflash" ? ["-machine", `pflash1=${node}`] : withDrive(node)),
  ];
}

/** The test VMs' machine: no devices but the disks, no display, TCG, 64 MiB. */
const MACHINE_ARGS = [
  "-nodefaults",
  "-display",
  "none",
  "-machine",
  "q35",
  "-accel",
  "tcg",
  "-m",
  "64",
];

/**
 * Runs `fn` with a VM of `disks` and a temporary directory, then stops the VM (also when `fn`
 * stopped it already, or failed) and removes the directory.
 */
export async function withVm(
  disks: DiskSpec[],
  fn: (vm: TestVm, dir: string) => Promise<void>,
  options: VmOptions = {},
): Promise<void> {
  const vm = await startVm(disks, options);
  await withTempDir(async (dir) => {
    try {
      await fn(vm, dir);
    } finally {
      await vm.stop().catch(() => {});
    }
  });
}

/** Starts a VM with `disks` in a new temporary directory. */
export async function startVm(disks: DiskSpec[], options: VmOptions = {}): Promise<TestVm> {
  const dir = await Deno.makeTempDir({ prefix: "vmabackup-vm-" });
  const model = new Map<string, Uint8Array>();
  const args = [
    ...MACHINE_ARGS,
    "-qmp",
    `unix:${dir}/test.qmp,server=on,wait=off`,
    "-qmp",
    `unix:${dir}/tool.qmp,server=on,wait=off`,
    // Guest I/O has its own monitor: a write that waits (push mode, stalled sink) blocks it.
    "-qmp",
    `unix:${dir}/io.qmp,server=on,wait=off`,
  ];
  if (disks.some((disk) => disk.bus === "scsi")) {
    if (options.iothread) args.push("-object", "iothread,id=iothread-virtioscsi0");
    const iothread = options.iothread ? ",iothread=iothread-virtioscsi0" : "";
    args.push("-device", `virtio-scsi-pci,id=virtioscsi0${iothread}`);
  }
  // The firmware flash: 2 MiB of HLT, so the CPU stops at the reset vector and stays idle.
  // Without it SeaBIOS runs and polls the disks, and a TCG vCPU that polls a disk whose I/O
  // waits (push mode with a stalled sink) starves QEMU's main loop and its monitors.
  const code = `${dir}/code.fd`;
  await Deno.writeFile(code, new Uint8Array(2 << 20).fill(0xf4));
  if (disks.some((disk) => disk.bus === "pflash" && disk.attach === "drive")) {
    args.push("-drive", `if=pflash,unit=0,format=raw,readonly=on,file=${code}`);
  } else {
    args.push(
      "-blockdev",
      `driver=file,filename=${code},node-name=pflash0-code,read-only=on`,
      "-machine",
      "pflash0=pflash0-code",
    );
  }
  const addDisks = async (added: DiskSpec[]) => {
    for (const disk of added) {
      const format = disk.format ?? "qcow2";
      const image = `${dir}/${disk.id}.${format}`;
      const content = new Uint8Array(disk.size);
      for (const [offset, bytes] of disk.data ?? []) content.set(bytes, offset);
      if (disk.image !== undefined) {
        await Deno.copyFile(disk.image, image);
      } else {
        await Deno.writeFile(`${dir}/${disk.id}.init.raw`, content);
        await convertImage(`${dir}/${disk.id}.init.raw`, format, image);
        await Deno.remove(`${dir}/${disk.id}.init.raw`);
      }
      model.set(disk.id, content);
      args.push(...diskArgs(disk, image, format));
    }
  };
  await addDisks(disks);
  args.push(...options.extraArgs ?? []);
  let printed = "";
  let process: Deno.ChildProcess;
  let collected: Promise<unknown>;
  let qmp!: QmpClient;
  let ioQmp!: QmpClient;
  const launch = async () => {
    await Deno.remove(`${dir}/io.qmp`).catch(() => {});
    process = new Deno.Command("qemu-system-x86_64", { args, stdout: "piped", stderr: "piped" })
      .spawn();
    const collect = (stream: ReadableStream<Uint8Array>) =>
      stream.pipeThrough(new TextDecoderStream()).pipeTo(
        new WritableStream({ write: (text) => void (printed += text) }),
      );
    collected = Promise.all([collect(process.stdout), collect(process.stderr)]);
    try {
      for (let i = 0; !(await Deno.stat(`${dir}/io.qmp`).then(() => true, () => false)); i++) {
        if (i === 200 || printed.includes("qemu-system-x86_64:")) {
          throw new Error("QEMU did not open its QMP socket within 5 s");
        }
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
      qmp = await QmpClient.connect(`${dir}/test.qmp`);
      ioQmp = await QmpClient.connect(`${dir}/io.qmp`, { timeoutMs: 600_000 });
    } catch (error) {
      try {
        process.kill();
      } catch { /* it exited on its own */ }
      await Promise.all([process.status, collected]);
      await Deno.remove(dir, { recursive: true });
      throw new Error(`${error instanceof Error ? error.message : error}: ${printed.trim()}`);
    }
  };
  await launch();
  let stopped = false;
  const quit = async (kill = false) => {
    if (kill) {
      process.kill("SIGKILL");
    } else {
      await qmp.execute("quit").catch(() => {});
    }
    qmp.close();
    ioQmp.close();
    await process.status;
    await collected;
  };
  const stop = async () => {
    if (!stopped) {
      stopped = true;
      await quit();
    }
  };
  const attached = [...disks];
  const specs = new Map(disks.map((disk) => [disk.id, disk]));
  /** Per disk: discarded clusters and what they held before, kept up to date by later writes. */
  const discarded = new Map(disks.map((disk) => [disk.id, new Map<number, Uint8Array>()]));
  const changeModel = (id: string, offset: number, length: number, value: number) => {
    model.get(id)!.fill(value, offset, offset + length);
    for (const [cluster, before] of discarded.get(id)!) {
      const start = cluster * 65536;
      const from = Math.max(offset, start);
      const to = Math.min(offset + length, start + before.byteLength);
      if (from < to) before.fill(value, from - start, to - start);
    }
  };
  /** Runs one qemu-io command on a disk's guest device; output of a failure throws. */
  /** Disks whose device runs in an iothread. */
  const inIothread = (disk: DiskSpec) => options.iothread === true && disk.bus === "scsi";
  const io = async (id: string, command: string): Promise<GuestIo> => {
    const disk = specs.get(id);
    if (disk === undefined) throw new Error(`the test VM has no disk ${id}`);
    const hmp = (line: string) =>
      ioQmp.humanMonitorCommand(`qemu-io -d ${devicePath(disk)} "${line}"`);
    const started = performance.now();
    const printedBefore = printed.length;
    let answer: string;
    if (inIothread(disk) && command.startsWith("write ")) {
      // A synchronous HMP write to an iothread's device that has to wait (for a push
      // backup's copy) trips QEMU 7.2's assertion in aio_poll and kills it, and aio_flush
      // (a drain of everything) can deadlock with the backup: submit it as aio_write, as a
      // guest queues a request, and wait for its line on QEMU's stdout.
      const offset = command.trim().split(/\s+/).at(-2);
      answer = await hmp(`aio_${command}`);
      const done = new RegExp(`wrote \\d+/\\d+ bytes at offset ${offset}\\n|failed`);
      for (let waited = 0; !done.test(printed.slice(printedBefore)); waited += 2) {
        if (waited > 120_000) throw new Error(`guest ${command} did not complete in 120 s`);
        await new Promise((resolve) => setTimeout(resolve, 2));
      }
      answer += printed.slice(printedBefore);
    } else {
      answer = await hmp(command);
    }
    const ms = performance.now() - started;
    // The output comes in the answer or, when the request yielded, on QEMU's stdout.
    if (/failed|error|cannot|invalid/i.test(answer)) {
      throw new Error(`guest ${command} failed: ${answer.trim()}`);
    }
    return { ms };
  };
  return {
    dir,
    get qmp() {
      return qmp;
    },
    toolQmp: `${dir}/tool.qmp`,
    model,
    async write(id, offset, length, pattern) {
      const result = await io(id, `write -P ${pattern} ${offset} ${length}`);
      changeModel(id, offset, length, pattern);
      return result;
    },
    async writeZeroes(id, offset, length, unmap = false) {
      const result = await io(id, `write -z${unmap ? " -u" : ""} ${offset} ${length}`);
      changeModel(id, offset, length, 0);
      return result;
    },
    async discard(id, offset, length) {
      if (offset % 65536 !== 0 || length % 65536 !== 0) {
        throw new RangeError("test discards must be 64 KiB aligned to read back as zeros");
      }
      if (inIothread(specs.get(id)!)) {
        // No asynchronous discard in HMP qemu-io, and a synchronous one may wait (see io):
        // a write of zeros that may unmap is what the guest gets instead.
        const result = await io(id, `write -z -u ${offset} ${length}`);
        changeModel(id, offset, length, 0);
        return result;
      }
      const result = await io(id, `discard ${offset} ${length}`);
      const content = model.get(id)!;
      for (let at = offset; at < offset + length; at += 65536) {
        const cluster = at / 65536;
        const clusters = discarded.get(id)!;
        if (!clusters.has(cluster)) clusters.set(cluster, content.slice(at, at + 65536));
      }
      content.fill(0, offset, offset + length);
      return result;
    },
    io,
    difference(id, bytes) {
      const expected = model.get(id)!;
      if (bytes.byteLength !== expected.byteLength) {
        return Math.min(bytes.byteLength, expected.byteLength);
      }
      const clusters = discarded.get(id)!;
      for (let start = 0; start < bytes.byteLength; start += 65536) {
        const got = bytes.subarray(start, start + 65536);
        const at = firstDifference(got, expected.subarray(start, start + 65536));
        if (at < 0) continue;
        const before = clusters.get(start / 65536);
        if (before === undefined || firstDifference(got, before) >= 0) return start + at;
      }
      return -1;
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
    output: () => printed,
    async bitmaps() {
      const nodes = await qmp.execute("query-named-block-nodes", { flat: true }) as {
        "node-name": string;
        "dirty-bitmaps"?: { name?: string }[];
      }[];
      const found = new Map<string, string[]>();
      for (const node of nodes) {
        const names = (node["dirty-bitmaps"] ?? []).flatMap((bitmap) => bitmap.name ?? []);
        if (names.length > 0) found.set(node["node-name"], names.sort());
      }
      return found;
    },
    async restart(options = {}) {
      if (options.kill) {
        for (const id of specs.keys()) await io(id, "flush");
      }
      await quit(options.kill);
      const added = options.addDisks ?? [];
      await addDisks(added);
      for (const disk of added) {
        specs.set(disk.id, disk);
        discarded.set(disk.id, new Map());
        attached.push(disk);
      }
      await launch();
    },
    async stop(options = {}) {
      await stop();
      const contents = new Map<string, Uint8Array>();
      for (const disk of options.readBack === false ? [] : attached) {
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
    ...MACHINE_ARGS,
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
