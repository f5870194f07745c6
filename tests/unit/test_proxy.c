/*
 * test_proxy.c - unit tests for the PROXY protocol header builders
 * (gateway/proxy.c; HAProxy proxy-protocol.txt, v1 text and v2 binary).
 *
 * Build and run from the repository root:
 *   mkdir -p build/tests
 *   gcc -std=gnu11 -Wall -Wextra -Werror -Igateway tests/unit/test_proxy.c gateway/buf.c gateway/proto.c gateway/smtp.c gateway/imap.c gateway/pop3.c gateway/stats.c gateway/proxy.c -o build/tests/test_proxy
 *   build/tests/test_proxy
 * and the same with -fsanitize=address,undefined -fno-sanitize-recover=all
 * added to the gcc line.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "check.h"
#include "proxy.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

struct addr {
	int family; /* AF_INET, AF_INET6 or AF_UNIX */
	const char *ip;
	unsigned port;
};

static void make_addr(const struct addr *a, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	ss->ss_family = (sa_family_t)a->family;
	if (a->family == AF_INET) {
		struct sockaddr_in *s = (struct sockaddr_in *)ss;

		if (inet_pton(AF_INET, a->ip, &s->sin_addr) != 1)
			abort();
		s->sin_port = htons((uint16_t)a->port);
	} else if (a->family == AF_INET6) {
		struct sockaddr_in6 *s = (struct sockaddr_in6 *)ss;

		if (inet_pton(AF_INET6, a->ip, &s->sin6_addr) != 1)
			abort();
		s->sin6_port = htons((uint16_t)a->port);
	} else if (a->family == AF_UNIX) {
		struct sockaddr_un *s = (struct sockaddr_un *)ss;

		strncpy(s->sun_path, a->ip, sizeof(s->sun_path) - 1);
	}
}

#define V4(ip, port) { AF_INET, (ip), (port) }
#define V6(ip, port) { AF_INET6, (ip), (port) }
#define UNIX(path) { AF_UNIX, (path), 0 }

/* ======================================================================
 * v1 (proxy-protocol.txt §2.1)
 * ====================================================================== */

struct v1_case {
	const char *name;
	struct addr src, dst;
	size_t cap;       /* output buffer; 128 when 0 */
	const char *out;  /* NULL: expect -1 */
};

#define V6MAX "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

static const struct v1_case v1_cases[] = {
	{ "IPv4", V4("192.0.2.10", 51234), V4("198.51.100.1", 25), 0,
	  "PROXY TCP4 192.0.2.10 198.51.100.1 51234 25\r\n" },
	{ "IPv4 port 0 and 65535", V4("0.0.0.0", 0), V4("255.255.255.255", 65535), 0,
	  "PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n" },
	{ "IPv6", V6("2001:db8::10", 51234), V6("2001:db8::1", 143), 0,
	  "PROXY TCP6 2001:db8::10 2001:db8::1 51234 143\r\n" },
	{ "IPv6 loopback", V6("::1", 40000), V6("::1", 110), 0,
	  "PROXY TCP6 ::1 ::1 40000 110\r\n" },
	{ "IPv4-mapped IPv6", V6("::ffff:192.0.2.10", 1025), V6("::ffff:198.51.100.1", 993), 0,
	  "PROXY TCP6 ::ffff:192.0.2.10 ::ffff:198.51.100.1 1025 993\r\n" },
	{ "longest IPv6 header (104 bytes)", V6(V6MAX, 65535), V6(V6MAX, 65535), 0,
	  "PROXY TCP6 " V6MAX " " V6MAX " 65535 65535\r\n" },
	{ "longest IPv6 header, buffer just big enough", V6(V6MAX, 65535), V6(V6MAX, 65535), 105,
	  "PROXY TCP6 " V6MAX " " V6MAX " 65535 65535\r\n" },
	{ "longest IPv6 header, buffer one byte short", V6(V6MAX, 65535), V6(V6MAX, 65535), 104,
	  NULL },
	{ "IPv4 buffer just big enough", V4("192.0.2.10", 51234), V4("198.51.100.1", 25), 46,
	  "PROXY TCP4 192.0.2.10 198.51.100.1 51234 25\r\n" },
	{ "IPv4 buffer too small", V4("192.0.2.10", 51234), V4("198.51.100.1", 25), 45, NULL },
	{ "IPv4 tiny buffer", V4("192.0.2.10", 51234), V4("198.51.100.1", 25), 1, NULL },
	{ "mixed families IPv4/IPv6", V4("192.0.2.10", 1), V6("2001:db8::1", 25), 0, NULL },
	{ "mixed families IPv6/IPv4", V6("2001:db8::1", 1), V4("192.0.2.10", 25), 0, NULL },
	{ "AF_UNIX", UNIX("/run/a.sock"), UNIX("/run/b.sock"), 0, NULL },
};

static void run_v1_case(const struct v1_case *c)
{
	struct sockaddr_storage src, dst;
	size_t cap = c->cap ? c->cap : 128;
	char *out = malloc(cap); /* exact size: ASan sees overruns */
	struct tcase tc;
	long n;

	tc_begin(&tc, "proxy v1: %s", c->name);
	if (!out)
		abort();
	make_addr(&c->src, &src);
	make_addr(&c->dst, &dst);
	n = proxy_build_v1((struct sockaddr *)&src, (struct sockaddr *)&dst, out, cap);
	if (!c->out) {
		expect_long(&tc, "result", -1, n);
	} else if (n < 0 || (size_t)n >= cap) {
		tc_fail(&tc, "expected \"%s\", got %ld (cap %zu)", escz(c->out), n, cap);
	} else {
		expect_bytes(&tc, "header", c->out, out, (size_t)n);
		expect_true(&tc, "header over 107 bytes", n <= 107);
	}
	free(out);
	tc_end(&tc);
}

/* ======================================================================
 * v2 (proxy-protocol.txt §2.2)
 * ====================================================================== */

/*
 * Expected bytes are written as space-separated tokens: hex digits
 * ("0d0a 21"), or 'text' in single quotes for ASCII (no spaces inside).
 * Returns the byte count, or -1 on a malformed spec.
 */
static long parse_spec(const char *spec, unsigned char *out, size_t cap)
{
	size_t n = 0;
	const char *p = spec;

	while (*p) {
		if (*p == ' ') {
			p++;
		} else if (*p == '\'') {
			const char *q = strchr(p + 1, '\'');
			size_t l;

			if (!q)
				return -1;
			l = (size_t)(q - p - 1);
			if (n + l > cap)
				return -1;
			memcpy(out + n, p + 1, l);
			n += l;
			p = q + 1;
		} else {
			unsigned hi, lo;

			if (sscanf(p, "%1x%1x", &hi, &lo) != 2 || n >= cap)
				return -1;
			out[n++] = (unsigned char)(hi << 4 | lo);
			p += 2;
		}
	}
	return (long)n;
}

#define SIG "0d0a0d0a000d0a515549540a"

struct v2_case {
	const char *name;
	struct addr src, dst;
	bool tls;                   /* pass tls_info below */
	struct proxy_tls_info info;
	size_t cap;                 /* output buffer; PROXY_HDR_MAX when 0 */
	const char *out;            /* spec; NULL: expect -1 */
};

#define TLS13 "TLSv1.3"
#define AES256 "TLS_AES_256_GCM_SHA384"

/* 192.0.2.10:51234 -> 198.51.100.1:25 */
#define V4_BODY "c000020a c6336401 c822 0019"
/* [2001:db8::10]:51234 -> [2001:db8::1]:143 */
#define V6_BODY                                                             \
	"20010db8000000000000000000000010 20010db8000000000000000000000001 " \
	"c822 008f"
/* SSL TLV: client=PP2_CLIENT_SSL, verify=0, then version and cipher sub-TLVs */
#define SSL_TLV_FULL "20 0028 01 00000000 21 0007 'TLSv1.3' 23 0016 'TLS_AES_256_GCM_SHA384'"
#define SSL_TLV_NOCIPHER "20 000f 01 00000000 21 0007 'TLSv1.3'"
#define AUTH_TLV "02 0010 'mail.example.com'"

static const struct v2_case v2_cases[] = {
	{ "IPv4 without TLS", V4("192.0.2.10", 51234), V4("198.51.100.1", 25), false, { 0 }, 0,
	  SIG " 21 11 000c " V4_BODY },
	{ "IPv6 without TLS", V6("2001:db8::10", 51234), V6("2001:db8::1", 143), false, { 0 }, 0,
	  SIG " 21 21 0024 " V6_BODY },
	{ "IPv4 plaintext session (tls info without version)", V4("192.0.2.10", 51234),
	  V4("198.51.100.1", 25), true, { NULL, NULL, NULL }, 0, SIG " 21 11 000c " V4_BODY },
	{ "IPv4 TLS with cipher and SNI", V4("192.0.2.10", 51234), V4("198.51.100.1", 25), true,
	  { TLS13, AES256, "mail.example.com" }, 0,
	  SIG " 21 11 004a " V4_BODY " " AUTH_TLV " " SSL_TLV_FULL },
	{ "IPv6 TLS with cipher and SNI", V6("2001:db8::10", 51234), V6("2001:db8::1", 143), true,
	  { TLS13, AES256, "mail.example.com" }, 0,
	  SIG " 21 21 0062 " V6_BODY " " AUTH_TLV " " SSL_TLV_FULL },
	{ "IPv4 TLS without SNI", V4("192.0.2.10", 51234), V4("198.51.100.1", 25), true,
	  { TLS13, AES256, NULL }, 0, SIG " 21 11 0037 " V4_BODY " " SSL_TLV_FULL },
	{ "IPv4 TLS with empty SNI", V4("192.0.2.10", 51234), V4("198.51.100.1", 25), true,
	  { TLS13, AES256, "" }, 0, SIG " 21 11 0037 " V4_BODY " " SSL_TLV_FULL },
	{ "IPv4 TLS without cipher", V4("192.0.2.10", 51234), V4("198.51.100.1", 25), true,
	  { TLS13, NULL, NULL }, 0, SIG " 21 11 001e " V4_BODY " " SSL_TLV_NOCIPHER },
	{ "IPv6 TLS, buffer exactly big enough", V6("2001:db8::10", 51234), V6("2001:db8::1", 143),
	  true, { TLS13, AES256, "mail.example.com" }, 114,
	  SIG " 21 21 0062 " V6_BODY " " AUTH_TLV " " SSL_TLV_FULL },
	{ "IPv6 TLS, buffer one byte short", V6("2001:db8::10", 51234),
	  V6("2001:db8::1", 143), true, { TLS13, AES256, "mail.example.com" }, 113, NULL },
	{ "IPv6 TLS, no room for the SSL TLV", V6("2001:db8::10", 51234), V6("2001:db8::1", 143),
	  true, { TLS13, AES256, "mail.example.com" }, 71, NULL },
	{ "IPv6 TLS, no room for the authority TLV", V6("2001:db8::10", 51234),
	  V6("2001:db8::1", 143), true, { TLS13, AES256, "mail.example.com" }, 70, NULL },
	{ "IPv6 without TLS, buffer exactly big enough", V6("2001:db8::10", 51234),
	  V6("2001:db8::1", 143), false, { 0 }, 52, SIG " 21 21 0024 " V6_BODY },
	{ "IPv6 buffer one byte short", V6("2001:db8::10", 51234), V6("2001:db8::1", 143), false,
	  { 0 }, 51, NULL },
	{ "tiny buffer", V4("192.0.2.10", 51234), V4("198.51.100.1", 25), false, { 0 }, 16, NULL },
	{ "mixed families", V4("192.0.2.10", 51234), V6("2001:db8::1", 25), false, { 0 }, 0, NULL },
	{ "AF_UNIX", UNIX("/run/a.sock"), UNIX("/run/b.sock"), false, { 0 }, 0, NULL },
};

/* Structural checks every v2 header must pass (proxy-protocol.txt §2.2). */
static void check_v2_structure(struct tcase *tc, const unsigned char *h, size_t n)
{
	static const unsigned char sig[12] = { 0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
					       0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a };
	size_t len, addr, off;

	if (n < 16 || memcmp(h, sig, 12) != 0) {
		tc_fail(tc, "no v2 signature");
		return;
	}
	if (h[12] != 0x21)
		tc_fail(tc, "version/command byte 0x%02x, expected 0x21", h[12]);
	len = (size_t)h[14] << 8 | h[15];
	if (len != n - 16)
		tc_fail(tc, "length field %zu but %zu bytes follow the header", len, n - 16);
	addr = h[13] == 0x11 ? 12 : h[13] == 0x21 ? 36 : 0;
	if (!addr) {
		tc_fail(tc, "family byte 0x%02x is neither TCP4 nor TCP6", h[13]);
		return;
	}
	for (off = 16 + addr; off < n;) {
		size_t tl;

		if (n - off < 3) {
			tc_fail(tc, "truncated TLV header at %zu", off);
			return;
		}
		tl = (size_t)h[off + 1] << 8 | h[off + 2];
		if (n - off - 3 < tl) {
			tc_fail(tc, "TLV 0x%02x at %zu overruns the header", h[off], off);
			return;
		}
		if (h[off] == PP2_TYPE_SSL) {
			size_t s = off + 3 + 5, e = off + 3 + tl;

			if (tl < 5 || !(h[off + 3] & PP2_CLIENT_SSL))
				tc_fail(tc, "SSL TLV without PP2_CLIENT_SSL");
			while (s < e) {
				size_t sl;

				if (e - s < 3) {
					tc_fail(tc, "truncated SSL sub-TLV");
					return;
				}
				sl = (size_t)h[s + 1] << 8 | h[s + 2];
				if (e - s - 3 < sl) {
					tc_fail(tc, "SSL sub-TLV overruns its parent");
					return;
				}
				s += 3 + sl;
			}
		}
		off += 3 + tl;
	}
}

static void run_v2_case(const struct v2_case *c)
{
	struct sockaddr_storage src, dst;
	size_t cap = c->cap ? c->cap : PROXY_HDR_MAX;
	unsigned char *out = malloc(cap); /* exact size: ASan sees overruns */
	unsigned char want[PROXY_HDR_MAX];
	struct tcase tc;
	long n, wn;

	tc_begin(&tc, "proxy v2: %s", c->name);
	if (!out)
		abort();
	make_addr(&c->src, &src);
	make_addr(&c->dst, &dst);
	n = proxy_build_v2((struct sockaddr *)&src, (struct sockaddr *)&dst,
			   c->tls ? &c->info : NULL, out, cap);
	if (!c->out) {
		expect_long(&tc, "result", -1, n);
	} else if ((wn = parse_spec(c->out, want, sizeof(want))) < 0) {
		tc_fail(&tc, "bad expected-bytes spec in the table");
	} else if (n < 0 || (size_t)n > cap) {
		tc_fail(&tc, "expected %ld bytes, got %ld (cap %zu)", wn, n, cap);
	} else {
		if (n != wn || memcmp(out, want, (size_t)n) != 0) {
			size_t i = 0;

			while (i < (size_t)n && i < (size_t)wn && out[i] == want[i])
				i++;
			tc_fail(&tc, "expected %ld bytes, got %ld; first difference at byte %zu "
				"(expected 0x%02x, got 0x%02x)", wn, n, i,
				i < (size_t)wn ? want[i] : 0, i < (size_t)n ? out[i] : 0);
		}
		check_v2_structure(&tc, out, (size_t)n);
	}
	free(out);
	tc_end(&tc);
}

/* The largest header the gateway can build must fit PROXY_HDR_MAX. */
static void run_v2_largest(void)
{
	struct addr a = V6(V6MAX, 65535);
	struct sockaddr_storage src, dst;
	unsigned char *out = malloc(PROXY_HDR_MAX);
	char sni[256];
	struct proxy_tls_info info = {
		.version = "TLSv1.3",
		/* one of the longest IANA cipher suite names */
		.cipher = "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
		.sni = sni,
	};
	struct tcase tc;
	long n;

	tc_begin(&tc, "proxy v2: 255-byte SNI, IPv6 and TLS fit PROXY_HDR_MAX");
	if (!out)
		abort();
	memset(sni, 'a', 255);
	sni[255] = '\0';
	make_addr(&a, &src);
	make_addr(&a, &dst);
	n = proxy_build_v2((struct sockaddr *)&src, (struct sockaddr *)&dst, &info, out,
			   PROXY_HDR_MAX);
	if (n < 0)
		tc_fail(&tc, "proxy_build_v2 returned -1");
	else
		check_v2_structure(&tc, out, (size_t)n);
	free(out);
	tc_end(&tc);
}

int main(void)
{
	size_t i;

	for (i = 0; i < N_ELEMS(v1_cases); i++)
		run_v1_case(&v1_cases[i]);
	for (i = 0; i < N_ELEMS(v2_cases); i++)
		run_v2_case(&v2_cases[i]);
	run_v2_largest();
	return check_exit("test_proxy");
}
