// deno-lint-ignore-file no-console
// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Benchmark of the vmabackup CLI against the native tools, measured in the same run.
 *
 * ```sh
 * deno task bench                        # best of 3, all groups
 * deno task bench --runs 5               # best of 5
 * deno task bench --quick                # the slow zstd on the 16 GiB image only once
 * deno task bench --only dense           # one group: dense, sparse16g, sparse2g or holes
 * deno task bench --work /tmp/vmabench   # inputs and outputs elsewhere (default bench/work/)
 * deno task bench --cli /tmp/snap/cli.ts # another copy of the CLI, e.g. a `git archive` snapshot
 * deno task bench --clean                # delete the inputs and outputs, then exit
 * ```
 *
 * Needs `zstd`, GNU coreutils (`cp`, `cmp`, `head`, `tail`, `sync`), `tar` and GNU time at
 * `/usr/bin/time`; `qemu-img` is only asked for its version.
 *
 * **Inputs**, built once in the work directory from local system files and reused while they
 * have the right size (so they are not byte-reproducible across machines):
 *
 * - `dense-1g.raw`: 1 GiB of mixed data. A 256 MiB block of 1 MiB pieces, per 16 MiB 6 text
 *   (tar of /usr/include and /usr/share/doc), 6 binary (tar of /usr/bin and
 *   /usr/lib/x86_64-linux-gnu), 3 mixed (tar of /usr/share) and 1 zero MiB (6.25 %), written
 *   4 times (`deno-toolchain.md` §9.1).
 * - `sparse-16g.raw`: 16 GiB sparse file with 128 pieces of 4 MiB (512 MiB) of the dense image,
 *   one every 128 MiB.
 * - `sparse-2g.raw`: 2 GiB sparse file with 102 pieces of 1 MiB (5 %) of the dense image,
 *   spread evenly.
 * - `holes-8g.raw` and `holes-64g.raw`: 8 GiB and 64 GiB sparse files with the same 256 MiB
 *   (64 pieces of 4 MiB of the dense image), spread evenly.
 *
 * **Measurements**, in three groups (`--only GROUP`), each command as its own process:
 *
 * - `dense`: ours `backup` → `.vma.zst` (zstd level 3) and → `.vma`, `extract` of the `.vma.zst`
 *   into a new directory, `verify` of the `.vma.zst`; native `zstd -T0 -3 -q -c` (to /dev/null
 *   and to a file), `zstd -d -q -c ARCHIVE` (to /dev/null and, for comparison with extract,
 *   to a file), `cp --sparse=always`.
 * - `sparse16g`: ours `backup` → `.vma.zst` and → `.vma`; `zstd -T0 -3` (~45 s: once with
 *   `--quick`), `cp --sparse=always`.
 * - `sparse2g`: the same four as `sparse16g`.
 * - `holes`: ours `backup` → `.vma` of the 8 GiB and of the 64 GiB image (only their data is
 *   read, with SEEK_DATA); the 64 GiB one may take at most 1.5 times as long.
 * - The `dense` group also runs backup, extract and verify with `--zstd program` (the system
 *   zstd instead of the built-in Workers), against the same native figures.
 *
 * Every command runs with `NO_COLOR=1` under `/usr/bin/time -f %M` (peak RSS, into a file); the
 * wall time is taken around the process, so ours includes Deno's start-up. Each measurement runs
 * N times in rounds (every measurement of a group once per round, so noise spreads over all of
 * them) and the best time counts. Each input is read once first, holes included, to warm the page
 * cache; outputs are deleted and `sync` runs before each run (untimed), so earlier writes do not
 * slow later runs.
 * MB/s is 10^6 bytes of the input image's (apparent) size per second, also for extract and verify.
 *
 * **Targets**, as speed ratios ours ÷ native (= native time ÷ our time): backup dense → `.vma.zst`
 * vs `zstd -T0 -3` ≥ 1.0; backup dense → `.vma` vs `cp --sparse=always` ≥ 0.8; extract and verify
 * of the `.vma.zst` vs `zstd -d` ≥ 0.9 each; backup of the 16 GiB sparse image → `.vma.zst` vs
 * `zstd -T0 -3` ≥ 8; and our peak RSS ≤ 128 MiB in every run. The other ratios are informational.
 * Correctness is checked once per run (untimed): extracted disks equal their input (`cmp`), and
 * `zstd -d` of our archive passes `cli.ts verify -`. The exit code is 1 when a command or a check
 * failed; a missed target is only reported.
 *
 * Results: a markdown table on stdout (pasteable into README.md) and JSON in
 * `bench/results/<date>-<hostname>.json` and `bench/results/latest.json`.
 *
 * @module
 */
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { runServeBench } from "./serve.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const RSS_LIMIT_MIB = 128;
const ROOT = fileURLToPath(new URL("..", import.meta.url));
const RESULTS_DIR = join(ROOT, "bench", "results");
const DENO = Deno.execPath();
const ENV = { NO_COLOR: "1" };
const GROUPS = ["dense", "sparse16g", "sparse2g", "holes"] as const;
type GroupName = typeof GROUPS[number];

/** The CLI measured: this checkout's, or another copy's with `--cli` (set once, in `main`). */
let cliPath = join(ROOT, "cli.ts");

const USAGE = `Benchmark of the vmabackup CLI against zstd and cp, best of N runs.

usage: deno task bench [--runs N] [--work DIR] [--quick] [--only GROUP] [--cli FILE] [--clean]

  --runs N      runs per measurement; the best counts (default 3)
  --work DIR    inputs and outputs (default bench/work/, git-ignored)
  --quick       run the slow zstd on the 16 GiB sparse image only once
  --only GROUP  one group of measurements: ${GROUPS.join(", ")} or serve (bench/serve.ts)
  --cli FILE    the cli.ts to measure (default this checkout's), e.g. of a snapshot made with
                git archive HEAD | tar -x -C /tmp/vmabackup-head
  --clean       delete the generated inputs and outputs in the work directory, then exit
  --help        this text

Writes bench/results/<date>-<hostname>.json and bench/results/latest.json.`;

interface Options {
  cli: string;
  runs: number;
  work: string;
  quick: boolean;
  groups: GroupName[];
  /** Run bench/serve.ts too (`--only serve` runs only that). */
  serve: boolean;
  clean: boolean;
}

// ---------------------------------------------------------------------------------------------
// Inputs

/** Where the data of a sparse input lies: `count` pieces of `piece` bytes, evenly spread. */
interface SparseLayout {
  piece: number;
  count: number;
  /** Distance between the pieces' sources in the dense image. */
  sourceStride: number;
}

interface Input {
  name: string;
  path: string;
  size: number;
  description: string;
  layout?: SparseLayout;
}

function inputs(work: string): Record<GroupName, Input> {
  return {
    dense: {
      name: "dense-1g.raw",
      path: join(work, "dense-1g.raw"),
      size: GiB,
      description: "1 GiB dense: text, ELF binaries, mixed files, 6.25 % zero MiBs",
    },
    sparse16g: {
      name: "sparse-16g.raw",
      path: join(work, "sparse-16g.raw"),
      size: 16 * GiB,
      description: "16 GiB sparse: 128 × 4 MiB of the dense image, one every 128 MiB",
      layout: { piece: 4 * MiB, count: 128, sourceStride: 4 * MiB },
    },
    sparse2g: {
      name: "sparse-2g.raw",
      path: join(work, "sparse-2g.raw"),
      size: 2 * GiB,
      description: "2 GiB sparse, 5 % data: 102 × 1 MiB of the dense image, spread evenly",
      layout: { piece: MiB, count: 102, sourceStride: 10 * MiB },
    },
    holes: holesInput(work, 64),
  };
}

/** A raw image of `gib` GiB holding the same 256 MiB of data (64 × 4 MiB), spread evenly. */
function holesInput(work: string, gib: number): Input {
  return {
    name: `holes-${gib}g.raw`,
    path: join(work, `holes-${gib}g.raw`),
    size: gib * GiB,
    description: `${gib} GiB sparse: the same 256 MiB (64 × 4 MiB of the dense image) as its twin`,
    layout: { piece: 4 * MiB, count: 64, sourceStride: 4 * MiB },
  };
}

/** Offset of piece `index` in a sparse input: evenly spread, aligned to the piece size. */
function pieceOffset(input: Input, layout: SparseLayout, index: number): number {
  return Math.floor(index * input.size / layout.count / layout.piece) * layout.piece;
}

/** The sources of the dense image (`deno-toolchain.md` §9.1): key, size, shell command. */
const DENSE_SOURCES = [
  ["T", 96 * MiB, "tar --sort=name -cf - /usr/include /usr/share/doc"],
  ["B", 96 * MiB, "tar --sort=name -cf - /usr/bin /usr/lib/x86_64-linux-gnu"],
  ["S", 48 * MiB, `tar --sort=name -cf - /usr/share | tail -c +${200 * MiB}`],
] as const;
/** Per 16 MiB: 6 text, 6 binary, 3 mixed, 1 zero MiB. */
const DENSE_PATTERN = "TBTBSTBTBZSTBTBS";
const DENSE_BLOCK = 256 * MiB;

async function buildDense(work: string, input: Input): Promise<void> {
  const sources = new Map<string, Uint8Array>();
  for (const [key, size, command] of DENSE_SOURCES) {
    const file = join(work, `${key}.src`);
    await sh(`${command} 2>/dev/null | head -c ${size} > ${quote(file)}`);
    const data = await Deno.readFile(file);
    await Deno.remove(file);
    if (data.length < MiB) throw new Error(`'${command}' gave only ${data.length} bytes`);
    sources.set(key, data.subarray(0, data.length - data.length % MiB));
  }
  const block = new Uint8Array(DENSE_BLOCK);
  const used = new Map<string, number>();
  for (let i = 0; i < DENSE_BLOCK / MiB; i++) {
    const key = DENSE_PATTERN[i % DENSE_PATTERN.length]!;
    const source = sources.get(key);
    if (source === undefined) continue; // "Z": a zero MiB
    const n = used.get(key) ?? 0;
    used.set(key, n + 1);
    const from = (n * MiB) % source.length; // wraps around on a machine with few files
    block.set(source.subarray(from, from + MiB), i * MiB);
  }
  await writeAtomically(input.path, async (file) => {
    for (let written = 0; written < input.size; written += DENSE_BLOCK) await writeAll(file, block);
  });
}

async function buildSparse(input: Input, layout: SparseLayout, dense: Input): Promise<void> {
  using source = await Deno.open(dense.path);
  const piece = new Uint8Array(layout.piece);
  await writeAtomically(input.path, async (file) => {
    await file.truncate(input.size);
    for (let i = 0; i < layout.count; i++) {
      await readAt(source, (i * layout.sourceStride) % dense.size, piece);
      await file.seek(pieceOffset(input, layout, i), Deno.SeekMode.Start);
      await writeAll(file, piece);
    }
  });
}

/** Builds the inputs that are missing or have the wrong size; sparse ones follow the dense one. */
async function prepareInputs(work: string, needed: Input[], dense: Input): Promise<void> {
  await Deno.mkdir(work, { recursive: true });
  let denseRebuilt = false;
  if ((await fileSize(dense.path)) !== dense.size) {
    log(`building ${dense.path} (1 GiB from /usr; takes a minute)`);
    await buildDense(work, dense);
    denseRebuilt = true;
  }
  for (const input of needed) {
    if (input.layout === undefined) continue;
    if (!denseRebuilt && (await fileSize(input.path)) === input.size) continue;
    log(`building ${input.path}`);
    await buildSparse(input, input.layout, dense);
  }
}

/**
 * Reads an input once to bring it into the page cache, holes too: reading a hole caches zero
 * pages, which the first run of a tool that reads every byte (zstd) would otherwise pay for.
 */
async function warm(input: Input): Promise<void> {
  using file = await Deno.open(input.path);
  const buffer = new Uint8Array(8 * MiB);
  while ((await file.read(buffer)) !== null) { /* read on */ }
}

/** Reads only the data pieces of a sparse input: for measurements that never read holes. */
async function warmData(input: Input): Promise<void> {
  using file = await Deno.open(input.path);
  const layout = input.layout!;
  const buffer = new Uint8Array(layout.piece);
  for (let i = 0; i < layout.count; i++) await readAt(file, pieceOffset(input, layout, i), buffer);
}

/** Deletes what the benchmark generated in `work`, and `work` itself when it is then empty. */
async function clean(work: string): Promise<void> {
  const names = [
    ...Object.values(inputs(work)).map((input) => input.name),
    holesInput(work, 8).name,
    "out",
    "time",
    ...DENSE_SOURCES.map(([key]) => `${key}.src`),
  ];
  for (const name of names) {
    for (const path of [join(work, name), join(work, `${name}.tmp`)]) {
      await Deno.remove(path, { recursive: true }).catch(ignoreNotFound);
    }
  }
  await Deno.remove(work).catch(() => {}); // not empty: someone else's files stay
  log(`cleaned ${work}`);
}

// ---------------------------------------------------------------------------------------------
// Measurements

type Side = "ours" | "native";

interface Measurement {
  id: string;
  label: string;
  side: Side;
  /** Command shown in the table, with paths relative to the work directory. */
  display: string;
  /** Command run under /usr/bin/time. */
  argv: string[];
  /** Bytes of the input image, for MB/s. */
  inputBytes: number;
  /** Outputs deleted (untimed) before each run. */
  remove: string[];
  /** With `--quick`, run only once. */
  slow?: boolean;
}

interface Ratio {
  id: string;
  label: string;
  ours: string;
  native: string;
  /** Minimum speed ratio (ours ÷ native); `null` for an informational ratio. */
  target: number | null;
}

interface Check {
  label: string;
  run: () => Promise<string>; // a short detail; throws on failure
}

interface Group {
  name: GroupName;
  input: Input;
  measurements: Measurement[];
  ratios: Ratio[];
  checks: Check[];
}

/** A native command line; `path` inserts a path: quoted to run it, relative to display it. */
type Script = (path: (path: string) => string) => string;

/** Builds the measurements of one group: ids are `<group>.<name>`, outputs go to `out`. */
function measurementKit(group: GroupName, input: Input, work: string, out: string) {
  const base = { inputBytes: input.size, remove: [] as string[] };
  const ours = (name: string, label: string, args: string[], remove: string[] = []) => ({
    ...base,
    id: `${group}.${name}`,
    label,
    side: "ours" as const,
    display: ["deno run -A cli.ts", ...args.map((arg) => relative(arg, work))].join(" "),
    argv: cli(...args),
    remove,
  });
  const native = (name: string, label: string, script: Script) => ({
    ...base,
    id: `${group}.${name}`,
    label,
    side: "native" as const,
    display: script((path) => relative(path, work)),
    argv: ["sh", "-c", `exec ${script(quote)}`],
  });
  const quiet = ["--force", "--progress", "none"];
  return {
    archive: (extension: ".vma" | ".vma.zst") => join(out, `${group}${extension}`),
    backup(archive: string, program = false): Measurement {
      const extension = archive.endsWith(".zst") ? ".vma.zst" : ".vma";
      const args = ["backup", "--disk", input.path, "-o", archive, ...quiet, ...zstdFlag(program)];
      const name = `backup${extension}${program ? "-program" : ""}`;
      return ours(name, `backup → ${extension}${engineLabel(program)}`, args, [archive]);
    },
    extract(archive: string, target: string, program = false): Measurement {
      const args = ["extract", archive, target, ...quiet, ...zstdFlag(program)];
      const label = `extract .vma.zst → sparse raw${engineLabel(program)}`;
      return ours(`extract${program ? "-program" : ""}`, label, args, [target]);
    },
    verify(archive: string, program = false): Measurement {
      const args = ["verify", archive, "--progress", "none", ...zstdFlag(program)];
      return ours(
        `verify${program ? "-program" : ""}`,
        `verify .vma.zst${engineLabel(program)}`,
        args,
      );
    },
    zstd(): Measurement {
      return native(
        "zstd",
        "zstd -T0 -3 → /dev/null",
        (p) => `zstd -T0 -3 -q -c ${p(input.path)} > /dev/null`,
      );
    },
    zstdToFile(): Measurement {
      const file = join(out, `${group}.raw.zst`);
      const script: Script = (p) => `zstd -T0 -3 -q -c ${p(input.path)} > ${p(file)}`;
      return { ...native("zstd-file", "zstd -T0 -3 → file", script), remove: [file] };
    },
    zstdDecompress(archive: string): Measurement {
      return native(
        "zstd-d",
        "zstd -d → /dev/null",
        (p) => `zstd -d -q -c ${p(archive)} > /dev/null`,
      );
    },
    zstdDecompressToFile(archive: string): Measurement {
      const file = join(out, `${group}-zstd-d.raw`);
      const script: Script = (p) => `zstd -d -q -c ${p(archive)} > ${p(file)}`;
      return { ...native("zstd-d-file", "zstd -d → file", script), remove: [file] };
    },
    cp(): Measurement {
      const copy = join(out, `${group}-copy.raw`);
      const script: Script = (p) => `cp --sparse=always ${p(input.path)} ${p(copy)}`;
      return { ...native("cp", "cp --sparse=always", script), remove: [copy] };
    },
  };
}

/** `--zstd program`: the system zstd instead of the built-in Workers. */
function zstdFlag(program: boolean): string[] {
  return program ? ["--zstd", "program"] : [];
}

function engineLabel(program: boolean): string {
  return program ? " (--zstd program)" : "";
}

function denseGroup(input: Input, work: string, out: string): Group {
  const kit = measurementKit("dense", input, work, out);
  const zst = kit.archive(".vma.zst");
  const vma = kit.archive(".vma");
  const restored = join(out, "dense-restored");
  return {
    name: "dense",
    input,
    measurements: [
      kit.backup(zst),
      kit.zstd(),
      kit.zstdToFile(),
      kit.backup(vma),
      kit.cp(),
      kit.extract(zst, restored),
      kit.verify(zst),
      kit.zstdDecompress(zst),
      kit.zstdDecompressToFile(zst),
      kit.backup(join(out, "dense-program.vma.zst"), true),
      kit.extract(zst, join(out, "dense-restored-program"), true),
      kit.verify(zst, true),
    ],
    ratios: [
      ratio("dense.backup.vma.zst", "dense.zstd", 1.0, "backup dense → .vma.zst vs `zstd -T0 -3`"),
      ratio(
        "dense.backup.vma.zst",
        "dense.zstd-file",
        null,
        "backup dense → .vma.zst vs `zstd -T0 -3 > file`",
      ),
      ratio("dense.backup.vma", "dense.cp", 0.8, "backup dense → .vma vs `cp --sparse=always`"),
      ratio("dense.extract", "dense.zstd-d", 0.9, "restore .vma.zst → sparse raw vs `zstd -d`"),
      ratio(
        "dense.extract",
        "dense.zstd-d-file",
        null,
        "restore .vma.zst → sparse raw vs `zstd -d > file`",
      ),
      ratio("dense.verify", "dense.zstd-d", 0.9, "verify .vma.zst vs `zstd -d`"),
      ratio(
        "dense.backup.vma.zst-program",
        "dense.zstd",
        1.0,
        "backup dense → .vma.zst (--zstd program) vs `zstd -T0 -3`",
      ),
      ratio(
        "dense.extract-program",
        "dense.zstd-d",
        0.9,
        "restore .vma.zst → sparse raw (--zstd program) vs `zstd -d`",
      ),
      ratio(
        "dense.verify-program",
        "dense.zstd-d",
        0.9,
        "verify .vma.zst (--zstd program) vs `zstd -d`",
      ),
    ],
    checks: [
      {
        label: "dense: extracted disk equals dense-1g.raw (cmp)",
        run: () => compareRestored(restored, input.path),
      },
      {
        label: "dense: `zstd -d -c dense.vma.zst | cli.ts verify -` passes",
        run: () => verifyThroughZstd(zst),
      },
      { label: "dense: `cli.ts verify dense.vma` passes", run: () => verifyArchive(vma) },
    ],
  };
}

function sparse16Group(input: Input, work: string, out: string): Group {
  const kit = measurementKit("sparse16g", input, work, out);
  const zst = kit.archive(".vma.zst");
  return {
    name: "sparse16g",
    input,
    measurements: [
      kit.backup(zst),
      { ...kit.zstd(), slow: true },
      kit.backup(kit.archive(".vma")),
      kit.cp(),
    ],
    ratios: [
      ratio(
        "sparse16g.backup.vma.zst",
        "sparse16g.zstd",
        8,
        "backup 16 GiB sparse → .vma.zst vs `zstd -T0 -3`",
      ),
      ratio(
        "sparse16g.backup.vma",
        "sparse16g.cp",
        null,
        "backup 16 GiB sparse → .vma vs `cp --sparse=always`",
      ),
    ],
    checks: [
      {
        label: "sparse16g: `cli.ts verify sparse16g.vma.zst` passes",
        run: () => verifyArchive(zst),
      },
    ],
  };
}

function sparse2Group(input: Input, work: string, out: string): Group {
  const kit = measurementKit("sparse2g", input, work, out);
  const zst = kit.archive(".vma.zst");
  const restored = join(out, "sparse2g-restored");
  return {
    name: "sparse2g",
    input,
    measurements: [kit.backup(zst), kit.zstd(), kit.backup(kit.archive(".vma")), kit.cp()],
    ratios: [
      ratio(
        "sparse2g.backup.vma.zst",
        "sparse2g.zstd",
        null,
        "backup 2 GiB 5 % → .vma.zst vs `zstd -T0 -3`",
      ),
      ratio(
        "sparse2g.backup.vma",
        "sparse2g.cp",
        null,
        "backup 2 GiB 5 % → .vma vs `cp --sparse=always`",
      ),
    ],
    checks: [
      {
        label: "sparse2g: extracted disk equals sparse-2g.raw (cmp)",
        run: async () => {
          await run(cli("extract", zst, restored, "--force", "--progress", "none"));
          return await compareRestored(restored, input.path);
        },
      },
    ],
  };
}

/**
 * Raw images of 8 GiB and 64 GiB holding the same 256 MiB of data: with SEEK_DATA the backup
 * time follows the data, so the 64 GiB one may take at most 1.5 times as long. Stated as a
 * speed ratio like the others: time of 8 GiB ÷ time of 64 GiB ≥ 1 / 1.5.
 */
function holesGroup(input: Input, work: string, out: string): Group {
  const small = holesInput(work, 8);
  const backup = (image: Input, name: string) => {
    const archive = join(out, `${name}.vma`);
    const args = ["backup", "--disk", image.path, "-o", archive, "--force", "--progress", "none"];
    return {
      id: `holes.${name}`,
      label: `backup ${image.size / GiB} GiB (256 MiB data) → .vma`,
      side: "ours" as const,
      display: ["deno run -A cli.ts", ...args.map((arg) => relative(arg, work))].join(" "),
      argv: cli(...args),
      inputBytes: image.size,
      remove: [archive],
    };
  };
  return {
    name: "holes",
    input,
    measurements: [backup(small, "backup-8g"), backup(input, "backup-64g")],
    ratios: [
      ratio(
        "holes.backup-64g",
        "holes.backup-8g",
        1 / 1.5,
        "time of the 8 GiB ÷ the 64 GiB backup, same 256 MiB of data (64 GiB at most 1.5× as long)",
      ),
    ],
    checks: [{
      label: "holes: `cli.ts verify holes-64g.vma` passes",
      run: () => verifyArchive(join(out, "backup-64g.vma")),
    }],
  };
}

function ratio(ours: string, native: string, target: number | null, label: string): Ratio {
  return { id: `${ours}/${native}`, label, ours, native, target };
}

// ---------------------------------------------------------------------------------------------
// Correctness checks (untimed)

async function compareRestored(directory: string, original: string): Promise<string> {
  const disks = [];
  for await (const entry of Deno.readDir(directory)) {
    if (entry.name.endsWith(".raw")) disks.push(join(directory, entry.name));
  }
  if (disks.length !== 1) {
    throw new Error(`expected one .raw in ${directory}, found ${disks.length}`);
  }
  await run(["cmp", disks[0]!, original]);
  const { size, blocks } = await Deno.stat(disks[0]!);
  const allocated = (blocks ?? 0) * 512;
  return `identical; ${basename(disks[0]!)} ${mib(size)} MiB, ${mib(allocated)} MiB allocated`;
}

/** `zstd -d -q -c ARCHIVE | deno run -A cli.ts verify -`; both must exit 0. */
async function verifyThroughZstd(archive: string): Promise<string> {
  const zstd = new Deno.Command("zstd", {
    args: ["-d", "-q", "-c", archive],
    env: ENV,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const [program, ...args] = cli("verify", "-", "--progress", "none");
  const verify = new Deno.Command(program!, {
    args,
    cwd: ROOT,
    env: ENV,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const piping = zstd.stdout.pipeTo(verify.stdin).catch(() => {}); // the exit codes tell
  const [zstdStatus, zstdErrors, result] = await Promise.all([
    zstd.status,
    new Response(zstd.stderr).bytes(),
    verify.output(),
    piping,
  ]);
  if (!zstdStatus.success) {
    throw new Error(`zstd -d exited ${zstdStatus.code}: ${errorLine(zstdErrors)}`);
  }
  if (!result.success) {
    throw new Error(`verify - exited ${result.code}: ${errorLine(result.stderr)}`);
  }
  return firstLine(new TextDecoder().decode(result.stdout));
}

async function verifyArchive(archive: string): Promise<string> {
  const output = await run(cli("verify", archive, "--progress", "none"));
  return firstLine(output).replace(archive, basename(archive));
}

// ---------------------------------------------------------------------------------------------
// Timing

interface MeasurementResult {
  id: string;
  group: GroupName;
  label: string;
  side: Side;
  command: string;
  inputBytes: number;
  /** Wall seconds of each successful run. */
  runs: number[];
  /** Peak RSS in MiB of each successful run. */
  rssMiB: number[];
  bestSeconds: number | null;
  mbPerSecond: number | null;
  peakRssMiB: number | null;
  errors: string[];
  /** Size of the file the command wrote, such as the archive (for its compression ratio). */
  outputBytes?: number;
}

interface RunOutcome {
  seconds: number;
  rssMiB: number;
  error?: string;
}

async function timeOnce(measurement: Measurement, timeFile: string): Promise<RunOutcome> {
  for (const path of measurement.remove) {
    await Deno.remove(path, { recursive: true }).catch(ignoreNotFound);
  }
  await run(["sync"]);
  const command = new Deno.Command("/usr/bin/time", {
    args: ["-f", "%M", "-o", timeFile, ...measurement.argv],
    cwd: ROOT,
    env: ENV,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  });
  const start = performance.now();
  const output = await command.output();
  const seconds = (performance.now() - start) / 1000;
  const timeLines = (await Deno.readTextFile(timeFile)).trim().split("\n");
  const rssMiB = Number(timeLines.at(-1)) / KiB;
  if (!output.success) {
    const reason = errorLine(output.stderr) || timeLines[0] || "no message";
    return { seconds, rssMiB, error: `exit ${output.code}: ${reason}` };
  }
  return { seconds, rssMiB };
}

async function measureGroup(
  group: Group,
  options: Options,
  timeDir: string,
): Promise<MeasurementResult[]> {
  const results = group.measurements.map((measurement): MeasurementResult => ({
    id: measurement.id,
    group: group.name,
    label: measurement.label,
    side: measurement.side,
    command: measurement.display,
    inputBytes: measurement.inputBytes,
    runs: [],
    rssMiB: [],
    bestSeconds: null,
    mbPerSecond: null,
    peakRssMiB: null,
    errors: [],
  }));
  for (let round = 1; round <= options.runs; round++) {
    log(`[${group.name}] round ${round}/${options.runs}`);
    for (const [index, measurement] of group.measurements.entries()) {
      const result = results[index]!;
      if (result.errors.length > 0) continue; // a failing command fails again
      if (round > 1 && measurement.slow && options.quick) continue;
      const outcome = await timeOnce(measurement, join(timeDir, `${measurement.id}.txt`));
      const figures = `${outcome.seconds.toFixed(3)} s, ${outcome.rssMiB.toFixed(1)} MiB`;
      if (outcome.error !== undefined) {
        result.errors.push(outcome.error);
        log(`  ${measurement.id.padEnd(22)} FAILED (${figures}): ${outcome.error}`);
        continue;
      }
      result.runs.push(round3(outcome.seconds));
      result.rssMiB.push(round1(outcome.rssMiB));
      log(`  ${measurement.id.padEnd(22)} ${figures}`);
    }
  }
  for (const [index, result] of results.entries()) {
    if (result.runs.length === 0) continue;
    result.bestSeconds = Math.min(...result.runs);
    result.mbPerSecond = round1(result.inputBytes / 1e6 / result.bestSeconds);
    result.peakRssMiB = Math.max(...result.rssMiB);
    const output = group.measurements[index]!.remove[0];
    const stat = output === undefined ? undefined : await Deno.stat(output).catch(() => undefined);
    if (stat?.isFile) result.outputBytes = stat.size;
  }
  return results;
}

// ---------------------------------------------------------------------------------------------
// Report

/** A ratio with its outcome; also the RSS limit, a maximum (`bound: "max"`) in MiB. */
interface RatioResult {
  id: string;
  label: string;
  ours: string;
  native: string;
  value: number | null;
  bound: "min" | "max";
  target: number | null;
  met: boolean | null;
}

interface CheckResult {
  label: string;
  ok: boolean;
  detail: string;
}

function computeRatios(ratios: Ratio[], results: MeasurementResult[]): RatioResult[] {
  const best = new Map(results.map((result) => [result.id, result.bestSeconds]));
  return ratios.map((ratio) => {
    const oursTime = best.get(ratio.ours) ?? null;
    const nativeTime = best.get(ratio.native) ?? null;
    const value = oursTime !== null && nativeTime !== null
      ? Math.round(nativeTime / oursTime * 100) / 100
      : null;
    let met: boolean | null = null;
    if (ratio.target !== null) met = value !== null && value >= ratio.target;
    return { ...ratio, value, bound: "min" as const, met };
  });
}

/** The RSS target: every run of ours, the largest one named. */
function rssTarget(results: MeasurementResult[]): RatioResult {
  const oursResults = results.filter((result) =>
    result.side === "ours" && result.peakRssMiB !== null
  );
  const worst = oursResults.reduce<MeasurementResult | undefined>(
    (max, result) => max === undefined || result.peakRssMiB! > max.peakRssMiB! ? result : max,
    undefined,
  );
  return {
    id: "rss",
    label: `peak RSS of every ours run${worst ? ` (largest: ${worst.id})` : ""}, MiB`,
    ours: "every ours measurement",
    native: "",
    value: worst?.peakRssMiB ?? null,
    bound: "max",
    target: RSS_LIMIT_MIB,
    met: worst === undefined ? false : worst.peakRssMiB! <= RSS_LIMIT_MIB,
  };
}

function markdown(
  results: MeasurementResult[],
  ratios: RatioResult[],
  checks: CheckResult[],
  inputByGroup: Record<GroupName, Input>,
): string {
  const lines = [
    "| input | measurement | command | best s | MB/s | peak RSS MiB | runs s |",
    "| --- | --- | --- | ---: | ---: | ---: | --- |",
  ];
  for (const result of results) {
    const failed = result.errors.length > 0 ? ` **FAILED**: ${cell(result.errors[0]!)}` : "";
    lines.push(
      `| ${inputByGroup[result.group].name} | ${result.side} ${result.label}${failed} | ` +
        `\`${cell(result.command)}\` | ${fixed(result.bestSeconds, 2)} | ` +
        `${fixed(result.mbPerSecond, 0)} | ${fixed(result.peakRssMiB, 1)} | ` +
        `${result.runs.map((seconds) => seconds.toFixed(2)).join(", ")} |`,
    );
  }
  lines.push(
    "",
    "| comparison (speed ratio: ours ÷ native = native s ÷ ours s) | value | target | status |",
    "| --- | ---: | ---: | --- |",
  );
  for (const ratio of ratios) {
    const max = ratio.bound === "max";
    const value = fixed(ratio.value, max ? 1 : 2);
    const target = ratio.target === null
      ? "—"
      : `${max ? "≤" : "≥"} ${Number(ratio.target.toFixed(2))}`;
    lines.push(`| ${ratio.label} | ${value} | ${target} | ${status(ratio.met)} |`);
  }
  lines.push(
    "",
    "| correctness check | result |",
    "| --- | --- |",
    ...checks.map((check) =>
      `| ${cell(check.label)} | ${check.ok ? "ok" : "**FAILED**"}: ${cell(check.detail)} |`
    ),
  );
  return lines.join("\n");
}

function status(met: boolean | null): string {
  return met === null ? "(info)" : met ? "met" : "**MISSED**";
}

// ---------------------------------------------------------------------------------------------
// Environment

interface Environment {
  hostname: string;
  deno: typeof Deno.version;
  os: string;
  hardwareConcurrency: number;
  nproc: number;
  cpuModel: string | null;
  memoryGiB: number | null;
  loadAverageAtStart: number[];
  tools: { zstd: string | null; cp: string | null; qemuImg: string | null; time: string | null };
  cli: string;
  /** The commit of the measured CLI's checkout, `null` when it is not a git checkout. */
  git: { commit: string; dirty: boolean } | null;
}

async function environment(): Promise<Environment> {
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo").catch(() => "");
  const meminfo = await Deno.readTextFile("/proc/meminfo").catch(() => "");
  const memKiB = Number(/^MemTotal:\s+(\d+)/m.exec(meminfo)?.[1] ?? NaN);
  return {
    hostname: hostname(),
    deno: Deno.version,
    os: `${Deno.build.os} ${Deno.osRelease()} ${Deno.build.arch}`,
    hardwareConcurrency: navigator.hardwareConcurrency,
    nproc: Number(await tryRun(["nproc"])),
    cpuModel: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ?? null,
    memoryGiB: Number.isNaN(memKiB) ? null : round1(memKiB / MiB),
    loadAverageAtStart: loadAverage(),
    tools: {
      zstd: /v\d+\.\d+\.\d+/.exec(await tryRun(["zstd", "--version"]))?.[0] ?? null,
      cp: firstLine(await tryRun(["cp", "--version"])) || null,
      qemuImg: firstLine(await tryRun(["qemu-img", "--version"])) || null,
      time: firstLine(await tryRun(["/usr/bin/time", "--version"])) || null,
    },
    cli: cliPath,
    git: await gitState(dirname(cliPath)),
  };
}

/** Read-only: `--no-optional-locks` keeps `git status` from writing the index. */
async function gitState(directory: string): Promise<Environment["git"]> {
  const git = ["git", "--no-optional-locks", "-C", directory];
  const top = await tryRun([...git, "rev-parse", "--show-toplevel"]);
  if (top === "" || resolve(top) !== resolve(directory)) return null;
  const commit = await tryRun([...git, "rev-parse", "HEAD"]);
  return { commit, dirty: (await tryRun([...git, "status", "--porcelain"])) !== "" };
}

function loadAverage(): number[] {
  return Deno.loadavg().map((load) => Math.round(load * 100) / 100);
}

function hostname(): string {
  try {
    return Deno.hostname().replace(/[^A-Za-z0-9._-]/g, "-") || "local";
  } catch {
    return "local";
  }
}

async function requireTools(): Promise<void> {
  const tools = ["zstd", "cp", "cmp", "tar", "head", "tail", "sync", "/usr/bin/time"];
  const missing = [];
  for (const tool of tools) {
    if ((await tryRun(["sh", "-c", `command -v ${tool}`])) === "") missing.push(tool);
  }
  if (missing.length > 0) throw new Error(`missing tools: ${missing.join(", ")}`);
}

// ---------------------------------------------------------------------------------------------
// Helpers

/** The command line of our CLI with `args`, run by the Deno that runs this script. */
function cli(...args: string[]): string[] {
  return [DENO, "run", "-A", cliPath, ...args];
}

/** Runs a command to completion in the project root; throws with its last stderr line on failure. */
async function run(argv: string[]): Promise<string> {
  const [program, ...args] = argv;
  const output = await new Deno.Command(program!, { args, cwd: ROOT, env: ENV, stdin: "null" })
    .output();
  if (!output.success) {
    const command = argv.map((arg) => basename(arg)).join(" ");
    throw new Error(`'${command}' exited ${output.code}: ${errorLine(output.stderr)}`);
  }
  return new TextDecoder().decode(output.stdout).trim();
}

async function tryRun(argv: string[]): Promise<string> {
  return await run(argv).catch(() => "");
}

async function sh(script: string): Promise<void> {
  await run(["sh", "-c", script]);
}

async function writeAtomically(path: string, write: (file: Deno.FsFile) => Promise<void>) {
  const temporary = `${path}.tmp`;
  {
    using file = await Deno.open(temporary, { write: true, create: true, truncate: true });
    await write(file);
  }
  await Deno.rename(temporary, path);
}

async function writeAll(file: Deno.FsFile, data: Uint8Array): Promise<void> {
  for (let done = 0; done < data.length;) done += await file.write(data.subarray(done));
}

async function readAt(file: Deno.FsFile, offset: number, buffer: Uint8Array): Promise<void> {
  await file.seek(offset, Deno.SeekMode.Start);
  for (let done = 0; done < buffer.length;) {
    const n = await file.read(buffer.subarray(done));
    if (n === null) throw new Error(`unexpected end of file at ${offset + done}`);
    done += n;
  }
}

async function fileSize(path: string): Promise<number | null> {
  try {
    return (await Deno.stat(path)).size;
  } catch (error) {
    ignoreNotFound(error);
    return null;
  }
}

function ignoreNotFound(error: unknown): void {
  if (!(error instanceof Deno.errors.NotFound)) throw error;
}

function quote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

function relative(path: string, work: string): string {
  return path.startsWith(`${work}/`) ? path.slice(work.length + 1) : path;
}

/** The line of a command's stderr that says what went wrong: `error: ...`, else the last one. */
function errorLine(bytes: Uint8Array): string {
  const lines = new TextDecoder().decode(bytes).trim().split("\n");
  return (lines.find((line) => /^error\b/i.test(line)) ?? lines.at(-1) ?? "").trim();
}

function firstLine(text: string): string {
  return text.split("\n")[0]!.trim();
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function cell(text: string): string {
  return text.replaceAll("|", "\\|");
}

function fixed(value: number | null, digits: number): string {
  return value === null ? "—" : value.toFixed(digits);
}

function mib(bytes: number): string {
  return (bytes / MiB).toFixed(1);
}

function round1(value: number): number {
  return Math.round(value * 10) / 10;
}

function round3(value: number): number {
  return Math.round(value * 1000) / 1000;
}

function log(message: string): void {
  console.error(message);
}

// ---------------------------------------------------------------------------------------------
// Main

function parseOptions(args: string[]): Options | "help" {
  const { values } = parseArgs({
    args,
    options: {
      runs: { type: "string", default: "3" },
      work: { type: "string", default: join(ROOT, "bench", "work") },
      quick: { type: "boolean", default: false },
      only: { type: "string" },
      cli: { type: "string", default: join(ROOT, "cli.ts") },
      clean: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return "help";
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) throw new TypeError(`--runs: not a positive integer`);
  const only = values.only;
  if (only !== undefined && only !== "serve" && !(GROUPS as readonly string[]).includes(only)) {
    throw new TypeError(`--only: '${only}' is not one of ${GROUPS.join(", ")}, serve`);
  }
  return {
    cli: resolve(values.cli),
    runs,
    work: resolve(values.work),
    quick: values.quick,
    groups: only === undefined ? [...GROUPS] : only === "serve" ? [] : [only as GroupName],
    serve: only === undefined || only === "serve",
    clean: values.clean,
  };
}

async function main(args: string[]): Promise<number> {
  let options: Options | "help";
  try {
    options = parseOptions(args);
  } catch (error) {
    console.error(`error: ${messageOf(error)}\n\n${USAGE}`);
    return 2;
  }
  if (options === "help") {
    console.log(USAGE);
    return 0;
  }
  if (options.clean) {
    await clean(options.work);
    return 0;
  }
  await requireTools();
  cliPath = options.cli;

  const startedAt = new Date();
  const env = await environment();
  const byGroup = inputs(options.work);
  const needed = options.groups.map((name) => byGroup[name]);
  if (options.groups.includes("holes")) needed.push(holesInput(options.work, 8));
  if (options.serve && !options.groups.includes("dense")) needed.push(byGroup.dense);
  await prepareInputs(options.work, needed, byGroup.dense);
  await run(cli("--version")); // fills Deno's module cache, untimed

  const results: MeasurementResult[] = [];
  const ratios: RatioResult[] = [];
  const checks: CheckResult[] = [];
  for (const name of options.groups) {
    const group = await runGroup(name, byGroup[name], options);
    results.push(...group.results);
    ratios.push(...group.ratios);
    checks.push(...group.checks);
  }
  const serve = options.serve
    ? await runServeBench({
      work: options.work,
      dense: byGroup.dense.path,
      runs: options.runs,
      cli: cliPath,
    })
    : undefined;
  for (const check of serve?.checks ?? []) {
    log(`  check: ${check.ok ? "ok" : "FAILED"}: ${check.label}: ${check.detail}`);
    checks.push(check);
  }
  const rss = rssTarget(results);
  const table = [
    ...(options.groups.length > 0 ? [markdown(results, [...ratios, rss], checks, byGroup)] : []),
    ...(serve ? [serve.markdown] : []),
  ].join("\n\n");
  console.log(["", ...heading(startedAt, env, options), "", table, ""].join("\n"));

  const report = {
    date: startedAt.toISOString(),
    durationSeconds: Math.round((Date.now() - startedAt.getTime()) / 1000),
    ...env,
    loadAverageAtEnd: loadAverage(),
    options: { runs: options.runs, quick: options.quick, groups: options.groups },
    units: { seconds: "wall, best of runs", mbPerSecond: "1e6 bytes of input per s", rss: "MiB" },
    inputs: await describeInputs(options.groups.map((name) => byGroup[name])),
    measurements: results,
    ratios: [...ratios, rss],
    checks,
    ...(serve && { serve }),
    markdown: table,
  };
  await writeResults(report, `${startedAt.toISOString().slice(0, 10)}-${env.hostname}.json`);

  const failed = results.some((result) => result.errors.length > 0) ||
    checks.some((check) => !check.ok);
  return failed ? 1 : 0;
}

/** Warms the input, times the group's measurements, then runs its correctness checks. */
async function runGroup(name: GroupName, input: Input, options: Options) {
  const out = join(options.work, "out");
  const timeDir = join(options.work, "time");
  await Deno.mkdir(out, { recursive: true });
  await Deno.mkdir(timeDir, { recursive: true });
  const builders = {
    dense: denseGroup,
    sparse16g: sparse16Group,
    sparse2g: sparse2Group,
    holes: holesGroup,
  };
  const group = builders[name](input, options.work, out);
  log(`[${name}] warming the page cache: ${input.name}`);
  if (name === "holes") {
    for (const image of [holesInput(options.work, 8), input]) await warmData(image);
  } else {
    await warm(input);
  }
  const results = await measureGroup(group, options, timeDir);
  const checks: CheckResult[] = [];
  for (const check of group.checks) {
    const result = await check.run().then(
      (detail) => ({ label: check.label, ok: true, detail }),
      (error) => ({ label: check.label, ok: false, detail: messageOf(error) }),
    );
    log(`  check: ${result.ok ? "ok" : "FAILED"}: ${result.label}: ${result.detail}`);
    checks.push(result);
  }
  return { results, ratios: computeRatios(group.ratios, results), checks };
}

function heading(startedAt: Date, env: Environment, options: Options): string[] {
  const { tools } = env;
  const quick = options.quick ? " (--quick: zstd on the 16 GiB image once)" : "";
  const version = env.git === null
    ? env.cli
    : `commit ${env.git.commit.slice(0, 12)}${env.git.dirty ? " with uncommitted changes" : ""}`;
  return [
    `vmabackup benchmark (${version}), ${startedAt.toISOString()}, best of ${options.runs}${quick}`,
    `Deno ${env.deno.deno}, ${env.nproc} CPUs (${env.cpuModel}), ${env.memoryGiB} GiB RAM, ` +
    `zstd ${tools.zstd}, ${tools.cp}${tools.qemuImg ? `, ${tools.qemuImg}` : ""}`,
    "MB/s: 10^6 bytes of the input image per second; RSS: peak resident set (GNU time %M)",
  ];
}

async function describeInputs(used: Input[]) {
  const described = [];
  for (const input of used) {
    const { size, blocks } = await Deno.stat(input.path);
    const allocatedBytes = (blocks ?? 0) * 512;
    described.push({
      name: input.name,
      description: input.description,
      bytes: size,
      allocatedBytes,
    });
  }
  return described;
}

async function writeResults(report: object, name: string): Promise<void> {
  await Deno.mkdir(RESULTS_DIR, { recursive: true });
  const json = `${JSON.stringify(report, null, 2)}\n`;
  await Deno.writeTextFile(join(RESULTS_DIR, name), json);
  await Deno.writeTextFile(join(RESULTS_DIR, "latest.json"), json);
  log(`wrote bench/results/${name} and bench/results/latest.json`);
}

if (import.meta.main) {
  const code = await main(Deno.args).catch((error) => {
    console.error(`error: ${messageOf(error)}`);
    return 1;
  });
  Deno.exit(code);
}
