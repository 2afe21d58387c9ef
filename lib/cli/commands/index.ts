// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `index`: the index of an existing archive, built in one pass and written as a sidecar
 * file beside it.
 *
 * @module
 */
import { releaseChunk } from "../../_pool.ts";
import { readEmbeddedIndex } from "../../index/embedded_index.ts";
import { encodeIndex, type VmaIndex } from "../../index/index_format.ts";
import { VmaIndexStream } from "../../index/vma_index_stream.ts";
import { fileRangeReader } from "../../storage/range_reader.ts";
import { type Compression, detectCompression } from "../../transforms/compression.ts";
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
import {
  openS3RangeReader,
  S3_HELP,
  S3_OPTIONS,
  type StorageOptions,
  storageOptions,
} from "../s3_files.ts";
import { isS3Url } from "../../storage/s3_config.ts";

const HELP = `Build the index of an existing VMA archive in one pass and write it beside it.

usage: cli.ts index ARCHIVE|- [-o FILE|-] [--force] [--progress auto|json|none] [--json]
                    [--zstd builtin|program]

  ARCHIVE            a .vma, .vma.zst, .vma.gz or .vma.lzo file (written by Proxmox vzdump,
                     vma-tool, or this tool), s3://BUCKET/KEY, or '-' for stdin
  -o, --output FILE  where the index goes (default ARCHIVE.idx; needed with '-' for stdin;
                     '-' writes it to stdout). Written to FILE.partial first
  --force            replace an existing index file
  --progress MODE    auto (a bar when stderr is a terminal), json (JSON lines), none;
                     counts input bytes
  --json             print a JSON result object instead of the summary line
${ZSTD_HELP}
${S3_HELP}

The index records where every cluster of every disk is and a SHA-256 of each extent's data.
For a plain .vma that is random access (extent offsets). A gzip, lzop or zstd stream (as the
zstd program writes it) cannot be read at random: its index lets verify check every extent,
and 'cli.ts convert ARCHIVE OUT.vma.zst' writes a seekable copy. A seekable .vma.zst written
by backup or convert carries its index inside: index says so and writes nothing.

Every reader check runs on the way. Exit code 0 on success, 3 when the archive is corrupt
or incomplete (no index file is left), 6 when the index file exists.
permissions: --allow-read (ARCHIVE, and FILE to see whether it exists) --allow-write (FILE);
none for stdin with -o -; --allow-run=lzop for .lzo; s3:// needs --allow-net=HOST --allow-env`;

/** The JSON result of `index`. */
interface IndexResult {
  ok: true;
  command: "index";
  archive: string;
  compression: Compression;
  index: "sidecar" | "embedded";
  indexPath: string | null;
  uuid: string;
  ctime: number;
  devices: { devId: number; name: string; size: number }[];
  extents: number;
  archiveBytes: number;
  inputBytes: number | null;
  indexBytes: number;
  digestScope: VmaIndex["digestScope"];
  randomAccess: boolean;
  seconds: number;
}

/**
 * `cli.ts index`: builds the index of an archive and writes it as `ARCHIVE.idx`.
 *
 * @example Index a gzip-compressed archive
 * ```ts
 * import assert from "node:assert/strict";
 * import { gzipSync } from "node:zlib";
 * import { decodeIndex, VmaWriterStream } from "../../../mod.ts";
 * import { indexCommand } from "./index.ts";
 *
 * const dir = await Deno.makeTempDir();
 * const plain = await new Response(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 1, data: new Uint8Array(65536).fill(1) },
 * ]).pipeThrough(new VmaWriterStream())).bytes();
 * await Deno.writeFile(`${dir}/vm.vma.gz`, gzipSync(plain));
 * let out = "";
 * const write = (bytes: Uint8Array) => {
 *   out += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * assert.equal(await indexCommand.run([`${dir}/vm.vma.gz`, "--json"], context), 0);
 * assert.match(out, /^note: .*random access needs 'cli\.ts convert/m); // gzip is not seekable
 * const result = JSON.parse(out.split("\n").find((line) => line.startsWith("{"))!);
 * assert.deepEqual([result.indexPath, result.randomAccess], [`${dir}/vm.vma.gz.idx`, false]);
 * const index = decodeIndex(await Deno.readFile(`${dir}/vm.vma.gz.idx`));
 * assert.equal(index.digestScope, "vma-data");
 * assert.equal(index.archiveBytes, 12800 + 512 + 4096);
 * await assert.rejects(indexCommand.run([`${dir}/vm.vma.gz`], context), { exitCode: 6 }); // exists
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export const indexCommand: Command = {
  name: "index",
  help: HELP,
  async run(args, context) {
    const { values, positionals } = parseCommandArgs("index", args, {
      output: { type: "string", short: "o" },
      force: { type: "boolean" },
      progress: { type: "string" },
      json: { type: "boolean" },
      zstd: { type: "string" },
      ...S3_OPTIONS,
    });
    if (values.help) return await printHelp(context, HELP);
    expectPositionals("index", positionals, 1);
    const storage = storageOptions(values);
    const path = positionals[0]!;
    const mode = progressMode(values.progress);
    const zstd = zstdEngine(values.zstd);
    if (path === "-" && values.output === undefined) {
      throw new UsageError("index - needs -o FILE: where the index of stdin goes (or -o -)");
    }
    const indexPath = values.output ?? `${path}.idx`;
    if (indexPath !== "-" && path !== "-" && await sameFile(path, indexPath)) {
      throw new UsageError(`-o ${indexPath} is the archive itself`);
    }
    const started = performance.now();
    const resultTarget = indexPath === "-" ? context.stderr : context.stdout;

    const embedded = path === "-" ? undefined : await embeddedIndex(path, storage);
    if (embedded !== undefined) {
      await writeText(
        context.stderr,
        `note: ${path} is a seekable .vma.zst that carries its index inside; nothing written\n`,
      );
      if (values.json) {
        const result = resultOf(embedded, {
          archive: path,
          compression: "zstd",
          index: "embedded",
          indexPath: null,
          inputBytes: null,
          indexBytes: encodeIndex(embedded).byteLength,
          started,
        });
        await writeText(resultTarget, jsonLine(result));
      }
      return ExitCode.ok;
    }

    let progress: Progress | undefined;
    const archive = await openArchiveBytes(path, {
      zstd,
      storage,
      progress: (total) => (progress = new Progress(context, { mode, command: "index", total })),
    });
    const output = await openOutput(indexPath, context, {
      force: values.force ?? false,
      ...storage,
    })
      .catch(async (error) => {
        await archive.readable.cancel(error).catch(() => {});
        await progress?.finish(false);
        throw error;
      });
    const onAbort = () => output.discardSync();
    context.signal.addEventListener("abort", onAbort);
    const indexer = new VmaIndexStream();
    let bytes: Uint8Array;
    try {
      await archive.readable
        .pipeThrough(new VmaExtentStream())
        .pipeThrough(indexer)
        .pipeTo(new WritableStream({ write: (chunk) => releaseChunk(chunk) }), {
          signal: context.signal,
        });
      bytes = encodeIndex(indexer.index!);
      await ReadableStream.from([bytes]).pipeTo(output.writable);
      await output.commit();
      await progress?.finish(true);
    } catch (error) {
      await output.discard();
      await progress?.finish(false);
      throw context.signal.aborted ? context.signal.reason : error;
    } finally {
      context.signal.removeEventListener("abort", onAbort);
    }

    const index = indexer.index!;
    const result = resultOf(index, {
      archive: archive.name,
      compression: archive.compression,
      index: "sidecar",
      indexPath,
      inputBytes: archive.bytesRead(),
      indexBytes: bytes.byteLength,
      started,
    });
    if (!result.randomAccess) {
      await writeText(context.stderr, `note: ${notSeekable(archive.name, archive.compression)}\n`);
    }
    if (values.json) {
      await writeText(resultTarget, jsonLine(result));
    } else {
      await writeText(context.stderr, summary(result));
    }
    return ExitCode.ok;
  },
};

/** The index inside a seekable `.vma.zst` file or S3 object, if `path` is one. */
async function embeddedIndex(
  path: string,
  storage: StorageOptions,
): Promise<VmaIndex | undefined> {
  const s3 = isS3Url(path);
  const info = s3 ? undefined : await Deno.stat(path);
  if (info && (!info.isFile || info.size < 4)) return undefined; // a pipe: read it as a stream
  const reader = s3 ? await openS3RangeReader(path, storage) : await fileRangeReader(path);
  try {
    if (reader.size < 4) return undefined;
    if (detectCompression(await reader.read(0, 4)) !== "zstd") return undefined;
    return (await readEmbeddedIndex(reader))?.index;
  } finally {
    reader.close();
  }
}

/** True when both paths name one existing file. */
async function sameFile(a: string, b: string): Promise<boolean> {
  try {
    const [x, y] = await Promise.all([Deno.stat(a), Deno.stat(b)]);
    return x.dev === y.dev && x.ino !== null && x.ino === y.ino;
  } catch {
    return false;
  }
}

function notSeekable(name: string, compression: Compression): string {
  const what = compression === "zstd"
    ? "a zstd stream without an embedded index (not seekable)"
    : `${compression}-compressed`;
  return `${name} is ${what}: the index lets verify check every extent, but random access needs 'cli.ts convert ${
    name === "stdin" ? "ARCHIVE" : name
  } OUT.vma.zst'`;
}

function resultOf(
  index: VmaIndex,
  run: {
    archive: string;
    compression: Compression;
    index: IndexResult["index"];
    indexPath: string | null;
    inputBytes: number | null;
    indexBytes: number;
    started: number;
  },
): IndexResult {
  return {
    ok: true,
    command: "index",
    archive: run.archive,
    compression: run.compression,
    index: run.index,
    indexPath: run.indexPath,
    uuid: index.uuid,
    ctime: index.ctime,
    devices: index.devices,
    extents: index.blockCounts.length,
    archiveBytes: index.archiveBytes,
    inputBytes: run.inputBytes,
    indexBytes: run.indexBytes,
    digestScope: index.digestScope,
    randomAccess: run.index === "embedded" || run.compression === "none",
    seconds: Number(((performance.now() - run.started) / 1000).toFixed(3)),
  };
}

function summary(result: IndexResult): string {
  const name = result.indexPath === "-" ? "stdout" : result.indexPath;
  const kind = result.compression === "none" ? "uncompressed" : result.compression;
  const disks = result.devices.reduce((sum, device) => sum + device.size, 0);
  return `${name}: index of ${result.archive} (${kind}): ${result.devices.length} device(s), ${
    formatBytes(disks)
  }; ${result.extents} extent(s), ${formatBytes(result.indexBytes)} of index, ${
    formatBytes(result.archiveBytes)
  } of archive in ${result.seconds.toFixed(1)} s, ${
    formatRate(result.archiveBytes, result.seconds)
  }\n`;
}
