// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The error of a failed request to S3 object storage, with the HTTP status and S3 error code
 * that tell a refused credential from a missing bucket or a network failure.
 *
 * @module
 */

/** S3 error codes that mean the credentials are missing, wrong or not allowed to do it. */
const DENIED_CODES = new Set([
  "NoCredentials",
  "AccessDenied",
  "InvalidAccessKeyId",
  "SignatureDoesNotMatch",
  "ExpiredToken",
  "InvalidToken",
  "TokenRefreshRequired",
  "AllAccessDisabled",
]);

/** What {@linkcode S3Error} is made of. */
export interface S3ErrorInit {
  /** The object or bucket, as `s3://BUCKET/KEY` (none for a request not made yet). */
  url?: string | undefined;
  /** What was being done, for the message: `upload part 3`, `read`. */
  operation: string;
  /** HTTP status; 0 when no response came (a network error, a timeout). */
  status: number;
  /** The S3 error code (`NoSuchBucket`, `AccessDenied`), or a network error's name. */
  code: string;
  /** The server's message or the network error's text. */
  detail: string;
}

/**
 * A request to S3 storage failed for good (after the retries, where it was worth retrying).
 * The message is one line: `s3://BUCKET/KEY: OPERATION: DETAIL (STATUS CODE)`.
 *
 * @example A refused signature, and a missing bucket
 * ```ts
 * import assert from "node:assert/strict";
 * import { S3Error } from "./s3_errors.ts";
 *
 * const denied = new S3Error({
 *   url: "s3://backups/vm.vma.zst",
 *   operation: "start the upload",
 *   status: 403,
 *   code: "SignatureDoesNotMatch",
 *   detail: "the request signature does not match",
 * });
 * assert.equal(denied.denied, true);
 * assert.equal(
 *   denied.message,
 *   "s3://backups/vm.vma.zst: start the upload: the request signature does not match (403 SignatureDoesNotMatch)",
 * );
 * const missing = new S3Error({
 *   url: "s3://nope/vm.vma",
 *   operation: "read",
 *   status: 404,
 *   code: "NoSuchBucket",
 *   detail: "no such bucket",
 * });
 * assert.equal(missing.denied, false);
 * ```
 */
export class S3Error extends Error {
  /** `s3://BUCKET/KEY`, or `""` when no request was made (missing credentials). */
  readonly url: string;
  /** HTTP status; 0 when no response came. */
  readonly status: number;
  /** The S3 error code, or a network error's name. */
  readonly code: string;
  /** What was being done. */
  readonly operation: string;
  /** What went wrong, without the URL, operation and code. */
  readonly detail: string;

  /** An error from its parts; `options.cause` keeps the underlying error. */
  constructor(init: S3ErrorInit, options?: ErrorOptions) {
    const what = init.status === 0 ? init.code : `${init.status} ${init.code}`;
    const where = init.url ? `${init.url}: ` : "";
    super(`${where}${init.operation}: ${init.detail} (${what})`, options);
    this.name = "S3Error";
    this.url = init.url ?? "";
    this.status = init.status;
    this.code = init.code;
    this.operation = init.operation;
    this.detail = init.detail;
  }

  /** True when the storage refused the credentials or the access (HTTP 403 and the like). */
  get denied(): boolean {
    return this.status === 403 || DENIED_CODES.has(this.code);
  }
}
