// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Signed requests to S3 storage with retries. `aws4fetch` signs (SigV4, `UNSIGNED-PAYLOAD`);
 * the retry loop is ours, because aws4fetch retries only 5xx and 429 answers, never a network
 * error. Bodies are whole byte arrays or strings, so any attempt can be sent again. Large
 * byte-array bodies (upload parts) are written to the socket without the copy `fetch` makes.
 *
 * @module
 */
import { AwsClient } from "aws4fetch";
import { Http1Pool } from "./_http1.ts";
import { resolveS3Config, type S3Config, type S3Location, type S3Options } from "./s3_config.ts";
import { S3Error } from "./s3_errors.ts";

/** How often and how patiently a request is tried. */
export interface RetryPolicy {
  /** Attempts per request, the first included. */
  attempts: number;
  /** Wait before the second attempt, in ms; it doubles with every failure. */
  initialDelay: number;
  /** The longest wait between attempts, in ms. */
  maxDelay: number;
}

/**
 * 8 attempts, waiting 0.25, 0.5, 1, 2, 4, 8, 8 s (each between half and all of that, at
 * random): a request gives up after 12 to 24 s of failures, so a restarting server is ridden
 * out.
 */
export const DEFAULT_RETRY: RetryPolicy = { attempts: 8, initialDelay: 250, maxDelay: 8000 };

/**
 * The wait before the next attempt after `failures` failed ones ("equal jitter": between half
 * and all of the doubled delay, so the total stays within known bounds).
 *
 * @example The default policy
 * ```ts
 * import assert from "node:assert/strict";
 * import { DEFAULT_RETRY, retryDelay } from "./s3_client.ts";
 *
 * assert.equal(retryDelay(DEFAULT_RETRY, 1, () => 1), 250);
 * assert.equal(retryDelay(DEFAULT_RETRY, 3, () => 1), 1000);
 * assert.equal(retryDelay(DEFAULT_RETRY, 3, () => 0), 500);
 * assert.equal(retryDelay(DEFAULT_RETRY, 7, () => 1), 8000); // capped
 * ```
 */
export function retryDelay(
  policy: RetryPolicy,
  failures: number,
  random: () => number = Math.random,
): number {
  const full = Math.min(policy.maxDelay, policy.initialDelay * 2 ** (failures - 1));
  return full / 2 + (full / 2) * random();
}

/** One request to S3 storage. */
export interface S3Request {
  /** What is being done, for error messages: `upload part 3`, `read`. */
  operation: string;
  /** The HTTP method. */
  method: "GET" | "HEAD" | "PUT" | "POST" | "DELETE";
  /** The object; an empty key addresses the bucket. */
  location: S3Location;
  /** Query parameters; an empty value is sent as a bare name (`?uploads`). */
  query?: Record<string, string>;
  /** Headers to send (and sign), such as `range` or `content-type`. */
  headers?: Record<string, string>;
  /** A body that can be sent again on a retry. */
  body?: Uint8Array<ArrayBuffer> | string;
  /** Aborts the request and the waits between attempts; rejects with its reason. */
  signal?: AbortSignal;
  /** Instead of the client's policy. */
  retry?: RetryPolicy;
  /** Statuses returned instead of thrown (besides 2xx), such as 404 for an existence check. */
  accept?: number[];
  /** Called before each retry with the failure that caused it. */
  onRetry?: (failure: S3Error, attempt: number) => void;
}

/** Options of {@linkcode S3Client}. */
export interface S3ClientOptions {
  /** Retries of every request (default {@linkcode DEFAULT_RETRY}). */
  retry?: Partial<RetryPolicy> | undefined;
  /**
   * ms to wait for the response headers of one attempt before trying again (default 120 s),
   * plus 1 s per MiB of body, which must be sent first.
   */
  timeout?: number | undefined;
}

/** Bodies from this size on go through {@linkcode Http1Pool}, not `fetch`. */
const DIRECT_BODY_SIZE = 64 * 1024;

const READABLE_CODES: Record<string, string> = {
  NoSuchBucket: "no such bucket",
  NoSuchKey: "no such key",
  NoSuchUpload: "no such multipart upload",
  AccessDenied: "access denied",
  Forbidden: "access denied (wrong credentials, or not allowed)",
  InvalidAccessKeyId: "the access key is unknown to the storage",
  SignatureDoesNotMatch: "the secret key is wrong (the signature does not match)",
  RequestTimeTooSkewed: "the clock of this machine is too far off the storage's",
  PreconditionFailed: "the object changed or exists",
};

/**
 * A client for one S3 endpoint and set of credentials: builds object URLs, signs requests
 * and retries them on 5xx, 429, network errors and timeouts, with backoff.
 *
 * @example A bucket that does not exist, on a server that answers 404
 * ```ts
 * import assert from "node:assert/strict";
 * import { S3Client } from "./s3_client.ts";
 *
 * const server = Deno.serve({ port: 0, onListen() {} }, (request) => {
 *   assert.match(request.headers.get("authorization")!, /^AWS4-HMAC-SHA256 Credential=AKID\//);
 *   const body = "<Error><Code>NoSuchBucket</Code><Message></Message></Error>";
 *   return new Response(body, { status: 404 });
 * });
 * const config = {
 *   endpoint: `http://127.0.0.1:${server.addr.port}`,
 *   pathStyle: true,
 *   region: "us-east-1",
 *   credentials: { accessKeyId: "AKID", secretAccessKey: "secret" },
 * };
 * const client = new S3Client(config);
 * assert.equal(
 *   client.url({ bucket: "b", key: "a dir/x(1).vma" }, { uploadId: "2~x", uploads: "" }),
 *   `${config.endpoint}/b/a%20dir/x%281%29.vma?uploadId=2~x&uploads`,
 * );
 * await assert.rejects(
 *   client.send({ operation: "read", method: "GET", location: { bucket: "nope", key: "x" } }),
 *   { name: "S3Error", status: 404, message: "s3://nope/x: read: no such bucket (404 NoSuchBucket)" },
 * );
 * await server.shutdown();
 * ```
 */
export class S3Client {
  #config: S3Config;
  #signer: AwsClient;
  #retry: RetryPolicy;
  #timeout: number;
  #http1 = new Http1Pool();

  /** A client for a resolved configuration (see {@linkcode S3Client.create} for the usual way). */
  constructor(config: S3Config, options: S3ClientOptions = {}) {
    this.#config = config;
    const { sessionToken, ...keys } = config.credentials;
    this.#signer = new AwsClient({
      ...keys,
      ...(sessionToken && { sessionToken }),
      service: "s3",
      region: config.region,
      retries: 0, // the retries are ours (see send)
    });
    this.#retry = { ...DEFAULT_RETRY, ...stripUndefined(options.retry ?? {}) };
    this.#timeout = options.timeout ?? 120_000;
  }

  /**
   * A client configured from `options` and the environment (see `resolveS3Config`).
   *
   * @example Explicit settings
   * ```ts
   * import assert from "node:assert/strict";
   * import { S3Client } from "./s3_client.ts";
   *
   * const client = await S3Client.create({
   *   endpoint: "http://127.0.0.1:7480",
   *   credentials: { accessKeyId: "AKID", secretAccessKey: "secret" },
   *   retry: { attempts: 3 },
   * });
   * assert.equal(client.retry.attempts, 3);
   * assert.equal(client.url({ bucket: "b", key: "k" }), "http://127.0.0.1:7480/b/k");
   * ```
   */
  static async create(options: S3Options & S3ClientOptions = {}): Promise<S3Client> {
    return new S3Client(await resolveS3Config(options), options);
  }

  /** The endpoint, region and credentials in use. */
  get config(): S3Config {
    return this.#config;
  }

  /** The retry policy of requests that do not bring their own. */
  get retry(): RetryPolicy {
    return this.#retry;
  }

  /** Closes the kept-alive connections of uploads; the client stays usable. */
  close(): void {
    this.#http1.close();
  }

  /** The HTTP URL of an object (or of the bucket, for an empty key). */
  url(location: S3Location, query: Record<string, string> = {}): string {
    const key = location.key.split("/").map(encodeSegment).join("/");
    let base: string;
    if (this.#config.pathStyle || location.bucket.includes(".")) {
      base = `${this.#config.endpoint}/${location.bucket}`;
    } else {
      const endpoint = new URL(this.#config.endpoint);
      endpoint.hostname = `${location.bucket}.${endpoint.hostname}`;
      base = `${endpoint.origin}${endpoint.pathname.replace(/\/+$/, "")}`;
    }
    const search = Object.entries(query)
      .map(([name, value]) => value === "" ? name : `${name}=${encodeURIComponent(value)}`)
      .join("&");
    return `${base}/${key}${search ? `?${search}` : ""}`;
  }

  /**
   * Sends a request, retrying 5xx and 429 answers, network errors and timeouts under the
   * retry policy. Resolves with a 2xx response (or one of `accept`), whose body the caller
   * reads or cancels; rejects with an {@linkcode S3Error}, or the signal's reason.
   */
  send(request: S3Request): Promise<Response> {
    return this.#send(request, (response) => Promise.resolve(response));
  }

  /**
   * Like {@linkcode S3Client.send}, for answers whose body matters (an upload id, a list):
   * reads the body as text, and a connection that drops while it is read counts as a failed
   * attempt too.
   */
  sendText(request: S3Request): Promise<{ response: Response; text: string }> {
    return this.#send(request, async (response) => ({ response, text: await response.text() }));
  }

  async #send<T>(request: S3Request, consume: (response: Response) => Promise<T>): Promise<T> {
    const policy = request.retry ?? this.#retry;
    const url = this.url(request.location, request.query);
    const name = `s3://${request.location.bucket}/${request.location.key}`;
    for (let attempt = 1;; attempt++) {
      request.signal?.throwIfAborted();
      let failure: S3Error;
      try {
        const response = await this.#attempt(url, request);
        if (response.ok || request.accept?.includes(response.status)) {
          return await consume(response);
        }
        failure = await errorOf(name, request, response);
        if (response.status < 500 && response.status !== 429) throw failure;
      } catch (error) {
        if (request.signal?.aborted) throw request.signal.reason;
        if (error instanceof S3Error) throw error;
        if (!isNetworkError(error)) throw error; // NotCapable (no --allow-net) and the like
        failure = networkError(name, request.operation, error);
      }
      if (attempt >= policy.attempts) {
        const tries = policy.attempts > 1 ? ` after ${policy.attempts} attempts` : "";
        throw new S3Error({ ...failure, detail: `${failure.detail}${tries}` }, { cause: failure });
      }
      request.onRetry?.(failure, attempt);
      await wait(retryDelay(policy, attempt), request.signal);
    }
  }

  /** One signed attempt; the timeout covers sending the body and the wait for the headers. */
  async #attempt(url: string, request: S3Request): Promise<Response> {
    const signed = await this.#signer.sign(url, {
      method: request.method,
      headers: request.headers ?? {},
    });
    const timeout = new AbortController();
    const bodyBytes = request.body instanceof Uint8Array ? request.body.byteLength : 0;
    const limit = this.#timeout + Math.ceil(bodyBytes / (1 << 20)) * 1000;
    const timer = setTimeout(
      () => timeout.abort(new Deno.errors.TimedOut(`no answer within ${limit / 1000} s`)),
      limit,
    );
    const signals = request.signal ? [timeout.signal, request.signal] : [timeout.signal];
    const signal = AbortSignal.any(signals);
    const { body } = request;
    try {
      if (body instanceof Uint8Array && body.byteLength >= DIRECT_BODY_SIZE) {
        return await this.#http1.request(new URL(url), {
          method: request.method,
          headers: signed.headers,
          body,
          signal,
        });
      }
      return await fetch(url, {
        method: request.method,
        headers: signed.headers,
        ...(body !== undefined && { body }),
        signal,
      });
    } catch (error) {
      throw timeout.signal.aborted ? timeout.signal.reason : error;
    } finally {
      clearTimeout(timer);
    }
  }
}

/** Percent-encodes one path segment of a key as SigV4 canonicalizes it (RFC 3986). */
function encodeSegment(segment: string): string {
  return encodeURIComponent(segment).replace(
    /[!'()*]/g,
    (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`,
  );
}

function stripUndefined<T extends object>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/**
 * True for failures worth another attempt: no answer at all. Deno's `fetch` rejects with a
 * TypeError for refused, reset and closed connections; a read of the body may fail with one
 * of Deno's connection errors.
 */
export function isNetworkError(error: unknown): boolean {
  return error instanceof TypeError ||
    error instanceof Deno.errors.TimedOut ||
    error instanceof Deno.errors.ConnectionRefused ||
    error instanceof Deno.errors.ConnectionReset ||
    error instanceof Deno.errors.ConnectionAborted ||
    error instanceof Deno.errors.BrokenPipe ||
    error instanceof Deno.errors.UnexpectedEof ||
    (error instanceof Error && error.name === "Http");
}

/** The S3Error of a failed network attempt, with the innermost reason as its text. */
export function networkError(url: string, operation: string, error: unknown): S3Error {
  const text = error instanceof Error ? error.message : String(error);
  // "error sending request for url (...): client error (Connect): tcp connect error: Connection
  // refused (os error 111)": the last clause says what happened.
  const detail = text.split(": ").at(-1)!.trim() || text;
  const code = error instanceof Deno.errors.TimedOut ? "TimedOut" : "NetworkError";
  return new S3Error({ url, operation, status: 0, code, detail }, { cause: error });
}

/** The S3Error of a non-2xx answer, from its XML error body (HEAD answers have none). */
async function errorOf(url: string, request: S3Request, response: Response): Promise<S3Error> {
  const text = request.method === "HEAD" ? "" : await response.text().catch(() => "");
  if (request.method === "HEAD") await response.body?.cancel();
  // HEAD answers have no body to say why: name the usual reasons.
  const status = response.statusText.replace(/\s+/g, "") || `HTTP${response.status}`;
  const code = xmlValue(text, "Code") ?? (response.status === 403 ? "Forbidden" : status);
  const detail = READABLE_CODES[code] ?? (xmlValue(text, "Message") || code);
  return new S3Error({ url, operation: request.operation, status: response.status, code, detail });
}

/**
 * The text of the first `<name>` element of an XML document, unescaped; undefined if absent.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { xmlValue } from "./s3_client.ts";
 *
 * const xml = "<Result><UploadId>2~a&amp;b</UploadId><Key>k</Key></Result>";
 * assert.equal(xmlValue(xml, "UploadId"), "2~a&b");
 * assert.equal(xmlValue(xml, "ETag"), undefined);
 * ```
 */
export function xmlValue(xml: string, name: string): string | undefined {
  const match = xml.match(new RegExp(`<${name}>([^<]*)</${name}>`));
  return match ? unescapeXml(match[1]!) : undefined;
}

/**
 * The text of every `<name>` element.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { xmlValues } from "./s3_client.ts";
 *
 * assert.deepEqual(xmlValues("<a><K>1</K><K>2</K></a>", "K"), ["1", "2"]);
 * ```
 */
export function xmlValues(xml: string, name: string): string[] {
  const pattern = new RegExp(`<${name}>([^<]*)</${name}>`, "g");
  return [...xml.matchAll(pattern)].map((match) => unescapeXml(match[1]!));
}

function unescapeXml(text: string): string {
  return text.replace(
    /&(lt|gt|quot|apos|amp);/g,
    (_, entity: string) => ({ lt: "<", gt: ">", quot: '"', apos: "'", amp: "&" })[entity]!,
  );
}

/**
 * Waits `ms`, or rejects with the signal's reason once it is aborted.
 */
function wait(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
