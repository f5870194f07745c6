"""Case runner and mail clients for the integration tests.

A test file is a table of cases, (name, function) pairs, and a setup
function that builds a Ctx (the stack, one or more gateways).  run_cases()
prints one line per case:

    PASS: name
    FAIL: name: reason
    SKIP: name: reason

and exits 1 if any case failed.  Diagnostics (log tails) go to stderr so
that stdout stays one line per case.  Every case runs under an alarm, every
client call has a timeout, and a gateway that died during a case fails that
case and is restarted for the next one.
"""

import base64
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mailstack  # noqa: E402
from mailstack import (DOMAIN, GATEWAY_NAME, OTHER_NAME, BACKEND_NAME,  # noqa: E402,F401
                       GatewayDied, Mailgw, Stack, StackError, free_port,
                       have_tool, listener, run)

__all__ = [
    # from mailstack
    "DOMAIN", "GATEWAY_NAME", "OTHER_NAME", "BACKEND_NAME", "GatewayDied", "Mailgw",
    "Stack", "StackError", "free_port", "have_tool", "listener", "run",
    # runner
    "TIMEOUT", "Skip", "need_tool", "check", "check_eq", "Ctx", "run_cases",
    # clients
    "tls_context", "client_hello", "Conn", "ehlo_keywords", "refuses_connections",
    "s_client", "curl", "swaks",
    # messages
    "unique", "make_message", "dot_stuff", "random_body", "body_of", "lf", "check_same_bytes",
    "deliver_direct", "imap_fetch_direct",
    # PROXY protocol
    "PP2_SIG", "parse_proxy_v2", "StubBackend", "closed_port",
]

TIMEOUT = 10.0          # default for every client call
CASE_TIMEOUT = 90       # alarm for a whole case


class Skip(Exception):
    """Raised by a case (or setup) that cannot run here; carries the reason."""


class CaseTimeout(Exception):
    pass


def need_tool(*names):
    for name in names:
        if not have_tool(name):
            raise Skip("%s is not installed" % name)


def check(cond, msg, *args):
    """assert that survives python -O and formats lazily."""
    if not cond:
        raise AssertionError(msg % args if args else msg)


def check_eq(got, want, what):
    if got != want:
        raise AssertionError("%s: got %s, want %s" % (what, _short(got), _short(want)))


def _short(v, n=160):
    r = repr(v)
    return r if len(r) <= n else r[:n] + "...(%d chars)" % len(r)


# --------------------------------------------------------------------------
# runner

class Ctx:
    """What a test file's setup builds; cases receive it."""

    def __init__(self, stack=None, **gateways):
        self.stack = stack
        self.certs = stack.certs if stack is not None else None
        self.gateways = gateways
        for k, v in gateways.items():
            setattr(self, k, v)


def _one_line(text, limit=400):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _alarm(signum, frame):
    raise CaseTimeout("case ran longer than its time limit")


def _note(text):
    for line in str(text).splitlines():
        print("  | " + line, file=sys.stderr)
    sys.stderr.flush()


_PID_RX = re.compile(r"==(\d+)==|\(pid (\d+)\)")


def _new_crashes(lines, seen_pids):
    """Crash lines about processes not reported yet.  A worker's sanitizer
    report and the master's note of its exit can land in different cases;
    the first of them counts."""
    out = []
    for line in lines:
        m = _PID_RX.search(line)
        pid = m and (m.group(1) or m.group(2))
        if pid and pid in seen_pids:
            continue
        if pid:
            seen_pids.add(pid)
        out.append(line)
    return out


def run_cases(setup, cases, clean_exit=True):
    """Run setup() then every (name, fn[, timeout]) in cases; print results;
    exit.  With clean_exit, every gateway of the Ctx is finally stopped with
    SIGTERM and a case `gateway_clean_exit` checks status 0, no sanitizer
    report and no process left behind."""
    results = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def report(kind, name, reason=None):
        results[kind] += 1
        print("%s: %s%s" % (kind, name, "" if reason is None else ": " + _one_line(reason)))
        sys.stdout.flush()

    names = [c[0] for c in cases] + (["gateway_clean_exit"] if clean_exit else [])
    try:
        ctx = setup()
    except Skip as e:
        for n in names:
            report("SKIP", n, str(e))
        sys.exit(0)
    except Exception as e:
        _note(traceback.format_exc())
        for n in names:
            report("FAIL", n, "setup failed: %s" % e)
        sys.exit(1)

    signal.signal(signal.SIGALRM, _alarm)
    seen_pids = set()      # a crash is reported once per process
    for case in cases:
        name, fn = case[0], case[1]
        limit = case[2] if len(case) > 2 else CASE_TIMEOUT
        offsets = {g: len(gw.log()) for g, gw in ctx.gateways.items()}
        started = time.monotonic()
        signal.alarm(limit)
        try:
            fn(ctx)
            outcome = ("PASS", None)
        except Skip as e:
            outcome = ("SKIP", str(e))
        except AssertionError as e:
            outcome = ("FAIL", str(e) or "assertion failed")
            _note(traceback.format_exc())
        except Exception as e:
            outcome = ("FAIL", "%s: %s" % (type(e).__name__, e))
            _note(traceback.format_exc())
        finally:
            signal.alarm(0)
        for gname, gw in ctx.gateways.items():
            crashes = _new_crashes(gw.crash_lines(offsets[gname]), seen_pids)
            if crashes:
                crash = "gateway %s: %s" % (gname, crashes[0])
                outcome = ("FAIL", crash if outcome[0] != "FAIL" else
                           "%s; %s" % (crash, outcome[1]))
                _note("%s log:\n%s" % (gname, gw.log()[offsets[gname]:][-6000:]))
            if gw.proc is not None and not gw.alive():
                rc = gw.proc.poll()
                if outcome[0] != "FAIL":
                    outcome = ("FAIL", "gateway %s died (status %s)" % (gname, rc))
                _note("gateway %s died during %s (status %s); log tail:\n%s"
                      % (gname, name, rc, gw.log_tail(40)))
                gw.kill()
                try:
                    gw.start()
                except Exception as e:
                    _note("restart of %s failed: %s" % (gname, e))
        if outcome[0] == "FAIL":
            for gname, gw in ctx.gateways.items():
                _note("%s log tail:\n%s" % (gname, gw.log_tail(15)))
        if os.environ.get("MAILGW_TEST_TIMES"):
            _note("%s took %.2f s" % (name, time.monotonic() - started))
        report(outcome[0], name, outcome[1])

    if clean_exit:
        problems = []
        for gname, gw in ctx.gateways.items():
            if not gw.started:
                continue
            if gw.proc is not None:
                t0 = time.monotonic()
                gw.stop()
                took = time.monotonic() - t0
                if gw.returncode != 0:
                    problems.append("%s exit status %s after SIGTERM (%.1f s)"
                                    % (gname, gw.returncode, took))
            elif gw.returncode != 0:
                problems.append("%s had exited with status %s" % (gname, gw.returncode))
            if gw.leftovers:
                problems.append("%s left processes behind" % gname)
            crashes = _new_crashes(gw.crash_lines(), set())
            if crashes:
                problems.append("%s: %d process(es) crashed, first: %s"
                                % (gname, len(crashes), crashes[0]))
            san = gw.sanitizer_report()
            if san:
                _note(san)
        if problems:
            report("FAIL", "gateway_clean_exit", "; ".join(problems))
        else:
            report("PASS", "gateway_clean_exit")
    if ctx.stack is not None:
        ctx.stack.stop()
    sys.exit(1 if results["FAIL"] else 0)


# --------------------------------------------------------------------------
# TLS contexts

def tls_context(certs=None, verify=True, minv=None, maxv=None, ciphers=None):
    """Client context.  With verify, the peer must present one of our
    certificates, valid for the name the caller connects to."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify and certs is not None:
        ctx.load_verify_locations(certs.bundle)
        ctx.check_hostname = True
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if minv:
        ctx.minimum_version = minv
    if maxv:
        ctx.maximum_version = maxv
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def client_hello(server_hostname=GATEWAY_NAME):
    """The bytes of a TLS ClientHello, for clients that stall mid-handshake."""
    ctx = tls_context(verify=False)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = out.read()
    check(len(data) > 10 and data[0] == 0x16, "could not build a ClientHello")
    return data


# --------------------------------------------------------------------------
# a line-oriented client over plain TCP, upgradable to TLS

class Conn:
    """A protocol-agnostic client: exact bytes out, lines in."""

    def __init__(self, addr, timeout=TIMEOUT, tls_ctx=None, server_hostname=GATEWAY_NAME):
        host, port = addr
        self.timeout = timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.local_port = self.sock.getsockname()[1]
        self.buf = b""
        if tls_ctx is not None:
            self.sock = tls_ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    # raw I/O
    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by peer")
        self.buf += chunk

    def raw_line(self, limit=1 << 20):
        while b"\n" not in self.buf:
            if len(self.buf) > limit:
                raise AssertionError("line longer than %d bytes" % limit)
            self._fill()
        i = self.buf.index(b"\n") + 1
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def line(self):
        return self.raw_line().decode("latin-1").rstrip("\r\n")

    def read_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_until_close(self, timeout=None):
        """Everything the peer sends until it closes; AssertionError if it
        keeps the connection open past timeout."""
        self.sock.settimeout(timeout or self.timeout)
        data, self.buf = self.buf, b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return data
                data += chunk
        except socket.timeout:
            raise AssertionError("connection still open after %.1f s (got %s)"
                                 % (timeout or self.timeout, _short(data)))
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return data
        finally:
            self.sock.settimeout(self.timeout)

    def closed_within(self, timeout):
        """Seconds until the peer closed (AssertionError if it did not)."""
        t0 = time.monotonic()
        self.read_until_close(timeout)
        return time.monotonic() - t0

    def starttls(self, ctx, server_hostname=GATEWAY_NAME):
        # RFC 3207 §4.2 and its IMAP/POP3 twins: nothing may precede the
        # handshake; bytes the server sent after its go-ahead would be a
        # plaintext injection towards the client.
        check(self.buf == b"", "server sent bytes after its STARTTLS go-ahead: %s",
              _short(self.buf))
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def tls_version(self):
        return self.sock.version()

    def cipher(self):
        return self.sock.cipher()[0]

    def peer_der(self):
        return self.sock.getpeercert(binary_form=True)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # SMTP
    def smtp_reply(self):
        """(code, [line texts]) of one possibly multi-line reply."""
        lines = []
        while True:
            l = self.line()
            check(re.match(r"^\d{3}[ -]", l) is not None or re.match(r"^\d{3}$", l),
                  "not an SMTP reply line: %r", l)
            lines.append(l[4:])
            if len(l) == 3 or l[3] == " ":
                return int(l[:3]), lines

    def smtp(self, cmd):
        self.send(cmd + "\r\n")
        return self.smtp_reply()

    def smtp_expect(self, cmd, code):
        got, lines = self.smtp(cmd)
        check(got == code, "%s: got %d %s, want %d", cmd.split(" ")[0], got,
              " / ".join(lines), code)
        return lines

    # IMAP
    def imap(self, tag, cmd):
        """([untagged lines], tagged line)."""
        self.send("%s %s\r\n" % (tag, cmd))
        untagged = []
        while True:
            l = self.line()
            if l.startswith(tag + " "):
                return untagged, l
            untagged.append(l)

    def imap_ok(self, tag, cmd):
        untagged, tagged = self.imap(tag, cmd)
        check(tagged.startswith(tag + " OK"), "%s: %r", cmd.split(" ")[0], tagged)
        return untagged

    # POP3
    def pop3(self, cmd, multiline=False):
        self.send(cmd + "\r\n")
        status = self.line()
        body = []
        if multiline and status.startswith("+OK"):
            while True:
                l = self.line()
                if l == ".":
                    break
                body.append(l[1:] if l.startswith("..") else l)
        return status, body


def ehlo_keywords(lines):
    """Upper-cased first words of an EHLO reply after the greeting line."""
    return [l.split(" ")[0].upper() for l in lines[1:]]


def refuses_connections(addr, timeout=3.0):
    """True if a TCP connect to addr is refused (nothing listens). A reset
    during connect counts too: it is what a client sees when the listening
    socket closes while its handshake is still in the queue."""
    try:
        s = socket.create_connection(addr, timeout=timeout)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    s.close()
    return False


# --------------------------------------------------------------------------
# messages

def unique(tag):
    return "%s-%d-%06d" % (tag, os.getpid(), random.randrange(1000000))


def make_message(subject, body, sender="sender@example.org", to="alice@example.test"):
    """RFC 5322 bytes with CRLF line ends; body is bytes (CRLF lines)."""
    head = ("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: <%s@test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
            % (sender, to, subject, subject))
    return head.encode() + body


def dot_stuff(msg):
    """SMTP DATA bytes for msg (CRLF lines), terminating dot line included."""
    lines = msg.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = [b"." + l if l.startswith(b".") else l for l in lines]
    return b"\r\n".join(out) + b"\r\n.\r\n"


def random_body(size, seed=1):
    """About size bytes of 76-column base64 lines, with lines that test
    dot-stuffing (".", "..", ".x") and a few other edge shapes."""
    rnd = random.Random(seed)
    lines = []
    total = 0
    i = 0
    specials = [b".", b"..", b".leading dot", b"..two dots", b"...", b" . ",
                b"trailing space   ", b"\tleading tab", b"=3D quoted-printable-ish",
                b"From the beginning of a line", b">From quoted", b"x" * 990]
    while total < size:
        if i % 97 == 0:
            line = specials[(i // 97) % len(specials)]
        else:
            line = base64.b64encode(rnd.getrandbits(57 * 8).to_bytes(57, "big"))
        lines.append(line)
        total += len(line) + 2
        i += 1
    return b"\r\n".join(lines) + b"\r\n"


def body_of(msg):
    """The part after the header/body separator (CRLF or LF form)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = msg.find(sep)
        if i >= 0:
            return msg[i + len(sep):]
    raise AssertionError("no header/body separator in message")


def lf(data):
    return data.replace(b"\r\n", b"\n")


def first_difference(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def check_same_bytes(got, want, what):
    if got != want:
        i = first_difference(got, want)
        raise AssertionError("%s differs: %d bytes vs %d sent; first difference at "
                             "offset %d: got %s, want %s"
                             % (what, len(got), len(want), i, _short(got[i:i + 40]),
                                _short(want[i:i + 40])))


def deliver_direct(stack, user, subject, body=b"hello\r\n"):
    """Put a message into user's maildir through Postfix directly (not the
    gateway); returns the delivered bytes."""
    import smtplib
    msg = make_message(subject, body, to="%s@%s" % (user, DOMAIN))
    s = smtplib.SMTP("127.0.0.1", stack.postfix.smtp_port, timeout=TIMEOUT)
    try:
        s.sendmail("sender@example.org", ["%s@%s" % (user, DOMAIN)], msg)
    finally:
        s.quit()
    return stack.wait_for_message(user, "Subject: %s" % subject)


def imap_fetch_direct(stack, user, subject):
    """(uid, message bytes) of the message with subject, read from Dovecot
    directly: the reference for what the gateway relays."""
    import imaplib
    m = imaplib.IMAP4("127.0.0.1", stack.dovecot.imap_port, timeout=TIMEOUT)
    try:
        m.login(user, mailstack.USERS[user])
        m.select("INBOX", readonly=True)
        typ, data = m.uid("SEARCH", None, "HEADER", "Subject", subject)
        check(typ == "OK" and data[0], "message %r not found in backend", subject)
        uid = data[0].split()[-1].decode()
        typ, data = m.uid("FETCH", uid, "(BODY.PEEK[])")
        return uid, data[0][1]
    finally:
        m.logout()


# --------------------------------------------------------------------------
# command-line clients

class SClient:
    """Result of one openssl s_client run."""

    def __init__(self, rc, out):
        self.rc = rc
        self.out = out
        m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
        self.cert_der = ssl.PEM_cert_to_DER_cert(m.group(0)) if m else None
        m = re.search(r"^subject=(.*)$", out, re.M)
        self.subject = m.group(1).strip() if m else None
        m = re.search(r"^New, (\S+), Cipher is (\S+)", out, re.M)
        self.protocol, self.cipher = (m.group(1), m.group(2)) if m else (None, None)
        m = re.search(r"Server public key is (\d+) bit", out)
        self.key_bits = int(m.group(1)) if m else None

    def describe(self):
        return "rc=%s protocol=%s cipher=%s subject=%s; tail: %s" % (
            self.rc, self.protocol, self.cipher, self.subject, _one_line(self.out[-300:], 300))


def s_client(addr, starttls=None, servername=None, args=(), timeout=20, stdin=b""):
    """Run openssl s_client against addr; servername None sends no SNI."""
    host, port = addr
    cmd = ["openssl", "s_client", "-connect", mailstack.join_hostport(host, port)]
    if starttls:
        cmd += ["-starttls", starttls]
    cmd += ["-servername", servername] if servername else ["-noservername"]
    cmd += list(args)
    r = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout)
    return SClient(r.returncode, r.stdout.decode("utf-8", "replace"))


def curl(args, timeout=60):
    r = subprocess.run(["curl", "-sS", "--max-time", str(timeout - 5)] + list(args),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def swaks(addr, args, timeout=60):
    host, port = addr
    cmd = ["swaks", "--server", host, "--port", str(port), "--timeout", "20"] + list(args)
    r = run(cmd, timeout=timeout)
    return r.returncode, r.stdout


# --------------------------------------------------------------------------
# PROXY protocol

PP2_SIG = bytes.fromhex("0D0A0D0A000D0A515549540A")


def parse_proxy_v2(data):
    """Decode a PROXY v2 header: dict with ver_cmd, family, src, dst, sport,
    dport, tlvs ({type: value}), ssl ({subtype: value}), ssl_client,
    ssl_verify, length (header bytes)."""
    check(data[:12] == PP2_SIG, "no PROXY v2 signature: %s", _short(data[:16]))
    ver_cmd, fam, ln = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    check(len(data) >= 16 + ln, "PROXY v2 header truncated")
    body = data[16:16 + ln]
    out = {"ver_cmd": ver_cmd, "family": fam, "length": 16 + ln}
    if fam == 0x11:
        check(len(body) >= 12, "PROXY v2 TCP4 address block too short")
        out["src"] = socket.inet_ntop(socket.AF_INET, body[0:4])
        out["dst"] = socket.inet_ntop(socket.AF_INET, body[4:8])
        out["sport"], out["dport"] = struct.unpack("!HH", body[8:12])
        rest = body[12:]
    elif fam == 0x21:
        check(len(body) >= 36, "PROXY v2 TCP6 address block too short")
        out["src"] = socket.inet_ntop(socket.AF_INET6, body[0:16])
        out["dst"] = socket.inet_ntop(socket.AF_INET6, body[16:32])
        out["sport"], out["dport"] = struct.unpack("!HH", body[32:36])
        rest = body[36:]
    else:
        rest = b""
    out["tlvs"] = _tlvs(rest)
    ssl_tlv = out["tlvs"].get(0x20)
    if ssl_tlv is not None:
        check(len(ssl_tlv) >= 5, "PP2_TYPE_SSL shorter than 5 bytes")
        out["ssl_client"] = ssl_tlv[0]
        out["ssl_verify"] = struct.unpack("!I", ssl_tlv[1:5])[0]
        out["ssl"] = _tlvs(ssl_tlv[5:])
    return out


def _tlvs(data):
    tlvs = {}
    i = 0
    while i < len(data):
        check(i + 3 <= len(data), "truncated TLV at offset %d", i)
        t, ln = data[i], struct.unpack("!H", data[i + 1:i + 3])[0]
        check(i + 3 + ln <= len(data), "TLV 0x%02x overruns its block", t)
        tlvs[t] = data[i + 3:i + 3 + ln]
        i += 3 + ln
    return tlvs


class StubBackend:
    """A TCP server on 127.0.0.1 that records the PROXY header (or the first
    bytes) of each connection and then talks just enough SMTP, IMAP or POP3
    for a gateway to complete a session."""

    def __init__(self, protocol="smtp", proxy=None):
        self.protocol = protocol
        self.proxy = proxy          # None, "v1" or "v2"
        self.records = []
        self.cond = threading.Condition()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.addr = ("127.0.0.1", self.port)
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                s, peer = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s, peer), daemon=True).start()

    def _read_header(self, s):
        s.settimeout(TIMEOUT)
        data = b""
        if self.proxy == "v2":
            while len(data) < 16:
                chunk = s.recv(16 - len(data))
                if not chunk:
                    return data
                data += chunk
            if data[:12] != PP2_SIG:
                return data
            want = 16 + struct.unpack("!H", data[14:16])[0]
            while len(data) < want:
                chunk = s.recv(want - len(data))
                if not chunk:
                    return data
                data += chunk
            return data
        if self.proxy == "v1":
            while b"\r\n" not in data and len(data) < 108:
                chunk = s.recv(1)
                if not chunk:
                    break
                data += chunk
            return data
        return b""

    def _serve(self, s, peer):
        rec = {"peer": peer, "header": b"", "lines": []}
        try:
            rec["header"] = self._read_header(s)
            with self.cond:
                self.records.append(rec)
                self.cond.notify_all()
            f = s.makefile("rb")
            if self.protocol == "smtp":
                self._smtp(s, f, rec)
            elif self.protocol == "imap":
                self._imap(s, f, rec)
            else:
                self._pop3(s, f, rec)
        except (OSError, ValueError):
            pass
        finally:
            s.close()

    def _smtp(self, s, f, rec):
        s.sendall(b"220 stub.example.test ESMTP stub\r\n")
        for raw in f:
            line = raw.rstrip(b"\r\n").decode("latin-1")
            rec["lines"].append(line)
            verb = line.split(" ")[0].upper()
            if verb in ("EHLO", "HELO"):
                s.sendall(b"250-stub.example.test\r\n250 PIPELINING\r\n")
            elif verb == "DATA":
                s.sendall(b"354 go ahead\r\n")
                for raw2 in f:
                    if raw2 == b".\r\n":
                        break
                s.sendall(b"250 2.0.0 accepted by stub\r\n")
            elif verb == "QUIT":
                s.sendall(b"221 2.0.0 stub bye\r\n")
                return
            else:
                s.sendall(b"250 2.0.0 ok\r\n")

    def _imap(self, s, f, rec):
        s.sendall(b"* OK [CAPABILITY IMAP4rev1] stub ready\r\n")
        for raw in f:
            line = raw.rstrip(b"\r\n").decode("latin-1")
            rec["lines"].append(line)
            tag, _, cmd = line.partition(" ")
            cmd = cmd.upper()
            if cmd.startswith("CAPABILITY"):
                s.sendall(b"* CAPABILITY IMAP4rev1\r\n")
            if cmd.startswith("LOGOUT"):
                s.sendall(b"* BYE stub\r\n%s OK done\r\n" % tag.encode())
                return
            s.sendall(b"%s OK done\r\n" % tag.encode())

    def _pop3(self, s, f, rec):
        s.sendall(b"+OK stub ready\r\n")
        for raw in f:
            line = raw.rstrip(b"\r\n").decode("latin-1")
            rec["lines"].append(line)
            if line.upper().startswith("CAPA"):
                s.sendall(b"+OK\r\nUSER\r\n.\r\n")
            elif line.upper().startswith("QUIT"):
                s.sendall(b"+OK bye\r\n")
                return
            else:
                s.sendall(b"+OK\r\n")

    def wait_records(self, n, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.records) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("stub backend got %d connections, want %d"
                                         % (len(self.records), n))
                self.cond.wait(left)
            return list(self.records)

    def close(self):
        self.stopped = True
        self.lsock.close()


def closed_port():
    """A 127.0.0.1 port with nothing listening (a dead backend)."""
    return free_port()
