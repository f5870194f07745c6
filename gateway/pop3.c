/*
 * pop3.c - the POP3 dialogue the gateway answers itself before TLS
 * (RFC 1939 AUTHORIZATION state, CAPA per RFC 2449, STLS per RFC 2595 §4),
 * and what it must understand of the backend's responses.
 *
 * Security stance: with require_tls, USER/PASS/APOP/AUTH are refused before
 * STLS and USER is not advertised, so no credential crosses the wire in clear.
 */
#include <stdio.h>
#include <string.h>

#include "proto_impl.h"
#include "stats.h"
#include "util.h"

static void pop3_greeting(const struct proto_conf *pc, struct proto_reply *r)
{
	reply_set(r, "+OK %s mailgw ready\r\n", pc->hostname);
}

static enum proto_verdict pop3_command(const struct proto_conf *pc, struct proto_state *st,
				       const char *line, size_t len, struct proto_reply *r)
{
	const char *cmd, *args;
	size_t clen, alen;
	bool refuse = pc->require_tls;

	if (over_budget(pc, st)) {
		proto_error_reply(pc, PE_TOO_MANY_COMMANDS, r);
		r->counter = STAT_pretls_limit;
		return PV_CLOSE;
	}
	split_word(line, len, &cmd, &clen, &args, &alen);

	if (token_is(cmd, clen, "CAPA")) {
		/* RFC 2449 §5 */
		reply_set(r, "+OK Capability list follows\r\n");
		if (pc->starttls)
			reply_add(r, "STLS\r\n");
		if (!refuse)
			reply_add(r, "USER\r\n");
		reply_add(r, ".\r\n");
		return PV_REPLY;
	}
	if (token_is(cmd, clen, "STLS")) {
		if (!pc->starttls || alen) {
			reply_set(r, "-ERR STLS not available\r\n");
			return PV_REPLY;
		}
		/* RFC 2595 §4 */
		reply_set(r, "+OK Begin TLS negotiation\r\n");
		r->counter = STAT_starttls;
		return PV_STARTTLS;
	}
	if (token_is(cmd, clen, "NOOP")) {
		reply_set(r, "+OK\r\n");
		return PV_REPLY;
	}
	if (token_is(cmd, clen, "QUIT")) {
		reply_set(r, "+OK Bye\r\n");
		return PV_CLOSE;
	}
	if (clen == 0) {
		reply_set(r, "-ERR Missing command\r\n");
		return PV_REPLY;
	}
	if (refuse) {
		r->counter = STAT_require_tls_refused;
		if (token_is(cmd, clen, "USER") || token_is(cmd, clen, "PASS") ||
		    token_is(cmd, clen, "APOP") || token_is(cmd, clen, "AUTH")) {
			/* RFC 2595 §4, RFC 3206 [AUTH] */
			reply_set(r, "-ERR [AUTH] Use STLS first\r\n");
			return PV_REPLY;
		}
		reply_set(r, "-ERR Command not allowed before STLS\r\n");
		return PV_REPLY;
	}
	return PV_RELAY;
}

static void pop3_error_reply(const struct proto_conf *pc, enum proto_error e,
			     struct proto_reply *r)
{
	(void)pc;
	switch (e) {
	case PE_LINE_TOO_LONG:
		reply_set(r, "-ERR Line too long\r\n");
		break;
	case PE_TOO_MANY_COMMANDS:
		reply_set(r, "-ERR Too many commands before STLS\r\n");
		break;
	case PE_IDLE_TIMEOUT: /* RFC 1939 §3 autologout timer */
		reply_set(r, "-ERR Autologout; idle for too long\r\n");
		break;
	case PE_BACKEND_DOWN: /* RFC 3206 §4 */
		reply_set(r, "-ERR [SYS/TEMP] Backend unavailable, try again later\r\n");
		break;
	case PE_INJECTION:
		reply_set(r, "-ERR Commands pipelined after STLS are rejected\r\n");
		break;
	case PE_OVERLOAD:
		reply_set(r, "-ERR [SYS/TEMP] Too many connections, try again later\r\n");
		break;
	case PE_SHUTDOWN:
		reply_set(r, "-ERR [SYS/TEMP] Server shutting down, try again later\r\n");
		break;
	}
}

static int pop3_resp_line(struct proto_resp *st, const char *line, size_t len)
{
	if (st->nlines == 1) {
		if (len >= 3 && memcmp(line, "+OK", 3) == 0) {
			st->ok = true;
			/* A greeting is one line; a CAPA list runs to "." (RFC 2449 §5). */
			return st->what == RESP_CAPS ? 0 : 1;
		}
		if (len >= 4 && memcmp(line, "-ERR", 4) == 0) {
			st->ok = false;
			return 1;
		}
		return -1;
	}
	return len == 1 && line[0] == '.' ? 1 : 0;
}

static bool pop3_caps_command(const char *line, size_t len, struct proto_resp *st)
{
	(void)st;
	while (len && line[len - 1] == ' ')
		len--;
	return token_is(line, len, "CAPA");
}

static long pop3_filter_caps(const char *in, size_t len, char *out, size_t cap)
{
	const char *p = in, *end = in + len, *line;
	size_t l, off = 0;
	unsigned n = 0;

	while (next_line(&p, end, &line, &l)) {
		const char *w, *rest;
		size_t wl, rl;

		/* A capability is its first word; STLS may carry parameters. */
		split_word(line, l, &w, &wl, &rest, &rl);
		if (n++ > 0 && token_is(w, wl, "STLS"))
			continue;
		if (!out_put(out, cap, &off, line, l) || !out_put(out, cap, &off, "\r\n", 2))
			return -1;
	}
	return (long)off;
}

const struct proto_ops pop3_ops = {
	.name = "pop3",
	.default_max_line = 255, /* RFC 2449 §4: 255 octets including CRLF */
	.greeting = pop3_greeting,
	.command = pop3_command,
	.error_reply = pop3_error_reply,
	.replay = NULL,
	.resp_line = pop3_resp_line,
	.caps_command = pop3_caps_command,
	.filter_caps = pop3_filter_caps,
};
