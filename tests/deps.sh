#!/bin/sh
# Install every Debian package mailgw needs to build, test and run its demo.
# Idempotent and quiet when everything is already there.
set -eu

PKGS="gcc make pkg-config libc6-dev libssl-dev openssl libinih-dev libmicrohttpd-dev libdpdk-dev
clang llvm libclang-rt-14-dev libbpf-dev libelf-dev zlib1g-dev bpftool
postfix dovecot-core dovecot-imapd dovecot-pop3d
swaks curl python3 procps iproute2 ca-certificates strace
prometheus"

missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
	echo "make deps: missing packages:$missing (run as root to install)" >&2
	exit 1
fi
echo "make deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# Postfix must not configure (or start) a system mailer: it only runs as a
# private instance in tests and the demo.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get -q update >/dev/null || true
# shellcheck disable=SC2086
apt-get -q -y install --no-install-recommends $missing >/dev/null
