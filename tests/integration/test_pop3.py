#!/usr/bin/python3
"""POP3 through mailgw: the gateway's pre-TLS dialogue (greeting, CAPA,
QUIT), STLS and implicit TLS with poplib, curl and a raw client, against a
real Dovecot; retrieved messages must equal what Dovecot serves itself."""

import os
import poplib
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403

SUBJECT = unique("pop3-fixture")
BODY = b"pop line\r\n.\r\n..\r\n.leading\r\nlast\r\n"


def setup():
    st = Stack("pop3").start()
    be = st.pop3_backend
    host = {"hostname": GATEWAY_NAME}
    gw = st.gateway([
        listener("pop3", "pop3", "starttls", be, require_tls="no", **host),
        listener("pop3req", "pop3", "starttls", be, require_tls="yes", **host),
        listener("pop3s", "pop3", "implicit", be, **host),
        listener("pop3plain", "pop3", "none", be, **host),
    ]).start()
    t = Ctx(st, gw=gw)
    deliver_direct(st, "bob", SUBJECT, BODY)
    _, t.reference = imap_fetch_direct(st, "bob", SUBJECT)
    return t


def retr_and_compare(t, p):
    """USER/PASS on poplib connection p, then RETR the fixture."""
    check(p.user("bob").startswith(b"+OK"), "USER refused")
    check(p.pass_("bobpw").startswith(b"+OK"), "PASS refused")
    count, _ = p.stat()
    check(count >= 1, "mailbox empty")
    for n in range(1, count + 1):
        _, head, _ = p.top(n, 0)
        if ("Subject: %s" % SUBJECT).encode() in head:
            break
    else:
        raise AssertionError("fixture not found by TOP")
    resp, lines, octets = p.retr(n)
    check(resp.startswith(b"+OK"), "RETR: %r", resp)
    got = b"\r\n".join(lines) + b"\r\n"
    check_same_bytes(got, t.reference, "retrieved message")
    check_same_bytes(body_of(got), BODY, "retrieved body")


# --- plaintext dialogue with the gateway -----------------------------------

def greeting(t):
    for name in ("pop3", "pop3req"):
        with Conn(t.gw.addr(name)) as c:
            l = c.line()
            check(l.startswith("+OK "), "%s greeting %r", name, l)
            check(GATEWAY_NAME in l, "%s greeting does not name %s: %r", name, GATEWAY_NAME, l)


def capa(t):
    for name in ("pop3", "pop3req"):
        with Conn(t.gw.addr(name)) as c:
            c.line()
            status, lines = c.pop3("CAPA", multiline=True)
            check(status.startswith("+OK"), "%s CAPA: %r", name, status)
            check("STLS" in [l.upper() for l in lines], "%s CAPA lacks STLS: %s", name, lines)


def noop_quit(t):
    with Conn(t.gw.addr("pop3req")) as c:
        c.line()
        status, _ = c.pop3("NOOP")
        # RFC 1939 allows NOOP only in TRANSACTION state: either answer is
        # fine, as long as there is one and the session goes on.
        check(status.startswith("+OK") or status.startswith("-ERR"), "NOOP: %r", status)
        status, _ = c.pop3("CAPA", multiline=True)
        check(status.startswith("+OK"), "CAPA after NOOP: %r", status)
        status, _ = c.pop3("QUIT")
        check(status.startswith("+OK"), "QUIT: %r", status)
        check(c.read_until_close(5) == b"", "bytes after QUIT")


def tls_none_no_stls(t):
    with Conn(t.gw.addr("pop3plain")) as c:
        l = c.line()
        check(l.startswith("+OK"), "greeting %r", l)
        status, lines = c.pop3("CAPA", multiline=True)
        check(status.startswith("+OK"), "CAPA: %r", status)
        check("STLS" not in [x.upper() for x in lines], "tls=none CAPA offers STLS: %s", lines)
        check(c.pop3("USER bob")[0].startswith("+OK"), "USER on tls=none")
        check(c.pop3("PASS bobpw")[0].startswith("+OK"), "PASS on tls=none")
        check(c.pop3("QUIT")[0].startswith("+OK"), "QUIT")


# --- clients through TLS ------------------------------------------------------

def poplib_stls(t):
    host, port = t.gw.addr("pop3req")
    p = poplib.POP3(host, port, timeout=TIMEOUT)
    try:
        check("STLS" in p.capa(), "no STLS before TLS")
        resp = p.stls(context=tls_context(t.certs))
        check(resp.startswith(b"+OK"), "STLS: %r", resp)
        caps = p.capa()
        check("STLS" not in caps, "STLS still advertised after TLS: %s", caps)
        check("UIDL" in caps and "TOP" in caps, "post-TLS CAPA not from the backend: %s", caps)
        retr_and_compare(t, p)
    finally:
        p.quit()


def poplib_implicit(t):
    host, port = t.gw.addr("pop3s")
    p = poplib.POP3_SSL(host, port, context=tls_context(t.certs), timeout=TIMEOUT)
    try:
        check(b"backend dovecot ready" in p.getwelcome(),
              "implicit TLS greeting is not the backend's: %r", p.getwelcome())
        retr_and_compare(t, p)
    finally:
        p.quit()


def poplib_plaintext_without_upgrade(t):
    host, port = t.gw.addr("pop3")
    p = poplib.POP3(host, port, timeout=TIMEOUT)
    try:
        retr_and_compare(t, p)
    finally:
        p.quit()


def _curl(t, scheme, name):
    need_tool("curl")
    base = "%s://127.0.0.1:%d" % (scheme, t.gw.port(name))
    common = ["--ssl-reqd", "--cacert", t.certs.bundle, "-u", "bob:bobpw"]
    rc, out, err = curl(common + [base + "/"])
    check(rc == 0, "curl LIST exit %d: %s", rc, err.strip())
    listing = re.findall(rb"^(\d+) (\d+)\r?$", out, re.M)
    check(listing, "no LIST output: %r", out[:200])
    for num, size in listing:
        rc, msg, err = curl(common + ["%s/%s" % (base, num.decode())])
        check(rc == 0, "curl RETR exit %d: %s", rc, err.strip())
        if ("Subject: %s" % SUBJECT).encode() in msg:
            check_same_bytes(msg, t.reference, "curl-retrieved message")
            return
    raise AssertionError("fixture not among %d messages" % len(listing))


def curl_stls(t):
    _curl(t, "pop3", "pop3req")


def curl_implicit(t):
    _curl(t, "pop3s", "pop3s")


def raw_stls_dialogue(t):
    with Conn(t.gw.addr("pop3req")) as c:
        c.line()
        status, _ = c.pop3("STLS")
        check(status.startswith("+OK"), "STLS: %r", status)
        c.starttls(tls_context(t.certs))
        check(t.certs.identify(c.peer_der()) == "ecdsa", "not the ECDSA certificate")
        status, lines = c.pop3("CAPA", multiline=True)
        check(status.startswith("+OK"), "CAPA after TLS: %r", status)
        upper = [l.upper() for l in lines]
        check("STLS" not in upper, "STLS after TLS: %s", lines)
        check("UIDL" in upper, "post-TLS CAPA not from the backend: %s", lines)
        check(c.pop3("USER bob")[0].startswith("+OK"), "USER after TLS")
        check(c.pop3("PASS bobpw")[0].startswith("+OK"), "PASS after TLS")
        status, _ = c.pop3("STAT")
        check(re.match(r"^\+OK \d+ \d+", status), "STAT: %r", status)
        check(c.pop3("QUIT")[0].startswith("+OK"), "QUIT")


def implicit_greeting_from_backend(t):
    with Conn(t.gw.addr("pop3s"), tls_ctx=tls_context(t.certs)) as c:
        l = c.line()
        check(l == "+OK backend dovecot ready.", "implicit TLS greeting %r", l)
        check(c.pop3("QUIT")[0].startswith("+OK"), "QUIT")


CASES = [
    ("pop3_greeting", greeting),
    ("pop3_capa", capa),
    ("pop3_noop_quit", noop_quit),
    ("pop3_tls_none_no_stls", tls_none_no_stls),
    ("pop3_poplib_stls", poplib_stls),
    ("pop3_poplib_implicit", poplib_implicit),
    ("pop3_poplib_plaintext_without_upgrade", poplib_plaintext_without_upgrade),
    ("pop3_curl_stls", curl_stls),
    ("pop3_curl_pop3s", curl_implicit),
    ("pop3_raw_stls_dialogue", raw_stls_dialogue),
    ("pop3_implicit_greeting_from_backend", implicit_greeting_from_backend),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
