// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Where an S3 object is and how to reach it, following the AWS conventions: `s3://BUCKET/KEY`
 * URLs; credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` or
 * a profile of `~/.aws/credentials` (`AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`); the region
 * from `AWS_REGION` (or `AWS_DEFAULT_REGION`); the endpoint from `AWS_ENDPOINT_URL_S3` or
 * `AWS_ENDPOINT_URL`, addressed path-style (`ENDPOINT/BUCKET/KEY`), as custom S3 servers
 * (Ceph RGW, MinIO) expect. Without an endpoint it is AWS itself, addressed virtual-host style.
 *
 * @module
 */
import { S3Error } from "./s3_errors.ts";

/** A bucket and a key: `s3://BUCKET/KEY`. */
export interface S3Location {
  /** The bucket name. */
  bucket: string;
  /** The object key, as written (`pve/vzdump-qemu-100.vma.zst`). */
  key: string;
}

/** Access keys, as AWS issues them. */
export interface S3Credentials {
  /** `AWS_ACCESS_KEY_ID`. */
  accessKeyId: string;
  /** `AWS_SECRET_ACCESS_KEY`. */
  secretAccessKey: string;
  /** For temporary credentials (STS). */
  sessionToken?: string | undefined;
}

/** How to reach S3 storage; what is not given comes from the environment, as for the AWS CLI. */
export interface S3Options {
  /** The endpoint URL, for example `http://127.0.0.1:7480` (default from the environment). */
  endpoint?: string | undefined;
  /** The region (default `AWS_REGION`, `AWS_DEFAULT_REGION`, else `us-east-1`). */
  region?: string | undefined;
  /** Access keys; otherwise from the environment or the credentials file. */
  credentials?: S3Credentials | undefined;
  /** The profile of the credentials file (default `AWS_PROFILE`, else `default`). */
  profile?: string | undefined;
  /**
   * Environment variables to read instead of the process's. Variables of the process are read
   * only where Deno grants `--allow-env` for them.
   */
  env?: Record<string, string | undefined> | undefined;
}

/** Everything a request needs: resolved once, then shared. */
export interface S3Config {
  /** Endpoint without a trailing slash, such as `https://s3.eu-west-1.amazonaws.com`. */
  endpoint: string;
  /** `ENDPOINT/BUCKET/KEY` (custom endpoints) instead of `BUCKET.HOST/KEY` (AWS). */
  pathStyle: boolean;
  /** The region requests are signed for. */
  region: string;
  /** The keys requests are signed with. */
  credentials: S3Credentials;
}

/**
 * True for `s3://` URLs.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { isS3Url } from "./s3_config.ts";
 *
 * assert.equal(isS3Url("s3://backups/vm-100.vma.zst"), true);
 * assert.equal(isS3Url("vm-100.vma.zst"), false);
 * ```
 */
export function isS3Url(path: string): boolean {
  return path.startsWith("s3://");
}

/**
 * Splits `s3://BUCKET/KEY`. The key is taken as written (no percent-decoding), as the AWS CLI
 * does; it must not be empty. Throws a `TypeError` naming what is wrong.
 *
 * @example Bucket and key
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseS3Url } from "./s3_config.ts";
 *
 * assert.deepEqual(parseS3Url("s3://backups/pve/vm 100.vma.zst"), {
 *   bucket: "backups",
 *   key: "pve/vm 100.vma.zst",
 * });
 * assert.throws(() => parseS3Url("s3://backups/"), /no key/);
 * assert.throws(() => parseS3Url("s3://B/x"), /bucket name/);
 * ```
 */
export function parseS3Url(url: string): S3Location {
  if (!isS3Url(url)) throw new TypeError(`'${url}' is not an s3://BUCKET/KEY URL`);
  const rest = url.slice("s3://".length);
  const slash = rest.indexOf("/");
  const bucket = slash < 0 ? rest : rest.slice(0, slash);
  const key = slash < 0 ? "" : rest.slice(slash + 1);
  // The rules common to AWS and Ceph: 3-63 lower-case letters, digits, dots and hyphens.
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) {
    throw new TypeError(
      `'${url}': '${bucket}' is not a valid bucket name (3 to 63 of a-z, 0-9, '.' and '-')`,
    );
  }
  if (key === "") throw new TypeError(`'${url}' has no key (s3://BUCKET/KEY)`);
  return { bucket, key };
}

/**
 * Formats a location as `s3://BUCKET/KEY`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatS3Url } from "./s3_config.ts";
 *
 * assert.equal(formatS3Url({ bucket: "backups", key: "vm.vma" }), "s3://backups/vm.vma");
 * ```
 */
export function formatS3Url(location: S3Location): string {
  return `s3://${location.bucket}/${location.key}`;
}

/**
 * Resolves the endpoint, region and credentials: the options first, then the environment,
 * then the credentials file. Rejects with an {@linkcode S3Error} (code `NoCredentials`) when
 * there are no credentials, or with `Deno.errors.NotCapable` when Deno does not grant the
 * environment access needed to find them.
 *
 * @example From environment variables (here given explicitly)
 * ```ts
 * import assert from "node:assert/strict";
 * import { resolveS3Config } from "./s3_config.ts";
 *
 * const env = {
 *   AWS_ACCESS_KEY_ID: "AKIDEXAMPLE",
 *   AWS_SECRET_ACCESS_KEY: "secret",
 *   AWS_ENDPOINT_URL: "http://127.0.0.1:7480/",
 * };
 * const config = await resolveS3Config({ env });
 * assert.deepEqual(config, {
 *   endpoint: "http://127.0.0.1:7480",
 *   pathStyle: true,
 *   region: "us-east-1",
 *   credentials: { accessKeyId: "AKIDEXAMPLE", secretAccessKey: "secret" },
 * });
 * const aws = await resolveS3Config({ env: { ...env, AWS_ENDPOINT_URL: "", AWS_REGION: "eu-west-1" } });
 * assert.deepEqual([aws.endpoint, aws.pathStyle], ["https://s3.eu-west-1.amazonaws.com", false]);
 * ```
 *
 * @example A profile of the credentials file
 * ```ts
 * import assert from "node:assert/strict";
 * import { resolveS3Config } from "./s3_config.ts";
 *
 * const file = await Deno.makeTempFile();
 * await Deno.writeTextFile(file, `[default]
 * aws_access_key_id = AKIDDEFAULT
 * aws_secret_access_key = s1
 *
 * [backup]
 * aws_access_key_id=AKIDBACKUP
 * aws_secret_access_key=s2
 * aws_session_token=token
 * `);
 * const env = { AWS_SHARED_CREDENTIALS_FILE: file, AWS_PROFILE: "backup" };
 * const { credentials } = await resolveS3Config({ env });
 * assert.deepEqual(credentials, {
 *   accessKeyId: "AKIDBACKUP",
 *   secretAccessKey: "s2",
 *   sessionToken: "token",
 * });
 * await assert.rejects(resolveS3Config({ env: { ...env, AWS_PROFILE: "nope" } }), {
 *   name: "S3Error",
 *   message: /profile 'nope' is not in/,
 * });
 * await Deno.remove(file);
 * ```
 */
export async function resolveS3Config(options: S3Options = {}): Promise<S3Config> {
  const env = environment(options.env);
  const region = options.region || env.get("AWS_REGION") || env.get("AWS_DEFAULT_REGION") ||
    "us-east-1";
  const custom = options.endpoint || env.get("AWS_ENDPOINT_URL_S3") || env.get("AWS_ENDPOINT_URL");
  let endpoint = `https://s3.${region}.amazonaws.com`;
  if (custom) {
    let url: URL;
    try {
      url = new URL(custom);
    } catch {
      throw new TypeError(`the S3 endpoint '${custom}' is not a URL (http://HOST:PORT)`);
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      throw new TypeError(`the S3 endpoint '${custom}' must be an http:// or https:// URL`);
    }
    endpoint = `${url.origin}${url.pathname}`.replace(/\/+$/, "");
  }
  const credentials = options.credentials ?? await findCredentials(env, options.profile);
  return { endpoint, pathStyle: Boolean(custom), region, credentials };
}

/** Reads variables from `env`, or from the process where Deno grants access to them. */
function environment(env: Record<string, string | undefined> | undefined) {
  const refused: string[] = [];
  return {
    refused,
    get(name: string): string | undefined {
      if (env) return env[name];
      const state = Deno.permissions.querySync({ name: "env", variable: name }).state;
      if (state === "granted") return Deno.env.get(name);
      refused.push(name);
      return undefined;
    },
  };
}

async function findCredentials(
  env: ReturnType<typeof environment>,
  profileOption: string | undefined,
): Promise<S3Credentials> {
  const accessKeyId = env.get("AWS_ACCESS_KEY_ID");
  const secretAccessKey = env.get("AWS_SECRET_ACCESS_KEY");
  if (accessKeyId && secretAccessKey) {
    const sessionToken = env.get("AWS_SESSION_TOKEN");
    return { accessKeyId, secretAccessKey, ...(sessionToken && { sessionToken }) };
  }
  const profile = profileOption || env.get("AWS_PROFILE") || "default";
  const home = env.get("HOME");
  const file = env.get("AWS_SHARED_CREDENTIALS_FILE") || (home && `${home}/.aws/credentials`);
  let text: string | undefined;
  if (file) {
    try {
      text = await Deno.readTextFile(file);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error; // NotCapable names --allow-read
    }
  }
  const found = text === undefined ? undefined : iniSection(text, profile);
  if (found?.aws_access_key_id && found.aws_secret_access_key) {
    return {
      accessKeyId: found.aws_access_key_id,
      secretAccessKey: found.aws_secret_access_key,
      ...(found.aws_session_token && { sessionToken: found.aws_session_token }),
    };
  }
  if (env.refused.length > 0) {
    const name = env.refused.includes("AWS_ACCESS_KEY_ID") ? "AWS_ACCESS_KEY_ID" : env.refused[0];
    throw new Deno.errors.NotCapable(
      `Requires env access to "${name}" to find S3 credentials, run again with the --allow-env flag`,
    );
  }
  const detail = text === undefined
    ? "none found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials"
    : `profile '${profile}' is not in ${file} (or lacks aws_access_key_id, aws_secret_access_key)`;
  throw new S3Error({ operation: "S3 credentials", status: 0, code: "NoCredentials", detail });
}

/** The `key = value` lines of one `[section]` of an INI file such as `~/.aws/credentials`. */
function iniSection(text: string, section: string): Record<string, string> | undefined {
  let current: string | undefined;
  let found: Record<string, string> | undefined;
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#") || line.startsWith(";")) continue;
    const header = line.match(/^\[\s*(.+?)\s*\]$/);
    if (header) {
      current = header[1];
      if (current === section) found ??= {};
      continue;
    }
    const equals = line.indexOf("=");
    if (current !== section || equals < 0 || !found) continue;
    found[line.slice(0, equals).trim().toLowerCase()] = line.slice(equals + 1).trim();
  }
  return found;
}
