// Copyright 2026 the vmabackup authors. MIT license.
/**
 * A real S3 server for tests: Ceph RADOS Gateway 16.2 (Debian packages ceph-mon ceph-osd
 * radosgw ceph-common) as a throwaway single-node cluster in one state directory. One mon, one
 * memstore OSD (data in its RAM) and radosgw on 127.0.0.1, an S3 user with fixed keys; no
 * systemd, nothing in /etc/ceph or /var/lib/ceph, no cephx (S3 SigV4 is still enforced).
 * Bring-up takes about 1.5 s, teardown about 6 s.
 *
 * `.ci/run` starts one cluster for the whole run (`deno run -A tests/_rgw.ts up DIR`) and
 * exports the `VMABACKUP_TEST_S3_*` variables it prints; the tests use that one. Without
 * them, each test file that needs RGW starts its own on free ports and stops it when the
 * file is done; without Ceph installed those tests are skipped (they fail under CI=true).
 *
 *   deno run -A tests/_rgw.ts up DIR      fresh cluster in DIR (wiped first); prints the env
 *   deno run -A tests/_rgw.ts down DIR    stops every daemon it started (by pid file)
 *   deno run -A tests/_rgw.ts purge DIR   down, then removes DIR
 *
 * Gotchas this works around (measured, see the project's object-storage notes): radosgw hangs
 * at start with auth none unless `ms mon client mode = crc secure`; the mon waits 1 s per map
 * change unless the paxos intervals are short; radosgw ignores TERM while the OSD stops at the
 * same time, so daemons stop one after another; deleted data stays in RAM until RGW's garbage
 * collector runs, so it runs every 10 s; a full memstore blocks writes, so RADOS operations
 * of radosgw time out after 20 s instead of hanging.
 */

import { S3Client, type S3ClientOptions, xmlValues } from "../lib/storage/s3_client.ts";

/** Where a running test cluster is and how to talk to it. */
export interface RgwServer {
  /** `http://127.0.0.1:PORT` of the main gateway. */
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** The state directory: `ceph.conf`, `run/*.pid`, `log/`. */
  dir: string;
}

/** Ports of one cluster. */
export interface RgwPorts {
  mon: number;
  rgw: number;
}

/** Fixed test keys (the cluster binds to 127.0.0.1 only). */
const ACCESS_KEY = "VMABACKUPTESTKEY0000";
const SECRET_KEY = "vmabackuptestsecret000000000000000000000";
const REGION = "us-east-1";
/** Non-default ports, so a developer's own Ceph (3300, 7480) does not collide with CI's. */
export const CI_PORTS: RgwPorts = { mon: 3391, rgw: 7491 };

const ENV_NAMES = {
  endpoint: "VMABACKUP_TEST_S3_ENDPOINT",
  region: "VMABACKUP_TEST_S3_REGION",
  accessKeyId: "VMABACKUP_TEST_S3_ACCESS_KEY",
  secretAccessKey: "VMABACKUP_TEST_S3_SECRET_KEY",
  dir: "VMABACKUP_TEST_RGW_DIR",
} as const;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function portOpen(port: number): Promise<boolean> {
  try {
    (await Deno.connect({ hostname: "127.0.0.1", port })).close();
    return true;
  } catch {
    return false;
  }
}

async function waitFor(seconds: number, check: () => Promise<boolean>): Promise<boolean> {
  for (const end = Date.now() + seconds * 1000; Date.now() < end; await sleep(100)) {
    if (await check()) return true;
  }
  return false;
}

/** Runs a program to completion; resolves to its stdout, or rejects with its stderr. */
async function run(program: string, args: string[]): Promise<string> {
  const { code, stdout, stderr } = await new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  if (code !== 0) {
    throw new Error(`${program} ${args.join(" ")} failed (${code}): ${text.decode(stderr).trim()}`);
  }
  return text.decode(stdout);
}

/**
 * Starts a daemon. Ceph daemons fork and the parent returns once the child has initialised;
 * their output goes to their log files, so no pipe keeps this process waiting for them.
 */
async function startDaemon(program: string, args: string[]): Promise<void> {
  const { code } = await new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).output();
  if (code !== 0) throw new Error(`${program} ${args.join(" ")} exited with ${code}`);
}

function config(dir: string, fsid: string, ports: RgwPorts): string {
  return `[global]
fsid = ${fsid}
mon host = v2:127.0.0.1:${ports.mon}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
# radosgw's mon client mode is "secure", which auth none cannot do: it would hang at start
ms mon client mode = crc secure
client mount timeout = 30
rados mon op timeout = 30
mon warn on insecure global id reclaim allowed = false
run dir = ${dir}/run
admin socket = ${dir}/run/$name.asok
pid file = ${dir}/run/$name.pid
log file = ${dir}/log/$name.log
mon cluster log file = ${dir}/log/cluster.log
crash dir = ${dir}/tmp
keyring = ${dir}/tmp/keyring-unused
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# no mgr (radosgw does not need one, it costs ~300 MB); keep health from going ERR after 120 s
mon mgr mkfs grace = 31536000
osd crush chooseleaf type = 0
[mon]
mon data = ${dir}/mon/$cluster-$id
mon data avail warn = 1
mon data avail crit = 0
# each mon map change waits paxos_propose_interval (1 s); radosgw makes ~10 on first start
paxos propose interval = 0.05
paxos min wait = 0.01
[osd]
osd data = ${dir}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = 8589934592
osd memory target = 939524096
osd crush update on start = true
# a starved OSD (a loaded CI machine) would kill itself after 150 s: let it wait instead
osd op thread suicide timeout = 0
[client]
rgw data = ${dir}/rgw
# reclaim deleted and aborted data within seconds instead of hours (memstore is RAM)
rgw gc obj min wait = 0
rgw gc processor period = 10
rgw gc processor max time = 10
# a full OSD blocks RADOS writes forever: fail the S3 request instead
rados osd op timeout = 20
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:${ports.rgw}
`;
}

/** Stops the daemons named (by pid file): TERM, up to 15 s, then KILL. */
async function stopDaemons(dir: string, names: string[]): Promise<void> {
  const pids: number[] = [];
  for (const name of names) {
    const pid = Number(await Deno.readTextFile(`${dir}/run/${name}.pid`).catch(() => ""));
    if (!Number.isInteger(pid) || pid <= 0) continue;
    try {
      Deno.kill(pid, "SIGTERM");
      pids.push(pid);
    } catch { /* not running */ }
  }
  const alive = (pid: number) => {
    try {
      Deno.kill(pid, "SIGCONT"); // a harmless signal: fails once the process is gone
      return true;
    } catch {
      return false;
    }
  };
  await waitFor(15, () => Promise.resolve(!pids.some(alive)));
  for (const pid of pids.filter(alive)) {
    try {
      Deno.kill(pid, "SIGKILL");
    } catch { /* gone meanwhile */ }
  }
  for (const name of names) await Deno.remove(`${dir}/run/${name}.pid`).catch(() => {});
}

/**
 * Stops a cluster: radosgw first (it needs the OSD to shut down), then the OSD (it tells the
 * mon), then the mon, about 2 s each. Logs stay in `DIR/log`.
 */
export async function rgwDown(dir: string): Promise<void> {
  const gateways = [];
  for await (const entry of await readDirOrEmpty(`${dir}/run`)) {
    if (entry.name.startsWith("client.rgw.") && entry.name.endsWith(".pid")) {
      gateways.push(entry.name.slice(0, -4));
    }
  }
  await stopDaemons(dir, gateways);
  await stopDaemons(dir, ["osd.0"]);
  await stopDaemons(dir, ["mon.a"]);
}

/** Starts a fresh cluster in `dir` (stale state there is wiped) and waits until S3 answers. */
export async function rgwUp(dir: string, ports: RgwPorts): Promise<RgwServer> {
  await Deno.mkdir(dir, { recursive: true });
  dir = await Deno.realPath(dir);
  for await (const entry of await readDirOrEmpty(`${dir}/run`)) {
    const pid = Number(await Deno.readTextFile(`${dir}/run/${entry.name}`).catch(() => ""));
    if (entry.name.endsWith(".pid") && pid > 0 && isAlive(pid)) {
      throw new Error(`${dir} has a running cluster (${entry.name}); stop it first`);
    }
  }
  for (const name of ["mon", "osd", "rgw", "run", "log", "tmp", "ceph.conf", "s3.env"]) {
    await Deno.remove(`${dir}/${name}`, { recursive: true }).catch(() => {});
  }
  for (const port of [ports.mon, ports.rgw]) {
    if (await portOpen(port)) throw new Error(`port ${port} is already in use`);
  }
  for (const name of ["mon/ceph-a", "osd/ceph-0", "rgw", "run", "log", "tmp"]) {
    await Deno.mkdir(`${dir}/${name}`, { recursive: true });
  }
  const conf = `${dir}/ceph.conf`;
  const fsid = crypto.randomUUID();
  await Deno.writeTextFile(conf, config(dir, fsid, ports));
  try {
    await run("monmaptool", [
      "--create",
      "--fsid",
      fsid,
      "--addv",
      "a",
      `[v2:127.0.0.1:${ports.mon}]`,
      `${dir}/tmp/monmap`,
    ]);
    await run("ceph-mon", ["-c", conf, "-i", "a", "--mkfs", "--monmap", `${dir}/tmp/monmap`]);
    await startDaemon("ceph-mon", ["-c", conf, "-i", "a"]);
    if (!await waitFor(20, () => portOpen(ports.mon))) throw new Error("the mon did not listen");

    const ceph = ["-c", conf, "--connect-timeout", "15"];
    const osdUuid = crypto.randomUUID();
    const osdId = (await run("ceph", [...ceph, "osd", "new", osdUuid])).trim();
    if (osdId !== "0") throw new Error(`unexpected OSD id '${osdId}'`);
    await run("ceph-osd", ["-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osdUuid]);
    await startDaemon("ceph-osd", ["-c", conf, "-i", "0"]);
    const osdUp = async () =>
      (await run("ceph", [...ceph, "osd", "stat", "-f", "json"]).catch(() => ""))
        .includes('"num_up_osds":1');
    if (!await waitFor(60, osdUp)) throw new Error("osd.0 never came up");

    // radosgw creates its pools on first start; its fork parent returns once initialised.
    await startGateway(dir, "a");
    await run("radosgw-admin", [
      "-c",
      conf,
      "-n",
      "client.admin",
      `--log-file=${dir}/log/radosgw-admin.log`,
      "user",
      "create",
      "--uid=test",
      "--display-name=vmabackup tests",
      `--access-key=${ACCESS_KEY}`,
      `--secret-key=${SECRET_KEY}`,
    ]);
    const answers = () =>
      fetch(`http://127.0.0.1:${ports.rgw}/`).then(async (response) => {
        await response.body?.cancel();
        return response.ok;
      }, () => false);
    if (!await waitFor(30, answers)) throw new Error("radosgw does not answer HTTP");
  } catch (error) {
    const logs = await logTails(dir);
    await rgwDown(dir);
    throw new Error(`cannot start RGW in ${dir}: ${(error as Error).message}\n${logs}`);
  }
  const server = {
    endpoint: `http://127.0.0.1:${ports.rgw}`,
    region: REGION,
    accessKeyId: ACCESS_KEY,
    secretAccessKey: SECRET_KEY,
    dir,
  };
  await Deno.writeTextFile(`${dir}/s3.env`, envLines(server));
  return server;
}

/**
 * Starts a radosgw named `client.rgw.NAME` on the cluster in `dir`; without `port`, with the
 * frontend of the config (gateway `a`). A second gateway on the same cluster sees the same
 * buckets, so a test can stop and restart it without disturbing the others.
 */
export async function startGateway(dir: string, name: string, port?: number): Promise<void> {
  const frontend = port === undefined ? [] : [`--rgw-frontends=beast endpoint=127.0.0.1:${port}`];
  await startDaemon("radosgw", ["-c", `${dir}/ceph.conf`, "-n", `client.rgw.${name}`, ...frontend]);
  const conf = await Deno.readTextFile(`${dir}/ceph.conf`);
  const listen = port ?? Number(conf.match(/endpoint=127\.0\.0\.1:(\d+)/)![1]);
  if (!await waitFor(60, () => portOpen(listen))) {
    throw new Error(`radosgw ${name} did not listen on ${listen}`);
  }
}

/** Stops the radosgw `client.rgw.NAME` (TERM, then KILL after 15 s). */
export async function stopGateway(dir: string, name: string): Promise<void> {
  await stopDaemons(dir, [`client.rgw.${name}`]);
}

function isAlive(pid: number): boolean {
  try {
    Deno.kill(pid, "SIGCONT");
    return true;
  } catch {
    return false;
  }
}

async function readDirOrEmpty(path: string): Promise<AsyncIterable<Deno.DirEntry>> {
  try {
    await Deno.stat(path);
    return Deno.readDir(path);
  } catch {
    return (async function* () {})();
  }
}

async function logTails(dir: string): Promise<string> {
  const lines: string[] = [];
  for await (const entry of await readDirOrEmpty(`${dir}/log`)) {
    const text = await Deno.readTextFile(`${dir}/log/${entry.name}`).catch(() => "");
    lines.push(`== ${entry.name}`, ...text.trimEnd().split("\n").slice(-10));
  }
  return lines.join("\n");
}

/** The `VMABACKUP_TEST_*` lines that tell the tests where the server is. */
function envLines(server: RgwServer): string {
  return Object.entries(ENV_NAMES).map(([key, name]) =>
    `${name}=${server[key as keyof RgwServer]}\n`
  )
    .join("");
}

/** The server `.ci/run` started, from the environment, if any. */
function serverFromEnv(): RgwServer | undefined {
  const get = (name: string) => Deno.env.get(name);
  const endpoint = get(ENV_NAMES.endpoint);
  if (!endpoint) return undefined;
  return {
    endpoint,
    region: get(ENV_NAMES.region) ?? REGION,
    accessKeyId: get(ENV_NAMES.accessKeyId) ?? ACCESS_KEY,
    secretAccessKey: get(ENV_NAMES.secretAccessKey) ?? SECRET_KEY,
    dir: get(ENV_NAMES.dir) ?? "",
  };
}

/** True when the Ceph programs this fixture runs are installed. */
export const CEPH_INSTALLED = await (async () => {
  for (const program of ["ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool"]) {
    try {
      await new Deno.Command(program, { args: ["--version"], stdout: "null", stderr: "null" })
        .output();
    } catch {
      return false;
    }
  }
  return true;
})();

/** A port nobody listens on now (the kernel's choice). */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

let shared: Promise<RgwServer> | undefined;

/**
 * The test server: the one `.ci/run` started (from the environment), or else one started for
 * this test file on free ports and stopped when the process exits.
 */
export function rgwServer(): Promise<RgwServer> {
  shared ??= (async () => {
    const fromEnv = serverFromEnv();
    if (fromEnv) return fromEnv;
    const dir = await Deno.makeTempDir({ prefix: "vmabackup-rgw-" });
    const server = await rgwUp(dir, { mon: freePort(), rgw: freePort() });
    // Teardown must finish before the test process goes: run it synchronously at unload.
    globalThis.addEventListener("unload", () => {
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", new URL(import.meta.url).pathname, "purge", dir],
        stdout: "null",
        stderr: "inherit",
      }).outputSync();
    });
    return server;
  })();
  return shared;
}

/** The AWS CLI of Debian (`aws` on PATH may be a pyenv shim of another version). */
export const AWS_CLI = "/usr/bin/aws";
const AWS_CLI_INSTALLED = await Deno.stat(AWS_CLI).then(() => true, () => false);

/**
 * `Deno.test` for tests that need RGW (and, with `awsCli`, the AWS CLI as an independent
 * client): skipped (and saying so) on a machine without them, failing instead under CI=true,
 * where `.ci/run` installs them and starts RGW.
 */
export function rgwTest(
  name: string,
  fn: (server: RgwServer) => Promise<void>,
  options: { awsCli?: boolean } = {},
): void {
  const ci = Deno.env.get("CI") === "true";
  const missing = !(CEPH_INSTALLED || serverFromEnv() !== undefined)
    ? "Ceph RGW (apt-get install ceph-mon ceph-osd radosgw ceph-common)"
    : options.awsCli && !AWS_CLI_INSTALLED
    ? `${AWS_CLI} (apt-get install awscli)`
    : undefined;
  if (missing && !ci) {
    Deno.test({
      name: `${name} (skipped: ${missing.replace(/ \(.*/, "")} is not installed)`,
      ignore: true,
      fn: () => {},
    });
    return;
  }
  Deno.test(name, async () => {
    if (missing) throw new Error(`${missing} is required under CI=true`);
    try {
      await fn(await rgwServer());
    } finally {
      for (const client of clients.splice(0)) client.close();
    }
  });
}

/** Clients made during the current test: {@linkcode rgwTest} closes them after it. */
const clients: S3Client[] = [];

/** A client of the test server (or of `endpoint`, a proxy in front of it), retrying fast. */
export function testClient(
  server: RgwServer,
  options: S3ClientOptions & { endpoint?: string; secretAccessKey?: string } = {},
): S3Client {
  const client = new S3Client({
    endpoint: options.endpoint ?? server.endpoint,
    pathStyle: true,
    region: server.region,
    credentials: {
      accessKeyId: server.accessKeyId,
      secretAccessKey: options.secretAccessKey ?? server.secretAccessKey,
    },
  }, { retry: { initialDelay: 20, maxDelay: 200, ...options.retry } });
  clients.push(client);
  return client;
}

/** Creates a bucket with a fresh name. */
export async function newBucket(client: S3Client): Promise<string> {
  const bucket = `test-${crypto.randomUUID().slice(0, 13)}`;
  const response = await client.send({
    operation: "create the bucket",
    method: "PUT",
    location: { bucket, key: "" },
  });
  await response.body?.cancel();
  return bucket;
}

/** The ids of the multipart uploads in progress in `bucket` (ListMultipartUploads). */
export async function pendingUploads(client: S3Client, bucket: string): Promise<string[]> {
  const response = await client.send({
    operation: "list the uploads",
    method: "GET",
    location: { bucket, key: "" },
    query: { uploads: "" },
  });
  return xmlValues(await response.text(), "UploadId");
}

/** The keys in `bucket` (ListObjectsV2, first 1000). */
export async function listKeys(client: S3Client, bucket: string): Promise<string[]> {
  const response = await client.send({
    operation: "list the objects",
    method: "GET",
    location: { bucket, key: "" },
    query: { "list-type": "2" },
  });
  return xmlValues(await response.text(), "Key");
}

if (import.meta.main) {
  const [command, dir] = Deno.args;
  if (!dir || !["up", "down", "purge"].includes(command!)) {
    await Deno.stderr.write(
      new TextEncoder().encode("usage: deno run -A tests/_rgw.ts up|down|purge DIR\n"),
    );
    Deno.exit(2);
  }
  if (command === "up") {
    const server = await rgwUp(dir, CI_PORTS);
    await Deno.stdout.write(new TextEncoder().encode(envLines(server)));
  } else {
    await Deno.stat(dir).then(() => rgwDown(dir), () => {});
    if (command === "purge") await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}
