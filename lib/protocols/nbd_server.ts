// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The NBD server of the toolkit: named exports whose requests go to pluggable handlers.
 *
 * One server serves the push-mode target QEMU's backup job writes into, the disks of an
 * archive (read-only, sparse) and the in-memory exports of tests and examples. It speaks the
 * fixed newstyle handshake (`NBD_OPT_GO` / `NBD_OPT_INFO` with `NBD_INFO_EXPORT`,
 * `NBD_INFO_BLOCK_SIZE`, `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION`; `NBD_OPT_EXPORT_NAME`,
 * `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT`
 * and `NBD_OPT_SET_META_CONTEXT` for `base:allocation`; `NBD_REP_ERR_UNSUP` for the rest),
 * structured replies (`OFFSET_DATA`, `OFFSET_HOLE` for zero ranges, error chunks) and simple
 * replies for clients that do not negotiate them, and every command of NetworkBlockDevice/nbd
 * `doc/proto.md` but `RESIZE`. Several clients may connect at once; each connection runs up to
 * {@linkcode NbdServerOptions.maxInFlight} requests at a time.
 *
 * @module
 */
import { isZeroRange } from "../_bytes.ts";
import { writeAll } from "../_io.ts";
import {
  decodeExportInfoRequest,
  decodeMetaContextRequest,
  decodeNbdString,
  decodeOptionHeader,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeChunkHeader,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeHandshake,
  encodeInfoReply,
  encodeMetaContextReply,
  encodeOffsetDataPrefix,
  encodeOffsetHole,
  encodeOptionReply,
  encodeServerReply,
  encodeSimpleReply,
  NBD_MAX_STRING_LENGTH,
  NBD_OPTION_HEADER_SIZE,
  NBD_REQUEST_SIZE,
  type NbdBlockDescriptor,
  NbdClientFlag,
  NbdCmd,
  NbdCmdFlag,
  nbdCommandName,
  NbdErrno,
  nbdErrnoName,
  NbdError,
  NbdHandshakeFlag,
  NbdInfo,
  NbdMetaContext,
  NbdOpt,
  nbdOptionName,
  NbdRep,
  NbdReplyFlag,
  NbdReplyType,
  type NbdRequest,
  NbdTransmissionFlag,
} from "./nbd_protocol.ts";

export type { NbdBlockDescriptor, NbdRequest } from "./nbd_protocol.ts";
export { NbdCmdFlag, NbdErrno, NbdError, NbdStateFlag } from "./nbd_protocol.ts";

// ---------------------------------------------------------------------------------------
// What an export is

/** Block size constraints of an export (`NBD_INFO_BLOCK_SIZE`). */
export interface NbdBlockSizes {
  /** Alignment of every offset and length: a power of two up to 64 KiB. */
  minimum: number;
  /** The size from which requests are efficient: a power of two, at least 512. */
  preferred: number;
  /** Largest READ, WRITE, WRITE_ZEROES or CACHE: a multiple of `minimum`, at most 2^31. */
  maximum: number;
}

/** What the server tells a handler about the request it runs. */
export interface NbdRequestContext {
  /**
   * Aborted when the reply can no longer be sent: the client went away or the server is
   * closing. A handler that waits on something slow should give up then.
   */
  readonly signal: AbortSignal;
  /** {@linkcode NbdCmdFlag} bits of the request (`FUA`, `NO_HOLE`, `DF`, `REQ_ONE`). */
  readonly flags: number;
  /** The connection's number, as in the log lines. */
  readonly connection: number;
  /**
   * Runs `callback` once the reply to this request has been written to the socket, or
   * will never be (the connection dropped, the server closed): a read handler that
   * returns views of buffers it recycles gives them back here. Callbacks run after the
   * handler has returned, once each.
   */
  readonly afterReply?: (callback: () => void) => void;
}

/** The context of a block status request. */
export interface NbdBlockStatusContext extends NbdRequestContext {
  /** Most extents the reply carries (1 with `REQ_ONE`): there is no need to find more. */
  readonly maxExtents: number;
}

/**
 * One piece of a read reply: bytes at an absolute offset, or a run that reads as zeroes
 * (sent as one 32-byte `OFFSET_HOLE` chunk whatever its length).
 */
export type NbdReadChunk =
  | { readonly type: "data"; readonly offset: number; readonly data: Uint8Array }
  | { readonly type: "hole"; readonly offset: number; readonly length: number };

/**
 * What a read handler returns: exactly the requested bytes (the server then sends the
 * all-zero 4 KiB blocks in them as holes), or chunks that cover the range exactly once, in
 * any order (sent in that order, so a handler that knows its zero ranges never fills them).
 * The server only reads the bytes until the reply is sent.
 */
export type NbdReadResult = Uint8Array | readonly NbdReadChunk[];

/**
 * An export: its size and what it does with each command. Every command is optional; an
 * export without `write` (or with `readOnly`) is read-only, one without `read` answers reads
 * with `EINVAL` (a write-only sink such as the push-mode target), one without `blockStatus`
 * offers no `base:allocation` context. `FLUSH` and `CACHE` succeed without a handler.
 *
 * A handler that throws answers the request with `EIO`, or with the errno of an
 * {@linkcode NbdError} whose `code` is set; its message goes to the client in a structured
 * error chunk and to the log. The server checks ranges, alignment, sizes and the read-only
 * flag before it calls a handler, so handlers see only valid requests.
 *
 * @example A read-only export of 1 MiB whose first 64 KiB hold data
 * ```ts
 * import assert from "node:assert/strict";
 * import type { NbdExportHandler } from "./nbd_server.ts";
 *
 * const disk: NbdExportHandler = {
 *   size: 1 << 20,
 *   description: "a tiny disk",
 *   read(offset, length) {
 *     // Every byte below 64 KiB is 7; the rest is a hole that costs nothing to send.
 *     const data = Math.max(0, Math.min(65536 - offset, length));
 *     return [
 *       ...(data > 0 ? [{ type: "data" as const, offset, data: new Uint8Array(data).fill(7) }] : []),
 *       ...(data < length ? [{ type: "hole" as const, offset: offset + data, length: length - data }] : []),
 *     ];
 *   },
 *   blockStatus(offset, length) {
 *     return offset < 65536
 *       ? [{ length: 65536 - offset, flags: 0 }, { length: (1 << 20) - 65536, flags: 3 }]
 *       : [{ length, flags: 3 }];
 *   },
 * };
 * assert.equal(disk.write, undefined); // read-only
 * ```
 */
export interface NbdExportHandler {
  /** Export size in bytes. */
  readonly size: number;
  /** Free text shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` (`nbdinfo`). */
  readonly description?: string;
  /** Refuse writes even though `write` exists. */
  readonly readOnly?: boolean;
  /**
   * Whether several connections may share the export (`NBD_FLAG_CAN_MULTI_CONN`: a flush on
   * one makes the writes of all visible). Default: true when read-only, else false.
   */
  readonly multiConn?: boolean;
  /** Block size constraints; default {@linkcode NbdServerOptions.blockSizes}. */
  readonly blockSizes?: NbdBlockSizes;
  /** Handles a READ of `length` bytes (1 or more) at `offset`. */
  read?(
    offset: number,
    length: number,
    context: NbdRequestContext,
  ): NbdReadResult | Promise<NbdReadResult>;
  /**
   * Handles a WRITE: call `read(target)` once, with a buffer of exactly `length` bytes, to
   * receive the data from the socket. With `FUA` the server calls `flush` afterwards.
   */
  write?(
    offset: number,
    length: number,
    read: (target: Uint8Array) => Promise<void>,
    context: NbdRequestContext,
  ): void | Promise<void>;
  /** Handles WRITE_ZEROES (`context.flags` may hold `NO_HOLE`). */
  writeZeroes?(offset: number, length: number, context: NbdRequestContext): void | Promise<void>;
  /** Handles TRIM, a hint: the range may read as anything afterwards. */
  trim?(offset: number, length: number, context: NbdRequestContext): void | Promise<void>;
  /** Handles FLUSH: every write answered so far must be persistent. */
  flush?(context: NbdRequestContext): void | Promise<void>;
  /** Handles CACHE, a hint that the range will be read soon. */
  cache?(offset: number, length: number, context: NbdRequestContext): void | Promise<void>;
  /**
   * Reports `base:allocation` from `offset`: consecutive extents (`NbdStateFlag.HOLE` and
   * `ZERO` bits), each a multiple of the minimum block size. They may cover less than
   * `length` (the client asks again for the rest) or more (the server clips them).
   */
  blockStatus?(
    offset: number,
    length: number,
    context: NbdBlockStatusContext,
  ): readonly NbdBlockDescriptor[] | Promise<readonly NbdBlockDescriptor[]>;
}

// ---------------------------------------------------------------------------------------
// The server's options

/** Where a server listens: a unix socket path, or a TCP host and port (0: any free port). */
export type NbdListenAddress = { path: string } | { hostname: string; port: number };

/** The exports of a server, by name (`""` is the default export). */
export type NbdExports =
  | Readonly<Record<string, NbdExportHandler>>
  | ReadonlyMap<string, NbdExportHandler>;

/** An option or request as the server received it, for {@linkcode NbdServerOptions.trace}. */
export type NbdTraceEvent =
  | { type: "option"; connection: number; option: number }
  | { type: "request"; connection: number; request: NbdRequest };

/** Options of {@linkcode NbdServer.listen}. */
export interface NbdServerOptions {
  /** Block sizes of exports that set none (default: 1, 4096 and 32 MiB, as `qemu-nbd`). */
  blockSizes?: NbdBlockSizes;
  /** The export the empty name selects when there is no export named `""`. */
  defaultExport?: string;
  /** Offer structured replies (default true; false answers them `NBD_REP_ERR_UNSUP`). */
  structuredReplies?: boolean;
  /** Options to answer with `NBD_REP_ERR_UNSUP` as if unknown, to test client fallbacks. */
  unsupportedOptions?: readonly number[];
  /** Connections open at once; more are closed at once with a log line (default 16). */
  maxConnections?: number;
  /** Requests one connection runs at a time (default 16; 1 answers them strictly in order). */
  maxInFlight?: number;
  /**
   * READ and WRITE bytes one connection holds at a time (default 8 MiB); a larger request
   * waits for the others to finish and then runs alone.
   */
  maxInFlightBytes?: number;
  /** Most extents in one block status reply (default 16384). */
  maxExtents?: number;
  /** Time a client has from connecting to choosing an export (default 10 s). */
  handshakeTimeoutMs?: number;
  /** Receives one line per event: connections, exports chosen, failed requests, drops. */
  logger?: (line: string) => void;
  /** Sees every option and request before the server acts on it (tests, debugging). */
  trace?: (event: NbdTraceEvent) => void;
}

/** Counters of a server, over all connections. */
export interface NbdServerStats {
  /** Connections accepted (refused ones not included). */
  connections: number;
  /** READ requests answered with data. */
  reads: number;
  /** Bytes of those reads. */
  bytesRead: number;
  /** WRITE requests handled. */
  writes: number;
  /** Payload bytes of WRITE requests. */
  bytesWritten: number;
  /** WRITE_ZEROES requests handled. */
  writeZeroes: number;
  /** TRIM requests handled. */
  trims: number;
  /** FLUSH requests handled. */
  flushes: number;
  /** BLOCK_STATUS requests answered. */
  blockStatus: number;
  /** Writes below the highest offset written so far on their connection (copy-before-write). */
  outOfOrder: number;
  /** Requests whose handler failed. */
  errors: number;
}

const MiB = 1 << 20;
const DEFAULT_BLOCK_SIZES: NbdBlockSizes = { minimum: 1, preferred: 4096, maximum: 32 * MiB };
const HOLE_GRANULARITY = 4096;
const MAX_OPTION_LENGTH = 65536;
/** How long close() lets the ESHUTDOWN replies of pending requests travel. */
const CLOSE_GRACE_MS = 200;

/** Command flags each command accepts (FUA is accepted everywhere, as the spec asks). */
const ALLOWED_FLAGS: Record<number, number> = {
  [NbdCmd.READ]: NbdCmdFlag.FUA | NbdCmdFlag.DF,
  [NbdCmd.WRITE]: NbdCmdFlag.FUA,
  [NbdCmd.FLUSH]: NbdCmdFlag.FUA,
  [NbdCmd.TRIM]: NbdCmdFlag.FUA,
  [NbdCmd.CACHE]: NbdCmdFlag.FUA,
  [NbdCmd.WRITE_ZEROES]: NbdCmdFlag.FUA | NbdCmdFlag.NO_HOLE,
  [NbdCmd.BLOCK_STATUS]: NbdCmdFlag.FUA | NbdCmdFlag.REQ_ONE,
};

interface ResolvedOptions {
  blockSizes: NbdBlockSizes;
  defaultExport: string | undefined;
  structuredReplies: boolean;
  unsupportedOptions: ReadonlySet<number>;
  maxConnections: number;
  maxInFlight: number;
  maxInFlightBytes: number;
  maxExtents: number;
  handshakeTimeoutMs: number;
  logger: ((line: string) => void) | undefined;
  trace: ((event: NbdTraceEvent) => void) | undefined;
}

/** An export under its canonical name. */
interface NamedExport {
  name: string;
  handler: NbdExportHandler;
  sizes: NbdBlockSizes;
}

/** What a connection needs from its server. */
interface ServerCore {
  readonly options: ResolvedOptions;
  readonly stats: NbdServerStats;
  readonly exports: readonly NamedExport[];
  find(name: string): NamedExport | undefined;
  log(line: string): void;
  trace(event: NbdTraceEvent): void;
  transmissionStarted(): void;
  transmissionEnded(): void;
}

/**
 * An NBD server on a unix socket or TCP port, serving named exports to any number of
 * clients (QEMU, `qemu-img`, `nbdinfo`, `nbdcopy`, {@linkcode NbdClient}).
 *
 * Memory: per connection a 64 KiB receive buffer, a 64 KiB send buffer and the buffers of
 * the requests in flight, at most {@linkcode NbdServerOptions.maxInFlight} of them and
 * {@linkcode NbdServerOptions.maxInFlightBytes} of READ and WRITE payload (a single larger
 * request runs alone), each sized to its request. So a server holds at most
 * `maxConnections × max(maxInFlightBytes, maximum block size)` for requests, whatever the
 * export size; what the handlers keep (caches) is theirs to bound.
 *
 * A bad request gets its errno (`EPERM` for a write to a read-only export, `EINVAL` for a
 * read past the end, `ENOSPC` for a write past it, unaligned or oversized requests `EINVAL`)
 * and the connection goes on. A client that breaks the framing (bad magic) is dropped with
 * one log line; the other clients keep going. {@linkcode NbdServer.close} never waits for a
 * handler: pending requests are answered `ESHUTDOWN` and the connections dropped.
 *
 * @example Serve an in-memory disk and read it back
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdClient } from "./nbd_client.ts";
 * import { NbdMemoryExport } from "./nbd_memory_export.ts";
 * import { NbdServer } from "./nbd_server.ts";
 *
 * const data = new Uint8Array(1 << 20);
 * data.fill(0x5a, 65536, 131072);
 * const lines: string[] = [];
 * await using server = NbdServer.listen(
 *   { hostname: "127.0.0.1", port: 0 },
 *   { "drive-scsi0": new NbdMemoryExport(data, { readOnly: true }) },
 *   { logger: (line) => lines.push(line) },
 * );
 * await using client = await NbdClient.connect(server.uri("drive-scsi0"));
 * const buffer = new Uint8Array(65536);
 * await client.read(65536, buffer);
 * assert.ok(buffer.every((byte) => byte === 0x5a));
 * await assert.rejects(client.write(0, new Uint8Array(512)), { reason: "unsupported" });
 * assert.match(lines[0]!, /^connection 1 opened/);
 * ```
 *
 * @example The push-mode target: a write-only export QEMU's backup job writes into
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdClient } from "./nbd_client.ts";
 * import { NbdServer } from "./nbd_server.ts";
 *
 * let written = 0;
 * const server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
 *   "": {
 *     size: 1 << 30,
 *     async write(_offset, length, read) {
 *       await read(new Uint8Array(length));
 *       written += length;
 *     },
 *     writeZeroes() {},
 *   },
 * }, { maxInFlight: 1 });
 * const client = await NbdClient.connect(server.uri());
 * await client.write(0, new Uint8Array(65536).fill(1));
 * await client.writeZeroes(65536, 65536);
 * await client.close();
 * await server.disconnected; // the client left and every request was handled
 * await server.close();
 * assert.equal(written, 65536);
 * assert.equal(server.stats.writeZeroes, 1);
 * ```
 */
export class NbdServer implements AsyncDisposable {
  /** Where the server listens (the TCP port as bound, when 0 was asked). */
  readonly address: NbdListenAddress;
  /** Counters so far. */
  readonly stats: NbdServerStats = {
    connections: 0,
    reads: 0,
    bytesRead: 0,
    writes: 0,
    bytesWritten: 0,
    writeZeroes: 0,
    trims: 0,
    flushes: 0,
    blockStatus: 0,
    outOfOrder: 0,
    errors: 0,
  };
  #listener: Deno.Listener;
  #options: ResolvedOptions;
  #exports: NamedExport[];
  #byName = new Map<string, NamedExport>();
  #connections = new Set<Connection>();
  #accepting: Promise<void>;
  #nextId = 1;
  #transmitting = 0;
  #disconnected = Promise.withResolvers<void>();
  #closing: Promise<void> | undefined;

  private constructor(
    address: NbdListenAddress,
    exports: NbdExports,
    options: NbdServerOptions,
  ) {
    this.#options = resolveOptions(options);
    const entries = exports instanceof Map ? [...exports] : Object.entries(exports);
    this.#exports = entries.map(([name, handler]) => checkExport(name, handler, this.#options));
    for (const entry of this.#exports) this.#byName.set(entry.name, entry);
    const wanted = this.#options.defaultExport;
    if (wanted !== undefined && !this.#byName.has(wanted)) {
      throw new RangeError(`Cannot serve NBD: The default export "${wanted}" is not exported`);
    }
    if ("path" in address) {
      this.#listener = Deno.listen({ transport: "unix", path: address.path });
      this.address = { path: address.path };
    } else {
      this.#listener = Deno.listen({ hostname: address.hostname, port: address.port });
      const bound = this.#listener.addr as Deno.NetAddr;
      this.address = { hostname: address.hostname, port: bound.port };
    }
    this.#accepting = this.#acceptLoop();
  }

  /**
   * Starts serving `exports` at `address`: a new unix socket (removed again by
   * {@linkcode NbdServer.close}) or a TCP port.
   *
   * @example Two exports on a unix socket, listed by name
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * const dir = await Deno.makeTempDir();
   * const server = NbdServer.listen({ path: `${dir}/nbd.sock` }, {
   *   "drive-scsi0": new NbdMemoryExport(4096, { description: "system disk" }),
   *   "drive-scsi1": new NbdMemoryExport(8192),
   * });
   * const client = await NbdClient.open(server.uri());
   * assert.deepEqual(await client.listExports(), [
   *   { name: "drive-scsi0", description: "system disk" },
   *   { name: "drive-scsi1", description: "" },
   * ]);
   * await client.close();
   * await server.close();
   * await Deno.remove(dir);
   * ```
   *
   * @throws {RangeError} for an export whose size, name or block sizes are invalid.
   * @throws {Deno.errors.AddrInUse} and the other errors of `Deno.listen`.
   */
  static listen(
    address: NbdListenAddress,
    exports: NbdExports,
    options: NbdServerOptions = {},
  ): NbdServer {
    return new NbdServer(address, exports, options);
  }

  /**
   * An NBD URI of an export of this server, for `qemu-img`, `nbdinfo` or
   * {@linkcode NbdClient.connect}: `nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   "drive-scsi0": new NbdMemoryExport(4096),
   * });
   * assert.equal(server.uri("drive-scsi0"), `nbd://127.0.0.1:${server.port}/drive-scsi0`);
   * ```
   */
  uri(exportName = ""): string {
    const name = encodeURIComponent(exportName);
    if ("path" in this.address) {
      const socket = encodeURIComponent(this.address.path).replaceAll("%2F", "/");
      return `nbd+unix:///${name}?socket=${socket}`;
    }
    const host = this.address.hostname.includes(":")
      ? `[${this.address.hostname}]`
      : this.address.hostname;
    return `nbd://${host}:${this.address.port}/${name}`;
  }

  /**
   * The TCP port the server listens on, or 0 on a unix socket.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {});
   * assert.ok(server.port > 0);
   * ```
   */
  get port(): number {
    return "port" in this.address ? this.address.port : 0;
  }

  /**
   * Resolves once every client that entered transmission has disconnected (`NBD_CMD_DISC`
   * or a dropped connection) and each of its requests has been handled, or when the server
   * closes. Push mode waits on this after `blockdev-del`: then the target has seen every
   * write.
   *
   * @example
   * ```ts
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdMemoryExport } from "./nbd_memory_export.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * await using server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   "": new NbdMemoryExport(4096),
   * });
   * const client = await NbdClient.connect(server.uri());
   * await client.close();
   * await server.disconnected;
   * ```
   */
  get disconnected(): Promise<void> {
    return this.#disconnected.promise;
  }

  /**
   * Stops listening and drops every connection. It does not wait for handlers: requests
   * still pending are answered `ESHUTDOWN` (the clients get 200 ms to take these replies),
   * their handlers' `context.signal` is aborted, and whatever they return later is
   * discarded. Safe to call more than once.
   *
   * @example A handler that never finishes does not hold close() up
   * ```ts
   * import assert from "node:assert/strict";
   * import { NbdClient } from "./nbd_client.ts";
   * import { NbdServer } from "./nbd_server.ts";
   *
   * const server = NbdServer.listen({ hostname: "127.0.0.1", port: 0 }, {
   *   stuck: { size: 4096, read: () => new Promise(() => {}) },
   * });
   * const client = await NbdClient.connect(server.uri("stuck"));
   * const reading = client.read(0, new Uint8Array(4096));
   * await new Promise((resolve) => setTimeout(resolve, 50));
   * await server.close();
   * await assert.rejects(reading, { reason: "command-failed", code: 108 }); // ESHUTDOWN
   * await client.close();
   * ```
   */
  close(): Promise<void> {
    this.#closing ??= this.#shutDown();
    return this.#closing;
  }

  /** Same as {@linkcode NbdServer.close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  async #shutDown(): Promise<void> {
    try {
      this.#listener.close();
    } catch { /* already closed */ }
    await this.#accepting;
    const connections = [...this.#connections];
    await Promise.all(connections.map((connection) => connection.stop()));
    await Promise.all(connections.map((connection) => connection.done));
    if ("path" in this.address) await Deno.remove(this.address.path).catch(() => {});
    this.#disconnected.resolve();
  }

  async #acceptLoop(): Promise<void> {
    const core = this.#core();
    for (;;) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#closing !== undefined || error instanceof Deno.errors.BadResource) return;
        core.log(`accepting a connection failed: ${messageOf(error)}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
        continue;
      }
      const id = this.#nextId++;
      if (this.#connections.size >= this.#options.maxConnections) {
        core.log(
          `connection ${id} refused: ${this.#options.maxConnections} connections are open`,
        );
        closeQuietly(conn);
        continue;
      }
      if ("setNoDelay" in conn) (conn as Deno.TcpConn).setNoDelay(true);
      this.stats.connections++;
      const connection = new Connection(id, conn, core);
      this.#connections.add(connection);
      connection.done.finally(() => this.#connections.delete(connection));
    }
  }

  #core(): ServerCore {
    const { logger, trace: tracer } = this.#options;
    return {
      options: this.#options,
      stats: this.stats,
      exports: this.#exports,
      find: (name) => {
        const found = this.#byName.get(name);
        if (found !== undefined || name !== "") return found;
        const fallback = this.#options.defaultExport;
        return fallback === undefined ? undefined : this.#byName.get(fallback);
      },
      log: (line) => {
        try {
          logger?.(line);
        } catch { /* a broken logger must not break the server */ }
      },
      trace: (event) => {
        try {
          tracer?.(event);
        } catch { /* nor a broken tracer */ }
      },
      transmissionStarted: () => this.#transmitting++,
      transmissionEnded: () => {
        if (--this.#transmitting === 0) this.#disconnected.resolve();
      },
    };
  }
}

// ---------------------------------------------------------------------------------------
// One connection

/** A request between its header and its reply. */
interface Pending {
  bytes: number;
  replied: boolean;
  request: NbdRequest;
  /** What the handler asked to run once the reply is out. */
  after: (() => void)[];
}

/** Thrown into the loops of a connection that is being stopped. */
class Stopped extends Error {}

/** A violation of the protocol by the client: it is dropped. */
class Violation extends Error {}

class Connection {
  readonly id: number;
  readonly done: Promise<void>;
  #conn: Deno.Conn;
  #core: ServerCore;
  #reader: SocketReader;
  #writer: ReplyWriter;
  #abort = new AbortController();
  #stopped = Promise.withResolvers<never>();
  #stopping = false;
  #dropReason: string | undefined;
  #pending = new Set<Pending>();
  #pendingBytes = 0;
  #wake: (() => void) | undefined;
  #structured = false;
  #noZeroes = false;
  #metaExport: NamedExport | undefined;
  #export: NamedExport | undefined;
  #contextSelected = false;
  #writable = false;
  #highest = 0;
  #requests = 0;

  constructor(id: number, conn: Deno.Conn, core: ServerCore) {
    this.id = id;
    this.#conn = conn;
    this.#core = core;
    this.#reader = new SocketReader(conn);
    this.#writer = new ReplyWriter(conn);
    this.#stopped.promise.catch(() => {});
    this.done = this.#run();
  }

  /** Answers pending requests with ESHUTDOWN (briefly) and drops the connection. */
  async stop(): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    this.#abort.abort(new Error("The NBD server is closing"));
    const parts: Uint8Array[] = [];
    for (const pending of this.#pending) {
      if (pending.replied) continue;
      pending.replied = true;
      parts.push(...this.#errorReply(pending.request, NbdErrno.ESHUTDOWN, "the server is closing"));
    }
    if (parts.length > 0) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        this.#writer.send(parts).catch(() => {}),
        new Promise((resolve) => timer = setTimeout(resolve, CLOSE_GRACE_MS)),
      ]);
      clearTimeout(timer);
    }
    this.#stopped.reject(new Stopped("The NBD server is closing"));
    closeQuietly(this.#conn);
  }

  async #run(): Promise<void> {
    const core = this.#core;
    core.log(`connection ${this.id} opened${describePeer(this.#conn)}`);
    let transmission = false;
    try {
      const timeout = core.options.handshakeTimeoutMs;
      const timer = setTimeout(
        () => this.#drop(`it chose no export within ${timeout} ms`),
        timeout,
      );
      let entered: boolean;
      try {
        entered = await this.#handshake();
      } finally {
        clearTimeout(timer);
      }
      if (!entered) {
        core.log(`connection ${this.id} closed during the handshake`);
        return;
      }
      transmission = true;
      core.transmissionStarted();
      const how = await this.#transmission();
      core.log(
        `connection ${this.id} closed after ${this.#requests} request${
          this.#requests === 1 ? "" : "s"
        } (${how})`,
      );
    } catch (error) {
      if (this.#stopping) {
        core.log(`connection ${this.id} closed: the server is closing`);
      } else {
        core.log(`connection ${this.id} dropped: ${this.#dropReason ?? messageOf(error)}`);
      }
    } finally {
      this.#abort.abort(new Error("The NBD connection is closed"));
      closeQuietly(this.#conn);
      if (transmission) {
        // The client has left once its handlers are done too (or the server closes); the
        // connection itself no longer counts against maxConnections meanwhile.
        void Promise.race([this.#idle(), this.#stopped.promise]).catch(() => {})
          .then(() => core.transmissionEnded());
      }
    }
  }

  /** Drops the connection from outside its loops (the handshake timer). */
  #drop(reason: string): void {
    this.#dropReason ??= reason;
    this.#stopped.reject(new Violation(reason));
    closeQuietly(this.#conn);
  }

  // -------------------------------------------------------------------------------------
  // Handshake

  /** The option haggling; true when the client entered transmission. */
  async #handshake(): Promise<boolean> {
    const { options } = this.#core;
    await this.#writer.send([
      encodeHandshake(NbdHandshakeFlag.FIXED_NEWSTYLE | NbdHandshakeFlag.NO_ZEROES),
    ]);
    const flags = await this.#reader.bytes(4, true);
    if (flags === null) return false;
    const clientFlags = new DataView(flags.buffer, flags.byteOffset, 4).getUint32(0);
    if (clientFlags & ~(NbdClientFlag.FIXED_NEWSTYLE | NbdClientFlag.NO_ZEROES)) {
      throw new Violation(`it sent unknown client flags 0x${clientFlags.toString(16)}`);
    }
    this.#noZeroes = (clientFlags & NbdClientFlag.NO_ZEROES) !== 0;
    for (;;) {
      const header = await this.#reader.bytes(NBD_OPTION_HEADER_SIZE, true);
      if (header === null) return false;
      const { option, length } = decodeOptionHeader(header);
      this.#core.trace({ type: "option", connection: this.id, option });
      if (length > MAX_OPTION_LENGTH) {
        if (option === NbdOpt.EXPORT_NAME) {
          throw new Violation(`it sent a ${length}-byte NBD_OPT_EXPORT_NAME`);
        }
        await this.#reader.skip(length);
        await this.#optionError(option, NbdRep.ERR_TOO_BIG, `${length} bytes is too long`);
        continue;
      }
      const data = (await this.#reader.bytes(length)).slice();
      if (options.unsupportedOptions.has(option)) {
        await this.#optionError(option, NbdRep.ERR_UNSUP, `${nbdOptionName(option)} is off`);
        continue;
      }
      switch (option) {
        case NbdOpt.EXPORT_NAME: {
          const name = decodeNbdString(data, "the export name");
          const found = this.#core.find(name);
          if (found === undefined) {
            throw new Violation(`it asked for the unknown export "${name}" (NBD_OPT_EXPORT_NAME)`);
          }
          const flags = this.#transmissionFlags(found.handler);
          await this.#writer.send([
            encodeExportNameReply(found.handler.size, flags, this.#noZeroes),
          ]);
          this.#enter(found);
          return true;
        }
        case NbdOpt.ABORT:
          await this.#writer.send([encodeOptionReply(option, NbdRep.ACK)]).catch(() => {});
          return false;
        case NbdOpt.LIST: {
          if (length > 0) {
            await this.#optionError(option, NbdRep.ERR_INVALID, "NBD_OPT_LIST takes no data");
            break;
          }
          await this.#writer.send([
            ...this.#core.exports.map((entry) =>
              encodeOptionReply(
                option,
                NbdRep.SERVER,
                encodeServerReply({
                  name: entry.name,
                  description: entry.handler.description ?? "",
                }),
              )
            ),
            encodeOptionReply(option, NbdRep.ACK),
          ]);
          break;
        }
        case NbdOpt.STRUCTURED_REPLY:
          if (length > 0) {
            await this.#optionError(option, NbdRep.ERR_INVALID, "it takes no data");
          } else if (!options.structuredReplies) {
            await this.#optionError(option, NbdRep.ERR_UNSUP, "structured replies are off");
          } else {
            this.#structured = true;
            await this.#writer.send([encodeOptionReply(option, NbdRep.ACK)]);
          }
          break;
        case NbdOpt.LIST_META_CONTEXT:
        case NbdOpt.SET_META_CONTEXT:
          await this.#metaContext(option, data);
          break;
        case NbdOpt.INFO:
        case NbdOpt.GO:
          if (await this.#info(option, data)) return true;
          break;
        default:
          await this.#optionError(
            option,
            NbdRep.ERR_UNSUP,
            `${nbdOptionName(option)} is not supported`,
          );
      }
    }
  }

  #optionError(option: number, type: number, message: string): Promise<void> {
    return this.#writer.send([encodeOptionReply(option, type, encodeMessage(message))]);
  }

  /** `NBD_OPT_INFO` or `NBD_OPT_GO`; true when the client entered transmission. */
  async #info(option: number, data: Uint8Array): Promise<boolean> {
    let request;
    try {
      request = decodeExportInfoRequest(data);
    } catch (error) {
      await this.#optionError(option, NbdRep.ERR_INVALID, messageOf(error));
      return false;
    }
    const found = this.#core.find(request.exportName);
    if (found === undefined) {
      await this.#optionError(
        option,
        NbdRep.ERR_UNKNOWN,
        `export "${request.exportName}" not found`,
      );
      return false;
    }
    const { handler, sizes } = found;
    const info = (item: Parameters<typeof encodeInfoReply>[0]) =>
      encodeOptionReply(option, NbdRep.INFO, encodeInfoReply(item));
    const replies = [
      info({ type: "export", size: handler.size, flags: this.#transmissionFlags(handler) }),
      info({ type: "block-size", ...sizes }),
    ];
    if (request.infos.includes(NbdInfo.NAME)) {
      replies.push(info({ type: "name", name: found.name }));
    }
    if (request.infos.includes(NbdInfo.DESCRIPTION) && handler.description) {
      replies.push(info({ type: "description", description: handler.description }));
    }
    replies.push(encodeOptionReply(option, NbdRep.ACK));
    await this.#writer.send(replies);
    if (option !== NbdOpt.GO) return false;
    this.#enter(found);
    return true;
  }

  async #metaContext(option: number, data: Uint8Array): Promise<void> {
    const set = option === NbdOpt.SET_META_CONTEXT;
    if (set) this.#metaExport = undefined; // a SET replaces the selection, even when it fails
    if (!this.#structured) {
      await this.#optionError(option, NbdRep.ERR_INVALID, "negotiate structured replies first");
      return;
    }
    let request;
    try {
      request = decodeMetaContextRequest(data);
    } catch (error) {
      await this.#optionError(option, NbdRep.ERR_INVALID, messageOf(error));
      return;
    }
    const found = this.#core.find(request.exportName);
    if (found === undefined) {
      await this.#optionError(
        option,
        NbdRep.ERR_UNKNOWN,
        `export "${request.exportName}" not found`,
      );
      return;
    }
    const allocation = NbdMetaContext.BASE_ALLOCATION;
    const offered = typeof found.handler.blockStatus === "function";
    // "base:" lists every base context, but selects nothing (doc/proto.md).
    const match = set ? request.queries.includes(allocation) : request.queries.length === 0 ||
      request.queries.some((query) => query === "base:" || query === allocation);
    const replies: Uint8Array[] = [];
    if (offered && match) {
      replies.push(
        encodeOptionReply(
          option,
          NbdRep.META_CONTEXT,
          encodeMetaContextReply(set ? 1 : 0, allocation),
        ),
      );
      if (set) this.#metaExport = found;
    }
    replies.push(encodeOptionReply(option, NbdRep.ACK));
    await this.#writer.send(replies);
  }

  #transmissionFlags(handler: NbdExportHandler): number {
    const F = NbdTransmissionFlag;
    const writable = typeof handler.write === "function" && handler.readOnly !== true;
    let flags = F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_CACHE;
    if (!writable) flags |= F.READ_ONLY;
    else {
      flags |= F.SEND_FUA;
      if (typeof handler.trim === "function") flags |= F.SEND_TRIM;
      if (typeof handler.writeZeroes === "function") flags |= F.SEND_WRITE_ZEROES;
    }
    if (this.#structured && typeof handler.read === "function") flags |= F.SEND_DF;
    if (handler.multiConn ?? !writable) flags |= F.CAN_MULTI_CONN;
    return flags;
  }

  #enter(found: NamedExport): void {
    this.#export = found;
    this.#writable = typeof found.handler.write === "function" && found.handler.readOnly !== true;
    this.#contextSelected = this.#metaExport === found;
    const traits = [
      `${found.handler.size} bytes`,
      this.#writable ? "writable" : "read-only",
      this.#structured ? "structured replies" : "simple replies",
      ...(this.#contextSelected ? [NbdMetaContext.BASE_ALLOCATION] : []),
    ];
    this.#core.log(`connection ${this.id}: export "${found.name}" (${traits.join(", ")})`);
  }

  // -------------------------------------------------------------------------------------
  // Transmission

  /** Reads requests until DISC or EOF; how the client left. */
  async #transmission(): Promise<string> {
    for (;;) {
      const header = await this.#reader.bytes(NBD_REQUEST_SIZE, true);
      if (header === null) {
        this.#abort.abort(new Error("The client disconnected"));
        return "the client disconnected";
      }
      const request = decodeRequest(header);
      this.#requests++;
      this.#core.trace({ type: "request", connection: this.id, request });
      if (request.type === NbdCmd.DISC) {
        await Promise.race([this.#idle(), this.#stopped.promise]); // answer everything first
        return "NBD_CMD_DISC";
      }
      const bytes = request.type === NbdCmd.READ || request.type === NbdCmd.WRITE
        ? request.length
        : 0;
      await this.#slot(bytes);
      const pending: Pending = { bytes, replied: false, request, after: [] };
      this.#pending.add(pending);
      this.#pendingBytes += bytes;
      const problem = this.#check(request);
      if (problem !== undefined) {
        if (request.type === NbdCmd.WRITE) await this.#reader.skip(request.length);
        void this.#complete(pending, () => this.#errorReply(request, ...problem));
      } else if (request.type === NbdCmd.WRITE) {
        await this.#write(pending);
      } else {
        void this.#complete(pending, () => this.#execute(request, pending));
      }
    }
  }

  /** Waits until one more request of `bytes` fits the limits of the connection. */
  async #slot(bytes: number): Promise<void> {
    const { maxInFlight, maxInFlightBytes } = this.#core.options;
    while (
      this.#pending.size >= maxInFlight ||
      (this.#pending.size > 0 && this.#pendingBytes + bytes > maxInFlightBytes)
    ) {
      await Promise.race([
        new Promise<void>((resolve) => this.#wake = resolve),
        this.#stopped.promise,
      ]);
    }
  }

  /** Resolves when no request is pending. */
  async #idle(): Promise<void> {
    while (this.#pending.size > 0) await new Promise<void>((resolve) => this.#wake = resolve);
  }

  /** The errno and message for a request the export must not see, or undefined. */
  #check(request: NbdRequest): [number, string] | undefined {
    const { type, flags, offset, length } = request;
    const { handler, sizes } = this.#export!;
    const name = nbdCommandName(type);
    const allowed = ALLOWED_FLAGS[type];
    if (allowed === undefined) return [NbdErrno.EINVAL, `${name} is not a known command`];
    const dfWithout = (flags & NbdCmdFlag.DF) !== 0 && !this.#structured;
    if ((flags & ~allowed) !== 0 || dfWithout) {
      return [NbdErrno.EINVAL, `flags 0x${flags.toString(16)} are not valid for ${name}`];
    }
    const writes = type === NbdCmd.WRITE || type === NbdCmd.WRITE_ZEROES || type === NbdCmd.TRIM;
    if (writes && !this.#writable) return [NbdErrno.EPERM, "the export is read-only"];
    if (type === NbdCmd.READ && typeof handler.read !== "function") {
      return [NbdErrno.EINVAL, "the export cannot be read"];
    }
    if (
      (type === NbdCmd.WRITE_ZEROES && typeof handler.writeZeroes !== "function") ||
      (type === NbdCmd.TRIM && typeof handler.trim !== "function")
    ) return [NbdErrno.EINVAL, `the export does not support ${name}`];
    if (type === NbdCmd.BLOCK_STATUS) {
      if (!this.#contextSelected) return [NbdErrno.EINVAL, "no metadata context is selected"];
      if (length === 0) return [NbdErrno.EINVAL, "a block status of 0 bytes"];
    }
    if (type === NbdCmd.FLUSH) return undefined; // offset and length are reserved
    const size = handler.size;
    if (offset + length > size) {
      const errno = type === NbdCmd.WRITE || type === NbdCmd.WRITE_ZEROES
        ? NbdErrno.ENOSPC
        : NbdErrno.EINVAL;
      return [errno, `${offset}+${length} is past the end of the ${size}-byte export`];
    }
    const min = sizes.minimum;
    if (offset % min !== 0 || (length % min !== 0 && offset + length !== size)) {
      return [NbdErrno.EINVAL, `${offset}+${length} is not aligned to ${min} bytes`];
    }
    const bounded = type === NbdCmd.READ || type === NbdCmd.WRITE || type === NbdCmd.CACHE ||
      type === NbdCmd.WRITE_ZEROES;
    if (bounded && length > sizes.maximum) {
      return [NbdErrno.EINVAL, `${length} bytes is more than the maximum of ${sizes.maximum}`];
    }
    if (writes) {
      if (offset < this.#highest) this.#core.stats.outOfOrder++;
      this.#highest = Math.max(this.#highest, offset + length);
    }
    return undefined;
  }

  #context(request: NbdRequest, pending: Pending): NbdRequestContext {
    return {
      signal: this.#abort.signal,
      flags: request.flags,
      connection: this.id,
      afterReply: (callback) => void pending.after.push(callback),
    };
  }

  /** Runs a valid request other than WRITE; the reply. */
  async #execute(request: NbdRequest, pending: Pending): Promise<Uint8Array[]> {
    const { type, flags, cookie, offset, length } = request;
    const { handler } = this.#export!;
    const { stats } = this.#core;
    const context = this.#context(request, pending);
    const fua = async () => {
      if ((flags & NbdCmdFlag.FUA) !== 0) await handler.flush?.(context);
    };
    switch (type) {
      case NbdCmd.READ:
        return await this.#read(request, context);
      case NbdCmd.BLOCK_STATUS:
        return await this.#blockStatus(request, context);
      case NbdCmd.WRITE_ZEROES:
        if (length > 0) await handler.writeZeroes!(offset, length, context);
        await fua();
        stats.writeZeroes++;
        break;
      case NbdCmd.TRIM:
        if (length > 0) await handler.trim!(offset, length, context);
        await fua();
        stats.trims++;
        break;
      case NbdCmd.FLUSH:
        await handler.flush?.(context);
        stats.flushes++;
        break;
      case NbdCmd.CACHE:
        if (length > 0) await handler.cache?.(offset, length, context);
        break;
    }
    return [encodeSimpleReply(0, cookie)];
  }

  /** A WRITE: returns once its payload is off the socket; the reply follows on its own. */
  async #write(pending: Pending): Promise<void> {
    const { request } = pending;
    const { flags, offset, length } = request;
    const { handler } = this.#export!;
    const context = this.#context(request, pending);
    // An object, so that the checks below see what read() did meanwhile.
    const payloadState: { now: "waiting" | "reading" | "read" | "gone" } = { now: "waiting" };
    const payload = Promise.withResolvers<void>();
    payload.promise.catch(() => {});
    const read = async (target: Uint8Array) => {
      if (payloadState.now !== "waiting") {
        throw new Error("Cannot read the data of NBD_CMD_WRITE: It was read already");
      }
      if (target.byteLength !== length) {
        throw new RangeError(
          `Cannot read the data of NBD_CMD_WRITE: The target holds ${target.byteLength} bytes, not ${length}`,
        );
      }
      payloadState.now = "reading";
      try {
        await this.#reader.readInto(target);
        payloadState.now = "read";
        payload.resolve();
      } catch (error) {
        payload.reject(error);
        throw error;
      }
    };
    const task = (async () => {
      if (length > 0) await handler.write!(offset, length, read, context);
      if (payloadState.now === "waiting" && length > 0) {
        throw new Error("The export did not read the data of the write");
      }
      if ((flags & NbdCmdFlag.FUA) !== 0) await handler.flush?.(context);
      this.#core.stats.writes++;
      this.#core.stats.bytesWritten += length;
      return [encodeSimpleReply(0, request.cookie)];
    })();
    void this.#complete(pending, () => task);
    await Promise.race([payload.promise, task.then(() => {}, () => {}), this.#stopped.promise]);
    if (payloadState.now === "reading") {
      await Promise.race([payload.promise, this.#stopped.promise]);
    } else if (payloadState.now === "waiting") {
      payloadState.now = "gone"; // a late read() fails instead of stealing the next request's bytes
      await this.#reader.skip(length);
    }
  }

  async #read(request: NbdRequest, context: NbdRequestContext): Promise<Uint8Array[]> {
    const { flags, cookie, offset, length } = request;
    const { handler, sizes } = this.#export!;
    if (length === 0) {
      return this.#structured
        ? [
          encodeChunkHeader({
            flags: NbdReplyFlag.DONE,
            type: NbdReplyType.NONE,
            cookie,
            length: 0,
          }),
        ]
        : [encodeSimpleReply(0, cookie)];
    }
    const result = await handler.read!(offset, length, context);
    let chunks: readonly NbdReadChunk[];
    if (result instanceof Uint8Array) {
      if (result.byteLength !== length) {
        throw new Error(`The export returned ${result.byteLength} bytes for a ${length}-byte read`);
      }
      chunks = !this.#structured || (flags & NbdCmdFlag.DF) !== 0
        ? [{ type: "data", offset, data: result }]
        : zeroRuns(result, offset, Math.max(HOLE_GRANULARITY, sizes.minimum));
    } else {
      chunks = result;
      checkChunks(chunks, offset, length);
    }
    this.#core.stats.reads++;
    this.#core.stats.bytesRead += length;
    if (!this.#structured) return [encodeSimpleReply(0, cookie), ...flatten(chunks)];
    if ((flags & NbdCmdFlag.DF) !== 0) {
      const header = encodeChunkHeader({
        flags: NbdReplyFlag.DONE,
        type: NbdReplyType.OFFSET_DATA,
        cookie,
        length: 8 + length,
      });
      return [header, encodeOffsetDataPrefix(offset), ...flatten(chunks)];
    }
    const parts: Uint8Array[] = [];
    chunks.forEach((chunk, index) => {
      const done = index === chunks.length - 1 ? NbdReplyFlag.DONE : 0;
      if (chunk.type === "hole") {
        parts.push(
          encodeChunkHeader({ flags: done, type: NbdReplyType.OFFSET_HOLE, cookie, length: 12 }),
          encodeOffsetHole({ offset: chunk.offset, size: chunk.length }),
        );
      } else {
        parts.push(
          encodeChunkHeader({
            flags: done,
            type: NbdReplyType.OFFSET_DATA,
            cookie,
            length: 8 + chunk.data.byteLength,
          }),
          encodeOffsetDataPrefix(chunk.offset),
          chunk.data,
        );
      }
    });
    return parts;
  }

  async #blockStatus(request: NbdRequest, context: NbdRequestContext): Promise<Uint8Array[]> {
    const { flags, cookie, offset, length } = request;
    const reqOne = (flags & NbdCmdFlag.REQ_ONE) !== 0;
    const maxExtents = reqOne ? 1 : this.#core.options.maxExtents;
    const extents = await this.#export!.handler.blockStatus!(offset, length, {
      ...context,
      maxExtents,
    });
    const descriptors: NbdBlockDescriptor[] = [];
    const end = offset + length;
    for (let i = 0, at = offset; i < extents.length && at < end; i++) {
      const extent = extents[i]!;
      if (
        !Number.isSafeInteger(extent.length) || extent.length <= 0 ||
        !Number.isInteger(extent.flags) || extent.flags < 0 || extent.flags > 0xffffffff
      ) {
        throw new Error(`The export reported an invalid extent ${JSON.stringify(extent)}`);
      }
      const take = Math.min(extent.length, end - at); // clip: the client asked for less
      const last = descriptors[descriptors.length - 1];
      if (last !== undefined && last.flags === extent.flags) last.length += take;
      else if (descriptors.length === maxExtents) break;
      else descriptors.push({ length: take, flags: extent.flags });
      at += take;
    }
    if (descriptors.length === 0) throw new Error("The export reported no extents");
    this.#core.stats.blockStatus++;
    const payload = encodeBlockStatusChunk({ contextId: 1, descriptors });
    return [
      encodeChunkHeader({
        flags: NbdReplyFlag.DONE,
        type: NbdReplyType.BLOCK_STATUS,
        cookie,
        length: payload.byteLength,
      }),
      payload,
    ];
  }

  /** Sends the reply `produce` makes (an error reply when it throws) and frees the slot. */
  async #complete(pending: Pending, produce: () => Uint8Array[] | Promise<Uint8Array[]>) {
    let parts: Uint8Array[];
    try {
      parts = await produce();
    } catch (error) {
      parts = this.#handlerFailed(pending.request, error);
    }
    try {
      if (!pending.replied) {
        pending.replied = true;
        await this.#writer.send(parts);
      }
    } catch {
      closeQuietly(this.#conn); // the socket failed: the reading loop ends the connection
    } finally {
      for (const callback of pending.after.splice(0)) {
        try {
          callback();
        } catch { /* a handler's callback cannot break the connection */ }
      }
      this.#pending.delete(pending);
      this.#pendingBytes -= pending.bytes;
      const wake = this.#wake;
      this.#wake = undefined;
      wake?.();
    }
  }

  #handlerFailed(request: NbdRequest, error: unknown): Uint8Array[] {
    const errno = error instanceof NbdError && error.code !== undefined && error.code > 0
      ? error.code
      : NbdErrno.EIO;
    const message = messageOf(error);
    this.#core.stats.errors++;
    if (!this.#abort.signal.aborted) {
      this.#core.log(
        `connection ${this.id}: ${nbdCommandName(request.type)} of ${request.length} bytes at ` +
          `${request.offset} failed with ${nbdErrnoName(errno)}: ${message}`,
      );
    }
    return this.#errorReply(request, errno, message);
  }

  #errorReply(request: NbdRequest, errno: number, message: string): Uint8Array[] {
    const { cookie } = request;
    if (!this.#structured) return [encodeSimpleReply(errno, cookie)];
    const payload = encodeErrorChunk({ error: errno, message: truncate(message) });
    return [
      encodeChunkHeader({
        flags: NbdReplyFlag.DONE,
        type: NbdReplyType.ERROR,
        cookie,
        length: payload.byteLength,
      }),
      payload,
    ];
  }
}

// ---------------------------------------------------------------------------------------
// Reading chunks

/** Splits `data` (at absolute `offset`) into data and hole chunks at `granularity`. */
function zeroRuns(data: Uint8Array, offset: number, granularity: number): NbdReadChunk[] {
  const chunks: NbdReadChunk[] = [];
  const end = offset + data.byteLength;
  let runStart = offset;
  let runZero: boolean | undefined;
  for (let at = offset; at < end;) {
    const stop = Math.min(end, (Math.floor(at / granularity) + 1) * granularity);
    const zero = isZeroRange(data, at - offset, stop - at);
    if (runZero !== undefined && zero !== runZero) {
      chunks.push(chunkOf(data, offset, runStart, at, runZero));
      runStart = at;
    }
    runZero = zero;
    at = stop;
  }
  chunks.push(chunkOf(data, offset, runStart, end, runZero!));
  return chunks;
}

function chunkOf(data: Uint8Array, base: number, start: number, end: number, zero: boolean) {
  return zero
    ? { type: "hole" as const, offset: start, length: end - start }
    : { type: "data" as const, offset: start, data: data.subarray(start - base, end - base) };
}

/** Checks that `chunks` cover [offset, offset + length) exactly once. */
function checkChunks(chunks: readonly NbdReadChunk[], offset: number, length: number): void {
  const sorted = [...chunks].sort((a, b) => a.offset - b.offset);
  let at = offset;
  for (const chunk of sorted) {
    const size = chunk.type === "data" ? chunk.data.byteLength : chunk.length;
    if (chunk.offset !== at || !(size > 0) || !Number.isSafeInteger(size)) {
      throw new Error(
        `The export's read chunks do not cover ${offset}+${length} exactly once (at ${at})`,
      );
    }
    at += size;
  }
  if (at !== offset + length) {
    throw new Error(`The export's read chunks end at ${at}, not at ${offset + length}`);
  }
}

const ZEROS = new Uint8Array(MiB);

/** The bytes of `chunks` in offset order: holes as views of a shared zero buffer. */
function flatten(chunks: readonly NbdReadChunk[]): Uint8Array[] {
  const parts: Uint8Array[] = [];
  for (const chunk of [...chunks].sort((a, b) => a.offset - b.offset)) {
    if (chunk.type === "data") {
      parts.push(chunk.data);
      continue;
    }
    for (let left = chunk.length; left > 0; left -= ZEROS.byteLength) {
      parts.push(ZEROS.subarray(0, Math.min(left, ZEROS.byteLength)));
    }
  }
  return parts;
}

// ---------------------------------------------------------------------------------------
// Socket helpers

/** Exact reads from a socket through one reused buffer. */
class SocketReader {
  #conn: Deno.Conn;
  #buffer = new Uint8Array(64 * 1024);
  #start = 0;
  #end = 0;

  constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  /** Reads exactly `length` bytes (at most 64 KiB) as a view valid until the next read. */
  bytes(length: number, eofOk: true): Promise<Uint8Array | null>;
  bytes(length: number): Promise<Uint8Array>;
  async bytes(length: number, eofOk = false): Promise<Uint8Array | null> {
    while (this.#end - this.#start < length) {
      if (this.#start > 0) {
        this.#buffer.copyWithin(0, this.#start, this.#end);
        this.#end -= this.#start;
        this.#start = 0;
      }
      const count = await this.#conn.read(this.#buffer.subarray(this.#end));
      if (count === null) {
        if (eofOk && this.#end === this.#start) return null;
        throw new Deno.errors.UnexpectedEof("the client closed the connection mid-message");
      }
      this.#end += count;
    }
    const view = this.#buffer.subarray(this.#start, this.#start + length);
    this.#start += length;
    return view;
  }

  /** Fills `target` with the next bytes: buffered ones first, the rest straight from the socket. */
  async readInto(target: Uint8Array): Promise<void> {
    const buffered = Math.min(this.#end - this.#start, target.byteLength);
    target.set(this.#buffer.subarray(this.#start, this.#start + buffered));
    this.#start += buffered;
    for (let filled = buffered; filled < target.byteLength;) {
      const count = await this.#conn.read(target.subarray(filled));
      if (count === null) {
        throw new Deno.errors.UnexpectedEof("the client closed the connection mid-write");
      }
      filled += count;
    }
  }

  /** Reads and drops `length` bytes. */
  async skip(length: number): Promise<void> {
    for (let left = length; left > 0;) {
      const step = Math.min(left, this.#buffer.byteLength);
      await this.bytes(step);
      left -= step;
    }
  }
}

/**
 * Serialized writes of whole replies: small parts are gathered into one 64 KiB buffer (one
 * write for headers and holes), large ones go straight to the socket. After a failed write
 * the stream is broken and every later send fails.
 */
class ReplyWriter {
  #conn: Deno.Conn;
  #staging = new Uint8Array(64 * 1024);
  #queue: Promise<void> = Promise.resolve();
  #failure: unknown;

  constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  send(parts: readonly Uint8Array[]): Promise<void> {
    const sent = this.#queue.then(() => this.#write(parts));
    this.#queue = sent.catch(() => {});
    return sent;
  }

  async #write(parts: readonly Uint8Array[]): Promise<void> {
    if (this.#failure !== undefined) throw this.#failure;
    const staging = this.#staging;
    let used = 0;
    try {
      for (const part of parts) {
        if (part.byteLength > 16384) {
          if (used > 0) await writeAll(this.#conn, staging.subarray(0, used));
          used = 0;
          await writeAll(this.#conn, part);
          continue;
        }
        if (used + part.byteLength > staging.byteLength) {
          await writeAll(this.#conn, staging.subarray(0, used));
          used = 0;
        }
        staging.set(part, used);
        used += part.byteLength;
      }
      if (used > 0) await writeAll(this.#conn, staging.subarray(0, used));
    } catch (error) {
      this.#failure = error;
      throw error;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Checks and small helpers

function resolveOptions(options: NbdServerOptions): ResolvedOptions {
  const positive = (value: number | undefined, fallback: number, what: string) => {
    const result = value ?? fallback;
    if (!Number.isSafeInteger(result) || result < 1) {
      throw new RangeError(`Cannot serve NBD: ${what} ${result} is not a positive integer`);
    }
    return result;
  };
  return {
    blockSizes: options.blockSizes ?? DEFAULT_BLOCK_SIZES,
    defaultExport: options.defaultExport,
    structuredReplies: options.structuredReplies ?? true,
    unsupportedOptions: new Set(options.unsupportedOptions ?? []),
    maxConnections: positive(options.maxConnections, 16, "maxConnections"),
    maxInFlight: positive(options.maxInFlight, 16, "maxInFlight"),
    maxInFlightBytes: positive(options.maxInFlightBytes, 8 * MiB, "maxInFlightBytes"),
    maxExtents: positive(options.maxExtents, 16384, "maxExtents"),
    handshakeTimeoutMs: positive(options.handshakeTimeoutMs, 10_000, "handshakeTimeoutMs"),
    logger: options.logger,
    trace: options.trace,
  };
}

function checkExport(
  name: string,
  handler: NbdExportHandler,
  options: ResolvedOptions,
): NamedExport {
  const what = `Cannot serve NBD export "${name}"`;
  if (new TextEncoder().encode(name).byteLength > NBD_MAX_STRING_LENGTH) {
    throw new RangeError(`${what}: The name is longer than ${NBD_MAX_STRING_LENGTH} bytes`);
  }
  const { size } = handler;
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new RangeError(`${what}: Its size ${size} is not a byte count`);
  }
  const sizes = handler.blockSizes ?? options.blockSizes;
  const { minimum, preferred, maximum } = sizes;
  const powerOfTwo = (value: number) =>
    Number.isInteger(value) && value > 0 &&
    (value & (value - 1)) === 0;
  if (
    !powerOfTwo(minimum) || minimum > 65536 || !powerOfTwo(preferred) ||
    preferred < Math.max(minimum, 512) || !Number.isInteger(maximum) || maximum % minimum !== 0 ||
    maximum < Math.min(preferred, Math.max(size, minimum)) || maximum > 2 ** 31
  ) {
    throw new RangeError(
      `${what}: Block sizes ${minimum}, ${preferred}, ${maximum} break the rules of NBD_INFO_BLOCK_SIZE`,
    );
  }
  return { name, handler, sizes };
}

function describePeer(conn: Deno.Conn): string {
  const address = conn.remoteAddr;
  if (address.transport === "tcp" || address.transport === "udp") {
    return ` from ${address.hostname}:${address.port}`;
  }
  return " on the unix socket";
}

function encodeMessage(message: string): Uint8Array {
  return new TextEncoder().encode(truncate(message));
}

/** Cuts a message to what fits an NBD string. */
function truncate(message: string): string {
  const encoder = new TextEncoder();
  if (encoder.encode(message).byteLength <= NBD_MAX_STRING_LENGTH) return message;
  let cut = message.slice(0, NBD_MAX_STRING_LENGTH / 4);
  while (encoder.encode(cut).byteLength > NBD_MAX_STRING_LENGTH - 3) cut = cut.slice(0, -1);
  return `${cut}...`;
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch { /* already closed */ }
}
