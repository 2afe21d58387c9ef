// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A raw NBD client for tests: it sends exactly the bytes a test tells it to (bad requests,
 * pipelined requests, dropped connections) and decodes what comes back.
 */
import assert from "node:assert/strict";
import {
  decodeChunkHeader,
  decodeErrorChunk,
  decodeInfoReply,
  decodeOffsetDataPrefix,
  decodeOffsetHole,
  decodeOptionReplyHeader,
  decodeSimpleReply,
  encodeExportInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  NBD_CHUNK_HEADER_SIZE,
  NBD_HANDSHAKE_SIZE,
  NBD_OPTION_REPLY_HEADER_SIZE,
  NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdInfo,
  NbdOpt,
  NbdRep,
  NbdReplyFlag,
  NbdReplyType,
} from "../lib/protocols/nbd_protocol.ts";
import type { NbdListenAddress } from "../lib/protocols/nbd_server.ts";

export interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  payload: Uint8Array;
}

/** A client that sends exactly what a test tells it to and decodes what comes back. */
export class RawClient {
  readonly conn: Deno.Conn;
  #cookie = 0n;

  private constructor(conn: Deno.Conn) {
    this.conn = conn;
  }

  static async connect(server: { address: NbdListenAddress }): Promise<RawClient> {
    const { address } = server;
    const conn = "path" in address
      ? await Deno.connect({ transport: "unix", path: address.path })
      : await Deno.connect({ hostname: address.hostname, port: address.port });
    return new RawClient(conn);
  }

  async send(...parts: Uint8Array[]): Promise<void> {
    for (const part of parts) {
      for (let done = 0; done < part.byteLength;) {
        done += await this.conn.write(part.subarray(done));
      }
    }
  }

  /** Exactly `size` bytes, or null when the server closed the connection first. */
  async recv(size: number): Promise<Uint8Array<ArrayBuffer> | null> {
    const bytes = new Uint8Array(size);
    for (let filled = 0; filled < size;) {
      let count: number | null;
      try {
        count = await this.conn.read(bytes.subarray(filled));
      } catch {
        return null; // reset by the server
      }
      if (count === null) return null;
      filled += count;
    }
    return bytes;
  }

  async must(size: number): Promise<Uint8Array<ArrayBuffer>> {
    const bytes = await this.recv(size);
    assert.ok(bytes, `the server closed the connection instead of sending ${size} bytes`);
    return bytes;
  }

  /** Reads the greeting and answers it; the handshake flags. */
  async greet(clientFlags = 3): Promise<number> {
    const greeting = await this.must(NBD_HANDSHAKE_SIZE);
    const flags = new Uint8Array(4);
    new DataView(flags.buffer).setUint32(0, clientFlags);
    await this.send(flags);
    return new DataView(greeting.buffer).getUint16(16);
  }

  /** Sends an option and reads its replies up to the final one (ACK or an error). */
  async option(option: number, data?: Uint8Array): Promise<{ type: number; data: Uint8Array }[]> {
    await this.send(encodeOption(option, data));
    const replies: { type: number; data: Uint8Array }[] = [];
    for (;;) {
      const header = decodeOptionReplyHeader(await this.must(NBD_OPTION_REPLY_HEADER_SIZE));
      assert.equal(header.option, option);
      replies.push({ type: header.type, data: await this.must(header.length) });
      if (header.type === NbdRep.ACK || header.type >= 2 ** 31) return replies;
    }
  }

  /** Negotiates and enters transmission; the export size and flags. */
  async go(
    name: string,
    { structured = true, contexts = [] as string[] } = {},
  ): Promise<{ size: number; flags: number }> {
    await this.greet();
    if (structured) {
      assert.equal((await this.option(NbdOpt.STRUCTURED_REPLY)).at(-1)!.type, NbdRep.ACK);
    }
    if (contexts.length > 0) {
      await this.option(NbdOpt.SET_META_CONTEXT, encodeMetaContextRequest(name, contexts));
    }
    const replies = await this.option(
      NbdOpt.GO,
      encodeExportInfoRequest(name, [NbdInfo.BLOCK_SIZE]),
    );
    assert.equal(replies.at(-1)!.type, NbdRep.ACK, "NBD_OPT_GO succeeded");
    const info = replies.filter((reply) => reply.type === NbdRep.INFO)
      .map((reply) => decodeInfoReply(reply.data)).find((i) => i.type === "export");
    assert.ok(info?.type === "export");
    return { size: info.size, flags: info.flags };
  }

  /** Sends a request; its cookie. */
  async request(
    type: number,
    offset: number,
    length: number,
    { flags = 0, payload }: { flags?: number; payload?: Uint8Array } = {},
  ): Promise<bigint> {
    const cookie = ++this.#cookie;
    await this.send(
      encodeRequest({ flags, type, cookie, offset, length }),
      ...(payload ? [payload] : []),
    );
    return cookie;
  }

  /** A simple reply, with `dataLength` bytes of data when it is a successful read. */
  async simple(dataLength = 0): Promise<{ error: number; cookie: bigint; data: Uint8Array }> {
    const reply = decodeSimpleReply(await this.must(NBD_SIMPLE_REPLY_SIZE));
    const data = reply.error === 0 && dataLength > 0
      ? await this.must(dataLength)
      : new Uint8Array();
    return { ...reply, data };
  }

  /** One structured chunk, or a simple reply's header as a chunk of type -1. */
  async chunk(): Promise<Chunk> {
    const head = await this.must(4);
    const magic = new DataView(head.buffer).getUint32(0);
    if (magic !== NBD_STRUCTURED_REPLY_MAGIC) {
      const rest = await this.must(NBD_SIMPLE_REPLY_SIZE - 4);
      const reply = decodeSimpleReply(new Uint8Array([...head, ...rest]));
      const payload = new Uint8Array(4);
      new DataView(payload.buffer).setUint32(0, reply.error);
      return { flags: NbdReplyFlag.DONE, type: -1, cookie: reply.cookie, payload };
    }
    const rest = await this.must(NBD_CHUNK_HEADER_SIZE - 4);
    const header = decodeChunkHeader(new Uint8Array([...head, ...rest]));
    return { ...header, payload: await this.must(header.length) };
  }

  /** The chunks of the next structured reply (simple replies count as one chunk). */
  async reply(): Promise<Chunk[]> {
    const chunks: Chunk[] = [];
    for (;;) {
      const chunk = await this.chunk();
      chunks.push(chunk);
      if (chunk.flags & NbdReplyFlag.DONE) return chunks;
    }
  }

  /** True once the server closes the connection (false if it is still open after 2 s). */
  async closedByServer(): Promise<boolean> {
    const sink = new Uint8Array(65536);
    const deadline = Date.now() + 2000;
    while (Date.now() < deadline) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const result = await Promise.race([
        this.conn.read(sink).catch(() => null),
        new Promise<"wait">((resolve) => timer = setTimeout(() => resolve("wait"), 2000)),
      ]);
      clearTimeout(timer);
      if (result === null) return true;
      if (result === "wait") return false;
    }
    return false;
  }

  close(): void {
    try {
      this.conn.close();
    } catch { /* closed already */ }
  }
}

/** The errno of a reply: a simple reply's error, or the first error chunk's. */
export function errnoOf(chunks: Chunk[]): number {
  for (const chunk of chunks) {
    if (chunk.type === -1) return new DataView(chunk.payload.buffer).getUint32(0);
    if (chunk.type & 0x8000) return decodeErrorChunk(chunk.type, chunk.payload).error;
  }
  return 0;
}

/** Reassembles the content chunks of a read reply. */
export function contentOf(chunks: Chunk[], offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length).fill(0xee);
  for (const chunk of chunks) {
    if (chunk.type === NbdReplyType.OFFSET_DATA) {
      out.set(chunk.payload.subarray(8), decodeOffsetDataPrefix(chunk.payload) - offset);
    } else if (chunk.type === NbdReplyType.OFFSET_HOLE) {
      const hole = decodeOffsetHole(chunk.payload);
      out.fill(0, hole.offset - offset, hole.offset - offset + hole.size);
    }
  }
  return out;
}
