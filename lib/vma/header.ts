// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Encoding and decoding of the VMA archive header: the fixed 12 KiB part and the blob area
 * with config files and device names.
 *
 * @example Encode a header and decode it again
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeHeader, encodeHeader } from "./header.ts";
 *
 * const bytes = encodeHeader({
 *   uuid: "04fc12eb-0fed-4322-9aaa-f4e412f68096",
 *   ctime: 1635680622,
 *   configs: [{ name: "qemu-server.conf", data: new TextEncoder().encode("cores: 1\n") }],
 *   devices: [{ devId: 1, name: "drive-scsi0", size: 1 << 20 }],
 * });
 * const header = decodeHeader(bytes);
 * assert.equal(header.devices[0]?.name, "drive-scsi0");
 * assert.equal(header.headerSize, bytes.byteLength);
 * ```
 *
 * @module
 */
import { bytesToUuid, md5, utf8, uuidToBytes } from "../_bytes.ts";
import { VmaFormatError } from "./errors.ts";
import {
  DEV_INFO_SIZE,
  HEADER_FIXED_SIZE,
  HeaderOffset,
  MAX_BLOB_SIZE,
  MAX_CONFIGS,
  MAX_DEV_ID,
  MAX_DEVICE_SIZE,
  VMA_MAGIC,
  VMA_VERSION,
  VMSTATE_NAME,
  WRITER_MAX_HEADER_SIZE,
} from "./format.ts";

/** The content of an archive header. */
export interface VmaHeader {
  /** Archive UUID in the canonical `8-4-4-4-12` lower-case hex form. */
  uuid: string;
  /** Creation time in Unix seconds. */
  ctime: number;
  /** Configuration files stored in the header. */
  configs: { name: string; data: Uint8Array }[];
  /** Devices of the archive: id (1 to 254), name and exact size in bytes. */
  devices: { devId: number; name: string; size: number }[];
}

/** A decoded header, with its size on disk. */
export interface DecodedVmaHeader extends VmaHeader {
  /** Total header length in bytes; the first extent starts here. */
  headerSize: number;
}

const BLOB_GROWTH = 512;

/** Packs blobs the way the reference writer does, so headers come out byte-identical. */
class BlobArea {
  bytes = new Uint8Array(0);
  /** Next free position. Position 0 stays unused so that pointer 0 can mean "none". */
  position = 1;

  add(data: Uint8Array): number {
    const needed = this.position + data.byteLength + 2;
    let size = this.bytes.byteLength;
    // The reference grows by whole 512-byte steps sized for this blob alone.
    while (size < needed) size += Math.ceil((data.byteLength + 2) / BLOB_GROWTH) * BLOB_GROWTH;
    if (size !== this.bytes.byteLength) {
      const grown = new Uint8Array(size);
      grown.set(this.bytes);
      this.bytes = grown;
    }
    const start = this.position;
    this.bytes[start] = data.byteLength & 0xff; // blob lengths are little-endian
    this.bytes[start + 1] = data.byteLength >>> 8;
    this.bytes.set(data, start + 2);
    this.position = needed;
    return start;
  }

  addString(text: string): number {
    const encoded = utf8.encoder.encode(text);
    const terminated = new Uint8Array(encoded.byteLength + 1); // NUL counts in the length
    terminated.set(encoded);
    return this.add(terminated);
  }
}

/**
 * Throws a `RangeError` or `TypeError` unless `header` can be stored as a VMA header.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { validateHeader } from "./header.ts";
 *
 * const uuid = "04fc12eb-0fed-4322-9aaa-f4e412f68096";
 * const devices = [{ devId: 1, name: "drive-scsi0", size: 512 }];
 * validateHeader({ uuid, ctime: 0, configs: [], devices }); // does not throw
 * assert.throws(() => validateHeader({ uuid, ctime: 0, configs: [], devices: [] }), TypeError);
 * assert.throws(() => validateHeader({ uuid: "nope", ctime: 0, configs: [], devices }), /UUID/);
 * ```
 */
export function validateHeader(header: VmaHeader): void {
  uuidToBytes(header.uuid); // throws a TypeError naming a malformed UUID
  if (header.configs.length > MAX_CONFIGS) {
    throw new RangeError(
      `Cannot write the VMA header: ${header.configs.length} configs exceed the limit of ${MAX_CONFIGS}`,
    );
  }
  if (header.configs.length === 0 && header.devices.length === 0) {
    throw new TypeError("Cannot write the VMA header: An archive needs a config or a device");
  }
  const configNames = new Set<string>();
  for (const config of header.configs) {
    validateConfig(config, configNames);
    configNames.add(config.name);
  }
  const devIds = new Set<number>();
  const deviceNames = new Set<string>();
  for (const device of header.devices) {
    validateDevice(device, devIds, deviceNames);
    devIds.add(device.devId);
    deviceNames.add(device.name);
  }
}

/**
 * Throws unless `config` can be stored next to configs named `taken`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { validateConfig } from "./header.ts";
 *
 * const taken = new Set(["qemu-server.conf"]);
 * const data = new TextEncoder().encode("enable: 1\n");
 * validateConfig({ name: "qemu-server.fw", data }, taken);
 * assert.throws(() => validateConfig({ name: "qemu-server.conf", data }, taken), TypeError);
 * const empty = { name: "empty.conf", data: new Uint8Array() };
 * assert.throws(() => validateConfig(empty, taken), RangeError);
 * ```
 */
export function validateConfig(config: VmaHeader["configs"][number], taken: Set<string>): void {
  const { name, data } = config;
  checkName("config", name);
  if (taken.has(name)) {
    throw new TypeError(`Cannot add config "${name}": A config with this name was already added`);
  }
  if (data.byteLength === 0 || data.byteLength > MAX_BLOB_SIZE) {
    throw new RangeError(
      `Cannot add config "${name}": Its size ${data.byteLength} is not within 1..${MAX_BLOB_SIZE} bytes`,
    );
  }
}

/**
 * Throws unless `device` can be stored next to the devices with ids and names taken.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { validateDevice } from "./header.ts";
 *
 * const ids = new Set([1]);
 * const names = new Set(["drive-scsi0"]);
 * const device = { devId: 2, name: "drive-scsi1", size: 65536 };
 * validateDevice(device, ids, names); // does not throw
 * assert.throws(() => validateDevice({ ...device, devId: 1 }, ids, names), /already in use/);
 * assert.throws(() => validateDevice({ ...device, devId: 255 }, ids, names), RangeError);
 * assert.throws(() => validateDevice({ ...device, size: 0 }, ids, names), RangeError);
 * ```
 */
export function validateDevice(
  device: VmaHeader["devices"][number],
  takenIds: Set<number>,
  takenNames: Set<string>,
): void {
  const { devId, name, size } = device;
  checkName("device", name);
  if (!Number.isInteger(devId) || devId < 1 || devId > MAX_DEV_ID) {
    throw new RangeError(
      `Cannot add device "${name}": Device id ${devId} is not within 1..${MAX_DEV_ID}`,
    );
  }
  if (takenIds.has(devId)) {
    throw new TypeError(`Cannot add device "${name}": Device id ${devId} is already in use`);
  }
  if (takenNames.has(name)) {
    throw new TypeError(`Cannot add device "${name}": A device with this name was already added`);
  }
  if (!Number.isSafeInteger(size) || size < 1 || size > MAX_DEVICE_SIZE) {
    throw new RangeError(
      `Cannot add device "${name}": Its size ${size} is not within 1..${MAX_DEVICE_SIZE} bytes (VMA cannot store an empty device)`,
    );
  }
}

function checkName(kind: string, name: string): void {
  const length = utf8.encoder.encode(name).byteLength;
  if (length === 0 || length >= MAX_BLOB_SIZE || name.includes("\0")) {
    throw new TypeError(
      `Cannot add ${kind} "${printableName(name)}": A name must be 1..${
        MAX_BLOB_SIZE - 1
      } bytes without NUL`,
    );
  }
  if (CONTROL.test(name)) {
    throw new TypeError(
      `Cannot add ${kind} "${printableName(name)}": A name must not contain control characters`,
    );
  }
}

/** Control characters: C0 (below 0x20), DEL and C1 (U+0080 to U+009F). */
// deno-lint-ignore no-control-regex -- control characters are what it finds
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
// deno-lint-ignore no-control-regex -- control characters are what it finds
const CONTROLS = /[\u0000-\u001f\u007f-\u009f\\]/g;
/** Longest stretch of a name shown in a message. */
const SHOWN = 200;

/**
 * A name from an archive made safe to print: control characters (C0, DEL, C1) and
 * backslashes are escaped as `\xHH` and `\\`, so no name can start a line, move the
 * cursor or pass for another line of output; a name longer than 200 characters is cut.
 *
 * @example A name that tries to forge a line of `vma list`
 * ```ts
 * import assert from "node:assert/strict";
 * import { printableName } from "./header.ts";
 *
 * assert.equal(printableName("drive-scsi0\nDEV: forged"), "drive-scsi0\\x0aDEV: forged");
 * assert.equal(printableName("\x1b[2J"), "\\x1b[2J");
 * assert.equal(printableName("drive-scsi0"), "drive-scsi0");
 * assert.equal(printableName("x".repeat(300)).length, 200 + "... (300 characters)".length);
 * ```
 */
export function printableName(name: string): string {
  const escaped = (name.length > SHOWN ? name.slice(0, SHOWN) : name).replace(
    CONTROLS,
    (char) => char === "\\" ? "\\\\" : `\\x${char.charCodeAt(0).toString(16).padStart(2, "0")}`,
  );
  return name.length > SHOWN ? `${escaped}... (${name.length} characters)` : escaped;
}

/**
 * Throws a `RangeError` or `TypeError` unless configs and devices of these names fit one
 * archive header: at most 254 devices and 256 configs, valid unique names, config sizes of
 * 1 to 65535 bytes, and all of it within the 512 KiB header the reference writer allows.
 * For checking a backup before any output is opened, when the device sizes are not known
 * yet. Config names are stored as given (pass the base name of a path).
 *
 * @example 255 disks are too many
 * ```ts
 * import assert from "node:assert/strict";
 * import { checkHeaderLimits } from "./header.ts";
 *
 * const config = { name: "qemu-server.conf", data: new TextEncoder().encode("cores: 1\n") };
 * checkHeaderLimits([config], ["drive-scsi0", "drive-efidisk0"]); // fits
 * const disks = Array.from({ length: 255 }, (_, i) => `drive-scsi${i}`);
 * assert.throws(() => checkHeaderLimits([], disks), /255 devices exceed the limit of 254/);
 * const big = Array.from({ length: 9 }, (_, i) => ({ name: `${i}.conf`, data: new Uint8Array(65535) }));
 * assert.throws(() => checkHeaderLimits(big, []), /exceeds 524288 bytes/);
 * ```
 */
export function checkHeaderLimits(
  configs: VmaHeader["configs"],
  deviceNames: string[],
): void {
  if (deviceNames.length > MAX_DEV_ID) {
    throw new RangeError(
      `Cannot write the VMA header: ${deviceNames.length} devices exceed the limit of ${MAX_DEV_ID}`,
    );
  }
  const devices = deviceNames.map((name, i) => ({ devId: i + 1, name, size: 1 }));
  encodeHeader({ uuid: "00000000-0000-0000-0000-000000000000", ctime: 0, configs, devices });
}

/**
 * Encodes an archive header exactly as the Proxmox writer does: configs in order (name
 * blob, then data blob), then the device names in device-id order, blob area grown in
 * 512-byte steps, and the MD5 computed with its own field zeroed.
 *
 * @example One device: the fixed part and one 512-byte step of blobs
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeHeader } from "./header.ts";
 *
 * const bytes = encodeHeader({
 *   uuid: "04fc12eb-0fed-4322-9aaa-f4e412f68096",
 *   ctime: 1635680622,
 *   configs: [],
 *   devices: [{ devId: 1, name: "drive-scsi0", size: 65536 }],
 * });
 * assert.equal(bytes.byteLength, 12288 + 512);
 * assert.equal(new TextDecoder().decode(bytes.subarray(0, 4)), "VMA\0");
 * ```
 */
export function encodeHeader(header: VmaHeader): Uint8Array<ArrayBuffer> {
  validateHeader(header);
  const blobs = new BlobArea();
  const configPointers = header.configs.map(({ name, data }) => ({
    name: blobs.addString(name),
    data: blobs.add(data),
  }));
  const devices = [...header.devices].sort((a, b) => a.devId - b.devId);
  const devicePointers = devices.map((device) => blobs.addString(device.name));

  const headerSize = HEADER_FIXED_SIZE + blobs.bytes.byteLength;
  if (headerSize > WRITER_MAX_HEADER_SIZE) {
    throw new RangeError(
      `Cannot write the VMA header: Its size ${headerSize} exceeds ${WRITER_MAX_HEADER_SIZE} bytes`,
    );
  }
  const bytes = new Uint8Array(headerSize);
  const view = new DataView(bytes.buffer);
  view.setUint32(HeaderOffset.magic, VMA_MAGIC);
  view.setUint32(HeaderOffset.version, VMA_VERSION);
  bytes.set(uuidToBytes(header.uuid), HeaderOffset.uuid);
  view.setBigInt64(HeaderOffset.ctime, BigInt(Math.trunc(header.ctime)));
  view.setUint32(HeaderOffset.blobBufferOffset, HEADER_FIXED_SIZE);
  view.setUint32(HeaderOffset.blobBufferSize, blobs.position);
  view.setUint32(HeaderOffset.headerSize, headerSize);
  configPointers.forEach((pointers, slot) => {
    view.setUint32(HeaderOffset.configNames + 4 * slot, pointers.name);
    view.setUint32(HeaderOffset.configData + 4 * slot, pointers.data);
  });
  devices.forEach((device, index) => {
    const entry = HeaderOffset.devInfo + DEV_INFO_SIZE * device.devId;
    view.setUint32(entry, devicePointers[index]!);
    view.setBigUint64(entry + 8, BigInt(device.size));
  });
  bytes.set(blobs.bytes, HEADER_FIXED_SIZE);
  bytes.set(md5(bytes), HeaderOffset.md5);
  return bytes;
}

/**
 * Reads the header size from the first 12288 bytes, after checking the magic.
 * Throws a {@linkcode VmaFormatError} for anything that is not the start of a VMA header.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeHeader, headerSizeOf } from "./header.ts";
 *
 * const devices = [{ devId: 1, name: "drive-scsi0", size: 65536 }];
 * const bytes = encodeHeader({ uuid: crypto.randomUUID(), ctime: 0, configs: [], devices });
 * assert.equal(headerSizeOf(bytes.subarray(0, 12288), 1 << 20), bytes.byteLength);
 * assert.throws(() => headerSizeOf(new Uint8Array(12288), 1 << 20), { reason: "bad-magic" });
 * assert.throws(() => headerSizeOf(bytes, 12288), { reason: "bad-header-size" });
 * assert.throws(() => headerSizeOf(bytes.subarray(0, 100), 1 << 20), { reason: "truncated-header" });
 * ```
 */
export function headerSizeOf(fixed: Uint8Array, maxHeaderSize: number): number {
  if (fixed.byteLength < HEADER_FIXED_SIZE) {
    throw new VmaFormatError(
      "truncated-header",
      fixed.byteLength,
      "can't read vma header - got EOF",
    );
  }
  const view = new DataView(fixed.buffer, fixed.byteOffset, HEADER_FIXED_SIZE);
  if (view.getUint32(HeaderOffset.magic) !== VMA_MAGIC) {
    throw new VmaFormatError("bad-magic", 0, "not a vma file - wrong magic number");
  }
  const headerSize = view.getUint32(HeaderOffset.headerSize);
  if (headerSize <= HEADER_FIXED_SIZE || headerSize > maxHeaderSize) {
    throw new VmaFormatError(
      "bad-header-size",
      HeaderOffset.headerSize,
      `wrong vma header size ${headerSize} (must be above ${HEADER_FIXED_SIZE} and at most ${maxHeaderSize})`,
    );
  }
  return headerSize;
}

/**
 * Decodes and checks a complete header (`header_size` bytes). Follows the reference
 * reader's order of checks, and adds stricter ones where it would crash or silently skip.
 *
 * @example A flipped bit fails the checksum
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeHeader, encodeHeader } from "./header.ts";
 *
 * const devices = [{ devId: 1, name: "drive-scsi0", size: 65536 }];
 * const bytes = encodeHeader({ uuid: crypto.randomUUID(), ctime: 0, configs: [], devices });
 * assert.deepEqual(decodeHeader(bytes).devices, devices);
 * bytes[12288 + 5] ^= 1; // inside the device name
 * assert.throws(() => decodeHeader(bytes), { reason: "bad-header-checksum" });
 * ```
 */
export function decodeHeader(bytes: Uint8Array): DecodedVmaHeader {
  const headerSize = headerSizeOf(bytes, bytes.byteLength);
  if (headerSize !== bytes.byteLength) {
    throw new VmaFormatError(
      "truncated-header",
      bytes.byteLength,
      `can't read vma header data - got ${bytes.byteLength} of ${headerSize} bytes`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);

  const zeroed = bytes.slice(); // the checksum is computed with its own field zeroed
  zeroed.fill(0, HeaderOffset.md5, HeaderOffset.md5 + 16);
  const expected = md5(zeroed);
  const stored = bytes.subarray(HeaderOffset.md5, HeaderOffset.md5 + 16);
  if (expected.toHex() !== stored.toHex()) {
    throw new VmaFormatError("bad-header-checksum", HeaderOffset.md5, "wrong vma header chechsum");
  }
  const version = view.getUint32(HeaderOffset.version);
  if (version !== VMA_VERSION) {
    throw new VmaFormatError("bad-version", HeaderOffset.version, `wrong vma version ${version}`);
  }

  const blobOffset = view.getUint32(HeaderOffset.blobBufferOffset);
  const blobSize = view.getUint32(HeaderOffset.blobBufferSize);
  if (blobOffset < HEADER_FIXED_SIZE) {
    throw new VmaFormatError(
      "bad-blob-buffer",
      HeaderOffset.blobBufferOffset,
      `wrong vma blob buffer offset ${blobOffset}`,
    );
  }
  if (blobOffset + blobSize > headerSize) {
    throw new VmaFormatError(
      "bad-blob-buffer",
      HeaderOffset.blobBufferSize,
      `wrong vma blob buffer size ${blobOffset}/${blobSize}`,
    );
  }
  const blobs = parseBlobs(bytes, blobOffset, blobSize);

  const configs: DecodedVmaHeader["configs"] = [];
  const configNames = new Set<string>();
  for (let slot = 0; slot < MAX_CONFIGS; slot++) {
    const namePointer = view.getUint32(HeaderOffset.configNames + 4 * slot);
    const dataPointer = view.getUint32(HeaderOffset.configData + 4 * slot);
    if (namePointer === 0 || dataPointer === 0) continue;
    const name = blobString(blobs, namePointer);
    const data = blobs.get(dataPointer);
    if (name === undefined || data === undefined) {
      throw new VmaFormatError(
        "bad-config",
        HeaderOffset.configNames + 4 * slot,
        `vma contains invalid data pointers (config slot ${slot})`,
      );
    }
    if (CONTROL.test(name)) {
      throw new VmaFormatError(
        "bad-config",
        HeaderOffset.configNames + 4 * slot,
        `config name "${printableName(name)}" contains control characters`,
      );
    }
    if (configNames.has(name)) {
      throw new VmaFormatError(
        "bad-config",
        HeaderOffset.configNames + 4 * slot,
        `duplicate config name "${printableName(name)}"`,
      );
    }
    configNames.add(name);
    configs.push({ name, data });
  }

  const devices: DecodedVmaHeader["devices"] = [];
  const deviceNames = new Set<string>();
  // Slot 0 is never a device; the reference reader ignores it, and so do we.
  for (let devId = 1; devId < 256; devId++) {
    const entry = HeaderOffset.devInfo + DEV_INFO_SIZE * devId;
    const size = Number(view.getBigUint64(entry + 8));
    if (size === 0) continue;
    if (devId > MAX_DEV_ID) {
      throw new VmaFormatError("bad-device", entry, `device id ${devId} is reserved`);
    }
    const name = blobString(blobs, view.getUint32(entry));
    if (name === undefined) {
      throw new VmaFormatError("bad-device", entry, `invalid name pointer of device ${devId}`);
    }
    if (CONTROL.test(name)) {
      throw new VmaFormatError(
        "bad-device",
        entry,
        `name of device ${devId} "${printableName(name)}" contains control characters`,
      );
    }
    if (deviceNames.has(name)) {
      throw new VmaFormatError(
        "bad-device",
        entry,
        `duplicate device name "${printableName(name)}"`,
      );
    }
    if (size > MAX_DEVICE_SIZE && name !== VMSTATE_NAME) {
      throw new VmaFormatError(
        "bad-device",
        entry + 8,
        `device "${printableName(name)}" size ${size} is too big`,
      );
    }
    deviceNames.add(name);
    devices.push({ devId, name, size });
  }

  return {
    uuid: bytesToUuid(bytes.subarray(HeaderOffset.uuid, HeaderOffset.uuid + 16)),
    ctime: Number(view.getBigInt64(HeaderOffset.ctime)),
    configs,
    devices,
    headerSize,
  };
}

/** Walks the blob chain like the reference reader: pointer (relative offset) → payload. */
function parseBlobs(bytes: Uint8Array, blobOffset: number, blobSize: number) {
  const blobs = new Map<number, Uint8Array>();
  const end = blobOffset + blobSize;
  let position = blobOffset + 1;
  while (position + 2 <= end) {
    const length = bytes[position]! | (bytes[position + 1]! << 8);
    if (position + 2 + length <= end) {
      blobs.set(position - blobOffset, bytes.subarray(position + 2, position + 2 + length));
    }
    position += 2 + length;
  }
  return blobs;
}

/** A NUL-terminated UTF-8 string blob, or `undefined` if the pointer does not resolve. */
function blobString(blobs: Map<number, Uint8Array>, pointer: number): string | undefined {
  const blob = blobs.get(pointer);
  if (blob === undefined || blob.byteLength < 2 || blob[blob.byteLength - 1] !== 0) {
    return undefined;
  }
  const text = blob.subarray(0, blob.byteLength - 1);
  if (text.includes(0)) return undefined;
  try {
    return utf8.decoder.decode(text);
  } catch {
    return undefined;
  }
}
