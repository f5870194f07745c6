/*
 * fuzz_common.h - the driver shared by the mailgw libFuzzer targets
 * (fuzz_smtp.c, fuzz_imap.c, fuzz_pop3.c).
 *
 * Input layout:
 *   byte 0     listener flags
 *                bit 0    starttls
 *                bit 1    require_tls
 *                bits 2-3 max_commands: 0 (unlimited), 1, 4, 16
 *                bits 4-5 what the bytes are as a backend response:
 *                         0/3 the reply to a capability command,
 *                         1 a greeting, 2 the reply to a replayed EHLO
 *   bytes 1..  everything else, used three ways:
 *     1. as client bytes: split with line_next at the protocol's default
 *        limit and fed to proto_command until PV_CLOSE / PV_STARTTLS /
 *        PV_RELAY, a too-long line, or the end of the data;
 *     2. as backend bytes: split into lines and fed to proto_resp_line
 *        until the response is complete or rejected;
 *     3. as a complete capability reply for proto_filter_caps.
 *
 * Seed files in tests/fuzz/corpus/<proto>/ are plain text; their first
 * character is the flags byte (e.g. 'C' = 0x43: starttls + require_tls,
 * no budget, capability reply).
 *
 * Any broken invariant prints what was broken and abort()s, so libFuzzer
 * records the input.
 *
 * -DFUZZ_STRICT=1 adds a stricter reading of what a capability token is in
 * filtered output (a tab or a stray CR inside a line also separates words;
 * every IMAP [CAPABILITY] code in a line counts, not just the first). The
 * gateway does not promise that today and such a build does find inputs;
 * see the notes where it is used.
 */
#ifndef MAILGW_FUZZ_COMMON_H
#define MAILGW_FUZZ_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "proto.h"
#include "stats.h"

#ifndef FUZZ_STRICT
#define FUZZ_STRICT 0
#endif

#define FUZZ_HOST "mx.example.test"

#define FUZZ_CHECK(cond)                                                                  \
	do {                                                                              \
		if (!(cond)) {                                                            \
			fprintf(stderr, "%s:%d: invariant violated: %s\n", __FILE__, __LINE__, \
				#cond);                                                   \
			abort();                                                          \
		}                                                                         \
	} while (0)

/* ASCII case-insensitive equality of a (pointer, length) token with a word. */
static inline bool fz_word_is(const char *p, size_t n, const char *word)
{
	size_t i;

	if (strlen(word) != n)
		return false;
	for (i = 0; i < n; i++) {
		char a = p[i], b = word[i];

		if (a >= 'a' && a <= 'z')
			a = (char)(a - 32);
		if (b >= 'a' && b <= 'z')
			b = (char)(b - 32);
		if (a != b)
			return false;
	}
	return true;
}

static inline bool fz_starts_with(const char *p, size_t n, const char *prefix)
{
	size_t l = strlen(prefix);

	return n >= l && fz_word_is(p, l, prefix);
}

/* Walk the lines of a reply that is CRLF-framed throughout. */
static inline bool fz_next_crlf_line(const char **p, const char *end, const char **line,
				     size_t *len)
{
	const char *s = *p, *lf;

	if (s >= end)
		return false;
	lf = memchr(s, '\n', (size_t)(end - s));
	FUZZ_CHECK(lf && lf > s && lf[-1] == '\r');
	*line = s;
	*len = (size_t)(lf - 1 - s);
	*p = lf + 1;
	return true;
}

/*
 * Walk the lines of arbitrary bytes (filter output may carry a backend's bare
 * CRs inside a line): split at LF, strip one CR before it; the last line may
 * lack a terminator.
 */
static inline bool fz_next_any_line(const char **p, const char *end, const char **line,
				    size_t *len)
{
	const char *s = *p, *lf;
	size_t l;

	if (s >= end)
		return false;
	lf = memchr(s, '\n', (size_t)(end - s));
	l = lf ? (size_t)(lf - s) : (size_t)(end - s);
	*p = lf ? lf + 1 : end;
	if (l && s[l - 1] == '\r')
		l--;
	*line = s;
	*len = l;
	return true;
}

/* Every reply the gateway sends: bounded, CRLF-terminated, no bare CR or LF. */
static inline void fz_check_reply_text(const struct proto_reply *r)
{
	size_t i;

	FUZZ_CHECK(r->len < PROTO_REPLY_MAX);
	FUZZ_CHECK(r->text[r->len] == '\0');
	FUZZ_CHECK(strlen(r->text) == r->len);
	if (r->len) {
		FUZZ_CHECK(r->len >= 2);
		FUZZ_CHECK(r->text[r->len - 2] == '\r' && r->text[r->len - 1] == '\n');
	}
	for (i = 0; i < r->len; i++) {
		if (r->text[i] == '\r')
			FUZZ_CHECK(i + 1 < r->len && r->text[i + 1] == '\n');
		if (r->text[i] == '\n')
			FUZZ_CHECK(i > 0 && r->text[i - 1] == '\r');
	}
}

/* What one protocol target contributes to the shared driver. */
struct fuzz_proto {
	enum proto_kind kind;
	/* client line that asks the backend for capabilities */
	const char *caps_cmd;
	/* protocol shape of a reply to `line` (verdict v) */
	void (*check_reply)(const struct proto_conf *pc, const char *line, size_t len,
			    enum proto_verdict v, const struct proto_reply *r);
	/* a line proto_resp_line answered `ret` to; st after the call */
	void (*check_resp)(const struct proto_resp *st, const char *line, size_t len, int ret);
	/* filter output: no hidden capability may survive */
	void (*check_filtered)(const char *out, size_t n);
};

static inline void fz_check_greeting_and_errors(const struct fuzz_proto *fp,
						const struct proto_conf *pc)
{
	static const enum proto_error errs[] = {
		PE_LINE_TOO_LONG, PE_TOO_MANY_COMMANDS, PE_IDLE_TIMEOUT, PE_BACKEND_DOWN,
		PE_INJECTION,     PE_OVERLOAD,          PE_SHUTDOWN,
	};
	struct proto_reply r;
	size_t i;

	memset(&r, 0xa5, sizeof(r));
	proto_greeting(pc, &r);
	fz_check_reply_text(&r);
	FUZZ_CHECK(r.len > 0 && r.counter == -1);
	for (i = 0; i < sizeof(errs) / sizeof(errs[0]); i++) {
		memset(&r, 0xa5, sizeof(r));
		proto_error_reply(pc, errs[i], &r);
		fz_check_reply_text(&r);
		FUZZ_CHECK(r.len > 0 && r.counter == -1);
	}
	(void)fp;
}

/* What proto_replay may hand the backend after a relay verdict. */
static inline void fz_check_replay(const struct proto_conf *pc, const struct proto_state *st)
{
	char out[512], small[8];
	size_t n = proto_replay(pc, st, out, sizeof(out));

	FUZZ_CHECK(n < sizeof(out));
	FUZZ_CHECK(memchr(st->helo, '\0', sizeof(st->helo)) != NULL);
	if (pc->kind != PROTO_SMTP || !st->helo_seen) {
		FUZZ_CHECK(n == 0);
	} else {
		size_t hl = strlen(st->helo);

		/* "EHLO " / "HELO " + name + CRLF, the name a single clean word */
		FUZZ_CHECK(hl > 0 && n == 5 + hl + 2);
		FUZZ_CHECK(memcmp(out, st->esmtp ? "EHLO " : "HELO ", 5) == 0);
		FUZZ_CHECK(memcmp(out + 5, st->helo, hl) == 0);
		FUZZ_CHECK(out[n - 2] == '\r' && out[n - 1] == '\n');
		for (size_t i = 0; i < hl; i++)
			FUZZ_CHECK((unsigned char)st->helo[i] > ' ' &&
				   (unsigned char)st->helo[i] < 0x7f);
	}
	n = proto_replay(pc, st, small, sizeof(small));
	FUZZ_CHECK(n < sizeof(small));
}

/* 1. The client dialogue. */
static inline void fz_dialogue(const struct fuzz_proto *fp, const struct proto_conf *pc,
			       const uint8_t *p, size_t n)
{
	size_t maxline = proto_default_max_line(fp->kind), off = 0;
	struct proto_state st;
	unsigned fed = 0;

	memset(&st, 0, sizeof(st));
	for (;;) {
		const char *line;
		size_t len, adv;
		enum line_status ls = line_next(p + off, n - off, maxline, &line, &len, &adv);
		struct proto_reply r;
		enum proto_verdict v;

		if (ls == LINE_PARTIAL)
			break;
		if (ls == LINE_TOO_LONG) {
			FUZZ_CHECK(n - off >= maxline);
			FUZZ_CHECK(memchr(p + off, '\n', maxline) == NULL);
			memset(&r, 0xa5, sizeof(r));
			proto_error_reply(pc, PE_LINE_TOO_LONG, &r);
			fz_check_reply_text(&r);
			break;
		}
		FUZZ_CHECK(ls == LINE_OK);
		FUZZ_CHECK(line == (const char *)p + off);
		FUZZ_CHECK(adv >= 1 && adv <= n - off && adv <= maxline);
		FUZZ_CHECK(len < adv && p[off + adv - 1] == '\n');
		FUZZ_CHECK(memchr(line, '\n', len) == NULL);
		off += adv;

		memset(&r, 0xa5, sizeof(r));
		v = proto_command(pc, &st, line, len, &r);
		fed++;
		fz_check_reply_text(&r);
		FUZZ_CHECK(st.ncommands == fed);
		FUZZ_CHECK(memchr(st.helo, '\0', sizeof(st.helo)) != NULL);
		FUZZ_CHECK(r.counter == -1 || r.counter == STAT_starttls ||
			   r.counter == STAT_require_tls_refused || r.counter == STAT_pretls_limit);

		/* the pre-TLS budget closes the session, and only the budget says so */
		if (pc->max_commands && st.ncommands > pc->max_commands)
			FUZZ_CHECK(v == PV_CLOSE && r.counter == STAT_pretls_limit);
		if (r.counter == STAT_pretls_limit)
			FUZZ_CHECK(pc->max_commands && st.ncommands > pc->max_commands);

		switch (v) {
		case PV_REPLY:
			FUZZ_CHECK(r.len > 0);
			FUZZ_CHECK(r.counter != STAT_starttls && r.counter != STAT_pretls_limit);
			break;
		case PV_STARTTLS:
			FUZZ_CHECK(pc->starttls);
			FUZZ_CHECK(r.len > 0 && r.counter == STAT_starttls);
			break;
		case PV_CLOSE:
			FUZZ_CHECK(r.len > 0);
			break;
		case PV_RELAY:
			/* relaying says nothing itself, and never on a require_tls listener */
			FUZZ_CHECK(r.len == 0 && r.counter == -1);
			FUZZ_CHECK(!pc->require_tls);
			break;
		default:
			FUZZ_CHECK(!"unknown verdict");
		}
		if (r.counter == STAT_require_tls_refused)
			FUZZ_CHECK(pc->require_tls && v == PV_REPLY);
		fp->check_reply(pc, line, len, v, &r);

		if (v == PV_STARTTLS) {
			struct proto_state zero;

			proto_forget(&st);
			memset(&zero, 0, sizeof(zero));
			FUZZ_CHECK(memcmp(&st, &zero, sizeof(st)) == 0);
			fz_check_replay(pc, &st);
			break;
		}
		if (v == PV_RELAY) {
			fz_check_replay(pc, &st);
			break;
		}
		if (v == PV_CLOSE)
			break;
	}
}

/* 2. The bytes as a backend response. */
static inline void fz_response(const struct fuzz_proto *fp, unsigned mode, const uint8_t *p,
			       size_t n)
{
	struct proto_resp st;
	size_t off = 0;
	unsigned fed = 0;

	if (mode == 1 || (mode == 2 && fp->kind != PROTO_SMTP)) {
		memset(&st, 0, sizeof(st));
		st.kind = fp->kind;
		st.what = RESP_GREETING;
	} else if (mode == 2) {
		memset(&st, 0, sizeof(st));
		st.kind = fp->kind;
		st.what = RESP_REPLAY;
	} else {
		FUZZ_CHECK(proto_caps_command(fp->kind, fp->caps_cmd, strlen(fp->caps_cmd), &st));
		FUZZ_CHECK(st.what == RESP_CAPS && st.kind == fp->kind && st.nlines == 0);
	}
	for (;;) {
		const char *line;
		size_t len, adv;
		int ret;

		/* backend lines are not limited here: the whole rest is the bound */
		if (line_next(p + off, n - off, n - off + 1, &line, &len, &adv) != LINE_OK)
			break;
		off += adv;
		ret = proto_resp_line(&st, line, len);
		fed++;
		FUZZ_CHECK(ret == -1 || ret == 0 || ret == 1);
		FUZZ_CHECK(st.nlines == fed);
		fp->check_resp(&st, line, len, ret);
		if (ret != 0)
			break;
	}
}

/* 3. The bytes as a capability reply to rewrite. */
static inline void fz_filter(const struct fuzz_proto *fp, const uint8_t *p, size_t n)
{
	/* every input line may gain a CR and an LF, never more */
	size_t cap = 3 * n + 2;
	char *out = malloc(cap), *again, *exact;
	long r, r2, r3;

	FUZZ_CHECK(out != NULL);
	r = proto_filter_caps(fp->kind, (const char *)p, n, out, cap);
	/* with room for the worst case, it must succeed */
	FUZZ_CHECK(r >= 0 && (size_t)r <= cap);
	if (r > 0)
		FUZZ_CHECK(r >= 2 && out[r - 2] == '\r' && out[r - 1] == '\n');
	fp->check_filtered(out, (size_t)r);

	/* filtering twice changes nothing more */
	again = malloc(cap);
	FUZZ_CHECK(again != NULL);
	r2 = proto_filter_caps(fp->kind, out, (size_t)r, again, cap);
	FUZZ_CHECK(r2 == r && memcmp(again, out, (size_t)r) == 0);
	free(again);

	/* an exactly sized buffer is enough; one byte less is not, and nothing overflows */
	exact = malloc((size_t)r + 1);
	FUZZ_CHECK(exact != NULL);
	r3 = proto_filter_caps(fp->kind, (const char *)p, n, exact, (size_t)r);
	FUZZ_CHECK(r3 == r && memcmp(exact, out, (size_t)r) == 0);
	if (r > 0) {
		r3 = proto_filter_caps(fp->kind, (const char *)p, n, exact, (size_t)r - 1);
		FUZZ_CHECK(r3 == -1);
	}
	r3 = proto_filter_caps(fp->kind, (const char *)p, n, exact, (size_t)r / 2);
	FUZZ_CHECK(r3 == -1 || (r3 >= 0 && (size_t)r3 <= (size_t)r / 2));
	free(exact);
	free(out);
}

static inline void fuzz_run(const struct fuzz_proto *fp, const uint8_t *data, size_t size)
{
	static const unsigned budgets[4] = { 0, 1, 4, 16 };
	struct proto_conf pc;
	uint8_t flags;
	const uint8_t *p;
	size_t n;

	if (size < 1)
		return;
	flags = data[0];
	p = data + 1;
	n = size - 1;
	memset(&pc, 0, sizeof(pc));
	pc.kind = fp->kind;
	pc.starttls = flags & 0x01;
	pc.require_tls = (flags & 0x02) != 0;
	pc.max_commands = budgets[(flags >> 2) & 3];
	pc.hostname = FUZZ_HOST;

	fz_check_greeting_and_errors(fp, &pc);
	fz_dialogue(fp, &pc, p, n);
	fz_response(fp, (flags >> 4) & 3, p, n);
	fz_filter(fp, p, n);
}

#endif
