/*
 * imap.c - the IMAP dialogue the gateway answers itself before TLS
 * (RFC 9051 / RFC 3501 not-authenticated state, STARTTLS per RFC 9051 §6.2.1),
 * and what it must understand of the backend's responses.
 *
 * Security stance: with require_tls the gateway advertises LOGINDISABLED and
 * refuses LOGIN and AUTHENTICATE (RFC 9051 §6.2.3), so credentials never
 * cross the wire in clear. The client's tag is echoed only after checking it
 * is a plain atom.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>

#include "proto_impl.h"
#include "stats.h"
#include "util.h"

#define TAG_MAX 63

static void imap_caps(const struct proto_conf *pc, struct proto_reply *r)
{
	reply_add(r, "IMAP4rev1 ID");
	if (pc->starttls)
		reply_add(r, " STARTTLS");
	if (pc->require_tls)
		reply_add(r, " LOGINDISABLED");
}

static void imap_greeting(const struct proto_conf *pc, struct proto_reply *r)
{
	reply_set(r, "* OK [CAPABILITY ");
	imap_caps(pc, r);
	reply_add(r, "] %s mailgw ready\r\n", pc->hostname);
}

/* RFC 9051 §9: tag = 1*<any ASTRING-CHAR except "+">. */
static bool tag_ok(const char *t, size_t n)
{
	size_t i;

	if (n == 0 || n > TAG_MAX)
		return false;
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)t[i];
		if (c <= ' ' || c >= 0x7f || strchr("(){%*\"\\+", c))
			return false;
	}
	return true;
}

static enum proto_verdict imap_command(const struct proto_conf *pc, struct proto_state *st,
				       const char *line, size_t len, struct proto_reply *r)
{
	const char *tag, *cmd, *args;
	size_t tlen, clen, alen;
	int t;

	if (over_budget(pc, st)) {
		proto_error_reply(pc, PE_TOO_MANY_COMMANDS, r);
		r->counter = STAT_pretls_limit;
		return PV_CLOSE;
	}
	split_word(line, len, &tag, &tlen, &cmd, &clen);
	if (!tag_ok(tag, tlen)) {
		reply_set(r, "* BAD Invalid tag\r\n");
		return PV_REPLY;
	}
	t = (int)tlen;
	split_word(cmd, clen, &cmd, &clen, &args, &alen);

	if (token_is(cmd, clen, "CAPABILITY") && !alen) {
		reply_set(r, "* CAPABILITY ");
		imap_caps(pc, r);
		reply_add(r, "\r\n%.*s OK CAPABILITY completed\r\n", t, tag);
		return PV_REPLY;
	}
	if (token_is(cmd, clen, "NOOP") && !alen) {
		reply_set(r, "%.*s OK NOOP completed\r\n", t, tag);
		return PV_REPLY;
	}
	if (token_is(cmd, clen, "LOGOUT") && !alen) {
		reply_set(r, "* BYE %s logging out\r\n%.*s OK LOGOUT completed\r\n",
			  pc->hostname, t, tag);
		return PV_CLOSE;
	}
	if (token_is(cmd, clen, "ID")) {
		/* RFC 2971: the gateway does not identify the backend before TLS. */
		reply_set(r, "* ID NIL\r\n%.*s OK ID completed\r\n", t, tag);
		return PV_REPLY;
	}
	if (token_is(cmd, clen, "STARTTLS")) {
		if (!pc->starttls || alen) {
			reply_set(r, "%.*s BAD STARTTLS not available\r\n", t, tag);
			return PV_REPLY;
		}
		/* RFC 9051 §6.2.1 */
		reply_set(r, "%.*s OK Begin TLS negotiation now\r\n", t, tag);
		r->counter = STAT_starttls;
		return PV_STARTTLS;
	}
	if (clen == 0) {
		reply_set(r, "%.*s BAD Missing command\r\n", t, tag);
		return PV_REPLY;
	}
	if (pc->require_tls) {
		r->counter = STAT_require_tls_refused;
		if (token_is(cmd, clen, "LOGIN") || token_is(cmd, clen, "AUTHENTICATE")) {
			/* RFC 9051 §6.2.3 (LOGINDISABLED), RFC 5530 PRIVACYREQUIRED */
			reply_set(r, "%.*s NO [PRIVACYREQUIRED] Use STARTTLS first\r\n", t, tag);
			return PV_REPLY;
		}
		reply_set(r, "%.*s BAD Command not allowed before STARTTLS\r\n", t, tag);
		return PV_REPLY;
	}
	return PV_RELAY;
}

static void imap_error_reply(const struct proto_conf *pc, enum proto_error e,
			     struct proto_reply *r)
{
	(void)pc;
	switch (e) {
	case PE_LINE_TOO_LONG:
		reply_set(r, "* BYE Command line too long\r\n");
		break;
	case PE_TOO_MANY_COMMANDS:
		reply_set(r, "* BYE Too many commands before STARTTLS\r\n");
		break;
	case PE_IDLE_TIMEOUT: /* RFC 9051 §5.4 */
		reply_set(r, "* BYE Autologout; idle for too long\r\n");
		break;
	case PE_BACKEND_DOWN:
		reply_set(r, "* BYE [UNAVAILABLE] Backend unavailable, try again later\r\n");
		break;
	case PE_INJECTION:
		reply_set(r, "* BYE Commands pipelined after STARTTLS are rejected\r\n");
		break;
	case PE_OVERLOAD:
		reply_set(r, "* BYE [UNAVAILABLE] Too many connections, try again later\r\n");
		break;
	case PE_SHUTDOWN:
		reply_set(r, "* BYE [UNAVAILABLE] Server shutting down, try again later\r\n");
		break;
	}
}

static bool starts_with(const char *line, size_t len, const char *prefix)
{
	size_t n = strlen(prefix);

	return len >= n && token_is(line, n, prefix);
}

static int imap_resp_line(struct proto_resp *st, const char *line, size_t len)
{
	size_t tl = strlen(st->tag);

	if (st->what == RESP_GREETING) {
		/* RFC 9051 §7.1: OK, PREAUTH or BYE as the first response. */
		if (starts_with(line, len, "* OK") || starts_with(line, len, "* PREAUTH")) {
			st->ok = true;
			return 1;
		}
		if (starts_with(line, len, "* BYE")) {
			st->ok = false;
			return 1;
		}
		return -1;
	}
	if (len >= 2 && line[0] == '*' && line[1] == ' ')
		return 0;
	if (tl && len > tl && memcmp(line, st->tag, tl) == 0 && line[tl] == ' ') {
		st->ok = starts_with(line + tl + 1, len - tl - 1, "OK");
		return 1;
	}
	return -1;
}

static bool imap_caps_command(const char *line, size_t len, struct proto_resp *st)
{
	const char *tag, *cmd, *args;
	size_t tlen, clen, alen;

	split_word(line, len, &tag, &tlen, &cmd, &clen);
	if (!tag_ok(tag, tlen))
		return false;
	split_word(cmd, clen, &cmd, &clen, &args, &alen);
	if (!token_is(cmd, clen, "CAPABILITY") || alen)
		return false;
	memcpy(st->tag, tag, tlen);
	st->tag[tlen] = '\0';
	return true;
}

static bool hidden_cap(const char *w, size_t n)
{
	return token_is(w, n, "STARTTLS") || token_is(w, n, "LOGINDISABLED");
}

/* Copy the capability words in [p, end) to out, leaving out hidden ones. */
static bool copy_caps(const char *p, const char *end, char *out, size_t cap, size_t *off)
{
	bool first = true;

	while (p < end) {
		const char *w = p;
		size_t n;

		while (p < end && *p != ' ')
			p++;
		n = (size_t)(p - w);
		while (p < end && *p == ' ')
			p++;
		if (n == 0 || hidden_cap(w, n))
			continue;
		if ((!first && !out_put(out, cap, off, " ", 1)) || !out_put(out, cap, off, w, n))
			return false;
		first = false;
	}
	return true;
}

/* Find "[CAPABILITY " in a line; atoms are case-insensitive (RFC 9051 §9). */
static const char *find_caps_code(const char *line, size_t len)
{
	size_t i;

	for (i = 0; i + 12 <= len; i++)
		if (line[i] == '[' && starts_with(line + i + 1, len - i - 1, "CAPABILITY "))
			return line + i;
	return NULL;
}

/*
 * Rewrite "* CAPABILITY ..." lines and "[CAPABILITY ...]" response codes,
 * the two places RFC 9051 §7.2.2 and §7.1 carry capabilities.
 */
static long imap_filter_caps(const char *in, size_t len, char *out, size_t cap)
{
	const char *p = in, *end = in + len, *line;
	size_t l, off = 0;

	while (next_line(&p, end, &line, &l)) {
		const char *le = line + l, *code;
		bool ok = true;

		if (starts_with(line, l, "* CAPABILITY ")) {
			ok = out_put(out, cap, &off, line, 13) &&
			     copy_caps(line + 13, le, out, cap, &off);
		} else if ((code = find_caps_code(line, l)) != NULL &&
			   memchr(code, ']', (size_t)(le - code))) {
			const char *close = memchr(code, ']', (size_t)(le - code));
			ok = out_put(out, cap, &off, line, (size_t)(code - line) + 12) &&
			     copy_caps(code + 12, close, out, cap, &off) &&
			     out_put(out, cap, &off, close, (size_t)(le - close));
		} else {
			ok = out_put(out, cap, &off, line, l);
		}
		if (!ok || !out_put(out, cap, &off, "\r\n", 2))
			return -1;
	}
	return (long)off;
}

const struct proto_ops imap_ops = {
	.name = "imap",
	.default_max_line = 8192, /* RFC 7162 §4 recommends at least 8192 octets */
	.greeting = imap_greeting,
	.command = imap_command,
	.error_reply = imap_error_reply,
	.replay = NULL,
	.resp_line = imap_resp_line,
	.caps_command = imap_caps_command,
	.filter_caps = imap_filter_caps,
};
