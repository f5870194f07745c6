#!/usr/bin/python3
"""Kernel TLS relay versus userspace relay: what the gateway's worker does
per relayed byte.

Inside the kernel-TLS guest (tests/vm/run), 100 MiB go through one mailgw
worker, once with [offload] mode = auto (kernel TLS, splice relay) and once
with mode = userspace (OpenSSL SSL_read/SSL_write and a userspace copy),
each way: upload (client -> backend) and download (backend -> client).
The client is Python's ssl module (TLS 1.3, TLS_AES_128_GCM_SHA256); the
backend is a stub that greets like an IMAP server and then sinks the upload
and hashes it, or sources the download.

Each transfer runs twice. The timed run samples the worker's /proc/PID/io
(rchar, wchar, syscr, syscw) and its CPU time (utime + stime from
/proc/PID/stat) before and after, with the wall time of the transfer. The
traced run repeats it under `strace -C -f -p WORKER`: the per-syscall counts
come from strace's summary and the bytes from the return values of the
read/write-style calls. /proc/PID/io counts only read(2), write(2), readv(2)
and writev(2) (the VFS paths): send(2)/recv(2)/sendmsg(2)/recvmsg(2) and
splice(2) do not show up there, so the strace bytes are the complete ones.

Timings under qemu's TCG emulation are emulated-CPU timings: compare ratios
between the two modes, not absolute values. Every run checks the data with
SHA-256 (the stub hashes what it sank; the client hashes what it fetched).

Prints a table and one machine-readable line per run:

    BENCH mode=ktls dir=upload bytes=104857600 rw_bytes_per_byte=... ...

    tests/vm/run /usr/bin/python3 tests/vm/ktls_bench.py
    KTLS_BENCH_MIB=20 KTLS_BENCH_STRACE=0 tests/vm/run ... (smaller, untraced)
"""

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import mailstack  # noqa: E402
from mailstack import GATEWAY_NAME, Stack, listener  # noqa: E402
from test_ktls import no_ktls_reason, set_tls13_suites, tls_stat  # noqa: E402

MIB = 1024 * 1024
SIZE = int(os.environ.get("KTLS_BENCH_MIB", "100")) * MIB
USE_STRACE = os.environ.get("KTLS_BENCH_STRACE", "1") != "0"
SUITE = "TLS_AES_128_GCM_SHA256"
NAME = "ktls bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# read/write-style calls: their return value is the number of bytes that
# crossed between the process's buffers and the kernel
RW_CALLS = ("read", "write", "readv", "writev", "pread64", "pwrite64", "recvfrom",
            "sendto", "recvmsg", "sendmsg", "recvmmsg", "sendmmsg")


def say(text=""):
    print(text)
    sys.stdout.flush()


# --------------------------------------------------------------------------
# payload and the backend stub

def make_block():
    return random.Random(20240501).randbytes(MIB)


def expected_digest(block, size):
    h = hashlib.sha256()
    full, rest = divmod(size, len(block))
    for _ in range(full):
        h.update(block)
    h.update(block[:rest])
    return h.hexdigest()


def stub_serve(lsock, block):
    """The backend, in a child process: one connection at a time.
    Greets like IMAP; `t UPLOAD n` sinks n bytes and answers with their
    SHA-256; `t DOWNLOAD n` sends n bytes of the block pattern and then a
    tagged OK."""
    mv = memoryview(block)
    while True:
        conn, _ = lsock.accept()
        try:
            conn.sendall(b"* OK bench stub ready\r\n")
            buf = b""
            while b"\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    raise EOFError
                buf += chunk
            line, _, rest = buf.partition(b"\n")
            tag, verb, n = line.decode().split()
            n = int(n)
            if verb == "UPLOAD":
                h = hashlib.sha256(rest)
                got = len(rest)
                rbuf = bytearray(1 << 20)
                while got < n:
                    k = conn.recv_into(rbuf, min(len(rbuf), n - got))
                    if not k:
                        break
                    h.update(memoryview(rbuf)[:k])
                    got += k
                conn.sendall(("%s OK got=%d sha256=%s\r\n" % (tag, got, h.hexdigest())).encode())
            else:
                left = n
                while left:
                    k = min(left, len(mv))
                    conn.sendall(mv[:k])
                    left -= k
                conn.sendall(("%s OK sent=%d\r\n" % (tag, n)).encode())
            # wait for the client to go
            while conn.recv(65536):
                pass
        except (OSError, EOFError, ValueError):
            pass
        finally:
            conn.close()


def start_stub(block):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    addr = lsock.getsockname()
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            stub_serve(lsock, block)
        finally:
            os._exit(0)
    lsock.close()

    def stop():
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    mailstack.on_cleanup(stop)
    return addr, stop


# --------------------------------------------------------------------------
# the worker process

def worker_pid(master):
    """The master's only child: the worker (workers = 1)."""
    deadline = time.monotonic() + 10
    while True:
        kids = []
        try:
            with open("/proc/%d/task/%d/children" % (master, master)) as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            r = subprocess.run(["pgrep", "-P", str(master)], stdout=subprocess.PIPE, text=True)
            kids = [int(x) for x in r.stdout.split()]
        if len(kids) == 1:
            return kids[0]
        if time.monotonic() > deadline:
            raise RuntimeError("master %d has children %s, want one worker" % (master, kids))
        time.sleep(0.1)


def proc_sample(pid):
    io = {}
    with open("/proc/%d/io" % pid) as f:
        for line in f:
            k, v = line.split(":")
            io[k.strip()] = int(v)
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    io["cpu_s"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return io


# --------------------------------------------------------------------------
# the client

class Client:
    def __init__(self, addr, ctx):
        raw = socket.create_connection(addr, timeout=600)
        self.s = ctx.wrap_socket(raw, server_hostname=GATEWAY_NAME)
        self.buf = b""
        check_version(self.s)

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("connection closed while waiting for a line")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("latin-1").rstrip("\r")

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def check_version(s):
    if s.version() != "TLSv1.3" or s.cipher()[0] != SUITE:
        raise RuntimeError("negotiated %s %s, want TLSv1.3 %s"
                           % (s.version(), s.cipher()[0], SUITE))


def upload(c, block, size):
    c.s.sendall(b"u UPLOAD %d\r\n" % size)
    left = size
    mv = memoryview(block)
    while left:
        k = min(left, len(mv))
        c.s.sendall(mv[:k])
        left -= k
    reply = c.line()
    m = re.match(r"u OK got=(\d+) sha256=([0-9a-f]+)$", reply)
    if not m:
        raise RuntimeError("upload: stub replied %r" % reply)
    return int(m.group(1)), m.group(2)


def download(c, size):
    c.s.sendall(b"d DOWNLOAD %d\r\n" % size)
    h = hashlib.sha256()
    got = 0
    pre = c.buf[:size]
    c.buf = c.buf[len(pre):]
    h.update(pre)
    got += len(pre)
    rbuf = bytearray(1 << 20)
    while got < size:
        k = c.s.recv_into(rbuf, min(len(rbuf), size - got))
        if not k:
            break
        h.update(memoryview(rbuf)[:k])
        got += k
    reply = c.line()
    if not re.match(r"d OK sent=\d+$", reply):
        raise RuntimeError("download: stub replied %r" % reply)
    return got, h.hexdigest()


# --------------------------------------------------------------------------
# strace

def start_strace(pid, path):
    p = subprocess.Popen(["strace", "-C", "-f", "-qq", "-s", "0", "-o", path, "-p", str(pid)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # strace reports nothing when attached; wait for its first line (the
    # worker sits in epoll_wait, which strace shows as unfinished at once)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError("strace exited: %s" % p.stderr.read().decode()[-300:])
        if os.path.exists(path) and os.path.getsize(path) > 0:
            break
        time.sleep(0.1)
    time.sleep(0.3)
    return p


CALL_RX = re.compile(r"^(?:\d+ +)?(?:<\.\.\. )?(\w+)(?:\(| resumed>).*\)\s+= (-?\d+)")
SUMMARY_RX = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def stop_strace(p, path):
    p.send_signal(signal.SIGINT)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    counts, rw_bytes, splice_bytes = {}, {}, 0
    in_summary = False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("% time"):
                in_summary = True
                continue
            if in_summary:
                m = SUMMARY_RX.match(line)
                if m and m.group(3) != "total":
                    counts[m.group(3)] = int(m.group(1))
                continue
            m = CALL_RX.match(line)
            if not m:
                continue
            name, ret = m.group(1), int(m.group(2))
            if ret <= 0:
                continue
            if name in RW_CALLS:
                rw_bytes[name] = rw_bytes.get(name, 0) + ret
            elif name == "splice":
                splice_bytes += ret
    return counts, rw_bytes, splice_bytes


# --------------------------------------------------------------------------
# one run

def client_ctx(certs):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs.bundle)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    set_tls13_suites(ctx, SUITE)
    return ctx


def one_run(gw, mode, direction, ctx, block, digest, traced, tmpdir):
    wpid = worker_pid(gw.proc.pid)
    off = len(gw.log())
    ts0 = tls_stat()
    trace = None
    tpath = os.path.join(tmpdir, "strace-%s-%s.txt" % (mode, direction))
    if traced:
        trace = start_strace(wpid, tpath)
    p0 = proc_sample(wpid)
    t0 = time.monotonic()
    c = Client(gw.addr("bench"), ctx)
    try:
        greet = c.line()
        if not greet.startswith("* OK"):
            raise RuntimeError("greeting %r" % greet)
        if direction == "upload":
            got, h = upload(c, block, SIZE)
        else:
            got, h = download(c, SIZE)
    finally:
        c.close()
    wall = time.monotonic() - t0
    # the session's close line: the worker is done with it
    line = gw.wait_log(r" close \(", 60, off)
    p1 = proc_sample(wpid)
    result = {"mode": mode, "dir": direction, "bytes": SIZE, "wall_s": wall,
              "cpu_s": p1["cpu_s"] - p0["cpu_s"], "traced": traced}
    for k in ("rchar", "wchar", "syscr", "syscw"):
        result[k] = p1[k] - p0[k]
    if trace is not None:
        counts, rw_bytes, splice_bytes = stop_strace(trace, tpath)
        result.update(counts=counts, rw_bytes=rw_bytes, splice_bytes=splice_bytes)
    ts1 = tls_stat()
    est = [l for l in gw.log()[off:].splitlines() if "TLS established" in l]
    result["engine"] = re.search(r"engine=\S+ tx=\S+ rx=\S+", est[0]).group(0) if est else "?"
    result["tls_stat"] = "TlsTxSw %+d TlsRxSw %+d" % (
        ts1.get("TlsTxSw", 0) - ts0.get("TlsTxSw", 0), ts1.get("TlsRxSw", 0) - ts0.get("TlsRxSw", 0))
    result["ok"] = got == SIZE and h == digest
    result["integrity"] = "sha256 ok" if result["ok"] else (
        "MISMATCH: %d of %d bytes, sha256 %s, want %s" % (got, SIZE, h, digest))
    if line is None:
        result["ok"] = False
        result["integrity"] += "; no close line in the gateway log"
    return result


def bench_line(r):
    """rw_bytes_per_byte and syscalls come from strace when the run was
    traced (they see every call), else from /proc/PID/io."""
    proc_rw = (r["rchar"] + r["wchar"]) / r["bytes"]
    t = r.get("trace")
    if t:
        rw, nsys, src = sum(t["rw_bytes"].values()) / r["bytes"], sum(t["counts"].values()), "strace"
    else:
        rw, nsys, src = proc_rw, r["syscr"] + r["syscw"], "proc"
    out = ("BENCH mode=%s dir=%s bytes=%d rw_bytes_per_byte=%.4f syscalls=%d cpu_s=%.2f "
           "wall_s=%.2f source=%s proc_rw_bytes_per_byte=%.4f proc_rchar=%d proc_wchar=%d "
           "proc_syscr=%d proc_syscw=%d"
           % (r["mode"], r["dir"], r["bytes"], rw, nsys, r["cpu_s"], r["wall_s"], src, proc_rw,
              r["rchar"], r["wchar"], r["syscr"], r["syscw"]))
    if t:
        out += (" splice_bytes_per_byte=%.4f splice_calls=%d strace_cpu_s=%.2f strace_wall_s=%.2f"
                % (t["splice_bytes"] / r["bytes"], t["counts"].get("splice", 0), t["cpu_s"],
                   t["wall_s"]))
    out += " ok=%d" % r["ok"]
    return out


def top_calls(counts, n=6):
    return ", ".join("%s %d" % (k, v) for k, v in
                     sorted(counts.items(), key=lambda kv: -kv[1])[:n])


def main():
    why = no_ktls_reason()
    if why:
        say("SKIP: %s: %s" % (NAME, why))
        return 0
    traced = USE_STRACE and shutil.which("strace") is not None
    if USE_STRACE and not traced:
        say("note: strace not installed; syscall counts from /proc/PID/io only")
    block = make_block()
    t0 = time.monotonic()
    digest = expected_digest(block, SIZE)
    say("%s: %d MiB per run, TLS 1.3 %s, workers = 1; payload sha256 %s... (%.1f s to hash)"
        % (NAME, SIZE // MIB, SUITE, digest[:16], time.monotonic() - t0))
    say("kernel %s; timings are qemu TCG emulated-CPU timings: compare ratios only"
        % os.uname().release)

    st = Stack("ktls-bench")
    backend, stop_stub = start_stub(block)
    ctx = client_ctx(st.certs)
    results = []
    for mode, req in (("ktls", "auto"), ("userspace", "userspace")):
        gw = st.gateway([listener("bench", "imap", "implicit", backend, hostname=GATEWAY_NAME)],
                        offload={"mode": req}, global_opts={"workers": 1}).start()
        try:
            for direction in ("upload", "download"):
                r = one_run(gw, mode, direction, ctx, block, digest, False, st.dir)
                if traced:
                    tr = one_run(gw, mode, direction, ctx, block, digest, True, st.dir)
                    r["trace"] = tr
                    r["ok"] = r["ok"] and tr["ok"]
                    if not tr["ok"]:
                        r["integrity"] += "; traced run: " + tr["integrity"]
                results.append(r)
                say(bench_line(r))
        finally:
            gw.stop()
    stop_stub()

    say()
    say("%-9s %-8s %-28s %8s %7s %12s %12s %8s %8s %10s %10s %9s"
        % ("mode", "dir", "engine (gateway log)", "wall_s", "cpu_s", "proc rw B/B",
           "strace rw B/B", "splice", "syscalls", "syscalls/MiB", "strace cpu", "integrity"))
    for r in results:
        t = r.get("trace")
        srw = "%.4f" % (sum(t["rw_bytes"].values()) / r["bytes"]) if t else "-"
        spl = "%.4f" % (t["splice_bytes"] / r["bytes"]) if t else "-"
        nsys = sum(t["counts"].values()) if t else r["syscr"] + r["syscw"]
        say("%-9s %-8s %-28s %8.2f %7.2f %12.4f %12s %8s %8d %10.1f %10s %9s"
            % (r["mode"], r["dir"], r["engine"], r["wall_s"], r["cpu_s"],
               (r["rchar"] + r["wchar"]) / r["bytes"], srw, spl, nsys,
               nsys / (r["bytes"] / MIB), "%.2f" % t["cpu_s"] if t else "-",
               "ok" if r["ok"] else "BAD"))
    say()
    for r in results:
        t = r.get("trace")
        say("%s %s: /proc io rchar=%d wchar=%d syscr=%d syscw=%d; tls_stat %s; %s"
            % (r["mode"], r["dir"], r["rchar"], r["wchar"], r["syscr"], r["syscw"],
               r["tls_stat"], r["integrity"]))
        if t:
            say("    strace: bytes by call: %s; splice %d; top calls: %s"
                % (", ".join("%s %d" % kv for kv in sorted(t["rw_bytes"].items())) or "none",
                   t["splice_bytes"], top_calls(t["counts"])))
    say()
    say("rw B/B: bytes that crossed read/write-style syscalls (between the worker's buffers "
        "and the kernel) per relayed byte. /proc/PID/io sees read/write/readv/writev only; "
        "strace also sees send/recv/sendmsg/recvmsg. splice: bytes moved by splice(2) "
        "(kernel to kernel, never in userspace). cpu_s, wall_s: untraced run; strace cpu: "
        "the worker's CPU time in the traced run.")
    bad = [r for r in results if not r["ok"]]
    if bad:
        say("FAIL: %s: %s" % (NAME, "; ".join("%s %s: %s" % (r["mode"], r["dir"], r["integrity"])
                                            for r in bad)))
        return 1
    say("PASS: %s" % NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
