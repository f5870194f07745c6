/*
 * tlstest.h - what the record-engine tests (test_dpdk.c, test_userspace.c)
 * share: a clock, deterministic payloads, and a server identity made in
 * memory (an ECDSA P-256 key and a self-signed certificate).
 */
#ifndef MAILGW_TEST_TLSTEST_H
#define MAILGW_TEST_TLSTEST_H

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

static EVP_PKEY *id_key;
static X509 *id_cert;

static inline uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Deterministic bytes, different for every seed; aborts without memory. */
static inline uint8_t *pattern(size_t n, uint32_t seed)
{
	uint8_t *p = malloc(n ? n : 1);
	uint32_t x = (seed * 2654435761u) | 1;

	if (!p)
		abort();
	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		p[i] = (uint8_t)(x >> 3);
	}
	return p;
}

/* Fills id_key and id_cert; 0 or -1. */
static inline int make_identity(void)
{
	X509_NAME *nm;

	id_key = EVP_EC_gen("P-256");
	id_cert = X509_new();
	if (!id_key || !id_cert)
		return -1;
	nm = X509_get_subject_name(id_cert);
	if (!X509_set_version(id_cert, 2) ||
	    !ASN1_INTEGER_set(X509_get_serialNumber(id_cert), 1) ||
	    !X509_gmtime_adj(X509_getm_notBefore(id_cert), -3600) ||
	    !X509_gmtime_adj(X509_getm_notAfter(id_cert), 86400) ||
	    !X509_set_pubkey(id_cert, id_key) ||
	    !X509_NAME_add_entry_by_txt(nm, "CN", MBSTRING_ASC,
					(const unsigned char *)"mx.test.invalid", -1, -1, 0) ||
	    !X509_set_issuer_name(id_cert, nm) || !X509_sign(id_cert, id_key, EVP_sha256()))
		return -1;
	return 0;
}

static inline void free_identity(void)
{
	EVP_PKEY_free(id_key);
	X509_free(id_cert);
	id_key = NULL;
	id_cert = NULL;
}

#endif
