// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Making finished outputs final so that they survive a power loss: the data are flushed to
 * disk first (`fdatasync`), then the file is renamed over its final name with one
 * `rename(2)` (which replaces an existing file atomically), then the directory is flushed
 * (`fsync`), so the rename itself is on disk. A crash at any moment leaves either the old
 * file or the complete new one under the final name, never a truncated or zero-filled one.
 *
 * @module
 */
import { dirname, join } from "node:path";

/** A finished file, written as `partial`, to become `target`. */
export interface PendingFile {
  /** Where the file was written. */
  partial: string;
  /** Its final name. */
  target: string;
  /** The open file, if the writer still has it: it is flushed and closed here. */
  file?: Deno.FsFile;
}

/**
 * Commits several finished files together: first every file's data are flushed, then each
 * is renamed to its target in the order given (one atomic `rename(2)` each, replacing what
 * was there), then each directory involved is flushed. Give sidecar files (an index) before
 * the file they describe, so that the main file never appears without them.
 *
 * @example Commit an archive and its index
 * ```ts
 * import assert from "node:assert/strict";
 * import { commitFiles } from "./durable.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.writeTextFile(`${dir}/vm.vma`, "old");
 * await Deno.writeTextFile(`${dir}/vm.vma.partial`, "new");
 * await Deno.writeTextFile(`${dir}/vm.vma.idx.partial`, "index");
 * await commitFiles([
 *   { partial: `${dir}/vm.vma.idx.partial`, target: `${dir}/vm.vma.idx` },
 *   { partial: `${dir}/vm.vma.partial`, target: `${dir}/vm.vma` },
 * ]);
 * assert.equal(await Deno.readTextFile(`${dir}/vm.vma`), "new"); // replaced in one rename
 * assert.deepEqual((await Array.fromAsync(Deno.readDir(dir), (e) => e.name)).sort(), [
 *   "vm.vma",
 *   "vm.vma.idx",
 * ]);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function commitFiles(files: PendingFile[]): Promise<void> {
  for (const { partial, file } of files) await flushFile(partial, file);
  for (const { partial, target } of files) await Deno.rename(partial, target);
  for (const dir of new Set(files.map(({ target }) => dirname(target)))) await syncDirectory(dir);
}

/**
 * Commits a finished directory `partial` (flat: files only, as `extract` writes it) as
 * `target`. Every file's data are flushed, then the directory.
 *
 * - A new `target`, or an empty directory there: one `rename(2)` of the whole directory,
 *   then the parent directory is flushed.
 * - An existing `target` directory with files (`--force`): `rename(2)` cannot replace a
 *   directory that is not empty, and renaming the old one aside would leave no `target` for
 *   a moment. So each new file is renamed into `target`, replacing the old file of the same
 *   name in one atomic step; then the old files that the new content does not have are
 *   removed, `target` is flushed, and the empty `partial` is removed. Every file under
 *   `target` is always either complete and old or complete and new; after a crash in the
 *   middle, `target` may hold some of each.
 * - Anything else at `target` (a file, a symlink) is removed first.
 *
 * @example Replace the files of a directory
 * ```ts
 * import assert from "node:assert/strict";
 * import { commitDirectory } from "./durable.ts";
 *
 * const dir = await Deno.makeTempDir();
 * await Deno.mkdir(`${dir}/restore`);
 * await Deno.writeTextFile(`${dir}/restore/disk.raw`, "old");
 * await Deno.writeTextFile(`${dir}/restore/stale.conf`, "old");
 * await Deno.mkdir(`${dir}/restore.partial`);
 * await Deno.writeTextFile(`${dir}/restore.partial/disk.raw`, "new");
 * await commitDirectory(`${dir}/restore.partial`, `${dir}/restore`);
 * assert.deepEqual(await Array.fromAsync(Deno.readDir(`${dir}/restore`), (e) => e.name), [
 *   "disk.raw",
 * ]);
 * assert.equal(await Deno.readTextFile(`${dir}/restore/disk.raw`), "new");
 * assert.equal(await Array.fromAsync(Deno.readDir(dir)).then((e) => e.length), 1);
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function commitDirectory(partial: string, target: string): Promise<void> {
  const names = await Array.fromAsync(Deno.readDir(partial), (entry) => entry.name);
  for (const name of names) await flushFile(join(partial, name));
  const existing = await Deno.lstat(target).catch((error) => {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  });
  if (existing?.isDirectory && !await isEmptyDirectory(target)) {
    return await mergeInto(partial, target, names);
  }
  if (existing !== undefined && !existing.isDirectory) await Deno.remove(target);
  await syncDirectory(partial);
  await Deno.rename(partial, target); // replaces an empty directory atomically
  await syncDirectory(dirname(target));
}

/** Each file of `partial` renamed over its namesake in `target`; the rest of `target` goes. */
async function mergeInto(partial: string, target: string, names: string[]): Promise<void> {
  for (const name of names) {
    const into = join(target, name);
    const old = await Deno.lstat(into).catch(() => undefined);
    if (old?.isDirectory) await Deno.remove(into, { recursive: true }); // rename cannot replace it
    await Deno.rename(join(partial, name), into);
  }
  const kept = new Set(names);
  for await (const entry of Deno.readDir(target)) {
    if (!kept.has(entry.name)) await Deno.remove(join(target, entry.name), { recursive: true });
  }
  await syncDirectory(target);
  await Deno.remove(partial);
  await syncDirectory(dirname(target));
}

async function isEmptyDirectory(path: string): Promise<boolean> {
  for await (const _ of Deno.readDir(path)) return false;
  return true;
}

/** Flushes a file's data to disk (`fdatasync`), through `file` if open, and closes it. */
async function flushFile(path: string, file?: Deno.FsFile): Promise<void> {
  const handle = file ?? await Deno.open(path, { read: true });
  try {
    await handle.syncData();
  } finally {
    handle.close();
  }
}

/**
 * Flushes a directory (`fsync`), so that the entries created or renamed in it are on disk.
 *
 * @example
 * ```ts
 * import { syncDirectory } from "./durable.ts";
 *
 * await syncDirectory(await Deno.makeTempDir());
 * ```
 */
export async function syncDirectory(path: string): Promise<void> {
  using dir = await Deno.open(path, { read: true });
  await dir.sync();
}
