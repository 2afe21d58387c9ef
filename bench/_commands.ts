// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The commands the groups time and the checks they run: our `backup`, `extract` and `verify`,
 * and `zstd` and `cp` as the native yardsticks.
 *
 * @module
 */
import { basename, join } from "node:path";
import type { Command, GroupContext } from "./_group.ts";
import { DENO, ENV, errorLine, firstLine, mib, ROOT } from "./_util.ts";

/** `--zstd program` (the system zstd instead of the built-in Workers) when `program` is set. */
export interface Engine {
  program?: boolean;
}

const QUIET = ["--force", "--progress", "none"];

function zstdFlag({ program = false }: Engine): string[] {
  return program ? ["--zstd", "program"] : [];
}

/** `" (--zstd program)"` or `""`, for labels. */
export function engineLabel({ program = false }: Engine): string {
  return program ? " (--zstd program)" : "";
}

/**
 * `cli.ts backup --disk DISK -o ARCHIVE [ARGS...]`; the outputs are the archive and its sidecar
 * index `ARCHIVE.idx` (written for a `.vma`, and for a `.vma.zst` with `--zstd program`).
 */
export function backup(
  ctx: GroupContext,
  disk: string,
  archive: string,
  engine: Engine = {},
  args: readonly string[] = [],
): Command {
  const argv = ["backup", "--disk", disk, "-o", archive, ...QUIET, ...zstdFlag(engine), ...args];
  return ctx.ours(argv, [archive, `${archive}.idx`]);
}

/** `cli.ts extract ARCHIVE DIR` into a new directory, the output. */
export function extract(
  ctx: GroupContext,
  archive: string,
  directory: string,
  engine: Engine = {},
): Command {
  return ctx.ours(["extract", archive, directory, ...QUIET, ...zstdFlag(engine)], [directory]);
}

/** `cli.ts verify ARCHIVE`. */
export function verify(ctx: GroupContext, archive: string, engine: Engine = {}): Command {
  return ctx.ours(["verify", archive, "--progress", "none", ...zstdFlag(engine)]);
}

/** `zstd -T0 -3 -q -c INPUT` to /dev/null, or to `file` (the output). */
export function zstdCompress(ctx: GroupContext, input: string, file?: string): Command {
  if (file === undefined) return ctx.native((p) => `zstd -T0 -3 -q -c ${p(input)} > /dev/null`);
  return ctx.native((p) => `zstd -T0 -3 -q -c ${p(input)} > ${p(file)}`, [file]);
}

/** `zstd -d -q -c ARCHIVE` to /dev/null, or to `file` (the output). */
export function zstdDecompress(ctx: GroupContext, archive: string, file?: string): Command {
  if (file === undefined) return ctx.native((p) => `zstd -d -q -c ${p(archive)} > /dev/null`);
  return ctx.native((p) => `zstd -d -q -c ${p(archive)} > ${p(file)}`, [file]);
}

/**
 * `zstd -d -q -c ARCHIVE > FILE` and then `sync` of the file: a decode as durable as a
 * restore, whose files are flushed to disk before they take their names.
 */
export function zstdDecompressDurable(ctx: GroupContext, archive: string, file: string): Command {
  return ctx.native((p) => `zstd -d -q -c ${p(archive)} > ${p(file)} && sync ${p(file)}`, [file]);
}

/** `cp --sparse=always INPUT COPY`; the copy is the output. */
export function cpSparse(ctx: GroupContext, input: string, copy: string): Command {
  return ctx.native((p) => `cp --sparse=always ${p(input)} ${p(copy)}`, [copy]);
}

/**
 * `cp --sparse=always` and then `sync` of the copy: a copy as durable as a backup's
 * archive, which is flushed to disk before it takes its name.
 */
export function cpSparseDurable(ctx: GroupContext, input: string, copy: string): Command {
  return ctx.native((p) => `cp --sparse=always ${p(input)} ${p(copy)} && sync ${p(copy)}`, [copy]);
}

/** Untimed: `cli.ts backup` of `disk` into `archive` (for set-up and checks). */
export async function makeArchive(
  ctx: GroupContext,
  disk: string,
  archive: string,
): Promise<string> {
  await ctx.runOurs(["backup", "--disk", disk, "-o", archive, ...QUIET]);
  return archive;
}

/** Check: `cli.ts extract ARCHIVE` gives one `.raw` equal to `original` (`cmp`). */
export async function extractsEqual(
  ctx: GroupContext,
  archive: string,
  original: string,
): Promise<string> {
  const directory = join(ctx.out, `check-${basename(archive)}`);
  await ctx.runOurs(["extract", archive, directory, ...QUIET]);
  const disks = [];
  for await (const entry of Deno.readDir(directory)) {
    if (entry.name.endsWith(".raw")) disks.push(join(directory, entry.name));
  }
  if (disks.length !== 1) {
    throw new Error(`expected one .raw in ${directory}, found ${disks.length}`);
  }
  await ctx.run(["cmp", disks[0]!, original]);
  const { size, blocks } = await Deno.stat(disks[0]!);
  const allocated = (blocks ?? 0) * 512;
  await Deno.remove(directory, { recursive: true });
  return `identical; ${basename(disks[0]!)} ${mib(size)} MiB, ${mib(allocated)} MiB allocated`;
}

/** Check: `cli.ts verify ARCHIVE` passes; returns its first line. */
export async function verifies(ctx: GroupContext, archive: string): Promise<string> {
  const output = await ctx.runOurs(["verify", archive, "--progress", "none"]);
  return firstLine(output).replace(archive, basename(archive));
}

/** Check: `zstd -d -q -c ARCHIVE | cli.ts verify -`; both must exit 0. */
export async function verifiesThroughZstd(ctx: GroupContext, archive: string): Promise<string> {
  const zstd = new Deno.Command("zstd", {
    args: ["-d", "-q", "-c", archive],
    env: ENV,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const verify = new Deno.Command(DENO, {
    args: ["run", "-A", ctx.cli, "verify", "-", "--progress", "none"],
    cwd: ROOT,
    env: ENV,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const piping = zstd.stdout.pipeTo(verify.stdin).catch(() => {}); // the exit codes tell
  const [zstdStatus, zstdErrors, result] = await Promise.all([
    zstd.status,
    new Response(zstd.stderr).bytes(),
    verify.output(),
    piping,
  ]);
  if (!zstdStatus.success) {
    throw new Error(`zstd -d exited ${zstdStatus.code}: ${errorLine(zstdErrors)}`);
  }
  if (!result.success) {
    throw new Error(`verify - exited ${result.code}: ${errorLine(result.stderr)}`);
  }
  return firstLine(new TextDecoder().decode(result.stdout));
}
