#!/usr/bin/python3
"""Reload and shutdown: SIGHUP swaps certificates and configuration for new
sessions while established ones go on undisturbed; a reload that fails
keeps the running configuration; SIGTERM stops accepting at once and exits
within shutdown_grace even with idle sessions open."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403

GRACE = 3


def setup():
    st = Stack("reload").start()
    c = st.certs
    live_dir = os.path.join(st.dir, "live")
    os.makedirs(live_dir)
    live = (os.path.join(live_dir, "cert.pem"), os.path.join(live_dir, "key.pem"))
    install_pair(live, c.ecdsa_cert, c.ecdsa_key)
    host = {"hostname": GATEWAY_NAME}
    gw = st.gateway([
        listener("imaps", "imap", "implicit", st.imap_backend, **host),
        listener("smtp", "smtp", "starttls", st.smtp_backend, require_tls="no", **host),
    ], tls_pairs=[live]).start()
    term = st.gateway([
        listener("imaps", "imap", "implicit", st.imap_backend, **host),
        listener("smtp", "smtp", "starttls", st.smtp_backend, require_tls="no", **host),
    ], global_opts={"shutdown_grace": GRACE}).start()
    t = Ctx(st, gw=gw, term=term)
    t.live = live
    return t


def install_pair(live, cert, key):
    """Replace the live certificate and key files (each atomically)."""
    for src, dst in ((cert, live[0]), (key, live[1])):
        tmp = dst + ".new"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dst)


def presented_now(t, gw, name="imaps"):
    ctx = tls_context(verify=False)
    with Conn(gw.addr(name), tls_ctx=ctx, server_hostname=None) as c:
        return t.certs.identify(c.peer_der())


def wait_presented(t, want, timeout=8.0):
    deadline = time.monotonic() + timeout
    while True:
        got = presented_now(t, t.gw)
        if got == want:
            return
        check(time.monotonic() < deadline, "new handshakes still present %s %.0f s after "
              "SIGHUP, want %s", got, timeout, want)
        time.sleep(0.1)


def reload_swaps_certificate(t):
    check(presented_now(t, t.gw) == "ecdsa", "before the reload: not the ECDSA certificate")
    old = Conn(t.gw.addr("imaps"), tls_ctx=tls_context(t.certs))
    try:
        check(old.line().startswith("* OK"), "no greeting")
        old.imap_ok("a1", "LOGIN alice alicepw")
        old.imap_ok("a2", "SELECT INBOX")
        install_pair(t.live, t.certs.other_cert, t.certs.other_key)
        off = t.gw.reload()
        wait_presented(t, "other")
        check(t.gw.wait_log(r"(?i)reload", 3, off), "nothing about the reload in the log")
        # the session from before the reload is untouched
        old.imap_ok("a3", "NOOP")
        untagged = old.imap_ok("a4", "SELECT INBOX")
        check(any(re.match(r"^\* \d+ EXISTS$", l) for l in untagged), "SELECT after reload: %s",
              untagged)
        check(t.certs.identify(old.peer_der()) == "ecdsa", "old session's certificate changed")
        old.imap_ok("a5", "LOGOUT")
    finally:
        old.close()
    # and back, so later cases start from the ECDSA pair
    install_pair(t.live, t.certs.ecdsa_cert, t.certs.ecdsa_key)
    t.gw.reload()
    wait_presented(t, "ecdsa")


def reload_applies_config(t):
    t.gw.listeners[1]["hostname"] = "mail2.example.test"
    t.gw.write_config()
    try:
        t.gw.reload()
        deadline = time.monotonic() + 8
        while True:
            with Conn(t.gw.addr("smtp")) as c:
                l = c.line()
            if l.startswith("220 mail2.example.test"):
                break
            check(time.monotonic() < deadline, "greeting after reload still %r", l)
            time.sleep(0.1)
    finally:
        t.gw.listeners[1]["hostname"] = GATEWAY_NAME
        t.gw.write_config()
        t.gw.reload()


def reload_failure_keeps_running(t):
    good = open(t.gw.conf).read()
    try:
        # 1. a configuration that does not parse
        t.gw.write_config(good + "\n[global]\nno_such_key = 1\n")
        off = t.gw.reload()
        check(t.gw.wait_log(r" error .*(?i:reload)", 5, off),
              "no error logged for a failed reload")
        check(t.gw.wait_log(r"no_such_key", 1, off), "the error does not name the bad key")
        time.sleep(0.3)
        t.gw.check()
        check(presented_now(t, t.gw) == "ecdsa", "certificate changed after a failed reload")
        # 2. a certificate file that is not a certificate
        t.gw.write_config(good)
        with open(t.live[0], "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        off = t.gw.reload()
        check(t.gw.wait_log(r" error ", 5, off), "no error logged for a broken certificate")
        time.sleep(0.3)
        t.gw.check()
        check(presented_now(t, t.gw) == "ecdsa", "handshakes broke after a failed reload")
        with Conn(t.gw.addr("smtp")) as c:
            check(c.line().startswith("220 "), "no SMTP greeting after a failed reload")
    finally:
        t.gw.write_config(good)
        install_pair(t.live, t.certs.ecdsa_cert, t.certs.ecdsa_key)
        t.gw.reload()


def sigterm_graceful(t):
    gw = t.term
    addr = gw.addr("imaps")
    idle_imap = Conn(addr, tls_ctx=tls_context(t.certs))
    idle_smtp = Conn(gw.addr("smtp"))
    try:
        check(idle_imap.line().startswith("* OK"), "no IMAP greeting")
        idle_imap.imap_ok("a1", "LOGIN alice alicepw")
        check(idle_smtp.line().startswith("220 "), "no SMTP greeting")
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        # new connections are refused promptly
        while not refuses_connections(addr, 1.0):
            check(time.monotonic() - t0 < 1.5, "still accepting 1.5 s after SIGTERM")
            time.sleep(0.05)
        try:
            rc = gw.proc.wait(GRACE + 2)
        except subprocess.TimeoutExpired:
            raise AssertionError("still running %d s after SIGTERM with shutdown_grace = %d"
                                 % (GRACE + 2, GRACE))
        took = time.monotonic() - t0
        gw.returncode = rc
        check(rc == 0, "exit status %d after SIGTERM", rc)
        check(took <= GRACE + 1.5, "exit took %.1f s with shutdown_grace = %d", took, GRACE)
        for c, what in ((idle_imap, "IMAP"), (idle_smtp, "SMTP")):
            c.read_until_close(2)
    finally:
        idle_imap.close()
        idle_smtp.close()
        gw.stop()


CASES = [
    ("reload_swaps_certificate_keeps_sessions", reload_swaps_certificate),
    ("reload_applies_config_change", reload_applies_config),
    ("reload_failure_keeps_running", reload_failure_keeps_running),
    ("sigterm_refuses_new_and_exits_within_grace", sigterm_graceful),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
