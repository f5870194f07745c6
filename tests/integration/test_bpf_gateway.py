#!/usr/bin/python3
"""The eBPF classifier as mailgw runs it: loaded, attached and detached by
the gateway itself from [bpf], its counters exported on /metrics. Real
sessions through the gateway, on lo and from a client network namespace
over veth: a clean STARTTLS upgrade, a command pipelined behind STARTTLS,
plaintext on an implicit-TLS port; and monitor mode (no listeners) watching
a mail server directly. The classifier's packet-level cases (segmentation,
retransmission, IPv6) are in tests/bpf/."""

import atexit
import os
import re
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403

SENDER = "sender@example.org"
ALICE = "alice@example.test"


def bpf_section(pin, ifaces="lo", ports=None):
    text = "\n[bpf]\nenable = on\ninterfaces = %s\npin_path = %s\n" % (ifaces, pin)
    if ports:
        text += "ports = %s\n" % ports
    return text


def skip_reason():
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN)"
    if not os.path.isdir("/sys/fs/bpf") or not os.path.ismount("/sys/fs/bpf"):
        return "bpffs is not mounted at /sys/fs/bpf"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "the kernel has no BTF"
    return None


def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        return r.read().decode()


def value(text, name, **labels):
    want = ",".join('%s="%s"' % (k, v) for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(r"^%s\{([^}]*)\} (\S+)$" % re.escape(name), line)
        if m and all('%s="%s"' % kv in m.group(1) for kv in labels.items()):
            return float(m.group(2))
    raise AssertionError("no sample %s{%s} in /metrics" % (name, want))


def wait_value(mport, name, want, timeout=5.0, **labels):
    deadline = time.monotonic() + timeout
    while True:
        got = value(scrape(mport), name, **labels)
        if got >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


def make_netns():
    """A client namespace joined to this one by a veth pair; returns
    (namespace, host-side interface, host address, client address)."""
    tag = os.getpid() % 100000
    ns, host_if, cli_if = "mgwc%d" % tag, "mgvh%d" % tag, "mgvc%d" % tag
    net = "10.231.%d" % (tag % 250)
    sh("ip", "netns", "add", ns)
    atexit.register(lambda: subprocess.run(["ip", "netns", "del", ns], capture_output=True))
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", cli_if)
    atexit.register(lambda: subprocess.run(["ip", "link", "del", host_if], capture_output=True))
    sh("ip", "link", "set", cli_if, "netns", ns)
    sh("ip", "addr", "add", net + ".1/30", "dev", host_if)
    sh("ip", "link", "set", host_if, "up")
    sh("ip", "-n", ns, "addr", "add", net + ".2/30", "dev", cli_if)
    sh("ip", "-n", ns, "link", "set", cli_if, "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    return ns, host_if, net + ".1", net + ".2"


def in_ns(ns, code, timeout=60):
    """Run a Python client inside the client namespace."""
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                       capture_output=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError("client in %s failed: %s" % (ns, p.stderr.decode()[-500:]))
    return p.stdout.decode()


def setup():
    why = skip_reason()
    if why:
        raise Skip(why)
    st = Stack("bpfgw").start(dovecot=False)
    host = {"hostname": GATEWAY_NAME}
    pin = "/sys/fs/bpf/mailgw-test-%d" % os.getpid()
    mport = free_port()
    gw = st.gateway([
        listener("smtp", "smtp", "starttls", st.smtp_backend, require_tls="no", **host),
        listener("smtps", "smtp", "implicit", st.smtp_backend, **host),
    ], extra="\n[metrics]\nlisten = 127.0.0.1:%d\n" % mport + bpf_section(pin)).start()
    try:
        ns, host_if, host_ip, cli_ip = make_netns()
    except (subprocess.CalledProcessError, OSError) as e:
        raise Skip("cannot create a network namespace with veth: %s" % e)
    vpin, vport = pin + "-veth", free_port()
    vgw = st.gateway([
        listener("vsmtp", "smtp", "starttls", st.smtp_backend, require_tls="no",
                 listen="%s:%d" % (host_ip, free_port()), **host),
        listener("vsmtps", "smtp", "implicit", st.smtp_backend,
                 listen="%s:%d" % (host_ip, free_port()), **host),
    ], extra="\n[metrics]\nlisten = 127.0.0.1:%d\n" % vport + bpf_section(vpin, host_if)).start()
    t = Ctx(st, gw=gw, vgw=vgw)
    t.st, t.pin, t.mport = st, pin, mport
    t.ns, t.host_ip, t.vport, t.vpin = ns, host_ip, vport, vpin
    line = t.gw.wait_log(r"eBPF classifier attached", 5)
    if line is None:
        raise AssertionError("gateway did not attach the classifier: %s"
                             % t.gw.log()[-600:])
    t.smtp_port = t.gw.addr("smtp")[1]
    t.smtps_port = t.gw.addr("smtps")[1]
    return t


def attached_and_pinned(t):
    check(os.path.isdir(t.pin), "no pin directory %s", t.pin)
    text = scrape(t.mport)
    for fam in ("mailgw_bpf_packets_total", "mailgw_bpf_flows_total",
                "mailgw_bpf_violations_total", "mailgw_bpf_bytes_total"):
        check("# TYPE %s counter" % fam in text, "/metrics lacks %s", fam)
    p = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                       capture_output=True, timeout=30)
    check(p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(),
          "promtool check metrics: rc %d %s %s", p.returncode, p.stdout[-300:], p.stderr[-300:])


def clean_starttls_no_violation(t):
    port = t.smtp_port
    before = scrape(t.mport)
    up0 = value(before, "mailgw_bpf_flows_total", port=port, kind="starttls_upgraded")
    v0 = value(before, "mailgw_bpf_violations_total", port=port,
               reason="plaintext_after_starttls_to_server")
    v1 = value(before, "mailgw_bpf_violations_total", port=port,
               reason="plaintext_after_upgrade_to_client")
    s = smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT)
    try:
        s.starttls(context=tls_context(t.st.certs, verify=False))
        s.sendmail(SENDER, [ALICE], make_message(unique("bpf"), b"hello\r\n"))
    finally:
        s.quit()
    got = wait_value(t.mport, "mailgw_bpf_flows_total", up0 + 1, port=port,
                     kind="starttls_upgraded")
    check_eq(got, up0 + 1, "starttls_upgraded flows")
    after = scrape(t.mport)
    check_eq(value(after, "mailgw_bpf_violations_total", port=port,
                   reason="plaintext_after_starttls_to_server"), v0, "client-side violations")
    check_eq(value(after, "mailgw_bpf_violations_total", port=port,
                   reason="plaintext_after_upgrade_to_client"), v1, "server-side violations")
    check(value(after, "mailgw_bpf_bytes_total", port=port, **{"class": "tls"}) > 0,
          "no TLS bytes classified")


def injection_counted_once(t):
    port = t.smtp_port
    v0 = value(scrape(t.mport), "mailgw_bpf_violations_total", port=port,
               reason="plaintext_after_starttls_to_server")
    with Conn(("127.0.0.1", port)) as c:
        c.line()
        c.send(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<x@example.org>\r\n")
        c.read_until_close(5)
    got = wait_value(t.mport, "mailgw_bpf_violations_total", v0 + 1, port=port,
                     reason="plaintext_after_starttls_to_server")
    check_eq(got, v0 + 1, "plaintext_after_starttls_to_server violations")


def plaintext_on_implicit_counted(t):
    port = t.smtps_port
    v0 = value(scrape(t.mport), "mailgw_bpf_violations_total", port=port,
               reason="plaintext_on_implicit_port")
    with Conn(("127.0.0.1", port)) as c:
        c.send(b"EHLO plaintext.example\r\n")
        c.read_until_close(5)
    got = wait_value(t.mport, "mailgw_bpf_violations_total", v0 + 1, port=port,
                     reason="plaintext_on_implicit_port")
    check_eq(got, v0 + 1, "plaintext_on_implicit_port violations")


class CraftedServer:
    """A mail server that answers STARTTLS with 220 and then goes on in
    plaintext in the same segment: what the classifier must catch."""

    def __init__(self):
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                f = c.makefile("rb")
                c.sendall(b"220 crafted.example ESMTP\r\n")
                while True:
                    line = f.readline()
                    if not line:
                        break
                    if line.upper().startswith(b"EHLO"):
                        c.sendall(b"250-crafted.example\r\n250 STARTTLS\r\n")
                    elif line.upper().startswith(b"STARTTLS"):
                        c.sendall(b"220 2.0.0 go ahead\r\n250 plaintext after the upgrade\r\n")
                        break
                f.close()
                c.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.sock.close()


def monitor_mode(t):
    """No listeners: mailgw only classifies, here Postfix's own port."""
    pin = t.pin + "-mon"
    mport = free_port()
    pf_port = t.st.smtp_backend[1]
    crafted = CraftedServer()
    conf = os.path.join(t.st.dir, "monitor.conf")
    with open(conf, "w") as f:
        f.write("[global]\nlog_level = info\nshutdown_grace = 2\n"
                "[metrics]\nlisten = 127.0.0.1:%d\n" % mport
                + bpf_section(pin, ports="%d/smtp %d/smtp" % (pf_port, crafted.port)))
    binary = os.environ.get("MAILGW", "build/mailgw")
    rc = subprocess.run([binary, "-t", "-c", conf], capture_output=True, timeout=30)
    check(rc.returncode == 0, "mailgw -t rejects a monitor-mode config: %s", rc.stderr[-300:])
    log = open(os.path.join(t.st.dir, "monitor.log"), "wb")
    p = subprocess.Popen([binary, "-c", conf], stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                text = scrape(mport)
                break
            except OSError:
                check(p.poll() is None and time.monotonic() < deadline,
                      "monitor-mode mailgw did not come up")
                time.sleep(0.1)
        f0 = value(text, "mailgw_bpf_flows_total", port=pf_port, kind="plaintext_only")
        s = smtplib.SMTP("127.0.0.1", pf_port, timeout=TIMEOUT)
        s.sendmail(SENDER, [ALICE], make_message(unique("mon"), b"watched\r\n"))
        s.quit()
        got = wait_value(mport, "mailgw_bpf_flows_total", f0 + 1, port=pf_port,
                         kind="plaintext_only")
        check_eq(got, f0 + 1, "plaintext_only flows on the watched port")
        # A server that keeps talking plaintext after its 220 to STARTTLS.
        v0 = value(scrape(mport), "mailgw_bpf_violations_total", port=crafted.port,
                   reason="plaintext_after_upgrade_to_client")
        with Conn(("127.0.0.1", crafted.port)) as c:
            c.line()
            c.send(b"EHLO client.example\r\n")
            c.line()
            c.send(b"STARTTLS\r\n")
            c.read_until_close(5)
        got = wait_value(mport, "mailgw_bpf_violations_total", v0 + 1, port=crafted.port,
                         reason="plaintext_after_upgrade_to_client")
        check_eq(got, v0 + 1, "plaintext_after_upgrade_to_client from the crafted server")
    finally:
        crafted.close()
        p.terminate()
        rc = p.wait(15)
        log.close()
    check_eq(rc, 0, "monitor-mode exit status")
    check(not os.path.exists(pin), "pins left behind at %s after exit", pin)


VETH_CLIENT = r"""
import smtplib, socket, ssl, sys, time
host, port, sport, what = HOST, PORT, SPORT, WHAT
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
if what == "clean":
    s = smtplib.SMTP(host, port, timeout=20)
    s.starttls(context=ctx)
    s.sendmail("sender@example.org", ["alice@example.test"],
               b"Subject: veth\r\n\r\n" + b"x" * 200000 + b"\r\n")
    s.quit()
elif what == "inject":
    c = socket.create_connection((host, port), timeout=10)
    c.recv(1000)
    c.sendall(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<x@example.org>\r\n")
    while c.recv(1000):
        pass
elif what == "implicit_plain":
    c = socket.create_connection((host, sport), timeout=10)
    c.sendall(b"EHLO plaintext.example\r\n")
    try:
        while c.recv(1000):
            pass
    except ConnectionResetError:
        pass
print("done")
"""


def veth_client(t, what):
    code = (VETH_CLIENT.replace("HOST", repr(t.host_ip))
            .replace("SPORT", str(t.vgw.port("vsmtps")))
            .replace("PORT", str(t.vgw.port("vsmtp"))).replace("WHAT", repr(what)))
    check("done" in in_ns(t.ns, code), "client did not finish")


def veth_cases(t):
    """A client namespace over veth: clean upgrade, injection, implicit plaintext."""
    port, sport = t.vgw.port("vsmtp"), t.vgw.port("vsmtps")
    text = scrape(t.vport)
    up0 = value(text, "mailgw_bpf_flows_total", port=port, kind="starttls_upgraded")
    inj0 = value(text, "mailgw_bpf_violations_total", port=port,
                 reason="plaintext_after_starttls_to_server")
    srv0 = value(text, "mailgw_bpf_violations_total", port=port,
                 reason="plaintext_after_upgrade_to_client")
    imp0 = value(text, "mailgw_bpf_violations_total", port=sport,
                 reason="plaintext_on_implicit_port")
    veth_client(t, "clean")
    check_eq(wait_value(t.vport, "mailgw_bpf_flows_total", up0 + 1, port=port,
                        kind="starttls_upgraded"), up0 + 1, "starttls_upgraded flows over veth")
    text = scrape(t.vport)
    check_eq(value(text, "mailgw_bpf_violations_total", port=port,
                   reason="plaintext_after_starttls_to_server"), inj0,
             "violations after a clean upgrade (client side)")
    check_eq(value(text, "mailgw_bpf_violations_total", port=port,
                   reason="plaintext_after_upgrade_to_client"), srv0,
             "violations after a clean upgrade (server side)")
    check(value(text, "mailgw_bpf_bytes_total", port=port, **{"class": "tls"}) >= 200000,
          "fewer TLS bytes classified than the message carried")
    veth_client(t, "inject")
    check_eq(wait_value(t.vport, "mailgw_bpf_violations_total", inj0 + 1, port=port,
                        reason="plaintext_after_starttls_to_server"), inj0 + 1,
             "injection over veth")
    veth_client(t, "implicit_plain")
    check_eq(wait_value(t.vport, "mailgw_bpf_violations_total", imp0 + 1, port=sport,
                        reason="plaintext_on_implicit_port"), imp0 + 1,
             "plaintext on the implicit port over veth")


def pins_removed_at_exit(t):
    for gw, pin in ((t.gw, t.pin), (t.vgw, t.vpin)):
        rc = gw.stop()
        check_eq(rc, 0, "exit status after SIGTERM")
        check(not os.path.exists(pin), "pins left behind at %s after exit", pin)


CASES = [
    ("bpf_gateway_attached_pinned_exported", attached_and_pinned),
    ("bpf_gateway_clean_starttls_no_violation", clean_starttls_no_violation),
    ("bpf_gateway_injection_counted_once", injection_counted_once),
    ("bpf_gateway_plaintext_on_implicit_counted", plaintext_on_implicit_counted),
    ("bpf_gateway_monitor_mode", monitor_mode),
    ("bpf_gateway_client_netns_over_veth", veth_cases),
    ("bpf_gateway_detaches_and_unpins_at_exit", pins_removed_at_exit),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
