// Copyright 2026 the vmabackup authors. MIT license.
/**
 * Live backups of a running QEMU VM, push and pull: the archive equals the disks at the
 * snapshot point bit for bit while hundreds of guest writes land, and after every test and
 * every fault the VM runs on with its disks intact and its block graph as before.
 */
import assert from "node:assert/strict";
import type { LiveBackup } from "../lib/live/session.ts";
import { startPushBackup } from "../lib/live/push_backup.ts";
import { QmpClient } from "../lib/protocols/qmp_client.ts";
import { type VmaRecord, VmaWriterStream, ZeroFilterStream } from "../mod.ts";
import {
  diskContent,
  type DiskSpec,
  firstDifference,
  qemuTest,
  startVm,
  type TestVm,
} from "./_qemu.ts";
import { restoreInMemory } from "./_utils.ts";

const MiB = 2 ** 20;
type Mode = "push" | "pull";

async function start(mode: Mode, vm: TestVm, qmp: QmpClient): Promise<LiveBackup> {
  if (mode === "push") return await startPushBackup({ qmp, speed: 24 * MiB });
  const { startPullBackup } = await import("../lib/live/pull_backup.ts");
  return await startPullBackup({ qmp, workDir: vm.dir });
}

function vmDisks() {
  return [
    { id: "vda", size: 48 * MiB, format: "qcow2" as const, data: diskContent(48 * MiB, 1) },
    // Raw, and not a multiple of 64 KiB or even 4 KiB: the last cluster is 3.5 sectors of 4 KiB.
    {
      id: "vdb",
      size: 16 * MiB + 3 * 4096 + 512,
      format: "raw" as const,
      data: diskContent(16 * MiB, 9),
    },
  ];
}

/**
 * Random guest I/O on both disks: writes of 4 KiB to 128 KiB, some not cluster-aligned, and
 * every third request a write-zeroes (`write -z`, half of them with unmap) or a discard of a
 * 64 KiB cluster that held data before (what fstrim, BLKZEROOUT and discards produce).
 */
async function guestWrites(
  vm: TestVm,
  count: number,
  seed: number,
  during?: () => boolean,
  ids = ["vda", "vda", "vdb"],
) {
  let state = seed;
  const random = (n: number) => {
    state = (state * 1103515245 + 12345) & 0x7fffffff;
    return state % n;
  };
  let whileRunning = 0;
  for (let i = 0; i < count; i++) {
    const id = ids[random(ids.length)]!;
    const size = vm.model.get(id)!.byteLength;
    if (during?.()) whileRunning++;
    if (i % 3 === 2) {
      // diskContent puts data in the first MiB of every 4 MiB: hit a cluster there.
      const slots = Math.min(16, Math.floor(size / 65536));
      const offset = random(Math.max(1, Math.floor(size / (4 * MiB)))) * 4 * MiB +
        random(slots) * 65536;
      const kind = random(3);
      if (kind === 0) await vm.discard(id, offset, 65536);
      else await vm.writeZeroes(id, offset, 65536, kind === 1);
      continue;
    }
    const length = (1 + random(32)) * 4096;
    const offset = Math.min(random(size / 4096) * 4096, size - length);
    await vm.write(id, offset, length, 0x10 + (i % 200));
  }
  return whileRunning;
}

for (const mode of ["push", "pull"] as const) {
  qemuTest(
    `live ${mode} backup: the archive is the point-in-time image while the guest writes, zeroes and discards`,
    async () => {
      const vm = await startVm(vmDisks());
      try {
        await guestWrites(vm, 20, 7); // before the backup: part of the snapshot
        const snapshot = new Map(
          [...vm.model].map(([id, bytes]) => [`drive-${id}`, bytes.slice()]),
        );
        const before = await vm.nodes();
        using qmp = await QmpClient.connect(vm.toolQmp);
        const backup = await start(mode, vm, qmp);
        let running = true;
        let started = 0;
        const writes = backup.snapshot.then(() =>
          guestWrites(vm, 300, 11, () => running && ++started > 0)
        );
        const archive = await new Response(
          backup.records.pipeThrough(slowTarget(() => started >= 60))
            .pipeThrough(new ZeroFilterStream())
            .pipeThrough(new VmaWriterStream()),
        ).bytes();
        await backup.finished;
        running = false;
        const duringBackup = await writes;
        assert.ok(duringBackup >= 50, `${duringBackup} guest writes landed during the backup`);

        const restored = await restoreInMemory(archive);
        for (const [name, expected] of snapshot) {
          assert.equal(
            firstDifference(restored.get(name)!, expected),
            -1,
            `${name} equals the snapshot`,
          );
        }
        assert.deepEqual(await vm.nodes(), before, "the block graph is as before");
        assert.equal(await vm.status(), "running");
        const disks = await vm.stop();
        for (const [id, bytes] of disks) {
          assert.equal(vm.difference(id, bytes), -1, `every guest write landed on ${id}`);
        }
      } finally {
        await vm.stop().catch(() => {});
      }
    },
  );

  qemuTest(
    `live ${mode} backup: a failing archive sink cancels the backup and restores the VM`,
    async () => {
      const vm = await startVm(vmDisks());
      try {
        const before = await vm.nodes();
        using qmp = await QmpClient.connect(vm.toolQmp);
        const backup = await start(mode, vm, qmp);
        let written = 0;
        const failing = new WritableStream<Uint8Array>({
          write(chunk) {
            written += chunk.byteLength;
            if (written > 8 * MiB) {
              throw new Deno.errors.WriteZero("No space left on device (test)");
            }
          },
        });
        await assert.rejects(
          backup.records.pipeThrough(new ZeroFilterStream()).pipeThrough(new VmaWriterStream())
            .pipeTo(failing),
          /No space left/,
        );
        await assert.rejects(backup.finished);
        await checkRestored(vm, before);
      } finally {
        await vm.stop().catch(() => {});
      }
    },
  );

  qemuTest(`live ${mode} backup: abort() in the middle restores the VM`, async () => {
    const vm = await startVm(vmDisks());
    try {
      const before = await vm.nodes();
      using qmp = await QmpClient.connect(vm.toolQmp);
      const backup = await start(mode, vm, qmp);
      let clusters = 0;
      const pipe = backup.records.pipeTo(
        new WritableStream({
          async write(record) {
            if (record.type === "cluster") record.lease?.release();
            if (++clusters === 100) await backup.abort(new Error("user pressed Ctrl-C"));
          },
        }),
      );
      await assert.rejects(pipe);
      await assert.rejects(backup.finished, /Ctrl-C/);
      await checkRestored(vm, before);
    } finally {
      await vm.stop().catch(() => {});
    }
  });
}

for (const mode of ["push", "pull"] as const) {
  qemuTest(`live ${mode} backup: abort() while nobody reads ends at once`, async () => {
    const vm = await startVm(vmDisks());
    try {
      const before = await vm.nodes();
      using qmp = await QmpClient.connect(vm.toolQmp);
      const backup = await start(mode, vm, qmp);
      const reader = backup.records.getReader();
      for (let i = 0; i < 20; i++) await reader.read(); // then the reader stops, not cancelling
      // Guest writes to clusters not copied yet: in push mode they wait for the backup.
      const writes = [0, 1, 2, 3].map((i) => vm.write("vda", (40 + i) * MiB, 65536, 0x30 + i));
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const started = performance.now();
      await backup.abort(new Error("user pressed Ctrl-C"));
      const seconds = (performance.now() - started) / 1000;
      assert.ok(seconds < 5, `abort() took ${seconds.toFixed(1)} s`);
      await Promise.all(writes); // the guest's writes went through
      await assert.rejects(backup.finished, /Ctrl-C/);
      await assert.rejects(reader.read());
      await checkRestored(vm, before);
    } finally {
      await vm.stop().catch(() => {});
    }
  });
}

qemuTest(
  "live pull backup: clusters zeroed, discarded or rewritten after the snapshot keep their old data",
  async () => {
    // QEMU 7.2 serves a run of copied clusters from the live disk when a request goes past
    // the run's end, and its block status then shows the live disk: each case below broke.
    for (const format of ["qcow2", "raw"] as const) {
      const size = 48 * MiB; // block status is asked 32 MiB at a time: ask after the writes too
      const vm = await startVm([{ id: "vda", size, format, data: diskContent(size, 5) }]);
      try {
        const snapshot = vm.model.get("vda")!.slice();
        using qmp = await QmpClient.connect(vm.toolQmp);
        const { startPullBackup } = await import("../lib/live/pull_backup.ts");
        const backup = await startPullBackup({ qmp });
        const reader = backup.records.getReader();
        const records: VmaRecord[] = [(await reader.read()).value!]; // the device record
        // diskContent: data in [0, 1 MiB), [4, 5) ..., the same byte in [8, 9), zeros between.
        await vm.writeZeroes("vda", 0, 65536); // a data cluster zeroed: block status says hole
        await vm.discard("vda", 4 * MiB + 65536, 65536); // discarded, inside a data run
        await vm.writeZeroes("vda", 4 * MiB + 4 * 65536, 4 * 65536, true); // a run of four
        await vm.write("vda", 2 * MiB, 65536, 0x42); // a zero cluster gets data
        await vm.write("vda", 8 * MiB + 3 * 65536, 65536, 0x43); // a data cluster rewritten
        await vm.discard("vda", 16 * MiB + 10 * 65536, 2 * 65536);
        await vm.writeZeroes("vda", 36 * MiB + 65536, 65536);
        await vm.discard("vda", 40 * MiB, 3 * 65536);
        await vm.write("vda", 44 * MiB + 65536, 4096, 0x44); // 44 MiB holds 0x5d bytes
        await vm.writeZeroes("vda", 44 * MiB + 2 * 65536, 65536);
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          records.push(value);
        }
        await backup.finished;
        const archive = await new Response(
          ReadableStream.from(records).pipeThrough(new ZeroFilterStream())
            .pipeThrough(new VmaWriterStream()),
        ).bytes();
        const restored = (await restoreInMemory(archive)).get("drive-vda")!;
        assert.equal(firstDifference(restored, snapshot), -1, `${format}: the snapshot`);
      } finally {
        await vm.stop().catch(() => {});
      }
    }
  },
);

/**
 * VMs with the devices and graphs qemu-server gives them, with virtio-scsi in an iothread
 * (iothread=1) where QEMU 7.2 can back them up in that mode.
 */
const PROXMOX_VMS = {
  // qemu-server 8: -drive if=none,id=drive-scsi0 (nodes named #blockNNN by QEMU), scsi-hd on
  // virtio-scsi, the EFI vars as -drive if=pflash,unit=1,id=drive-efidisk0.
  "-drive": {
    disks: (size: number): DiskSpec[] => [
      { id: "scsi0", bus: "scsi", attach: "drive", size, data: diskContent(size, 21) },
      { id: "efidisk0", bus: "pflash", attach: "drive", format: "raw", size: EFI_VARS_SIZE },
    ],
    iothread: { push: true, pull: true },
  },
  // qemu-server 9: -blockdev graphs with a throttle filter named drive-<id> on top of format
  // and file nodes named #blockNNN, the EFI vars flash as -machine pflash1=drive-efidisk0.
  // Pull mode refuses a throttle filter in an iothread (see the test after this loop).
  "-blockdev with throttle filters": {
    disks: (size: number): DiskSpec[] => [
      { id: "scsi0", bus: "scsi", throttle: true, size, data: diskContent(size, 22) },
      { id: "efidisk0", bus: "pflash", throttle: true, format: "raw", size: EFI_VARS_SIZE },
    ],
    iothread: { push: true, pull: false },
  },
};
/** Proxmox's 4 MiB OVMF variable store: 528 KiB, not a multiple of 64 KiB. */
const EFI_VARS_SIZE = 540672;

for (const [style, layout] of Object.entries(PROXMOX_VMS)) {
  for (const mode of ["push", "pull"] as const) {
    const iothread = layout.iothread[mode];
    const name = `${style}${iothread ? ", iothread" : ""}`;
    qemuTest(`live ${mode} backup of a VM started as Proxmox does (${name})`, async () => {
      const disks = layout.disks(32 * MiB);
      const vm = await startVm(disks, { iothread });
      let backup: LiveBackup | undefined;
      try {
        const before = await vm.nodes();
        assert.ok(before.some((node) => node.startsWith("#block")), before.join(" "));
        await vm.write("efidisk0", 4096, 8192, 0x0e);
        const snapshot = new Map(
          [...vm.model].map(([id, bytes]) => [`drive-${id}`, bytes.slice()]),
        );
        using qmp = await QmpClient.connect(vm.toolQmp);
        backup = await start(mode, vm, qmp);
        assert.deepEqual(backup.drives.map((drive) => drive.name).sort(), [
          "drive-efidisk0",
          "drive-scsi0",
        ]);
        let running = true;
        const ids = ["scsi0", "scsi0", "efidisk0"];
        const writes = backup.snapshot.then(() => guestWrites(vm, 150, 13, () => running, ids));
        writes.catch(() => {});
        const archive = await new Response(
          backup.records.pipeThrough(slowTarget()).pipeThrough(new ZeroFilterStream())
            .pipeThrough(new VmaWriterStream()),
        ).bytes();
        await backup.finished;
        running = false;
        assert.ok(await writes >= 20, "guest writes landed during the backup");
        const restored = await restoreInMemory(archive);
        assert.deepEqual([...restored.keys()].sort(), [...snapshot.keys()].sort());
        for (const [name, expected] of snapshot) {
          assert.equal(firstDifference(restored.get(name)!, expected), -1, `${name}`);
        }
        assert.deepEqual(await vm.nodes(), before, "the block graph is as before");
        assert.equal(await vm.status(), "running");
        const contents = await vm.stop();
        for (const [id, bytes] of contents) {
          assert.equal(vm.difference(id, bytes), -1, `every guest write landed on ${id}`);
        }
      } finally {
        await backup?.abort().catch(() => {});
        await vm.stop().catch(() => {});
      }
    });
  }
}

qemuTest(
  "live pull backup: a throttle filter in an iothread is refused before the VM is touched",
  async () => {
    // QEMU 7.2 aborts (qemu_mutex_unlock_impl: Operation not permitted) in 3 to 7 of 8
    // blockdev-adds of a copy-before-write filter into such a graph: the VM would die.
    const vm = await startVm(PROXMOX_VMS["-blockdev with throttle filters"].disks(8 * MiB), {
      iothread: true,
    });
    try {
      const before = await vm.nodes();
      using qmp = await QmpClient.connect(vm.toolQmp);
      const { startPullBackup } = await import("../lib/live/pull_backup.ts");
      await assert.rejects(
        startPullBackup({ qmp, drives: ["scsi0"] }),
        /drive-scsi0" in pull mode \(nothing was changed\): It is a throttle filter in an iothread.*use --mode push/,
      );
      await assert.rejects(
        vm.qmp.waitForEvent((event) => event.event === "STOP", { timeoutMs: 1 }),
        Deno.errors.TimedOut,
      );
      assert.deepEqual(await vm.nodes(), before);
      assert.equal(await vm.status(), "running");
    } finally {
      await vm.stop().catch(() => {});
    }
  },
);

/** A slow archive target: 4 ms per data cluster, so guest writes land during the backup. */
/**
 * A sink's pace: 4 ms a cluster, and up to 40 ms while `enough` says the guest has not
 * written enough yet (a busy machine's TCG guest writes slowly; a guest write that waits for
 * its copy-before-write still gets through, one cluster at a time).
 */
function slowTarget(enough: () => boolean = () => true) {
  return new TransformStream<VmaRecord, VmaRecord>({
    async transform(record, controller) {
      if (record.type === "cluster") {
        for (let waited = 0; waited < 40 && (waited < 4 || !enough()); waited += 4) {
          await new Promise((resolve) => setTimeout(resolve, 4));
        }
      }
      controller.enqueue(record);
    },
  });
}

/** The graph is as before, the VM runs, and the disks still take writes. */
async function checkRestored(vm: TestVm, before: string[]) {
  assert.deepEqual(await vm.nodes(), before, "the block graph is as before");
  assert.equal(await vm.status(), "running");
  await vm.write("vda", 4096, 8192, 0xee);
  const disks = await vm.stop();
  for (const [id, bytes] of disks) assert.equal(vm.difference(id, bytes), -1, `${id} is intact`);
}
