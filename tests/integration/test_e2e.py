#!/usr/bin/python3
"""End to end, nothing lost: a 5 MB message submitted over STARTTLS through
mailgw to Postfix, delivered to the maildir, and read back through mailgw
over IMAP (STARTTLS and implicit) and POP3 (STLS and implicit) must equal,
byte for byte, the body that was sent.  Also: many sessions at once, more
than one worker, and IPv6 on both sides."""

import imaplib
import re
import os
import poplib
import smtplib
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403
import mailstack  # noqa: E402

SENDER = "sender@example.org"
ALICE = "alice@example.test"
BIG = 5 * 1024 * 1024
BIG_SUBJECT = unique("big")
BIG_BODY = random_body(BIG, seed=5)


def setup():
    ipv6 = mailstack.ipv6_loopback_ok()
    st = Stack("e2e", ipv6=ipv6).start()
    host = {"hostname": GATEWAY_NAME}
    ls = [
        listener("submission", "smtp", "starttls", st.smtp_backend, require_tls="yes", **host),
        listener("imap", "imap", "starttls", st.imap_backend, require_tls="yes", **host),
        listener("imaps", "imap", "implicit", st.imap_backend, **host),
        listener("pop3", "pop3", "starttls", st.pop3_backend, require_tls="yes", **host),
        listener("pop3s", "pop3", "implicit", st.pop3_backend, **host),
    ]
    if ipv6:
        ls.append(listener("smtp6", "smtp", "starttls", ("::1", st.postfix.smtp6_port),
                           require_tls="yes", listen="[::1]:%d" % free_port("::1"), **host))
    gw = st.gateway(ls).start()
    gw2 = st.gateway([
        listener("smtps", "smtp", "implicit", st.smtp_backend, **host),
        listener("imaps", "imap", "implicit", st.imap_backend, **host),
    ], global_opts={"workers": 2}).start()
    t = Ctx(st, gw=gw, gw2=gw2)
    t.ipv6 = ipv6
    t.big_sent = False
    return t


def ctx_tls(t):
    return tls_context(t.certs)


def need_big(t):
    if not t.big_sent:
        raise AssertionError("the 5 MB message was not submitted (see e2e_submit_5mb)")


def submit_5mb(t):
    host, port = t.gw.addr("submission")
    s = smtplib.SMTP(host, port, timeout=60)
    try:
        s.ehlo("client.example.org")
        s.starttls(context=ctx_tls(t))
        s.ehlo("client.example.org")
        refused = s.sendmail(SENDER, [ALICE], make_message(BIG_SUBJECT, BIG_BODY))
        check_eq(refused, {}, "refused recipients")
    finally:
        s.quit()
    msg = t.stack.wait_for_message("alice", "Subject: %s" % BIG_SUBJECT, timeout=60)
    check_same_bytes(body_of(msg), lf(BIG_BODY), "body in the maildir")
    t.big_sent = True


def _imap_fetch_big(m):
    m.login("alice", "alicepw")
    m.select("INBOX", readonly=True)
    typ, data = m.uid("SEARCH", None, "HEADER", "Subject", BIG_SUBJECT)
    check(typ == "OK" and data[0], "big message not found over IMAP")
    uid = data[0].split()[-1]
    typ, data = m.uid("FETCH", uid, "(BODY.PEEK[])")
    check(typ == "OK" and isinstance(data[0], tuple), "FETCH failed: %r", data[:1])
    return data[0][1]


def imaps_fetch_5mb(t):
    need_big(t)
    host, port = t.gw.addr("imaps")
    m = imaplib.IMAP4_SSL(host, port, ssl_context=ctx_tls(t), timeout=60)
    try:
        check_same_bytes(body_of(_imap_fetch_big(m)), BIG_BODY, "body fetched over IMAPS")
    finally:
        m.logout()


def imap_starttls_fetch_5mb(t):
    need_big(t)
    host, port = t.gw.addr("imap")
    m = imaplib.IMAP4(host, port, timeout=60)
    try:
        m.starttls(ssl_context=ctx_tls(t))
        check_same_bytes(body_of(_imap_fetch_big(m)), BIG_BODY,
                         "body fetched over IMAP STARTTLS")
    finally:
        m.logout()


def _pop3_retr_big(p):
    p.user("alice")
    p.pass_("alicepw")
    count, _ = p.stat()
    for n in range(count, 0, -1):
        _, head, _ = p.top(n, 0)
        if ("Subject: %s" % BIG_SUBJECT).encode() in head:
            _, lines, _ = p.retr(n)
            return b"\r\n".join(lines) + b"\r\n"
    raise AssertionError("big message not found over POP3")


def pop3_stls_retr_5mb(t):
    need_big(t)
    host, port = t.gw.addr("pop3")
    p = poplib.POP3(host, port, timeout=60)
    try:
        p.stls(context=ctx_tls(t))
        check_same_bytes(body_of(_pop3_retr_big(p)), BIG_BODY, "body retrieved over POP3 STLS")
    finally:
        p.quit()


def pop3s_retr_5mb(t):
    need_big(t)
    host, port = t.gw.addr("pop3s")
    p = poplib.POP3_SSL(host, port, context=ctx_tls(t), timeout=60)
    try:
        check_same_bytes(body_of(_pop3_retr_big(p)), BIG_BODY, "body retrieved over POP3S")
    finally:
        p.quit()


def _parallel(n, fn):
    errors = []

    def wrap(i):
        try:
            fn(i)
        except Exception as e:
            errors.append("session %d: %s: %s" % (i, type(e).__name__, e))

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    check(not any(th.is_alive() for th in threads), "sessions still running after 60 s")
    check(not errors, "%d of %d sessions failed; first: %s", len(errors), n,
          errors[0] if errors else "")


def concurrent_submissions(t):
    tag = unique("par")
    host, port = t.gw.addr("submission")

    def send(i):
        s = smtplib.SMTP(host, port, timeout=30)
        try:
            s.starttls(context=ctx_tls(t))
            body = ("parallel body %d\r\n" % i).encode() * (200 + 37 * i)
            s.sendmail(SENDER, [ALICE], make_message("%s-%02d" % (tag, i), body))
        finally:
            s.quit()

    _parallel(20, send)
    for i in range(20):
        msg = t.stack.wait_for_message("alice", "Subject: %s-%02d" % (tag, i))
        want = ("parallel body %d\n" % i).encode() * (200 + 37 * i)
        check_same_bytes(body_of(msg), want, "body of parallel message %d" % i)


def two_workers(t):
    tag = unique("w2")
    host, port = t.gw2.addr("smtps")

    def send(i):
        s = smtplib.SMTP_SSL(host, port, timeout=30, context=ctx_tls(t))
        try:
            s.sendmail(SENDER, [ALICE], make_message("%s-%02d" % (tag, i), b"x\r\n"))
        finally:
            s.quit()

    _parallel(12, send)
    for i in range(12):
        t.stack.wait_for_message("alice", "Subject: %s-%02d" % (tag, i))
    ihost, iport = t.gw2.addr("imaps")

    def login(i):
        m = imaplib.IMAP4_SSL(ihost, iport, ssl_context=ctx_tls(t), timeout=30)
        try:
            m.login("alice", "alicepw")
            typ, _ = m.select("INBOX", readonly=True)
            check_eq(typ, "OK", "SELECT")
        finally:
            m.logout()

    _parallel(12, login)
    procs = mailstack.group_processes(t.gw2.proc.pid)
    check(len(procs) >= 3, "workers = 2, but the gateway's process group holds %d "
          "process(es): %s", len(procs), procs)


def ipv6_both_sides(t):
    if not t.ipv6:
        raise Skip("no IPv6 loopback (::1) on this machine")
    subject = unique("v6")
    host, port = t.gw.addr("smtp6")
    s = smtplib.SMTP(host, port, timeout=TIMEOUT)
    try:
        s.starttls(context=ctx_tls(t))
        s.sendmail(SENDER, [ALICE], make_message(subject, b"over IPv6\r\n"))
    finally:
        s.quit()
    msg = t.stack.wait_for_message("alice", "Subject: %s" % subject)
    check(b"over IPv6" in msg, "body lost")
    check(re.search(r"smtpd\[\d+\]: connect from \S*\[::1\]", t.stack.postfix.log()),
          "Postfix saw no connection from ::1: the gateway did not use the IPv6 backend")


CASES = [
    ("e2e_submit_5mb", submit_5mb, 120),
    ("e2e_imaps_fetch_5mb_identical", imaps_fetch_5mb, 120),
    ("e2e_imap_starttls_fetch_5mb_identical", imap_starttls_fetch_5mb, 120),
    ("e2e_pop3_stls_retr_5mb_identical", pop3_stls_retr_5mb, 120),
    ("e2e_pop3s_retr_5mb_identical", pop3s_retr_5mb, 120),
    ("e2e_20_concurrent_submissions", concurrent_submissions, 120),
    ("e2e_two_workers", two_workers, 120),
    ("e2e_ipv6_listener_and_backend", ipv6_both_sides),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
