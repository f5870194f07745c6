#!/bin/sh
# Install what the kernel-TLS lane (tests/vm/run) needs: qemu, Debian's own
# kernel (its modules land in /lib/modules, which the guest uses) and a
# static busybox for the initramfs. Idempotent and quiet when all is there.
#
# Installing a kernel package on a host that does not boot it:
# - linux-image-* needs an initramfs generator ("linux-initramfs-tool").
#   apt's default, initramfs-tools, pulls in udev, and on Debian 12 that
#   upgrades systemd and its libraries in place; tiny-initramfs satisfies the
#   same dependency with a 50 kB package and no other dependencies, so it is
#   chosen when no generator is installed yet. Its kernel hook writes an
#   unused /boot/initrd.img-VER; the kernel's own hooks add /vmlinuz and
#   /initrd.img symlinks. Nothing else on the host changes.
# - update-grub runs from /etc/kernel/postinst.d/zz-update-grub only where
#   grub is installed and /boot/grub/grub.cfg exists, so never in a container.
# - apt runs with --no-remove: if installing would remove anything (a
#   conflicting initramfs generator, the dynamic busybox), it stops instead.
set -eu

PKGS="qemu-system-x86 linux-image-amd64 busybox-static kmod"

installed() {
	dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=""
for p in $PKGS; do
	installed "$p" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
	echo "tests/vm/deps.sh: missing packages:$missing (run as root to install)" >&2
	exit 1
fi

case "$missing" in
*linux-image-amd64*)
	if ! installed initramfs-tools && ! installed dracut && ! installed tiny-initramfs; then
		missing="$missing tiny-initramfs"
	fi
	;;
esac

echo "tests/vm/deps.sh: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get -q update >/dev/null || true
log=$(mktemp)
# shellcheck disable=SC2086
if ! apt-get -q -y --no-install-recommends --no-remove \
	-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
	install $missing >"$log" 2>&1; then
	echo "tests/vm/deps.sh: apt-get install failed:" >&2
	tail -n 30 "$log" >&2
	rm -f "$log"
	exit 1
fi
rm -f "$log"

# The lane needs a kernel image together with its modules.
for k in /boot/vmlinuz-*-amd64; do
	[ -f "/lib/modules/${k#/boot/vmlinuz-}/modules.dep" ] && exit 0
done
echo "tests/vm/deps.sh: no /boot/vmlinuz-*-amd64 with matching /lib/modules after install" >&2
exit 1
