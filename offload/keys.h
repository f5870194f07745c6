/*
 * keys.h - from TLS secrets to record keys, for engines that install keys
 * themselves (kernel TLS RX on TLS 1.3, which OpenSSL 3.0 does not offload).
 *
 * Everything here handles secrets: callers wipe what they pass in and get
 * out (OPENSSL_cleanse) as soon as the keys are installed. Nothing is logged.
 */
#ifndef MAILGW_KEYS_H
#define MAILGW_KEYS_H

#include <stddef.h>
#include <stdint.h>

#define KEYS_SECRET_MAX 48 /* SHA-384 */

/* A TLS 1.3 AEAD suite as the kernel knows it. */
struct keys_suite {
	uint16_t tls_id;       /* 0x1301 ... */
	uint16_t kernel_cipher; /* TLS_CIPHER_* from linux/tls.h */
	const char *digest;    /* HKDF hash */
	size_t key_len;
	size_t iv_len;         /* full nonce: 12 */
	size_t salt_len;       /* part of the nonce the kernel calls salt */
};

const struct keys_suite *keys_suite_tls13(uint16_t tls_id);

/*
 * RFC 8446 §7.3: key = HKDF-Expand-Label(secret, "key", "", key_len),
 * iv = HKDF-Expand-Label(secret, "iv", "", iv_len). Returns 0 or -1.
 */
int keys_tls13_traffic(const struct keys_suite *su, const uint8_t *secret, size_t secret_len,
		       uint8_t *key, uint8_t *iv);

/* RFC 8446 §7.1 HKDF-Expand-Label with an empty context. */
int keys_hkdf_expand_label(const char *digest, const uint8_t *secret, size_t secret_len,
			   const char *label, uint8_t *out, size_t out_len);

/*
 * Parse an NSS key log line ("LABEL <client_random hex> <secret hex>") when
 * its label is the one wanted. Returns the secret length, 0 when the line
 * carries another label, -1 when it is malformed.
 */
int keys_parse_keylog(const char *line, const char *label, uint8_t *secret, size_t cap);

#endif
