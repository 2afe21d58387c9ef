// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Exit codes of the CLI and the mapping from errors to one-line messages.
 *
 * @module
 */
import { NotSeekableError } from "../access/indexed_archive.ts";
import { NbdError, type NbdErrorReason } from "../protocols/nbd_protocol.ts";
import { ImageFileError } from "../qemu/qemu_img.ts";
import { S3Error } from "../storage/s3_errors.ts";
import { VmaFormatError } from "../vma/errors.ts";

/**
 * Stable exit codes, documented in the README.
 *
 * @example Exit codes are plain numbers
 * ```ts
 * import assert from "node:assert/strict";
 * import { ExitCode } from "./errors.ts";
 *
 * assert.equal(ExitCode.ok, 0);
 * assert.equal(ExitCode.corrupt, 3);
 * assert.equal(ExitCode.interrupted, 128 + 2);
 * ```
 */
export const ExitCode = {
  ok: 0,
  /** Anything else that failed: a QEMU error, a bad disk size, an internal error. */
  failure: 1,
  /** A bad command line: unknown command or flag, missing or invalid argument. */
  usage: 2,
  /** The archive is corrupt, incomplete, truncated, or not a VMA archive. */
  corrupt: 3,
  /**
   * An input or output could not be read or written (missing file, unreadable or corrupt
   * disk image, disk full, closed pipe).
   */
  io: 4,
  /** Deno denied a permission: the message names the --allow-* flag to add. */
  permission: 5,
  /** The output exists and --force was not given. */
  exists: 6,
  /** The archive has no config or disk of the requested name. */
  notFound: 7,
  /**
   * The object storage refused the credentials or the access (S3 403: a wrong key or secret,
   * no permission for the bucket), or no credentials were found.
   */
  denied: 8,
  /**
   * The archive cannot be read at random (a `.vma.zst` without a seek table, gzip, lzop):
   * `serve` and live restores need `convert` first.
   */
  notSeekable: 9,
  /** Interrupted by SIGINT (128 + 2). */
  interrupted: 130,
  /** Stopped by SIGTERM (128 + 15). */
  terminated: 143,
  /** Stopped by SIGHUP (128 + 1), for example a closed terminal or ssh session. */
  hangup: 129,
} as const;

/**
 * An error the CLI reports as is, with its own exit code.
 *
 * @example An error with its own exit code
 * ```ts
 * import assert from "node:assert/strict";
 * import { CliError, describeError, ExitCode } from "./errors.ts";
 *
 * const error = new CliError(ExitCode.notFound, "the archive has no disk named 'scsi9'");
 * assert.equal(error.exitCode, 7);
 * assert.deepEqual(describeError(error), {
 *   exitCode: 7,
 *   message: "the archive has no disk named 'scsi9'",
 * });
 * ```
 */
export class CliError extends Error {
  readonly exitCode: number;
  constructor(exitCode: number, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "CliError";
    this.exitCode = exitCode;
  }
}

/**
 * A bad command line.
 *
 * @example Usage errors exit with code 2
 * ```ts
 * import assert from "node:assert/strict";
 * import { CliError, ExitCode, UsageError } from "./errors.ts";
 *
 * const error = new UsageError("--progress must be auto, json or none, not 'bar'");
 * assert.ok(error instanceof CliError);
 * assert.equal(error.exitCode, ExitCode.usage);
 * assert.equal(error.name, "UsageError");
 * ```
 */
export class UsageError extends CliError {
  constructor(message: string) {
    super(ExitCode.usage, message);
    this.name = "UsageError";
  }
}

/**
 * The run was stopped by a signal.
 *
 * @example The exit code follows the signal
 * ```ts
 * import assert from "node:assert/strict";
 * import { ExitCode, InterruptedError } from "./errors.ts";
 *
 * assert.equal(new InterruptedError("SIGINT").exitCode, ExitCode.interrupted);
 * assert.equal(new InterruptedError("SIGTERM").exitCode, ExitCode.terminated);
 * assert.equal(new InterruptedError("SIGHUP").exitCode, ExitCode.hangup);
 * assert.equal(new InterruptedError("SIGTERM").message, "interrupted by SIGTERM");
 * ```
 */
export class InterruptedError extends CliError {
  constructor(signal: Deno.Signal) {
    super(signalExitCode(signal), `interrupted by ${signal}`);
    this.name = "InterruptedError";
  }
}

/**
 * The exit code for a signal: 128 plus its number, as shells report it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { signalExitCode } from "./errors.ts";
 *
 * assert.deepEqual(["SIGHUP", "SIGINT", "SIGTERM"].map((s) => signalExitCode(s as Deno.Signal)), [
 *   129,
 *   130,
 *   143,
 * ]);
 * ```
 */
export function signalExitCode(signal: Deno.Signal): number {
  if (signal === "SIGHUP") return ExitCode.hangup;
  if (signal === "SIGTERM") return ExitCode.terminated;
  return ExitCode.interrupted;
}

const IO_ERRORS = [
  ImageFileError,
  Deno.errors.NotFound,
  Deno.errors.PermissionDenied,
  Deno.errors.IsADirectory,
  Deno.errors.NotADirectory,
  Deno.errors.UnexpectedEof,
  Deno.errors.BrokenPipe,
  Deno.errors.ConnectionRefused,
  Deno.errors.ConnectionReset,
  Deno.errors.WriteZero,
  Deno.errors.TimedOut,
  Deno.errors.FilesystemLoop,
  Deno.errors.InvalidData,
];

/**
 * The exit code and one-line message for any error, without a stack trace.
 *
 * @example Exit codes and messages of a few errors
 * ```ts
 * import assert from "node:assert/strict";
 * import { S3Error } from "../storage/s3_errors.ts";
 * import { describeError, ExitCode } from "./errors.ts";
 * import { NbdError } from "../protocols/nbd_protocol.ts";
 *
 * const missing = new Deno.errors.NotFound("No such file or directory (os error 2)");
 * assert.deepEqual(describeError(missing), {
 *   exitCode: ExitCode.io,
 *   message: "No such file or directory (os error 2)",
 * });
 * assert.equal(describeError(new Error("first line\nsecond line")).message, "first line");
 * assert.equal(describeError(new Error("a \x1b[2J b")).message, "a \\x1b[2J b"); // escaped
 * const full = new NbdError("command-failed", "Cannot write: ENOSPC", { code: 28 });
 * assert.equal(describeError(full).exitCode, ExitCode.io); // a disk error reported over NBD
 * const denied = { url: "s3://b/k", operation: "open", status: 403, code: "Forbidden", detail: "x" };
 * assert.equal(describeError(new S3Error(denied)).exitCode, ExitCode.denied);
 * assert.equal(describeError(new S3Error({ ...denied, status: 0, code: "NetworkError" })).exitCode, 4);
 * assert.equal(describeError("not an Error").exitCode, ExitCode.failure);
 * ```
 */
export function describeError(error: unknown): { exitCode: number; message: string } {
  const { exitCode, message } = classify(error);
  // Messages quote archive names and paths: no control character reaches the terminal.
  return { exitCode, message: message.replace(CONTROL, escapeControl) };
}

// deno-lint-ignore no-control-regex -- control characters are what it finds
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/g;

function escapeControl(char: string): string {
  return `\\x${char.charCodeAt(0).toString(16).padStart(2, "0")}`;
}

function classify(error: unknown): { exitCode: number; message: string } {
  if (error instanceof CliError) return { exitCode: error.exitCode, message: error.message };
  if (error instanceof VmaFormatError) {
    return { exitCode: ExitCode.corrupt, message: error.message };
  }
  if (error instanceof NotSeekableError) {
    return { exitCode: ExitCode.notSeekable, message: error.message };
  }
  // Storage failures are I/O errors, a missing bucket or key as much as a missing file.
  if (error instanceof S3Error) {
    return { exitCode: error.denied ? ExitCode.denied : ExitCode.io, message: error.message };
  }
  if (error instanceof Deno.errors.NotCapable) {
    return { exitCode: ExitCode.permission, message: `permission denied: ${error.message}` };
  }
  if (error instanceof Deno.errors.AlreadyExists) {
    return {
      exitCode: ExitCode.exists,
      message: `${errorText(error)} (use --force to replace it)`,
    };
  }
  if (IO_ERRORS.some((type) => error instanceof type) || isOsError(error) || isNbdIoError(error)) {
    return { exitCode: ExitCode.io, message: errorText(error) };
  }
  return { exitCode: ExitCode.failure, message: errorText(error) };
}

/**
 * NBD failures that are I/O errors of a disk: the server reported an errno for a command
 * (EIO on a read, ENOSPC on a write), refused the export, or the connection failed.
 */
const NBD_IO_REASONS: NbdErrorReason[] = [
  "command-failed",
  "option-failed",
  "connect-failed",
  "disconnected",
  "timeout",
];

function isNbdIoError(error: unknown): boolean {
  return error instanceof NbdError && NBD_IO_REASONS.includes(error.reason);
}

/** Errors with an OS error code (ENOSPC, EIO, ...) that Deno maps to a plain Error. */
function isOsError(error: unknown): boolean {
  return error instanceof Error && /\(os error \d+\)/.test(error.message);
}

function errorText(error: unknown): string {
  const text = error instanceof Error ? error.message : String(error);
  return text.split("\n")[0]!.trim() || String(error);
}
