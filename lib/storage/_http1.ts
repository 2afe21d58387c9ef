// Copyright 2026 the vmabackup authors. MIT license.
/**
 * HTTP/1.1 requests whose body is one large byte array, written straight from the caller's
 * buffer to the socket (internal).
 *
 * Deno's `fetch` copies a `Uint8Array` body (the Fetch standard asks for a copy), and those
 * multi-MiB copies stay resident long after they became garbage: sending 8 MiB parts with
 * `fetch` took a process to 150 MiB where writing them to a socket stays at 60 MiB (and was
 * faster). Upload parts therefore go through here; every other request uses `fetch`.
 *
 * @module
 */

/** What one request sends. */
export interface Http1Request {
  method: string;
  /** Header names in lower case; `host` and `content-length` are added. */
  headers: Headers;
  body: Uint8Array;
  signal?: AbortSignal | undefined;
}

/** Largest response body read (answers to uploads are empty or a short XML error). */
const MAX_RESPONSE_BODY = 1 << 20;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * HTTP/1.1 requests with a byte-array body over a small pool of keep-alive connections. A
 * reused connection that the server had closed is replaced once, as HTTP clients do; other
 * failures reject with a `TypeError`, as `fetch` rejects for network errors. Close the pool
 * when done: idle connections are open resources.
 *
 * @example PUTs to a local server over one connection
 * ```ts
 * import assert from "node:assert/strict";
 * import { Http1Pool } from "./_http1.ts";
 *
 * const server = Deno.serve({ port: 0, onListen() {} }, async (request) =>
 *   new Response(`${request.method} ${(await request.bytes()).length}`, { status: 201 }));
 * const url = new URL(`http://127.0.0.1:${server.addr.port}/b/k?partNumber=1`);
 * const pool = new Http1Pool();
 * const body = new Uint8Array(3 << 20);
 * for (let i = 0; i < 2; i++) { // the second request reuses the connection
 *   const response = await pool.request(url, { method: "PUT", headers: new Headers(), body });
 *   assert.equal(response.status, 201);
 *   assert.equal(await response.text(), `PUT ${3 << 20}`);
 * }
 * pool.close();
 * await server.shutdown();
 * ```
 */
export class Http1Pool {
  /** Idle keep-alive connections, by origin. */
  #idle = new Map<string, Deno.Conn[]>();

  /** Sends a request and resolves with the whole response (its body read). */
  async request(url: URL, request: Http1Request): Promise<Response> {
    const origin = url.origin;
    for (let fresh = false;; fresh = true) {
      const reused = fresh ? undefined : this.#idle.get(origin)?.pop();
      let conn: Deno.Conn;
      try {
        conn = reused ?? await connect(url);
      } catch (error) {
        throw new TypeError(`cannot connect to ${url.host}: ${describe(error)}`, { cause: error });
      }
      const onAbort = () => close(conn);
      request.signal?.addEventListener("abort", onAbort, { once: true });
      try {
        const { response, keepAlive } = await exchange(conn, url, request);
        if (keepAlive) this.#keep(origin, conn);
        else close(conn);
        return response;
      } catch (error) {
        close(conn);
        request.signal?.throwIfAborted();
        // A kept-alive connection may have been closed by the server meanwhile.
        if (reused && error instanceof StaleConnection) continue;
        throw new TypeError(`${describe(error)} (${url.host})`, { cause: error });
      } finally {
        request.signal?.removeEventListener("abort", onAbort);
      }
    }
  }

  /** Closes the idle connections; later requests open new ones. */
  close(): void {
    for (const list of this.#idle.values()) list.forEach(close);
    this.#idle.clear();
  }

  #keep(origin: string, conn: Deno.Conn): void {
    const list = this.#idle.get(origin) ?? [];
    if (list.length >= 8) return close(conn);
    list.push(conn);
    this.#idle.set(origin, list);
  }
}

/** The connection closed before any byte of the response came back. */
class StaleConnection extends Error {}

function connect(url: URL): Promise<Deno.Conn> {
  const port = Number(url.port || (url.protocol === "https:" ? 443 : 80));
  const hostname = url.hostname.replace(/^\[(.*)\]$/, "$1");
  return url.protocol === "https:"
    ? Deno.connectTls({ hostname, port })
    : Deno.connect({ hostname, port });
}

/** Writes the request and reads the answer at the same time (a server may answer early). */
async function exchange(
  conn: Deno.Conn,
  url: URL,
  request: Http1Request,
): Promise<{ response: Response; keepAlive: boolean }> {
  const lines = [`${request.method} ${url.pathname}${url.search} HTTP/1.1`, `host: ${url.host}`];
  for (const [name, value] of request.headers) {
    if (/[\r\n]/.test(value)) throw new TypeError(`header ${name} holds a line break`);
    if (name !== "host" && name !== "content-length") lines.push(`${name}: ${value}`);
  }
  lines.push(`content-length: ${request.body.byteLength}`, "", "");
  const answer = readResponse(conn);
  answer.catch(() => {}); // awaited below; a failed write must not leave it unhandled
  let writeError: unknown;
  try {
    await writeAll(conn, encoder.encode(lines.join("\r\n")));
    await writeAll(conn, request.body);
  } catch (error) {
    writeError = error; // an early answer (a 403 before the body was read) explains it
  }
  try {
    const result = await answer;
    return { ...result, keepAlive: result.keepAlive && writeError === undefined };
  } catch (error) {
    throw writeError instanceof Deno.errors.BrokenPipe ||
        writeError instanceof Deno.errors.ConnectionReset
      ? new StaleConnection(describe(writeError), { cause: writeError })
      : error;
  }
}

/** Reads a status line, headers and a body (Content-Length, chunked, or up to the close). */
async function readResponse(conn: Deno.Conn): Promise<{ response: Response; keepAlive: boolean }> {
  const reader = new ConnReader(conn);
  const head = await reader.readHead();
  const [statusLine, ...headerLines] = head.split("\r\n");
  const match = statusLine!.match(/^HTTP\/1\.([01]) (\d{3})(?: (.*))?$/);
  if (!match) throw new TypeError(`not an HTTP/1.1 answer: ${statusLine!.slice(0, 80)}`);
  const headers = new Headers();
  for (const line of headerLines) {
    const colon = line.indexOf(":");
    if (colon > 0) headers.append(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
  }
  const status = Number(match[2]);
  let body: Uint8Array;
  const length = headers.get("content-length");
  if (headers.get("transfer-encoding")?.toLowerCase().includes("chunked")) {
    body = await reader.readChunked();
  } else if (length !== null) {
    body = await reader.readExactly(Number(length));
  } else if (status === 204 || status === 304 || (status >= 100 && status < 200)) {
    body = new Uint8Array(0);
  } else {
    body = await reader.readToEnd();
  }
  const keepAlive = match[1] === "1" && length !== null &&
    !/close/i.test(headers.get("connection") ?? "");
  const nullBody = status === 204 || status === 304;
  const response = new Response(nullBody ? null : body as Uint8Array<ArrayBuffer>, {
    status,
    statusText: match[3] ?? "",
    headers,
  });
  return { response, keepAlive };
}

/** Buffered reads from a connection. */
class ConnReader {
  #conn: Deno.Conn;
  #buffer = new Uint8Array(0);
  #seen = false;

  constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  async #fill(): Promise<boolean> {
    const chunk = new Uint8Array(64 * 1024);
    const count = await this.#conn.read(chunk);
    if (count === null) {
      if (!this.#seen) throw new StaleConnection("the connection closed before any answer");
      return false;
    }
    this.#seen = true;
    const joined = new Uint8Array(this.#buffer.byteLength + count);
    joined.set(this.#buffer);
    joined.set(chunk.subarray(0, count), this.#buffer.byteLength);
    this.#buffer = joined;
    if (this.#buffer.byteLength > MAX_RESPONSE_BODY + 64 * 1024) {
      throw new TypeError("the answer is too long");
    }
    return true;
  }

  #take(count: number): Uint8Array {
    const taken = this.#buffer.slice(0, count);
    this.#buffer = this.#buffer.subarray(count);
    return taken;
  }

  async readHead(): Promise<string> {
    for (;;) {
      const end = blankLine(this.#buffer);
      if (end >= 0) {
        const head = decoder.decode(this.#take(end));
        this.#take(4);
        return head;
      }
      if (!await this.#fill()) throw new TypeError("the connection closed in the answer's head");
    }
  }

  async readExactly(count: number): Promise<Uint8Array> {
    if (!Number.isSafeInteger(count) || count < 0 || count > MAX_RESPONSE_BODY) {
      throw new TypeError(`an answer body of ${count} bytes`);
    }
    while (this.#buffer.byteLength < count) {
      if (!await this.#fill()) throw new TypeError("the connection closed in the answer's body");
    }
    return this.#take(count);
  }

  async #readLine(): Promise<string> {
    for (;;) {
      const end = this.#buffer.indexOf(10);
      if (end >= 0) return decoder.decode(this.#take(end + 1)).trimEnd();
      if (!await this.#fill()) throw new TypeError("the connection closed in a chunked body");
    }
  }

  async readChunked(): Promise<Uint8Array> {
    const parts: Uint8Array[] = [];
    for (;;) {
      const size = parseInt(await this.#readLine(), 16);
      if (!Number.isSafeInteger(size)) throw new TypeError("a bad chunk size in the answer");
      if (size === 0) {
        while (await this.#readLine() !== ""); // trailers
        return concat(parts);
      }
      parts.push(await this.readExactly(size));
      await this.#readLine();
    }
  }

  async readToEnd(): Promise<Uint8Array> {
    while (await this.#fill());
    return this.#take(this.#buffer.byteLength);
  }
}

/** Where the first `\r\n\r\n` starts, or -1. */
function blankLine(bytes: Uint8Array): number {
  for (
    let i = bytes.indexOf(13);
    i >= 0 && i + 3 < bytes.byteLength;
    i = bytes.indexOf(13, i + 1)
  ) {
    if (bytes[i + 1] === 10 && bytes[i + 2] === 13 && bytes[i + 3] === 10) return i;
  }
  return -1;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const joined = new Uint8Array(parts.reduce((sum, part) => sum + part.byteLength, 0));
  let offset = 0;
  for (const part of parts) {
    joined.set(part, offset);
    offset += part.byteLength;
  }
  return joined;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.byteLength;) done += await conn.write(bytes.subarray(done));
}

function close(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch { /* closed already */ }
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
