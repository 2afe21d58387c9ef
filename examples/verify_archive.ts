// deno-lint-ignore-file no-console
// Read a VMA archive back and verify every rule, missing clusters included.
// deno run --allow-read examples/verify_archive.ts backup.vma
import { VmaFormatError, VmaReaderStream } from "../mod.ts";

const file = await Deno.open(Deno.args[0] ?? "backup.vma");
const reader = new VmaReaderStream();
try {
  for await (const record of file.readable.pipeThrough(reader)) {
    if (record.type === "device") console.log(`device ${record.name}: ${record.size} bytes`);
    if (record.type === "cluster") record.lease?.release(); // nothing to keep
  }
} catch (error) {
  if (!(error instanceof VmaFormatError)) throw error;
  console.error(`invalid: ${error.message}`);
  Deno.exit(1);
}
console.log(`ok: ${reader.stats.extents} extents, ${reader.stats.clusters} clusters`);
