// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Constants and small pure encoders and decoders of the NBD (network block device)
 * protocol, shared by the client (`nbd_client.ts`) and a server.
 *
 * Values follow NetworkBlockDevice/nbd `doc/proto.md`; QEMU's metadata contexts follow
 * qemu.org `docs/interop/nbd`. All integers on the wire are big-endian. Offsets and sizes
 * are JavaScript numbers (decoders reject values above `Number.MAX_SAFE_INTEGER`);
 * cookies are opaque `bigint`s. Decoders check every length before they look at a byte and
 * throw {@linkcode NbdError} on malformed input, never a `RangeError` from a `DataView`.
 *
 * @example Encode a read request and decode it again
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeRequest, encodeRequest, NbdCmd } from "./nbd_protocol.ts";
 *
 * const bytes = encodeRequest({ flags: 0, type: NbdCmd.READ, cookie: 1n, offset: 4096, length: 512 });
 * assert.equal(bytes.byteLength, 28);
 * assert.deepEqual(decodeRequest(bytes), {
 *   flags: 0, type: NbdCmd.READ, cookie: 1n, offset: 4096, length: 512,
 * });
 * ```
 *
 * @example The magic numbers and sizes on the wire
 * ```ts
 * import assert from "node:assert/strict";
 * import {
 *   decodeRequest, NBD_HANDSHAKE_SIZE, NBD_IHAVEOPT, NBD_MAGIC, NBD_REQUEST_MAGIC,
 *   NBD_REQUEST_SIZE, NbdCmd,
 * } from "./nbd_protocol.ts";
 *
 * const greeting = new DataView(new ArrayBuffer(NBD_HANDSHAKE_SIZE));
 * greeting.setBigUint64(0, NBD_MAGIC);
 * greeting.setBigUint64(8, NBD_IHAVEOPT);
 * assert.equal(new TextDecoder().decode(greeting.buffer.slice(0, 16)), "NBDMAGICIHAVEOPT");
 *
 * const request = new DataView(new ArrayBuffer(NBD_REQUEST_SIZE));
 * request.setUint32(0, NBD_REQUEST_MAGIC);
 * request.setUint16(6, NbdCmd.FLUSH);
 * assert.equal(decodeRequest(new Uint8Array(request.buffer)).type, NbdCmd.FLUSH);
 * ```
 *
 * @module
 */

// ---------------------------------------------------------------------------------------
// Magic numbers, sizes and defaults

/** `"NBDMAGIC"`, the first 8 bytes a server sends (also called `INIT_PASSWD`). */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** `"IHAVEOPT"`: the newstyle magic after `NBD_MAGIC`, and the magic of every option request. */
export const NBD_IHAVEOPT = 0x49484156454f5054n;
/** The magic of an oldstyle handshake (`cliserv_magic`), which no longer carries options. */
export const NBD_OLDSTYLE_MAGIC = 0x00420281861253n;
/** The magic of every option reply in the fixed newstyle handshake. */
export const NBD_OPT_REPLY_MAGIC = 0x3e889045565a9n;
/** The magic of a transmission request. */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** The magic of a simple reply (formerly `NBD_REPLY_MAGIC`). */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** The magic of a structured reply chunk. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** The IANA port of NBD. */
export const NBD_DEFAULT_PORT = 10809;
/** Minimum block size when the server advertises none. */
export const NBD_DEFAULT_MIN_BLOCK_SIZE = 1;
/** Preferred block size when the server advertises none. */
export const NBD_DEFAULT_PREFERRED_BLOCK_SIZE = 4096;
/** Maximum payload of one request when the server advertises none (32 MiB, 2^25). */
export const NBD_DEFAULT_MAX_BLOCK_SIZE = 33554432;
/** Longest string (export name, context name, message) the protocol allows, in bytes. */
export const NBD_MAX_STRING_LENGTH = 4096;

/** Size of the server greeting: `NBDMAGIC`, `IHAVEOPT`, u16 handshake flags. */
export const NBD_HANDSHAKE_SIZE = 18;
/** Size of an option request header: `IHAVEOPT`, u32 option, u32 length. */
export const NBD_OPTION_HEADER_SIZE = 16;
/** Size of an option reply header: magic, u32 option, u32 type, u32 length. */
export const NBD_OPTION_REPLY_HEADER_SIZE = 20;
/** Size of the `NBD_OPT_EXPORT_NAME` reply without its optional 124 zero bytes. */
export const NBD_EXPORT_NAME_REPLY_SIZE = 10;
/** Size of a transmission request header (without the data of a write). */
export const NBD_REQUEST_SIZE = 28;
/** Size of a simple reply (without the data of a read). */
export const NBD_SIMPLE_REPLY_SIZE = 16;
/** Size of a structured reply chunk header (without its payload). */
export const NBD_CHUNK_HEADER_SIZE = 20;

// ---------------------------------------------------------------------------------------
// Flag and type values

/**
 * Handshake flags, the u16 a server sends after the two magics.
 *
 * @example Check a greeting
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdHandshakeFlag } from "./nbd_protocol.ts";
 *
 * const flags = NbdHandshakeFlag.FIXED_NEWSTYLE | NbdHandshakeFlag.NO_ZEROES;
 * assert.equal(flags, 3);
 * ```
 */
export const NbdHandshakeFlag = {
  /** The server speaks the fixed newstyle handshake. */
  FIXED_NEWSTYLE: 1 << 0,
  /** The server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`. */
  NO_ZEROES: 1 << 1,
} as const;

/**
 * Client flags, the u32 a client answers the greeting with.
 *
 * @example Answer a server that offers both features
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdClientFlag } from "./nbd_protocol.ts";
 *
 * assert.equal(NbdClientFlag.FIXED_NEWSTYLE | NbdClientFlag.NO_ZEROES, 3);
 * ```
 */
export const NbdClientFlag = {
  /** `NBD_FLAG_C_FIXED_NEWSTYLE`. */
  FIXED_NEWSTYLE: 1 << 0,
  /** `NBD_FLAG_C_NO_ZEROES`: only when the server set `NO_ZEROES`. */
  NO_ZEROES: 1 << 1,
} as const;

/**
 * Transmission flags of an export (u16 in `NBD_INFO_EXPORT`).
 *
 * @example Decode the flags of a read-only `qemu-nbd -r` export
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdTransmissionFlag as F } from "./nbd_protocol.ts";
 *
 * const flags = 0x48f;
 * assert.ok(flags & F.READ_ONLY);
 * assert.ok(flags & F.SEND_FLUSH);
 * assert.ok(!(flags & F.SEND_TRIM));
 * ```
 */
export const NbdTransmissionFlag = {
  /** Always set. */
  HAS_FLAGS: 1 << 0,
  /** The export refuses writes. */
  READ_ONLY: 1 << 1,
  /** `NBD_CMD_FLUSH` is supported. */
  SEND_FLUSH: 1 << 2,
  /** `NBD_CMD_FLAG_FUA` is supported. */
  SEND_FUA: 1 << 3,
  /** The export behaves like a rotational medium. */
  ROTATIONAL: 1 << 4,
  /** `NBD_CMD_TRIM` is supported. */
  SEND_TRIM: 1 << 5,
  /** `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported. */
  SEND_WRITE_ZEROES: 1 << 6,
  /** `NBD_CMD_FLAG_DF` is supported (only with structured replies). */
  SEND_DF: 1 << 7,
  /** Several connections to the export share one cache. */
  CAN_MULTI_CONN: 1 << 8,
  /** `NBD_CMD_RESIZE` (experimental). */
  SEND_RESIZE: 1 << 9,
  /** `NBD_CMD_CACHE` is understood. */
  SEND_CACHE: 1 << 10,
  /** `NBD_CMD_FLAG_FAST_ZERO` is supported. */
  SEND_FAST_ZERO: 1 << 11,
} as const;

/**
 * Option numbers of the handshake phase (`NBD_OPT_*`).
 *
 * @example Name an option in a message
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdOpt, nbdOptionName } from "./nbd_protocol.ts";
 *
 * assert.equal(nbdOptionName(NbdOpt.GO), "NBD_OPT_GO");
 * ```
 */
export const NbdOpt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

/** Bit 31: set on every option error reply type. */
export const NBD_REP_FLAG_ERROR = 2 ** 31;

/**
 * Option reply types (`NBD_REP_*`); the error types have bit 31 set.
 *
 * @example Tell an error reply from a success
 * ```ts
 * import assert from "node:assert/strict";
 * import { isOptionReplyError, NbdRep } from "./nbd_protocol.ts";
 *
 * assert.ok(isOptionReplyError(NbdRep.ERR_UNKNOWN));
 * assert.ok(!isOptionReplyError(NbdRep.ACK));
 * ```
 */
export const NbdRep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: NBD_REP_FLAG_ERROR + 1,
  ERR_POLICY: NBD_REP_FLAG_ERROR + 2,
  ERR_INVALID: NBD_REP_FLAG_ERROR + 3,
  ERR_PLATFORM: NBD_REP_FLAG_ERROR + 4,
  ERR_TLS_REQD: NBD_REP_FLAG_ERROR + 5,
  ERR_UNKNOWN: NBD_REP_FLAG_ERROR + 6,
  ERR_SHUTDOWN: NBD_REP_FLAG_ERROR + 7,
  ERR_BLOCK_SIZE_REQD: NBD_REP_FLAG_ERROR + 8,
  ERR_TOO_BIG: NBD_REP_FLAG_ERROR + 9,
  ERR_EXT_HEADER_REQD: NBD_REP_FLAG_ERROR + 10,
} as const;

/**
 * Information types of `NBD_OPT_INFO` / `NBD_OPT_GO` (`NBD_INFO_*`).
 *
 * @example Ask for the block size constraints
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeExportInfoRequest, encodeExportInfoRequest, NbdInfo } from "./nbd_protocol.ts";
 *
 * const data = encodeExportInfoRequest("disk", [NbdInfo.BLOCK_SIZE]);
 * assert.deepEqual(decodeExportInfoRequest(data), { exportName: "disk", infos: [3] });
 * ```
 */
export const NbdInfo = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/**
 * Command types of the transmission phase (`NBD_CMD_*`).
 *
 * @example Name a command in a message
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdCmd, nbdCommandName } from "./nbd_protocol.ts";
 *
 * assert.equal(nbdCommandName(NbdCmd.BLOCK_STATUS), "NBD_CMD_BLOCK_STATUS");
 * ```
 */
export const NbdCmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/**
 * Command flags (`NBD_CMD_FLAG_*`), the u16 after the request magic.
 *
 * @example One extent per context
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdCmdFlag } from "./nbd_protocol.ts";
 *
 * assert.equal(NbdCmdFlag.REQ_ONE, 8);
 * ```
 */
export const NbdCmdFlag = {
  /** Force unit access: persist before replying. */
  FUA: 1 << 0,
  /** `WRITE_ZEROES` must allocate, not punch a hole. */
  NO_HOLE: 1 << 1,
  /** Do not fragment a structured read reply. */
  DF: 1 << 2,
  /** `BLOCK_STATUS`: one extent per context. */
  REQ_ONE: 1 << 3,
  /** `WRITE_ZEROES`: fail fast unless zeroing is fast. */
  FAST_ZERO: 1 << 4,
} as const;

/**
 * Structured reply chunk flags.
 *
 * @example The final chunk
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdReplyFlag } from "./nbd_protocol.ts";
 *
 * assert.equal(NbdReplyFlag.DONE, 1);
 * ```
 */
export const NbdReplyFlag = {
  /** This is the last chunk of the reply. */
  DONE: 1 << 0,
} as const;

/** Bit 15: set on every structured error chunk type. */
export const NBD_REPLY_TYPE_FLAG_ERROR = 1 << 15;

/**
 * Structured reply chunk types (`NBD_REPLY_TYPE_*`).
 *
 * @example Tell error chunks apart
 * ```ts
 * import assert from "node:assert/strict";
 * import { NBD_REPLY_TYPE_FLAG_ERROR, NbdReplyType } from "./nbd_protocol.ts";
 *
 * assert.ok(NbdReplyType.ERROR_OFFSET & NBD_REPLY_TYPE_FLAG_ERROR);
 * assert.ok(!(NbdReplyType.OFFSET_HOLE & NBD_REPLY_TYPE_FLAG_ERROR));
 * ```
 */
export const NbdReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: NBD_REPLY_TYPE_FLAG_ERROR + 1,
  ERROR_OFFSET: NBD_REPLY_TYPE_FLAG_ERROR + 2,
} as const;

/**
 * Error numbers a server may send (`NBD_E*`); they equal the common Linux errno values.
 *
 * @example Name an error
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdErrno, nbdErrnoName } from "./nbd_protocol.ts";
 *
 * assert.equal(nbdErrnoName(NbdErrno.EINVAL), "EINVAL");
 * assert.equal(nbdErrnoName(1234), "error 1234");
 * ```
 */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/**
 * Status flags of block status descriptors. Their meaning depends on the context:
 * `HOLE` and `ZERO` belong to `base:allocation`, `DIRTY` to `qemu:dirty-bitmap:NAME`; for
 * `qemu:allocation-depth` the whole value is the depth (0 unallocated, 1 top layer, 2+ a
 * backing layer).
 *
 * @example Skip extents that read as zeroes
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdStateFlag } from "./nbd_protocol.ts";
 *
 * const flags = NbdStateFlag.HOLE | NbdStateFlag.ZERO;
 * assert.ok(flags & NbdStateFlag.ZERO);
 * ```
 */
export const NbdStateFlag = {
  /** `base:allocation`: the extent is not allocated. */
  HOLE: 1 << 0,
  /** `base:allocation`: the extent reads as zeroes. */
  ZERO: 1 << 1,
  /** `qemu:dirty-bitmap:*`: the extent is dirty. */
  DIRTY: 1 << 0,
} as const;

/**
 * Well-known metadata context names.
 *
 * @example Build a dirty bitmap context name
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdMetaContext } from "./nbd_protocol.ts";
 *
 * assert.equal(NbdMetaContext.QEMU_DIRTY_BITMAP + "chk1", "qemu:dirty-bitmap:chk1");
 * ```
 */
export const NbdMetaContext = {
  /** Holes and zeroes (flags `HOLE` = 1, `ZERO` = 2). */
  BASE_ALLOCATION: "base:allocation",
  /** QEMU: allocation depth in the backing chain (`qemu-nbd -A`). */
  QEMU_ALLOCATION_DEPTH: "qemu:allocation-depth",
  /** QEMU: prefix of the exported dirty bitmaps (`qemu-nbd -B NAME`). */
  QEMU_DIRTY_BITMAP: "qemu:dirty-bitmap:",
} as const;

// ---------------------------------------------------------------------------------------
// Names for messages

function nameOf(table: Record<string, number>, prefix: string, value: number): string {
  for (const [key, v] of Object.entries(table)) if (v === value) return prefix + key;
  return `${prefix}${value}`;
}

/**
 * The spec name of an option, such as `"NBD_OPT_GO"`, or `"NBD_OPT_<n>"`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { nbdOptionName } from "./nbd_protocol.ts";
 *
 * assert.equal(nbdOptionName(10), "NBD_OPT_SET_META_CONTEXT");
 * ```
 */
export function nbdOptionName(option: number): string {
  return nameOf(NbdOpt, "NBD_OPT_", option);
}

/**
 * The spec name of an option reply type, such as `"NBD_REP_ERR_UNKNOWN"`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdRep, nbdReplyTypeName } from "./nbd_protocol.ts";
 *
 * assert.equal(nbdReplyTypeName(NbdRep.ERR_UNSUP), "NBD_REP_ERR_UNSUP");
 * ```
 */
export function nbdReplyTypeName(type: number): string {
  return nameOf(NbdRep, "NBD_REP_", type);
}

/**
 * The spec name of a command, such as `"NBD_CMD_READ"`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { nbdCommandName } from "./nbd_protocol.ts";
 *
 * assert.equal(nbdCommandName(0), "NBD_CMD_READ");
 * ```
 */
export function nbdCommandName(type: number): string {
  return nameOf(NbdCmd, "NBD_CMD_", type);
}

/**
 * The spec name of a structured chunk type, such as `"NBD_REPLY_TYPE_OFFSET_HOLE"`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { nbdChunkTypeName } from "./nbd_protocol.ts";
 *
 * assert.equal(nbdChunkTypeName(2), "NBD_REPLY_TYPE_OFFSET_HOLE");
 * ```
 */
export function nbdChunkTypeName(type: number): string {
  return nameOf(NbdReplyType, "NBD_REPLY_TYPE_", type);
}

/**
 * The name of an NBD error number, such as `"EIO"`, or `"error <n>"` for other values.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { nbdErrnoName } from "./nbd_protocol.ts";
 *
 * assert.equal(nbdErrnoName(5), "EIO");
 * ```
 */
export function nbdErrnoName(errno: number): string {
  for (const [key, v] of Object.entries(NbdErrno)) if (v === errno) return key;
  return `error ${errno}`;
}

/**
 * True for option reply types that report an error (bit 31 set).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { isOptionReplyError } from "./nbd_protocol.ts";
 *
 * assert.ok(isOptionReplyError(2 ** 31 + 6));
 * ```
 */
export function isOptionReplyError(type: number): boolean {
  return type >= NBD_REP_FLAG_ERROR;
}

// ---------------------------------------------------------------------------------------
// Errors

/** Why an NBD operation failed; stable strings for scripts and tests. */
export type NbdErrorReason =
  /** The NBD URI could not be parsed or needs something unsupported (TLS). */
  | "invalid-uri"
  /** The socket could not be connected. */
  | "connect-failed"
  /** The peer did not make progress within the timeout. */
  | "timeout"
  /** The peer closed the connection, or the socket failed. */
  | "disconnected"
  /** The client was closed, or an earlier error closed it. */
  | "closed"
  /** The call does not fit the phase (an option after `go()`, a read before it). */
  | "invalid-state"
  /** A magic number is wrong: this is not NBD, or the stream lost its framing. */
  | "bad-magic"
  /** The server does not speak the fixed newstyle handshake. */
  | "not-fixed-newstyle"
  /** A message does not have the layout the protocol requires. */
  | "malformed"
  /** A well-formed message that is not allowed here (wrong type, data outside the range). */
  | "unexpected-reply"
  /** A reply carries a cookie of no request in flight. */
  | "unexpected-cookie"
  /** A reply announces more payload than the client accepts. */
  | "payload-too-large"
  /** The server refused an option (`code` is the `NBD_REP_ERR_*` type). */
  | "option-failed"
  /** The server or export lacks a feature the call needs. */
  | "unsupported"
  /** The server reported an error for a command (`code` is the errno). */
  | "command-failed";

/** Options of {@linkcode NbdError}. */
export interface NbdErrorOptions {
  /** The number the server sent: an errno, or an `NBD_REP_ERR_*` option reply type. */
  code?: number | undefined;
  /** The underlying error, such as a socket error. */
  cause?: unknown;
}

/**
 * An NBD connection or protocol failure.
 *
 * `reason` is a stable machine-readable string. `code` is the number the server sent when
 * it reported the error itself: the NBD errno of a failed command (`reason`
 * `"command-failed"`), or the `NBD_REP_ERR_*` type of a refused option (`"option-failed"`).
 *
 * @example Inspect a failed command
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdErrno, NbdError } from "./nbd_protocol.ts";
 *
 * const error = new NbdError("command-failed", "Cannot read: EIO", { code: NbdErrno.EIO });
 * assert.equal(error.name, "NbdError");
 * assert.equal(error.reason, "command-failed");
 * assert.equal(error.code, 5);
 * ```
 */
export class NbdError extends Error {
  /** Machine-readable reason. */
  readonly reason: NbdErrorReason;
  /** The errno or option reply type the server sent, if any. */
  readonly code: number | undefined;

  /**
   * Creates an error; `message` should read "Cannot <action>: <detail>".
   *
   * @param reason The machine-readable reason.
   * @param message The human-readable message.
   * @param options The server's code and the underlying cause.
   */
  constructor(reason: NbdErrorReason, message: string, options: NbdErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "NbdError";
    this.reason = reason;
    this.code = options.code;
  }
}

// ---------------------------------------------------------------------------------------
// Low-level helpers

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function need(bytes: Uint8Array, size: number, what: string): void {
  if (bytes.byteLength < size) {
    throw new NbdError(
      "malformed",
      `Cannot decode ${what}: It needs ${size} bytes, got ${bytes.byteLength}`,
    );
  }
}

/**
 * Reads a u64 at `offset` as a number.
 *
 * @throws {NbdError} "malformed" when it exceeds `Number.MAX_SAFE_INTEGER`.
 */
function getU64(view: DataView, offset: number, what: string): number {
  const high = view.getUint32(offset);
  const low = view.getUint32(offset + 4);
  if (high >= 0x200000) {
    throw new NbdError(
      "malformed",
      `Cannot decode ${what}: 0x${high.toString(16)}${low.toString(16).padStart(8, "0")} ` +
        "exceeds 2^53",
    );
  }
  return high * 0x100000000 + low;
}

function setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, Math.floor(value / 0x100000000));
  view.setUint32(offset + 4, value >>> 0);
}

function checkU64(value: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`Cannot encode ${what}: ${value} is not an unsigned safe integer`);
  }
}

function checkU32(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new RangeError(`Cannot encode ${what}: ${value} does not fit in 32 bits`);
  }
}

function checkU16(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) {
    throw new RangeError(`Cannot encode ${what}: ${value} does not fit in 16 bits`);
  }
}

/**
 * The UTF-8 bytes of a protocol string.
 *
 * @throws {RangeError} when longer than {@linkcode NBD_MAX_STRING_LENGTH} bytes.
 */
function encodeString(value: string, what: string): Uint8Array {
  const bytes = encoder.encode(value);
  if (bytes.byteLength > NBD_MAX_STRING_LENGTH) {
    throw new RangeError(
      `Cannot encode ${what}: It is ${bytes.byteLength} bytes long, more than ${NBD_MAX_STRING_LENGTH}`,
    );
  }
  return bytes;
}

/**
 * Decodes UTF-8 bytes of a protocol string.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeNbdString } from "./nbd_protocol.ts";
 *
 * assert.equal(decodeNbdString(new TextEncoder().encode("disk"), "an export name"), "disk");
 * assert.throws(() => decodeNbdString(new Uint8Array([0xff]), "an export name"), {
 *   name: "NbdError",
 * });
 * ```
 *
 * @throws {NbdError} "malformed" when the bytes are not valid UTF-8.
 */
export function decodeNbdString(bytes: Uint8Array, what: string): string {
  try {
    return strictDecoder.decode(bytes);
  } catch (cause) {
    throw new NbdError("malformed", `Cannot decode ${what}: It is not valid UTF-8`, { cause });
  }
}

// ---------------------------------------------------------------------------------------
// Handshake

/**
 * Encodes the fixed newstyle greeting of a server: `NBDMAGIC`, `IHAVEOPT`, u16 flags.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeHandshake, encodeHandshake } from "./nbd_protocol.ts";
 *
 * assert.deepEqual(decodeHandshake(encodeHandshake(3)), { handshakeFlags: 3 });
 * ```
 */
export function encodeHandshake(handshakeFlags: number): Uint8Array<ArrayBuffer> {
  checkU16(handshakeFlags, "the handshake flags");
  const bytes = new Uint8Array(NBD_HANDSHAKE_SIZE);
  const view = viewOf(bytes);
  view.setBigUint64(0, NBD_MAGIC);
  view.setBigUint64(8, NBD_IHAVEOPT);
  view.setUint16(16, handshakeFlags);
  return bytes;
}

/** A decoded server greeting. */
export interface NbdHandshake {
  /** {@linkcode NbdHandshakeFlag} bits. */
  handshakeFlags: number;
}

/**
 * Decodes the 18-byte server greeting.
 *
 * @example Reject a server that is not NBD
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeHandshake } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeHandshake(new Uint8Array(18)), { reason: "bad-magic" });
 * ```
 *
 * @throws {NbdError} "bad-magic" for a wrong magic, "unsupported" for an oldstyle server,
 * "malformed" when too short.
 */
export function decodeHandshake(bytes: Uint8Array): NbdHandshake {
  need(bytes, NBD_HANDSHAKE_SIZE, "the server greeting");
  const view = viewOf(bytes);
  const magic = view.getBigUint64(0);
  if (magic !== NBD_MAGIC) {
    throw new NbdError(
      "bad-magic",
      `Cannot negotiate: The server greeting starts with 0x${magic.toString(16)}, not NBDMAGIC`,
    );
  }
  const second = view.getBigUint64(8);
  if (second === NBD_OLDSTYLE_MAGIC) {
    throw new NbdError(
      "unsupported",
      "Cannot negotiate: The server speaks the oldstyle handshake, which has no options",
    );
  }
  if (second !== NBD_IHAVEOPT) {
    throw new NbdError(
      "bad-magic",
      `Cannot negotiate: The server greeting has 0x${second.toString(16)} instead of IHAVEOPT`,
    );
  }
  return { handshakeFlags: view.getUint16(16) };
}

// ---------------------------------------------------------------------------------------
// Options

/** The header of an option request. */
export interface NbdOptionHeader {
  /** An {@linkcode NbdOpt} value. */
  option: number;
  /** Length of the option data that follows. */
  length: number;
}

/**
 * Encodes an option request: `IHAVEOPT`, u32 option, u32 length, data.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeOptionHeader, encodeOption, NbdOpt } from "./nbd_protocol.ts";
 *
 * const bytes = encodeOption(NbdOpt.STRUCTURED_REPLY);
 * assert.equal(bytes.byteLength, 16);
 * assert.deepEqual(decodeOptionHeader(bytes), { option: 8, length: 0 });
 * ```
 */
export function encodeOption(option: number, data?: Uint8Array): Uint8Array<ArrayBuffer> {
  checkU32(option, "the option");
  const length = data?.byteLength ?? 0;
  const bytes = new Uint8Array(NBD_OPTION_HEADER_SIZE + length);
  const view = viewOf(bytes);
  view.setBigUint64(0, NBD_IHAVEOPT);
  view.setUint32(8, option);
  view.setUint32(12, length);
  if (data) bytes.set(data, NBD_OPTION_HEADER_SIZE);
  return bytes;
}

/**
 * Decodes the 16-byte header of an option request (server side).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeOptionHeader } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeOptionHeader(new Uint8Array(16)), { reason: "bad-magic" });
 * ```
 *
 * @throws {NbdError} "bad-magic" or "malformed".
 */
export function decodeOptionHeader(bytes: Uint8Array): NbdOptionHeader {
  need(bytes, NBD_OPTION_HEADER_SIZE, "an option request");
  const view = viewOf(bytes);
  const magic = view.getBigUint64(0);
  if (magic !== NBD_IHAVEOPT) {
    throw new NbdError(
      "bad-magic",
      `Cannot decode an option request: Its magic is 0x${magic.toString(16)}, not IHAVEOPT`,
    );
  }
  return { option: view.getUint32(8), length: view.getUint32(12) };
}

/** The header of an option reply. */
export interface NbdOptionReplyHeader {
  /** The option this replies to. */
  option: number;
  /** An {@linkcode NbdRep} value. */
  type: number;
  /** Length of the reply data that follows. */
  length: number;
}

/**
 * Encodes an option reply (server side): magic, u32 option, u32 type, u32 length, data.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeOptionReplyHeader, encodeOptionReply, NbdOpt, NbdRep } from "./nbd_protocol.ts";
 *
 * const bytes = encodeOptionReply(NbdOpt.GO, NbdRep.ACK);
 * assert.deepEqual(decodeOptionReplyHeader(bytes), { option: 7, type: 1, length: 0 });
 * ```
 */
export function encodeOptionReply(
  option: number,
  type: number,
  data?: Uint8Array,
): Uint8Array<ArrayBuffer> {
  checkU32(option, "the option");
  checkU32(type, "the option reply type");
  const length = data?.byteLength ?? 0;
  const bytes = new Uint8Array(NBD_OPTION_REPLY_HEADER_SIZE + length);
  const view = viewOf(bytes);
  view.setBigUint64(0, NBD_OPT_REPLY_MAGIC);
  view.setUint32(8, option);
  view.setUint32(12, type);
  view.setUint32(16, length);
  if (data) bytes.set(data, NBD_OPTION_REPLY_HEADER_SIZE);
  return bytes;
}

/**
 * Decodes the 20-byte header of an option reply.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeOptionReplyHeader } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeOptionReplyHeader(new Uint8Array(20)), { reason: "bad-magic" });
 * assert.throws(() => decodeOptionReplyHeader(new Uint8Array(3)), { reason: "malformed" });
 * ```
 *
 * @throws {NbdError} "bad-magic" or "malformed".
 */
export function decodeOptionReplyHeader(bytes: Uint8Array): NbdOptionReplyHeader {
  need(bytes, NBD_OPTION_REPLY_HEADER_SIZE, "an option reply");
  const view = viewOf(bytes);
  const magic = view.getBigUint64(0);
  if (magic !== NBD_OPT_REPLY_MAGIC) {
    throw new NbdError(
      "bad-magic",
      `Cannot decode an option reply: Its magic is 0x${magic.toString(16)}, not 0x3e889045565a9`,
    );
  }
  return { option: view.getUint32(8), type: view.getUint32(12), length: view.getUint32(16) };
}

/**
 * Encodes the data of `NBD_OPT_INFO` / `NBD_OPT_GO`: u32 name length, name, u16 count,
 * u16 information requests.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeExportInfoRequest, NbdInfo } from "./nbd_protocol.ts";
 *
 * const data = encodeExportInfoRequest("", [NbdInfo.BLOCK_SIZE]);
 * assert.deepEqual([...data], [0, 0, 0, 0, 0, 1, 0, 3]);
 * ```
 */
export function encodeExportInfoRequest(
  exportName: string,
  infos: readonly number[] = [],
): Uint8Array<ArrayBuffer> {
  const name = encodeString(exportName, "the export name");
  checkU16(infos.length, "the number of information requests");
  const bytes = new Uint8Array(4 + name.byteLength + 2 + 2 * infos.length);
  const view = viewOf(bytes);
  view.setUint32(0, name.byteLength);
  bytes.set(name, 4);
  let at = 4 + name.byteLength;
  view.setUint16(at, infos.length);
  at += 2;
  for (const info of infos) {
    checkU16(info, "an information request");
    view.setUint16(at, info);
    at += 2;
  }
  return bytes;
}

/** The data of `NBD_OPT_INFO` / `NBD_OPT_GO`. */
export interface NbdExportInfoRequest {
  /** The export asked about (`""` for the default export). */
  exportName: string;
  /** {@linkcode NbdInfo} values the client asks for. */
  infos: number[];
}

/**
 * Decodes the data of `NBD_OPT_INFO` / `NBD_OPT_GO` (server side).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeExportInfoRequest } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeExportInfoRequest(new Uint8Array([0, 0, 0, 9, 0])), {
 *   reason: "malformed",
 * });
 * ```
 *
 * @throws {NbdError} "malformed" when the lengths do not fit the data.
 */
export function decodeExportInfoRequest(data: Uint8Array): NbdExportInfoRequest {
  const what = "an export information request";
  need(data, 6, what);
  const view = viewOf(data);
  const nameLength = view.getUint32(0);
  need(data, 4 + nameLength + 2, what);
  const exportName = decodeNbdString(data.subarray(4, 4 + nameLength), "the export name");
  let at = 4 + nameLength;
  const count = view.getUint16(at);
  at += 2;
  if (data.byteLength !== at + 2 * count) {
    throw new NbdError(
      "malformed",
      `Cannot decode ${what}: ${count} requests do not fill ${data.byteLength - at} bytes`,
    );
  }
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(view.getUint16(at + 2 * i));
  return { exportName, infos };
}

/** One `NBD_REP_INFO` item. */
export type NbdInfoReply =
  | { type: "export"; size: number; flags: number }
  | { type: "name"; name: string }
  | { type: "description"; description: string }
  | { type: "block-size"; minimum: number; preferred: number; maximum: number }
  | { type: "unknown"; info: number };

/**
 * Encodes the data of an `NBD_REP_INFO` reply (server side). `"unknown"` items cannot be
 * encoded.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeInfoReply, encodeInfoReply } from "./nbd_protocol.ts";
 *
 * const data = encodeInfoReply({ type: "export", size: 1 << 20, flags: 0x48f });
 * assert.equal(data.byteLength, 12);
 * assert.deepEqual(decodeInfoReply(data), { type: "export", size: 1 << 20, flags: 0x48f });
 * ```
 */
export function encodeInfoReply(info: NbdInfoReply): Uint8Array<ArrayBuffer> {
  switch (info.type) {
    case "export": {
      checkU64(info.size, "the export size");
      checkU16(info.flags, "the transmission flags");
      const bytes = new Uint8Array(12);
      const view = viewOf(bytes);
      view.setUint16(0, NbdInfo.EXPORT);
      setU64(view, 2, info.size);
      view.setUint16(10, info.flags);
      return bytes;
    }
    case "name":
    case "description": {
      const text = encodeString(
        info.type === "name" ? info.name : info.description,
        `the export ${info.type}`,
      );
      const bytes = new Uint8Array(2 + text.byteLength);
      viewOf(bytes).setUint16(0, info.type === "name" ? NbdInfo.NAME : NbdInfo.DESCRIPTION);
      bytes.set(text, 2);
      return bytes;
    }
    case "block-size": {
      checkU32(info.minimum, "the minimum block size");
      checkU32(info.preferred, "the preferred block size");
      checkU32(info.maximum, "the maximum block size");
      const bytes = new Uint8Array(14);
      const view = viewOf(bytes);
      view.setUint16(0, NbdInfo.BLOCK_SIZE);
      view.setUint32(2, info.minimum);
      view.setUint32(6, info.preferred);
      view.setUint32(10, info.maximum);
      return bytes;
    }
    case "unknown":
      throw new TypeError(`Cannot encode information type ${info.info}: It is unknown`);
  }
}

/**
 * Decodes the data of an `NBD_REP_INFO` reply. Unknown information types decode as
 * `{ type: "unknown" }` so a client can ignore them, as the spec requires.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeInfoReply } from "./nbd_protocol.ts";
 *
 * const data = new Uint8Array([0, 3, 0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
 * assert.deepEqual(decodeInfoReply(data), {
 *   type: "block-size", minimum: 1, preferred: 4096, maximum: 33554432,
 * });
 * assert.throws(() => decodeInfoReply(new Uint8Array([0, 0, 1])), { reason: "malformed" });
 * ```
 *
 * @throws {NbdError} "malformed" when the length does not match the type.
 */
export function decodeInfoReply(data: Uint8Array): NbdInfoReply {
  need(data, 2, "an information reply");
  const view = viewOf(data);
  const info = view.getUint16(0);
  const exact = (size: number, name: string) => {
    if (data.byteLength !== size) {
      throw new NbdError(
        "malformed",
        `Cannot decode the ${name} information: It has ${data.byteLength} bytes instead of ${size}`,
      );
    }
  };
  switch (info) {
    case NbdInfo.EXPORT:
      exact(12, "NBD_INFO_EXPORT");
      return {
        type: "export",
        size: getU64(view, 2, "the export size"),
        flags: view.getUint16(10),
      };
    case NbdInfo.NAME:
      return { type: "name", name: decodeNbdString(data.subarray(2), "the export name") };
    case NbdInfo.DESCRIPTION:
      return {
        type: "description",
        description: decodeNbdString(data.subarray(2), "the export description"),
      };
    case NbdInfo.BLOCK_SIZE:
      exact(14, "NBD_INFO_BLOCK_SIZE");
      return {
        type: "block-size",
        minimum: view.getUint32(2),
        preferred: view.getUint32(6),
        maximum: view.getUint32(10),
      };
    default:
      return { type: "unknown", info };
  }
}

/**
 * Encodes the data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: u32 name
 * length, export name, u32 query count, then each query as u32 length + string.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeMetaContextRequest, encodeMetaContextRequest } from "./nbd_protocol.ts";
 *
 * const data = encodeMetaContextRequest("disk", ["base:allocation", "qemu:"]);
 * assert.deepEqual(decodeMetaContextRequest(data), {
 *   exportName: "disk",
 *   queries: ["base:allocation", "qemu:"],
 * });
 * ```
 */
export function encodeMetaContextRequest(
  exportName: string,
  queries: readonly string[],
): Uint8Array<ArrayBuffer> {
  const name = encodeString(exportName, "the export name");
  const encoded = queries.map((query) => encodeString(query, "a metadata context query"));
  const total = 4 + name.byteLength + 4 + encoded.reduce((sum, q) => sum + 4 + q.byteLength, 0);
  const bytes = new Uint8Array(total);
  const view = viewOf(bytes);
  view.setUint32(0, name.byteLength);
  bytes.set(name, 4);
  let at = 4 + name.byteLength;
  view.setUint32(at, encoded.length);
  at += 4;
  for (const query of encoded) {
    view.setUint32(at, query.byteLength);
    bytes.set(query, at + 4);
    at += 4 + query.byteLength;
  }
  return bytes;
}

/** The data of a metadata context option. */
export interface NbdMetaContextRequest {
  /** The export the contexts belong to. */
  exportName: string;
  /** Context names or namespace queries such as `"base:"`. */
  queries: string[];
}

/**
 * Decodes the data of a metadata context option (server side).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeMetaContextRequest } from "./nbd_protocol.ts";
 *
 * // One query announced, none sent.
 * assert.throws(() => decodeMetaContextRequest(new Uint8Array([0, 0, 0, 0, 0, 0, 0, 1])), {
 *   reason: "malformed",
 * });
 * ```
 *
 * @throws {NbdError} "malformed" when the lengths do not fit the data.
 */
export function decodeMetaContextRequest(data: Uint8Array): NbdMetaContextRequest {
  const what = "a metadata context request";
  const view = viewOf(data);
  need(data, 8, what);
  const nameLength = view.getUint32(0);
  need(data, 4 + nameLength + 4, what);
  const exportName = decodeNbdString(data.subarray(4, 4 + nameLength), "the export name");
  let at = 4 + nameLength;
  const count = view.getUint32(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    need(data, at + 4, what);
    const length = view.getUint32(at);
    need(data, at + 4 + length, what);
    queries.push(decodeNbdString(data.subarray(at + 4, at + 4 + length), "a query"));
    at += 4 + length;
  }
  if (at !== data.byteLength) {
    throw new NbdError("malformed", `Cannot decode ${what}: ${data.byteLength - at} bytes remain`);
  }
  return { exportName, queries };
}

/** An `NBD_REP_META_CONTEXT` reply. */
export interface NbdMetaContextReply {
  /** The context id (0 and meaningless in `LIST` replies). */
  id: number;
  /** The context name, such as `"base:allocation"`. */
  name: string;
}

/**
 * Encodes the data of an `NBD_REP_META_CONTEXT` reply (server side): u32 id, name.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeMetaContextReply, encodeMetaContextReply } from "./nbd_protocol.ts";
 *
 * const data = encodeMetaContextReply(1, "base:allocation");
 * assert.deepEqual(decodeMetaContextReply(data), { id: 1, name: "base:allocation" });
 * ```
 */
export function encodeMetaContextReply(id: number, name: string): Uint8Array<ArrayBuffer> {
  checkU32(id, "the context id");
  const text = encodeString(name, "the context name");
  const bytes = new Uint8Array(4 + text.byteLength);
  viewOf(bytes).setUint32(0, id);
  bytes.set(text, 4);
  return bytes;
}

/**
 * Decodes the data of an `NBD_REP_META_CONTEXT` reply.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeMetaContextReply } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeMetaContextReply(new Uint8Array(2)), { reason: "malformed" });
 * ```
 *
 * @throws {NbdError} "malformed".
 */
export function decodeMetaContextReply(data: Uint8Array): NbdMetaContextReply {
  need(data, 4, "a metadata context reply");
  return {
    id: viewOf(data).getUint32(0),
    name: decodeNbdString(data.subarray(4), "the context name"),
  };
}

/** An `NBD_REP_SERVER` reply of `NBD_OPT_LIST`. */
export interface NbdExportEntry {
  /** The export name to pass to `NBD_OPT_GO`. */
  name: string;
  /** Free text after the name, often empty. */
  description: string;
}

/**
 * Encodes the data of an `NBD_REP_SERVER` reply (server side): u32 name length, name,
 * description.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeServerReply, encodeServerReply } from "./nbd_protocol.ts";
 *
 * assert.deepEqual(decodeServerReply(encodeServerReply({ name: "a", description: "b" })), {
 *   name: "a",
 *   description: "b",
 * });
 * ```
 */
export function encodeServerReply(entry: NbdExportEntry): Uint8Array<ArrayBuffer> {
  const name = encodeString(entry.name, "the export name");
  const description = encodeString(entry.description, "the export description");
  const bytes = new Uint8Array(4 + name.byteLength + description.byteLength);
  viewOf(bytes).setUint32(0, name.byteLength);
  bytes.set(name, 4);
  bytes.set(description, 4 + name.byteLength);
  return bytes;
}

/**
 * Decodes the data of an `NBD_REP_SERVER` reply.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeServerReply } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeServerReply(new Uint8Array([0, 0, 0, 5, 65])), {
 *   reason: "malformed",
 * });
 * ```
 *
 * @throws {NbdError} "malformed".
 */
export function decodeServerReply(data: Uint8Array): NbdExportEntry {
  need(data, 4, "an export list entry");
  const length = viewOf(data).getUint32(0);
  need(data, 4 + length, "an export list entry");
  return {
    name: decodeNbdString(data.subarray(4, 4 + length), "the export name"),
    description: decodeNbdString(data.subarray(4 + length), "the export description"),
  };
}

/**
 * Encodes the reply to `NBD_OPT_EXPORT_NAME` (server side): u64 size, u16 flags, then 124
 * zero bytes unless the client set `NBD_FLAG_C_NO_ZEROES`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeExportNameReply } from "./nbd_protocol.ts";
 *
 * assert.equal(encodeExportNameReply(4096, 1, true).byteLength, 10);
 * assert.equal(encodeExportNameReply(4096, 1, false).byteLength, 134);
 * ```
 */
export function encodeExportNameReply(
  size: number,
  flags: number,
  noZeroes: boolean,
): Uint8Array<ArrayBuffer> {
  checkU64(size, "the export size");
  checkU16(flags, "the transmission flags");
  const bytes = new Uint8Array(NBD_EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : 124));
  const view = viewOf(bytes);
  setU64(view, 0, size);
  view.setUint16(8, flags);
  return bytes;
}

/**
 * Decodes the first 10 bytes of the reply to `NBD_OPT_EXPORT_NAME`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeExportNameReply, encodeExportNameReply } from "./nbd_protocol.ts";
 *
 * assert.deepEqual(decodeExportNameReply(encodeExportNameReply(4096, 3, true)), {
 *   size: 4096,
 *   flags: 3,
 * });
 * ```
 *
 * @throws {NbdError} "malformed".
 */
export function decodeExportNameReply(bytes: Uint8Array): { size: number; flags: number } {
  need(bytes, NBD_EXPORT_NAME_REPLY_SIZE, "the export reply");
  const view = viewOf(bytes);
  return { size: getU64(view, 0, "the export size"), flags: view.getUint16(8) };
}

// ---------------------------------------------------------------------------------------
// Transmission

/** A transmission request header. */
export interface NbdRequest {
  /** {@linkcode NbdCmdFlag} bits. */
  flags: number;
  /** An {@linkcode NbdCmd} value. */
  type: number;
  /** Opaque u64 the reply echoes (the spec's "handle"). */
  cookie: bigint;
  /** Byte offset in the export. */
  offset: number;
  /** Byte count (for a write, the length of the data that follows). */
  length: number;
}

/**
 * Encodes a 28-byte request header, into `target` when given (so a client can reuse one
 * buffer) or into a new array. The data of a write is sent after it.
 *
 * @example Reuse one header buffer
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeRequest, NbdCmd } from "./nbd_protocol.ts";
 *
 * const header = new Uint8Array(28);
 * encodeRequest({ flags: 0, type: NbdCmd.FLUSH, cookie: 7n, offset: 0, length: 0 }, header);
 * assert.equal(header[7], 3);
 * ```
 */
export function encodeRequest(request: NbdRequest, target?: Uint8Array): Uint8Array {
  checkU16(request.flags, "the command flags");
  checkU16(request.type, "the command type");
  checkU64(request.offset, "the offset");
  checkU32(request.length, "the length");
  const bytes = target ?? new Uint8Array(NBD_REQUEST_SIZE);
  if (bytes.byteLength < NBD_REQUEST_SIZE) {
    throw new RangeError(`Cannot encode a request: The target holds ${bytes.byteLength} bytes`);
  }
  const view = viewOf(bytes);
  view.setUint32(0, NBD_REQUEST_MAGIC);
  view.setUint16(4, request.flags);
  view.setUint16(6, request.type);
  view.setBigUint64(8, BigInt.asUintN(64, request.cookie));
  setU64(view, 16, request.offset);
  view.setUint32(24, request.length);
  return bytes;
}

/**
 * Decodes a 28-byte request header (server side).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeRequest } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeRequest(new Uint8Array(28)), { reason: "bad-magic" });
 * ```
 *
 * @throws {NbdError} "bad-magic" or "malformed".
 */
export function decodeRequest(bytes: Uint8Array): NbdRequest {
  need(bytes, NBD_REQUEST_SIZE, "a request");
  const view = viewOf(bytes);
  const magic = view.getUint32(0);
  if (magic !== NBD_REQUEST_MAGIC) {
    throw new NbdError(
      "bad-magic",
      `Cannot decode a request: Its magic is 0x${magic.toString(16)}, not 0x25609513`,
    );
  }
  return {
    flags: view.getUint16(4),
    type: view.getUint16(6),
    cookie: view.getBigUint64(8),
    offset: getU64(view, 16, "the request offset"),
    length: view.getUint32(24),
  };
}

/** A simple reply. */
export interface NbdSimpleReply {
  /** 0, or an {@linkcode NbdErrno} value. */
  error: number;
  /** The cookie of the request this answers. */
  cookie: bigint;
}

/**
 * Encodes a 16-byte simple reply (server side); the data of a read follows it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeSimpleReply, encodeSimpleReply } from "./nbd_protocol.ts";
 *
 * assert.deepEqual(decodeSimpleReply(encodeSimpleReply(22, 9n)), { error: 22, cookie: 9n });
 * ```
 */
export function encodeSimpleReply(error: number, cookie: bigint): Uint8Array<ArrayBuffer> {
  checkU32(error, "the error");
  const bytes = new Uint8Array(NBD_SIMPLE_REPLY_SIZE);
  const view = viewOf(bytes);
  view.setUint32(0, NBD_SIMPLE_REPLY_MAGIC);
  view.setUint32(4, error);
  view.setBigUint64(8, BigInt.asUintN(64, cookie));
  return bytes;
}

/**
 * Decodes a 16-byte simple reply.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeSimpleReply } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeSimpleReply(new Uint8Array(16)), { reason: "bad-magic" });
 * ```
 *
 * @throws {NbdError} "bad-magic" or "malformed".
 */
export function decodeSimpleReply(bytes: Uint8Array): NbdSimpleReply {
  need(bytes, NBD_SIMPLE_REPLY_SIZE, "a simple reply");
  const view = viewOf(bytes);
  const magic = view.getUint32(0);
  if (magic !== NBD_SIMPLE_REPLY_MAGIC) {
    throw new NbdError(
      "bad-magic",
      `Cannot decode a simple reply: Its magic is 0x${magic.toString(16)}, not 0x67446698`,
    );
  }
  return { error: view.getUint32(4), cookie: view.getBigUint64(8) };
}

/** A structured reply chunk header. */
export interface NbdChunkHeader {
  /** {@linkcode NbdReplyFlag} bits. */
  flags: number;
  /** An {@linkcode NbdReplyType} value. */
  type: number;
  /** The cookie of the request this answers. */
  cookie: bigint;
  /** Length of the payload that follows. */
  length: number;
}

/**
 * Encodes a 20-byte structured chunk header (server side), into `target` when given.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeChunkHeader, encodeChunkHeader, NbdReplyFlag, NbdReplyType } from "./nbd_protocol.ts";
 *
 * const header = { flags: NbdReplyFlag.DONE, type: NbdReplyType.NONE, cookie: 1n, length: 0 };
 * assert.deepEqual(decodeChunkHeader(encodeChunkHeader(header)), header);
 * ```
 */
export function encodeChunkHeader(header: NbdChunkHeader, target?: Uint8Array): Uint8Array {
  checkU16(header.flags, "the chunk flags");
  checkU16(header.type, "the chunk type");
  checkU32(header.length, "the chunk length");
  const bytes = target ?? new Uint8Array(NBD_CHUNK_HEADER_SIZE);
  if (bytes.byteLength < NBD_CHUNK_HEADER_SIZE) {
    throw new RangeError(
      `Cannot encode a chunk header: The target holds ${bytes.byteLength} bytes`,
    );
  }
  const view = viewOf(bytes);
  view.setUint32(0, NBD_STRUCTURED_REPLY_MAGIC);
  view.setUint16(4, header.flags);
  view.setUint16(6, header.type);
  view.setBigUint64(8, BigInt.asUintN(64, header.cookie));
  view.setUint32(16, header.length);
  return bytes;
}

/**
 * Decodes a 20-byte structured chunk header.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeChunkHeader } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeChunkHeader(new Uint8Array(20)), { reason: "bad-magic" });
 * ```
 *
 * @throws {NbdError} "bad-magic" or "malformed".
 */
export function decodeChunkHeader(bytes: Uint8Array): NbdChunkHeader {
  need(bytes, NBD_CHUNK_HEADER_SIZE, "a structured reply chunk");
  const view = viewOf(bytes);
  const magic = view.getUint32(0);
  if (magic !== NBD_STRUCTURED_REPLY_MAGIC) {
    throw new NbdError(
      "bad-magic",
      `Cannot decode a structured reply chunk: Its magic is 0x${
        magic.toString(16)
      }, not 0x668e33ef`,
    );
  }
  return {
    flags: view.getUint16(4),
    type: view.getUint16(6),
    cookie: view.getBigUint64(8),
    length: view.getUint32(16),
  };
}

/**
 * Encodes the 8-byte offset that starts an `OFFSET_DATA` payload (the data follow it).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeOffsetDataPrefix } from "./nbd_protocol.ts";
 *
 * assert.deepEqual([...encodeOffsetDataPrefix(256)], [0, 0, 0, 0, 0, 0, 1, 0]);
 * ```
 */
export function encodeOffsetDataPrefix(offset: number): Uint8Array<ArrayBuffer> {
  checkU64(offset, "the data offset");
  const bytes = new Uint8Array(8);
  setU64(viewOf(bytes), 0, offset);
  return bytes;
}

/**
 * Decodes the offset at the start of an `OFFSET_DATA` payload.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeOffsetDataPrefix, encodeOffsetDataPrefix } from "./nbd_protocol.ts";
 *
 * assert.equal(decodeOffsetDataPrefix(encodeOffsetDataPrefix(2 ** 40)), 2 ** 40);
 * ```
 *
 * @throws {NbdError} "malformed".
 */
export function decodeOffsetDataPrefix(bytes: Uint8Array): number {
  need(bytes, 8, "an OFFSET_DATA chunk");
  return getU64(viewOf(bytes), 0, "the data offset");
}

/** The payload of an `OFFSET_HOLE` chunk. */
export interface NbdOffsetHole {
  /** Absolute offset of the hole in the export. */
  offset: number;
  /** Hole size in bytes (never 0). */
  size: number;
}

/**
 * Encodes the 12-byte payload of an `OFFSET_HOLE` chunk (server side).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeOffsetHole, encodeOffsetHole } from "./nbd_protocol.ts";
 *
 * assert.deepEqual(decodeOffsetHole(encodeOffsetHole({ offset: 4096, size: 512 })), {
 *   offset: 4096,
 *   size: 512,
 * });
 * ```
 */
export function encodeOffsetHole(hole: NbdOffsetHole): Uint8Array<ArrayBuffer> {
  checkU64(hole.offset, "the hole offset");
  checkU32(hole.size, "the hole size");
  const bytes = new Uint8Array(12);
  const view = viewOf(bytes);
  setU64(view, 0, hole.offset);
  view.setUint32(8, hole.size);
  return bytes;
}

/**
 * Decodes the payload of an `OFFSET_HOLE` chunk: it must be exactly 12 bytes with a
 * nonzero size.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeOffsetHole } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeOffsetHole(new Uint8Array(8)), { reason: "malformed" });
 * assert.throws(() => decodeOffsetHole(new Uint8Array(12)), { reason: "malformed" });
 * ```
 *
 * @throws {NbdError} "malformed".
 */
export function decodeOffsetHole(payload: Uint8Array): NbdOffsetHole {
  if (payload.byteLength !== 12) {
    throw new NbdError(
      "malformed",
      `Cannot decode an OFFSET_HOLE chunk: Its payload has ${payload.byteLength} bytes instead of 12`,
    );
  }
  const view = viewOf(payload);
  const size = view.getUint32(8);
  if (size === 0) {
    throw new NbdError("malformed", "Cannot decode an OFFSET_HOLE chunk: Its size is 0");
  }
  return { offset: getU64(view, 0, "the hole offset"), size };
}

/** The payload of an error chunk. */
export interface NbdErrorChunk {
  /** An {@linkcode NbdErrno} value (never 0). */
  error: number;
  /** Human-readable message, possibly empty. */
  message: string;
  /** The offset of an `ERROR_OFFSET` chunk. */
  offset?: number;
}

/**
 * Encodes the payload of an `ERROR` chunk, or of an `ERROR_OFFSET` chunk when `offset`
 * is set (server side).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeErrorChunk, encodeErrorChunk, NbdReplyType } from "./nbd_protocol.ts";
 *
 * const payload = encodeErrorChunk({ error: 5, message: "bad sector", offset: 512 });
 * assert.deepEqual(decodeErrorChunk(NbdReplyType.ERROR_OFFSET, payload), {
 *   error: 5,
 *   message: "bad sector",
 *   offset: 512,
 * });
 * ```
 */
export function encodeErrorChunk(chunk: NbdErrorChunk): Uint8Array<ArrayBuffer> {
  checkU32(chunk.error, "the error");
  const message = encodeString(chunk.message, "the error message");
  const withOffset = chunk.offset !== undefined;
  const bytes = new Uint8Array(6 + message.byteLength + (withOffset ? 8 : 0));
  const view = viewOf(bytes);
  view.setUint32(0, chunk.error);
  view.setUint16(4, message.byteLength);
  bytes.set(message, 6);
  if (chunk.offset !== undefined) {
    checkU64(chunk.offset, "the error offset");
    setU64(view, 6 + message.byteLength, chunk.offset);
  }
  return bytes;
}

/**
 * Decodes the payload of an error chunk (any chunk type with bit 15 set). The message
 * length must fit the payload; an `ERROR_OFFSET` chunk also carries a u64 offset. Invalid
 * UTF-8 in the message is replaced rather than rejected: it is only for display.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeErrorChunk, NbdReplyType } from "./nbd_protocol.ts";
 *
 * // The message length (255) does not fit the 7-byte payload.
 * const payload = new Uint8Array([0, 0, 0, 5, 0, 255, 65]);
 * assert.throws(() => decodeErrorChunk(NbdReplyType.ERROR, payload), { reason: "malformed" });
 * ```
 *
 * @throws {NbdError} "malformed".
 */
export function decodeErrorChunk(type: number, payload: Uint8Array): NbdErrorChunk {
  const what = `an ${nbdChunkTypeName(type)} chunk`;
  const extra = type === NbdReplyType.ERROR_OFFSET ? 8 : 0;
  need(payload, 6 + extra, what);
  const view = viewOf(payload);
  const error = view.getUint32(0);
  const length = view.getUint16(4);
  if (6 + length + extra > payload.byteLength) {
    throw new NbdError(
      "malformed",
      `Cannot decode ${what}: Its message length ${length} does not fit its ${payload.byteLength}-byte payload`,
    );
  }
  const message = new TextDecoder().decode(payload.subarray(6, 6 + length));
  if (type !== NbdReplyType.ERROR_OFFSET) return { error, message };
  return { error, message, offset: getU64(view, 6 + length, "the error offset") };
}

/** One block status descriptor. */
export interface NbdBlockDescriptor {
  /** Extent length in bytes (never 0). */
  length: number;
  /** Status flags; their meaning depends on the context. */
  flags: number;
}

/** The payload of a `BLOCK_STATUS` chunk. */
export interface NbdBlockStatusChunk {
  /** The id the server gave the context in reply to `NBD_OPT_SET_META_CONTEXT`. */
  contextId: number;
  /** Consecutive extents from the request offset. */
  descriptors: NbdBlockDescriptor[];
}

/**
 * Encodes the payload of a `BLOCK_STATUS` chunk (server side): u32 context id, then
 * (u32 length, u32 flags) descriptors.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeBlockStatusChunk, encodeBlockStatusChunk } from "./nbd_protocol.ts";
 *
 * const chunk = { contextId: 1, descriptors: [{ length: 65536, flags: 0 }, { length: 512, flags: 3 }] };
 * assert.deepEqual(decodeBlockStatusChunk(encodeBlockStatusChunk(chunk)), chunk);
 * ```
 */
export function encodeBlockStatusChunk(chunk: NbdBlockStatusChunk): Uint8Array<ArrayBuffer> {
  checkU32(chunk.contextId, "the context id");
  const bytes = new Uint8Array(4 + 8 * chunk.descriptors.length);
  const view = viewOf(bytes);
  view.setUint32(0, chunk.contextId);
  chunk.descriptors.forEach((descriptor, i) => {
    checkU32(descriptor.length, "an extent length");
    checkU32(descriptor.flags, "extent flags");
    view.setUint32(4 + 8 * i, descriptor.length);
    view.setUint32(8 + 8 * i, descriptor.flags);
  });
  return bytes;
}

/**
 * Decodes the payload of a `BLOCK_STATUS` chunk: its length must be 4 plus a positive
 * multiple of 8, and no descriptor may have length 0.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeBlockStatusChunk } from "./nbd_protocol.ts";
 *
 * assert.throws(() => decodeBlockStatusChunk(new Uint8Array(10)), { reason: "malformed" });
 * assert.throws(() => decodeBlockStatusChunk(new Uint8Array(12)), { reason: "malformed" });
 * ```
 *
 * @throws {NbdError} "malformed".
 */
export function decodeBlockStatusChunk(payload: Uint8Array): NbdBlockStatusChunk {
  if (payload.byteLength < 12 || (payload.byteLength - 4) % 8 !== 0) {
    throw new NbdError(
      "malformed",
      `Cannot decode a BLOCK_STATUS chunk: A ${payload.byteLength}-byte payload is not 4 + 8 * n bytes with n > 0`,
    );
  }
  const view = viewOf(payload);
  const descriptors: NbdBlockDescriptor[] = [];
  for (let at = 4; at < payload.byteLength; at += 8) {
    const length = view.getUint32(at);
    if (length === 0) {
      throw new NbdError(
        "malformed",
        `Cannot decode a BLOCK_STATUS chunk: Descriptor ${(at - 4) / 8} has length 0`,
      );
    }
    descriptors.push({ length, flags: view.getUint32(at + 4) });
  }
  return { contextId: view.getUint32(0), descriptors };
}
