# Stage 2 of the kernel-TLS lane's guest, run as PID 1 by the initramfs's
# busybox sh (tests/vm/init.sh), from the job share mounted at /job.
#
# It mounts the host's root filesystem at /newroot, gives it private /tmp,
# /run, /dev, /dev/shm and fresh /proc, /sys, bpffs, loads the kernel modules
# the tests need, then runs the job's command chrooted into /newroot with its
# stdout and stderr on the second serial port (the runner's stdout). The
# command's exit status goes to /job/rc; then the machine powers off.
#
# Nothing here writes to the host's filesystem except /job/rc; what the
# command itself writes lands on the host for real (build output, logs).

R=/newroot
OUT=/dev/ttyS1

# Settings written by the runner: VM_CWD, VM_QUIET, VM_DEBUG, VM_MODULES,
# VM_9P_CACHE, VM_HOSTNAME.
# shellcheck disable=SC1091
. /job/vm.conf

# Exact bytes to the runner: no CR insertion, no echo.
stty -F "$OUT" raw -echo 2>/dev/null

say() {
	[ "${VM_QUIET:-0}" = 1 ] || echo "vm: $*" >"$OUT"
}

finish() { # status
	stty -F "$OUT" raw -echo 2>/dev/null # tcsetattr(TCSADRAIN): flush output first
	echo "$1" >/job/rc.tmp && mv /job/rc.tmp /job/rc
	sync
	poweroff -f
	sleep 60
}

stamp() { # what
	[ "${VM_DEBUG:-0}" = 1 ] || return 0
	read -r t _ </proc/uptime
	echo "vm: $1 at ${t}s" >"$OUT"
}

die() {
	echo "vm: error: $*" >"$OUT"
	echo "vm: error: $*" >/dev/console
	echo "$*" >/job/setup-error
	finish 125
}

opts="trans=virtio,version=9p2000.L,msize=262144,cache=${VM_9P_CACHE:-loose}"
mount -t 9p -o "$opts" hostroot "$R" || die "cannot mount the host root (9p)"
[ -x "$R/bin/sh" ] || die "host root has no /bin/sh"

# A working directory under the host's /tmp would vanish under the private
# /tmp: keep a handle on the host's /tmp and bind that directory back in.
tmpshare=
case "$VM_CWD" in
/tmp/?*)
	tmpshare=${VM_CWD#/tmp/}
	tmpshare=${tmpshare%%/*}
	mkdir -p /hosttmp
	mount --bind "$R/tmp" /hosttmp || die "cannot keep the host's /tmp"
	;;
esac

mount -t proc proc "$R/proc" || die "mount /proc"
mount -t sysfs sysfs "$R/sys" || die "mount /sys"
mount -t devtmpfs devtmpfs "$R/dev" || die "mount /dev"
mkdir -p "$R/dev/pts" "$R/dev/shm"
# What udev would add: scripts use /dev/stdout, /dev/fd/N.
ln -sf /proc/self/fd "$R/dev/fd"
ln -sf /proc/self/fd/0 "$R/dev/stdin"
ln -sf /proc/self/fd/1 "$R/dev/stdout"
ln -sf /proc/self/fd/2 "$R/dev/stderr"
ln -sf /proc/kcore "$R/dev/core"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$R/dev/pts" ||
	die "mount /dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm" || die "mount /dev/shm"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp" || die "mount /tmp"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run" || die "mount /run"
mkdir -p "$R/run/lock" && chmod 1777 "$R/run/lock"
mount -t bpf -o mode=0700 bpf "$R/sys/fs/bpf" || die "mount /sys/fs/bpf"
# Optional extras for BPF work; absence is not an error.
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup" 2>/dev/null
mount -t debugfs debugfs "$R/sys/kernel/debug" 2>/dev/null
mount -t tracefs tracefs "$R/sys/kernel/tracing" 2>/dev/null

if [ -n "$tmpshare" ]; then
	mkdir -p "$R/tmp/$tmpshare"
	mount --bind "/hosttmp/$tmpshare" "$R/tmp/$tmpshare" ||
		die "cannot share /tmp/$tmpshare"
fi

stamp "mounts done"
ip link set lo up || die "cannot bring up lo"
# The host's name, which its /etc/hosts resolves.
hostname "${VM_HOSTNAME:-localhost}"

# The kernel's module autoloader runs its helper in this root, not in the
# chroot: point it at the host tree's modprobe so request_module() works
# (for example TCP_ULP "tls" or a missing cipher) for the command too.
cat >/sbin/vm-modprobe <<EOF
#!/bin/sh
exec /bin/busybox chroot $R /sbin/modprobe "\$@"
EOF
chmod 755 /sbin/vm-modprobe
echo /sbin/vm-modprobe >/proc/sys/kernel/modprobe

# Load module $1 from the initramfs's copy (/etc/mod/NAME lists it and its
# dependencies in load order), or, for a module not prepared there, with the
# host tree's modprobe. Succeeds when the module is in the kernel afterwards.
load() {
	if [ -f "/etc/mod/$1" ]; then
		while read -r name path; do
			[ "$name" = builtin ] && continue
			[ -d "/sys/module/$name" ] && continue
			insmod "/lib/modules/$path" 2>/dev/null || return 1
		done <"/etc/mod/$1"
	else
		chroot "$R" /sbin/modprobe -q "$1" 2>/dev/null || return 1
	fi
	stamp "loaded $1"
}

loaded='' missing=''
for m in tls gcm; do
	load "$m" || die "required module $m does not load"
	loaded="$loaded $m"
done
if load aesni_intel; then
	loaded="$loaded aesni_intel"
elif load aes_generic || load aes; then
	loaded="$loaded aes(generic)"
	missing="$missing aesni_intel"
else
	die "no AES implementation"
fi
for m in ccm chacha20poly1305 sch_ingress cls_bpf act_bpf $VM_MODULES; do
	if load "$m"; then
		loaded="$loaded $m"
	else
		missing="$missing $m"
	fi
done

read -r up _ </proc/uptime
say "kernel $(uname -r), ready at ${up}s; modules:$loaded${missing:+; not loaded:$missing}"

# The command: a clean environment (env -i) plus what the runner chose to
# pass, in the caller's working directory; stdin is empty.
job=$(cat /job/cmd.sh)
chroot "$R" /usr/bin/env -i /bin/sh -c "$job" </dev/null >"$OUT" 2>&1
finish $?
