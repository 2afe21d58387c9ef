// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `convert`: any archive rewritten as a seekable, indexed `.vma.zst` with the same VMA
 * bytes.
 *
 * @module
 */
import { SeekableZstdStream } from "../../transforms/seekable_zstd.ts";
import { VmaExtentStream } from "../../vma/extent_stream.ts";
import { openArchiveBytes } from "../archive_bytes.ts";
import {
  type Command,
  expectPositionals,
  jsonLine,
  parseCommandArgs,
  printHelp,
  progressMode,
  ZSTD_HELP,
  zstdEngine,
} from "../command.ts";
import { formatBytes, formatRate, writeText } from "../context.ts";
import { ExitCode, UsageError } from "../errors.ts";
import { openOutput } from "../files.ts";
import { Progress } from "../progress.ts";
import { S3_HELP, S3_OPTIONS, storageOptions } from "../s3_files.ts";

const HELP = `Rewrite a VMA archive as a seekable .vma.zst with its index inside, for random access.

usage: cli.ts convert IN|- OUT.vma.zst|- [--level N] [--force] [--progress auto|json|none]
                      [--json] [--zstd builtin|program]

  IN                 a .vma, .vma.zst, .vma.gz or .vma.lzo file (written by Proxmox vzdump,
                     vma-tool, or this tool), s3://BUCKET/KEY, or '-' for stdin
  OUT                the new archive; its name must end in .vma.zst ('-' writes to stdout;
                     s3://BUCKET/KEY.vma.zst uploads it). Written to OUT.partial first
  --level N          zstd level, -7..19 (default 3)
  --force            replace an existing OUT
  --progress MODE    auto (a bar when stderr is a terminal), json (JSON lines), none;
                     counts input bytes
  --json             print a JSON result object instead of the summary line
${ZSTD_HELP}
                     (--zstd decodes a zstd IN; OUT is always written by the built-in one)
  --s3-part-size SIZE  bytes per part of an s3:// OUT (default 5M, more for large archives)
${S3_HELP}

The archive is re-framed, not re-written: 'zstd -d OUT' gives exactly the VMA bytes of IN
(the same UUID, ctime, configs and extents), so Proxmox restores it as before. OUT has the
VMA header in one frame, each extent in two (its header, its data), every frame with its
checksum, then the index (a SHA-256 of each data frame) and a zstd seek table.

Every reader check runs on the way. Exit code 0 on success, 3 when IN is corrupt or
incomplete (no OUT is left), 6 when OUT exists.
permissions: --allow-read (IN, and OUT to see whether it exists) --allow-write (OUT); none
from stdin to stdout; --allow-run=lzop for .lzo; s3:// needs --allow-net=HOST --allow-env`;

/**
 * `cli.ts convert`: rewrites an archive as a seekable, indexed `.vma.zst`.
 *
 * @example A plain archive becomes a seekable one with the same bytes
 * ```ts
 * import assert from "node:assert/strict";
 * import { ZstdDecompressStream, VmaWriterStream } from "../../../mod.ts";
 * import { convertCommand } from "./convert.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const plain = await new Response(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 1, data: new Uint8Array(65536).fill(1) },
 * ]).pipeThrough(new VmaWriterStream())).bytes();
 * await Deno.writeFile(`${dir}/vm.vma`, plain);
 * let out = "";
 * const write = (bytes: Uint8Array) => {
 *   out += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * assert.equal(await convertCommand.run([`${dir}/vm.vma`, `${dir}/vm.vma.zst`, "--json"], context), 0);
 * assert.deepEqual(JSON.parse(out).archiveBytes, plain.byteLength);
 * const file = await Deno.open(`${dir}/vm.vma.zst`);
 * const decoded = await new Response(file.readable.pipeThrough(new ZstdDecompressStream())).bytes();
 * assert.deepEqual(decoded, plain);
 * await assert.rejects(convertCommand.run([`${dir}/vm.vma`, `${dir}/vm.zst`], context), {
 *   exitCode: 2, // a usage error: OUT must end in .vma.zst
 * });
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export const convertCommand: Command = {
  name: "convert",
  help: HELP,
  async run(args, context) {
    const { values, positionals } = parseCommandArgs("convert", args, {
      level: { type: "string" },
      force: { type: "boolean" },
      progress: { type: "string" },
      json: { type: "boolean" },
      zstd: { type: "string" },
      "s3-part-size": { type: "string" },
      ...S3_OPTIONS,
    });
    if (values.help) return await printHelp(context, HELP);
    expectPositionals("convert", positionals, 2);
    const storage = storageOptions(values);
    const [from, to] = positionals as [string, string];
    if (to !== "-" && !/\.vma\.zst$/i.test(to)) {
      throw new UsageError(
        `convert writes a seekable .vma.zst: OUT must end in .vma.zst (or be -), not '${to}'`,
      );
    }
    const level = parseLevel(values.level);
    const mode = progressMode(values.progress);
    const zstd = zstdEngine(values.zstd);
    const started = performance.now();

    let progress: Progress | undefined;
    const archive = await openArchiveBytes(from, {
      zstd,
      storage,
      progress: (total) => (progress = new Progress(context, { mode, command: "convert", total })),
    });
    const output = await openOutput(to, context, { force: values.force ?? false, ...storage })
      .catch(async (error) => {
        await archive.readable.cancel(error).catch(() => {});
        await progress?.finish(false);
        throw error;
      });
    const onAbort = () => output.discardSync();
    context.signal.addEventListener("abort", onAbort);
    const pieces = new VmaExtentStream();
    const seekable = new SeekableZstdStream(level === undefined ? {} : { level });
    try {
      await archive.readable
        .pipeThrough(pieces)
        .pipeThrough(seekable)
        .pipeTo(output.writable, { signal: context.signal });
      await output.commit();
      await progress?.finish(true);
    } catch (error) {
      await output.discard();
      await progress?.finish(false);
      throw context.signal.aborted ? context.signal.reason : error;
    } finally {
      context.signal.removeEventListener("abort", onAbort);
    }

    const seconds = (performance.now() - started) / 1000;
    const index = seekable.index!;
    const result = {
      ok: true,
      command: "convert",
      input: archive.name,
      output: to,
      compression: archive.compression,
      uuid: index.uuid,
      ctime: index.ctime,
      level: level ?? 3,
      devices: index.devices,
      extents: index.blockCounts.length,
      frames: seekable.frames,
      archiveBytes: index.archiveBytes,
      inputBytes: archive.bytesRead(),
      outputBytes: output.writable.bytesWritten,
      seconds: Number(seconds.toFixed(3)),
    };
    if (values.json) {
      await writeText(to === "-" ? context.stderr : context.stdout, jsonLine(result));
    } else {
      const kind = archive.compression === "none" ? "uncompressed" : archive.compression;
      await writeText(
        context.stderr,
        `${to === "-" ? "stdout" : to}: ${archive.name} (${kind}, ${
          formatBytes(result.inputBytes)
        }) → seekable zstd, ${formatBytes(result.outputBytes)} in ${result.frames} frames; ${
          formatBytes(result.archiveBytes)
        } of archive in ${seconds.toFixed(1)} s, ${formatRate(result.archiveBytes, seconds)}\n`,
      );
    }
    return ExitCode.ok;
  },
};

/** Reads `--level` (zstd, -7 to 19). */
function parseLevel(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const level = Number(value);
  if (!Number.isInteger(level) || level < -7 || level > 19) {
    throw new UsageError(`--level must be an integer within -7..19 for zstd, not '${value}'`);
  }
  return level;
}
