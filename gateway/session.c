/*
 * session.c - the life of one client connection.
 *
 *   PRETLS     the gateway answers the dialogue itself (proto.h)
 *     | STARTTLS accepted, reply flushed, nothing pipelined behind it
 *   HANDSHAKE  OpenSSL, non-blocking               <- implicit TLS starts here
 *     | offload_attach() picks the record engine
 *   CONNECT    non-blocking connect to the backend, PROXY header queued
 *   GREETING   the backend's banner: swallowed (STARTTLS, plaintext) or
 *              passed on (implicit TLS)
 *   REPLAY     plaintext relay only: the client's EHLO replayed to the backend
 *   FIRSTCMD   the client's first command after TLS; a capability request
 *              turns on the filter that hides STARTTLS in its reply
 *   RELAY      bytes both ways, bounded buffers, backpressure
 *   CLOSING    a last reply is flushed, then the connection closes
 *
 * Sockets are edge-triggered. For each socket and direction the session
 * remembers which readiness (EPOLLIN or EPOLLOUT) the last blocked operation
 * waits for; an epoll event clears it and the session retries. TLS needs
 * this generality: SSL_read may wait for writability and SSL_write for
 * readability.
 *
 * Memory bound per session: four fixed-capacity buffers (see SESS_*_BUF)
 * plus OpenSSL's record buffers. Both are taken when data arrives and given
 * back when the session waits with them empty (buf_release,
 * SSL_MODE_RELEASE_BUFFERS): an idle session holds neither.
 */
#define _GNU_SOURCE
#include "session.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../offload/offload.h"
#include "buf.h"
#include "classify.h"
#include "config.h"
#include "log.h"
#include "proto.h"
#include "proxy.h"
#include "stats.h"
#include "tls.h"
#include "util.h"
#include "worker.h"

#define SESS_RELAY_BUF (64 * 1024) /* four full TLS records per read or write */
#define SESS_CTRL_BUF (8 * 1024)   /* gateway replies, filtered capability replies */
#define SESS_CLOSE_LINGER_MS 5000  /* time to flush a last reply */
#define SESS_RUN_BUDGET 64         /* steps per turn before yielding to others */
#define SESS_PIPE_CAP (64 * 1024)  /* Linux default pipe size: the splice window */
/* A block that no epoll event clears: waiting for the record engine's wake. */
#define SESS_WAIT_ENGINE EPOLLMSG

enum sess_state {
	SS_PRETLS,
	SS_HANDSHAKE,
	SS_CONNECT,
	SS_GREETING,
	SS_REPLAY,
	SS_FIRSTCMD,
	SS_RELAY,
	SS_CLOSING,
};

static const char *const state_names[] = {
	"pretls", "handshake", "connect", "greeting", "replay", "firstcmd", "relay", "closing",
};

/* One socket's side of the session. */
struct side {
	int fd;
	struct ev ev;
	uint32_t rd_block; /* 0, or the epoll event the last read waits for */
	uint32_t wr_block;
	bool eof;          /* peer finished sending */
	bool shut;         /* we finished sending (FIN or close_notify) */
};

struct session {
	struct worker *w;
	struct listener_rt *l;
	const struct listener_conf *lc;
	struct session *next, *prev; /* worker's list */
	struct session *next_ready;
	bool ready;
	bool dead;                   /* closed; freed after the current event batch */
	struct session *next_dead;

	char id[13];
	struct sockaddr_any peer, local;
	char peer_str[64];

	enum sess_state state;
	struct side c, b;
	SSL *ssl;
	bool tls;                /* client side runs through the record engine */
	struct offload_conn oc;

	struct proto_state ps;
	struct proto_resp resp;  /* backend response being parsed */
	size_t resp_scan;        /* bytes of bin already parsed as response lines */
	bool filter;             /* hide STARTTLS in the capability reply */
	bool plain;              /* relaying without TLS */
	bool starttls_pending;   /* start the handshake once cout is flushed */
	bool close_pending;      /* close once cout is flushed */

	/* cin: client -> gateway/backend; bin: backend -> client;
	 * cout/bout: what the gateway itself says to client/backend, sent first. */
	struct buf cin, cout, bin, bout;

	/* Kernel TLS relay: plaintext moves socket -> pipe -> socket by splice. */
	int pipe_c2b[2], pipe_b2c[2];
	size_t in_c2b, in_b2c; /* bytes sitting in each pipe */

	uint64_t started, deadline;
	uint64_t hs_started_us;
	uint64_t c2b, b2c;
	const char *close_reason;
};

static void sess_close(struct session *s);

/* --- small helpers ------------------------------------------------------ */

void session_log_prefix(const struct session *s, char *out, size_t cap)
{
	snprintf(out, cap, "[%s] %s sid=%s ", s->lc->name, s->peer_str, s->id);
}

struct session *session_next(struct session *s) { return s->next; }
struct session **session_next_ready(struct session *s) { return &s->next_ready; }
bool session_is_ready(const struct session *s) { return s->ready; }
void session_set_ready(struct session *s, bool ready) { s->ready = ready; }

static void set_deadline(struct session *s, unsigned ms)
{
	s->deadline = now_ms() + ms;
}

static void set_state(struct session *s, enum sess_state st)
{
	log_sess(LOG_DEBUG, s, "state %s -> %s", state_names[s->state], state_names[st]);
	s->state = st;
}

static void reply(struct session *s, const struct proto_reply *r)
{
	if (r->counter >= 0)
		stats_inc((enum stat_id)r->counter);
	if (r->len && buf_append(&s->cout, r->text, r->len) < 0)
		log_sess(LOG_WARN, s, "reply dropped: output buffer full");
}

/* End the session with the protocol's own goodbye, flushed first. */
static void fail_with(struct session *s, enum proto_error e, const char *why)
{
	struct proto_reply r;

	proto_error_reply(&s->l->pc, e, &r);
	buf_reset(&s->bin); /* nothing more from the backend goes out */
	s->filter = false;
	reply(s, &r);
	s->close_reason = why;
	s->close_pending = true;
	set_state(s, SS_CLOSING);
	set_deadline(s, SESS_CLOSE_LINGER_MS);
}

/* --- socket I/O with readiness bookkeeping ------------------------------ */

static uint32_t want_event(unsigned want)
{
	return want == OFFLOAD_WANT_ENGINE ? SESS_WAIT_ENGINE :
	       want == OFFLOAD_WANT_WRITE  ? EPOLLOUT :
					     EPOLLIN;
}

/* The record engine finished work for this session (OFFLOAD_WANT_ENGINE). */
static void engine_wake(struct offload_conn *oc)
{
	struct session *s = (struct session *)((char *)oc - offsetof(struct session, oc));

	if (s->dead)
		return;
	if (s->c.rd_block == SESS_WAIT_ENGINE)
		s->c.rd_block = 0;
	if (s->c.wr_block == SESS_WAIT_ENGINE)
		s->c.wr_block = 0;
	worker_schedule(s->w, s);
}

/* > 0 bytes, 0 EOF, -EAGAIN blocked, other negative: fatal. */
static ssize_t side_read(struct session *s, struct side *d, void *p, size_t n)
{
	ssize_t r;

	if (d == &s->c && s->tls) {
		r = s->oc.ops->recv(&s->oc, p, n);
		if (r == -EAGAIN)
			d->rd_block = want_event(s->oc.want);
		return r;
	}
	r = read(d->fd, p, n);
	if (r >= 0)
		return r;
	if (errno == EAGAIN || errno == EWOULDBLOCK) {
		d->rd_block = EPOLLIN;
		return -EAGAIN;
	}
	return errno == EINTR ? -EAGAIN : -errno;
}

static ssize_t side_write(struct session *s, struct side *d, const void *p, size_t n)
{
	ssize_t r;

	if (d == &s->c && s->tls) {
		r = s->oc.ops->send(&s->oc, p, n);
		if (r == -EAGAIN)
			d->wr_block = want_event(s->oc.want);
		return r;
	}
	r = send(d->fd, p, n, MSG_NOSIGNAL);
	if (r >= 0)
		return r;
	if (errno == EAGAIN || errno == EWOULDBLOCK) {
		d->wr_block = EPOLLOUT;
		return -EAGAIN;
	}
	return errno == EINTR ? -EAGAIN : -errno;
}

static bool can_read(struct session *s, const struct side *d)
{
	if (d->eof)
		return false;
	if (d == &s->c && s->tls && s->oc.ops->pending(&s->oc))
		return true;
	return d->rd_block == 0;
}

/* Relayed bytes, counted as they move so long sessions show up at once. */
static void account(struct session *s, uint64_t *count, size_t n)
{
	*count += n;
	if (count == &s->c2b) {
		stats_add(STAT_bytes_client_to_backend, (int64_t)n);
		stats_ladd(s->lc->slot, LS_bytes_client_to_backend, (int64_t)n);
	} else if (count == &s->b2c) {
		stats_add(STAT_bytes_backend_to_client, (int64_t)n);
		stats_ladd(s->lc->slot, LS_bytes_backend_to_client, (int64_t)n);
	}
}

/*
 * Flush buffer b to side d. Returns 1 on progress, 0 if nothing moved,
 * -1 on a fatal error (session must close).
 */
static int flush(struct session *s, struct side *d, struct buf *b, uint64_t *count)
{
	int progress = 0;

	while (buf_len(b) && d->wr_block == 0) {
		ssize_t r = side_write(s, d, buf_rptr(b), buf_len(b));
		if (r == -EAGAIN)
			break;
		if (r <= 0) {
			log_sess(LOG_INFO, s, "write to %s failed: %s",
				 d == &s->c ? "client" : "backend",
				 d == &s->c && s->tls ? s->oc.err : strerror((int)-r));
			return -1;
		}
		buf_consume(b, (size_t)r);
		if (count)
			account(s, count, (size_t)r);
		progress = 1;
	}
	return progress;
}

/* Read what fits into b. 1 progress, 0 nothing, -1 fatal; sets d->eof. */
static int fill(struct session *s, struct side *d, struct buf *b)
{
	int progress = 0;

	while (can_read(s, d)) {
		ssize_t r;

		if (buf_room(b) == 0)
			buf_compact(b);
		if (buf_room(b) == 0)
			break;
		if (buf_reserve(b) < 0) {
			log_sess(LOG_ERROR, s, "out of memory for a relay buffer");
			return -1;
		}
		r = side_read(s, d, buf_wptr(b), buf_room(b));
		if (r == -EAGAIN)
			break;
		if (r == 0) {
			d->eof = true;
			return 1;
		}
		if (r < 0) {
			log_sess(LOG_INFO, s, "read from %s failed: %s",
				 d == &s->c ? "client" : "backend",
				 d == &s->c && s->tls ? s->oc.err : strerror((int)-r));
			return -1;
		}
		buf_produce(b, (size_t)r);
		progress = 1;
	}
	return progress;
}

/* --- backend connection ------------------------------------------------- */

static void backend_failed(struct session *s, enum lstat_id reason, const char *why)
{
	stats_inc(STAT_backend_fail);
	stats_linc(s->lc->slot, reason);
	fail_with(s, PE_BACKEND_DOWN, why);
}

static int queue_proxy_header(struct session *s)
{
	unsigned char hdr[PROXY_HDR_MAX];
	struct proxy_tls_info ti = { 0 };
	long n;

	if (s->lc->proxy == PROXY_OFF)
		return 0;
	if (s->lc->proxy == PROXY_V1) {
		n = proxy_build_v1((struct sockaddr *)&s->peer.ss, (struct sockaddr *)&s->local.ss,
				   (char *)hdr, sizeof(hdr));
	} else {
		if (s->ssl) {
			ti.version = SSL_get_version(s->ssl);
			ti.cipher = SSL_CIPHER_get_name(SSL_get_current_cipher(s->ssl));
			ti.sni = SSL_get_servername(s->ssl, TLSEXT_NAMETYPE_host_name);
		}
		n = proxy_build_v2((struct sockaddr *)&s->peer.ss, (struct sockaddr *)&s->local.ss,
				   &ti, hdr, sizeof(hdr));
	}
	if (n < 0 || buf_append(&s->bout, hdr, (size_t)n) < 0) {
		log_sess(LOG_ERROR, s, "cannot build PROXY header");
		return -1;
	}
	return 0;
}

static void backend_connect(struct session *s)
{
	struct epoll_event ee = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET };
	int fd, one = 1;

	set_state(s, SS_CONNECT);
	set_deadline(s, s->lc->connect_timeout_ms);
	if (queue_proxy_header(s) < 0) {
		backend_failed(s, LS_backend_connect, "proxy header");
		return;
	}
	fd = socket(s->lc->backend.ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		log_sess(LOG_ERROR, s, "backend socket: %s", strerror(errno));
		backend_failed(s, LS_backend_connect, "backend socket");
		return;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	s->b.fd = fd;
	s->b.ev.type = EV_BACKEND;
	s->b.ev.owner = s;
	ee.data.ptr = &s->b.ev;
	if (epoll_ctl(s->w->epfd, EPOLL_CTL_ADD, fd, &ee) < 0) {
		log_sess(LOG_ERROR, s, "epoll_ctl backend: %s", strerror(errno));
		backend_failed(s, LS_backend_connect, "epoll");
		return;
	}
	if (connect(fd, (struct sockaddr *)&s->lc->backend.ss, s->lc->backend.len) < 0 &&
	    errno != EINPROGRESS) {
		log_sess(LOG_WARN, s, "backend %s: connect: %s", s->lc->backend_str, strerror(errno));
		backend_failed(s, LS_backend_connect, "backend connect");
		return;
	}
	/* Non-blocking connect: writability reports the outcome (connect(2)). */
	s->b.wr_block = EPOLLOUT;
}

static int step_connect(struct session *s)
{
	int err = 0;
	socklen_t len = sizeof(err);

	if (s->b.wr_block)
		return 0;
	if (getsockopt(s->b.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = errno;
	if (err) {
		log_sess(LOG_WARN, s, "backend %s: connect: %s", s->lc->backend_str, strerror(err));
		backend_failed(s, LS_backend_connect, "backend connect");
		return 1;
	}
	s->b.rd_block = 0;
	memset(&s->resp, 0, sizeof(s->resp));
	s->resp.kind = s->lc->protocol;
	s->resp.what = RESP_GREETING;
	s->resp_scan = 0;
	set_state(s, SS_GREETING);
	return 1;
}

/*
 * Parse complete lines of a backend response from bin. Returns 1 when the
 * response is complete (its length in *rlen), 0 when more is needed,
 * -1 when it is malformed or does not fit.
 */
static int scan_response(struct session *s, size_t *rlen)
{
	const uint8_t *base = buf_rptr(&s->bin);
	size_t have = buf_len(&s->bin);

	while (s->resp_scan < have) {
		const char *line;
		size_t len, adv;
		enum line_status ls = line_next(base + s->resp_scan, have - s->resp_scan,
						 s->bin.cap, &line, &len, &adv);
		int r;

		if (ls == LINE_PARTIAL)
			break;
		if (ls == LINE_TOO_LONG)
			return -1;
		s->resp_scan += adv;
		r = proto_resp_line(&s->resp, line, len);
		if (r < 0)
			return -1;
		if (r == 1) {
			*rlen = s->resp_scan;
			s->resp_scan = 0;
			return 1;
		}
	}
	if (buf_room(&s->bin) == 0 && s->bin.rpos == 0)
		return -1; /* a response bigger than the buffer */
	return 0;
}

/* Move a complete capability reply (or greeting) to cout, minus STARTTLS. */
static int pass_filtered(struct session *s, size_t rlen)
{
	char out[SESS_CTRL_BUF];
	long n = proto_filter_caps(s->lc->protocol, (const char *)buf_rptr(&s->bin), rlen,
				   out, sizeof(out));

	if (n < 0 || buf_append(&s->cout, out, (size_t)n) < 0)
		return -1;
	buf_consume(&s->bin, rlen);
	return 0;
}

static int step_backend_reply(struct session *s)
{
	size_t rlen = 0;
	int progress = 0, r;

	r = flush(s, &s->b, &s->bout, NULL);
	if (r < 0) {
		backend_failed(s, LS_backend_closed, "backend write");
		return 1;
	}
	progress |= r;
	r = fill(s, &s->b, &s->bin);
	if (r < 0 || (s->b.eof && buf_len(&s->bin) == 0)) {
		log_sess(LOG_WARN, s, "backend %s closed before its %s", s->lc->backend_str,
			 s->state == SS_GREETING ? "greeting" : "reply");
		backend_failed(s, LS_backend_closed, "backend closed");
		return 1;
	}
	progress |= r;
	r = scan_response(s, &rlen);
	if (r == 0) {
		if (s->b.eof) {
			log_sess(LOG_WARN, s, "backend %s closed mid-response", s->lc->backend_str);
			backend_failed(s, LS_backend_closed, "backend closed");
			return 1;
		}
		return progress;
	}
	if (r < 0 || !s->resp.ok) {
		const uint8_t *p = buf_rptr(&s->bin);
		size_t n = MIN(buf_len(&s->bin), 120);
		const uint8_t *nl = memchr(p, '\r', n);

		log_sess(LOG_WARN, s, "backend %s: unexpected %s: %.*s", s->lc->backend_str,
			 s->state == SS_GREETING ? "greeting" : "reply to replayed EHLO",
			 (int)(nl ? (size_t)(nl - p) : n), (const char *)p);
		backend_failed(s, LS_backend_refused, "backend refused");
		return 1;
	}

	if (s->state == SS_GREETING) {
		char replay[300];
		size_t rl;

		stats_inc(STAT_backend_ok);
		log_sess(LOG_INFO, s, "backend %s connected", s->lc->backend_str);
		set_deadline(s, s->lc->idle_timeout_ms);
		if (s->lc->tls == TLSM_IMPLICIT) {
			/* The backend's banner is the client's greeting. */
			if (pass_filtered(s, rlen) < 0) {
				fail_with(s, PE_BACKEND_DOWN, "greeting too large");
				return 1;
			}
			set_state(s, SS_FIRSTCMD);
			return 1;
		}
		buf_consume(&s->bin, rlen); /* the client already had ours */
		if (s->plain && (rl = proto_replay(&s->l->pc, &s->ps, replay, sizeof(replay)))) {
			buf_append(&s->bout, replay, rl);
			memset(&s->resp, 0, sizeof(s->resp));
			s->resp.kind = s->lc->protocol;
			s->resp.what = RESP_REPLAY;
			set_state(s, SS_REPLAY);
			return 1;
		}
		set_state(s, s->plain ? SS_RELAY : SS_FIRSTCMD);
		return 1;
	}
	/* SS_REPLAY: the backend accepted the client's EHLO/HELO. */
	buf_consume(&s->bin, rlen);
	set_state(s, SS_RELAY);
	return 1;
}

/* --- pre-TLS dialogue ---------------------------------------------------- */

static void start_handshake(struct session *s)
{
	s->ssl = tls_new(s->w->tls, s->c.fd, s->w->cfg->offload);
	classify_mark_session((struct sockaddr *)&s->local.ss, (struct sockaddr *)&s->peer.ss);
	if (!s->ssl) {
		log_sess(LOG_ERROR, s, "cannot create TLS session");
		s->close_reason = "tls setup";
		sess_close(s);
		return;
	}
	set_state(s, SS_HANDSHAKE);
	set_deadline(s, s->lc->handshake_timeout_ms);
	s->hs_started_us = now_us();
	s->c.rd_block = s->c.wr_block = 0;
}

static int step_pretls(struct session *s)
{
	int progress = 0, r;

	r = flush(s, &s->c, &s->cout, NULL);
	if (r < 0) {
		s->close_reason = "client write";
		sess_close(s);
		return -1;
	}
	progress |= r;
	if (buf_len(&s->cout))
		return progress;
	if (s->close_pending) {
		sess_close(s);
		return -1;
	}
	if (s->starttls_pending) {
		s->starttls_pending = false;
		/*
		 * RFC 3207 §4.2 / Postfix's vstream_fpurge: there must be no
		 * plaintext pending once the upgrade starts. Anything that
		 * arrived before our reply was out is an injection attempt.
		 */
		if (buf_len(&s->cin)) {
			log_sess(LOG_WARN, s, "%zu bytes pipelined after STARTTLS: rejected",
				 buf_len(&s->cin));
			stats_inc(STAT_starttls_injection);
			/* The 220 went out and was counted as ok: count the injection only. */
			stats_linc(s->lc->slot, LS_starttls_injection);
			buf_reset(&s->cin);
			fail_with(s, PE_INJECTION, "starttls injection");
			return 1;
		}
		start_handshake(s);
		return s->ssl ? 1 : -1;
	}

	r = fill(s, &s->c, &s->cin);
	if (r < 0) {
		s->close_reason = "client read";
		sess_close(s);
		return -1;
	}
	progress |= r;

	while (!s->starttls_pending && !s->close_pending) {
		struct proto_reply rep;
		enum proto_verdict v;
		const char *line;
		size_t len, adv;
		enum line_status ls;

		if (buf_room(&s->cout) + s->cout.rpos < PROTO_REPLY_MAX)
			break; /* backpressure: let the client read its replies first */
		ls = line_next(buf_rptr(&s->cin), buf_len(&s->cin), s->lc->max_line, &line, &len,
			       &adv);
		if (ls == LINE_PARTIAL)
			break;
		if (ls == LINE_TOO_LONG) {
			log_sess(LOG_WARN, s, "command line over %u bytes", s->lc->max_line);
			stats_inc(STAT_line_too_long);
			stats_linc(s->lc->slot, LS_limit_line_length);
			buf_reset(&s->cin);
			fail_with(s, PE_LINE_TOO_LONG, "line too long");
			return 1;
		}
		progress = 1;
		set_deadline(s, s->lc->idle_timeout_ms);
		v = proto_command(&s->l->pc, &s->ps, line, len, &rep);
		if (v == PV_RELAY) {
			/* The line stays in cin: it is the first thing the backend gets. */
			log_sess(LOG_INFO, s, "client did not upgrade: relaying in plaintext");
			stats_inc(STAT_plaintext_relay);
			s->plain = true;
			backend_connect(s);
			return 1;
		}
		if (v == PV_STARTTLS && adv < buf_len(&s->cin)) {
			log_sess(LOG_WARN, s, "%zu bytes pipelined after STARTTLS: rejected",
				 buf_len(&s->cin) - adv);
			stats_inc(STAT_starttls_injection);
			stats_linc(s->lc->slot, LS_starttls_injection);
			stats_linc(s->lc->slot, LS_starttls_rejected);
			buf_reset(&s->cin);
			fail_with(s, PE_INJECTION, "starttls injection");
			return 1;
		}
		buf_consume(&s->cin, adv);
		if (rep.counter == STAT_require_tls_refused)
			log_sess(LOG_INFO, s, "refused before TLS: %.*s", (int)MIN(len, 16), line);
		if (rep.counter == STAT_pretls_limit) {
			log_sess(LOG_WARN, s, "more than %u commands before TLS",
				 s->l->pc.max_commands);
			stats_linc(s->lc->slot, LS_limit_pretls_commands);
		}
		if (rep.counter == STAT_starttls)
			stats_linc(s->lc->slot, LS_starttls_ok);
		reply(s, &rep);
		if (v == PV_STARTTLS) {
			/* RFC 3207 §4.2, RFC 2595 §3.1: forget all we learned. */
			proto_forget(&s->ps);
			s->starttls_pending = true;
		} else if (v == PV_CLOSE) {
			s->close_pending = true;
			s->close_reason = rep.counter == STAT_pretls_limit ? "command limit" : "quit";
		}
	}
	if (s->c.eof && !buf_len(&s->cout)) {
		s->close_reason = "client closed";
		sess_close(s);
		return -1;
	}
	return progress;
}

/* --- handshake ----------------------------------------------------------- */

/*
 * Count which engine each direction got. When the engine the request
 * preferred (offload_attach sets oc.wanted) did not take both directions,
 * count the fallback and log its cause, once per cause per worker (the next
 * ones at debug level).
 */
static void count_offload(struct session *s)
{
	static const char *seen[16];
	static unsigned nseen;
	const char *cause = s->oc.err[0] ? s->oc.err : NULL;
	const char *what;
	unsigned i;

	static const enum stat_id tx[] = { [OFFLOAD_MODE_USERSPACE] = STAT_offload_userspace_tx,
					   [OFFLOAD_MODE_KTLS_SW] = STAT_offload_ktls_sw_tx,
					   [OFFLOAD_MODE_KTLS_HW] = STAT_offload_ktls_hw_tx,
					   [OFFLOAD_MODE_DPDK] = STAT_offload_dpdk_tx };
	static const enum stat_id rx[] = { [OFFLOAD_MODE_USERSPACE] = STAT_offload_userspace_rx,
					   [OFFLOAD_MODE_KTLS_SW] = STAT_offload_ktls_sw_rx,
					   [OFFLOAD_MODE_KTLS_HW] = STAT_offload_ktls_hw_rx,
					   [OFFLOAD_MODE_DPDK] = STAT_offload_dpdk_rx };

	stats_inc(tx[s->oc.tx_mode]);
	stats_inc(rx[s->oc.rx_mode]);
	if (s->oc.wanted == &offload_ktls && !(s->oc.tx_kernel && s->oc.rx_kernel)) {
		stats_inc(STAT_ktls_fallback);
		what = "kernel TLS";
	} else if (s->oc.wanted == &offload_dpdk && s->oc.ops != &offload_dpdk) {
		stats_inc(STAT_dpdk_fallback);
		what = "DPDK";
	} else {
		return;
	}
	if (!cause)
		cause = "unknown";
	for (i = 0; i < nseen; i++) {
		if (!strcmp(seen[i], cause)) {
			log_sess(LOG_DEBUG, s, "%s fallback: %s", what, cause);
			return;
		}
	}
	if (nseen < ARRAY_SIZE(seen))
		seen[nseen++] = strdup(cause);
	log_sess(LOG_WARN, s, "%s fallback to %s for %s: %s (logged once per cause)", what,
		 s->oc.ops->name, !s->oc.tx_kernel && !s->oc.rx_kernel ? "both directions" :
				  !s->oc.rx_kernel ? "receive" : "transmit",
		 cause);
}

static int open_pipes(struct session *s)
{
	if (pipe2(s->pipe_c2b, O_NONBLOCK | O_CLOEXEC) < 0)
		return -1;
	if (pipe2(s->pipe_b2c, O_NONBLOCK | O_CLOEXEC) < 0) {
		close(s->pipe_c2b[0]);
		close(s->pipe_c2b[1]);
		s->pipe_c2b[0] = s->pipe_c2b[1] = -1;
		return -1;
	}
	return 0;
}

static int step_handshake(struct session *s)
{
	unsigned want = 0;
	char why[160];
	int r;

	if (s->c.rd_block)
		return 0;
	r = tls_handshake(s->ssl, &want, why, sizeof(why));
	if (r == 0) {
		s->c.rd_block = want;
		return 0;
	}
	if (r < 0 && BIO_number_read(SSL_get_rbio(s->ssl)) == 0) {
		/* Port probes (load balancers, scanners) are not failed handshakes. */
		log_sess(LOG_INFO, s, "closed before the TLS handshake began: %s", why);
		s->close_reason = "no handshake";
		sess_close(s);
		return -1;
	}
	if (r < 0) {
		log_sess(LOG_INFO, s, "TLS handshake failed: %s", why);
		stats_inc(STAT_tls_handshake_fail);
		stats_linc(s->lc->slot, LS_handshake_error);
		s->close_reason = "handshake failed";
		sess_close(s);
		return -1;
	}
	stats_inc(STAT_tls_handshake_ok);
	stats_linc(s->lc->slot, SSL_version(s->ssl) == TLS1_3_VERSION ? LS_handshake_ok_tls13 :
									 LS_handshake_ok_tls12);
	stats_handshake_time(s->lc->slot, now_us() - s->hs_started_us);
	s->oc.ssl = s->ssl;
	s->oc.fd = s->c.fd;
	s->oc.wake = engine_wake;
	if (offload_attach(s->w->cfg->offload, s->w->cfg->dpdk_args[0] != '\0', &s->oc) < 0) {
		log_sess(LOG_ERROR, s, "no record engine accepted the session");
		s->close_reason = "offload";
		sess_close(s);
		return -1;
	}
	s->tls = true;
	count_offload(s);
	if ((s->oc.tx_kernel || s->oc.rx_kernel) && open_pipes(s) < 0) {
		log_sess(LOG_ERROR, s, "pipe: %s", strerror(errno));
		s->close_reason = "pipe";
		sess_close(s);
		return -1;
	}
	{
		const char *sni = SSL_get_servername(s->ssl, TLSEXT_NAMETYPE_host_name);
		log_sess(LOG_INFO, s,
			 "TLS established version=%s cipher=%s sni=%s engine=%s tx=%s rx=%s%s",
			 SSL_get_version(s->ssl),
			 SSL_CIPHER_get_name(SSL_get_current_cipher(s->ssl)), sni ? sni : "-",
			 s->oc.ops->name, offload_mode_name(s->oc.tx_mode),
			 offload_mode_name(s->oc.rx_mode),
			 s->oc.ops != &offload_ktls || s->oc.modes_verified ? "" :
										  " (kernel did not report)");
	}
	s->c.rd_block = s->c.wr_block = 0;
	backend_connect(s);
	return 1;
}

/* --- first command after TLS and the relay ------------------------------- */

static int step_firstcmd(struct session *s)
{
	const char *line;
	size_t len, adv;
	enum line_status ls;
	int r;

	r = flush(s, &s->c, &s->cout, &s->b2c);
	if (r < 0) {
		s->close_reason = "client write";
		sess_close(s);
		return -1;
	}
	r = fill(s, &s->c, &s->cin);
	if (r < 0) {
		s->close_reason = "client read";
		sess_close(s);
		return -1;
	}
	ls = line_next(buf_rptr(&s->cin), buf_len(&s->cin), s->cin.cap, &line, &len, &adv);
	if (ls == LINE_PARTIAL && !s->c.eof && buf_room(&s->cin))
		return r;
	if (ls == LINE_OK && proto_caps_command(s->lc->protocol, line, len, &s->resp)) {
		s->filter = true;
		s->resp_scan = 0;
	}
	set_state(s, SS_RELAY);
	return 1;
}

/* Capability reply filtering inside the relay (backend -> client). */
static int relay_filter(struct session *s)
{
	size_t rlen = 0;
	int r = scan_response(s, &rlen);

	if (r == 0 && !s->b.eof)
		return 0;
	if (r == 1 && pass_filtered(s, rlen) == 0) {
		s->filter = false;
		return 1;
	}
	/* Not a reply we understand: stop filtering and pass it on untouched. */
	log_sess(LOG_DEBUG, s, "capability reply not filtered");
	s->filter = false;
	return 1;
}

/*
 * One direction of a kernel-TLS relay: source socket -> pipe -> destination
 * socket with splice(), so the payload never enters userspace. The kernel
 * decrypts on the client's RX side and encrypts on its TX side.
 * Returns 1 progress, 0 blocked, -1 fatal (close_reason set).
 */
static int splice_dir(struct session *s, bool c2b)
{
	int *pp = c2b ? s->pipe_c2b : s->pipe_b2c;
	size_t *inpipe = c2b ? &s->in_c2b : &s->in_b2c;
	struct side *src = c2b ? &s->c : &s->b, *dst = c2b ? &s->b : &s->c;
	uint64_t *count = c2b ? &s->c2b : &s->b2c;
	int i, progress = 0;

	for (i = 0; i < 16; i++) {
		bool moved = false;
		ssize_t n;

		if (*inpipe < SESS_PIPE_CAP && !src->eof && src->rd_block == 0) {
			if (c2b) {
				n = s->oc.ops->splice_from(&s->oc, pp[1], SESS_PIPE_CAP - *inpipe);
			} else {
				n = splice(src->fd, NULL, pp[1], NULL, SESS_PIPE_CAP - *inpipe,
					   SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
				if (n < 0)
					n = errno == EAGAIN || errno == EINTR ? -EAGAIN : -errno;
			}
			if (n > 0) {
				*inpipe += (size_t)n;
				moved = true;
			} else if (n == 0) {
				src->eof = true;
				moved = true;
			} else if (n == -EAGAIN) {
				/*
				 * A pipe counts buffers, not bytes: with data in it,
				 * EAGAIN may mean "pipe full", which only draining
				 * cures. Wait for the socket only when it is empty.
				 */
				if (*inpipe == 0)
					src->rd_block = c2b ? want_event(s->oc.want) : EPOLLIN;
			} else {
				log_sess(LOG_INFO, s, "read from %s failed: %s", c2b ? "client" : "backend",
					 c2b ? s->oc.err : strerror((int)-n));
				s->close_reason = c2b ? "client error" : "backend error";
				return -1;
			}
		}
		if (*inpipe > 0 && dst->wr_block == 0) {
			if (c2b) {
				n = splice(pp[0], NULL, dst->fd, NULL, *inpipe,
					   SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
				if (n < 0)
					n = errno == EAGAIN || errno == EINTR ? -EAGAIN : -errno;
			} else {
				n = s->oc.ops->splice_to(&s->oc, pp[0], *inpipe);
			}
			if (n > 0) {
				*inpipe -= (size_t)n;
				account(s, count, (size_t)n);
				moved = true;
			} else if (n == -EAGAIN) {
				dst->wr_block = c2b ? EPOLLOUT : want_event(s->oc.want);
			} else {
				log_sess(LOG_INFO, s, "write to %s failed: %s", c2b ? "backend" : "client",
					 c2b ? strerror((int)-n) : s->oc.err);
				s->close_reason = c2b ? "backend error" : "client error";
				return -1;
			}
		}
		if (!moved)
			break;
		progress = 1;
	}
	return progress;
}

static int step_relay(struct session *s)
{
	int progress = 0, r;
	/* Kernel paths once the gateway's own bytes in each direction are out. */
	bool b2c_splice = s->tls && s->oc.tx_kernel && !s->filter && !buf_len(&s->cout) &&
			  !buf_len(&s->bin);
	bool c2b_splice = s->tls && s->oc.rx_kernel && !buf_len(&s->cin) && !buf_len(&s->bout);

	/* backend -> client: gateway text first, then relayed bytes. */
	if (b2c_splice) {
		r = splice_dir(s, false);
		if (r < 0)
			goto gone;
		progress |= r;
	} else {
		r = flush(s, &s->c, &s->cout, &s->b2c);
		if (r < 0)
			goto client_gone;
		progress |= r;
		if (!buf_len(&s->cout) && !s->filter) {
			r = flush(s, &s->c, &s->bin, &s->b2c);
			if (r < 0)
				goto client_gone;
			progress |= r;
		}
		if (!(s->tls && s->oc.tx_kernel && !s->filter)) {
			r = fill(s, &s->b, &s->bin);
			if (r < 0)
				goto backend_gone;
			progress |= r;
		}
		if (s->filter)
			progress |= relay_filter(s);
	}

	/* client -> backend */
	if (c2b_splice) {
		r = splice_dir(s, true);
		if (r < 0)
			goto gone;
		progress |= r;
	} else {
		r = flush(s, &s->b, &s->bout, &s->c2b);
		if (r < 0)
			goto backend_gone;
		progress |= r;
		if (!buf_len(&s->bout)) {
			r = flush(s, &s->b, &s->cin, &s->c2b);
			if (r < 0)
				goto backend_gone;
			progress |= r;
		}
		if (!(s->tls && s->oc.rx_kernel)) {
			r = fill(s, &s->c, &s->cin);
			if (r < 0)
				goto client_gone;
			progress |= r;
		}
	}

	if (progress)
		set_deadline(s, s->lc->idle_timeout_ms);

	/* Half-closes: pass each FIN on once everything before it is delivered. */
	if (s->c.eof && !s->b.shut && !buf_len(&s->cin) && !buf_len(&s->bout) && !s->in_c2b) {
		shutdown(s->b.fd, SHUT_WR);
		s->b.shut = true;
		progress = 1;
	}
	if (s->b.eof && !buf_len(&s->bin) && !buf_len(&s->cout) && !s->in_b2c) {
		s->close_reason = "backend closed";
		sess_close(s);
		return -1;
	}
	if (s->c.eof && s->b.shut && s->b.eof) {
		s->close_reason = "client closed";
		sess_close(s);
		return -1;
	}
	return progress;

client_gone:
	s->close_reason = "client error";
	goto gone;
backend_gone:
	s->close_reason = "backend error";
gone:
	sess_close(s);
	return -1;
}

static int step_closing(struct session *s)
{
	int r = flush(s, &s->c, &s->cout, NULL);

	if (r < 0 || !buf_len(&s->cout)) {
		sess_close(s);
		return -1;
	}
	return r;
}

/* --- driver -------------------------------------------------------------- */

/* One step of work: 1 progress, 0 blocked, -1 session is gone. */
static int step(struct session *s)
{
	switch (s->state) {
	case SS_PRETLS:
		return step_pretls(s);
	case SS_HANDSHAKE:
		return step_handshake(s);
	case SS_CONNECT:
		return step_connect(s);
	case SS_GREETING:
	case SS_REPLAY:
		return step_backend_reply(s);
	case SS_FIRSTCMD:
		return step_firstcmd(s);
	case SS_RELAY:
		return step_relay(s);
	case SS_CLOSING:
		return step_closing(s);
	}
	return 0;
}

void session_run(struct session *s)
{
	int i, r;

	if (s->dead)
		return;
	for (i = 0; i < SESS_RUN_BUDGET; i++) {
		r = step(s);
		if (r < 0)
			return; /* freed */
		if (r == 0) {
			/* Waiting for the network: empty buffers go back. */
			buf_release(&s->cin);
			buf_release(&s->bin);
			buf_release(&s->cout);
			buf_release(&s->bout);
			if (s->tls && s->oc.ops && s->oc.ops->idle)
				s->oc.ops->idle(&s->oc);
			return;
		}
	}
	/* Still busy: give the other sessions a turn and come back. */
	worker_schedule(s->w, s);
}

void session_event(struct session *s, bool backend, uint32_t events)
{
	struct side *d = backend ? &s->b : &s->c;

	if (s->dead)
		return; /* closed by an earlier event of the same batch */
	if (events & (EPOLLERR | EPOLLHUP)) {
		d->rd_block = d->wr_block = 0;
	} else {
		if (events & (EPOLLIN | EPOLLRDHUP)) {
			if (d->rd_block == EPOLLIN)
				d->rd_block = 0;
			if (d->wr_block == EPOLLIN)
				d->wr_block = 0;
		}
		if (events & EPOLLOUT) {
			if (d->rd_block == EPOLLOUT)
				d->rd_block = 0;
			if (d->wr_block == EPOLLOUT)
				d->wr_block = 0;
		}
	}
	session_run(s);
}

bool session_check_timeout(struct session *s, uint64_t now)
{
	if (now < s->deadline)
		return false;
	switch (s->state) {
	case SS_HANDSHAKE:
		log_sess(LOG_INFO, s, "TLS handshake timed out after %u ms",
			 s->lc->handshake_timeout_ms);
		stats_inc(STAT_handshake_timeout);
		stats_linc(s->lc->slot, LS_handshake_error);
		stats_linc(s->lc->slot, LS_limit_handshake_timeout);
		s->close_reason = "handshake timeout";
		sess_close(s);
		return true;
	case SS_CONNECT:
	case SS_GREETING:
	case SS_REPLAY:
		log_sess(LOG_WARN, s, "backend %s: no answer within %u ms", s->lc->backend_str,
			 s->lc->connect_timeout_ms);
		backend_failed(s, LS_backend_timeout, "backend timeout");
		session_run(s);
		return false;
	case SS_PRETLS:
		log_sess(LOG_INFO, s, "idle for %u ms before TLS", s->lc->idle_timeout_ms);
		stats_inc(STAT_idle_timeout);
		stats_linc(s->lc->slot, LS_limit_idle_timeout);
		fail_with(s, PE_IDLE_TIMEOUT, "idle timeout");
		session_run(s);
		return false;
	case SS_FIRSTCMD:
	case SS_RELAY:
		/* After TLS the backend owns the dialogue; we just end it. */
		log_sess(LOG_INFO, s, "idle for %u ms", s->lc->idle_timeout_ms);
		stats_inc(STAT_idle_timeout);
		stats_linc(s->lc->slot, LS_limit_idle_timeout);
		s->close_reason = "idle timeout";
		sess_close(s);
		return true;
	case SS_CLOSING:
		s->close_reason = s->close_reason ? s->close_reason : "linger timeout";
		sess_close(s);
		return true;
	}
	return false;
}

void session_shutdown(struct session *s)
{
	/*
	 * The grace period is over. A session still in the gateway's own
	 * dialogue is told to come back later; any other is closed.
	 */
	if (s->state == SS_PRETLS && !s->starttls_pending && !s->close_pending) {
		fail_with(s, PE_SHUTDOWN, "shutdown");
		session_run(s);
		return;
	}
	if (s->state != SS_CLOSING) {
		s->close_reason = "shutdown grace period over";
		sess_close(s);
	}
}

/* --- life cycle ---------------------------------------------------------- */

static void new_id(char *out)
{
	unsigned char r[6];
	static const char hex[] = "0123456789abcdef";
	unsigned i;

	if (RAND_bytes(r, sizeof(r)) != 1)
		memset(r, 0, sizeof(r));
	for (i = 0; i < sizeof(r); i++) {
		out[2 * i] = hex[r[i] >> 4];
		out[2 * i + 1] = hex[r[i] & 15];
	}
	out[12] = '\0';
}

int session_start(struct worker *w, struct listener_rt *l, int fd)
{
	struct epoll_event ee = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET };
	struct session *s = calloc(1, sizeof(*s));
	int one = 1;

	if (!s)
		return -ENOMEM;
	s->w = w;
	s->l = l;
	s->lc = l->conf;
	s->c.fd = fd;
	s->b.fd = -1;
	s->pipe_c2b[0] = s->pipe_c2b[1] = s->pipe_b2c[0] = s->pipe_b2c[1] = -1;
	s->c.ev.type = EV_CLIENT;
	s->c.ev.owner = s;
	s->started = now_ms();
	new_id(s->id);
	s->peer.len = sizeof(s->peer.ss);
	getpeername(fd, (struct sockaddr *)&s->peer.ss, &s->peer.len);
	s->local.len = sizeof(s->local.ss);
	getsockname(fd, (struct sockaddr *)&s->local.ss, &s->local.len);
	config_format_addr((struct sockaddr *)&s->peer.ss, s->peer_str, sizeof(s->peer_str));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

	if (buf_init(&s->cin, MAX(SESS_RELAY_BUF, s->lc->max_line)) ||
	    buf_init(&s->bin, SESS_RELAY_BUF) || buf_init(&s->cout, SESS_CTRL_BUF) ||
	    buf_init(&s->bout, PROXY_HDR_MAX + 512)) {
		buf_free(&s->cin);
		buf_free(&s->bin);
		buf_free(&s->cout);
		buf_free(&s->bout);
		free(s);
		return -ENOMEM;
	}
	ee.data.ptr = &s->c.ev;
	if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ee) < 0) {
		int e = -errno;
		buf_free(&s->cin);
		buf_free(&s->bin);
		buf_free(&s->cout);
		buf_free(&s->bout);
		free(s);
		return e;
	}
	/* Link into the worker's list. */
	s->next = w->sessions;
	if (w->sessions)
		w->sessions->prev = s;
	w->sessions = s;
	w->nsessions++;
	stats_inc(STAT_connections);
	stats_inc(STAT_sessions_active);
	stats_linc(s->lc->slot, LS_connections);
	stats_linc(s->lc->slot, LS_active);
	log_sess(LOG_INFO, s, "connect on %s (%s, tls=%s)", s->lc->listen_str,
		 proto_name(s->lc->protocol), tls_mode_name(s->lc->tls));

	if (s->lc->tls == TLSM_IMPLICIT) {
		start_handshake(s);
		if (!s->ssl)
			return 0; /* closed */
	} else {
		struct proto_reply r;

		set_state(s, SS_PRETLS);
		set_deadline(s, s->lc->idle_timeout_ms);
		proto_greeting(&l->pc, &r);
		reply(s, &r);
	}
	session_run(s);
	return 0;
}

/* Release everything the session holds; the struct itself waits for session_reap. */
static void sess_close(struct session *s)
{
	struct worker *w = s->w;

	if (s->tls && s->oc.ops && !s->c.shut) {
		/*
		 * close_notify, best effort: the socket is about to go. Also in
		 * answer to the client's own (RFC 8446 §6.1, RFC 5246 §7.2.1).
		 */
		s->oc.ops->shutdown(&s->oc);
		s->c.shut = true;
	}
	log_sess(LOG_INFO, s, "close (%s) state=%s duration_ms=%llu client_to_backend=%llu "
		 "backend_to_client=%llu",
		 s->close_reason ? s->close_reason : "done", state_names[s->state],
		 (unsigned long long)(now_ms() - s->started), (unsigned long long)s->c2b,
		 (unsigned long long)s->b2c);
	stats_add(STAT_sessions_active, -1);
	stats_ladd(s->lc->slot, LS_active, -1);
	if (s->oc.keyupdate)
		stats_inc(STAT_ktls_keyupdate);

	if (s->oc.ops)
		offload_detach(&s->oc);
	if (s->ssl)
		SSL_free(s->ssl);
	s->ssl = NULL;
	if (s->c.fd >= 0)
		close(s->c.fd);
	if (s->b.fd >= 0)
		close(s->b.fd);
	s->c.fd = s->b.fd = -1;
	for (int i = 0; i < 2; i++) {
		if (s->pipe_c2b[i] >= 0)
			close(s->pipe_c2b[i]);
		if (s->pipe_b2c[i] >= 0)
			close(s->pipe_b2c[i]);
	}
	buf_free(&s->cin);
	buf_free(&s->bin);
	buf_free(&s->cout);
	buf_free(&s->bout);

	if (s->prev)
		s->prev->next = s->next;
	else
		w->sessions = s->next;
	if (s->next)
		s->next->prev = s->prev;
	w->nsessions--;
	if (s->ready) {
		struct session **pp = &w->ready;
		while (*pp && *pp != s)
			pp = &(*pp)->next_ready;
		if (*pp)
			*pp = s->next_ready;
		s->ready = false;
	}
	/*
	 * epoll may still hold events for this session in the batch being
	 * processed (client and backend both ready): keep the memory until
	 * the batch is done, marked dead so those events are ignored.
	 */
	s->dead = true;
	s->next_dead = w->dead;
	w->dead = s;
}

void session_reap(struct worker *w)
{
	struct session *s;

	while ((s = w->dead) != NULL) {
		w->dead = s->next_dead;
		free(s);
	}
}
