// Copyright 2026 the vmabackup authors. MIT license.
/**
 * An external program (zstd, lzop) as a byte transform: input to its stdin, output from
 * its stdout.
 *
 * @module
 */
import { BufferPool, releaseChunk } from "../_pool.ts";

/** Options of {@linkcode programTransform}. */
export interface ProgramTransformOptions {
  /** What the program is for, in messages ("encode zstd"). */
  purpose: string;
  /** The Debian package that provides it, named when it is missing. */
  debianPackage: string;
  /**
   * Read the output into recycled 1 MiB buffers (default `false`); only for a pipeline in
   * which every output chunk reaches exactly one final consumer that calls `releaseChunk`.
   */
  reuseBuffers?: boolean;
}

/**
 * Runs `program args` and exposes its stdin as `writable` and its stdout as `readable`.
 * Input chunks are released (see `releaseChunk`) once the program has taken them. A
 * missing program or a failing run gives one clear error. Needs `--allow-run=PROGRAM`.
 *
 * @example Uppercase with tr
 * ```ts
 * import assert from "node:assert/strict";
 * import { programTransform } from "./program_transform.ts";
 *
 * const upper = programTransform("tr", ["a-z", "A-Z"], { purpose: "uppercase", debianPackage: "coreutils" });
 * const text = await new Response(
 *   ReadableStream.from([new TextEncoder().encode("vma")]).pipeThrough(upper),
 * ).text();
 * assert.equal(text, "VMA");
 * ```
 */
export function programTransform(
  program: string,
  args: string[],
  options: ProgramTransformOptions,
): ReadableWritablePair<Uint8Array, Uint8Array> {
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(program, { args, stdin: "piped", stdout: "piped", stderr: "piped" })
      .spawn();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new Deno.errors.NotFound(
        `Cannot ${options.purpose}: The ${program} program is not installed (Debian package ${options.debianPackage})`,
      );
    }
    throw error;
  }
  const stderr = new Response(child.stderr).text();
  const failed = async () => {
    const status = await child.status;
    if (status.success) return undefined;
    return new Error(`Cannot ${options.purpose}: ${program} failed: ${(await stderr).trim()}`);
  };
  const stdin = child.stdin.getWriter();
  const writable = new WritableStream<Uint8Array>({
    async write(chunk) {
      await stdin.write(chunk); // resolves once the pipe took the bytes
      releaseChunk(chunk);
    },
    close: () => stdin.close(), // the program sees EOF and finishes
    async abort(reason) {
      await stdin.abort(reason).catch(() => {});
      try {
        child.kill();
      } catch { /* already exited */ }
    },
  });
  // Read the output into 1 MiB buffers, recycled (consumers release them) when allowed.
  const output = child.stdout.getReader({ mode: "byob" });
  const pool = new BufferPool(1 << 20, {
    trackChunks: true,
    recycle: options.reuseBuffers ?? false,
  });
  const readable = new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { value, done } = await output.read(pool.acquire().bytes, { min: pool.size });
      if (value !== undefined && value.byteLength > 0) {
        // The read moved the memory to a new ArrayBuffer: track that one instead.
        pool.wrap(new Uint8Array(value.buffer)).hold(1);
        controller.enqueue(value);
      }
      if (done) {
        const error = await failed();
        if (error) throw error;
        controller.close();
      }
    },
    async cancel(reason) {
      await output.cancel(reason).catch(() => {});
      try {
        child.kill();
      } catch { /* already exited */ }
    },
  }, { highWaterMark: 0 });
  return { writable, readable };
}
