#!/usr/bin/python3
"""Kernel TLS end to end, inside the kernel-TLS guest (tests/vm/run).

Real clients through mailgw ([offload] mode = auto) to a real Postfix and
Dovecot: for TLS 1.2 and TLS 1.3 and each of AES-128-GCM, AES-256-GCM and
ChaCha20-Poly1305, a 10 MiB message submitted over SMTP and a 10 MiB message
fetched over IMAP, byte for byte. The kernel did the record crypto: each
session's log line says engine=ktls tx=ktls_sw rx=ktls_sw as read back from
the kernel, /proc/net/tls_stat counted the software TX and RX contexts, and
the offload_ktls_sw_* counters grew by the number of sessions.

Then the ways out of kernel TLS: a TLS 1.2 CBC suite (the kernel takes no
CBC) runs wholly in userspace and is counted and logged as a fallback; TLS
1.3 AES-128-CCM is a fallback too, partial (kernel TX, userspace RX: the
gateway's TLS 1.3 RX installer has no CCM) where OpenSSL offloads its TX,
whole where OpenSSL declines (OpenSSL 3.0 does on Linux); mode = userspace
uses no kernel TLS and counts no fallback. A client KeyUpdate on a kTLS RX session ends that session (the
6.1 kernel cannot rekey) and is counted; a client close_notify ends its
session cleanly.

Where the kernel has no kernel TLS (the host), every case is skipped.

    tests/vm/run /usr/bin/python3 tests/vm/test_ktls.py
"""

import ctypes
import errno
import imaplib
import os
import re
import select
import smtplib
import socket
import ssl
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403
import mailstack  # noqa: E402

TCP_ULP = 31            # linux/tcp.h

SENDER = "sender@example.org"
ALICE = "alice@example.test"
MIB = 1024 * 1024
BIG = 10 * MIB          # the transfers that must go through the kernel
SMALL = 2 * MIB         # fallback and userspace cases: data intact is enough
CASE_LIMIT = 240        # seconds per case under emulation

DEFAULT_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                   "ECDHE-ECDSA-CHACHA20-POLY1305")
CBC_CIPHER = "ECDHE-ECDSA-AES128-SHA256"
DEFAULT_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
CCM_SUITE = "TLS_AES_128_CCM_SHA256"

# (case tag, protocol version, OpenSSL cipher name)
COMBOS = [
    ("tls12_aes128gcm", "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ("tls12_aes256gcm", "TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
    ("tls12_chacha20poly1305", "TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"),
    ("tls13_aes128gcm", "TLSv1.3", "TLS_AES_128_GCM_SHA256"),
    ("tls13_aes256gcm", "TLSv1.3", "TLS_AES_256_GCM_SHA384"),
    ("tls13_chacha20poly1305", "TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256"),
]

TIMES = []              # (case, what, seconds, bytes) for the summary


# --------------------------------------------------------------------------
# kernel TLS presence and counters

def no_ktls_reason():
    """None when the kernel has the "tls" upper layer protocol, else why not.
    On an unconnected socket the module answers ENOTCONN; ENOENT means
    there is no such ULP (CONFIG_TLS off or the module missing)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as e:
        if e.errno == errno.ENOENT:
            return ('no kernel TLS in this kernel (setsockopt TCP_ULP "tls" failed with '
                    "ENOENT; kernel %s)" % os.uname().release)
    finally:
        s.close()
    if not os.path.exists("/proc/net/tls_stat"):
        return "no kernel TLS in this kernel (no /proc/net/tls_stat; kernel %s)" % (
            os.uname().release)
    return None


def tls_stat():
    with open("/proc/net/tls_stat") as f:
        return {k: int(v) for k, v in (line.split() for line in f if line.strip())}


def delta(after, before, key):
    return after.get(key, 0) - before.get(key, 0)


def note(text):
    for line in str(text).splitlines():
        print("  | " + line, file=sys.stderr)
    sys.stderr.flush()


# --------------------------------------------------------------------------
# client TLS contexts

_libssl = None


def _loaded_libssl():
    """The libssl that Python's _ssl module is linked with."""
    global _libssl
    if _libssl is None:
        path = None
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and re.search(r"/libssl\.so[.\d]*$", fields[5]):
                    path = fields[5]
                    break
        if path is None:
            raise Skip("cannot find the libssl this Python uses")
        _libssl = ctypes.CDLL(path)
        _libssl.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        _libssl.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    return _libssl


def set_tls13_suites(ctx, suites):
    """SSL_CTX_set_ciphersuites on an ssl.SSLContext: Python's ssl module
    has no API for the TLS 1.3 list. In CPython the SSL_CTX pointer is the
    first field after the object header."""
    if sys.implementation.name != "cpython":
        raise Skip("TLS 1.3 suite selection needs CPython")
    lib = _loaded_libssl()
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    check(ptr, "no SSL_CTX pointer in the SSLContext")
    check(lib.SSL_CTX_set_ciphersuites(ptr, suites.encode()) == 1,
          "SSL_CTX_set_ciphersuites(%s) failed", suites)
    got = sorted(c["name"] for c in ctx.get_ciphers() if c.get("protocol") == "TLSv1.3")
    check(got == sorted(suites.split(":")),
          "client TLS 1.3 suites are %s after setting %s", got, suites)


def client_ctx(t, version, cipher):
    """A verifying client context that can only negotiate version+cipher."""
    ctx = tls_context(t.certs)
    if version == "TLSv1.2":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(cipher)
    else:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        set_tls13_suites(ctx, cipher)
    return ctx


def check_negotiated(sock, version, cipher, what):
    check(sock.version() == version and sock.cipher()[0] == cipher,
          "%s negotiated %s %s, want %s %s", what, sock.version(), sock.cipher()[0],
          version, cipher)


# --------------------------------------------------------------------------
# messages

def put_in_maildir(t, user, subject, body):
    """Drop a message straight into user's maildir, as a delivery agent
    would (LF line ends); returns the bytes IMAP must serve (CRLF)."""
    msg = make_message(subject, body, to="%s@%s" % (user, DOMAIN))
    base = os.path.join(t.stack.mail_root, user, "Maildir")
    name = "%d.M%dP%d.%s" % (time.time(), len(t.dropped), os.getpid(), "ktls")
    t.dropped.append(name)
    tmp = os.path.join(base, "tmp", name)
    with open(tmp, "wb") as f:
        f.write(lf(msg))
    os.chown(tmp, mailstack.MAIL_UID, mailstack.MAIL_GID)
    os.rename(tmp, os.path.join(base, "new", name))
    return msg


def wait_maildir(t, user, subject, timeout=120.0):
    """The delivered message whose header has Subject: subject; reads only
    the head of messages that are not it."""
    marker = ("\nSubject: %s\n" % subject).encode()
    deadline = time.monotonic() + timeout
    seen = set()
    while True:
        for path in mailstack.maildir_files(t.stack.mail_root, user):
            if path in seen:
                continue
            seen.add(path)
            try:
                with open(path, "rb") as f:
                    head = f.read(16384)
                    if marker in head:
                        return head + f.read()
            except FileNotFoundError:
                seen.discard(path)      # moved from new/ to cur/
        if time.monotonic() > deadline:
            raise AssertionError("message %r not delivered to %s within %.0f s"
                                 % (subject, user, timeout))
        time.sleep(0.1)


# --------------------------------------------------------------------------
# transfers through the gateway

def smtp_upload(t, gw, ctx, body, version, cipher, implicit=False, what="upload"):
    """Submit a message with body through gw; returns (seconds on the
    wire, seconds until it was in the maildir)."""
    subject = unique("up")
    msg = make_message(subject, body)
    t0 = time.monotonic()
    if implicit:
        host, port = gw.addr("smtps")
        s = smtplib.SMTP_SSL(host, port, context=ctx, timeout=120)
        s.ehlo("client.example.org")
    else:
        host, port = gw.addr("submission")
        s = smtplib.SMTP(host, port, timeout=120)
        s.ehlo("client.example.org")
        s.starttls(context=ctx)
        s.ehlo("client.example.org")
    try:
        check_negotiated(s.sock, version, cipher, what)
        refused = s.sendmail(SENDER, [ALICE], msg)
        check_eq(refused, {}, "refused recipients")
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            pass
    sent = time.monotonic() - t0
    got = wait_maildir(t, "alice", subject)
    stored = time.monotonic() - t0
    check_same_bytes(body_of(got), lf(body), "%s: body in the maildir" % what)
    return sent, stored


def imap_download(t, gw, ctx, subject, want, version, cipher, starttls=False,
                  what="download"):
    """Fetch the message with subject from bob's INBOX through gw and
    compare it with want; returns the seconds it took."""
    t0 = time.monotonic()
    if starttls:
        host, port = gw.addr("imap")
        m = imaplib.IMAP4(host, port, timeout=120)
        m.starttls(ssl_context=ctx)
    else:
        host, port = gw.addr("imaps")
        m = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=120)
    try:
        check_negotiated(m.sock, version, cipher, what)
        m.login("bob", mailstack.USERS["bob"])
        m.select("INBOX", readonly=True)
        typ, data = m.uid("SEARCH", None, "HEADER", "Subject", subject)
        check(typ == "OK" and data[0], "%s: message %r not found", what, subject)
        uid = data[0].split()[-1]
        typ, data = m.uid("FETCH", uid, "(BODY.PEEK[])")
        check(typ == "OK" and isinstance(data[0], tuple), "%s: FETCH failed: %r",
              what, data[:1])
        got = data[0][1]
    finally:
        try:
            m.logout()
        except (imaplib.IMAP4.error, OSError):
            pass
    took = time.monotonic() - t0
    check_same_bytes(got, want, "%s: message fetched over IMAP" % what)
    return took


# --------------------------------------------------------------------------
# the gateway's log

EST_RX = re.compile(r"\] (\S+) sid=(\S+) TLS established (.*)$")
CLOSE_RX = re.compile(r"\] (\S+) sid=(\S+) close \((.*?)\)(.*)$")


def sessions(gw, offset):
    """{sid: {"peer", "est", "close", "reason", "lines"}} of the TLS sessions
    that logged their handshake after offset."""
    out = {}
    lines = gw.log()[offset:].splitlines()
    for l in lines:
        m = EST_RX.search(l)
        if m:
            out[m.group(2)] = {"peer": m.group(1), "est": m.group(3), "close": None,
                               "reason": None, "lines": []}
    for l in lines:
        m = re.search(r" sid=(\S+) ", l)
        if m and m.group(1) in out:
            out[m.group(1)]["lines"].append(l)
        m = CLOSE_RX.search(l)
        if m and m.group(2) in out:
            out[m.group(2)]["close"] = l
            out[m.group(2)]["reason"] = m.group(3)
    return out


def wait_closed(gw, offset, n, timeout=30.0):
    """Wait until n TLS sessions begun after offset have logged close;
    returns sessions()."""
    deadline = time.monotonic() + timeout
    while True:
        ss = sessions(gw, offset)
        if len(ss) >= n and all(s["close"] for s in ss.values()):
            return ss
        if time.monotonic() > deadline:
            open_ = [sid for sid, s in ss.items() if not s["close"]]
            raise AssertionError("%d TLS session(s) logged after the case began, want %d; "
                                 "not closed after %.0f s: %s"
                                 % (len(ss), n, timeout, open_))
        time.sleep(0.1)


def session_of_port(gw, offset, port, timeout=20.0):
    """(sid, session) of the client connection from local port."""
    peer_rx = re.compile(r":%d$" % port)
    deadline = time.monotonic() + timeout
    while True:
        for sid, s in sessions(gw, offset).items():
            if peer_rx.search(s["peer"]):
                return sid, s
        if time.monotonic() > deadline:
            raise AssertionError("no TLS session from client port %d in the log" % port)
        time.sleep(0.1)


def wait_session_closed(gw, offset, sid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        s = sessions(gw, offset).get(sid)
        if s and s["close"]:
            return s
        if time.monotonic() > deadline:
            raise AssertionError("session %s did not log close within %.0f s" % (sid, timeout))
        time.sleep(0.1)


def check_engine(ss, version, cipher, engine, tx, rx):
    for sid, s in ss.items():
        est = s["est"]
        m = re.match(r"version=(\S+) cipher=(\S+) sni=\S+ engine=(\S+) tx=(\S+) rx=(\S+)(.*)$",
                     est)
        check(m is not None, "session %s: TLS established line not understood: %s", sid, est)
        check((m.group(1), m.group(2)) == (version, cipher),
              "session %s: %s %s in the log, want %s %s", sid, m.group(1), m.group(2),
              version, cipher)
        check((m.group(3), m.group(4), m.group(5)) == (engine, tx, rx),
              "session %s: engine=%s tx=%s rx=%s, want engine=%s tx=%s rx=%s", sid,
              m.group(3), m.group(4), m.group(5), engine, tx, rx)
        check("did not report" not in m.group(6),
              "session %s: the kernel did not report its TLS modes: %s", sid, est)


def check_clean_closes(ss):
    for sid, s in ss.items():
        check(s["reason"] in ("client closed", "backend closed", "done"),
              "session %s ended with close (%s): %s", sid, s["reason"], s["close"])
        bad = [l for l in s["lines"] if re.search(r"\b(error|failed)\b", l)
               and " close (" not in l]
        check(not bad, "session %s logged: %s", sid, bad[:1])


def check_counters(before, after, want):
    """want: {counter: expected delta}."""
    wrong = ["%s +%d (want +%d)" % (k, delta(after, before, k), v)
             for k, v in sorted(want.items()) if delta(after, before, k) != v]
    check(not wrong, "counters: %s", ", ".join(wrong))


# --------------------------------------------------------------------------
# setup

def setup():
    why = no_ktls_reason()
    if why:
        raise Skip(why)
    need_tool("openssl")
    st = Stack("ktls").start()
    host = {"hostname": GATEWAY_NAME}
    tls_opts = {"ciphers": DEFAULT_CIPHERS + ":" + CBC_CIPHER,
                "ciphersuites": DEFAULT_SUITES + ":" + CCM_SUITE}
    gw = st.gateway([
        listener("submission", "smtp", "starttls", st.smtp_backend, require_tls="yes", **host),
        listener("smtps", "smtp", "implicit", st.smtp_backend, **host),
        listener("imap", "imap", "starttls", st.imap_backend, require_tls="yes", **host),
        listener("imaps", "imap", "implicit", st.imap_backend, **host),
    ], tls_opts=tls_opts, offload={"mode": "auto"}).start()
    gwu = st.gateway([
        listener("smtps", "smtp", "implicit", st.smtp_backend, **host),
        listener("imaps", "imap", "implicit", st.imap_backend, **host),
    ], offload={"mode": "userspace"}).start()
    t = Ctx(st, gw=gw, gwu=gwu)
    t.dropped = []
    t0 = time.monotonic()
    t.big = random_body(BIG, seed=11)
    t.small = random_body(SMALL, seed=12)
    t.big_subject = unique("down-big")
    t.big_msg = put_in_maildir(t, "bob", t.big_subject, t.big)
    t.small_subject = unique("down-small")
    t.small_msg = put_in_maildir(t, "bob", t.small_subject, t.small)
    note("setup: stack and gateways up, %d + %d byte bodies made in %.1f s"
         % (len(t.big), len(t.small), time.monotonic() - t0))
    return t


# --------------------------------------------------------------------------
# cases

def ktls_combo(tag, version, cipher, index):
    def case(t):
        ctx = client_ctx(t, version, cipher)
        # vary the ways in: STARTTLS and implicit TLS on both protocols
        implicit_smtp = index % 2 == 1
        starttls_imap = index % 3 == 2
        ts0, c0, off = tls_stat(), t.gw.stats(), len(t.gw.log())
        up_sent, up_stored = smtp_upload(t, t.gw, ctx, t.big, version, cipher,
                                         implicit=implicit_smtp)
        down = imap_download(t, t.gw, ctx, t.big_subject, t.big_msg, version, cipher,
                             starttls=starttls_imap)
        ss = wait_closed(t.gw, off, 2)
        ts1, c1 = tls_stat(), t.gw.stats()
        n = len(ss)
        TIMES.append((tag, "upload", up_sent, len(t.big)))
        TIMES.append((tag, "download", down, len(t.big_msg)))
        note("%s: upload %.1f MiB via %s in %.1f s (in the maildir after %.1f s); download "
             "%.1f MiB via %s in %.1f s; tls_stat TlsTxSw %+d TlsRxSw %+d TlsCurrTxSw %d->%d "
             "TlsCurrRxSw %d->%d TlsDecryptError %+d"
             % (tag, len(t.big) / MIB, "SMTPS" if implicit_smtp else "SMTP STARTTLS",
                up_sent, up_stored, len(t.big_msg) / MIB,
                "IMAP STARTTLS" if starttls_imap else "IMAPS", down,
                delta(ts1, ts0, "TlsTxSw"), delta(ts1, ts0, "TlsRxSw"),
                ts0.get("TlsCurrTxSw", 0), ts1.get("TlsCurrTxSw", 0),
                ts0.get("TlsCurrRxSw", 0), ts1.get("TlsCurrRxSw", 0),
                delta(ts1, ts0, "TlsDecryptError")))
        check_eq(n, 2, "TLS sessions logged")
        check_engine(ss, version, cipher, "ktls", "ktls_sw", "ktls_sw")
        check_clean_closes(ss)
        check(delta(ts1, ts0, "TlsTxSw") >= n and delta(ts1, ts0, "TlsRxSw") >= n,
              "/proc/net/tls_stat: TlsTxSw %+d, TlsRxSw %+d for %d kTLS sessions",
              delta(ts1, ts0, "TlsTxSw"), delta(ts1, ts0, "TlsRxSw"), n)
        check(delta(ts1, ts0, "TlsDecryptError") == 0, "TlsDecryptError grew by %d",
              delta(ts1, ts0, "TlsDecryptError"))
        check_counters(c0, c1, {"offload_ktls_sw_tx": n, "offload_ktls_sw_rx": n,
                                "offload_userspace_tx": 0, "offload_userspace_rx": 0,
                                "offload_ktls_hw_tx": 0, "offload_ktls_hw_rx": 0,
                                "ktls_fallback": 0, "ktls_keyupdate": 0})
        check(delta(c1, c0, "bytes_client_to_backend") >= len(t.big)
              and delta(c1, c0, "bytes_backend_to_client") >= len(t.big),
              "byte counters: client_to_backend %+d, backend_to_client %+d",
              delta(c1, c0, "bytes_client_to_backend"),
              delta(c1, c0, "bytes_backend_to_client"))
        # the kernel contexts go with the sockets
        check_curr_released(ts0)
    return case


def check_curr_released(ts0, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        ts = tls_stat()
        if (ts.get("TlsCurrTxSw", 0) <= ts0.get("TlsCurrTxSw", 0)
                and ts.get("TlsCurrRxSw", 0) <= ts0.get("TlsCurrRxSw", 0)):
            return
        if time.monotonic() > deadline:
            raise AssertionError("kernel TLS contexts still open after the sessions closed: "
                                 "TlsCurrTxSw %d -> %d, TlsCurrRxSw %d -> %d"
                                 % (ts0.get("TlsCurrTxSw", 0), ts.get("TlsCurrTxSw", 0),
                                    ts0.get("TlsCurrRxSw", 0), ts.get("TlsCurrRxSw", 0)))
        time.sleep(0.2)


FALLBACK_RX = re.compile(r" warn .*kernel TLS fallback to userspace for (both directions|receive): "
                         r"(.*)$")


def fallback_cbc(t):
    version, cipher = "TLSv1.2", CBC_CIPHER
    ctx = client_ctx(t, version, cipher)
    ts0, c0, off = tls_stat(), t.gw.stats(), len(t.gw.log())
    up, _ = smtp_upload(t, t.gw, ctx, t.small, version, cipher, what="CBC upload")
    down = imap_download(t, t.gw, ctx, t.small_subject, t.small_msg, version, cipher,
                         what="CBC download")
    ss = wait_closed(t.gw, off, 2)
    ts1, c1 = tls_stat(), t.gw.stats()
    n = len(ss)
    note("fallback CBC: upload %.1f MiB in %.1f s, download in %.1f s; TlsTxSw %+d TlsRxSw %+d"
         % (len(t.small) / MIB, up, down, delta(ts1, ts0, "TlsTxSw"),
            delta(ts1, ts0, "TlsRxSw")))
    check_engine(ss, version, cipher, "userspace", "userspace", "userspace")
    check_clean_closes(ss)
    check_counters(c0, c1, {"ktls_fallback": n, "offload_userspace_tx": n,
                            "offload_userspace_rx": n, "offload_ktls_sw_tx": 0,
                            "offload_ktls_sw_rx": 0})
    check(delta(ts1, ts0, "TlsTxSw") == 0 and delta(ts1, ts0, "TlsRxSw") == 0,
          "tls_stat moved for userspace sessions: TlsTxSw %+d TlsRxSw %+d",
          delta(ts1, ts0, "TlsTxSw"), delta(ts1, ts0, "TlsRxSw"))
    warns = [FALLBACK_RX.search(l) for l in t.gw.log().splitlines()]
    warns = [m for m in warns if m and m.group(1) == "both directions"
             and cipher in m.group(2)]
    check(warns, "no warn line `kernel TLS fallback to userspace for both directions: "
          "... %s` in the log", cipher)
    note("fallback CBC warn line cause: %s" % warns[0].group(2))


def fallback_ccm(t):
    """TLS 1.3 AES-128-CCM: the gateway's TLS 1.3 RX installer has no CCM,
    so at best TX is in the kernel and RX stays in userspace (a partial
    fallback). OpenSSL 3.0 itself declines kTLS for TLS 1.3 CCM on Linux
    (ktls_check_supported_cipher: "broken on 5.x kernels"), and then both
    directions stay in userspace. Either way the fallback is counted, the
    log, the counters and /proc/net/tls_stat agree, and data is intact."""
    version, cipher = "TLSv1.3", CCM_SUITE
    ctx = client_ctx(t, version, cipher)
    ts0, c0, off = tls_stat(), t.gw.stats(), len(t.gw.log())
    up, _ = smtp_upload(t, t.gw, ctx, t.small, version, cipher, what="CCM upload")
    down = imap_download(t, t.gw, ctx, t.small_subject, t.small_msg, version, cipher,
                         what="CCM download")
    ss = wait_closed(t.gw, off, 2)
    ts1, c1 = tls_stat(), t.gw.stats()
    n = len(ss)
    partial = all(" tx=ktls_sw " in s["est"] for s in ss.values())
    note("fallback CCM: upload %.1f MiB in %.1f s, download in %.1f s; TlsTxSw %+d TlsRxSw %+d;"
         " %s" % (len(t.small) / MIB, up, down, delta(ts1, ts0, "TlsTxSw"),
                  delta(ts1, ts0, "TlsRxSw"),
                  "TX in the kernel, RX in userspace" if partial else
                  "OpenSSL kept TX in userspace too, so both directions are in userspace"))
    if partial:
        check_engine(ss, version, cipher, "ktls", "ktls_sw", "userspace")
        check_counters(c0, c1, {"ktls_fallback": n, "offload_ktls_sw_tx": n,
                                "offload_userspace_rx": n, "offload_userspace_tx": 0,
                                "offload_ktls_sw_rx": 0})
        check(delta(ts1, ts0, "TlsTxSw") >= n and delta(ts1, ts0, "TlsRxSw") == 0,
              "tls_stat: TlsTxSw %+d TlsRxSw %+d, want TX in the kernel for %d sessions and "
              "no RX", delta(ts1, ts0, "TlsTxSw"), delta(ts1, ts0, "TlsRxSw"), n)
        warns = [FALLBACK_RX.search(l) for l in t.gw.log().splitlines()]
        warns = [m for m in warns if m and m.group(1) == "receive" and "CCM" in m.group(2)]
        check(warns, "no warn line `kernel TLS fallback to userspace for receive: ... CCM ...`"
              " in the log")
        note("fallback CCM warn line cause: %s" % warns[0].group(2))
    else:
        check_engine(ss, version, cipher, "userspace", "userspace", "userspace")
        check_counters(c0, c1, {"ktls_fallback": n, "offload_userspace_tx": n,
                                "offload_userspace_rx": n, "offload_ktls_sw_tx": 0,
                                "offload_ktls_sw_rx": 0})
        check(delta(ts1, ts0, "TlsTxSw") == 0 and delta(ts1, ts0, "TlsRxSw") == 0,
              "tls_stat moved for userspace sessions: TlsTxSw %+d TlsRxSw %+d",
              delta(ts1, ts0, "TlsTxSw"), delta(ts1, ts0, "TlsRxSw"))
        warns = [m.group(2) for m in (FALLBACK_RX.search(l) for l in t.gw.log().splitlines())
                 if m and "CCM" in m.group(2)]
        note("fallback CCM warn line: %s" % (
            warns[0] if warns else "none names CCM (the gateway logs each cause once, "
            "comparing causes by their first 24 characters)"))
    check_clean_closes(ss)
    check_curr_released(ts0)


def mode_userspace(t):
    version, cipher = "TLSv1.3", "TLS_AES_128_GCM_SHA256"
    ctx = client_ctx(t, version, cipher)
    ts0, c0, off = tls_stat(), t.gwu.stats(), len(t.gwu.log())
    up, _ = smtp_upload(t, t.gwu, ctx, t.small, version, cipher, implicit=True,
                        what="userspace upload")
    down = imap_download(t, t.gwu, ctx, t.small_subject, t.small_msg, version, cipher,
                         what="userspace download")
    ss = wait_closed(t.gwu, off, 2)
    ts1, c1 = tls_stat(), t.gwu.stats()
    n = len(ss)
    note("mode=userspace: upload %.1f MiB in %.1f s, download in %.1f s"
         % (len(t.small) / MIB, up, down))
    check_engine(ss, version, cipher, "userspace", "userspace", "userspace")
    check_clean_closes(ss)
    check(ts1 == ts0, "/proc/net/tls_stat changed in mode = userspace: %s",
          {k: delta(ts1, ts0, k) for k in ts1 if delta(ts1, ts0, k)})
    check_counters(c0, c1, {"offload_userspace_tx": n, "offload_userspace_rx": n,
                            "offload_ktls_sw_tx": 0, "offload_ktls_sw_rx": 0,
                            "ktls_fallback": 0})
    check_eq(c1.get("ktls_fallback"), 0, "ktls_fallback of the userspace gateway")
    check(not [l for l in t.gwu.log().splitlines() if "kernel TLS fallback" in l],
          "the userspace gateway logged a kernel TLS fallback")


class SClientProc:
    """openssl s_client as an interactive child: lines in, output out."""

    def __init__(self, addr, args):
        host, port = addr
        cmd = ["openssl", "s_client", "-connect", mailstack.join_hostport(host, port),
               "-servername", GATEWAY_NAME] + list(args)
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.out = b""

    def read_until(self, pattern, timeout):
        """Output until pattern (bytes regex) matches; None at EOF/timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not rx.search(self.out):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.p.stdout], [], [], left)
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self.out += chunk
        return rx.search(self.out)

    def send(self, line):
        self.p.stdin.write(line)
        self.p.stdin.flush()

    def wait_exit(self, timeout):
        self.read_until(rb"(?!x)x", timeout)    # drain to EOF
        try:
            return self.p.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass

    def text(self):
        return self.out.decode("utf-8", "replace")


def keyupdate_session(t, command_first):
    """One s_client session on IMAPS that sends a KeyUpdate (`k`) after the
    greeting, or after a first command was answered (the relay then moves
    client bytes by splice), followed by a NOOP. Returns (port, output)."""
    sc = SClientProc(t.gw.addr("imaps"), ["-tls1_3"])
    try:
        m = sc.read_until(rb"\* OK[^\r\n]*\r?\n", 60)
        check(m is not None, "no IMAP greeting through s_client: %s", sc.text()[-400:])
        port = local_port_of(sc.p.pid, t.gw.port("imaps"))
        if command_first:
            sc.send(b"a CAPABILITY\n")
            check(sc.read_until(rb"\na OK[^\r\n]*\r?\n", 60) is not None,
                  "no reply to CAPABILITY: %s", sc.text()[-400:])
        sc.send(b"k\n")
        sc.read_until(rb"KEYUPDATE", 10)
        time.sleep(0.5)
        try:
            sc.send(b"b NOOP\n")
        except BrokenPipeError:
            pass
        sc.wait_exit(60)
        out = sc.text()
    finally:
        sc.close()
    check("KEYUPDATE" in out, "s_client did not send a KeyUpdate: %s", out[-400:])
    check(not re.search(r"^b OK", out, re.M),
          "the NOOP after the KeyUpdate was answered: the session went on")
    return port, out


def local_port_of(pid, remote_port, timeout=5.0):
    """The local port of pid's TCP connection to 127.0.0.1:remote_port."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]$", link)
        if m:
            inodes.add(m.group(1))
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            lport = int(fields[1].split(":")[1], 16)
            rport = int(fields[2].split(":")[1], 16)
            if fields[9] in inodes and rport == remote_port:
                return lport
    raise AssertionError("no connection of s_client (pid %d) to port %d" % (pid, remote_port))


def keyupdate(t):
    c0, off = t.gw.stats(), len(t.gw.log())
    for command_first in (False, True):
        port, _ = keyupdate_session(t, command_first)
        sid, _ = session_of_port(t.gw, off, port)
        s = wait_session_closed(t.gw, off, sid)
        check_engine({sid: s}, "TLSv1.3", "TLS_AES_128_GCM_SHA256", "ktls", "ktls_sw",
                     "ktls_sw")
        ku = [l for l in s["lines"] if "KeyUpdate" in l]
        check(ku, "no log line of session %s mentions KeyUpdate; its lines: %s", sid,
              s["lines"][-3:])
        note("keyupdate %s: %s | %s"
             % ("after a command (relay)" if command_first else "right after the greeting",
                ku[0].split(" sid=")[1], s["close"].split(" sid=")[1]))
    c1 = t.gw.stats()
    check_counters(c0, c1, {"ktls_keyupdate": 2})
    # the gateway goes on serving
    ctx = client_ctx(t, "TLSv1.3", "TLS_AES_128_GCM_SHA256")
    host, port = t.gw.addr("imaps")
    m = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=60)
    try:
        m.login("bob", mailstack.USERS["bob"])
        typ, _ = m.select("INBOX", readonly=True)
        check_eq(typ, "OK", "SELECT after the KeyUpdate sessions")
        typ, _ = m.noop()
        check_eq(typ, "OK", "NOOP after the KeyUpdate sessions")
    finally:
        m.logout()


class BioClient:
    """A TLS client over a plain socket through ssl.MemoryBIO, so that what
    the server sends after our close_notify can be seen as it is."""

    def __init__(self, addr, ctx, timeout=60):
        self.raw = socket.create_connection(addr, timeout=timeout)
        self.local_port = self.raw.getsockname()[1]
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=GATEWAY_NAME)
        self.buf = b""
        self._pump(self.obj.do_handshake)

    def _flush(self):
        if self.out.pending:
            self.raw.sendall(self.out.read())

    def _pump(self, fn):
        while True:
            try:
                r = fn()
                self._flush()
                return r
            except ssl.SSLWantReadError:
                self._flush()
                data = self.raw.recv(65536)
                if data:
                    self.inc.write(data)
                else:
                    self.inc.write_eof()

    def line(self):
        while b"\n" not in self.buf:
            self.buf += self._pump(lambda: self.obj.read(65536))
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("latin-1").rstrip("\r")

    def command(self, tag, text):
        self._pump(lambda: self.obj.write(("%s %s\r\n" % (tag, text)).encode()))
        while True:
            line = self.line()
            if line.startswith(tag + " "):
                check(line.startswith(tag + " OK"), "%s: %r", text.split()[0], line)
                return line

    def close_notify(self, timeout=30):
        """Send close_notify (unwrap), then read raw until the server
        closes: (bytes the server sent after it, whether they completed the
        TLS shutdown, i.e. held the server's close_notify)."""
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._flush()
        self.raw.settimeout(timeout)
        rest = b""
        while True:
            try:
                data = self.raw.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            rest += data
        answered = False
        if rest:
            self.inc.write(rest)
            try:
                self.obj.unwrap()
                answered = True
            except (ssl.SSLError, OSError):
                pass
        return rest, answered

    def close(self):
        self.raw.close()


def close_notify(t):
    c0, off = t.gw.stats(), len(t.gw.log())
    results = []
    for version, cipher in (("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
                            ("TLSv1.3", "TLS_AES_128_GCM_SHA256")):
        c = BioClient(t.gw.addr("imaps"), client_ctx(t, version, cipher))
        try:
            greet = c.line()
            check(greet.startswith("* OK"), "greeting %r", greet)
            c.command("a", "LOGIN bob %s" % mailstack.USERS["bob"])
            c.command("b", "NOOP")
            rest, answered = c.close_notify()
        finally:
            c.close()
        sid, s = session_of_port(t.gw, off, c.local_port)
        check_engine({sid: s}, version, cipher, "ktls", "ktls_sw", "ktls_sw")
        s = wait_session_closed(t.gw, off, sid)
        note("close_notify %s: session %s: close (%s); after the client's close_notify the "
             "gateway sent %d bytes%s before closing" % (
                 version, sid, s["reason"], len(rest),
                 " (its close_notify)" if answered else " (no close_notify)"))
        results.append((sid, s))
    ss = dict(results)
    check_clean_closes(ss)
    for sid, s in ss.items():
        check(not [l for l in s["lines"] if "alert" in l.lower()],
              "session %s logged an alert after close_notify: %s", sid, s["lines"][-2:])
    c1 = t.gw.stats()
    check_counters(c0, c1, {"ktls_keyupdate": 0, "ktls_fallback": 0})
    check(t.gw.alive(), "gateway not running")


CASES = [("ktls_%s_10mib_up_down" % tag, ktls_combo(tag, v, c, i), CASE_LIMIT)
         for i, (tag, v, c) in enumerate(COMBOS)]
CASES += [
    ("ktls_fallback_tls12_cbc_userspace", fallback_cbc, CASE_LIMIT),
    ("ktls_fallback_tls13_ccm_rx_userspace", fallback_ccm, CASE_LIMIT),
    ("ktls_mode_userspace_no_kernel_tls", mode_userspace, CASE_LIMIT),
    ("ktls_keyupdate_ends_session", keyupdate, 120),
    ("ktls_close_notify_clean", close_notify, 120),
]


def summary():
    if not TIMES:
        return
    note("transfer times (emulated CPU, compare ratios only):")
    for tag, what, secs, n in TIMES:
        note("  %-24s %-8s %6.1f MiB %7.1f s %6.2f MiB/s"
             % (tag, what, n / MIB, secs, n / MIB / secs if secs else 0))


if __name__ == "__main__":
    import atexit
    atexit.register(summary)
    run_cases(setup, CASES)
