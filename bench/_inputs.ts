// Copyright 2026 the vmabackup authors. MIT license.
/**
 * The benchmark's input images: built once in the work directory from local system files and
 * reused while they have the right size (so they are not byte-reproducible across machines), and
 * read once before a group's measurements to warm the page cache.
 *
 * A group lists the inputs it needs (`inputs` of its definition); a new kind of input is an
 * {@linkcode Input} with its own `build` and `warm`.
 *
 * @module
 */
import { join } from "node:path";
import { fileSize, GiB, log, MiB, readAt, remove, sh, writeAll, writeAtomically } from "./_util.ts";

/** An input file in the work directory. */
export interface Input {
  /** File name in the work directory. */
  readonly name: string;
  /** Apparent size in bytes: a file of another size is rebuilt. */
  readonly size: number;
  readonly description: string;
  /** Inputs this one is made from: built first, and when one is rebuilt this one is too. */
  readonly requires: readonly Input[];
  /** Writes the input at `path`; `pathOf` gives the paths of the required inputs. */
  build(path: string, pathOf: (input: Input) => string): Promise<void>;
  /** Reads what the measurements will read, to bring it into the page cache. */
  warm(path: string): Promise<void>;
  /** Files `build` may leave behind when interrupted (for `--clean`), beside `NAME.tmp`. */
  readonly scratch?: readonly string[];
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

/**
 * `dense-1g.raw`: 1 GiB of mixed data. A 256 MiB block of 1 MiB pieces, per 16 MiB 6 text (tar
 * of /usr/include and /usr/share/doc), 6 binary (tar of /usr/bin and /usr/lib/x86_64-linux-gnu),
 * 3 mixed (tar of /usr/share) and 1 zero MiB (6.25 %), written 4 times.
 */
export const DENSE_1G: Input = {
  name: "dense-1g.raw",
  size: GiB,
  description: "1 GiB dense: text, ELF binaries, mixed files, 6.25 % zero MiBs",
  requires: [],
  scratch: DENSE_SOURCES.map(([key]) => `${key}.src`),
  async build(path) {
    log(`building ${path} (1 GiB from /usr; takes a minute)`);
    const work = join(path, "..");
    const sources = new Map<string, Uint8Array>();
    for (const [key, size, command] of DENSE_SOURCES) {
      const file = join(work, `${key}.src`);
      await sh(`${command} 2>/dev/null | head -c ${size} > '${file}'`);
      const data = await Deno.readFile(file);
      await remove(file);
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
    await writeAtomically(path, async (file) => {
      for (let written = 0; written < GiB; written += DENSE_BLOCK) await writeAll(file, block);
    });
  },
  warm: readWhole,
};

/** `dense-4g.raw`: the dense image four times (zstd's window never reaches a repeat). */
export const DENSE_4G: Input = {
  name: "dense-4g.raw",
  size: 4 * GiB,
  description: "4 GiB dense: the dense image four times",
  requires: [DENSE_1G],
  async build(path, pathOf) {
    log(`building ${path}`);
    const dense = await Deno.readFile(pathOf(DENSE_1G));
    await writeAtomically(path, async (file) => {
      for (let i = 0; i < 4; i++) await writeAll(file, dense);
    });
  },
  warm: readWhole,
};

/** Where the data of a sparse input lies: `count` pieces of `piece` bytes, evenly spread. */
export interface SparseLayout {
  piece: number;
  count: number;
  /** Distance between the pieces' sources in the dense image. */
  sourceStride: number;
}

/**
 * A sparse image of `size` bytes holding `count` pieces of the dense image, evenly spread and
 * aligned to the piece size. `warm: "all"` reads the holes too (reading a hole caches zero pages,
 * which the first run of a tool that reads every byte, like zstd, would otherwise pay for);
 * `"data"` reads only the pieces, for measurements that never read holes.
 */
export function sparseImage(
  name: string,
  size: number,
  description: string,
  layout: SparseLayout,
  warm: "all" | "data",
): Input {
  const offset = (index: number) =>
    Math.floor(index * size / layout.count / layout.piece) * layout.piece;
  return {
    name,
    size,
    description,
    requires: [DENSE_1G],
    async build(path, pathOf) {
      log(`building ${path}`);
      using source = await Deno.open(pathOf(DENSE_1G));
      const piece = new Uint8Array(layout.piece);
      await writeAtomically(path, async (file) => {
        await file.truncate(size);
        for (let i = 0; i < layout.count; i++) {
          await readAt(source, (i * layout.sourceStride) % DENSE_1G.size, piece);
          await file.seek(offset(i), Deno.SeekMode.Start);
          await writeAll(file, piece);
        }
      });
    },
    async warm(path) {
      if (warm === "all") return await readWhole(path);
      using file = await Deno.open(path);
      const buffer = new Uint8Array(layout.piece);
      for (let i = 0; i < layout.count; i++) await readAt(file, offset(i), buffer);
    },
  };
}

/** `sparse-16g.raw`: 512 MiB of data in 16 GiB. */
export const SPARSE_16G: Input = sparseImage(
  "sparse-16g.raw",
  16 * GiB,
  "16 GiB sparse: 128 × 4 MiB of the dense image, one every 128 MiB",
  { piece: 4 * MiB, count: 128, sourceStride: 4 * MiB },
  "all",
);

/** `sparse-2g.raw`: 5 % data. */
export const SPARSE_2G: Input = sparseImage(
  "sparse-2g.raw",
  2 * GiB,
  "2 GiB sparse, 5 % data: 102 × 1 MiB of the dense image, spread evenly",
  { piece: MiB, count: 102, sourceStride: 10 * MiB },
  "all",
);

/** `holes-GIBg.raw`: the same 256 MiB of data (64 × 4 MiB) in `gib` GiB; warmed data only. */
export function holesImage(gib: number): Input {
  return sparseImage(
    `holes-${gib}g.raw`,
    gib * GiB,
    `${gib} GiB sparse: the same 256 MiB (64 × 4 MiB of the dense image) as its twin`,
    { piece: 4 * MiB, count: 64, sourceStride: 4 * MiB },
    "data",
  );
}

export const HOLES_8G: Input = holesImage(8);
export const HOLES_64G: Input = holesImage(64);

/**
 * Builds the inputs that are missing or have the wrong size, required ones first; an input is
 * rebuilt too when one it is made from was rebuilt.
 */
export async function prepareInputs(work: string, needed: readonly Input[]): Promise<void> {
  await Deno.mkdir(work, { recursive: true });
  const pathOf = (input: Input) => join(work, input.name);
  const rebuilt = new Set<string>();
  const done = new Set<string>();
  const prepare = async (input: Input): Promise<void> => {
    if (done.has(input.name)) return;
    done.add(input.name);
    for (const required of input.requires) await prepare(required);
    const stale = input.requires.some((required) => rebuilt.has(required.name));
    if (!stale && (await fileSize(pathOf(input))) === input.size) return;
    await input.build(pathOf(input), pathOf);
    rebuilt.add(input.name);
  };
  for (const input of needed) await prepare(input);
}

/** Reads a file from start to end (holes too). */
async function readWhole(path: string): Promise<void> {
  using file = await Deno.open(path);
  const buffer = new Uint8Array(8 * MiB);
  while ((await file.read(buffer)) !== null) { /* read on */ }
}
