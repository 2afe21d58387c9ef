// deno-lint-ignore-file no-console
// An incremental live backup of a running QEMU VM: only the clusters written since the previous
// archive come from the VM, every other one from that archive, and the result is a complete
// .vma.zst that restores on its own. Without a previous archive (or when its checkpoint cannot be
// trusted) it is a full backup, which adds the checkpoint the next run starts from.
// Start QEMU with a monitor for this script: -qmp unix:/run/vm-100.backup.qmp,server=on,wait=off
// deno run --allow-read --allow-write --allow-net examples/incremental_backup.ts \
//   /run/vm-100.backup.qmp vm-100-tue.vma.zst [vm-100-mon.vma.zst]
import {
  checkpointName,
  encodeArchive,
  encodeSyntheticFull,
  fileRangeReader,
  IndexedArchive,
  QmpClient,
  startPushBackup,
  ZeroFilterStream,
} from "../mod.ts";

const [socket, output, previous] = Deno.args;
if (!socket || !output) {
  throw new Error("usage: incremental_backup.ts QMP_SOCKET OUT.vma.zst [PREVIOUS.vma.zst]");
}

const partial = `${output}.partial`;
const file = await Deno.open(partial, { write: true, createNew: true }); // before the VM
const base = previous === undefined
  ? undefined
  : await IndexedArchive.open(await fileRangeReader(previous)); // checks its index
using qmp = await QmpClient.connect(socket);
const uuid = crypto.randomUUID(); // the new archive's, and its checkpoint's name
const backup = await startPushBackup({
  qmp,
  checkpoint: checkpointName(uuid), // added at the snapshot point, for the next run
  ...(base && {
    since: { checkpoint: checkpointName(base.index.uuid), devices: base.devices },
  }),
});
if (backup.fullReason !== undefined) console.log(`a full backup: ${backup.fullReason}`);
try {
  const records = backup.records.pipeThrough(new ZeroFilterStream());
  const options = { uuid, compression: "zstd", mainThread: false } as const; // QEMU's thread
  const archive = backup.kind === "incremental"
    ? encodeSyntheticFull(records, {
      ...options,
      base: base!,
      checkpoint: checkpointName(base!.index.uuid),
    })
    : encodeArchive(records, options);
  await archive.readable.pipeTo(file.writable); // closes the file
  await backup.finished; // QEMU's block graph is back as it was
  using written = await Deno.open(partial, { write: true });
  await written.syncData();
  await Deno.rename(partial, output);
  using dir = await Deno.open(new URL(".", `file://${Deno.realPathSync(output)}`), { read: true });
  await dir.sync(); // the rename too is on disk
  // Only now that the archive is durable may the previous checkpoint go.
  for (const note of await backup.commitCheckpoint()) console.log(`note: ${note}`);
} catch (error) {
  await backup.abort(error); // the new checkpoint goes, the previous one stays
  await Deno.remove(partial).catch(() => {});
  throw error;
} finally {
  base?.close();
}
console.log(`${output}: ${backup.kind} backup of ${backup.drives.map((d) => d.name).join(", ")}`);
