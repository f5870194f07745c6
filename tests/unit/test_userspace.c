/*
 * test_userspace.c - the userspace record engine (offload/userspace.c)
 * against an OpenSSL client over a real loopback TCP connection.
 *
 * The engine gathers the records of one send into a buffer of its own and
 * gives them to the socket together; a send reports its bytes only once
 * those records are all on the socket. These cases hold the client back so
 * that the socket fills mid-send, and check that every byte still arrives
 * once and in order, that a retry offering fewer bytes than were taken is
 * refused, that close_notify follows the data, that a client's TLS 1.3
 * KeyUpdate is answered through the gathering buffer, and that uploads are
 * untouched. TLS 1.2 and 1.3.
 *
 * Built by `make unit` (links every offload/ module, libssl, libcrypto).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "check.h"
#include "offload.h"
#include "tlstest.h"

#define XFER_MS 10000 /* longest one transfer may take */
#define CHUNK 65536   /* what the gateway offers per send: one relay buffer */
#define SMALL_BUF 8192

struct conn {
	int sfd, cfd;
	SSL *srv, *cli;
	struct offload_conn oc;
	bool attached;
};

/* The gateway's modes (gateway/tls.c): one record per SSL_write, moving buffers. */
static SSL_CTX *server_ctx(void)
{
	static SSL_CTX *ctx;

	if (ctx)
		return ctx;
	ctx = SSL_CTX_new(TLS_server_method());
	if (!ctx || !SSL_CTX_use_certificate(ctx, id_cert) || !SSL_CTX_use_PrivateKey(ctx, id_key)) {
		SSL_CTX_free(ctx);
		return ctx = NULL;
	}
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
			      SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
	offload_setup_ctx(OFFLOAD_REQ_USERSPACE, false, ctx);
	return ctx;
}

/* KeyUpdate messages the client received (its message callback). */
static unsigned client_keyupdates;

static void client_msg(int write_p, int version, int type, const void *buf, size_t len, SSL *ssl,
		       void *arg)
{
	(void)version;
	(void)ssl;
	(void)arg;
	if (!write_p && type == SSL3_RT_HANDSHAKE && len > 0 &&
	    ((const uint8_t *)buf)[0] == SSL3_MT_KEY_UPDATE)
		client_keyupdates++;
}

/* cipher: a TLS 1.2 suite to insist on (CBC ones without encrypt-then-MAC), or NULL. */
static SSL_CTX *client_ctx(int version, const char *cipher)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());

	if (ctx && (!SSL_CTX_set_min_proto_version(ctx, version) ||
		    !SSL_CTX_set_max_proto_version(ctx, version) ||
		    (cipher && !SSL_CTX_set_cipher_list(ctx, cipher)))) {
		SSL_CTX_free(ctx);
		return NULL;
	}
	if (ctx && cipher)
		SSL_CTX_set_options(ctx, SSL_OP_NO_ENCRYPT_THEN_MAC);
	if (ctx)
		SSL_CTX_set_msg_callback(ctx, client_msg);
	return ctx;
}

/* A loopback TCP connection with small socket buffers, so sends fill it soon. */
static int tcp_pair(int *s, int *c)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t al = sizeof(a);
	int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1, small = SMALL_BUF;

	*s = *c = -1;
	if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1) ||
	    getsockname(l, (struct sockaddr *)&a, &al))
		goto fail;
	*c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (*c < 0 || setsockopt(*c, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)) ||
	    connect(*c, (struct sockaddr *)&a, sizeof(a)))
		goto fail;
	*s = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (*s < 0 || setsockopt(*s, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)) ||
	    setsockopt(*s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) ||
	    fcntl(*c, F_SETFL, O_NONBLOCK) < 0)
		goto fail;
	close(l);
	return 0;
fail:
	if (l >= 0)
		close(l);
	if (*s >= 0)
		close(*s);
	if (*c >= 0)
		close(*c);
	return -1;
}

static void conn_close(struct conn *c)
{
	if (c->attached)
		offload_detach(&c->oc);
	SSL_free(c->srv);
	SSL_free(c->cli);
	if (c->sfd >= 0)
		close(c->sfd);
	if (c->cfd >= 0)
		close(c->cfd);
	memset(c, 0, sizeof(*c));
	c->sfd = c->cfd = -1;
}

static bool conn_open_with(struct tcase *tc, struct conn *c, int version, const char *cipher)
{
	SSL_CTX *cctx = client_ctx(version, cipher);
	uint64_t end = now_ms() + XFER_MS;
	int rs = 0, rc = 0;

	memset(c, 0, sizeof(*c));
	c->sfd = c->cfd = -1;
	if (!cctx || !server_ctx() || tcp_pair(&c->sfd, &c->cfd) < 0) {
		SSL_CTX_free(cctx);
		return tc_fail(tc, "set-up failed: %s", strerror(errno));
	}
	c->srv = SSL_new(server_ctx());
	c->cli = SSL_new(cctx);
	SSL_CTX_free(cctx);
	if (!c->srv || !c->cli || !SSL_set_fd(c->srv, c->sfd) || !SSL_set_fd(c->cli, c->cfd))
		return tc_fail(tc, "SSL_new/SSL_set_fd failed");
	offload_prepare(OFFLOAD_REQ_USERSPACE, c->srv);
	SSL_set_accept_state(c->srv);
	SSL_set_connect_state(c->cli);
	while (rs != 1 || rc != 1) {
		if (rs != 1)
			rs = SSL_do_handshake(c->srv);
		if (rc != 1)
			rc = SSL_do_handshake(c->cli);
		if ((rs != 1 && SSL_get_error(c->srv, rs) != SSL_ERROR_WANT_READ) ||
		    (rc != 1 && SSL_get_error(c->cli, rc) != SSL_ERROR_WANT_READ) || now_ms() > end)
			return tc_fail(tc, "handshake failed (server %d, client %d)", rs, rc);
	}
	c->oc.ssl = c->srv;
	c->oc.fd = c->sfd;
	if (offload_attach(OFFLOAD_REQ_USERSPACE, false, &c->oc) != 0)
		return tc_fail(tc, "offload_attach: %s", c->oc.err);
	c->attached = true;
	if (c->oc.ops != &offload_userspace || c->oc.wanted)
		return tc_fail(tc, "engine %s took it (wanted %s)",
			       c->oc.ops ? c->oc.ops->name : "none",
			       c->oc.wanted ? c->oc.wanted->name : "none");
	if (cipher && strcmp(SSL_get_cipher_name(c->srv), cipher))
		return tc_fail(tc, "negotiated %s, not %s", SSL_get_cipher_name(c->srv), cipher);
	return true;
}

static bool conn_open(struct tcase *tc, struct conn *c, int version)
{
	return conn_open_with(tc, c, version, NULL);
}

/* Offer CHUNKs, the client not reading, until the engine says -EAGAIN; the offset reached. */
static size_t fill_socket(struct tcase *tc, struct conn *c, const uint8_t *data, size_t n)
{
	size_t off = 0;
	ssize_t r = 0;

	while (off + CHUNK <= n && (r = c->oc.ops->send(&c->oc, data + off, CHUNK)) > 0)
		off += (size_t)r;
	if (r != -EAGAIN)
		tc_fail(tc, "send did not block: %zd after %zu bytes", r, off);
	return off;
}

/* Everything the client can read now; -1 on a TLS error, 1 at close_notify. */
static int client_read(struct conn *c, uint8_t *got, size_t cap, size_t *n)
{
	for (;;) {
		size_t k = 0;
		int r = SSL_read_ex(c->cli, got + *n, cap - *n, &k);

		if (r == 1) {
			*n += k;
			if (*n == cap)
				return 0;
			continue;
		}
		switch (SSL_get_error(c->cli, r)) {
		case SSL_ERROR_WANT_READ:
		case SSL_ERROR_WANT_WRITE:
			return 0;
		case SSL_ERROR_ZERO_RETURN:
			return 1;
		default:
			return -1;
		}
	}
}

/*
 * Send data[from..len) through the engine in CHUNK offers, the client
 * reading into got[*ngot..len) only every `lag` turns so that the socket
 * fills mid-send. Checks what the gateway relies on: a count never above
 * the offer, -EAGAIN only with OFFLOAD_WANT_WRITE, the retry with the same
 * bytes. Returns the offset the engine's counts reached.
 */
static size_t download(struct tcase *tc, struct conn *c, const uint8_t *data, size_t from,
		       size_t len, uint8_t *got, size_t *ngot, unsigned lag, unsigned *eagain)
{
	uint64_t end = now_ms() + XFER_MS;
	size_t off = from;
	unsigned turn = 0;

	while (off < len || *ngot < len) {
		if (now_ms() > end) {
			tc_fail(tc, "stuck: sent %zu of %zu, client has %zu", off, len, *ngot);
			break;
		}
		if (off < len) {
			size_t offer = len - off < CHUNK ? len - off : CHUNK;
			ssize_t r = c->oc.ops->send(&c->oc, data + off, offer);

			if (r == -EAGAIN) {
				(*eagain)++;
				if (c->oc.want != OFFLOAD_WANT_WRITE) {
					tc_fail(tc, "-EAGAIN with want %u", c->oc.want);
					break;
				}
			} else if (r <= 0 || (size_t)r > offer) {
				tc_fail(tc, "send(%zu) returned %zd (%s)", offer, r, c->oc.err);
				break;
			} else {
				off += (size_t)r;
			}
		}
		if (++turn % lag == 0 || off == len) {
			if (client_read(c, got, len, ngot) < 0) {
				tc_fail(tc, "client SSL_read failed");
				break;
			}
		}
		if (off < len && c->oc.ops->idle)
			c->oc.ops->idle(&c->oc); /* as the worker does between events */
	}
	return off;
}

static void check_bytes(struct tcase *tc, const uint8_t *want, const uint8_t *got, size_t n,
			size_t ngot)
{
	size_t i;

	if (ngot != n) {
		tc_fail(tc, "client received %zu bytes, want %zu", ngot, n);
		return;
	}
	for (i = 0; i < n && want[i] == got[i]; i++)
		;
	if (i < n)
		tc_fail(tc, "byte %zu differs", i);
}

static const struct {
	int version;
	const char *name;
} versions[] = { { TLS1_2_VERSION, "tls12" }, { TLS1_3_VERSION, "tls13" } };

/* 3 MiB through a socket that fills on every send: all of it, once, in order. */
static void test_download_cbc(void);

static void test_download(void)
{
	static const size_t sizes[] = { 1, 16384, 65536, 3 << 20 };
	static const unsigned lags[] = { 1, 7 };
	size_t v, i, l;

	for (v = 0; v < 2; v++) {
		for (i = 0; i < 4; i++) {
			for (l = 0; l < 2; l++) {
				struct tcase tc;
				struct conn c;
				size_t n = sizes[i], ngot = 0;
				uint8_t *data = pattern(n, (uint32_t)(i * 10 + l)), *got = malloc(n);
				unsigned eagain = 0;

				tc_begin(&tc, "%s/download_%zu_bytes_client_reads_every_%u", versions[v].name,
					 n, lags[l]);
				if (data && got && conn_open(&tc, &c, versions[v].version)) {
					size_t sent = download(&tc, &c, data, 0, n, got, &ngot,
							       lags[l], &eagain);
					if (!tc.nfail) {
						if (sent != n)
							tc_fail(&tc, "engine reported %zu of %zu", sent, n);
						check_bytes(&tc, data, got, n, ngot);
						/* a socket of SMALL_BUF must have pushed back */
						if (n >= 65536 && lags[l] > 1 && !eagain)
							tc_fail(&tc, "no -EAGAIN while the client lagged");
					}
				}
				conn_close(&c);
				free(data);
				free(got);
				tc_end(&tc);
			}
		}
	}
}

/*
 * TLS 1.2 AES-CBC-HMAC-SHA1 without encrypt-then-MAC: OpenSSL's stitched
 * multi-block code seals four records in one go and writes them at once,
 * more than the room the engine keeps for one record.
 */
static void test_download_cbc(void)
{
	static const unsigned lags[] = { 1, 7 };
	size_t l;

	for (l = 0; l < 2; l++) {
		struct tcase tc;
		struct conn c;
		size_t n = 3 << 20, ngot = 0;
		uint8_t *data = pattern(n, 40 + (uint32_t)l), *got = malloc(n);
		unsigned eagain = 0;

		tc_begin(&tc, "tls12_cbc/download_3_MiB_client_reads_every_%u", lags[l]);
		if (got && conn_open_with(&tc, &c, TLS1_2_VERSION, "ECDHE-ECDSA-AES128-SHA")) {
			size_t sent = download(&tc, &c, data, 0, n, got, &ngot, lags[l], &eagain);

			if (!tc.nfail) {
				if (sent != n)
					tc_fail(&tc, "engine reported %zu of %zu", sent, n);
				check_bytes(&tc, data, got, n, ngot);
			}
		}
		conn_close(&c);
		free(data);
		free(got);
		tc_end(&tc);
	}
}

/*
 * After -EAGAIN the engine may hold records made from the offer; the retry
 * must offer at least those bytes. A send that starts with everything on the
 * socket always takes a record, so the first -EAGAIN here owes bytes.
 */
static void test_retry_fewer_bytes(void)
{
	size_t v;

	for (v = 0; v < 2; v++) {
		struct tcase tc;
		struct conn c;
		size_t n = 1 << 20, off = 0, ngot = 0;
		uint8_t *data = pattern(n, 77), *got = malloc(n);
		ssize_t r = 0;

		tc_begin(&tc, "%s/retry_with_fewer_bytes_refused", versions[v].name);
		if (data && got && conn_open(&tc, &c, versions[v].version)) {
			/* the client does not read: the socket fills */
			off = fill_socket(&tc, &c, data, n);
			if (!tc.nfail) {
				unsigned eagain = 0;

				r = c.oc.ops->send(&c.oc, data + off, 1);
				if (r != -EINVAL)
					tc_fail(&tc, "retry offering 1 byte returned %zd, want -EINVAL", r);
				/* the connection goes on with the proper retry */
				if (client_read(&c, got, n, &ngot) < 0)
					tc_fail(&tc, "client SSL_read failed");
				download(&tc, &c, data, off, n, got, &ngot, 1, &eagain);
				if (!tc.nfail)
					check_bytes(&tc, data, got, n, ngot);
			}
		}
		conn_close(&c);
		free(data);
		free(got);
		tc_end(&tc);
	}
}

/* close_notify comes after the last byte of data, not before. */
static void test_close_notify(void)
{
	size_t v;

	for (v = 0; v < 2; v++) {
		struct tcase tc;
		struct conn c;
		size_t n = 200000, ngot = 0;
		uint8_t *data = pattern(n, 5), *got = malloc(n + 1);
		unsigned eagain = 0;

		tc_begin(&tc, "%s/close_notify_after_data", versions[v].name);
		if (data && got && conn_open(&tc, &c, versions[v].version) &&
		    download(&tc, &c, data, 0, n, got, &ngot, 1, &eagain) == n && !tc.nfail) {
			uint64_t end = now_ms() + XFER_MS;
			int r = c.oc.ops->shutdown(&c.oc);

			if (r != 1)
				tc_fail(&tc, "shutdown returned %d", r);
			for (r = 0; r == 0 && now_ms() < end;)
				r = client_read(&c, got, n + 1, &ngot);
			if (r != 1)
				tc_fail(&tc, "client saw no close_notify (%d)", r);
			check_bytes(&tc, data, got, n, ngot);
		}
		conn_close(&c);
		free(data);
		free(got);
		tc_end(&tc);
	}
}

/*
 * Shutdown while records of the last send still wait for room: it says
 * -EAGAIN (want write) until they and the close_notify behind them are on
 * the socket; the client reads every byte taken, then close_notify.
 */
static void test_shutdown_socket_full(void)
{
	size_t v;

	for (v = 0; v < 2; v++) {
		struct tcase tc;
		struct conn c;
		size_t n = 1 << 20, off, ngot = 0;
		uint8_t *data = pattern(n, 15), *got = malloc(n);

		tc_begin(&tc, "%s/shutdown_while_socket_full", versions[v].name);
		if (data && got && conn_open(&tc, &c, versions[v].version) &&
		    (off = fill_socket(&tc, &c, data, n), !tc.nfail)) {
			uint64_t end = now_ms() + XFER_MS;
			int r = c.oc.ops->shutdown(&c.oc), cr = 0;

			if (r != -EAGAIN || c.oc.want != OFFLOAD_WANT_WRITE)
				tc_fail(&tc, "shutdown with the socket full returned %d (want %u)", r,
					c.oc.want);
			while (r == -EAGAIN && cr == 0 && now_ms() < end) {
				cr = client_read(&c, got, n, &ngot);
				r = c.oc.ops->shutdown(&c.oc);
			}
			if (r != 1)
				tc_fail(&tc, "shutdown never completed: %d", r);
			while (cr == 0 && now_ms() < end)
				cr = client_read(&c, got, n, &ngot);
			if (cr != 1)
				tc_fail(&tc, "client saw no close_notify (%d)", cr);
			/* everything sent before -EAGAIN, and the records taken after it */
			if (ngot < off + 1 || ngot > off + CHUNK)
				tc_fail(&tc, "client got %zu bytes, want %zu + up to %d", ngot, off,
					CHUNK);
			else
				check_bytes(&tc, data, got, ngot, ngot);
		}
		conn_close(&c);
		free(data);
		free(got);
		tc_end(&tc);
	}
}

/* Records still waiting when the session goes: freed with it (ASan), the SSL cut off. */
static void test_detach_with_records_waiting(void)
{
	struct tcase tc;
	struct conn c;
	size_t n = 1 << 20;
	uint8_t *data = pattern(n, 16);

	tc_begin(&tc, "tls13/detach_with_records_waiting");
	if (conn_open(&tc, &c, TLS1_3_VERSION) && (fill_socket(&tc, &c, data, n), !tc.nfail)) {
		BIO *b = SSL_get_wbio(c.srv);

		offload_detach(&c.oc);
		c.attached = false;
		/* what OpenSSL might still write goes nowhere, and says so */
		if (BIO_write(b, "x", 1) > 0)
			tc_fail(&tc, "the engine's BIO took bytes after detach");
	}
	conn_close(&c); /* SSL_free frees the BIO */
	free(data);
	tc_end(&tc);
}

/*
 * A client's KeyUpdate asking for ours: OpenSSL answers on the next send,
 * through the gathering buffer, and the client reads on under the new keys.
 * Once with the socket empty, once while records of a send wait for room.
 */
static void test_keyupdate(void)
{
	size_t full;

	for (full = 0; full < 2; full++) {
		struct tcase tc;
		struct conn c;
		size_t n = 1 << 20, ngot = 0, off = 0;
		uint8_t *data = pattern(n, 9), *got = malloc(n), b;
		unsigned eagain = 0;

		tc_begin(&tc, "tls13/client_keyupdate_answered%s", full ? "_socket_full" : "");
		if (data && got && conn_open(&tc, &c, TLS1_3_VERSION)) {
			if (full)
				off = fill_socket(&tc, &c, data, n);
			else
				off = download(&tc, &c, data, 0, n / 2, got, &ngot, 1, &eagain);
		}
		if (!tc.nfail && c.srv) {
			ssize_t r;
			uint64_t end = now_ms() + XFER_MS;

			client_keyupdates = 0;
			if (!SSL_key_update(c.cli, SSL_KEY_UPDATE_REQUESTED) || SSL_write(c.cli, "x", 1) != 1)
				tc_fail(&tc, "client KeyUpdate failed");
			while ((r = c.oc.ops->recv(&c.oc, &b, 1)) == -EAGAIN && now_ms() < end)
				;
			if (r != 1 || b != 'x')
				tc_fail(&tc, "server recv after KeyUpdate: %zd", r);
			if (download(&tc, &c, data, off, n, got, &ngot, 3, &eagain) == n && !tc.nfail)
				check_bytes(&tc, data, got, n, ngot);
			if (client_keyupdates != 1)
				tc_fail(&tc, "the client received %u KeyUpdates, want 1", client_keyupdates);
		}
		conn_close(&c);
		free(data);
		free(got);
		tc_end(&tc);
	}
}

/* The client resets the connection: send fails with a fatal error, never -EAGAIN forever. */
static void test_peer_reset(void)
{
	struct tcase tc;
	struct conn c;
	size_t n = 1 << 20, off = 0;
	uint8_t *data = pattern(n, 21);

	tc_begin(&tc, "tls13/peer_reset_is_fatal");
	if (conn_open(&tc, &c, TLS1_3_VERSION)) {
		struct linger lg = { .l_onoff = 1, .l_linger = 0 };
		uint64_t end = now_ms() + XFER_MS;
		ssize_t r = 0;

		/* the client goes away with its receive queue full: RST */
		fill_socket(&tc, &c, data, n);
		setsockopt(c.cfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		close(c.cfd);
		c.cfd = -1;
		while (now_ms() < end) {
			r = c.oc.ops->send(&c.oc, data + off, CHUNK);
			if (r > 0)
				off = (off + (size_t)r) % (n - CHUNK);
			else if (r != -EAGAIN)
				break;
		}
		if (r != -ECONNRESET && r != -EPIPE)
			tc_fail(&tc, "send after the reset returned %zd, want -ECONNRESET or -EPIPE", r);
		if (!c.oc.err[0])
			tc_fail(&tc, "no error text for the log");
	}
	conn_close(&c);
	free(data);
	tc_end(&tc);
}

/* Client to server: recv is OpenSSL's own read path, the gathering touches nothing. */
static void test_upload(void)
{
	size_t v;

	for (v = 0; v < 2; v++) {
		struct tcase tc;
		struct conn c;
		size_t n = 2 << 20, off = 0, ngot = 0;
		uint8_t *data = pattern(n, 31), *got = malloc(n);

		tc_begin(&tc, "%s/upload_2_MiB", versions[v].name);
		if (data && got && conn_open(&tc, &c, versions[v].version)) {
			uint64_t end = now_ms() + XFER_MS;

			while ((off < n || ngot < n) && now_ms() < end) {
				size_t k = 0;
				ssize_t r;

				if (off < n && SSL_write_ex(c.cli, data + off, n - off, &k) == 1)
					off += k;
				r = c.oc.ops->recv(&c.oc, got + ngot, n - ngot);
				if (r > 0)
					ngot += (size_t)r;
				else if (r != -EAGAIN) {
					tc_fail(&tc, "recv returned %zd (%s)", r, c.oc.err);
					break;
				}
			}
			check_bytes(&tc, data, got, n, ngot);
		}
		conn_close(&c);
		free(data);
		free(got);
		tc_end(&tc);
	}
}

int main(void)
{
	if (make_identity() < 0) {
		printf("FAIL: identity: cannot make a key and certificate\n");
		return 1;
	}
	test_download();
	test_download_cbc();
	test_retry_fewer_bytes();
	test_close_notify();
	test_shutdown_socket_full();
	test_detach_with_records_waiting();
	test_keyupdate();
	test_peer_reset();
	test_upload();
	free_identity();
	return check_exit("test_userspace");
}
