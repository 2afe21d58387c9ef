// Copyright 2026 the vmabackup authors. MIT license.
/**
 * An NBD (network block device) client for reading VM disks from `qemu-nbd` or a running
 * QEMU's NBD export, and for writing to a writable export.
 *
 * It speaks the fixed newstyle handshake with `NBD_OPT_GO` + `NBD_INFO_BLOCK_SIZE`,
 * structured replies (`OFFSET_DATA`, `OFFSET_HOLE` and error chunks), metadata contexts
 * (`base:allocation`, `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`) and the commands
 * `READ`, `WRITE`, `WRITE_ZEROES`, `TRIM`, `FLUSH`, `BLOCK_STATUS` and `DISC`. One request
 * is in flight at a time; concurrent calls queue up. Requests never exceed the server's
 * maximum block size: longer ranges are split.
 *
 * Every wait has a timeout, and a server that breaks the protocol, drops the connection or
 * goes silent makes the call reject with an {@linkcode NbdError} and closes the socket.
 * Only errors the server reports for one command or option (`reason` `"command-failed"`
 * or `"option-failed"`) leave the connection usable.
 *
 * @example Read a range and list the data extents of an export
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdClient, NbdStateFlag } from "./nbd_client.ts";
 * import { NbdMemoryExport } from "./nbd_memory_export.ts";
 * import { NbdServer } from "./nbd_server.ts";
 *
 * const disk = new Uint8Array(1 << 20);
 * disk.fill(7, 65536, 131072);
 * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
 *   disk: new NbdMemoryExport(disk),
 * });
 *
 * await using client = await NbdClient.connect(server.uri("disk"), {
 *   metaContexts: ["base:allocation"],
 * });
 * const data = [];
 * for await (const extent of client.extents("base:allocation")) {
 *   if (!(extent.flags & NbdStateFlag.ZERO)) data.push(extent);
 * }
 * assert.deepEqual(data, [{ offset: 65536, length: 65536, flags: 0 }]);
 *
 * const buffer = new Uint8Array(65536);
 * await client.read(65536, buffer);
 * assert.ok(buffer.every((byte) => byte === 7));
 * ```
 *
 * @module
 */
import {
  decodeBlockStatusChunk,
  decodeErrorChunk,
  decodeExportNameReply,
  decodeHandshake,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeOffsetHole,
  decodeOptionReplyHeader,
  decodeServerReply,
  encodeExportInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  isOptionReplyError,
  NBD_CHUNK_HEADER_SIZE,
  NBD_DEFAULT_MAX_BLOCK_SIZE,
  NBD_DEFAULT_MIN_BLOCK_SIZE,
  NBD_DEFAULT_PORT,
  NBD_DEFAULT_PREFERRED_BLOCK_SIZE,
  NBD_EXPORT_NAME_REPLY_SIZE,
  NBD_HANDSHAKE_SIZE,
  NBD_OPTION_REPLY_HEADER_SIZE,
  NBD_REPLY_TYPE_FLAG_ERROR,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC,
  type NbdBlockDescriptor,
  nbdChunkTypeName,
  NbdClientFlag,
  NbdCmd,
  NbdCmdFlag,
  nbdCommandName,
  NbdErrno,
  nbdErrnoName,
  NbdError,
  type NbdErrorChunk,
  type NbdExportEntry,
  NbdHandshakeFlag,
  NbdInfo,
  NbdOpt,
  nbdOptionName,
  NbdRep,
  NbdReplyFlag,
  NbdReplyType,
  nbdReplyTypeName,
  NbdTransmissionFlag,
} from "./nbd_protocol.ts";

export {
  NbdError,
  type NbdErrorOptions,
  type NbdErrorReason,
  type NbdExportEntry,
  NbdMetaContext,
  NbdStateFlag,
  NbdTransmissionFlag,
} from "./nbd_protocol.ts";

/** Where an NBD server listens. */
export type NbdAddress =
  | { transport: "unix"; path: string }
  | { transport: "tcp"; hostname: string; port: number };

/** A parsed NBD URI. */
export interface NbdUri {
  /** Where to connect. */
  address: NbdAddress;
  /** The export name: the URI path without its leading `/`, percent-decoded. */
  exportName: string;
}

/**
 * Parses an NBD URI (NetworkBlockDevice/nbd `doc/uri.md`): `nbd+unix:///EXPORT?socket=PATH`
 * or `nbd://HOST[:PORT]/EXPORT`, with port 10809 by default. IPv6 hosts are written in
 * brackets (`nbd://[::1]/disk`). TLS schemes (`nbds`, `nbds+unix`) and TLS parameters are
 * refused because this client has no TLS; `x-` parameters are ignored, any other parameter
 * is refused.
 *
 * @example Parse unix and TCP URIs
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseNbdUri } from "./nbd_client.ts";
 *
 * assert.deepEqual(parseNbdUri("nbd+unix:///snap?socket=/run/bk/nbd.sock"), {
 *   address: { transport: "unix", path: "/run/bk/nbd.sock" },
 *   exportName: "snap",
 * });
 * assert.deepEqual(parseNbdUri("nbd://backup.example:10810/hello%20world"), {
 *   address: { transport: "tcp", hostname: "backup.example", port: 10810 },
 *   exportName: "hello world",
 * });
 * assert.equal(parseNbdUri("nbd://[::1]").address.transport, "tcp");
 * assert.throws(() => parseNbdUri("nbds://host/disk"), { name: "NbdError", reason: "invalid-uri" });
 * ```
 *
 * @throws {NbdError} "invalid-uri".
 */
export function parseNbdUri(uri: string): NbdUri {
  const invalid = (detail: string) =>
    new NbdError("invalid-uri", `Cannot parse the NBD URI "${uri}": ${detail}`);
  let url: URL;
  try {
    url = new URL(uri);
  } catch (cause) {
    throw new NbdError("invalid-uri", `Cannot parse the NBD URI "${uri}": It is not a URI`, {
      cause,
    });
  }
  const scheme = url.protocol.slice(0, -1);
  if (scheme === "nbds" || scheme === "nbds+unix") {
    throw invalid("TLS is not supported by this client");
  }
  if (scheme !== "nbd" && scheme !== "nbd+unix") {
    throw invalid(`The scheme "${scheme}" is not nbd or nbd+unix`);
  }
  const params = new Map<string, string>();
  if (url.search.length > 1) {
    for (const pair of url.search.slice(1).split("&")) {
      if (pair === "") continue;
      const at = pair.indexOf("=");
      const key = decodeComponent(at < 0 ? pair : pair.slice(0, at), invalid);
      const value = at < 0 ? "" : decodeComponent(pair.slice(at + 1), invalid);
      if (key.startsWith("tls-")) throw invalid(`TLS is not supported ("${key}")`);
      if (key.startsWith("x-")) continue;
      if (key !== "socket" || scheme !== "nbd+unix") {
        throw invalid(`The query parameter "${key}" is not supported`);
      }
      params.set(key, value);
    }
  }
  const exportName = decodeComponent(url.pathname.replace(/^\//, ""), invalid);
  if (scheme === "nbd+unix") {
    if (url.host !== "") throw invalid("A unix socket URI has no host");
    const path = params.get("socket");
    if (!path) throw invalid('It needs a "socket" query parameter');
    return { address: { transport: "unix", path }, exportName };
  }
  let hostname = url.hostname;
  if (hostname === "") throw invalid("It has no host");
  if (hostname.startsWith("[") && hostname.endsWith("]")) hostname = hostname.slice(1, -1);
  const port = url.port === "" ? NBD_DEFAULT_PORT : Number(url.port);
  return { address: { transport: "tcp", hostname, port }, exportName };
}

function decodeComponent(text: string, invalid: (detail: string) => NbdError): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw invalid(`"${text}" is not correctly percent-encoded`);
  }
}

/** What the server told about an export in reply to `NBD_OPT_GO` or `NBD_OPT_INFO`. */
export interface NbdExportInfo {
  /** The export name the client asked for. */
  exportName: string;
  /** The server's canonical name, when it sent `NBD_INFO_NAME`. */
  canonicalName?: string;
  /** The description, when the server sent `NBD_INFO_DESCRIPTION`. */
  description?: string;
  /** Export size in bytes. */
  size: number;
  /** {@linkcode NbdTransmissionFlag} bits. */
  flags: number;
  /** Alignment of every offset and length (1 when not advertised). */
  minBlockSize: number;
  /** Size below which I/O is inefficient (4096 when not advertised). */
  preferredBlockSize: number;
  /** Largest payload of one request (32 MiB when not advertised). */
  maxBlockSize: number;
  /** Whether the server sent `NBD_INFO_BLOCK_SIZE`. */
  blockSizesAdvertised: boolean;
}

/** One extent of a metadata context. */
export interface NbdExtent {
  /** Absolute offset in the export. */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** Status flags; for `base:allocation` see {@linkcode NbdStateFlag}. */
  flags: number;
}

/** Options of {@linkcode NbdClient.open} and {@linkcode NbdClient.fromConn}. */
export interface NbdOpenOptions {
  /**
   * Most milliseconds any wait may last without the server making progress (sending or
   * accepting bytes), and the limit to connect. Default 30 000.
   */
  timeoutMs?: number;
  /**
   * Largest request the client sends: the payload of a read or write, the range of a
   * write-zeroes, trim or block status. The server's maximum block size lowers it, and it
   * is rounded down to the minimum block size. Default 32 MiB.
   */
  maxRequestSize?: number;
}

/** Options of {@linkcode NbdClient.connect}. */
export interface NbdConnectOptions extends NbdOpenOptions {
  /** The export to use; default the URI's export name, or `""` (the default export). */
  exportName?: string;
  /** Metadata contexts to select, such as `"base:allocation"`; each must be selected. */
  metaContexts?: readonly string[];
  /** Negotiate structured replies (default `true`); required for metadata contexts. */
  structuredReplies?: boolean;
  /**
   * A connection to the server that is already open (the client owns it from now on);
   * `target` then only names the export.
   */
  conn?: Deno.Conn;
}

/** Options of {@linkcode NbdClient.write}. */
export interface NbdWriteOptions {
  /** Force unit access: the server persists the data before replying (`SEND_FUA`). */
  fua?: boolean;
}

/** Options of {@linkcode NbdClient.writeZeroes}. */
export interface NbdWriteZeroesOptions extends NbdWriteOptions {
  /** Make the server allocate the range instead of punching a hole. */
  noHole?: boolean;
}

/** Options of {@linkcode NbdClient.blockStatus}. */
export interface NbdBlockStatusOptions {
  /** Ask for one extent per context and request (`NBD_CMD_FLAG_REQ_ONE`). */
  reqOne?: boolean;
}

/** Options of {@linkcode NbdClient.extents}. */
export interface NbdExtentsOptions extends NbdBlockStatusOptions {
  /** Where to start (default 0). */
  offset?: number;
  /** How many bytes to walk (default: to the end of the export). */
  length?: number;
}

type Phase = "new" | "negotiating" | "transmission" | "closed";

const DEFAULT_TIMEOUT_MS = 30_000;
/** Largest option reply the client reads: strings are at most 4 KiB. */
const MAX_OPTION_REPLY = 65536;
/** Extra reply payload accepted beyond the request size (error messages, descriptors). */
const PAYLOAD_SLACK = 1 << 20;
/** Most error chunks accepted in one reply before calling the server broken. */
const MAX_ERROR_CHUNKS = 1024;
/** How long `close()` waits for the server's answer to `NBD_OPT_ABORT`. */
const ABORT_WAIT_MS = 1000;

function describe(cause: unknown): string {
  return cause instanceof Error ? cause.message : String(cause);
}

function isPowerOfTwo(value: number): boolean {
  return Number.isInteger(value) && value > 0 && (value & (value - 1)) === 0;
}

async function connectAddress(address: NbdAddress, timeoutMs: number): Promise<Deno.Conn> {
  const where = address.transport === "unix"
    ? `unix socket ${address.path}`
    : `${address.hostname}:${address.port}`;
  const controller = new AbortController();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      controller.abort();
      reject(
        new NbdError(
          "timeout",
          `Cannot connect to the NBD server at ${where}: No connection within ${timeoutMs} ms`,
        ),
      );
    }, timeoutMs);
  });
  const connecting = address.transport === "unix"
    ? Deno.connect({ transport: "unix", path: address.path })
    : Deno.connect({
      transport: "tcp",
      hostname: address.hostname,
      port: address.port,
      signal: controller.signal,
    });
  try {
    const conn = await Promise.race([connecting, timeout]);
    if (address.transport === "tcp") (conn as Deno.TcpConn).setNoDelay(true);
    return conn;
  } catch (cause) {
    // A unix connect that resolves after the timeout must not leak its socket.
    connecting.then((conn) => conn.close(), () => {});
    if (cause instanceof NbdError) throw cause;
    throw new NbdError(
      "connect-failed",
      `Cannot connect to the NBD server at ${where}: ${describe(cause)}`,
      { cause },
    );
  } finally {
    clearTimeout(timer);
  }
}

/**
 * An NBD client connection.
 *
 * {@linkcode NbdClient.connect} does everything in one call: connect, handshake,
 * structured replies, metadata contexts and `NBD_OPT_GO`. For control over the negotiation
 * use {@linkcode NbdClient.open}, call the option methods ({@linkcode NbdClient.structuredReply},
 * {@linkcode NbdClient.listExports}, {@linkcode NbdClient.listMetaContexts},
 * {@linkcode NbdClient.setMetaContexts}, {@linkcode NbdClient.exportInfo}), then
 * {@linkcode NbdClient.go}. {@linkcode NbdClient.close} leaves cleanly in either phase:
 * `NBD_OPT_ABORT` during negotiation, `NBD_CMD_DISC` during transmission.
 *
 * @example Negotiate step by step
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdClient } from "./nbd_client.ts";
 * import { NbdMemoryExport } from "./nbd_memory_export.ts";
 * import { NbdServer } from "./nbd_server.ts";
 *
 * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
 *   disk: new NbdMemoryExport(1 << 20),
 * });
 * const address = { transport: "tcp" as const, hostname: "127.0.0.1", port: server.port };
 * await using client = await NbdClient.open(address);
 * assert.ok(await client.structuredReply());
 * assert.deepEqual(await client.listMetaContexts("disk", ["base:"]), ["base:allocation"]);
 * const ids = await client.setMetaContexts("disk", ["base:allocation"]);
 * assert.deepEqual([...ids.values()], ["base:allocation"]);
 * const info = await client.go("disk");
 * assert.equal(info.size, 1 << 20);
 * ```
 */
export class NbdClient {
  #conn: Deno.Conn;
  #timeoutMs: number;
  #requestCap: number;
  #phase: Phase = "new";
  #failure: NbdError | undefined;
  #inFlight = false;
  #queue: Promise<void> = Promise.resolve();

  // Watchdog: fails the connection when a read or write makes no progress in time.
  #timer: ReturnType<typeof setTimeout> | undefined;
  #waitMs = 0;
  #lastProgress = 0;
  #activity = "";
  #operation = "use the NBD connection";

  #bytesReceived = 0;
  #bytesSent = 0;

  #handshakeFlags = 0;
  #structured = false;
  #contexts = new Map<number, string>();
  #contextExport: string | undefined;
  #info: NbdExportInfo | undefined;
  #maxRequest = NBD_DEFAULT_MAX_BLOCK_SIZE;
  #maxPayload = NBD_DEFAULT_MAX_BLOCK_SIZE + PAYLOAD_SLACK;
  #cookie = 0n;

  #requestBytes = new Uint8Array(NBD_REQUEST_SIZE);
  #header = new Uint8Array(32);
  #headerView = new DataView(this.#header.buffer);
  #scratch = new Uint8Array(4096);
  #ranges: number[] = [];

  /**
   * Wraps an open connection; the client owns it from now on. The handshake has not run:
   * use {@linkcode NbdClient.fromConn}, {@linkcode NbdClient.open} or
   * {@linkcode NbdClient.connect}, which run it.
   *
   * @example The factories construct clients
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   *
   * assert.equal(typeof NbdClient.fromConn, "function");
   * ```
   */
  constructor(conn: Deno.Conn, options: NbdOpenOptions = {}) {
    const { timeoutMs = DEFAULT_TIMEOUT_MS, maxRequestSize = NBD_DEFAULT_MAX_BLOCK_SIZE } = options;
    if (!(timeoutMs > 0) || !Number.isFinite(timeoutMs)) {
      conn.close();
      throw new RangeError(`Cannot create the NBD client: timeoutMs ${timeoutMs} is not positive`);
    }
    if (!Number.isInteger(maxRequestSize) || maxRequestSize < 1 || maxRequestSize > 0xffffffff) {
      conn.close();
      throw new RangeError(
        `Cannot create the NBD client: maxRequestSize ${maxRequestSize} is not in 1..2^32-1`,
      );
    }
    this.#conn = conn;
    this.#timeoutMs = timeoutMs;
    this.#requestCap = maxRequestSize;
  }

  /**
   * Connects, negotiates and enters transmission: structured replies (unless disabled),
   * the requested metadata contexts, then `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`.
   * `target` is an NBD URI or an address. On any failure the connection is closed
   * (with `NBD_OPT_ABORT` when possible) and the promise rejects.
   *
   * @example Connect by URI
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(65536),
   * });
   * await using client = await NbdClient.connect(server.uri("disk"));
   * assert.equal(client.info.size, 65536);
   * assert.ok(client.structuredReplies);
   * ```
   *
   * @throws {NbdError} when the server cannot be reached, refuses an option or breaks the
   * protocol; `"unsupported"` when a requested metadata context was not selected.
   */
  static async connect(
    target: string | NbdAddress,
    options: NbdConnectOptions = {},
  ): Promise<NbdClient> {
    const exportName = options.exportName ??
      (typeof target === "string" ? parseNbdUri(target).exportName : "");
    const contexts = options.metaContexts ?? [];
    const client = options.conn === undefined
      ? await NbdClient.open(target, options)
      : await NbdClient.fromConn(options.conn, options);
    try {
      if (options.structuredReplies ?? true) await client.structuredReply();
      if (contexts.length > 0) {
        if (!client.#structured) {
          throw new NbdError(
            "unsupported",
            "Cannot select metadata contexts: The server does not support structured replies",
          );
        }
        const selected = new Set((await client.setMetaContexts(exportName, contexts)).values());
        const missing = contexts.filter((name) => !selected.has(name));
        if (missing.length > 0) {
          throw new NbdError(
            "unsupported",
            `Cannot select metadata contexts: The server did not select ${
              missing.map((name) => `"${name}"`).join(", ")
            } for export "${exportName}"`,
          );
        }
      }
      await client.go(exportName);
      return client;
    } catch (error) {
      await client.close();
      throw error;
    }
  }

  /**
   * Connects and runs the first handshake step; the client is then negotiating options.
   *
   * @example Leave during negotiation
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   a: new NbdMemoryExport(4096),
   * });
   * const client = await NbdClient.open(server.uri("a"));
   * assert.deepEqual((await client.listExports()).map((e) => e.name), ["a"]);
   * await client.close(); // sends NBD_OPT_ABORT
   * assert.ok(client.closed);
   * ```
   *
   * @throws {NbdError} "connect-failed", "timeout", "bad-magic", "not-fixed-newstyle".
   */
  static async open(target: string | NbdAddress, options: NbdOpenOptions = {}): Promise<NbdClient> {
    const address = typeof target === "string" ? parseNbdUri(target).address : target;
    const conn = await connectAddress(address, options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    return await NbdClient.fromConn(conn, options);
  }

  /**
   * Runs the first handshake step over an open connection (of any transport) that the
   * client owns from now on; it is closed when the handshake fails.
   *
   * @example Use a connection opened elsewhere
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(4096),
   * });
   * const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
   * await using client = await NbdClient.fromConn(conn, { timeoutMs: 5000 });
   * assert.ok(client.handshakeFlags & 1); // FIXED_NEWSTYLE
   * ```
   *
   * @throws {NbdError} "timeout", "disconnected", "bad-magic", "not-fixed-newstyle".
   */
  static async fromConn(conn: Deno.Conn, options: NbdOpenOptions = {}): Promise<NbdClient> {
    const client = new NbdClient(conn, options);
    await client.#run("negotiate with the NBD server", ["new"], () => client.#handshake());
    return client;
  }

  // -------------------------------------------------------------------------------------
  // State

  /**
   * The export this client uses, known once in transmission.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * const disk = new NbdMemoryExport(8192, {
   *   blockSizes: { minimum: 512, preferred: 4096, maximum: 32 << 20 },
   * });
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, { disk });
   * await using client = await NbdClient.connect(server.uri("disk"));
   * assert.equal(client.info.minBlockSize, 512);
   * assert.ok(client.info.blockSizesAdvertised);
   * ```
   *
   * @throws {NbdError} "invalid-state" before {@linkcode NbdClient.go}.
   */
  get info(): NbdExportInfo {
    if (this.#info === undefined) {
      throw new NbdError("invalid-state", "Cannot get the export information: Call go() first");
    }
    return this.#info;
  }

  /**
   * Handshake flags the server sent ({@linkcode NbdHandshakeFlag} bits).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(4096),
   * });
   * await using client = await NbdClient.open(server.uri("disk"));
   * assert.equal(client.handshakeFlags, 3); // FIXED_NEWSTYLE | NO_ZEROES
   * ```
   */
  get handshakeFlags(): number {
    return this.#handshakeFlags;
  }

  /**
   * Whether structured replies were negotiated.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(4096),
   * });
   * await using client = await NbdClient.connect(server.uri("disk"), { structuredReplies: false });
   * assert.equal(client.structuredReplies, false);
   * ```
   */
  get structuredReplies(): boolean {
    return this.#structured;
  }

  /**
   * The selected metadata contexts, by the id the server assigned.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(4096),
   * });
   * await using client = await NbdClient.connect(server.uri("disk"), { metaContexts: ["base:allocation"] });
   * assert.deepEqual([...client.metaContexts.values()], ["base:allocation"]);
   * ```
   */
  get metaContexts(): ReadonlyMap<number, string> {
    return this.#contexts;
  }

  /**
   * Largest request the client sends, after applying the server's block sizes.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * const disk = new NbdMemoryExport(1 << 20, {
   *   blockSizes: { minimum: 1, preferred: 4096, maximum: 65536 },
   * });
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, { disk });
   * await using client = await NbdClient.connect(server.uri("disk"), { maxRequestSize: 1 << 20 });
   * assert.equal(client.maxRequestSize, 65536);
   * ```
   */
  get maxRequestSize(): number {
    return this.#maxRequest;
  }

  /**
   * Bytes received over the socket so far (headers included).
   *
   * @example Holes cost no bytes on the wire
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(1 << 20),
   * });
   * await using client = await NbdClient.connect(server.uri("disk"));
   * const before = client.bytesReceived;
   * await client.read(0, new Uint8Array(1 << 20)); // all zero: sent as a hole
   * assert.ok(client.bytesReceived - before < 1000);
   * ```
   */
  get bytesReceived(): number {
    return this.#bytesReceived;
  }

  /**
   * Bytes sent over the socket so far (headers included).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(4096),
   * });
   * await using client = await NbdClient.connect(server.uri("disk"));
   * const before = client.bytesSent;
   * await client.write(0, new Uint8Array(4096).fill(1));
   * assert.equal(client.bytesSent - before, 28 + 4096);
   * ```
   */
  get bytesSent(): number {
    return this.#bytesSent;
  }

  /**
   * Whether the connection is closed, by {@linkcode NbdClient.close} or by an error.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(4096),
   * });
   * const client = await NbdClient.connect(server.uri("disk"));
   * assert.equal(client.closed, false);
   * await client.close();
   * assert.equal(client.closed, true);
   * await assert.rejects(client.read(0, new Uint8Array(512)), { reason: "closed" });
   * ```
   */
  get closed(): boolean {
    return this.#phase === "closed";
  }

  // -------------------------------------------------------------------------------------
  // Negotiation phase

  /**
   * Asks for structured replies (`NBD_OPT_STRUCTURED_REPLY`). Resolves to `false` when the
   * server does not support them; then reads use simple replies and metadata contexts are
   * unavailable.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(4096),
   * }, { structuredReplies: false });
   * await using client = await NbdClient.open(server.uri("disk"));
   * assert.equal(await client.structuredReply(), false);
   * ```
   *
   * @throws {NbdError} "invalid-state" outside negotiation.
   */
  structuredReply(): Promise<boolean> {
    return this.#run("negotiate structured replies", ["negotiating"], async () => {
      if (this.#structured) return true;
      try {
        await this.#option(NbdOpt.STRUCTURED_REPLY, undefined, "negotiate structured replies");
      } catch (error) {
        if (error instanceof NbdError && error.reason === "option-failed") return false;
        throw error;
      }
      this.#structured = true;
      return true;
    });
  }

  /**
   * Lists the server's exports (`NBD_OPT_LIST`).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   vda: new NbdMemoryExport(4096),
   * });
   * await using client = await NbdClient.open(server.uri("vda"));
   * assert.deepEqual(await client.listExports(), [{ name: "vda", description: "" }]);
   * ```
   *
   * @throws {NbdError} "option-failed" when the server refuses.
   */
  listExports(): Promise<NbdExportEntry[]> {
    const what = "list the exports";
    return this.#run(what, ["negotiating"], async () => {
      const entries: NbdExportEntry[] = [];
      await this.#option(NbdOpt.LIST, undefined, what, (type, payload) => {
        if (type !== NbdRep.SERVER) return false;
        entries.push(decodeServerReply(payload));
        return true;
      });
      return entries;
    });
  }

  /**
   * Lists the metadata contexts matching `queries` (`NBD_OPT_LIST_META_CONTEXT`); no
   * queries lists all. `"base:"` and `"qemu:"` list whole namespaces on QEMU. The names
   * come back as a list: servers send meaningless ids (QEMU sends 0 for every one).
   * Needs structured replies.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   d: new NbdMemoryExport(4096),
   * });
   * await using client = await NbdClient.open(server.uri("d"));
   * await client.structuredReply();
   * assert.deepEqual(await client.listMetaContexts("d"), ["base:allocation"]);
   * ```
   *
   * @throws {NbdError} "invalid-state" without structured replies, "option-failed".
   */
  listMetaContexts(exportName: string, queries: readonly string[] = []): Promise<string[]> {
    const what = `list the metadata contexts of export "${exportName}"`;
    return this.#run(what, ["negotiating"], async () => {
      this.#needStructured(what);
      const names: string[] = [];
      const data = encodeMetaContextRequest(exportName, queries);
      await this.#option(NbdOpt.LIST_META_CONTEXT, data, what, (type, payload) => {
        if (type !== NbdRep.META_CONTEXT) return false;
        names.push(decodeMetaContextReply(payload).name);
        return true;
      });
      return names;
    });
  }

  /**
   * Selects metadata contexts for `exportName` (`NBD_OPT_SET_META_CONTEXT`), replacing any
   * earlier selection, and resolves to the server's id → name map. Use the same export
   * name for {@linkcode NbdClient.go}. Needs structured replies.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   d: new NbdMemoryExport(4096),
   * });
   * await using client = await NbdClient.open(server.uri("d"));
   * await client.structuredReply();
   * const selected = await client.setMetaContexts("d", ["base:allocation", "x-unknown:thing"]);
   * assert.deepEqual([...selected.values()], ["base:allocation"]);
   * ```
   *
   * @throws {NbdError} "invalid-state" without structured replies, "option-failed",
   * "unexpected-reply" when the server repeats an id.
   */
  setMetaContexts(
    exportName: string,
    queries: readonly string[],
  ): Promise<ReadonlyMap<number, string>> {
    const what = `select metadata contexts of export "${exportName}"`;
    return this.#run(what, ["negotiating"], async () => {
      this.#needStructured(what);
      const contexts = new Map<number, string>();
      this.#contexts = contexts; // a SET replaces the selection even when it fails
      this.#contextExport = exportName;
      const data = encodeMetaContextRequest(exportName, queries);
      await this.#option(NbdOpt.SET_META_CONTEXT, data, what, (type, payload) => {
        if (type !== NbdRep.META_CONTEXT) return false;
        const { id, name } = decodeMetaContextReply(payload);
        if (contexts.has(id)) {
          throw new NbdError(
            "unexpected-reply",
            `Cannot ${what}: The server gave id ${id} to both "${contexts.get(id)}" and "${name}"`,
          );
        }
        contexts.set(id, name);
        return true;
      });
      return contexts;
    });
  }

  /**
   * Asks about an export without entering transmission (`NBD_OPT_INFO` with
   * `NBD_INFO_BLOCK_SIZE`).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   d: new NbdMemoryExport(12288),
   * });
   * await using client = await NbdClient.open(server.uri("d"));
   * assert.equal((await client.exportInfo("d")).size, 12288);
   * await assert.rejects(client.exportInfo("nope"), { reason: "option-failed" });
   * ```
   *
   * @throws {NbdError} "option-failed" (for example `NBD_REP_ERR_UNKNOWN`).
   */
  exportInfo(exportName: string): Promise<NbdExportInfo> {
    const what = `get information about export "${exportName}"`;
    return this.#run(what, ["negotiating"], () => this.#requestInfo(NbdOpt.INFO, exportName, what));
  }

  /**
   * Selects the export and enters transmission (`NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`,
   * falling back to `NBD_OPT_EXPORT_NAME` on servers without `NBD_OPT_GO`).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   d: new NbdMemoryExport(4096),
   * });
   * await using client = await NbdClient.open(server.uri("d"));
   * const info = await client.go("d");
   * assert.equal(info.maxBlockSize, 32 << 20);
   * ```
   *
   * @throws {NbdError} "option-failed" (the client stays in negotiation), "unexpected-reply"
   * for invalid block sizes.
   */
  go(exportName: string): Promise<NbdExportInfo> {
    const what = `open export "${exportName}"`;
    return this.#run(what, ["negotiating"], async () => {
      let info: NbdExportInfo;
      try {
        info = await this.#requestInfo(NbdOpt.GO, exportName, what);
      } catch (error) {
        if (
          !(error instanceof NbdError && error.reason === "option-failed" &&
            error.code === NbdRep.ERR_UNSUP)
        ) throw error;
        info = await this.#exportName(exportName);
      }
      if (this.#contextExport !== exportName) this.#contexts = new Map();
      this.#info = info;
      let max = Math.min(info.maxBlockSize, this.#requestCap);
      max -= max % info.minBlockSize;
      this.#maxRequest = Math.max(max, info.minBlockSize);
      this.#maxPayload = this.#maxRequest + PAYLOAD_SLACK;
      this.#phase = "transmission";
      return info;
    });
  }

  // -------------------------------------------------------------------------------------
  // Transmission phase

  /**
   * Reads `target.byteLength` bytes at `offset` into `target`, so callers can reuse
   * buffers. Holes the server reports (`OFFSET_HOLE`) are zero-filled without data on the
   * wire. Longer reads are split at {@linkcode NbdClient.maxRequestSize}. `offset` and the
   * length must be multiples of the minimum block size (the length may end at the export
   * size instead).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * const data = new Uint8Array(8192).fill(0x5d);
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(data),
   * });
   * await using client = await NbdClient.connect(server.uri("disk"));
   * const buffer = new Uint8Array(4096);
   * await client.read(4096, buffer);
   * assert.deepEqual(buffer, data.subarray(4096));
   * ```
   *
   * @throws {RangeError} for a range outside the export or not aligned.
   * @throws {NbdError} "command-failed" with the errno when the server reports an error
   * (the connection stays usable), other reasons when the connection failed.
   */
  read(offset: number, target: Uint8Array): Promise<void> {
    const length = target.byteLength;
    const what = `read ${length} bytes at offset ${offset}`;
    return this.#run(what, ["transmission"], async () => {
      this.#checkRange(what, offset, length);
      for (let done = 0; done < length;) {
        const size = Math.min(this.#maxRequest, length - done);
        await this.#readOnce(offset + done, target.subarray(done, done + size), what);
        done += size;
      }
    });
  }

  /**
   * Writes `data` at `offset` (`NBD_CMD_WRITE`), split at
   * {@linkcode NbdClient.maxRequestSize}.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * const disk = new NbdMemoryExport(8192);
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, { disk });
   * await using client = await NbdClient.connect(server.uri("disk"));
   * await client.write(512, new Uint8Array([1, 2, 3]));
   * assert.deepEqual(disk.data.subarray(512, 515), new Uint8Array([1, 2, 3]));
   * ```
   *
   * @throws {NbdError} "unsupported" on a read-only export, "command-failed".
   */
  write(offset: number, data: Uint8Array, options: NbdWriteOptions = {}): Promise<void> {
    const what = `write ${data.byteLength} bytes at offset ${offset}`;
    return this.#run(what, ["transmission"], async () => {
      this.#checkRange(what, offset, data.byteLength);
      this.#needWritable(what);
      const flags = this.#fuaFlag(what, options.fua);
      for (let done = 0; done < data.byteLength;) {
        const size = Math.min(this.#maxRequest, data.byteLength - done);
        await this.#command(
          NbdCmd.WRITE,
          flags,
          offset + done,
          size,
          what,
          data.subarray(done, done + size),
        );
        done += size;
      }
    });
  }

  /**
   * Zeroes `length` bytes at `offset` without sending data (`NBD_CMD_WRITE_ZEROES`).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * const disk = new NbdMemoryExport(new Uint8Array(8192).fill(9));
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, { disk });
   * await using client = await NbdClient.connect(server.uri("disk"));
   * await client.writeZeroes(0, 4096);
   * assert.equal(disk.data[4095], 0);
   * assert.equal(disk.data[4096], 9);
   * ```
   *
   * @throws {NbdError} "unsupported" without `SEND_WRITE_ZEROES` or on a read-only export,
   * "command-failed".
   */
  writeZeroes(offset: number, length: number, options: NbdWriteZeroesOptions = {}): Promise<void> {
    const what = `write ${length} zero bytes at offset ${offset}`;
    return this.#run(what, ["transmission"], async () => {
      this.#checkRange(what, offset, length);
      this.#needWritable(what);
      this.#needFlag(what, NbdTransmissionFlag.SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES");
      const flags = this.#fuaFlag(what, options.fua) | (options.noHole ? NbdCmdFlag.NO_HOLE : 0);
      await this.#split(NbdCmd.WRITE_ZEROES, flags, offset, length, what);
    });
  }

  /**
   * Tells the server that `length` bytes at `offset` are no longer needed
   * (`NBD_CMD_TRIM`); their content is undefined afterwards.
   *
   * @example
   * ```ts
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(8192),
   * });
   * await using client = await NbdClient.connect(server.uri("disk"));
   * await client.trim(0, 8192);
   * ```
   *
   * @throws {NbdError} "unsupported" without `SEND_TRIM` or on a read-only export,
   * "command-failed".
   */
  trim(offset: number, length: number, options: NbdWriteOptions = {}): Promise<void> {
    const what = `trim ${length} bytes at offset ${offset}`;
    return this.#run(what, ["transmission"], async () => {
      this.#checkRange(what, offset, length);
      this.#needWritable(what);
      this.#needFlag(what, NbdTransmissionFlag.SEND_TRIM, "SEND_TRIM");
      await this.#split(NbdCmd.TRIM, this.#fuaFlag(what, options.fua), offset, length, what);
    });
  }

  /**
   * Makes every completed write persistent (`NBD_CMD_FLUSH`).
   *
   * @example
   * ```ts
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(8192),
   * });
   * await using client = await NbdClient.connect(server.uri("disk"));
   * await client.flush();
   * ```
   *
   * @throws {NbdError} "unsupported" without `SEND_FLUSH`, "command-failed".
   */
  flush(): Promise<void> {
    const what = "flush";
    return this.#run(what, ["transmission"], async () => {
      this.#needFlag(what, NbdTransmissionFlag.SEND_FLUSH, "SEND_FLUSH");
      await this.#command(NbdCmd.FLUSH, 0, 0, 0, what);
    });
  }

  /**
   * The extents of every selected metadata context over exactly `[offset, offset +
   * length)`, by context name, with adjacent extents of equal flags merged. The server may
   * answer a request with less than asked, so this sends requests (each at most
   * {@linkcode NbdClient.maxRequestSize}) until the whole range is covered.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * const data = new Uint8Array(16384);
   * data[8192] = 1;
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(data),
   * });
   * await using client = await NbdClient.connect(server.uri("disk"), { metaContexts: ["base:allocation"] });
   * const status = await client.blockStatus(4096, 8192);
   * assert.deepEqual(status.get("base:allocation"), [
   *   { offset: 4096, length: 4096, flags: 3 },
   *   { offset: 8192, length: 4096, flags: 0 },
   * ]);
   * ```
   *
   * @throws {NbdError} "unsupported" when no context is selected, "command-failed".
   */
  blockStatus(
    offset: number,
    length: number,
    options: NbdBlockStatusOptions = {},
  ): Promise<Map<string, NbdExtent[]>> {
    const what = `get the block status of ${length} bytes at offset ${offset}`;
    return this.#run(what, ["transmission"], async () => {
      this.#checkRange(what, offset, length);
      this.#needContexts(what);
      const end = offset + length;
      const result = new Map<string, NbdExtent[]>();
      const positions = new Map<string, number>();
      for (const name of this.#contexts.values()) {
        result.set(name, []);
        positions.set(name, offset);
      }
      while (true) {
        const start = Math.min(...positions.values());
        if (start >= end) break;
        const size = Math.min(this.#maxRequest, end - start);
        const reply = await this.#blockStatusOnce(start, size, options.reqOne ?? false, what);
        for (const [name, descriptors] of reply) {
          const extents = result.get(name)!;
          let position = positions.get(name)!;
          let cursor = start;
          for (const { length: extentLength, flags } of descriptors) {
            const from = Math.max(cursor, position);
            const to = Math.min(cursor + extentLength, end);
            cursor += extentLength;
            if (to <= from) continue;
            appendExtent(extents, from, to - from, flags);
            position = to;
          }
          positions.set(name, position);
        }
      }
      return result;
    });
  }

  /**
   * Walks one metadata context over the export (or `[offset, offset + length)`) and
   * yields its extents in order, adjacent extents of equal flags merged. Requests are at
   * most {@linkcode NbdClient.maxRequestSize} each, and memory stays flat however large
   * the export. Other calls (such as reads) may run between iterations.
   *
   * @example Find the dirty or allocated data
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient, NbdStateFlag } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * const data = new Uint8Array(1 << 20);
   * data.fill(1, 0, 4096);
   * data.fill(2, 524288, 528384);
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(data),
   * });
   * await using client = await NbdClient.connect(server.uri("disk"), { metaContexts: ["base:allocation"] });
   * const extents = await Array.fromAsync(client.extents("base:allocation"));
   * assert.deepEqual(extents.filter((e) => !(e.flags & NbdStateFlag.ZERO)).map((e) => e.offset), [0, 524288]);
   * assert.equal(extents.reduce((sum, e) => sum + e.length, 0), 1 << 20);
   * ```
   *
   * @throws {NbdError} "unsupported" when `context` is not selected, "command-failed".
   */
  async *extents(context: string, options: NbdExtentsOptions = {}): AsyncGenerator<NbdExtent> {
    const what = `walk metadata context "${context}"`;
    const size = this.info.size;
    const offset = options.offset ?? 0;
    const length = options.length ?? size - offset;
    this.#checkRange(what, offset, length);
    if (![...this.#contexts.values()].includes(context)) {
      throw new NbdError(
        "unsupported",
        `Cannot ${what}: It is not selected (selected: ${
          [...this.#contexts.values()].map((name) => `"${name}"`).join(", ") || "none"
        })`,
      );
    }
    const end = offset + length;
    let position = offset;
    let pending: NbdExtent | undefined;
    while (position < end) {
      const start = position;
      const request = Math.min(this.#maxRequest, end - start);
      const reply = await this.#run(
        what,
        ["transmission"],
        () => this.#blockStatusOnce(start, request, options.reqOne ?? false, what),
      );
      let cursor = start;
      for (const descriptor of reply.get(context)!) {
        const to = Math.min(cursor + descriptor.length, end);
        if (pending && pending.flags === descriptor.flags) {
          pending.length = to - pending.offset;
        } else {
          if (pending) yield pending;
          pending = { offset: cursor, length: to - cursor, flags: descriptor.flags };
        }
        cursor = to;
        if (cursor >= end) break;
      }
      position = cursor;
    }
    if (pending) yield pending;
  }

  /**
   * Leaves cleanly and closes the socket: `NBD_CMD_DISC` during transmission,
   * `NBD_OPT_ABORT` during negotiation. Waits for calls in progress first; safe to call
   * more than once.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(4096),
   * });
   * const client = await NbdClient.connect(server.uri("disk"));
   * await client.close();
   * await client.close();
   * assert.ok(client.closed);
   * ```
   */
  async close(): Promise<void> {
    const previous = this.#queue;
    let release!: () => void;
    this.#queue = new Promise<void>((resolve) => release = resolve);
    await previous;
    this.#operation = "close the NBD connection";
    try {
      if (this.#phase === "closed") return;
      try {
        if (this.#phase === "transmission") {
          await this.#sendDisconnect();
        } else if (this.#phase === "negotiating") {
          await this.#write(encodeOption(NbdOpt.ABORT), "NBD_OPT_ABORT");
          // The server should acknowledge; older servers just close. Either is fine.
          await this.#readExact(
            this.#header.subarray(0, NBD_OPTION_REPLY_HEADER_SIZE),
            "the reply to NBD_OPT_ABORT",
            Math.min(this.#timeoutMs, ABORT_WAIT_MS),
          );
        }
      } catch {
        // Leaving anyway.
      }
      // A clean close is the reason later calls fail, even if leaving raised an error.
      this.#failure = new NbdError("closed", "Cannot use the NBD client: It was closed");
      this.#shutdown(this.#failure);
    } finally {
      release();
    }
  }

  /**
   * Same as {@linkcode NbdClient.close}, for `await using`.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   disk: new NbdMemoryExport(4096),
   * });
   * let kept: NbdClient;
   * {
   *   await using client = await NbdClient.connect(server.uri("disk"));
   *   kept = client;
   * }
   * assert.ok(kept.closed);
   * ```
   */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  // -------------------------------------------------------------------------------------
  // Call discipline

  /**
   * Runs `fn` after the calls before it, in one of `phases`. An error while a message is
   * in flight (or a protocol error) closes the connection; only errors the server
   * reported, and argument errors raised before sending, leave it open.
   */
  async #run<T>(what: string, phases: Phase[], fn: () => Promise<T>): Promise<T> {
    const previous = this.#queue;
    let release!: () => void;
    this.#queue = new Promise<void>((resolve) => release = resolve);
    await previous;
    this.#operation = what;
    try {
      if (this.#phase === "closed") {
        throw new NbdError(
          "closed",
          `Cannot ${what}: The NBD connection is closed${
            this.#failure && this.#failure.reason !== "closed" ? ` (${this.#failure.message})` : ""
          }`,
          { cause: this.#failure },
        );
      }
      if (!phases.includes(this.#phase)) {
        throw new NbdError(
          "invalid-state",
          `Cannot ${what}: The client is ${
            this.#phase === "transmission" ? "already in transmission" : "still negotiating"
          }`,
        );
      }
      return await fn();
    } catch (error) {
      if (this.#inFlight) {
        this.#inFlight = false;
        throw this.#fail(
          error instanceof NbdError
            ? error
            : new NbdError("malformed", `Cannot ${what}: ${describe(error)}`, { cause: error }),
        );
      }
      throw error;
    } finally {
      release();
    }
  }

  /** Records the first failure and closes the socket; returns the first failure. */
  #fail(error: NbdError): NbdError {
    if (this.#failure === undefined) this.#shutdown(error);
    return this.#failure ?? error;
  }

  #shutdown(reason: NbdError): void {
    this.#failure ??= reason;
    this.#phase = "closed";
    this.#inFlight = false;
    this.#disarm();
    try {
      this.#conn.close();
    } catch {
      // Already closed.
    }
  }

  // -------------------------------------------------------------------------------------
  // Socket I/O with the watchdog

  #arm(what: string, waitMs: number): void {
    this.#activity = what;
    this.#waitMs = waitMs;
    this.#lastProgress = performance.now();
    if (this.#timer === undefined) this.#timer = setTimeout(this.#onTimer, waitMs);
  }

  #disarm(): void {
    if (this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
  }

  #onTimer = (): void => {
    this.#timer = undefined;
    const idle = performance.now() - this.#lastProgress;
    if (idle < this.#waitMs) {
      this.#timer = setTimeout(this.#onTimer, this.#waitMs - idle);
      return;
    }
    this.#fail(
      new NbdError(
        "timeout",
        `Cannot ${this.#operation}: The server made no progress for ${this.#waitMs} ms while ${this.#activity}`,
      ),
    );
  };

  /** Fills `target` from the socket, or fails the connection. */
  async #readExact(target: Uint8Array, what: string, waitMs = this.#timeoutMs): Promise<void> {
    let filled = 0;
    this.#arm(`reading ${what}`, waitMs);
    try {
      while (filled < target.byteLength) {
        let count: number | null;
        try {
          count = await this.#conn.read(target.subarray(filled));
        } catch (cause) {
          throw this.#fail(
            new NbdError(
              "disconnected",
              `Cannot ${this.#operation}: ${describe(cause)} while reading ${what}`,
              { cause },
            ),
          );
        }
        if (count === null) {
          throw this.#fail(
            new NbdError(
              "disconnected",
              `Cannot ${this.#operation}: The server closed the connection after ${filled} of ${target.byteLength} bytes of ${what}`,
            ),
          );
        }
        filled += count;
        this.#bytesReceived += count;
        this.#lastProgress = performance.now();
      }
    } finally {
      this.#disarm();
    }
  }

  /** Writes all of `data` to the socket, or fails the connection. */
  async #write(data: Uint8Array, what: string): Promise<void> {
    let written = 0;
    this.#arm(`sending ${what}`, this.#timeoutMs);
    try {
      while (written < data.byteLength) {
        let count: number;
        try {
          count = await this.#conn.write(data.subarray(written));
        } catch (cause) {
          throw this.#fail(
            new NbdError(
              "disconnected",
              `Cannot ${this.#operation}: ${describe(cause)} while sending ${what}`,
              { cause },
            ),
          );
        }
        written += count;
        this.#bytesSent += count;
        this.#lastProgress = performance.now();
      }
    } finally {
      this.#disarm();
    }
  }

  /** Reads `length` bytes of payload into the reusable scratch buffer. */
  async #readPayload(length: number, what: string): Promise<Uint8Array> {
    if (this.#scratch.byteLength < length) {
      // Callers check `length` against the cap first; doubling never goes past it.
      const grown = Math.min(this.#scratch.byteLength * 2, this.#maxPayload);
      this.#scratch = new Uint8Array(Math.max(length, grown));
    }
    const payload = this.#scratch.subarray(0, length);
    await this.#readExact(payload, what);
    return payload;
  }

  // -------------------------------------------------------------------------------------
  // Handshake and options

  async #handshake(): Promise<void> {
    this.#inFlight = true;
    const greeting = this.#header.subarray(0, NBD_HANDSHAKE_SIZE);
    await this.#readExact(greeting, "the server greeting");
    const { handshakeFlags } = decodeHandshake(greeting);
    if (!(handshakeFlags & NbdHandshakeFlag.FIXED_NEWSTYLE)) {
      throw new NbdError(
        "not-fixed-newstyle",
        `Cannot negotiate: The server does not support the fixed newstyle handshake (flags 0x${
          handshakeFlags.toString(16)
        })`,
      );
    }
    this.#handshakeFlags = handshakeFlags;
    const clientFlags = NbdClientFlag.FIXED_NEWSTYLE |
      (handshakeFlags & NbdHandshakeFlag.NO_ZEROES ? NbdClientFlag.NO_ZEROES : 0);
    const reply = new Uint8Array(4);
    new DataView(reply.buffer).setUint32(0, clientFlags);
    await this.#write(reply, "the client flags");
    this.#phase = "negotiating";
    this.#inFlight = false;
  }

  /**
   * Sends an option and reads its replies up to the final one. `onReply` handles each
   * non-final reply and returns `false` for a type it does not expect. An error reply
   * throws "option-failed" and leaves the connection in negotiation.
   */
  async #option(
    option: number,
    data: Uint8Array | undefined,
    what: string,
    onReply?: (type: number, payload: Uint8Array) => boolean,
  ): Promise<void> {
    this.#inFlight = true;
    await this.#write(encodeOption(option, data), nbdOptionName(option));
    const headerBytes = this.#header.subarray(0, NBD_OPTION_REPLY_HEADER_SIZE);
    while (true) {
      await this.#readExact(headerBytes, `the reply to ${nbdOptionName(option)}`);
      const header = decodeOptionReplyHeader(headerBytes);
      if (header.option !== option) {
        throw new NbdError(
          "unexpected-reply",
          `Cannot ${what}: The server replied to ${nbdOptionName(header.option)} instead of ${
            nbdOptionName(option)
          }`,
        );
      }
      if (header.length > MAX_OPTION_REPLY) {
        throw new NbdError(
          "payload-too-large",
          `Cannot ${what}: The server announced a ${header.length}-byte reply, more than ${MAX_OPTION_REPLY}`,
        );
      }
      const payload = await this.#readPayload(
        header.length,
        `the reply to ${nbdOptionName(option)}`,
      );
      if (isOptionReplyError(header.type)) {
        const message = new TextDecoder().decode(payload);
        const error = new NbdError(
          "option-failed",
          `Cannot ${what}: The server refused ${nbdOptionName(option)} with ${
            nbdReplyTypeName(header.type)
          }${message ? `: "${message}"` : ""}`,
          { code: header.type },
        );
        if (header.type === NbdRep.ERR_SHUTDOWN) {
          // The spec requires a soft disconnect: abort, then drop the connection.
          await this.#write(encodeOption(NbdOpt.ABORT), "NBD_OPT_ABORT").catch(() => {});
          this.#shutdown(error);
        }
        this.#inFlight = false;
        throw error;
      }
      if (header.type === NbdRep.ACK) {
        this.#inFlight = false;
        return;
      }
      if (!onReply?.(header.type, payload)) {
        throw new NbdError(
          "unexpected-reply",
          `Cannot ${what}: The server sent ${nbdReplyTypeName(header.type)} to ${
            nbdOptionName(option)
          }`,
        );
      }
    }
  }

  async #requestInfo(option: number, exportName: string, what: string): Promise<NbdExportInfo> {
    let size: number | undefined;
    let flags = 0;
    let blockSizes: [number, number, number] | undefined;
    let canonicalName: string | undefined;
    let description: string | undefined;
    await this.#option(
      option,
      encodeExportInfoRequest(exportName, [NbdInfo.BLOCK_SIZE]),
      what,
      (type, payload) => {
        if (type !== NbdRep.INFO) return false;
        const info = decodeInfoReply(payload);
        if (info.type === "export") {
          size = info.size;
          flags = info.flags;
        } else if (info.type === "block-size") {
          blockSizes = [info.minimum, info.preferred, info.maximum];
        } else if (info.type === "name") {
          canonicalName = info.name;
        } else if (info.type === "description") {
          description = info.description;
        }
        return true;
      },
    );
    if (size === undefined) {
      throw this.#fail(
        new NbdError(
          "unexpected-reply",
          `Cannot ${what}: The server acknowledged ${
            nbdOptionName(option)
          } without NBD_INFO_EXPORT`,
        ),
      );
    }
    const [minimum, preferred, maximum] = blockSizes ??
      [NBD_DEFAULT_MIN_BLOCK_SIZE, NBD_DEFAULT_PREFERRED_BLOCK_SIZE, NBD_DEFAULT_MAX_BLOCK_SIZE];
    if (
      !isPowerOfTwo(minimum) || minimum > 65536 || !isPowerOfTwo(preferred) ||
      preferred < minimum || maximum < minimum ||
      (maximum % minimum !== 0 && maximum !== 0xffffffff)
    ) {
      throw this.#fail(
        new NbdError(
          "unexpected-reply",
          `Cannot ${what}: The server advertised invalid block sizes (minimum ${minimum}, preferred ${preferred}, maximum ${maximum})`,
        ),
      );
    }
    const info: NbdExportInfo = {
      exportName,
      size,
      flags,
      minBlockSize: minimum,
      preferredBlockSize: preferred,
      maxBlockSize: maximum,
      blockSizesAdvertised: blockSizes !== undefined,
    };
    if (canonicalName !== undefined) info.canonicalName = canonicalName;
    if (description !== undefined) info.description = description;
    return info;
  }

  /** The old way into transmission, for servers without `NBD_OPT_GO`. */
  async #exportName(exportName: string): Promise<NbdExportInfo> {
    this.#inFlight = true;
    await this.#write(
      encodeOption(NbdOpt.EXPORT_NAME, new TextEncoder().encode(exportName)),
      "NBD_OPT_EXPORT_NAME",
    );
    const noZeroes = (this.#handshakeFlags & NbdHandshakeFlag.NO_ZEROES) !== 0;
    const reply = await this.#readPayload(
      NBD_EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : 124),
      `the reply to NBD_OPT_EXPORT_NAME for "${exportName}"`,
    );
    const { size, flags } = decodeExportNameReply(reply);
    this.#inFlight = false;
    return {
      exportName,
      size,
      flags,
      minBlockSize: NBD_DEFAULT_MIN_BLOCK_SIZE,
      preferredBlockSize: NBD_DEFAULT_PREFERRED_BLOCK_SIZE,
      maxBlockSize: NBD_DEFAULT_MAX_BLOCK_SIZE,
      blockSizesAdvertised: false,
    };
  }

  // -------------------------------------------------------------------------------------
  // Requests and replies

  #needStructured(what: string): void {
    if (!this.#structured) {
      throw new NbdError(
        "invalid-state",
        `Cannot ${what}: Structured replies were not negotiated; call structuredReply() first`,
      );
    }
  }

  #needContexts(what: string): void {
    if (this.#contexts.size === 0) {
      throw new NbdError("unsupported", `Cannot ${what}: No metadata context is selected`);
    }
  }

  #needFlag(what: string, flag: number, name: string): void {
    if (!(this.info.flags & flag)) {
      throw new NbdError("unsupported", `Cannot ${what}: The export does not set ${name}`);
    }
  }

  #needWritable(what: string): void {
    if (this.info.flags & NbdTransmissionFlag.READ_ONLY) {
      throw new NbdError("unsupported", `Cannot ${what}: The export is read-only`);
    }
  }

  #fuaFlag(what: string, fua: boolean | undefined): number {
    if (!fua) return 0;
    this.#needFlag(what, NbdTransmissionFlag.SEND_FUA, "SEND_FUA");
    return NbdCmdFlag.FUA;
  }

  #checkRange(what: string, offset: number, length: number): void {
    const { size, minBlockSize } = this.info;
    if (
      !Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0
    ) {
      throw new RangeError(`Cannot ${what}: The offset and length must be non-negative integers`);
    }
    if (offset + length > size) {
      throw new RangeError(`Cannot ${what}: The range ends past the export size ${size}`);
    }
    if (offset % minBlockSize !== 0 || (length % minBlockSize !== 0 && offset + length !== size)) {
      throw new RangeError(
        `Cannot ${what}: The range is not aligned to the minimum block size ${minBlockSize}`,
      );
    }
  }

  /** Sends a request header, and `data` after it; returns the cookie. */
  async #send(
    type: number,
    flags: number,
    offset: number,
    length: number,
    data?: Uint8Array,
  ): Promise<bigint> {
    const cookie = ++this.#cookie;
    this.#inFlight = true;
    encodeRequest({ flags, type, cookie, offset, length }, this.#requestBytes);
    await this.#write(this.#requestBytes, nbdCommandName(type));
    if (data) await this.#write(data, `the data of ${nbdCommandName(type)}`);
    return cookie;
  }

  /** Sends `NBD_CMD_DISC`, which has no reply. */
  async #sendDisconnect(): Promise<void> {
    encodeRequest(
      { flags: 0, type: NbdCmd.DISC, cookie: ++this.#cookie, offset: 0, length: 0 },
      this.#requestBytes,
    );
    await this.#write(this.#requestBytes, "NBD_CMD_DISC");
  }

  /** Sends a command in pieces of at most the maximum request size. */
  async #split(
    type: number,
    flags: number,
    offset: number,
    length: number,
    what: string,
  ): Promise<void> {
    for (let done = 0; done < length;) {
      const size = Math.min(this.#maxRequest, length - done);
      await this.#command(type, flags, offset + done, size, what);
      done += size;
    }
  }

  /** One command whose reply carries no data (write, write zeroes, trim, flush). */
  async #command(
    type: number,
    flags: number,
    offset: number,
    length: number,
    what: string,
    data?: Uint8Array,
  ): Promise<void> {
    const cookie = await this.#send(type, flags, offset, length, data);
    const reply = new ReplyState(offset, length);
    while (true) {
      const chunk = await this.#nextReply(cookie, what, reply);
      if (chunk === "simple") break;
      if (chunk.type !== NbdReplyType.NONE && !(chunk.type & NBD_REPLY_TYPE_FLAG_ERROR)) {
        throw this.#unexpectedChunk(chunk.type, type, what);
      }
      if (chunk.done) break;
    }
    await this.#finish(reply, what);
  }

  /** One read of at most the maximum request size into `target`. */
  async #readOnce(offset: number, target: Uint8Array, what: string): Promise<void> {
    const length = target.byteLength;
    const end = offset + length;
    const cookie = await this.#send(NbdCmd.READ, 0, offset, length);
    const reply = new ReplyState(offset, length);
    const ranges = this.#ranges;
    ranges.length = 0;
    let covered = 0;
    while (true) {
      const chunk = await this.#nextReply(cookie, what, reply, target);
      if (chunk === "simple") break;
      if (chunk.type === NbdReplyType.OFFSET_DATA) {
        if (chunk.length < 9) {
          throw new NbdError(
            "malformed",
            `Cannot ${what}: An OFFSET_DATA chunk has ${chunk.length} bytes, fewer than 9`,
          );
        }
        const prefix = this.#header.subarray(NBD_CHUNK_HEADER_SIZE, NBD_CHUNK_HEADER_SIZE + 8);
        await this.#readExact(prefix, "an OFFSET_DATA chunk");
        const high = this.#headerView.getUint32(NBD_CHUNK_HEADER_SIZE);
        const start = high * 0x100000000 + this.#headerView.getUint32(NBD_CHUNK_HEADER_SIZE + 4);
        const size = chunk.length - 8;
        this.#checkChunkRange(what, "OFFSET_DATA", start, size, offset, end);
        covered = this.#cover(what, covered + size, length);
        await this.#readExact(
          target.subarray(start - offset, start - offset + size),
          "the data of an OFFSET_DATA chunk",
        );
        ranges.push(start, start + size);
      } else if (chunk.type === NbdReplyType.OFFSET_HOLE) {
        if (chunk.length !== 12) {
          throw new NbdError(
            "malformed",
            `Cannot ${what}: An OFFSET_HOLE chunk has ${chunk.length} bytes instead of 12`,
          );
        }
        const hole = decodeOffsetHole(await this.#readPayload(12, "an OFFSET_HOLE chunk"));
        this.#checkChunkRange(what, "OFFSET_HOLE", hole.offset, hole.size, offset, end);
        covered = this.#cover(what, covered + hole.size, length);
        target.fill(0, hole.offset - offset, hole.offset - offset + hole.size);
        ranges.push(hole.offset, hole.offset + hole.size);
      } else if (chunk.type !== NbdReplyType.NONE && !(chunk.type & NBD_REPLY_TYPE_FLAG_ERROR)) {
        throw this.#unexpectedChunk(chunk.type, NbdCmd.READ, what);
      }
      if (chunk.done) {
        if (reply.error === undefined) this.#checkCoverage(what, ranges, offset, end);
        break;
      }
    }
    await this.#finish(reply, what);
  }

  /**
   * One block status request; resolves to the descriptors of every selected context,
   * checked against the request (they start at `offset`).
   */
  async #blockStatusOnce(
    offset: number,
    length: number,
    reqOne: boolean,
    what: string,
  ): Promise<Map<string, NbdBlockDescriptor[]>> {
    const flags = reqOne ? NbdCmdFlag.REQ_ONE : 0;
    const cookie = await this.#send(NbdCmd.BLOCK_STATUS, flags, offset, length);
    const reply = new ReplyState(offset, length);
    const result = new Map<string, NbdBlockDescriptor[]>();
    while (true) {
      const chunk = await this.#nextReply(cookie, what, reply);
      if (chunk === "simple") break;
      if (chunk.type === NbdReplyType.BLOCK_STATUS) {
        const payload = await this.#readPayload(chunk.length, "a BLOCK_STATUS chunk");
        const { contextId, descriptors } = decodeBlockStatusChunk(payload);
        const name = this.#contexts.get(contextId);
        if (name === undefined) {
          throw new NbdError(
            "unexpected-reply",
            `Cannot ${what}: The server sent extents for context id ${contextId}, which was not selected`,
          );
        }
        if (result.has(name)) {
          throw new NbdError(
            "unexpected-reply",
            `Cannot ${what}: The server sent two BLOCK_STATUS chunks for "${name}"`,
          );
        }
        let sum = 0;
        for (let i = 0; i < descriptors.length - 1; i++) sum += descriptors[i]!.length;
        const last = descriptors[descriptors.length - 1]!.length;
        if (
          reqOne ? descriptors.length !== 1 || last > length : sum >= length
        ) {
          throw new NbdError(
            "unexpected-reply",
            `Cannot ${what}: The ${descriptors.length} extents of "${name}" do not fit a ${length}-byte request${
              reqOne ? " with REQ_ONE" : ""
            }`,
          );
        }
        result.set(name, descriptors);
      } else if (chunk.type !== NbdReplyType.NONE && !(chunk.type & NBD_REPLY_TYPE_FLAG_ERROR)) {
        throw this.#unexpectedChunk(chunk.type, NbdCmd.BLOCK_STATUS, what);
      }
      if (chunk.done) break;
    }
    if (reply.simple && reply.error === undefined) {
      throw new NbdError(
        "unexpected-reply",
        `Cannot ${what}: The server answered NBD_CMD_BLOCK_STATUS with a simple reply`,
      );
    }
    if (reply.error === undefined) {
      for (const name of this.#contexts.values()) {
        if (!result.has(name)) {
          throw new NbdError(
            "unexpected-reply",
            `Cannot ${what}: The server sent no extents for "${name}"`,
          );
        }
      }
    }
    await this.#finish(reply, what);
    return result;
  }

  /**
   * Reads the next reply message for `cookie`. A simple reply is consumed whole (with the
   * data of a read into `readTarget` when it has no error) and gives `"simple"`. For a
   * structured chunk the header is checked and returned; error chunks are consumed and
   * recorded in `reply`; other payloads are left for the caller to read.
   */
  async #nextReply(
    cookie: bigint,
    what: string,
    reply: ReplyState,
    readTarget?: Uint8Array,
  ): Promise<"simple" | ChunkInfo> {
    const view = this.#headerView;
    await this.#readExact(this.#header.subarray(0, NBD_SIMPLE_REPLY_SIZE), "a reply header");
    const magic = view.getUint32(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      this.#checkCookie(view.getBigUint64(8), cookie, what);
      reply.simple = true;
      const error = view.getUint32(4);
      if (error !== 0) {
        reply.error = { error, message: "" };
        return "simple";
      }
      if (readTarget) {
        if (this.#structured) {
          throw new NbdError(
            "unexpected-reply",
            `Cannot ${what}: The server sent a simple reply with data although structured replies were negotiated`,
          );
        }
        await this.#readExact(readTarget, "the data of a simple reply");
      }
      return "simple";
    }
    if (magic !== NBD_STRUCTURED_REPLY_MAGIC) {
      throw new NbdError(
        "bad-magic",
        `Cannot ${what}: The reply magic is 0x${magic.toString(16).padStart(8, "0")}`,
      );
    }
    if (!this.#structured) {
      throw new NbdError(
        "unexpected-reply",
        `Cannot ${what}: The server sent a structured reply chunk without negotiating them`,
      );
    }
    await this.#readExact(
      this.#header.subarray(NBD_SIMPLE_REPLY_SIZE, NBD_CHUNK_HEADER_SIZE),
      "a reply header",
    );
    const flags = view.getUint16(4);
    const type = view.getUint16(6);
    this.#checkCookie(view.getBigUint64(8), cookie, what);
    const length = view.getUint32(16);
    if (length > this.#maxPayload) {
      throw new NbdError(
        "payload-too-large",
        `Cannot ${what}: The server announced a ${length}-byte ${
          nbdChunkTypeName(type)
        } chunk, more than the ${this.#maxPayload}-byte limit`,
      );
    }
    const done = (flags & NbdReplyFlag.DONE) !== 0;
    if (type === NbdReplyType.NONE && (length !== 0 || !done)) {
      throw new NbdError(
        "malformed",
        `Cannot ${what}: A NONE chunk must be empty and final (length ${length}, flags ${flags})`,
      );
    }
    if (type & NBD_REPLY_TYPE_FLAG_ERROR) {
      const payload = await this.#readPayload(length, "an error chunk");
      const chunk = decodeErrorChunk(type, payload);
      if (chunk.error === 0) {
        throw new NbdError("malformed", `Cannot ${what}: An error chunk carries error 0`);
      }
      if (
        chunk.offset !== undefined &&
        (chunk.offset < reply.offset || chunk.offset >= reply.offset + reply.length)
      ) {
        throw new NbdError(
          "unexpected-reply",
          `Cannot ${what}: An error offset ${chunk.offset} lies outside the request`,
        );
      }
      if (++reply.errorChunks > MAX_ERROR_CHUNKS) {
        throw new NbdError("unexpected-reply", `Cannot ${what}: The server sent too many errors`);
      }
      reply.error ??= chunk;
    }
    return { type, length, done };
  }

  #checkCookie(received: bigint, expected: bigint, what: string): void {
    if (received !== expected) {
      throw new NbdError(
        "unexpected-cookie",
        `Cannot ${what}: The reply has cookie ${received}, but the request in flight has ${expected}`,
      );
    }
  }

  #unexpectedChunk(type: number, command: number, what: string): NbdError {
    return new NbdError(
      "unexpected-reply",
      `Cannot ${what}: The server answered ${nbdCommandName(command)} with a chunk of type ${
        nbdChunkTypeName(type)
      }`,
    );
  }

  #checkChunkRange(
    what: string,
    kind: string,
    start: number,
    size: number,
    offset: number,
    end: number,
  ): void {
    if (start < offset || start + size > end) {
      throw new NbdError(
        "unexpected-reply",
        `Cannot ${what}: An ${kind} chunk covers ${start}..${
          start + size
        }, outside the requested ${offset}..${end}`,
      );
    }
  }

  #cover(what: string, covered: number, length: number): number {
    if (covered > length) {
      throw new NbdError(
        "unexpected-reply",
        `Cannot ${what}: The server sent overlapping content chunks`,
      );
    }
    return covered;
  }

  /** Content chunks must tile the request exactly: no gap, no overlap. */
  #checkCoverage(what: string, ranges: number[], offset: number, end: number): void {
    let sorted = true;
    for (let i = 2; i < ranges.length; i += 2) {
      if (ranges[i]! < ranges[i - 2]!) {
        sorted = false;
        break;
      }
    }
    let pairs: [number, number][] | undefined;
    if (!sorted) {
      pairs = [];
      for (let i = 0; i < ranges.length; i += 2) pairs.push([ranges[i]!, ranges[i + 1]!]);
      pairs.sort((a, b) => a[0] - b[0]);
    }
    let position = offset;
    const count = ranges.length / 2;
    for (let i = 0; i < count; i++) {
      const start = pairs ? pairs[i]![0] : ranges[2 * i]!;
      const stop = pairs ? pairs[i]![1] : ranges[2 * i + 1]!;
      if (start !== position) break;
      position = stop;
    }
    if (position !== end) {
      throw new NbdError(
        "unexpected-reply",
        `Cannot ${what}: The server finished the reply, but its content chunks leave ${position}..${end} uncovered or overlapping`,
      );
    }
  }

  /** Ends a reply: the stream is in sync again; throws the error the server reported. */
  async #finish(reply: ReplyState, what: string): Promise<void> {
    this.#inFlight = false;
    const error = reply.error;
    if (error === undefined) return;
    const failure = new NbdError(
      "command-failed",
      `Cannot ${what}: The server reported ${nbdErrnoName(error.error)}${
        error.offset !== undefined ? ` at offset ${error.offset}` : ""
      }${error.message ? `: "${error.message}"` : ""}`,
      { code: error.error },
    );
    if (error.error === NbdErrno.ESHUTDOWN) {
      // The spec requires a soft disconnect.
      try {
        await this.#sendDisconnect();
      } catch {
        // Leaving anyway.
      }
      this.#shutdown(failure);
    }
    throw failure;
  }
}

/** What the reply loop learned about one request. */
class ReplyState {
  readonly offset: number;
  readonly length: number;
  simple = false;
  error: NbdErrorChunk | undefined;
  errorChunks = 0;

  constructor(offset: number, length: number) {
    this.offset = offset;
    this.length = length;
  }
}

/** A structured chunk header as the reply loop hands it over. */
interface ChunkInfo {
  type: number;
  length: number;
  done: boolean;
}

function appendExtent(extents: NbdExtent[], offset: number, length: number, flags: number): void {
  const last = extents[extents.length - 1];
  if (last && last.flags === flags && last.offset + last.length === offset) {
    last.length += length;
  } else {
    extents.push({ offset, length, flags });
  }
}
