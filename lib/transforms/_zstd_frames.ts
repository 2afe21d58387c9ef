// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Finds zstd frame boundaries in a byte stream without decompressing (internal).
 *
 * Frames are walked by their headers and block headers (RFC 8878 §3.1): the magic, the frame
 * header descriptor, then blocks whose 3-byte headers give their sizes, then an optional
 * checksum. Skippable frames carry their own length.
 *
 * @module
 */

const FRAME_MAGIC = 0xfd2fb528;

/** A piece of one frame, in stream order. */
export interface FrameSegment {
  /** Bytes of the frame (a view of the input chunk). */
  bytes: Uint8Array;
  /** True when these are the frame's first bytes. */
  start: boolean;
  /** True when the frame ends with these bytes. */
  end: boolean;
  /**
   * The frame's decompressed size from its header, when the header has it and was read by
   * the time this segment was cut (a start segment may end before the header does).
   */
  contentSize?: number | undefined;
}

const enum State {
  Magic,
  Descriptor,
  HeaderRest,
  BlockHeader,
  BlockBody,
  Checksum,
  SkippableSize,
  SkippableBody,
}

/**
 * Incremental splitter: feed chunks, get frame segments; throws on malformed input.
 *
 * @example Two frames, fed in chunks that cut through the second frame's magic
 * ```ts
 * import assert from "node:assert/strict";
 * import { ZstdFrameSplitter } from "./_zstd_frames.ts";
 *
 * // magic, single-segment descriptor, content size 5, last raw block of 5 bytes, "hello"
 * const frame = Uint8Array.fromHex("28b52ffd" + "20" + "05" + "290000" + "68656c6c6f");
 * const input = new Uint8Array([...frame, ...frame]);
 * const cut = frame.byteLength + 2;
 * const splitter = new ZstdFrameSplitter();
 * const segments = [input.subarray(0, cut), input.subarray(cut)].flatMap((c) => splitter.push(c));
 * const flags = segments.map((segment) => [segment.start, segment.end]);
 * assert.deepEqual(flags, [[true, true], [true, false], [false, true]]);
 * assert.equal(segments[0]?.contentSize, 5);
 * assert.ok(splitter.atFrameBoundary);
 * assert.throws(() => new ZstdFrameSplitter().push(new Uint8Array(4)), /Bad frame magic/);
 * ```
 */
export class ZstdFrameSplitter {
  /** zstd frames seen so far (skippable ones not counted). */
  frames = 0;
  /** Of those, the frames that carry a content checksum, which decoders check. */
  checksummedFrames = 0;
  /** Skippable frames seen so far. */
  skippableFrames = 0;
  #state = State.Magic;
  /** Bytes still needed for the current field or body. */
  #need = 4;
  /** Small fields (magic, header, block header) collected across chunks. */
  #field = new Uint8Array(18);
  #fieldFill = 0;
  #frameStarted = false;
  #checksum = false;
  #lastBlock = false;
  #contentSize: number | undefined;
  #offset = 0;

  /** Splits `chunk`; segments reference `chunk` (or a copy of a magic split across chunks). */
  push(chunk: Uint8Array): FrameSegment[] {
    const segments: FrameSegment[] = [];
    const emit = (bytes: Uint8Array, end: boolean) => {
      segments.push({
        bytes,
        start: !this.#frameStarted,
        end,
        contentSize: this.#contentSize,
      });
      this.#frameStarted = !end;
    };
    let position = 0;
    /** Where the current frame's bytes start in this chunk, or -1 outside a frame. */
    let frameStart = this.#inFrame() ? 0 : -1;
    let magicStart = -1;
    while (position < chunk.byteLength) {
      if (this.#state === State.Magic && this.#fieldFill === 0) magicStart = position;
      const take = Math.min(this.#need, chunk.byteLength - position);
      const body = this.#state === State.BlockBody || this.#state === State.SkippableBody;
      if (!body) this.#field.set(chunk.subarray(position, position + take), this.#fieldFill);
      if (!body) this.#fieldFill += take;
      position += take;
      this.#need -= take;
      this.#offset += take;
      if (this.#need > 0) break;
      const wasMagic = this.#state === State.Magic;
      // A magic that began in an earlier chunk is only in the field: it goes out as a copy.
      const carriedMagic = wasMagic && magicStart === -1 ? this.#field.slice(0, 4) : undefined;
      const frameEnded = this.#advance();
      if (wasMagic && this.#state === State.Descriptor) {
        if (carriedMagic !== undefined) {
          emit(carriedMagic, false);
          frameStart = position;
        } else {
          frameStart = magicStart;
        }
      }
      if (frameEnded) {
        emit(chunk.subarray(frameStart, position), true);
        frameStart = -1;
      }
      magicStart = -1;
    }
    if (frameStart !== -1 && position > frameStart) {
      emit(chunk.subarray(frameStart, position), false);
    }
    return segments;
  }

  /** True inside a (non-skippable) frame, after its magic. */
  #inFrame(): boolean {
    return this.#state !== State.Magic && this.#state !== State.SkippableSize &&
      this.#state !== State.SkippableBody;
  }

  /** True when the input ended between frames. */
  get atFrameBoundary(): boolean {
    return this.#state === State.Magic && this.#fieldFill === 0;
  }

  /** Moves to the next state once a field is complete; returns true when a frame ended. */
  #advance(): boolean {
    const field = this.#field;
    const view = new DataView(field.buffer, 0, this.#fieldFill);
    this.#fieldFill = 0;
    switch (this.#state) {
      case State.Magic: {
        const magic = view.getUint32(0, true);
        if (magic === FRAME_MAGIC) {
          this.#state = State.Descriptor;
          this.#need = 1;
          this.#contentSize = undefined; // not the previous frame's
          return false;
        }
        if ((magic & 0xfffffff0) === 0x184d2a50) {
          this.#state = State.SkippableSize;
          this.skippableFrames++;
          this.#need = 4;
          return false;
        }
        throw new TypeError(`Cannot decode zstd: Bad frame magic at byte ${this.#offset - 4}`);
      }
      case State.Descriptor: {
        const descriptor = field[0]!;
        const fcsFlag = descriptor >> 6;
        const singleSegment = (descriptor >> 5) & 1;
        if (descriptor & 0x08) {
          throw new TypeError(`Cannot decode zstd: Reserved bit set at byte ${this.#offset - 1}`);
        }
        this.#checksum = ((descriptor >> 2) & 1) === 1;
        this.frames++;
        if (this.#checksum) this.checksummedFrames++;
        const dictionaryBytes = [0, 1, 2, 4][descriptor & 3]!;
        const fcsBytes = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
        this.#headerRest = { singleSegment: singleSegment === 1, dictionaryBytes, fcsBytes };
        // Never 0: a single-segment frame has at least one content-size byte.
        this.#need = (singleSegment ? 0 : 1) + dictionaryBytes + fcsBytes;
        this.#state = State.HeaderRest;
        return false;
      }
      case State.HeaderRest: {
        const { singleSegment, dictionaryBytes, fcsBytes } = this.#headerRest;
        const at = (singleSegment ? 0 : 1) + dictionaryBytes;
        this.#contentSize = fcsBytes === 0
          ? undefined
          : fcsBytes === 1
          ? view.getUint8(at)
          : fcsBytes === 2
          ? view.getUint16(at, true) + 256
          : fcsBytes === 4
          ? view.getUint32(at, true)
          : Number(view.getBigUint64(at, true));
        this.#state = State.BlockHeader;
        this.#need = 3;
        return false;
      }
      case State.BlockHeader: {
        const header = field[0]! | (field[1]! << 8) | (field[2]! << 16);
        this.#lastBlock = (header & 1) === 1;
        const type = (header >> 1) & 3;
        const size = header >>> 3;
        if (type === 3) {
          throw new TypeError(
            `Cannot decode zstd: Reserved block type at byte ${this.#offset - 3}`,
          );
        }
        this.#need = type === 1 ? 1 : size;
        this.#state = State.BlockBody;
        if (this.#need === 0) return this.#advance();
        return false;
      }
      case State.BlockBody:
        if (!this.#lastBlock) {
          this.#state = State.BlockHeader;
          this.#need = 3;
          return false;
        }
        if (this.#checksum) {
          this.#state = State.Checksum;
          this.#need = 4;
          return false;
        }
        return this.#endFrame();
      case State.Checksum:
        return this.#endFrame();
      case State.SkippableSize:
        this.#need = view.getUint32(0, true);
        this.#state = State.SkippableBody;
        if (this.#need === 0) return this.#advance();
        return false;
      case State.SkippableBody:
        this.#state = State.Magic;
        this.#need = 4;
        return false;
    }
  }

  #headerRest = { singleSegment: false, dictionaryBytes: 0, fcsBytes: 0 };

  #endFrame(): boolean {
    this.#state = State.Magic;
    this.#need = 4;
    return true;
  }
}
