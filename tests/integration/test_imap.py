#!/usr/bin/python3
"""IMAP through mailgw: the gateway's pre-TLS dialogue (greeting,
CAPABILITY, NOOP, LOGOUT), STARTTLS and implicit TLS with imaplib, curl
and a raw client, against a real Dovecot; fetched messages must equal what
Dovecot itself serves, byte for byte."""

import imaplib
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403

SUBJECT = unique("imap-fixture")
BODY = b"first line\r\n.\r\n..two dots\r\nlast line\r\n"


def setup():
    st = Stack("imap").start()
    be = st.imap_backend
    host = {"hostname": GATEWAY_NAME}
    gw = st.gateway([
        listener("imap", "imap", "starttls", be, require_tls="no", **host),
        listener("imapreq", "imap", "starttls", be, require_tls="yes", **host),
        listener("imaps", "imap", "implicit", be, **host),
        listener("imapplain", "imap", "none", be, **host),
    ]).start()
    t = Ctx(st, gw=gw)
    deliver_direct(st, "alice", SUBJECT, BODY)
    t.uid, t.reference = imap_fetch_direct(st, "alice", SUBJECT)
    return t


def caps_of(line):
    m = re.search(r"\[CAPABILITY ([^\]]*)\]", line)
    return m.group(1).upper().split() if m else []


def fetch_and_compare(t, m):
    """Log in on imaplib connection m and check that the fixture message
    comes through unchanged."""
    typ, _ = m.login("alice", "alicepw")
    check_eq(typ, "OK", "LOGIN")
    typ, data = m.select("INBOX", readonly=True)
    check_eq(typ, "OK", "SELECT")
    typ, data = m.uid("FETCH", t.uid, "(BODY.PEEK[])")
    check_eq(typ, "OK", "UID FETCH")
    check(data and isinstance(data[0], tuple), "FETCH returned no literal: %r", data[:1])
    check_same_bytes(data[0][1], t.reference, "fetched message")
    check_same_bytes(body_of(data[0][1]), BODY, "fetched body")


# --- plaintext dialogue with the gateway -----------------------------------

def greeting(t):
    for name, required in (("imap", False), ("imapreq", True)):
        with Conn(t.gw.addr(name)) as c:
            l = c.line()
            check(l.startswith("* OK "), "%s greeting %r", name, l)
            caps = caps_of(l)
            check("IMAP4REV1" in caps and "STARTTLS" in caps,
                  "%s greeting capabilities %s lack IMAP4rev1/STARTTLS", name, caps)
            check(("LOGINDISABLED" in caps) == required,
                  "%s: LOGINDISABLED %s with require_tls=%s", name,
                  "present" if "LOGINDISABLED" in caps else "absent", required)
            check(GATEWAY_NAME in l, "%s greeting does not name %s: %r", name, GATEWAY_NAME, l)


def capability(t):
    for name, required in (("imap", False), ("imapreq", True)):
        with Conn(t.gw.addr(name)) as c:
            c.line()
            untagged = c.imap_ok("a1", "CAPABILITY")
            cap = [l for l in untagged if l.upper().startswith("* CAPABILITY ")]
            check(len(cap) == 1, "%s: want one * CAPABILITY line, got %s", name, untagged)
            words = cap[0].upper().split()[2:]
            check("IMAP4REV1" in words, "%s: no IMAP4rev1 in %s", name, words)
            check("STARTTLS" in words, "%s: no STARTTLS in %s", name, words)
            check(("LOGINDISABLED" in words) == required, "%s: LOGINDISABLED wrong in %s",
                  name, words)


def noop_logout(t):
    with Conn(t.gw.addr("imapreq")) as c:
        c.line()
        c.imap_ok("a1", "NOOP")
        untagged = c.imap_ok("a2", "LOGOUT")
        check(any(l.startswith("* BYE") for l in untagged), "no * BYE before LOGOUT OK: %s",
              untagged)
        check(c.read_until_close(5) == b"", "bytes after LOGOUT")


def unknown_command_pretls(t):
    with Conn(t.gw.addr("imapreq")) as c:
        c.line()
        _, tagged = c.imap("a1", "SELECT INBOX")
        check(re.match(r"^a1 (NO|BAD) ", tagged), "SELECT before login/TLS: %r", tagged)
        c.imap_ok("a2", "NOOP")


def tls_none_no_starttls(t):
    with Conn(t.gw.addr("imapplain")) as c:
        l = c.line()
        check(l.startswith("* OK"), "greeting %r", l)
        check("STARTTLS" not in caps_of(l), "tls=none greeting offers STARTTLS: %r", l)
        untagged = c.imap_ok("a1", "CAPABILITY")
        check(not any("STARTTLS" in u.upper() for u in untagged),
              "tls=none CAPABILITY offers STARTTLS: %s", untagged)
        c.imap_ok("a2", "LOGIN alice alicepw")
        c.imap_ok("a3", "LOGOUT")


# --- clients through TLS ------------------------------------------------------

def imaplib_starttls(t):
    host, port = t.gw.addr("imapreq")
    m = imaplib.IMAP4(host, port, timeout=TIMEOUT)
    try:
        check("STARTTLS" in m.capabilities, "no STARTTLS before TLS: %s", m.capabilities)
        check("LOGINDISABLED" in m.capabilities, "no LOGINDISABLED with require_tls")
        typ, _ = m.starttls(ssl_context=tls_context(t.certs))
        check_eq(typ, "OK", "STARTTLS")
        caps = m.capabilities
        check("STARTTLS" not in caps, "STARTTLS still advertised after TLS: %s", caps)
        check("LOGINDISABLED" not in caps, "LOGINDISABLED after TLS: %s", caps)
        check("AUTH=PLAIN" in caps, "backend capabilities missing after TLS: %s", caps)
        fetch_and_compare(t, m)
    finally:
        m.logout()


def imaplib_implicit(t):
    host, port = t.gw.addr("imaps")
    m = imaplib.IMAP4_SSL(host, port, ssl_context=tls_context(t.certs), timeout=TIMEOUT)
    try:
        check(b"backend dovecot ready" in m.welcome,
              "implicit TLS greeting is not the backend's: %r", m.welcome)
        fetch_and_compare(t, m)
    finally:
        m.logout()


def imaplib_plaintext_without_upgrade(t):
    host, port = t.gw.addr("imap")
    m = imaplib.IMAP4(host, port, timeout=TIMEOUT)
    try:
        fetch_and_compare(t, m)
    finally:
        m.logout()


def _curl(t, scheme, name):
    need_tool("curl")
    base = "%s://127.0.0.1:%d" % (scheme, t.gw.port(name))
    common = ["--ssl-reqd", "--cacert", t.certs.bundle, "-u", "alice:alicepw"]
    rc, out, err = curl(common + [base + "/"])
    check(rc == 0, "curl LIST exit %d: %s", rc, err.strip())
    check(re.search(rb'^\* LIST \([^)]*\) "[^"]*" "?INBOX"?\r?$', out, re.M),
          "LIST output lacks INBOX: %r", out[:200])
    rc, out, err = curl(common + ["%s/INBOX;UID=%s" % (base, t.uid)])
    check(rc == 0, "curl FETCH exit %d: %s", rc, err.strip())
    check_same_bytes(out, t.reference, "curl-fetched message")


def curl_starttls(t):
    _curl(t, "imap", "imapreq")


def curl_implicit(t):
    _curl(t, "imaps", "imaps")


def raw_starttls_dialogue(t):
    with Conn(t.gw.addr("imapreq")) as c:
        c.line()
        _, tagged = c.imap("a1", "STARTTLS")
        check(tagged.startswith("a1 OK"), "STARTTLS: %r", tagged)
        c.starttls(tls_context(t.certs))
        check(t.certs.identify(c.peer_der()) == "ecdsa", "not the ECDSA certificate")
        untagged = c.imap_ok("a2", "CAPABILITY")
        words = " ".join(untagged).upper().split()
        check("* CAPABILITY" in " ".join(untagged).upper(), "no * CAPABILITY: %s", untagged)
        check("STARTTLS" not in words and "LOGINDISABLED" not in words,
              "post-TLS CAPABILITY still has STARTTLS/LOGINDISABLED: %s", untagged)
        check("AUTH=PLAIN" in words, "post-TLS CAPABILITY not from the backend: %s", untagged)
        c.imap_ok("a3", "LOGIN alice alicepw")
        untagged = c.imap_ok("a4", "SELECT INBOX")
        check(any(re.match(r"^\* \d+ EXISTS$", l) for l in untagged), "no EXISTS: %s",
              untagged)
        c.imap_ok("a5", "NOOP")
        c.imap_ok("a6", "LOGOUT")


def implicit_greeting_from_backend(t):
    with Conn(t.gw.addr("imaps"), tls_ctx=tls_context(t.certs)) as c:
        l = c.line()
        check(l.startswith("* OK") and l.endswith("backend dovecot ready."),
              "implicit TLS greeting %r is not the backend's", l)
        c.imap_ok("a1", "LOGOUT")


CASES = [
    ("imap_greeting", greeting),
    ("imap_capability", capability),
    ("imap_noop_logout", noop_logout),
    ("imap_command_before_login_refused", unknown_command_pretls),
    ("imap_tls_none_no_starttls", tls_none_no_starttls),
    ("imap_imaplib_starttls", imaplib_starttls),
    ("imap_imaplib_implicit", imaplib_implicit),
    ("imap_imaplib_plaintext_without_upgrade", imaplib_plaintext_without_upgrade),
    ("imap_curl_starttls", curl_starttls),
    ("imap_curl_imaps", curl_implicit),
    ("imap_raw_starttls_dialogue", raw_starttls_dialogue),
    ("imap_implicit_greeting_from_backend", implicit_greeting_from_backend),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
