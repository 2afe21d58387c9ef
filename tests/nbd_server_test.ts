// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The NBD server at the protocol level: a raw client that sends exactly the bytes a test
 * needs (bad requests, pipelined requests, dropped connections), our NbdClient, and a
 * fast-check round trip. Real clients (QEMU, nbdinfo, nbdcopy) are in
 * nbd_server_tools_test.ts.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { NbdClient } from "../lib/protocols/nbd_client.ts";
import { NbdMemoryExport } from "../lib/protocols/nbd_memory_export.ts";
import {
  decodeBlockStatusChunk,
  decodeErrorChunk,
  decodeInfoReply,
  decodeOffsetDataPrefix,
  decodeOffsetHole,
  decodeServerReply,
  encodeExportInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  NbdCmd,
  NbdCmdFlag,
  NbdErrno,
  NbdError,
  NbdInfo,
  NbdOpt,
  NbdRep,
  NbdReplyFlag,
  NbdReplyType,
  NbdTransmissionFlag,
} from "../lib/protocols/nbd_protocol.ts";
import {
  type NbdExportHandler,
  NbdServer,
  type NbdServerOptions,
} from "../lib/protocols/nbd_server.ts";
import { randomBytes } from "./_utils.ts";
import { contentOf, errnoOf, RawClient } from "./_nbd_raw.ts";

const MiB = 1 << 20;
const LOCAL = { hostname: "127.0.0.1", port: 0 };

/** Runs `fn` with a server of `exports` on localhost TCP; its log lines are collected. */
async function withServer(
  exports: Record<string, NbdExportHandler>,
  fn: (server: NbdServer, lines: string[]) => Promise<void>,
  options: NbdServerOptions = {},
): Promise<void> {
  const lines: string[] = [];
  const server = NbdServer.listen(LOCAL, exports, {
    logger: (line) => lines.push(line),
    ...options,
  });
  try {
    await fn(server, lines);
  } finally {
    await server.close();
  }
}

async function waitFor(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 3000;
  while (!condition()) {
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

// ---------------------------------------------------------------------------------------
// Bad requests

Deno.test("NbdServer: writes and trims to a read-only export get EPERM; the connection goes on", async () => {
  const data = randomBytes(65536, 1);
  for (const structured of [true, false]) {
    await withServer({ ro: new NbdMemoryExport(data, { readOnly: true }) }, async (server) => {
      const client = await RawClient.connect(server);
      try {
        const { flags } = await client.go("ro", { structured });
        assert.ok(flags & NbdTransmissionFlag.READ_ONLY);
        await client.request(NbdCmd.WRITE, 0, 512, { payload: new Uint8Array(512).fill(1) });
        assert.equal(errnoOf(await client.reply()), NbdErrno.EPERM);
        await client.request(NbdCmd.TRIM, 0, 4096);
        assert.equal(errnoOf(await client.reply()), NbdErrno.EPERM);
        await client.request(NbdCmd.WRITE_ZEROES, 0, 4096);
        assert.equal(errnoOf(await client.reply()), NbdErrno.EPERM);
        // The refused payload was skipped: the next request is read correctly.
        await client.request(NbdCmd.READ, 512, 512);
        const read = structured
          ? contentOf(await client.reply(), 512, 512)
          : (await client.simple(512)).data;
        assert.deepEqual(read, data.subarray(512, 1024));
      } finally {
        client.close();
      }
    });
  }
});

Deno.test("NbdServer: EINVAL past the end, unaligned, oversized, unknown; ENOSPC for writes past the end", async () => {
  const memory = new NbdMemoryExport(MiB, {
    blockSizes: { minimum: 512, preferred: 4096, maximum: 65536 },
  });
  await withServer({ m: memory, wo: { size: MiB, write: () => {} } }, async (server, lines) => {
    const client = await RawClient.connect(server);
    try {
      await client.go("m");
      const expect = async (errno: number, message: RegExp) => {
        const reply = await client.reply();
        assert.equal(errnoOf(reply), errno);
        const error = reply.find((chunk) => chunk.type & 0x8000)!;
        assert.match(decodeErrorChunk(error.type, error.payload).message, message);
      };
      await client.request(NbdCmd.READ, MiB - 512, 1024);
      await expect(NbdErrno.EINVAL, /past the end of the 1048576-byte export/);
      await client.request(NbdCmd.READ, 100, 512);
      await expect(NbdErrno.EINVAL, /not aligned to 512 bytes/);
      await client.request(NbdCmd.READ, 0, 131072);
      await expect(NbdErrno.EINVAL, /more than the maximum of 65536/);
      await client.request(NbdCmd.WRITE, MiB - 512, 1024, { payload: new Uint8Array(1024) });
      await expect(NbdErrno.ENOSPC, /past the end/);
      await client.request(NbdCmd.WRITE_ZEROES, MiB, 512);
      await expect(NbdErrno.ENOSPC, /past the end/);
      await client.request(NbdCmd.TRIM, MiB, 512);
      await expect(NbdErrno.EINVAL, /past the end/);
      await client.request(42, 0, 0);
      await expect(NbdErrno.EINVAL, /not a known command/);
      await client.request(NbdCmd.WRITE_ZEROES, 0, 512, { flags: NbdCmdFlag.FAST_ZERO });
      await expect(NbdErrno.EINVAL, /flags 0x10 are not valid/);
      await client.request(NbdCmd.BLOCK_STATUS, 0, 4096);
      await expect(NbdErrno.EINVAL, /no metadata context is selected/);
      // None of it reached the export or broke the connection.
      await client.request(NbdCmd.WRITE, 4096, 512, { payload: new Uint8Array(512).fill(7) });
      assert.equal(errnoOf(await client.reply()), 0);
      assert.equal(memory.data[4096], 7);
      assert.equal(lines.filter((line) => /dropped|failed/.test(line)).length, 0);
    } finally {
      client.close();
    }
    const writeOnly = await RawClient.connect(server);
    try {
      await writeOnly.go("wo");
      await writeOnly.request(NbdCmd.READ, 0, 512);
      assert.equal(errnoOf(await writeOnly.reply()), NbdErrno.EINVAL);
    } finally {
      writeOnly.close();
    }
  });
});

Deno.test("NbdServer: a malformed request drops only that client, with one log line", async () => {
  const data = randomBytes(256 * 1024, 2);
  await withServer({ d: new NbdMemoryExport(data) }, async (server, lines) => {
    await using good = await NbdClient.connect(server.uri("d"));
    const bad = await RawClient.connect(server);
    try {
      await bad.go("d");
      await bad.send(new Uint8Array(28).fill(0x41)); // no request magic: the framing is lost
      assert.ok(await bad.closedByServer(), "the server closed the bad connection");
    } finally {
      bad.close();
    }
    const mine = lines.filter((line) => /^connection 2[ :]/.test(line));
    assert.equal(mine.length, 3, mine.join("\n")); // opened, export chosen, dropped
    assert.equal(
      mine[2],
      "connection 2 dropped: Cannot decode a request: Its magic is 0x41414141, not 0x25609513",
    );
    const buffer = new Uint8Array(data.byteLength);
    await good.read(0, buffer);
    assert.deepEqual(buffer, data);
    // A bad option magic during the handshake drops the client as well.
    const badOption = await RawClient.connect(server);
    try {
      await badOption.greet();
      await badOption.send(new Uint8Array(16).fill(0x42));
      assert.ok(await badOption.closedByServer());
    } finally {
      badOption.close();
    }
    await waitFor(
      () => lines.some((line) => /connection 3 dropped: .*IHAVEOPT/.test(line)),
      "a log line",
    );
    await good.flush();
  });
});

Deno.test("NbdServer: clients that leave mid-read or mid-write do not disturb the others", async () => {
  const data = randomBytes(8 * MiB, 3);
  await withServer({ d: new NbdMemoryExport(data) }, async (server, lines) => {
    await using good = await NbdClient.connect(server.uri("d"));
    const reader = await RawClient.connect(server);
    await reader.go("d");
    await reader.request(NbdCmd.READ, 0, 8 * MiB);
    await reader.must(1000); // part of the reply, then gone
    reader.close();
    const writer = await RawClient.connect(server);
    await writer.go("d");
    await writer.send(
      encodeRequest({ flags: 0, type: NbdCmd.WRITE, cookie: 1n, offset: 0, length: MiB }),
      new Uint8Array(1000),
    );
    writer.close();
    await waitFor(
      () => lines.some((line) => /connection 3 dropped: .*mid-write/.test(line)),
      "the drop",
    );
    const buffer = new Uint8Array(MiB);
    await good.read(4 * MiB, buffer);
    assert.deepEqual(buffer, data.subarray(4 * MiB, 5 * MiB));
  });
});

Deno.test("NbdServer: many clients at once; one over maxConnections is refused", async () => {
  const data = randomBytes(2 * MiB, 4);
  await withServer({ d: new NbdMemoryExport(data) }, async (server, lines) => {
    const clients = await Promise.all(
      Array.from(
        { length: 8 },
        () => NbdClient.connect(server.uri("d"), { metaContexts: ["base:allocation"] }),
      ),
    );
    try {
      await Promise.all(clients.map(async (client, i) => {
        const buffer = new Uint8Array(256 * 1024);
        for (let round = 0; round < 4; round++) {
          const offset = ((i + round * 8) % 8) * 256 * 1024;
          await client.read(offset, buffer);
          assert.deepEqual(buffer, data.subarray(offset, offset + buffer.byteLength));
        }
      }));
      await assert.rejects(NbdClient.connect(server.uri("d"), { timeoutMs: 2000 }), NbdError);
      assert.ok(lines.some((line) => line === "connection 9 refused: 8 connections are open"));
      await clients[0]!.close();
      await waitFor(() => lines.some((line) => /^connection 1 closed/.test(line)), "a free slot");
      await using late = await NbdClient.connect(server.uri("d"));
      assert.equal(late.info.size, data.byteLength);
    } finally {
      await Promise.all(clients.map((client) => client.close()));
    }
    assert.ok(server.stats.reads >= 32);
  }, { maxConnections: 8 });
});

Deno.test("NbdServer: close() resolves promptly while handlers never settle; pending requests get ESHUTDOWN", async () => {
  const never = () => new Promise<never>(() => {});
  const signals: AbortSignal[] = [];
  const stuck: NbdExportHandler = {
    size: MiB,
    read: (_offset, _length, context) => {
      signals.push(context.signal);
      return never();
    },
    // Push mode's stalled target: it takes the data, then waits for a queue that never drains.
    write: async (_offset, length, read, context) => {
      await read(new Uint8Array(length));
      signals.push(context.signal);
      await never();
    },
    blockStatus: (_offset, _length, context) => {
      signals.push(context.signal);
      return never();
    },
  };
  const server = NbdServer.listen(LOCAL, { stuck });
  const client = await RawClient.connect(server);
  try {
    await client.go("stuck", { contexts: ["base:allocation"] });
    await client.request(NbdCmd.READ, 0, 4096);
    await client.request(NbdCmd.BLOCK_STATUS, 0, 4096);
    await client.request(NbdCmd.WRITE, 0, 4096, { payload: new Uint8Array(4096) });
    await waitFor(() => signals.length === 3, "the requests to reach the handlers");
    const started = performance.now();
    await server.close();
    const took = performance.now() - started;
    assert.ok(took < 1000, `close() took ${took} ms`);
    assert.ok(signals.every((signal) => signal.aborted), "the handlers were told to give up");
    const errors = [await client.reply(), await client.reply(), await client.reply()].map(errnoOf);
    assert.deepEqual(errors, [NbdErrno.ESHUTDOWN, NbdErrno.ESHUTDOWN, NbdErrno.ESHUTDOWN]);
    assert.ok(await client.closedByServer());
  } finally {
    client.close();
    await server.close();
  }
});

Deno.test("NbdServer: close() resolves promptly while a write handler never takes its data", async () => {
  const server = NbdServer.listen(LOCAL, {
    stuck: { size: MiB, write: () => new Promise<never>(() => {}) },
  });
  const client = await RawClient.connect(server);
  try {
    await client.go("stuck", { structured: false });
    await client.request(NbdCmd.WRITE, 0, 65536, { payload: new Uint8Array(65536) });
    await client.request(NbdCmd.FLUSH, 0, 0); // behind the write, never read by the server
    await new Promise((resolve) => setTimeout(resolve, 20));
    const started = performance.now();
    await server.close();
    assert.ok(performance.now() - started < 1000, "close() did not wait for the handler");
    assert.ok(await client.closedByServer());
  } finally {
    client.close();
  }
});

Deno.test("NbdServer: a client that left frees its connection slot even while its handler is stuck", async () => {
  let release!: () => void;
  const released = new Promise<void>((resolve) => release = resolve);
  const handler: NbdExportHandler = {
    size: MiB,
    read: async (_offset, length) => {
      await released;
      return new Uint8Array(length);
    },
  };
  await withServer({ h: handler }, async (server, lines) => {
    const first = await RawClient.connect(server);
    await first.go("h");
    await first.request(NbdCmd.READ, 0, 4096);
    first.close();
    await waitFor(
      () => lines.some((line) => /^connection 1 closed/.test(line)),
      "the first to leave",
    );
    let left = false;
    server.disconnected.then(() => left = true);
    await new Promise((resolve) => setTimeout(resolve, 30));
    assert.equal(left, false, "not disconnected while the first client's read is pending");
    const second = await NbdClient.connect(server.uri("h"), { timeoutMs: 2000 });
    assert.equal(second.info.size, MiB, "the stuck connection does not hold the only slot");
    release();
    await second.read(0, new Uint8Array(512));
    await second.close();
    await server.disconnected;
  }, { maxConnections: 1 });
});

Deno.test("NbdServer: a failing handler answers its errno (EIO by default) and logs one line", async () => {
  const handler: NbdExportHandler = {
    size: MiB,
    read: () => {
      throw new Error("disk on fire");
    },
    write: async (_offset, length, read) => {
      if (length > 4096) throw new NbdError("command-failed", "quota", { code: NbdErrno.ENOSPC });
      await read(new Uint8Array(length));
    },
  };
  await withServer({ h: handler }, async (server, lines) => {
    await using client = await NbdClient.connect(server.uri("h"));
    await assert.rejects(client.read(0, new Uint8Array(512)), (error: unknown) => {
      assert.ok(error instanceof NbdError);
      assert.equal(error.code, NbdErrno.EIO);
      assert.match(error.message, /disk on fire/);
      return true;
    });
    // Refused before the handler read the payload: the payload is skipped.
    await assert.rejects(client.write(0, new Uint8Array(8192)), { code: NbdErrno.ENOSPC });
    await client.write(0, new Uint8Array(4096));
    assert.deepEqual(lines.filter((line) => / failed with /.test(line)), [
      "connection 1: NBD_CMD_READ of 512 bytes at 0 failed with EIO: disk on fire",
      "connection 1: NBD_CMD_WRITE of 8192 bytes at 0 failed with ENOSPC: quota",
    ]);
    assert.equal(server.stats.errors, 2);
    assert.equal(server.stats.writes, 1);
  });
});

// ---------------------------------------------------------------------------------------
// Replies

Deno.test("NbdServer: structured reads send OFFSET_HOLE for zero blocks, one chunk with DF", async () => {
  const data = new Uint8Array(65536);
  data.fill(1, 0, 8192);
  data.fill(2, 40960, 65536);
  const fromBytes: NbdExportHandler = {
    size: data.byteLength,
    read: (o, l) => data.slice(o, o + l),
  };
  await withServer({ bytes: fromBytes, chunks: new NbdMemoryExport(data) }, async (server) => {
    for (const name of ["bytes", "chunks"]) {
      const client = await RawClient.connect(server);
      try {
        const { flags } = await client.go(name);
        assert.ok(flags & NbdTransmissionFlag.SEND_DF);
        await client.request(NbdCmd.READ, 4096, 61440);
        const chunks = await client.reply();
        assert.deepEqual(
          chunks.map((
            c,
          ) => [
            c.type,
            c.type === NbdReplyType.OFFSET_HOLE
              ? decodeOffsetHole(c.payload)
              : decodeOffsetDataPrefix(c.payload),
          ]),
          [
            [NbdReplyType.OFFSET_DATA, 4096],
            [NbdReplyType.OFFSET_HOLE, { offset: 8192, size: 32768 }],
            [NbdReplyType.OFFSET_DATA, 40960],
          ],
          name,
        );
        assert.deepEqual(contentOf(chunks, 4096, 61440), data.subarray(4096));
        await client.request(NbdCmd.READ, 0, 65536, { flags: NbdCmdFlag.DF });
        const whole = await client.reply();
        assert.equal(whole.length, 1);
        assert.equal(whole[0]!.type, NbdReplyType.OFFSET_DATA);
        assert.deepEqual(whole[0]!.payload.subarray(8), data);
        await client.request(NbdCmd.READ, 0, 0);
        assert.deepEqual((await client.reply()).map((c) => c.type), [NbdReplyType.NONE]);
      } finally {
        client.close();
      }
    }
  });
});

Deno.test("NbdServer: chunks go out in the handler's order; chunks that do not cover the range are EIO", async () => {
  const data = new Uint8Array(16384).fill(3);
  const handler: NbdExportHandler = {
    size: data.byteLength,
    read: (offset, length) =>
      offset === 0
        ? [
          { type: "data", offset: 8192, data: data.subarray(8192, 16384) },
          { type: "hole", offset: 4096, length: 4096 },
          { type: "data", offset: 0, data: data.subarray(0, 4096) },
        ]
        : [{ type: "data", offset, data: data.subarray(offset, offset + length - 1) }],
  };
  await withServer({ h: handler }, async (server, lines) => {
    const client = await RawClient.connect(server);
    try {
      await client.go("h");
      await client.request(NbdCmd.READ, 0, 16384);
      const chunks = await client.reply();
      assert.deepEqual(
        chunks.map((c) =>
          c.type === NbdReplyType.OFFSET_HOLE
            ? decodeOffsetHole(c.payload).offset
            : decodeOffsetDataPrefix(c.payload)
        ),
        [8192, 4096, 0],
      );
      assert.deepEqual(chunks.map((c) => c.flags), [0, 0, NbdReplyFlag.DONE]);
      await client.request(NbdCmd.READ, 4096, 4096);
      assert.equal(errnoOf(await client.reply()), NbdErrno.EIO);
      assert.ok(lines.some((line) => /chunks end at 8191, not at 8192/.test(line)));
    } finally {
      client.close();
    }
  });
});

Deno.test("NbdServer: simple replies for a client without structured replies", async () => {
  const data = randomBytes(3 * MiB, 5);
  data.fill(0, MiB, 2 * MiB);
  for (const serverOptions of [{}, { structuredReplies: false }]) {
    await withServer({ d: new NbdMemoryExport(data) }, async (server) => {
      await using client = await NbdClient.connect(server.uri("d"), {
        structuredReplies: false,
        maxRequestSize: MiB,
      });
      assert.equal(client.structuredReplies, false);
      assert.ok(!(client.info.flags & NbdTransmissionFlag.SEND_DF));
      const before = client.bytesReceived;
      const buffer = new Uint8Array(data.byteLength);
      await client.read(0, buffer);
      assert.deepEqual(buffer, data);
      assert.equal(
        client.bytesReceived - before,
        data.byteLength + 3 * 16,
        "3 simple replies, holes as bytes",
      );
    }, serverOptions);
  }
});

Deno.test("NbdServer: block status with and without REQ_ONE: clipped, merged, capped", async () => {
  const handler: NbdExportHandler = {
    size: MiB,
    blockStatus: () => [
      { length: 65536, flags: 0 },
      { length: 65536, flags: 0 }, // merged with the first
      { length: 131072, flags: 3 },
      { length: 65536, flags: 0 },
      { length: 2 * MiB, flags: 3 }, // past the end of the request: clipped
    ],
    read: (_offset, length) => new Uint8Array(length),
  };
  await withServer({
    h: handler,
    none: { size: MiB, read: (_offset, length) => new Uint8Array(length) },
  }, async (server) => {
    const client = await RawClient.connect(server);
    try {
      await client.go("h", { contexts: ["base:allocation"] });
      const status = async (flags: number, length: number) => {
        await client.request(NbdCmd.BLOCK_STATUS, 0, length, { flags });
        const [chunk, ...rest] = await client.reply();
        assert.equal(rest.length, 0);
        assert.equal(chunk!.type, NbdReplyType.BLOCK_STATUS);
        return decodeBlockStatusChunk(chunk!.payload);
      };
      assert.deepEqual(await status(0, 524288), {
        contextId: 1,
        descriptors: [{ length: 131072, flags: 0 }, { length: 131072, flags: 3 }, {
          length: 65536,
          flags: 0,
        }, { length: 196608, flags: 3 }],
      });
      assert.deepEqual((await status(NbdCmdFlag.REQ_ONE, 100 * 512)).descriptors, [{
        length: 51200,
        flags: 0,
      }]);
    } finally {
      client.close();
    }
    // An export without blockStatus offers no context.
    const listing = await RawClient.connect(server);
    try {
      await listing.greet();
      await listing.option(NbdOpt.STRUCTURED_REPLY);
      const list = await listing.option(
        NbdOpt.LIST_META_CONTEXT,
        encodeMetaContextRequest("none", []),
      );
      assert.deepEqual(list.map((r) => r.type), [NbdRep.ACK]);
      const offered = await listing.option(
        NbdOpt.LIST_META_CONTEXT,
        encodeMetaContextRequest("h", ["base:"]),
      );
      assert.deepEqual(offered.map((r) => r.type), [NbdRep.META_CONTEXT, NbdRep.ACK]);
      // "base:" lists contexts but selects none.
      const set = await listing.option(
        NbdOpt.SET_META_CONTEXT,
        encodeMetaContextRequest("h", ["base:"]),
      );
      assert.deepEqual(set.map((r) => r.type), [NbdRep.ACK]);
    } finally {
      listing.close();
    }
  }, { maxExtents: 4 });
});

// ---------------------------------------------------------------------------------------
// Handshake

const F = NbdTransmissionFlag;
/** A writable export shared by all connections, without structured replies (no SEND_DF). */
const WRITABLE_FLAGS = F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM | F.SEND_WRITE_ZEROES |
  F.CAN_MULTI_CONN | F.SEND_CACHE;

Deno.test("NbdServer: LIST, INFO with NAME and DESCRIPTION, the default export, ERR_UNSUP", async () => {
  const exports = {
    "drive-scsi0": new NbdMemoryExport(4096, { description: "boot" }),
    "drive-scsi1": new NbdMemoryExport(8192),
  };
  await withServer(exports, async (server) => {
    const client = await RawClient.connect(server);
    try {
      assert.equal(await client.greet(), 3);
      const list = await client.option(NbdOpt.LIST);
      assert.deepEqual(list.slice(0, -1).map((r) => decodeServerReply(r.data)), [
        { name: "drive-scsi0", description: "boot" },
        { name: "drive-scsi1", description: "" },
      ]);
      assert.equal(
        (await client.option(NbdOpt.LIST, new Uint8Array(1)))[0]!.type,
        NbdRep.ERR_INVALID,
      );
      const info = await client.option(
        NbdOpt.INFO,
        encodeExportInfoRequest("", [NbdInfo.NAME, NbdInfo.DESCRIPTION, NbdInfo.BLOCK_SIZE]),
      );
      assert.deepEqual(info.slice(0, -1).map((r) => decodeInfoReply(r.data)), [
        { type: "export", size: 4096, flags: WRITABLE_FLAGS },
        { type: "block-size", minimum: 1, preferred: 4096, maximum: 32 * MiB },
        { type: "name", name: "drive-scsi0" },
        { type: "description", description: "boot" },
      ]);
      const unknown = await client.option(NbdOpt.INFO, encodeExportInfoRequest("nope"));
      assert.equal(unknown[0]!.type, NbdRep.ERR_UNKNOWN);
      assert.equal(new TextDecoder().decode(unknown[0]!.data), 'export "nope" not found');
      for (const option of [NbdOpt.STARTTLS, NbdOpt.EXTENDED_HEADERS, 99]) {
        assert.equal((await client.option(option))[0]!.type, NbdRep.ERR_UNSUP);
      }
      assert.equal(
        (await client.option(
          NbdOpt.SET_META_CONTEXT,
          encodeMetaContextRequest("", ["base:allocation"]),
        ))[0]!.type,
        NbdRep.ERR_INVALID,
        "structured replies first",
      );
      assert.deepEqual((await client.option(NbdOpt.ABORT)).map((r) => r.type), [NbdRep.ACK]);
      assert.ok(await client.closedByServer());
    } finally {
      client.close();
    }
  }, { defaultExport: "drive-scsi0" });
});

Deno.test("NbdServer: NBD_OPT_EXPORT_NAME enters transmission; an unknown name drops the client", async () => {
  const data = randomBytes(8192, 6);
  await withServer({ d: new NbdMemoryExport(data) }, async (server, lines) => {
    for (const clientFlags of [3, 1]) {
      const client = await RawClient.connect(server);
      try {
        await client.greet(clientFlags);
        await client.send(encodeOption(NbdOpt.EXPORT_NAME, new TextEncoder().encode("d")));
        const reply = await client.must(clientFlags & 2 ? 10 : 134);
        assert.equal(new DataView(reply.buffer).getUint32(4), 8192);
        await client.request(NbdCmd.READ, 0, 8192);
        assert.deepEqual((await client.simple(8192)).data, data);
      } finally {
        client.close();
      }
    }
    const lost = await RawClient.connect(server);
    try {
      await lost.greet();
      await lost.send(encodeOption(NbdOpt.EXPORT_NAME, new TextEncoder().encode("x")));
      assert.ok(await lost.closedByServer());
    } finally {
      lost.close();
    }
    await waitFor(
      () => lines.some((line) => /dropped: it asked for the unknown export "x"/.test(line)),
      "the drop",
    );
    const flagged = await RawClient.connect(server);
    try {
      await flagged.greet(0x10);
      assert.ok(await flagged.closedByServer(), "unknown client flags drop the client");
    } finally {
      flagged.close();
    }
  });
});

Deno.test("NbdServer: a client that chooses no export within the handshake timeout is dropped", async () => {
  await withServer({ d: new NbdMemoryExport(4096) }, async (server, lines) => {
    const client = await RawClient.connect(server);
    try {
      await client.greet();
      assert.ok(await client.closedByServer());
    } finally {
      client.close();
    }
    assert.ok(
      lines.includes("connection 1 dropped: it chose no export within 100 ms"),
      lines.join("\n"),
    );
  }, { handshakeTimeoutMs: 100 });
});

// ---------------------------------------------------------------------------------------
// Concurrency and ordering

/** A read handler that counts how many of its calls run at once. */
function countingExport(size: number) {
  let running = 0;
  const stats = { peak: 0, calls: 0 };
  const handler: NbdExportHandler = {
    size,
    async read(_offset, length) {
      stats.calls++;
      stats.peak = Math.max(stats.peak, ++running);
      await new Promise((resolve) => setTimeout(resolve, 5));
      running--;
      return new Uint8Array(length).fill(1);
    },
  };
  return { handler, stats };
}

for (
  const [name, options, length, limit] of [
    ["maxInFlight", { maxInFlight: 6 }, 4096, 6],
    ["maxInFlightBytes", { maxInFlightBytes: 256 * 1024 }, 65536, 4],
    ["maxInFlight 1", { maxInFlight: 1 }, 4096, 1],
  ] as const
) {
  Deno.test(`NbdServer: pipelined requests run concurrently up to ${name}`, async () => {
    const { handler, stats } = countingExport(8 * MiB);
    await withServer({ c: handler }, async (server) => {
      const client = await RawClient.connect(server);
      try {
        await client.go("c");
        const cookies: bigint[] = [];
        for (let i = 0; i < 24; i++) {
          cookies.push(await client.request(NbdCmd.READ, i * length, length));
        }
        const answered: bigint[] = [];
        for (let i = 0; i < 24; i++) {
          const chunks = await client.reply();
          assert.equal(errnoOf(chunks), 0);
          answered.push(chunks[0]!.cookie);
        }
        assert.deepEqual([...answered].sort(), [...cookies].sort());
        assert.equal(stats.calls, 24);
        assert.equal(stats.peak, limit, `${stats.peak} reads ran at once`);
        if (limit === 1) assert.deepEqual(answered, cookies, "answered strictly in order");
        // A request larger than the byte budget still runs, alone.
        await client.request(NbdCmd.READ, 0, MiB);
        assert.equal(contentOf(await client.reply(), 0, MiB)[MiB - 1], 1);
      } finally {
        client.close();
      }
    }, options);
  });
}

Deno.test("NbdServer: NBD_CMD_DISC answers pending requests first; disconnected waits for them", async () => {
  let finished = 0;
  const handler: NbdExportHandler = {
    size: MiB,
    async write(_offset, length, read) {
      await read(new Uint8Array(length));
      await new Promise((resolve) => setTimeout(resolve, 30));
      finished++;
    },
  };
  await withServer({ w: handler }, async (server) => {
    const client = await RawClient.connect(server);
    try {
      await client.go("w", { structured: false });
      for (let i = 0; i < 3; i++) {
        await client.request(NbdCmd.WRITE, i * 4096, 4096, { payload: new Uint8Array(4096) });
      }
      await client.request(NbdCmd.DISC, 0, 0);
      const replies = [await client.simple(), await client.simple(), await client.simple()];
      assert.deepEqual(replies.map((r) => r.error), [0, 0, 0]);
      assert.ok(await client.closedByServer());
      await server.disconnected;
      assert.equal(finished, 3);
    } finally {
      client.close();
    }
  });
});

Deno.test("NbdServer: the address, the port and the URIs", async () => {
  const dir = await Deno.makeTempDir({ prefix: "nbd uri " });
  try {
    await using server = NbdServer.listen({ path: `${dir}/a b.sock` }, {
      "drive scsi0": new NbdMemoryExport(4096),
    });
    assert.equal(server.port, 0);
    assert.equal(
      server.uri("drive scsi0"),
      `nbd+unix:///drive%20scsi0?socket=${dir.replaceAll(" ", "%20")}/a%20b.sock`,
    );
    await using client = await NbdClient.connect(server.uri("drive scsi0"));
    assert.equal(client.info.size, 4096);
    await server.close();
    await assert.rejects(
      Deno.lstat(`${dir}/a b.sock`),
      Deno.errors.NotFound,
      "close() removes the socket",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  assert.throws(
    () =>
      NbdServer.listen(LOCAL, {
        bad: { size: 4096, blockSizes: { minimum: 3, preferred: 4096, maximum: 4096 } },
      }),
    /Block sizes 3, 4096, 4096 break the rules/,
  );
  assert.throws(
    () => NbdServer.listen(LOCAL, { bad: { size: -1 } }),
    /size -1 is not a byte count/,
  );
  assert.throws(() => NbdServer.listen(LOCAL, {}, { defaultExport: "x" }), /default export "x"/);
});

// ---------------------------------------------------------------------------------------
// Round trip

Deno.test("NbdServer property: any disk reads back exactly, structured or not, and block status matches its zero blocks", async () => {
  const runs = fc.array(
    fc.record({
      blocks: fc.integer({ min: 1, max: 24 }),
      fill: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 255 })),
    }),
    { minLength: 1, maxLength: 12 },
  );
  const ranges = fc.array(fc.tuple(fc.nat(), fc.nat()), { minLength: 1, maxLength: 6 });
  await fc.assert(
    fc.asyncProperty(runs, ranges, fc.boolean(), async (layout, reads, structured) => {
      const size = layout.reduce((sum, run) => sum + run.blocks * 4096, 0);
      const data = new Uint8Array(size);
      let at = 0;
      for (const run of layout) {
        data.fill(run.fill, at, at + run.blocks * 4096);
        at += run.blocks * 4096;
      }
      await withServer({ d: new NbdMemoryExport(data.slice()) }, async (server) => {
        await using client = await NbdClient.connect(server.uri("d"), {
          structuredReplies: structured,
          ...(structured && { metaContexts: ["base:allocation"] }),
        });
        for (const [a, b] of reads) {
          const offset = a % size;
          const length = 1 + (b % (size - offset));
          const buffer = new Uint8Array(length);
          await client.read(offset, buffer);
          assert.deepEqual(buffer, data.subarray(offset, offset + length));
        }
        if (!structured) return;
        for await (const extent of client.extents("base:allocation")) {
          const zero = data.subarray(extent.offset, extent.offset + extent.length).every((x) =>
            x === 0
          );
          assert.equal(extent.flags === 3, zero, `extent at ${extent.offset}`);
        }
      });
    }),
    { numRuns: 40 },
  );
});
