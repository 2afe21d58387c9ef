// Copyright 2026 the vmabackup authors. MIT license.
/**
 * One Worker that decodes a zstd stream of any frames, in order (internal).
 *
 * zstd decodes on one core (as `zstd -d` does); doing it in a Worker leaves this thread
 * free for the stages after it. The worker drives `node:zlib`'s native zstd handle, which
 * decodes straight into buffers that this side lends it, so decoding makes no garbage: the
 * decoded buffers come back here, go downstream, and return to the pool once the final
 * consumer calls `releaseChunk`. Only three of them are lent or waiting at a time, so memory
 * stays bounded however far a frame expands. A full buffer is handed over whole; when the
 * reader waits and the input has run dry (a slow source), the worker sends a copy of what
 * it has decoded so far and keeps the buffer.
 *
 * @module
 */
import { BufferPool } from "../_pool.ts";
import { noteFallback } from "./_zstd_note.ts";

/** Compressed bytes per message to the worker. */
const INPUT_SIZE = 1 << 20;
/** Decoded bytes per output buffer: 1 MiB decoded faster than 4 MiB, and 60 MiB leaner. */
const OUTPUT_SIZE = 1 << 20;
/** Input buffers at the worker before {@linkcode ZstdDecoderWorker.write} waits. */
const INPUTS_IN_FLIGHT = 2;
/** Output buffers lent to the worker or decoded and not yet read. */
const OUTPUTS_AHEAD = 3;

/**
 * Buffers shared by every decoder of this process, so that stream after stream (a
 * long-running server, a library user) reuses them: a pool per stream left each one's
 * megabytes to the allocator, about 0.4 MiB of RSS per stream that was never given back.
 */
const SHARED_INPUTS = new BufferPool(INPUT_SIZE, { maxFree: 2 * (INPUTS_IN_FLIGHT + 1) });
const SHARED_OUTPUTS = new BufferPool(OUTPUT_SIZE, {
  maxFree: 2 * (OUTPUTS_AHEAD + 2),
  trackChunks: true,
});
/** Without `reuseBuffers`, decoded chunks are new buffers that belong to their receiver. */
const FRESH_OUTPUTS = new BufferPool(OUTPUT_SIZE, { recycle: false });

const WORKER_SOURCE = `
import * as zlib from "node:zlib";
let decoder = zlib.createZstdDecompress();
const inputs = []; // { bytes, at, left, more }
const outputs = []; // empty buffers lent by the other side
let output; // the buffer being filled: bytes sent..fill are decoded and not yet sent
let sent = 0;
let fill = 0;
let ending = false;
let failed = false;
// node:zlib's native handle is an internal of Deno's polyfill: round-trip a frame through
// it first, and use the public streaming API (slower) when it misbehaves.
let fallback = (() => {
  try {
    const probe = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x48, 0x41, 0x00, 0x00, 0x76,
      0x6d, 0x61, 0x62, 0x61, 0x63, 0x6b, 0x75, 0xc7, 0xe6, 0x14, 0x49]);
    const back = new Uint8Array(8);
    decoder._handle.writeSync(0, probe, 0, probe.byteLength, back, 0, 8);
    const [outputLeft, inputLeft] = decoder._writeState;
    decoder._handle.reset();
    if (outputLeft !== 0 || inputLeft !== 0 || new TextDecoder().decode(back) !== "vmabacku") {
      return "a test frame did not round-trip";
    }
  } catch (error) {
    return String(error?.message ?? error);
  }
})();
if (fallback !== undefined) self.postMessage({ type: "fallback", why: fallback });

function sendOutput() {
  self.postMessage({ type: "output", output, start: sent, length: fill - sent }, [output.buffer]);
  output = undefined;
  sent = fill = 0;
}
function pump() {
  const handle = decoder._handle;
  const state = decoder._writeState; // [output bytes left, input bytes left] after a write
  while (inputs.length > 0) {
    const input = inputs[0];
    while (input.left > 0 || input.more) {
      if (output === undefined) {
        output = outputs.shift();
        if (output === undefined) return; // wait for a buffer
      }
      handle.writeSync(0, input.bytes, input.at, input.left, output, fill, output.byteLength - fill);
      const [outputLeft, inputLeft] = state;
      input.at += input.left - inputLeft;
      input.left = inputLeft;
      fill = output.byteLength - outputLeft;
      input.more = outputLeft === 0; // a full buffer: zstd may hold more of this input
      if (outputLeft === 0) sendOutput();
    }
    inputs.shift();
    self.postMessage({ type: "input", input: input.bytes }, [input.bytes.buffer]);
  }
  if (ending) {
    if (fill > sent) sendOutput();
    self.postMessage({ type: "end" });
  }
}

// The public API stops after one frame, so each frame gets a decompressor of its own; the
// other side says where frames start. Decoded pieces wait in order until buffers are lent.
const frames = []; // { pieces: [], done: false }
let held = []; // inputs copied but not given back while too much decoded data waits
let waiting = 0; // decoded bytes not yet in a lent buffer
function startFrame() {
  const frame = { pieces: [], done: false, stream: zlib.createZstdDecompress() };
  frame.stream.on("data", (piece) => {
    frame.pieces.push(piece);
    waiting += piece.byteLength;
    deliver();
  });
  frame.stream.on("end", () => {
    frame.done = true;
    deliver();
  });
  frame.stream.on("error", (error) => fail(error));
  frames.push(frame);
}
function feed({ input, length, starts }) {
  let at = 0;
  for (const cut of [...starts, length]) {
    if (cut > at) frames.at(-1).stream.write(input.slice(at, cut));
    if (cut < length) {
      frames.at(-1)?.stream.end();
      startFrame();
    }
    at = cut;
  }
  held.push(input);
  deliver();
}
function deliver() {
  while (frames.length > 0) {
    const frame = frames[0];
    if (frame.pieces.length === 0) {
      if (!frame.done) break;
      frames.shift();
      continue;
    }
    if (output === undefined) {
      output = outputs.shift();
      if (output === undefined) break; // wait for a buffer
    }
    const piece = frame.pieces[0];
    const take = Math.min(piece.byteLength, output.byteLength - fill);
    output.set(piece.subarray(0, take), fill);
    fill += take;
    waiting -= take;
    if (take === piece.byteLength) frame.pieces.shift();
    else frame.pieces[0] = piece.subarray(take);
    if (fill === output.byteLength) sendOutput();
  }
  // Inputs go back, so more come, only while little decoded data waits.
  while (held.length > 0 && waiting < 4 * ${OUTPUT_SIZE}) {
    const input = held.shift();
    self.postMessage({ type: "input", input }, [input.buffer]);
  }
  if (ending && frames.length === 0) {
    if (fill > sent) sendOutput();
    self.postMessage({ type: "end" });
    ending = false;
  }
}
function fail(error) {
  if (failed) return;
  failed = true;
  self.postMessage({ type: "error", message: String(error?.message ?? error) });
}

self.onmessage = ({ data }) => {
  if (failed) return;
  try {
    if (data.type === "fallback") {
      fallback = "asked for";
      return;
    }
    if (fallback !== undefined) {
      if (data.type === "input") feed(data);
      else if (data.type === "output") outputs.push(data.output);
      else if (data.type === "flush") return flush();
      else {
        ending = true;
        frames.at(-1)?.stream.end();
      }
      return deliver();
    }
    if (data.type === "input") inputs.push({ bytes: data.input, at: 0, left: data.length, more: false });
    else if (data.type === "output") outputs.push(data.output);
    else if (data.type === "flush") return flush();
    else ending = true;
    pump();
  } catch (error) {
    fail(error);
  }
};
/** The reader waits and the input ran dry: send a copy of what is decoded, keep the buffer. */
function flush() {
  if (inputs.length > 0 || held.length > 0 || output === undefined || fill === sent) return;
  const part = output.slice(sent, fill);
  self.postMessage({ type: "output", output: part, start: 0, length: part.byteLength, copy: true }, [part.buffer]);
  sent = fill;
}
`;
let workerUrl: string | undefined;

type Reply =
  | {
    type: "output";
    output: Uint8Array<ArrayBuffer>;
    start: number;
    length: number;
    /** A copy of part of a buffer the worker keeps filling. */
    copy?: boolean;
  }
  | { type: "input"; input: Uint8Array<ArrayBuffer> }
  | { type: "end" }
  | { type: "fallback"; why: string }
  | { type: "error"; message: string };

/**
 * This side of the decoding worker: {@linkcode write} compressed bytes, {@linkcode end},
 * and {@linkcode read} decoded chunks. With `reuseBuffers`, decoded chunks come from a pool
 * and the final consumer gives each back with `releaseChunk`.
 *
 * @example Decode two frames written in two pieces
 * ```ts
 * import assert from "node:assert/strict";
 * import { zstdCompressSync } from "node:zlib";
 * import { ZstdDecoderWorker } from "./_zstd_decoder.ts";
 *
 * const decoder = new ZstdDecoderWorker();
 * const frames = new Uint8Array([...zstdCompressSync("hello, "), ...zstdCompressSync("zstd")]);
 * await decoder.write(frames.subarray(0, 5));
 * await decoder.write(frames.subarray(5));
 * const reading = (async () => {
 *   let text = "";
 *   for (let chunk; (chunk = await decoder.read()) !== null;) text += new TextDecoder().decode(chunk);
 *   return text;
 * })();
 * await decoder.end();
 * assert.equal(await reading, "hello, zstd");
 * ```
 */
export class ZstdDecoderWorker {
  #worker: Worker | undefined;
  #inputs = SHARED_INPUTS;
  #outputs: BufferPool;
  #inputsInFlight = 0;
  /** Where frames start in the input being gathered. */
  #starts: number[] = [];
  #publicApi: boolean;

  /** An input buffer being filled from small chunks while the worker is busy. */
  #gathering: Uint8Array<ArrayBuffer> | undefined;
  #gathered = 0;
  #outputsLent = 0;
  #decoded: Uint8Array[] = [];
  #ended = false;
  #failure: { reason: unknown } | undefined;
  #change = Promise.withResolvers<void>();

  /**
   * A decoder; `publicApi` decodes through node:zlib's public streaming API, as when the
   * native handle fails its self-test (to test that path); `reuseBuffers` recycles the
   * decoded chunks that their only consumer releases.
   */
  constructor(options: { publicApi?: boolean; reuseBuffers?: boolean } = {}) {
    this.#publicApi = options.publicApi ?? false;
    this.#outputs = options.reuseBuffers ? SHARED_OUTPUTS : FRESH_OUTPUTS;
  }

  /**
   * Copies `chunk` towards the worker; resolves once few enough inputs wait there. Small
   * chunks are gathered while the worker is busy, so each message carries up to 1 MiB.
   * `frameStart` says that a zstd frame starts with `chunk`'s first byte (the public API,
   * the fallback, decodes one frame per decompressor).
   */
  async write(chunk: Uint8Array, frameStart = false): Promise<void> {
    let startPending = frameStart;
    for (let at = 0; at < chunk.byteLength;) {
      while (this.#inputsInFlight >= INPUTS_IN_FLIGHT && this.#failure === undefined) {
        await this.#changed();
      }
      this.#throwIfFailed();
      this.#gathering ??= this.#inputs.acquire().bytes;
      if (startPending) this.#starts.push(this.#gathered);
      startPending = false;
      const length = Math.min(this.#gathering.byteLength - this.#gathered, chunk.byteLength - at);
      this.#gathering.set(chunk.subarray(at, at + length), this.#gathered);
      this.#gathered += length;
      at += length;
      if (this.#gathered === this.#gathering.byteLength) this.#sendInput();
    }
    if (this.#inputsInFlight === 0) this.#sendInput(); // the worker is idle: no reason to wait
  }

  /** Ends the input; resolves when everything is decoded (and before the last read). */
  async end(): Promise<void> {
    this.#sendInput();
    this.#start().postMessage({ type: "end" });
    while (!this.#ended && this.#failure === undefined) await this.#changed();
    this.#throwIfFailed();
  }

  /** The next decoded chunk, or `null` after the end. */
  async read(): Promise<Uint8Array | null> {
    this.#lendOutputs();
    if (this.#decoded.length === 0) this.#worker?.postMessage({ type: "flush" });
    while (this.#decoded.length === 0 && !this.#ended && this.#failure === undefined) {
      await this.#changed();
    }
    this.#throwIfFailed();
    const chunk = this.#decoded.shift() ?? null;
    this.#lendOutputs();
    return chunk;
  }

  /** Stops the worker; pending and later calls fail with `reason`. */
  stop(reason: unknown): void {
    this.#failure ??= { reason };
    this.#worker?.terminate();
    this.#worker = undefined;
    this.#signal();
  }

  #sendInput(): void {
    if (this.#gathering === undefined || this.#gathered === 0) return;
    const input = this.#gathering;
    const message = { type: "input", input, length: this.#gathered, starts: this.#starts };
    this.#start().postMessage(message, [input.buffer]);
    this.#starts = [];
    this.#inputsInFlight++;
    this.#gathering = undefined;
    this.#gathered = 0;
    this.#lendOutputs();
  }

  #start(): Worker {
    if (this.#worker !== undefined) return this.#worker;
    this.#throwIfFailed(); // a stopped decoder stays stopped
    workerUrl ??= URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
    const worker = new Worker(workerUrl, { type: "module" });
    if (this.#publicApi) worker.postMessage({ type: "fallback" });
    worker.onmessage = ({ data }: MessageEvent<Reply>) => this.#receive(data);
    worker.onerror = (event) => {
      event.preventDefault();
      this.stop(new Error(`zstd worker failed: ${event.message}`));
    };
    this.#worker = worker;
    return worker;
  }

  #receive(reply: Reply): void {
    switch (reply.type) {
      case "output":
        if (!reply.copy) {
          this.#outputsLent--;
          this.#outputs.wrap(reply.output).hold(1); // the consumer's releaseChunk() gives it back
        }
        this.#decoded.push(reply.output.subarray(reply.start, reply.start + reply.length));
        break;
      case "input":
        this.#inputsInFlight--;
        this.#inputs.adopt(reply.input);
        if (this.#inputsInFlight === 0) this.#sendInput(); // what was gathered meanwhile
        break;
      case "fallback":
        noteFallback(reply.why);
        break;
      case "end":
        this.#ended = true;
        this.#worker?.terminate();
        this.#worker = undefined;
        break;
      case "error":
        this.stop(
          new TypeError(
            `Cannot decode zstd: ${reply.message.replace(/^Zstd decompress error: /, "")}`,
          ),
        );
        break;
    }
    this.#signal();
  }

  /** Keeps the worker supplied with empty buffers while few decoded chunks wait. */
  #lendOutputs(): void {
    if (this.#worker === undefined) return;
    while (this.#outputsLent + this.#decoded.length < OUTPUTS_AHEAD) {
      const output = this.#outputs.acquire().bytes;
      this.#outputsLent++;
      this.#worker.postMessage({ type: "output", output }, [output.buffer]);
    }
  }

  #changed(): Promise<void> {
    return this.#change.promise;
  }

  #signal(): void {
    this.#change.resolve();
    this.#change = Promise.withResolvers<void>();
  }

  #throwIfFailed(): void {
    if (this.#failure !== undefined) throw this.#failure.reason;
  }
}
