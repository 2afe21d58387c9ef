// Copyright 2026 the vmabackup authors. MIT license.
/**
 * How the names stored in an archive become file names in `extract`'s TARGETDIR, so that
 * every archive the reader accepts extracts: a device `NAME` is `disk-NAME.FMT` (the VM
 * state `vmstate.bin`), and a config keeps its name unless that name could be a device
 * file's, in which case it gets a `config-` prefix. Device files and config files can
 * therefore never collide, and `backup` refuses config names that would need the prefix.
 *
 * @module
 */
import { VMSTATE_NAME } from "../vma/format.ts";
import { printableName } from "../vma/header.ts";
import type { VmaDeviceRecord } from "../vma/records.ts";
import type { ImageFormat } from "../qemu/image_format.ts";
import { CliError, ExitCode } from "./errors.ts";

/** Longest file name Linux file systems take (NAME_MAX), in bytes. */
const NAME_MAX = 255;
const VMSTATE_FILE = "vmstate.bin";
/** Names a device file can have, behind any number of `config-` prefixes. */
const DEVICE_FILE_LIKE = /^(?:config-)*(?:disk-|vmstate\.bin$)/s;

/**
 * Refuses a name from the archive that cannot be a file name in TARGETDIR: one that would
 * leave it (`/`, `.`, `..`), or is longer than a file name can be (255 bytes). Exit code 3.
 *
 * @example Names that would leave the directory
 * ```ts
 * import assert from "node:assert/strict";
 * import { safeFileName } from "./file_names.ts";
 *
 * assert.equal(safeFileName("config", "qemu-server.conf"), "qemu-server.conf");
 * assert.throws(() => safeFileName("config", "../../etc/passwd"), { exitCode: 3 });
 * assert.throws(() => safeFileName("device", ".."), /a device named '\.\.'/);
 * assert.throws(() => safeFileName("device", "x".repeat(256)), /too long for a file name/);
 * ```
 */
export function safeFileName(kind: string, name: string, fileName = name): string {
  if (name === "" || name === "." || name === ".." || name.includes("/") || name.includes("\0")) {
    throw new CliError(
      ExitCode.corrupt,
      `the archive has a ${kind} named '${
        printableName(name)
      }', which would leave the target directory`,
    );
  }
  const length = new TextEncoder().encode(fileName).byteLength;
  if (length > NAME_MAX) {
    throw new CliError(
      ExitCode.corrupt,
      `the archive has a ${kind} named '${
        printableName(name)
      }', too long for a file name (${length} bytes, at most ${NAME_MAX})`,
    );
  }
  return fileName;
}

/**
 * The file name of a device inside TARGETDIR, as `vma extract` names it.
 *
 * @example Disk images and the VM state
 * ```ts
 * import assert from "node:assert/strict";
 * import { deviceFileName } from "./file_names.ts";
 *
 * const disk = { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 };
 * assert.equal(deviceFileName(disk), "disk-drive-scsi0.raw");
 * assert.equal(deviceFileName(disk, "qcow2"), "disk-drive-scsi0.qcow2");
 * assert.equal(deviceFileName({ ...disk, name: "vmstate" }), "vmstate.bin");
 * ```
 */
export function deviceFileName(device: VmaDeviceRecord, format: ImageFormat = "raw"): string {
  if (device.name === VMSTATE_NAME) return VMSTATE_FILE;
  return safeFileName("device", device.name, `disk-${device.name}.${format}`);
}

/**
 * True for a config name that could be taken for a device file (`disk-...`, `vmstate.bin`,
 * or such a name behind `config-` prefixes): `extract` writes it as `config-NAME`, and
 * `backup` refuses it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { isDeviceFileLike } from "./file_names.ts";
 *
 * assert.ok(isDeviceFileLike("disk-drive-scsi0.raw"));
 * assert.ok(isDeviceFileLike("config-vmstate.bin"));
 * assert.ok(!isDeviceFileLike("qemu-server.conf"));
 * assert.ok(!isDeviceFileLike("config-qemu-server.conf"));
 * ```
 */
export function isDeviceFileLike(name: string): boolean {
  return DEVICE_FILE_LIKE.test(name);
}

/**
 * The file name of a config inside TARGETDIR: its own name, or `config-NAME` when that name
 * could be a device file's. No config ever gets a device file's name, and two configs never
 * get the same file name.
 *
 * @example A config named like a disk image
 * ```ts
 * import assert from "node:assert/strict";
 * import { configFileName } from "./file_names.ts";
 *
 * assert.equal(configFileName("qemu-server.conf"), "qemu-server.conf");
 * assert.equal(configFileName("disk-drive-scsi0.raw"), "config-disk-drive-scsi0.raw");
 * assert.equal(configFileName("config-disk-drive-scsi0.raw"), "config-config-disk-drive-scsi0.raw");
 * assert.equal(configFileName("config-notes.txt"), "config-notes.txt");
 * ```
 */
export function configFileName(name: string): string {
  return safeFileName("config", name, isDeviceFileLike(name) ? `config-${name}` : name);
}

/**
 * The device `wanted` names: the one of exactly that name, else the one named
 * `drive-WANTED` (so `scsi0` means `drive-scsi0` unless a device is named `scsi0`).
 *
 * @example The exact name wins
 * ```ts
 * import assert from "node:assert/strict";
 * import { findDevice } from "./file_names.ts";
 *
 * const device = (devId: number, name: string) => ({ type: "device" as const, devId, name, size: 1 });
 * const devices = [device(1, "drive-scsi0"), device(2, "scsi0"), device(3, "drive-efidisk0")];
 * assert.equal(findDevice(devices, "scsi0")?.devId, 2);
 * assert.equal(findDevice(devices, "drive-scsi0")?.devId, 1);
 * assert.equal(findDevice(devices, "efidisk0")?.devId, 3);
 * assert.equal(findDevice(devices, "scsi1"), undefined);
 * ```
 */
export function findDevice(
  devices: VmaDeviceRecord[],
  wanted: string,
): VmaDeviceRecord | undefined {
  return devices.find((device) => device.name === wanted) ??
    devices.find((device) => device.name === `drive-${wanted}`);
}
