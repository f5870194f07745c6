#!/usr/bin/python3
"""Real mail servers and a managed mailgw process for integration tests.

What this module runs, all bound to 127.0.0.0/8 (or ::1) on ports chosen at
run time, all under one temporary directory /tmp/mailgw-test-* that is
removed on exit:

  - certificates made with the openssl CLI (ECDSA P-256 and RSA-2048 for
    mail.example.test, ECDSA for other.example.test);
  - a private Postfix instance (`postfix -c DIR start-fg`) that accepts mail
    for example.test and delivers it with the virtual(8) agent to
    DIR/mail/<user>/Maildir/; one plain smtpd port and one smtpd port that
    expects a PROXY protocol header (v1 or v2);
  - a private Dovecot instance (`dovecot -F -c FILE`) serving the same
    maildirs over IMAP and POP3, plain and behind PROXY protocol;
  - mailgw itself (`$MAILGW -c FILE`), with helpers for reload, stop and the
    SIGUSR1 statistics line.

Every process started here is stopped, and every directory made here is
removed, at interpreter exit and on SIGTERM/SIGINT/SIGHUP, also when a test
fails half-way.  Set MAILGW_KEEP=1 to keep the directories for a post-mortem.

As a command, `mailstack.py demo --config configs/demo.conf --workdir
build/demo` runs the demo behind `make run`.
"""

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DOMAIN = "example.test"
USERS = {"alice": "alicepw", "bob": "bobpw"}
GATEWAY_NAME = "mail.example.test"
OTHER_NAME = "other.example.test"
BACKEND_NAME = "backend.example.test"

# Maildirs belong to one unprivileged account that both Postfix's virtual(8)
# agent and Dovecot's mail processes use; nobody exists on every Debian box
# and is above virtual_minimum_uid and Dovecot's first_valid_uid.
MAIL_UID = 65534
MAIL_GID = 65534


class StackError(Exception):
    """A server of the test stack could not be started or misbehaved."""


class GatewayDied(StackError):
    """The mailgw process is no longer running."""


# --------------------------------------------------------------------------
# cleanup

_cleanups = []
_cleanup_lock = threading.Lock()


def on_cleanup(fn):
    """Run fn() at exit (last registered runs first).  Returns fn."""
    with _cleanup_lock:
        _cleanups.append(fn)
    return fn


def cancel_cleanup(fn):
    with _cleanup_lock:
        if fn in _cleanups:
            _cleanups.remove(fn)


def cleanup_all():
    while True:
        with _cleanup_lock:
            if not _cleanups:
                return
            fn = _cleanups.pop()
        try:
            fn()
        except Exception as e:  # keep cleaning up the rest
            print("mailstack: cleanup error: %s" % e, file=sys.stderr)


_exiting = False


def _exit_on_signal(signum, frame):
    # Unwind the main thread and let atexit clean up: cleaning up inside
    # the handler could wait on a lock the interrupted code holds (a
    # Popen.wait() in progress, for one).
    global _exiting
    if _exiting:
        return
    _exiting = True
    raise SystemExit(128 + signum)


atexit.register(cleanup_all)
if threading.current_thread() is threading.main_thread():
    for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(_sig, _exit_on_signal)


def make_tempdir(tag="run"):
    """A fresh /tmp/mailgw-test-TAG-* directory, removed at exit."""
    path = tempfile.mkdtemp(prefix="mailgw-test-%s-" % tag, dir="/tmp")
    # Postfix (user postfix) and the mail account must traverse it.
    os.chmod(path, 0o755)

    def rm():
        if os.environ.get("MAILGW_KEEP"):
            print("mailstack: kept %s" % path, file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)

    on_cleanup(rm)
    return path


# --------------------------------------------------------------------------
# processes and ports

_given_ports = set()


def free_port(host="127.0.0.1"):
    """A TCP port on host that nothing listens on now and that this process
    has not handed out before."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.bind((host, 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if port not in _given_ports:
            _given_ports.add(port)
            return port
    raise StackError("no free port on %s" % host)


def ipv6_loopback_ok():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            s.bind(("::1", 0))
        finally:
            s.close()
        return True
    except OSError:
        return False


def wait_port(host, port, timeout=10.0, proc=None, what=None):
    """Wait until host:port accepts a TCP connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise StackError("%s exited (status %s) before %s:%d accepted"
                             % (what or "process", proc.returncode, host, port))
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect((host, port))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise StackError("%s: nothing accepts on %s:%d after %.0f s"
                                 % (what or "wait_port", host, port, timeout))
            time.sleep(0.05)
        finally:
            s.close()


def read_file(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except FileNotFoundError:
        return b"" if "b" in mode else ""


def tail(text, n=25):
    lines = text.splitlines()
    return "\n".join(lines[-n:])


def group_processes(pgid):
    """PIDs of the live (not zombie) processes in process group pgid, sorted."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[2] the process group
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(name))
    return sorted(out)


def _kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _wait_log(path, pattern, timeout, proc=None, what=None):
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        if rx.search(read_file(path)):
            return
        if proc is not None and proc.poll() is not None:
            raise StackError("%s exited (status %s):\n%s"
                             % (what, proc.returncode, tail(read_file(path))))
        if time.monotonic() > deadline:
            raise StackError("%s: no /%s/ in its log after %.0f s:\n%s"
                             % (what, pattern, timeout, tail(read_file(path))))
        time.sleep(0.05)


def run(cmd, timeout=30, **kw):
    """subprocess.run with text output captured and a timeout."""
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, **kw)


def have_tool(name):
    return shutil.which(name) is not None


# --------------------------------------------------------------------------
# certificates

def _openssl_selfsigned(keyalg, cert, key, cn, sans):
    newkey = {"ecdsa": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
              "rsa": ["-newkey", "rsa:2048"]}[keyalg]
    cmd = (["openssl", "req", "-x509", "-nodes", "-days", "3650", "-sha256"]
           + newkey + ["-keyout", key, "-out", cert, "-subj", "/CN=%s" % cn,
                       "-addext", "subjectAltName=" + ",".join(sans)])
    r = run(cmd)
    if r.returncode != 0:
        raise StackError("openssl req failed: %s" % r.stdout)
    os.chmod(key, 0o600)
    return cert, key


MAIL_SANS = ["DNS:%s" % GATEWAY_NAME, "DNS:localhost", "IP:127.0.0.1", "IP:::1"]


def make_ecdsa_cert(directory, name="ecdsa", cn=GATEWAY_NAME, sans=None):
    """Self-signed ECDSA P-256 certificate; returns (cert_path, key_path)."""
    return _openssl_selfsigned("ecdsa", os.path.join(directory, name + ".pem"),
                               os.path.join(directory, name + ".key"), cn,
                               sans or MAIL_SANS)


def make_rsa_cert(directory, name="rsa", cn=GATEWAY_NAME, sans=None):
    """Self-signed RSA-2048 certificate; returns (cert_path, key_path)."""
    return _openssl_selfsigned("rsa", os.path.join(directory, name + ".pem"),
                               os.path.join(directory, name + ".key"), cn,
                               sans or MAIL_SANS)


def make_other_cert(directory, name="other"):
    """ECDSA certificate for other.example.test (the SNI alternative)."""
    return make_ecdsa_cert(directory, name, OTHER_NAME, ["DNS:%s" % OTHER_NAME])


class Certs:
    """The three certificate/key pairs, plus a bundle of all three
    certificates usable as a trust store (they are self-signed)."""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.ecdsa_cert, self.ecdsa_key = make_ecdsa_cert(directory)
        self.rsa_cert, self.rsa_key = make_rsa_cert(directory)
        self.other_cert, self.other_key = make_other_cert(directory)
        self.bundle = os.path.join(directory, "trusted.pem")
        with open(self.bundle, "w") as out:
            for p in (self.ecdsa_cert, self.rsa_cert, self.other_cert):
                out.write(read_file(p))

    def der(self, which):
        """DER bytes of 'ecdsa', 'rsa' or 'other'."""
        import ssl
        return ssl.PEM_cert_to_DER_cert(read_file(getattr(self, which + "_cert")))

    def identify(self, der):
        """Name of the pair whose certificate is der, or None."""
        for which in ("ecdsa", "rsa", "other"):
            if self.der(which) == der:
                return which
        return None


# --------------------------------------------------------------------------
# shared mail store

def make_mail_root(directory, users=USERS):
    """DIR/<user>/Maildir/{cur,new,tmp} for every user, owned by the mail
    account so that Postfix delivers and Dovecot reads without races."""
    os.makedirs(directory, exist_ok=True)
    paths = [directory]
    for user in users:
        for sub in ("", "/Maildir", "/Maildir/cur", "/Maildir/new", "/Maildir/tmp"):
            p = os.path.join(directory, user) + sub
            os.makedirs(p, exist_ok=True)
            paths.append(p)
    for p in paths:
        os.chown(p, MAIL_UID, MAIL_GID)
        os.chmod(p, 0o700 if p != directory else 0o755)
    return directory


def maildir_files(mail_root, user):
    out = []
    for sub in ("new", "cur"):
        d = os.path.join(mail_root, user, "Maildir", sub)
        try:
            out.extend(os.path.join(d, n) for n in sorted(os.listdir(d)))
        except FileNotFoundError:
            pass
    return out


def wait_for_message(mail_root, user, marker, timeout=20.0):
    """Bytes of the first message in user's maildir that contains marker
    (bytes or str), waiting up to timeout seconds for it to be delivered.
    virtual(8) writes into tmp/ and renames into new/, so what is found is
    complete."""
    if isinstance(marker, str):
        marker = marker.encode()
    deadline = time.monotonic() + timeout
    while True:
        for path in maildir_files(mail_root, user):
            data = read_file(path, "rb")
            if marker in data:
                return data
        if time.monotonic() > deadline:
            raise StackError("no message containing %r for %s after %.0f s"
                             % (marker[:60], user, timeout))
        time.sleep(0.05)


# --------------------------------------------------------------------------
# Postfix

_POSTFIX_MAIN = """\
# Private test instance; nothing here is read by the system Postfix.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
# meta_directory stays the package's (/etc/postfix): postfix-files lives there.
maillog_file = /dev/stdout
myhostname = {hostname}
mydomain = {domain}
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = {interfaces}
inet_protocols = {protocols}
mynetworks = 127.0.0.0/8{v6net}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_banner = $myhostname ESMTP backend
smtpd_client_port_logging = yes
smtpd_peername_lookup = no
smtpd_error_sleep_time = 0
smtpd_upstream_proxy_timeout = 10s
smtp_dns_support_level = disabled
smtpd_tls_security_level = none
smtp_tls_security_level = none
message_size_limit = {size_limit}
virtual_mailbox_limit = 0
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {mail_root}
virtual_mailbox_maps = inline:{{ {mailbox_map} }}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 100
biff = no
append_dot_mydomain = no
delay_warning_time = 0
"""

# Own master.cf: every service unchrooted (no copy of /etc files into a jail),
# no pickup (nothing uses sendmail here), smtpd only on the ports we picked.
_POSTFIX_MASTER_SERVICES = """\
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """A private Postfix instance.

    smtp_port: plain smtpd; proxy_port: smtpd with
    smtpd_upstream_proxy_protocol = haproxy (PROXY v1 and v2);
    smtp6_port (ipv6=True only): plain smtpd on [::1]."""

    def __init__(self, directory, mail_root, ipv6=False, hostname=BACKEND_NAME,
                 smtp_port=None, proxy_port=None):
        self.dir = directory
        self.conf_dir = os.path.join(directory, "etc")
        self.queue = os.path.join(directory, "queue")
        self.data = os.path.join(directory, "data")
        self.log_path = os.path.join(directory, "postfix.log")
        self.mail_root = mail_root
        self.hostname = hostname
        self.ipv6 = ipv6
        self.smtp_port = smtp_port or free_port()
        self.proxy_port = proxy_port or free_port()
        self.smtp6_port = free_port("::1") if ipv6 else None
        self.proc = None
        self._cleanup = None

    def _write_config(self):
        os.makedirs(self.conf_dir, exist_ok=True)
        mailbox_map = ", ".join("%s@%s=%s/Maildir/" % (u, DOMAIN, u) for u in USERS)
        main = _POSTFIX_MAIN.format(
            queue=self.queue, data=self.data, hostname=self.hostname, domain=DOMAIN,
            interfaces="127.0.0.1, ::1" if self.ipv6 else "127.0.0.1",
            protocols="all" if self.ipv6 else "ipv4",
            v6net=", [::1]/128" if self.ipv6 else "",
            size_limit=64 * 1024 * 1024, mail_root=self.mail_root,
            mailbox_map=mailbox_map, uid=MAIL_UID, gid=MAIL_GID)
        master = ("127.0.0.1:%d inet n - n - - smtpd\n" % self.smtp_port
                  + "127.0.0.1:%d inet n - n - - smtpd\n" % self.proxy_port
                  + "  -o smtpd_upstream_proxy_protocol=haproxy\n")
        if self.ipv6:
            master += "[::1]:%d inet n - n - - smtpd\n" % self.smtp6_port
        master += _POSTFIX_MASTER_SERVICES
        past = time.time() - 60
        for name, text in (("main.cf", main), ("master.cf", master)):
            path = os.path.join(self.conf_dir, name)
            with open(path, "w") as f:
                f.write(text)
            # Postfix's configuration reader pauses in 300 ms steps until a
            # file it reads is older than a second or two ("let it cool
            # down"): a fresh main.cf costs every postfix command ~2 s.
            os.utime(path, (past, past))

    def _make_queue(self):
        """Create queue_directory and data_directory with the owners and
        modes that the package's postfix-files lists, and mark the queue for
        a quick start.

        `postfix start-fg` would otherwise run post-install create-missing
        and the check-warn scan over the package's files on every start
        (about 2.5 s here); set-permissions would re-chmod the system's
        binaries.  Neither is needed for a fresh private queue."""
        table = read_file("/etc/postfix/postfix-files")
        dirs = []
        for line in table.splitlines():
            f = line.split(":")
            if len(f) >= 5 and f[1] == "d" and re.match(r"^\$(queue|data)_directory(/|$)", f[0]):
                dirs.append(f)
        if not dirs:
            return False    # unknown layout: let postfix-script create it
        names = {"$mail_owner": "postfix", "$setgid_group": "postdrop"}
        for name, _, owner, group, mode in (f[:5] for f in dirs):
            path = name.replace("$queue_directory", self.queue).replace(
                "$data_directory", self.data)
            os.makedirs(path, exist_ok=True)
            uid = -1 if owner == "-" else (0 if owner == "root" else _uid(names.get(owner, owner)))
            gid = -1 if group == "-" else _gid(names.get(group, group))
            os.chown(path, uid, gid)
            os.chmod(path, int(mode, 8))
        open(os.path.join(self.queue, "quick-start"), "w").close()
        return True

    def start(self, timeout=30.0):
        if os.geteuid() != 0:
            raise StackError("Postfix needs root to start")
        if not os.path.exists("/usr/sbin/postfix"):
            raise StackError("postfix is not installed")
        self._write_config()
        if not self._make_queue():
            os.makedirs(self.queue, exist_ok=True)
            os.makedirs(self.data, exist_ok=True)
            os.chown(self.data, _uid("postfix"), -1)
        log = open(self.log_path, "ab")
        # start-fg runs postfix-script, which runs `master -s`; master makes
        # itself a session leader, so it and its children are stopped
        # through master's own process group.
        env = dict(os.environ, MAIL_CONFIG=self.conf_dir)
        self.proc = subprocess.Popen(
            ["/usr/sbin/postfix", "-c", self.conf_dir, "start-fg"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            start_new_session=True)
        log.close()
        self._cleanup = on_cleanup(self.stop)
        _wait_log(self.log_path, r"master\[\d+\]: daemon started", timeout,
                  self.proc, "postfix")
        for port, host in ((self.smtp_port, "127.0.0.1"), (self.smtp6_port, "::1")):
            if port:
                wait_port(host, port, timeout, self.proc, "postfix")
        return self

    def master_pid(self):
        txt = read_file(os.path.join(self.queue, "pid", "master.pid")).strip()
        return int(txt) if txt.isdigit() else None

    def stop(self):
        """Stop the instance without ceremony: nothing in its queue has to
        survive a test run."""
        if self.proc is None:
            return
        pid = self.master_pid()
        groups = [g for g in (pid, self.proc.pid) if g]
        _stop_groups(groups, self.proc)
        self.proc = None
        if self._cleanup:
            cancel_cleanup(self._cleanup)
            self._cleanup = None

    def log(self):
        return read_file(self.log_path)

    def wait_for_message(self, user, marker, timeout=20.0):
        return wait_for_message(self.mail_root, user, marker, timeout)


def _uid(name):
    import pwd
    return pwd.getpwnam(name).pw_uid


def _gid(name):
    import grp
    return grp.getgrnam(name).gr_gid


def _stop_groups(groups, proc, grace=0.5):
    """SIGTERM to the process groups, SIGKILL to what is left after grace
    seconds, and reap proc."""
    for g in groups:
        _kill_group(g, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not any(_kill_group(g, 0) for g in groups):
            break
        time.sleep(0.02)
    for g in groups:
        _kill_group(g, signal.SIGKILL)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------
# Dovecot

_DOVECOT_CONF = """\
# Private test instance; nothing here is read by the system Dovecot.
instance_name = {instance}
base_dir = {base_dir}
state_dir = {state_dir}
log_path = {log}
info_log_path = {log}
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
haproxy_trusted_networks = 127.0.0.0/8
login_greeting = backend dovecot ready.
login_log_format_elements = user=<%u> method=%m rip=%r rport=%{{rport}} lip=%l mpid=%e %c session=<%{{session}}>
mail_location = maildir:{mail_root}/%n/Maildir
first_valid_uid = 100
pop3_uidl_format = %08Xu%08Xv
protocol imap {{
  mail_max_userip_connections = 500
}}
protocol pop3 {{
  mail_max_userip_connections = 500
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {users}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imap_haproxy {{
    address = 127.0.0.1
    port = {imap_proxy_port}
    haproxy = yes
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3_haproxy {{
    address = 127.0.0.1
    port = {pop3_proxy_port}
    haproxy = yes
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


class Dovecot:
    """A private Dovecot instance over the same maildirs Postfix fills.
    Users log in as "alice" or "alice@example.test"."""

    def __init__(self, directory, mail_root, imap_port=None, pop3_port=None):
        self.dir = directory
        self.mail_root = mail_root
        self.conf = os.path.join(directory, "dovecot.conf")
        self.log_path = os.path.join(directory, "dovecot.log")
        self.imap_port = imap_port or free_port()
        self.pop3_port = pop3_port or free_port()
        self.imap_proxy_port = free_port()
        self.pop3_proxy_port = free_port()
        self.proc = None
        self._cleanup = None

    def _write_config(self):
        base_dir = os.path.join(self.dir, "run")
        state_dir = os.path.join(self.dir, "state")
        for d in (self.dir, base_dir, state_dir):
            os.makedirs(d, exist_ok=True)
        users = os.path.join(self.dir, "users")
        with open(users, "w") as f:
            for u, pw in USERS.items():
                f.write("%s:{PLAIN}%s:%d:%d::%s/%s\n"
                        % (u, pw, MAIL_UID, MAIL_GID, self.mail_root, u))
        os.chmod(users, 0o644)
        with open(self.conf, "w") as f:
            f.write(_DOVECOT_CONF.format(
                instance="mailgw-test-%d" % os.getpid(), base_dir=base_dir,
                state_dir=state_dir, log=self.log_path, mail_root=self.mail_root,
                users=users, imap_port=self.imap_port,
                imap_proxy_port=self.imap_proxy_port, pop3_port=self.pop3_port,
                pop3_proxy_port=self.pop3_proxy_port))

    def start(self, timeout=20.0):
        if not os.path.exists("/usr/sbin/dovecot"):
            raise StackError("dovecot is not installed")
        self._write_config()
        out = open(os.path.join(self.dir, "dovecot.out"), "ab")
        self.proc = subprocess.Popen(["/usr/sbin/dovecot", "-F", "-c", self.conf],
                                     stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=out, start_new_session=True)
        out.close()
        self._cleanup = on_cleanup(self.stop)
        try:
            for port in (self.imap_port, self.pop3_port):
                wait_port("127.0.0.1", port, timeout, self.proc, "dovecot")
        except StackError as e:
            raise StackError("%s\n%s\n%s" % (e, tail(self.log()),
                                             read_file(os.path.join(self.dir, "dovecot.out"))))
        return self

    def stop(self):
        if self.proc is None:
            return
        _stop_groups([self.proc.pid], self.proc)
        self.proc = None
        if self._cleanup:
            cancel_cleanup(self._cleanup)
            self._cleanup = None

    def log(self):
        return read_file(self.log_path)


# --------------------------------------------------------------------------
# mailgw

def mailgw_binary():
    path = os.environ.get("MAILGW") or os.path.join(REPO, "build", "mailgw")
    return os.path.abspath(path)


SANITIZER_RX = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer|ThreadSanitizer)"
                          r"|runtime error: |WARNING: ThreadSanitizer")
# A worker that dies, as the master reports it, or a sanitizer report.
CRASH_RX = re.compile(r"killed by signal|dumped core|exited with status [1-9]|"
                      + SANITIZER_RX.pattern)
STATS_RX = re.compile(r"stats:(.*)$")


def parse_stats(line):
    m = STATS_RX.search(line)
    if not m:
        return None
    return {k: int(v) for k, v in re.findall(r"([A-Za-z0-9_.]+)=(\d+)", m.group(1))}


def listener(name, protocol, tls, backend, **keys):
    """One [listener NAME] section.  backend is (host, port) or "host:port";
    listen defaults to 127.0.0.1 on a free port."""
    d = {"name": name, "protocol": protocol, "tls": tls}
    d["backend"] = backend if isinstance(backend, str) else join_hostport(*backend)
    d.update({k: v for k, v in keys.items()})
    if "listen" not in d:
        d["listen"] = "127.0.0.1:%d" % free_port()
    return d


def join_hostport(host, port):
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def split_hostport(text):
    m = re.match(r"^\[([^\]]+)\]:(\d+)$", text) or re.match(r"^([^:]+):(\d+)$", text)
    if not m:
        raise ValueError("bad host:port %r" % text)
    return m.group(1), int(m.group(2))


def _ini_value(v):
    if v is True:
        return "yes"
    if v is False:
        return "no"
    return str(v)


class Mailgw:
    """One mailgw process with a generated configuration.

    listeners: list of dicts from listener(); tls_pairs: [(cert, key), ...]
    in [tls] order; global_opts/tls_opts/offload: extra keys for those
    sections; extra: raw text appended to the file."""

    def __init__(self, directory, listeners, tls_pairs, global_opts=None,
                 tls_opts=None, offload=None, extra="", binary=None):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.conf = os.path.join(directory, "mailgw.conf")
        self.log_path = os.path.join(directory, "mailgw.log")
        self.binary = binary or mailgw_binary()
        self.listeners = listeners
        self.tls_pairs = tls_pairs
        self.global_opts = {"workers": 1, "log_level": "info", "shutdown_grace": 3}
        self.global_opts.update(global_opts or {})
        self.tls_opts = tls_opts or {}
        self.offload = {"mode": "userspace"}
        self.offload.update(offload or {})
        self.extra = extra
        self.proc = None
        self.returncode = None
        self.leftovers = False
        self.started = False
        self._cleanup = None
        self.write_config()

    # configuration -------------------------------------------------------

    def config_text(self):
        out = ["[global]"]
        out += ["%s = %s" % (k, _ini_value(v)) for k, v in self.global_opts.items()]
        out += ["", "[tls]"]
        for cert, key in self.tls_pairs:
            out += ["certificate = %s" % cert, "private_key = %s" % key]
        out += ["%s = %s" % (k, _ini_value(v)) for k, v in self.tls_opts.items()]
        out += ["", "[offload]"]
        out += ["%s = %s" % (k, _ini_value(v)) for k, v in self.offload.items()]
        for lst in self.listeners:
            out += ["", "[listener %s]" % lst["name"]]
            out += ["%s = %s" % (k, _ini_value(v)) for k, v in lst.items() if k != "name"]
        return "\n".join(out) + "\n" + self.extra

    def write_config(self, text=None):
        """Write the configuration atomically: a SIGHUP racing with the
        write must see the old file or the new one, never half of it."""
        tmp = self.conf + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.config_text() if text is None else text)
        os.replace(tmp, self.conf)

    def addr(self, name):
        for lst in self.listeners:
            if lst["name"] == name:
                return split_hostport(lst["listen"])
        raise KeyError(name)

    def port(self, name):
        return self.addr(name)[1]

    # process -------------------------------------------------------------

    def start(self, timeout=20.0):
        if not os.access(self.binary, os.X_OK):
            raise StackError("mailgw binary not found: %s" % self.binary)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "-c", self.conf],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     cwd=self.dir, start_new_session=True)
        log.close()
        self.returncode = None
        self.started = True
        if self._cleanup is None:
            self._cleanup = on_cleanup(self.kill)
        try:
            for lst in self.listeners:
                host, port = split_hostport(lst["listen"])
                wait_port(host, port, timeout, self.proc, "mailgw")
        except StackError as e:
            raise GatewayDied("%s\n%s" % (e, self.log_tail()))
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def check(self):
        """Raise GatewayDied (with the log tail) if the process is gone."""
        if self.proc is None:
            raise GatewayDied("mailgw is not running")
        rc = self.proc.poll()
        if rc is not None:
            self.returncode = rc
            raise GatewayDied("mailgw exited with status %s; log tail:\n%s"
                              % (rc, self.log_tail()))

    def signal(self, sig):
        self.check()
        self.proc.send_signal(sig)

    RELOAD_DONE_RX = r"(?i)\breload(ed\b| failed| complete)"

    def reload(self, wait=True, timeout=10.0):
        """SIGHUP; with wait, until the log says the reload finished (or
        failed).  Returns the log offset from before the signal."""
        off = len(self.log())
        self.signal(signal.SIGHUP)
        if wait and self.wait_log(self.RELOAD_DONE_RX, timeout, off) is None:
            self.check()
            raise StackError("no end of reload in the log %.0f s after SIGHUP" % timeout)
        return off

    def stop(self, timeout=None):
        """SIGTERM and wait; returns the exit status (None if it had to be
        killed).  Processes left in its group afterwards are killed too."""
        if self.proc is None:
            return self.returncode
        if timeout is None:
            timeout = float(self.global_opts.get("shutdown_grace", 30)) + 10
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
            # the main process is reaped: anything still in its process
            # group (a worker) outlived it
            self.leftovers = _kill_group(self.proc.pid, 0)
        except subprocess.TimeoutExpired:
            self.returncode = None
        self.kill()
        return self.returncode

    def kill(self):
        if self.proc is None:
            return
        _kill_group(self.proc.pid, signal.SIGKILL)
        try:
            rc = self.proc.wait(5)
            if self.returncode is None and rc is not None and rc >= 0:
                self.returncode = rc
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    # log and statistics --------------------------------------------------

    def log(self):
        return read_file(self.log_path, "rb").decode("utf-8", "replace")

    def log_tail(self, n=30):
        return tail(self.log(), n)

    def wait_log(self, pattern, timeout=5.0, offset=0):
        """Wait for a log line matching pattern after offset; returns it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log()[offset:].splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def sanitizer_report(self):
        txt = self.log()
        m = SANITIZER_RX.search(txt)
        if not m:
            return ""
        start = txt.rfind("\n", 0, m.start()) + 1
        return txt[start:start + 3000]

    def own_lines(self):
        """The log lines to judge as the gateway's own.  When the log holds
        a sanitizer report (counted as a crash already), the lines without
        a timestamp are taken to be that report; reports from several
        workers interleave with ordinary lines, so no block can be cut."""
        text = self.log()
        lines = text.splitlines()
        if not SANITIZER_RX.search(text):
            return lines
        return [l for l in lines if re.match(r"^\d{4}-\d\d-\d\dT", l)]

    def crash_lines(self, offset=0):
        """Log lines after offset that report a crashed process."""
        return [l for l in self.log()[offset:].splitlines() if CRASH_RX.search(l)]

    def stats_lines(self):
        return [l for l in self.log().splitlines() if STATS_RX.search(l)]

    def stats(self, timeout=3.0):
        """Send SIGUSR1 and return the new `stats:` line as {counter: int}."""
        before = len(self.stats_lines())
        self.signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            lines = self.stats_lines()
            if len(lines) > before:
                # with several workers more lines may follow at once
                time.sleep(0.1)
                return parse_stats(self.stats_lines()[-1])
            self.check()
            if time.monotonic() > deadline:
                raise StackError("no stats: line within %.0f s of SIGUSR1" % timeout)
            time.sleep(0.05)


def config_check(conf, binary=None, timeout=15):
    """Run `mailgw -t -c conf`; returns (status, output)."""
    r = subprocess.run([binary or mailgw_binary(), "-t", "-c", conf],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return r.returncode, r.stdout.decode("utf-8", "replace")


# --------------------------------------------------------------------------
# the whole stack for one test file

class Stack:
    """Certificates + Postfix + Dovecot in one temporary directory, and
    gateways made on top of them."""

    def __init__(self, tag, ipv6=False):
        self.dir = make_tempdir(tag)
        self.certs = Certs(os.path.join(self.dir, "certs"))
        self.mail_root = make_mail_root(os.path.join(self.dir, "mail"))
        self.postfix = Postfix(os.path.join(self.dir, "postfix"), self.mail_root, ipv6=ipv6)
        self.dovecot = Dovecot(os.path.join(self.dir, "dovecot"), self.mail_root)
        self._gw_count = 0

    def start(self, postfix=True, dovecot=True):
        if postfix:
            self.postfix.start()
        if dovecot:
            self.dovecot.start()
        return self

    @property
    def smtp_backend(self):
        return ("127.0.0.1", self.postfix.smtp_port)

    @property
    def imap_backend(self):
        return ("127.0.0.1", self.dovecot.imap_port)

    @property
    def pop3_backend(self):
        return ("127.0.0.1", self.dovecot.pop3_port)

    def gateway(self, listeners, tls_pairs=None, **kw):
        """A Mailgw (not started) in its own subdirectory."""
        self._gw_count += 1
        d = os.path.join(self.dir, "gw%d" % self._gw_count)
        if tls_pairs is None:
            tls_pairs = [(self.certs.ecdsa_cert, self.certs.ecdsa_key)]
        return Mailgw(d, listeners, tls_pairs, **kw)

    def wait_for_message(self, user, marker, timeout=20.0):
        return wait_for_message(self.mail_root, user, marker, timeout)

    def stop(self):
        self.dovecot.stop()
        self.postfix.stop()


# --------------------------------------------------------------------------
# demo (make run)

DEMO_PORTS = [("smtp (STARTTLS)", 2525), ("submission (STARTTLS, TLS required)", 2587),
              ("smtps (implicit TLS)", 2465), ("imap (STARTTLS)", 2143),
              ("imaps (implicit TLS)", 2993), ("pop3 (STARTTLS)", 2110),
              ("pop3s (implicit TLS)", 2995)]


def demo(config, workdir):
    config = os.path.abspath(config)
    workdir = os.path.abspath(workdir)
    if os.geteuid() != 0:
        print("demo: must run as root (Postfix and Dovecot are started)", file=sys.stderr)
        return 1
    binary = mailgw_binary()
    if not os.access(binary, os.X_OK):
        print("demo: %s not found; run make first" % binary, file=sys.stderr)
        return 1
    for port in (10025, 10143, 10110) + tuple(p for _, p in DEMO_PORTS):
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        except OSError:
            print("demo: port 127.0.0.1:%d is in use" % port, file=sys.stderr)
            return 1
        finally:
            s.close()

    # Fresh state each run; the directory chain must be traversable by the
    # postfix user and the mail account.
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    d = workdir
    while d != "/":
        st = os.stat(d)
        if st.st_mode & 0o005 != 0o005:
            os.chmod(d, st.st_mode | 0o005)
        d = os.path.dirname(d)
    cert, key = _openssl_selfsigned("ecdsa", os.path.join(workdir, "cert.pem"),
                                    os.path.join(workdir, "key.pem"), GATEWAY_NAME,
                                    MAIL_SANS)
    mail_root = make_mail_root(os.path.join(workdir, "mail"))
    postfix = Postfix(os.path.join(workdir, "postfix"), mail_root, smtp_port=10025)
    dovecot = Dovecot(os.path.join(workdir, "dovecot"), mail_root, imap_port=10143,
                      pop3_port=10110)
    try:
        postfix.start()
        dovecot.start()
    except StackError as e:
        print("demo: %s" % e, file=sys.stderr)
        return 1
    print("demo: Postfix on 127.0.0.1:10025 (log %s)" % postfix.log_path)
    print("demo: Dovecot IMAP on 127.0.0.1:10143, POP3 on 127.0.0.1:10110 (log %s)"
          % dovecot.log_path)
    print("demo: mail for alice@example.test (alicepw) and bob@example.test (bobpw) "
          "lands in %s" % mail_root)

    gw = subprocess.Popen([binary, "-c", config], cwd=REPO, stdin=subprocess.DEVNULL,
                          start_new_session=True)

    def stop_gw():
        if gw.poll() is None:
            gw.send_signal(signal.SIGTERM)
            try:
                gw.wait(40)
            except subprocess.TimeoutExpired:
                _kill_group(gw.pid, signal.SIGKILL)
                gw.wait()

    on_cleanup(stop_gw)
    try:
        for _, port in DEMO_PORTS:
            wait_port("127.0.0.1", port, 15, gw, "mailgw")
    except StackError as e:
        print("demo: %s" % e, file=sys.stderr)
        return 1
    print()
    print("mailgw is up (pid %d), listening on:" % gw.pid)
    for what, port in DEMO_PORTS:
        print("  127.0.0.1:%d  %s" % (port, what))
    print()
    print("Send a message through STARTTLS on the submission port:")
    print("  swaks --server 127.0.0.1:2587 --tls --from demo@example.org "
          "--to alice@example.test --header 'Subject: hello through mailgw'")
    print("Read it over IMAPS:")
    print("  curl --ssl-reqd -k -u alice:alicepw 'imaps://127.0.0.1:2993/INBOX;UID=1'")
    print("  openssl s_client -quiet -connect 127.0.0.1:2993 -servername mail.example.test")
    print("    then type: a LOGIN alice alicepw / b SELECT INBOX / c FETCH 1 BODY[] / d LOGOUT")
    print()
    print("Ctrl-C stops mailgw, Postfix and Dovecot.")
    sys.stdout.flush()
    try:
        rc = gw.wait()
    except SystemExit:          # Ctrl-C or SIGTERM: the normal way out
        rc = 0
    stop_gw()
    if rc:
        print("demo: mailgw exited with status %d" % rc, file=sys.stderr)
    return rc


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="mailstack.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run Postfix, Dovecot and mailgw for a demo")
    d.add_argument("--config", default=os.path.join(REPO, "configs", "demo.conf"))
    d.add_argument("--workdir", default=os.path.join(REPO, "build", "demo"))
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        return demo(args.config, args.workdir)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
