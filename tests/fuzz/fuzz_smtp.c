/*
 * fuzz_smtp.c - libFuzzer target for the gateway's SMTP dialogue
 * (RFC 5321, STARTTLS per RFC 3207), its reading of backend replies and its
 * EHLO-reply rewriting. Input layout: see fuzz_common.h.
 *
 * Build and run from the repository root:
 *   mkdir -p build/fuzz
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Wall -Wextra -Werror -Igateway tests/fuzz/fuzz_smtp.c gateway/{buf,proto,smtp,imap,pop3,stats}.c -o build/fuzz/fuzz_smtp
 *   cp -r tests/fuzz/corpus/smtp /tmp/corpus_smtp
 *   build/fuzz/fuzz_smtp -max_total_time=20 /tmp/corpus_smtp
 */
#include "fuzz_common.h"

static bool code_ok(const char *l, size_t n)
{
	return n >= 3 && l[0] >= '1' && l[0] <= '5' && l[1] >= '0' && l[1] <= '9' &&
	       l[2] >= '0' && l[2] <= '9';
}

/* The verb as the gateway sees it: everything up to the first space. */
static void verb_of(const char *line, size_t len, const char **verb, size_t *vlen)
{
	const char *sp = memchr(line, ' ', len);

	*verb = line;
	*vlen = sp ? (size_t)(sp - line) : len;
}

static void smtp_check_reply(const struct proto_conf *pc, const char *line, size_t len,
			     enum proto_verdict v, const struct proto_reply *r)
{
	const char *p = r->text, *end = r->text + r->len, *l, *verb;
	size_t ll, vlen, nlines = 0;
	char code[3] = { 0 };
	bool saw_starttls = false;

	if (!r->len)
		return;
	verb_of(line, len, &verb, &vlen);
	/* RFC 5321 §4.2.1: every line "xyz-", the last "xyz ", one code throughout */
	while (fz_next_crlf_line(&p, end, &l, &ll)) {
		FUZZ_CHECK(code_ok(l, ll) && ll >= 4);
		if (nlines++ == 0)
			memcpy(code, l, 3);
		FUZZ_CHECK(memcmp(code, l, 3) == 0);
		FUZZ_CHECK(l[3] == (p == end ? ' ' : '-'));
		if (fz_word_is(l + 4, ll - 4, "STARTTLS"))
			saw_starttls = true;
	}
	if (v == PV_STARTTLS)
		FUZZ_CHECK(memcmp(code, "220", 3) == 0);
	if (v == PV_CLOSE)
		FUZZ_CHECK(memcmp(code, "221", 3) == 0 || memcmp(code, "421", 3) == 0);
	if (r->counter == STAT_require_tls_refused)
		FUZZ_CHECK(memcmp(code, "530", 3) == 0);
	/* the EHLO keyword list offers STARTTLS exactly when the listener does */
	if (fz_word_is(verb, vlen, "EHLO") && code[0] == '2')
		FUZZ_CHECK(saw_starttls == pc->starttls);
	else
		FUZZ_CHECK(!saw_starttls);
	/* require_tls: nothing but the basics ever gets a positive answer */
	if (pc->require_tls && (code[0] == '2' || code[0] == '3'))
		FUZZ_CHECK(fz_word_is(verb, vlen, "EHLO") || fz_word_is(verb, vlen, "HELO") ||
			   fz_word_is(verb, vlen, "NOOP") || fz_word_is(verb, vlen, "RSET") ||
			   fz_word_is(verb, vlen, "QUIT") || fz_word_is(verb, vlen, "STARTTLS"));
}

static void smtp_check_resp(const struct proto_resp *st, const char *line, size_t len, int ret)
{
	bool final = code_ok(line, len) && (len == 3 || line[3] == ' ');
	bool cont = code_ok(line, len) && len >= 4 && line[3] == '-';

	/* RFC 5321 §4.2: "xyz-..." continues, "xyz ..." or "xyz" ends, anything else is wrong */
	if (ret == 1)
		FUZZ_CHECK(final && st->ok == (line[0] == '2'));
	else if (ret == 0)
		FUZZ_CHECK(cont);
	else
		FUZZ_CHECK(!final && !cont);
}

static void smtp_check_filtered(const char *out, size_t n)
{
	const char *p = out, *end = out + n, *l, *last = NULL;
	size_t ll, last_len = 0;

	while (fz_next_any_line(&p, end, &l, &ll)) {
		if (ll >= 4) {
			/* RFC 5321 ehlo-line = ehlo-keyword *( SP ehlo-param ): the keyword
			 * is the first word, whatever parameters follow it. */
			const char *kw = l + 4;
			size_t kl = ll - 4, k = 0;

			while (k < kl && kw[k] != ' ')
				k++;
			FUZZ_CHECK(!fz_word_is(kw, k, "STARTTLS"));
#if FUZZ_STRICT
			/* stricter: a tab or a stray CR also ends the keyword */
			for (k = 0; k < kl && kw[k] != ' ' && kw[k] != '\t' && kw[k] != '\r'; k++)
				;
			FUZZ_CHECK(!fz_word_is(kw, k, "STARTTLS"));
#endif
		}
		last = l;
		last_len = ll;
	}
	/* the rewritten reply always ends: its last line is never a continuation */
	if (last && last_len >= 4)
		FUZZ_CHECK(last[3] != '-');
}

static const struct fuzz_proto smtp_fuzz = {
	.kind = PROTO_SMTP,
	.caps_cmd = "EHLO gw.example",
	.check_reply = smtp_check_reply,
	.check_resp = smtp_check_resp,
	.check_filtered = smtp_check_filtered,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_run(&smtp_fuzz, data, size);
	return 0;
}
