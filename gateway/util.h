/*
 * util.h - small helpers shared by every gateway module: clocks, bounded
 * string copies, array sizes. Nothing here allocates or logs.
 */
#ifndef MAILGW_UTIL_H
#define MAILGW_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* Milliseconds on the monotonic clock: every timeout in the gateway. */
static inline uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Microseconds on the monotonic clock: durations worth a histogram. */
static inline uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Copy with truncation, always NUL-terminated; returns the source length. */
static inline size_t strlcpy0(char *dst, const char *src, size_t cap)
{
	size_t n = strlen(src);

	if (cap) {
		size_t c = n < cap - 1 ? n : cap - 1;
		memcpy(dst, src, c);
		dst[c] = '\0';
	}
	return n;
}

/* ASCII case-insensitive compare of a length-delimited token with a word. */
static inline int token_is(const char *tok, size_t len, const char *word)
{
	size_t i;

	for (i = 0; i < len; i++) {
		char a = tok[i], b = word[i];
		if (b == '\0')
			return 0;
		if (a >= 'a' && a <= 'z')
			a = (char)(a - 32);
		if (b >= 'a' && b <= 'z')
			b = (char)(b - 32);
		if (a != b)
			return 0;
	}
	return word[len] == '\0';
}

#endif
