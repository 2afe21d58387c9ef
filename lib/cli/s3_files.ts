// Copyright 2026 the vmabackup authors. MIT license.
/**
 * `s3://BUCKET/KEY` archives for CLI commands: the `--s3-*` flags, and S3 objects opened as
 * the same inputs and outputs as files (an output appears only when its upload completes).
 *
 * @module
 */
import { parseS3Url } from "../storage/s3_config.ts";
import { s3RangeReader, s3Source } from "../storage/s3_download.ts";
import type { RangeReader } from "../storage/range_reader.ts";
import { MIN_PART_SIZE, s3Sink } from "../storage/s3_upload.ts";
import type { CliContext } from "./context.ts";
import { UsageError } from "./errors.ts";
import type { Input, Output } from "./files.ts";

/** How to reach S3 storage, from the command line (the rest comes from the environment). */
export interface StorageOptions {
  /** `--s3-endpoint`: instead of `AWS_ENDPOINT_URL`. */
  endpoint?: string | undefined;
  /** `--s3-retries`: attempts per request. */
  attempts?: number | undefined;
  /** `--s3-part-size`: bytes per part of an upload. */
  partSize?: number | undefined;
}

/** The flags of every command that names an archive. */
export const S3_OPTIONS = {
  "s3-endpoint": { type: "string" },
  "s3-retries": { type: "string" },
} as const;

/**
 * The `--s3-*` lines of a command's help.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { S3_HELP } from "./s3_files.ts";
 *
 * assert.match(S3_HELP, /^ {2}--s3-endpoint URL /);
 * ```
 */
export const S3_HELP =
  `  --s3-endpoint URL  for s3://BUCKET/KEY archives: the S3 endpoint, path-style (default
                     AWS_ENDPOINT_URL, else AWS); credentials and region as for the AWS CLI
                     (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_REGION)
  --s3-retries N     attempts per S3 request (default 8, about 12 to 24 s of retries)`;

/**
 * Reads the `--s3-*` flags.
 *
 * @example Sizes take K, M and G (binary) suffixes
 * ```ts
 * import assert from "node:assert/strict";
 * import { storageOptions } from "./s3_files.ts";
 *
 * assert.deepEqual(storageOptions({ "s3-part-size": "64M", "s3-retries": "3" }), {
 *   endpoint: undefined,
 *   attempts: 3,
 *   partSize: 64 * 2 ** 20,
 * });
 * assert.throws(() => storageOptions({ "s3-part-size": "1M" }), /at least 5M/);
 * assert.throws(() => storageOptions({ "s3-retries": "0" }), /--s3-retries must be/);
 * ```
 */
export function storageOptions(
  values: { "s3-endpoint"?: string; "s3-retries"?: string; "s3-part-size"?: string },
): StorageOptions {
  const retries = values["s3-retries"];
  const attempts = retries === undefined ? undefined : Number(retries);
  if (attempts !== undefined && !(Number.isSafeInteger(attempts) && attempts >= 1)) {
    throw new UsageError(
      `--s3-retries must be a whole number of attempts (1 or more), not '${retries}'`,
    );
  }
  const size = values["s3-part-size"];
  const partSize = size === undefined ? undefined : parseSize(size);
  if (partSize !== undefined && !(partSize >= MIN_PART_SIZE && partSize <= 5 * 2 ** 30)) {
    throw new UsageError(`--s3-part-size must be at least 5M and at most 5G, not '${size}'`);
  }
  return { endpoint: values["s3-endpoint"], attempts, partSize };
}

function parseSize(text: string): number {
  const match = text.match(/^(\d+)([KMG]?)(i?B)?$/i);
  if (!match) throw new UsageError(`--s3-part-size must be a size such as 64M, not '${text}'`);
  const unit = { "": 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30 }[match[2]!.toLowerCase()]!;
  return Number(match[1]) * unit;
}

function clientOptions(storage: StorageOptions) {
  return {
    endpoint: storage.endpoint,
    retry: storage.attempts === undefined ? {} : { attempts: storage.attempts },
  };
}

function location(url: string): void {
  try {
    parseS3Url(url);
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

/** Opens an S3 object as an archive input (sequential GETs that resume where they drop). */
export async function openS3Input(url: string, storage: StorageOptions = {}): Promise<Input> {
  location(url);
  const source = await s3Source(url, clientOptions(storage));
  return { readable: source, size: source.size, name: url };
}

/** Opens an S3 object for random reads (an embedded index at its end). */
export async function openS3RangeReader(
  url: string,
  storage: StorageOptions = {},
): Promise<RangeReader> {
  location(url);
  return await s3RangeReader(url, clientOptions(storage));
}

/** The whole of a small S3 object (a sidecar index). */
export async function readS3Object(url: string, storage: StorageOptions = {}): Promise<Uint8Array> {
  location(url);
  return await new Response(await s3Source(url, clientOptions(storage))).bytes();
}

/**
 * Opens an S3 object as an archive output: a multipart upload that completes on
 * {@linkcode Output.commit} and is aborted on {@linkcode Output.discard}. An existing key is
 * refused unless `force`, before anything is read and again before the upload completes.
 */
export async function openS3Output(
  url: string,
  _context: CliContext,
  options: { force: boolean } & StorageOptions,
): Promise<Output> {
  location(url);
  const sink = await s3Sink(url, {
    ...clientOptions(options),
    overwrite: options.force,
    completeOnClose: false,
    partSize: options.partSize,
  });
  return {
    writable: sink,
    path: url,
    expectSize: (bytes) => sink.expectSize(bytes),
    async commit() {
      await sink.complete();
    },
    discard: () => sink.discard(),
    // A signal handler cannot wait: the abort starts now, discard() waits for it.
    discardSync: () => void sink.discard().catch(() => {}),
  };
}
