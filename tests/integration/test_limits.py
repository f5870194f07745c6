#!/usr/bin/python3
"""Resource limits: max_connections and relay backpressure.

A worker at max_connections refuses the next client with the protocol's
overload reply (or, on implicit TLS, by closing it), counts it in
connections_rejected, and serves again once a session ends.  The relay
holds at most a fixed 16 KiB buffer per direction: a client that stops
reading a 20 MB FETCH, or a backend that stops reading a 20 MB DATA, must
stall the other side instead of making the worker buffer the message.
Memory is judged by the worker's VmRSS, not by timing."""

import fcntl
import hashlib
import os
import re
import socket
import ssl
import struct
import sys
import termios
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403
import mailstack  # noqa: E402

SENDER = "sender@example.org"
ALICE = "alice@example.test"
MAXC = 3                      # max_connections of the limits gateway
REFUSED = 2                   # clients turned away per protocol
BIG = 20 * 1024 * 1024        # the message that must not be buffered
STALL = 4.0                   # seconds the reader stays away
RSS_SLACK = 4 * 1024 * 1024   # allowed VmRSS growth of the worker
UPLOAD_BOUND = 10 * 1024 * 1024  # bytes a client may push into a stalled relay
CHUNK = 16 * 1024
CLIENT_SNDBUF = 512 * 1024    # the uploading client's send buffer (Linux doubles it)
STUB_RCVBUF = 128 * 1024      # the holding backend's receive buffer
IN_GATEWAY_MAX = 1024 * 1024  # bytes of a stalled upload the worker itself may hold
TLS_RECORD = 16384            # plaintext bytes per record from the client
TLS_OVERHEAD = 22             # TLS 1.3 AES-GCM: header, content type, tag

OVERLOAD = {
    "smtp": "421 4.3.2 %s Too many connections, try again later" % GATEWAY_NAME,
    "imap": "* BYE [UNAVAILABLE] Too many connections, try again later",
    "pop3": "-ERR [SYS/TEMP] Too many connections, try again later",
}
GREETING = {"smtp": "220 ", "imap": "* OK", "pop3": "+OK"}


# --------------------------------------------------------------------------
# a backend that stops reading once DATA is under way

class HoldingSmtpBackend:
    """One-connection-at-a-time SMTP server.  It answers EHLO, MAIL, RCPT
    and DATA, then reads nothing of the message until release() is called;
    after that it reads up to the terminating dot line, records the bytes
    and answers 250."""

    REPLY_250 = b"250 2.0.0 Ok: queued by holding stub\r\n"

    def __init__(self):
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # a small receive buffer, inherited by accepted sockets: the bytes
        # parked in the stalled backend's kernel stay few
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STUB_RCVBUF)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.addr = self.lsock.getsockname()
        self.lock = threading.Condition()
        self.reset()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self):
        with self.lock:
            self.release_ev = threading.Event()
            self.in_data = False      # 354 sent, message not read yet
            self.data = None          # message bytes incl. the dot line
            self.error = None
            self.conn = None
            self.lines = []

    def release(self):
        self.release_ev.set()

    def queued(self):
        """Bytes waiting unread in the held connection's receive queue."""
        with self.lock:
            c = self.conn
        if c is None:
            return -1
        try:
            return _ioctl_int(c.fileno(), termios.FIONREAD)
        except OSError:
            return -1

    def wait_data_phase(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not self.in_data:
                left = deadline - time.monotonic()
                check(left > 0, "holding backend never reached DATA (lines %r, error %r)",
                      self.lines, self.error)
                self.lock.wait(left)

    def wait_message(self, timeout=60):
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.data is None and self.error is None:
                left = deadline - time.monotonic()
                check(left > 0, "holding backend did not get the whole message in %d s",
                      timeout)
                self.lock.wait(left)
            check(self.error is None, "holding backend: %s", self.error)
            return self.data

    def _accept(self):
        while True:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            self._serve(s)

    def _serve(self, s):
        with self.lock:
            self.conn = s
        buf = b""
        try:
            s.settimeout(60)
            s.sendall(b"220 holding.example.test ESMTP holding stub\r\n")
            while True:
                while b"\r\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                line, buf = buf.split(b"\r\n", 1)
                text = line.decode("latin-1")
                with self.lock:
                    self.lines.append(text)
                verb = text.split(" ")[0].upper()
                if verb in ("EHLO", "HELO"):
                    s.sendall(b"250-holding.example.test\r\n250-PIPELINING\r\n"
                              b"250 8BITMIME\r\n")
                elif verb == "DATA":
                    s.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    with self.lock:
                        self.in_data = True
                        self.lock.notify_all()
                    self.release_ev.wait(120)
                    data = bytearray(buf)
                    buf = b""
                    while not data.endswith(b"\r\n.\r\n"):
                        chunk = s.recv(1 << 20)
                        if not chunk:
                            raise EOFError("connection closed in DATA after %d bytes"
                                           % len(data))
                        data += chunk
                    with self.lock:
                        self.data = bytes(data)
                        self.lock.notify_all()
                    s.sendall(self.REPLY_250)
                elif verb == "QUIT":
                    s.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    s.sendall(b"250 2.0.0 Ok\r\n")
        except Exception as e:
            with self.lock:
                self.error = "%s: %s" % (type(e).__name__, e)
                self.lock.notify_all()
        finally:
            with self.lock:
                self.conn = None
            s.close()

    def close(self):
        self.lsock.close()


# --------------------------------------------------------------------------
# helpers

def _ioctl_int(fd, req):
    return struct.unpack("i", fcntl.ioctl(fd, req, b"\0\0\0\0"))[0]


def sock_inq(sock):
    """Bytes in a socket's kernel receive queue."""
    return _ioctl_int(sock.fileno(), termios.FIONREAD)


def sock_outq(sock):
    """Bytes in a socket's kernel send queue."""
    return _ioctl_int(sock.fileno(), termios.TIOCOUTQ)


def tcp_queues(local_port=None, remote_port=None):
    """[(tx_queue, rx_queue)] of the IPv4 TCP sockets on 127.0.0.1 with
    that local and/or remote port, from /proc/net/tcp."""
    out = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            lport = int(fields[1].split(":")[1], 16)
            rport = int(fields[2].split(":")[1], 16)
            if local_port is not None and lport != local_port:
                continue
            if remote_port is not None and rport != remote_port:
                continue
            tx, rx = fields[4].split(":")
            out.append((int(tx, 16), int(rx, 16)))
    return out


def worker_pid(gw):
    """The only worker of gw: the child process of the master."""
    gw.check()
    master = gw.proc.pid
    # the master leads its own process group; its workers are the rest of it
    kids = [p for p in mailstack.group_processes(master) if p != master]
    check(len(kids) == 1, "want one worker process under master %d, found %r", master, kids)
    return kids[0]


def vm_rss(pid):
    """VmRSS of pid in bytes."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


def note(text):
    """A measurement for the reader of stderr; stdout stays one line per case."""
    print("  | " + text, file=sys.stderr)
    sys.stderr.flush()


def mib(n):
    return "%.2f MiB" % (n / 1048576.0)


def ctx_tls(t):
    return tls_context(t.certs)


# --------------------------------------------------------------------------
# setup

# The sanitizer build keeps freed blocks in a quarantine (256 MiB by
# default) before reusing them.  OpenSSL frees and reallocates a record
# buffer per record (SSL_MODE_RELEASE_BUFFERS), so under the sanitizer VmRSS
# grows with the bytes relayed, not with the bytes held.  The relay gateway
# of this file runs with a 1 MiB quarantine: use-after-free is still caught
# within that window and VmRSS measures what the worker really keeps.  The
# option is ignored by the plain build.
ASAN_QUARANTINE = "quarantine_size_mb=1"


def start_small_quarantine(gw):
    """Start gw (now and on every restart) with ASAN_QUARANTINE added to
    ASAN_OPTIONS."""
    plain_start = gw.start

    def start(*a, **kw):
        old = os.environ.get("ASAN_OPTIONS")
        os.environ["ASAN_OPTIONS"] = ":".join(x for x in (old, ASAN_QUARANTINE) if x)
        try:
            return plain_start(*a, **kw)
        finally:
            if old is None:
                del os.environ["ASAN_OPTIONS"]
            else:
                os.environ["ASAN_OPTIONS"] = old

    gw.start = start
    return gw.start()


def setup():
    st = Stack("limits").start()
    host = {"hostname": GATEWAY_NAME}
    L = listener
    gw = st.gateway([
        L("smtp", "smtp", "starttls", st.smtp_backend, require_tls="no", **host),
        L("imap", "imap", "starttls", st.imap_backend, require_tls="yes", **host),
        L("pop3", "pop3", "starttls", st.pop3_backend, require_tls="yes", **host),
        L("smtps", "smtp", "implicit", st.smtp_backend, **host),
    ], global_opts={"workers": 1, "max_connections": MAXC}).start()
    stub = HoldingSmtpBackend()
    relay = st.gateway([
        L("imaps", "imap", "implicit", st.imap_backend, idle_timeout=60, **host),
        L("submission", "smtp", "starttls", stub.addr, require_tls="yes",
          idle_timeout=60, **host),
    ], global_opts={"workers": 1})
    start_small_quarantine(relay)
    t = Ctx(st, gw=gw, relay=relay)
    t.stub = stub
    return t


# --------------------------------------------------------------------------
# max_connections

def wait_sessions(gw, want, timeout=3.0):
    """Wait until the gauge sessions_active reads want; returns the stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = gw.stats()
        check("sessions_active" in stats and "connections_rejected" in stats,
              "stats line lacks sessions_active/connections_rejected: %r", stats)
        if stats["sessions_active"] == want:
            return stats
        check(time.monotonic() < deadline, "sessions_active is %d, want %d",
              stats["sessions_active"], want)
        time.sleep(0.1)


def _open_held(t, name, proto, implicit):
    """A session that got its greeting and stays open."""
    c = Conn(t.gw.addr(name), tls_ctx=ctx_tls(t) if implicit else None)
    try:
        l = c.line()
        check(l.startswith(GREETING[proto]), "%s: greeting %r", name, l)
    except Exception:
        c.close()
        raise
    return c


def _refused(t, name, proto, implicit):
    """One client beyond the limit: check how it is turned away."""
    try:
        _refused_once(t, name, proto, implicit)
    except AssertionError as e:
        raise AssertionError("%s: a client beyond max_connections=%d was not turned away "
                             "as it should: %s" % (name, MAXC, e))


def _refused_once(t, name, proto, implicit):
    if implicit:
        with Conn(t.gw.addr(name)) as c:
            try:
                c.send(client_hello())
            except (BrokenPipeError, ConnectionResetError):
                return
            data = c.read_until_close(5)
            check(data == b"", "%s at max_connections: want a bare close, got %r",
                  name, data[:80])
        return
    with Conn(t.gw.addr(name)) as c:
        data = c.read_until_close(5)
    text = data.decode("latin-1")
    first, _, rest = text.partition("\r\n")
    check(first.startswith(OVERLOAD[proto]),
          "%s at max_connections: want %r, got %r", name, OVERLOAD[proto], text[:200])
    check(text.endswith("\r\n") and rest == "",
          "%s: overload reply not one CRLF line followed by EOF: %r", name, text[:200])


def _try_session(t, name, proto, implicit):
    """A new client after one held session ended: its greeting line, or
    None if it was still refused."""
    try:
        c = Conn(t.gw.addr(name), tls_ctx=ctx_tls(t) if implicit else None, timeout=5)
    except (OSError, ssl.SSLError):
        return None
    with c:
        try:
            l = c.line()
        except (EOFError, OSError):
            return None
        if l.startswith(OVERLOAD[proto]):
            return None
        check(l.startswith(GREETING[proto]), "%s after a slot freed: greeting %r", name, l)
        return l


def _max_connections(t, name, proto, implicit=False):
    wait_sessions(t.gw, 0)
    held = []
    try:
        for _ in range(MAXC):
            held.append(_open_held(t, name, proto, implicit))
        before = wait_sessions(t.gw, MAXC)["connections_rejected"]
        for _ in range(REFUSED):
            _refused(t, name, proto, implicit)
        stats = t.gw.stats()
        check_eq(stats["connections_rejected"] - before, REFUSED,
                 "connections_rejected growth after %d refused clients" % REFUSED)
        check_eq(stats["sessions_active"], MAXC, "sessions_active at the limit")
        # the held sessions are unharmed by the refusals
        if proto == "smtp" and not implicit:
            held[0].smtp_expect("NOOP", 250)
        # one session ends: a slot frees up (the close is asynchronous)
        held.pop().close()
        deadline = time.monotonic() + 2.0
        retried = 0
        while True:
            l = _try_session(t, name, proto, implicit)
            if l is not None:
                break
            retried += 1
            check(time.monotonic() < deadline,
                  "%s: still refused %d times within 2 s of closing a session", name, retried)
            time.sleep(0.1)
        after = t.gw.stats()["connections_rejected"]
        check_eq(after - before, REFUSED + retried,
                 "connections_rejected growth (%d refused + %d retries)" % (REFUSED, retried))
    finally:
        for c in held:
            c.close()
    wait_sessions(t.gw, 0)


def max_connections_smtp(t):
    _max_connections(t, "smtp", "smtp")


def max_connections_imap(t):
    _max_connections(t, "imap", "imap")


def max_connections_pop3(t):
    _max_connections(t, "pop3", "pop3")


def max_connections_implicit(t):
    _max_connections(t, "smtps", "smtp", implicit=True)


# --------------------------------------------------------------------------
# backpressure

def _sample_rss(pid, seconds, base):
    """Highest VmRSS growth over base in samples spread over seconds."""
    peak = 0
    end = time.monotonic() + seconds
    while True:
        peak = max(peak, vm_rss(pid) - base)
        if time.monotonic() >= end:
            break
        time.sleep(min(0.25, max(0.0, end - time.monotonic())))
    return peak


def backpressure_download(t):
    subject = unique("big-down")
    body = random_body(BIG, seed=20)
    delivered = deliver_direct(t.stack, "alice", subject, body)
    check(len(delivered) > len(lf(body)), "delivered message is only %d bytes",
          len(delivered))
    pid = worker_pid(t.relay)
    with Conn(t.relay.addr("imaps"), tls_ctx=ctx_tls(t), timeout=60) as c:
        check(c.line().startswith("* OK"), "IMAPS greeting")
        c.imap_ok("a1", "LOGIN alice alicepw")
        c.imap_ok("a2", "EXAMINE INBOX")
        untagged = c.imap_ok("a3", 'UID SEARCH HEADER Subject "%s"' % subject)
        uids = [l.split()[2:] for l in untagged if l.startswith("* SEARCH")]
        check(uids and uids[0], "message %s not found over IMAPS: %r", subject, untagged)
        uid = uids[0][-1]
        time.sleep(0.2)
        base = vm_rss(pid)
        c.send("a4 UID FETCH %s (BODY.PEEK[])\r\n" % uid)
        growth = _sample_rss(pid, STALL, base)
        queued = sock_inq(c.sock)
        note("download stall: worker VmRSS %s, growth %s; client receive queue %d bytes"
             % (mib(base), mib(growth), queued))
        check(growth < RSS_SLACK,
              "worker VmRSS grew by %s while the client read nothing of a %s FETCH "
              "(base %s; client receive queue %d bytes)",
              mib(growth), mib(BIG), mib(base), queued)
        check(queued > 0, "nothing reached the stalled client in %.0f s", STALL)
        check(queued < BIG // 2,
              "client socket already holds %d bytes: the stall did not stall", queued)
        # now read it all
        first = c.line()
        m = re.match(r"^\* \d+ FETCH \(.*BODY\[\] \{(\d+)\}$", first)
        check(m is not None, "FETCH response line: %r", first)
        literal = c.read_exact(int(m.group(1)))
        rest = c.line()
        check(rest.endswith(")"), "after the literal: %r", rest)
        tagged = c.line()
        while not tagged.startswith("a4 "):
            tagged = c.line()
        check(tagged.startswith("a4 OK"), "FETCH: %r", tagged)
        c.imap_ok("a5", "LOGOUT")
    check_same_bytes(lf(literal), delivered, "fetched message vs maildir")
    check_same_bytes(body_of(literal), body, "fetched body vs body sent")


def backpressure_upload(t):
    stub = t.stub
    stub.reset()
    subject = unique("big-up")
    payload = dot_stuff(make_message(subject, random_body(BIG, seed=21)))
    check(len(payload) > BIG, "payload is only %d bytes", len(payload))
    pid = worker_pid(t.relay)
    sent = [0]
    failure = []
    c = Conn(t.relay.addr("submission"), timeout=60)
    try:
        check(c.line().startswith("220 "), "greeting")
        c.smtp_expect("EHLO client.example.org", 250)
        c.smtp_expect("STARTTLS", 220)
        c.starttls(ctx_tls(t))
        c.smtp_expect("EHLO client.example.org", 250)
        c.smtp_expect("MAIL FROM:<%s>" % SENDER, 250)
        c.smtp_expect("RCPT TO:<%s>" % ALICE, 250)
        c.smtp_expect("DATA", 354)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF)
        stub.wait_data_phase()
        time.sleep(0.2)
        base = vm_rss(pid)

        def push():
            try:
                view = memoryview(payload)
                for off in range(0, len(payload), CHUNK):
                    c.sock.sendall(view[off:off + CHUNK])
                    sent[0] = min(off + CHUNK, len(payload))
            except Exception as e:
                failure.append("%s: %s" % (type(e).__name__, e))

        th = threading.Thread(target=push, daemon=True)
        th.start()
        growth = _sample_rss(pid, STALL, base)
        # Everything is stalled now; account for the bytes the client got
        # rid of.  They sit in the client's send queue, the worker's receive
        # queue from the client (both TLS records), the worker's send queue
        # towards the backend, the backend's receive queue, and what is left
        # is in the worker itself.
        accepted = sent[0]
        client_outq = sock_outq(c.sock)
        gw_in = tcp_queues(t.relay.port("submission"), c.local_port)
        gw_out = tcp_queues(None, stub.addr[1])
        stub_inq = stub.queued()
        check(len(gw_in) == 1 and len(gw_out) == 1 and stub_inq >= 0,
              "cannot find the relay's sockets: client side %r, backend side %r, "
              "backend queue %d", gw_in, gw_out, stub_inq)
        gw_rx, gw_tx = gw_in[0][1], gw_out[0][0]
        records = client_outq + gw_rx
        plain = records * TLS_RECORD // (TLS_RECORD + TLS_OVERHEAD)
        in_gateway = accepted - plain - gw_tx - stub_inq
        note("upload stall: client pushed %s; queues: client send %d, worker receive %d, "
             "worker send %d, backend receive %d; in the worker %d bytes; worker VmRSS %s, "
             "growth %s" % (mib(accepted), client_outq, gw_rx, gw_tx, stub_inq, in_gateway,
                            mib(base), mib(growth)))
        check(not failure, "sending the message failed during the stall: %s",
              failure[0] if failure else "")
        check(th.is_alive() and accepted < len(payload),
              "the client pushed the whole %s message into a relay whose backend "
              "reads nothing", mib(len(payload)))
        check(accepted < UPLOAD_BOUND,
              "the client pushed %s into a relay whose backend reads nothing "
              "(queues: client send %d, worker receive %d, worker send %d, backend "
              "receive %d)", mib(accepted), client_outq, gw_rx, gw_tx, stub_inq)
        check(in_gateway < IN_GATEWAY_MAX,
              "the worker holds %d bytes of the stalled upload (%s accepted, %d in "
              "socket queues)", in_gateway, mib(accepted), accepted - in_gateway)
        check(growth < RSS_SLACK,
              "worker VmRSS grew by %s while the backend read nothing (%s accepted "
              "from the client; base %s)", mib(growth), mib(accepted), mib(base))
        check(gw_tx > 0 or stub_inq > 0, "nothing reached the backend side")
        check(accepted > 0, "the client could send nothing at all")
        # let the backend read everything
        stub.release()
        th.join(120)
        check(not th.is_alive(), "the client could not finish sending after the release")
        check(not failure, "sending the message failed: %s", failure[0] if failure else "")
        got = stub.wait_message()
        if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
            check_same_bytes(got, payload, "DATA bytes at the backend")
        code, lines = c.smtp_reply()
        check(code == 250 and "queued by holding stub" in lines[0],
              "reply to the message: %d %s", code, lines)
        c.smtp_expect("QUIT", 221)
    finally:
        stub.release()
        c.close()


CASES = [
    ("max_connections_smtp", max_connections_smtp),
    ("max_connections_imap", max_connections_imap),
    ("max_connections_pop3", max_connections_pop3),
    ("max_connections_implicit", max_connections_implicit),
    ("backpressure_download", backpressure_download),
    ("backpressure_upload", backpressure_upload),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
