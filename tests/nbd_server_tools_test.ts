// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The NBD server against real clients: qemu-img, qemu-io (QEMU's NBD client), nbdinfo and
 * nbdcopy. Each test skips with a note when its tool is missing, unless CI=true, where it
 * fails instead.
 */
import assert from "node:assert/strict";
import { NbdMemoryExport } from "../lib/protocols/nbd_memory_export.ts";
import { NbdCmd, NbdCmdFlag, NbdOpt } from "../lib/protocols/nbd_protocol.ts";
import { NbdServer, type NbdTraceEvent } from "../lib/protocols/nbd_server.ts";
import { randomBytes } from "./_utils.ts";

const MiB = 1 << 20;
const IN_CI = Deno.env.get("CI") === "true";

function installed(tool: string): boolean {
  try {
    const command = new Deno.Command(tool, { args: ["--version"], stdout: "null", stderr: "null" });
    return command.outputSync().success;
  } catch {
    return false;
  }
}

/** A test that needs `tools`: skipped with a note without them, failing under CI=true. */
function toolTest(name: string, tools: string[], fn: () => Promise<void>): void {
  const missing = tools.filter((tool) => !installed(tool));
  if (missing.length > 0 && !IN_CI) {
    Deno.test({ name: `${name} (skipped: ${missing.join(", ")} not installed)`, ignore: true, fn });
    return;
  }
  Deno.test(name, async () => {
    if (missing.length > 0) throw new Error(`CI=true but ${missing.join(", ")} are missing`);
    await fn();
  });
}

async function run(tool: string, args: string[]): Promise<string> {
  const output = await new Deno.Command(tool, { args, stdout: "piped", stderr: "piped" }).output();
  const stdout = new TextDecoder().decode(output.stdout);
  if (!output.success) {
    throw new Error(`${tool} ${args.join(" ")} failed: ${new TextDecoder().decode(output.stderr)}`);
  }
  return stdout;
}

/**
 * A 24 MiB disk: random data in the first MiB, a zero run to 8 MiB, a 64 KiB pattern, an
 * all-zero 64 KiB cluster between two data clusters, and data in the last 4 KiB.
 */
function testDisk(): Uint8Array {
  const disk = new Uint8Array(24 * MiB);
  disk.set(randomBytes(MiB, 42), 0);
  disk.fill(0x22, 8 * MiB, 8 * MiB + 65536);
  disk.fill(0x44, 8 * MiB + 2 * 65536, 8 * MiB + 3 * 65536); // a zero cluster before it
  disk.fill(0x33, disk.byteLength - 4096);
  return disk;
}

/** The zero runs of `disk` at 4 KiB granularity, as [offset, length]. */
function zeroRuns(disk: Uint8Array): [number, number][] {
  const runs: [number, number][] = [];
  for (let at = 0; at < disk.byteLength; at += 4096) {
    if (!disk.subarray(at, at + 4096).every((byte) => byte === 0)) continue;
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] === at) last[1] += 4096;
    else runs.push([at, 4096]);
  }
  return runs;
}

interface Served {
  dir: string;
  server: NbdServer;
  disk: Uint8Array;
  raw: string;
  trace: NbdTraceEvent[];
  lines: string[];
}

/** Serves testDisk() read-only as "drive-scsi0" (and a small "drive-scsi1") on a unix socket. */
async function withServer(fn: (served: Served) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "nbdsrv" });
  const disk = testDisk();
  const raw = `${dir}/original.raw`;
  await Deno.writeFile(raw, disk);
  const trace: NbdTraceEvent[] = [];
  const lines: string[] = [];
  const server = NbdServer.listen({ path: `${dir}/nbd.sock` }, {
    "drive-scsi0": new NbdMemoryExport(disk, { readOnly: true, description: "system disk" }),
    "drive-scsi1": new NbdMemoryExport(MiB),
  }, { trace: (event) => trace.push(event), logger: (line) => lines.push(line) });
  try {
    await fn({ dir, server, disk, raw, trace, lines });
  } finally {
    await server.close();
    await Deno.remove(dir, { recursive: true });
  }
}

const requests = (trace: NbdTraceEvent[]) =>
  trace.flatMap((event) => event.type === "request" ? [event.request] : []);

toolTest("qemu-img compare finds the export identical to the original", ["qemu-img"], async () => {
  await withServer(async ({ server, raw, trace }) => {
    const out = await run("qemu-img", [
      "compare",
      "-f",
      "raw",
      "-F",
      "raw",
      server.uri("drive-scsi0"),
      raw,
    ]);
    assert.match(out, /Images are identical/);
    assert.ok(requests(trace).some((r) => r.type === NbdCmd.READ));
  });
});

toolTest("qemu-img compare sees a difference in the export", ["qemu-img"], async () => {
  await withServer(async ({ server, disk, dir }) => {
    const changed = disk.slice();
    changed[8 * MiB + 100] ^= 1;
    await Deno.writeFile(`${dir}/changed.raw`, changed);
    const output = await new Deno.Command("qemu-img", {
      args: ["compare", "-f", "raw", "-F", "raw", server.uri("drive-scsi0"), `${dir}/changed.raw`],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(output.code, 1, "qemu-img compare exits 1 for different images");
    assert.match(new TextDecoder().decode(output.stdout), /Content mismatch at offset 8388608/);
  });
});

toolTest("nbdinfo: --map shows the zero runs as hole,zero; --list; the export flags", [
  "nbdinfo",
], async () => {
  await withServer(async ({ server, disk }) => {
    const map = (await run("nbdinfo", ["--map", server.uri("drive-scsi0")])).trim().split("\n")
      .map((line) => line.trim().split(/\s+/));
    const holes = map.filter((fields) => fields[3] === "hole,zero")
      .map(([offset, length, type]) => [Number(offset), Number(length), Number(type)]);
    assert.deepEqual(holes, zeroRuns(disk).map(([offset, length]) => [offset, length, 3]));
    const covered = map.reduce((sum, fields) => sum + Number(fields[1]), 0);
    assert.equal(covered, disk.byteLength);
    assert.ok(map.filter((fields) => fields[3] === "data").length >= 4);

    const list = JSON.parse(await run("nbdinfo", ["--list", "--json", server.uri()]));
    assert.deepEqual(
      list.exports.map((e: { "export-name": string; description?: string }) => [
        e["export-name"],
        e.description ?? "",
      ]),
      [["drive-scsi0", "system disk"], ["drive-scsi1", ""]],
    );

    const info = JSON.parse(await run("nbdinfo", ["--json", server.uri("drive-scsi0")]));
    assert.equal(info.structured, true);
    const [only] = info.exports;
    assert.equal(only["export-size"], disk.byteLength);
    assert.equal(only.is_read_only, true);
    assert.equal(only.can_multi_conn, true);
    assert.equal(only.can_cache, true);
    assert.equal(only.can_flush, true);
    assert.equal(only.can_trim, false);
    assert.deepEqual(only.contexts, ["base:allocation"]);
    const writable = JSON.parse(await run("nbdinfo", ["--json", server.uri("drive-scsi1")]));
    assert.equal(writable.exports[0].is_read_only, false);
    assert.equal(writable.exports[0].can_trim, true);
    assert.equal(writable.exports[0].can_zero, true);
  });
});

toolTest("nbdcopy copies the export over several connections, sparse and bit-exact", [
  "nbdcopy",
], async () => {
  await withServer(async ({ server, dir, disk, trace }) => {
    const out = `${dir}/copy.raw`;
    await Deno.writeFile(out, new Uint8Array(0));
    await run("nbdcopy", ["--connections=2", "--threads=2", server.uri("drive-scsi0"), out]);
    assert.deepEqual(await Deno.readFile(out), disk);
    const connections = new Set(trace.map((event) => event.connection));
    // nbdcopy opens more than one connection only to a CAN_MULTI_CONN export.
    assert.equal(connections.size, 2, `nbdcopy used ${connections.size} connections`);
    // One block status without REQ_ONE walks the disk; only data ranges are read.
    const status = requests(trace).filter((r) => r.type === NbdCmd.BLOCK_STATUS);
    assert.ok(status.some((r) => (r.flags & NbdCmdFlag.REQ_ONE) === 0));
    const read = requests(trace).filter((r) => r.type === NbdCmd.READ)
      .reduce((sum, r) => sum + r.length, 0);
    assert.ok(read < 4 * MiB, `nbdcopy read ${read} bytes of ${disk.byteLength}`);
    const { blocks } = await Deno.stat(out);
    const allocated = (blocks ?? 0) * 512;
    const data = disk.byteLength - zeroRuns(disk).reduce((sum, [, length]) => sum + length, 0);
    assert.ok(allocated >= data, `${allocated} bytes allocated, ${data} of data`);
    assert.ok(allocated < data + 2 * MiB, `the copy is sparse: ${allocated} bytes allocated`);

    // Without CAN_MULTI_CONN (and without block status: holes found in the bytes read).
    const seen = new Set<number>();
    await using single = NbdServer.listen({ path: `${dir}/single.sock` }, {
      "": { size: disk.byteLength, multiConn: false, read: (o, l) => disk.slice(o, o + l) },
    }, { trace: (event) => seen.add(event.connection) });
    const again = `${dir}/again.raw`;
    await Deno.writeFile(again, new Uint8Array(0));
    await run("nbdcopy", ["--connections=2", "--threads=2", single.uri(), again]);
    assert.deepEqual(await Deno.readFile(again), disk);
    assert.equal(seen.size, 1, "one connection to an export without CAN_MULTI_CONN");
    const { blocks: againBlocks } = await Deno.stat(again);
    assert.ok((againBlocks ?? 0) * 512 < data + 2 * MiB, "the second copy is sparse too");
  });
});

toolTest("qemu-img convert -O qcow2 from the export gives an identical, sparse image", [
  "qemu-img",
], async () => {
  await withServer(async ({ server, dir, raw }) => {
    const image = `${dir}/copy.qcow2`;
    await run("qemu-img", [
      "convert",
      "-f",
      "raw",
      "-O",
      "qcow2",
      server.uri("drive-scsi0"),
      image,
    ]);
    assert.match(
      await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", image, raw]),
      /Images are identical/,
    );
    const info = JSON.parse(await run("qemu-img", ["info", "--output=json", image]));
    assert.ok(info["actual-size"] < 4 * MiB, `qcow2 holds ${info["actual-size"]} bytes`);
  });
});

toolTest("QEMU's NBD client: qemu-io reads and qemu-img map with REQ_ONE block status", [
  "qemu-io",
  "qemu-img",
], async () => {
  await withServer(async ({ server, disk, trace }) => {
    const uri = server.uri("drive-scsi0");
    const out = await run("qemu-io", [
      "-r",
      "-f",
      "raw",
      uri,
      "-c",
      `read -P 0x22 ${8 * MiB} 64k`,
      "-c",
      `read -P 0 ${2 * MiB} 1M`,
      "-c",
      `read -P 0x33 ${disk.byteLength - 4096} 4k`,
      "-c",
      `read -P 0 ${8 * MiB + 65536} 64k`,
    ]);
    assert.equal(out.match(/^read \d+\/\d+ bytes/gm)?.length, 4, out);
    assert.doesNotMatch(out, /Pattern verification failed/);
    const options = trace.flatMap((event) => event.type === "option" ? [event.option] : []);
    assert.ok(options.includes(NbdOpt.STRUCTURED_REPLY));
    assert.ok(options.includes(NbdOpt.SET_META_CONTEXT));

    const before = requests(trace).length;
    const map = JSON.parse(await run("qemu-img", ["map", "--output=json", "-f", "raw", uri])) as {
      start: number;
      length: number;
      zero: boolean;
      data: boolean;
    }[];
    const zero = map.filter((entry) => entry.zero && !entry.data)
      .map((entry) => [entry.start, entry.length]);
    assert.deepEqual(zero, zeroRuns(disk));
    const status = requests(trace).slice(before).filter((r) => r.type === NbdCmd.BLOCK_STATUS);
    assert.ok(status.length >= zero.length, "one REQ_ONE request per extent or more");
    assert.ok(status.every((r) => (r.flags & NbdCmdFlag.REQ_ONE) !== 0), "QEMU sends REQ_ONE");
  });
});

toolTest("qemu-io writes to a writable export; to a read-only one it is refused", [
  "qemu-io",
], async () => {
  await withServer(async ({ server, lines }) => {
    const out = await run("qemu-io", [
      "-f",
      "raw",
      server.uri("drive-scsi1"),
      "-c",
      "write -P 0x5a 4096 8192",
      "-c",
      "write -z 65536 65536",
      "-c",
      "flush",
      "-c",
      "read -P 0x5a 4096 8192",
    ]);
    assert.equal(out.match(/^(wrote|read) \d+\/\d+ bytes/gm)?.length, 3, out);
    const refused = await new Deno.Command("qemu-io", {
      args: ["-f", "raw", server.uri("drive-scsi0"), "-c", "write 0 512"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const said = new TextDecoder().decode(refused.stdout) +
      new TextDecoder().decode(refused.stderr);
    assert.match(said, /read-only|Permission denied|not permitted/i);
    assert.ok(lines.some((line) => /export "drive-scsi1" \(1048576 bytes, writable/.test(line)));
  });
});

toolTest(
  "nbdcopy reads 4 GiB from the server while its memory stays flat",
  ["nbdcopy"],
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "nbdmem" });
    const probe = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        new URL("./fixtures/nbd_serve_probe.ts", import.meta.url).pathname,
        `${dir}/p.sock`,
        "4",
      ],
      stdin: "piped",
      stdout: "piped",
    }).spawn();
    const lines = probe.stdout.pipeThrough(new TextDecoderStream()).values();
    try {
      assert.equal((await lines.next()).value?.trim(), "ready");
      await run("nbdcopy", ["--request-size=262144", `nbd+unix:///?socket=${dir}/p.sock`, "null:"]);
      await probe.stdin.close();
      const result = JSON.parse((await lines.next()).value!);
      assert.equal(result.stats.bytesRead, 4 * 2 ** 30);
      assert.ok(result.stats.connections >= 2, "multi-conn");
      assert.ok(result.peak < 128 * MiB, `peak RSS ${(result.peak / MiB).toFixed(0)} MiB`);
    } finally {
      await probe.stdin.close().catch(() => {});
      await probe.status;
      await lines.return?.();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
