// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The NBD client against real `qemu-nbd`, against the in-memory server of
 * `fixtures/nbd_memory_server.ts`, and against small misbehaving servers.
 *
 * The QEMU tests skip with a clear name when qemu-nbd, qemu-img or qemu-io are missing,
 * unless `CI=true`, where they run (and fail without QEMU).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  type NbdAddress,
  NbdClient,
  type NbdConnectOptions,
  NbdError,
  type NbdExtent,
  NbdStateFlag,
  NbdTransmissionFlag,
  parseNbdUri,
} from "../lib/protocols/nbd_client.ts";
import {
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeChunkHeader,
  encodeErrorChunk,
  encodeHandshake,
  encodeInfoReply,
  encodeMetaContextReply,
  encodeOffsetDataPrefix,
  encodeOffsetHole,
  encodeOptionReply,
  encodeSimpleReply,
  NBD_OLDSTYLE_MAGIC,
  NBD_OPTION_HEADER_SIZE,
  NBD_REQUEST_SIZE,
  NbdCmd,
  NbdErrno,
  NbdInfo,
  NbdOpt,
  NbdRep,
  NbdReplyFlag,
  NbdReplyType,
  type NbdRequest,
} from "../lib/protocols/nbd_protocol.ts";
import { startMemoryNbdServer } from "./fixtures/nbd_memory_server.ts";

const MiB = 1 << 20;

function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

// ---------------------------------------------------------------------------------------
// QEMU helpers

function hasCommand(name: string): boolean {
  try {
    return new Deno.Command(name, { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

const QEMU_TOOLS = ["qemu-nbd", "qemu-img", "qemu-io"];
const HAVE_QEMU = QEMU_TOOLS.every(hasCommand);
const IN_CI = Deno.env.get("CI") === "true";

/** A QEMU test: skipped with a telling name on a developer machine without QEMU. */
function qemuTest(name: string, fn: () => Promise<void>): void {
  const skip = !HAVE_QEMU && !IN_CI;
  Deno.test({
    name: skip ? `${name} (skipped: qemu-nbd, qemu-img or qemu-io not installed)` : name,
    ignore: skip,
    fn: async () => {
      if (!HAVE_QEMU) {
        throw new Error(`CI=true but ${QEMU_TOOLS.join(", ")} are not all installed`);
      }
      await fn();
    },
  });
}

async function run(command: string, args: string[]): Promise<Uint8Array> {
  const output = await new Deno.Command(command, { args, stdout: "piped", stderr: "piped" })
    .output();
  if (!output.success) {
    throw new Error(
      `${command} ${args.join(" ")} failed: ${new TextDecoder().decode(output.stderr)}`,
    );
  }
  return output.stdout;
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "nbdt" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** The image of qemu-live-backup.md §4a: data at 0..1M and 8M..8M+64k, a zero cluster at 4M. */
async function makeImage(path: string): Promise<void> {
  await run("qemu-img", ["create", "-f", "qcow2", path, "64M"]);
  await run("qemu-io", [
    "-f",
    "qcow2",
    "-c",
    "write -P 0x11 0 1M",
    "-c",
    "write -z 4M 1M",
    "-c",
    "write -P 0x22 8M 64k",
    path,
  ]);
}

/** Runs qemu-nbd on a unix socket for the duration of `fn`; always kills and awaits it. */
async function withQemuNbd(
  dir: string,
  args: string[],
  fn: (socket: string) => Promise<void>,
): Promise<void> {
  const socket = `${dir}/nbd.sock`;
  const child = new Deno.Command("qemu-nbd", {
    args: [...args.slice(0, -1), "--persistent", "-k", socket, args[args.length - 1]!],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  let listening = false;
  try {
    const deadline = Date.now() + 10_000;
    while (!exited && Date.now() < deadline) {
      try {
        // The socket file appears before qemu-nbd listens: wait until a connection is taken.
        (await Deno.connect({ transport: "unix", path: socket })).close();
        break;
      } catch {
        // Not listening yet.
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    listening = !exited && Date.now() < deadline;
    if (listening) await fn(socket);
  } finally {
    if (!exited) child.kill("SIGTERM");
    // A qemu-nbd stopped while it starts can wait forever (QEMU 7.2): then SIGKILL.
    const killer = setTimeout(() => {
      try {
        child.kill("SIGKILL");
      } catch { /* exited */ }
    }, 5000);
    const [stderr] = await Promise.all([new Response(child.stderr).text(), status]);
    clearTimeout(killer);
    if (!listening) {
      // deno-lint-ignore no-unsafe-finally
      throw new Error(`qemu-nbd ${args.join(" ")} did not listen on ${socket}: ${stderr}`);
    }
  }
}

const EXPECTED_ALLOCATION: NbdExtent[] = [
  { offset: 0, length: MiB, flags: 0 },
  { offset: MiB, length: 7 * MiB, flags: NbdStateFlag.HOLE | NbdStateFlag.ZERO },
  { offset: 8 * MiB, length: 65536, flags: 0 },
  { offset: 8 * MiB + 65536, length: 56 * MiB - 65536, flags: 3 },
];
const EXPECTED_DEPTH: NbdExtent[] = [
  { offset: 0, length: MiB, flags: 1 },
  { offset: MiB, length: 3 * MiB, flags: 0 },
  { offset: 4 * MiB, length: MiB, flags: 1 }, // the zero cluster is allocated
  { offset: 5 * MiB, length: 3 * MiB, flags: 0 },
  { offset: 8 * MiB, length: 65536, flags: 1 },
  { offset: 8 * MiB + 65536, length: 56 * MiB - 65536, flags: 0 },
];

/** Clips extents to [start, end). */
function clip(extents: NbdExtent[], start: number, end: number): NbdExtent[] {
  return extents
    .map((e) => ({
      offset: Math.max(e.offset, start),
      length: Math.min(e.offset + e.length, end) - Math.max(e.offset, start),
      flags: e.flags,
    }))
    .filter((e) => e.length > 0);
}

const BOTH_CONTEXTS = ["base:allocation", "qemu:allocation-depth"];
const READ_ONLY_ARGS = ["-r", "-f", "qcow2", "--allocation-depth", "-x", "exp-a"];

// ---------------------------------------------------------------------------------------
// Against qemu-nbd

qemuTest("NbdClient against qemu-nbd -r: handshake info, contexts and block sizes", async () => {
  await withTempDir(async (dir) => {
    await makeImage(`${dir}/a.qcow2`);
    await withQemuNbd(dir, [...READ_ONLY_ARGS, `${dir}/a.qcow2`], async (socket) => {
      const address: NbdAddress = { transport: "unix", path: socket };
      {
        await using client = await NbdClient.open(address, { timeoutMs: 5000 });
        assert.deepEqual((await client.listExports()).map((e) => e.name), ["exp-a"]);
        assert.equal(await client.structuredReply(), true);
        // QEMU sends id 0 for every LIST reply: both names must survive.
        assert.deepEqual(
          (await client.listMetaContexts("exp-a", ["base:", "qemu:"])).sort(),
          BOTH_CONTEXTS,
        );
        assert.deepEqual((await client.listMetaContexts("exp-a")).sort(), BOTH_CONTEXTS);
        await assert.rejects(client.exportInfo("missing"), (error: unknown) => {
          assert.ok(error instanceof NbdError);
          assert.equal(error.reason, "option-failed");
          assert.equal(error.code, NbdRep.ERR_UNKNOWN);
          assert.match(error.message, /NBD_REP_ERR_UNKNOWN/);
          return true;
        });
        // The refusal left the negotiation usable.
        assert.equal((await client.exportInfo("exp-a")).size, 64 * MiB);
      }
      await using client = await NbdClient.connect(`nbd+unix:///exp-a?socket=${socket}`, {
        metaContexts: BOTH_CONTEXTS,
        timeoutMs: 5000,
      });
      const { info } = client;
      assert.equal(info.exportName, "exp-a");
      assert.equal(info.size, 64 * MiB);
      assert.ok(info.flags & NbdTransmissionFlag.HAS_FLAGS);
      assert.ok(info.flags & NbdTransmissionFlag.READ_ONLY);
      assert.ok(info.flags & NbdTransmissionFlag.SEND_FLUSH);
      assert.ok(!(info.flags & NbdTransmissionFlag.SEND_TRIM));
      assert.equal(info.flags, 0x48f); // qemu-live-backup.md §3, measured on QEMU 7.2
      assert.equal(info.blockSizesAdvertised, true);
      assert.deepEqual(
        [info.minBlockSize, info.preferredBlockSize, info.maxBlockSize],
        [1, 4096, 32 * MiB],
      );
      assert.equal(client.maxRequestSize, 32 * MiB);
      assert.deepEqual([...client.metaContexts.values()].sort(), BOTH_CONTEXTS);
      await assert.rejects(client.write(0, new Uint8Array(512)), { reason: "unsupported" });
      await assert.rejects(client.trim(0, 512), { reason: "unsupported" });
      assert.equal(client.closed, false);
    });
  });
});

qemuTest("NbdClient against qemu-nbd -r: base:allocation and qemu:allocation-depth", async () => {
  await withTempDir(async (dir) => {
    await makeImage(`${dir}/a.qcow2`);
    await withQemuNbd(dir, [...READ_ONLY_ARGS, `${dir}/a.qcow2`], async (socket) => {
      const address: NbdAddress = { transport: "unix", path: socket };
      const options: NbdConnectOptions = {
        exportName: "exp-a",
        metaContexts: BOTH_CONTEXTS,
        timeoutMs: 5000,
      };
      {
        await using client = await NbdClient.connect(address, options);
        assert.deepEqual(
          await Array.fromAsync(client.extents("base:allocation")),
          EXPECTED_ALLOCATION,
        );
        assert.deepEqual(
          await Array.fromAsync(client.extents("qemu:allocation-depth")),
          EXPECTED_DEPTH,
        );
        // One context walked over a sub-range, one request at a time with REQ_ONE.
        const start = 512 * 1024;
        const end = 8 * MiB + 32768;
        assert.deepEqual(
          await Array.fromAsync(
            client.extents("base:allocation", { offset: start, length: end - start, reqOne: true }),
          ),
          clip(EXPECTED_ALLOCATION, start, end),
        );
        const status = await client.blockStatus(start, end - start);
        assert.deepEqual(status.get("base:allocation"), clip(EXPECTED_ALLOCATION, start, end));
        assert.deepEqual(status.get("qemu:allocation-depth"), clip(EXPECTED_DEPTH, start, end));
        await assert.rejects(
          Array.fromAsync(client.extents("qemu:dirty-bitmap:none")),
          { reason: "unsupported" },
        );
      }
      // Small requests: the walk is split into many block status requests and merged.
      await using client = await NbdClient.connect(address, {
        ...options,
        maxRequestSize: 3 * MiB,
      });
      assert.equal(client.maxRequestSize, 3 * MiB);
      assert.deepEqual(
        await Array.fromAsync(client.extents("base:allocation")),
        EXPECTED_ALLOCATION,
      );
      const status = await client.blockStatus(0, 64 * MiB, { reqOne: true });
      assert.deepEqual(status.get("qemu:allocation-depth"), EXPECTED_DEPTH);
    });
  });
});

qemuTest(
  "NbdClient against qemu-nbd -r: reads, holes as zeros, export equals qemu-img convert",
  async () => {
    await withTempDir(async (dir) => {
      await makeImage(`${dir}/a.qcow2`);
      await run("qemu-img", ["convert", "-O", "raw", `${dir}/a.qcow2`, `${dir}/a.raw`]);
      const raw = await Deno.readFile(`${dir}/a.raw`);
      await withQemuNbd(dir, [...READ_ONLY_ARGS, `${dir}/a.qcow2`], async (socket) => {
        await using client = await NbdClient.connect(`nbd+unix:///exp-a?socket=${socket}`, {
          timeoutMs: 5000,
        });
        const buffer = new Uint8Array(65536).fill(0xff); // reused: holes must overwrite it
        await client.read(0, buffer);
        assert.ok(buffer.every((byte) => byte === 0x11));
        await client.read(4 * MiB, buffer);
        assert.ok(buffer.every((byte) => byte === 0), "the zero cluster reads as zeros");
        buffer.fill(0xff);
        await client.read(2 * MiB, buffer);
        assert.ok(buffer.every((byte) => byte === 0), "a hole reads as zeros");
        await client.read(8 * MiB, buffer);
        assert.ok(buffer.every((byte) => byte === 0x22));
        const across = new Uint8Array(8192);
        await client.read(MiB - 4096, across);
        assert.deepEqual(across, raw.subarray(MiB - 4096, MiB + 4096));

        const before = client.bytesReceived;
        const whole = new Uint8Array(64 * MiB);
        await client.read(0, whole);
        assert.equal(sha256(whole), sha256(raw));
        // Structured replies send holes as 12-byte chunks: far less than 64 MiB on the wire.
        assert.ok(client.bytesReceived - before < 2 * MiB, `${client.bytesReceived - before}`);
      });
    });
  },
);

qemuTest(
  "NbdClient against qemu-nbd -r: reading only the data extents receives few bytes",
  async () => {
    await withTempDir(async (dir) => {
      await makeImage(`${dir}/a.qcow2`);
      await run("qemu-img", ["convert", "-O", "raw", `${dir}/a.qcow2`, `${dir}/a.raw`]);
      const raw = await Deno.readFile(`${dir}/a.raw`);
      await withQemuNbd(dir, [...READ_ONLY_ARGS, `${dir}/a.qcow2`], async (socket) => {
        await using client = await NbdClient.connect(
          { transport: "unix", path: socket },
          { exportName: "exp-a", metaContexts: ["base:allocation"], timeoutMs: 5000 },
        );
        const before = client.bytesReceived;
        const buffer = new Uint8Array(MiB);
        let dataBytes = 0;
        for await (const extent of client.extents("base:allocation")) {
          if (extent.flags & NbdStateFlag.ZERO) continue;
          for (let at = extent.offset; at < extent.offset + extent.length; at += buffer.length) {
            const view = buffer.subarray(
              0,
              Math.min(buffer.length, extent.offset + extent.length - at),
            );
            await client.read(at, view);
            assert.deepEqual(view, raw.subarray(at, at + view.length));
            dataBytes += view.length;
          }
        }
        const received = client.bytesReceived - before;
        assert.equal(dataBytes, MiB + 65536);
        assert.ok(received >= dataBytes, "the data itself was received");
        assert.ok(received < dataBytes + 65536, `received ${received} bytes`);
        assert.ok(received * 50 < client.info.size, "far fewer bytes than the export size");
      });
    });
  },
);

qemuTest("NbdClient against qemu-nbd -r: simple replies carry every byte", async () => {
  await withTempDir(async (dir) => {
    await makeImage(`${dir}/a.qcow2`);
    await run("qemu-img", ["convert", "-O", "raw", `${dir}/a.qcow2`, `${dir}/a.raw`]);
    const raw = await Deno.readFile(`${dir}/a.raw`);
    await withQemuNbd(dir, [...READ_ONLY_ARGS, `${dir}/a.qcow2`], async (socket) => {
      await using client = await NbdClient.connect(`nbd+unix:///exp-a?socket=${socket}`, {
        structuredReplies: false,
        maxRequestSize: 5 * MiB,
        timeoutMs: 5000,
      });
      assert.equal(client.structuredReplies, false);
      const before = client.bytesReceived;
      const whole = new Uint8Array(64 * MiB);
      await client.read(0, whole);
      assert.equal(sha256(whole), sha256(raw));
      // 13 requests of at most 5 MiB, each a 16-byte header plus all its bytes.
      assert.equal(client.bytesReceived - before, 64 * MiB + 13 * 16);
    });
  });
});

qemuTest("NbdClient against writable qemu-nbd: write, write zeroes, trim, flush", async () => {
  await withTempDir(async (dir) => {
    const image = `${dir}/w.qcow2`;
    await makeImage(image);
    await run("qemu-img", ["convert", "-O", "raw", image, `${dir}/expected.raw`]);
    const expected = await Deno.readFile(`${dir}/expected.raw`);
    const args = ["-f", "qcow2", "--discard=unmap", "-x", "w", image];
    await withQemuNbd(dir, args, async (socket) => {
      await using client = await NbdClient.connect(`nbd+unix:///w?socket=${socket}`, {
        metaContexts: ["base:allocation"],
        timeoutMs: 10_000,
      });
      const { flags } = client.info;
      assert.ok(!(flags & NbdTransmissionFlag.READ_ONLY));
      for (
        const flag of [
          NbdTransmissionFlag.SEND_TRIM,
          NbdTransmissionFlag.SEND_WRITE_ZEROES,
          NbdTransmissionFlag.SEND_FLUSH,
          NbdTransmissionFlag.SEND_FUA,
        ]
      ) assert.ok(flags & flag, `flag ${flag}`);

      // A write larger than the 32 MiB maximum is split.
      const big = new Uint8Array(33 * MiB);
      for (let i = 0; i < big.length; i += 4096) big.fill((i >>> 12) & 0xff, i, i + 4096);
      const sent = client.bytesSent;
      await client.write(24 * MiB, big);
      assert.equal(client.bytesSent - sent, 33 * MiB + 2 * 28, "two requests");
      expected.set(big, 24 * MiB);

      const pattern = new Uint8Array(MiB + 4096).fill(0x33);
      await client.write(16 * MiB, pattern, { fua: true });
      expected.set(pattern, 16 * MiB);

      await client.writeZeroes(0, 65536);
      expected.fill(0, 0, 65536);
      await client.writeZeroes(65536, 65536, { noHole: true });
      expected.fill(0, 65536, 131072);

      // With --discard=unmap a trimmed qcow2 cluster without backing reads as zeros.
      await client.trim(8 * MiB, 65536);
      expected.fill(0, 8 * MiB, 8 * MiB + 65536);
      await client.flush();

      const status = await client.blockStatus(8 * MiB, 65536);
      assert.ok(status.get("base:allocation")!.every((e) => e.flags & NbdStateFlag.ZERO));
      const back = new Uint8Array(64 * MiB);
      await client.read(0, back);
      assert.equal(sha256(back), sha256(expected));
    });
    await Deno.writeFile(`${dir}/expected.raw`, expected);
    // qemu-nbd has exited: compare the image itself.
    await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", image, `${dir}/expected.raw`]);
  });
});

// ---------------------------------------------------------------------------------------
// Against the in-memory server

Deno.test("parseNbdUri() parses unix and TCP URIs and refuses what it cannot do", () => {
  assert.deepEqual(parseNbdUri("nbd+unix:///exp?socket=/tmp/a%20b.sock"), {
    address: { transport: "unix", path: "/tmp/a b.sock" },
    exportName: "exp",
  });
  assert.deepEqual(parseNbdUri("nbd+unix:///?socket=/s+t"), {
    address: { transport: "unix", path: "/s+t" }, // "+" is not a space in a URI
    exportName: "",
  });
  assert.deepEqual(parseNbdUri("nbd://example.com"), {
    address: { transport: "tcp", hostname: "example.com", port: 10809 },
    exportName: "",
  });
  assert.deepEqual(parseNbdUri("nbd://example.com//disk"), {
    address: { transport: "tcp", hostname: "example.com", port: 10809 },
    exportName: "/disk",
  });
  assert.deepEqual(parseNbdUri("nbd://[2001:db8::1]:10810/d?x-debug=1"), {
    address: { transport: "tcp", hostname: "2001:db8::1", port: 10810 },
    exportName: "d",
  });
  for (
    const bad of [
      "nbds://host/disk",
      "nbds+unix:///d?socket=/s",
      "http://host/disk",
      "nbd+unix:///disk",
      "nbd+unix://host/disk?socket=/s",
      "nbd://host/disk?socket=/s",
      "nbd://host/disk?tls-type=x509",
      "nbd://host/%zz",
      "not a uri",
    ]
  ) {
    assert.throws(() => parseNbdUri(bad), { name: "NbdError", reason: "invalid-uri" }, bad);
  }
});

Deno.test("NbdClient.connect() reports a missing socket as connect-failed", async () => {
  await withTempDir(async (dir) => {
    await assert.rejects(
      NbdClient.connect({ transport: "unix", path: `${dir}/none.sock` }),
      { name: "NbdError", reason: "connect-failed", message: /Cannot connect/ },
    );
  });
});

Deno.test("NbdClient over TCP with an nbd:// URI", async () => {
  const data = crypto.getRandomValues(new Uint8Array(65536));
  await using server = await startMemoryNbdServer({ data, transport: "tcp", exportName: "t" });
  assert.match(server.uri, /^nbd:\/\/127\.0\.0\.1:\d+\/t$/);
  await using client = await NbdClient.connect(server.uri);
  const buffer = new Uint8Array(65536);
  await client.read(0, buffer);
  assert.deepEqual(buffer, data);
});

Deno.test("NbdClient splits and aligns requests to the advertised block sizes", async () => {
  const max = 111 * 512; // not a power of two, but a multiple of the minimum
  const data = new Uint8Array(2 * MiB);
  for (let i = 0; i < data.length; i += 512) data[i] = (i / 512) & 0xff;
  await using server = await startMemoryNbdServer({
    data,
    minBlockSize: 512,
    preferredBlockSize: 4096,
    maxBlockSize: max,
    maxExtents: 1,
  });
  await using client = await NbdClient.connect(server.uri, { metaContexts: ["base:allocation"] });
  assert.equal(client.maxRequestSize, max);
  const buffer = new Uint8Array(700 * 1024);
  await client.read(4096, buffer);
  assert.deepEqual(buffer, data.subarray(4096, 4096 + buffer.length));
  await client.write(MiB, data.subarray(0, 300 * 1024));
  await client.writeZeroes(512, 200 * 1024);
  await client.trim(MiB + 512 * 1024, 256 * 1024);
  // The server answers EINVAL to anything outside its constraints; check them anyway.
  assert.ok(server.requests.length > 20);
  for (const request of server.requests) {
    assert.ok(request.length <= max, `length ${request.length}`);
    assert.equal(request.offset % 512, 0);
    assert.equal(request.length % 512, 0);
  }
  const reads = server.requests.filter((r) => r.type === NbdCmd.READ);
  assert.equal(reads.length, Math.ceil(buffer.length / max));
  // One extent per reply: blockStatus() keeps asking until the range is covered.
  const requestsBefore = server.requests.length;
  const status = (await client.blockStatus(0, 2 * MiB)).get("base:allocation")!;
  assert.ok(server.requests.length - requestsBefore > 3);
  assert.equal(status.reduce((sum, e) => sum + e.length, 0), 2 * MiB);
  assert.equal(status[0]!.offset, 0);
  for (let i = 1; i < status.length; i++) {
    assert.equal(status[i]!.offset, status[i - 1]!.offset + status[i - 1]!.length);
    assert.notEqual(status[i]!.flags, status[i - 1]!.flags, "adjacent equal extents merge");
  }
});

Deno.test("NbdClient rejects unaligned or out-of-range calls and stays usable", async () => {
  await using server = await startMemoryNbdServer({ size: 65536, minBlockSize: 512 });
  await using client = await NbdClient.connect(server.uri);
  await assert.rejects(client.read(100, new Uint8Array(512)), RangeError);
  await assert.rejects(client.read(0, new Uint8Array(100)), RangeError);
  await assert.rejects(client.read(65024, new Uint8Array(1024)), RangeError);
  await assert.rejects(client.read(-512, new Uint8Array(512)), RangeError);
  await assert.rejects(client.blockStatus(0, 512), { reason: "unsupported" });
  await assert.rejects(client.go("mem"), { reason: "invalid-state" });
  assert.equal(server.requests.length, 0, "nothing was sent");
  await client.read(65024, new Uint8Array(512));
  assert.equal(client.closed, false);
});

Deno.test("NbdClient falls back to simple replies and NBD_OPT_EXPORT_NAME", async () => {
  const data = crypto.getRandomValues(new Uint8Array(65536));
  await using server = await startMemoryNbdServer({ data, structuredReplies: false, go: false });
  await using client = await NbdClient.connect(server.uri);
  assert.equal(client.structuredReplies, false);
  assert.equal(client.info.blockSizesAdvertised, false);
  assert.deepEqual(
    [client.info.minBlockSize, client.info.preferredBlockSize, client.info.maxBlockSize],
    [1, 4096, 32 * MiB],
  );
  assert.deepEqual(server.options, [NbdOpt.STRUCTURED_REPLY, NbdOpt.GO, NbdOpt.EXPORT_NAME]);
  const buffer = new Uint8Array(65536);
  const before = client.bytesReceived;
  await client.read(0, buffer);
  assert.deepEqual(buffer, data);
  assert.equal(client.bytesReceived - before, 16 + 65536);
  await client.write(0, new Uint8Array(512));
  assert.ok(server.data.subarray(0, 512).every((b) => b === 0));
});

Deno.test("NbdClient reassembles content chunks sent out of order", async () => {
  const data = new Uint8Array(256 * 1024);
  for (let block = 0; block < 64; block += 3) {
    data.fill(block + 1, block * 4096, block * 4096 + 4096);
  }
  await using server = await startMemoryNbdServer({ data, reverseChunks: true });
  await using client = await NbdClient.connect(server.uri);
  const buffer = new Uint8Array(data.length).fill(0xee);
  await client.read(0, buffer);
  assert.deepEqual(buffer, data);
});

Deno.test("NbdClient keeps the connection after an error the server reports", async () => {
  await using server = await startMemoryNbdServer({ size: MiB, failReadAt: 65536 });
  await using client = await NbdClient.connect(server.uri);
  await assert.rejects(client.read(0, new Uint8Array(131072)), (error: unknown) => {
    assert.ok(error instanceof NbdError);
    assert.equal(error.reason, "command-failed");
    assert.equal(error.code, NbdErrno.EIO);
    assert.match(
      error.message,
      /^Cannot read 131072 bytes at offset 0: .*EIO.*injected read error/,
    );
    return true;
  });
  assert.equal(client.closed, false);
  await client.read(131072, new Uint8Array(4096));
});

Deno.test("NbdClient queues concurrent calls and lets other calls run during extents()", async () => {
  const data = new Uint8Array(MiB);
  for (let i = 0; i < 16; i++) data.fill(i + 1, i * 65536, i * 65536 + 4096);
  await using server = await startMemoryNbdServer({ data, maxBlockSize: 65536 });
  await using client = await NbdClient.connect(server.uri, { metaContexts: ["base:allocation"] });
  const buffers = Array.from({ length: 16 }, () => new Uint8Array(4096));
  await Promise.all(buffers.map((buffer, i) => client.read(i * 65536, buffer)));
  buffers.forEach((buffer, i) => assert.ok(buffer.every((b) => b === i + 1)));
  let dataExtents = 0;
  for await (const extent of client.extents("base:allocation")) {
    if (extent.flags & NbdStateFlag.ZERO) continue;
    const buffer = new Uint8Array(extent.length);
    await client.read(extent.offset, buffer); // would deadlock if extents() held the queue
    assert.ok(buffer.every((b) => b === extent.offset / 65536 + 1));
    dataExtents++;
  }
  assert.equal(dataExtents, 16);
});

Deno.test("NbdClient.connect() leaves with NBD_OPT_ABORT when negotiation fails", async () => {
  await using server = await startMemoryNbdServer({ size: 4096, exportName: "a" });
  await assert.rejects(
    NbdClient.connect(server.uri.replace("/a?", "/b?")),
    (error: unknown) => {
      assert.ok(error instanceof NbdError);
      assert.equal(error.reason, "option-failed");
      assert.equal(error.code, NbdRep.ERR_UNKNOWN);
      assert.match(error.message, /export "b" not found/);
      return true;
    },
  );
  await assert.rejects(NbdClient.connect(server.uri, { metaContexts: ["qemu:allocation-depth"] }), {
    reason: "unsupported",
    message: /did not select "qemu:allocation-depth"/,
  });
  assert.deepEqual(server.options, [
    NbdOpt.STRUCTURED_REPLY,
    NbdOpt.GO,
    NbdOpt.ABORT,
    NbdOpt.STRUCTURED_REPLY,
    NbdOpt.SET_META_CONTEXT,
    NbdOpt.ABORT,
  ]);
  assert.equal(server.requests.length, 0, "no NBD_CMD_DISC during negotiation");
});

/** Polls `condition` until it holds (the server logs asynchronously). */
async function waitFor(condition: () => boolean): Promise<void> {
  const deadline = Date.now() + 2000;
  while (!condition()) {
    assert.ok(Date.now() < deadline, "timed out waiting for the server");
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

Deno.test("NbdClient.close() sends NBD_CMD_DISC once and later calls fail as closed", async () => {
  await using server = await startMemoryNbdServer({ size: 4096 });
  const client = await NbdClient.connect(server.uri);
  await client.flush();
  await client.close();
  await client.close();
  await waitFor(() => server.requests.length >= 2);
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.deepEqual(server.requests.map((r) => r.type), [NbdCmd.FLUSH, NbdCmd.DISC]);
  await assert.rejects(client.flush(), {
    name: "NbdError",
    reason: "closed",
    message: /^Cannot flush: The NBD connection is closed$/,
  });
});

// ---------------------------------------------------------------------------------------
// Against misbehaving servers

/** The server end of one connection, for scripts. */
class Peer {
  readonly conn: Deno.Conn;
  constructor(conn: Deno.Conn) {
    this.conn = conn;
  }

  async send(...parts: Uint8Array[]): Promise<void> {
    for (const part of parts) {
      let written = 0;
      while (written < part.byteLength) written += await this.conn.write(part.subarray(written));
    }
  }

  async recv(size: number): Promise<Uint8Array<ArrayBuffer> | null> {
    const bytes = new Uint8Array(size);
    for (let filled = 0; filled < size;) {
      const count = await this.conn.read(bytes.subarray(filled));
      if (count === null) return null;
      filled += count;
    }
    return bytes;
  }

  greet(flags = 3): Promise<void> {
    return this.send(encodeHandshake(flags)).then(async () => {
      assert.ok(await this.recv(4), "client flags");
    });
  }

  async option(): Promise<{ option: number; data: Uint8Array }> {
    const header = await this.recv(NBD_OPTION_HEADER_SIZE);
    assert.ok(header, "the client closed instead of sending an option");
    const { option, length } = decodeOptionHeader(header);
    return { option, data: (await this.recv(length))! };
  }

  reply(option: number, type: number, data?: Uint8Array): Promise<void> {
    return this.send(encodeOptionReply(option, type, data));
  }

  /** Answers options as a good server until GO, for an export of `size` bytes. */
  async negotiate(size = MiB, flags = 0x48f): Promise<void> {
    await this.greet();
    while (true) {
      const { option } = await this.option();
      if (option === NbdOpt.STRUCTURED_REPLY) {
        await this.reply(option, NbdRep.ACK);
      } else if (option === NbdOpt.SET_META_CONTEXT) {
        await this.reply(option, NbdRep.META_CONTEXT, encodeMetaContextReply(1, "base:allocation"));
        await this.reply(option, NbdRep.ACK);
      } else if (option === NbdOpt.GO) {
        await this.reply(option, NbdRep.INFO, encodeInfoReply({ type: "export", size, flags }));
        await this.reply(option, NbdRep.ACK);
        return;
      } else {
        await this.reply(option, NbdRep.ERR_UNSUP);
      }
    }
  }

  async request(): Promise<NbdRequest> {
    const header = await this.recv(NBD_REQUEST_SIZE);
    assert.ok(header, "the client closed instead of sending a request");
    return decodeRequest(header);
  }

  chunk(cookie: bigint, type: number, payload: Uint8Array, flags = NbdReplyFlag.DONE) {
    return this.send(
      encodeChunkHeader({ flags, type, cookie, length: payload.byteLength }),
      payload,
    );
  }

  /** Asserts that the client closes the connection (possibly after sending more). */
  async expectClosed(): Promise<void> {
    const sink = new Uint8Array(65536);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      this.conn.close(); // ends the pending read
    }, 3000);
    try {
      while (true) {
        let count: number | null;
        try {
          count = await this.conn.read(sink);
        } catch {
          break; // reset by the client, or our timer
        }
        if (count === null) break;
      }
    } finally {
      clearTimeout(timer);
    }
    assert.ok(!timedOut, "the client did not close the connection");
  }
}

/**
 * Serves one connection with `script`. Resolves (never rejects) to the script's error, so
 * a failing script cannot become an unhandled rejection while the client still runs.
 */
async function serveOnce(
  listener: Deno.Listener,
  script: (peer: Peer) => Promise<void>,
): Promise<unknown> {
  try {
    const conn = await listener.accept();
    try {
      await script(new Peer(conn));
    } finally {
      try {
        conn.close();
      } catch {
        // Closed by expectClosed().
      }
    }
    return undefined;
  } catch (error) {
    return error;
  }
}

/** Runs `script` as the server of one connection while `act` runs as the client. */
async function withBadServer(
  script: (peer: Peer) => Promise<void>,
  act: (address: NbdAddress) => Promise<unknown>,
  expected: { reason: string; message: RegExp },
): Promise<void> {
  await withTempDir(async (dir) => {
    const path = `${dir}/bad.sock`;
    const listener = Deno.listen({ transport: "unix", path });
    const served = serveOnce(listener, script);
    const started = performance.now();
    try {
      await assert.rejects(act({ transport: "unix", path }), (error: unknown) => {
        assert.ok(error instanceof NbdError, `not an NbdError: ${error}`);
        assert.equal(error.reason, expected.reason, error.message);
        assert.match(error.message, expected.message);
        assert.match(error.message, /^Cannot /);
        assert.doesNotMatch(error.message, /\.$/);
        return true;
      });
      assert.ok(performance.now() - started < 2000, "the client gave up promptly");
      const scriptError = await served;
      if (scriptError !== undefined) throw scriptError;
    } finally {
      listener.close();
      await served;
    }
  });
}

const TIMEOUT = { timeoutMs: 200 };
const connectTo = (address: NbdAddress, options: NbdConnectOptions = {}) =>
  NbdClient.connect(address, { ...TIMEOUT, ...options });

/** Connects, then runs `use`; the client must end up closed. */
async function useClient(
  address: NbdAddress,
  use: (client: NbdClient) => Promise<unknown>,
  options: NbdConnectOptions = {},
): Promise<void> {
  const client = await connectTo(address, options);
  try {
    await use(client);
  } finally {
    const closed = client.closed;
    await client.close();
    assert.ok(closed, "an error closed the client");
  }
}

const readFirst = (address: NbdAddress) =>
  useClient(address, (client) => client.read(0, new Uint8Array(4096)));

interface BadCase {
  name: string;
  script: (peer: Peer) => Promise<void>;
  act: (address: NbdAddress) => Promise<unknown>;
  reason: string;
  message: RegExp;
}

const BAD_CASES: BadCase[] = [
  {
    name: "bad NBDMAGIC",
    script: async (peer) => {
      const greeting = encodeHandshake(3);
      greeting[0] = 0x58;
      await peer.send(greeting);
      await peer.expectClosed();
    },
    act: (address) => NbdClient.open(address, TIMEOUT),
    reason: "bad-magic",
    message: /not NBDMAGIC/,
  },
  {
    name: "oldstyle server",
    script: async (peer) => {
      const greeting = encodeHandshake(3);
      new DataView(greeting.buffer).setBigUint64(8, NBD_OLDSTYLE_MAGIC);
      await peer.send(greeting);
      await peer.expectClosed();
    },
    act: (address) => NbdClient.open(address, TIMEOUT),
    reason: "unsupported",
    message: /oldstyle/,
  },
  {
    name: "no FIXED_NEWSTYLE",
    script: async (peer) => {
      await peer.send(encodeHandshake(0));
      await peer.expectClosed();
    },
    act: (address) => NbdClient.open(address, TIMEOUT),
    reason: "not-fixed-newstyle",
    message: /fixed newstyle/,
  },
  {
    name: "silent during the handshake",
    script: (peer) => peer.expectClosed(),
    act: (address) => NbdClient.open(address, TIMEOUT),
    reason: "timeout",
    message:
      /^Cannot negotiate with the NBD server: The server made no progress for 200 ms while reading the server greeting$/,
  },
  {
    name: "option reply with an error type, then NBD_OPT_ABORT",
    script: async (peer) => {
      await peer.greet();
      const go = await peer.option();
      assert.equal(go.option, NbdOpt.STRUCTURED_REPLY);
      await peer.reply(go.option, NbdRep.ACK);
      const { option } = await peer.option();
      assert.equal(option, NbdOpt.GO);
      await peer.reply(option, NbdRep.ERR_POLICY, new TextEncoder().encode("go away"));
      const abort = await peer.option();
      assert.equal(abort.option, NbdOpt.ABORT, "leaves with NBD_OPT_ABORT, not NBD_CMD_DISC");
      await peer.reply(abort.option, NbdRep.ACK);
      await peer.expectClosed();
    },
    act: (address) => connectTo(address),
    reason: "option-failed",
    message: /NBD_OPT_GO with NBD_REP_ERR_POLICY: "go away"/,
  },
  {
    name: "option reply with a bad magic",
    script: async (peer) => {
      await peer.greet();
      const { option } = await peer.option();
      const reply = encodeOptionReply(option, NbdRep.ACK);
      reply[0] = 0xff;
      await peer.send(reply);
      await peer.expectClosed();
    },
    act: (address) => connectTo(address),
    reason: "bad-magic",
    message: /option reply/,
  },
  {
    name: "option reply to another option",
    script: async (peer) => {
      await peer.greet();
      await peer.option();
      await peer.reply(NbdOpt.LIST, NbdRep.ACK);
      await peer.expectClosed();
    },
    act: (address) => connectTo(address),
    reason: "unexpected-reply",
    message: /replied to NBD_OPT_LIST instead of NBD_OPT_STRUCTURED_REPLY/,
  },
  {
    name: "oversized option reply",
    script: async (peer) => {
      await peer.greet();
      const { option } = await peer.option();
      const reply = encodeOptionReply(option, NbdRep.INFO);
      new DataView(reply.buffer).setUint32(16, 0x7fffffff);
      await peer.send(reply);
      await peer.expectClosed();
    },
    act: (address) => connectTo(address),
    reason: "payload-too-large",
    message: /2147483647-byte reply/,
  },
  {
    name: "truncated NBD_INFO_EXPORT",
    script: async (peer) => {
      await peer.greet();
      await peer.reply((await peer.option()).option, NbdRep.ACK);
      const { option } = await peer.option();
      await peer.reply(option, NbdRep.INFO, new Uint8Array([0, NbdInfo.EXPORT, 0, 0, 1]));
      await peer.expectClosed();
    },
    act: (address) => connectTo(address),
    reason: "malformed",
    message: /NBD_INFO_EXPORT information: It has 5 bytes instead of 12/,
  },
  {
    name: "GO acknowledged without NBD_INFO_EXPORT",
    script: async (peer) => {
      await peer.greet();
      await peer.reply((await peer.option()).option, NbdRep.ACK);
      await peer.reply((await peer.option()).option, NbdRep.ACK);
      await peer.expectClosed();
    },
    act: (address) => connectTo(address),
    reason: "unexpected-reply",
    message: /without NBD_INFO_EXPORT/,
  },
  {
    name: "invalid block sizes",
    script: async (peer) => {
      await peer.greet();
      await peer.reply((await peer.option()).option, NbdRep.ACK);
      const { option } = await peer.option();
      await peer.reply(
        option,
        NbdRep.INFO,
        encodeInfoReply({ type: "export", size: MiB, flags: 1 }),
      );
      await peer.reply(
        option,
        NbdRep.INFO,
        encodeInfoReply({ type: "block-size", minimum: 3, preferred: 4096, maximum: MiB }),
      );
      await peer.reply(option, NbdRep.ACK);
      await peer.expectClosed();
    },
    act: (address) => connectTo(address),
    reason: "unexpected-reply",
    message: /invalid block sizes \(minimum 3/,
  },
  {
    name: "meta context reply with a duplicate id",
    script: async (peer) => {
      await peer.greet();
      await peer.reply((await peer.option()).option, NbdRep.ACK);
      const { option, data } = await peer.option();
      assert.deepEqual(decodeMetaContextRequest(data).queries, ["base:allocation", "qemu:x"]);
      await peer.reply(option, NbdRep.META_CONTEXT, encodeMetaContextReply(1, "base:allocation"));
      await peer.reply(option, NbdRep.META_CONTEXT, encodeMetaContextReply(1, "qemu:x"));
      await peer.expectClosed();
    },
    act: (address) => connectTo(address, { metaContexts: ["base:allocation", "qemu:x"] }),
    reason: "unexpected-reply",
    message: /gave id 1 to both/,
  },
  {
    name: "reply with a wrong cookie",
    script: async (peer) => {
      await peer.negotiate();
      const request = await peer.request();
      await peer.send(encodeSimpleReply(0, request.cookie + 1n));
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "unexpected-cookie",
    message: /cookie 2, but the request in flight has 1/,
  },
  {
    name: "bad reply magic",
    script: async (peer) => {
      await peer.negotiate();
      await peer.request();
      await peer.send(new Uint8Array(20).fill(0x41));
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "bad-magic",
    message: /reply magic is 0x41414141/,
  },
  {
    name: "structured chunk longer than the cap",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      await peer.send(
        encodeChunkHeader({ flags: 1, type: NbdReplyType.ERROR, cookie, length: 0xfffffff0 }),
      );
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "payload-too-large",
    message: /4294967280-byte NBD_REPLY_TYPE_ERROR chunk/,
  },
  {
    name: "OFFSET_DATA outside the requested range",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      const payload = new Uint8Array(8 + 4096);
      payload.set(encodeOffsetDataPrefix(2048));
      await peer.chunk(cookie, NbdReplyType.OFFSET_DATA, payload);
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "unexpected-reply",
    message: /OFFSET_DATA chunk covers 2048\.\.6144, outside the requested 0\.\.4096/,
  },
  {
    name: "OFFSET_HOLE with a wrong length",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      await peer.chunk(cookie, NbdReplyType.OFFSET_HOLE, new Uint8Array(8));
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "malformed",
    message: /OFFSET_HOLE chunk has 8 bytes instead of 12/,
  },
  {
    name: "unknown chunk type",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      await peer.chunk(cookie, 3, new Uint8Array(4));
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "unexpected-reply",
    message: /NBD_CMD_READ with a chunk of type NBD_REPLY_TYPE_3/,
  },
  {
    name: "error chunk whose message does not fit",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      await peer.chunk(cookie, NbdReplyType.ERROR, new Uint8Array([0, 0, 0, 5, 0, 200, 65, 66]));
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "malformed",
    message: /message length 200 does not fit/,
  },
  {
    name: "DONE before the range is covered",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      await peer.chunk(
        cookie,
        NbdReplyType.OFFSET_HOLE,
        encodeOffsetHole({ offset: 0, size: 2048 }),
      );
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "unexpected-reply",
    message: /leave 2048\.\.4096 uncovered/,
  },
  {
    name: "overlapping content chunks",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      const hole = encodeOffsetHole({ offset: 0, size: 4096 });
      await peer.chunk(cookie, NbdReplyType.OFFSET_HOLE, hole, 0);
      await peer.chunk(cookie, NbdReplyType.OFFSET_HOLE, hole, 0);
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "unexpected-reply",
    message: /overlapping/,
  },
  {
    name: "simple reply with data after structured replies were negotiated",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      await peer.send(encodeSimpleReply(0, cookie), new Uint8Array(4096));
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "unexpected-reply",
    message: /simple reply with data/,
  },
  {
    name: "structured chunk without structured replies",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      await peer.chunk(cookie, NbdReplyType.NONE, new Uint8Array(0));
      await peer.expectClosed();
    },
    act: (address) =>
      useClient(address, (c) => c.read(0, new Uint8Array(512)), { structuredReplies: false }),
    reason: "unexpected-reply",
    message: /without negotiating them/,
  },
  {
    name: "connection dropped mid-reply",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      await peer.send(
        encodeChunkHeader({ flags: 1, type: NbdReplyType.OFFSET_DATA, cookie, length: 8 + 4096 }),
        encodeOffsetDataPrefix(0),
        new Uint8Array(100),
      );
    },
    act: readFirst,
    reason: "disconnected",
    message:
      /^Cannot read 4096 bytes at offset 0: The server closed the connection after 100 of 4096 bytes of the data of an OFFSET_DATA chunk$/,
  },
  {
    name: "silent server during a read",
    script: async (peer) => {
      await peer.negotiate();
      await peer.request();
      await peer.expectClosed();
    },
    act: readFirst,
    reason: "timeout",
    message:
      /^Cannot read 4096 bytes at offset 0: The server made no progress for 200 ms while reading a reply header$/,
  },
  {
    name: "server that stops reading during a large write",
    script: async (peer) => {
      await peer.negotiate(64 * MiB, 0x4d); // writable
      await peer.request();
      await new Promise((resolve) => setTimeout(resolve, 600));
    },
    act: (address) => useClient(address, (c) => c.write(0, new Uint8Array(16 * MiB))),
    reason: "timeout",
    message:
      /^Cannot write 16777216 bytes at offset 0: The server made no progress for 200 ms while sending the data of NBD_CMD_WRITE$/,
  },
  {
    name: "block status for a context that was not selected",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      const payload = encodeBlockStatusChunk({
        contextId: 9,
        descriptors: [{ length: 512, flags: 0 }],
      });
      await peer.chunk(cookie, NbdReplyType.BLOCK_STATUS, payload);
      await peer.expectClosed();
    },
    act: (address) =>
      useClient(address, (c) => c.blockStatus(0, 4096), { metaContexts: ["base:allocation"] }),
    reason: "unexpected-reply",
    message: /context id 9, which was not selected/,
  },
  {
    name: "block status extents beyond the request",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      const payload = encodeBlockStatusChunk({
        contextId: 1,
        descriptors: [{ length: 4096, flags: 0 }, { length: 4096, flags: 3 }],
      });
      await peer.chunk(cookie, NbdReplyType.BLOCK_STATUS, payload);
      await peer.expectClosed();
    },
    act: (address) =>
      useClient(address, (c) => c.blockStatus(0, 4096), { metaContexts: ["base:allocation"] }),
    reason: "unexpected-reply",
    message: /2 extents of "base:allocation" do not fit a 4096-byte request/,
  },
  {
    name: "block status without a chunk for a selected context",
    script: async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      await peer.chunk(cookie, NbdReplyType.NONE, new Uint8Array(0));
      await peer.expectClosed();
    },
    act: (address) =>
      useClient(address, (c) => c.blockStatus(0, 4096), { metaContexts: ["base:allocation"] }),
    reason: "unexpected-reply",
    message: /no extents for "base:allocation"/,
  },
];

for (const badCase of BAD_CASES) {
  Deno.test(`NbdClient with a misbehaving server: ${badCase.name}`, async () => {
    await withBadServer(badCase.script, badCase.act, badCase);
  });
}

Deno.test("NbdClient answers ESHUTDOWN with NBD_CMD_DISC and closes", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/shutdown.sock`;
    using listener = Deno.listen({ transport: "unix", path });
    const served = serveOnce(listener, async (peer) => {
      await peer.negotiate();
      const { cookie } = await peer.request();
      await peer.chunk(
        cookie,
        NbdReplyType.ERROR,
        encodeErrorChunk({ error: NbdErrno.ESHUTDOWN, message: "bye" }),
      );
      assert.equal((await peer.request()).type, NbdCmd.DISC);
      await peer.expectClosed();
    });
    const client = await connectTo({ transport: "unix", path });
    await assert.rejects(client.read(0, new Uint8Array(512)), {
      reason: "command-failed",
      code: NbdErrno.ESHUTDOWN,
    });
    assert.ok(client.closed);
    await assert.rejects(client.read(0, new Uint8Array(512)), { reason: "closed" });
    assert.equal(await served, undefined);
  });
});

Deno.test("NbdClient: a failed connection rejects later calls as closed", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/drop.sock`;
    using listener = Deno.listen({ transport: "unix", path });
    const served = serveOnce(listener, async (peer) => {
      await peer.negotiate();
      await peer.request();
    });
    const client = await connectTo({ transport: "unix", path });
    await assert.rejects(client.read(0, new Uint8Array(512)), { reason: "disconnected" });
    assert.equal(await served, undefined);
    assert.ok(client.closed);
    await assert.rejects(client.read(0, new Uint8Array(512)), (error: unknown) => {
      assert.ok(error instanceof NbdError);
      assert.equal(error.reason, "closed");
      assert.match(
        error.message,
        /closed \(Cannot read 512 bytes at offset 0: The server closed the connection after 0 of 16 bytes of a reply header\)$/,
      );
      assert.ok(error.cause instanceof NbdError);
      return true;
    });
    await client.close();
  });
});
