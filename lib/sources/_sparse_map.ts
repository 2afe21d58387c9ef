// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Where a file has data, from `lseek(SEEK_DATA / SEEK_HOLE)` through libc (internal).
 *
 * Deno has no SEEK_DATA, so this calls libc over FFI, which needs `--allow-ffi`. Without
 * that permission, or where libc cannot be loaded, {@linkcode SparseMap.open} returns
 * `undefined` and callers read everything (zero blocks are still detected by scanning).
 *
 * @module
 */
import { fileURLToPath } from "node:url";

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6; // SEEK_DATA past the last data
const O_RDONLY = 0;
const O_CLOEXEC = 0o2000000; // children such as qemu-nbd must not inherit the descriptor

const symbols = {
  open: { parameters: ["buffer", "i32"], result: "i32" },
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  close: { parameters: ["i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const;

let libc: Deno.DynamicLibrary<typeof symbols> | null | undefined;

function loadLibc(): Deno.DynamicLibrary<typeof symbols> | null {
  if (libc !== undefined) return libc;
  libc = null;
  if (Deno.build.os !== "linux") return libc;
  if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return libc;
  try {
    libc = Deno.dlopen("libc.so.6", symbols);
  } catch {
    libc = null;
  }
  return libc;
}

/**
 * The data and hole boundaries of one file.
 *
 * @example Skip the hole before the data (Linux, with `--allow-ffi`)
 * ```ts
 * import assert from "node:assert/strict";
 * import { SparseMap } from "./_sparse_map.ts";
 *
 * const path = await Deno.makeTempFile();
 * using file = await Deno.open(path, { write: true });
 * await file.truncate(1 << 20);
 * await file.seek(1 << 19, Deno.SeekMode.Start);
 * await file.write(new Uint8Array(4096).fill(1));
 * const map = SparseMap.open(path);
 * assert.ok(map !== undefined);
 * assert.equal(map.nextData(0), 1 << 19);
 * assert.ok(map.nextHole(1 << 19) > 1 << 19);
 * map.close();
 * await Deno.remove(path);
 * ```
 */
export class SparseMap {
  #fd: number;
  #libc: Deno.DynamicLibrary<typeof symbols>;

  private constructor(fd: number, library: Deno.DynamicLibrary<typeof symbols>) {
    this.#fd = fd;
    this.#libc = library;
  }

  /** Opens `path` for seeking, or `undefined` when SEEK_DATA cannot be used. */
  static open(path: string | URL): SparseMap | undefined {
    const library = loadLibc();
    if (library === null) return undefined;
    const name = path instanceof URL ? fileURLToPath(path) : path;
    const fd = library.symbols.open(new TextEncoder().encode(`${name}\0`), O_RDONLY | O_CLOEXEC);
    return fd < 0 ? undefined : new SparseMap(fd, library);
  }

  /** The first data offset at or after `offset`, or `undefined` when only holes follow. */
  nextData(offset: number): number | undefined {
    const result = Number(this.#libc.symbols.lseek(this.#fd, BigInt(offset), SEEK_DATA));
    if (result >= 0) return result;
    const pointer = this.#libc.symbols.__errno_location();
    const errno = pointer === null ? 0 : new Deno.UnsafePointerView(pointer).getInt32();
    if (errno === ENXIO) return undefined;
    return offset; // not supported here: treat everything as data
  }

  /** The first hole offset at or after `offset` (the file size when data runs to the end). */
  nextHole(offset: number): number {
    const result = Number(this.#libc.symbols.lseek(this.#fd, BigInt(offset), SEEK_HOLE));
    return result >= 0 ? result : Number.MAX_SAFE_INTEGER;
  }

  /** Closes the file descriptor; the map must not be used afterwards. */
  close(): void {
    this.#libc.symbols.close(this.#fd);
  }
}
