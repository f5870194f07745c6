/*
 * keys.c - TLS 1.3 key schedule pieces (RFC 8446 §7.1, §7.3) on top of
 * OpenSSL's HKDF.
 */
#include "keys.h"

#include <linux/tls.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <string.h>

static const struct keys_suite suites[] = {
	{ 0x1301, TLS_CIPHER_AES_GCM_128, "SHA256", 16, 12, 4 },
	{ 0x1302, TLS_CIPHER_AES_GCM_256, "SHA384", 32, 12, 4 },
	{ 0x1303, TLS_CIPHER_CHACHA20_POLY1305, "SHA256", 32, 12, 0 },
};

const struct keys_suite *keys_suite_tls13(uint16_t tls_id)
{
	size_t i;

	for (i = 0; i < sizeof(suites) / sizeof(suites[0]); i++)
		if (suites[i].tls_id == tls_id)
			return &suites[i];
	return NULL;
}

int keys_hkdf_expand_label(const char *digest, const uint8_t *secret, size_t secret_len,
			   const char *label, uint8_t *out, size_t out_len)
{
	/* struct { uint16 length; opaque label<7..255>; opaque context<0..255>; } */
	uint8_t info[2 + 1 + 255 + 1];
	size_t ll = strlen(label), n = 0;
	int mode = EVP_KDF_HKDF_MODE_EXPAND_ONLY, rc = -1;
	EVP_KDF *kdf = NULL;
	EVP_KDF_CTX *kctx = NULL;
	OSSL_PARAM params[5];

	if (ll + 6 > 255 || out_len > 0xffff)
		return -1;
	info[n++] = (uint8_t)(out_len >> 8);
	info[n++] = (uint8_t)out_len;
	info[n++] = (uint8_t)(6 + ll);
	memcpy(info + n, "tls13 ", 6);
	n += 6;
	memcpy(info + n, label, ll);
	n += ll;
	info[n++] = 0; /* empty context */

	kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
	if (!kdf)
		goto out;
	kctx = EVP_KDF_CTX_new(kdf);
	if (!kctx)
		goto out;
	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)digest, 0);
	params[1] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)secret,
						      secret_len);
	params[2] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info, n);
	params[3] = OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode);
	params[4] = OSSL_PARAM_construct_end();
	if (EVP_KDF_derive(kctx, out, out_len, params) == 1)
		rc = 0;
out:
	EVP_KDF_CTX_free(kctx);
	EVP_KDF_free(kdf);
	return rc;
}

int keys_tls13_traffic(const struct keys_suite *su, const uint8_t *secret, size_t secret_len,
		       uint8_t *key, uint8_t *iv)
{
	if (keys_hkdf_expand_label(su->digest, secret, secret_len, "key", key, su->key_len) ||
	    keys_hkdf_expand_label(su->digest, secret, secret_len, "iv", iv, su->iv_len)) {
		OPENSSL_cleanse(key, su->key_len);
		OPENSSL_cleanse(iv, su->iv_len);
		return -1;
	}
	return 0;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int keys_parse_keylog(const char *line, const char *label, uint8_t *secret, size_t cap)
{
	size_t ll = strlen(label), n = 0;
	const char *p;

	if (strncmp(line, label, ll) != 0 || line[ll] != ' ')
		return 0;
	p = strchr(line + ll + 1, ' '); /* skip the client random */
	if (!p) {
		OPENSSL_cleanse(secret, cap);
		return -1;
	}
	for (p++; p[0] && p[1] && p[0] != ' '; p += 2) {
		int hi = hexval(p[0]), lo = hexval(p[1]);
		if (hi < 0 || lo < 0 || n >= cap) {
			OPENSSL_cleanse(secret, cap);
			return -1;
		}
		secret[n++] = (uint8_t)(hi << 4 | lo);
	}
	if (*p && *p != ' ' && *p != '\n') {
		OPENSSL_cleanse(secret, cap);
		return -1;
	}
	return (int)n;
}
