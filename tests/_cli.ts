// Copyright 2026 the vmabackup authors. MIT license.
/** Helpers to run cli.ts as a subprocess, as users and scripts do. */

export const CLI = new URL("../cli.ts", import.meta.url).pathname;

export interface CliResult {
  code: number;
  stdout: Uint8Array;
  stderr: string;
  text: string;
}

export interface CliOptions {
  /** Deno permission flags (default: read and write). */
  permissions?: string[];
  stdin?: Uint8Array;
  env?: Record<string, string>;
  cwd?: string;
}

const decoder = new TextDecoder();

/** Spawns `deno run <permissions> cli.ts ...args` with piped stdio. */
export function spawnCli(args: string[], options: CliOptions = {}): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", ...(options.permissions ?? ["--allow-read", "--allow-write"]), CLI, ...args],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", TZ: "UTC", ...options.env },
    ...(options.cwd && { cwd: options.cwd }),
  }).spawn();
}

/** Runs the CLI to completion. */
export async function cli(args: string[], options: CliOptions = {}): Promise<CliResult> {
  const child = spawnCli(args, options);
  const feeding = ReadableStream.from(options.stdin ? [options.stdin] : []).pipeTo(child.stdin)
    .catch(() => {}); // the CLI may stop reading early (list reads only the header)
  const [{ code, stdout, stderr }] = await Promise.all([child.output(), feeding]);
  return { code, stdout, stderr: decoder.decode(stderr), text: decoder.decode(stdout) };
}

/** Runs an external program (zstd, gzip, ...) and returns its stdout. */
export async function tool(
  program: string,
  args: string[],
  stdin?: Uint8Array,
  env?: Record<string, string>,
): Promise<Uint8Array> {
  const child = new Deno.Command(program, {
    args,
    stdin: stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
    ...(env && { env }),
  }).spawn();
  // Feed stdin while the output is collected, or a full pipe deadlocks both sides.
  const feeding = stdin ? ReadableStream.from([stdin]).pipeTo(child.stdin) : Promise.resolve();
  const [{ code, stdout, stderr }] = await Promise.all([child.output(), feeding]);
  if (code !== 0) throw new Error(`${program} ${args.join(" ")} failed: ${decoder.decode(stderr)}`);
  return stdout;
}

/** Runs a shell script (bash by default) from the project's root, as a user's pipeline runs. */
export async function shell(script: string, program = "bash"): Promise<CliResult> {
  const { code, stdout, stderr } = await new Deno.Command(program, {
    args: ["-c", script],
    cwd: new URL("..", import.meta.url).pathname,
    env: { NO_COLOR: "1" },
  }).output();
  return { code, stdout, stderr: decoder.decode(stderr), text: decoder.decode(stdout) };
}

/**
 * Bash pipelines in which `command`'s output fails, each with the error it must report: the
 * reader stops early (`head`: a broken pipe), and the disk is full (`/dev/full`).
 */
export function failingSinks(command: string): [string, RegExp][] {
  return [
    [
      `${command} | head -c 100000 > /dev/null; exit \${PIPESTATUS[0]}`,
      /error: .*(Broken pipe|os error 32)/,
    ],
    [`${command} > /dev/full`, /error: .*(No space left on device|os error 28)/],
  ];
}

/**
 * Reads text from `lines` onto `seen` until it holds `needle`, or to the end without one (a
 * CLI's `--progress json` lines, to act at its snapshot point); returns all of it.
 */
export async function readUntil(
  lines: ReadableStreamDefaultReader<string>,
  needle?: string,
  seen = "",
): Promise<string> {
  while (needle === undefined || !seen.includes(needle)) {
    const { value, done } = await lines.read();
    if (done) break;
    seen += value;
  }
  return seen;
}

/** True when `program` can be run. */
export async function hasProgram(program: string): Promise<boolean> {
  try {
    await new Deno.Command(program, { args: ["--version"], stdout: "null", stderr: "null" })
      .output();
    return true;
  } catch {
    return false;
  }
}

/** A temporary directory for one test, removed afterwards. */
export async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vmabackup-test-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * `Deno.test` for tests that need external programs: skipped (and saying so) on a machine
 * without them, failing instead under CI=true, where .ci/run installs them.
 */
export async function toolTest(
  name: string,
  programs: string[],
  fn: () => Promise<void>,
): Promise<void> {
  const missing: string[] = [];
  for (const program of programs) if (!await hasProgram(program)) missing.push(program);
  if (missing.length > 0 && Deno.env.get("CI") !== "true") {
    Deno.test({ name: `${name} (skipped: ${missing.join(", ")} not installed)`, ignore: true, fn });
    return;
  }
  Deno.test(name, async () => {
    if (missing.length > 0) throw new Error(`${missing.join(", ")} required under CI=true`);
    await fn();
  });
}
