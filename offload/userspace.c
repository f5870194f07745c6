/*
 * userspace.c - the software record engine: OpenSSL's own SSL_read/SSL_write
 * on the client socket. Always available; the end of the fallback chain.
 */
#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <string.h>

#include "offload.h"

static int us_attach(struct offload_conn *c)
{
	/* Keys OpenSSL may have put into the kernel are still OpenSSL's to drive. */
	c->tx_kernel = c->rx_kernel = false;
	return c->ssl ? 0 : -EINVAL;
}

/* Map an OpenSSL failure to the ops return convention. */
static ssize_t us_error(struct offload_conn *c, int ret)
{
	int e = SSL_get_error(c->ssl, ret);
	unsigned long ec;

	switch (e) {
	case SSL_ERROR_WANT_READ:
		c->want = OFFLOAD_WANT_READ;
		return -EAGAIN;
	case SSL_ERROR_WANT_WRITE:
		c->want = OFFLOAD_WANT_WRITE;
		return -EAGAIN;
	case SSL_ERROR_ZERO_RETURN:
		return 0;
	case SSL_ERROR_SYSCALL:
		ec = ERR_get_error();
		if (!ec && (errno == 0 || errno == ECONNRESET)) {
			snprintf(c->err, sizeof(c->err), "%s",
				 errno ? strerror(errno) : "connection closed");
			ERR_clear_error();
			return errno == ECONNRESET ? -ECONNRESET : -EPIPE;
		}
		snprintf(c->err, sizeof(c->err), "%s",
			 ec ? ERR_reason_error_string(ec) : strerror(errno));
		ERR_clear_error();
		return -EIO;
	default:
		ec = ERR_get_error();
		snprintf(c->err, sizeof(c->err), "%s",
			 ec && ERR_reason_error_string(ec) ? ERR_reason_error_string(ec) : "TLS error");
		ERR_clear_error();
		return -EPROTO;
	}
}

static ssize_t us_recv(struct offload_conn *c, void *buf, size_t len)
{
	size_t n = 0;
	int r;

	ERR_clear_error();
	errno = 0;
	r = SSL_read_ex(c->ssl, buf, len, &n);
	if (r == 1)
		return (ssize_t)n;
	return us_error(c, r);
}

static ssize_t us_send(struct offload_conn *c, const void *buf, size_t len)
{
	size_t n = 0;
	int r;

	ERR_clear_error();
	errno = 0;
	r = SSL_write_ex(c->ssl, buf, len, &n);
	if (r == 1)
		return (ssize_t)n;
	r = (int)us_error(c, r);
	return r == 0 ? -EPIPE : r;
}

static bool us_pending(struct offload_conn *c)
{
	return SSL_has_pending(c->ssl);
}

static int us_shutdown(struct offload_conn *c)
{
	int r;

	ERR_clear_error();
	r = SSL_shutdown(c->ssl);
	if (r >= 0)
		return 1; /* close_notify sent; the peer's is not awaited */
	r = (int)us_error(c, r);
	return r == 0 ? 1 : r;
}

static void us_detach(struct offload_conn *c)
{
	c->priv = NULL;
}

const struct offload_ops offload_userspace = {
	.name = "userspace",
	.available = NULL,
	.attach = us_attach,
	.recv = us_recv,
	.send = us_send,
	.pending = us_pending,
	.shutdown = us_shutdown,
	.detach = us_detach,
};
