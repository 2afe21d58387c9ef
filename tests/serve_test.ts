// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `cli.ts serve` as users run it, against real NBD clients: qemu-img (compare, convert),
 * qemu-io, nbdinfo and nbdcopy; the archives written by backup (seekable .vma.zst, plain
 * .vma with and without its sidecar) and a zstd-CLI archive, refused and then re-framed;
 * bad requests, many clients, clients that leave, an archive cut while serving, SIGTERM.
 */
import assert from "node:assert/strict";
import { archiveOutput, NbdClient } from "../mod.ts";
import { NbdCmd, NbdErrno, NbdTransmissionFlag } from "../lib/protocols/nbd_protocol.ts";
import { cli, spawnCli, tool, toolTest } from "./_cli.ts";
import { contentOf, errnoOf, RawClient } from "./_nbd_raw.ts";
import { randomBytes } from "./_utils.ts";

const MiB = 1 << 20;
const CLUSTER = 65536;
const SERVE = ["--allow-read", "--allow-write", "--allow-net"];

/**
 * drive-scsi0, 24 MiB: random data in the first MiB, a zero run to 8 MiB, a pattern
 * cluster, an all-zero cluster between two data clusters, and data in the last 4 KiB.
 * drive-scsi1: 3 MiB + 12 KiB (not a whole number of clusters), mostly random.
 */
function disks(): Map<string, Uint8Array> {
  const scsi0 = new Uint8Array(24 * MiB);
  scsi0.set(randomBytes(MiB, 42), 0);
  scsi0.fill(0x22, 8 * MiB, 8 * MiB + CLUSTER);
  scsi0.fill(0x44, 8 * MiB + 2 * CLUSTER, 8 * MiB + 3 * CLUSTER);
  scsi0.fill(0x33, scsi0.byteLength - 4096);
  const scsi1 = randomBytes(3 * MiB + 12 * 1024, 7);
  scsi1.fill(0, MiB, 2 * MiB);
  return new Map([["drive-scsi0", scsi0], ["drive-scsi1", scsi1]]);
}

/** The zero runs of `disk` at cluster granularity, as [offset, length]: what the index knows. */
function zeroClusterRuns(disk: Uint8Array): [number, number][] {
  const runs: [number, number][] = [];
  for (let at = 0; at < disk.byteLength; at += CLUSTER) {
    const end = Math.min(at + CLUSTER, disk.byteLength);
    if (!disk.subarray(at, end).every((byte) => byte === 0)) continue;
    const last = runs.at(-1);
    if (last && last[0] + last[1] === at) last[1] += end - at;
    else runs.push([at, end - at]);
  }
  return runs;
}

interface Archives {
  dir: string;
  disks: Map<string, Uint8Array>;
  /** Raw images of the disks, for qemu-img compare. */
  raw: Map<string, string>;
  /** backup -o vm.vma.zst: seekable, index inside. */
  zst: string;
  /** backup -o vm.vma: with its sidecar vm.vma.idx. */
  vma: string;
  /** The same plain archive without a sidecar: mapped by a scan. */
  scan: string;
  /** `zstd -c vm.vma`: not seekable. */
  zstdCli: string;
  /** The zstd-CLI archive made seekable by `cli.ts convert`. */
  converted: string;
  /** The zstd-CLI archive re-framed through the library into a seekable one. */
  reframed: string;
}

let built: Promise<Archives> | undefined;

/** The archives, built once for all tests of this file (removed at unload). */
function archives(): Promise<Archives> {
  built ??= (async () => {
    const dir = await Deno.makeTempDir({ prefix: "vmabackup-serve-" });
    globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
    const all = disks();
    const raw = new Map<string, string>();
    for (const [name, bytes] of all) {
      raw.set(name, `${dir}/${name}.raw`);
      await Deno.writeFile(`${dir}/${name}.raw`, bytes);
    }
    const diskArgs = [...raw].flatMap(([name, path]) => ["--disk", `${name}=${path}`]);
    for (const out of ["vm.vma.zst", "vm.vma"]) {
      const result = await cli(["backup", ...diskArgs, "-o", `${dir}/${out}`]);
      assert.equal(result.code, 0, result.stderr);
    }
    await Deno.copyFile(`${dir}/vm.vma`, `${dir}/scan.vma`);
    await tool("zstd", ["-q", "-3", `${dir}/vm.vma`, "-o", `${dir}/cli.vma.zst`]);
    // The zstd-CLI archive made seekable by 'convert', and by the library (SeekableZstdStream
    // through archiveOutput), which 'convert' is built on.
    const converted = await cli(["convert", `${dir}/cli.vma.zst`, `${dir}/converted.vma.zst`]);
    assert.equal(converted.code, 0, converted.stderr);
    const decoded = new Deno.Command("zstd", {
      args: ["-dc", `${dir}/cli.vma.zst`],
      stdout: "piped",
    }).spawn();
    await Deno.writeFile(
      `${dir}/reframed.vma.zst`,
      decoded.stdout.pipeThrough(archiveOutput({ compression: "zstd" })),
    );
    assert.ok((await decoded.status).success);
    return {
      dir,
      disks: all,
      raw,
      zst: `${dir}/vm.vma.zst`,
      vma: `${dir}/vm.vma`,
      scan: `${dir}/scan.vma`,
      zstdCli: `${dir}/cli.vma.zst`,
      converted: `${dir}/converted.vma.zst`,
      reframed: `${dir}/reframed.vma.zst`,
    };
  })();
  return built;
}

interface Serving {
  /** URIs by export name, as serve printed them. */
  uris: Map<string, string>;
  socket: string;
  child: Deno.ChildProcess;
  /** stderr so far. */
  log(): string;
  /** Sends `signal` and waits: the exit code and all of stderr. */
  stop(signal?: Deno.Signal): Promise<{ code: number; stderr: string }>;
}

/** Runs `cli.ts serve ARCHIVE --socket ... extra` until `fn` is done; checks a clean exit. */
async function withServe(
  archive: string,
  extra: string[],
  fn: (serving: Serving) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vmabackup-sock-" });
  const socket = `${dir}/nbd.sock`;
  const child = spawnCli(["serve", archive, "--socket", socket, ...extra], {
    permissions: SERVE,
  });
  let stderr = "";
  const reading = child.stderr.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({ write: (text) => void (stderr += text) }),
  );
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).values();
  let stopped: Promise<{ code: number; stderr: string }> | undefined;
  const serving: Serving = {
    uris: new Map(),
    socket,
    child,
    log: () => stderr,
    stop(signal = "SIGTERM") {
      stopped ??= (async () => {
        try {
          child.kill(signal);
        } catch { /* exited */ }
        const { code } = await child.status;
        await reading;
        return { code, stderr };
      })();
      return stopped;
    },
  };
  try {
    let buffered = "";
    while (!buffered.includes("\n")) {
      const { value, done } = await lines.next();
      if (done) {
        const { code } = await child.status;
        await reading;
        throw new Error(`serve exited with ${code} before printing a URI: ${stderr}`);
      }
      buffered += value;
    }
    // The URIs come in one write, one line per export.
    for (const line of buffered.trim().split("\n")) {
      serving.uris.set(decodeURIComponent(new URL(line).pathname.slice(1)), line);
    }
    await fn(serving);
    const { code, stderr: log } = await serving.stop();
    assert.equal(code, 0, `serve stops cleanly on SIGTERM: ${log}`);
    await assert.rejects(Deno.lstat(socket), Deno.errors.NotFound, "the socket is removed");
    assert.deepEqual(await Array.fromAsync(Deno.readDir(dir)), [], "nothing is left behind");
  } finally {
    await serving.stop("SIGKILL");
    await lines.return?.();
    await Deno.remove(dir, { recursive: true });
  }
}

async function output(program: string, args: string[]) {
  const result = await new Deno.Command(program, { args, stdout: "piped", stderr: "piped" })
    .output();
  const decoder = new TextDecoder();
  return {
    code: result.code,
    stdout: decoder.decode(result.stdout),
    stderr: decoder.decode(result.stderr),
  };
}

async function compare(uri: string, raw: string): Promise<string> {
  const result = await output("qemu-img", ["compare", "-f", "raw", "-F", "raw", uri, raw]);
  return result.stdout + result.stderr;
}

await toolTest(
  "serve: qemu-img compare finds each disk identical, for a .vma.zst from backup, a plain .vma with and without its sidecar, and a zstd-CLI archive after convert",
  [
    "qemu-img",
    "zstd",
  ],
  async () => {
    const a = await archives();
    const cases: [string, RegExp][] = [
      [a.zst, /seekable zstd, embedded index/],
      [a.vma, /plain VMA, sidecar index/],
      [a.scan, /plain VMA, mapped by its extent headers/],
      [a.converted, /seekable zstd, embedded index/],
      [a.reframed, /seekable zstd, embedded index/],
    ];
    for (const [archive, source] of cases) {
      await withServe(archive, [], async ({ uris, log }) => {
        assert.deepEqual([...uris.keys()], ["drive-scsi0", "drive-scsi1"]);
        for (const [name, uri] of uris) {
          assert.match(await compare(uri, a.raw.get(name)!), /Images are identical/, archive);
        }
        assert.match(log(), source);
        assert.match(log(), /drive-scsi1: 3\.01 MiB/);
      });
    }
  },
);

await toolTest(
  "serve: a .vma.zst from the zstd program is refused in one line that says to run convert (exit code 9)",
  [
    "zstd",
  ],
  async () => {
    const a = await archives();
    const dir = await Deno.makeTempDir();
    try {
      const result = await cli(["serve", a.zstdCli, "--socket", `${dir}/s.sock`], {
        permissions: SERVE,
      });
      assert.equal(result.code, 9, result.stderr);
      assert.equal(result.stderr.trim().split("\n").length, 1, result.stderr);
      assert.match(result.stderr, /^error: .*cli\.vma\.zst cannot be read at random: .*convert/);
      assert.equal(result.text, "");
      assert.deepEqual(await Array.fromAsync(Deno.readDir(dir)), []);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

await toolTest(
  "serve: nbdinfo --map reports the zero clusters as holes; the exports are read-only, multi-conn",
  [
    "nbdinfo",
  ],
  async () => {
    const a = await archives();
    await withServe(a.zst, [], async ({ uris }) => {
      for (const [name, uri] of uris) {
        const lines = new TextDecoder().decode(await tool("nbdinfo", ["--map", uri])).trim()
          .split("\n").map((line) => line.trim().split(/\s+/));
        const holes = lines.filter((fields) => fields[3] === "hole,zero")
          .map(([offset, length]) => [Number(offset), Number(length)]);
        assert.deepEqual(holes, zeroClusterRuns(a.disks.get(name)!), name);
        const covered = lines.reduce((sum, fields) => sum + Number(fields[1]), 0);
        assert.equal(covered, a.disks.get(name)!.byteLength);
      }
      const info = JSON.parse(
        new TextDecoder().decode(await tool("nbdinfo", ["--json", uris.get("drive-scsi0")!])),
      );
      const [only] = info.exports;
      assert.equal(only.is_read_only, true);
      assert.equal(only.can_multi_conn, true);
      assert.equal(only["export-size"], 24 * MiB);
      assert.deepEqual(only.contexts, ["base:allocation"]);
    });
  },
);

await toolTest("serve: nbdcopy copies each disk over several connections, sparse and bit-exact", [
  "nbdcopy",
], async () => {
  const a = await archives();
  await withServe(a.zst, [], async ({ uris, log }) => {
    for (const [name, uri] of uris) {
      const out = `${a.dir}/${name}.nbdcopy.raw`;
      await Deno.writeFile(out, new Uint8Array(0));
      await tool("nbdcopy", ["--connections=4", uri, out]);
      const disk = a.disks.get(name)!;
      assert.deepEqual(await Deno.readFile(out), disk, name);
      const zeros = zeroClusterRuns(disk).reduce((sum, [, length]) => sum + length, 0);
      const allocated = ((await Deno.stat(out)).blocks ?? 0) * 512;
      assert.ok(allocated <= disk.byteLength - zeros + MiB, `${name} copy is sparse: ${allocated}`);
      await Deno.remove(out);
    }
    const opened = log().match(/^connection \d+ opened/gm) ?? [];
    assert.ok(opened.length >= 4, `nbdcopy used multi-conn: ${opened.length} connections`);
  });
});

await toolTest("serve: qemu-img convert -O qcow2 from the export gives an identical image", [
  "qemu-img",
], async () => {
  const a = await archives();
  await withServe(a.vma, ["--disk", "scsi0"], async ({ uris }) => {
    assert.deepEqual([...uris.keys()], ["drive-scsi0"], "--disk picks the export");
    const image = `${a.dir}/convert.qcow2`;
    await tool("qemu-img", [
      "convert",
      "-f",
      "raw",
      "-O",
      "qcow2",
      uris.get("drive-scsi0")!,
      image,
    ]);
    const result = await output("qemu-img", [
      "compare",
      "-f",
      "qcow2",
      "-F",
      "raw",
      image,
      a.raw.get("drive-scsi0")!,
    ]);
    assert.match(result.stdout, /Images are identical/);
    const info = JSON.parse(new TextDecoder().decode(
      await tool("qemu-img", ["info", "--output=json", image]),
    ));
    assert.ok(info["actual-size"] < 4 * MiB, `the qcow2 is sparse: ${info["actual-size"]}`);
    await Deno.remove(image);
  });
});

Deno.test("serve: usage errors, an unknown disk (exit 7), TCP with --listen", async () => {
  const a = await archives();
  const unknown = await cli(["serve", a.vma, "--disk", "scsi7"], { permissions: SERVE });
  assert.equal(unknown.code, 7, unknown.stderr);
  assert.match(
    unknown.stderr,
    /^error: the archive has no disk named 'scsi7' \(it has drive-scsi0, drive-scsi1\)$/m,
  );
  const both = await cli(["serve", a.vma, "--socket", "x", "--listen", "127.0.0.1:0"]);
  assert.equal(both.code, 2);
  const stdin = await cli(["serve", "-"], { permissions: SERVE });
  assert.equal(stdin.code, 2);
  assert.match(stdin.stderr, /only be served from a file/);

  const child = spawnCli(["serve", a.vma, "--listen", "127.0.0.1:0", "--quiet"], {
    permissions: SERVE,
  });
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).values();
  try {
    const first = (await lines.next()).value!.split("\n")[0]!;
    assert.match(first, /^nbd:\/\/127\.0\.0\.1:\d+\/drive-scsi0$/);
    await using client = await NbdClient.connect(first);
    const bytes = new Uint8Array(MiB);
    await client.read(0, bytes);
    assert.deepEqual(bytes, a.disks.get("drive-scsi0")!.subarray(0, MiB));
  } finally {
    child.kill("SIGINT");
    const [{ code }, stderr] = await Promise.all([child.status, new Response(child.stderr).text()]);
    await lines.return?.();
    assert.equal(code, 0, stderr);
    assert.doesNotMatch(
      stderr,
      /connection \d+ opened/,
      "--quiet keeps connections out of the log",
    );
  }
});

Deno.test("serve: writes and trims get EPERM, reads past the end EINVAL; a malformed request drops only that client", async () => {
  const a = await archives();
  const disk = a.disks.get("drive-scsi0")!;
  await withServe(a.zst, [], async ({ socket, log }) => {
    const address = { path: socket };
    await using good = await NbdClient.connect(`nbd+unix:///drive-scsi1?socket=${socket}`);
    const client = await RawClient.connect({ address });
    try {
      const { flags, size } = await client.go("drive-scsi0");
      assert.ok(flags & NbdTransmissionFlag.READ_ONLY);
      assert.equal(size, disk.byteLength);
      await client.request(NbdCmd.WRITE, 0, 512, { payload: new Uint8Array(512).fill(1) });
      assert.equal(errnoOf(await client.reply()), NbdErrno.EPERM);
      await client.request(NbdCmd.TRIM, 0, 4096);
      assert.equal(errnoOf(await client.reply()), NbdErrno.EPERM);
      await client.request(NbdCmd.WRITE_ZEROES, 0, 4096);
      assert.equal(errnoOf(await client.reply()), NbdErrno.EPERM);
      await client.request(NbdCmd.READ, disk.byteLength - 512, 1024);
      assert.equal(errnoOf(await client.reply()), NbdErrno.EINVAL);
      await client.request(NbdCmd.READ, 0, MiB); // over the 512 KiB serve allows
      assert.equal(errnoOf(await client.reply()), NbdErrno.EINVAL);
      // The connection goes on: a read across data and a zero cluster.
      const at = 8 * MiB + CLUSTER - 4096;
      await client.request(NbdCmd.READ, at, 3 * CLUSTER);
      assert.deepEqual(
        contentOf(await client.reply(), at, 3 * CLUSTER),
        disk.subarray(at, at + 3 * CLUSTER),
      );
      await client.send(new Uint8Array(28).fill(0x41)); // no request magic
      assert.ok(await client.closedByServer(), "the malformed client is dropped");
    } finally {
      client.close();
    }
    // The server's stderr reaches us on its own schedule: give its line a moment.
    const droppedLines = () => log().split("\n").filter((line) => /dropped/.test(line));
    for (let i = 0; i < 100 && droppedLines().length === 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const dropped = droppedLines();
    assert.equal(dropped.length, 1, log());
    assert.match(
      dropped[0]!,
      /^connection \d+ dropped: Cannot decode a request: Its magic is 0x41414141/,
    );
    const bytes = new Uint8Array(MiB);
    await good.read(0, bytes);
    assert.deepEqual(bytes, a.disks.get("drive-scsi1")!.subarray(0, MiB));
  });
});

Deno.test("serve: many clients at once read correct data; a client that leaves mid-read disturbs no one", async () => {
  const a = await archives();
  const disk = a.disks.get("drive-scsi0")!;
  await withServe(a.zst, [], async ({ uris, socket }) => {
    const leaver = await RawClient.connect({ address: { path: socket } });
    await leaver.go("drive-scsi0");
    await leaver.request(NbdCmd.READ, 0, 512 * 1024); // the largest read serve allows
    await leaver.must(1000); // part of the reply, then gone
    leaver.close();
    const clients = await Promise.all(
      Array.from({ length: 12 }, () => NbdClient.connect(uris.get("drive-scsi0")!)),
    );
    try {
      await Promise.all(clients.map(async (client, i) => {
        const offset = (i * 2 * MiB + i * 4096) % (disk.byteLength - MiB);
        const bytes = new Uint8Array(MiB);
        await client.read(offset, bytes);
        assert.deepEqual(bytes, disk.subarray(offset, offset + MiB), `client ${i}`);
      }));
    } finally {
      await Promise.all(clients.map((client) => client.close()));
    }
  });
});

await toolTest(
  "serve: an archive cut while serving: reads past the cut get EIO, the rest still reads, the server stays up",
  [
    "qemu-io",
  ],
  async () => {
    const a = await archives();
    const copy = `${a.dir}/cut.vma.zst`;
    await Deno.copyFile(a.zst, copy);
    const disk = a.disks.get("drive-scsi0")!;
    await withServe(copy, ["--disk", "drive-scsi0"], async ({ uris, log }) => {
      const uri = uris.get("drive-scsi0")!;
      await Deno.truncate(copy, 64 * 1024); // the header and part of the first frame are left
      const cut = await output("qemu-io", ["-r", "-f", "raw", uri, "-c", `read ${8 * MiB} 64k`]);
      assert.match(cut.stdout + cut.stderr, /Input\/output error/);
      assert.match(log(), /failed with EIO: .*cut\.vma\.zst/);
      // Zero clusters need no archive bytes; the server answers them and keeps going.
      const zero = await output("qemu-io", [
        "-r",
        "-f",
        "raw",
        uri,
        "-c",
        `read -P 0 ${2 * MiB} 1M`,
      ]);
      assert.match(zero.stdout, /^read 1048576\/1048576 bytes/m, zero.stdout + zero.stderr);
      await using client = await NbdClient.connect(uri);
      const bytes = new Uint8Array(65536);
      await client.read(8 * MiB + 2 * CLUSTER, bytes).then(
        () => assert.fail("a read past the cut must fail"),
        (error) => assert.match(String(error), /EIO|Input\/output|errno 5|code 5/i),
      );
      assert.equal(disk.byteLength, 24 * MiB);
    });
    await Deno.remove(copy);
  },
);

Deno.test("serve: SIGTERM while clients read ends the server promptly and cleanly", async () => {
  const a = await archives();
  await withServe(a.zst, [], async (serving) => {
    const client = await NbdClient.connect(serving.uris.get("drive-scsi0")!);
    let reads = 0;
    const reading = (async (): Promise<never> => {
      const bytes = new Uint8Array(MiB);
      for (;;) {
        await client.read((reads++ % 20) * MiB, bytes);
      }
    })().then(() => "resolved", () => "rejected");
    while (reads < 5) await new Promise((resolve) => setTimeout(resolve, 5));
    const started = performance.now();
    const { code, stderr } = await serving.stop("SIGTERM");
    assert.equal(code, 0, stderr);
    assert.ok(performance.now() - started < 3000, "serve stops within 3 s");
    assert.equal(await reading, "rejected", "the reads in flight end with the server");
    await client.close().catch(() => {});
  });
});
