// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Streaming uploads to S3 storage: a multipart upload of buffered parts, a few in flight,
 * each retried on its own. The key appears only when the upload completes; on any failure
 * the upload is aborted, so no object and no parts are left behind.
 *
 * @module
 */
import { md5 } from "../_bytes.ts";
import { releaseChunk } from "../_pool.ts";
import { S3Client, type S3ClientOptions, xmlValue } from "./s3_client.ts";
import { formatS3Url, parseS3Url, type S3Location, type S3Options } from "./s3_config.ts";
import { S3Error } from "./s3_errors.ts";

const MiB = 1 << 20;
/** The smallest part S3 accepts, but for the last one. */
export const MIN_PART_SIZE: number = 5 * MiB;
/** The largest part S3 accepts. */
export const MAX_PART_SIZE: number = 5 * 1024 * MiB;
/** The most parts one upload may have. */
export const MAX_PARTS = 10_000;
/**
 * The part size unless the expected size needs larger ones: S3's minimum, because memory
 * holds three parts (two sent, one filling) and a 1 GiB backup was no faster with 8 or 16 MiB.
 */
export const DEFAULT_PART_SIZE: number = 5 * MiB;
/** Parts sent at once, by default. */
export const DEFAULT_QUEUE_SIZE = 2;
/** Parts of the base size; the last 1,000 grow, for a stream larger than expected. */
const BASE_PARTS = 9_000;

/**
 * Aborting is what keeps storage clean: it is tried for about a minute, so a gateway that
 * restarts meanwhile still gets the abort.
 */
const ABORT_RETRY = { attempts: 16, initialDelay: 250, maxDelay: 5000 };

/**
 * The base part size: `minimum`, or larger (in whole MiB) where the expected size would need
 * more than 9,000 parts of it.
 *
 * @example 5 MiB parts up to about 44 GiB
 * ```ts
 * import assert from "node:assert/strict";
 * import { basePartSize } from "./s3_upload.ts";
 *
 * assert.equal(basePartSize(undefined), 5 << 20);
 * assert.equal(basePartSize(40 * 2 ** 30), 5 << 20);
 * assert.equal(basePartSize(64 * 2 ** 30), 8 << 20);
 * assert.equal(basePartSize(2 ** 40), 117 << 20); // 1 TiB: 9,000 parts of 117 MiB
 * ```
 */
export function basePartSize(
  expectedSize: number | undefined,
  minimum = DEFAULT_PART_SIZE,
): number {
  const needed = Math.ceil((expectedSize ?? 0) / BASE_PARTS / MiB) * MiB;
  return Math.min(MAX_PART_SIZE, Math.max(minimum, needed));
}

/**
 * The size of part `number` (1-based): the base size up to part 9,000, then doubling every
 * 100 parts up to 5 GiB, so a stream larger than expected still fits in 10,000 parts.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { partSizeFor } from "./s3_upload.ts";
 *
 * const base = 8 << 20;
 * assert.equal(partSizeFor(1, base), base);
 * assert.equal(partSizeFor(9000, base), base);
 * assert.equal(partSizeFor(9001, base), 2 * base);
 * assert.equal(partSizeFor(9101, base), 4 * base);
 * assert.equal(partSizeFor(10000, base), 5 * 2 ** 30); // capped at the S3 maximum
 * ```
 */
export function partSizeFor(number: number, base: number): number {
  if (number <= BASE_PARTS) return base;
  return Math.min(MAX_PART_SIZE, base * 2 ** (Math.floor((number - BASE_PARTS - 1) / 100) + 1));
}

/** Options of {@linkcode s3Sink}. */
export interface S3SinkOptions extends S3Options, S3ClientOptions {
  /** A client to share (its endpoint and credentials win over the other options). */
  client?: S3Client | undefined;
  /**
   * Base part size in bytes, at least 5 MiB (default 5 MiB, or larger to fit `expectedSize`).
   * Parts are buffered in memory: the sink holds up to `queueSize + 1` of them.
   */
  partSize?: number | undefined;
  /** Expected total in bytes, which sizes the parts (see {@linkcode S3Sink.expectSize}). */
  expectedSize?: number | undefined;
  /** Parts sent at once (default 2). */
  queueSize?: number | undefined;
  /** Replace an existing object (default false: refuse, before and again at the end). */
  overwrite?: boolean | undefined;
  /**
   * Complete the upload when the stream closes (default true). With false, close only sends
   * the last part, and the object appears when {@linkcode S3Sink.complete} is called.
   */
  completeOnClose?: boolean | undefined;
  /** The object's Content-Type (default `application/octet-stream`). */
  contentType?: string | undefined;
}

/** A finished upload. */
export interface S3UploadResult {
  /** `s3://BUCKET/KEY`. */
  url: string;
  /** Bytes stored. */
  size: number;
  /** Parts it was sent in (1 for a single PUT). */
  parts: number;
}

/**
 * Opens an upload to `s3://BUCKET/KEY`: refuses an existing key unless `overwrite` (and says
 * so for a missing bucket) before any data is read. See {@linkcode S3Sink}.
 *
 * @example Upload a stream (an S3 server in memory stands in for real storage)
 * ```ts
 * import assert from "node:assert/strict";
 * import { s3Sink } from "./s3_upload.ts";
 *
 * const stored = new Map<string, Uint8Array>();
 * const server = Deno.serve({ port: 0, onListen() {} }, async (request) => {
 *   const path = new URL(request.url).pathname;
 *   if (request.method === "HEAD") { // the bucket exists; objects once stored
 *     return new Response(null, { status: path === "/backups/" || stored.has(path) ? 200 : 404 });
 *   }
 *   stored.set(path, await request.bytes()); // PUT: a small stream is sent as one object
 *   return new Response(null, { headers: { etag: '"etag"' } });
 * });
 * const options = {
 *   endpoint: `http://127.0.0.1:${server.addr.port}`,
 *   credentials: { accessKeyId: "AKID", secretAccessKey: "secret" },
 * };
 * const sink = await s3Sink("s3://backups/vm.vma", options);
 * await ReadableStream.from([new Uint8Array([1, 2]), new Uint8Array([3])]).pipeTo(sink);
 * assert.deepEqual(stored.get("/backups/vm.vma"), new Uint8Array([1, 2, 3]));
 * assert.deepEqual(await sink.complete(), { url: "s3://backups/vm.vma", size: 3, parts: 1 });
 * await assert.rejects(s3Sink("s3://backups/vm.vma", options), Deno.errors.AlreadyExists);
 * await server.shutdown();
 * ```
 */
export async function s3Sink(url: string, options: S3SinkOptions = {}): Promise<S3Sink> {
  const location = parseS3Url(url);
  const client = options.client ?? await S3Client.create(options);
  try {
    if (!options.overwrite) await refuseExisting(client, location, "check whether it exists");
  } catch (error) {
    if (!options.client) client.close();
    throw error;
  }
  const sink = new S3Sink(client, location, options);
  if (!options.client) ownClients.add(sink);
  return sink;
}

/** Sinks that close their client's connections once done (they created it). */
const ownClients = new WeakSet<S3Sink>();

/**
 * A WritableStream of bytes into one S3 object. Bytes are copied into part buffers (and the
 * chunks released, see `releaseChunk`); a full part is sent, straight from its buffer, while
 * the next one fills, with up to `queueSize` parts in flight, so memory stays at
 * `(queueSize + 1) × partSize` (the buffers are reused). A stream that fits in one part is
 * stored with one PUT. Every request is retried on 5xx, 429, network errors and timeouts.
 *
 * The object appears only when the upload completes. On a failed part, an abort of the
 * stream (a pipe that fails or whose signal fires) or {@linkcode S3Sink.discard}, the
 * multipart upload is aborted (retried for about a minute), so nothing is left behind.
 */
export class S3Sink extends WritableStream<Uint8Array> {
  #client: S3Client;
  #location: S3Location;
  #options: S3SinkOptions;
  #expected: number | undefined;
  #base: number | undefined;
  #buffer: Uint8Array<ArrayBuffer> | undefined;
  #filled = 0;
  #free: Uint8Array<ArrayBuffer>[] = [];
  #nextPart = 1;
  #etags: string[] = [];
  #uploadId: Promise<string> | undefined;
  #createRetried = false;
  #createdAt = 0;
  #inflight = new Set<Promise<void>>();
  /** Aborts the requests in flight once the upload fails. */
  #cancel = new AbortController();
  #failure: { error: unknown } | undefined;
  #aborted: Promise<void> | undefined;
  #closed = false;
  #result: Promise<S3UploadResult> | undefined;
  #written = 0;

  /** Use {@linkcode s3Sink}, which checks the key first. */
  constructor(client: S3Client, location: S3Location, options: S3SinkOptions = {}) {
    super({
      write: (chunk) => this.#write(chunk),
      close: () => this.#close(),
      abort: (reason) => {
        this.#fail(reason);
        return this.#abortUpload();
      },
    });
    const size = options.partSize;
    if (size !== undefined && !(Number.isSafeInteger(size) && size >= MIN_PART_SIZE)) {
      throw new RangeError(`the part size must be at least 5 MiB (${MIN_PART_SIZE}), not ${size}`);
    }
    if (size !== undefined && size > MAX_PART_SIZE) {
      throw new RangeError(`the part size must be at most 5 GiB (${MAX_PART_SIZE}), not ${size}`);
    }
    this.#client = client;
    this.#location = location;
    this.#options = options;
    this.#expected = options.expectedSize;
  }

  /** `s3://BUCKET/KEY`. */
  get url(): string {
    return formatS3Url(this.#location);
  }

  /** Bytes written into the stream so far. */
  get bytesWritten(): number {
    return this.#written;
  }

  /**
   * Sets the expected total size, which sizes the parts; it counts only until the first byte
   * is written (`backup` sets it to the sum of the disk sizes, known before any archive byte).
   */
  expectSize(bytes: number): void {
    this.#expected = bytes;
  }

  /**
   * Completes the upload (once; later calls return the same result): checks again that the
   * key does not exist (unless `overwrite`), then makes the object visible. Call it after the
   * stream closed. With `completeOnClose` (the default) closing calls it.
   */
  complete(): Promise<S3UploadResult> {
    if (!this.#closed) return Promise.reject(new TypeError("complete() needs a closed stream"));
    this.#result ??= this.#complete();
    return this.#result;
  }

  /**
   * Aborts the upload unless it completed: the parts sent are deleted and the key never
   * appears. Safe to call more than once. Rejects only when the abort itself failed (the
   * storage was unreachable for about a minute); the message names the upload left behind.
   */
  async discard(): Promise<void> {
    if (this.#result !== undefined && await this.#result.then(() => true, () => false)) return;
    this.#fail(new Error(`the upload to ${this.url} was discarded`));
    await this.#abortUpload();
  }

  async #write(chunk: Uint8Array): Promise<void> {
    this.#throwIfFailed();
    this.#base ??= this.#options.partSize ?? basePartSize(this.#expected);
    for (let offset = 0; offset < chunk.byteLength;) {
      this.#buffer ??= this.#takeBuffer(partSizeFor(this.#nextPart, this.#base));
      const count = Math.min(chunk.byteLength - offset, this.#buffer.byteLength - this.#filled);
      this.#buffer.set(chunk.subarray(offset, offset + count), this.#filled);
      this.#filled += count;
      offset += count;
      if (this.#filled === this.#buffer.byteLength) await this.#sendPart();
    }
    this.#written += chunk.byteLength;
    releaseChunk(chunk);
  }

  async #close(): Promise<void> {
    this.#throwIfFailed();
    // One part's worth or less stays in the buffer for a single PUT when completing.
    if (this.#nextPart > 1 && this.#filled > 0) await this.#sendPart();
    await Promise.all(this.#inflight);
    this.#throwIfFailed();
    this.#closed = true;
    if (this.#options.completeOnClose ?? true) await this.complete();
  }

  #takeBuffer(size: number): Uint8Array<ArrayBuffer> {
    const free = this.#free.pop();
    if (free?.byteLength === size) return free;
    this.#free = []; // the part size grew: the old buffers are of no more use
    return new Uint8Array(size);
  }

  /** Sends the buffer as the next part once fewer than `queueSize` parts are in flight. */
  async #sendPart(): Promise<void> {
    const buffer = this.#buffer!;
    const body = buffer.subarray(0, this.#filled);
    const number = this.#nextPart++;
    this.#buffer = undefined;
    this.#filled = 0;
    if (number > MAX_PARTS) {
      this.#fail(this.#error("upload", 0, "TooManyParts", `more than ${MAX_PARTS} parts`));
      this.#throwIfFailed();
    }
    this.#uploadId ??= this.#create();
    const queueSize = this.#options.queueSize ?? DEFAULT_QUEUE_SIZE;
    while (this.#inflight.size >= queueSize) await Promise.race(this.#inflight);
    this.#throwIfFailed();
    const task = this.#uploadPart(number, body)
      .catch((error) => this.#fail(error))
      .finally(() => {
        this.#inflight.delete(task);
        this.#free.push(buffer);
      });
    this.#inflight.add(task);
  }

  async #create(): Promise<string> {
    this.#createdAt = Date.now();
    const { response, text } = await this.#client.sendText({
      operation: "start the upload",
      method: "POST",
      location: this.#location,
      query: { uploads: "" },
      headers: { "content-type": this.#options.contentType ?? "application/octet-stream" },
      signal: this.#cancel.signal,
      onRetry: () => this.#createRetried = true,
    });
    const uploadId = xmlValue(text, "UploadId");
    if (!uploadId) {
      throw this.#error(
        "start the upload",
        response.status,
        "NoUploadId",
        "no UploadId in the answer",
      );
    }
    return uploadId;
  }

  async #uploadPart(number: number, body: Uint8Array<ArrayBuffer>): Promise<void> {
    const uploadId = await this.#uploadId!;
    const response = await this.#client.send({
      operation: `upload part ${number}`,
      method: "PUT",
      location: this.#location,
      query: { partNumber: String(number), uploadId },
      body,
      signal: this.#cancel.signal,
    });
    await response.body?.cancel();
    const etag = response.headers.get("etag");
    if (!etag) {
      throw this.#error(
        `upload part ${number}`,
        response.status,
        "NoETag",
        "no ETag in the answer",
      );
    }
    this.#etags[number - 1] = etag;
  }

  async #complete(): Promise<S3UploadResult> {
    this.#throwIfFailed();
    try {
      if (this.#uploadId === undefined) return await this.#putWhole();
      if (!this.#options.overwrite) {
        await refuseExisting(this.#client, this.#location, "check again whether it exists");
      }
      const uploadId = await this.#uploadId;
      const result = await this.#completeMultipart(uploadId);
      // Done; a lost answer to a start may have left another upload: best effort.
      if (this.#createRetried) await this.#abortOrphans(uploadId).catch(() => {});
      return result;
    } catch (error) {
      this.#fail(error);
      await this.#abortUpload();
      throw error;
    } finally {
      this.#done();
    }
  }

  /** Releases the connections of a client this sink created. */
  #done(): void {
    if (ownClients.has(this)) this.#client.close();
  }

  /** A stream that fit in one part: one PUT, which is atomic. */
  async #putWhole(): Promise<S3UploadResult> {
    const body = this.#buffer?.subarray(0, this.#filled) ?? new Uint8Array(0);
    if (!this.#options.overwrite) {
      await refuseExisting(this.#client, this.#location, "check again whether it exists");
    }
    const response = await this.#client.send({
      operation: "upload",
      method: "PUT",
      location: this.#location,
      headers: { "content-type": this.#options.contentType ?? "application/octet-stream" },
      body,
    });
    await response.body?.cancel();
    this.#buffer = undefined;
    return { url: this.url, size: body.byteLength, parts: 1 };
  }

  async #completeMultipart(uploadId: string): Promise<S3UploadResult> {
    const parts = this.#etags.map((etag, i) =>
      `<Part><PartNumber>${i + 1}</PartNumber><ETag>${escapeXml(etag)}</ETag></Part>`
    );
    const body = `<CompleteMultipartUpload>${parts.join("")}</CompleteMultipartUpload>`;
    const policy = this.#client.retry;
    for (let attempt = 1;; attempt++) {
      const { response, text } = await this.#client.sendText({
        operation: "complete the upload",
        method: "POST",
        location: this.#location,
        query: { uploadId },
        headers: { "content-type": "application/xml" },
        body,
        accept: [404],
      });
      // A lost answer to an attempt that did complete: the retry finds no upload, but the
      // object is there, with the ETag of exactly our parts.
      if (response.status === 404) {
        if (await this.#storedEtag() === this.#multipartEtag()) break;
        throw this.#error(
          "complete the upload",
          404,
          xmlValue(text, "Code") ?? "NoSuchUpload",
          "no such multipart upload",
        );
      }
      // S3 may answer 200 with an error in the body once it has started to answer.
      const code = xmlValue(text, "Code");
      if (!text.includes("<Error>") || code === undefined) break;
      const error = this.#error(
        "complete the upload",
        response.status,
        code,
        xmlValue(text, "Message") || code,
      );
      if (
        !["InternalError", "SlowDown", "ServiceUnavailable"].includes(code) ||
        attempt >= policy.attempts
      ) {
        throw error;
      }
      await new Promise((resolve) => setTimeout(resolve, policy.initialDelay * attempt));
    }
    this.#uploadId = undefined; // completed: there is nothing to abort any more
    this.#buffer = undefined;
    this.#free = [];
    return { url: this.url, size: this.#written, parts: this.#etags.length };
  }

  /** The ETag S3 gives an object made of our parts: the MD5 of their MD5s, and their count. */
  #multipartEtag(): string {
    const digests = this.#etags.map((etag) => Uint8Array.fromHex(etag.replaceAll('"', "")));
    const joined = new Uint8Array(digests.length * 16);
    digests.forEach((digest, i) => joined.set(digest, i * 16));
    return `"${md5(joined).toHex()}-${digests.length}"`;
  }

  /** The ETag of the stored object, or undefined when there is none. */
  async #storedEtag(): Promise<string | undefined> {
    const response = await this.#client.send({
      operation: "check the stored object",
      method: "HEAD",
      location: this.#location,
      accept: [404],
    });
    return response.status === 404 ? undefined : response.headers.get("etag") ?? undefined;
  }

  /** Records the first failure, stops the requests in flight and aborts the upload. */
  #fail(error: unknown): void {
    if (this.#failure) return;
    this.#failure = { error };
    this.#cancel.abort(error);
    this.#abortUpload().catch(() => {}); // discard() reports a failed abort
  }

  #throwIfFailed(): void {
    if (this.#failure) throw this.#failure.error;
  }

  /** Aborts the multipart upload once, after every request in flight has settled. */
  #abortUpload(): Promise<void> {
    this.#aborted ??= (async () => {
      await Promise.allSettled(this.#inflight);
      this.#buffer = undefined;
      this.#free = [];
      const uploadId = await this.#uploadId?.catch(() => undefined);
      try {
        if (uploadId !== undefined) await this.#abortMultipart(uploadId);
        if (this.#createRetried) await this.#abortOrphans(uploadId);
      } catch (error) {
        throw this.#abortFailed(error, uploadId);
      } finally {
        this.#done();
      }
    })();
    return this.#aborted;
  }

  /**
   * Aborts an upload, then checks that it is gone: S3 may still accept a part that was on
   * its way, which would bring the upload back.
   */
  async #abortMultipart(uploadId: string): Promise<void> {
    for (let round = 0; round < 3; round++) {
      const deleted = await this.#client.send({
        operation: "abort the upload",
        method: "DELETE",
        location: this.#location,
        query: { uploadId },
        retry: ABORT_RETRY,
        accept: [404],
      });
      await deleted.body?.cancel();
      const listed = await this.#client.send({
        operation: "check the abort",
        method: "GET",
        location: this.#location,
        query: { uploadId },
        retry: ABORT_RETRY,
        accept: [404],
      });
      await listed.body?.cancel();
      if (listed.status === 404) return;
    }
  }

  /**
   * Aborts uploads of this key that a retried start may have created without our seeing its
   * answer (initiated since this one started, not ours).
   */
  async #abortOrphans(ours: string | undefined): Promise<void> {
    const { text } = await this.#client.sendText({
      operation: "list the uploads",
      method: "GET",
      location: { bucket: this.#location.bucket, key: "" },
      query: { uploads: "", prefix: this.#location.key },
      retry: ABORT_RETRY,
    });
    for (const upload of text.split("<Upload>").slice(1)) {
      const uploadId = xmlValue(upload, "UploadId");
      const initiated = Date.parse(xmlValue(upload, "Initiated") ?? "");
      if (
        uploadId && uploadId !== ours && xmlValue(upload, "Key") === this.#location.key &&
        initiated >= this.#createdAt - 60_000
      ) {
        await this.#abortMultipart(uploadId);
      }
    }
  }

  #abortFailed(error: unknown, uploadId: string | undefined): Error {
    const abort = error instanceof S3Error ? error.detail : String(error);
    const left = `upload ${uploadId ?? "(unknown id)"} of ${this.url} is left behind (${abort})`;
    const failure = this.#failure?.error;
    if (failure instanceof S3Error) {
      return new S3Error({
        ...failure,
        detail: `${failure.detail}; the abort failed too: ${left}`,
      });
    }
    return this.#error("abort the upload", 0, "AbortFailed", left);
  }

  #error(operation: string, status: number, code: string, detail: string): S3Error {
    return new S3Error({ url: this.url, operation, status, code, detail });
  }
}

/**
 * Throws `Deno.errors.AlreadyExists` when the key exists, and an S3Error when its bucket
 * does not. A bucket that cannot be checked (no ListBucket permission) is left to the upload.
 */
async function refuseExisting(client: S3Client, location: S3Location, operation: string) {
  const head = await client.send({ operation, method: "HEAD", location, accept: [404] });
  if (head.status !== 404) {
    throw new Deno.errors.AlreadyExists(`${formatS3Url(location)} already exists`);
  }
  const bucket = await client.send({
    operation: "check the bucket",
    method: "HEAD",
    location: { bucket: location.bucket, key: "" },
    accept: [403, 404],
  });
  if (bucket.status === 404) {
    throw new S3Error({
      url: formatS3Url(location),
      operation: "check the bucket",
      status: 404,
      code: "NoSuchBucket",
      detail: "no such bucket",
    });
  }
}

function escapeXml(text: string): string {
  return text.replace(/[<>&'"]/g, (c) => `&#${c.charCodeAt(0)};`);
}
