#!/usr/bin/env python3
"""Regenerates the real QEMU 7.2 + swtpm 0.7.1 migration-stream fixtures beside this file.

For each machine (pc, q35): start swtpm on a fresh absolute state dir, start QEMU with the halt
firmware, 16 MiB of RAM, a tpm-tis on a tpm-emulator backend, qtest on stdio and QMP on a unix
socket; drive the TIS through qtest (locality 0: requestUse, commandReady, TPM2_Startup(CLEAR),
TPM2_PCR_Extend(16, sha256("qtest-probe")), each response read to its end, then commandReady);
then QMP `migrate` to `exec:cat > FILE` and wait for `completed`.

Usage: make-fixtures.py [OUTDIR]   (default: the directory of this script)
The exact command lines are printed and recorded in README.md.
"""
import json, os, shutil, socket, subprocess, sys, tempfile, time

OUT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(__file__))
BASE = 0xFED40000
STARTUP = bytes.fromhex("80010000000c000001440000")
PCR_EXTEND_16 = bytes.fromhex(
    "80020000004100000182000000100000000940000009000000000000000001000b"
    "07dc469d845e32ba45abb5d87ad760a8cbde13c8dfc7196d19d8d8bb497a5ab2")


class QTest:
    def __init__(self, proc):
        self.p = proc

    def cmd(self, line):
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()
        while True:
            r = self.p.stdout.readline().decode().strip()
            if not r:
                raise RuntimeError("qtest closed")
            if r.startswith("OK") or r.startswith("ERR") or r.startswith("FAIL"):
                if not r.startswith("OK"):
                    raise RuntimeError(f"{line}: {r}")
                return r
            # IRQ or other asynchronous lines are ignored

    def readb(self, a):
        return int(self.cmd(f"readb 0x{a:x}").split()[1], 16)

    def readl(self, a):
        return int(self.cmd(f"readl 0x{a:x}").split()[1], 16)

    def writeb(self, a, v):
        self.cmd(f"writeb 0x{a:x} 0x{v:x}")


def transact(qt, command):
    sts = BASE + 0x18
    fifo = BASE + 0x24
    qt.writeb(sts, 0x40)                     # commandReady
    for b in command:
        qt.writeb(fifo, b)
    qt.writeb(sts, 0x20)                     # tpmGo
    for _ in range(2000):
        if qt.readl(sts) & 0x10:             # dataAvail
            break
        time.sleep(0.001)
    else:
        raise RuntimeError("no response")
    rsp = bytes(qt.readb(fifo) for _ in range(10))
    size = int.from_bytes(rsp[2:6], "big")
    rsp += bytes(qt.readb(fifo) for _ in range(size - 10))
    return rsp


def qmp(path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.02)
    f = s.makefile("rwb")
    f.readline()

    def call(execute, arguments=None):
        msg = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        f.write(json.dumps(msg).encode() + b"\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r
    return call


def make(machine, out):
    w = tempfile.mkdtemp(prefix=f"vmfix-{machine}-")
    halt = bytearray(b"\xf4" * 65536)
    halt[0xFFF0:0xFFF4] = bytes([0xFA, 0xF4, 0xEB, 0xFD])
    open(f"{w}/halt.bin", "wb").write(halt)
    os.mkdir(f"{w}/tpm")
    swtpm = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={w}/tpm",
             "--ctrl", f"type=unixio,path={w}/tpm/ctrl.sock", "--log", f"level=1,file={w}/tpm/log"]
    qemu = ["qemu-system-x86_64", "-machine", machine, "-accel", "tcg", "-m", "16",
            "-nodefaults", "-display", "none", "-bios", f"{w}/halt.bin",
            "-chardev", f"socket,id=chrtpm,path={w}/tpm/ctrl.sock",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0",
            "-qtest", "stdio", "-qtest-log", "/dev/null", "-qmp", f"unix:{w}/qmp.sock,server=on,wait=off"]
    print(" ".join(swtpm))
    print(" ".join(qemu))
    sw = subprocess.Popen(swtpm)
    for _ in range(200):
        if os.path.exists(f"{w}/tpm/ctrl.sock"):
            break
        time.sleep(0.01)
    q = subprocess.Popen(qemu, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        qt = QTest(q)
        qt.writeb(BASE + 0x00, 0x02)         # ACCESS.requestUse, locality 0
        r1 = transact(qt, STARTUP)
        r2 = transact(qt, PCR_EXTEND_16)
        qt.writeb(BASE + 0x18, 0x40)         # commandReady: READY, as the runs doc shows
        print("startup", r1.hex(), "pcr_extend", r2.hex())
        call = qmp(f"{w}/qmp.sock")
        call("qmp_capabilities")
        call("migrate", {"uri": f"exec:cat > {out}"})
        for _ in range(500):
            st = call("query-migrate")["return"].get("status")
            if st in ("completed", "failed"):
                break
            time.sleep(0.02)
        print("migrate", st, os.path.getsize(out), "bytes ->", out)
        call("quit")
    finally:
        q.wait(timeout=10) if q.poll() is not None else (q.kill(), q.wait())
        sw.wait(timeout=10) if sw.poll() is not None else (sw.terminate(), sw.wait())
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    make("pc", f"{OUT}/pc-tis.bin")
    make("q35", f"{OUT}/q35-tis.bin")
