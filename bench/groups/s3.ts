// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Backups to and reads from S3 storage, against a fresh Ceph RGW 16.2 started on this machine
 * for the group (`tests/_rgw.ts`, on free ports; about 1.5 s up, 6 s down):
 *
 * - upload: `backup -o s3://…` (a streaming multipart upload) against staging a file first,
 *   `backup -o FILE` then `/usr/bin/aws s3 cp FILE s3://…`; streaming must not be slower
 *   (target ≥ 0.9).
 * - download: `verify s3://…` against `verify FILE` of the same archive (target ≥ 0.8).
 *
 * The server shares the machine's cores with the commands timed, as the aws CLI does.
 *
 * @module
 */
import { join } from "node:path";
import { makeArchive, verify } from "../_commands.ts";
import { defineGroup, pair } from "../_group.ts";
import { DENSE_1G } from "../_inputs.ts";
import { DENO, quote } from "../_util.ts";
import { AWS_CLI, freePort, rgwDown, type RgwServer, rgwUp } from "../../tests/_rgw.ts";

/** What `setup` started and made. */
interface State {
  server: RgwServer;
  /** The local archive, also stored as `s3://bench/read.vma.zst`. */
  archive: string;
  /** The environment variables set for the commands, with their values before. */
  saved: Map<string, string | undefined>;
}

const QUIET = ["--force", "--progress", "none"];

/** Stops the server and puts the environment back. */
async function stop({ server, saved }: State): Promise<void> {
  await rgwDown(server.dir);
  for (const [name, value] of saved) {
    if (value === undefined) Deno.env.delete(name);
    else Deno.env.set(name, value);
  }
}

export default defineGroup<State>({
  name: "s3",
  description: "backup to s3:// vs backup + aws s3 cp, verify s3:// vs verify FILE (Ceph RGW)",
  inputs: [DENSE_1G],
  tools: ["ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", AWS_CLI],
  async setup(ctx) {
    const server = await rgwUp(join(ctx.out, "rgw"), { mon: freePort(), rgw: freePort() });
    // Our CLI and the AWS CLI find the server and the keys in the environment they inherit.
    const saved = new Map<string, string | undefined>();
    const env = {
      AWS_ACCESS_KEY_ID: server.accessKeyId,
      AWS_SECRET_ACCESS_KEY: server.secretAccessKey,
      AWS_REGION: server.region,
      AWS_ENDPOINT_URL: server.endpoint,
    };
    for (const [name, value] of Object.entries(env)) {
      saved.set(name, Deno.env.get(name));
      Deno.env.set(name, value);
    }
    const state = { server, archive: join(ctx.out, "read.vma.zst"), saved };
    try {
      await ctx.run([AWS_CLI, "--endpoint-url", server.endpoint, "s3", "mb", "s3://bench"]);
      await makeArchive(ctx, ctx.pathOf(DENSE_1G), state.archive);
      await ctx.run([
        AWS_CLI,
        ...["--endpoint-url", server.endpoint, "s3", "cp", "--quiet"],
        ...[state.archive, "s3://bench/read.vma.zst"],
      ]);
      await ctx.warm(state.archive);
    } catch (error) {
      await stop(state);
      throw error;
    }
    return state;
  },
  rows(ctx, { server, archive }) {
    const disk = ctx.pathOf(DENSE_1G);
    const staged = join(ctx.out, "staged.vma.zst");
    // Staging: our backup into a file, then the AWS CLI uploads it (one shell, both timed).
    const stagedScript = (p: (path: string) => string) =>
      [
        `${p(DENO)} run -A ${p(ctx.cli)} backup --disk ${p(disk)} -o ${p(staged)} ${
          QUIET.join(" ")
        }`,
        `${AWS_CLI} --endpoint-url ${server.endpoint} s3 cp --quiet ${
          p(staged)
        } s3://bench/staged.vma.zst`,
      ].join(" && ");
    return [
      pair({
        id: "upload",
        label: "backup dense → s3:// vs backup → file, then `aws s3 cp`",
        ours: ctx.ours(["backup", "--disk", disk, "-o", "s3://bench/up.vma.zst", ...QUIET]),
        native: ctx.native((p) => `sh -c ${quote(stagedScript(p))}`, [staged]),
        target: 0.9,
        bytes: DENSE_1G.size,
      }),
      pair({
        id: "download",
        label: "verify s3:// vs verify of the file",
        ours: verify(ctx, "s3://bench/read.vma.zst"),
        native: verify(ctx, archive),
        target: 0.8,
        bytes: DENSE_1G.size,
      }),
    ];
  },
  teardown: (_ctx, state) => stop(state),
});
