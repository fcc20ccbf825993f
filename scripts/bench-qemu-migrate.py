#!/usr/bin/env python3
"""QEMU's pre-copy migration of the very guest ferry-bench-migrate moves, on this machine.

The fast-writer scenario of ferry-bench-migrate (a 1 GiB guest rewriting and verifying
96 MiB at full speed, 1 vCPU), run by two QEMU processes over loopback TCP instead of two
ferries: QEMU boots the test guest's PVH entry from the same ELF. It prints QEMU's total
time and downtime (as QEMU reports them), rounds (dirty-sync count), bytes sent, and the
guest's pace during the migration against before it: passes per second, counted from the
guest's own console as ferry-bench-migrate counts them. QEMU tracks dirty pages with
KVM's dirty log, so this is the anchor of issue #11's "guest during migration" target,
measured here rather than assumed.

    FERRY_GUEST=$(scripts/build-guest.sh) scripts/bench-qemu-migrate.py [--runs 3]
        [--downtime-ms 50] [--size 96M] [--mem 1024]
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PASS = re.compile(rb"pass (\d+) ok")


class Console:
    """A QEMU's serial output (its stdout), each `pass N ok` line timestamped."""

    def __init__(self, proc):
        self.passes = []  # (time, N)
        self.text = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, out):
        line = b""
        while True:
            chunk = out.read1(4096)
            if not chunk:
                return
            now = time.monotonic()
            line += chunk
            while b"\n" in line:
                one, line = line.split(b"\n", 1)
                with self.lock:
                    self.text += one + b"\n"
                    m = PASS.search(one)
                    if m:
                        self.passes.append((now, int(m.group(1))))
                    if b"corrupt" in one:
                        print("guest: " + one.decode(errors="replace"), file=sys.stderr)

    def last_pass(self):
        with self.lock:
            return self.passes[-1][1] if self.passes else 0

    def wait_for(self, needle, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if needle in self.text:
                    return
            time.sleep(0.01)
        raise SystemExit(f"the guest never printed {needle!r}:\n{self.text.decode(errors='replace')}")


class Qmp:
    def __init__(self, path):
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.file = self.sock.makefile("rwb")
        self.file.readline()  # greeting
        self.call("qmp_capabilities")

    def call(self, command, **args):
        self.file.write(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise SystemExit(f"QMP {command}: {reply['error']}")
            return reply["return"]


def qemu(guest, mem, size, qmp, incoming=None):
    args = [
        "qemu-system-x86_64", "-machine", "q35,accel=kvm", "-cpu", "qemu64",
        "-m", str(mem), "-smp", "1", "-nographic", "-no-reboot", "-monitor", "none",
        "-display", "none", "-serial", "stdio", "-nodefaults",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-kernel", guest, "-append", f"console=ttyS0 workload=verify start=16M size={size}",
    ]
    if incoming:
        args += ["-incoming", incoming]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def once(guest, mem, size, downtime_ms):
    tmp = tempfile.mkdtemp(prefix="ferry-qemu-mig-")
    port = free_port()
    src = qemu(guest, mem, size, f"{tmp}/src.qmp")
    dst = qemu(guest, mem, size, f"{tmp}/dst.qmp", incoming=f"tcp:127.0.0.1:{port}")
    try:
        con_src, con_dst = Console(src), Console(dst)
        qsrc = Qmp(f"{tmp}/src.qmp")
        con_src.wait_for(b"pass 2 ok", 60)
        time.sleep(0.3)
        p0 = con_src.last_pass()
        time.sleep(1.0)
        before = con_src.last_pass() - p0
        # As ferry's defaults: no bandwidth cap, the same downtime limit.
        qsrc.call("migrate-set-parameters", **{"max-bandwidth": 1 << 40,
                                                "downtime-limit": downtime_ms})
        p0 = con_src.last_pass()
        start = time.monotonic()
        qsrc.call("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = qsrc.call("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise SystemExit(f"QEMU's migration {status}: {info}")
            if time.monotonic() - start > 120:
                raise SystemExit("QEMU's migration took over 120 s")
            time.sleep(0.001)
        elapsed = time.monotonic() - start
        # The destination runs the guest once QEMU has completed; its pass numbers
        # carry on from the source's.
        deadline = time.monotonic() + 10
        while con_dst.last_pass() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        during = max(con_src.last_pass(), con_dst.last_pass()) - p0
        ram = info.get("ram", {})
        total_ms = info.get("total-time", elapsed * 1e3)
        return {
            "total_ms": total_ms,
            "downtime_ms": info.get("downtime", float("nan")),
            "rounds": ram.get("dirty-sync-count", 0),
            "mib": ram.get("transferred", 0) / (1 << 20),
            "mib_s": ram.get("mbps", 0.0) / 8 * 1e6 / (1 << 20),
            "guest": during / (total_ms / 1e3) / max(before, 1),
            "before": before,
            "during": during,
        }
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--downtime-ms", type=int, default=50)
    ap.add_argument("--size", default="96M")
    ap.add_argument("--mem", type=int, default=1024)
    a = ap.parse_args()
    guest = os.environ.get("FERRY_GUEST")
    if not guest:
        raise SystemExit("set FERRY_GUEST=$(scripts/build-guest.sh)")
    runs = []
    for i in range(a.runs):
        r = once(guest, a.mem, a.size, a.downtime_ms)
        runs.append(r)
        print(f"run {i + 1}: total {r['total_ms']:.0f} ms, downtime {r['downtime_ms']:.0f} ms, "
              f"{r['rounds']} syncs, {r['mib']:.1f} MiB at {r['mib_s']:.0f} MiB/s, guest "
              f"{r['guest']:.3f} ({r['during']} passes during, {r['before']} in the second before)")
    med = {k: statistics.median(r[k] for r in runs) for k in ("total_ms", "downtime_ms", "guest", "mib_s")}
    print(f"QEMU {a.mem} MiB guest rewriting {a.size}, downtime limit {a.downtime_ms} ms, median of "
          f"{len(runs)}: total {med['total_ms']:.0f} ms, downtime {med['downtime_ms']:.0f} ms, "
          f"{med['mib_s']:.0f} MiB/s, guest {med['guest']:.3f} of its pace before")


if __name__ == "__main__":
    main()
