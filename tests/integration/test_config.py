#!/usr/bin/python3
"""Configuration checking: `mailgw -t -c FILE` accepts a complete, valid
file and rejects each kind of mistake with exit status 1 and a
`FILE:LINE: message` naming the offending line; the daemon itself refuses
to start on such a file."""

import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403
import mailstack  # noqa: E402


class Conf:
    """A configuration as a list of lines, with a marker for the line a
    case expects to be reported."""

    def __init__(self, t):
        c = t.certs
        self.lines = [
            "; complete configuration, every documented key",
            "[global]",
            "workers = 1",
            "log_level = info",
            "shutdown_grace = 5",
            "max_connections = 1024",
            "",
            "[tls]",
            "certificate = %s" % c.ecdsa_cert,
            "private_key = %s" % c.ecdsa_key,
            "certificate = %s" % c.rsa_cert,
            "private_key = %s" % c.rsa_key,
            "min_version = TLSv1.2",
            "ciphers = ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
            "ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384",
            "",
            "[offload]",
            "mode = userspace",
            "",
            "[listener submission]",
            "listen = 127.0.0.1:%d" % free_port(),
            "protocol = smtp",
            "tls = starttls",
            "require_tls = yes",
            "backend = 127.0.0.1:%d" % free_port(),
            "proxy_protocol = off",
            "hostname = mail.example.test",
            "max_line_length = 512",
            "max_pretls_commands = 20",
            "handshake_timeout = 10",
            "idle_timeout = 300",
            "connect_timeout = 10",
            "",
            "[listener imaps]",
            "listen = [::1]:%d" % free_port("::1") if mailstack.ipv6_loopback_ok()
            else "listen = 127.0.0.1:%d" % free_port(),
            "protocol = imap",
            "tls = implicit",
            "backend = 127.0.0.1:%d" % free_port(),
            "proxy_protocol = v2",
            "",
            "[listener pop3]",
            "listen = 127.0.0.1:%d" % free_port(),
            "protocol = pop3",
            "tls = starttls",
            "require_tls = no",
            "backend = 127.0.0.1:%d" % free_port(),
            "proxy_protocol = v1",
        ]
        self.dir = t.dir

    def section_range(self, name):
        start = self.lines.index("[%s]" % name)
        end = start + 1
        while end < len(self.lines) and not self.lines[end].startswith("["):
            end += 1
        return start, end          # 0-based, end exclusive

    def set(self, section, key, value):
        """Replace key in section (or append it); returns its 1-based line."""
        start, end = self.section_range(section)
        for i in range(start + 1, end):
            if self.lines[i].split("=")[0].strip() == key:
                self.lines[i] = "%s = %s" % (key, value)
                return i + 1
        insert = end
        while insert > start + 1 and self.lines[insert - 1] == "":
            insert -= 1
        self.lines.insert(insert, "%s = %s" % (key, value))
        return insert + 1

    def write(self, name):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")
        return path


def setup():
    t = Ctx(None)
    t.dir = mailstack.make_tempdir("config")
    t.certs = mailstack.Certs(os.path.join(t.dir, "certs"))
    t.binary = mailstack.mailgw_binary()
    if not os.access(t.binary, os.X_OK):
        raise StackError("mailgw binary not found: %s" % t.binary)
    return t


def expect_error(t, conf, name, lines, what):
    """-t must exit 1 naming FILE:LINE with LINE in lines (an int or a range)."""
    path = conf.write(name)
    rc, out = mailstack.config_check(path, t.binary)
    check(rc == 1, "%s: exit status %d, want 1; output: %s", what, rc, out.strip()[:300])
    m = re.search(re.escape(path) + r":(\d+): \S", out)
    check(m, "%s: no '%s:LINE: message' in %r", what, path, out.strip()[:300])
    got = int(m.group(1))
    want = [lines] if isinstance(lines, int) else list(lines)
    check(got in want, "%s: reported line %d, want %s (%r)", what, got,
          want[0] if len(want) == 1 else "%d..%d" % (want[0], want[-1]),
          conf.lines[got - 1] if 0 < got <= len(conf.lines) else "")
    return out


def good(t):
    path = Conf(t).write("good.conf")
    rc, out = mailstack.config_check(path, t.binary)
    check(rc == 0, "valid configuration rejected (status %d): %s", rc, out.strip()[:300])


def unknown_key_listener(t):
    conf = Conf(t)
    line = conf.set("listener imaps", "colour", "blue")
    out = expect_error(t, conf, "unknown-key.conf", line, "unknown listener key")
    check("colour" in out, "message does not name the key: %r", out.strip())


def unknown_key_global(t):
    conf = Conf(t)
    line = conf.set("global", "wrokers", "2")
    expect_error(t, conf, "unknown-global.conf", line, "unknown [global] key")


def bad_protocol(t):
    conf = Conf(t)
    line = conf.set("listener pop3", "protocol", "foo")
    expect_error(t, conf, "protocol.conf", line, "protocol = foo")


def bad_listen(t):
    conf = Conf(t)
    line = conf.set("listener submission", "listen", "nonsense")
    expect_error(t, conf, "listen.conf", line, "listen = nonsense")


def bad_backend(t):
    conf = Conf(t)
    line = conf.set("listener imaps", "backend", "127.0.0.1:99999")
    expect_error(t, conf, "backend.conf", line, "backend port out of range")


def bad_proxy(t):
    conf = Conf(t)
    line = conf.set("listener imaps", "proxy_protocol", "v3")
    expect_error(t, conf, "proxy.conf", line, "proxy_protocol = v3")


def bad_number(t):
    conf = Conf(t)
    line = conf.set("listener submission", "handshake_timeout", "soon")
    expect_error(t, conf, "number.conf", line, "handshake_timeout = soon")


def require_tls_without_tls(t):
    conf = Conf(t)
    conf.set("listener pop3", "tls", "none")
    conf.set("listener pop3", "require_tls", "yes")
    start, end = conf.section_range("listener pop3")
    expect_error(t, conf, "require.conf", range(start + 1, end + 1),
                 "require_tls = yes with tls = none")


def unknown_section(t):
    conf = Conf(t)
    conf.lines += ["", "[bogus]"]
    line = len(conf.lines)
    conf.lines += ["x = 1"]
    expect_error(t, conf, "section.conf", (line, line + 1), "unknown section")


def missing_certificate(t):
    conf = Conf(t)
    missing = os.path.join(t.dir, "no-such-cert.pem")
    conf.set("tls", "certificate", missing)
    start, end = conf.section_range("tls")
    out = expect_error(t, conf, "nocert.conf", range(start + 1, end + 1),
                       "missing certificate file")
    check(missing in out or "no-such-cert" in out, "message does not name the file: %r",
          out.strip()[:300])


def key_mismatch(t):
    conf = Conf(t)
    start, _ = conf.section_range("tls")
    conf.lines[start + 2] = "private_key = %s" % t.certs.rsa_key   # ECDSA cert, RSA key
    expect_error(t, conf, "mismatch.conf", range(start + 1, start + 6),
                 "certificate/key mismatch")


def daemon_refuses_bad_file(t):
    conf = Conf(t)
    line = conf.set("listener pop3", "protocol", "foo")
    path = conf.write("daemon-bad.conf")
    try:
        r = subprocess.run([t.binary, "-c", path], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError("daemon kept running on an invalid configuration")
    out = r.stdout.decode("utf-8", "replace")
    check(r.returncode != 0, "daemon exited 0 on an invalid configuration")
    check("%s:%d:" % (path, line) in out, "daemon did not report %s:%d: %r", path, line,
          out.strip()[:300])


def missing_file(t):
    path = os.path.join(t.dir, "absent.conf")
    rc, out = mailstack.config_check(path, t.binary)
    check(rc == 1, "missing file: exit status %d, want 1", rc)
    check(path in out, "message does not name the file: %r", out.strip()[:200])


CASES = [
    ("config_good_exits_0", good),
    ("config_unknown_listener_key", unknown_key_listener),
    ("config_unknown_global_key", unknown_key_global),
    ("config_bad_protocol", bad_protocol),
    ("config_bad_listen", bad_listen),
    ("config_bad_backend", bad_backend),
    ("config_bad_proxy_protocol", bad_proxy),
    ("config_bad_number", bad_number),
    ("config_require_tls_with_tls_none", require_tls_without_tls),
    ("config_unknown_section", unknown_section),
    ("config_missing_certificate", missing_certificate),
    ("config_key_mismatch", key_mismatch),
    ("config_missing_file", missing_file),
    ("config_daemon_refuses_bad_file", daemon_refuses_bad_file),
]

if __name__ == "__main__":
    run_cases(setup, CASES, clean_exit=False)
