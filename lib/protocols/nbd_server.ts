// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A small NBD server for write-only exports: the target QEMU's backup job pushes into.
 *
 * @module
 */
import { writeAll } from "../_io.ts";
import {
  decodeExportInfoRequest,
  decodeOptionHeader,
  decodeRequest,
  encodeExportNameReply,
  encodeHandshake,
  encodeInfoReply,
  encodeOptionReply,
  encodeSimpleReply,
  NBD_OPTION_HEADER_SIZE,
  NBD_REQUEST_SIZE,
  NbdClientFlag,
  NbdCmd,
  NbdErrno,
  NbdHandshakeFlag,
  NbdOpt,
  NbdRep,
  NbdTransmissionFlag,
} from "./nbd_protocol.ts";

const TRANSMISSION_FLAGS = NbdTransmissionFlag.HAS_FLAGS | NbdTransmissionFlag.SEND_FLUSH |
  NbdTransmissionFlag.SEND_FUA | NbdTransmissionFlag.SEND_TRIM |
  NbdTransmissionFlag.SEND_WRITE_ZEROES;
const MAX_OPTION_LENGTH = 65536;

const DEFAULT_BLOCK_SIZES = { minimum: 4096, preferred: 65536, maximum: 4 << 20 };

/** What an export does with the requests of a client. Throwing answers the request with EIO. */
export interface NbdExportHandler {
  /** Export size in bytes. */
  readonly size: number;
  /** Handles a WRITE: call `read(target)` once, with a buffer of `length` bytes, to get the data. */
  write(
    offset: number,
    length: number,
    read: (target: Uint8Array) => Promise<void>,
  ): Promise<void>;
  /** Handles WRITE_ZEROES. */
  writeZeroes(offset: number, length: number): Promise<void>;
  /** Handles TRIM (a hint: the range may read as anything). */
  trim(offset: number, length: number): Promise<void>;
  /** Handles FLUSH. */
  flush(): Promise<void>;
}

/** Options of {@linkcode NbdServer.listen}. */
export interface NbdServerOptions {
  /** Export name clients must ask for (default: any name). */
  exportName?: string;
  /** Block sizes to advertise: minimum, preferred and maximum payload. */
  blockSizes?: { minimum: number; preferred: number; maximum: number };
}

/** Counters of a server. */
export interface NbdServerStats {
  /** WRITE requests. */
  writes: number;
  /** WRITE_ZEROES requests. */
  writeZeroes: number;
  /** TRIM requests. */
  trims: number;
  /** FLUSH requests. */
  flushes: number;
  /** Payload bytes of WRITE requests. */
  bytesWritten: number;
  /** Requests below the highest offset written so far: copy-before-write at work. */
  outOfOrder: number;
  /** Requests whose handler failed (answered with EIO). */
  errors: number;
}

/**
 * Serves one write-only export on a unix socket, one client at a time: the fixed newstyle
 * handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`), then
 * WRITE, WRITE_ZEROES, TRIM, FLUSH and DISC with simple replies; READ is refused with EINVAL.
 * Each request is answered only after the handler finished it, so a slow handler slows
 * the client down instead of filling memory.
 *
 * @example Serve an export that counts written bytes
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdServer } from "./nbd_server.ts";
 *
 * const dir = await Deno.makeTempDir();
 * let total = 0;
 * const server = NbdServer.listen(`${dir}/target.sock`, {
 *   size: 1 << 30,
 *   async write(_offset, length, read) {
 *     await read(new Uint8Array(length));
 *     total += length;
 *   },
 *   async writeZeroes() {},
 *   async trim() {},
 *   async flush() {},
 * });
 * // A client such as `qemu-img convert -n -O raw disk.qcow2 "nbd+unix:///?socket=…"` writes
 * // into it now; close() stops listening and waits for the connection to end.
 * await server.close();
 * assert.equal(total, server.stats.bytesWritten);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export class NbdServer {
  /** Path of the unix socket. */
  readonly path: string;
  /** Counters so far. */
  readonly stats: NbdServerStats = {
    writes: 0,
    writeZeroes: 0,
    trims: 0,
    flushes: 0,
    bytesWritten: 0,
    outOfOrder: 0,
    errors: 0,
  };
  #listener: Deno.UnixListener;
  #handler: NbdExportHandler;
  #options: NbdServerOptions;
  #connection: Deno.UnixConn | undefined;
  #serving: Promise<void>;
  #highest = 0;
  #disconnected = Promise.withResolvers<void>();

  private constructor(path: string, handler: NbdExportHandler, options: NbdServerOptions) {
    this.path = path;
    this.#handler = handler;
    this.#options = options;
    this.#listener = Deno.listen({ transport: "unix", path });
    this.#serving = this.#acceptLoop();
  }

  /** Starts serving `handler` on a new unix socket at `path`. */
  static listen(
    path: string,
    handler: NbdExportHandler,
    options: NbdServerOptions = {},
  ): NbdServer {
    return new NbdServer(path, handler, options);
  }

  /** Resolves when a client disconnected after entering transmission (DISC or EOF). */
  get disconnected(): Promise<void> {
    return this.#disconnected.promise;
  }

  /** Stops listening and drops the current client. */
  async close(): Promise<void> {
    try {
      this.#listener.close();
    } catch { /* already closed */ }
    try {
      this.#connection?.close();
    } catch { /* already closed */ }
    await this.#serving;
    await Deno.remove(this.path).catch(() => {});
  }

  async #acceptLoop(): Promise<void> {
    for (;;) {
      let connection: Deno.UnixConn;
      try {
        connection = await this.#listener.accept();
      } catch {
        return; // the listener was closed
      }
      this.#connection = connection;
      try {
        await this.#serve(new SocketReader(connection), connection);
      } catch {
        // A protocol error or a dropped client: wait for the next one.
      } finally {
        try {
          connection.close();
        } catch { /* already closed */ }
        this.#connection = undefined;
      }
    }
  }

  async #serve(reader: SocketReader, connection: Deno.UnixConn): Promise<void> {
    const flags = NbdHandshakeFlag.FIXED_NEWSTYLE | NbdHandshakeFlag.NO_ZEROES;
    await writeAll(connection, encodeHandshake(flags));
    const clientFlags = (await reader.read(4)).getUint32(0);
    if (!await this.#negotiate(reader, connection, clientFlags)) return;
    try {
      await this.#transmission(reader, connection);
    } finally {
      this.#disconnected.resolve();
    }
  }

  /** The option haggling; true when the client entered transmission. */
  async #negotiate(reader: SocketReader, connection: Deno.UnixConn, clientFlags: number) {
    const reply = (option: number, type: number, data?: Uint8Array) =>
      writeAll(connection, encodeOptionReply(option, type, data));
    for (;;) {
      const { option, length } = decodeOptionHeader(await reader.bytes(NBD_OPTION_HEADER_SIZE));
      if (length > MAX_OPTION_LENGTH) throw new Error("option too long");
      const data = (await reader.bytes(length)).slice();
      if (option === NbdOpt.GO || option === NbdOpt.INFO) {
        const wanted = this.#options.exportName;
        if (wanted !== undefined && decodeExportInfoRequest(data).exportName !== wanted) {
          await reply(option, NbdRep.ERR_UNKNOWN);
          continue;
        }
        const sizes = this.#options.blockSizes ?? DEFAULT_BLOCK_SIZES;
        const size = this.#handler.size;
        await reply(
          option,
          NbdRep.INFO,
          encodeInfoReply({ type: "export", size, flags: TRANSMISSION_FLAGS }),
        );
        await reply(option, NbdRep.INFO, encodeInfoReply({ type: "block-size", ...sizes }));
        await reply(option, NbdRep.ACK);
        if (option === NbdOpt.GO) return true;
      } else if (option === NbdOpt.EXPORT_NAME) {
        const noZeroes = (clientFlags & NbdClientFlag.NO_ZEROES) !== 0;
        await writeAll(
          connection,
          encodeExportNameReply(this.#handler.size, TRANSMISSION_FLAGS, noZeroes),
        );
        return true;
      } else if (option === NbdOpt.ABORT) {
        await reply(option, NbdRep.ACK);
        return false;
      } else {
        await reply(option, NbdRep.ERR_UNSUP);
      }
    }
  }

  async #transmission(reader: SocketReader, connection: Deno.UnixConn): Promise<void> {
    const maximum = (this.#options.blockSizes ?? DEFAULT_BLOCK_SIZES).maximum;
    for (;;) {
      const header = await reader.bytes(NBD_REQUEST_SIZE, true);
      if (header === null) return; // EOF between requests: the client went away
      const { type, cookie, offset, length } = decodeRequest(header);
      if (type === NbdCmd.DISC) return;
      let error = 0;
      if (type === NbdCmd.WRITE) {
        if (length > maximum) throw new Error("write larger than the maximum block size");
        let consumed = false;
        const read = async (target: Uint8Array) => {
          if (consumed || target.byteLength !== length) throw new Error("payload read twice");
          consumed = true;
          await reader.readInto(target);
        };
        error = await this.#run(offset, length, () => this.#handler.write(offset, length, read));
        if (!consumed) await reader.skip(length); // the handler failed before reading
        this.stats.writes++;
        this.stats.bytesWritten += length;
      } else if (type === NbdCmd.WRITE_ZEROES) {
        error = await this.#run(offset, length, () => this.#handler.writeZeroes(offset, length));
        this.stats.writeZeroes++;
      } else if (type === NbdCmd.TRIM) {
        error = await this.#run(offset, length, () => this.#handler.trim(offset, length));
        this.stats.trims++;
      } else if (type === NbdCmd.FLUSH) {
        error = await this.#run(0, 0, () => this.#handler.flush());
        this.stats.flushes++;
      } else {
        error = NbdErrno.EINVAL; // READ and anything else: a write-only sink
      }
      if (type === NbdCmd.WRITE || type === NbdCmd.WRITE_ZEROES || type === NbdCmd.TRIM) {
        if (offset < this.#highest) this.stats.outOfOrder++;
        this.#highest = Math.max(this.#highest, offset + length);
      }
      await writeAll(connection, encodeSimpleReply(error, cookie));
    }
  }

  async #run(offset: number, length: number, action: () => Promise<void>): Promise<number> {
    if (offset + length > this.#handler.size) return NbdErrno.EINVAL;
    try {
      await action();
      return 0;
    } catch {
      this.stats.errors++;
      return NbdErrno.EIO;
    }
  }
}

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
        throw new Deno.errors.UnexpectedEof("the client closed the connection");
      }
      this.#end += count;
    }
    const view = this.#buffer.subarray(this.#start, this.#start + length);
    this.#start += length;
    return view;
  }

  /** Reads exactly `length` bytes as a DataView valid until the next read. */
  async read(length: number): Promise<DataView> {
    const bytes = await this.bytes(length);
    return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  /** Fills `target` with the next bytes: buffered ones first, the rest straight from the socket. */
  async readInto(target: Uint8Array): Promise<void> {
    const buffered = Math.min(this.#end - this.#start, target.byteLength);
    target.set(this.#buffer.subarray(this.#start, this.#start + buffered));
    this.#start += buffered;
    for (let filled = buffered; filled < target.byteLength;) {
      const count = await this.#conn.read(target.subarray(filled));
      if (count === null) throw new Deno.errors.UnexpectedEof("the client closed the connection");
      filled += count;
    }
  }

  async skip(length: number): Promise<void> {
    const scratch = new Uint8Array(Math.min(length, 1 << 20));
    for (let left = length; left > 0; left -= scratch.byteLength) {
      await this.readInto(scratch.subarray(0, Math.min(left, scratch.byteLength)));
    }
  }
}
