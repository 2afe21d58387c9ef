// Copyright 2026 the vmabackup authors. MIT license.
/**
 * An HTTP proxy for tests that puts faults between a client and a real S3 server: it
 * answers 503 to some requests, drops the connection before a request reaches the server or
 * after the server answered (in the middle of the response body), and can slow requests
 * down. One request per connection (it asks the server for `Connection: close`), so each
 * request is seen and decided on its own.
 */

/** What the proxy does with one request. */
export type FaultAction =
  /** Forward it and its answer. */
  | "pass"
  /** Answer 503 SlowDown without forwarding. */
  | "503"
  /** Close the connection after half of the request body; the server never sees it. */
  | "drop-request"
  /** Forward it, then close the connection after half of the answer's body (or its head). */
  | "drop-response";

/** A request as the proxy saw it. */
export interface ProxiedRequest {
  method: string;
  /** Path and query. */
  target: string;
  action: FaultAction;
}

/** A running proxy. */
export interface FaultProxy {
  /** `http://127.0.0.1:PORT`. */
  endpoint: string;
  /** Every request so far, in order of arrival. */
  requests: ProxiedRequest[];
  /** Bytes of request bodies forwarded to the server. */
  bytesForwarded(): number;
  /** The most requests that were in progress at once. */
  maxConcurrent(): number;
  /** Bytes of answers (heads and bodies) passed back to clients. */
  bytesReturned(): number;
  close(): Promise<void>;
}

/** Options of {@linkcode startFaultProxy}. */
export interface FaultProxyOptions {
  /** Decides each request (numbered from 0); default "pass". */
  decide?: (index: number, method: string, target: string) => FaultAction;
  /** Delay before each request is forwarded, in ms (to make an upload take a while). */
  delay?: number;
  /** Awaited before each request is acted on (to change the server's state in between). */
  before?: (index: number, method: string, target: string) => Promise<void>;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Starts a proxy in front of `upstream` (`http://HOST:PORT`). */
export function startFaultProxy(upstream: string, options: FaultProxyOptions = {}): FaultProxy {
  const target = new URL(upstream);
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const requests: ProxiedRequest[] = [];
  const open = new Set<Deno.Conn>();
  const handlers = new Set<Promise<void>>();
  let forwarded = 0;
  let returned = 0;
  let active = 0;
  let maxActive = 0;

  async function handle(client: Deno.Conn): Promise<void> {
    const head = await readHead(client);
    if (head === undefined) return;
    const [requestLine, ...headerLines] = decoder.decode(head.bytes).split("\r\n");
    const [method, path] = requestLine!.split(" ") as [string, string];
    const length = Number(
      headerLines.find((line) => /^content-length:/i.test(line))?.split(":")[1] ?? 0,
    );
    const index = requests.length;
    const action = options.decide?.(index, method, path) ?? "pass";
    requests.push({ method, target: path, action });
    // In progress from its head's arrival to the answer's head: inside the time the client
    // waits for it. A connection's teardown after the answer is not the client's wait.
    maxActive = Math.max(maxActive, ++active);
    let answered = false;
    const answer = () => {
      if (!answered) active--;
      answered = true;
    };
    try {
      await forward(client, head, requestLine!, headerLines, length, action, answer);
    } finally {
      answer();
    }
  }

  async function forward(
    client: Deno.Conn,
    head: { bytes: Uint8Array; rest: Uint8Array },
    requestLine: string,
    headerLines: string[],
    length: number,
    action: FaultAction,
    onAnswer: () => void,
  ): Promise<void> {
    const [method, path] = requestLine.split(" ") as [string, string];
    const index = requests.length - 1;
    if (options.delay) await new Promise((resolve) => setTimeout(resolve, options.delay));
    await options.before?.(index, method, path);
    if (action === "503") {
      await readBody(client, head.rest, length);
      const body =
        "<Error><Code>SlowDown</Code><Message>injected by the test proxy</Message></Error>";
      await writeAll(
        client,
        encoder.encode(
          `HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/xml\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n${body}`,
        ),
      );
      return;
    }
    if (action === "drop-request") {
      await readBody(client, head.rest, Math.floor(length / 2));
      return;
    }
    const server = await Deno.connect({
      hostname: target.hostname,
      port: Number(target.port || 80),
    });
    open.add(server);
    try {
      const headers = headerLines.filter((line) => line && !/^connection:/i.test(line));
      await writeAll(
        server,
        encoder.encode(
          `${requestLine}\r\n${[...headers, "connection: close"].join("\r\n")}\r\n\r\n`,
        ),
      );
      // The body: what came with the head, then the rest.
      await writeAll(server, head.rest);
      forwarded += head.rest.byteLength;
      for (let left = length - head.rest.byteLength; left > 0;) {
        const buffer = new Uint8Array(Math.min(left, 1 << 20));
        const count = await client.read(buffer);
        if (count === null) return;
        await writeAll(server, buffer.subarray(0, count));
        forwarded += count;
        left -= count;
      }
      if (action === "drop-response") {
        const answer = await readHead(server);
        if (answer === undefined) return;
        const answerLength = Number(
          decoder.decode(answer.bytes).match(/\r\ncontent-length:\s*(\d+)/i)?.[1] ?? 0,
        );
        if (answerLength === 0) return; // nothing of the answer gets through
        await writeAll(client, answer.bytes);
        await writeAll(client, encoder.encode("\r\n\r\n"));
        const half = Math.floor(answerLength / 2);
        await writeAll(client, answer.rest.subarray(0, half));
        const more = await readBody(server, answer.rest, half, true);
        await writeAll(client, more);
        return;
      }
      const buffer = new Uint8Array(1 << 20);
      for (;;) {
        const count = await server.read(buffer);
        onAnswer();
        if (count === null) break;
        await writeAll(client, buffer.subarray(0, count));
        returned += count;
      }
    } finally {
      open.delete(server);
      server.close();
    }
  }

  const accepting = (async () => {
    for await (const client of listener) {
      open.add(client);
      const handler = handle(client).catch(() => {}).finally(() => {
        open.delete(client);
        try {
          client.close();
        } catch { /* closed already */ }
        handlers.delete(handler);
      });
      handlers.add(handler);
    }
  })().catch(() => {});

  return {
    endpoint: `http://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`,
    requests,
    bytesForwarded: () => forwarded,
    maxConcurrent: () => maxActive,
    bytesReturned: () => returned,
    async close() {
      listener.close();
      for (const conn of open) {
        try {
          conn.close();
        } catch { /* closed already */ }
      }
      await accepting;
      await Promise.all(handlers);
    },
  };
}

/** Reads up to the blank line after the headers; `rest` is what came after it. */
async function readHead(
  conn: Deno.Conn,
): Promise<{ bytes: Uint8Array; rest: Uint8Array } | undefined> {
  let data = new Uint8Array(0);
  const buffer = new Uint8Array(64 * 1024);
  for (;;) {
    const end = findBlankLine(data);
    if (end >= 0) return { bytes: data.subarray(0, end), rest: data.subarray(end + 4) };
    const count = await conn.read(buffer);
    if (count === null) return undefined;
    const joined = new Uint8Array(data.byteLength + count);
    joined.set(data);
    joined.set(buffer.subarray(0, count), data.byteLength);
    data = joined;
  }
}

function findBlankLine(data: Uint8Array): number {
  for (let i = 0; i + 3 < data.byteLength; i++) {
    if (data[i] === 13 && data[i + 1] === 10 && data[i + 2] === 13 && data[i + 3] === 10) return i;
  }
  return -1;
}

/**
 * Reads until `length` body bytes were seen (counting `already`); returns the bytes read
 * beyond `already` when `keep`, which stop at `length`.
 */
async function readBody(
  conn: Deno.Conn,
  already: Uint8Array,
  length: number,
  keep = false,
): Promise<Uint8Array> {
  const kept: Uint8Array[] = [];
  const buffer = new Uint8Array(1 << 20);
  for (let seen = already.byteLength; seen < length;) {
    const count = await conn.read(buffer.subarray(0, Math.min(buffer.byteLength, length - seen)));
    if (count === null) break;
    if (keep) kept.push(buffer.slice(0, count));
    seen += count;
  }
  const joined = new Uint8Array(kept.reduce((sum, chunk) => sum + chunk.byteLength, 0));
  let offset = 0;
  for (const chunk of kept) {
    joined.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return joined;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.byteLength;) done += await conn.write(bytes.subarray(done));
}
