#!/usr/bin/python3
"""SMTP through mailgw: the gateway's own plaintext dialogue, STARTTLS on
port-25 and submission style listeners, implicit TLS, with swaks, curl and
smtplib as clients and a real Postfix behind; mail must land in the maildir."""

import os
import re
import smtplib
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403

ALICE = "alice@example.test"
SENDER = "sender@example.org"
LOG_LINE_RX = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (debug|info|warn|error) ")
COUNTERS = ("connections", "starttls_injection", "tls_handshake_ok", "tls_handshake_fail",
            "backend_fail", "line_too_long", "pretls_limit", "handshake_timeout",
            "idle_timeout", "require_tls_refused")


def setup():
    st = Stack("smtp").start(dovecot=False)
    be = st.smtp_backend
    host = {"hostname": GATEWAY_NAME}
    gw = st.gateway([
        listener("smtp", "smtp", "starttls", be, require_tls="no", **host),
        listener("submission", "smtp", "starttls", be, require_tls="yes", **host),
        listener("smtps", "smtp", "implicit", be, **host),
        listener("smtpplain", "smtp", "none", be, **host),
    ]).start()
    return Ctx(st, gw=gw)


def ctx_tls(t):
    return tls_context(t.certs)


def arrived(t, subject):
    return t.stack.wait_for_message("alice", "Subject: %s" % subject)


# --- plaintext dialogue with the gateway -----------------------------------

def greeting(t):
    for name in ("smtp", "submission"):
        with Conn(t.gw.addr(name)) as c:
            l = c.line()
            check(l.startswith("220 "), "%s greeting %r does not start with '220 '", name, l)
            check(l.startswith("220 %s " % GATEWAY_NAME),
                  "%s greeting %r does not name %s", name, l, GATEWAY_NAME)


def ehlo_advertises_starttls(t):
    for name in ("smtp", "submission"):
        with Conn(t.gw.addr(name)) as c:
            c.line()
            lines = c.smtp_expect("EHLO client.example.org", 250)
            check(lines[0].split(" ")[0] == GATEWAY_NAME,
                  "%s: EHLO greeting line %r is not the gateway's", name, lines[0])
            check("STARTTLS" in ehlo_keywords(lines), "%s: no STARTTLS in %s", name, lines)


def ehlo_no_starttls_without_tls(t):
    with Conn(t.gw.addr("smtpplain")) as c:
        l = c.line()
        check(l.startswith("220 "), "greeting %r", l)
        lines = c.smtp_expect("EHLO client.example.org", 250)
        check("STARTTLS" not in ehlo_keywords(lines), "tls=none listener offers STARTTLS: %s",
              lines)
        c.smtp_expect("QUIT", 221)


def noop_rset_quit(t):
    for name in ("smtp", "submission"):
        with Conn(t.gw.addr(name)) as c:
            c.line()
            c.smtp_expect("EHLO client.example.org", 250)
            c.smtp_expect("NOOP", 250)
            c.smtp_expect("RSET", 250)
            c.smtp_expect("QUIT", 221)
            check(c.read_until_close(5) == b"", "bytes after 221")


def helo_answered(t):
    with Conn(t.gw.addr("smtp")) as c:
        c.line()
        lines = c.smtp_expect("HELO client.example.org", 250)
        check(GATEWAY_NAME in lines[0], "HELO reply %r does not name the gateway", lines[0])


# --- clients through STARTTLS and implicit TLS ------------------------------

def _swaks_case(t, name, mode):
    need_tool("swaks")
    subject = unique("swaks-" + name)
    rc, out = swaks(t.gw.addr(name), [mode, "--from", SENDER, "--to", ALICE,
                                      "--ehlo", "client.example.org",
                                      "--header", "Subject: %s" % subject,
                                      "--body", "swaks body for %s" % subject])
    check(rc == 0, "swaks exit %d: %s", rc, out[-400:])
    check("TLS started" in out, "swaks did not start TLS: %s", out[-400:])
    tls_lines = [l for l in out.splitlines() if l.startswith("<~")]
    check(any(l.startswith("<~  250") for l in tls_lines), "no 250 after TLS")
    check(not any("STARTTLS" in l for l in tls_lines),
          "EHLO after TLS still advertises STARTTLS: %s", tls_lines)
    if mode == "--tls":
        check(any(l.startswith("<~  250-%s" % BACKEND_NAME) for l in tls_lines),
              "EHLO after TLS was not answered by the backend: %s", tls_lines[:3])
    msg = arrived(t, subject)
    check(b"swaks body for %s" % subject.encode() in msg, "body missing from delivered mail")


def swaks_starttls_smtp(t):
    _swaks_case(t, "smtp", "--tls")


def swaks_starttls_submission(t):
    _swaks_case(t, "submission", "--tls")


def swaks_implicit_smtps(t):
    _swaks_case(t, "smtps", "--tlsc")


def _curl_case(t, scheme, name):
    need_tool("curl")
    subject = unique("curl-" + scheme)
    body = b"curl line 1\r\n.dot line\r\ncurl line 3\r\n"
    msg = make_message(subject, body)
    with tempfile.NamedTemporaryFile(dir=t.stack.dir, suffix=".eml") as f:
        f.write(msg)
        f.flush()
        rc, out, err = curl(["--ssl-reqd", "--cacert", t.certs.bundle,
                             "%s://127.0.0.1:%d" % (scheme, t.gw.port(name)),
                             "--mail-from", SENDER, "--mail-rcpt", ALICE, "-T", f.name])
    check(rc == 0, "curl exit %d: %s", rc, err.strip())
    check_same_bytes(body_of(arrived(t, subject)), lf(body), "delivered body")


def curl_smtp_starttls(t):
    _curl_case(t, "smtp", "submission")


def curl_smtps(t):
    _curl_case(t, "smtps", "smtps")


def smtplib_starttls(t):
    subject = unique("smtplib-starttls")
    body = b"line one\r\n.\r\n..\r\nline four\r\n"
    host, port = t.gw.addr("submission")
    s = smtplib.SMTP(host, port, timeout=TIMEOUT)
    try:
        code, _ = s.ehlo("client.example.org")
        check_eq(code, 250, "EHLO before TLS")
        check(s.has_extn("starttls"), "no STARTTLS before TLS")
        code, resp = s.starttls(context=ctx_tls(t))
        check_eq(code, 220, "STARTTLS reply")
        code, resp = s.ehlo("client.example.org")
        check_eq(code, 250, "EHLO after TLS")
        check(not s.has_extn("starttls"), "STARTTLS advertised after TLS: %r", resp)
        check(resp.split(b"\n")[0].startswith(BACKEND_NAME.encode()),
              "EHLO after TLS not from the backend: %r", resp[:60])
        check(s.has_extn("size"), "backend's SIZE missing after TLS: %r", resp)
        refused = s.sendmail(SENDER, [ALICE], make_message(subject, body))
        check_eq(refused, {}, "refused recipients")
    finally:
        s.quit()
    check_same_bytes(body_of(arrived(t, subject)), lf(body), "delivered body")


def smtplib_implicit(t):
    subject = unique("smtplib-ssl")
    body = b"over implicit TLS\r\n"
    host, port = t.gw.addr("smtps")
    s = smtplib.SMTP_SSL(host, port, timeout=TIMEOUT, context=ctx_tls(t))
    try:
        code, banner = s.ehlo("client.example.org")
        check_eq(code, 250, "EHLO")
        check(not s.has_extn("starttls"), "STARTTLS advertised on implicit TLS")
        s.sendmail(SENDER, [ALICE], make_message(subject, body))
    finally:
        s.quit()
    check_same_bytes(body_of(arrived(t, subject)), lf(body), "delivered body")


def implicit_greeting_from_backend(t):
    with Conn(t.gw.addr("smtps"), tls_ctx=ctx_tls(t)) as c:
        l = c.line()
        check(l.startswith("220 %s ESMTP backend" % BACKEND_NAME),
              "implicit TLS greeting %r is not the backend's", l)
        c.smtp_expect("QUIT", 221)


def raw_starttls_dialogue(t):
    subject = unique("raw")
    with Conn(t.gw.addr("submission")) as c:
        c.line()
        c.smtp_expect("EHLO client.example.org", 250)
        lines = c.smtp_expect("STARTTLS", 220)
        check(lines[0].startswith("2.0.0"), "STARTTLS reply %r", lines)
        c.starttls(ctx_tls(t))
        check(c.tls_version() in ("TLSv1.2", "TLSv1.3"), "TLS version %s", c.tls_version())
        check(t.certs.identify(c.peer_der()) == "ecdsa", "not the ECDSA certificate")
        lines = c.smtp_expect("EHLO client.example.org", 250)
        check(lines[0].split(" ")[0] == BACKEND_NAME, "post-TLS EHLO from %r", lines[0])
        check("STARTTLS" not in ehlo_keywords(lines), "STARTTLS after TLS: %s", lines)
        c.smtp_expect("MAIL FROM:<%s>" % SENDER, 250)
        c.smtp_expect("RCPT TO:<%s>" % ALICE, 250)
        c.smtp_expect("DATA", 354)
        c.send(make_message(subject, b"raw body\r\n") + b".\r\n")
        code, lines = c.smtp_reply()
        check_eq(code, 250, "end of DATA")
        c.smtp_expect("QUIT", 221)
    arrived(t, subject)


def plaintext_relay_without_upgrade(t):
    subject = unique("plain")
    body = b"never upgraded\r\n"
    host, port = t.gw.addr("smtp")
    s = smtplib.SMTP(host, port, timeout=TIMEOUT)
    try:
        s.ehlo("client.example.org")
        refused = s.sendmail(SENDER, [ALICE], make_message(subject, body))
        check_eq(refused, {}, "refused recipients")
    finally:
        s.quit()
    check_same_bytes(body_of(arrived(t, subject)), lf(body), "delivered body")


def plaintext_relay_tls_none(t):
    subject = unique("tlsnone")
    host, port = t.gw.addr("smtpplain")
    s = smtplib.SMTP(host, port, timeout=TIMEOUT)
    try:
        s.sendmail(SENDER, [ALICE], make_message(subject, b"x\r\n"))
    finally:
        s.quit()
    arrived(t, subject)


# --- log and counters -------------------------------------------------------

def log_lines_well_formed(t):
    with Conn(t.gw.addr("smtp")) as c:
        c.line()
        c.smtp_expect("QUIT", 221)
        port = c.local_port
    # Ephemeral ports get reused by later connections to other listeners, so
    # look for this session's line by listener and port together.
    needle = r"\[smtp\] 127\.0\.0\.1:%d sid=" % port
    line = t.gw.wait_log(needle, 5)
    check(line is not None, "no [smtp] log line mentions the client port %d", port)
    check(re.search(r"\bsid=[0-9a-f]{12}\b", line), "session line lacks sid=: %r", line)
    bad = [l for l in t.gw.own_lines() if l.strip() and not LOG_LINE_RX.match(l)]
    check(not bad, "%d log lines not in the documented format, first: %r", len(bad),
          bad[0] if bad else "")


def stats_counters(t):
    before = t.gw.stats()
    missing = [k for k in COUNTERS if k not in before]
    check(not missing, "stats line lacks %s", missing)
    with Conn(t.gw.addr("smtps"), tls_ctx=ctx_tls(t)) as c:
        c.line()
        c.smtp_expect("QUIT", 221)
    after = t.gw.stats()
    check(after["connections"] >= before["connections"] + 1, "connections %d -> %d",
          before["connections"], after["connections"])
    check(after["tls_handshake_ok"] >= before["tls_handshake_ok"] + 1,
          "tls_handshake_ok %d -> %d", before["tls_handshake_ok"], after["tls_handshake_ok"])
    check_eq(after["starttls_injection"], before["starttls_injection"], "starttls_injection")


CASES = [
    ("smtp_greeting", greeting),
    ("smtp_ehlo_advertises_starttls", ehlo_advertises_starttls),
    ("smtp_ehlo_no_starttls_on_tls_none", ehlo_no_starttls_without_tls),
    ("smtp_noop_rset_quit", noop_rset_quit),
    ("smtp_helo", helo_answered),
    ("smtp_swaks_starttls_port25", swaks_starttls_smtp),
    ("smtp_swaks_starttls_submission", swaks_starttls_submission),
    ("smtp_swaks_implicit", swaks_implicit_smtps),
    ("smtp_curl_starttls", curl_smtp_starttls),
    ("smtp_curl_smtps", curl_smtps),
    ("smtp_smtplib_starttls", smtplib_starttls),
    ("smtp_smtplib_implicit", smtplib_implicit),
    ("smtp_implicit_greeting_from_backend", implicit_greeting_from_backend),
    ("smtp_raw_starttls_dialogue", raw_starttls_dialogue),
    ("smtp_plaintext_relay_without_upgrade", plaintext_relay_without_upgrade),
    ("smtp_plaintext_relay_tls_none", plaintext_relay_tls_none),
    ("smtp_log_format", log_lines_well_formed),
    ("smtp_stats_counters", stats_counters),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
