/*
 * offload.c - choosing the record-crypto engine for a connection, and what
 * the engines share: the secrets caught during the handshake.
 *
 * The order below is the whole fallback policy: an engine that declines (or
 * is not available on this host) passes the connection to the next one, and
 * userspace OpenSSL, last, never declines.
 */
#include "offload.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "keys.h"

static const struct offload_ops *const chain[] = {
	/* NIC inline crypto (TLS_HW) and kernel software TLS (TLS_SW): the
	 * kernel picks the device when the NIC offers it, else software. */
	&offload_ktls,
	/* A DPDK crypto device (lookaside accelerator or software PMD). */
	&offload_dpdk,
	&offload_userspace,
};

static void (*counter)(enum offload_event ev, unsigned long n);
static int secret_idx = -1;

void offload_set_counter(void (*count)(enum offload_event ev, unsigned long n))
{
	counter = count;
}

void offload_count(enum offload_event ev, unsigned long n)
{
	if (counter)
		counter(ev, n);
}

const char *offload_request_name(enum offload_request req)
{
	switch (req) {
	case OFFLOAD_REQ_USERSPACE:
		return "userspace";
	case OFFLOAD_REQ_KTLS:
		return "ktls";
	case OFFLOAD_REQ_DPDK:
		return "dpdk";
	default:
		return "auto";
	}
}

const char *offload_mode_name(enum offload_mode m)
{
	switch (m) {
	case OFFLOAD_MODE_KTLS_HW:
		return "ktls_hw";
	case OFFLOAD_MODE_KTLS_SW:
		return "ktls_sw";
	case OFFLOAD_MODE_DPDK:
		return "dpdk";
	default:
		return "userspace";
	}
}

/* May this request use engine ops at all? */
static bool allowed(enum offload_request req, const struct offload_ops *ops)
{
	if (ops == &offload_userspace)
		return true;
	switch (req) {
	case OFFLOAD_REQ_USERSPACE:
		return false;
	case OFFLOAD_REQ_KTLS:
		return ops == &offload_ktls;
	case OFFLOAD_REQ_DPDK:
		return ops == &offload_dpdk;
	default:
		return true;
	}
}

int offload_attach(enum offload_request req, bool dpdk, struct offload_conn *c)
{
	size_t i;
	int rc = -ENOTSUP;

	c->tx_kernel = c->rx_kernel = c->modes_verified = false;
	c->tx_mode = c->rx_mode = OFFLOAD_MODE_USERSPACE;
	c->wanted = NULL;

	for (i = 0; i < sizeof(chain) / sizeof(chain[0]); i++) {
		const struct offload_ops *ops = chain[i];
		bool usable;

		if (!allowed(req, ops))
			continue;
		usable = !ops->available || ops->available();
		/* kTLS is wanted only where the kernel has it; DPDK also where it is
		 * configured but this worker has no queue pair (a fallback). */
		if (!c->wanted && ops != &offload_userspace &&
		    (usable || (ops == &offload_dpdk && (req == OFFLOAD_REQ_DPDK || dpdk))))
			c->wanted = ops;
		if (!usable) {
			/* The preferred engine's reason is the one worth logging. */
			if (ops == c->wanted && !c->err[0])
				snprintf(c->err, sizeof(c->err),
					 "no DPDK crypto device queue pair in this worker");
			continue;
		}
		rc = ops->attach(c);
		if (rc == 0) {
			c->ops = ops;
			offload_secret_wipe(c->ssl);
			return 0;
		}
	}
	offload_secret_wipe(c->ssl);
	return rc;
}

void offload_detach(struct offload_conn *c)
{
	if (c->ops && c->ops->detach)
		c->ops->detach(c);
	c->ops = NULL;
}

/* --- secrets caught during the handshake ---------------------------------- */

static void secret_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
			void *argp)
{
	(void)parent;
	(void)ad;
	(void)idx;
	(void)argl;
	(void)argp;
	if (ptr) {
		OPENSSL_cleanse(ptr, sizeof(struct offload_secret));
		free(ptr);
	}
}

struct offload_secret *offload_secret_get(const SSL *ssl)
{
	return secret_idx >= 0 && ssl ? SSL_get_ex_data(ssl, secret_idx) : NULL;
}

void offload_secret_wipe(SSL *ssl)
{
	struct offload_secret *sec = offload_secret_get(ssl);

	if (sec) {
		OPENSSL_cleanse(sec, sizeof(*sec));
		SSL_set_ex_data(ssl, secret_idx, NULL);
		free(sec);
	}
	if (ssl)
		SSL_set_msg_callback(ssl, NULL);
}

static void keylog_cb(const SSL *ssl, const char *line)
{
	struct offload_secret *sec = offload_secret_get(ssl);
	int n;

	if (!sec)
		return;
	n = keys_parse_keylog(line, "CLIENT_TRAFFIC_SECRET_0", sec->client, sizeof(sec->client));
	if (n > 0) {
		sec->client_len = n;
		return;
	}
	n = keys_parse_keylog(line, "SERVER_TRAFFIC_SECRET_0", sec->server, sizeof(sec->server));
	if (n > 0) {
		sec->server_len = n;
		sec->tx_records = 0; /* application keys from here on */
	}
}

/* Counts the records OpenSSL writes under the current keys (engine.h). */
static void msg_cb(int write_p, int version, int content_type, const void *buf, size_t len,
		   SSL *ssl, void *arg)
{
	struct offload_secret *sec;
	const unsigned char *h = buf;

	(void)version;
	(void)arg;
	if (!write_p || content_type != SSL3_RT_HEADER || len < 1)
		return;
	sec = offload_secret_get(ssl);
	if (!sec)
		return;
	if (h[0] == SSL3_RT_CHANGE_CIPHER_SPEC)
		sec->tx_records = 0;
	else
		sec->tx_records++;
}

bool offload_init(enum offload_request req)
{
	if (secret_idx < 0)
		secret_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, secret_free);
	if (req == OFFLOAD_REQ_USERSPACE || req == OFFLOAD_REQ_DPDK)
		return false;
	return offload_ktls_usable();
}

static bool wants_ktls(enum offload_request req)
{
	return (req == OFFLOAD_REQ_AUTO || req == OFFLOAD_REQ_KTLS) && offload_ktls_usable();
}

void offload_setup_ctx(enum offload_request req, bool dpdk, SSL_CTX *ctx)
{
	/*
	 * Only where an engine installs keys itself: OpenSSL formats a key
	 * log line per secret for the callback, which costs about 3% of a
	 * handshake, and the secrets are best not formatted at all.
	 */
	if (wants_ktls(req) || (dpdk && (req == OFFLOAD_REQ_AUTO || req == OFFLOAD_REQ_DPDK))) {
		SSL_CTX_set_keylog_callback(ctx, keylog_cb);
		return;
	}
	/*
	 * OpenSSL keeps every record: let it read ahead (one read() for
	 * several records instead of header and body apart). Engines that
	 * take over the socket need OpenSSL to stop at the handshake's end,
	 * so this is only for sessions that stay in userspace.
	 */
	SSL_CTX_set_read_ahead(ctx, 1);
	/* Four full records per read(); the buffer goes when the session idles. */
	SSL_CTX_set_default_read_buffer_len(ctx, 4 * (SSL3_RT_MAX_PLAIN_LENGTH + 512));
}

void offload_prepare(enum offload_request req, SSL *ssl)
{
	bool ktls = wants_ktls(req);
	bool dpdk = (req == OFFLOAD_REQ_AUTO || req == OFFLOAD_REQ_DPDK) && offload_dpdk_usable();
	struct offload_secret *sec;

	if ((!ktls && !dpdk) || secret_idx < 0)
		return;
	if (ktls)
		SSL_set_options(ssl, SSL_OP_ENABLE_KTLS);
	sec = calloc(1, sizeof(*sec));
	if (sec && !SSL_set_ex_data(ssl, secret_idx, sec)) {
		free(sec);
		return;
	}
	if (dpdk)
		SSL_set_msg_callback(ssl, msg_cb);
}
