/*
 * test_keys.c - TLS 1.3 key schedule pieces the kernel TLS engine relies on
 * (offload/keys.c): HKDF-Expand-Label against RFC 8448 §3, the suite table,
 * and the key log line parser.
 *
 * Built by `make unit` (links offload/keys.c and libcrypto).
 */
#include <linux/tls.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "keys.h"

static void hex(const char *s, uint8_t *out, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned v;
		sscanf(s + 2 * i, "%2x", &v);
		out[i] = (uint8_t)v;
	}
}

static bool expect_mem(struct tcase *tc, const char *what, const uint8_t *exp,
		       const uint8_t *got, size_t n)
{
	if (memcmp(exp, got, n) == 0)
		return true;
	return tc_fail(tc, "%s: expected %s, got %s", what, esc(exp, n), esc(got, n));
}

/* RFC 8448 §3 (Simple 1-RTT Handshake): server handshake traffic keys. */
static void test_rfc8448(void)
{
	struct tcase tc;
	uint8_t secret[32], key[32], iv[12], want_key[16], want_iv[12];
	const struct keys_suite *su = keys_suite_tls13(0x1301);

	tc_begin(&tc, "keys_rfc8448_server_handshake_key_iv");
	hex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38", secret, 32);
	hex("3fce516009c21727d0f2e4e86ee403bc", want_key, 16);
	hex("5d313eb2671276ee13000b30", want_iv, 12);
	if (expect_true(&tc, "suite 0x1301 known", su != NULL) &&
	    expect_long(&tc, "derive rc", 0, keys_tls13_traffic(su, secret, 32, key, iv))) {
		expect_mem(&tc, "key", want_key, key, 16);
		expect_mem(&tc, "iv", want_iv, iv, 12);
	}
	tc_end(&tc);
}

static void test_suites(void)
{
	static const struct {
		uint16_t id;
		int cipher; /* -1: not supported */
		size_t key_len, salt_len;
		const char *digest;
	} cases[] = {
		{ 0x1301, TLS_CIPHER_AES_GCM_128, 16, 4, "SHA256" },
		{ 0x1302, TLS_CIPHER_AES_GCM_256, 32, 4, "SHA384" },
		{ 0x1303, TLS_CIPHER_CHACHA20_POLY1305, 32, 0, "SHA256" },
		{ 0x1304, -1, 0, 0, NULL }, /* AES-128-CCM: RX stays in userspace */
		{ 0xc02b, -1, 0, 0, NULL }, /* a TLS 1.2 suite id */
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct tcase tc;
		const struct keys_suite *su = keys_suite_tls13(cases[i].id);

		tc_begin(&tc, "keys_suite_0x%04x", cases[i].id);
		if (cases[i].cipher < 0) {
			expect_true(&tc, "unsupported suite gives NULL", su == NULL);
		} else if (expect_true(&tc, "suite known", su != NULL)) {
			expect_long(&tc, "kernel cipher", cases[i].cipher, su->kernel_cipher);
			expect_long(&tc, "key length", (long)cases[i].key_len, (long)su->key_len);
			expect_long(&tc, "salt length", (long)cases[i].salt_len, (long)su->salt_len);
			expect_long(&tc, "iv length", 12, (long)su->iv_len);
			expect_true(&tc, "digest", strcmp(su->digest, cases[i].digest) == 0);
		}
		tc_end(&tc);
	}
}

static void test_keylog(void)
{
	static const struct {
		const char *name, *line;
		int want;           /* return value */
		uint8_t first, last; /* first and last secret bytes when want > 0 */
	} cases[] = {
		{ "keylog_client_secret", "CLIENT_TRAFFIC_SECRET_0 00112233 a0b1c2d3e4", 5, 0xa0, 0xe4 },
		{ "keylog_uppercase_hex", "CLIENT_TRAFFIC_SECRET_0 00 A0FF", 2, 0xa0, 0xff },
		{ "keylog_other_label", "SERVER_TRAFFIC_SECRET_0 0011 a0b1", 0, 0, 0 },
		{ "keylog_label_prefix_only", "CLIENT_TRAFFIC_SECRET_00 0011 a0b1", 0, 0, 0 },
		{ "keylog_bad_hex", "CLIENT_TRAFFIC_SECRET_0 0011 a0zz", -1, 0, 0 },
		{ "keylog_odd_hex", "CLIENT_TRAFFIC_SECRET_0 0011 a0b", -1, 0, 0 },
		{ "keylog_no_random", "CLIENT_TRAFFIC_SECRET_0 a0b1", -1, 0, 0 },
		{ "keylog_too_long",
		  "CLIENT_TRAFFIC_SECRET_0 00 "
		  "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
		  "202122232425262728292a2b2c2d2e2f30", -1, 0, 0 },
		{ "keylog_sha384_size",
		  "CLIENT_TRAFFIC_SECRET_0 00 "
		  "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
		  "202122232425262728292a2b2c2d2e2f", 48, 0x00, 0x2f },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct tcase tc;
		uint8_t sec[KEYS_SECRET_MAX];
		int n;

		memset(sec, 0x55, sizeof(sec));
		n = keys_parse_keylog(cases[i].line, "CLIENT_TRAFFIC_SECRET_0", sec, sizeof(sec));
		tc_begin(&tc, "%s", cases[i].name);
		if (expect_long(&tc, "return", cases[i].want, n) && n > 0) {
			expect_long(&tc, "first byte", cases[i].first, sec[0]);
			expect_long(&tc, "last byte", cases[i].last, sec[n - 1]);
		}
		if (n < 0) {
			/* A rejected line must not leave half a secret behind. */
			size_t z = 0;
			for (size_t k = 0; k < sizeof(sec); k++)
				z += sec[k] == 0;
			expect_long(&tc, "wiped bytes", (long)sizeof(sec), (long)z);
		}
		tc_end(&tc);
	}
}

int main(void)
{
	test_rfc8448();
	test_suites();
	test_keylog();
	return check_exit("test_keys");
}
