#!/usr/bin/python3
"""TLS as clients see it, with openssl s_client: STARTTLS for SMTP, IMAP and
POP3 and implicit TLS; the certificate presented (compared byte for byte
with the configured files), SNI choosing between pairs, TLS 1.2 and 1.3,
ECDSA/RSA choice by what the client can verify, and min_version."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403

STARTTLS = (("smtp", "smtp"), ("imap", "imap"), ("pop3", "pop3"))
IMPLICIT = ("smtps", "imaps", "pop3s")


def setup():
    need_tool("openssl")
    st = Stack("tls").start()
    host = {"hostname": GATEWAY_NAME}
    c = st.certs
    gw = st.gateway([
        listener("smtp", "smtp", "starttls", st.smtp_backend, require_tls="yes", **host),
        listener("imap", "imap", "starttls", st.imap_backend, require_tls="yes", **host),
        listener("pop3", "pop3", "starttls", st.pop3_backend, require_tls="yes", **host),
        listener("smtps", "smtp", "implicit", st.smtp_backend, **host),
        listener("imaps", "imap", "implicit", st.imap_backend, **host),
        listener("pop3s", "pop3", "implicit", st.pop3_backend, **host),
    ], tls_pairs=[(c.ecdsa_cert, c.ecdsa_key), (c.rsa_cert, c.rsa_key),
                  (c.other_cert, c.other_key)],
        tls_opts={"min_version": "TLSv1.2"}).start()
    return Ctx(st, gw=gw)


def handshake(t, name, starttls=None, servername=None, args=()):
    r = s_client(t.gw.addr(name), starttls=starttls, servername=servername, args=args)
    check(r.rc == 0 and r.protocol and r.cert_der,
          "%s%s: handshake failed: %s", name, " (STARTTLS)" if starttls else "", r.describe())
    return r


def presented(t, r):
    return t.certs.identify(r.cert_der)


def starttls_each(t):
    for name, proto in STARTTLS:
        r = handshake(t, name, starttls=proto)
        check(presented(t, r) == "ecdsa", "%s: presented %s, want the ECDSA certificate "
              "(subject %s)", name, presented(t, r), r.subject)
        check(r.subject and "mail.example.test" in r.subject, "%s subject %r", name, r.subject)


def implicit_each(t):
    for name in IMPLICIT:
        r = handshake(t, name)
        check(presented(t, r) == "ecdsa", "%s: presented %s", name, presented(t, r))
        check("mail.example.test" in (r.subject or ""), "%s subject %r", name, r.subject)


def sni_other(t):
    for name, proto in STARTTLS + (("imaps", None),):
        r = handshake(t, name, starttls=proto, servername=OTHER_NAME)
        check(presented(t, r) == "other", "%s with SNI %s: presented %s (subject %s)",
              name, OTHER_NAME, presented(t, r), r.subject)


def sni_mail(t):
    r = handshake(t, "smtp", starttls="smtp", servername=GATEWAY_NAME)
    check(presented(t, r) == "ecdsa", "SNI %s: presented %s", GATEWAY_NAME, presented(t, r))


def sni_unknown_gets_default(t):
    r = handshake(t, "imaps", servername="unknown.example.net")
    check(presented(t, r) == "ecdsa", "unknown SNI: presented %s, want the first pair",
          presented(t, r))


def versions(t):
    for flag, want in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        for name, proto in (("smtp", "smtp"), ("imap", "imap"), ("pop3s", None)):
            r = handshake(t, name, starttls=proto, args=[flag])
            check_eq(r.protocol, want, "%s %s protocol" % (name, flag))


def rsa_only_client_tls12(t):
    for name, proto in (("smtp", "smtp"), ("imaps", None)):
        r = handshake(t, name, starttls=proto,
                      args=["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"])
        check(presented(t, r) == "rsa", "%s: RSA-only TLS 1.2 client got %s", name,
              presented(t, r))
        check_eq(r.cipher, "ECDHE-RSA-AES128-GCM-SHA256", "%s cipher" % name)


def rsa_only_client_tls13(t):
    r = handshake(t, "pop3", starttls="pop3",
                  args=["-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256:rsa_pss_rsae_sha384"])
    check(presented(t, r) == "rsa", "RSA-PSS-only TLS 1.3 client got %s", presented(t, r))
    check_eq(r.protocol, "TLSv1.3", "protocol")


def ecdsa_preferred(t):
    r = handshake(t, "imap", starttls="imap",
                  args=["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"])
    check(presented(t, r) == "ecdsa", "ECDSA-only TLS 1.2 client got %s", presented(t, r))
    r = handshake(t, "smtps", args=["-tls1_3"])
    check(presented(t, r) == "ecdsa", "default TLS 1.3 client got %s, want ECDSA",
          presented(t, r))


def python_verifies(t):
    # The presented chain verifies against our trust bundle for the name
    # the client asked for, with SNI and without.
    for sni, host in ((GATEWAY_NAME, GATEWAY_NAME), (OTHER_NAME, OTHER_NAME),
                      (None, "127.0.0.1")):
        ctx = tls_context(t.certs)
        if sni is None:
            ctx.check_hostname = False
        with Conn(t.gw.addr("imaps"), tls_ctx=ctx, server_hostname=sni) as c:
            check(c.line().startswith("* OK"), "no greeting over TLS (SNI %s)", sni)


def min_version_enforced(t):
    before = t.gw.stats()
    r = s_client(t.gw.addr("smtps"),
                 args=["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
    check(r.rc != 0 and r.protocol in (None, "(NONE)"),
          "TLS 1.1 handshake succeeded with min_version = TLSv1.2: %s", r.describe())
    check("protocol version" in r.out or "unsupported protocol" in r.out,
          "TLS 1.1 refusal did not come as a protocol-version failure: %s", r.describe())
    after = t.gw.stats()
    check(after["tls_handshake_fail"] >= before["tls_handshake_fail"] + 1,
          "tls_handshake_fail %d -> %d", before["tls_handshake_fail"],
          after["tls_handshake_fail"])
    handshake(t, "smtps")   # and the listener still serves


CASES = [
    ("tls_starttls_smtp_imap_pop3", starttls_each),
    ("tls_implicit_smtps_imaps_pop3s", implicit_each),
    ("tls_sni_selects_other_certificate", sni_other),
    ("tls_sni_mail_name", sni_mail),
    ("tls_sni_unknown_gets_default", sni_unknown_gets_default),
    ("tls_versions_1_2_and_1_3", versions),
    ("tls_rsa_only_client_tls12_gets_rsa", rsa_only_client_tls12),
    ("tls_rsa_only_client_tls13_gets_rsa", rsa_only_client_tls13),
    ("tls_ecdsa_client_gets_ecdsa", ecdsa_preferred),
    ("tls_python_verifies_chain", python_verifies),
    ("tls_min_version_enforced", min_version_enforced),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
