/*
 * smtp.c - the SMTP dialogue the gateway answers itself before TLS
 * (RFC 5321, STARTTLS per RFC 3207), and what it must understand of the
 * backend's replies.
 *
 * Security stance: before TLS the gateway only learns the EHLO name, and
 * forgets it at STARTTLS. With require_tls, nothing but EHLO/HELO, STARTTLS,
 * NOOP, RSET and QUIT is accepted, so no envelope or credential ever crosses
 * the wire in clear.
 */
#include <stdio.h>
#include <string.h>

#include "proto_impl.h"
#include "stats.h"
#include "util.h"

static void smtp_greeting(const struct proto_conf *pc, struct proto_reply *r)
{
	reply_set(r, "220 %s ESMTP mailgw\r\n", pc->hostname);
}

/* RFC 5321 §4.1.1.1: a domain or an address literal; no controls, no spaces. */
static bool helo_arg_ok(const char *p, size_t n)
{
	size_t i;

	if (n == 0 || n >= sizeof(((struct proto_state *)0)->helo))
		return false;
	for (i = 0; i < n; i++)
		if ((unsigned char)p[i] <= ' ' || (unsigned char)p[i] >= 0x7f)
			return false;
	return true;
}

static enum proto_verdict smtp_command(const struct proto_conf *pc, struct proto_state *st,
				       const char *line, size_t len, struct proto_reply *r)
{
	const char *verb, *arg;
	size_t vlen, alen;

	if (over_budget(pc, st)) {
		proto_error_reply(pc, PE_TOO_MANY_COMMANDS, r);
		r->counter = STAT_pretls_limit;
		return PV_CLOSE;
	}
	split_word(line, len, &verb, &vlen, &arg, &alen);
	while (alen && arg[alen - 1] == ' ')
		alen--;

	if (token_is(verb, vlen, "EHLO") || token_is(verb, vlen, "HELO")) {
		bool esmtp = token_is(verb, vlen, "EHLO");
		const char *rest;
		size_t rlen;

		/* Only the first word is the domain; anything after it is ignored. */
		split_word(arg, alen, &arg, &alen, &rest, &rlen);
		if (!helo_arg_ok(arg, alen)) {
			reply_set(r, "501 5.5.4 Syntax: %s hostname\r\n", esmtp ? "EHLO" : "HELO");
			return PV_REPLY;
		}
		memcpy(st->helo, arg, alen);
		st->helo[alen] = '\0';
		st->helo_seen = true;
		st->esmtp = esmtp;
		if (!esmtp) {
			reply_set(r, "250 %s\r\n", pc->hostname);
			return PV_REPLY;
		}
		/* RFC 5321 §4.1.1.1 multi-line EHLO reply; RFC 3207 §4 STARTTLS keyword. */
		reply_set(r, "250-%s\r\n250-PIPELINING\r\n250-8BITMIME\r\n", pc->hostname);
		if (pc->starttls)
			reply_add(r, "250-STARTTLS\r\n");
		reply_add(r, "250 ENHANCEDSTATUSCODES\r\n");
		return PV_REPLY;
	}
	if (token_is(verb, vlen, "STARTTLS")) {
		if (!pc->starttls) {
			reply_set(r, "502 5.5.1 STARTTLS not available\r\n");
			return PV_REPLY;
		}
		/* RFC 3207 §4: STARTTLS takes no parameters. */
		if (alen) {
			reply_set(r, "501 5.5.4 Syntax: STARTTLS\r\n");
			return PV_REPLY;
		}
		reply_set(r, "220 2.0.0 Ready to start TLS\r\n");
		r->counter = STAT_starttls;
		return PV_STARTTLS;
	}
	if (token_is(verb, vlen, "NOOP")) {
		reply_set(r, "250 2.0.0 OK\r\n");
		return PV_REPLY;
	}
	if (token_is(verb, vlen, "RSET")) {
		if (alen) {
			reply_set(r, "501 5.5.4 Syntax: RSET\r\n");
			return PV_REPLY;
		}
		reply_set(r, "250 2.0.0 OK\r\n");
		return PV_REPLY;
	}
	if (token_is(verb, vlen, "QUIT")) {
		reply_set(r, "221 2.0.0 Bye\r\n");
		return PV_CLOSE;
	}
	if (vlen == 0) {
		reply_set(r, "500 5.5.2 Syntax error, command unrecognized\r\n");
		return PV_REPLY;
	}
	if (pc->require_tls) {
		/* RFC 3207 §4: refuse everything else until the client upgrades. */
		reply_set(r, "530 5.7.0 Must issue a STARTTLS command first\r\n");
		r->counter = STAT_require_tls_refused;
		return PV_REPLY;
	}
	return PV_RELAY;
}

static void smtp_error_reply(const struct proto_conf *pc, enum proto_error e,
			     struct proto_reply *r)
{
	switch (e) {
	case PE_LINE_TOO_LONG: /* RFC 5321 §4.5.3.1.4 */
		reply_set(r, "500 5.5.2 Line too long\r\n");
		break;
	case PE_TOO_MANY_COMMANDS:
		reply_set(r, "421 4.7.0 %s Too many commands before STARTTLS, closing connection\r\n",
			  pc->hostname);
		break;
	case PE_IDLE_TIMEOUT: /* RFC 5321 §4.5.3.2 */
		reply_set(r, "421 4.4.2 %s Timeout exceeded, closing connection\r\n", pc->hostname);
		break;
	case PE_BACKEND_DOWN:
		reply_set(r, "421 4.3.0 %s Service temporarily unavailable, try again later\r\n",
			  pc->hostname);
		break;
	case PE_INJECTION:
		reply_set(r, "554 5.7.0 Commands pipelined after STARTTLS are rejected\r\n");
		break;
	case PE_OVERLOAD:
		reply_set(r, "421 4.3.2 %s Too many connections, try again later\r\n", pc->hostname);
		break;
	case PE_SHUTDOWN:
		reply_set(r, "421 4.3.2 %s Service shutting down, try again later\r\n", pc->hostname);
		break;
	}
}

static size_t smtp_replay(const struct proto_state *st, char *out, size_t cap)
{
	int n;

	if (!st->helo_seen)
		return 0;
	n = snprintf(out, cap, "%s %s\r\n", st->esmtp ? "EHLO" : "HELO", st->helo);
	return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}

/* RFC 5321 §4.2.1: "xyz-text" continues a reply, "xyz text" or "xyz" ends it. */
static int smtp_resp_line(struct proto_resp *st, const char *line, size_t len)
{
	if (len < 3 || line[0] < '1' || line[0] > '5' || line[1] < '0' || line[1] > '9' ||
	    line[2] < '0' || line[2] > '9')
		return -1;
	if (len > 3 && line[3] == '-')
		return 0;
	if (len > 3 && line[3] != ' ')
		return -1;
	st->ok = line[0] == '2';
	return 1;
}

static bool smtp_caps_command(const char *line, size_t len, struct proto_resp *st)
{
	const char *verb, *rest;
	size_t vlen, rlen;

	(void)st;
	split_word(line, len, &verb, &vlen, &rest, &rlen);
	return token_is(verb, vlen, "EHLO") || token_is(verb, vlen, "HELO");
}

/* RFC 5321 §4.1.1.1: an ehlo-line is a keyword, optionally with parameters. */
static bool is_starttls_line(const char *line, size_t len)
{
	const char *kw, *rest;
	size_t n, rl;

	split_word(line + 4, len - 4, &kw, &n, &rest, &rl);
	return token_is(kw, n, "STARTTLS");
}

/*
 * Drop the STARTTLS line from an EHLO reply. When it was the last line, the
 * line before it becomes the last one ("250 " instead of "250-").
 */
static long smtp_filter_caps(const char *in, size_t len, char *out, size_t cap)
{
	const char *p = in, *end = in + len, *line;
	size_t l, off = 0, last = (size_t)-1;

	while (next_line(&p, end, &line, &l)) {
		if (l >= 4 && is_starttls_line(line, l))
			continue;
		last = off;
		if (!out_put(out, cap, &off, line, l) || !out_put(out, cap, &off, "\r\n", 2))
			return -1;
	}
	if (last != (size_t)-1 && off - last >= 6 && out[last + 3] == '-')
		out[last + 3] = ' ';
	return (long)off;
}

const struct proto_ops smtp_ops = {
	.name = "smtp",
	.default_max_line = 512, /* RFC 5321 §4.5.3.1.4 */
	.greeting = smtp_greeting,
	.command = smtp_command,
	.error_reply = smtp_error_reply,
	.replay = smtp_replay,
	.resp_line = smtp_resp_line,
	.caps_command = smtp_caps_command,
	.filter_caps = smtp_filter_caps,
};
