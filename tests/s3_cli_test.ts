// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The CLI with `s3://BUCKET/KEY` archives against a real Ceph RADOS Gateway: backups straight
 * to S3 read back by every command and by independent tools (the AWS CLI, zstd), and the
 * failures users meet: a gateway that goes away, flaky networks, wrong credentials, a missing
 * bucket, an existing key, SIGINT.
 */
import assert from "node:assert/strict";
import { cli, type CliOptions, spawnCli, tool, withTempDir } from "./_cli.ts";
import { startFaultProxy } from "./_fault_proxy.ts";
import {
  AWS_CLI,
  freePort,
  listKeys,
  newBucket,
  pendingUploads,
  type RgwServer,
  rgwTest,
  startGateway,
  stopGateway,
  testClient,
} from "./_rgw.ts";
import { randomBytes, sha256Hex } from "./_utils.ts";

const MiB = 1 << 20;

/** How the CLI is run against S3: credentials from the environment, network to `endpoint`. */
function s3Cli(server: RgwServer, endpoint = server.endpoint): CliOptions {
  return {
    permissions: [
      "--allow-read",
      "--allow-write",
      `--allow-net=${new URL(endpoint).host}`,
      "--allow-env",
    ],
    env: {
      AWS_ACCESS_KEY_ID: server.accessKeyId,
      AWS_SECRET_ACCESS_KEY: server.secretAccessKey,
      AWS_REGION: server.region,
      AWS_ENDPOINT_URL: endpoint,
    },
  };
}

/** A raw disk of `size` bytes: random data in the even MiBs, zeros in the odd ones. */
async function writeDisk(path: string, size: number, seed: number): Promise<Uint8Array> {
  const disk = new Uint8Array(size);
  for (let offset = 0; offset < size; offset += 2 * MiB) {
    disk.set(randomBytes(Math.min(MiB, size - offset), seed + offset / MiB), offset);
  }
  await Deno.writeFile(path, disk);
  return disk;
}

/** Polls until `check` holds (every 50 ms, for up to `seconds`). */
async function until(seconds: number, check: () => Promise<boolean>): Promise<void> {
  for (const end = Date.now() + seconds * 1000; Date.now() < end;) {
    if (await check()) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`not within ${seconds} s`);
}

/** The number of parts RGW holds for the (one) upload in progress in `bucket`. */
async function partsUploaded(server: RgwServer, bucket: string, key: string): Promise<number> {
  const client = testClient(server);
  const [uploadId] = await pendingUploads(client, bucket);
  if (uploadId === undefined) return 0;
  const response = await client.send({
    operation: "list parts",
    method: "GET",
    location: { bucket, key },
    query: { uploadId },
    accept: [404],
  });
  return (await response.text()).split("<Part>").length - 1;
}

rgwTest(
  "backup -o s3://: verify, list, config and extract read it back; so do aws and zstd",
  async (server) => {
    await withTempDir(async (dir) => {
      const client = testClient(server);
      const bucket = await newBucket(client);
      const url = `s3://${bucket}/pve/vzdump-qemu-100.vma.zst`;
      const disks = [
        await writeDisk(`${dir}/disk0.raw`, 24 * MiB + 4096, 1),
        await writeDisk(`${dir}/disk1.raw`, 3 * MiB, 2),
      ];
      await Deno.writeTextFile(`${dir}/qemu-server.conf`, "cores: 2\nmemory: 2048\n");
      const options = s3Cli(server);
      const backup = await cli([
        "backup",
        "--disk",
        `scsi0=${dir}/disk0.raw`,
        "--disk",
        `scsi1=${dir}/disk1.raw`,
        "--config",
        `${dir}/qemu-server.conf`,
        "-o",
        url,
        "--s3-part-size",
        "5M",
      ], options);
      assert.equal(backup.code, 0, backup.stderr);
      assert.match(backup.stderr, new RegExp(`^${url}: 2 disk\\(s\\)`));
      assert.deepEqual(await pendingUploads(client, bucket), []);

      const verify = await cli(["verify", url, "--json"], options);
      assert.equal(verify.code, 0, verify.stderr);
      const report = JSON.parse(verify.text);
      // The index inside the .vma.zst was found through ranged GETs: the data was checked.
      assert.deepEqual([report.ok, report.checked.level, report.checked.index.source], [
        true,
        "sha256",
        "embedded",
      ]);
      const list = await cli(["list", url], options);
      assert.match(
        list.text,
        /^CFG: size: 22 name: qemu-server\.conf\nDEV: dev_id=1 size: 25169920/,
      );
      const config = await cli(["config", url], options);
      assert.equal(config.text, "cores: 2\nmemory: 2048\n");
      // --s3-endpoint instead of AWS_ENDPOINT_URL.
      const flag = s3Cli(server);
      delete flag.env!.AWS_ENDPOINT_URL;
      const extract = await cli(
        ["extract", url, `${dir}/restored`, "--s3-endpoint", server.endpoint],
        flag,
      );
      assert.equal(extract.code, 0, extract.stderr);
      for (const [i, disk] of disks.entries()) {
        const restored = await Deno.readFile(`${dir}/restored/disk-drive-scsi${i}.raw`);
        assert.equal(sha256Hex(restored), sha256Hex(disk));
      }
      const stdout = await cli(["extract", url, "--stdout", "scsi1"], options);
      assert.equal(sha256Hex(stdout.stdout), sha256Hex(disks[1]!));
      // One disk through the index: ranged GETs of its extents only.
      const one = await cli(["extract", url, `${dir}/one`, "--disk", "scsi1", "--json"], options);
      assert.equal(one.code, 0, one.stderr);
      const oneReport = JSON.parse(one.text);
      assert.equal(oneReport.access, "random");
      const whole = JSON.parse((await cli(["extract", url, `${dir}/all`, "--json"], options)).text);
      assert.ok(
        oneReport.bytesRead < whole.bytesRead / 3,
        `${oneReport.bytesRead} of ${whole.bytesRead} bytes`,
      );
      assert.equal(
        sha256Hex(await Deno.readFile(`${dir}/one/disk-drive-scsi1.raw`)),
        sha256Hex(disks[1]!),
      );

      // Independent readers: the AWS CLI downloads the object, the zstd CLI decodes it.
      await tool(
        AWS_CLI,
        [
          "--endpoint-url",
          server.endpoint,
          "s3",
          "cp",
          "--quiet",
          url,
          `${dir}/downloaded.vma.zst`,
        ],
        undefined,
        options.env,
      );
      await tool("zstd", ["-q", "-d", `${dir}/downloaded.vma.zst`, "-o", `${dir}/downloaded.vma`]);
      const local = await cli(["extract", `${dir}/downloaded.vma`, `${dir}/again`]);
      assert.equal(local.code, 0, local.stderr);
      const again = await Deno.readFile(`${dir}/again/disk-drive-scsi0.raw`);
      assert.equal(sha256Hex(again), sha256Hex(disks[0]!));
    });
  },
  { awsCli: true },
);

rgwTest(
  "backup -o s3://: an existing key needs --force; a missing bucket and wrong keys fail in one line",
  async (server) => {
    await withTempDir(async (dir) => {
      const client = testClient(server);
      const bucket = await newBucket(client);
      await writeDisk(`${dir}/disk.raw`, MiB, 3);
      const options = s3Cli(server);
      const backup = (url: string, more: string[] = [], run = options) =>
        cli(["backup", "--disk", `${dir}/disk.raw`, "-o", url, ...more], run);
      assert.equal((await backup(`s3://${bucket}/vm.vma`)).code, 0);

      const again = await backup(`s3://${bucket}/vm.vma`);
      assert.deepEqual([again.code, again.stderr], [
        6,
        `error: s3://${bucket}/vm.vma already exists (use --force to replace it)\n`,
      ]);
      assert.equal((await backup(`s3://${bucket}/vm.vma`, ["--force"])).code, 0);

      const missing = await backup("s3://no-such-bucket-for-vmabackup/vm.vma");
      assert.deepEqual([missing.code, missing.stderr], [
        4,
        "error: s3://no-such-bucket-for-vmabackup/vm.vma: check the bucket: no such bucket (404 NoSuchBucket)\n",
      ]);

      const wrong = { ...options, env: { ...options.env, AWS_SECRET_ACCESS_KEY: "wrong" } };
      const denied = await backup(`s3://${bucket}/other.vma`, [], wrong);
      assert.equal(denied.code, 8);
      assert.match(denied.stderr, /^error: s3:\/\/.*: access denied .*\(403 Forbidden\)\n$/);
      const read = await cli(["verify", `s3://${bucket}/vm.vma`], wrong);
      assert.equal(read.code, 8);
      assert.equal(read.stderr.split("\n").length, 2); // one line

      const noKey = await cli(["list", `s3://${bucket}/nothing.vma`], options);
      assert.deepEqual([noKey.code, noKey.stderr], [
        4,
        `error: s3://${bucket}/nothing.vma: open: no such key (404 NoSuchKey)\n`,
      ]);
      const noEnv = await cli(["list", `s3://${bucket}/vm.vma`], {
        ...options,
        permissions: ["--allow-read", `--allow-net=${new URL(server.endpoint).host}`],
      });
      assert.equal(noEnv.code, 5);
      assert.match(noEnv.stderr, /"AWS_ACCESS_KEY_ID" .*--allow-env/);
      // A plain .vma has its index beside it, as KEY.idx, and verify finds it there.
      const sidecar = await cli(["verify", `s3://${bucket}/vm.vma`, "--json"], options);
      assert.deepEqual(JSON.parse(sidecar.text).checked.index, {
        source: "sidecar",
        path: `s3://${bucket}/vm.vma.idx`,
      });
      assert.deepEqual((await listKeys(client, bucket)).sort(), ["vm.vma", "vm.vma.idx"]);
    });
  },
);

rgwTest("backup -o s3://: 503s and dropped connections are retried", async (server) => {
  await withTempDir(async (dir) => {
    const client = testClient(server);
    const bucket = await newBucket(client);
    const disk = await writeDisk(`${dir}/disk.raw`, 24 * MiB, 4);
    const proxy = startFaultProxy(server.endpoint, {
      decide: (index) => index % 4 === 3 ? "503" : index % 5 === 4 ? "drop-request" : "pass",
    });
    try {
      const options = s3Cli(server, proxy.endpoint);
      const url = `s3://${bucket}/flaky.vma`;
      const backup = await cli(
        ["backup", "--disk", `${dir}/disk.raw`, "-o", url, "--s3-part-size", "5M"],
        options,
      );
      assert.equal(backup.code, 0, backup.stderr);
      const actions = new Set(proxy.requests.map((request) => request.action));
      assert.ok(actions.has("503") && actions.has("drop-request"));
      const extract = await cli(["extract", url, `${dir}/out`], s3Cli(server));
      assert.equal(extract.code, 0, extract.stderr);
      assert.equal(
        sha256Hex(await Deno.readFile(`${dir}/out/disk-drive-scsi0.raw`)),
        sha256Hex(disk),
      );
      assert.deepEqual(await pendingUploads(client, bucket), []);
    } finally {
      await proxy.close();
    }
  });
});

rgwTest(
  "backup -o s3://: radosgw stopped mid-upload exits 4 and leaves no upload once it is back",
  async (server) => {
    await withTempDir(async (dir) => {
      const client = testClient(server);
      const bucket = await newBucket(client);
      await writeDisk(`${dir}/disk.raw`, 96 * MiB, 5);
      // A gateway of its own on the same cluster: stopping it leaves the other tests alone.
      const port = freePort();
      await startGateway(server.dir, "stopped", port);
      // The proxy only slows the upload down (100 ms per request), so the stop comes mid-way.
      const proxy = startFaultProxy(`http://127.0.0.1:${port}`, { delay: 100 });
      try {
        const url = `s3://${bucket}/stopped.vma`;
        const child = spawnCli(
          [
            "backup",
            "--disk",
            `${dir}/disk.raw`,
            "-o",
            url,
            "--s3-part-size",
            "5M",
            "--s3-retries",
            "2",
          ],
          s3Cli(server, proxy.endpoint),
        );
        const output = child.output();
        await until(60, async () => await partsUploaded(server, bucket, "stopped.vma") >= 1);
        await stopGateway(server.dir, "stopped");
        // Two attempts fail within a second; the abort is retried until the gateway is back.
        await new Promise((resolve) => setTimeout(resolve, 3000));
        await startGateway(server.dir, "stopped", port);
        const { code, stderr } = await output;
        const text = new TextDecoder().decode(stderr);
        assert.equal(code, 4, text);
        assert.match(
          text,
          /^error: s3:\/\/.*\/stopped\.vma: upload part \d+: .* after 2 attempts \(NetworkError\)\n$/,
        );
        assert.deepEqual(await pendingUploads(client, bucket), []);
        assert.deepEqual(await listKeys(client, bucket), []);
      } finally {
        await proxy.close();
        await stopGateway(server.dir, "stopped");
      }
    });
  },
);

rgwTest("backup -o s3://: SIGINT mid-upload aborts it and leaves nothing", async (server) => {
  await withTempDir(async (dir) => {
    const client = testClient(server);
    const bucket = await newBucket(client);
    await writeDisk(`${dir}/disk.raw`, 96 * MiB, 6);
    const proxy = startFaultProxy(server.endpoint, { delay: 100 });
    try {
      const child = spawnCli(
        [
          "backup",
          "--disk",
          `${dir}/disk.raw`,
          "-o",
          `s3://${bucket}/int.vma`,
          "--s3-part-size",
          "5M",
        ],
        s3Cli(server, proxy.endpoint),
      );
      const output = child.output();
      await until(60, async () => await partsUploaded(server, bucket, "int.vma") >= 1);
      child.kill("SIGINT");
      const { code, stderr } = await output;
      assert.deepEqual([code, new TextDecoder().decode(stderr)], [
        130,
        "error: interrupted by SIGINT\n",
      ]);
      assert.deepEqual(await pendingUploads(client, bucket), []);
      assert.deepEqual(await listKeys(client, bucket), []);
    } finally {
      await proxy.close();
    }
  });
});

rgwTest("index and convert read and write s3:// archives", async (server) => {
  await withTempDir(async (dir) => {
    const client = testClient(server);
    const bucket = await newBucket(client);
    const disk = await writeDisk(`${dir}/disk.raw`, 6 * MiB, 7);
    const options = s3Cli(server);
    const gz = `s3://${bucket}/vm.vma.gz`;
    const run = async (args: string[]) => {
      const result = await cli(args, options);
      assert.equal(result.code, 0, result.stderr);
      return result;
    };
    await run(["backup", "--disk", `${dir}/disk.raw`, "-o", gz, "--no-index"]);
    assert.deepEqual(await listKeys(client, bucket), ["vm.vma.gz"]);

    await run(["index", gz]);
    assert.deepEqual((await listKeys(client, bucket)).sort(), ["vm.vma.gz", "vm.vma.gz.idx"]);
    const sidecar = JSON.parse((await run(["verify", gz, "--json"])).text);
    assert.deepEqual([sidecar.checked.level, sidecar.checked.index.path], [
      "sha256",
      `${gz}.idx`,
    ]);

    const zst = `s3://${bucket}/vm.vma.zst`;
    await run(["convert", gz, zst]);
    const embedded = JSON.parse((await run(["verify", zst, "--json"])).text);
    assert.deepEqual([embedded.checked.level, embedded.checked.index.source], [
      "sha256",
      "embedded",
    ]);
    const again = await run(["index", zst]);
    assert.match(again.stderr, /carries its index inside; nothing written/);
    await run(["extract", zst, `${dir}/out`]);
    assert.equal(
      sha256Hex(await Deno.readFile(`${dir}/out/disk-drive-scsi0.raw`)),
      sha256Hex(disk),
    );
    assert.deepEqual(await pendingUploads(client, bucket), []);
  });
});

rgwTest(
  "backup --base s3://: an incremental of a qcow2 image from a base in S3, into S3",
  async (server) => {
    await withTempDir(async (dir) => {
      const client = testClient(server);
      const bucket = await newBucket(client);
      await writeDisk(`${dir}/disk.raw`, 6 * MiB, 11);
      const image = `${dir}/disk.qcow2`;
      await tool("qemu-img", ["convert", "-O", "qcow2", `${dir}/disk.raw`, image]);
      const base = s3Cli(server);
      const options = {
        ...base,
        permissions: [
          ...base.permissions!.filter((flag) => !flag.startsWith("--allow-net")),
          "--allow-net",
          "--allow-run=qemu-nbd,qemu-img",
        ],
      };
      const run = async (args: string[]) => {
        const result = await cli(args, options);
        assert.equal(result.code, 0, result.stderr);
        return JSON.parse(result.text);
      };
      const a = await run([
        "backup",
        "--disk",
        image,
        "--checkpoint",
        "-o",
        `s3://${bucket}/a.vma.zst`,
        "--json",
      ]);
      await tool("qemu-io", ["-f", "qcow2", "-c", "write -P 9 3M 100k", image]);
      const b = await run([
        ...["backup", "--disk", image, "--base", `s3://${bucket}/a.vma.zst`],
        ...["-o", `s3://${bucket}/b.vma.zst`, "--json"],
      ]);
      assert.equal(b.kind, "incremental");
      assert.equal(b.base.uuid, a.uuid);
      assert.equal(b.readBytes, 2 * 65536, "the two dirty clusters");
      assert.ok(b.baseBytesRead > 0);
      const restored = await cli(
        ["extract", `s3://${bucket}/b.vma.zst`, "--stdout", "drive-scsi0"],
        options,
      );
      assert.equal(restored.code, 0, restored.stderr);
      await tool("qemu-img", ["convert", "-O", "raw", image, `${dir}/now.raw`]);
      assert.equal(sha256Hex(restored.stdout), sha256Hex(await Deno.readFile(`${dir}/now.raw`)));
      assert.deepEqual(await pendingUploads(client, bucket), []);
    });
  },
);
