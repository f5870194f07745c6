#!/usr/bin/python3
"""PROXY protocol towards backends: Postfix (smtpd_upstream_proxy_protocol =
haproxy) accepts v1 and v2 and logs the client's address and port from the
header; Dovecot (haproxy = yes) logs in through v2; and a stub backend
checks the header bytes themselves: the v2 signature, version/command,
family, addresses and ports, and the SSL TLV with the negotiated version
and cipher; the v1 line byte for byte."""

import imaplib
import os
import poplib
import re
import smtplib
import ssl
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403

SENDER = "sender@example.org"
ALICE = "alice@example.test"


def setup():
    st = Stack("proxy").start()
    pf = ("127.0.0.1", st.postfix.proxy_port)
    dv_imap = ("127.0.0.1", st.dovecot.imap_proxy_port)
    dv_pop3 = ("127.0.0.1", st.dovecot.pop3_proxy_port)
    stub2 = StubBackend("smtp", proxy="v2")
    stub1 = StubBackend("smtp", proxy="v1")
    host = {"hostname": GATEWAY_NAME}
    gw = st.gateway([
        listener("smtpv2", "smtp", "starttls", pf, require_tls="yes", proxy_protocol="v2", **host),
        listener("smtpv1", "smtp", "implicit", pf, proxy_protocol="v1", **host),
        listener("imapv2", "imap", "implicit", dv_imap, proxy_protocol="v2", **host),
        listener("pop3v2", "pop3", "starttls", dv_pop3, require_tls="yes", proxy_protocol="v2",
                 **host),
        listener("stubv2", "smtp", "implicit", stub2.addr, proxy_protocol="v2", **host),
        listener("stubv2st", "smtp", "starttls", stub2.addr, require_tls="yes",
                 proxy_protocol="v2", **host),
        listener("stubv1", "smtp", "implicit", stub1.addr, proxy_protocol="v1", **host),
    ]).start()
    t = Ctx(st, gw=gw)
    t.stub2, t.stub1 = stub2, stub1
    return t


def ctx_tls(t, **kw):
    return tls_context(t.certs, **kw)


def postfix_saw(t, port):
    rx = r"smtpd\[\d+\]: connect from \S*\[127\.0\.0\.1\]:%d\b" % port
    deadline = time.monotonic() + 5
    while not re.search(rx, t.stack.postfix.log()):
        check(time.monotonic() < deadline,
              "Postfix did not log the client's port %d from the PROXY header", port)
        time.sleep(0.05)


def dovecot_saw(t, user, port):
    rx = r"Login: user=<%s>.* rip=127\.0\.0\.1, rport=%d," % (user, port)
    deadline = time.monotonic() + 5
    while not re.search(rx, t.stack.dovecot.log()):
        check(time.monotonic() < deadline,
              "Dovecot did not log a login of %s from client port %d", user, port)
        time.sleep(0.05)


# --- real backends ------------------------------------------------------------

def postfix_v2(t):
    subject = unique("pp2")
    host, port = t.gw.addr("smtpv2")
    s = smtplib.SMTP(host, port, timeout=TIMEOUT)
    try:
        s.starttls(context=ctx_tls(t))
        client_port = s.sock.getsockname()[1]
        s.sendmail(SENDER, [ALICE], make_message(subject, b"via PROXY v2\r\n"))
    finally:
        s.quit()
    t.stack.wait_for_message("alice", subject)
    postfix_saw(t, client_port)


def postfix_v1(t):
    subject = unique("pp1")
    host, port = t.gw.addr("smtpv1")
    s = smtplib.SMTP_SSL(host, port, timeout=TIMEOUT, context=ctx_tls(t))
    try:
        client_port = s.sock.getsockname()[1]
        s.sendmail(SENDER, [ALICE], make_message(subject, b"via PROXY v1\r\n"))
    finally:
        s.quit()
    t.stack.wait_for_message("alice", subject)
    postfix_saw(t, client_port)


def dovecot_imap_v2(t):
    host, port = t.gw.addr("imapv2")
    m = imaplib.IMAP4_SSL(host, port, ssl_context=ctx_tls(t), timeout=TIMEOUT)
    try:
        client_port = m.sock.getsockname()[1]
        typ, _ = m.login("alice", "alicepw")
        check_eq(typ, "OK", "LOGIN through PROXY v2")
        typ, _ = m.select("INBOX")
        check_eq(typ, "OK", "SELECT")
    finally:
        m.logout()
    dovecot_saw(t, "alice", client_port)


def dovecot_pop3_v2(t):
    host, port = t.gw.addr("pop3v2")
    p = poplib.POP3(host, port, timeout=TIMEOUT)
    try:
        p.stls(context=ctx_tls(t))
        client_port = p.sock.getsockname()[1]
        check(p.user("bob").startswith(b"+OK"), "USER")
        check(p.pass_("bobpw").startswith(b"+OK"), "PASS through PROXY v2")
        p.stat()
    finally:
        p.quit()
    dovecot_saw(t, "bob", client_port)


# --- header bytes at a stub -------------------------------------------------

def _check_v2(t, rec, c, listener_name):
    h = parse_proxy_v2(rec["header"])
    check_eq(rec["header"][:12], PP2_SIG, "signature")
    check_eq(h["ver_cmd"], 0x21, "version/command byte")
    check_eq(h["family"], 0x11, "family/transport byte (TCP over IPv4)")
    check_eq(h["length"], len(rec["header"]), "header length")
    check_eq(h["src"], "127.0.0.1", "source address")
    check_eq(h["sport"], c.local_port, "source port")
    check_eq(h["dst"], "127.0.0.1", "destination address")
    check_eq(h["dport"], t.gw.port(listener_name), "destination port")
    check(0x20 in h["tlvs"], "no PP2_TYPE_SSL (0x20) TLV; TLVs: %s",
          sorted("0x%02x" % k for k in h["tlvs"]))
    check(h["ssl_client"] & 0x01, "PP2_CLIENT_SSL not set in client byte 0x%02x",
          h["ssl_client"])
    check_eq(h["ssl"].get(0x21), c.tls_version().encode(), "SSL version sub-TLV (0x21)")
    check_eq(h["ssl"].get(0x23), c.cipher().encode(), "SSL cipher sub-TLV (0x23)")


def stub_v2_implicit(t):
    n = len(t.stub2.records)
    with Conn(t.gw.addr("stubv2"), tls_ctx=ctx_tls(t)) as c:
        l = c.line()
        check(l.startswith("220 stub.example.test"), "greeting not from the stub: %r", l)
        rec = t.stub2.wait_records(n + 1)[n]
        _check_v2(t, rec, c, "stubv2")
        check_eq(c.tls_version(), "TLSv1.3", "client TLS version")
        c.smtp_expect("QUIT", 221)


def stub_v2_starttls_tls12(t):
    n = len(t.stub2.records)
    ctx = ctx_tls(t, maxv=ssl.TLSVersion.TLSv1_2)
    with Conn(t.gw.addr("stubv2st")) as c:
        c.line()
        c.smtp_expect("EHLO client.example.org", 250)
        c.smtp_expect("STARTTLS", 220)
        c.starttls(ctx)
        lines = c.smtp_expect("EHLO client.example.org", 250)
        check(lines[0].startswith("stub.example.test"), "EHLO not answered by the stub: %s",
              lines)
        rec = t.stub2.wait_records(n + 1)[n]
        _check_v2(t, rec, c, "stubv2st")
        check_eq(c.tls_version(), "TLSv1.2", "client TLS version")
        c.smtp_expect("QUIT", 221)
    check_eq(rec["lines"][:1], ["EHLO client.example.org"],
             "first line the stub got after the header")


def stub_v1_line(t):
    n = len(t.stub1.records)
    with Conn(t.gw.addr("stubv1"), tls_ctx=ctx_tls(t)) as c:
        l = c.line()
        check(l.startswith("220 stub.example.test"), "greeting not from the stub: %r", l)
        rec = t.stub1.wait_records(n + 1)[n]
        want = b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (c.local_port,
                                                               t.gw.port("stubv1"))
        check_eq(rec["header"], want, "PROXY v1 line")
        c.smtp_expect("QUIT", 221)


CASES = [
    ("proxy_v2_postfix_delivers", postfix_v2),
    ("proxy_v1_postfix_delivers", postfix_v1),
    ("proxy_v2_dovecot_imap_login", dovecot_imap_v2),
    ("proxy_v2_dovecot_pop3_login", dovecot_pop3_v2),
    ("proxy_v2_header_bytes_implicit_tls13", stub_v2_implicit),
    ("proxy_v2_header_bytes_starttls_tls12", stub_v2_starttls_tls12),
    ("proxy_v1_header_line", stub_v1_line),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
