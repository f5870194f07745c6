#!/usr/bin/python3
"""The Prometheus endpoint, as an operator uses it: GET /metrics passes
promtool's lint; known sessions give exactly the counts they must (summed
over two workers, none lost in a burst); /healthz turns 503 while the
gateway drains; a real Prometheus scrapes it and evaluates the shipped
alert rules and dashboard queries; configs/prometheus.yml and
configs/mailgw-alerts.yml pass promtool (and the rules' unit tests); the
Grafana dashboard and docs/metrics.md name only series that exist; a reload
keeps every per-listener series."""

import http.client
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from mailtest import *  # noqa: E402,F401,F403
import mailstack  # noqa: E402

REPO = mailstack.REPO
CONFIGS = os.path.join(REPO, "configs")
RULES = os.path.join(CONFIGS, "mailgw-alerts.yml")
PROM_CONFIG = os.path.join(CONFIGS, "prometheus.yml")
DASHBOARD = os.path.join(CONFIGS, "grafana-mailgw.json")
DOC = os.path.join(REPO, "docs", "metrics.md")
METRICS_C = os.path.join(REPO, "gateway", "metrics.c")
PROMETHEUS = "/usr/bin/prometheus"

SENDER = "sender@example.org"
ALICE = "alice@example.test"
WORKERS = 2
GRACE = 3
N_SUBMIT = 3          # clean STARTTLS submissions
M_IMPLICIT = 2        # implicit TLS sessions
BURST = 40            # concurrent sessions

# Families the eBPF classifier exports (not the gateway): name -> labels.
BPF_FAMILIES = {
    "mailgw_bpf_packets_total": ("port", "class"),
    "mailgw_bpf_bytes_total": ("port", "class"),
    "mailgw_bpf_flows_total": ("port", "kind"),
    "mailgw_bpf_violations_total": ("port", "reason"),
}


def metrics_section(port):
    return "\n[metrics]\nlisten = 127.0.0.1:%d\n" % port


def setup():
    st = Stack("metrics").start(dovecot=False)
    dead = ("127.0.0.1", closed_port())
    host = {"hostname": GATEWAY_NAME}
    L = listener
    mport = free_port()
    gw = st.gateway([
        L("submission", "smtp", "starttls", st.smtp_backend, require_tls="yes", **host),
        L("smtps", "smtp", "implicit", st.smtp_backend, **host),
        L("smtpdead", "smtp", "starttls", dead, require_tls="no", connect_timeout=3, **host),
        L("burst", "smtp", "starttls", st.smtp_backend, require_tls="yes", **host),
        L("watched", "smtp", "starttls", st.smtp_backend, require_tls="no", **host),
    ], global_opts={"workers": WORKERS}, offload={"mode": "auto"},
        extra=metrics_section(mport)).start()
    gw.metrics_port = mport
    tport = free_port()
    term = st.gateway([L("smtp", "smtp", "starttls", st.smtp_backend, require_tls="no", **host)],
                      global_opts={"workers": 1, "shutdown_grace": GRACE},
                      extra=metrics_section(tport)).start()
    term.metrics_port = tport
    for g in (gw, term):
        mailstack.wait_port("127.0.0.1", g.metrics_port, 10, g.proc, "mailgw metrics")
    return Ctx(st, gw=gw, term=term)


def ctx_tls(t):
    return tls_context(t.certs)


# --- HTTP and the exposition format -------------------------------------------

def http_get(port, path, method="GET", timeout=5.0):
    """(status, headers {lower-case name: value}, body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


SAMPLE_RX = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$")
LABEL_RX = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Exposition:
    """A parsed text exposition: samples and the # TYPE of each family."""

    def __init__(self, text):
        self.text = text
        self.samples = []           # (name, {labels}, float)
        self.types = {}
        self.helps = {}
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# TYPE "):
                _, _, name, typ = line.split(" ", 3)
                self.types[name] = typ
                continue
            if line.startswith("# HELP "):
                parts = line.split(" ", 3)
                self.helps[parts[2]] = parts[3] if len(parts) > 3 else ""
                continue
            if line.startswith("#"):
                continue
            m = SAMPLE_RX.match(line)
            check(m is not None, "unparsable exposition line: %r", line)
            labels = dict(LABEL_RX.findall(m.group(2) or ""))
            self.samples.append((m.group(1), labels, float(m.group(3))))

    def names(self):
        return {n for n, _, _ in self.samples}

    def find(self, name, **labels):
        return [(l, v) for n, l, v in self.samples
                if n == name and all(l.get(k) == str(want) for k, want in labels.items())]

    def get(self, name, **labels):
        """The value of the one sample of name whose labels include labels."""
        hits = self.find(name, **labels)
        check(len(hits) == 1, "%d samples of %s%s, want exactly 1", len(hits), name, labels)
        return hits[0][1]

    def family(self, sample_name):
        for suffix in ("_bucket", "_sum", "_count"):
            base = sample_name[:-len(suffix)]
            if sample_name.endswith(suffix) and self.types.get(base) == "histogram":
                return base
        return sample_name


def scrape_raw(gw):
    status, headers, body = http_get(gw.metrics_port, "/metrics")
    check_eq(status, 200, "GET /metrics status")
    return headers, body


def scrape(gw):
    return Exposition(scrape_raw(gw)[1].decode("utf-8"))


def wait_idle(gw, timeout=6.0):
    """Scrape until no listener has an active session; returns that scrape."""
    deadline = time.monotonic() + timeout
    while True:
        e = scrape(gw)
        busy = [(l["listener"], v) for l, v in e.find("mailgw_active_connections") if v != 0]
        if not busy:
            return e
        check(time.monotonic() < deadline, "mailgw_active_connections still non-zero "
              "%.0f s after every client closed: %s", timeout, busy)
        time.sleep(0.1)


def check_histogram(e, listener):
    """Buckets cumulative and ascending, +Inf == _count; returns _count."""
    buckets = [(l["le"], v) for l, v in e.find("mailgw_handshake_duration_seconds_bucket",
                                               listener=listener)]
    check(buckets, "no handshake histogram buckets for %s", listener)
    check_eq(buckets[-1][0], "+Inf", "%s: last bucket" % listener)
    bounds = [float(le) for le, _ in buckets]
    check(bounds == sorted(bounds) and len(set(bounds)) == len(bounds),
          "%s: bucket bounds not strictly ascending: %s", listener, [le for le, _ in buckets])
    values = [v for _, v in buckets]
    check(all(a <= b for a, b in zip(values, values[1:])),
          "%s: buckets not cumulative: %s", listener, buckets)
    count = e.get("mailgw_handshake_duration_seconds_count", listener=listener)
    check_eq(values[-1], count, "%s: le=+Inf bucket vs _count" % listener)
    total = e.get("mailgw_handshake_duration_seconds_sum", listener=listener)
    check(total >= 0 and (count == 0 or total > 0), "%s: _sum %s with _count %s", listener,
          total, count)
    return count


def ktls_available(gw):
    """Whether this gateway's kernel TLS probe succeeded (its start-up log)."""
    return re.search(r"kernel TLS available", gw.log()) is not None


# --- sessions ---------------------------------------------------------------

def submit(t, subject, body):
    host, port = t.gw.addr("submission")
    msg = make_message(subject, body)
    s = smtplib.SMTP(host, port, timeout=TIMEOUT)
    try:
        s.starttls(context=ctx_tls(t))
        s.sendmail(SENDER, [ALICE], msg)
    finally:
        s.quit()
    return len(msg)


def implicit_session(t):
    host, port = t.gw.addr("smtps")
    s = smtplib.SMTP_SSL(host, port, timeout=TIMEOUT, context=ctx_tls(t))
    try:
        code, _ = s.ehlo("client.example.org")
        check_eq(code, 250, "EHLO over implicit TLS")
        check_eq(s.noop()[0], 250, "NOOP over implicit TLS")
    finally:
        s.quit()


def injection(t, name):
    with Conn(t.gw.addr(name)) as c:
        c.line()
        c.smtp_expect("EHLO client.example.org", 250)
        c.send("STARTTLS\r\nMAIL FROM:<%s>\r\n" % SENDER)
        data = c.read_until_close(5)
        check(data.startswith(b"554 5.7.0"), "%s: injection answered %r, want 554 5.7.0", name,
              data[:80])


def dead_backend(t):
    with Conn(t.gw.addr("smtpdead")) as c:
        c.line()
        c.smtp_expect("EHLO client.example.org", 250)
        c.smtp_expect("STARTTLS", 220)
        c.starttls(ctx_tls(t))
        code, lines = c.smtp("EHLO client.example.org")
        check(code == 421, "dead backend: got %d %s, want 421", code, lines)
        c.read_until_close(5)


def long_line(t):
    with Conn(t.gw.addr("submission")) as c:
        c.line()
        c.send("EHLO " + "a" * 600 + "\r\n")
        data = c.read_until_close(5)
        check(data.startswith(b"500"), "over-long line: want 500, got %r", data[:80])


def plain_session(t, name):
    with Conn(t.gw.addr(name)) as c:
        check(c.line().startswith("220"), "greeting")
        c.smtp_expect("QUIT", 221)


# --- cases ------------------------------------------------------------------

def exact_values(t):
    gw = t.gw
    base = wait_idle(gw)
    sizes = [submit(t, unique("metrics-%d" % i), random_body(2000 + 500 * i, seed=i))
             for i in range(N_SUBMIT)]
    for _ in range(M_IMPLICIT):
        implicit_session(t)
    injection(t, "submission")
    dead_backend(t)
    long_line(t)
    after = wait_idle(gw)

    problems = []

    def delta(name, **labels):
        return after.get(name, **labels) - base.get(name, **labels)

    def want(name, value, **labels):
        got = delta(name, **labels)
        if got != value:
            problems.append("%s%s went +%g, want +%g" % (name, labels, got, value))

    tls_sessions = {"submission": N_SUBMIT, "smtps": M_IMPLICIT, "smtpdead": 1}
    want("mailgw_connections_total", N_SUBMIT + 2, listener="submission", protocol="smtp")
    want("mailgw_connections_total", M_IMPLICIT, listener="smtps", protocol="smtp")
    want("mailgw_connections_total", 1, listener="smtpdead", protocol="smtp")
    for name, n in tls_sessions.items():
        want("mailgw_tls_handshakes_total", n, listener=name, version="TLSv1.3", result="ok")
        want("mailgw_tls_handshakes_total", 0, listener=name, version="TLSv1.2", result="ok")
        want("mailgw_tls_handshakes_total", 0, listener=name, result="error")
        want("mailgw_handshake_duration_seconds_count", n, listener=name)
        want("mailgw_handshake_duration_seconds_bucket", n, listener=name, le="+Inf")
    want("mailgw_starttls_total", N_SUBMIT, listener="submission", result="ok")
    want("mailgw_starttls_total", 1, listener="submission", result="rejected")
    want("mailgw_starttls_total", 1, listener="smtpdead", result="ok")
    want("mailgw_starttls_total", 0, listener="smtpdead", result="rejected")
    want("mailgw_starttls_injection_total", 1, listener="submission")
    want("mailgw_starttls_injection_total", 0, listener="smtpdead")
    want("mailgw_backend_errors_total", 1, listener="smtpdead", reason="connect")
    for reason in ("timeout", "refused", "closed"):
        want("mailgw_backend_errors_total", 0, listener="smtpdead", reason=reason)
    for name in ("submission", "smtps"):
        for reason in ("connect", "timeout", "refused", "closed"):
            want("mailgw_backend_errors_total", 0, listener=name, reason=reason)
    want("mailgw_limit_rejections_total", 1, listener="submission", limit="line_length")
    for limit in ("pretls_commands", "max_connections", "handshake_timeout", "idle_timeout"):
        want("mailgw_limit_rejections_total", 0, listener="submission", limit=limit)
    n_tls = sum(tls_sessions.values())
    if ktls_available(gw):
        for d in ("tx", "rx"):
            got = sum(delta("mailgw_offload_total", mode=m, direction=d)
                      for m in ("userspace", "ktls_sw", "ktls_hw", "dpdk"))
            if got != n_tls:
                problems.append("offload %s over all modes went +%g, want +%d" % (d, got, n_tls))
    else:
        for d in ("tx", "rx"):
            want("mailgw_offload_total", n_tls, mode="userspace", direction=d)
            for m in ("ktls_sw", "ktls_hw", "dpdk"):
                want("mailgw_offload_total", 0, mode=m, direction=d)
        want("mailgw_ktls_fallback_total", 0)
    want("mailgw_require_tls_refusals_total", 0)
    want("mailgw_plaintext_relays_total", 0)

    c2b = delta("mailgw_relay_bytes_total", listener="submission", direction="client_to_backend")
    b2c = delta("mailgw_relay_bytes_total", listener="submission", direction="backend_to_client")
    if c2b < sum(sizes):
        problems.append("relay client_to_backend on submission grew %g, less than the %d "
                        "message bytes sent" % (c2b, sum(sizes)))
    if b2c <= 0:
        problems.append("relay backend_to_client on submission did not grow")
    for d in ("client_to_backend", "backend_to_client"):
        if delta("mailgw_relay_bytes_total", listener="smtps", direction=d) <= 0:
            problems.append("relay %s on smtps did not grow" % d)
        if delta("mailgw_relay_bytes_total", listener="smtpdead", direction=d) != 0:
            problems.append("relay %s on smtpdead moved without a backend" % d)

    for name in tls_sessions:
        count = check_histogram(after, name)
        ok = sum(after.get("mailgw_tls_handshakes_total", listener=name, version=v, result="ok")
                 for v in ("TLSv1.2", "TLSv1.3"))
        if count != ok:
            problems.append("%s: histogram _count %g but %g ok handshakes" % (name, count, ok))
    check(not problems, "; ".join(problems))


def exposition_lint(t):
    need_tool("promtool")
    headers, body = scrape_raw(t.gw)
    ctype = headers.get("content-type", "")
    check(ctype.startswith("text/plain"), "Content-Type %r is not text/plain", ctype)
    check("version=0.0.4" in ctype, "Content-Type %r lacks version=0.0.4", ctype)
    r = subprocess.run(["promtool", "check", "metrics"], input=body, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=30)
    out = r.stdout.decode("utf-8", "replace").strip()
    check(r.returncode == 0 and out == "", "promtool check metrics: status %d: %s",
          r.returncode, out)
    e = Exposition(body.decode("utf-8"))
    families = {e.family(n) for n in e.names()}
    check(families == set(e.types), "families without samples or TYPE: %s",
          sorted(families ^ set(e.types)))
    check(set(e.helps) == set(e.types), "families without HELP: %s",
          sorted(set(e.types) - set(e.helps)))
    for name, typ in e.types.items():
        check(not (typ == "counter") or name.endswith("_total"), "counter %s lacks _total", name)
    # every listener of the configuration has its series
    for lst in t.gw.listeners:
        e.get("mailgw_connections_total", listener=lst["name"], protocol=lst["protocol"])
        e.get("mailgw_active_connections", listener=lst["name"])
        check_histogram(e, lst["name"])
    check_eq(e.get("mailgw_up"), 1.0, "mailgw_up while running")
    check_eq(e.get("mailgw_build_info"), 1.0, "mailgw_build_info")


def http_endpoints(t):
    port = t.gw.metrics_port
    status, headers, body = http_get(port, "/healthz")
    check_eq((status, body), (200, b"ok\n"), "GET /healthz while running")
    status, _, body = http_get(port, "/healthz", method="HEAD")
    check_eq(status, 200, "HEAD /healthz")
    status, _, _ = http_get(port, "/metrics", method="HEAD")
    check_eq(status, 200, "HEAD /metrics")
    status, _, _ = http_get(port, "/nothing-here")
    check_eq(status, 404, "GET of an unknown path")
    status, _, _ = http_get(port, "/metrics", method="POST")
    check_eq(status, 405, "POST /metrics")


def healthz_drain(t):
    term = t.term
    port = term.metrics_port
    status, _, body = http_get(port, "/healthz")
    check_eq((status, body), (200, b"ok\n"), "GET /healthz before SIGTERM")
    idle = Conn(term.addr("smtp"))
    try:
        check(idle.line().startswith("220"), "greeting of the idle session")
        t0 = time.monotonic()
        term.proc.send_signal(signal.SIGTERM)
        seen = []
        while True:
            status, _, body = http_get(port, "/healthz", timeout=2)
            seen.append(status)
            if status == 503:
                break
            check(time.monotonic() - t0 < 1.5, "/healthz still %s %.1f s after SIGTERM",
                  seen[-3:], time.monotonic() - t0)
            time.sleep(0.02)
        check_eq(body, b"draining\n", "/healthz body while draining")
        e = scrape(term)
        check_eq(e.get("mailgw_up"), 0.0, "mailgw_up while draining")
        check_eq(e.get("mailgw_active_connections", listener="smtp"), 1.0,
                 "the idle session while draining")
        check(term.alive(), "the gateway exited during its grace period")
    finally:
        idle.close()
    rc = term.stop()
    check_eq(rc, 0, "exit status after the drain")
    check(refuses_connections(("127.0.0.1", port)), "metrics port still open after exit")


def burst(t):
    gw = t.gw
    base = wait_idle(gw)
    log_off = len(gw.log())
    barrier = threading.Barrier(BURST + 1, timeout=20)
    errors = []

    def client():
        try:
            with Conn(gw.addr("burst")) as c:
                check(c.line().startswith("220"), "greeting")
                barrier.wait()          # all open together
                barrier.wait()          # counted
                c.smtp_expect("QUIT", 221)
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append("%s: %s" % (type(e).__name__, e))
            barrier.abort()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(BURST)]
    for th in threads:
        th.start()
    try:
        barrier.wait()
        during = scrape(gw)
    finally:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
    for th in threads:
        th.join(20)
    check(not errors, "%d client(s) failed, first: %s", len(errors), errors[:1])
    check_eq(during.get("mailgw_active_connections", listener="burst"), float(BURST),
             "active sessions with the whole burst open")
    after = wait_idle(gw)
    got = (after.get("mailgw_connections_total", listener="burst")
           - base.get("mailgw_connections_total", listener="burst"))
    check_eq(got, float(BURST), "connections_total growth for %d concurrent sessions" % BURST)
    tags = set(re.findall(r" (w\d+) \[burst\] \S+ sid=\S+ connect on", gw.log()[log_off:]))
    check(len(tags) == WORKERS, "burst served by workers %s, want all %d (the sum over "
          "workers is not exercised)", sorted(tags), WORKERS)


class Prometheus:
    """A private Prometheus server scraping one gateway every second."""

    def __init__(self, directory, target, rules):
        self.dir = directory
        self.port = free_port()
        self.log_path = os.path.join(directory, "prometheus.log")
        config = os.path.join(directory, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    "  evaluation_interval: 1s\n"
                    "rule_files:\n  - %s\n"
                    "scrape_configs:\n  - job_name: mailgw\n"
                    "    static_configs:\n      - targets: ['%s']\n" % (rules, target))
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, "--config.file=" + config,
             "--storage.tsdb.path=" + os.path.join(directory, "data"),
             "--web.listen-address=127.0.0.1:%d" % self.port, "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=directory,
            start_new_session=True)
        log.close()
        self._cleanup = mailstack.on_cleanup(self.kill)

    def api(self, path, **params):
        q = ("?" + urllib.parse.urlencode(params)) if params else ""
        status, _, body = http_get(self.port, "/api/v1/" + path + q, timeout=5)
        check(status in (200, 400, 422), "Prometheus %s: HTTP %d %r", path, status, body[:200])
        return json.loads(body)

    def wait(self, what, fn, timeout=20.0):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            check(self.proc.poll() is None, "Prometheus exited (%s); log: %s",
                  self.proc.returncode, self.log_tail())
            try:
                last = fn()
                if last:
                    return last
            except (OSError, ValueError) as e:
                last = e
            check(time.monotonic() < deadline, "%s: not within %.0f s (last: %r); log: %s",
                  what, timeout, last, self.log_tail())
            time.sleep(0.2)

    def log_tail(self):
        return mailstack.tail(mailstack.read_file(self.log_path), 8)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            rc = None
        self.kill()
        return rc

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        mailstack.cancel_cleanup(self._cleanup)


def query_value(prom, expr):
    r = prom.api("query", query=expr)
    check(r.get("status") == "success", "query %s: %s", expr, r)
    return r["data"]["result"]


def dashboard_exprs():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for tgt in p.get("targets", []):
                out.append((p.get("title"), tgt.get("expr", "")))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    return dash, out


def prometheus_server(t):
    if not os.access(PROMETHEUS, os.X_OK):
        raise Skip("%s is not installed" % PROMETHEUS)
    gw = t.gw
    d = tempfile.mkdtemp(prefix="prometheus-", dir=t.stack.dir)
    prom = Prometheus(d, "127.0.0.1:%d" % gw.metrics_port, RULES)
    try:
        def target_up():
            ts = prom.api("targets")["data"]["activeTargets"]
            return ts and all(x["health"] == "up" for x in ts) and ts
        targets = prom.wait("the mailgw target up", target_up)
        check_eq(len(targets), 1, "active targets")
        check_eq(targets[0]["labels"].get("job"), "mailgw", "target job label")

        for _ in range(2):
            plain_session(t, "watched")
        e = wait_idle(gw)
        want = e.get("mailgw_connections_total", listener="watched")
        expr = 'mailgw_connections_total{listener="watched"}'

        def scraped():
            res = query_value(prom, expr)
            return len(res) == 1 and float(res[0]["value"][1]) == want and res
        res = prom.wait("Prometheus to see %s == %g" % (expr, want), scraped, 15)
        check_eq(res[0]["metric"].get("protocol"), "smtp", "protocol label in Prometheus")
        check_eq(res[0]["metric"].get("job"), "mailgw", "job label in Prometheus")
        up = query_value(prom, 'up{job="mailgw"}')
        check(up and float(up[0]["value"][1]) == 1, "up{job=\"mailgw\"}: %s", up)

        # the shipped rules load and evaluate; an injection makes its alert
        injection(t, "watched")

        def injection_alert():
            alerts = prom.api("alerts")["data"]["alerts"]
            return [a for a in alerts if a["labels"].get("alertname") == "MailgwStartTLSInjection"
                    and a["labels"].get("listener") == "watched"]
        alerts = prom.wait("alert MailgwStartTLSInjection for listener watched",
                           injection_alert, 20)
        check(alerts[0]["state"] in ("pending", "firing"), "alert state %r", alerts[0]["state"])
        check(alerts[0]["labels"].get("severity"), "alert without severity label")

        def rules_evaluated():
            groups = prom.api("rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules and all(r.get("health") != "unknown" for r in rules) and rules
        rules = prom.wait("every rule evaluated", rules_evaluated, 15)
        bad = ["%s: %s %s" % (r["name"], r.get("health"), r.get("lastError", ""))
               for r in rules if r.get("health") != "ok"]
        check(not bad, "rules failing in Prometheus: %s", bad)

        # every dashboard query is valid PromQL for this Prometheus
        _, exprs = dashboard_exprs()
        bad = []
        for title, q in exprs:
            q = (q.replace("$__rate_interval", "1m").replace("$__range", "5m")
                 .replace("$instance", ".*").replace("$listener", ".*"))
            r = prom.api("query", query=q)
            if r.get("status") != "success":
                bad.append("%s: %s" % (title, r.get("error")))
        check(not bad, "dashboard queries Prometheus rejects: %s", bad)
    finally:
        rc = prom.stop()
    check_eq(rc, 0, "Prometheus exit status after SIGTERM")


RULE_TESTS = """\
rule_files:
  - %(rules)s
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'mailgw_starttls_injection_total{instance="gw1",listener="submission"}'
        values: '0 0 1 1 1 1 1 1 1 1'
      - series: 'mailgw_bpf_violations_total{instance="gw1",port="25",reason="plaintext_after_starttls_to_server"}'
        values: '0 0 0 2 2 2 2 2 2 2'
      - series: 'up{job="mailgw",instance="gw1"}'
        values: '1 1 0 0 0 0 0 0 0 0'
      - series: 'mailgw_up{instance="gw1"}'
        values: '1 0 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 2m
        alertname: MailgwStartTLSInjection
        exp_alerts: []
      - eval_time: 4m
        alertname: MailgwStartTLSInjection
        exp_alerts:
          - exp_labels: {severity: warning, instance: gw1, listener: submission}
      - eval_time: 5m
        alertname: MailgwBpfViolations
        exp_alerts:
          - exp_labels: {severity: critical, instance: gw1, port: "25", reason: plaintext_after_starttls_to_server}
      - eval_time: 1m
        alertname: MailgwDown
        exp_alerts: []
      - eval_time: 5m
        alertname: MailgwDown
        exp_alerts:
          - exp_labels: {severity: critical, job: mailgw, instance: gw1}
      - eval_time: 3m
        alertname: MailgwDraining
        exp_alerts: []
      - eval_time: 7m
        alertname: MailgwDraining
        exp_alerts:
          - exp_labels: {severity: warning, instance: gw1}
  - interval: 1m
    input_series:
      # 10 handshakes a minute, 5 of them failing, on one listener
      - series: 'mailgw_tls_handshakes_total{instance="gw1",listener="smtps",version="TLSv1.3",result="ok"}'
        values: '0+5x40'
      - series: 'mailgw_tls_handshakes_total{instance="gw1",listener="smtps",version="unknown",result="error"}'
        values: '0+5x40'
      # kTLS wanted, a third of the sessions fall back
      - series: 'mailgw_ktls_fallback_total{instance="gw1"}'
        values: '0+2x40'
      # backend refused everything on one listener
      - series: 'mailgw_connections_total{instance="gw1",listener="imap",protocol="imap"}'
        values: '0+10x40'
      - series: 'mailgw_backend_errors_total{instance="gw1",listener="imap",reason="connect"}'
        values: '0+10x40'
      # quiet hour, then a storm of over-long lines
      - series: 'mailgw_limit_rejections_total{instance="gw1",listener="smtp",limit="line_length"}'
        values: '0x70 0+30x20'
      - series: 'mailgw_limit_rejections_total{instance="gw1",listener="smtp",limit="max_connections"}'
        values: '0x10 1+1x30'
      # handshakes of 1..2.5 s on smtps, under 10 ms on submission
      - series: 'mailgw_handshake_duration_seconds_bucket{instance="gw1",listener="smtps",le="0.01"}'
        values: '0x40'
      - series: 'mailgw_handshake_duration_seconds_bucket{instance="gw1",listener="smtps",le="1"}'
        values: '0x40'
      - series: 'mailgw_handshake_duration_seconds_bucket{instance="gw1",listener="smtps",le="2.5"}'
        values: '0+10x40'
      - series: 'mailgw_handshake_duration_seconds_bucket{instance="gw1",listener="smtps",le="+Inf"}'
        values: '0+10x40'
      - series: 'mailgw_handshake_duration_seconds_bucket{instance="gw1",listener="submission",le="0.01"}'
        values: '0+10x40'
      - series: 'mailgw_handshake_duration_seconds_bucket{instance="gw1",listener="submission",le="1"}'
        values: '0+10x40'
      - series: 'mailgw_handshake_duration_seconds_bucket{instance="gw1",listener="submission",le="2.5"}'
        values: '0+10x40'
      - series: 'mailgw_handshake_duration_seconds_bucket{instance="gw1",listener="submission",le="+Inf"}'
        values: '0+10x40'
    alert_rule_test:
      - eval_time: 30m
        alertname: MailgwHandshakeErrorRatioHigh
        exp_alerts:
          - exp_labels: {severity: warning, instance: gw1, listener: smtps}
      - eval_time: 10m
        alertname: MailgwHandshakeErrorRatioHigh
        exp_alerts: []
      - eval_time: 40m
        alertname: MailgwKtlsFallbackRatioHigh
        exp_alerts:
          - exp_labels: {severity: warning, instance: gw1}
      - eval_time: 15m
        alertname: MailgwBackendDown
        exp_alerts:
          - exp_labels: {severity: critical, instance: gw1, listener: imap}
      - eval_time: 15m
        alertname: MailgwBackendErrors
        exp_alerts:
          - exp_labels: {severity: warning, instance: gw1, listener: imap, reason: connect}
      - eval_time: 85m
        alertname: MailgwLimitRejectionsSpike
        exp_alerts:
          - exp_labels: {severity: warning, instance: gw1, listener: smtp, limit: line_length}
      - eval_time: 60m
        alertname: MailgwLimitRejectionsSpike
        exp_alerts: []
      - eval_time: 25m
        alertname: MailgwMaxConnectionsReached
        exp_alerts:
          - exp_labels: {severity: critical, instance: gw1, listener: smtp}
      - eval_time: 30m
        alertname: MailgwHandshakeSlow
        exp_alerts:
          - exp_labels: {severity: warning, instance: gw1, listener: smtps}
      # no eBPF classifier exporting: its rule stays silent
      - eval_time: 25m
        alertname: MailgwBpfViolations
        exp_alerts: []
"""


def without_annotations(text):
    """The rule file minus its annotations blocks: the unit tests judge when
    and with which labels each alert fires; promtool check rules and the
    Prometheus case cover the annotation templates."""
    out, skip = [], None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip is not None and (not line.strip() or indent > skip):
            continue
        skip = None
        if line.strip() == "annotations:":
            skip = indent
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def promtool_configs(t):
    need_tool("promtool")
    r = run(["promtool", "check", "rules", RULES])
    check(r.returncode == 0, "promtool check rules: %s", r.stdout)
    # the rule file is named relative to the config: check from configs/
    r = run(["promtool", "check", "config", os.path.basename(PROM_CONFIG)],
            cwd=os.path.dirname(PROM_CONFIG))
    check(r.returncode == 0, "promtool check config: %s", r.stdout)
    check("1 rule files found" in r.stdout, "configs/prometheus.yml does not load the rules: %s",
          r.stdout)
    d = tempfile.mkdtemp(prefix="ruletest-", dir=t.stack.dir)
    rules = os.path.join(d, "mailgw-alerts.yml")
    with open(RULES) as f, open(rules, "w") as out:
        out.write(without_annotations(f.read()))
    path = os.path.join(d, "mailgw-alerts.test.yml")
    with open(path, "w") as f:
        f.write(RULE_TESTS % {"rules": rules})
    r = run(["promtool", "test", "rules", path], timeout=60)
    check(r.returncode == 0, "promtool test rules: %s", r.stdout)


METRIC_RX = re.compile(r"\bmailgw_[a-z0-9_]+\b")


def known_names(t):
    """Sample and family names of a live scrape, the families declared in
    gateway/metrics.c, and the eBPF classifier's families."""
    e = scrape(t.gw)
    live = e.names() | set(e.types)
    with open(METRICS_C) as f:
        src = f.read()
    declared = set(re.findall(r'(?:family|gateway_counter)\(&o, "(mailgw_[a-z0-9_]+)"', src))
    check(declared, "no family() or gateway_counter() declarations found in gateway/metrics.c")
    check(declared == set(e.types), "gateway/metrics.c declares %s, the scrape has %s",
          sorted(declared - set(e.types)), sorted(set(e.types) - declared))
    return e, live | set(BPF_FAMILIES)


def dashboard_and_docs(t):
    e, known = known_names(t)
    dash, exprs = dashboard_exprs()
    problems = []
    check(30 <= dash.get("schemaVersion", 0) <= 45, "schemaVersion %r", dash.get("schemaVersion"))
    inputs = [i.get("name") for i in dash.get("__inputs", [])]
    check("DS_PROMETHEUS" in inputs, "no DS_PROMETHEUS input: %s", inputs)
    tv = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    check("DS_PROMETHEUS" in tv and tv["DS_PROMETHEUS"].get("type") == "datasource",
          "no DS_PROMETHEUS datasource variable")
    lq = json.dumps(tv.get("listener", {}).get("query"))
    check("label_values(mailgw_connections_total, listener)" in lq,
          "listener variable query: %s", lq)
    ids = []

    def walk(panels):
        for p in panels:
            ids.append(p.get("id"))
            check("gridPos" in p, "panel %r has no gridPos", p.get("title"))
            if p.get("type") != "row":
                ds = json.dumps(p.get("datasource"))
                if "${DS_PROMETHEUS}" not in ds:
                    problems.append("panel %r datasource %s" % (p.get("title"), ds))
                if not p.get("targets"):
                    problems.append("panel %r has no query" % p.get("title"))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    check(len(ids) == len(set(ids)), "duplicate panel ids: %s", ids)
    used = set()
    for title, expr in exprs:
        names = set(METRIC_RX.findall(expr))
        if not names:
            problems.append("panel %r query names no mailgw series: %s" % (title, expr))
        for n in sorted(names - known):
            problems.append("panel %r uses unknown series %s" % (title, n))
        used |= {e.family(n) for n in names}
    for fam in sorted((set(e.types) | set(BPF_FAMILIES)) - used - {"mailgw_build_info"}):
        problems.append("no panel shows %s" % fam)
    # the alert rules too
    with open(RULES) as f:
        rules_text = f.read()
    exprs_text = "\n".join(re.findall(r"expr:[^\n]*(?:\n {10,}[^\n]*)*", rules_text))
    for n in sorted(set(METRIC_RX.findall(exprs_text)) - known):
        problems.append("alert rules use unknown series %s" % n)
    # docs/metrics.md describes every family with its labels
    with open(DOC) as f:
        doc = f.read()
    for fam in sorted(set(e.types) | set(BPF_FAMILIES)):
        if "`%s`" % fam not in doc:
            problems.append("docs/metrics.md does not describe %s" % fam)
    labels = {k for _, l, _ in e.samples for k in l}
    labels |= {k for ls in BPF_FAMILIES.values() for k in ls}
    for k in sorted(labels):
        if "`%s`" % k not in doc:
            problems.append("docs/metrics.md does not name the label %s" % k)
    check(not problems, "; ".join(problems))


def reload_keeps_series(t):
    gw = t.gw
    before = wait_idle(gw)
    old = [l["name"] for l in gw.listeners]
    gw.listeners.append(listener("late", "smtp", "starttls", t.stack.smtp_backend,
                                 require_tls="yes", hostname=GATEWAY_NAME))
    gw.write_config()
    off = gw.reload()
    check(gw.wait_log(r"reloaded:", 1, off), "reload failed: %s", gw.log_tail(5))
    mailstack.wait_port(*gw.addr("late"), timeout=10, proc=gw.proc, what="mailgw")
    status, _, _ = http_get(gw.metrics_port, "/healthz")
    check_eq(status, 200, "/healthz after the reload")
    # wait_port's probe is a real connection to "late"; the listen queue may still hold
    # it when the first idle scrape comes back, so wait until a worker has counted it
    deadline = time.monotonic() + 6.0
    while True:
        after = wait_idle(gw)
        probes = after.get("mailgw_connections_total", listener="late", protocol="smtp")
        if probes >= 1:
            break
        check(time.monotonic() < deadline, "the probe of \"late\" was never counted")
        time.sleep(0.05)
    check_eq(probes, 1.0, "connections_total of late after the port probe")
    problems = []
    for name, labels, v in before.samples:
        if "listener" not in labels or labels["listener"] not in old:
            continue
        if before.types.get(before.family(name)) not in ("counter", "histogram"):
            continue
        hits = [x for n, l, x in after.samples if n == name and l == labels]
        if len(hits) != 1:
            problems.append("%s%s: %d samples after the reload" % (name, labels, len(hits)))
        elif name.endswith("_sum"):
            if hits[0] < v:
                problems.append("%s%s went down %g -> %g" % (name, labels, v, hits[0]))
        elif hits[0] != v:
            problems.append("%s%s: %g before the reload, %g after" % (name, labels, v, hits[0]))
    check(not problems, "; ".join(problems[:8]))
    check(after.get("mailgw_connections_total", listener="submission") > 0,
          "submission had no connections before the reload")
    # new workers count on top of the old values
    plain_session(t, "watched")
    plain_session(t, "late")
    again = wait_idle(gw)
    for name in ("watched", "late"):
        check_eq(again.get("mailgw_connections_total", listener=name)
                 - after.get("mailgw_connections_total", listener=name), 1.0,
                 "connections_total of %s after one more session" % name)


CASES = [
    ("metrics_exact_values", exact_values),
    ("metrics_exposition_promtool_lint", exposition_lint),
    ("metrics_http_endpoints", http_endpoints),
    ("metrics_burst_no_lost_increments", burst),
    ("metrics_prometheus_scrape", prometheus_server, 120),
    ("metrics_promtool_configs_and_rule_tests", promtool_configs),
    ("metrics_dashboard_and_docs_consistency", dashboard_and_docs),
    ("metrics_reload_keeps_series", reload_keeps_series),
    ("metrics_healthz_503_while_draining", healthz_drain),
]

if __name__ == "__main__":
    run_cases(setup, CASES)
