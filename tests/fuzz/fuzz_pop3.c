/*
 * fuzz_pop3.c - libFuzzer target for the gateway's POP3 dialogue
 * (RFC 1939 AUTHORIZATION state, CAPA per RFC 2449, STLS per RFC 2595),
 * its reading of backend responses and its CAPA rewriting.
 * Input layout: see fuzz_common.h.
 *
 * Build and run from the repository root:
 *   mkdir -p build/fuzz
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Wall -Wextra -Werror -Igateway tests/fuzz/fuzz_pop3.c gateway/{buf,proto,smtp,imap,pop3,stats}.c -o build/fuzz/fuzz_pop3
 *   cp -r tests/fuzz/corpus/pop3 /tmp/corpus_pop3
 *   build/fuzz/fuzz_pop3 -max_total_time=20 /tmp/corpus_pop3
 */
#include "fuzz_common.h"

static void pop3_check_reply(const struct proto_conf *pc, const char *line, size_t len,
			     enum proto_verdict v, const struct proto_reply *r)
{
	const char *p = r->text, *end = r->text + r->len, *l, *sp;
	size_t ll, clen, nlines = 0;
	bool refuse = pc->require_tls, ok, stls = false, user = false, dot = false;

	if (!r->len)
		return;
	sp = memchr(line, ' ', len);
	clen = sp ? (size_t)(sp - line) : len;
	/* RFC 1939 §3: the first line is "+OK" or "-ERR" */
	ok = fz_starts_with(r->text, r->len, "+OK");
	FUZZ_CHECK(ok || fz_starts_with(r->text, r->len, "-ERR"));
	while (fz_next_crlf_line(&p, end, &l, &ll)) {
		if (nlines++ == 0)
			continue;
		/* only a CAPA list has more lines (RFC 2449 §5) */
		FUZZ_CHECK(ok && fz_word_is(line, clen, "CAPA"));
		FUZZ_CHECK(!dot);
		if (ll == 1 && l[0] == '.')
			dot = true;
		else if (fz_word_is(l, ll, "STLS"))
			stls = true;
		else if (fz_word_is(l, ll, "USER"))
			user = true;
	}
	if (nlines > 1) {
		FUZZ_CHECK(dot && stls == pc->starttls);
		/* USER is not advertised where it would be refused */
		FUZZ_CHECK(user == !refuse);
	}
	if (r->counter == STAT_pretls_limit)
		FUZZ_CHECK(!ok);
	else if (v == PV_STARTTLS)
		FUZZ_CHECK(ok);
	else if (v == PV_CLOSE)
		FUZZ_CHECK(ok && fz_word_is(line, clen, "QUIT"));
	if (refuse && ok)
		FUZZ_CHECK(fz_word_is(line, clen, "CAPA") || fz_word_is(line, clen, "STLS") ||
			   fz_word_is(line, clen, "NOOP") || fz_word_is(line, clen, "QUIT"));
	if (refuse && r->counter != STAT_pretls_limit &&
	    (fz_word_is(line, clen, "USER") || fz_word_is(line, clen, "PASS") ||
	     fz_word_is(line, clen, "APOP") || fz_word_is(line, clen, "AUTH")))
		FUZZ_CHECK(!ok && r->counter == STAT_require_tls_refused);
}

static void pop3_check_resp(const struct proto_resp *st, const char *line, size_t len, int ret)
{
	if (st->nlines == 1) {
		bool pos = len >= 3 && memcmp(line, "+OK", 3) == 0;
		bool neg = len >= 4 && memcmp(line, "-ERR", 4) == 0;

		if (pos)
			FUZZ_CHECK(st->ok && ret == (st->what == RESP_CAPS ? 0 : 1));
		else if (neg)
			FUZZ_CHECK(!st->ok && ret == 1);
		else
			FUZZ_CHECK(ret == -1);
		return;
	}
	/* RFC 2449 §5 / RFC 1939 §3: a multi-line reply ends with a line of one "." */
	FUZZ_CHECK(st->what == RESP_CAPS);
	FUZZ_CHECK(ret == ((len == 1 && line[0] == '.') ? 1 : 0));
}

static void pop3_check_filtered(const char *out, size_t n)
{
	const char *p = out, *end = out + n, *l;
	size_t ll, nlines = 0;

	while (fz_next_any_line(&p, end, &l, &ll)) {
		size_t k;

		if (nlines++ == 0)
			continue; /* the status line */
		/* RFC 2449 §6: a capability line is a tag, then parameters */
		for (k = 0; k < ll && l[k] != ' '; k++)
			;
		FUZZ_CHECK(!fz_word_is(l, k, "STLS"));
#if FUZZ_STRICT
		/* stricter: a tab or a stray CR also ends the tag */
		for (k = 0; k < ll && l[k] != ' ' && l[k] != '\t' && l[k] != '\r'; k++)
			;
		FUZZ_CHECK(!fz_word_is(l, k, "STLS"));
#endif
	}
}

static const struct fuzz_proto pop3_fuzz = {
	.kind = PROTO_POP3,
	.caps_cmd = "CAPA",
	.check_reply = pop3_check_reply,
	.check_resp = pop3_check_resp,
	.check_filtered = pop3_check_filtered,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_run(&pop3_fuzz, data, size);
	return 0;
}
