#!/usr/bin/python3
"""What mailgw must refuse, and how: require_tls before the upgrade,
plaintext pipelined behind STARTTLS (the injection of CVE-2011-0411 and
its IMAP/POP3 twins), plaintext on implicit-TLS ports, dead backends,
clients that stall in the handshake or go idle, over-long lines and too
many pre-TLS commands.  Each refusal is checked on the wire, in the counter
it must bump, and by the gateway still serving afterwards."""

import os
import re
import smtplib
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403

SENDER = "sender@example.org"
ALICE = "alice@example.test"
PRETLS_MAX = 5
HS_TIMEOUT = 2
IDLE_TIMEOUT = 2


def setup():
    st = Stack("negative").start()
    dead = ("127.0.0.1", closed_port())
    common = {"hostname": GATEWAY_NAME, "handshake_timeout": HS_TIMEOUT,
              "max_pretls_commands": PRETLS_MAX}
    L = listener
    gw = st.gateway([
        L("smtp", "smtp", "starttls", st.smtp_backend, require_tls="no", **common),
        L("submission", "smtp", "starttls", st.smtp_backend, require_tls="yes", **common),
        L("smtps", "smtp", "implicit", st.smtp_backend, **common),
        L("imap", "imap", "starttls", st.imap_backend, require_tls="yes", **common),
        L("imaps", "imap", "implicit", st.imap_backend, **common),
        L("pop3", "pop3", "starttls", st.pop3_backend, require_tls="yes", **common),
        L("pop3s", "pop3", "implicit", st.pop3_backend, **common),
        L("smtpdead", "smtp", "starttls", dead, require_tls="no", connect_timeout=3, **common),
        L("smtpsdead", "smtp", "implicit", dead, connect_timeout=3, **common),
        L("imapdead", "imap", "starttls", dead, require_tls="no", connect_timeout=3, **common),
        L("imapsdead", "imap", "implicit", dead, connect_timeout=3, **common),
        L("pop3dead", "pop3", "starttls", dead, require_tls="no", connect_timeout=3, **common),
        L("pop3sdead", "pop3", "implicit", dead, connect_timeout=3, **common),
        L("smtpidle", "smtp", "implicit", st.smtp_backend, idle_timeout=IDLE_TIMEOUT, **common),
    ]).start()
    return Ctx(st, gw=gw)


def ctx_tls(t):
    return tls_context(t.certs)


class Counter:
    """with Counter(t, "name", n): the stats counter must grow by >= n."""

    def __init__(self, t, name, n=1):
        self.t, self.name, self.n = t, name, n

    def __enter__(self):
        stats = self.t.gw.stats()
        check(self.name in stats, "the stats line has no counter %s", self.name)
        self.before = stats[self.name]
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return False
        deadline = time.monotonic() + 3
        while True:
            after = self.t.gw.stats()[self.name]
            if after >= self.before + self.n:
                return False
            if time.monotonic() > deadline:
                raise AssertionError("counter %s went %d -> %d, want +%d"
                                     % (self.name, self.before, after, self.n))
            time.sleep(0.2)


def still_serving(t, name="smtps"):
    """The listener still greets; over TLS for implicit ones."""
    implicit = [l for l in t.gw.listeners if l["name"] == name][0]["tls"] == "implicit"
    with Conn(t.gw.addr(name), tls_ctx=ctx_tls(t) if implicit else None) as c:
        l = c.line()
        check(l[:3] in ("220", "* O", "+OK"), "after the refusal %s greets %r", name, l)


def lines_of(data):
    return data.decode("latin-1").split("\r\n")


# --- require_tls --------------------------------------------------------------

def smtp_require_tls(t):
    with Counter(t, "require_tls_refused", 2), Conn(t.gw.addr("submission")) as c:
        c.line()
        c.smtp_expect("EHLO client.example.org", 250)
        lines = c.smtp_expect("MAIL FROM:<%s>" % SENDER, 530)
        check(lines[0].startswith("5.7.0"), "530 without 5.7.0: %r", lines)
        lines = c.smtp_expect("AUTH PLAIN AGFsaWNlAGFsaWNlcHc=", 530)
        check(lines[0].startswith("5.7.0"), "AUTH refusal: %r", lines)
        c.smtp_expect("QUIT", 221)


def imap_require_tls(t):
    with Counter(t, "require_tls_refused", 2), Conn(t.gw.addr("imap")) as c:
        c.line()
        _, tagged = c.imap("a1", "LOGIN alice alicepw")
        check(tagged.startswith("a1 NO"), "LOGIN before TLS: %r", tagged)
        check("[PRIVACYREQUIRED]" in tagged, "LOGIN refusal lacks [PRIVACYREQUIRED]: %r", tagged)
        _, tagged = c.imap("a2", "AUTHENTICATE PLAIN AGFsaWNlAGFsaWNlcHc=")
        check(tagged.startswith("a2 NO"), "AUTHENTICATE before TLS: %r", tagged)
        c.imap_ok("a3", "LOGOUT")


def pop3_require_tls(t):
    with Counter(t, "require_tls_refused", 2), Conn(t.gw.addr("pop3")) as c:
        c.line()
        status, _ = c.pop3("USER alice")
        check(status.startswith("-ERR"), "USER before TLS: %r", status)
        status, _ = c.pop3("AUTH PLAIN AGFsaWNlAGFsaWNlcHc=")
        check(status.startswith("-ERR"), "AUTH before TLS: %r", status)
        check(c.pop3("QUIT")[0].startswith("+OK"), "QUIT")


# --- STARTTLS injection -----------------------------------------------------

def smtp_injection(t):
    for name in ("submission", "smtp"):
        with Counter(t, "starttls_injection"), Conn(t.gw.addr(name)) as c:
            c.line()
            c.smtp_expect("EHLO client.example.org", 250)
            c.send("STARTTLS\r\nMAIL FROM:<%s>\r\n" % SENDER)
            data = c.read_until_close(5)
            ls = [l for l in lines_of(data) if l]
            check(not any(l.startswith("220") for l in ls),
                  "%s: go-ahead for TLS despite injected plaintext: %r", name, data[:200])
            check(ls and ls[0].startswith("554 5.7.0"), "%s: want 554 5.7.0, got %r",
                  name, data[:200])
    still_serving(t, "submission")


def imap_injection(t):
    with Counter(t, "starttls_injection"), Conn(t.gw.addr("imap")) as c:
        c.line()
        c.send("a1 STARTTLS\r\na2 LOGIN alice alicepw\r\n")
        data = c.read_until_close(5)
        check(not re.search(rb"^a1 OK", data, re.M),
              "IMAP: go-ahead for TLS despite injected plaintext: %r", data[:200])
        check(b"\x16\x03" not in data, "TLS bytes after injection")
    still_serving(t, "imaps")


def pop3_injection(t):
    with Counter(t, "starttls_injection"), Conn(t.gw.addr("pop3")) as c:
        c.line()
        c.send("STLS\r\nUSER alice\r\n")
        data = c.read_until_close(5)
        check(not data.startswith(b"+OK"),
              "POP3: go-ahead for TLS despite injected plaintext: %r", data[:200])
    still_serving(t, "pop3s")


# --- plaintext on implicit-TLS ports -----------------------------------------

def plaintext_on_implicit(t):
    for name, text in (("smtps", "EHLO client.example.org\r\n"),
                       ("imaps", "a1 CAPABILITY\r\n"), ("pop3s", "CAPA\r\n")):
        with Counter(t, "tls_handshake_fail"), Conn(t.gw.addr(name)) as c:
            c.send(text)
            data = c.read_until_close(5)
            check(data == b"" or data[0] == 0x15,
                  "%s answered plaintext with something not a TLS alert: %r", name, data[:60])
        still_serving(t, name)


# --- dead backends ------------------------------------------------------------

def _smtp_session_after_tls(t, name):
    c = Conn(t.gw.addr(name))
    c.line()
    c.smtp_expect("EHLO client.example.org", 250)
    c.smtp_expect("STARTTLS", 220)
    c.starttls(ctx_tls(t))
    return c


def smtp_backend_down(t):
    subject = unique("concurrent")
    live = _smtp_session_after_tls(t, "smtp")
    try:
        live.smtp_expect("EHLO client.example.org", 250)
        with Counter(t, "backend_fail"), _smtp_session_after_tls(t, "smtpdead") as c:
            code, lines = c.smtp("EHLO client.example.org")
            check(code == 421, "dead backend after STARTTLS: got %d %s, want 421", code, lines)
            check(c.read_until_close(5) == b"", "bytes after 421")
        with Conn(t.gw.addr("smtpsdead"), tls_ctx=ctx_tls(t)) as c:
            l = c.line()
            check(l.startswith("421"), "dead backend on implicit TLS: %r, want 421", l)
        # the concurrent session on the live listener is untouched
        live.smtp_expect("MAIL FROM:<%s>" % SENDER, 250)
        live.smtp_expect("RCPT TO:<%s>" % ALICE, 250)
        live.smtp_expect("DATA", 354)
        live.send(make_message(subject, b"still here\r\n") + b".\r\n")
        code, _ = live.smtp_reply()
        check_eq(code, 250, "DATA on the concurrent session")
        live.smtp_expect("QUIT", 221)
    finally:
        live.close()
    t.stack.wait_for_message("alice", subject)


def imap_backend_down(t):
    with Counter(t, "backend_fail"), Conn(t.gw.addr("imapdead")) as c:
        c.line()
        c.imap_ok("a1", "STARTTLS")
        c.starttls(ctx_tls(t))
        c.send("a2 CAPABILITY\r\n")
        l = c.line()
        check(l.startswith("* BYE"), "dead backend after STARTTLS: %r, want * BYE", l)
        c.read_until_close(5)
    with Conn(t.gw.addr("imapsdead"), tls_ctx=ctx_tls(t)) as c:
        l = c.line()
        check(l.startswith("* BYE"), "dead backend on implicit TLS: %r, want * BYE", l)
    still_serving(t, "imaps")


def pop3_backend_down(t):
    with Counter(t, "backend_fail"), Conn(t.gw.addr("pop3dead")) as c:
        c.line()
        check(c.pop3("STLS")[0].startswith("+OK"), "STLS")
        c.starttls(ctx_tls(t))
        c.send("CAPA\r\n")
        l = c.line()
        check(l.startswith("-ERR"), "dead backend after STLS: %r, want -ERR", l)
        c.read_until_close(5)
    with Conn(t.gw.addr("pop3sdead"), tls_ctx=ctx_tls(t)) as c:
        l = c.line()
        check(l.startswith("-ERR"), "dead backend on implicit TLS: %r, want -ERR", l)
    still_serving(t, "pop3s")


# --- stalled handshakes and idle sessions -------------------------------------

def _closed_in_window(c, low, high, what):
    took = c.closed_within(high + 3)
    check(low <= took <= high, "%s: closed after %.1f s, want %.1f..%.1f s", what, took, low,
          high)


def handshake_timeout_implicit(t):
    hello = client_hello()
    with Counter(t, "handshake_timeout", 2):
        with Conn(t.gw.addr("smtps")) as c1, Conn(t.gw.addr("imaps")) as c2:
            c1.send(hello[:len(hello) // 2])      # stalls mid-ClientHello
            # c2 sends nothing at all
            _closed_in_window(c1, HS_TIMEOUT - 0.5, HS_TIMEOUT + 2.5, "half a ClientHello")
            _closed_in_window(c2, 0, HS_TIMEOUT + 2.5, "silent client")
    still_serving(t, "smtps")


def handshake_timeout_starttls(t):
    hello = client_hello()
    with Counter(t, "handshake_timeout"), Conn(t.gw.addr("submission")) as c:
        c.line()
        c.smtp_expect("EHLO client.example.org", 250)
        c.smtp_expect("STARTTLS", 220)
        t0 = time.monotonic()
        c.send(hello[:len(hello) // 2])
        c.read_until_close(HS_TIMEOUT + 3)
        took = time.monotonic() - t0
        check(HS_TIMEOUT - 0.5 <= took <= HS_TIMEOUT + 2.5,
              "stalled STARTTLS handshake closed after %.1f s, want about %d s", took, HS_TIMEOUT)


def idle_timeout(t):
    with Counter(t, "idle_timeout"), Conn(t.gw.addr("smtpidle"), tls_ctx=ctx_tls(t)) as c:
        check(c.line().startswith("220"), "greeting")
        c.smtp_expect("EHLO client.example.org", 250)
        t0 = time.monotonic()
        data = c.read_until_close(IDLE_TIMEOUT + 4)
        took = time.monotonic() - t0
        check(IDLE_TIMEOUT - 0.5 <= took <= IDLE_TIMEOUT + 3,
              "idle session closed after %.1f s, want about %d s", took, IDLE_TIMEOUT)
        check(data == b"" or data.startswith(b"421"), "idle close sent %r", data[:80])


# --- line length and command count ------------------------------------------

def smtp_line_too_long(t):
    with Counter(t, "line_too_long", 2):
        with Conn(t.gw.addr("submission")) as c:
            c.line()
            c.send("EHLO " + "a" * 600 + "\r\n")
            data = c.read_until_close(5)
            check(data.startswith(b"500"), "over-long line: want 500, got %r", data[:80])
        with Conn(t.gw.addr("smtp")) as c:
            c.line()
            c.send("NOOP " + "x" * 5000)            # no line end at all
            data = c.read_until_close(5)
            check(data.startswith(b"500"), "unterminated line: want 500, got %r", data[:80])
    still_serving(t, "smtps")


def imap_pop3_line_too_long(t):
    with Counter(t, "line_too_long", 2):
        with Conn(t.gw.addr("imap")) as c:
            c.line()
            c.send("a1 NOOP " + "x" * 9000 + "\r\n")
            data = c.read_until_close(5)
            check(not re.search(rb"^a1 OK", data, re.M), "IMAP accepted a 9000-byte line")
        with Conn(t.gw.addr("pop3")) as c:
            c.line()
            c.send("CAPA " + "x" * 400 + "\r\n")
            data = c.read_until_close(5)
            check(not data.startswith(b"+OK"), "POP3 accepted a 400-byte line")


def _count_until_refused(c, send, ok):
    """Send pre-TLS commands until the gateway refuses; returns (number of
    commands answered normally, refusal line)."""
    for i in range(PRETLS_MAX + 3):
        reply = send(i)
        if not ok(reply):
            return i, reply
    raise AssertionError("%d pre-TLS commands all answered" % (PRETLS_MAX + 3))


def smtp_pretls_limit(t):
    with Counter(t, "pretls_limit"), Conn(t.gw.addr("submission")) as c:
        c.line()
        n, (code, lines) = _count_until_refused(c, lambda i: c.smtp("NOOP"),
                                                lambda r: r[0] == 250)
        check(code == 421, "refusal after %d commands: %d %s, want 421", n, code, lines)
        check_eq(n, PRETLS_MAX, "commands answered before the 421")
        check(c.read_until_close(5) == b"", "bytes after 421")


def imap_pretls_limit(t):
    with Counter(t, "pretls_limit"), Conn(t.gw.addr("imap")) as c:
        c.line()

        def send(i):
            c.send("n%d NOOP\r\n" % i)
            return c.line()

        n, refusal = _count_until_refused(c, send, lambda l: re.match(r"^n\d+ OK", l))
        check(refusal.startswith("* BYE"), "refusal after %d commands: %r, want * BYE", n,
              refusal)
        check_eq(n, PRETLS_MAX, "commands answered before the BYE")
        c.read_until_close(5)


def pop3_pretls_limit(t):
    with Counter(t, "pretls_limit"), Conn(t.gw.addr("pop3")) as c:
        c.line()
        n, (status, _) = _count_until_refused(c, lambda i: c.pop3("CAPA", multiline=True),
                                              lambda r: r[0].startswith("+OK"))
        check(status.startswith("-ERR"), "refusal after %d commands: %r, want -ERR", n, status)
        check_eq(n, PRETLS_MAX, "commands answered before the -ERR")
        c.read_until_close(5)


def log_escapes_client_bytes(t):
    # A client controls what it sends; the log must not carry its control
    # bytes (terminal escapes, CR/LF that forge lines) verbatim.
    with Conn(t.gw.addr("submission")) as c:
        c.line()
        c.smtp_expect("EHLO client.example.org", 250)
        c.send(b"MAIL FROM:<\x1b[2J\x07evil\rfake 2026-01-01T00:00:00.000Z error forged>\r\n")
        c.line()
        c.smtp_expect("QUIT", 221)
        needle = "127.0.0.1:%d " % c.local_port
    time.sleep(0.2)
    raw = open(t.gw.log_path, "rb").read()
    mine = [l for l in raw.split(b"\n") if needle.encode() in l]
    check(mine, "no log lines for the session")
    bad = [l for l in mine if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", l)]
    check(not bad, "client control bytes written to the log verbatim: %r", bad[:1])


def smtp_still_delivers(t):
    subject = unique("after-negatives")
    host, port = t.gw.addr("submission")
    s = smtplib.SMTP(host, port, timeout=TIMEOUT)
    try:
        s.starttls(context=ctx_tls(t))
        s.sendmail(SENDER, [ALICE], make_message(subject, b"ok\r\n"))
    finally:
        s.quit()
    t.stack.wait_for_message("alice", subject)


CASES = [
    ("neg_smtp_require_tls_530", smtp_require_tls),
    ("neg_imap_require_tls_login_no", imap_require_tls),
    ("neg_pop3_require_tls_err", pop3_require_tls),
    ("neg_smtp_starttls_injection", smtp_injection),
    ("neg_imap_starttls_injection", imap_injection),
    ("neg_pop3_stls_injection", pop3_injection),
    ("neg_plaintext_on_implicit_ports", plaintext_on_implicit),
    ("neg_smtp_backend_down_421", smtp_backend_down),
    ("neg_imap_backend_down_bye", imap_backend_down),
    ("neg_pop3_backend_down_err", pop3_backend_down),
    ("neg_handshake_timeout_implicit", handshake_timeout_implicit),
    ("neg_handshake_timeout_starttls", handshake_timeout_starttls),
    ("neg_idle_timeout", idle_timeout),
    ("neg_smtp_line_too_long_500", smtp_line_too_long),
    ("neg_imap_pop3_line_too_long", imap_pop3_line_too_long),
    ("neg_smtp_pretls_limit_421", smtp_pretls_limit),
    ("neg_imap_pretls_limit_bye", imap_pretls_limit),
    ("neg_pop3_pretls_limit_err", pop3_pretls_limit),
    ("neg_log_escapes_client_bytes", log_escapes_client_bytes),
    ("neg_smtp_still_delivers", smtp_still_delivers),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
