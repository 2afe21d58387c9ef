// Copyright 2026 the vmabackup authors. MIT license.
/** zstd frames from this toolkit and from the zstd CLI, in any chunking. */
import assert from "node:assert/strict";
import fc from "fast-check";
import * as zlib from "node:zlib";
import { FrameDecoderPool } from "../lib/transforms/_frame_decoder.ts";
import { ZstdFrameSplitter } from "../lib/transforms/_zstd_frames.ts";
import { ZstdCompressStream, ZstdDecompressStream } from "../lib/transforms/zstd.ts";
import {
  decodeSeekTable,
  SeekableZstdDecompressStream,
  SeekableZstdStream,
  seekTableSize,
  VmaExtentStream,
  VmaWriterStream,
} from "../mod.ts";
import { tool } from "./_cli.ts";
import { randomBytes } from "./_utils.ts";

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.byteLength, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.byteLength;
  }
  return out;
}

function chunked(bytes: Uint8Array, sizes: number[]): Uint8Array[] {
  const chunks: Uint8Array[] = [];
  for (let at = 0, i = 0; at < bytes.byteLength; i++) {
    const size = sizes[i % sizes.length]!;
    chunks.push(bytes.slice(at, at + size));
    at += size;
  }
  return chunks;
}

async function decode(chunks: Uint8Array[]): Promise<Uint8Array> {
  return await new Response(
    ReadableStream.from(chunks).pipeThrough(new ZstdDecompressStream()),
  ).bytes();
}

Deno.test("ZstdDecompressStream() reads zstd CLI frames with and without a content size, and skippable frames", async () => {
  const a = randomBytes(300_000, 1);
  const b = new Uint8Array(500_000).fill(7);
  const c = new TextEncoder().encode("vma extent ".repeat(30_000));
  const withSize = await tool("zstd", ["-q", "-c", "--content-size"], a);
  const streamed = await tool("zstd", ["-q", "-c", "--no-content-size", "--no-check"], b);
  const skippable = new Uint8Array([0x5a, 0x2a, 0x4d, 0x18, 5, 0, 0, 0, 1, 2, 3, 4, 5]);
  const ours = await new Response(
    ReadableStream.from([c]).pipeThrough(new ZstdCompressStream({ frameSize: 100_000 })),
  ).bytes();
  const stream = concat([withSize, skippable, streamed, ours]);
  const expected = concat([a, b, c]);
  for (const sizes of [[stream.byteLength], [1], [3, 1000, 17], [65536]]) {
    assert.deepEqual(await decode(chunked(stream, sizes)), expected, `chunks ${sizes}`);
  }
});

Deno.test("zstd round-trips random data in random chunkings, any workers, with or without this thread (property)", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.integer({ min: 0, max: 200_000 }), { minLength: 1, maxLength: 5 }),
      fc.array(fc.integer({ min: 1, max: 300_000 }), { minLength: 1, maxLength: 4 }),
      fc.integer({ min: 1, max: 3 }),
      fc.boolean(),
      async (lengths, chunkSizes, workers, mainThread) => {
        const input = concat(
          lengths.map((length, i) =>
            i % 2 ? randomBytes(length, i + 1) : new Uint8Array(length).fill(i)
          ),
        );
        const compressed = await new Response(
          ReadableStream.from(chunked(input, chunkSizes)).pipeThrough(
            new ZstdCompressStream({ frameSize: 65536 * 3, workers, mainThread }),
          ),
        ).bytes();
        assert.deepEqual(
          await decode(chunked(compressed, [...chunkSizes].reverse())),
          input,
        );
      },
    ),
    { numRuns: 25 },
  );
});

Deno.test("ZstdDecompressStream() reports a truncated stream and garbage", async () => {
  const compressed = await tool("zstd", ["-q", "-c"], randomBytes(100_000, 3));
  await assert.rejects(decode([compressed.subarray(0, compressed.byteLength - 10)]), {
    message: /ends inside a frame \(truncated\)/,
  });
  await assert.rejects(decode([compressed, new Uint8Array([1, 2, 3, 4, 5])]), {
    message: /Bad frame magic at byte \d+/,
  });
});

Deno.test("ZstdCompressStream() output is what the zstd CLI decodes", async () => {
  const input = concat([randomBytes(5 << 20, 4), new Uint8Array(3 << 20)]);
  const compressed = await new Response(
    ReadableStream.from(chunked(input, [1 << 20])).pipeThrough(
      new ZstdCompressStream({ level: 1 }),
    ),
  ).bytes();
  assert.deepEqual(await tool("zstd", ["-d", "-c"], compressed), input);
  assert.throws(() => new ZstdCompressStream({ level: 20 }), RangeError);
});

Deno.test("ZstdFrameSplitter never gives a frame the previous frame's content size", () => {
  // Single-segment frames with a 1-byte content size and one raw block: "hello", then "abc".
  const hello = Uint8Array.fromHex("28b52ffd" + "20" + "05" + "290000" + "68656c6c6f");
  const abc = Uint8Array.fromHex("28b52ffd" + "20" + "03" + "190000" + "616263");
  const input = concat([hello, abc]);
  for (let cut = 1; cut < input.byteLength; cut++) {
    const splitter = new ZstdFrameSplitter();
    const segments = [input.subarray(0, cut), input.subarray(cut)].flatMap((chunk) =>
      splitter.push(chunk)
    );
    const starts = segments.filter((segment) => segment.start);
    assert.equal(starts.length, 2, `cut at ${cut}`);
    for (const [start, size] of [[starts[0]!, 5], [starts[1]!, 3]] as const) {
      // Unknown is allowed (the header may not be read yet); another frame's size is not.
      assert.ok(
        start.contentSize === undefined || start.contentSize === size,
        `cut at ${cut}: ${start.contentSize}`,
      );
    }
    const ends = segments.filter((segment) => segment.end).map((segment) => segment.contentSize);
    assert.deepEqual(ends, [5, 3], `cut at ${cut}`);
  }
});

Deno.test("ZstdDecompressStream() hands out a frame that expands 4000-fold in bounded chunks, and stops when cancelled", async () => {
  const zeros = 64 << 20;
  const bomb = await tool("zstd", ["-q", "-c"], new Uint8Array(zeros));
  assert.ok(bomb.byteLength < zeros / 4000);
  let total = 0;
  for await (const chunk of ReadableStream.from([bomb]).pipeThrough(new ZstdDecompressStream())) {
    assert.ok(chunk.byteLength <= 1 << 20, `a chunk of ${chunk.byteLength} bytes`);
    assert.ok(chunk.every((byte) => byte === 0));
    total += chunk.byteLength;
  }
  assert.equal(total, zeros);
  // A consumer that stops after one chunk cancels the decoder and the source.
  let sourceCancelled = false;
  const source = new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(bomb);
    },
    cancel() {
      sourceCancelled = true;
    },
  });
  const reader = source.pipeThrough(new ZstdDecompressStream()).getReader();
  assert.equal((await reader.read()).value?.byteLength, 1 << 20);
  await reader.cancel();
  await new Promise((resolve) => setTimeout(resolve, 0));
  assert.ok(sourceCancelled);
});

Deno.test("ZstdDecompressStream: stream after stream, each leaves little RSS behind", async () => {
  // Each stream had pools of its own, whose megabytes the allocator kept: 0.3-0.5 MiB of
  // RSS per stream. About 0.1 MiB is Deno's own cost of a Worker that loads node:zlib.
  const probe = new URL("./fixtures/stream_rss_probe.ts", import.meta.url).pathname;
  const runs: number[] = [];
  for (let run = 0; run < 3; run++) { // RSS is noisy on a busy machine: the best of three
    const { stdout, success } = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--v8-flags=--expose-gc", probe, "100"],
    }).output();
    assert.ok(success);
    runs.push(Number(new TextDecoder().decode(stdout).trim()));
  }
  const perStream = Math.min(...runs);
  assert.ok(perStream < 320, `${runs.join(", ")} KiB per stream`);
});

Deno.test("zstd: when node:zlib's internals fail their self-test, the public API decodes the same", async () => {
  const input = new Uint8Array(3_000_000).map((_, i) =>
    (i * 13) % 251 & (i % 5000 < 2500 ? 0xff : 0)
  );
  const frames = await new Response(
    ReadableStream.from([input]).pipeThrough(new ZstdCompressStream({ frameSize: 400_000 })),
  ).bytes();
  // Skippable frames in between, and pieces of any size.
  const skippable = Uint8Array.of(0x5b, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3);
  const stream = new Uint8Array([...skippable, ...frames, ...skippable]);
  const pieces: Uint8Array[] = [];
  for (let at = 0; at < stream.byteLength; at += 77_777) pieces.push(stream.slice(at, at + 77_777));
  const decoded = await new Response(
    ReadableStream.from(pieces).pipeThrough(new ZstdDecompressStream({ publicApi: true })),
  ).bytes();
  assert.deepEqual(decoded, input);
  await assert.rejects(
    new Response(
      ReadableStream.from([frames.subarray(0, frames.byteLength - 3)])
        .pipeThrough(new ZstdDecompressStream({ publicApi: true })),
    ).bytes(),
    /truncated/,
  );
});

Deno.test("zstd: frame compression and decoding fall back when the native handle misbehaves", async () => {
  const zlib = await import("node:zlib");
  const broken = {
    ...zlib,
    constants: zlib.constants,
    createZstdCompress: () => ({ _handle: { reset() {}, writeSync() {} }, _writeState: [0, 9] }),
    createZstdDecompress: () => ({ _handle: { reset() {}, writeSync() {} }, _writeState: [9, 9] }),
  } as unknown as typeof zlib;
  const { frameCompressor, frameBound } = await import("../lib/transforms/_zstd_workers.ts");
  const { frameDecoder } = await import("../lib/transforms/_frame_decoder.ts");
  const why: string[] = [];
  const compress = frameCompressor(broken, (reason) => why.push(reason));
  const input = new TextEncoder().encode("fallback ".repeat(10_000));
  const output = new Uint8Array(frameBound(input.byteLength));
  const length = compress(input, output, 3);
  assert.equal(why.length, 1, "the self-test failed once and said why");
  assert.equal(output[4]! & 0x04, 0x04, "the fallback's frames carry checksums too");
  const decode = frameDecoder(broken, (reason) => why.push(reason));
  const back = new Uint8Array(input.byteLength);
  decode(output.subarray(0, length), back);
  assert.deepEqual(back, input);
  assert.equal(why.length, 2);
});

Deno.test("decompressInput: a corrupt or cut compressed stream is a VmaFormatError at its offset", async () => {
  const { decompressInput, VmaFormatError } = await import("../mod.ts");
  const { gzipSync } = await import("node:zlib");
  const vma = new Uint8Array(200_000).fill(7);
  vma.set([0x56, 0x4d, 0x41, 0x00]);
  const gzip = new Uint8Array(gzipSync(vma));
  const zstd = await new Response(ReadableStream.from([vma]).pipeThrough(new ZstdCompressStream()))
    .bytes();
  for (const [name, bytes] of [["gzip", gzip], ["zstd", zstd]] as const) {
    const cut = bytes.subarray(0, bytes.byteLength - 9);
    const corrupt = bytes.slice();
    corrupt[bytes.byteLength - 6]! ^= 0x40; // gzip's CRC32, zstd's content checksum
    for (const broken of [cut, corrupt]) {
      const { readable } = await decompressInput(ReadableStream.from([broken]));
      await assert.rejects(new Response(readable).bytes(), (error: Error) => {
        assert.ok(error instanceof VmaFormatError, `${name}: ${error.name}: ${error.message}`);
        assert.equal(error.reason, "bad-compression");
        return true;
      });
    }
  }
  // A failed read of the input is the input's own error, not a corrupt archive.
  const failing = new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(zstd.subarray(0, 100));
    },
    pull(controller) {
      controller.error(new Deno.errors.Interrupted("EIO"));
    },
  });
  const { readable } = await decompressInput(failing);
  await assert.rejects(new Response(readable).bytes(), Deno.errors.Interrupted);
});

Deno.test("FrameDecoderPool: a discard job checks its frame and gives back only the input, on a worker and on this thread", async () => {
  const pool = new FrameDecoderPool(1, undefined, { mainThread: true });
  try {
    const params = { [zlib.constants.ZSTD_c_checksumFlag]: 1 };
    const frame = (fill: number) =>
      new Uint8Array(
        zlib.zstdCompressSync(randomBytes(200_000, fill), { params }),
      );
    // Five at once: some go to the worker, the rest are decoded here.
    const results = await Promise.all(
      [1, 2, 3, 4, 5].map((fill) =>
        pool.decode({ input: frame(fill), size: 200_000, discard: true, digest: true })
      ),
    );
    for (const result of results) {
      assert.equal(result.output.byteLength, 0);
      assert.equal(result.digest?.byteLength, 32);
      assert.ok(result.input.byteLength > 0, "the input comes back");
    }
    const damaged = frame(6);
    damaged[damaged.length - 2]! ^= 0x10; // the content checksum
    await assert.rejects(
      pool.decode({ input: damaged, size: 200_000, discard: true }),
      /checksum/,
    );
  } finally {
    pool.stop();
  }
});

Deno.test("FrameDecoderPool with mainThread: this thread decodes one frame until a worker replies, so the worker's queue does not run dry", async () => {
  const pool = new FrameDecoderPool(1, undefined, { mainThread: true });
  try {
    const params = { [zlib.constants.ZSTD_c_checksumFlag]: 1 };
    const data = randomBytes(200_000, 7);
    const frame = new Uint8Array(zlib.zstdCompressSync(data, { params }));
    // Eight in one burst, as one chunk of a file brings them: no worker reply can be seen
    // in between. Two go to the worker, one is decoded here, the other five queue behind.
    const decoding = Array.from(
      { length: 8 },
      () => pool.decode({ input: frame.slice(), size: 200_000, output: new Uint8Array(200_000) }),
    );
    assert.equal(pool.pending, 7, "frames sent to the worker");
    for (const result of await Promise.all(decoding)) assert.deepEqual(result.output, data);
    assert.equal(pool.pending, 0);
  } finally {
    pool.stop();
  }
});

Deno.test("FrameDecoderPool decodes frames that end in an empty last block (as zlib's one-shot compressor writes them), and checks their size and checksum", async () => {
  const pool = new FrameDecoderPool(1);
  try {
    const data = randomBytes(300_000, 9);
    const params = { [zlib.constants.ZSTD_c_checksumFlag]: 1 };
    const frame = new Uint8Array(zlib.zstdCompressSync(data, { params }));
    assert.deepEqual((await pool.decode({ input: frame.slice(), size: 300_000 })).output, data);
    await assert.rejects(pool.decode({ input: frame.slice(), size: 100 }), /more than 100 bytes/);
    const damaged = frame.slice();
    damaged[damaged.length - 1]! ^= 0x01; // the checksum, read after the content
    await assert.rejects(pool.decode({ input: damaged, size: 300_000 }), /checksum/);
  } finally {
    pool.stop();
  }
});

Deno.test("SeekableZstdDecompressStream checks each data frame's SHA-256, hashed by the decoding thread or (without mainThread) by this one", async () => {
  const device = { type: "device" as const, devId: 1, name: "drive-scsi0", size: 4 * 65536 };
  const clusters = [0, 1, 2, 3].map((cluster) => ({
    type: "cluster" as const,
    devId: 1,
    cluster,
    mask: 0xffff,
    data: randomBytes(65536, cluster + 1),
  }));
  const file = await new Response(
    ReadableStream.from([device, ...clusters])
      .pipeThrough(new VmaWriterStream({ uuid: "2f1e6b0c-1c0a-4f9e-9d6e-3b1d5c7a9e10", ctime: 0 }))
      .pipeThrough(new VmaExtentStream())
      .pipeThrough(new SeekableZstdStream()),
  ).bytes();
  const seekTable = decodeSeekTable(
    file.subarray(-seekTableSize(file.subarray(-9))!),
    file.byteLength,
  );
  // The data frame: the one after the first extent header, at 12800 + 512 decoded bytes.
  const offsets = [0];
  for (const size of seekTable.compressedSizes) offsets.push(offsets.at(-1)! + size);
  let decoded = 0;
  let dataFrame = -1;
  seekTable.decompressedSizes.forEach((size, f) => {
    if (decoded === 12800 + 512) dataFrame = f;
    decoded += size;
  });
  const frame = file.subarray(offsets[dataFrame]!, offsets[dataFrame + 1]!);
  const right = new Uint8Array(await crypto.subtle.digest("SHA-256", frame));
  const wrong = right.map((byte, i) => i === 0 ? byte ^ 1 : byte);
  for (const mainThread of [true, false]) {
    for (const digest of [right, wrong]) {
      const stream = new SeekableZstdDecompressStream({
        seekTable,
        mainThread,
        workers: 1,
        expectedDigest: (f) => f === dataFrame ? digest : undefined,
      });
      const decoding = new Response(ReadableStream.from([file]).pipeThrough(stream)).bytes();
      if (digest === right) {
        assert.equal((await decoding).byteLength, decoded);
        assert.equal(stream.stats.digestsChecked, 1);
      } else {
        await assert.rejects(decoding, /does not match the SHA-256 in the index/);
      }
    }
  }
});
