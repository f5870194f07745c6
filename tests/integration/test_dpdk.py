#!/usr/bin/python3
"""The DPDK cryptodev record engine ([offload] mode = dpdk), end to end.

mailgw runs with a software crypto PMD (crypto_aesni_gcm, else
crypto_openssl) under an EAL without hugepages or PCI, in front of a real
Postfix and Dovecot; real clients talk to it:

  - 5 MiB messages in over submission (STARTTLS) and SMTPS, TLS 1.2 and 1.3,
    AES-128-GCM and AES-256-GCM, checked byte for byte in the maildir; the
    log says engine=dpdk tx=dpdk rx=dpdk with the version and suite asked for;
  - a 5 MiB message out over IMAP STARTTLS, IMAPS, POP3 STLS and POP3S,
    TLS 1.2 and 1.3, byte for byte against what Dovecot serves directly;
  - swaks, curl and openssl s_client through the engine; close_notify both
    ways; resumed sessions; a HelloRetryRequest;
  - TLS 1.3 KeyUpdate from s_client, with and without update_requested:
    alone, in the middle of a message (held back by a proxy so that data
    records follow it in the same segment), and during a download (the
    gateway's own KeyUpdate goes out between its data records); the replies
    are intact and mailgw_dpdk_keyupdates_total counts them;
  - the engine's counters against known sessions;
  - client records a proxy tampered with: a flipped ciphertext byte ends
    that session with bad_record_mac while a transfer beside it on the same
    worker (and queue pair) completes intact; a wrong version, a length over
    2^14+256, a record too short for its tag, a handshake or
    ChangeCipherSpec record after the handshake end it with the alert RFC
    8446/5246 name and count a protocol error; EOF inside a record; records
    cut into small segments still decrypt; a server record corrupted on the
    way makes the client send an alert, which is counted;
  - ChaCha20-Poly1305 is declined: the session is served in userspace and
    counted as a DPDK fallback, logged once per cause;
  - two workers, 20 concurrent uploads; SIGHUP with sessions open, and two
    reloads that leave the newest worker without a queue pair (a fallback
    with that cause) until the old workers leave; a worker killed with
    SIGKILL mid transfer and respawned with fresh buffer pools, also beside
    a second worker whose transfer goes on; SIGTERM with transfers open;
    the other software PMD;
  - configuration: mode = dpdk without dpdk_args, and a device that does not
    exist, fail at start with a file:line message; mode = auto carries on.

Gateways made inside a case (kill, SIGTERM, other PMD, mode = auto) are
stopped and checked there; the case runner checks gw and gw2.  Needs a
mailgw built with DPDK and root (Postfix, Dovecot); says SKIP with the
reason when the binary has no DPDK or no software crypto PMD exists.
"""
import array
import fcntl
import http.client
import imaplib
import os
import poplib
import random
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import termios
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403
import mailstack  # noqa: E402

SENDER = "sender@example.org"
ALICE = "alice@example.test"
MiB = 1024 * 1024

EAL = "--no-huge --no-pci --no-shconf -m 256"
PMDS = ("crypto_aesni_gcm0", "crypto_openssl0")

V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
VNAME = {V12: "TLSv1.2", V13: "TLSv1.3"}
# What the gateway logs (and the client reports) for each (version, key size).
SUITE = {(V12, 128): "ECDHE-ECDSA-AES128-GCM-SHA256",
         (V12, 256): "ECDHE-ECDSA-AES256-GCM-SHA384",
         (V13, 128): "TLS_AES_128_GCM_SHA256",
         (V13, 256): "TLS_AES_256_GCM_SHA384"}

# gw2 offers AES-256-GCM only: the one way to get TLS_AES_256_GCM_SHA384
# from Python's ssl, which cannot restrict the TLS 1.3 suites it offers.
GW2_TLS = {"ciphersuites": "TLS_AES_256_GCM_SHA384", "ciphers": "ECDHE-ECDSA-AES256-GCM-SHA384"}

UP_BODY = random_body(5 * MiB, seed=11)
BIG_BODY = random_body(5 * MiB, seed=5)
BIG_SUBJECT = unique("dpdk-big")


def dpdk_args(pmd):
    return "%s --vdev %s" % (EAL, pmd)


def dpdk_offload(pmd):
    return {"mode": "dpdk", "dpdk_args": dpdk_args(pmd)}


def metrics_section(port):
    return "\n[metrics]\nlisten = 127.0.0.1:%d\n" % port


def mail_listeners(st, names):
    host = {"hostname": GATEWAY_NAME}
    table = {
        "submission": ("smtp", "starttls", st.smtp_backend, {"require_tls": "yes"}),
        "smtps": ("smtp", "implicit", st.smtp_backend, {}),
        "imap": ("imap", "starttls", st.imap_backend, {"require_tls": "yes"}),
        "imaps": ("imap", "implicit", st.imap_backend, {}),
        "pop3": ("pop3", "starttls", st.pop3_backend, {"require_tls": "yes"}),
        "pop3s": ("pop3", "implicit", st.pop3_backend, {}),
    }
    out = []
    for n in names:
        proto, tls, backend, extra = table[n]
        out.append(listener(n, proto, tls, backend, **dict(host, **extra)))
    return out


def start_dpdk_gateway(st, names, pmd, workers=1, tls_opts=None, metrics=True):
    """A started gateway in mode = dpdk on pmd, with a metrics endpoint."""
    mport = free_port() if metrics else None
    gw = st.gateway(mail_listeners(st, names), offload=dpdk_offload(pmd),
                    global_opts={"workers": workers}, tls_opts=tls_opts,
                    extra=metrics_section(mport) if metrics else "")
    gw.start()
    gw.metrics_port = mport
    if metrics:
        mailstack.wait_port("127.0.0.1", mport, 10, gw.proc, "mailgw metrics")
    return gw


def probe_pmd(st):
    """The first software crypto PMD this mailgw can start; Skip if none."""
    why = []
    for pmd in PMDS:
        gw = st.gateway(mail_listeners(st, ["smtps"]), offload=dpdk_offload(pmd))
        try:
            gw.start()
        except GatewayDied:
            log = gw.log()
            gw.kill()
            if "built without DPDK" in log:
                raise Skip("this mailgw was built without DPDK (libdpdk-dev)")
            if re.search(r"failed to parse device|no crypto device|Unable to parse device", log):
                why.append("%s: %s" % (pmd, mailstack.tail(log, 1)))
                continue
            raise
        gw.stop()
        return pmd
    raise Skip("no software crypto PMD can be started: %s" % "; ".join(why))


def setup():
    if not have_tool("openssl"):
        raise Skip("openssl is not installed")
    st = Stack("dpdk").start()
    pmd = probe_pmd(st)
    all_names = ["submission", "smtps", "imap", "imaps", "pop3", "pop3s"]
    gw = start_dpdk_gateway(st, all_names, pmd)
    gw2 = start_dpdk_gateway(st, ["submission", "smtps", "imaps", "pop3s"], pmd, workers=2,
                             tls_opts=GW2_TLS)
    t = Ctx(st, gw=gw, gw2=gw2)
    t.pmd = pmd
    # The download reference, put into bob's maildir by Postfix directly.
    deliver_direct(st, "bob", BIG_SUBJECT, BIG_BODY)
    t.big_uid, t.big_ref = imap_fetch_direct(st, "bob", BIG_SUBJECT)
    check_same_bytes(body_of(t.big_ref), BIG_BODY, "reference message from Dovecot")
    return t


# --- small helpers ------------------------------------------------------------

def ctx_for(t, version, bits=128):
    """A client context that can only negotiate version with AES-bits-GCM
    (for TLS 1.3 the gateway's suite list decides, see GW2_TLS)."""
    ciphers = None
    if version == V12:
        ciphers = SUITE[(V12, bits)]
    return tls_context(t.certs, minv=version, maxv=version, ciphers=ciphers)


def gw_for(t, version, bits):
    """The gateway that gives (version, bits) to a Python client."""
    return t.gw2 if (version, bits) == (V13, 256) else t.gw


EST_RX = (r"(?P<worker>w\d+) \[(?P<listener>[^\]]+)\] 127\.0\.0\.1:%s sid=\S+ TLS established "
          r"version=(?P<version>\S+) cipher=(?P<cipher>\S+) sni=\S+ engine=(?P<engine>\S+) "
          r"tx=(?P<tx>\S+) rx=(?P<rx>\S+)")


def established(gw, port, offset, timeout=5.0):
    """The `TLS established` fields of the session from 127.0.0.1:port."""
    rx = re.compile(EST_RX % port)
    deadline = time.monotonic() + timeout
    while True:
        hits = list(rx.finditer(gw.log()[offset:]))
        if hits:
            return hits[-1].groupdict()
        check(time.monotonic() < deadline, "no `TLS established` line for client port %s "
              "within %.0f s", port, timeout)
        time.sleep(0.05)


def established_on(gw, name, offset, n=1, timeout=5.0):
    """The `TLS established` lines of listener name after offset: exactly n."""
    rx = re.compile(EST_RX.replace(r"\[(?P<listener>[^\]]+)\]", r"\[(?P<listener>%s)\]"
                                   % re.escape(name)) % r"\d+")
    deadline = time.monotonic() + timeout
    while True:
        hits = [m.groupdict() for m in rx.finditer(gw.log()[offset:])]
        if len(hits) >= n:
            check(len(hits) == n, "%d sessions on [%s], want %d", len(hits), name, n)
            return hits
        check(time.monotonic() < deadline, "%d `TLS established` lines on [%s] after %.0f s, "
              "want %d", len(hits), name, timeout, n)
        time.sleep(0.05)


def check_dpdk_session(est, version=None, cipher=None, what="session"):
    check(est["engine"] == "dpdk" and est["tx"] == "dpdk" and est["rx"] == "dpdk",
          "%s: engine=%s tx=%s rx=%s, want dpdk for all three", what, est["engine"], est["tx"],
          est["rx"])
    if version:
        check_eq(est["version"], version, "%s: logged version" % what)
    if cipher:
        check_eq(est["cipher"], cipher, "%s: logged cipher" % what)


def smtp_mail(c, subject, body):
    """After the greeting on Conn c: EHLO, one message to ALICE, QUIT."""
    c.smtp_expect("EHLO client.example.org", 250)
    c.smtp_expect("MAIL FROM:<%s>" % SENDER, 250)
    c.smtp_expect("RCPT TO:<%s>" % ALICE, 250)
    c.smtp_expect("DATA", 354)
    c.send(dot_stuff(make_message(subject, body)))
    check_eq(c.smtp_reply()[0], 250, "reply to the end of DATA")
    c.smtp_expect("QUIT", 221)


def workers_of(gw):
    return [p for p in mailstack.group_processes(gw.proc.pid) if p != gw.proc.pid]


def wait_workers(gw, n, timeout=15.0, exclude=()):
    """Wait until gw has exactly n workers, none of them in exclude."""
    deadline = time.monotonic() + timeout
    while True:
        gw.check()
        w = workers_of(gw)
        if len(w) == n and not set(w) & set(exclude):
            return w
        check(time.monotonic() < deadline, "gateway has workers %s after %.0f s, want %d "
              "(not %s)", w, timeout, n, list(exclude))
        time.sleep(0.05)


def parallel(fns, timeout=90):
    errors = []

    def wrap(i, fn):
        try:
            fn()
        except Exception as e:
            errors.append("#%d: %s: %s" % (i, type(e).__name__, e))

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True)
               for i, fn in enumerate(fns)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(max(0.1, deadline - time.monotonic()))
    check(not any(th.is_alive() for th in threads), "sessions still running after %d s",
          timeout)
    check(not errors, "%d of %d sessions failed; first: %s", len(errors), len(fns),
          errors[0] if errors else "")


# --- metrics ------------------------------------------------------------------

SAMPLE_RX = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$")
LABEL_RX = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    def __init__(self, text):
        self.samples = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = SAMPLE_RX.match(line)
            check(m is not None, "unparsable exposition line: %r", line)
            labels = tuple(sorted(LABEL_RX.findall(m.group(2) or "")))
            self.samples[(m.group(1), labels)] = float(m.group(3))

    def get(self, name, **labels):
        key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
        check(key in self.samples, "no sample %s%s in /metrics", name, labels or "")
        return self.samples[key]

    def sum(self, name):
        return sum(v for (n, _), v in self.samples.items() if n == name)


def scrape(gw):
    c = http.client.HTTPConnection("127.0.0.1", gw.metrics_port, timeout=5)
    try:
        c.request("GET", "/metrics")
        r = c.getresponse()
        body = r.read()
        check_eq(r.status, 200, "GET /metrics status")
    finally:
        c.close()
    return Metrics(body.decode("utf-8"))


def scrape_idle(gw, timeout=10.0):
    """A scrape taken once no session is open any more."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(gw)
        active = m.sum("mailgw_active_connections")
        if active == 0:
            return m
        check(time.monotonic() < deadline, "mailgw_active_connections = %d %.0f s after "
              "every client finished", active, timeout)
        time.sleep(0.05)


DPDK_COUNTERS = [("mailgw_offload_total", {"mode": "dpdk", "direction": "tx"}),
                 ("mailgw_offload_total", {"mode": "dpdk", "direction": "rx"}),
                 ("mailgw_offload_total", {"mode": "userspace", "direction": "tx"}),
                 ("mailgw_offload_total", {"mode": "userspace", "direction": "rx"}),
                 ("mailgw_dpdk_fallback_total", {}),
                 ("mailgw_dpdk_records_total", {"direction": "tx"}),
                 ("mailgw_dpdk_records_total", {"direction": "rx"}),
                 ("mailgw_dpdk_bursts_total", {}),
                 ("mailgw_dpdk_errors_total", {"reason": "bad_record_mac"}),
                 ("mailgw_dpdk_errors_total", {"reason": "device"}),
                 ("mailgw_dpdk_errors_total", {"reason": "peer_alert"}),
                 ("mailgw_dpdk_errors_total", {"reason": "protocol"}),
                 ("mailgw_dpdk_keyupdates_total", {})]


def counters(gw, idle=True):
    m = scrape_idle(gw) if idle else scrape(gw)
    out = {}
    for name, labels in DPDK_COUNTERS:
        key = name + ("{%s}" % ",".join("%s=%s" % kv for kv in sorted(labels.items()))
                      if labels else "")
        out[key] = m.get(name, **labels)
    return out


def delta(before, after):
    return {k: after[k] - before[k] for k in after}


OFF_DPDK_TX = "mailgw_offload_total{direction=tx,mode=dpdk}"
OFF_DPDK_RX = "mailgw_offload_total{direction=rx,mode=dpdk}"
OFF_US_TX = "mailgw_offload_total{direction=tx,mode=userspace}"
OFF_US_RX = "mailgw_offload_total{direction=rx,mode=userspace}"
FALLBACK = "mailgw_dpdk_fallback_total"
REC_TX = "mailgw_dpdk_records_total{direction=tx}"
REC_RX = "mailgw_dpdk_records_total{direction=rx}"
BURSTS = "mailgw_dpdk_bursts_total"
ERR_MAC = "mailgw_dpdk_errors_total{reason=bad_record_mac}"
ERR_DEV = "mailgw_dpdk_errors_total{reason=device}"
ERR_ALERT = "mailgw_dpdk_errors_total{reason=peer_alert}"
ERR_PROTO = "mailgw_dpdk_errors_total{reason=protocol}"
KEYUPD = "mailgw_dpdk_keyupdates_total"


def check_deltas(d, want, what):
    for k, v in want.items():
        check(d[k] == v, "%s: %s grew by %g, want %g (all deltas: %s)", what, k, d[k], v,
              {kk: vv for kk, vv in d.items() if vv})


# --- clients ------------------------------------------------------------------

def smtp_upload(gw, name, ctx, subject, body, to=ALICE, timeout=60):
    """Submit make_message(subject, body) through listener name (STARTTLS or
    implicit, as the listener is); returns (client port, negotiated cipher)."""
    host, port = gw.addr(name)
    implicit = [l for l in gw.listeners if l["name"] == name][0]["tls"] == "implicit"
    if implicit:
        s = smtplib.SMTP_SSL(host, port, timeout=timeout, context=ctx)
    else:
        s = smtplib.SMTP(host, port, timeout=timeout)
    try:
        cport = s.sock.getsockname()[1]
        s.ehlo("client.example.org")
        if not implicit:
            s.starttls(context=ctx)
            s.ehlo("client.example.org")
        cipher = s.sock.cipher()[0]
        refused = s.sendmail(SENDER, [to], make_message(subject, body, to=to))
        check_eq(refused, {}, "refused recipients")
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            pass
    return cport, cipher


def imap_fetch(gw, name, ctx, uid, user="bob", timeout=60):
    """(client port, cipher, message bytes) of uid, over IMAPS or STARTTLS."""
    host, port = gw.addr(name)
    if name.startswith("imaps"):
        m = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=timeout)
    else:
        m = imaplib.IMAP4(host, port, timeout=timeout)
        m.starttls(ssl_context=ctx)
    try:
        cport = m.sock.getsockname()[1]
        m.login(user, mailstack.USERS[user])
        m.select("INBOX", readonly=True)
        typ, data = m.uid("FETCH", uid, "(BODY.PEEK[])")
        check(typ == "OK" and isinstance(data[0], tuple), "FETCH failed: %r", data[:1])
        return cport, m.sock.cipher()[0], data[0][1]
    finally:
        m.logout()


def pop3_retr(gw, name, ctx, subject, user="bob", timeout=60):
    """(client port, cipher, message bytes) of the message with subject."""
    host, port = gw.addr(name)
    if name.startswith("pop3s"):
        p = poplib.POP3_SSL(host, port, context=ctx, timeout=timeout)
    else:
        p = poplib.POP3(host, port, timeout=timeout)
        p.stls(context=ctx)
    try:
        cport = p.sock.getsockname()[1]
        p.user(user)
        p.pass_(mailstack.USERS[user])
        count, _ = p.stat()
        for n in range(count, 0, -1):
            _, head, _ = p.top(n, 0)
            if ("Subject: %s" % subject).encode() in head:
                _, lines, _ = p.retr(n)
                return cport, p.sock.cipher()[0], b"\r\n".join(lines) + b"\r\n"
        raise AssertionError("message %r not found over POP3" % subject)
    finally:
        p.quit()


class TLSConn(Conn):
    """An implicit-TLS Conn with two knobs: a small receive buffer set
    before connect (no autotuning: a reader that pauses really stalls the
    sender), and ragged EOFs reported instead of read as a clean close."""

    def __init__(self, addr, tls_ctx, rcvbuf=None, strict_eof=False, timeout=30):
        self.timeout = timeout
        self.buf = b""
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect(addr)
        self.local_port = raw.getsockname()[1]
        self.sock = tls_ctx.wrap_socket(raw, server_hostname=GATEWAY_NAME,
                                        suppress_ragged_eofs=not strict_eof)


class Paused(threading.Thread):
    """A transfer that stops half-way: `midway` is set once it is under way,
    and it goes on when `resume` is set (or after 60 s)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.midway = threading.Event()
        self.resume = threading.Event()
        self.error = None
        self.port = None

    def run(self):
        try:
            self.transfer()
        except Exception as e:
            self.error = e
        finally:
            self.midway.set()

    def finish(self, what, timeout=60):
        self.resume.set()
        self.join(timeout)
        check(not self.is_alive(), "%s still running %d s after it was resumed", what, timeout)


class SlowUpload(Paused):
    """A raw SMTP submission whose DATA goes out in 32 KiB pieces, paced,
    pausing after pause_at bytes."""

    def __init__(self, gw, name, ctx, subject, body, pause_at=MiB):
        super().__init__()
        self.addr = gw.addr(name)
        self.implicit = name.startswith("smtps")
        self.ctx, self.subject, self.body, self.pause_at = ctx, subject, body, pause_at
        self.sent = 0

    def transfer(self):
        c = Conn(self.addr, timeout=30, tls_ctx=self.ctx if self.implicit else None)
        self.port = c.local_port
        try:
            c.smtp_reply()
            if not self.implicit:
                c.smtp_expect("EHLO client.example.org", 250)
                c.smtp_expect("STARTTLS", 220)
                c.starttls(self.ctx)
            c.smtp_expect("EHLO client.example.org", 250)
            c.smtp_expect("MAIL FROM:<%s>" % SENDER, 250)
            c.smtp_expect("RCPT TO:<%s>" % ALICE, 250)
            c.smtp_expect("DATA", 354)
            data = dot_stuff(make_message(self.subject, self.body))
            step = 32 * 1024
            while self.sent < len(data):
                if self.sent >= self.pause_at and not self.midway.is_set():
                    self.midway.set()
                    self.resume.wait(60)
                c.send(data[self.sent:self.sent + step])
                self.sent += len(data[self.sent:self.sent + step])
                time.sleep(0.002)
            check_eq(c.smtp_reply()[0], 250, "reply to the end of DATA")
            c.smtp_expect("QUIT", 221)
        finally:
            c.close()


class SlowFetch(Paused):
    """An IMAPS FETCH of the big message through a 64 KiB receive buffer that
    stops reading after pause_at bytes of the literal."""

    def __init__(self, gw, name, ctx, uid, pause_at=512 * 1024):
        super().__init__()
        self.addr = gw.addr(name)
        self.ctx, self.uid, self.pause_at = ctx, uid, pause_at
        self.data = None

    def transfer(self):
        c = TLSConn(self.addr, self.ctx, rcvbuf=64 * 1024)
        self.port = c.local_port
        try:
            c.line()
            c.imap_ok("a", "LOGIN bob %s" % mailstack.USERS["bob"])
            c.imap_ok("b", "EXAMINE INBOX")
            c.send("c UID FETCH %s (BODY.PEEK[])\r\n" % self.uid)
            head = c.line()
            m = re.search(r"\{(\d+)\}$", head)
            check(m is not None, "FETCH response without a literal: %r", head)
            n = int(m.group(1))
            got = []
            have = 0
            while have < n:
                if have >= self.pause_at and not self.midway.is_set():
                    self.midway.set()
                    self.resume.wait(60)
                chunk = c.read_exact(min(16384, n - have))
                got.append(chunk)
                have += len(chunk)
            self.data = b"".join(got)
            while True:
                line = c.line()
                if line.startswith("c "):
                    check(line.startswith("c OK"), "FETCH: %r", line)
                    break
            c.imap("d", "LOGOUT")
        finally:
            c.close()


class Stream:
    """Bytes one pipe of a child gives, collected by a thread; optionally
    read slowly (rate bytes/s) so that the child, and its peer, wait."""

    def __init__(self, f, rate=None):
        self.data = b""
        self.eof = False
        self.cond = threading.Condition()
        self.rate = rate
        threading.Thread(target=self._read, args=(f.fileno(),), daemon=True).start()

    def _read(self, fd):
        while True:
            try:
                b = os.read(fd, 16384 if self.rate else 65536)
            except OSError:
                b = b""
            with self.cond:
                if not b:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.data += b
                self.cond.notify_all()
            if self.rate:
                time.sleep(len(b) / self.rate)

    def mark(self):
        with self.cond:
            return len(self.data)

    def wait_for(self, pattern, start=0, timeout=15.0, what=None, name="s_client"):
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern, re.M)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.data, start)
                if m:
                    return m
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    tail_ = self.data[-600:].decode("utf-8", "replace")
                    raise AssertionError("%s: no %s %s; output tail: %s" % (
                        name, what or repr(pattern), "before it exited" if self.eof else
                        "within %.0f s" % timeout, " | ".join(tail_.splitlines())))
                self.cond.wait(min(left, 0.2))

    def wait_bytes(self, n, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.data) < n:
                left = deadline - time.monotonic()
                check(not self.eof and left > 0, "s_client: %d bytes of %s, want %d",
                      len(self.data), what, n)
                self.cond.wait(min(left, 0.2))


class SClientSession:
    """openssl s_client kept open.  Each line goes in its own write and the
    next waits for the answer, so that s_client reads one line at a time:
    "k" and "K" alone on a line are its KeyUpdate commands, "R" its
    renegotiation, and a line starting with Q quits (so SMTP verbs that
    start with R or Q are sent in lower case).  Commands need -ign_eof off.
    Verbose: stdout and stderr in one stream (handshake details, KEYUPDATE,
    server data).  Quiet (-quiet -no_ign_eof): stdout is the server's bytes
    only, stderr says KEYUPDATE; -msg output goes to msgfile.  Every wait is
    bounded."""

    def __init__(self, addr, args, starttls="smtp", cafile=None, quiet=False, msgfile=None,
                 rate=None):
        host, port = addr
        cmd = ["openssl", "s_client", "-connect", "%s:%d" % (host, port), "-crlf",
               "-servername", GATEWAY_NAME]
        if starttls:
            cmd += ["-starttls", starttls]
        if cafile:
            cmd += ["-CAfile", cafile, "-verify_return_error"]
        if quiet:
            cmd += ["-quiet", "-no_ign_eof"]
        if msgfile:
            cmd += ["-msg", "-msgfile", msgfile]
        cmd += list(args)
        self.quiet = quiet
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE if quiet else subprocess.STDOUT)
        self.out = Stream(self.proc.stdout, rate)
        self.err = Stream(self.proc.stderr) if quiet else self.out

    def text(self):
        with self.out.cond:
            return self.out.data.decode("utf-8", "replace")

    def mark(self):
        return self.out.mark()

    def wait_for(self, pattern, start=0, timeout=15.0, what=None):
        return self.out.wait_for(pattern, start, timeout, what)

    def send(self, line):
        self.write(line.encode() + b"\n")

    def write(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def drained(self, timeout=20.0):
        """Wait until s_client has read everything written to its stdin, so
        that the next write is a read of its own."""
        deadline = time.monotonic() + timeout
        buf = array.array("i", [0])
        while True:
            fcntl.ioctl(self.proc.stdin.fileno(), termios.FIONREAD, buf)
            if buf[0] == 0:
                time.sleep(0.05)
                return
            check(time.monotonic() < deadline and self.proc.poll() is None,
                  "s_client left %d bytes of its input unread", buf[0])
            time.sleep(0.01)

    def ask(self, line, pattern, what=None, timeout=15.0):
        start = self.mark()
        self.send(line)
        return self.wait_for(pattern, start, timeout, what or "answer to %r" % line)

    def key_update(self, letter):
        """s_client's k (update_not_requested) or K (update_requested)."""
        start = self.err.mark()
        self.send(letter)
        self.err.wait_for(r"^KEYUPDATE$", start, 10, "KEYUPDATE for %r" % letter)

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def handshake_done(self):
        self.wait_for(r"^\s*Verify return code: \d+", 0, 20, "completed handshake")


def smtp_dialogue(sc):
    """EHLO, NOOP and quit through an s_client session; checks the replies.
    "quit" is lower case: s_client takes a line starting with Q as its own
    quit command."""
    sc.ask("EHLO client.example.org", r"^250 \S", "final 250 line of the EHLO reply")
    sc.ask("NOOP", r"^250 2\.0\.0", "250 to NOOP")
    sc.ask("quit", r"^221 ", "221 to QUIT")


# --- 1. uploads ---------------------------------------------------------------

def upload_case(name, version, bits):
    def run_case(t):
        gw = gw_for(t, version, bits)
        off = len(gw.log())
        subject = unique("up-%s-%s-%d" % (name, VNAME[version], bits))
        cport, cipher = smtp_upload(gw, name, ctx_for(t, version, bits), subject, UP_BODY)
        check_eq(cipher, SUITE[(version, bits)], "cipher the client negotiated")
        msg = t.stack.wait_for_message("alice", "Subject: %s" % subject, timeout=60)
        check_same_bytes(body_of(msg), lf(UP_BODY), "body in the maildir")
        check_dpdk_session(established(gw, cport, off), VNAME[version], SUITE[(version, bits)])
    return run_case


UPLOADS = [("dpdk_upload_%s_%s_aes%d" % (n, VNAME[v].replace("TLSv", "tls").replace(".", ""), b),
            upload_case(n, v, b), 120)
           for n in ("submission", "smtps") for v in (V12, V13) for b in (128, 256)]


# --- 2. downloads -------------------------------------------------------------

def download_case(proto, name, version, bits):
    def run_case(t):
        gw = gw_for(t, version, bits)
        off = len(gw.log())
        ctx = ctx_for(t, version, bits)
        if proto == "imap":
            cport, cipher, msg = imap_fetch(gw, name, ctx, t.big_uid)
            check_same_bytes(msg, t.big_ref, "message fetched over %s" % name)
        else:
            cport, cipher, msg = pop3_retr(gw, name, ctx, BIG_SUBJECT)
            check_same_bytes(body_of(msg), BIG_BODY, "body retrieved over %s" % name)
        check_eq(cipher, SUITE[(version, bits)], "cipher the client negotiated")
        check_dpdk_session(established(gw, cport, off), VNAME[version], SUITE[(version, bits)])
    return run_case


DOWNLOADS = [("dpdk_download_%s_%s_aes%d" % (n, VNAME[v].replace("TLSv", "tls").replace(".", ""),
                                              b), download_case(p, n, v, b), 120)
             for p, n, v, b in [("imap", "imap", V12, 128), ("imap", "imap", V13, 128),
                                ("imap", "imaps", V12, 256), ("imap", "imaps", V13, 256),
                                ("pop3", "pop3", V12, 256), ("pop3", "pop3", V13, 128),
                                ("pop3", "pop3s", V12, 128), ("pop3", "pop3s", V13, 256)]]


# --- 3. real client tools -----------------------------------------------------

def swaks_starttls(t):
    need_tool("swaks")
    subject = unique("swaks")
    body = random_body(256 * 1024, seed=21)
    off = len(t.gw.log())
    with tempfile.NamedTemporaryFile(suffix=".txt", dir=t.stack.dir) as f:
        f.write(body)
        f.flush()
        rc, out = swaks(t.gw.addr("submission"),
                        ["--tls", "--from", SENDER, "--to", ALICE, "--ehlo", "client.example.org",
                         "--header", "Subject: %s" % subject, "--body", f.name,
                         "--suppress-data"])
    check(rc == 0, "swaks exit %d: %s", rc, out[-400:])
    check("TLS started" in out, "swaks did not start TLS: %s", out[-400:])
    msg = t.stack.wait_for_message("alice", "Subject: %s" % subject)
    got = body_of(msg)
    # swaks ends the DATA with blank lines of its own after the file's bytes
    check_same_bytes(got[:len(lf(body))], lf(body), "swaks message body in the maildir")
    check(got[len(lf(body)):].strip(b"\n") == b"", "bytes after the body: %r",
          got[len(lf(body)):][:80])
    check_dpdk_session(established_on(t.gw, "submission", off)[0], what="swaks session")


def curl_fetch(t):
    need_tool("curl")
    off = len(t.gw.log())
    common = ["--ssl-reqd", "--cacert", t.certs.bundle, "-u", "bob:bobpw"]
    rc, out, err = curl(common + ["--tlsv1.3", "imaps://127.0.0.1:%d/INBOX;UID=%s"
                                  % (t.gw.port("imaps"), t.big_uid)])
    check(rc == 0, "curl imaps FETCH exit %d: %s", rc, err.strip())
    check_same_bytes(out, t.big_ref, "message fetched by curl over IMAPS")
    check_dpdk_session(established_on(t.gw, "imaps", off)[0], "TLSv1.3",
                       what="curl imaps session")
    rc, out, err = curl(common + ["--tlsv1.2", "--tls-max", "1.2", "--ciphers",
                                  SUITE[(V12, 256)], "pop3s://127.0.0.1:%d/1"
                                  % t.gw.port("pop3s")])
    check(rc == 0, "curl pop3s RETR exit %d: %s", rc, err.strip())
    check(("Subject: %s" % BIG_SUBJECT).encode() in out, "curl pop3s RETR 1 is not the "
          "reference message: %r", out[:200])
    check_same_bytes(body_of(out), BIG_BODY, "body retrieved by curl over POP3S")
    check_dpdk_session(established_on(t.gw, "pop3s", off)[0], "TLSv1.2", SUITE[(V12, 256)],
                       what="curl pop3s session")


def curl_smtps_upload(t):
    need_tool("curl")
    subject = unique("curl")
    body = random_body(MiB, seed=22)
    off = len(t.gw.log())
    with tempfile.NamedTemporaryFile(suffix=".eml", dir=t.stack.dir) as f:
        f.write(make_message(subject, body))
        f.flush()
        rc, out, err = curl(["--ssl-reqd", "--cacert", t.certs.bundle, "--tlsv1.3",
                             "smtps://127.0.0.1:%d" % t.gw.port("smtps"),
                             "--mail-from", SENDER, "--mail-rcpt", ALICE, "-T", f.name])
    check(rc == 0, "curl smtps exit %d: %s", rc, err.strip())
    msg = t.stack.wait_for_message("alice", "Subject: %s" % subject)
    check_same_bytes(body_of(msg), lf(body), "curl-submitted body in the maildir")
    check_dpdk_session(established_on(t.gw, "smtps", off)[0], "TLSv1.3", what="curl session")


def s_client_starttls_smtp(t):
    for args, version, cipher in [
            (["-tls1_3", "-ciphersuites", SUITE[(V13, 256)]], "TLSv1.3", SUITE[(V13, 256)]),
            (["-tls1_2", "-cipher", SUITE[(V12, 128)]], "TLSv1.2", SUITE[(V12, 128)])]:
        off = len(t.gw.log())
        sc = SClientSession(t.gw.addr("submission"), args, cafile=t.certs.bundle)
        try:
            sc.handshake_done()
            smtp_dialogue(sc)
        finally:
            sc.close()
        check(re.search(r"(?m)^\s*Verify return code: 0 \(ok\)", sc.text()),
              "s_client did not verify the gateway's certificate")
        check_dpdk_session(established_on(t.gw, "submission", off)[0], version, cipher,
                           what="s_client %s session" % version)


# --- 4. KeyUpdate -------------------------------------------------------------

KU_SENT = r"^>>> TLS 1\.3, Handshake \[length 0005\], KeyUpdate"
KU_RECEIVED = r"^<<< TLS 1\.3, Handshake \[length 0005\], KeyUpdate"


def keyupdate_s_client(t):
    before = counters(t.gw)
    off = len(t.gw.log())
    sc = SClientSession(t.gw.addr("submission"), ["-tls1_3", "-msg"], cafile=t.certs.bundle)
    try:
        sc.handshake_done()
        # k: KeyUpdate, update_not_requested; it goes out ahead of the EHLO
        # record, which the gateway must decrypt with the next keys.
        sc.key_update("k")
        sc.ask("EHLO client.example.org", r"^250 \S", "EHLO reply after a KeyUpdate")
        check(len(re.findall(KU_RECEIVED, sc.text(), re.M)) == 0,
              "the gateway sent a KeyUpdate that was not asked for")
        # K: update_requested: the gateway's own KeyUpdate must precede the
        # reply to NOOP, else s_client cannot read it.
        sc.key_update("K")
        sc.ask("NOOP", r"^250 2\.0\.0", "NOOP reply after a requested KeyUpdate")
        sc.ask("quit", r"^221 ", "221 to QUIT")
    finally:
        sc.close()
    text = sc.text()
    check_eq(len(re.findall(KU_SENT, text, re.M)), 2, "KeyUpdate messages s_client sent")
    check_eq(len(re.findall(KU_RECEIVED, text, re.M)), 1,
             "KeyUpdate messages the gateway sent (one, for update_requested)")
    est = established_on(t.gw, "submission", off)[0]
    check_dpdk_session(est, "TLSv1.3", what="s_client session")
    d = delta(before, counters(t.gw))
    check_deltas(d, {KEYUPD: 2, ERR_PROTO: 0, ERR_MAC: 0, ERR_ALERT: 0, ERR_DEV: 0},
                 "after two KeyUpdates")
    check(not re.search(r"(?i)KeyUpdate.*(fail|error)|read from client failed",
                        t.gw.log()[off:]), "the gateway logged a failure: %s",
          mailstack.tail(t.gw.log()[off:], 5))


def sclient_body(size, seed):
    """LF lines that s_client passes on as they are: no letter it would take
    for a command at the start of a read (Q, R, K, k), no leading dot."""
    rnd = random.Random(seed)
    alphabet = "abcdefghijlmnopqrstuvwxyz0123456789"
    lines = []
    total = 0
    while total < size:
        lines.append("".join(rnd.choices(alphabet, k=76)))
        total += 77
    return ("\n".join(lines) + "\n").encode()


MSG_HDR_IN = r"^<<< TLS 1\.\d, RecordHeader \[length 0005\]"


def msg_lines(path):
    return mailstack.read_file(path)


def keyupdate_mid_upload(t):
    """k and K between the parts of a message's DATA, through a proxy that
    holds each KeyUpdate record back and sends it in one write with the
    data records after it: the engine finds records behind the KeyUpdate in
    the same read, submitted with the old keys, and must decrypt them again
    with the new ones."""
    gw = t.gw
    before = counters(gw)
    off = len(gw.log())
    proxy = RecordProxy(gw.addr("smtps"), coalesce_len=22)
    msgfile = os.path.join(t.stack.dir, "ku-upload.msg")
    sc = SClientSession(proxy.addr, ["-tls1_3"], starttls=None, cafile=t.certs.bundle,
                        quiet=True, msgfile=msgfile)
    subject = unique("ku-upload")
    parts = [sclient_body(256 * 1024, seed) for seed in (61, 62, 63)]
    try:
        sc.wait_for(r"^220 ", 0, 20, "greeting")
        sc.ask("EHLO client.example.org", r"^250 \S", "end of the EHLO reply")
        sc.ask("MAIL FROM:<%s>" % SENDER, r"^250 ")
        sc.ask("rcpt to:<%s>" % ALICE, r"^250 ")
        sc.ask("DATA", r"^354 ")
        sc.write(("From: <%s>\nTo: <%s>\nSubject: %s\n\n" % (SENDER, ALICE, subject)).encode())
        sc.drained()
        sc.write(parts[0])
        sc.drained()
        sc.key_update("k")
        sc.write(parts[1])
        sc.drained()
        sc.key_update("K")
        sc.write(parts[2])
        sc.drained()
        sc.ask(".", r"^250 ", "250 for the message", timeout=30)
        sc.ask("quit", r"^221 ")
    finally:
        sc.close()
    msg = t.stack.wait_for_message("alice", "Subject: %s" % subject, timeout=30)
    check_same_bytes(body_of(msg), b"".join(parts), "body with two KeyUpdates inside")
    check_eq(proxy.coalesced, 2, "KeyUpdate records sent together with data records")
    msgs = msg_lines(msgfile)
    check_eq(len(re.findall(KU_SENT, msgs, re.M)), 2, "KeyUpdates s_client sent")
    check_eq(len(re.findall(KU_RECEIVED, msgs, re.M)), 1, "KeyUpdates the gateway sent")
    check_dpdk_session(established(gw, proxy.upstream_port, off), "TLSv1.3")
    d = delta(before, counters(gw))
    check_deltas(d, {KEYUPD: 2, ERR_MAC: 0, ERR_PROTO: 0, ERR_ALERT: 0, ERR_DEV: 0},
                 "two KeyUpdates inside a message")


def keyupdate_mid_download(t):
    """K while the gateway streams a 5 MiB FETCH reply (read by the client
    through a proxy at 4 MiB/s at most): the gateway's own KeyUpdate goes
    out between its data records; a second FETCH asked for after the K is
    answered under the new keys.  Both replies must be intact."""
    gw = t.gw
    before = counters(gw)
    off = len(gw.log())
    msgfile = os.path.join(t.stack.dir, "ku-download.msg")
    proxy = RecordProxy(gw.addr("imaps"), s2c_rate=4 * MiB)
    sc = SClientSession(proxy.addr, ["-tls1_3"], starttls=None, cafile=t.certs.bundle,
                        quiet=True, msgfile=msgfile)
    try:
        sc.wait_for(r"^\* OK", 0, 20, "greeting")
        sc.ask("a LOGIN bob %s" % mailstack.USERS["bob"], r"^a OK")
        sc.ask("b EXAMINE INBOX", r"^b OK")
        start = sc.mark()
        sc.send("c0 UID FETCH %s (BODY.PEEK[])" % t.big_uid)
        sc.out.wait_bytes(start + 512 * 1024, 30, "the FETCH reply")
        sc.key_update("K")
        sc.send("c1 UID FETCH %s (BODY.PEEK[]<0.%d>)" % (t.big_uid, MiB))
        sc.wait_for(r"^c1 OK", start, 60, "end of the second FETCH")
        sc.ask("d LOGOUT", r"^d OK")
    finally:
        sc.close()
    data = sc.out.data
    pos = start
    for tag, rx, want in (("c0", rb"BODY\[\] \{(\d+)\}\r\n", t.big_ref),
                          ("c1", rb"BODY\[\]<0> \{(\d+)\}\r\n", t.big_ref[:MiB])):
        m = re.compile(rx).search(data, pos)
        check(m is not None, "FETCH reply %s not found", tag)
        size = int(m.group(1))
        check_same_bytes(data[m.end():m.end() + size], want, "literal of FETCH %s" % tag)
        pos = m.end() + size
    msgs = msg_lines(msgfile)
    check_eq(len(re.findall(KU_SENT, msgs, re.M)), 1, "KeyUpdates s_client sent")
    got = [m.start() for m in re.finditer(KU_RECEIVED, msgs, re.M)]
    check_eq(len(got), 1, "KeyUpdates the gateway sent")
    after = len(re.findall(MSG_HDR_IN, msgs[got[0]:], re.M))
    check(after >= MiB // 16384, "only %d records came after the gateway's KeyUpdate", after)
    check_dpdk_session(established(gw, proxy.upstream_port, off), "TLSv1.3")
    d = delta(before, counters(gw))
    check_deltas(d, {KEYUPD: 1, ERR_MAC: 0, ERR_PROTO: 0, ERR_ALERT: 0, ERR_DEV: 0},
                 "a KeyUpdate during a download")


# --- 5. metrics ---------------------------------------------------------------

def metrics_exact(t):
    before = counters(t.gw)
    c13, c12 = ctx_for(t, V13), ctx_for(t, V12, 256)
    body = random_body(MiB, seed=23)
    subjects = [unique("m1"), unique("m2")]
    smtp_upload(t.gw, "submission", c13, subjects[0], body)
    smtp_upload(t.gw, "smtps", c12, subjects[1], body)
    imap_fetch(t.gw, "imaps", c13, t.big_uid)
    imap_fetch(t.gw, "imap", c12, t.big_uid)
    pop3_retr(t.gw, "pop3s", c13, BIG_SUBJECT)
    host, port = t.gw.addr("pop3")
    p = poplib.POP3(host, port, timeout=TIMEOUT)
    p.stls(context=c12)
    p.user("bob")
    p.pass_("bobpw")
    p.stat()
    p.quit()
    n = 6
    for s in subjects:
        t.stack.wait_for_message("alice", "Subject: %s" % s, timeout=30)
    after = counters(t.gw)
    d = delta(before, after)
    check_deltas(d, {OFF_DPDK_TX: n, OFF_DPDK_RX: n, OFF_US_TX: 0, OFF_US_RX: 0, FALLBACK: 0,
                     ERR_MAC: 0, ERR_DEV: 0, ERR_ALERT: 0, ERR_PROTO: 0, KEYUPD: 0},
                 "%d sessions" % n)
    # 2 MiB in and 15 MiB out, at most 16 KiB of plaintext per record
    check(d[REC_RX] >= 2 * MiB // 16384, "records_total{rx} grew by %d for 2 MiB uploaded",
          d[REC_RX])
    check(d[REC_TX] >= 3 * 5 * MiB // 16384, "records_total{tx} grew by %d for 15 MiB "
          "downloaded", d[REC_TX])
    check(d[BURSTS] > 0, "bursts_total did not grow")
    check(d[BURSTS] <= d[REC_TX] + d[REC_RX], "bursts grew by %d, more than the %d records",
          d[BURSTS], d[REC_TX] + d[REC_RX])
    check(after[BURSTS] <= after[REC_TX] + after[REC_RX], "bursts_total %d > records %d",
          after[BURSTS], after[REC_TX] + after[REC_RX])


# --- 6. records a client (or a proxy) got wrong -------------------------------

class RecordProxy:
    """Relays one TCP connection to target and works on the TLS records on
    the way (the handshake included: it is for implicit-TLS listeners).

    c2s_edit(n, rec) is called for the client's nth application_data record
    (content type 23; in TLS 1.3 the first is the client's Finished) and
    returns the bytes to send in its place, or (bytes, "cut") to send them
    and then close the connection; s2c_edit(proxy, rec) likewise for the
    server's type-23 records.  coalesce_len: a client type-23 record of that
    body length (a TLS 1.3 KeyUpdate: 22) is held back and sent in one write
    with the records after it.  slices: everything the client sends goes on
    in small, separate segments.  s2c_rate: the server's bytes are read at
    most that fast, through a 64 KiB receive buffer, so that the server
    stays in the middle of what it sends."""

    def __init__(self, target, c2s_edit=None, s2c_edit=None, coalesce_len=None, slices=False,
                 s2c_rate=None):
        self.target = target
        self.c2s_edit, self.s2c_edit = c2s_edit, s2c_edit
        self.coalesce_len, self.slices, self.s2c_rate = coalesce_len, slices, s2c_rate
        self.c2s_app = self.s2c_app = 0
        self.edited = threading.Event()
        self.coalesced = 0          # writes that carried a held record and others
        self.upstream_port = None
        self.connected = threading.Event()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.lsock.settimeout(30)
        self.addr = self.lsock.getsockname()
        self.rnd = random.Random(7)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        try:
            c, _ = self.lsock.accept()
        except OSError:
            return
        finally:
            self.lsock.close()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.s2c_rate:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.settimeout(30)
        try:
            s.connect(self.target)
        except OSError:
            c.close()
            s.close()
            return
        self.upstream_port = s.getsockname()[1]
        self.connected.set()
        for sock in (c, s):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=self._pump, args=(s, c, False), daemon=True).start()
        self._pump(c, s, True)

    def _send(self, dst, data, c2s):
        if not (c2s and self.slices):
            dst.sendall(data)
            return
        i = 0
        while i < len(data):
            n = self.rnd.randint(1, 1500)
            dst.sendall(data[i:i + n])
            i += n
            if self.rnd.random() < 0.05:
                time.sleep(0.001)

    def _pump(self, src, dst, c2s):
        buf = b""
        held, held_since = b"", 0.0
        src.settimeout(0.1)
        idle_since = time.monotonic()
        try:
            while True:
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    if held and time.monotonic() - held_since > 0.5:
                        self._send(dst, held, c2s)
                        held = b""
                    if time.monotonic() - idle_since > 60:
                        break
                    continue
                idle_since = time.monotonic()
                if not data:
                    break
                if not c2s and self.s2c_rate:
                    time.sleep(len(data) / self.s2c_rate)
                buf += data
                while len(buf) >= 5:
                    n = 5 + (buf[3] << 8 | buf[4])
                    if len(buf) < n:
                        break
                    rec, buf = buf[:n], buf[n:]
                    out, cut = rec, False
                    if rec[0] == 23:
                        if c2s:
                            self.c2s_app += 1
                            if self.c2s_edit:
                                out = self.c2s_edit(self.c2s_app, rec)
                        else:
                            self.s2c_app += 1
                            if self.s2c_edit:
                                out = self.s2c_edit(self, rec)
                        if isinstance(out, tuple):
                            out, cut = out[0], True
                        if out is None:
                            out = rec
                        if out != rec:
                            self.edited.set()
                    if c2s and self.coalesce_len and rec[0] == 23 and n - 5 == self.coalesce_len \
                            and self.c2s_app > 1 and not held:
                        held, held_since = out, time.monotonic()
                        continue
                    if held:
                        held += out
                        if len(held) < 40000 and not cut:
                            continue
                        out, held = held, b""
                        self.coalesced += 1
                    self._send(dst, out, c2s)
                    if cut:
                        raise EOFError
        except (OSError, EOFError):
            pass
        finally:
            try:
                if held:
                    self._send(dst, held, c2s)
            except OSError:
                pass
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def nth_record(n, fn):
    """A c2s_edit that applies fn to the nth client application record."""
    def edit(i, rec):
        return fn(bytearray(rec)) if i == n else None
    return edit


def flip_ciphertext(skip):
    def fn(rec):
        rec[5 + skip] ^= 0x01
        return bytes(rec)
    return fn


def third_app_record(version):
    """Index, among the client's type-23 records, of its third application
    data record: in TLS 1.3 the first type-23 record is its Finished."""
    return 4 if version == V13 else 3


def victim_session(t, proxy, version):
    """EHLO, NOOP, NOOP over SMTPS through proxy; the third record is the one
    a proxy edits.  Returns the exception the client got for it."""
    victim = Conn(proxy.addr, timeout=15, tls_ctx=ctx_for(t, version))
    try:
        code, _ = victim.smtp_reply()
        check_eq(code, 220, "victim's greeting")
        victim.smtp_expect("EHLO client.example.org", 250)
        victim.smtp_expect("NOOP", 250)
        try:
            reply = victim.smtp("NOOP")
        except ssl.SSLError as e:
            return e
        except (EOFError, ConnectionResetError, socket.timeout) as e:
            return e
        raise AssertionError("the edited record was answered: %r" % (reply,))
    finally:
        victim.close()


def check_alert(e, name, what):
    check(isinstance(e, ssl.SSLError) and name.replace("_", " ").upper()
          in str(e).replace("_", " ").upper(),
          "%s: the client got %s: %s, want a %s alert", what, type(e).__name__, e, name)


def bad_mac_case(version, beside):
    def run_case(t):
        gw = t.gw
        before = counters(gw)
        off = len(gw.log())
        # the transfer beside the victim: same worker, same queue pair
        if beside == "upload":
            other = SlowUpload(gw, "submission", ctx_for(t, V13), unique("beside"), UP_BODY)
        else:
            other = SlowFetch(gw, "imaps", ctx_for(t, V12, 256), t.big_uid)
        other.start()
        check(other.midway.wait(30), "the transfer beside the victim did not get going")
        check(other.error is None, "the transfer beside the victim failed early: %s",
              other.error)
        proxy = RecordProxy(gw.addr("smtps"), c2s_edit=nth_record(
            third_app_record(version), flip_ciphertext(0 if version == V13 else 8)))
        err = victim_session(t, proxy, version)
        check(proxy.edited.is_set(), "the proxy saw only %d application records",
              proxy.c2s_app)
        check_alert(err, "bad_record_mac", "corrupted record")
        line = gw.wait_log(r"127\.0\.0\.1:%d sid=\S+ .*bad record MAC" % proxy.upstream_port,
                           5, off)
        check(line is not None, "no log line naming the bad record MAC for the victim")
        gw.check()
        # the neighbour goes on and completes intact
        other.finish("the transfer beside the victim")
        check(other.error is None, "the transfer beside the victim failed: %s: %s",
              type(other.error).__name__, other.error)
        if beside == "upload":
            msg = t.stack.wait_for_message("alice", "Subject: %s" % other.subject, timeout=60)
            check_same_bytes(body_of(msg), lf(UP_BODY), "body uploaded beside the victim")
        else:
            check_same_bytes(other.data, t.big_ref, "message fetched beside the victim")
        check_dpdk_session(established(gw, other.port, off), what="session beside the victim")
        check_dpdk_session(established(gw, proxy.upstream_port, off), VNAME[version],
                           what="victim session")
        d = delta(before, counters(gw))
        check_deltas(d, {ERR_MAC: 1, ERR_DEV: 0, ERR_ALERT: 0, ERR_PROTO: 0,
                         OFF_DPDK_TX: 2, OFF_DPDK_RX: 2}, "one corrupted record")
        # and the gateway still serves new sessions through the engine
        off = len(gw.log())
        subject = unique("after-mac")
        cport, _ = smtp_upload(gw, "smtps", ctx_for(t, version), subject, b"after\r\n")
        t.stack.wait_for_message("alice", "Subject: %s" % subject)
        check_dpdk_session(established(gw, cport, off), what="session after the bad MAC")
    return run_case


def set_version(rec):
    rec[1:3] = b"\x03\x01"
    return bytes(rec)


def set_length_over_limit(rec):
    rec[3:5] = (16384 + 256 + 1).to_bytes(2, "big")   # RFC 8446 §5.2: 2^14 + 256 at most
    return bytes(rec)


def too_short_first(rec):
    return b"\x17\x03\x03\x00\x05" + bytes(5) + bytes(rec)


def set_type(typ):
    def fn(rec):
        rec[0] = typ
        return bytes(rec)
    return fn


def cut_half(rec):
    return bytes(rec[:len(rec) // 2]), "cut"


# name, version, edit of the third application record, alert the client
# must get (None: just the end of the connection), counter that grows,
# what the gateway logs
RECORD_EDITS = [
    ("bad_version_tls12", V12, set_version, "decode_error", ERR_PROTO, r"bad version"),
    ("bad_version_tls13", V13, set_version, "decode_error", ERR_PROTO, r"bad version"),
    ("over_length_limit_tls13", V13, set_length_over_limit, "record_overflow", ERR_PROTO,
     r"record over"),
    ("too_short_tls13", V13, too_short_first, "decode_error", ERR_PROTO, r"too short"),
    ("handshake_type_tls13", V13, set_type(22), "unexpected_message", ERR_PROTO,
     r"handshake record after the handshake"),
    ("ccs_type_tls12", V12, set_type(20), "unexpected_message", ERR_PROTO,
     r"unexpected record type"),
    ("cut_inside_record_tls12", V12, cut_half, None, None, r"closed inside a record"),
]


def record_edit_case(version, edit, alert, counter, logged):
    def run_case(t):
        gw = t.gw
        before = counters(gw)
        off = len(gw.log())
        proxy = RecordProxy(gw.addr("smtps"),
                            c2s_edit=nth_record(third_app_record(version), edit))
        err = victim_session(t, proxy, version)
        check(proxy.edited.is_set(), "the proxy saw only %d application records",
              proxy.c2s_app)
        if alert:
            check_alert(err, alert, "edited record")
        check(gw.wait_log(r"127\.0\.0\.1:%d sid=\S+ .*%s" % (proxy.upstream_port, logged), 5,
                          off), "no log line saying %r for the session", logged)
        check(gw.wait_log(r"127\.0\.0\.1:%d sid=\S+ close " % proxy.upstream_port, 5, off),
              "the session was not closed")
        check_dpdk_session(established(gw, proxy.upstream_port, off), VNAME[version])
        d = delta(before, counters(gw))
        want = {k: 0 for k in (ERR_MAC, ERR_DEV, ERR_ALERT, ERR_PROTO)}
        if counter:
            want[counter] = 1
        check_deltas(d, want, "one edited record")
        # the gateway is fine
        subject = unique("after-edit")
        smtp_upload(gw, "smtps", ctx_for(t, version), subject, b"after\r\n")
        t.stack.wait_for_message("alice", "Subject: %s" % subject)
    return run_case


RECORD_CASES = [("dpdk_client_record_" + name, record_edit_case(v, e, a, c, l))
                for name, v, e, a, c, l in RECORD_EDITS]


def peer_alert(t):
    """The server's record corrupted on the way: the client sends a fatal
    bad_record_mac alert, which the engine decrypts and counts."""
    for version in (V12, V13):
        gw = t.gw
        before = counters(gw)
        off = len(gw.log())

        def corrupt_reply(proxy, rec, skip=0 if version == V13 else 8):
            # the first server record after the client's EHLO: the EHLO reply
            if proxy.c2s_app >= third_app_record(version) - 2 and not proxy.edited.is_set():
                rec = bytearray(rec)
                rec[5 + skip] ^= 0x01
                return bytes(rec)
            return None

        proxy = RecordProxy(gw.addr("smtps"), s2c_edit=corrupt_reply)
        victim = Conn(proxy.addr, timeout=15, tls_ctx=ctx_for(t, version))
        try:
            code, _ = victim.smtp_reply()
            check_eq(code, 220, "greeting")
            try:
                victim.smtp("EHLO client.example.org")
                raise AssertionError("%s: the corrupted reply was accepted" % VNAME[version])
            except ssl.SSLError as e:
                check(re.search(r"(?i)bad.record.mac|decryption failed", str(e)),
                      "%s: client error %s, want a bad record MAC", VNAME[version], e)
            # the client's alert is on its way; keep the socket open until
            # the gateway has read it
            line = gw.wait_log(r"127\.0\.0\.1:%d sid=\S+ .*client sent alert 20"
                               % proxy.upstream_port, 5, off)
        finally:
            victim.close()
        check(line is not None, "%s: no log line with the client's alert: %s", VNAME[version],
              mailstack.tail(gw.log()[off:], 4))
        d = delta(before, counters(gw))
        check_deltas(d, {ERR_ALERT: 1, ERR_MAC: 0, ERR_PROTO: 0, ERR_DEV: 0},
                     "%s: one alert from a client" % VNAME[version])


def split_records(t):
    """Records cut into 1..1500-byte segments reach the engine in pieces."""
    for version, bits in ((V12, 256), (V13, 128)):
        off = len(t.gw.log())
        proxy = RecordProxy(t.gw.addr("smtps"), slices=True)
        subject = unique("sliced")
        body = random_body(512 * 1024, seed=50 + bits)
        c = Conn(proxy.addr, timeout=30, tls_ctx=ctx_for(t, version, bits))
        try:
            c.smtp_reply()
            smtp_mail(c, subject, body)
        finally:
            c.close()
        msg = t.stack.wait_for_message("alice", "Subject: %s" % subject, timeout=30)
        check_same_bytes(body_of(msg), lf(body), "body sent in small segments")
        check_dpdk_session(established(t.gw, proxy.upstream_port, off), VNAME[version],
                           SUITE[(version, bits)])


# --- 7. fallback --------------------------------------------------------------

FALLBACK_WARN = (r"warn w\d+ \[%s\] .*DPDK fallback to userspace for both directions: "
                 r"cipher %s not supported by the DPDK engine \(logged once per cause\)")


def fallback_chacha(t):
    gw = t.gw
    before = counters(gw)
    off = len(gw.log())
    chacha13 = "TLS_CHACHA20_POLY1305_SHA256"
    sc = SClientSession(gw.addr("submission"), ["-tls1_3", "-ciphersuites", chacha13],
                        cafile=t.certs.bundle)
    try:
        sc.handshake_done()
        smtp_dialogue(sc)
    finally:
        sc.close()
    est = established_on(gw, "submission", off)[0]
    check_eq(est["cipher"], chacha13, "logged cipher")
    check(est["engine"] == "userspace" and est["tx"] == "userspace" and est["rx"] == "userspace",
          "ChaCha20 session: engine=%s tx=%s rx=%s, want userspace", est["engine"], est["tx"],
          est["rx"])
    d = delta(before, counters(gw))
    check_deltas(d, {FALLBACK: 1, OFF_US_TX: 1, OFF_US_RX: 1, OFF_DPDK_TX: 0, OFF_DPDK_RX: 0},
                 "one TLS 1.3 ChaCha20 session")
    check(gw.wait_log(FALLBACK_WARN % ("submission", chacha13), 3, off),
          "no warning naming the declined suite")
    # TLS 1.2 ChaCha20 twice, with a message each: served, counted, warned once.
    chacha12 = "ECDHE-ECDSA-CHACHA20-POLY1305"
    ctx = tls_context(t.certs, minv=V12, maxv=V12, ciphers=chacha12)
    for i in range(2):
        off2 = len(gw.log())
        subject = unique("chacha12-%d" % i)
        body = random_body(256 * 1024, seed=30 + i)
        cport, cipher = smtp_upload(gw, "smtps", ctx, subject, body)
        check_eq(cipher, chacha12, "cipher the client negotiated")
        msg = t.stack.wait_for_message("alice", "Subject: %s" % subject)
        check_same_bytes(body_of(msg), lf(body), "ChaCha20 message body")
        check_eq(established(gw, cport, off2)["engine"], "userspace", "engine of ChaCha20 session")
    d = delta(before, counters(gw))
    check_deltas(d, {FALLBACK: 3, OFF_US_TX: 3, OFF_US_RX: 3, OFF_DPDK_TX: 0}, "three "
                 "ChaCha20 sessions")
    warns = re.findall(FALLBACK_WARN % ("smtps", chacha12), gw.log()[off:])
    check_eq(len(warns), 1, "warnings for the TLS 1.2 ChaCha20 suite (once per cause)")


# --- 8. two workers -----------------------------------------------------------

def two_workers_20(t):
    gw = t.gw2
    before = counters(gw)
    off = len(gw.log())
    tag = unique("w2")
    results = {}
    bodies = {i: random_body(64 * 1024 + i * 48 * 1024, seed=100 + i) for i in range(20)}

    def send(i):
        def fn():
            name = ("submission", "smtps")[i % 2]
            ver = (V13, V12)[(i // 2) % 2]
            results[i] = (ver,) + smtp_upload(gw, name, ctx_for(t, ver, 256),
                                              "%s-%02d" % (tag, i), bodies[i], timeout=60)
        return fn

    parallel([send(i) for i in range(20)])
    workers = set()
    for i in range(20):
        msg = t.stack.wait_for_message("alice", "Subject: %s-%02d" % (tag, i), timeout=30)
        check_same_bytes(body_of(msg), lf(bodies[i]), "body of concurrent message %d" % i)
        ver, cport, cipher = results[i]
        est = established(gw, cport, off)
        check_dpdk_session(est, VNAME[ver], SUITE[(ver, 256)], "concurrent session %d" % i)
        workers.add(est["worker"])
    check_eq(sorted(workers), ["w0", "w1"], "workers that ran the 20 sessions")
    check_eq(len(workers_of(gw)), 2, "worker processes")
    d = delta(before, counters(gw))
    check_deltas(d, {OFF_DPDK_TX: 20, OFF_DPDK_RX: 20, FALLBACK: 0, ERR_MAC: 0, ERR_DEV: 0,
                     ERR_PROTO: 0}, "20 sessions over two workers")


# --- 9. a worker killed -------------------------------------------------------

def stop_checked(gw, killed=()):
    """SIGTERM a gateway made inside a case: status 0, nothing left behind,
    no sanitizer report, no crash but the kills the case made itself."""
    rc = gw.stop()
    check(rc == 0, "exit status %s after SIGTERM", rc)
    check(not gw.leftovers, "processes left behind")
    san = gw.sanitizer_report()
    check(not san, "sanitizer report: %s", san[:600])
    crashes = [l for l in gw.crash_lines()
               if not any("(pid %d) killed by signal 9" % p in l for p in killed)]
    check(not crashes, "crashed: %s", crashes[:2])


def worker_sigkill(t):
    gw = start_dpdk_gateway(t.stack, ["submission", "smtps"], t.pmd)
    killed = []
    done = False
    try:
        first = wait_workers(gw, 1)[0]
        up = SlowUpload(gw, "smtps", ctx_for(t, V13), unique("killed"), UP_BODY)
        up.start()
        check(up.midway.wait(30), "upload did not get going")
        check(up.error is None, "upload failed before the kill: %s", up.error)
        off = len(gw.log())
        os.kill(first, signal.SIGKILL)
        killed.append(first)
        up.finish("the upload whose worker was killed", 30)
        check(up.error is not None, "the upload went on although its worker was killed")
        check(gw.wait_log(r"worker 0 \(pid %d\) killed by signal 9" % first, 10, off),
              "the master did not report the killed worker")
        for round_ in range(2):
            worker = wait_workers(gw, 1, exclude=killed)[0]
            mailstack.wait_port("127.0.0.1", gw.port("smtps"), 10, gw.proc, "mailgw")
            off = len(gw.log())
            for name, ver, bits in [("smtps", V13, 128), ("submission", V12, 256)]:
                subject = unique("respawned%d" % round_)
                cport, _ = smtp_upload(gw, name, ctx_for(t, ver, bits), subject, UP_BODY)
                msg = t.stack.wait_for_message("alice", "Subject: %s" % subject, timeout=60)
                check_same_bytes(body_of(msg), lf(UP_BODY), "body through the respawned worker")
                check_dpdk_session(established(gw, cport, off), VNAME[ver], SUITE[(ver, bits)],
                                   "session on the respawned worker")
            check(not re.search(r"DPDK crypto device for worker|no free queue pair|"
                                r"has no buffer pools", gw.log()[off:]),
                  "the respawned worker has no queue pair: %s", mailstack.tail(gw.log(), 5))
            check(workers_of(gw) == [worker], "the worker changed while serving")
            if round_ == 0:
                # once more, idle this time: the pools are made again
                off = len(gw.log())
                os.kill(worker, signal.SIGKILL)
                killed.append(worker)
                check(gw.wait_log(r"worker 0 \(pid %d\) killed by signal 9" % worker, 10, off),
                      "the master did not report the second killed worker")
        check(not any(("Subject: %s" % up.subject).encode() in mailstack.read_file(p, "rb")
                      for p in mailstack.maildir_files(t.stack.mail_root, "alice")),
              "the upload cut by the kill was delivered")
        done = True
    finally:
        if not done:
            gw.kill()
    check(gw.alive(), "the gateway died: %s", gw.log_tail(10))
    stop_checked(gw, killed)


def socket_owner(pids, local_port, remote_port):
    """Which of pids holds the TCP socket 127.0.0.1:local_port <->
    127.0.0.1:remote_port (from /proc/net/tcp and the processes' fds)."""
    inode = None
    for line in mailstack.read_file("/proc/net/tcp").splitlines()[1:]:
        f = line.split()
        if (int(f[1].split(":")[1], 16) == local_port
                and int(f[2].split(":")[1], 16) == remote_port):
            inode = f[9]
    check(inode is not None, "no socket for 127.0.0.1:%d <- :%d", local_port, remote_port)
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "socket:[%s]" % inode:
                    return pid
            except OSError:
                pass
    raise AssertionError("no worker holds the session's socket")


def sigkill_beside_other_worker(t):
    """Two workers, an upload under way on each; one worker is killed: the
    other worker's upload completes intact, and the killed worker's
    replacement serves sessions through the engine (its queue pair got new
    buffer pools while the other worker kept using its own)."""
    gw = start_dpdk_gateway(t.stack, ["smtps"], t.pmd, workers=2)
    killed = []
    uploads = []
    done = False
    try:
        wait_workers(gw, 2)
        owners = {}
        for i in range(12):
            up = SlowUpload(gw, "smtps", ctx_for(t, (V13, V12)[i % 2]), unique("two-%d" % i),
                            UP_BODY)
            up.start()
            uploads.append(up)
            check(up.midway.wait(30) and up.error is None, "upload %d: %s", i, up.error)
            pid = socket_owner(workers_of(gw), gw.port("smtps"), up.port)
            if pid not in owners:
                owners[pid] = up
            else:
                up.finish("extra upload")      # same worker as an earlier one
            if len(owners) == 2:
                break
        check(len(owners) == 2, "12 sessions all went to one worker")
        (victim_pid, victim), (other_pid, other) = sorted(owners.items())
        off = len(gw.log())
        os.kill(victim_pid, signal.SIGKILL)
        killed.append(victim_pid)
        m = re.search(r"worker (\d+) \(pid %d\) killed by signal 9" % victim_pid,
                      gw.wait_log(r"\(pid %d\) killed by signal 9" % victim_pid, 10, off) or "")
        check(m is not None, "the master did not report the killed worker")
        idx = m.group(1)
        for up in uploads:
            up.finish("uploads beside the kill", 30)
        check(victim.error is not None, "the upload on the killed worker went on")
        check(other.error is None, "the upload on the other worker failed: %s: %s",
              type(other.error).__name__, other.error)
        msg = t.stack.wait_for_message("alice", "Subject: %s" % other.subject, timeout=60)
        check_same_bytes(body_of(msg), lf(UP_BODY), "body on the worker that was not killed")
        for up in uploads:
            if up is not victim and up is not other:
                check(up.error is None, "an earlier upload failed: %s", up.error)
        wait_workers(gw, 2, exclude=killed)
        # sessions until one lands on the replacement (same index, new pid)
        off = len(gw.log())
        for i in range(40):
            subject = unique("replacement")
            body = random_body(MiB, seed=80 + i)
            cport, _ = smtp_upload(gw, "smtps", ctx_for(t, V13), subject, body)
            msg = t.stack.wait_for_message("alice", "Subject: %s" % subject, timeout=30)
            check_same_bytes(body_of(msg), lf(body), "body after the kill")
            est = established(gw, cport, off)
            check_dpdk_session(est, "TLSv1.3", what="session after the kill")
            if est["worker"] == "w" + idx:
                break
        else:
            raise AssertionError("40 sessions, none on the replacement worker w%s" % idx)
        check(not re.search(r"DPDK crypto device for worker|has no buffer pools",
                            gw.log()[off:]), "a worker started without a queue pair")
        done = True
    finally:
        for up in uploads:
            up.resume.set()
        if not done:
            gw.kill()
    check(gw.alive(), "the gateway died: %s", gw.log_tail(10))
    stop_checked(gw, killed)


# --- 10. configuration --------------------------------------------------------

def config_line_of(text, *patterns):
    lines = text.splitlines()
    return [i + 1 for i, l in enumerate(lines) if any(re.match(p, l) for p in patterns)]


def config_mode_without_args(t):
    gw = t.stack.gateway(mail_listeners(t.stack, ["smtps"]), offload={"mode": "dpdk"})
    rc, out = mailstack.config_check(gw.conf)
    check(rc != 0, "mailgw -t accepted mode = dpdk without dpdk_args: %s", out.strip())
    m = re.search(r"^%s:(\d+): (.*)$" % re.escape(gw.conf), out, re.M)
    check(m is not None, "no FILE:LINE: message: %r", out.strip())
    check("dpdk_args" in m.group(2), "the message does not name dpdk_args: %r", m.group(2))
    want = config_line_of(gw.config_text(), r"^\[offload\]", r"^mode = dpdk")
    check(int(m.group(1)) in want, "message points at line %s, want one of %s (the [offload] "
          "section)", m.group(1), want)
    # started for real, it refuses the same way
    r = run([gw.binary, "-c", gw.conf], timeout=20)
    check(r.returncode != 0, "mailgw started with mode = dpdk and no dpdk_args")
    check(re.search(r"^%s:\d+: .*dpdk_args" % re.escape(gw.conf), r.stdout, re.M),
          "start-up message lacks FILE:LINE: ... dpdk_args: %r", r.stdout[-300:])


def start_fails(t, args, want):
    gw = t.stack.gateway(mail_listeners(t.stack, ["smtps"]),
                         offload={"mode": "dpdk", "dpdk_args": args})
    t0 = time.monotonic()
    try:
        r = subprocess.run([gw.binary, "-c", gw.conf], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                           start_new_session=True)
    except subprocess.TimeoutExpired:
        raise AssertionError("mailgw with dpdk_args %r still running after 30 s" % args)
    took = time.monotonic() - t0
    err = r.stderr.decode("utf-8", "replace")
    check(r.returncode != 0, "mailgw started with dpdk_args %r (status 0)", args)
    check(took < 15, "mailgw took %.1f s to give up", took)
    m = re.search(r"^%s:(\d+): \[offload\] dpdk: (.*)$" % re.escape(gw.conf), err, re.M)
    check(m is not None, "no FILE:LINE: [offload] dpdk: message on stderr: %r", err[-400:])
    check(re.search(want, m.group(2)), "message %r does not say %r", m.group(2), want)
    check(int(m.group(1)) in config_line_of(gw.config_text(), r"^\[offload\]", r"^mode = ",
                                            r"^dpdk_args = "),
          "message points at line %s, not the [offload] section", m.group(1))
    check(refuses_connections(gw.addr("smtps")), "the listener accepts connections")


def config_bad_device(t):
    start_fails(t, dpdk_args("crypto_nosuch0"), r"EAL|device|dpdk_args")


def config_no_device(t):
    start_fails(t, EAL, r"no crypto device")


def auto_mode_bad_device(t):
    """mode = auto only tries DPDK: a device that does not exist is a
    warning, and sessions are served by another engine."""
    gw = t.stack.gateway(mail_listeners(t.stack, ["smtps"]),
                         offload={"mode": "auto", "dpdk_args": dpdk_args("crypto_nosuch0")})
    gw.start()
    done = False
    try:
        check(gw.wait_log(r"warn master DPDK not started", 5),
              "no warning that DPDK did not start: %s", gw.log_tail(5))
        off = len(gw.log())
        subject = unique("auto")
        cport, _ = smtp_upload(gw, "smtps", ctx_for(t, V13), subject, b"auto mode\r\n")
        t.stack.wait_for_message("alice", "Subject: %s" % subject)
        est = established(gw, cport, off)
        check(est["engine"] != "dpdk", "engine=dpdk although the EAL did not start")
        done = True
    finally:
        if not done:
            gw.kill()
    check(gw.alive(), "gateway died in mode = auto: %s", gw.log_tail(10))
    stop_checked(gw)


def startup_log(t):
    for gw, workers in ((t.gw, 1), (t.gw2, 2)):
        line = gw.wait_log(r"info master DPDK crypto device %s \(\S+\), \d+ queue pairs"
                           % re.escape(t.pmd), 1)
        check(line is not None, "no start-up line naming %s: %s", t.pmd, gw.log_tail(8))
        n = int(re.search(r"(\d+) queue pairs", line).group(1))
        check(n >= workers, "%d queue pairs for %d workers: %s", n, workers, line)


def other_pmd(t):
    pmd = [p for p in PMDS if p != t.pmd][0]
    gw = t.stack.gateway(mail_listeners(t.stack, ["smtps", "imaps"]), offload=dpdk_offload(pmd))
    try:
        gw.start()
    except GatewayDied as e:
        gw.kill()
        if re.search(r"failed to parse device|Unable to parse device|no crypto device", str(e)):
            raise Skip("%s is not available in this DPDK" % pmd)
        raise
    done = False
    try:
        check(gw.wait_log(r"DPDK crypto device %s " % pmd, 2), "start-up line lacks %s", pmd)
        for ver, bits in ((V13, 128), (V12, 256)):
            off = len(gw.log())
            subject = unique("pmd")
            body = random_body(MiB, seed=40 + bits)
            cport, _ = smtp_upload(gw, "smtps", ctx_for(t, ver, bits), subject, body)
            msg = t.stack.wait_for_message("alice", "Subject: %s" % subject, timeout=30)
            check_same_bytes(body_of(msg), lf(body), "body through %s" % pmd)
            check_dpdk_session(established(gw, cport, off), VNAME[ver], SUITE[(ver, bits)])
            cport, _, msg = imap_fetch(gw, "imaps", ctx_for(t, ver, bits), t.big_uid)
            check_same_bytes(msg, t.big_ref, "message fetched through %s" % pmd)
            check_dpdk_session(established(gw, cport, off), VNAME[ver], SUITE[(ver, bits)])
        done = True
    finally:
        if not done:
            gw.kill()
    check(gw.alive(), "gateway on %s died: %s", pmd, gw.log_tail(10))
    stop_checked(gw)


# --- 11. reload ---------------------------------------------------------------

def reload_open_session(t):
    gw = t.gw
    wait_workers(gw, 1)
    off0 = len(gw.log())
    up = SlowUpload(gw, "submission", ctx_for(t, V13), unique("across-hup"), UP_BODY)
    up.start()
    check(up.midway.wait(30), "upload did not get going")
    check(up.error is None, "upload failed before the reload: %s", up.error)
    check_dpdk_session(established(gw, up.port, off0), "TLSv1.3", what="session open at SIGHUP")
    old = workers_of(gw)
    gw.reload()
    check(gw.wait_log(r"info master reloaded", 1, off0), "no `reloaded` line")
    # a new session goes to the new worker, through the engine too
    new = wait_workers(gw, 2)
    check(set(old) < set(new), "the old worker is gone during its session: %s -> %s", old, new)
    off = len(gw.log())
    subject = unique("after-hup")
    cport, _ = smtp_upload(gw, "smtps", ctx_for(t, V12, 256), subject, UP_BODY)
    msg = t.stack.wait_for_message("alice", "Subject: %s" % subject, timeout=60)
    check_same_bytes(body_of(msg), lf(UP_BODY), "body submitted after the reload")
    check_dpdk_session(established(gw, cport, off), "TLSv1.2", SUITE[(V12, 256)],
                       "session after SIGHUP")
    # the old session completes
    up.finish("the session open across SIGHUP")
    check(up.error is None, "the session open across SIGHUP failed: %s: %s",
          type(up.error).__name__, up.error)
    msg = t.stack.wait_for_message("alice", "Subject: %s" % up.subject, timeout=60)
    check_same_bytes(body_of(msg), lf(UP_BODY), "body of the session open across SIGHUP")
    # its worker leaves, and gives its queue pair back: a second reload's
    # worker gets one again
    wait_workers(gw, 1, exclude=old)
    off = gw.reload()
    wait_workers(gw, 1, exclude=new)
    subject = unique("after-hup2")
    cport, _ = smtp_upload(gw, "submission", ctx_for(t, V13), subject, b"second reload\r\n")
    t.stack.wait_for_message("alice", "Subject: %s" % subject)
    check_dpdk_session(established(gw, cport, off), "TLSv1.3", what="session after two reloads")
    check(not re.search(r"DPDK crypto device for worker|no free queue pair", gw.log()[off0:]),
          "a worker started without a queue pair: %s", mailstack.tail(gw.log(), 5))


FALLBACK_ANY = (r"warn w\d+ \[%s\] 127\.0\.0\.1:%d sid=\S+ DPDK fallback to userspace for both "
                r"directions: (.*) \(logged once per cause\)")


def reload_without_free_queue_pair(t):
    """Two reloads while sessions stay open on the first two generations:
    the third generation's worker finds both queue pairs held (two per
    worker), says so, and its sessions are served in userspace and counted
    as DPDK fallbacks with that cause.  Once the old workers are gone, the
    next reload's worker gets a queue pair again."""
    gw = t.gw
    wait_workers(gw, 1)
    before = counters(gw)
    off0 = len(gw.log())
    uploads = []
    try:
        a = SlowUpload(gw, "submission", ctx_for(t, V13), unique("gen1"), UP_BODY)
        a.start()
        uploads.append(a)
        check(a.midway.wait(30) and a.error is None, "upload on generation 1: %s", a.error)
        gw.reload()
        gen12 = wait_workers(gw, 2)
        b = SlowUpload(gw, "submission", ctx_for(t, V12), unique("gen2"), UP_BODY)
        b.start()
        uploads.append(b)
        check(b.midway.wait(30) and b.error is None, "upload on generation 2: %s", b.error)
        off = gw.reload()
        check(gw.wait_log(r"error \S+ DPDK crypto device for worker 0: .*queue pair.*userspace",
                          5, off), "the third worker did not say it has no queue pair: %s",
              mailstack.tail(gw.log()[off:], 5))
        wait_workers(gw, 3)
        subject = unique("gen3")
        cport, _ = smtp_upload(gw, "smtps", ctx_for(t, V13), subject, b"no queue pair\r\n")
        t.stack.wait_for_message("alice", "Subject: %s" % subject)
        est = established(gw, cport, off)
        check_eq(est["engine"], "userspace", "engine of a session on a worker without a queue "
                 "pair")
        m = re.search(FALLBACK_ANY % ("smtps", cport), gw.log()[off:])
        check(m is not None, "no fallback warning for the session: %s",
              mailstack.tail(gw.log()[off:], 4))
        cause = m.group(1)
    finally:
        for u in uploads:
            u.finish("upload open across the reloads")
    for u in uploads:
        check(u.error is None, "upload open across the reloads failed: %s: %s",
              type(u.error).__name__, u.error)
        msg = t.stack.wait_for_message("alice", "Subject: %s" % u.subject, timeout=60)
        check_same_bytes(body_of(msg), lf(UP_BODY), "body open across the reloads")
        check_dpdk_session(established(gw, u.port, off0), what="session open across reloads")
    d = delta(before, counters(gw))
    check_deltas(d, {FALLBACK: 1, OFF_US_TX: 1, OFF_DPDK_TX: 2}, "three sessions")
    # the old workers leave and give their queue pairs back
    gen3 = wait_workers(gw, 1, exclude=gen12)
    off = gw.reload()
    wait_workers(gw, 1, exclude=gen3)
    subject = unique("gen4")
    cport, _ = smtp_upload(gw, "smtps", ctx_for(t, V13), subject, b"queue pair again\r\n")
    t.stack.wait_for_message("alice", "Subject: %s" % subject)
    check_dpdk_session(established(gw, cport, off), "TLSv1.3", what="session after the old "
                       "workers left")
    # docs/metrics.md: a worker without a queue pair is a fallback cause,
    # logged once per cause
    check("queue pair" in cause, "the fallback warning gives the cause as %r, not the "
          "missing queue pair", cause)


# --- 12. close_notify, resumption, HelloRetryRequest, SIGTERM -----------------

def close_notify(t):
    """The engine's own alert path: when the backend ends the session, the
    client gets a close_notify before the TCP close (a ragged EOF would
    raise SSLEOFError here)."""
    for ver in (V12, V13):
        off = len(t.gw.log())
        with TLSConn(t.gw.addr("imaps"), ctx_for(t, ver), strict_eof=True, timeout=10) as c:
            c.line()
            c.imap_ok("a", "LOGIN bob bobpw")
            untagged, tagged = c.imap("b", "LOGOUT")
            check(tagged.startswith("b OK"), "LOGOUT: %r", tagged)
            try:
                data = c.sock.recv(100)
            except (ssl.SSLError, OSError) as e:
                raise AssertionError("%s: no close_notify from the gateway: %s: %s"
                                     % (VNAME[ver], type(e).__name__, e))
            check_eq(data, b"", "%s: bytes after the LOGOUT reply" % VNAME[ver])
            check_dpdk_session(established(t.gw, c.local_port, off), VNAME[ver])


def client_close_notify(t):
    """The client closes first (close_notify): the engine answers with its
    own, which Python's unwrap() waits for."""
    for ver in (V12, V13):
        off = len(t.gw.log())
        with TLSConn(t.gw.addr("smtps"), ctx_for(t, ver), strict_eof=True, timeout=10) as c:
            code, _ = c.smtp_reply()
            check_eq(code, 220, "greeting")
            c.smtp_expect("EHLO client.example.org", 250)
            try:
                c.sock = c.sock.unwrap()
            except (ssl.SSLError, OSError) as e:
                raise AssertionError("%s: no close_notify in answer to the client's: %s: %s"
                                     % (VNAME[ver], type(e).__name__, e))
            check_dpdk_session(established(t.gw, c.local_port, off), VNAME[ver])
        check(t.gw.wait_log(r"127\.0\.0\.1:%d sid=\S+ close " % c.local_port, 5, off),
              "%s: the session did not end", VNAME[ver])


def session_resumption(t):
    """Resumed sessions (TLS 1.2 session ticket or id, TLS 1.3 PSK) get the
    engine too, and their records decrypt."""
    for ver, bits in ((V12, 256), (V13, 128)):
        ctx = ctx_for(t, ver, bits)
        with TLSConn(t.gw.addr("smtps"), ctx) as c:
            c.smtp_reply()              # TLS 1.3: the ticket arrives with it
            c.smtp_expect("EHLO client.example.org", 250)
            c.smtp_expect("QUIT", 221)
            sess = c.sock.session
        check(sess is not None, "%s: no session to resume", VNAME[ver])
        off = len(t.gw.log())
        raw = socket.create_connection(t.gw.addr("smtps"), timeout=30)
        c = Conn.__new__(Conn)
        c.timeout, c.buf, c.local_port = 30, b"", raw.getsockname()[1]
        c.sock = ctx.wrap_socket(raw, server_hostname=GATEWAY_NAME, session=sess)
        subject = unique("resumed")
        body = random_body(512 * 1024, seed=70 + bits)
        try:
            check(c.sock.session_reused, "%s: the session was not resumed", VNAME[ver])
            c.smtp_reply()
            smtp_mail(c, subject, body)
        finally:
            c.close()
        msg = t.stack.wait_for_message("alice", "Subject: %s" % subject, timeout=30)
        check_same_bytes(body_of(msg), lf(body), "%s: body over a resumed session" % VNAME[ver])
        check_dpdk_session(established(t.gw, c.local_port, off), VNAME[ver], SUITE[(ver, bits)],
                           "resumed session")


def hello_retry(t):
    """A TLS 1.3 client whose key share (X448) is not in the gateway's groups
    gets a HelloRetryRequest; the engine takes the session all the same."""
    off = len(t.gw.log())
    msgfile = os.path.join(t.stack.dir, "hrr.msg")
    sc = SClientSession(t.gw.addr("submission"), ["-tls1_3", "-groups", "X448:X25519"],
                        cafile=t.certs.bundle, msgfile=msgfile)
    try:
        sc.handshake_done()
        smtp_dialogue(sc)
    finally:
        sc.close()
    hellos = re.findall(r"^>>> TLS 1\.3, Handshake \[length [0-9a-f]+\], ClientHello",
                        msg_lines(msgfile), re.M)
    check_eq(len(hellos), 2, "ClientHellos (a HelloRetryRequest asks for a second)")
    check_dpdk_session(established_on(t.gw, "submission", off)[0], "TLSv1.3")


def sigterm_with_open_sessions(t):
    """SIGTERM while DPDK sessions are mid-transfer: one that goes on
    finishes within shutdown_grace, one that stalls is cut when it ends;
    the gateway exits 0, with no sanitizer report (nothing the engine held
    for the cut session leaks)."""
    gw = t.stack.gateway(mail_listeners(t.stack, ["submission", "smtps"]),
                         offload=dpdk_offload(t.pmd), global_opts={"shutdown_grace": 3})
    gw.start()
    done = False
    a = b = None
    try:
        a = SlowUpload(gw, "smtps", ctx_for(t, V13), unique("term-a"), UP_BODY)
        b = SlowUpload(gw, "submission", ctx_for(t, V12, 256), unique("term-b"), UP_BODY)
        a.start()
        b.start()
        check(a.midway.wait(30) and b.midway.wait(30), "uploads did not get going")
        check(a.error is None and b.error is None, "uploads failed early: %s / %s", a.error,
              b.error)
        off = len(gw.log())
        gw.proc.send_signal(signal.SIGTERM)
        check(gw.wait_log(r"stopping: 2 sessions to finish", 5, off),
              "the worker did not start draining two sessions: %s", gw.log_tail(5))
        a.finish("upload resumed after SIGTERM")
        check(a.error is None, "the upload that went on was cut: %s: %s",
              type(a.error).__name__, a.error)
        msg = t.stack.wait_for_message("alice", "Subject: %s" % a.subject, timeout=30)
        check_same_bytes(body_of(msg), lf(UP_BODY), "body finished during shutdown")
        try:
            rc = gw.proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError("mailgw still running 15 s after SIGTERM (grace 3 s)")
        check_eq(rc, 0, "exit status after SIGTERM")
        b.finish("stalled upload")
        check(b.error is not None, "the stalled upload survived the shutdown")
        done = True
    finally:
        if a is not None:
            a.resume.set()
        if b is not None:
            b.resume.set()
        if not done:
            gw.kill()
    stop_checked(gw)


CASES = ([("dpdk_startup_log_names_device", startup_log)]
         + UPLOADS + DOWNLOADS
         + [("dpdk_swaks_starttls", swaks_starttls),
            ("dpdk_curl_imaps_pop3s_fetch", curl_fetch, 120),
            ("dpdk_curl_smtps_upload", curl_smtps_upload),
            ("dpdk_s_client_starttls_smtp", s_client_starttls_smtp),
            ("dpdk_close_notify_on_backend_close", close_notify),
            ("dpdk_close_notify_from_client", client_close_notify),
            ("dpdk_session_resumption", session_resumption),
            ("dpdk_hello_retry_request", hello_retry),
            ("dpdk_keyupdate_from_s_client", keyupdate_s_client),
            ("dpdk_keyupdate_coalesced_mid_upload", keyupdate_mid_upload, 120),
            ("dpdk_keyupdate_requested_mid_download", keyupdate_mid_download, 120),
            ("dpdk_metrics_exact_counts", metrics_exact, 120),
            ("dpdk_bad_record_mac_tls12_beside_upload", bad_mac_case(V12, "upload"), 120),
            ("dpdk_bad_record_mac_tls13_beside_download", bad_mac_case(V13, "download"), 120),
            ("dpdk_peer_alert_counted", peer_alert),
            ("dpdk_records_split_across_segments", split_records, 120)]
         + RECORD_CASES
         + [("dpdk_fallback_chacha20", fallback_chacha),
            ("dpdk_two_workers_20_concurrent", two_workers_20, 150),
            ("dpdk_reload_with_open_session", reload_open_session, 150),
            ("dpdk_reload_without_free_queue_pair", reload_without_free_queue_pair, 150),
            ("dpdk_worker_sigkill_respawn", worker_sigkill, 150),
            ("dpdk_worker_sigkill_beside_other_worker", sigkill_beside_other_worker, 150),
            ("dpdk_sigterm_with_open_sessions", sigterm_with_open_sessions, 120),
            ("dpdk_other_pmd", other_pmd, 120),
            ("dpdk_config_mode_without_dpdk_args", config_mode_without_args),
            ("dpdk_config_bad_device_exits", config_bad_device),
            ("dpdk_config_no_device_exits", config_no_device),
            ("dpdk_auto_mode_bad_device_carries_on", auto_mode_bad_device)])

if __name__ == "__main__":
    run_cases(setup, CASES)
