// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `verify`: every check of the strict reader, missing clusters included, with a summary
 * or a JSON report.
 *
 * @module
 */
import { VmaFormatError } from "../../vma/errors.ts";
import { VmaReaderStream } from "../../vma/reader_stream.ts";
import { tapStream } from "../../transforms/tap.ts";
import type { VmaConfigRecord, VmaHeaderRecord, VmaRecord } from "../../vma/records.ts";
import { type ArchiveInput, discardRecords, openArchive } from "../archive_input.ts";
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
import { CliError, ExitCode, UsageError } from "../errors.ts";
import type { DataChecks, FoundIndex } from "../archive_input.ts";
import { Progress } from "../progress.ts";
import { S3_HELP, S3_OPTIONS, storageOptions } from "../s3_files.ts";

const HELP = `Verify a VMA archive: header and extent checksums, magic, version, blob pointers,
extent UUIDs, block counts against the masks, device ids, duplicate clusters, clusters past a
device's end, and, unlike Proxmox's 'vma verify', missing clusters (a truncated archive).

With an index (inside a seekable .vma.zst, or a sidecar ARCHIVE.idx) it also checks the data:
every extent against its SHA-256 in the index, every zstd frame against its checksum, and
that the index describes this archive. Without one it checks the zstd frame checksums, if
the frames carry them; a plain .vma without an index has no data checksums at all. The
report says which of the three was done.

usage: cli.ts verify ARCHIVE|- [--json] [--require-data] [--index FILE | --no-index]
                     [--progress auto|json|none] [--zstd builtin|program]

  ARCHIVE            a .vma, .vma.zst, .vma.gz or .vma.lzo file, s3://BUCKET/KEY, or '-'
  --json             print a JSON report on stdout (also when the archive is bad)
  --require-data     fail (exit 3) unless the data itself was checked, not only the structure
  --index FILE       the sidecar index to check against (default ARCHIVE.idx; for stdin)
  --no-index         ignore any index (a damaged one, for example): structure and zstd only
${ZSTD_HELP}
${S3_HELP}

Exit code 0 when the archive is valid and complete, 3 when it is not (or, with
--require-data, when its data could not be checked).
permissions: --allow-read (none for stdin; --allow-run=lzop for .lzo); s3:// needs
--allow-net=HOST --allow-env (and --allow-read of ~/.aws/credentials for a profile)`;

/**
 * `cli.ts verify`: checks every rule of the format, and that no cluster is missing.
 *
 * @example An archive without its last extent is incomplete
 * ```ts
 * import assert from "node:assert/strict";
 * import { VmaWriterStream } from "../../../mod.ts";
 * import { verifyCommand } from "./verify.ts";
 *
 * const path = await Deno.makeTempFile({ suffix: ".vma" });
 * const archive = await new Response(ReadableStream.from([
 *   { type: "device" as const, devId: 1, name: "drive-scsi0", size: 65536 },
 *   { type: "cluster" as const, devId: 1, cluster: 0, mask: 0, data: null },
 * ]).pipeThrough(new VmaWriterStream())).bytes();
 * await Deno.writeFile(path, archive.subarray(0, archive.length - 512)); // cut off the extent
 * let out = "";
 * const write = (bytes: Uint8Array) => {
 *   out += new TextDecoder().decode(bytes);
 *   return Promise.resolve(bytes.length);
 * };
 * const signal = new AbortController().signal;
 * const context = { stdout: { write }, stderr: { write }, stderrIsTerminal: false, signal };
 * assert.equal(await verifyCommand.run([path, "--json"], context), 3);
 * assert.equal(JSON.parse(out).error.reason, "missing-cluster");
 * await Deno.remove(path);
 * ```
 */
export const verifyCommand: Command = {
  name: "verify",
  help: HELP,
  async run(args, context) {
    const { values, positionals } = parseCommandArgs("verify", args, {
      json: { type: "boolean" },
      progress: { type: "string" },
      zstd: { type: "string" },
      "require-data": { type: "boolean" },
      index: { type: "string" },
      "no-index": { type: "boolean" },
      ...S3_OPTIONS,
    });
    if (values.help) return await printHelp(context, HELP);
    expectPositionals("verify", positionals, 1);
    if (values.index !== undefined && values["no-index"]) {
      throw new UsageError("--index FILE and --no-index cannot be combined");
    }
    const mode = progressMode(values.progress);
    const zstd = zstdEngine(values.zstd);
    const storage = storageOptions(values);
    let progress: Progress | undefined;
    const started = performance.now();
    let archive: ArchiveInput | undefined;
    let header: VmaHeaderRecord | undefined;
    const configs: VmaConfigRecord[] = [];
    let failure: VmaFormatError | undefined;
    try {
      archive = await openArchive(positionals[0]!, {
        zstd,
        storage,
        reader: { skipData: true }, // every check, without copying the data out
        index: values["no-index"] ? "ignore" : "auto",
        indexPath: values.index,
        digestData: true,
        progress: (total) => (progress = new Progress(context, { mode, command: "verify", total })),
      });
      await archive.records
        .pipeThrough(tapStream<VmaRecord>((record) => {
          if (record.type === "header") header = record;
          if (record.type === "config") configs.push(record);
        }))
        .pipeTo(discardRecords(), { signal: context.signal });
    } catch (error) {
      if (!(error instanceof VmaFormatError) || !values.json) {
        await progress?.finish(false);
        throw error;
      }
      failure = error;
    }
    const checks = archive?.checks();
    const dataUnchecked = failure === undefined && values["require-data"] === true &&
      checks?.level === "structure";
    await progress?.finish(failure === undefined);
    const seconds = (performance.now() - started) / 1000;
    // An input that is not an archive at all fails before a reader exists: report no counts.
    const stats = (archive?.reader ?? new VmaReaderStream()).stats;
    const diskBytes = stats.devices.reduce((sum, device) => sum + device.size, 0);
    if (values.json) {
      await writeText(
        context.stdout,
        jsonLine({
          ok: failure === undefined,
          command: "verify",
          archive: archive?.name ?? positionals[0],
          compression: archive?.compression ?? null,
          ...(failure && {
            error: { reason: failure.reason, offset: failure.offset, message: failure.message },
          }),
          ...(dataUnchecked && {
            error: { reason: "data-not-checked", message: DATA_NOT_CHECKED },
          }),
          checked: checks === undefined ? null : {
            level: checks.level,
            index: archive?.index === undefined
              ? null
              : { source: archive.index.source, path: archive.index.path ?? null },
            frames: checks.frames,
            checksummedFrames: checks.checksummedFrames,
            extentsWithData: archive?.index === undefined ? null : checks.extentsWithData,
            digestsChecked: archive?.index === undefined ? null : checks.digestsChecked,
          },
          uuid: header?.uuid ?? null,
          ctime: header?.ctime ?? null,
          configs: configs.map(({ name, data }) => ({ name, size: data.byteLength })),
          devices: stats.devices.map((device) => ({
            devId: device.devId,
            name: device.name,
            size: device.size,
            clusters: device.clusters,
            seenClusters: device.seenClusters,
            zeroClusters: device.zeroClusters,
            dataBytes: device.dataBlocks * 4096,
          })),
          headerBytes: stats.headerSize,
          extents: stats.extents,
          clusters: stats.clusters,
          zeroClusters: stats.zeroClusters,
          dataBytes: stats.dataBlocks * 4096,
          diskBytes,
          archiveBytes: stats.bytes,
          inputBytes: archive?.bytesRead() ?? null,
          seconds: Number(seconds.toFixed(3)),
        }),
      );
      return failure === undefined && !dataUnchecked ? ExitCode.ok : ExitCode.corrupt;
    }
    const zeroShare = stats.clusters
      ? ((100 * stats.zeroClusters) / stats.clusters).toFixed(1)
      : "0";
    const lines = [
      `${archive!.name}: ok (${
        archive!.compression === "none" ? "uncompressed" : archive!.compression
      })`,
      `  ${stats.devices.length} device(s), ${
        formatBytes(diskBytes)
      }; ${stats.clusters} clusters, ${zeroShare}% zero; ${
        formatBytes(stats.dataBlocks * 4096)
      } of data in ${stats.extents} extents`,
      ...stats.devices.map((device) =>
        `  ${device.name}: ${
          formatBytes(device.size)
        }, ${device.clusters} clusters, ${device.zeroClusters} zero, ${
          formatBytes(device.dataBlocks * 4096)
        } data`
      ),
      `  ${formatBytes(archive!.bytesRead())} read in ${seconds.toFixed(1)} s, ${
        formatRate(stats.bytes, seconds)
      } of archive`,
      `  checked: ${describeChecks(checks!, archive!.index)}`,
    ];
    await writeText(context.stdout, lines.map((line) => `${line}\n`).join(""));
    if (dataUnchecked) throw new CliError(ExitCode.corrupt, DATA_NOT_CHECKED);
    return ExitCode.ok;
  },
};

const DATA_NOT_CHECKED =
  "--require-data: only the structure could be checked (a plain archive without an index; run 'cli.ts index' to make one)";

/**
 * One line that says what a verify checked.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { describeChecks } from "./verify.ts";
 *
 * const checks = { frames: 0, checksummedFrames: 0, extentsWithData: 0, digestsChecked: 0 };
 * assert.match(describeChecks({ ...checks, level: "structure" }, undefined), /structure only/);
 * ```
 */
export function describeChecks(checks: DataChecks, index: FoundIndex | undefined): string {
  const frames = checks.frames > 0
    ? `, ${checks.checksummedFrames} of ${checks.frames} zstd frame checksums`
    : "";
  switch (checks.level) {
    case "sha256":
      return `data: SHA-256 of all ${checks.digestsChecked} extents with data against the ${
        index!.source === "sidecar" ? `sidecar index ${index!.path}` : "embedded index"
      }${frames}; the index matches the archive`;
    case "frame-checksums":
      return `data: every zstd frame's content checksum (${checks.frames} frames), no index`;
    case "structure":
      return checks.frames > 0
        ? `structure only: its ${checks.frames} zstd frames carry no checksums and there is no index`
        : "structure only: a plain VMA has no data checksums and there is no index (see 'cli.ts index')";
  }
}
