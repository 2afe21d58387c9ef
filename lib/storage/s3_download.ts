// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Reading S3 objects: a sequential stream that resumes with a `Range` GET where a connection
 * dropped, and random reads (ranged GETs, a bounded number in flight) as a `RangeReader`.
 * Every GET carries `If-Match` with the ETag seen when the object was opened, so an object
 * replaced meanwhile fails the read instead of mixing two versions.
 *
 * @module
 */
import { BufferPool } from "../_pool.ts";
import type { RangeReader } from "./range_reader.ts";
import { isNetworkError, retryDelay, S3Client, type S3ClientOptions } from "./s3_client.ts";
import { formatS3Url, parseS3Url, type S3Location, type S3Options } from "./s3_config.ts";
import { S3Error } from "./s3_errors.ts";

/**
 * Chunks (of up to 1 MiB) read ahead of the consumer, so the network and the stages after
 * it work at the same time (each costs its MiB of memory; 4 cost 6 MiB more than none).
 */
const READ_AHEAD_CHUNKS = 2;

/** A body that delivers nothing for this long is taken for a dropped connection. */
const STALL_TIMEOUT = 120_000;

/** What HEAD tells about an object. */
export interface S3ObjectInfo {
  /** `s3://BUCKET/KEY`. */
  url: string;
  /** Its bucket and key. */
  location: S3Location;
  /** Its size in bytes. */
  size: number;
  /** The ETag, quoted as S3 sends it. */
  etag: string;
}

/** Options of {@linkcode s3Source} and {@linkcode s3RangeReader}. */
export interface S3ReadOptions extends S3Options, S3ClientOptions {
  /** A client to share (its endpoint and credentials win over the other options). */
  client?: S3Client | undefined;
}

/**
 * HEADs an object: its size and ETag. A missing object rejects with an S3Error whose code
 * says whether the key (`NoSuchKey`) or the bucket (`NoSuchBucket`) is missing.
 */
export async function headObject(client: S3Client, location: S3Location): Promise<S3ObjectInfo> {
  const url = formatS3Url(location);
  const response = await client.send({
    operation: "open",
    method: "HEAD",
    location,
    accept: [404],
  });
  if (response.status === 404) {
    const bucket = await client.send({
      operation: "open",
      method: "HEAD",
      location: { bucket: location.bucket, key: "" },
      accept: [403, 404],
    });
    const code = bucket.status === 404 ? "NoSuchBucket" : "NoSuchKey";
    const detail = bucket.status === 404 ? "no such bucket" : "no such key";
    throw new S3Error({ url, operation: "open", status: 404, code, detail });
  }
  const size = Number(response.headers.get("content-length"));
  const etag = response.headers.get("etag") ?? "";
  if (!Number.isSafeInteger(size)) {
    throw new S3Error({
      url,
      operation: "open",
      status: response.status,
      code: "NoContentLength",
      detail: "the answer has no size",
    });
  }
  return { url, location, size, etag };
}

/** A GET of `[start, end)` of an object (to its end without `end`), pinned to its ETag. */
async function getRange(
  client: S3Client,
  info: S3ObjectInfo,
  start: number,
  end: number | undefined,
  signal: AbortSignal | undefined,
): Promise<Response> {
  const whole = start === 0 && (end === undefined || end === info.size);
  const response = await client.send({
    operation: `read at byte ${start}`,
    method: "GET",
    location: info.location,
    headers: {
      ...(info.etag && { "if-match": info.etag }),
      ...(!whole && { range: `bytes=${start}-${end === undefined ? "" : end - 1}` }),
    },
    accept: [412],
    ...(signal && { signal }),
  });
  if (response.status === 412) {
    await response.body?.cancel();
    throw new S3Error({
      url: info.url,
      operation: `read at byte ${start}`,
      status: 412,
      code: "PreconditionFailed",
      detail: "the object was replaced while it was read",
    });
  }
  if (!whole && response.status !== 206) {
    await response.body?.cancel();
    throw new S3Error({
      url: info.url,
      operation: `read at byte ${start}`,
      status: response.status,
      code: "RangeIgnored",
      detail: "the server ignored the Range header",
    });
  }
  return response;
}

/**
 * Opens `s3://BUCKET/KEY` as a byte stream, read sequentially from the start in chunks of
 * up to 1 MiB from recycled buffers (a final consumer calls `releaseChunk`, as this
 * library's readers do). Where the connection drops or stalls, the read resumes with a
 * `Range` GET from the first byte not yet delivered, under the client's retry policy.
 *
 * @example Read an object (an S3 server in memory stands in for real storage)
 * ```ts
 * import assert from "node:assert/strict";
 * import { s3Source } from "./s3_download.ts";
 *
 * const object = new TextEncoder().encode("VMA archive bytes");
 * const server = Deno.serve({ port: 0, onListen() {} }, () =>
 *   new Response(object, { headers: { etag: '"e1"' } }));
 * const source = await s3Source("s3://backups/vm.vma", {
 *   endpoint: `http://127.0.0.1:${server.addr.port}`,
 *   credentials: { accessKeyId: "AKID", secretAccessKey: "secret" },
 * });
 * assert.deepEqual([source.size, source.etag], [object.byteLength, '"e1"']);
 * assert.equal(await new Response(source).text(), "VMA archive bytes");
 * await server.shutdown();
 * ```
 */
export async function s3Source(url: string, options: S3ReadOptions = {}): Promise<S3ByteSource> {
  const client = options.client ?? await S3Client.create(options);
  return new S3ByteSource(client, await headObject(client, parseS3Url(url)));
}

/** The bytes of one S3 object as a stream; see {@linkcode s3Source}. */
export class S3ByteSource extends ReadableStream<Uint8Array> {
  /** The object as it was opened. */
  readonly info: S3ObjectInfo;

  /** Use {@linkcode s3Source}, which HEADs the object first. */
  constructor(client: S3Client, info: S3ObjectInfo) {
    const pool = new BufferPool(1 << 20, { trackChunks: true });
    const stop = new AbortController();
    let position = 0;
    let reader: ReadableStreamBYOBReader | undefined;
    /** The next bytes of the body, or undefined where the connection dropped or stalled. */
    const nextChunk = async (): Promise<Uint8Array<ArrayBuffer> | undefined> => {
      reader ??= (await getRange(client, info, position, undefined, stop.signal)).body!
        .getReader({ mode: "byob" });
      const current = reader;
      // A connection that stays silent is as good as dropped.
      const stalled = setTimeout(() => current.cancel().catch(() => {}), STALL_TIMEOUT);
      try {
        const buffer = pool.acquire().bytes;
        const min = Math.min(buffer.byteLength, info.size - position);
        const { value, done } = await current.read(buffer, { min });
        if (done) reader = undefined;
        return value?.byteLength ? value : undefined;
      } catch (error) {
        reader = undefined;
        if (stop.signal.aborted || !isNetworkError(error)) throw error;
        return undefined;
      } finally {
        clearTimeout(stalled);
      }
    };
    super({
      async pull(controller) {
        for (let failures = 0; position < info.size;) {
          const chunk = await nextChunk();
          if (chunk === undefined) {
            if (++failures >= client.retry.attempts) {
              throw new S3Error({
                url: info.url,
                operation: `read at byte ${position}`,
                status: 0,
                code: "NetworkError",
                detail: `the connection dropped ${failures} times without progress`,
              });
            }
            await new Promise((resolve) => setTimeout(resolve, retryDelay(client.retry, failures)));
            continue; // resume with a Range GET from `position`
          }
          if (position + chunk.byteLength > info.size) {
            throw new S3Error({
              url: info.url,
              operation: `read at byte ${position}`,
              status: 200,
              code: "TooLong",
              detail: `the object is longer than its size, ${info.size} bytes`,
            });
          }
          position += chunk.byteLength;
          // The read moved the memory to a new ArrayBuffer: track that one instead.
          pool.wrap(new Uint8Array(chunk.buffer)).hold(1);
          controller.enqueue(chunk);
          return;
        }
        controller.close();
      },
      async cancel(reason) {
        stop.abort(reason);
        await reader?.cancel(reason).catch(() => {});
      },
    }, { highWaterMark: READ_AHEAD_CHUNKS });
    this.info = info;
  }

  /** `s3://BUCKET/KEY`. */
  get url(): string {
    return this.info.url;
  }

  /** Size of the object in bytes. */
  get size(): number {
    return this.info.size;
  }

  /** The object's ETag, which every GET of this stream requires (`If-Match`). */
  get etag(): string {
    return this.info.etag;
  }
}

/** Options of {@linkcode s3RangeReader}. */
export interface S3RangeReaderOptions extends S3ReadOptions {
  /** Ranged GETs in flight at most (default 4); further reads wait for a free one. */
  concurrency?: number | undefined;
}

/**
 * Opens an S3 object for random reads: each read is a ranged GET (resumed where a
 * connection drops), at most `concurrency` at once. The object is pinned to the ETag it had
 * when opened.
 *
 * @example Read ranges of an object (an S3 server in memory stands in for real storage)
 * ```ts
 * import assert from "node:assert/strict";
 * import { s3RangeReader } from "./s3_download.ts";
 *
 * const object = new TextEncoder().encode("0123456789");
 * const server = Deno.serve({ port: 0, onListen() {} }, (request) => {
 *   const headers = { etag: '"e1"' };
 *   if (request.method === "HEAD") {
 *     return new Response(null, { headers: { ...headers, "content-length": "10" } });
 *   }
 *   const [, first, last] = request.headers.get("range")!.match(/bytes=(\d+)-(\d+)/)!;
 *   const range = `bytes ${first}-${last}/10`;
 *   return new Response(object.slice(Number(first), Number(last) + 1), {
 *     status: 206,
 *     headers: { ...headers, "content-range": range },
 *   });
 * });
 * const reader = await s3RangeReader("s3://backups/vm.vma.zst", {
 *   endpoint: `http://127.0.0.1:${server.addr.port}`,
 *   credentials: { accessKeyId: "AKID", secretAccessKey: "secret" },
 * });
 * assert.deepEqual([reader.name, reader.size], ["s3://backups/vm.vma.zst", 10]);
 * assert.equal(new TextDecoder().decode(await reader.read(3, 4)), "3456");
 * await assert.rejects(reader.read(8, 4), Deno.errors.UnexpectedEof);
 * reader.close();
 * await server.shutdown();
 * ```
 */
export async function s3RangeReader(
  url: string,
  options: S3RangeReaderOptions = {},
): Promise<RangeReader> {
  const client = options.client ?? await S3Client.create(options);
  const info = await headObject(client, parseS3Url(url));
  const concurrency = options.concurrency ?? 4;
  const stop = new AbortController();
  let running = 0;
  const waiting: (() => void)[] = [];
  const slot = async () => {
    while (running >= concurrency) await new Promise<void>((resolve) => waiting.push(resolve));
    running++;
  };
  const free = () => {
    running--;
    waiting.shift()?.();
  };
  return {
    name: info.url,
    size: info.size,
    async read(offset, length) {
      if (
        !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0
      ) {
        throw new RangeError(`cannot read ${length} bytes at ${offset}`);
      }
      if (offset + length > info.size) {
        throw new Deno.errors.UnexpectedEof(
          `Cannot read ${length} bytes at ${offset} of ${info.url}: It ends at ${info.size}`,
        );
      }
      const bytes = new Uint8Array(length);
      if (length === 0) return bytes;
      await slot();
      try {
        await readInto(client, info, bytes, offset, stop.signal);
      } finally {
        free();
      }
      return bytes;
    },
    close() {
      stop.abort(new Deno.errors.Interrupted(`${info.url} was closed`));
    },
  };
}

/** Fills `bytes` from `offset` of the object, resuming after dropped connections. */
async function readInto(
  client: S3Client,
  info: S3ObjectInfo,
  bytes: Uint8Array,
  offset: number,
  signal: AbortSignal,
): Promise<void> {
  const policy = client.retry;
  let filled = 0;
  for (let failures = 0; filled < bytes.byteLength;) {
    const response = await getRange(
      client,
      info,
      offset + filled,
      offset + bytes.byteLength,
      signal,
    );
    try {
      for await (const chunk of response.body!) {
        if (filled + chunk.byteLength > bytes.byteLength) {
          throw new S3Error({
            url: info.url,
            operation: `read at byte ${offset}`,
            status: response.status,
            code: "TooLong",
            detail: "the answer is longer than the range asked for",
          });
        }
        bytes.set(chunk, filled);
        filled += chunk.byteLength;
        failures = 0;
      }
      if (filled === bytes.byteLength) return;
    } catch (error) {
      signal.throwIfAborted();
      if (!isNetworkError(error)) throw error;
    }
    if (++failures >= policy.attempts) {
      throw new S3Error({
        url: info.url,
        operation: `read at byte ${offset + filled}`,
        status: 0,
        code: "NetworkError",
        detail: `the connection keeps closing early, after ${policy.attempts} attempts`,
      });
    }
    await new Promise((resolve) => setTimeout(resolve, retryDelay(policy, failures)));
  }
}
