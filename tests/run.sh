#!/bin/sh
# Run every mailgw test and print "N passed, N failed" last.
#
# Each test program prints one line per case: "PASS: name", "FAIL: name: why"
# or "SKIP: name: why". A program that exits non-zero without printing a FAIL
# line counts as one failure of its own.
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-/usr/bin/python3}
FUZZ_SECONDS=${FUZZ_SECONDS:-5}
LOG=build/test-logs
mkdir -p "$LOG"
pass=0 fail=0 skip=0

run() { # name, command...
	name=$1
	shift
	out="$LOG/$(echo "$name" | tr '/ ' '__').log"
	echo "== $name"
	"$@" >"$out" 2>&1
	rc=$?
	grep -E '^(PASS|FAIL|SKIP):' "$out" | sed 's/^/   /'
	p=$(grep -c '^PASS:' "$out")
	f=$(grep -c '^FAIL:' "$out")
	s=$(grep -c '^SKIP:' "$out")
	if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
		echo "   FAIL: $name exited with status $rc (log: $out)"
		tail -n 20 "$out" | sed 's/^/   | /'
		f=1
	fi
	pass=$((pass + p))
	fail=$((fail + f))
	skip=$((skip + s))
}

# vm_run NAME SCRIPT: a test script inside the kernel-TLS guest (tests/vm/run);
# exit 77 (no qemu or kernel image) becomes the SKIP line the runner printed.
vm_run() {
	run "$1" sh -c 'tests/vm/run "$0" "$1"; rc=$?; [ "$rc" = 77 ] && rc=0; exit "$rc"' \
		"$PYTHON" "$2"
}

# The eBPF tests pin maps under /sys/fs/bpf; mount bpffs where the host has not.
if [ "$(id -u)" = 0 ] && ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
	mount -t bpf bpf /sys/fs/bpf 2>/dev/null || echo "note: cannot mount bpffs at /sys/fs/bpf"
fi

if [ "${VM_ONLY:-0}" = 1 ]; then
	vm_run vm/ktls_probe tests/vm/ktls_probe.py
	[ -f tests/vm/test_ktls.py ] && vm_run vm/test_ktls tests/vm/test_ktls.py
	vm_run vm/test_bpf tests/bpf/test_bpf.py
	echo
	echo "$skip skipped"
	echo "$pass passed, $fail failed"
	[ "$fail" -eq 0 ]
	exit
fi

# Unit tests, plain and sanitized.
for t in build/tests/test_*; do
	[ -x "$t" ] || continue
	run "unit/$(basename "$t")" "$t"
done

# Fuzzers: a few seconds each on a copy of the committed seed corpus.
for f in build/fuzz/fuzz_*; do
	[ -x "$f" ] || continue
	proto=${f##*/fuzz_}
	corpus=$(mktemp -d)
	cp tests/fuzz/corpus/"$proto"/* tests/fuzz/crashes/"$proto"-* "$corpus"/ 2>/dev/null
	run "fuzz/$proto" sh -c "'$f' -max_total_time=$FUZZ_SECONDS -print_final_stats=0 '$corpus' \
		&& echo 'PASS: fuzz_$proto ran ${FUZZ_SECONDS}s without a crash'"
	rm -rf "$corpus"
done

# Integration tests against the release build, then the sanitizer build.
for build in release asan; do
	bin=build/mailgw
	[ "$build" = asan ] && bin=build/asan/mailgw
	for t in tests/integration/test_*.py; do
		[ -f "$t" ] || continue
		run "$build/$(basename "$t" .py)" env MAILGW="$bin" "$PYTHON" "$t"
	done
done

# eBPF classifier: network namespaces + veth on the host, and loaded and
# attached inside Debian's 6.1 kernel (the guest), as appliances run older
# kernels than this host.
run host/test_bpf "$PYTHON" tests/bpf/test_bpf.py
vm_run vm/test_bpf tests/bpf/test_bpf.py

# Kernel TLS lane (the host kernel has none): the same tests inside a guest,
# and on the host, where they must report SKIP.
vm_run vm/ktls_probe tests/vm/ktls_probe.py
run host/ktls_probe "$PYTHON" tests/vm/ktls_probe.py
for t in tests/vm/test_*.py; do
	[ -f "$t" ] || continue
	vm_run "vm/$(basename "$t" .py)" "$t"
	run "host/$(basename "$t" .py)" "$PYTHON" "$t"
done

echo
echo "$skip skipped"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
