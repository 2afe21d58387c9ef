// deno-lint-ignore-file no-console
// Back up a running QEMU VM, consistently, while it keeps running and writing.
// Start QEMU with a monitor for this script: -qmp unix:/run/vm-100.backup.qmp,server=on,wait=off
// deno run --allow-read --allow-write --allow-net examples/live_backup.ts /run/vm-100.backup.qmp vm-100.vma.zst
import {
  QmpClient,
  startPushBackup,
  VmaWriterStream,
  ZeroFilterStream,
  ZstdCompressStream,
} from "../mod.ts";

const [socket, output] = Deno.args;
if (!socket || !output) throw new Error("usage: live_backup.ts QMP_SOCKET OUT.vma.zst");

const file = await Deno.open(output, { write: true, createNew: true }); // before touching the VM
using qmp = await QmpClient.connect(socket);
const backup = await startPushBackup({ qmp }); // every writable drive, as drive-<id>
try {
  await backup.records // clusters as of the snapshot point, in copy-before-write order
    .pipeThrough(new ZeroFilterStream())
    .pipeThrough(new VmaWriterStream())
    .pipeThrough(new ZstdCompressStream({ mainThread: false })) // this thread serves QEMU
    .pipeTo(file.writable);
  await backup.finished; // QEMU's block graph is back as it was
} catch (error) {
  await backup.abort(error); // cancel QEMU's jobs and restore the graph before leaving
  await Deno.remove(output);
  throw error;
}
console.log(`${output}: ${backup.drives.map((drive) => drive.name).join(", ")}`);
