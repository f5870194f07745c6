/*
 * userspace.c - the software record engine: OpenSSL's own SSL_read/SSL_write
 * on the client socket. Always available; the end of the fallback chain.
 *
 * Sending: with SSL_MODE_ENABLE_PARTIAL_WRITE each SSL_write makes one
 * record, and OpenSSL's socket BIO gives each record to the kernel in a
 * write() of its own. After the handshake the write side is swapped for a
 * BIO that gathers up to US_OUT_CAP bytes of records (four full ones), so a
 * 64 KiB relay chunk costs one send() instead of four. send returns a count
 * only once every record it made is on the socket; while some wait for
 * room it returns -EAGAIN (OFFLOAD_WANT_WRITE) and the retry with the same
 * bytes reports them. The gathering buffer is taken on the first write and
 * given back when the session waits with it empty (ops->idle).
 */
#include <errno.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "offload.h"

/* The largest record OpenSSL writes: header, 2^14 plaintext, worst overhead. */
#define US_REC_MAX (SSL3_RT_HEADER_LENGTH + SSL3_RT_MAX_PLAIN_LENGTH + SSL3_RT_MAX_ENCRYPTED_OVERHEAD)
#define US_OUT_CAP (4 * US_REC_MAX)

struct us_conn {
	int fd;
	BIO *bio;      /* ours, owned by the SSL as its write BIO */
	uint8_t *out;  /* records not yet on the socket; NULL while idle */
	size_t off;    /* first unsent byte */
	size_t len;    /* unsent bytes from off */
	size_t owed;   /* bytes a send took whose records are still in out */
	bool notified; /* our close_notify is made; a retried shutdown only flushes */
};

static size_t out_room(const struct us_conn *u)
{
	return US_OUT_CAP - u->off - u->len;
}

/* Give out to the socket: 1 all sent, 0 the socket is full, negative errno. */
static int out_flush(struct us_conn *u)
{
	while (u->len) {
		ssize_t r = send(u->fd, u->out + u->off, u->len, MSG_NOSIGNAL);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -errno;
		}
		u->off += (size_t)r;
		u->len -= (size_t)r;
	}
	u->off = 0;
	return 1;
}

/* A failed out_flush, for the session: the reason in c->err, a fatal errno. */
static int out_failed(struct offload_conn *c, int r)
{
	snprintf(c->err, sizeof(c->err), "%s", strerror(-r));
	return r == -ECONNRESET || r == -EPIPE ? r : -EIO;
}

static int out_bwrite(BIO *b, const char *data, int dlen)
{
	struct us_conn *u = BIO_get_data(b);
	size_t n = dlen > 0 ? (size_t)dlen : 0;
	int r;

	BIO_clear_retry_flags(b);
	if (!u) {
		errno = EPIPE;
		return -1;
	}
	if (out_room(u) < n) {
		r = out_flush(u);
		if (r < 0) {
			errno = -r;
			return -1;
		}
		if (u->len && u->off) {
			memmove(u->out, u->out + u->off, u->len);
			u->off = 0;
		}
	}
	if (out_room(u) < n) {
		if (u->len == 0) {
			/* Larger than the whole buffer: straight to the socket. */
			ssize_t w = send(u->fd, data, n, MSG_NOSIGNAL);
			if (w >= 0)
				return (int)w;
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
				return -1;
		}
		BIO_set_retry_write(b);
		return -1;
	}
	if (!u->out && !(u->out = malloc(US_OUT_CAP))) {
		errno = ENOMEM;
		return -1;
	}
	memcpy(u->out + u->off + u->len, data, n);
	u->len += n;
	return dlen;
}

static long out_ctrl(BIO *b, int cmd, long num, void *ptr)
{
	struct us_conn *u = BIO_get_data(b);
	int r;

	(void)num;
	(void)ptr;
	switch (cmd) {
	case BIO_CTRL_FLUSH:
		BIO_clear_retry_flags(b);
		if (!u)
			return 1;
		r = out_flush(u);
		if (r < 0) {
			errno = -r;
			return -1;
		}
		if (r == 0) {
			BIO_set_retry_write(b);
			return 0;
		}
		return 1;
	case BIO_CTRL_WPENDING:
		return u ? (long)u->len : 0;
	default:
		return 0;
	}
}

static int out_create(BIO *b)
{
	BIO_set_init(b, 1);
	return 1;
}

static BIO_METHOD *out_method(void)
{
	static BIO_METHOD *m;

	if (!m) {
		m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "mailgw records out");
		if (m && (!BIO_meth_set_write(m, out_bwrite) || !BIO_meth_set_ctrl(m, out_ctrl) ||
			  !BIO_meth_set_create(m, out_create))) {
			BIO_meth_free(m);
			m = NULL;
		}
	}
	return m;
}

static int us_attach(struct offload_conn *c)
{
	struct us_conn *u;
	BIO_METHOD *m;
	BIO *b;

	/* Keys OpenSSL may have put into the kernel are still OpenSSL's to drive. */
	c->tx_kernel = c->rx_kernel = false;
	if (!c->ssl)
		return -EINVAL;
	c->priv = NULL;
	/* A kernel TLS send BIO stays: OpenSSL gives it plaintext. */
	if (BIO_get_ktls_send(SSL_get_wbio(c->ssl)) == 1)
		return 0;
	m = out_method();
	u = calloc(1, sizeof(*u));
	b = m && u ? BIO_new(m) : NULL;
	if (!b) {
		/* Not fatal: OpenSSL's socket BIO writes a record per write(). */
		free(u);
		ERR_clear_error();
		return 0;
	}
	u->fd = c->fd;
	u->bio = b;
	BIO_set_data(b, u);
	SSL_set0_wbio(c->ssl, b);
	c->priv = u;
	return 0;
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
	struct us_conn *u = c->priv;
	size_t n = 0;
	ssize_t e;
	int r;

	ERR_clear_error();
	errno = 0;
	r = SSL_read_ex(c->ssl, buf, len, &n);
	e = r == 1 ? (ssize_t)n : us_error(c, r);
	/* An alert OpenSSL wrote while reading: out now if the socket takes it,
	 * else with the next send or shutdown. */
	if (u && u->len)
		(void)out_flush(u);
	return e;
}

/* Records made by send are all on the socket; else want write. */
static ssize_t out_done(struct offload_conn *c, struct us_conn *u, size_t took)
{
	int r = took ? out_flush(u) : 0;

	if (r < 0)
		return out_failed(c, r);
	if (r == 0) {
		u->owed = took;
		c->want = OFFLOAD_WANT_WRITE;
		return -EAGAIN;
	}
	u->owed = 0;
	return (ssize_t)took;
}

static ssize_t us_send(struct offload_conn *c, const void *buf, size_t len)
{
	struct us_conn *u = c->priv;
	size_t n = 0, took = 0;
	ssize_t e;
	int r;

	if (len == 0)
		return 0;
	if (u && u->owed) {
		if (len < u->owed) {
			snprintf(c->err, sizeof(c->err), "send retried with fewer bytes than it took");
			return -EINVAL;
		}
		return out_done(c, u, u->owed);
	}
	do {
		if (u && out_room(u) < US_REC_MAX) {
			r = out_flush(u);
			if (r < 0)
				return out_failed(c, r);
			if (r == 0)
				break; /* the socket is full */
		}
		ERR_clear_error();
		errno = 0;
		r = SSL_write_ex(c->ssl, (const uint8_t *)buf + took, len - took, &n);
		if (r != 1) {
			e = us_error(c, r);
			if (e == 0)
				e = -EPIPE;
			/* Records already made go out first; the retry begins here. */
			if (e == -EAGAIN && took)
				break;
			return e;
		}
		took += n;
	} while (u && took < len);
	return u ? out_done(c, u, took) : (ssize_t)took;
}

static bool us_pending(struct offload_conn *c)
{
	return SSL_has_pending(c->ssl);
}

static int us_shutdown(struct offload_conn *c)
{
	struct us_conn *u = c->priv;
	int r;

	if (u && u->notified) {
		r = 1; /* a second SSL_shutdown would wait for the peer's */
	} else {
		ERR_clear_error();
		errno = 0;
		r = SSL_shutdown(c->ssl);
		/* close_notify sent, or made (it may wait in u); the peer's is not awaited */
		r = r >= 0 ? 1 : (int)us_error(c, r);
		if (r == 0)
			r = 1;
		if (r == 1 && u)
			u->notified = true;
	}
	if (r == 1 && u) {
		int f = out_flush(u);

		if (f < 0)
			return out_failed(c, f);
		if (f == 0) {
			c->want = OFFLOAD_WANT_WRITE;
			return -EAGAIN;
		}
	}
	return r;
}

/* The session waits for the network: an empty gathering buffer goes back. */
static void us_idle(struct offload_conn *c)
{
	struct us_conn *u = c->priv;

	if (u && u->out && !u->len) {
		free(u->out);
		u->out = NULL;
		u->off = 0;
	}
}

static void us_detach(struct offload_conn *c)
{
	struct us_conn *u = c->priv;

	if (u) {
		/* The SSL, which owns the BIO, may outlive us: cut it off. */
		BIO_set_data(u->bio, NULL);
		free(u->out);
		free(u);
	}
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
	.idle = us_idle,
};
