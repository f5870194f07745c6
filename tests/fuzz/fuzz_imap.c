/*
 * fuzz_imap.c - libFuzzer target for the gateway's IMAP dialogue
 * (RFC 9051 not-authenticated state, STARTTLS §6.2.1, LOGINDISABLED §6.2.3),
 * its reading of backend responses and its capability rewriting.
 * Input layout: see fuzz_common.h.
 *
 * Build and run from the repository root:
 *   mkdir -p build/fuzz
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Wall -Wextra -Werror -Igateway tests/fuzz/fuzz_imap.c gateway/{buf,proto,smtp,imap,pop3,stats}.c -o build/fuzz/fuzz_imap
 *   cp -r tests/fuzz/corpus/imap /tmp/corpus_imap
 *   build/fuzz/fuzz_imap -max_total_time=20 /tmp/corpus_imap
 */
#include "fuzz_common.h"

/* RFC 9051 §9: tag = 1*<any ASTRING-CHAR except "+">; the gateway caps it at 63. */
static bool rfc_tag(const char *t, size_t n)
{
	size_t i;

	if (n == 0 || n > 63)
		return false;
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)t[i];

		if (c <= 0x1f || c == 0x7f || c >= 0x80 || c == ' ' || c == '(' || c == ')' ||
		    c == '{' || c == '%' || c == '*' || c == '"' || c == '\\' || c == '+')
			return false;
	}
	return true;
}

/* Does the capability list in [p, p+n) name `word` (space-separated)? */
static bool caps_have(const char *p, size_t n, const char *word, bool any_space)
{
	size_t i = 0;

	while (i < n) {
		size_t s;

		while (i < n && (p[i] == ' ' || (any_space && (p[i] == '\t' || p[i] == '\r'))))
			i++;
		s = i;
		while (i < n && p[i] != ' ' && !(any_space && (p[i] == '\t' || p[i] == '\r')))
			i++;
		if (i > s && fz_word_is(p + s, i - s, word))
			return true;
	}
	return false;
}

static void imap_check_reply(const struct proto_conf *pc, const char *line, size_t len,
			     enum proto_verdict v, const struct proto_reply *r)
{
	const char *p = r->text, *end = r->text + r->len, *l, *sp, *cmd;
	const char *tagged = NULL;
	size_t ll, tlen, clen, tagged_len = 0;

	if (!r->len)
		return;
	sp = memchr(line, ' ', len);
	tlen = sp ? (size_t)(sp - line) : len;
	cmd = sp ? sp + 1 : line + len;
	while (cmd < line + len && *cmd == ' ')
		cmd++;
	sp = memchr(cmd, ' ', (size_t)(line + len - cmd));
	clen = sp ? (size_t)(sp - cmd) : (size_t)(line + len - cmd);

	while (fz_next_crlf_line(&p, end, &l, &ll)) {
		if (ll >= 2 && l[0] == '*' && l[1] == ' ') {
			/* untagged: the capability list follows the listener's settings */
			if (fz_starts_with(l, ll, "* CAPABILITY ")) {
				FUZZ_CHECK(caps_have(l + 13, ll - 13, "STARTTLS", true) ==
					   pc->starttls);
				/* LOGINDISABLED only where LOGIN is refused; always where
				 * STARTTLS is the way out (RFC 9051 §6.2.3) */
				bool ld = caps_have(l + 13, ll - 13, "LOGINDISABLED", true);

				FUZZ_CHECK(!ld || pc->require_tls);
				FUZZ_CHECK(ld || !(pc->require_tls && pc->starttls));
			}
			FUZZ_CHECK(tagged == NULL); /* nothing after the tagged completion */
			continue;
		}
		/* tagged: only ever the client's own tag, and only a valid one */
		FUZZ_CHECK(rfc_tag(line, tlen));
		FUZZ_CHECK(ll > tlen && memcmp(l, line, tlen) == 0 && l[tlen] == ' ');
		FUZZ_CHECK(fz_starts_with(l + tlen + 1, ll - tlen - 1, "OK ") ||
			   fz_starts_with(l + tlen + 1, ll - tlen - 1, "NO ") ||
			   fz_starts_with(l + tlen + 1, ll - tlen - 1, "BAD "));
		FUZZ_CHECK(tagged == NULL);
		tagged = l + tlen + 1;
		tagged_len = ll - tlen - 1;
	}
	if (r->counter == STAT_pretls_limit) {
		FUZZ_CHECK(v == PV_CLOSE && !tagged && fz_starts_with(r->text, r->len, "* BYE "));
		return;
	}
	if (!rfc_tag(line, tlen)) {
		/* an unusable tag is never echoed */
		FUZZ_CHECK(!tagged && v == PV_REPLY && fz_starts_with(r->text, r->len, "* BAD "));
		return;
	}
	FUZZ_CHECK(tagged != NULL);
	if (v == PV_STARTTLS)
		FUZZ_CHECK(fz_starts_with(tagged, tagged_len, "OK "));
	if (v == PV_CLOSE)
		FUZZ_CHECK(fz_word_is(cmd, clen, "LOGOUT"));
	if (pc->require_tls && fz_starts_with(tagged, tagged_len, "OK "))
		FUZZ_CHECK(fz_word_is(cmd, clen, "CAPABILITY") || fz_word_is(cmd, clen, "NOOP") ||
			   fz_word_is(cmd, clen, "LOGOUT") || fz_word_is(cmd, clen, "ID") ||
			   fz_word_is(cmd, clen, "STARTTLS"));
	if (pc->require_tls &&
	    (fz_word_is(cmd, clen, "LOGIN") || fz_word_is(cmd, clen, "AUTHENTICATE")))
		FUZZ_CHECK(fz_starts_with(tagged, tagged_len, "NO [PRIVACYREQUIRED]") &&
			   r->counter == STAT_require_tls_refused);
}

static void imap_check_resp(const struct proto_resp *st, const char *line, size_t len, int ret)
{
	if (st->what == RESP_GREETING) {
		/* RFC 9051 §7.1: the greeting is one untagged OK, PREAUTH or BYE */
		bool good = fz_starts_with(line, len, "* OK") || fz_starts_with(line, len, "* PREAUTH");
		bool bye = fz_starts_with(line, len, "* BYE");

		FUZZ_CHECK(ret != 0);
		if (ret == 1)
			FUZZ_CHECK((good || bye) && st->ok == good);
		else
			FUZZ_CHECK(!good && !bye);
		return;
	}
	/* the capability reply: untagged lines, then "a1 OK|NO|BAD" */
	if (ret == 0)
		FUZZ_CHECK(len >= 2 && line[0] == '*' && line[1] == ' ');
	else if (ret == 1) /* a bare "a1 " counts as a (negative) completion */
		FUZZ_CHECK(len >= 3 && memcmp(line, "a1 ", 3) == 0 &&
			   st->ok == fz_starts_with(line + 3, len - 3, "OK"));
	else
		FUZZ_CHECK(!(len >= 2 && line[0] == '*' && line[1] == ' ') &&
			   !(len >= 3 && memcmp(line, "a1 ", 3) == 0));
}

/* The first "[CAPABILITY " code in a line, any case, or NULL. */
static const char *find_code(const char *l, size_t ll)
{
	size_t i;

	for (i = 0; i + 12 <= ll; i++)
		if (fz_word_is(l + i, 12, "[CAPABILITY "))
			return l + i;
	return NULL;
}

/*
 * Capabilities inside "[CAPABILITY ...]": the first such code of the line,
 * matched case-insensitively (RFC 9051 §9: atoms are case-insensitive).
 * strict: every code of the line, any whitespace between words.
 */
static void check_code_caps(const char *l, size_t ll, bool strict)
{
	const char *code = find_code(l, ll);

	while (code) {
		const char *in = code + 12, *close = memchr(in, ']', (size_t)(l + ll - in));

		if (!close)
			return;
		FUZZ_CHECK(!caps_have(in, (size_t)(close - in), "STARTTLS", strict));
		FUZZ_CHECK(!caps_have(in, (size_t)(close - in), "LOGINDISABLED", strict));
		if (!strict)
			return;
		code = find_code(close, (size_t)(l + ll - close));
	}
}

static void imap_check_filtered(const char *out, size_t n)
{
	const char *p = out, *end = out + n, *l;
	size_t ll;

	while (fz_next_any_line(&p, end, &l, &ll)) {
		if (fz_starts_with(l, ll, "* CAPABILITY ")) {
			FUZZ_CHECK(!caps_have(l + 13, ll - 13, "STARTTLS", false));
			FUZZ_CHECK(!caps_have(l + 13, ll - 13, "LOGINDISABLED", false));
		} else {
			check_code_caps(l, ll, false);
		}
#if FUZZ_STRICT
		/* stricter: any whitespace separates words, and every code counts,
		 * even one inside a "* CAPABILITY" line */
		if (fz_starts_with(l, ll, "* CAPABILITY ")) {
			FUZZ_CHECK(!caps_have(l + 13, ll - 13, "STARTTLS", true));
			FUZZ_CHECK(!caps_have(l + 13, ll - 13, "LOGINDISABLED", true));
		}
		check_code_caps(l, ll, true);
#endif
	}
}

static const struct fuzz_proto imap_fuzz = {
	.kind = PROTO_IMAP,
	.caps_cmd = "a1 CAPABILITY",
	.check_reply = imap_check_reply,
	.check_resp = imap_check_resp,
	.check_filtered = imap_check_filtered,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_run(&imap_fuzz, data, size);
	return 0;
}
