# mailgw - kernel-TLS offloading mail gateway.
#
#   make          build build/mailgw
#   make deps     install the Debian packages for build, tests and demo
#   make run      deps + build + the demo (configs/demo.conf)
#   make test     deps + build + every test; ends with "N passed, N failed"
#   make asan     sanitizer build (ASan+UBSan) in build/asan/mailgw
#   make fuzz     libFuzzer targets in build/fuzz/
#   make vm-test  the kernel-TLS tests inside Debian's kernel under qemu (tests/vm)
#   make bench    mailgw against nginx, stunnel, HAProxy (never part of make test)
#   make check-config CONFIG=FILE

CC       ?= gcc
CLANG    ?= clang
PYTHON   ?= /usr/bin/python3
BUILD    := build

WARN     := -Wall -Wextra -Werror -Wshadow -Wformat=2 -Wno-format-nonliteral
HARDEN   := -D_FORTIFY_SOURCE=2 -fstack-protector-strong -fPIE
CFLAGS   ?= -O2 -g
CFLAGS   += -std=gnu11 $(WARN) -Igateway -Ioffload
LDLIBS   := -lssl -lcrypto -linih -lmicrohttpd
SANFLAGS := -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer

# DPDK (Debian's 22.11, libdpdk-dev): the cryptodev engine. Its headers are
# system headers here (-isystem) so -Werror judges only our code. Without
# libdpdk the engine is built as a stub that declines every session.
DPDK_CFLAGS := $(shell pkg-config --cflags libdpdk 2>/dev/null | sed 's/-I/-isystem /g')
DPDK_LIBS   := $(shell pkg-config --libs libdpdk 2>/dev/null)
ifneq ($(DPDK_LIBS),)
DPDK_CFLAGS += -DMAILGW_HAVE_DPDK
endif

GATEWAY_SRC := gateway/main.c gateway/config.c gateway/log.c gateway/worker.c gateway/classify.c \
	       gateway/session.c gateway/tls.c gateway/stats.c gateway/buf.c gateway/metrics.c \
	       gateway/proto.c gateway/smtp.c gateway/imap.c gateway/pop3.c gateway/proxy.c
OFFLOAD_SRC := offload/offload.c offload/userspace.c offload/ktls.c offload/keys.c \
	       offload/nic.c offload/dpdk.c
SRC := $(GATEWAY_SRC) $(OFFLOAD_SRC)
HDR := $(wildcard gateway/*.h offload/*.h)

# Pure modules: what unit tests and fuzzers link against.
PURE_SRC := gateway/buf.c gateway/proto.c gateway/smtp.c gateway/imap.c \
	    gateway/pop3.c gateway/stats.c gateway/proxy.c

# Record engines are tested against OpenSSL with the whole engine layer linked.
ENGINE_TESTS := $(BUILD)/tests/test_dpdk $(BUILD)/tests/test_userspace
UNIT_TESTS := $(filter-out $(ENGINE_TESTS),\
	      $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(wildcard tests/unit/test_*.c)))
FUZZERS    := $(patsubst tests/fuzz/%.c,$(BUILD)/fuzz/%,$(wildcard tests/fuzz/fuzz_*.c))

.PHONY: all deps asan fuzz unit test run clean check-config vm-test bench

all: $(BUILD)/mailgw $(BUILD)/bpf/bpfctl

# The eBPF classifier (programs, skeleton, loader, bpfctl).
include bpf/bpf.mk

$(BUILD)/mailgw: $(SRC) $(HDR) Makefile $(BPF_LIB_SRC) $(BPF_HDR) $(BPF_SKEL)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(BPF_CFLAGS) $(DPDK_CFLAGS) $(HARDEN) -o $@ $(SRC) $(BPF_LIB_SRC) -pie \
		-Wl,-z,relro,-z,now $(LDLIBS) $(BPF_LDLIBS) $(DPDK_LIBS)

asan: $(BUILD)/asan/mailgw

$(BUILD)/asan/mailgw: $(SRC) $(HDR) Makefile $(BPF_LIB_SRC) $(BPF_HDR) $(BPF_SKEL)
	@mkdir -p $(@D)
	$(CC) -std=gnu11 $(WARN) -Igateway -Ioffload $(BPF_CFLAGS) $(DPDK_CFLAGS) $(SANFLAGS) -o $@ \
		$(SRC) $(BPF_LIB_SRC) $(LDLIBS) $(BPF_LDLIBS) $(DPDK_LIBS)

unit: $(UNIT_TESTS) $(UNIT_TESTS:%=%-asan) $(ENGINE_TESTS) $(ENGINE_TESTS:%=%-asan)

# Engine tests link the whole engine layer, libssl and libdpdk.
$(ENGINE_TESTS): $(BUILD)/tests/%: tests/unit/%.c $(OFFLOAD_SRC) $(HDR) $(wildcard tests/unit/*.h)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(DPDK_CFLAGS) -o $@ $< $(OFFLOAD_SRC) -lssl -lcrypto $(DPDK_LIBS)

$(ENGINE_TESTS:%=%-asan): $(BUILD)/tests/%-asan: tests/unit/%.c $(OFFLOAD_SRC) $(HDR) $(wildcard tests/unit/*.h)
	@mkdir -p $(@D)
	$(CC) -std=gnu11 $(WARN) -Igateway -Ioffload $(DPDK_CFLAGS) $(SANFLAGS) -o $@ $< \
		$(OFFLOAD_SRC) -lssl -lcrypto $(DPDK_LIBS)

# Unit tests also get the key schedule (offload/keys.c, libcrypto).
UNIT_SRC := $(PURE_SRC) offload/keys.c

$(BUILD)/tests/%: tests/unit/%.c $(UNIT_SRC) $(HDR) $(wildcard tests/unit/*.h)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -o $@ $< $(UNIT_SRC) -lcrypto

$(BUILD)/tests/%-asan: tests/unit/%.c $(UNIT_SRC) $(HDR) $(wildcard tests/unit/*.h)
	@mkdir -p $(@D)
	$(CC) -std=gnu11 $(WARN) -Igateway -Ioffload $(SANFLAGS) -o $@ $< $(UNIT_SRC) -lcrypto

fuzz: $(FUZZERS)

$(BUILD)/fuzz/%: tests/fuzz/%.c $(PURE_SRC) $(HDR) $(wildcard tests/fuzz/*.h)
	@mkdir -p $(@D)
	$(CLANG) -std=gnu11 -Wall -Wextra -Werror -g -O1 -Igateway \
		-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -o $@ $< $(PURE_SRC)

deps:
	@sh tests/deps.sh
	@sh tests/vm/deps.sh

# Kernel TLS lane: the host kernel has no kTLS, so these run in a guest.
vm-test: deps all
	@VM_ONLY=1 sh tests/run.sh

test: deps
	@$(MAKE) --no-print-directory all asan unit fuzz
	@sh tests/run.sh

run: deps
	@$(MAKE) --no-print-directory all
	@$(PYTHON) tests/lib/mailstack.py demo --config configs/demo.conf --workdir $(BUILD)/demo

# Benchmarks: server on core 0, load on core 1; writes docs/benchmarks.csv and
# docs/benchmarks_chart.png (tests/bench/README.md).
bench: all
	@$(MAKE) --no-print-directory -C tests/bench
	@$(PYTHON) tests/bench/run

check-config: all
	$(BUILD)/mailgw -t -c $(CONFIG)

clean:
	rm -rf $(BUILD)
