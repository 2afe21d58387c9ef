// Copyright 2026 the vmabackup authors. MIT license.
/**
 * S3 uploads, downloads and random reads against a real Ceph RADOS Gateway, with a proxy
 * that injects 503s and dropped connections.
 */
import assert from "node:assert/strict";
import { s3RangeReader, s3Source } from "../lib/storage/s3_download.ts";
import { md5 } from "../lib/_bytes.ts";
import { S3Client } from "../lib/storage/s3_client.ts";
import { S3Error } from "../lib/storage/s3_errors.ts";
import { MIN_PART_SIZE, s3Sink } from "../lib/storage/s3_upload.ts";
import { type FaultAction, startFaultProxy } from "./_fault_proxy.ts";
import { listKeys, newBucket, pendingUploads, rgwTest, testClient } from "./_rgw.ts";
import { diskClusters, randomBytes, sha256Hex } from "./_utils.ts";
import {
  archiveOutput,
  IndexedArchive,
  type VmaRecord,
  VmaWriterStream,
  ZeroFilterStream,
} from "../mod.ts";

const MiB = 1 << 20;

/** `bytes` as a stream of `chunk`-sized pieces. */
function chunked(bytes: Uint8Array, chunk = MiB): ReadableStream<Uint8Array> {
  let offset = 0;
  return new ReadableStream({
    pull(controller) {
      if (offset >= bytes.byteLength) return controller.close();
      controller.enqueue(bytes.slice(offset, offset + chunk));
      offset += chunk;
    },
  });
}

rgwTest("s3Sink: a multipart upload in 5 MiB parts reads back byte for byte", async (server) => {
  const client = testClient(server);
  const bucket = await newBucket(client);
  const data = randomBytes(3 * MIN_PART_SIZE + 12345, 1);
  const sink = await s3Sink(`s3://${bucket}/dir/a b+c.vma`, { client, partSize: MIN_PART_SIZE });
  await chunked(data, 300_000).pipeTo(sink);
  assert.deepEqual(await sink.complete(), {
    url: `s3://${bucket}/dir/a b+c.vma`,
    size: data.byteLength,
    parts: 4,
  });
  const head = await client.send({
    operation: "head",
    method: "HEAD",
    location: { bucket, key: "dir/a b+c.vma" },
  });
  assert.match(head.headers.get("etag")!, /-4"$/); // S3's mark of a 4-part upload
  const source = await s3Source(`s3://${bucket}/dir/a b+c.vma`, { client });
  assert.equal(sha256Hex(await new Response(source).bytes()), sha256Hex(data));
  assert.deepEqual(await pendingUploads(client, bucket), []);
});

rgwTest("s3Sink: with completeOnClose false the key appears only on complete()", async (server) => {
  const client = testClient(server);
  const bucket = await newBucket(client);
  for (const size of [100, 2 * MIN_PART_SIZE + 1]) { // one PUT, and a multipart upload
    const key = `object-${size}`;
    const sink = await s3Sink(`s3://${bucket}/${key}`, {
      client,
      partSize: MIN_PART_SIZE,
      completeOnClose: false,
    });
    await chunked(randomBytes(size, size)).pipeTo(sink);
    assert.deepEqual(await listKeys(client, bucket), size === 100 ? [] : ["object-100"]);
    await sink.complete();
    assert.ok((await listKeys(client, bucket)).includes(key));
  }
  assert.deepEqual(await pendingUploads(client, bucket), []);
});

rgwTest("s3Sink: an existing key is refused, before and at completion", async (server) => {
  const client = testClient(server);
  const bucket = await newBucket(client);
  const url = `s3://${bucket}/vm.vma`;
  const first = await s3Sink(url, { client });
  await chunked(new Uint8Array([1, 2, 3])).pipeTo(first);
  await assert.rejects(s3Sink(url, { client }), {
    name: "AlreadyExists",
    message: `${url} already exists`,
  });

  // Another writer completes the key while ours is uploading: ours is aborted, theirs kept.
  const ours = await s3Sink(`s3://${bucket}/race.vma`, { client, partSize: MIN_PART_SIZE });
  const writer = ours.getWriter();
  await writer.write(randomBytes(2 * MIN_PART_SIZE, 2));
  const theirs = await s3Sink(`s3://${bucket}/race.vma`, { client });
  await chunked(new Uint8Array([9])).pipeTo(theirs);
  await assert.rejects(writer.close(), { name: "AlreadyExists" });
  await ours.discard();
  assert.deepEqual(await pendingUploads(client, bucket), []);
  const kept = await s3Source(`s3://${bucket}/race.vma`, { client });
  assert.deepEqual(await new Response(kept).bytes(), new Uint8Array([9]));

  const replaced = await s3Sink(url, { client, overwrite: true });
  await chunked(new Uint8Array([4])).pipeTo(replaced);
  assert.deepEqual(
    await new Response(await s3Source(url, { client })).bytes(),
    new Uint8Array([4]),
  );
});

rgwTest(
  "s3Sink: 503s and dropped connections are retried; nothing is left over",
  async (server) => {
    const direct = testClient(server);
    const bucket = await newBucket(direct);
    // Every fifth request 503, every seventh dropped before it reaches RGW, and the answers
    // to starting and to completing the upload lost after RGW acted on them.
    const lost = new Set<string>();
    const decide = (index: number, method: string, target: string): FaultAction => {
      const step = target.endsWith("?uploads")
        ? "start"
        : target.includes("uploadId") && "complete";
      if (method === "POST" && step && !lost.has(step)) {
        lost.add(step);
        return "drop-response";
      }
      if (index % 5 === 4) return "503";
      if (index % 7 === 6) return "drop-request";
      return "pass";
    };
    const proxy = startFaultProxy(server.endpoint, { decide });
    try {
      const client = testClient(server, { endpoint: proxy.endpoint });
      const data = randomBytes(5 * MIN_PART_SIZE + 999, 3);
      const sink = await s3Sink(`s3://${bucket}/faults.vma`, { client, partSize: MIN_PART_SIZE });
      await chunked(data).pipeTo(sink);
      const actions = proxy.requests.map((request) => request.action);
      assert.ok(actions.includes("503") && actions.includes("drop-request"), `${actions}`);
      assert.deepEqual([...lost], ["start", "complete"]); // each lost an answer once
      const source = await s3Source(`s3://${bucket}/faults.vma`, { client: direct });
      assert.equal(sha256Hex(await new Response(source).bytes()), sha256Hex(data));
      // The start whose answer was lost made an upload of its own: it was aborted too.
      assert.deepEqual(await pendingUploads(direct, bucket), []);
    } finally {
      await proxy.close();
    }
  },
);

rgwTest("s3Sink: a part that keeps failing aborts the upload", async (server) => {
  const direct = testClient(server);
  const bucket = await newBucket(direct);
  let parts = 0;
  const proxy = startFaultProxy(server.endpoint, {
    decide: (_, method, target) =>
      method === "PUT" && target.includes("partNumber") && ++parts > 2 ? "drop-request" : "pass",
  });
  try {
    const client = testClient(server, { endpoint: proxy.endpoint, retry: { attempts: 3 } });
    const sink = await s3Sink(`s3://${bucket}/fails.vma`, { client, partSize: MIN_PART_SIZE });
    const error = await chunked(randomBytes(6 * MIN_PART_SIZE, 4)).pipeTo(sink).then(
      () => assert.fail("the upload succeeded"),
      (error) => error,
    );
    assert.ok(error instanceof S3Error, String(error));
    assert.match(error.message, /: upload part \d: .* after 3 attempts \(NetworkError\)$/);
    await sink.discard();
    assert.deepEqual(await pendingUploads(direct, bucket), []);
    assert.deepEqual(await listKeys(direct, bucket), []);
  } finally {
    await proxy.close();
  }
});

rgwTest("s3Sink: an aborted pipe aborts the upload", async (server) => {
  const client = testClient(server);
  const bucket = await newBucket(client);
  const sink = await s3Sink(`s3://${bucket}/aborted.vma`, { client, partSize: MIN_PART_SIZE });
  const controller = new AbortController();
  let sent = 0;
  const endless = new ReadableStream<Uint8Array>({
    pull(stream) {
      stream.enqueue(randomBytes(MiB, sent));
      if (++sent === 3 * 5 + 2) controller.abort(new Error("stop")); // after 3 parts
    },
  });
  await assert.rejects(endless.pipeTo(sink, { signal: controller.signal }), /stop/);
  await sink.discard();
  assert.deepEqual(await pendingUploads(client, bucket), []);
  assert.deepEqual(await listKeys(client, bucket), []);
});

rgwTest("s3Sink: wrong credentials and a missing bucket fail with one line", async (server) => {
  const client = testClient(server);
  const wrong = testClient(server, { secretAccessKey: "not-the-secret" });
  const bucket = await newBucket(client);
  await assert.rejects(s3Sink(`s3://${bucket}/x.vma`, { client: wrong }), (error) => {
    assert.ok(error instanceof S3Error && error.denied, String(error));
    assert.equal(error.status, 403);
    return true;
  });
  await assert.rejects(s3Source(`s3://${bucket}/x.vma`, { client: wrong }), { status: 403 });
  await assert.rejects(s3Sink("s3://no-such-bucket-here/x.vma", { client }), {
    name: "S3Error",
    code: "NoSuchBucket",
    message: "s3://no-such-bucket-here/x.vma: check the bucket: no such bucket (404 NoSuchBucket)",
  });
  await assert.rejects(s3Source(`s3://${bucket}/missing.vma`, { client }), {
    code: "NoSuchKey",
    message: `s3://${bucket}/missing.vma: open: no such key (404 NoSuchKey)`,
  });
});

rgwTest("s3Source: resumes with Range GETs where the connection drops", async (server) => {
  const direct = testClient(server);
  const bucket = await newBucket(direct);
  const data = randomBytes(24 * MiB + 17, 5);
  await chunked(data).pipeTo(await s3Sink(`s3://${bucket}/big.vma`, { client: direct }));
  let gets = 0;
  const proxy = startFaultProxy(server.endpoint, {
    decide: (_, method) => method === "GET" && ++gets <= 3 ? "drop-response" : "pass",
  });
  try {
    const client = testClient(server, { endpoint: proxy.endpoint });
    const source = await s3Source(`s3://${bucket}/big.vma`, { client });
    assert.equal(sha256Hex(await new Response(source).bytes()), sha256Hex(data));
    assert.ok(gets >= 4, `${gets} GETs`); // three dropped halfway, then the rest
  } finally {
    await proxy.close();
  }
});

rgwTest("s3Source: an object replaced while it is read fails the read", async (server) => {
  const direct = testClient(server);
  const bucket = await newBucket(direct);
  const url = `s3://${bucket}/changing.vma`;
  await chunked(randomBytes(4 * MiB, 6)).pipeTo(await s3Sink(url, { client: direct }));
  // The first GET drops halfway; before the resuming GET, another writer replaces the object.
  let gets = 0;
  const proxy = startFaultProxy(server.endpoint, {
    decide: (_, method) => method === "GET" && ++gets === 1 ? "drop-response" : "pass",
    before: async (_, method) => {
      if (method !== "GET" || gets !== 2) return;
      const replacement = await s3Sink(url, { client: direct, overwrite: true });
      await chunked(randomBytes(4 * MiB, 8)).pipeTo(replacement);
    },
  });
  try {
    const source = await s3Source(url, {
      client: testClient(server, { endpoint: proxy.endpoint }),
    });
    await assert.rejects(new Response(source).bytes(), {
      code: "PreconditionFailed",
      message: /: read at byte [1-9]\d*: the object was replaced while it was read \(412/,
    });
  } finally {
    await proxy.close();
  }
});

rgwTest("s3RangeReader: ranged reads, a bounded number in flight", async (server) => {
  const direct = testClient(server);
  const bucket = await newBucket(direct);
  const data = randomBytes(2 * MIN_PART_SIZE + 1000, 8);
  const url = `s3://${bucket}/ranges.vma`;
  await chunked(data).pipeTo(await s3Sink(url, { client: direct, partSize: MIN_PART_SIZE }));
  const proxy = startFaultProxy(server.endpoint, { delay: 50 });
  try {
    const client = testClient(server, { endpoint: proxy.endpoint });
    const reader = await s3RangeReader(url, { client, concurrency: 2 });
    assert.equal(reader.size, data.byteLength);
    const offsets = Array.from({ length: 8 }, (_, i) => i * MIN_PART_SIZE / 4 + 3);
    offsets.push(MIN_PART_SIZE - 10); // across the first part boundary
    const reads = await Promise.all(offsets.map((offset) => reader.read(offset, 100_000)));
    reads.forEach((bytes, i) => {
      assert.deepEqual(bytes, data.subarray(offsets[i]!, offsets[i]! + 100_000));
    });
    assert.equal(proxy.maxConcurrent(), 2);
    await assert.rejects(reader.read(data.byteLength - 10, 11), Deno.errors.UnexpectedEof);
    assert.deepEqual(await reader.read(data.byteLength - 10, 10), data.subarray(-10));
    reader.close();
  } finally {
    await proxy.close();
  }
});

rgwTest("examples/s3_backup.ts backs up to S3 and verifies from there", async (server) => {
  const client = testClient(server);
  const bucket = await newBucket(client);
  const dir = await Deno.makeTempDir();
  try {
    const disk = new Uint8Array(20 * MiB);
    disk.set(randomBytes(12 * MiB, 9), 4 * MiB);
    await Deno.writeFile(`${dir}/disk.raw`, disk);
    const script = new URL("../examples/s3_backup.ts", import.meta.url).pathname;
    const url = `s3://${bucket}/example.vma.zst`;
    const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-read",
        `--allow-net=${new URL(server.endpoint).host}`,
        "--allow-env",
        script,
        `${dir}/disk.raw`,
        url,
      ],
      env: {
        NO_COLOR: "1",
        AWS_ACCESS_KEY_ID: server.accessKeyId,
        AWS_SECRET_ACCESS_KEY: server.secretAccessKey,
        AWS_ENDPOINT_URL: server.endpoint,
      },
    }).output();
    const text = new TextDecoder().decode(stdout);
    assert.equal(code, 0, new TextDecoder().decode(stderr));
    assert.match(
      text,
      new RegExp(`^${url}: \\d+ bytes in 3 part\\(s\\)\nverified: 320 clusters\n$`),
    );
    const source = await s3Source(url, { client });
    assert.deepEqual(source.size, Number(text.match(/: (\d+) bytes/)![1]));
    await source.cancel();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

rgwTest(
  "IndexedArchive over s3RangeReader reads one disk of a .vma.zst with few GET bytes",
  async (server) => {
    const direct = testClient(server);
    const bucket = await newBucket(direct);
    const url = `s3://${bucket}/two-disks.vma.zst`;
    const disks = [randomBytes(16 * MiB, 10), randomBytes(MiB, 11)];
    const records: VmaRecord[] = [
      ...disks.map((bytes, i) => ({
        type: "device" as const,
        devId: i + 1,
        name: `drive-scsi${i}`,
        size: bytes.byteLength,
      })),
      ...disks.flatMap((bytes, i) => diskClusters(i + 1, bytes)),
    ];
    await ReadableStream.from(records)
      .pipeThrough(new ZeroFilterStream())
      .pipeThrough(new VmaWriterStream({ reuseBuffers: true }))
      .pipeThrough(archiveOutput({ compression: "zstd" }))
      .pipeTo(await s3Sink(url, { client: direct }));
    const proxy = startFaultProxy(server.endpoint);
    try {
      const client = testClient(server, { endpoint: proxy.endpoint });
      const archive = await IndexedArchive.open(await s3RangeReader(url, { client }));
      try {
        const drive = archive.device("scsi1")!;
        assert.deepEqual(await archive.read(drive.devId, 0, MiB), disks[1]);
        const stored = (await s3Source(url, { client: direct })).size;
        // The index, the header and the frames of the small disk: a fraction of the object.
        assert.ok(
          proxy.bytesReturned() < stored / 4,
          `${proxy.bytesReturned()} of ${stored} bytes`,
        );
      } finally {
        archive.close();
      }
    } finally {
      await proxy.close();
    }
  },
);

/** An S3 stand-in for answers RGW does not give but AWS may: see the tests below. */
/** A fake S3 server in this process; `timeout` is the client's (a busy machine needs long). */
function fakeS3(
  handle: (request: Request, url: URL) => Promise<Response> | Response,
  timeout = 10_000,
) {
  const server = Deno.serve({ port: 0, onListen() {} }, (request) => {
    const url = new URL(request.url);
    if (request.method === "HEAD" && url.pathname === "/bucket/") return new Response(null);
    return handle(request, url);
  });
  const client = new S3Client({
    endpoint: `http://127.0.0.1:${server.addr.port}`,
    pathStyle: true,
    region: "us-east-1",
    credentials: { accessKeyId: "AKID", secretAccessKey: "secret" },
  }, { retry: { initialDelay: 10, maxDelay: 20, attempts: 3 }, timeout });
  return {
    client,
    async close() {
      client.close();
      await server.shutdown();
    },
  };
}

Deno.test("s3Sink: a completion answered with 200 and an error, then lost, still completes", async () => {
  const parts: Uint8Array[] = [];
  let completes = 0;
  let stored: string | undefined;
  const s3 = fakeS3(async (request, url) => {
    if (request.method === "HEAD") {
      return new Response(null, {
        status: stored ? 200 : 404,
        headers: stored ? { etag: stored } : {},
      });
    }
    if (request.method === "POST" && url.search === "?uploads") {
      return new Response(
        "<InitiateMultipartUploadResult><UploadId>u1</UploadId></InitiateMultipartUploadResult>",
      );
    }
    if (request.method === "PUT") {
      const body = await request.bytes();
      parts[Number(url.searchParams.get("partNumber")) - 1] = md5(body);
      return new Response(null, { headers: { etag: `"${md5(body).toHex()}"` } });
    }
    if (request.method === "POST" && ++completes === 1) {
      return new Response("<Error><Code>InternalError</Code><Message>try again</Message></Error>");
    }
    // The second completion went through, but its answer is "lost": the retry finds no upload.
    const joined = new Uint8Array(parts.length * 16);
    parts.forEach((digest, i) => joined.set(digest, i * 16));
    stored = `"${md5(joined).toHex()}-${parts.length}"`;
    return new Response("<Error><Code>NoSuchUpload</Code></Error>", { status: 404 });
  });
  try {
    const sink = await s3Sink("s3://bucket/vm.vma", { client: s3.client, partSize: MIN_PART_SIZE });
    await chunked(randomBytes(2 * MIN_PART_SIZE + 5, 12)).pipeTo(sink);
    assert.deepEqual(await sink.complete(), {
      url: "s3://bucket/vm.vma",
      size: 2 * MIN_PART_SIZE + 5,
      parts: 3,
    });
    assert.equal(completes, 2);
  } finally {
    await s3.close();
  }
});

Deno.test("S3Client: a server that never answers times out, and is retried", async () => {
  let requests = 0;
  const s3 = fakeS3(() => {
    requests++;
    // An answer only long after the client gave up (the server's shutdown waits for it).
    return new Promise((resolve) => setTimeout(() => resolve(new Response(null)), 1500));
  }, 300);
  try {
    await assert.rejects(
      s3.client.send({
        operation: "read",
        method: "GET",
        location: { bucket: "bucket", key: "k" },
      }),
      {
        name: "S3Error",
        code: "TimedOut",
        message: "s3://bucket/k: read: no answer within 0.3 s after 3 attempts (TimedOut)",
      },
    );
    assert.equal(requests, 3);
  } finally {
    await s3.close();
  }
});

Deno.test("S3Client: a refusal before the body of a large PUT was read is the refusal", async () => {
  const s3 = fakeS3(() =>
    new Response("<Error><Code>AccessDenied</Code><Message>no</Message></Error>", { status: 403 })
  );
  try {
    await assert.rejects(
      s3.client.send({
        operation: "upload part 1",
        method: "PUT",
        location: { bucket: "bucket", key: "k" },
        body: new Uint8Array(16 * MiB), // sent straight to the socket, not through fetch
      }),
      { name: "S3Error", status: 403, code: "AccessDenied" },
    );
  } finally {
    await s3.close();
  }
});
