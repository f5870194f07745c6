/*
 * check.h - reporting for the mailgw unit tests.
 *
 * Every test program walks tables of cases. A case opens with tc_begin(),
 * records any number of failed expectations, and closes with tc_end(), which
 * prints exactly one "PASS: name" line, or one "FAIL: name: reason" line per
 * failed expectation. check_exit() gives the process exit status: 1 when any
 * case failed.
 *
 * Expected and actual byte strings are shown escaped (\r, \n, \xNN) so a
 * missing CR or a stray byte is visible in the report.
 */
#ifndef MAILGW_TEST_CHECK_H
#define MAILGW_TEST_CHECK_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

struct tcase {
	char name[160];
	unsigned nfail;
};

static unsigned check_cases, check_failed_cases;

static inline void tc_begin(struct tcase *tc, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static inline void tc_begin(struct tcase *tc, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(tc->name, sizeof(tc->name), fmt, ap);
	va_end(ap);
	tc->nfail = 0;
}

/* Record one failed expectation; always returns false so callers can chain. */
static inline bool tc_fail(struct tcase *tc, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static inline bool tc_fail(struct tcase *tc, const char *fmt, ...)
{
	va_list ap;

	printf("FAIL: %s: ", tc->name);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	tc->nfail++;
	return false;
}

static inline void tc_end(struct tcase *tc)
{
	check_cases++;
	if (tc->nfail)
		check_failed_cases++;
	else
		printf("PASS: %s\n", tc->name);
}

static inline int check_exit(const char *prog)
{
	printf("%s: %u cases, %u failed\n", prog, check_cases, check_failed_cases);
	return check_failed_cases ? 1 : 0;
}

/*
 * Escape n bytes of s into one of a few rotating static buffers, so that two
 * escaped strings can appear in the same printf. Long strings are cut with
 * "...".
 */
static inline const char *esc(const void *s, size_t n)
{
	static char ring[4][2048];
	static unsigned next;
	char *out = ring[next++ % 4];
	const unsigned char *p = s;
	size_t o = 0, i;

	if (!s)
		return "(null)";
	for (i = 0; i < n; i++) {
		unsigned char c = p[i];

		if (o + 8 >= sizeof(ring[0])) {
			memcpy(out + o, "...", 3);
			o += 3;
			break;
		}
		if (c == '\r') {
			out[o++] = '\\';
			out[o++] = 'r';
		} else if (c == '\n') {
			out[o++] = '\\';
			out[o++] = 'n';
		} else if (c == '\\' || c == '"') {
			out[o++] = '\\';
			out[o++] = (char)c;
		} else if (c < 0x20 || c >= 0x7f) {
			o += (size_t)snprintf(out + o, 5, "\\x%02x", c);
		} else {
			out[o++] = (char)c;
		}
	}
	out[o] = '\0';
	return out;
}

static inline const char *escz(const char *s)
{
	return s ? esc(s, strlen(s)) : "(null)";
}

/* got[0..glen) must equal the NUL-terminated exp. */
static inline bool expect_bytes(struct tcase *tc, const char *what, const char *exp,
				const void *got, size_t glen)
{
	size_t elen = strlen(exp);

	if (elen == glen && memcmp(exp, got, glen) == 0)
		return true;
	return tc_fail(tc, "%s: expected \"%s\" (%zu bytes), got \"%s\" (%zu bytes)", what,
		       esc(exp, elen), elen, esc(got, glen), glen);
}

/* got[0..glen) must start with the NUL-terminated prefix. */
static inline bool expect_prefix(struct tcase *tc, const char *what, const char *prefix,
				 const void *got, size_t glen)
{
	size_t plen = strlen(prefix);

	if (glen >= plen && memcmp(prefix, got, plen) == 0)
		return true;
	return tc_fail(tc, "%s: expected prefix \"%s\", got \"%s\"", what, esc(prefix, plen),
		       esc(got, glen));
}

static inline bool expect_long(struct tcase *tc, const char *what, long exp, long got)
{
	if (exp == got)
		return true;
	return tc_fail(tc, "%s: expected %ld, got %ld", what, exp, got);
}

static inline bool expect_true(struct tcase *tc, const char *what, bool cond)
{
	return cond ? true : tc_fail(tc, "%s", what);
}

#endif
