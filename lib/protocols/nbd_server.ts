// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A small NBD server for write-only exports: the target QEMU's backup job pushes into.
 *
 * @module
 */

const NBD_MAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;

const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;
const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_INFO = 6;
const OPT_GO = 7;
const REP_ACK = 1;
const REP_INFO = 3;
const REP_ERR_UNSUP = 2 ** 31 + 1;
const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;
const TRANSMISSION_FLAGS = 1 | 4 | 8 | 32 | 64; // HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_TRIM = 4;
const CMD_WRITE_ZEROES = 6;
const EIO = 5;
const EINVAL = 22;
const MAX_OPTION_LENGTH = 65536;

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
  writes: number;
  writeZeroes: number;
  trims: number;
  flushes: number;
  bytesWritten: number;
  /** Requests below the highest offset written so far: copy-before-write at work. */
  outOfOrder: number;
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
 * ```ts ignore
 * import { NbdServer } from "./nbd_server.ts";
 *
 * let total = 0;
 * const server = NbdServer.listen("/tmp/target.sock", {
 *   size: 1 << 30,
 *   async write(_offset, length, read) { await read(new Uint8Array(length)); total += length; },
 *   async writeZeroes() {},
 *   async trim() {},
 *   async flush() {},
 * });
 * await server.finished; // after the client disconnected and close() was called
 * ```
 */
export class NbdServer {
  readonly path: string;
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
    const greeting = new DataView(new ArrayBuffer(18));
    greeting.setBigUint64(0, NBD_MAGIC);
    greeting.setBigUint64(8, IHAVEOPT);
    greeting.setUint16(16, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    await writeAll(connection, new Uint8Array(greeting.buffer));
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
    const reply = async (option: number, type: number, data = new Uint8Array(0)) => {
      const header = new DataView(new ArrayBuffer(20));
      header.setBigUint64(0, OPTION_REPLY_MAGIC);
      header.setUint32(8, option);
      header.setUint32(12, type);
      header.setUint32(16, data.byteLength);
      await writeAll(connection, concat(new Uint8Array(header.buffer), data));
    };
    for (;;) {
      const header = await reader.read(16);
      if (header.getBigUint64(0) !== IHAVEOPT) throw new Error("bad option magic");
      const option = header.getUint32(8);
      const length = header.getUint32(12);
      if (length > MAX_OPTION_LENGTH) throw new Error("option too long");
      const data = length > 0
        ? new Uint8Array((await reader.read(length)).buffer.slice(0))
        : new Uint8Array(0);
      if (option === OPT_GO || option === OPT_INFO) {
        if (!this.#exportMatches(data, 4)) {
          await reply(option, 2 ** 31 + 6); // NBD_REP_ERR_UNKNOWN
          continue;
        }
        const info = new DataView(new ArrayBuffer(12));
        info.setUint16(0, INFO_EXPORT);
        info.setBigUint64(2, BigInt(this.#handler.size));
        info.setUint16(10, TRANSMISSION_FLAGS);
        await reply(option, REP_INFO, new Uint8Array(info.buffer));
        const sizes = this.#options.blockSizes ??
          { minimum: 4096, preferred: 65536, maximum: 4 << 20 };
        const blocks = new DataView(new ArrayBuffer(14));
        blocks.setUint16(0, INFO_BLOCK_SIZE);
        blocks.setUint32(2, sizes.minimum);
        blocks.setUint32(6, sizes.preferred);
        blocks.setUint32(10, sizes.maximum);
        await reply(option, REP_INFO, new Uint8Array(blocks.buffer));
        await reply(option, REP_ACK);
        if (option === OPT_GO) return true;
      } else if (option === OPT_EXPORT_NAME) {
        const start = new DataView(new ArrayBuffer(10));
        start.setBigUint64(0, BigInt(this.#handler.size));
        start.setUint16(8, TRANSMISSION_FLAGS);
        const zeroes = clientFlags & FLAG_NO_ZEROES ? 0 : 124;
        await writeAll(connection, concat(new Uint8Array(start.buffer), new Uint8Array(zeroes)));
        return true;
      } else if (option === OPT_ABORT) {
        await reply(option, REP_ACK);
        return false;
      } else {
        await reply(option, REP_ERR_UNSUP);
      }
    }
  }

  #exportMatches(data: Uint8Array, at: number): boolean {
    if (this.#options.exportName === undefined || data.byteLength < at) return true;
    const length = new DataView(data.buffer, data.byteOffset).getUint32(0);
    const name = new TextDecoder().decode(data.subarray(at, at + length));
    return name === this.#options.exportName;
  }

  async #transmission(reader: SocketReader, connection: Deno.UnixConn): Promise<void> {
    const maximum = (this.#options.blockSizes ?? { maximum: 4 << 20 }).maximum;
    const replyBuffer = new DataView(new ArrayBuffer(16));
    replyBuffer.setUint32(0, SIMPLE_REPLY_MAGIC);
    for (;;) {
      const request = await reader.read(28, true);
      if (request === null) return; // EOF between requests: the client went away
      if (request.getUint32(0) !== REQUEST_MAGIC) throw new Error("bad request magic");
      const type = request.getUint16(6);
      const cookie = request.getBigUint64(8);
      const offset = Number(request.getBigUint64(16));
      const length = request.getUint32(24);
      if (type === CMD_DISC) return;
      let error = 0;
      if (type === CMD_WRITE) {
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
      } else if (type === CMD_WRITE_ZEROES) {
        error = await this.#run(offset, length, () => this.#handler.writeZeroes(offset, length));
        this.stats.writeZeroes++;
      } else if (type === CMD_TRIM) {
        error = await this.#run(offset, length, () => this.#handler.trim(offset, length));
        this.stats.trims++;
      } else if (type === CMD_FLUSH) {
        error = await this.#run(0, 0, () => this.#handler.flush());
        this.stats.flushes++;
      } else if (type === CMD_READ) {
        error = EINVAL; // a write-only sink
      } else {
        error = EINVAL;
      }
      if (type !== CMD_FLUSH && type !== CMD_READ) {
        if (offset < this.#highest) this.stats.outOfOrder++;
        this.#highest = Math.max(this.#highest, offset + length);
      }
      replyBuffer.setUint32(4, error);
      replyBuffer.setBigUint64(8, cookie);
      await writeAll(connection, new Uint8Array(replyBuffer.buffer));
    }
  }

  async #run(offset: number, length: number, action: () => Promise<void>): Promise<number> {
    if (offset + length > this.#handler.size) return EINVAL;
    try {
      await action();
      return 0;
    } catch {
      this.stats.errors++;
      return EIO;
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
  read(length: number, eofOk: true): Promise<DataView | null>;
  read(length: number): Promise<DataView>;
  async read(length: number, eofOk = false): Promise<DataView | null> {
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
    const view = new DataView(this.#buffer.buffer, this.#start, length);
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

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.byteLength;) done += await conn.write(bytes.subarray(done));
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.byteLength + b.byteLength);
  out.set(a);
  out.set(b, a.byteLength);
  return out;
}
