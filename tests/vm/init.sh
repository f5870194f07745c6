#!/bin/busybox sh
# /init of the kernel-TLS lane's initramfs (built by tests/vm/run).
#
# Stage 1: bring up just enough to reach the job share (virtio + 9p from the
# modules listed in /etc/boot-modules, in load order), then hand over to the
# job's guest.sh, which the runner copies fresh into the share on every run,
# so changing it never needs a rebuilt initramfs.
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin /job /newroot /etc
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
	echo "vm-init: $*" >/dev/console
	echo "vm-init: $*" >/dev/ttyS1 2>/dev/null
	poweroff -f
}

# Lines: "module_name path-under-/lib/modules", dependencies first.
while read -r name path; do
	[ -d "/sys/module/$name" ] ||
		insmod "/lib/modules/$path" || echo "vm-init: insmod $path failed" >/dev/console
done </etc/boot-modules

mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 job /job ||
	fail "cannot mount the job share"
[ -r /job/guest.sh ] || fail "no guest.sh in the job share"
exec sh /job/guest.sh
