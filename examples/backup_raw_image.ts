// deno-lint-ignore-file no-console
// Back up one raw disk image into a VMA archive.
// deno run --allow-read --allow-write examples/backup_raw_image.ts disk.raw backup.vma
import { rawDiskSource, VmaWriterStream, ZeroFilterStream } from "../mod.ts";

const [disk, output] = Deno.args;
if (!disk || !output) throw new Error("usage: backup_raw_image.ts DISK.raw OUT.vma");

const file = await Deno.open(output, { write: true, createNew: true });
const writer = new VmaWriterStream();
await rawDiskSource(disk, { name: "drive-scsi0" }) // 64 KiB cluster records
  .pipeThrough(new ZeroFilterStream()) // leave all-zero 4 KiB blocks out
  .pipeThrough(writer) // records → VMA bytes
  .pipeTo(file.writable); // closes the file when done

const { clusters, zeroClusters, bytes } = writer.stats;
console.log(`${output}: ${clusters} clusters (${zeroClusters} all zero), ${bytes} bytes`);
