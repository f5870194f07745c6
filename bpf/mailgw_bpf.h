/*
 * mailgw_bpf.h - what the tc classifier (mailgw.bpf.c) and its userspace
 * side (bpfmap.c, the metrics exporter) share: map keys and values, and
 * the one list of labels (classes, flow kinds, violation reasons, protocol
 * kinds) with their names.
 *
 * Layout rules: fixed-width __u8/__u16/__u32/__u64 fields only, explicit
 * padding, no holes, so the BPF object and every userspace reader agree
 * byte for byte.  A label's number is its index in the counter arrays and
 * its name is the Prometheus label value; both sides take them from the
 * X-macro lists below, so a label cannot mean two things.
 */
#ifndef MAILGW_BPF_H
#define MAILGW_BPF_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* --- labels ------------------------------------------------------------ */

/* Class of a packet: did it carry what the flow's phase promised? */
#define MGW_CLASSES(X)                         \
	X(MGW_CLASS_TLS, "tls")                \
	X(MGW_CLASS_PLAINTEXT, "plaintext")

/* Kind of a flow, counted once per flow (see mailgw.bpf.c for when). */
#define MGW_KINDS(X)                                     \
	X(MGW_KIND_STARTTLS_UPGRADED, "starttls_upgraded") \
	X(MGW_KIND_PLAINTEXT_ONLY, "plaintext_only")       \
	X(MGW_KIND_IMPLICIT_TLS, "implicit_tls")

/* Why a flow was counted as a violation, once per flow and reason. */
#define MGW_REASONS(X)                                                     \
	X(MGW_REASON_PLAINTEXT_AFTER_STARTTLS_TO_SERVER,                   \
	  "plaintext_after_starttls_to_server")                            \
	X(MGW_REASON_PLAINTEXT_AFTER_UPGRADE_TO_CLIENT,                    \
	  "plaintext_after_upgrade_to_client")                             \
	X(MGW_REASON_PLAINTEXT_ON_IMPLICIT_PORT, "plaintext_on_implicit_port")

/* Direction of a packet within its flow. */
#define MGW_DIRS(X)                        \
	X(MGW_DIR_TO_SERVER, "to_server") \
	X(MGW_DIR_TO_CLIENT, "to_client")

/*
 * Protocol kind of a server port.  0 means "not a mail port".  The first
 * three upgrade with STARTTLS/STLS (RFC 3207, RFC 2595), the last three
 * speak TLS from the first byte (RFC 8314).
 */
#define MGW_PROTOS(X)                   \
	X(MGW_PROTO_NONE, "none")       \
	X(MGW_PROTO_SMTP, "smtp")       \
	X(MGW_PROTO_IMAP, "imap")       \
	X(MGW_PROTO_POP3, "pop3")       \
	X(MGW_PROTO_SMTPS, "smtps")     \
	X(MGW_PROTO_IMAPS, "imaps")     \
	X(MGW_PROTO_POP3S, "pop3s")

#define MGW_ENUM_ITEM(name, str) name,

enum mgw_class { MGW_CLASSES(MGW_ENUM_ITEM) MGW_CLASS_MAX };
enum mgw_kind { MGW_KINDS(MGW_ENUM_ITEM) MGW_KIND_MAX };
enum mgw_reason { MGW_REASONS(MGW_ENUM_ITEM) MGW_REASON_MAX };
enum mgw_dir { MGW_DIRS(MGW_ENUM_ITEM) MGW_DIR_MAX };
enum mgw_proto { MGW_PROTOS(MGW_ENUM_ITEM) MGW_PROTO_MAX };

static inline int mgw_proto_implicit(unsigned int proto)
{
	return proto >= MGW_PROTO_SMTPS && proto < MGW_PROTO_MAX;
}

#if !defined(__bpf__)
#define MGW_NAME_ITEM(name, str) str,
#define MGW_NAME_FN(fn, list, max)                                     \
	static inline const char *fn(unsigned int v)                   \
	{                                                              \
		static const char *const names[] = { list(MGW_NAME_ITEM) }; \
		return v < (max) ? names[v] : "unknown";               \
	}
MGW_NAME_FN(mgw_class_name, MGW_CLASSES, MGW_CLASS_MAX)
MGW_NAME_FN(mgw_kind_name, MGW_KINDS, MGW_KIND_MAX)
MGW_NAME_FN(mgw_reason_name, MGW_REASONS, MGW_REASON_MAX)
MGW_NAME_FN(mgw_dir_name, MGW_DIRS, MGW_DIR_MAX)
MGW_NAME_FN(mgw_proto_name, MGW_PROTOS, MGW_PROTO_MAX)
#undef MGW_NAME_FN
#endif

/* --- sizes --------------------------------------------------------------- */

#define MGW_MAX_PORTS      64      /* rows of mgw_ports and mgw_stats */
#define MGW_DEFAULT_FLOWS  65536   /* mgw_flows and mgw_offload (LRU) */
#define MGW_LINE_MAX       32      /* bytes of a dialogue line kept */
#define MGW_TAG_MAX        24      /* an IMAP tag that fits a kept line */
#define MGW_SCAN_MAX       512     /* plaintext bytes examined per segment */
#define MGW_TLS_REC_MAX    (16384 + 256)   /* RFC 8446 §5.2 TLSCiphertext */

/* Pinned map names, files under the pin path. */
#define MGW_PIN_PORTS   "mgw_ports"
#define MGW_PIN_FLOWS   "mgw_flows"
#define MGW_PIN_OFFLOAD "mgw_offload"
#define MGW_PIN_STATS   "mgw_stats"

/* --- maps ---------------------------------------------------------------- */

/* mgw_ports (hash): key __u32 port in host order, value: */
struct mgw_port_info {
	__u32 proto;    /* enum mgw_proto */
	__u32 slot;     /* row of mgw_stats, < MGW_MAX_PORTS */
};

/*
 * mgw_portbits (array, one element, not pinned): bit p set when port p is
 * in mgw_ports.  A packet with neither port set is let go after one
 * array lookup, without touching the flow table.
 */
struct mgw_portbits {
	__u64 bits[65536 / 64];
};

/*
 * mgw_stats (per-CPU array, one row per port slot).  Readers sum the CPUs.
 * untracked counts flow directions whose record tracking lost its place
 * (a header inside a sequence hole, see mailgw.bpf.c); from then on that
 * direction is neither checked nor counted as a violation.
 */
struct mgw_port_stats {
	__u64 packets[MGW_CLASS_MAX];
	__u64 bytes[MGW_CLASS_MAX];
	__u64 flows[MGW_KIND_MAX];
	__u64 violations[MGW_REASON_MAX];
	__u64 violation_bytes[MGW_REASON_MAX];
	__u64 untracked[MGW_DIR_MAX];
};

/*
 * Flow key (mgw_flows, mgw_offload): the two TCP endpoints in a fixed
 * order, so both directions of a connection find the same entry with one
 * lookup.  Endpoint a is the one with the lower port; on equal ports, the
 * lower address compared as four __u32 words in memory order.  Addresses
 * are in network byte order; IPv4 uses addr[0] and zeroes the rest (an
 * IPv4-mapped IPv6 socket address is keyed as IPv4, as on the wire).
 * Ports are in host order.  Which endpoint is the server lives in the
 * value (the one whose port is in mgw_ports).
 */
struct mgw_flow_key {
	__u32 addr_a[4];
	__u32 addr_b[4];
	__u16 port_a;
	__u16 port_b;
	__u8  family;   /* 4 or 6 */
	__u8  pad[3];
};

/* Nonzero when endpoint (x, xp) sorts first; the order of the key. */
static inline int mgw_endpoint_first(const __u32 *x, __u16 xp,
				     const __u32 *y, __u16 yp)
{
	if (xp != yp)
		return xp < yp;
	if (x[0] != y[0])
		return x[0] < y[0];
	if (x[1] != y[1])
		return x[1] < y[1];
	if (x[2] != y[2])
		return x[2] < y[2];
	return x[3] <= y[3];
}

/* mgw_offload (LRU hash): key struct mgw_flow_key, value: */
struct mgw_offload_val {
	__u32 flags;    /* MGW_OFFLOAD_* */
	__u32 pad;
};
#define MGW_OFFLOAD_TLS_HW 1u

/* What one direction of a flow may carry now. */
enum mgw_mode {
	MGW_MODE_PLAIN = 0,     /* plaintext allowed (dialogue) */
	MGW_MODE_TLS,           /* only TLS records allowed, followed by seq */
	MGW_MODE_LOST,          /* not checked: no sync, mid-stream, offloaded */
	MGW_MODE_VIOLATED,      /* a violation was seen; bytes are counted */
};

#define MGW_DF_SEQ      0x01    /* next_seq is known */
#define MGW_DF_HOLE     0x02    /* out-of-order data past a hole, up to hole_end */
#define MGW_DF_FIRST_HS 0x04    /* the next record must be a handshake record */
#define MGW_DF_TLS_HINT 0x08    /* class of packets when not checked: tls */
#define MGW_DF_HINTED   0x10    /* mid-stream: class guessed from the first payload */

/* Per-direction tracking state, touched by every packet of its direction. */
struct mgw_dir_state {
	__u32 next_seq;         /* just past the highest byte processed */
	__u32 rec_next;         /* where the next TLS record header starts */
	__u32 hole_end;         /* with MGW_DF_HOLE: end of data seen past the hole */
	__u8  mode;             /* enum mgw_mode */
	__u8  flags;            /* MGW_DF_* */
	__u8  hdr_have;         /* bytes of a split record header held in hdr */
	__u8  llen;             /* bytes of the current line held; > MGW_LINE_MAX: too long */
	__u8  hdr[8];
};

/* One direction: its hot state, then its dialogue line (cold), then room
 * that keeps the next direction's hot state in another cache line. */
struct mgw_half {
	struct mgw_dir_state st;        /* 24 */
	__u8  line[MGW_LINE_MAX];       /* 32 */
	__u8  pad[32];
};

/* Phase of a flow's dialogue. */
enum mgw_phase {
	MGW_PH_DIALOGUE = 0,    /* STARTTLS-capable, plaintext, lines examined */
	MGW_PH_STARTTLS,        /* client sent STARTTLS/STLS, reply awaited */
	MGW_PH_UPGRADED,        /* server accepted: TLS both ways */
	MGW_PH_IMPLICIT,        /* implicit-TLS port */
	MGW_PH_PLAIN_DONE,      /* dialogue no longer examined: stays plaintext_only */
	MGW_PH_UNTRACKED,       /* first seen mid-stream: nothing checked */
	MGW_PH_OFFLOADED,       /* marked as NIC TLS offload: nothing checked */
};

/* struct mgw_flow.once: things done once per flow (atomic or). */
#define MGW_ONCE_KIND        0x01                       /* flow kind counted */
#define MGW_ONCE_CLOSED      0x02                       /* FIN or RST seen */
#define MGW_ONCE_ESTABLISHED 0x04                       /* SYN-ACK seen */
#define MGW_ONCE_REASON(r)   (0x100u << (r))            /* violation counted */
#define MGW_ONCE_UNTRACKED(d) (0x10000u << (d))         /* untracked counted */

/*
 * mgw_flows (LRU hash): key struct mgw_flow_key, value struct mgw_flow.
 * Both directions of a flow are often handled on two CPUs at once (tc
 * ingress and egress): the first 16 bytes are read by both and written on
 * events only, and each direction's hot state sits at least 64 bytes away
 * from the others, so the CPUs never write to a shared cache line.
 */
struct mgw_flow {
	__u32 once;             /* MGW_ONCE_* */
	__u16 port;             /* server port, host order */
	__u8  proto;            /* enum mgw_proto */
	__u8  slot;             /* mgw_stats row */
	__u8  server_is_a;      /* the server is endpoint a of the key */
	__u8  phase;            /* enum mgw_phase */
	__u8  cmds;             /* client command lines seen (dialogue) */
	__u8  replies;          /* server final reply lines, greeting included */
	__u8  stls_idx;         /* cmds before the STARTTLS line */
	__u8  tag_len;          /* IMAP: tag of the STARTTLS command */
	__u8  pad0[2];
	__u8  tag[MGW_TAG_MAX]; /* 16..40, dialogue only */
	__u8  pad1[40];
	struct mgw_half dir[MGW_DIR_MAX];       /* hot state at 80 and 168 */
};

_Static_assert(__builtin_offsetof(struct mgw_flow, dir[0].st) >= 16 + 64 &&
	       __builtin_offsetof(struct mgw_flow, dir[1].st) >=
	       __builtin_offsetof(struct mgw_flow, dir[0].st) + sizeof(struct mgw_dir_state) + 64,
	       "the directions' hot state must not share a cache line");

#endif /* MAILGW_BPF_H */
