// deno-lint-ignore-file no-console
// Back up one raw disk image straight into S3 storage, then verify the archive from there.
// Credentials, region and endpoint come from the environment, as for the AWS CLI
// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL for other servers).
// deno run --allow-read --allow-net --allow-env examples/s3_backup.ts disk.raw s3://BUCKET/vm.vma.zst
import {
  decompressInput,
  rawDiskSource,
  s3Sink,
  s3Source,
  VmaReaderStream,
  VmaWriterStream,
  ZeroFilterStream,
  ZstdCompressStream,
} from "../mod.ts";

const [disk, url] = Deno.args;
if (!disk || !url) throw new Error("usage: s3_backup.ts DISK.raw s3://BUCKET/KEY.vma.zst");

const sink = await s3Sink(url); // refuses an existing key
await rawDiskSource(disk, { name: "drive-scsi0" })
  .pipeThrough(new ZeroFilterStream())
  .pipeThrough(new VmaWriterStream({ reuseBuffers: true }))
  .pipeThrough(new ZstdCompressStream())
  .pipeTo(sink); // a multipart upload: the key appears once it is complete
const { size, parts } = await sink.complete();
console.log(`${url}: ${size} bytes in ${parts} part(s)`);

// Read it back: a GET that resumes where the connection drops, checked by the strict reader.
const { readable } = await decompressInput(await s3Source(url));
const reader = new VmaReaderStream({ skipData: true });
for await (const record of readable.pipeThrough(reader)) {
  if (record.type === "cluster") record.lease?.release();
}
console.log(`verified: ${reader.stats.clusters} clusters`);
