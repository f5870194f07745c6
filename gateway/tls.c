/*
 * tls.c - TLS contexts and handshakes.
 *
 * Policy: TLS 1.2 and 1.3 only by default, AEAD ciphers with forward
 * secrecy, no renegotiation (CVE-2009-3555 class), no compression (CRIME),
 * the server's cipher preference. Each [tls] certificate/private_key pair is
 * loaded into a context; pairs whose certificates name the same hosts share
 * one context, so an ECDSA and an RSA certificate for one name are offered
 * together and OpenSSL picks by the client's signature algorithms. The
 * servername callback switches to the context whose names match the SNI;
 * unknown names get the first context.
 *
 * Contexts are built in the master before workers are forked, so session
 * ticket keys are the same in every worker and resumption works whichever
 * worker a client lands on.
 */
#include "tls.h"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>

#include "config.h"
#include "util.h"

#define TLS_MAX_NAMES 64

struct tls_entry {
	SSL_CTX *ctx;
	char *names[TLS_MAX_NAMES];
	unsigned nnames;
	unsigned keytypes; /* bit per EVP_PKEY id class: 1 EC, 2 RSA, 4 other */
};

struct tls_ctx {
	struct tls_entry e[CONFIG_MAX_CERTS];
	unsigned n;
};

static const char default_ciphers[] =
	"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
	"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
	"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";
static const char default_suites[] =
	"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
static const char default_groups[] = "X25519:P-256:P-384";

static void ossl_reason(char *out, size_t cap)
{
	unsigned long e = ERR_get_error();
	const char *r = e ? ERR_reason_error_string(e) : NULL;

	snprintf(out, cap, "%s", r ? r : "unknown OpenSSL error");
	ERR_clear_error();
}

/* RFC 6125 §6.4.3: a wildcard stands for exactly one left-most label. */
static bool name_matches(const char *pattern, const char *host)
{
	if (pattern[0] == '*' && pattern[1] == '.') {
		const char *dot = strchr(host, '.');
		return dot && dot != host && strcasecmp(dot + 1, pattern + 2) == 0;
	}
	return strcasecmp(pattern, host) == 0;
}

static int servername_cb(SSL *ssl, int *alert, void *arg)
{
	struct tls_ctx *t = arg;
	const char *host = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
	unsigned i, j;

	(void)alert;
	if (!host)
		return SSL_TLSEXT_ERR_OK;
	for (i = 0; i < t->n; i++) {
		for (j = 0; j < t->e[i].nnames; j++) {
			if (name_matches(t->e[i].names[j], host)) {
				if (SSL_get_SSL_CTX(ssl) != t->e[i].ctx)
					SSL_set_SSL_CTX(ssl, t->e[i].ctx);
				return SSL_TLSEXT_ERR_OK;
			}
		}
	}
	return SSL_TLSEXT_ERR_OK; /* unknown name: the default certificate */
}

static void collect_names(X509 *x, struct tls_entry *e)
{
	GENERAL_NAMES *san = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
	int i;

	if (san) {
		for (i = 0; i < sk_GENERAL_NAME_num(san) && e->nnames < TLS_MAX_NAMES; i++) {
			const GENERAL_NAME *g = sk_GENERAL_NAME_value(san, i);
			if (g->type == GEN_DNS)
				e->names[e->nnames++] = strndup(
					(const char *)ASN1_STRING_get0_data(g->d.dNSName),
					(size_t)ASN1_STRING_length(g->d.dNSName));
		}
		GENERAL_NAMES_free(san);
	}
	if (e->nnames == 0) {
		char cn[256];
		if (X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn,
					      sizeof(cn)) > 0)
			e->names[e->nnames++] = strdup(cn);
	}
}

static bool same_names(const struct tls_entry *a, const struct tls_entry *b)
{
	unsigned i;

	if (a->nnames != b->nnames)
		return false;
	for (i = 0; i < a->nnames; i++)
		if (!a->names[i] || !b->names[i] || strcasecmp(a->names[i], b->names[i]))
			return false;
	return true;
}

static void free_names(struct tls_entry *e)
{
	unsigned i;

	for (i = 0; i < e->nnames; i++)
		free(e->names[i]);
	e->nnames = 0;
}

static unsigned keytype_bit(X509 *x)
{
	EVP_PKEY *pk = X509_get0_pubkey(x);
	int id = pk ? EVP_PKEY_get_base_id(pk) : 0;

	return id == EVP_PKEY_EC ? 1u : id == EVP_PKEY_RSA ? 2u : 4u;
}

static SSL_CTX *new_ctx(const struct config *c, struct tls_ctx *t, char *why, size_t cap)
{
	static const unsigned char sid_ctx[] = "mailgw";
	SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

	if (!ctx) {
		ossl_reason(why, cap);
		return NULL;
	}
	SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
				 SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_IGNORE_UNEXPECTED_EOF);
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
			      SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
	SSL_CTX_set_min_proto_version(ctx, c->min_version);
	if (!SSL_CTX_set_cipher_list(ctx, c->ciphers ? c->ciphers : default_ciphers)) {
		snprintf(why, cap, "ciphers: no usable cipher in the list");
		goto err;
	}
	if (!SSL_CTX_set_ciphersuites(ctx, c->ciphersuites ? c->ciphersuites : default_suites)) {
		snprintf(why, cap, "ciphersuites: invalid TLS 1.3 suite list");
		goto err;
	}
	if (!SSL_CTX_set1_groups_list(ctx, c->groups ? c->groups : default_groups)) {
		snprintf(why, cap, "groups: invalid group list");
		goto err;
	}
	SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1);
	if (c->session_tickets) {
		/* One ticket is enough for a mail client to resume; each costs CPU. */
		SSL_CTX_set_num_tickets(ctx, 1);
	} else {
		SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
		SSL_CTX_set_num_tickets(ctx, 0);
	}
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
	SSL_CTX_set_tlsext_servername_callback(ctx, servername_cb);
	SSL_CTX_set_tlsext_servername_arg(ctx, t);
	offload_setup_ctx(c->offload, c->dpdk_args[0] != '\0', ctx);
	ERR_clear_error();
	return ctx;
err:
	ERR_clear_error();
	SSL_CTX_free(ctx);
	return NULL;
}

static int load_pair(const struct config *c, struct tls_ctx *t, const struct cert_pair *cp,
		     char *err, size_t errlen)
{
	struct tls_entry probe = { 0 };
	struct tls_entry *e = NULL;
	char why[256];
	unsigned bit, i;
	FILE *fp;
	X509 *x;

	fp = fopen(cp->cert, "r");
	if (!fp) {
		snprintf(err, errlen, "%s:%d: certificate %s: %s", c->path, cp->cert_line,
			 cp->cert, strerror(errno));
		return -1;
	}
	x = PEM_read_X509(fp, NULL, NULL, NULL);
	fclose(fp);
	if (!x) {
		ossl_reason(why, sizeof(why));
		snprintf(err, errlen, "%s:%d: certificate %s: not a PEM certificate (%s)",
			 c->path, cp->cert_line, cp->cert, why);
		return -1;
	}
	collect_names(x, &probe);
	bit = keytype_bit(x);
	X509_free(x);

	for (i = 0; i < t->n; i++) {
		if (same_names(&t->e[i], &probe) && !(t->e[i].keytypes & bit)) {
			e = &t->e[i];
			free_names(&probe);
			break;
		}
	}
	if (!e) {
		e = &t->e[t->n];
		*e = probe;
		e->ctx = new_ctx(c, t, why, sizeof(why));
		if (!e->ctx) {
			free_names(e);
			snprintf(err, errlen, "%s:%d: %s", c->path, c->tls_line, why);
			return -1;
		}
		t->n++;
	}
	if (SSL_CTX_use_certificate_chain_file(e->ctx, cp->cert) != 1) {
		ossl_reason(why, sizeof(why));
		snprintf(err, errlen, "%s:%d: certificate %s: %s", c->path, cp->cert_line,
			 cp->cert, why);
		return -1;
	}
	if (SSL_CTX_use_PrivateKey_file(e->ctx, cp->key, SSL_FILETYPE_PEM) != 1) {
		ossl_reason(why, sizeof(why));
		snprintf(err, errlen, "%s:%d: private_key %s: %s", c->path, cp->key_line,
			 cp->key, why);
		return -1;
	}
	if (SSL_CTX_check_private_key(e->ctx) != 1) {
		ERR_clear_error();
		snprintf(err, errlen, "%s:%d: private_key %s does not match certificate %s",
			 c->path, cp->key_line, cp->key, cp->cert);
		return -1;
	}
	e->keytypes |= bit;
	return 0;
}

int tls_build(const struct config *c, struct tls_ctx **out, char *err, size_t errlen)
{
	struct tls_ctx *t = calloc(1, sizeof(*t));
	unsigned i;

	*out = NULL;
	if (!t) {
		snprintf(err, errlen, "%s:0: out of memory", c->path);
		return -1;
	}
	for (i = 0; i < c->ncerts; i++) {
		if (load_pair(c, t, &c->certs[i], err, errlen)) {
			tls_free(t);
			return -1;
		}
	}
	*out = t;
	return 0;
}

void tls_free(struct tls_ctx *t)
{
	unsigned i;

	if (!t)
		return;
	for (i = 0; i < t->n; i++) {
		SSL_CTX_free(t->e[i].ctx);
		free_names(&t->e[i]);
	}
	free(t);
}

unsigned tls_count(const struct tls_ctx *t)
{
	return t ? t->n : 0;
}

SSL *tls_new(struct tls_ctx *t, int fd, enum offload_request req)
{
	SSL *ssl;

	if (!t || t->n == 0)
		return NULL;
	ssl = SSL_new(t->e[0].ctx);
	if (!ssl)
		return NULL;
	if (SSL_set_fd(ssl, fd) != 1) {
		SSL_free(ssl);
		return NULL;
	}
	offload_prepare(req, ssl);
	return ssl;
}

int tls_handshake(SSL *ssl, unsigned *want, char *why, size_t cap)
{
	int r, e;

	ERR_clear_error();
	errno = 0;
	r = SSL_accept(ssl);
	if (r == 1)
		return 1;
	e = SSL_get_error(ssl, r);
	if (e == SSL_ERROR_WANT_READ) {
		*want = EPOLLIN;
		return 0;
	}
	if (e == SSL_ERROR_WANT_WRITE) {
		*want = EPOLLOUT;
		return 0;
	}
	if ((e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN) && ERR_peek_error() == 0)
		snprintf(why, cap, "%s", errno ? strerror(errno) : "connection closed by client");
	else
		ossl_reason(why, cap);
	ERR_clear_error();
	return -1;
}
