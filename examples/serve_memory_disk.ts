// deno-lint-ignore-file no-console
// Serve an in-memory disk over NBD until Ctrl-C, for qemu-img, qemu-io, nbdinfo or nbdcopy.
// deno run --allow-read --allow-write --allow-net examples/serve_memory_disk.ts /tmp/disk.sock
//   qemu-img map -f raw 'nbd+unix:///drive-scsi0?socket=/tmp/disk.sock'
import { NbdMemoryExport, NbdServer } from "../mod.ts";

const disk = new NbdMemoryExport(64 << 20, { description: "64 MiB, data at 1 MiB and 32 MiB" });
disk.data.fill(0x11, 1 << 20, 2 << 20);
disk.data.fill(0x22, 32 << 20, (32 << 20) + 65536);

const server = NbdServer.listen({ path: Deno.args[0] ?? "disk.sock" }, { "drive-scsi0": disk }, {
  logger: (line) => console.error(line),
});
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  Deno.addSignalListener(signal, async () => {
    await server.close(); // drops the clients and removes the socket
    Deno.exit(0);
  });
}
console.log(server.uri("drive-scsi0"));
