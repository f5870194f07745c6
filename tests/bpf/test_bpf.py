#!/usr/bin/python3
"""tests/bpf/test_bpf.py - the mail-port classifier (bpf/) against real traffic.

Two network namespaces (client, server) joined by a veth pair; the
classifier is attached with `build/bpf/bpfctl attach` on the server-side
veth (tc ingress and egress); small STARTTLS/implicit-TLS servers written
here run in the server namespace, Python's smtplib/imaplib/poplib and raw
sockets in the client namespace, with real TLS (a throw-away certificate).
Counters are read with `bpfctl dump`.  Every case uses its own server port,
so each one reads only its own counters.

Runs as root on the host and inside the Debian 6.1 guest:
    /usr/bin/python3 tests/bpf/test_bpf.py
    tests/vm/run /usr/bin/python3 tests/bpf/test_bpf.py

Prints PASS/FAIL/SKIP lines, then INFO lines (cost per packet, what the
loss case saw), exits 1 on a failure; diagnostics go to stderr.
Environment: MAILGW_BPF_BULK_MB, the bulk transfer each way in MiB (default
40: 80 MiB in all); MAILGW_BPF_CASES, case names to run (default all).
"""

import ctypes
import json
import os
import re
import shutil
import signal
import smtplib
import imaplib
import poplib
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BPFCTL = os.path.join(TOP, "build", "bpf", "bpfctl")
PID = os.getpid()
NS_C = "mgwbpf-c-%d" % PID
NS_S = "mgwbpf-s-%d" % PID
VETH_C = "mbc%d" % PID
VETH_S = "mbs%d" % PID
C4, S4 = "10.213.0.1", "10.213.0.2"
C6, S6 = "fd00:213::1", "fd00:213::2"
PIN = "/sys/fs/bpf/mailgw-test-%d" % PID
HOST = "mail.test"
TIMEOUT = 30.0
BULK_MB = int(os.environ.get("MAILGW_BPF_BULK_MB", "40"))  # each way: >= 50 MB in all

# Ports (beyond the standard seven) and what each case uses.
EXTRA_PORTS = {
    10025: "smtp",  # pipelined command after STARTTLS
    10026: "smtp",  # STARTTLS split over two segments, then TLS
    10027: "smtp",  # STARTTLS split over two segments, then plaintext
    10028: "smtp",  # server plaintext right after its 220
    10029: "smtp",  # bulk TLS
    10030: "smtp",  # bulk TLS under packet loss
    10031: "smtp",  # IPv6 STARTTLS
    10032: "smtp",  # IPv6 pipelined command after STARTTLS
    10033: "smtp",  # offload-marked flow sends plaintext
    10034: "smtp",  # the same, not marked (control)
    10035: "smtp",  # cost measurement, GSO/GRO skbs
    10036: "smtp",  # cost measurement, MTU-sized skbs
    10037: "smtps", # cost measurement, BPF_PROG_TEST_RUN
    10038: "smtp",  # IPv6 offload-marked flow sends plaintext
    10039: "smtp",  # NOOP and STARTTLS pipelined in one segment
    10040: "imap",  # untagged line ahead of the tagged OK
}

CLASSES = ["tls", "plaintext"]
KINDS = ["starttls_upgraded", "plaintext_only", "implicit_tls"]
REASONS = ["plaintext_after_starttls_to_server", "plaintext_after_upgrade_to_client",
           "plaintext_on_implicit_port"]
FAMILIES = {"packets": CLASSES, "bytes": CLASSES, "flows": KINDS, "violations": REASONS,
            "violation_bytes": REASONS, "untracked": ["to_server", "to_client"]}


class Skip(Exception):
    pass


def note(msg):
    sys.stderr.write(msg.rstrip("\n") + "\n")
    sys.stderr.flush()


def run(cmd, check=True, timeout=60, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError("%s: status %d: %s" % (" ".join(cmd), p.returncode,
                                                   (p.stderr or p.stdout).strip()[-400:]))
    return p


def in_ns_cmd(ns, cmd):
    """cmd in network namespace ns, keeping this mount namespace (and so the
    bpffs under /sys/fs/bpf, which `ip netns exec` would hide)."""
    return ["nsenter", "--net=/run/netns/" + ns] + cmd


# --- namespaces ------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_ns(ns, fn, *args, **kw):
    """Run fn(*args, **kw) in a thread that joined network namespace ns; sockets it
    creates belong to ns for good and may be used from any thread."""
    box = {}

    def body():
        try:
            fd = os.open("/run/netns/" + ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns " + ns)
            finally:
                os.close(fd)
            box["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: B902 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def snmp_retrans(ns):
    def read():
        with open("/proc/thread-self/net/snmp") as f:
            lines = [l.split() for l in f if l.startswith("Tcp:")]
        return int(lines[1][lines[0].index("RetransSegs")])
    return in_ns(ns, read)


# --- TLS material ----------------------------------------------------------

class Certs:
    def __init__(self, d):
        self.cert = os.path.join(d, "cert.pem")
        self.key = os.path.join(d, "key.pem")
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "2",
             "-subj", "/CN=" + HOST, "-addext",
             "subjectAltName=DNS:%s,IP:%s,IP:%s" % (HOST, S4, S6)])
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.load_cert_chain(self.cert, self.key)
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client.load_verify_locations(self.cert)


# --- a line-oriented peer over a plain or TLS socket -------------------------

class Peer:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        sock.settimeout(TIMEOUT)

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        while b"\n" not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                raise EOFError("connection closed")
            self.buf += d
        i = self.buf.index(b"\n") + 1
        l, self.buf = self.buf[:i], self.buf[i:]
        return l

    def smtp_reply(self):
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def read_exact(self, n):
        got = len(self.buf)
        parts = [self.buf]
        self.buf = b""
        while got < n:
            d = self.sock.recv(min(1 << 20, n - got))
            if not d:
                raise EOFError("closed after %d of %d bytes" % (got, n))
            parts.append(d)
            got += len(d)
        data = b"".join(parts)
        self.buf = data[n:]
        return data[:n]

    def starttls(self, ctx, server_side=False):
        if self.buf:
            raise AssertionError("plaintext pending before TLS: %r" % self.buf[:60])
        if server_side:
            self.sock = ctx.wrap_socket(self.sock, server_side=True)
        else:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=HOST)

    def raw_send(self, data):
        """Bytes on the TCP socket under TLS, as a TLS_HW socket puts them."""
        os.write(self.sock.fileno(), data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --- test servers --------------------------------------------------------------

class Server:
    """One connection, in a thread, on (addr, port) in the server namespace.

    proto: smtp imap pop3 (STARTTLS) or implicit (TLS first, SMTP inside).
    mode:  normal | refuse (STARTTLS refused) | inject (plaintext right after
           the positive reply, in the same send) | chatty (IMAP: an untagged
           line ahead of the tagged reply to STARTTLS)."""

    def __init__(self, ctx, certs, proto, port, addr=S4, mode="normal"):
        self.certs, self.proto, self.mode = certs, proto, mode
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.lsock = in_ns(NS_S, socket.create_server, (addr, port), family=fam)
        self.lsock.settimeout(TIMEOUT)
        self.error = None
        self.got = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        ctx.servers.append(self)

    def _run(self):
        peer = None
        try:
            conn, _ = self.lsock.accept()
            peer = Peer(conn)
            getattr(self, "_" + self.proto)(peer)
        except (EOFError, ConnectionError, ssl.SSLError, socket.timeout, OSError) as e:
            self.error = e
        finally:
            if peer:
                peer.close()
            self.lsock.close()

    def done(self, timeout=TIMEOUT):
        self.thread.join(timeout)

    def _upgrade(self, peer, reply):
        if self.mode == "inject":
            peer.send(reply + b"250 plaintext the client must never see\r\n")
            return False
        peer.send(reply)
        peer.starttls(self.certs.server, server_side=True)
        return True

    def _smtp_loop(self, peer, tls):
        while True:
            l = peer.line()
            cmd = l.strip().upper()
            if cmd.startswith(b"EHLO"):
                peer.send(b"250-" + HOST.encode() + b"\r\n250-PIPELINING\r\n" +
                          (b"" if tls else b"250-STARTTLS\r\n") + b"250 8BITMIME\r\n")
            elif cmd == b"STARTTLS" and not tls:
                if self.mode == "refuse":
                    peer.send(b"454 4.7.0 TLS not available\r\n")
                    continue
                if peer.buf:
                    # Pipelined after STARTTLS (RFC 3207 §4): refuse, close.
                    peer.send(b"554 5.5.0 pipelining after STARTTLS\r\n")
                    return
                if not self._upgrade(peer, b"220 2.0.0 Ready to start TLS\r\n"):
                    return
                tls = True
            elif cmd.startswith(b"BULK "):
                n = int(cmd.split()[1])
                peer.send(b"250 sending\r\n")
                chunk = os.urandom(1 << 16)
                left = n
                while left:
                    k = min(left, len(chunk))
                    peer.send(chunk[:k])
                    left -= k
            elif cmd.startswith(b"UPLOAD "):
                n = int(cmd.split()[1])
                peer.read_exact(n)
                self.got += n
                peer.send(b"250 got %d\r\n" % n)
            elif cmd == b"PLAIN":
                peer.raw_send(b"250 plaintext under TLS, as TLS_HW sends it\r\n")
            elif cmd == b"QUIT":
                peer.send(b"221 2.0.0 bye\r\n")
                return
            else:
                peer.send(b"250 2.0.0 ok\r\n")

    def _smtp(self, peer):
        peer.send(b"220 " + HOST.encode() + b" ESMTP test\r\n")
        self._smtp_loop(peer, False)

    def _implicit(self, peer):
        peer.starttls(self.certs.server, server_side=True)
        peer.send(b"220 " + HOST.encode() + b" ESMTP test\r\n")
        self._smtp_loop(peer, True)

    def _imap(self, peer):
        peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n")
        tls = False
        while True:
            l = peer.line().rstrip(b"\r\n")
            tag, _, cmd = l.partition(b" ")
            cmd = cmd.upper()
            if cmd == b"CAPABILITY":
                peer.send(b"* CAPABILITY IMAP4rev1 " + (b"AUTH=PLAIN" if tls else
                          b"STARTTLS LOGINDISABLED") + b"\r\n" + tag + b" OK done\r\n")
            elif cmd == b"STARTTLS" and not tls:
                # chatty: an untagged line ahead of the tagged reply, in one send
                first = b"* OK [ALERT] untagged, not the reply\r\n" if self.mode == "chatty" else b""
                if not self._upgrade(peer, first + tag + b" OK Begin TLS negotiation now\r\n"):
                    return
                tls = True
            elif cmd == b"LOGOUT":
                peer.send(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                return
            else:
                peer.send(tag + b" OK done\r\n")

    def _pop3(self, peer):
        peer.send(b"+OK POP3 ready\r\n")
        tls = False
        while True:
            cmd = peer.line().strip().upper()
            if cmd == b"CAPA":
                peer.send(b"+OK\r\n" + (b"" if tls else b"STLS\r\n") + b"USER\r\n.\r\n")
            elif cmd == b"STLS" and not tls:
                if not self._upgrade(peer, b"+OK Begin TLS\r\n"):
                    return
                tls = True
            elif cmd == b"QUIT":
                peer.send(b"+OK bye\r\n")
                return
            else:
                peer.send(b"+OK\r\n")


def connect(addr, port, nodelay=False):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET

    def mk():
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        if nodelay:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect((addr, port))
        return s
    return Peer(in_ns(NS_C, mk))


def smtp_to_starttls(peer, certs):
    """Greeting, EHLO, STARTTLS, handshake; the peer speaks TLS after."""
    check(peer.smtp_reply()[0].startswith(b"220"), "no greeting")
    peer.send(b"EHLO client.test\r\n")
    check(b"STARTTLS" in b"".join(peer.smtp_reply()), "no STARTTLS offered")
    peer.send(b"STARTTLS\r\n")
    r = peer.smtp_reply()
    check(r[0].startswith(b"220"), "STARTTLS answered %r" % r)
    peer.starttls(certs.client)


# --- checks and counters ---------------------------------------------------------

def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def dump():
    return dump_pin(PIN)


def dump_pin(pin):
    p = run([BPFCTL, "dump", "--pin", pin])
    c = {}
    for l in p.stdout.splitlines():
        m = re.fullmatch(r"(\S+) (\d+) (\S+) (\d+)", l)
        check(m, "bpfctl dump: bad line %r" % l)
        c[(m.group(1), int(m.group(2)), m.group(3))] = int(m.group(4))
    return c


def port_view(c, port):
    return {"%s/%s" % (f, l): v for (f, p, l), v in c.items() if p == port and v}


def wait_counters(port, want, timeout=10.0, pin=PIN):
    """Poll until every (family, label) in want has its value (then once
    more, later, to catch a count that goes on rising); fail with a view
    of the port's counters otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        c = dump_pin(pin)
        ok = all(c.get((f, port, l), 0) == v for (f, l), v in want.items())
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if ok:
        time.sleep(0.3)
        c = dump_pin(pin)
        ok = all(c.get((f, port, l), 0) == v for (f, l), v in want.items())
    if not ok:
        bad = ["%s/%s=%s want %s" % (f, l, c.get((f, port, l), 0), v)
               for (f, l), v in want.items() if c.get((f, port, l), 0) != v]
        raise AssertionError("port %d: %s; all: %s" % (port, ", ".join(bad), port_view(c, port)))
    return c


def no_violations(**extra):
    want = {("violations", r): 0 for r in REASONS}
    for k, v in extra.items():
        fam, _, label = k.partition("__")
        want[(fam, label)] = v
    return want


# --- context ------------------------------------------------------------------------

class Ctx:
    def __init__(self):
        self.tmp = None
        self.certs = None
        self.attach = None
        self.attach_line = ""
        self.prog_ids = []
        self.servers = []
        self.netns = False
        self.mounted_bpffs = False
        self.stats_was = None
        self.cost = None


def sh_ok(cmd):
    try:
        return run(cmd, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def is_bpffs(path):
    try:
        out = run(["stat", "-f", "-c", "%T", path], check=False).stdout.strip()
    except OSError:
        return False
    return out == "bpf_fs"


def setup():
    ctx = Ctx()
    if os.geteuid() != 0:
        raise Skip("needs root (network namespaces, tc, BPF)")
    for tool in ("ip", "tc", "nsenter", "openssl"):
        if not shutil.which(tool):
            raise Skip("%s not found" % tool)
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise Skip("no kernel BTF (/sys/kernel/btf/vmlinux)")
    if not os.access(BPFCTL, os.X_OK):
        raise RuntimeError("%s not built (make bpf)" % BPFCTL)
    if not is_bpffs("/sys/fs/bpf"):
        if not sh_ok(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]):
            raise Skip("bpffs not mounted at /sys/fs/bpf and cannot be mounted")
        ctx.mounted_bpffs = True
    CTX[0] = ctx
    ctx.tmp = tempfile.mkdtemp(prefix="mgwbpf-")
    ctx.certs = Certs(ctx.tmp)

    ctx.netns = True
    for ns in (NS_C, NS_S):
        run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", VETH_C, "netns", NS_C, "type", "veth", "peer", "name", VETH_S,
         "netns", NS_S])
    for ns, dev, a4, a6 in ((NS_C, VETH_C, C4, C6), (NS_S, VETH_S, S4, S6)):
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "addr", "add", a4 + "/24", "dev", dev])
        run(["ip", "-n", ns, "addr", "add", a6 + "/64", "dev", dev, "nodad"])
        run(["ip", "-n", ns, "link", "set", dev, "up"])

    ctx.attach, ctx.attach_line = start_attach(PIN)
    ctx.prog_ids = [int(x) for x in re.findall(r"prog_\w+=(\d+)", ctx.attach_line)]
    return ctx


def start_attach(pin):
    """bpfctl attach on the server veth, in the server namespace; returns
    the process and its "attached ..." line once it is ready."""
    cmd = [BPFCTL, "attach", "--pin", pin, "--if", VETH_S]
    for port, kind in sorted(EXTRA_PORTS.items()):
        cmd += ["--port", "%d/%s" % (port, kind)]
    proc = subprocess.Popen(in_ns_cmd(NS_S, cmd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("attached"):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise RuntimeError("bpfctl attach: %s" % (line + proc.stderr.read()).strip())
    return proc, line.strip()


CTX = [None]


def cleanup():
    ctx = CTX[0]
    if ctx is None:
        return
    CTX[0] = None
    if ctx.attach and ctx.attach.poll() is None:
        ctx.attach.terminate()
        try:
            ctx.attach.wait(15)
        except subprocess.TimeoutExpired:
            ctx.attach.kill()
    if ctx.stats_was is not None:
        sh_ok(["sysctl", "-q", "-w", "kernel.bpf_stats_enabled=%s" % ctx.stats_was])
    if ctx.netns:
        for ns in (NS_C, NS_S):
            sh_ok(["ip", "netns", "del", ns])
    if os.path.isdir(PIN):
        shutil.rmtree(PIN, ignore_errors=True)
    if ctx.mounted_bpffs:
        sh_ok(["umount", "/sys/fs/bpf"])
    if ctx.tmp:
        shutil.rmtree(ctx.tmp, ignore_errors=True)


# --- cases ------------------------------------------------------------------------------

def case_smtp_starttls(ctx):
    """smtplib, real STARTTLS and TLS: starttls_upgraded, nothing else."""
    srv = Server(ctx, ctx.certs, "smtp", 25)

    def client():
        with smtplib.SMTP(S4, 25, local_hostname="client.test", timeout=TIMEOUT) as s:
            s.ehlo()
            s.starttls(context=ctx.certs.client)
            s.ehlo()
            check(s.noop()[0] == 250, "NOOP over TLS")
    in_ns(NS_C, client)
    srv.done()
    c = wait_counters(25, no_violations(flows__starttls_upgraded=1, flows__plaintext_only=0,
                                        untracked__to_server=0, untracked__to_client=0))
    check(c[("packets", 25, "tls")] > 0 and c[("packets", 25, "plaintext")] > 0,
          "both classes counted: %s" % port_view(c, 25))


def case_imap_starttls(ctx):
    """imaplib STARTTLS (tagged OK matched to the STARTTLS tag)."""
    srv = Server(ctx, ctx.certs, "imap", 143)

    def client():
        m = imaplib.IMAP4(S4, 143, timeout=TIMEOUT)
        m.starttls(ssl_context=ctx.certs.client)
        check(m.noop()[0] == "OK", "NOOP over TLS")
        m.logout()
    in_ns(NS_C, client)
    srv.done()
    wait_counters(143, no_violations(flows__starttls_upgraded=1, flows__plaintext_only=0))


def case_pop3_stls(ctx):
    """poplib STLS."""
    srv = Server(ctx, ctx.certs, "pop3", 110)

    def client():
        p = poplib.POP3(S4, 110, timeout=TIMEOUT)
        p.stls(context=ctx.certs.client)
        p.noop()
        p.quit()
    in_ns(NS_C, client)
    srv.done()
    wait_counters(110, no_violations(flows__starttls_upgraded=1, flows__plaintext_only=0))


def case_implicit_tls(ctx):
    """smtplib.SMTP_SSL on 465: implicit_tls, no violation."""
    srv = Server(ctx, ctx.certs, "implicit", 465)

    def client():
        with smtplib.SMTP_SSL(S4, 465, local_hostname="client.test", timeout=TIMEOUT,
                              context=ctx.certs.client) as s:
            check(s.noop()[0] == 250, "NOOP")
    in_ns(NS_C, client)
    srv.done()
    wait_counters(465, no_violations(flows__implicit_tls=1))


def case_starttls_refused(ctx):
    """STARTTLS answered 454, the dialogue goes on in plaintext: no violation,
    one plaintext_only flow."""
    srv = Server(ctx, ctx.certs, "smtp", 587, mode="refuse")
    p = connect(S4, 587)
    p.smtp_reply()
    p.send(b"EHLO client.test\r\n")
    p.smtp_reply()
    p.send(b"STARTTLS\r\n")
    check(p.smtp_reply()[0].startswith(b"454"), "454 expected")
    p.send(b"NOOP\r\n")
    p.smtp_reply()
    p.send(b"QUIT\r\n")
    p.smtp_reply()
    p.close()
    srv.done()
    wait_counters(587, no_violations(flows__plaintext_only=1, flows__starttls_upgraded=0))


def case_pipelined_after_starttls(ctx):
    """STARTTLS and a command in ONE segment, then more plaintext:
    plaintext_after_starttls_to_server counted once."""
    srv = Server(ctx, ctx.certs, "smtp", 10025)
    p = connect(S4, 10025)
    p.smtp_reply()
    p.send(b"EHLO client.test\r\n")
    p.smtp_reply()
    p.send(b"STARTTLS\r\nRSET\r\n")
    p.smtp_reply()
    try:
        p.send(b"NOOP\r\n")
        time.sleep(0.1)
        p.send(b"QUIT\r\n")
    except OSError:
        pass
    p.close()
    srv.done()
    want = {("violations", REASONS[0]): 1, ("violations", REASONS[1]): 0,
            ("violations", REASONS[2]): 0}
    c = wait_counters(10025, want)
    check(c[("violation_bytes", 10025, REASONS[0])] >= len(b"RSET\r\n"),
          "violation bytes: %s" % port_view(c, 10025))


def case_pipelined_group_ending_in_starttls(ctx):
    """NOOP and STARTTLS in one segment (RFC 2920: STARTTLS last in its
    group): the 250 to NOOP is not taken for the STARTTLS reply; the flow
    upgrades on the 220, no violation."""
    srv = Server(ctx, ctx.certs, "smtp", 10039)
    p = connect(S4, 10039)
    p.smtp_reply()
    p.send(b"EHLO client.test\r\n")
    p.smtp_reply()
    p.send(b"NOOP\r\nSTARTTLS\r\n")
    check(p.smtp_reply()[0].startswith(b"250"), "250 to NOOP")
    check(p.smtp_reply()[0].startswith(b"220"), "220 to STARTTLS")
    p.starttls(ctx.certs.client)
    p.send(b"QUIT\r\n")
    p.smtp_reply()
    p.close()
    srv.done()
    wait_counters(10039, no_violations(flows__starttls_upgraded=1))


def case_imap_untagged_before_ok(ctx):
    """IMAP: an untagged line in front of the tagged OK (same segment) is
    not the reply; TLS starts after the tagged OK."""
    srv = Server(ctx, ctx.certs, "imap", 10040, mode="chatty")

    def client():
        m = imaplib.IMAP4(S4, 10040, timeout=TIMEOUT)
        m.starttls(ssl_context=ctx.certs.client)
        m.noop()
        m.logout()
    in_ns(NS_C, client)
    srv.done()
    wait_counters(10040, no_violations(flows__starttls_upgraded=1))


def split_starttls(p):
    p.smtp_reply()
    p.send(b"EHLO client.test\r\n")
    p.smtp_reply()
    p.send(b"STAR")
    time.sleep(0.3)
    p.send(b"TTLS\r\n")


def case_starttls_split(ctx):
    """"STAR" + "TTLS\\r\\n" in two segments (TCP_NODELAY, a pause): still
    recognised, the flow upgrades, no violation."""
    srv = Server(ctx, ctx.certs, "smtp", 10026)
    p = connect(S4, 10026, nodelay=True)
    split_starttls(p)
    check(p.smtp_reply()[0].startswith(b"220"), "220 expected")
    p.starttls(ctx.certs.client)
    p.send(b"NOOP\r\n")
    p.smtp_reply()
    p.send(b"QUIT\r\n")
    p.smtp_reply()
    p.close()
    srv.done()
    wait_counters(10026, no_violations(flows__starttls_upgraded=1))


def case_starttls_split_then_plaintext(ctx):
    """The split STARTTLS line is taken as STARTTLS: plaintext from the
    client after it is a violation."""
    srv = Server(ctx, ctx.certs, "smtp", 10027)
    p = connect(S4, 10027, nodelay=True)
    split_starttls(p)
    p.smtp_reply()
    p.send(b"NOOP\r\n")
    p.close()
    srv.done()
    wait_counters(10027, {("violations", REASONS[0]): 1, ("violations", REASONS[1]): 0})


def case_server_plaintext_after_220(ctx):
    """The server's 220 and plaintext in ONE segment:
    plaintext_after_upgrade_to_client."""
    srv = Server(ctx, ctx.certs, "smtp", 10028, mode="inject")
    p = connect(S4, 10028)
    p.smtp_reply()
    p.send(b"EHLO client.test\r\n")
    p.smtp_reply()
    p.send(b"STARTTLS\r\n")
    r = p.smtp_reply()
    check(r[0].startswith(b"220"), "220 expected, got %r" % r)
    p.close()
    srv.done()
    wait_counters(10028, {("violations", REASONS[1]): 1, ("violations", REASONS[0]): 0,
                          ("flows", "starttls_upgraded"): 1})


def case_implicit_plaintext(ctx):
    """A plaintext IMAP command on 993: plaintext_on_implicit_port."""
    srv = Server(ctx, ctx.certs, "implicit", 993)
    p = connect(S4, 993)
    p.send(b"a1 CAPABILITY\r\n")
    time.sleep(0.2)
    p.close()
    srv.done()
    wait_counters(993, {("violations", REASONS[2]): 1, ("flows", "implicit_tls"): 1})


def bulk(ctx, port, mb):
    srv = Server(ctx, ctx.certs, "smtp", port)
    n = mb << 20
    p = connect(S4, port)
    smtp_to_starttls(p, ctx.certs)
    p.send(b"EHLO client.test\r\n")
    p.smtp_reply()
    p.send(b"UPLOAD %d\r\n" % n)
    block = os.urandom(1 << 16)
    left = n
    while left:
        k = min(left, len(block))
        p.send(block[:k])
        left -= k
    check(p.line().startswith(b"250 got"), "upload acknowledged")
    p.send(b"BULK %d\r\n" % n)
    check(p.line().startswith(b"250"), "bulk announced")
    p.read_exact(n)
    p.send(b"QUIT\r\n")
    p.smtp_reply()
    p.close()
    srv.done(120)
    check(srv.got == n, "server got %d of %d bytes" % (srv.got, n))
    return 2 * n


def prog_stats(ids):
    out = {}
    for i in ids:
        p = run(["bpftool", "--json", "prog", "show", "id", str(i)], check=False)
        if p.returncode != 0:
            return None
        j = json.loads(p.stdout)
        out[i] = (j.get("run_time_ns", 0), j.get("run_cnt", 0))
    return out


def case_bulk_tls(ctx):
    """STARTTLS then BULK_MB MiB each way (>= 50 MB in all; GSO/GRO packets
    on veth, several records per packet): no violation, nothing untracked,
    TLS bytes >= payload.  Client and server threads share one CPU: on veth,
    segments sent from two CPUs reach the classifier's ingress from two
    backlogs at once, out of order, and a record header in a segment seen
    out of order stops the tracking of that direction (that case is the
    loss case's)."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        payload = bulk(ctx, 10029, BULK_MB)
    finally:
        os.sched_setaffinity(0, cpus)
    c = wait_counters(10029, no_violations(flows__starttls_upgraded=1, untracked__to_server=0,
                                           untracked__to_client=0), timeout=20)
    tls_bytes = c[("bytes", 10029, "tls")]
    check(tls_bytes >= payload, "tls bytes %d < payload %d" % (tls_bytes, payload))


# --- cost ----------------------------------------------------------------------------

NR_BPF = 321            # x86_64
BPF_PROG_LOAD, BPF_OBJ_PIN = 5, 6
BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP = 3, 6


def load_raw_prog(prog_type, insns_hex, name, pin):
    """Load a few hand-assembled eBPF instructions, pin them, return the id."""
    libc = ctypes.CDLL(None, use_errno=True)
    insns = bytes.fromhex(insns_hex.replace(" ", ""))
    lic = ctypes.create_string_buffer(b"GPL")
    ibuf = ctypes.create_string_buffer(insns, len(insns))
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIQQ", attr, 0, prog_type, len(insns) // 8,
                     ctypes.addressof(ibuf), ctypes.addressof(lic))
    attr[48:48 + len(name)] = name.encode()
    fd = libc.syscall(NR_BPF, BPF_PROG_LOAD, attr, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_PROG_LOAD " + name)
    path = ctypes.create_string_buffer(pin.encode())
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=QI", attr, 0, ctypes.addressof(path), fd)
    rc = libc.syscall(NR_BPF, BPF_OBJ_PIN, attr, 128)
    os.close(fd)
    if rc != 0:
        raise OSError(ctypes.get_errno(), "BPF_OBJ_PIN " + pin)
    j = json.loads(run(["bpftool", "--json", "prog", "show", "pinned", pin]).stdout)
    return j["id"]


class NopProg:
    """A two-instruction tc program (return TC_ACT_UNSPEC), attached after
    ours on the same hooks: its run time under bpf_stats is what measuring
    costs by itself (two clock reads, the call), to subtract."""

    def __init__(self, pin):
        self.pin = pin
        self.attached = []
        # r0 = -1; exit
        self.id = load_raw_prog(BPF_PROG_TYPE_SCHED_CLS, "b7000000ffffffff 9500000000000000",
                                "mgw_calib_nop", pin)

    def attach(self, ns, dev):
        for point in ("ingress", "egress"):
            run(in_ns_cmd(ns, ["tc", "filter", "add", "dev", dev, point, "prio", "2",
                               "handle", "2", "bpf", "object-pinned", self.pin, "da"]))
            self.attached.append((ns, dev, point))

    def close(self):
        for ns, dev, point in self.attached:
            sh_ok(in_ns_cmd(ns, ["tc", "filter", "del", "dev", dev, point, "prio", "2",
                                 "handle", "2", "bpf"]))
        try:
            os.unlink(self.pin)
        except OSError:
            pass


def measure(ctx, ids, port, mb):
    """run_time_ns and run_cnt deltas per program id over one bulk transfer."""
    before = prog_stats(ids)
    c0 = dump()
    t0 = time.monotonic()
    payload = bulk(ctx, port, mb)
    secs = time.monotonic() - t0
    after = prog_stats(ids)
    c1 = dump()
    segs = sum(c1[(f, port, l)] - c0.get((f, port, l), 0)
               for f, l in (("packets", "tls"), ("packets", "plaintext")))
    d = {i: (after[i][0] - before[i][0], after[i][1] - before[i][1]) for i in ids}
    return d, segs, payload, secs


def tcp4_frame(sport, dport, seq, ack, flags, payload=b""):
    """An Ethernet/IPv4/TCP frame (checksums left zero: nothing checks them)."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6,
                     0, socket.inet_aton(C4), socket.inet_aton(S4))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + payload


def test_run_ns(ctx, prog_id, frame, repeat):
    path = os.path.join(ctx.tmp, "frame.bin")
    with open(path, "wb") as f:
        f.write(frame)
    p = run(["bpftool", "prog", "run", "id", str(prog_id), "data_in", path,
             "repeat", str(repeat)])
    m = re.search(r"duration \(average\): (\d+)ns", p.stdout + p.stderr)
    return int(m.group(1)) if m else None


def warm_cost(ctx):
    """BPF_PROG_TEST_RUN with warm caches: what the code itself costs, without
    the cache misses a bulk transfer causes, nor the clock reads."""
    ing = ctx.prog_ids[0]
    sport, dport, isn_c, isn_s = 40000, 10037, 1000, 5000
    test_run_ns(ctx, ing, tcp4_frame(sport, dport, isn_c, 0, 0x02), 1)
    eg_frame = tcp4_frame(dport, sport, isn_s, isn_c + 1, 0x12)
    eg_frame = eg_frame[:6] + eg_frame[6:12] + eg_frame[12:26] + eg_frame[30:34] + \
        eg_frame[26:30] + eg_frame[34:]       # swap the addresses: server to client
    test_run_ns(ctx, ing, eg_frame, 1)
    rec = b"\x16\x03\x01\x40\x00" + b"\xa5" * 1443     # a handshake record header, its body
    test_run_ns(ctx, ing, tcp4_frame(sport, dport, isn_c + 1, isn_s + 1, 0x18, rec), 1)
    body = tcp4_frame(sport, dport, isn_c + 1 + 1448, isn_s + 1, 0x18, b"\xa5" * 1448)
    t_body = test_run_ns(ctx, ing, body, 1)          # inside the record: the usual case
    t_old = test_run_ns(ctx, ing, body, 2000000)     # the same again: a retransmission
    t_other = test_run_ns(ctx, ing, tcp4_frame(40001, 8080, 1, 1, 0x10, b"x" * 100), 2000000)
    c = dump()
    check(c[("flows", dport, "implicit_tls")] == 1 and c[("packets", dport, "tls")] > 2000000
          and not any(c[("violations", dport, r)] for r in REASONS)
          and not c[("untracked", dport, "to_server")],
          "test-run flow not tracked as expected: %s" % port_view(c, dport))
    return t_body, t_old, t_other


def case_cost(ctx):
    """Run time per packet under bulk TLS (kernel.bpf_stats_enabled=1), three
    transfers each with the skbs the stack makes (GSO/GRO) and with
    MTU-sized ones, minus what an empty tc program measures on the same
    hooks: reported (median, range), not asserted."""
    if not shutil.which("bpftool"):
        raise Skip("bpftool not found: no bpf_stats readout")
    nop = NopProg(PIN + "-nop")
    ctx.stats_was = open("/proc/sys/kernel/bpf_stats_enabled").read().strip()
    small_set = False
    runs = []
    try:
        nop.attach(NS_S, VETH_S)
        run(["sysctl", "-q", "-w", "kernel.bpf_stats_enabled=1"])
        ids = ctx.prog_ids + [nop.id]
        runs.append(("GSO/GRO skbs as the stack makes them",
                     [measure(ctx, ids, 10035, BULK_MB) for _ in range(3)]))
        # The same with MTU-sized skbs, as most NICs deliver without GRO.
        if (sh_ok(in_ns_cmd(NS_C, ["ip", "link", "set", "dev", VETH_C, "gso_max_size", "1500"]))
                and sh_ok(in_ns_cmd(NS_S, ["ip", "link", "set", "dev", VETH_S,
                                           "gso_max_size", "1500"]))):
            small_set = True
            runs.append(("MTU-sized skbs (gso_max_size 1500)",
                         [measure(ctx, ids, 10036, max(8, BULK_MB // 4)) for _ in range(3)]))
    finally:
        run(["sysctl", "-q", "-w", "kernel.bpf_stats_enabled=%s" % ctx.stats_was], check=False)
        if small_set:
            for ns, dev in ((NS_C, VETH_C), (NS_S, VETH_S)):
                sh_ok(in_ns_cmd(ns, ["ip", "link", "set", "dev", dev, "gso_max_size", "65536"]))
        nop.close()
    warm = warm_cost(ctx)
    INFO.append("cost, warm caches (BPF_PROG_TEST_RUN, 2e6 runs): %s ns per packet of a tracked "
                "TLS flow (sequence space already seen, same path as a segment inside a record "
                "body), %s ns per packet of a port not in the table; kernel %s"
                % (warm[1], warm[2], os.uname().release))
    for what, samples in runs:
        per_skb, per_seg, gross, base, segs_skb = [], [], [], [], []
        for d, segs, payload, secs in samples:
            rt = sum(d[i][0] for i in ctx.prog_ids)
            cnt = sum(d[i][1] for i in ctx.prog_ids)
            nrt, ncnt = d[nop.id]
            if not cnt or not ncnt or not segs:
                continue
            b = nrt / ncnt
            gross.append(rt / cnt)
            base.append(b)
            per_skb.append(rt / cnt - b)
            per_seg.append((rt - b * cnt) / segs)
            segs_skb.append(segs / cnt)
        if not per_skb:
            INFO.append("cost, %s: no samples" % what)
            continue

        def med(v):
            v = sorted(v)
            return v[len(v) // 2]
        INFO.append("cost, %s, %d MB of TLS per run, 3 runs: %.0f ns per skb (%.0f-%.0f), "
                    "%.1f wire segments per skb, so %.0f ns per segment (%.0f-%.0f); "
                    "measured %.0f ns per skb less %.0f ns that an empty tc program measures "
                    "on the same hooks; kernel %s"
                    % (what, samples[0][2] // 1000000, med(per_skb), min(per_skb), max(per_skb),
                       med(segs_skb), med(per_seg), min(per_seg), max(per_seg), med(gross),
                       med(base), os.uname().release))


# XDP: drop one packet in 20 at random (bpf_get_prandom_u32() % 20 == 0).
XDP_LOSS = ("8500000007000000"       # call bpf_get_prandom_u32
            "9700000014000000"       # r0 %= 20
            "5500020000000000"       # if r0 != 0 goto pass
            "b700000001000000"       # r0 = XDP_DROP
            "9500000000000000"       # exit
            "b700000002000000"       # pass: r0 = XDP_PASS
            "9500000000000000")      # exit


class Loss:
    """5% packet loss both ways, placed so that the classifier on the
    server veth sees holes on ingress (client-to-server drops happen before
    it) and retransmissions on egress (server-to-client drops happen after
    it): netem on both veths' root qdiscs, or else an XDP program dropping
    at random on both veths' receive side."""

    def __init__(self):
        self.how = None
        self.undo = []
        ends = ((NS_C, VETH_C), (NS_S, VETH_S))
        if all(self._netem(ns, dev) for ns, dev in ends):
            self.how = "netem"
            return
        self.close()
        if shutil.which("bpftool"):
            try:
                pin = PIN + "-loss"
                load_raw_prog(BPF_PROG_TYPE_XDP, XDP_LOSS, "mgw_test_loss", pin)
                self.undo.append(lambda: os.unlink(pin))
                if all(self._xdp(ns, dev, pin) for ns, dev in ends):
                    self.how = "xdp"
                    return
            except (OSError, RuntimeError) as e:
                note("xdp loss: %s" % e)
        self.close()

    def _netem(self, ns, dev):
        if not sh_ok(in_ns_cmd(ns, ["tc", "qdisc", "add", "dev", dev, "root", "netem",
                                    "loss", "5%"])):
            return False
        self.undo.append(lambda: sh_ok(in_ns_cmd(ns, ["tc", "qdisc", "del", "dev", dev,
                                                      "root"])))
        return True

    def _xdp(self, ns, dev, pin):
        if not sh_ok(in_ns_cmd(ns, ["ip", "link", "set", "dev", dev, "xdp", "pinned", pin])):
            return False
        self.undo.append(lambda: sh_ok(in_ns_cmd(ns, ["ip", "link", "set", "dev", dev,
                                                      "xdp", "off"])))
        return True

    def close(self):
        while self.undo:
            try:
                self.undo.pop()()
            except OSError:
                pass


def case_retransmissions(ctx):
    """Bulk TLS under 5% loss both ways: retransmitted segments are skipped,
    never re-parsed: no violation, the flow counted once."""
    loss = Loss()
    try:
        if not loss.how:
            raise Skip("no way to drop packets here: sch_netem unavailable "
                       "(CONFIG_NET_SCH_NETEM) and no XDP on veth")
        r0 = snmp_retrans(NS_S) + snmp_retrans(NS_C)
        bulk(ctx, 10030, max(4, BULK_MB // 4))
        retrans = snmp_retrans(NS_S) + snmp_retrans(NS_C) - r0
    finally:
        loss.close()
    c = wait_counters(10030, no_violations(flows__starttls_upgraded=1, flows__plaintext_only=0),
                      timeout=20)
    check(retrans > 0, "no retransmission happened (loss via %s)" % loss.how)
    INFO.append("retransmissions: %d segments retransmitted under 5%% loss (via %s); "
                "directions untracked after a header fell into a hole: to_server=%d "
                "to_client=%d" % (retrans, loss.how, c[("untracked", 10030, "to_server")],
                                  c[("untracked", 10030, "to_client")]))


def case_ipv6_starttls(ctx):
    """IPv6: smtplib STARTTLS upgrades cleanly; a pipelined command after
    STARTTLS is a violation."""
    srv = Server(ctx, ctx.certs, "smtp", 10031, addr=S6)

    def client():
        with smtplib.SMTP(S6, 10031, local_hostname="client.test", timeout=TIMEOUT) as s:
            s.ehlo()
            s.starttls(context=ctx.certs.client)
            s.ehlo()
            s.noop()
    in_ns(NS_C, client)
    srv.done()
    wait_counters(10031, no_violations(flows__starttls_upgraded=1))

    srv = Server(ctx, ctx.certs, "smtp", 10032, addr=S6)
    p = connect(S6, 10032)
    p.smtp_reply()
    p.send(b"EHLO client.test\r\n")
    p.smtp_reply()
    p.send(b"STARTTLS\r\nMAIL FROM:<a@example.test>\r\n")
    p.smtp_reply()
    p.close()
    srv.done()
    wait_counters(10032, {("violations", REASONS[0]): 1})


def offload_flow(ctx, port, mark, six=False):
    saddr, caddr = (S6, C6) if six else (S4, C4)
    fmt = "[%s]:%d" if six else "%s:%d"
    srv = Server(ctx, ctx.certs, "smtp", port, addr=saddr)
    p = connect(saddr, port)
    smtp_to_starttls(p, ctx.certs)
    p.send(b"NOOP\r\n")
    p.smtp_reply()
    if mark:
        cport = p.sock.getsockname()[1]
        # As the gateway would: its own address first, then the client's.
        run([BPFCTL, "mark", "--pin", PIN, fmt % (saddr, port), fmt % (caddr, cport)])
    p.send(b"PLAIN\r\n")
    time.sleep(0.3)
    p.close()
    srv.done()


def case_offload_marked(ctx):
    """A flow marked with bpfctl mark sends plaintext (as under TLS_HW):
    no violation (IPv4 and IPv6); the same without the mark: a violation."""
    offload_flow(ctx, 10033, True)
    offload_flow(ctx, 10034, False)
    offload_flow(ctx, 10038, True, six=True)
    wait_counters(10033, no_violations(flows__starttls_upgraded=1))
    wait_counters(10034, {("violations", REASONS[1]): 1})
    wait_counters(10038, no_violations(flows__starttls_upgraded=1))


def case_counters_plausible(ctx):
    """Every family and label is there with the exact names, for every
    port; plaintext dialogue bytes are counted."""
    c = dump()
    ports = {p for (_, p, _) in c}
    want_ports = {25, 587, 465, 143, 993, 110, 995} | set(EXTRA_PORTS)
    check(ports == want_ports, "ports %s" % sorted(ports))
    for port in want_ports:
        for fam, labels in FAMILIES.items():
            for l in labels:
                check((fam, port, l) in c, "missing %s %d %s" % (fam, port, l))
    check(len(c) == len(want_ports) * sum(len(v) for v in FAMILIES.values()),
          "unexpected lines in dump")
    # 110: greeting, CAPA/STLS dialogue in plaintext, then TLS.
    check(c[("bytes", 110, "plaintext")] >= len(b"+OK POP3 ready\r\nSTLS\r\n+OK Begin TLS\r\n"),
          "pop3 plaintext bytes %d" % c[("bytes", 110, "plaintext")])
    check(c[("packets", 110, "tls")] > 0, "pop3 tls packets")


def case_cli_errors(ctx):
    """bpfctl says plainly what is wrong."""
    p = run(in_ns_cmd(NS_S, [BPFCTL, "attach", "--pin", PIN + "-x", "--if", "nosuchif0"]),
            check=False)
    check(p.returncode == 1 and "interface nosuchif0 not found" in p.stderr,
          "missing interface: %d %r" % (p.returncode, p.stderr))
    d = tempfile.mkdtemp(dir=ctx.tmp)
    p = run([BPFCTL, "attach", "--pin", d + "/pins", "--if", "lo"], check=False)
    check(p.returncode == 1 and "bpffs not mounted" in p.stderr,
          "pin path off bpffs: %d %r" % (p.returncode, p.stderr))
    p = run([BPFCTL, "dump", "--pin", PIN + "-none"], check=False)
    check(p.returncode == 1 and p.stderr, "dump of nothing: %d %r" % (p.returncode, p.stderr))
    p = run([BPFCTL, "attach", "--if", "lo", "--port", "25/nntp"], check=False)
    check(p.returncode == 2, "bad kind refused: %d" % p.returncode)
    if shutil.which("setpriv"):
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                  "--inh-caps=-all"]
        p = run(nobody + [BPFCTL, "attach", "--if", "lo"], check=False)
        check(p.returncode == 1 and "not root / no CAP_BPF" in p.stderr,
              "unprivileged attach: %d %r" % (p.returncode, p.stderr))
        p = run(nobody + [BPFCTL, "dump", "--pin", PIN], check=False)
        check(p.returncode == 1 and "not root / no CAP_BPF" in p.stderr,
              "unprivileged dump: %d %r" % (p.returncode, p.stderr))


def case_detach_unpins(ctx):
    """SIGTERM: bpfctl detaches from tc and removes its pins."""
    ctx.attach.terminate()
    rc = ctx.attach.wait(20)
    out = ctx.attach.stdout.read()
    check(rc == 0 and "detached" in out, "bpfctl exit %s: %r %r" % (rc, out,
                                                                     ctx.attach.stderr.read()))
    check(not os.path.exists(PIN), "pins left under %s: %s" % (PIN, os.listdir(PIN)
                                                               if os.path.isdir(PIN) else ""))
    for point in ("ingress", "egress"):
        p = run(in_ns_cmd(NS_S, ["tc", "filter", "show", "dev", VETH_S, point]), check=False)
        check("mgw_tc" not in p.stdout, "filter left at %s: %s" % (point, p.stdout))


def smtp_hello(ctx, port):
    srv = Server(ctx, ctx.certs, "smtp", port)
    p = connect(S4, port)
    p.smtp_reply()
    p.send(b"QUIT\r\n")
    p.smtp_reply()
    p.close()
    srv.done()


def case_stale_pins(ctx):
    """An owner killed with SIGKILL leaves its pins and tc filter behind:
    the next bpfctl attach on that pin path reuses the maps (counters carry
    on) and replaces the filter; a pinned map of another layout under one
    of the names is replaced.  SIGTERM then removes all of it."""
    pin = PIN + "-stale"
    procs = []
    try:
        if shutil.which("bpftool"):
            os.mkdir(pin)
            run(["bpftool", "map", "create", pin + "/mgw_stats", "type", "hash", "key", "4",
                 "value", "4", "entries", "4", "name", "mgw_stats"])
        a, _ = start_attach(pin)
        procs.append(a)
        smtp_hello(ctx, 25)
        before = wait_counters(25, {("flows", "plaintext_only"): 1}, pin=pin)
        a.kill()
        a.wait(10)
        check(os.path.exists(pin + "/mgw_stats"), "pins gone after SIGKILL")
        b, _ = start_attach(pin)
        procs.append(b)
        after = dump_pin(pin)
        check(after[("flows", 25, "plaintext_only")] == 1 and
              after[("packets", 25, "plaintext")] >= before[("packets", 25, "plaintext")],
              "counters not carried over: %s" % port_view(after, 25))
        smtp_hello(ctx, 25)
        deadline = time.monotonic() + 10
        while dump_pin(pin)[("flows", 25, "plaintext_only")] != 2:
            check(time.monotonic() < deadline, "the new owner does not count")
            time.sleep(0.1)
        b.terminate()
        check(b.wait(20) == 0, "bpfctl exit status")
        check(not os.path.exists(pin), "pins left: %s" % (os.listdir(pin)
                                                          if os.path.isdir(pin) else ""))
        for point in ("ingress", "egress"):
            out = run(in_ns_cmd(NS_S, ["tc", "filter", "show", "dev", VETH_S, point])).stdout
            check("mgw_tc" not in out, "filter left at %s: %s" % (point, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(pin, ignore_errors=True)


INFO = []

CASES = [
    ("smtp_starttls_upgraded", case_smtp_starttls, 90),
    ("imap_starttls_upgraded", case_imap_starttls, 90),
    ("pop3_stls_upgraded", case_pop3_stls, 90),
    ("implicit_tls_clean", case_implicit_tls, 90),
    ("starttls_refused_plaintext_only", case_starttls_refused, 90),
    ("pipelined_after_starttls", case_pipelined_after_starttls, 90),
    ("pipelined_group_ending_in_starttls", case_pipelined_group_ending_in_starttls, 90),
    ("imap_untagged_before_tagged_ok", case_imap_untagged_before_ok, 90),
    ("starttls_split_segments", case_starttls_split, 90),
    ("starttls_split_then_plaintext", case_starttls_split_then_plaintext, 90),
    ("server_plaintext_after_220", case_server_plaintext_after_220, 90),
    ("implicit_port_plaintext", case_implicit_plaintext, 90),
    ("bulk_tls_no_violation", case_bulk_tls, 600),
    ("retransmissions_not_double_counted", case_retransmissions, 600),
    ("cost_per_packet", case_cost, 600),
    ("ipv6_starttls", case_ipv6_starttls, 90),
    ("offload_marked_not_counted", case_offload_marked, 90),
    ("counters_plausible", case_counters_plausible, 60),
    ("bpfctl_errors", case_cli_errors, 60),
    ("detach_unpins", case_detach_unpins, 60),
    ("stale_pins_reused", case_stale_pins, 90),
]


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout("case timed out")


def _term(signum, frame):
    cleanup()
    sys.exit(1)


def main():
    results = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def report(kind, name, why=None):
        results[kind] += 1
        why = None if why is None else " ".join(str(why).split())[:400]
        print("%s: %s%s" % (kind, name, "" if why is None else ": " + why))
        sys.stdout.flush()

    signal.signal(signal.SIGTERM, _term)
    try:
        try:
            ctx = setup()
        except Skip as e:
            for name, _, _ in CASES:
                report("SKIP", name, e)
            return 0
        except Exception as e:  # noqa: B902 - every case fails with the reason
            note(traceback.format_exc())
            for name, _, _ in CASES:
                report("FAIL", name, "setup: %s" % e)
            return 1
        note(ctx.attach_line)
        signal.signal(signal.SIGALRM, _alarm)
        only = os.environ.get("MAILGW_BPF_CASES", "").split()
        for name, fn, limit in CASES:
            if only and name not in only:
                continue
            signal.alarm(limit)
            try:
                fn(ctx)
                report("PASS", name)
            except Skip as e:
                report("SKIP", name, e)
            except AssertionError as e:
                note(traceback.format_exc())
                report("FAIL", name, e)
            except Exception as e:  # noqa: B902
                note(traceback.format_exc())
                report("FAIL", name, "%s: %s" % (type(e).__name__, e))
            finally:
                signal.alarm(0)
            for s in ctx.servers:
                if s.thread.is_alive():
                    s.lsock.close()
            ctx.servers = []
        for i in INFO:
            print("INFO: " + i)
    finally:
        cleanup()
    return 1 if results["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
