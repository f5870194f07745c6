/*
 * mailgw.bpf.c - tc classifier for the mail ports.
 *
 * Attached at tc clsact ingress and egress of the gateway's interfaces.  It
 * observes only: every packet gets TC_ACT_UNSPEC (later filters still run,
 * nothing is dropped or changed).  For each TCP flow whose server port is
 * in mgw_ports it keeps a small state (mgw_flows, LRU) and counts, per
 * server port, packets and bytes by class, flows by kind and protocol
 * violations by reason (mgw_stats, per CPU).  Shared layouts and label
 * names: mailgw_bpf.h.
 *
 * What is checked:
 * - STARTTLS-capable ports (smtp, imap, pop3): the plaintext dialogue is
 *   followed line by line (a line may be split over segments: up to
 *   MGW_LINE_MAX bytes of it are kept) until the client's STARTTLS (SMTP
 *   "STARTTLS", IMAP "<tag> STARTTLS", POP3 "STLS"; case-insensitive,
 *   CRLF or bare LF) and the server's reply to it (SMTP 220, IMAP
 *   "<tag> OK" with the same tag, POP3 "+OK").  From the byte after the
 *   client's STARTTLS line the client may send only TLS records
 *   (RFC 3207 §4: no command may follow STARTTLS before the handshake;
 *   RFC 2595 §3.1, RFC 3501 §6.2.1 likewise); from the byte after the
 *   server's positive reply the server may send only TLS records
 *   (RFC 3207 §4.2: no pending plaintext after the 220).
 * - Implicit-TLS ports (smtps, imaps, pop3s, RFC 8314 §3.3): both ways TLS
 *   from the first byte; the client's first record must be a handshake.
 * - In TLS, every record header (RFC 8446 §5.1: type 20-23, version
 *   0x0301-0x0304, length <= 2^14 + 256) is found by following record
 *   boundaries in TCP sequence space per direction.  Bytes at or before the
 *   highest sequence number already processed (retransmissions, window
 *   probes) are skipped, so nothing is counted or parsed twice.  A header
 *   split across segments is held (up to 4 bytes) and finished with the
 *   next in-order bytes; the bytes held are checked as far as they go.
 * - A direction whose next header falls into a sequence hole that is not
 *   filled in order (lost or reordered segments seen past it) stops being
 *   checked: it is counted once as "untracked" and never as a violation.
 *   Flows first seen mid-stream are not checked at all.
 *
 * Costs: one LRU hash lookup and one per-CPU array lookup per packet; the
 * port table (hash) only for packets of flows not yet known.  Plaintext
 * lines are examined byte by byte (bpf_loop, at most MGW_SCAN_MAX bytes per
 * segment) only during the dialogue; in TLS, one 5-byte load per record
 * header, none for segments inside a record body.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "mailgw_bpf.h"

#define MGW_TC_ACT_UNSPEC (-1)
#define MGW_ETH_P_IP      0x0800
#define MGW_ETH_P_IPV6    0x86DD
#define MGW_ETH_HLEN      14
#define MGW_HDR_PULL      (MGW_ETH_HLEN + 60 + 60)
#define MGW_NONE          0xffffffffu
/* Record headers followed in one segment: 5-byte empty records in 640 KiB. */
#define MGW_REC_LOOPS     (1u << 17)

#define MGW_TH_FIN 0x01
#define MGW_TH_SYN 0x02
#define MGW_TH_RST 0x04
#define MGW_TH_ACK 0x10

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MGW_MAX_PORTS);
	__type(key, __u32);
	__type(value, struct mgw_port_info);
} mgw_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MGW_DEFAULT_FLOWS);
	__type(key, struct mgw_flow_key);
	__type(value, struct mgw_flow);
} mgw_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MGW_DEFAULT_FLOWS);
	__type(key, struct mgw_flow_key);
	__type(value, struct mgw_offload_val);
} mgw_offload SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MGW_MAX_PORTS);
	__type(key, __u32);
	__type(value, struct mgw_port_stats);
} mgw_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mgw_portbits);
} mgw_portbits SEC(".maps");

/* Room to copy the plaintext of one segment for line scanning. */
struct mgw_scratch {
	__u8 buf[MGW_SCAN_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mgw_scratch);
} mgw_scratch SEC(".maps");

/* One parsed TCP segment. */
struct mgw_pkt {
	struct mgw_flow_key key;
	__u32 seq;
	__u32 ack;
	__u32 poff;             /* offset of the TCP payload in the skb */
	__u32 plen;             /* payload length */
	__u32 ip_len;           /* IP packet length (all of a GSO/GRO skb) */
	__u32 pad2;
	__u16 sport;
	__u16 dport;
	__u8  tcp_flags;
	__u8  src_is_a;         /* the source is endpoint a of the key */
	__u8  pad[2];
};

static __always_inline int mgw_after(__u32 a, __u32 b)
{
	return (__s32)(a - b) > 0;
}

static __always_inline int mgw_before(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

/* --- parsing --------------------------------------------------------------- */

/* 0: parsed; 1: headers not in the linear area; -1: not IPv4/IPv6 TCP. */
static __always_inline int mgw_parse(struct __sk_buff *skb, struct mgw_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u16 proto = skb->protocol;
	__u32 saddr[4] = {}, daddr[4] = {};
	__u32 l3 = 0, l4, ip_end, doff;
	struct tcphdr *th;

	if (proto != bpf_htons(MGW_ETH_P_IP) && proto != bpf_htons(MGW_ETH_P_IPV6))
		return -1;
	/* Ethernet-like devices (lo, veth, NICs) carry the link header at tc;
	 * devices without one (tun, wireguard) start at the IP header. */
	if (data + MGW_ETH_HLEN <= data_end &&
	    ((struct ethhdr *)data)->h_proto == proto)
		l3 = MGW_ETH_HLEN;

	if (proto == bpf_htons(MGW_ETH_P_IP)) {
		struct iphdr *ip = data + l3;
		__u32 ihl;

		if ((void *)(ip + 1) > data_end)
			return 1;
		if (ip->version != 4 || ip->protocol != IPPROTO_TCP)
			return -1;
		/* Fragments: the payload is not all here; not followed. */
		if (ip->frag_off & bpf_htons(0x3fff))
			return -1;
		ihl = ip->ihl * 4;
		if (ihl < sizeof(*ip))
			return -1;
		/* tot_len 0: an IPv4 BIG TCP packet, the skb length counts. */
		ip_end = ip->tot_len ? l3 + bpf_ntohs(ip->tot_len) : skb->len;
		saddr[0] = ip->saddr;
		daddr[0] = ip->daddr;
		p->key.family = 4;
		l4 = l3 + ihl;
	} else {
		struct ipv6hdr *ip6 = data + l3;

		if ((void *)(ip6 + 1) > data_end)
			return 1;
		/* Extension headers are not followed. */
		if (ip6->version != 6 || ip6->nexthdr != IPPROTO_TCP)
			return -1;
		ip_end = ip6->payload_len ? l3 + sizeof(*ip6) + bpf_ntohs(ip6->payload_len)
					  : skb->len;
		__builtin_memcpy(saddr, &ip6->saddr, 16);
		__builtin_memcpy(daddr, &ip6->daddr, 16);
		p->key.family = 6;
		l4 = l3 + sizeof(*ip6);
	}

	th = data + l4;
	if ((void *)(th + 1) > data_end)
		return 1;
	doff = th->doff * 4;
	if (doff < sizeof(*th))
		return -1;
	p->sport = bpf_ntohs(th->source);
	p->dport = bpf_ntohs(th->dest);
	p->seq = bpf_ntohl(th->seq);
	p->ack = bpf_ntohl(th->ack_seq);
	p->tcp_flags = ((__u8 *)th)[13];
	p->poff = l4 + doff;
	/* Ethernet padding of short frames is not payload. */
	if (ip_end > skb->len)
		ip_end = skb->len;
	p->plen = ip_end > p->poff ? ip_end - p->poff : 0;
	p->ip_len = ip_end - l3;

	p->src_is_a = mgw_endpoint_first(saddr, p->sport, daddr, p->dport);
	if (p->src_is_a) {
		__builtin_memcpy(p->key.addr_a, saddr, 16);
		__builtin_memcpy(p->key.addr_b, daddr, 16);
		p->key.port_a = p->sport;
		p->key.port_b = p->dport;
	} else {
		__builtin_memcpy(p->key.addr_a, daddr, 16);
		__builtin_memcpy(p->key.addr_b, saddr, 16);
		p->key.port_a = p->dport;
		p->key.port_b = p->sport;
	}
	return 0;
}

/* --- flow state ----------------------------------------------------------- */

static __always_inline int mgw_port_bit(const struct mgw_portbits *pb, __u16 port)
{
	return (pb->bits[(port >> 6) & (65536 / 64 - 1)] >> (port & 63)) & 1;
}

static __always_inline struct mgw_port_info *mgw_port(__u16 port)
{
	__u32 k = port;

	return bpf_map_lookup_elem(&mgw_ports, &k);
}

static __always_inline void mgw_dir_start(struct mgw_dir_state *d, __u32 next_seq)
{
	d->next_seq = next_seq;
	d->rec_next = next_seq;
	d->flags |= MGW_DF_SEQ;
}

static __always_inline void mgw_flow_init(struct mgw_flow *f, const struct mgw_port_info *pi,
					  __u16 port, __u8 server_is_a)
{
	__builtin_memset(f, 0, sizeof(*f));
	f->proto = pi->proto;
	f->slot = pi->slot;
	f->port = port;
	f->server_is_a = server_is_a;
	if (mgw_proto_implicit(pi->proto)) {
		f->phase = MGW_PH_IMPLICIT;
		f->dir[MGW_DIR_TO_SERVER].st.mode = MGW_MODE_TLS;
		f->dir[MGW_DIR_TO_SERVER].st.flags = MGW_DF_FIRST_HS | MGW_DF_TLS_HINT;
		f->dir[MGW_DIR_TO_CLIENT].st.mode = MGW_MODE_TLS;
		f->dir[MGW_DIR_TO_CLIENT].st.flags = MGW_DF_TLS_HINT;
	} else {
		f->phase = MGW_PH_DIALOGUE;
	}
}

static __always_inline struct mgw_flow *mgw_flow_store(struct mgw_pkt *p, struct mgw_flow *f,
						       __u64 how)
{
	if (bpf_map_update_elem(&mgw_flows, &p->key, f, how) && how != BPF_NOEXIST)
		return NULL;
	return bpf_map_lookup_elem(&mgw_flows, &p->key);
}

static __always_inline void mgw_count_kind(struct mgw_flow *f, struct mgw_port_stats *st,
					   __u32 kind)
{
	if (__sync_fetch_and_or(&f->once, MGW_ONCE_KIND) & MGW_ONCE_KIND)
		return;
	if (st && kind < MGW_KIND_MAX)
		st->flows[kind]++;
}

/*
 * The server answered the SYN: the connection exists, both initial
 * sequence numbers are known.  An implicit-TLS flow is counted here, so a
 * refused connection is not a flow.
 */
static __always_inline void mgw_established(struct mgw_flow *f, __u32 seq)
{
	struct mgw_dir_state *s = &f->dir[MGW_DIR_TO_CLIENT].st;

	if (!(s->flags & MGW_DF_SEQ))
		mgw_dir_start(s, seq + 1);
	__sync_fetch_and_or(&f->once, MGW_ONCE_ESTABLISHED);
}

/* SYN or SYN-ACK: start (or restart, for a reused 4-tuple) a tracked flow. */
static __always_inline struct mgw_flow *mgw_on_syn(struct mgw_pkt *p, struct mgw_flow *f)
{
	struct mgw_port_info *pi;
	struct mgw_flow nf;

	if (!(p->tcp_flags & MGW_TH_ACK)) {
		/* From the client; a retransmitted SYN changes nothing. */
		if (f && f->server_is_a != p->src_is_a &&
		    (f->dir[MGW_DIR_TO_SERVER].st.flags & MGW_DF_SEQ) &&
		    f->dir[MGW_DIR_TO_SERVER].st.next_seq == p->seq + 1)
			return f;
		pi = mgw_port(p->dport);
		if (!pi)
			return f;
		mgw_flow_init(&nf, pi, p->dport, !p->src_is_a);
		mgw_dir_start(&nf.dir[MGW_DIR_TO_SERVER].st, p->seq + 1);
		/* A mark left by an earlier connection on this 4-tuple. */
		bpf_map_delete_elem(&mgw_offload, &p->key);
		return mgw_flow_store(p, &nf, BPF_ANY);
	}

	/* SYN-ACK, from the server. */
	if (f) {
		if (f->server_is_a == p->src_is_a)
			mgw_established(f, p->seq);
		return f;
	}
	/* The SYN was missed (attached in between): the ACK number gives the
	 * client's next sequence number all the same. */
	pi = mgw_port(p->sport);
	if (!pi)
		return NULL;
	mgw_flow_init(&nf, pi, p->sport, p->src_is_a);
	mgw_dir_start(&nf.dir[MGW_DIR_TO_SERVER].st, p->ack);
	f = mgw_flow_store(p, &nf, BPF_NOEXIST);
	if (f)
		mgw_established(f, p->seq);
	return f;
}

/* A packet of an unknown flow that is not a SYN: seen mid-stream. */
static __always_inline struct mgw_flow *mgw_on_midstream(struct mgw_pkt *p)
{
	struct mgw_port_info *pi;
	struct mgw_flow nf;
	__u16 port = p->dport;
	__u8 server_is_a = !p->src_is_a;

	if (p->tcp_flags & MGW_TH_RST)
		return NULL;
	pi = mgw_port(port);
	if (!pi) {
		port = p->sport;
		server_is_a = p->src_is_a;
		pi = mgw_port(port);
		if (!pi)
			return NULL;
	}
	mgw_flow_init(&nf, pi, port, server_is_a);
	nf.phase = MGW_PH_UNTRACKED;
	nf.dir[0].st.mode = MGW_MODE_LOST;
	nf.dir[0].st.flags = 0;
	nf.dir[1].st.mode = MGW_MODE_LOST;
	nf.dir[1].st.flags = 0;
	return mgw_flow_store(p, &nf, BPF_NOEXIST);
}

static __always_inline __u32 mgw_dir_class(const struct mgw_dir_state *d)
{
	switch (d->mode) {
	case MGW_MODE_TLS:
		return MGW_CLASS_TLS;
	case MGW_MODE_LOST:
		return (d->flags & MGW_DF_TLS_HINT) ? MGW_CLASS_TLS : MGW_CLASS_PLAINTEXT;
	default:
		return MGW_CLASS_PLAINTEXT;
	}
}

static __always_inline __u32 mgw_reason(const struct mgw_flow *f, __u32 dir)
{
	if (mgw_proto_implicit(f->proto))
		return MGW_REASON_PLAINTEXT_ON_IMPLICIT_PORT;
	return dir == MGW_DIR_TO_SERVER ? MGW_REASON_PLAINTEXT_AFTER_STARTTLS_TO_SERVER
					: MGW_REASON_PLAINTEXT_AFTER_UPGRADE_TO_CLIENT;
}

/*
 * Stop following the dialogue: the flow stays plaintext_only.  If the
 * client's STARTTLS is still unanswered, its direction is not checked any
 * more either: the server's refusal (after which plaintext is legitimate)
 * could be among the bytes not examined.
 */
static __always_inline void mgw_give_up(struct mgw_flow *f)
{
	struct mgw_dir_state *c = &f->dir[MGW_DIR_TO_SERVER].st;

	if (f->phase == MGW_PH_STARTTLS && c->mode == MGW_MODE_TLS)
		c->mode = MGW_MODE_LOST;
	if (f->phase == MGW_PH_DIALOGUE || f->phase == MGW_PH_STARTTLS)
		f->phase = MGW_PH_PLAIN_DONE;
}

/* Record tracking lost its place in direction dir: no more checks there. */
static __always_inline void mgw_lose(struct mgw_flow *f, __u32 dir, struct mgw_port_stats *st)
{
	__u32 bit = MGW_ONCE_UNTRACKED(dir & 1);

	f->dir[dir & 1].st.mode = MGW_MODE_LOST;
	mgw_give_up(f);
	if (!(__sync_fetch_and_or(&f->once, bit) & bit) && st)
		st->untracked[dir & 1]++;
}

static __always_inline void mgw_offloaded(struct mgw_flow *f)
{
	f->phase = MGW_PH_OFFLOADED;
	f->dir[0].st.mode = MGW_MODE_LOST;
	f->dir[0].st.flags |= MGW_DF_TLS_HINT;
	f->dir[1].st.mode = MGW_MODE_LOST;
	f->dir[1].st.flags |= MGW_DF_TLS_HINT;
}

/*
 * Bytes that are not TLS records where only records may be.  A flow the
 * gateway handed to NIC TLS offload is exempt: with TLS_HW the stack
 * sends and receives plaintext records, the NIC does the crypto.
 */
static __always_inline void mgw_violation(struct mgw_pkt *p, struct mgw_flow *f, __u32 dir,
					  struct mgw_port_stats *st, __u32 bytes)
{
	__u32 r, bit;

	if (bpf_map_lookup_elem(&mgw_offload, &p->key)) {
		mgw_offloaded(f);
		return;
	}
	r = mgw_reason(f, dir);
	bit = MGW_ONCE_REASON(r);
	f->dir[dir & 1].st.mode = MGW_MODE_VIOLATED;
	if (!st || r >= MGW_REASON_MAX)
		return;
	if (!(__sync_fetch_and_or(&f->once, bit) & bit))
		st->violations[r]++;
	st->violation_bytes[r] += bytes;
}

/* --- dialogue lines ------------------------------------------------------- */

enum mgw_event {
	MGW_EV_NONE = 0,
	MGW_EV_TLS,     /* TLS starts right after this line */
};

/* s[0..n) equals the lowercase word w, letters compared without case. */
static __always_inline int mgw_word(const __u8 *s, const char *w, __u32 n)
{
#pragma unroll
	for (__u32 i = 0; i < n; i++) {
		__u8 c = s[i];

		if (w[i] >= 'a' && w[i] <= 'z')
			c |= 0x20;
		if (c != (__u8)w[i])
			return 0;
	}
	return 1;
}

static __always_inline int mgw_digit(__u8 c)
{
	return c >= '0' && c <= '9';
}

/* Bytes of the line held, without its CR; > MGW_LINE_MAX: longer. */
static __always_inline __u32 mgw_line_len(const struct mgw_half *h)
{
	__u32 len = h->st.llen;

	if (len > MGW_LINE_MAX)
		return MGW_LINE_MAX + 1;
	if (len && h->line[(len - 1) & (MGW_LINE_MAX - 1)] == '\r')
		len--;
	return len;
}

/*
 * A complete client line in the dialogue.  Each line is one command
 * (SMTP AUTH continuation lines too: each gets one reply); the index of the
 * STARTTLS line tells which server reply answers it.
 */
static __always_inline int mgw_client_line(struct mgw_flow *f, struct mgw_half *h)
{
	__u32 len = mgw_line_len(h), idx = f->cmds;
	const __u8 *l = h->line;

	if (f->cmds < 255)
		f->cmds++;
	if (len <= MGW_LINE_MAX) {
		switch (f->proto) {
		case MGW_PROTO_SMTP:
			if (len == 8 && mgw_word(l, "starttls", 8))
				goto starttls;
			/* A mail transaction's body is not made of commands:
			 * stop before it (RFC 5321 §4.1.1.4, RFC 3030). */
			if ((len == 4 && mgw_word(l, "data", 4)) ||
			    (len > 5 && mgw_word(l, "bdat ", 5))) {
				mgw_give_up(f);
				return MGW_EV_NONE;
			}
			break;
		case MGW_PROTO_POP3:
			if (len == 4 && mgw_word(l, "stls", 4))
				goto starttls;
			break;
		case MGW_PROTO_IMAP: {
			__u32 sp;

			/* A literal follows: its bytes are not lines (RFC 3501 §4.3). */
			if (len && l[(len - 1) & (MGW_LINE_MAX - 1)] == '}') {
				mgw_give_up(f);
				return MGW_EV_NONE;
			}
			if (len < 10)
				break;
			sp = len - 9;   /* "<tag> STARTTLS": tag is l[0..sp) */
			if (sp >= MGW_TAG_MAX || l[sp] != ' ' ||
			    !mgw_word(l + sp + 1, "starttls", 8))
				break;
			for (__u32 i = 0; i < MGW_TAG_MAX; i++) {
				if (i >= sp)
					break;
				if (l[i] == ' ')
					return MGW_EV_NONE;
				f->tag[i] = l[i];
			}
			f->tag_len = sp;
			goto starttls;
		}
		}
	}
	/* Clients say STARTTLS early (after EHLO/CAPABILITY/CAPA): a long
	 * plaintext dialogue is not followed further. */
	if (f->cmds >= 32)
		mgw_give_up(f);
	return MGW_EV_NONE;

starttls:
	f->stls_idx = idx;
	f->phase = MGW_PH_STARTTLS;
	return MGW_EV_TLS;
}

/* The server refused STARTTLS: the client may go on in plaintext. */
static __always_inline void mgw_refused(struct mgw_flow *f)
{
	struct mgw_dir_state *c = &f->dir[MGW_DIR_TO_SERVER].st;

	f->phase = MGW_PH_DIALOGUE;
	if (c->mode == MGW_MODE_TLS) {
		c->mode = MGW_MODE_PLAIN;
		c->flags &= ~(MGW_DF_FIRST_HS | MGW_DF_TLS_HINT);
		c->hdr_have = 0;
		c->llen = 0;
	}
}

static __always_inline int mgw_server_line(struct mgw_flow *f, struct mgw_half *h)
{
	__u32 len = mgw_line_len(h), tl;
	const __u8 *l = h->line;
	int greeting = f->replies == 0;

	switch (f->proto) {
	case MGW_PROTO_SMTP:
		/* Final line of a reply: "ddd" then space or end (RFC 5321 §4.2). */
		if (len < 3 || !mgw_digit(l[0]) || !mgw_digit(l[1]) || !mgw_digit(l[2]))
			return MGW_EV_NONE;
		if (len != 3 && l[3] != ' ')
			return MGW_EV_NONE;
		if (f->replies < 255)
			f->replies++;
		/* Reply 1 is the greeting, reply n+2 answers command n. */
		if (f->phase != MGW_PH_STARTTLS || f->replies != (__u32)f->stls_idx + 2)
			return MGW_EV_NONE;
		if (l[0] == '2' && l[1] == '2' && l[2] == '0')
			return MGW_EV_TLS;
		mgw_refused(f);
		return MGW_EV_NONE;
	case MGW_PROTO_POP3:
		if (greeting) {
			f->replies = 1;
			return MGW_EV_NONE;
		}
		if (f->phase != MGW_PH_STARTTLS)
			return MGW_EV_NONE;
		if (len >= 3 && mgw_word(l, "+ok", 3))
			return MGW_EV_TLS;
		if (len >= 4 && mgw_word(l, "-err", 4))
			mgw_refused(f);
		return MGW_EV_NONE;
	case MGW_PROTO_IMAP:
		if (greeting) {
			f->replies = 1;
			return MGW_EV_NONE;
		}
		if (f->phase != MGW_PH_STARTTLS)
			return MGW_EV_NONE;
		/* Untagged and continuation lines are not the reply. */
		tl = f->tag_len;
		if (tl == 0 || tl >= MGW_TAG_MAX || len < tl + 3 || l[tl] != ' ')
			return MGW_EV_NONE;
		for (__u32 i = 0; i < MGW_TAG_MAX; i++) {
			if (i >= tl)
				break;
			if (l[i] != f->tag[i])
				return MGW_EV_NONE;
		}
		l += tl + 1;
		if (mgw_word(l, "ok", 2) && (len == tl + 3 || l[2] == ' '))
			return MGW_EV_TLS;
		if (mgw_word(l, "no", 2) || (len >= tl + 4 && mgw_word(l, "bad", 3)))
			mgw_refused(f);
		return MGW_EV_NONE;
	}
	return MGW_EV_NONE;
}

struct mgw_scan {
	struct mgw_flow *f;
	struct mgw_half *h;
	__u8 *buf;
	__u32 dir;
	__u32 hit;      /* index of the '\n' after which TLS starts */
};

static long mgw_scan_byte(__u32 i, void *arg)
{
	struct mgw_scan *s = arg;
	struct mgw_half *h = s->h;
	__u8 c, n;

	if (i >= MGW_SCAN_MAX)
		return 1;
	c = s->buf[i];
	if (c != '\n') {
		n = h->st.llen;
		if (n < MGW_LINE_MAX)
			h->line[n] = c;
		if (n <= MGW_LINE_MAX)
			h->st.llen = n + 1;
		return 0;
	}
	if ((s->dir == MGW_DIR_TO_SERVER ? mgw_client_line(s->f, h)
					 : mgw_server_line(s->f, h)) == MGW_EV_TLS) {
		h->st.llen = 0;
		s->hit = i;
		return 1;
	}
	h->st.llen = 0;
	/* Give up or refusal may have ended the need to look further. */
	if (s->f->phase != MGW_PH_DIALOGUE && s->f->phase != MGW_PH_STARTTLS)
		return 1;
	return 0;
}

static __always_inline int mgw_wants_lines(const struct mgw_flow *f, __u32 dir)
{
	if (f->phase != MGW_PH_DIALOGUE && f->phase != MGW_PH_STARTTLS)
		return 0;
	if (dir == MGW_DIR_TO_SERVER)
		return f->phase == MGW_PH_DIALOGUE;
	/* SMTP counts every reply to pair the STARTTLS command with its own;
	 * IMAP (tags) and POP3 need the greeting and then only the reply. */
	return f->proto == MGW_PROTO_SMTP || f->phase == MGW_PH_STARTTLS || f->replies == 0;
}

/*
 * Lines not examined (IMAP and POP3 server lines between the greeting and
 * the STARTTLS reply): keep only whether the next segment starts a line.
 */
static __always_inline void mgw_line_sync(struct __sk_buff *skb, struct mgw_pkt *p,
					  struct mgw_dir_state *d)
{
	__u8 last;

	if (bpf_skb_load_bytes(skb, p->poff + p->plen - 1, &last, 1) || last != '\n')
		d->llen = MGW_LINE_MAX + 1;
	else
		d->llen = 0;
}

/*
 * Examine the plaintext of payload[off..plen).  Returns the payload offset
 * where TLS starts, or MGW_NONE.
 */
static __always_inline __u32 mgw_lines(struct __sk_buff *skb, struct mgw_pkt *p,
				       struct mgw_flow *f, __u32 dir, __u32 off)
{
	struct mgw_scan s = { .f = f, .h = &f->dir[dir & 1], .dir = dir, .hit = MGW_NONE };
	struct mgw_scratch *scr;
	__u32 zero = 0, n = p->plen - off;
	__u8 last;

	scr = bpf_map_lookup_elem(&mgw_scratch, &zero);
	if (!scr)
		return MGW_NONE;
	if (n > MGW_SCAN_MAX)
		n = MGW_SCAN_MAX;
	barrier_var(n);
	if ((__s32)n < 1 || n > MGW_SCAN_MAX)
		return MGW_NONE;
	if (bpf_skb_load_bytes(skb, p->poff + off, scr->buf, n)) {
		mgw_give_up(f);
		return MGW_NONE;
	}
	s.buf = scr->buf;
	bpf_loop(n, mgw_scan_byte, &s, 0);
	if (s.hit != MGW_NONE)
		return off + s.hit + 1;
	if (p->plen - off > MGW_SCAN_MAX &&
	    (f->phase == MGW_PH_DIALOGUE || f->phase == MGW_PH_STARTTLS)) {
		/* More plaintext in one segment than is examined: the lines
		 * past the window are unknown, so is the reply count. */
		if (bpf_skb_load_bytes(skb, p->poff + p->plen - 1, &last, 1) || last != '\n')
			s.h->st.llen = MGW_LINE_MAX + 1;
		mgw_give_up(f);
	}
	return MGW_NONE;
}

/* --- TLS records ---------------------------------------------------------- */

struct mgw_rec {
	struct __sk_buff *skb;
	struct mgw_dir_state *d;
	__u32 seq;      /* sequence number of payload byte 0 */
	__u32 end;      /* sequence number past the payload */
	__u32 poff;     /* offset of payload byte 0 in the skb */
	__u32 bad;      /* payload offset of the first byte that is no record */
	__u32 done;     /* 1: all headers in this segment are checked */
	__u32 pad;
};

/* The first have bytes of a record header are plausible. */
static __always_inline int mgw_hdr_ok(const struct mgw_dir_state *d, __u32 have)
{
	const __u8 *h = d->hdr;

	/* RFC 8446 §5.1: change_cipher_spec(20), alert(21), handshake(22),
	 * application_data(23). */
	if (h[0] < 20 || h[0] > 23)
		return 0;
	if ((d->flags & MGW_DF_FIRST_HS) && h[0] != 22)
		return 0;
	if (have >= 2 && h[1] != 3)
		return 0;
	if (have >= 3 && (h[2] < 1 || h[2] > 4))
		return 0;
	if (have >= 4 && h[3] > (MGW_TLS_REC_MAX >> 8))
		return 0;
	if (have >= 5 && (((__u32)h[3] << 8) | h[4]) > MGW_TLS_REC_MAX)
		return 0;
	return 1;
}

static long mgw_rec_step(__u32 i, void *arg)
{
	struct mgw_rec *r = arg;
	struct mgw_dir_state *d = r->d;
	__u32 have = d->hdr_have, pos, need;

	(void)i;
	if (have > 4)
		return 1;
	pos = d->rec_next + have;
	if (!mgw_before(pos, r->end)) {
		r->done = 1;
		return 1;
	}
	if (mgw_before(pos, r->seq))
		return 1;
	need = 5 - have;
	if (need > r->end - pos)
		need = r->end - pos;
	/* Keep the bound check after the clamp, where the verifier sees it. */
	barrier_var(need);
	if ((__s32)need < 1 || need > 5)
		return 1;
	if (bpf_skb_load_bytes(r->skb, r->poff + (pos - r->seq), &d->hdr[have], need))
		return 1;
	have += need;
	if (!mgw_hdr_ok(d, have)) {
		r->bad = mgw_before(d->rec_next, r->seq) ? 0 : d->rec_next - r->seq;
		d->hdr_have = 0;
		return 1;
	}
	if (have < 5) {
		/* The header goes on in the next segment. */
		d->hdr_have = have;
		r->done = 1;
		return 1;
	}
	d->rec_next += 5 + (((__u32)d->hdr[3] << 8) | d->hdr[4]);
	d->hdr_have = 0;
	d->flags &= ~MGW_DF_FIRST_HS;
	return 0;
}

/*
 * Check the record headers in this segment's new bytes.  Returns the
 * class of the packet.
 */
static __always_inline __u32 mgw_records(struct __sk_buff *skb, struct mgw_pkt *p,
					 struct mgw_flow *f, __u32 dir, __u32 seq, __u32 end,
					 struct mgw_port_stats *st)
{
	struct mgw_dir_state *d = &f->dir[dir & 1].st;
	struct mgw_rec r = {
		.skb = skb, .d = d, .seq = seq, .end = end, .poff = p->poff,
		.bad = MGW_NONE,
	};

	/* Inside a record body: nothing to load. */
	if (!mgw_before(d->rec_next + d->hdr_have, end))
		return MGW_CLASS_TLS;
	bpf_loop(MGW_REC_LOOPS, mgw_rec_step, &r, 0);
	if (r.bad != MGW_NONE) {
		mgw_violation(p, f, dir, st, p->plen > r.bad ? p->plen - r.bad : 0);
		return f->phase == MGW_PH_OFFLOADED ? MGW_CLASS_TLS : MGW_CLASS_PLAINTEXT;
	}
	if (!r.done)
		mgw_lose(f, dir, st);
	return MGW_CLASS_TLS;
}

/* --- one segment's payload ------------------------------------------------ */

/* A sequence hole before seq that may be skipped: it holds record body only. */
static __always_inline int mgw_hole_is_body(const struct mgw_dir_state *d, __u32 seq)
{
	if (d->mode == MGW_MODE_VIOLATED)
		return 1;
	return d->mode == MGW_MODE_TLS && d->hdr_have == 0 && !mgw_before(d->rec_next, seq);
}

/* Payload of seq..end after a mode switch at payload offset off. */
static __always_inline __u32 mgw_new_bytes(struct __sk_buff *skb, struct mgw_pkt *p,
					   struct mgw_flow *f, __u32 dir, __u32 seq, __u32 end,
					   __u32 off, struct mgw_port_stats *st)
{
	struct mgw_dir_state *d = &f->dir[dir & 1].st;
	__u32 tls_at;

	switch (d->mode) {
	case MGW_MODE_TLS:
		return mgw_records(skb, p, f, dir, seq, end, st);
	case MGW_MODE_VIOLATED:
		if (st) {
			__u32 r = mgw_reason(f, dir);

			if (r < MGW_REASON_MAX)
				st->violation_bytes[r] += p->plen - off;
		}
		return MGW_CLASS_PLAINTEXT;
	case MGW_MODE_PLAIN:
		if (!mgw_wants_lines(f, dir)) {
			if (f->phase == MGW_PH_DIALOGUE)
				mgw_line_sync(skb, p, &f->dir[dir & 1].st);
			return MGW_CLASS_PLAINTEXT;
		}
		tls_at = mgw_lines(skb, p, f, dir, off);
		if (tls_at == MGW_NONE)
			return MGW_CLASS_PLAINTEXT;
		/* The STARTTLS line, or the positive reply to it, ends here. */
		d->mode = MGW_MODE_TLS;
		d->flags |= MGW_DF_TLS_HINT;
		d->hdr_have = 0;
		d->rec_next = seq + tls_at;
		if (dir == MGW_DIR_TO_SERVER) {
			d->flags |= MGW_DF_FIRST_HS;
		} else {
			f->phase = MGW_PH_UPGRADED;
			mgw_count_kind(f, st, MGW_KIND_STARTTLS_UPGRADED);
		}
		mgw_records(skb, p, f, dir, seq, end, st);
		return MGW_CLASS_PLAINTEXT;
	}
	return mgw_dir_class(d);
}

static __always_inline __u32 mgw_payload(struct __sk_buff *skb, struct mgw_pkt *p,
					 struct mgw_flow *f, __u32 dir, struct mgw_port_stats *st)
{
	struct mgw_dir_state *d = &f->dir[dir & 1].st;
	__u32 seq = p->seq + ((p->tcp_flags & MGW_TH_SYN) ? 1 : 0);
	__u32 end = seq + p->plen;
	__u32 start, cls;

	if (d->mode == MGW_MODE_LOST) {
		if (f->phase == MGW_PH_UNTRACKED && !(d->flags & MGW_DF_HINTED)) {
			__u8 h[3];

			/* Mid-stream: guess the class once from the first payload. */
			d->flags |= MGW_DF_HINTED;
			if (p->plen >= 3 && !bpf_skb_load_bytes(skb, p->poff, h, 3) &&
			    h[0] >= 20 && h[0] <= 23 && h[1] == 3 && h[2] >= 1 && h[2] <= 4)
				d->flags |= MGW_DF_TLS_HINT;
		}
		return mgw_dir_class(d);
	}
	if (!(d->flags & MGW_DF_SEQ)) {
		/* The handshake was not seen for this direction. */
		mgw_lose(f, dir, st);
		return mgw_dir_class(d);
	}
	if ((d->flags & MGW_DF_HOLE) && mgw_after(seq, d->next_seq)) {
		/* More data past the same hole. */
		if (mgw_after(end, d->hole_end))
			d->hole_end = end;
		return mgw_dir_class(d);
	}
	if (!mgw_after(end, d->next_seq))
		return mgw_dir_class(d);        /* retransmission: seen already */
	start = d->next_seq;
	if (mgw_after(seq, start)) {
		/* Bytes before this segment are missing (lost or reordered). */
		if (d->mode == MGW_MODE_PLAIN) {
			mgw_give_up(f);
			start = seq;
		} else if (mgw_hole_is_body(d, seq)) {
			start = seq;
		} else {
			d->flags |= MGW_DF_HOLE;
			d->hole_end = end;
			return mgw_dir_class(d);
		}
	}

	cls = mgw_new_bytes(skb, p, f, dir, seq, end, start - seq, st);
	if (mgw_after(end, d->next_seq))
		d->next_seq = end;

	if (d->flags & MGW_DF_HOLE) {
		/* This segment filled (part of) the hole. */
		if (!mgw_before(d->next_seq, d->hole_end)) {
			d->flags &= ~MGW_DF_HOLE;
		} else if (d->mode == MGW_MODE_LOST) {
			d->flags &= ~MGW_DF_HOLE;
		} else if (d->mode != MGW_MODE_TLS ||
			   (d->hdr_have == 0 && !mgw_before(d->rec_next, d->hole_end))) {
			/* What was seen past the hole holds no header. */
			d->next_seq = d->hole_end;
			d->flags &= ~MGW_DF_HOLE;
		} else {
			d->flags &= ~MGW_DF_HOLE;
			mgw_lose(f, dir, st);
		}
	}
	return cls;
}

/* FIN or RST: a STARTTLS-capable flow that never upgraded is plaintext_only. */
static __always_inline void mgw_on_close(struct mgw_flow *f, struct mgw_port_stats *st)
{
	__u32 once = __sync_fetch_and_or(&f->once, MGW_ONCE_CLOSED);

	if ((once & (MGW_ONCE_CLOSED | MGW_ONCE_KIND)) || !(once & MGW_ONCE_ESTABLISHED))
		return;
	if (f->phase == MGW_PH_UNTRACKED)
		return;
	if (mgw_proto_implicit(f->proto))
		mgw_count_kind(f, st, MGW_KIND_IMPLICIT_TLS);
	else
		mgw_count_kind(f, st, MGW_KIND_PLAINTEXT_ONLY);
}

static __always_inline int mgw_classify(struct __sk_buff *skb)
{
	struct mgw_pkt p = {};
	struct mgw_portbits *pb;
	struct mgw_port_stats *st;
	struct mgw_flow *f;
	__u32 dir, cls, slot, segs, zero = 0;
	int ret;

	ret = mgw_parse(skb, &p);
	if (ret > 0) {
		if (bpf_skb_pull_data(skb, skb->len < MGW_HDR_PULL ? skb->len : MGW_HDR_PULL))
			return MGW_TC_ACT_UNSPEC;
		__builtin_memset(&p, 0, sizeof(p));
		ret = mgw_parse(skb, &p);
	}
	if (ret)
		return MGW_TC_ACT_UNSPEC;

	pb = bpf_map_lookup_elem(&mgw_portbits, &zero);
	if (!pb || (!mgw_port_bit(pb, p.sport) && !mgw_port_bit(pb, p.dport)))
		return MGW_TC_ACT_UNSPEC;

	f = bpf_map_lookup_elem(&mgw_flows, &p.key);
	if (p.tcp_flags & MGW_TH_SYN)
		f = mgw_on_syn(&p, f);
	else if (!f)
		f = mgw_on_midstream(&p);
	if (!f)
		return MGW_TC_ACT_UNSPEC;

	slot = f->slot;
	st = bpf_map_lookup_elem(&mgw_stats, &slot);
	dir = p.src_is_a == f->server_is_a ? MGW_DIR_TO_CLIENT : MGW_DIR_TO_SERVER;

	if ((p.tcp_flags & (MGW_TH_SYN | MGW_TH_ACK)) == (MGW_TH_SYN | MGW_TH_ACK) &&
	    dir == MGW_DIR_TO_CLIENT && f->phase == MGW_PH_IMPLICIT)
		mgw_count_kind(f, st, MGW_KIND_IMPLICIT_TLS);

	if (p.plen)
		cls = mgw_payload(skb, &p, f, dir, st);
	else
		cls = mgw_dir_class(&f->dir[dir & 1].st);
	if (p.tcp_flags & (MGW_TH_FIN | MGW_TH_RST))
		mgw_on_close(f, st);

	if (st) {
		segs = skb->gso_segs;
		if (segs == 0)
			segs = 1;
		cls &= 1;
		st->packets[cls] += segs;
		st->bytes[cls] += p.ip_len;
	}
	return MGW_TC_ACT_UNSPEC;
}

SEC("tc")
int mgw_tc_ingress(struct __sk_buff *skb)
{
	return mgw_classify(skb);
}

SEC("tc")
int mgw_tc_egress(struct __sk_buff *skb)
{
	return mgw_classify(skb);
}
