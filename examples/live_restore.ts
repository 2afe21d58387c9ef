// deno-lint-ignore-file no-console
// Boot a VM on its backup at once and copy the disk back while it runs (stock QEMU).
// deno run -A examples/live_restore.ts vm-100.vma.zst /run/vm-100.qmp drive-scsi0=/var/lib/vz/vm-100-disk-0.qcow2
// Start QEMU paused, waiting for this script, on the image it names (any order):
//   qemu-system-x86_64 -S -qmp unix:/run/vm-100.qmp,server=on,wait=on \
//     -drive file=/var/lib/vz/vm-100-disk-0.qcow2,format=qcow2,if=virtio ...
import { fileRangeReader, IndexedArchive, QmpClient, startLiveRestore } from "../mod.ts";

const [archivePath, socket, ...specs] = Deno.args;
if (!archivePath || !socket || specs.length === 0) {
  throw new Error("usage: live_restore.ts ARCHIVE QMP_SOCKET DISK=TARGET...");
}
const archive = await IndexedArchive.open(await fileRangeReader(archivePath));
await using restore = await startLiveRestore({
  archive,
  drives: specs.map((spec) => {
    const [disk, target] = spec.split("=", 2);
    return { disk: disk!, target: target! };
  }),
});
for (const drive of restore.drives) console.log(`${drive.disk}: start the VM on ${drive.overlay}`);

// QEMU creates its monitor socket as it starts; with wait=on it opens its disks only once
// this connection is made, so the overlays above exist by then.
let qmp: QmpClient | undefined;
while (qmp === undefined) {
  qmp = await QmpClient.connect(socket).catch(async () => {
    await new Promise((resolve) => setTimeout(resolve, 100));
    return undefined;
  });
}
try {
  const result = await restore.complete(qmp, {
    onProgress: (drives) => {
      for (const d of drives) console.log(`${d.disk}: ${d.phase} ${d.done}/${d.total}`);
    },
  });
  for (const drive of result.drives) console.log(`${drive.disk}: restored to ${drive.target}`);
} finally {
  qmp.close();
  archive.close();
}
