# bpf/bpf.mk - the eBPF traffic classifier, included by the top Makefile
# (which defines CC, CLANG, BUILD and WARN).
#
#   make bpf    build/bpf/vmlinux.h, mailgw.bpf.o, mailgw.skel.h, bpfctl
#
# Chain: vmlinux.h (from the running kernel's BTF) -> mailgw.bpf.o (clang,
# CO-RE) -> mailgw.skel.h (bpftool gen skeleton, embeds the object) ->
# bpfmap.c (loader, pins, tc attach, counter reader) -> bpfctl.
#
# The daemon links the loader with:
#   $(CC) ... $(BPF_CFLAGS) ... $(BPF_LIB_SRC) ... $(BPF_LDLIBS)
# and depends on $(BPF_SKEL) (bpfmap.c includes the generated skeleton).

BPFTOOL     ?= bpftool
BPF_VMLINUX ?= /sys/kernel/btf/vmlinux
BPF_OUT     := $(BUILD)/bpf

BPF_LIB_SRC := bpf/bpfmap.c
BPF_HDR     := bpf/bpfmap.h bpf/mailgw_bpf.h
BPF_SKEL    := $(BPF_OUT)/mailgw.skel.h
BPF_CFLAGS  := -Ibpf -I$(BPF_OUT)
BPF_LDLIBS  := -lbpf -lelf -lz

# -mcpu=v3: atomic fetch-or for the once-per-flow bits (kernel >= 5.12).
BPF_PROG_CFLAGS := -O2 -g -target bpf -mcpu=v3 -Wall -Wextra -Werror -I$(BPF_OUT) -Ibpf

.PHONY: bpf

bpf: $(BPF_OUT)/bpfctl

$(BPF_OUT)/vmlinux.h:
	@mkdir -p $(@D)
	@test -r $(BPF_VMLINUX) || { echo "bpf: no kernel BTF at $(BPF_VMLINUX) (CONFIG_DEBUG_INFO_BTF)" >&2; exit 1; }
	@command -v $(BPFTOOL) >/dev/null || { echo "bpf: bpftool not found (apt-get install bpftool)" >&2; exit 1; }
	$(BPFTOOL) btf dump file $(BPF_VMLINUX) format c > $@.tmp
	@mv $@.tmp $@

$(BPF_OUT)/mailgw.bpf.o: bpf/mailgw.bpf.c bpf/mailgw_bpf.h $(BPF_OUT)/vmlinux.h bpf/bpf.mk
	$(CLANG) $(BPF_PROG_CFLAGS) -c $< -o $@

$(BPF_SKEL): $(BPF_OUT)/mailgw.bpf.o
	$(BPFTOOL) gen skeleton $< name mailgw_bpf > $@.tmp
	@mv $@.tmp $@

$(BPF_OUT)/bpfctl: bpf/bpfctl.c $(BPF_LIB_SRC) $(BPF_HDR) $(BPF_SKEL)
	$(CC) -std=gnu11 -O2 -g $(WARN) $(BPF_CFLAGS) -o $@ bpf/bpfctl.c $(BPF_LIB_SRC) $(BPF_LDLIBS)
