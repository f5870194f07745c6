/*
 * test_dpdk.c - the DPDK cryptodev record engine (offload/dpdk.c) against
 * OpenSSL as the peer.
 *
 * Each connection is a socketpair. The engine's end belongs to a server SSL
 * that did the handshake with offload_prepare() catching its secrets; the
 * other end to an OpenSSL client whose records pass through memory BIOs, so
 * a case can hold them back, batch them, or corrupt one. Records the engine
 * encrypts are decrypted by OpenSSL and the reverse: TLS 1.2 and 1.3,
 * AES-128-GCM and AES-256-GCM, sizes around the 2^14 record limit
 * (RFC 8446 §5.1), TLS 1.3 padding (§5.4), close_notify (§6.1), KeyUpdate
 * (§4.6.3), bad_record_mac (§5.2), batching into bursts, and the suites the
 * engine declines.
 *
 * The engine is driven like the worker's event loop (gateway/worker.c):
 * after -EAGAIN with OFFLOAD_WANT_ENGINE a connection is called again only
 * once offload_poll() has run its wake function. A connection left waiting
 * while the device holds nothing for anyone is a failure, not a hang.
 *
 * The EAL starts once per process, so main() forks one child per software
 * PMD before any EAL call; each child runs every case, named after its PMD.
 * `test_dpdk crypto_openssl0` runs one PMD in this process.
 *
 * Built by `make unit` (links every offload/ module, libssl, libcrypto, libdpdk).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "check.h"
#include "engine.h"
#include "offload.h"
#include "tlstest.h"

#define MAX_PLAIN 16384     /* RFC 8446 §5.1 */
#define XFER_MS 8000        /* longest one transfer may take */
#define WAIT_MS 2000        /* longest wait for one engine result */
#define STUCK_POLLS 4       /* idle polls before a waiting connection counts as lost */
#define CHILD_S 120         /* longest a whole PMD run may take */
#define BATCH 16
#define CHILD_CASES_FAILED 3 /* a child's status when it printed FAIL lines */

static const char *pmd; /* the vdev this process runs the cases on */
static unsigned long evc[OFFLOAD_EV_MAX];
static SSL_CTX *server_ctxs[3]; /* by TLS 1.3 ticket count */

static void count_ev(enum offload_event ev, unsigned long n)
{
	if ((unsigned)ev < OFFLOAD_EV_MAX)
		evc[ev] += n;
}

static const char *ssl_err(void)
{
	unsigned long e = ERR_peek_last_error();
	const char *s = e ? ERR_reason_error_string(e) : NULL;

	return s ? s : "no OpenSSL error";
}

static size_t records_for(size_t n)
{
	return (n + MAX_PLAIN - 1) / MAX_PLAIN;
}

/* --- identity and contexts ------------------------------------------------ */

/* The gateway's side: every suite a case needs, tickets for TLS 1.3 as asked. */
static SSL_CTX *server_ctx(int tickets)
{
	SSL_CTX *ctx = server_ctxs[tickets];

	if (ctx)
		return ctx;
	ctx = SSL_CTX_new(TLS_server_method());
	if (!ctx || !SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) ||
	    !SSL_CTX_use_certificate(ctx, id_cert) || !SSL_CTX_use_PrivateKey(ctx, id_key) ||
	    !SSL_CTX_set_cipher_list(ctx, "ECDHE-ECDSA-AES128-GCM-SHA256:"
					  "ECDHE-ECDSA-AES256-GCM-SHA384:"
					  "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-SHA256") ||
	    !SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
					   "TLS_CHACHA20_POLY1305_SHA256") ||
	    !SSL_CTX_set_num_tickets(ctx, (size_t)tickets) ||
	    !SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"mailgw", 6)) {
		SSL_CTX_free(ctx);
		return NULL;
	}
	offload_setup_ctx(OFFLOAD_REQ_DPDK, true, ctx);
	server_ctxs[tickets] = ctx;
	return ctx;
}

/* --- one connection ----------------------------------------------------------- */

struct conn {
	struct offload_conn oc;
	SSL *srv, *cli;
	BIO *cin, *cout;       /* the client's memory BIOs: bytes to it, bytes from it */
	int sfd, cfd;
	bool attached;
	bool wait_engine;      /* last engine call: -EAGAIN, OFFLOAD_WANT_ENGINE */
	bool woken;            /* oc.wake ran since the last engine call */
	unsigned wakes;
	int alert;             /* last alert the client read, (level << 8) | desc; -1 none */
	unsigned keyupdates;   /* KeyUpdate messages the client read */
};

struct copt {
	int version;           /* TLS1_2_VERSION or TLS1_3_VERSION */
	const char *cipher;    /* TLS 1.2 cipher or TLS 1.3 ciphersuite (one name) */
	int tickets;           /* TLS 1.3 NewSessionTickets the server sends */
	SSL_SESSION *resume;   /* client: resume this session */
	size_t padding;        /* client: TLS 1.3 block padding, 0 none */
};

static void on_wake(struct offload_conn *oc)
{
	struct conn *c = (struct conn *)((char *)oc - offsetof(struct conn, oc));

	c->woken = true;
	c->wakes++;
}

static void cli_info(const SSL *ssl, int where, int ret)
{
	struct conn *c = SSL_get_app_data(ssl);

	if (c && (where & SSL_CB_READ_ALERT) == SSL_CB_READ_ALERT)
		c->alert = ret;
}

static void cli_msg(int write_p, int version, int type, const void *buf, size_t len, SSL *ssl,
		    void *arg)
{
	struct conn *c = SSL_get_app_data(ssl);

	(void)version;
	(void)arg;
	if (c && !write_p && type == SSL3_RT_HANDSHAKE && len >= 1 &&
	    *(const uint8_t *)buf == SSL3_MT_KEY_UPDATE)
		c->keyupdates++;
}

/* Move the client's output to its socket as far as the socket takes it. */
static int cli_flush(struct conn *c)
{
	static uint8_t scratch[65536];
	char *p;
	long n;

	while ((n = BIO_get_mem_data(c->cout, &p)) > 0) {
		size_t k = (size_t)n > sizeof(scratch) ? sizeof(scratch) : (size_t)n;
		ssize_t w = write(c->cfd, p, k);

		if (w < 0)
			return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
		if (BIO_read(c->cout, scratch, (int)w) != (int)w)
			return -1;
	}
	return 0;
}

/* Hand the client what arrived on its socket. */
static int cli_fill(struct conn *c)
{
	static uint8_t buf[65536];

	for (;;) {
		ssize_t r = read(c->cfd, buf, sizeof(buf));

		if (r > 0) {
			if (BIO_write(c->cin, buf, (int)r) != (int)r)
				return -1;
			continue;
		}
		if (r == 0 || errno == EAGAIN || errno == EWOULDBLOCK)
			return 0;
		return -1;
	}
}

static int cli_pump(struct conn *c)
{
	return cli_flush(c) < 0 || cli_fill(c) < 0 ? -1 : 0;
}

static int hs_step(SSL *s, bool *done)
{
	int r, e;

	if (*done)
		return 0;
	r = SSL_do_handshake(s);
	if (r == 1) {
		*done = true;
		return 0;
	}
	e = SSL_get_error(s, r);
	return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ? 0 : -1;
}

static bool set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	return fl >= 0 && fcntl(fd, F_SETFL, fl | O_NONBLOCK) == 0;
}

/* Socketpair, client and server SSLs, handshake driven from this thread. */
static bool conn_open(struct tcase *tc, struct conn *c, const struct copt *o)
{
	SSL_CTX *cctx, *sctx;
	int sv[2], i, ok;
	bool sdone = false, cdone = false;
	const char *got;

	memset(c, 0, sizeof(*c));
	c->sfd = c->cfd = -1;
	c->alert = -1;
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
		return tc_fail(tc, "socketpair: %s", strerror(errno));
	c->sfd = sv[0];
	c->cfd = sv[1];
	if (!set_nonblock(c->sfd) || !set_nonblock(c->cfd))
		return tc_fail(tc, "O_NONBLOCK: %s", strerror(errno));

	cctx = SSL_CTX_new(TLS_client_method());
	if (!cctx)
		return tc_fail(tc, "client SSL_CTX_new: %s", ssl_err());
	ok = SSL_CTX_set_min_proto_version(cctx, o->version) &&
	     SSL_CTX_set_max_proto_version(cctx, o->version) &&
	     (o->version == TLS1_3_VERSION ? SSL_CTX_set_ciphersuites(cctx, o->cipher) :
					     SSL_CTX_set_cipher_list(cctx, o->cipher));
	SSL_CTX_set_verify(cctx, SSL_VERIFY_NONE, NULL);
	c->cli = ok ? SSL_new(cctx) : NULL;
	SSL_CTX_free(cctx);
	if (!c->cli)
		return tc_fail(tc, "client SSL for %s: %s", o->cipher, ssl_err());
	c->cin = BIO_new(BIO_s_mem());
	c->cout = BIO_new(BIO_s_mem());
	if (!c->cin || !c->cout) {
		BIO_free(c->cin);
		BIO_free(c->cout);
		c->cin = c->cout = NULL;
		return tc_fail(tc, "BIO_new: %s", ssl_err());
	}
	BIO_set_mem_eof_return(c->cin, -1);
	BIO_set_mem_eof_return(c->cout, -1);
	SSL_set_bio(c->cli, c->cin, c->cout);
	SSL_set_app_data(c->cli, c);
	SSL_set_info_callback(c->cli, cli_info);
	SSL_set_msg_callback(c->cli, cli_msg);
	SSL_set_mode(c->cli, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	SSL_set_connect_state(c->cli);
	if (o->resume && !SSL_set_session(c->cli, o->resume))
		return tc_fail(tc, "SSL_set_session: %s", ssl_err());
	if (o->padding && !SSL_set_block_padding(c->cli, o->padding))
		return tc_fail(tc, "SSL_set_block_padding(%zu): %s", o->padding, ssl_err());

	sctx = server_ctx(o->tickets);
	c->srv = sctx ? SSL_new(sctx) : NULL;
	if (!c->srv || !SSL_set_fd(c->srv, c->sfd))
		return tc_fail(tc, "server SSL: %s", ssl_err());
	SSL_set_accept_state(c->srv);
	offload_prepare(OFFLOAD_REQ_DPDK, c->srv);

	for (i = 0; i < 100 && !(sdone && cdone); i++) {
		if (hs_step(c->cli, &cdone) < 0)
			return tc_fail(tc, "client handshake: %s", ssl_err());
		if (cli_pump(c) < 0)
			return tc_fail(tc, "client socket: %s", strerror(errno));
		if (hs_step(c->srv, &sdone) < 0)
			return tc_fail(tc, "server handshake: %s", ssl_err());
		if (cli_pump(c) < 0)
			return tc_fail(tc, "client socket: %s", strerror(errno));
	}
	if (!sdone || !cdone)
		return tc_fail(tc, "handshake not done after %d rounds (server %d, client %d)", i,
			       sdone, cdone);
	if (SSL_version(c->srv) != o->version)
		return tc_fail(tc, "negotiated %s", SSL_get_version(c->srv));
	got = SSL_CIPHER_get_name(SSL_get_current_cipher(c->srv));
	if (strcmp(got, o->cipher) != 0)
		return tc_fail(tc, "negotiated %s, wanted %s", got, o->cipher);
	return true;
}

/* offload_attach() with the DPDK engine asked for; true when dpdk took it. */
static bool conn_attach(struct tcase *tc, struct conn *c)
{
	int rc;

	c->oc.ssl = c->srv;
	c->oc.fd = c->sfd;
	c->oc.wake = on_wake;
	rc = offload_attach(OFFLOAD_REQ_DPDK, true, &c->oc);
	if (rc != 0)
		return tc_fail(tc, "offload_attach: %d (%s)", rc, c->oc.err);
	c->attached = true;
	if (c->oc.ops != &offload_dpdk)
		return tc_fail(tc, "engine %s took the connection (%s)",
			       c->oc.ops ? c->oc.ops->name : "none", c->oc.err);
	return expect_long(tc, "tx_mode", OFFLOAD_MODE_DPDK, c->oc.tx_mode) &&
	       expect_long(tc, "rx_mode", OFFLOAD_MODE_DPDK, c->oc.rx_mode);
}

static bool conn_setup(struct tcase *tc, struct conn *c, const struct copt *o)
{
	return conn_open(tc, c, o) && conn_attach(tc, c);
}

static void conn_close(struct conn *c)
{
	if (c->attached)
		offload_detach(&c->oc);
	c->attached = false;
	SSL_free(c->srv);
	SSL_free(c->cli);
	c->srv = c->cli = NULL;
	if (c->sfd >= 0)
		close(c->sfd);
	if (c->cfd >= 0)
		close(c->cfd);
	c->sfd = c->cfd = -1;
}

/* --- driving the engine like the event loop -------------------------------- */

/* May the loop call the engine for c now? Not while it waits for its wake. */
static bool may_call(struct conn *c)
{
	if (c->wait_engine && !c->woken)
		return false;
	c->wait_engine = false;
	c->woken = false;
	return true;
}

static void after_call(struct conn *c, ssize_t r)
{
	c->wait_engine = r == -EAGAIN && c->oc.want == OFFLOAD_WANT_ENGINE;
}

/*
 * After a poll: a connection waiting for its wake while the device holds
 * nothing at all would wait forever in the worker.
 */
static bool check_lost(struct tcase *tc, struct conn *c, unsigned *idle, const char *what)
{
	if (c->wait_engine && !c->woken && !offload_busy()) {
		if (++*idle >= STUCK_POLLS)
			return tc_fail(tc, "%s: -EAGAIN with OFFLOAD_WANT_ENGINE, nothing queued or on "
				       "the device, and the connection was never woken", what);
	} else {
		*idle = 0;
	}
	return true;
}

/* Every OpenSSL record the client can read now, appended to got[0..cap). */
static int cli_read(struct tcase *tc, struct conn *c, uint8_t *got, size_t cap, size_t *have)
{
	for (;;) {
		size_t k = 0;
		int r, e;

		if (*have >= cap)
			return 0;
		r = SSL_read_ex(c->cli, got + *have, cap - *have, &k);
		if (r == 1) {
			*have += k;
			continue;
		}
		e = SSL_get_error(c->cli, r);
		if (e == SSL_ERROR_WANT_READ)
			return 0;
		tc_fail(tc, "client SSL_read: error %d (%s) after %zu bytes", e, ssl_err(), *have);
		ERR_clear_error();
		return -1;
	}
}

static bool expect_same(struct tcase *tc, const char *what, const uint8_t *exp, const uint8_t *got,
			size_t n)
{
	size_t i;

	if (memcmp(exp, got, n) == 0)
		return true;
	for (i = 0; exp[i] == got[i]; i++)
		;
	return tc_fail(tc, "%s: %zu bytes, first difference at byte %zu", what, n, i);
}

/* The engine sends data[0..n) with send(); the client must read exactly that. */
static bool eng_to_cli(struct tcase *tc, struct conn *c, const uint8_t *data, size_t n)
{
	uint8_t *got = malloc(n + 1);
	size_t sent = 0, have = 0;
	uint64_t deadline = now_ms() + XFER_MS;
	unsigned idle = 0;
	bool ok = false;

	if (!got)
		abort();
	while (sent < n || have < n) {
		if (sent < n && may_call(c)) {
			ssize_t r = c->oc.ops->send(&c->oc, data + sent, n - sent);

			after_call(c, r);
			if (r > 0 && (size_t)r <= n - sent) {
				sent += (size_t)r;
			} else if (r > 0 || (r != -EAGAIN)) {
				tc_fail(tc, "send(%zu bytes): %zd (%s) after %zu of %zu", n - sent, r,
					c->oc.err, sent, n);
				goto out;
			}
		}
		offload_poll();
		if (cli_pump(c) < 0) {
			tc_fail(tc, "client socket: %s", strerror(errno));
			goto out;
		}
		if (cli_read(tc, c, got, n + 1, &have) < 0)
			goto out;
		if (have > n) {
			tc_fail(tc, "client read more than the %zu bytes sent", n);
			goto out;
		}
		if (!check_lost(tc, c, &idle, "send"))
			goto out;
		if (now_ms() > deadline) {
			tc_fail(tc, "timeout: engine sent %zu, client read %zu of %zu bytes", sent,
				have, n);
			goto out;
		}
	}
	ok = expect_same(tc, "client read", data, got, n);
out:
	free(got);
	return ok;
}

/*
 * Call recv() until it gives something other than -EAGAIN, the client's
 * bytes flowing meanwhile. -ETIMEDOUT (and a failure) when nothing comes.
 */
static ssize_t eng_recv_wait(struct tcase *tc, struct conn *c, void *buf, size_t cap)
{
	uint64_t deadline = now_ms() + WAIT_MS;
	unsigned idle = 0;

	for (;;) {
		if (cli_pump(c) < 0) {
			tc_fail(tc, "client socket: %s", strerror(errno));
			return -EIO;
		}
		if (may_call(c)) {
			ssize_t r = c->oc.ops->recv(&c->oc, buf, cap);

			after_call(c, r);
			if (r != -EAGAIN)
				return r;
		}
		offload_poll();
		if (!check_lost(tc, c, &idle, "recv"))
			return -ETIMEDOUT;
		if (now_ms() > deadline) {
			tc_fail(tc, "recv: no result in %d ms (want %u)", WAIT_MS, c->oc.want);
			return -ETIMEDOUT;
		}
	}
}

/* The engine's recv() must return exactly data[0..n), cap bytes at most per call. */
static bool eng_expect(struct tcase *tc, struct conn *c, const uint8_t *data, size_t n,
		       size_t cap)
{
	uint8_t *buf = malloc(cap), *got = malloc(n + 1);
	size_t have = 0;
	uint64_t deadline = now_ms() + XFER_MS;
	unsigned idle = 0;
	bool ok = false;

	if (!buf || !got)
		abort();
	while (have < n) {
		if (cli_pump(c) < 0) {
			tc_fail(tc, "client socket: %s", strerror(errno));
			goto out;
		}
		if (may_call(c)) {
			ssize_t r = c->oc.ops->recv(&c->oc, buf, cap);

			after_call(c, r);
			if (r > 0) {
				if ((size_t)r > cap || have + (size_t)r > n) {
					tc_fail(tc, "recv returned %zd (buffer %zu) after %zu of %zu",
						r, cap, have, n);
					goto out;
				}
				memcpy(got + have, buf, (size_t)r);
				have += (size_t)r;
				continue;
			}
			if (r != -EAGAIN) {
				tc_fail(tc, "recv: %zd (%s) after %zu of %zu bytes", r, c->oc.err, have,
					n);
				goto out;
			}
		}
		offload_poll();
		if (!check_lost(tc, c, &idle, "recv"))
			goto out;
		if (now_ms() > deadline) {
			tc_fail(tc, "timeout: engine received %zu of %zu bytes", have, n);
			goto out;
		}
	}
	ok = expect_same(tc, "engine recv", data, got, n);
out:
	free(buf);
	free(got);
	return ok;
}

/* The client writes n bytes: into its memory BIO, one record per 2^14 bytes. */
static bool cli_write(struct tcase *tc, struct conn *c, const void *data, size_t n)
{
	size_t off = 0;

	while (off < n) {
		size_t k = 0;

		if (SSL_write_ex(c->cli, (const uint8_t *)data + off, n - off, &k) != 1 || k == 0)
			return tc_fail(tc, "client SSL_write(%zu): %s", n - off, ssl_err());
		off += k;
	}
	return true;
}

static bool cli_to_eng(struct tcase *tc, struct conn *c, const uint8_t *data, size_t n,
		       size_t cap)
{
	return cli_write(tc, c, data, n) && eng_expect(tc, c, data, n, cap);
}

/* Both directions with fresh bytes: proves the connection still works. */
static bool roundtrip(struct tcase *tc, struct conn *c, size_t n, uint32_t seed)
{
	uint8_t *a = pattern(n, seed), *b = pattern(n, seed + 1);
	bool ok = eng_to_cli(tc, c, a, n) && cli_to_eng(tc, c, b, n, 16384);

	free(a);
	free(b);
	return ok;
}

/* --- cases ------------------------------------------------------------------- */

static const struct suite {
	const char *name;
	int version;
	const char *cipher;
} suites[] = {
	{ "tls12_aes128gcm", TLS1_2_VERSION, "ECDHE-ECDSA-AES128-GCM-SHA256" },
	{ "tls12_aes256gcm", TLS1_2_VERSION, "ECDHE-ECDSA-AES256-GCM-SHA384" },
	{ "tls13_aes128gcm", TLS1_3_VERSION, "TLS_AES_128_GCM_SHA256" },
	{ "tls13_aes256gcm", TLS1_3_VERSION, "TLS_AES_256_GCM_SHA384" },
};
#define NSUITES (sizeof(suites) / sizeof(suites[0]))

static struct copt opt_of(const struct suite *s)
{
	struct copt o = { .version = s->version, .cipher = s->cipher, .tickets = 2 };

	return o;
}

static void test_device(void)
{
	struct tcase tc;
	const char *d = offload_dpdk_describe();

	tc_begin(&tc, "%s/device_in_use", pmd);
	if (expect_true(&tc, "engine usable after offload_worker_start", offload_dpdk_usable()))
		if (!strstr(d, pmd))
			tc_fail(&tc, "describe: \"%s\" does not name %s", d, pmd);
	tc_end(&tc);
}

/*
 * Records we encrypt, OpenSSL decrypts, and the reverse, around the 2^14
 * plaintext limit: each size on a fresh connection (server sends 2 tickets,
 * so the first TLS 1.3 sequence number is 2). The engine must cut records
 * at 2^14 bytes, and read the client's in a 7001-byte buffer.
 */
static void test_matrix(void)
{
	static const size_t sizes[] = { 1, 2, 100, 1000, 16383, 16384, 16385, 65536 + 7, 200000 };

	for (size_t s = 0; s < NSUITES; s++) {
		for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
			struct copt o = opt_of(&suites[s]);
			size_t n = sizes[i];
			uint8_t *a = pattern(n, (uint32_t)(s * 100 + i)), *b = pattern(n, (uint32_t)~i);
			struct tcase tc;
			struct conn c;
			unsigned long tx0, rx0;
			bool up;

			tc_begin(&tc, "%s/%s/send_%zu", pmd, suites[s].name, n);
			up = conn_setup(&tc, &c, &o);
			tx0 = evc[OFFLOAD_EV_DPDK_RECORD_TX];
			if (up && eng_to_cli(&tc, &c, a, n))
				expect_long(&tc, "records encrypted", (long)records_for(n),
					    (long)(evc[OFFLOAD_EV_DPDK_RECORD_TX] - tx0));
			tc_end(&tc);

			tc_begin(&tc, "%s/%s/recv_%zu", pmd, suites[s].name, n);
			rx0 = evc[OFFLOAD_EV_DPDK_RECORD_RX];
			if (!up)
				tc_fail(&tc, "no connection (see the send case)");
			else if (cli_to_eng(&tc, &c, b, n, 7001))
				expect_long(&tc, "records decrypted", (long)records_for(n),
					    (long)(evc[OFFLOAD_EV_DPDK_RECORD_RX] - rx0));
			tc_end(&tc);
			conn_close(&c);
			free(a);
			free(b);
		}
	}
}

/* A record larger than the reader's buffer: delivered in pieces, pending() between. */
static void test_small_buffer(void)
{
	for (size_t s = 0; s < NSUITES; s++) {
		struct copt o = opt_of(&suites[s]);
		uint8_t *a = pattern(10000, 77), got[10000];
		struct tcase tc;
		struct conn c;
		ssize_t r;
		size_t have = 0;

		tc_begin(&tc, "%s/%s/recv_in_pieces_pending", pmd, suites[s].name);
		if (conn_setup(&tc, &c, &o) && cli_write(&tc, &c, a, 10000)) {
			r = eng_recv_wait(&tc, &c, got, 4000);
			if (expect_long(&tc, "first recv", 4000, r)) {
				have = 4000;
				expect_true(&tc, "pending() with 6000 bytes left",
					    c.oc.ops->pending(&c.oc));
				r = c.oc.ops->recv(&c.oc, got + have, 4000);
				if (expect_long(&tc, "second recv (no poll needed)", 4000, r))
					have += 4000;
				r = c.oc.ops->recv(&c.oc, got + have, 4000);
				if (expect_long(&tc, "third recv", 2000, r))
					have += 2000;
				expect_true(&tc, "pending() false once the record is consumed",
					    !c.oc.ops->pending(&c.oc));
				if (have == 10000)
					expect_same(&tc, "engine recv", a, got, 10000);
			}
		}
		conn_close(&c);
		free(a);
		tc_end(&tc);
	}
}

/*
 * Sequence numbers after the handshake: no TLS 1.3 tickets (first TX
 * record 0), and resumed sessions (a shorter handshake, new tickets).
 */
static void test_tickets_resumption(void)
{
	for (size_t s = 0; s < NSUITES; s++) {
		struct copt o = opt_of(&suites[s]);
		struct tcase tc;
		struct conn c;
		SSL_SESSION *sess = NULL;

		if (suites[s].version == TLS1_3_VERSION) {
			tc_begin(&tc, "%s/%s/no_tickets", pmd, suites[s].name);
			o.tickets = 0;
			if (conn_setup(&tc, &c, &o))
				roundtrip(&tc, &c, 20000, 300 + (uint32_t)s);
			conn_close(&c);
			tc_end(&tc);
			o.tickets = 2;
		}

		tc_begin(&tc, "%s/%s/resumed_session", pmd, suites[s].name);
		/* The client learns its session (TLS 1.3: the tickets) by reading. */
		if (conn_setup(&tc, &c, &o) && roundtrip(&tc, &c, 100, 400 + (uint32_t)s)) {
			sess = SSL_get1_session(c.cli);
			if (!sess || !SSL_SESSION_is_resumable(sess))
				tc_fail(&tc, "client has no resumable session");
			/* Freed without close_notify, OpenSSL would mark it not resumable. */
			SSL_set_shutdown(c.cli, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
		}
		conn_close(&c);
		if (sess) {
			o.resume = sess;
			if (conn_setup(&tc, &c, &o)) {
				expect_true(&tc, "client resumed", SSL_session_reused(c.cli) == 1);
				expect_true(&tc, "server resumed", SSL_session_reused(c.srv) == 1);
				roundtrip(&tc, &c, 20000, 500 + (uint32_t)s);
			}
			conn_close(&c);
			SSL_SESSION_free(sess);
		}
		tc_end(&tc);
	}
}

/* What OpenSSL 3 puts on the wire for n bytes with block padding bp (TLS 1.3, GCM). */
static size_t padded_wire(size_t n, size_t bp)
{
	size_t wire = 0;

	while (n > 0) {
		size_t m = n > MAX_PLAIN ? MAX_PLAIN : n, inner = m + 1, pad = 0;

		if (inner < MAX_PLAIN && inner % bp) {
			pad = bp - inner % bp;
			if (pad > MAX_PLAIN - inner)
				pad = MAX_PLAIN - inner;
		}
		wire += 5 + inner + pad + 16;
		n -= m;
	}
	return wire;
}

/* RFC 8446 §5.4: the engine strips the client's zero padding. */
static void test_padding(void)
{
	static const struct {
		size_t block, size;
	} cases[] = {
		{ 512, 1 },      { 512, 100 },    { 512, 511 },   { 512, 512 },
		{ 512, 1000 },   { 512, 16383 },  { 512, 40000 }, { 16384, 1 },
		{ 16384, 5000 }, { 16384, 16383 }, { 16384, 16384 + 10 },
	};

	for (size_t s = 2; s < NSUITES; s++) {
		for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
			struct copt o = opt_of(&suites[s]);
			size_t n = cases[i].size;
			uint8_t *a = pattern(n, 600 + (uint32_t)i);
			struct tcase tc;
			struct conn c;
			unsigned long rx0;

			tc_begin(&tc, "%s/%s/padding_%zu/recv_%zu", pmd, suites[s].name,
				 cases[i].block, n);
			o.padding = cases[i].block;
			rx0 = evc[OFFLOAD_EV_DPDK_RECORD_RX];
			if (conn_setup(&tc, &c, &o) && cli_write(&tc, &c, a, n)) {
				expect_long(&tc, "padded bytes on the wire",
					    (long)padded_wire(n, cases[i].block),
					    (long)BIO_ctrl_pending(c.cout));
				if (eng_expect(&tc, &c, a, n, 16384))
					expect_long(&tc, "records decrypted", (long)records_for(n),
						    (long)(evc[OFFLOAD_EV_DPDK_RECORD_RX] - rx0));
			}
			conn_close(&c);
			free(a);
			tc_end(&tc);
		}
	}
}

/* RFC 8446 §6.1 / RFC 5246 §7.2.1: close_notify both ways. */
static void test_close_notify(void)
{
	for (size_t s = 0; s < NSUITES; s++) {
		struct copt o = opt_of(&suites[s]);
		struct tcase tc;
		struct conn c;
		uint8_t buf[64];
		ssize_t r;

		tc_begin(&tc, "%s/%s/shutdown_sends_close_notify", pmd, suites[s].name);
		if (conn_setup(&tc, &c, &o) && roundtrip(&tc, &c, 100, 700)) {
			size_t k = 0;
			int rr, e;

			expect_long(&tc, "shutdown()", 1, c.oc.ops->shutdown(&c.oc));
			cli_pump(&c);
			rr = SSL_read_ex(c.cli, buf, sizeof(buf), &k);
			e = SSL_get_error(c.cli, rr);
			if (rr == 1 || e != SSL_ERROR_ZERO_RETURN)
				tc_fail(&tc, "client SSL_read: %d, error %d (%s), wanted "
					"SSL_ERROR_ZERO_RETURN", rr, e, ssl_err());
			if (c.alert < 0 || (c.alert & 0xff) != SSL_AD_CLOSE_NOTIFY)
				tc_fail(&tc, "client read alert %d (%s), wanted close_notify", c.alert,
					c.alert < 0 ? "none" : SSL_alert_desc_string_long(c.alert));
			ERR_clear_error();
		}
		conn_close(&c);
		tc_end(&tc);

		tc_begin(&tc, "%s/%s/client_close_notify_is_eof", pmd, suites[s].name);
		if (conn_setup(&tc, &c, &o) && cli_write(&tc, &c, "last words", 10)) {
			if (SSL_shutdown(c.cli) < 0)
				tc_fail(&tc, "client SSL_shutdown: %s", ssl_err());
			/* Data and close_notify arrive together: data first, then EOF. */
			if (eng_expect(&tc, &c, (const uint8_t *)"last words", 10, sizeof(buf))) {
				r = eng_recv_wait(&tc, &c, buf, sizeof(buf));
				expect_long(&tc, "recv after close_notify", 0, r);
				r = eng_recv_wait(&tc, &c, buf, sizeof(buf));
				expect_long(&tc, "recv again", 0, r);
			}
		}
		conn_close(&c);
		tc_end(&tc);

		tc_begin(&tc, "%s/%s/eof_inside_record", pmd, suites[s].name);
		if (conn_setup(&tc, &c, &o) && cli_write(&tc, &c, "truncated", 9)) {
			char *p;
			long n = BIO_get_mem_data(c.cout, &p);

			/* Half the record, then the socket closes. */
			if (write(c.cfd, p, (size_t)n / 2) != n / 2) {
				tc_fail(&tc, "write: %s", strerror(errno));
			} else {
				shutdown(c.cfd, SHUT_WR);
				(void)BIO_reset(c.cout);
				r = eng_recv_wait(&tc, &c, buf, sizeof(buf));
				if (r >= 0 || r == -EAGAIN)
					tc_fail(&tc, "recv: %zd, wanted a fatal error", r);
			}
		}
		conn_close(&c);
		tc_end(&tc);
	}
}

/* RFC 8446 §4.6.3: the client's KeyUpdates, alone and several in one batch. */
static void test_keyupdate(void)
{
	for (size_t s = 2; s < NSUITES; s++) {
		struct copt o = opt_of(&suites[s]);
		struct tcase tc;
		struct conn c;
		unsigned long ku0;
		uint8_t *a = pattern(30000, 800), *b = pattern(30000, 801);

		tc_begin(&tc, "%s/%s/keyupdate_not_requested", pmd, suites[s].name);
		if (conn_setup(&tc, &c, &o) && roundtrip(&tc, &c, 100, 802)) {
			ku0 = evc[OFFLOAD_EV_DPDK_KEYUPDATE];
			if (!SSL_key_update(c.cli, SSL_KEY_UPDATE_NOT_REQUESTED))
				tc_fail(&tc, "SSL_key_update: %s", ssl_err());
			else if (cli_to_eng(&tc, &c, a, 1000, 16384) && eng_to_cli(&tc, &c, b, 1000)) {
				expect_long(&tc, "KeyUpdates counted", 1,
					    (long)(evc[OFFLOAD_EV_DPDK_KEYUPDATE] - ku0));
				expect_long(&tc, "KeyUpdates the engine sent", 0, c.keyupdates);
				roundtrip(&tc, &c, 20000, 803);
			}
		}
		conn_close(&c);
		tc_end(&tc);

		tc_begin(&tc, "%s/%s/keyupdate_requested", pmd, suites[s].name);
		if (conn_setup(&tc, &c, &o) && roundtrip(&tc, &c, 100, 804)) {
			ku0 = evc[OFFLOAD_EV_DPDK_KEYUPDATE];
			if (!SSL_key_update(c.cli, SSL_KEY_UPDATE_REQUESTED))
				tc_fail(&tc, "SSL_key_update: %s", ssl_err());
			else if (cli_to_eng(&tc, &c, a, 1000, 16384)) {
				expect_long(&tc, "KeyUpdates counted", 1,
					    (long)(evc[OFFLOAD_EV_DPDK_KEYUPDATE] - ku0));
				/* Our KeyUpdate goes out before our next record, then new keys. */
				if (eng_to_cli(&tc, &c, b, 30000)) {
					expect_long(&tc, "KeyUpdates the engine sent", 1, c.keyupdates);
					if (roundtrip(&tc, &c, 20000, 805))
						expect_long(&tc, "KeyUpdates the engine sent, later", 1,
							    c.keyupdates);
				}
			}
		}
		conn_close(&c);
		tc_end(&tc);

		/*
		 * Data, KeyUpdate, data, KeyUpdate (requested), data, flushed at
		 * once: the records behind each KeyUpdate were submitted with the
		 * retired keys and must go again with the new ones.
		 */
		tc_begin(&tc, "%s/%s/two_keyupdates_one_batch", pmd, suites[s].name);
		if (conn_setup(&tc, &c, &o) && roundtrip(&tc, &c, 100, 806)) {
			ku0 = evc[OFFLOAD_EV_DPDK_KEYUPDATE];
			if (cli_write(&tc, &c, a, 100) &&
			    expect_true(&tc, "key update 1",
					SSL_key_update(c.cli, SSL_KEY_UPDATE_NOT_REQUESTED)) &&
			    cli_write(&tc, &c, a + 100, 2000) &&
			    expect_true(&tc, "key update 2",
					SSL_key_update(c.cli, SSL_KEY_UPDATE_REQUESTED)) &&
			    cli_write(&tc, &c, a + 2100, 20000) &&
			    eng_expect(&tc, &c, a, 22100, 16384)) {
				expect_long(&tc, "KeyUpdates counted", 2,
					    (long)(evc[OFFLOAD_EV_DPDK_KEYUPDATE] - ku0));
				if (eng_to_cli(&tc, &c, b, 5000))
					expect_long(&tc, "KeyUpdates the engine sent", 1, c.keyupdates);
				roundtrip(&tc, &c, 1000, 807);
			}
		}
		conn_close(&c);
		tc_end(&tc);

		/* More KeyUpdates in one batch than the engine has receive slots. */
		tc_begin(&tc, "%s/%s/twenty_keyupdates_one_batch", pmd, suites[s].name);
		if (conn_setup(&tc, &c, &o) && roundtrip(&tc, &c, 100, 808)) {
			bool ok = true;

			ku0 = evc[OFFLOAD_EV_DPDK_KEYUPDATE];
			for (int k = 0; k < 20 && ok; k++)
				ok = expect_true(&tc, "key update",
						 SSL_key_update(c.cli, k % 3 == 2 ?
								       SSL_KEY_UPDATE_REQUESTED :
								       SSL_KEY_UPDATE_NOT_REQUESTED)) &&
				     cli_write(&tc, &c, a + 300 * k, 300);
			if (ok && eng_expect(&tc, &c, a, 6000, 16384)) {
				expect_long(&tc, "KeyUpdates counted", 20,
					    (long)(evc[OFFLOAD_EV_DPDK_KEYUPDATE] - ku0));
				if (eng_to_cli(&tc, &c, b, 1000))
					expect_long(&tc, "KeyUpdates the engine sent", 1, c.keyupdates);
				roundtrip(&tc, &c, 1000, 809);
			}
		}
		conn_close(&c);
		tc_end(&tc);
		free(a);
		free(b);
	}
}

/* Write the client's pending output to its socket, one byte of the record at off flipped. */
static bool send_tampered(struct tcase *tc, struct conn *c, size_t rec_off)
{
	char *p;
	long n = BIO_get_mem_data(c->cout, &p);
	size_t body;

	if (n < 5 || (size_t)n < rec_off + 5)
		return tc_fail(tc, "client output: %ld bytes", n);
	body = (size_t)((uint8_t)p[rec_off + 3]) << 8 | (uint8_t)p[rec_off + 4];
	if ((uint8_t)p[rec_off] != SSL3_RT_APPLICATION_DATA || rec_off + 5 + body > (size_t)n)
		return tc_fail(tc, "no application data record at %zu", rec_off);
	p[rec_off + 5 + body / 2] ^= 0x20; /* ciphertext, clear of the explicit nonce */
	return cli_flush(c) == 0 && BIO_ctrl_pending(c->cout) == 0 ?
		       true : tc_fail(tc, "client output not flushed");
}

/* The client must have read a bad_record_mac alert (RFC 8446 §5.2). */
static void expect_bad_mac_alert(struct tcase *tc, struct conn *c)
{
	uint8_t buf[64];
	size_t k = 0;
	int r;
	unsigned long e;

	cli_pump(c);
	ERR_clear_error();
	r = SSL_read_ex(c->cli, buf, sizeof(buf), &k);
	e = ERR_peek_error();
	if (r == 1)
		tc_fail(tc, "client SSL_read succeeded after the engine failed");
	else if (ERR_GET_REASON(e) != SSL_R_SSLV3_ALERT_BAD_RECORD_MAC)
		tc_fail(tc, "client error: %s, wanted the bad record mac alert", ssl_err());
	if (c->alert < 0 || strcmp(SSL_alert_desc_string_long(c->alert), "bad record mac") != 0 ||
	    (c->alert >> 8) != SSL3_AL_FATAL)
		tc_fail(tc, "client read alert %d (%s), wanted fatal bad record mac", c->alert,
			c->alert < 0 ? "none" : SSL_alert_desc_string_long(c->alert));
	ERR_clear_error();
}

/* RFC 8446 §5.2 / RFC 5246 §7.2.2: a record failing authentication ends that session only. */
static void test_bad_mac(void)
{
	for (size_t s = 0; s < NSUITES; s++) {
		struct copt o = opt_of(&suites[s]);
		struct tcase tc;
		struct conn a, b;
		unsigned long bad0;
		uint8_t buf[256];
		ssize_t r;
		bool up;

		memset(buf, 'm', sizeof(buf));

		tc_begin(&tc, "%s/%s/bad_mac", pmd, suites[s].name);
		up = conn_setup(&tc, &a, &o);
		up = conn_setup(&tc, &b, &o) && up;
		if (up && roundtrip(&tc, &a, 100, 900) && roundtrip(&tc, &b, 100, 901) &&
		    cli_write(&tc, &a, buf, 100) && send_tampered(&tc, &a, 0)) {
			bad0 = evc[OFFLOAD_EV_DPDK_BAD_MAC];
			r = eng_recv_wait(&tc, &a, buf, sizeof(buf));
			expect_long(&tc, "recv", -EBADMSG, r);
			if (!strstr(a.oc.err, "MAC"))
				tc_fail(&tc, "oc.err \"%s\" does not mention the MAC", a.oc.err);
			r = a.oc.ops->recv(&a.oc, buf, sizeof(buf));
			expect_long(&tc, "recv again", -EBADMSG, r);
			r = a.oc.ops->send(&a.oc, "x", 1);
			expect_long(&tc, "send after the failure", -EBADMSG, r);
			expect_long(&tc, "bad MACs counted", 1,
				    (long)(evc[OFFLOAD_EV_DPDK_BAD_MAC] - bad0));
			expect_bad_mac_alert(&tc, &a);
			/* The other session carries on. */
			roundtrip(&tc, &b, 30000, 902);
		}
		conn_close(&a);
		conn_close(&b);
		tc_end(&tc);

		/* Good data ahead of the bad record is delivered first. */
		tc_begin(&tc, "%s/%s/bad_mac_after_good_record", pmd, suites[s].name);
		if (conn_setup(&tc, &a, &o) && cli_write(&tc, &a, "good", 4)) {
			size_t first = BIO_ctrl_pending(a.cout);

			if (cli_write(&tc, &a, "evil", 4) && send_tampered(&tc, &a, first) &&
			    eng_expect(&tc, &a, (const uint8_t *)"good", 4, sizeof(buf))) {
				r = eng_recv_wait(&tc, &a, buf, sizeof(buf));
				expect_long(&tc, "recv of the bad record", -EBADMSG, r);
				expect_bad_mac_alert(&tc, &a);
			}
		}
		conn_close(&a);
		tc_end(&tc);

		/*
		 * The alert is written synchronously, running the device: a
		 * record another connection queued in the same turn completes
		 * then, and that connection must still be woken.
		 */
		tc_begin(&tc, "%s/%s/bad_mac_other_conn_queued", pmd, suites[s].name);
		up = conn_setup(&tc, &a, &o);
		up = conn_setup(&tc, &b, &o) && up;
		if (up && cli_write(&tc, &a, "evil", 4) && send_tampered(&tc, &a, 0) &&
		    cli_write(&tc, &b, "fine", 4) && cli_flush(&b) == 0) {
			r = a.oc.ops->recv(&a.oc, buf, sizeof(buf));
			after_call(&a, r);
			expect_long(&tc, "a: first recv queues the record", -EAGAIN, r);
			offload_poll(); /* a's record fails on the device; a is woken */
			expect_true(&tc, "a woken", a.woken);
			r = b.oc.ops->recv(&b.oc, buf, sizeof(buf));
			after_call(&b, r);
			expect_long(&tc, "b: recv queues the record", -EAGAIN, r);
			r = eng_recv_wait(&tc, &a, buf, sizeof(buf));
			expect_long(&tc, "a: recv", -EBADMSG, r);
			r = eng_recv_wait(&tc, &b, buf, sizeof(buf));
			if (expect_long(&tc, "b: recv", 4, r))
				expect_same(&tc, "b: data", (const uint8_t *)"fine", buf, 4);
		}
		conn_close(&a);
		conn_close(&b);
		tc_end(&tc);
	}
}

/* Batching: records of many connections go to the device in few bursts. */
static void test_batch(void)
{
	static struct conn cs[BATCH];
	struct tcase tc;
	uint8_t *data[BATCH], buf[2048];
	unsigned long burst0, rx0, tx0;
	bool up = true;
	int i;
	ssize_t r;

	for (i = 0; i < BATCH; i++) {
		data[i] = pattern(1000, 1000 + (uint32_t)i);
		memset(&cs[i], 0, sizeof(cs[i]));
		cs[i].sfd = cs[i].cfd = -1; /* conn_close() on a connection never opened */
	}

	tc_begin(&tc, "%s/batch_%d_recv_one_poll", pmd, BATCH);
	for (i = 0; i < BATCH && up; i++) {
		struct copt o = opt_of(&suites[i % NSUITES]);

		up = conn_setup(&tc, &cs[i], &o);
	}
	for (i = 0; i < BATCH && up; i++)
		up = cli_write(&tc, &cs[i], data[i], 1000) && cli_flush(&cs[i]) == 0;
	/* Each connection reads its record and queues it; nothing is on the device yet. */
	for (i = 0; i < BATCH && up; i++) {
		r = cs[i].oc.ops->recv(&cs[i].oc, buf, sizeof(buf));
		after_call(&cs[i], r);
		up = expect_long(&tc, "recv before the poll", -EAGAIN, r) &&
		     expect_long(&tc, "want", OFFLOAD_WANT_ENGINE, cs[i].oc.want);
	}
	if (up) {
		burst0 = evc[OFFLOAD_EV_DPDK_BURST];
		rx0 = evc[OFFLOAD_EV_DPDK_RECORD_RX];
		offload_poll();
		expect_long(&tc, "records decrypted in one poll", BATCH,
			    (long)(evc[OFFLOAD_EV_DPDK_RECORD_RX] - rx0));
		if (evc[OFFLOAD_EV_DPDK_BURST] - burst0 == 0 ||
		    evc[OFFLOAD_EV_DPDK_BURST] - burst0 > 2)
			tc_fail(&tc, "%d records took %lu bursts", BATCH,
				evc[OFFLOAD_EV_DPDK_BURST] - burst0);
		for (i = 0; i < BATCH; i++) {
			if (!cs[i].woken) {
				tc_fail(&tc, "connection %d not woken by the poll", i);
				continue;
			}
			cs[i].woken = cs[i].wait_engine = false;
			r = cs[i].oc.ops->recv(&cs[i].oc, buf, sizeof(buf));
			if (expect_long(&tc, "recv after the wake", 1000, r))
				expect_same(&tc, "engine recv", data[i], buf, 1000);
		}
	}
	tc_end(&tc);

	tc_begin(&tc, "%s/batch_%d_send_one_poll", pmd, BATCH);
	if (!up)
		tc_fail(&tc, "no connections (see the recv case)");
	for (i = 0; i < BATCH && up; i++) {
		r = cs[i].oc.ops->send(&cs[i].oc, data[i], 1000);
		after_call(&cs[i], r);
		up = expect_long(&tc, "send before the poll", -EAGAIN, r) &&
		     expect_long(&tc, "want", OFFLOAD_WANT_ENGINE, cs[i].oc.want);
	}
	if (up) {
		burst0 = evc[OFFLOAD_EV_DPDK_BURST];
		tx0 = evc[OFFLOAD_EV_DPDK_RECORD_TX];
		offload_poll();
		expect_long(&tc, "records encrypted in one poll", BATCH,
			    (long)(evc[OFFLOAD_EV_DPDK_RECORD_TX] - tx0));
		if (evc[OFFLOAD_EV_DPDK_BURST] - burst0 == 0 ||
		    evc[OFFLOAD_EV_DPDK_BURST] - burst0 > 2)
			tc_fail(&tc, "%d records took %lu bursts", BATCH,
				evc[OFFLOAD_EV_DPDK_BURST] - burst0);
		for (i = 0; i < BATCH; i++) {
			size_t have = 0;

			if (!cs[i].woken) {
				tc_fail(&tc, "connection %d not woken by the poll", i);
				continue;
			}
			cs[i].woken = cs[i].wait_engine = false;
			r = cs[i].oc.ops->send(&cs[i].oc, data[i], 1000);
			if (!expect_long(&tc, "send retried after the wake", 1000, r))
				continue;
			cli_pump(&cs[i]);
			if (cli_read(&tc, &cs[i], buf, sizeof(buf), &have) == 0 &&
			    expect_long(&tc, "client read", 1000, (long)have))
				expect_same(&tc, "client data", data[i], buf, 1000);
		}
	}
	tc_end(&tc);
	for (i = 0; i < BATCH; i++) {
		conn_close(&cs[i]);
		free(data[i]);
	}
}

/* ChaCha20 and CBC suites: the DPDK engine declines, userspace carries on. */
static void test_declined(void)
{
	static const struct {
		const char *name;
		int version;
		const char *cipher;
	} cases[] = {
		{ "tls13_chacha20", TLS1_3_VERSION, "TLS_CHACHA20_POLY1305_SHA256" },
		{ "tls12_chacha20", TLS1_2_VERSION, "ECDHE-ECDSA-CHACHA20-POLY1305" },
		{ "tls12_aes128_cbc", TLS1_2_VERSION, "ECDHE-ECDSA-AES128-SHA256" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct copt o = { .version = cases[i].version, .cipher = cases[i].cipher,
				  .tickets = 2 };
		struct tcase tc;
		struct conn c;
		int rc;

		tc_begin(&tc, "%s/declined/%s", pmd, cases[i].name);
		if (conn_open(&tc, &c, &o)) {
			c.oc.ssl = c.srv;
			c.oc.fd = c.sfd;
			c.oc.wake = on_wake;
			rc = offload_dpdk.attach(&c.oc);
			if (rc >= 0) {
				tc_fail(&tc, "dpdk attach took %s", cases[i].cipher);
				c.oc.ops = &offload_dpdk;
				c.attached = true;
			} else {
				if (!strstr(c.oc.err, cases[i].cipher))
					tc_fail(&tc, "oc.err \"%s\" does not name the cipher",
						c.oc.err);
				rc = offload_attach(OFFLOAD_REQ_DPDK, true, &c.oc);
				c.attached = rc == 0;
				if (expect_long(&tc, "offload_attach (fallback)", 0, rc)) {
					if (c.oc.ops != &offload_userspace)
						tc_fail(&tc, "engine %s took it, wanted userspace",
							c.oc.ops ? c.oc.ops->name : "none");
					if (c.oc.wanted != &offload_dpdk)
						tc_fail(&tc, "oc.wanted is %s, not dpdk",
							c.oc.wanted ? c.oc.wanted->name : "none");
					expect_long(&tc, "tx_mode", OFFLOAD_MODE_USERSPACE,
						    c.oc.tx_mode);
					if (!strstr(c.oc.err, cases[i].cipher))
						tc_fail(&tc, "oc.err \"%s\" does not name the cipher",
							c.oc.err);
					if (c.oc.ops == &offload_userspace)
						roundtrip(&tc, &c, 20000, 1100 + (uint32_t)i);
				}
			}
		}
		conn_close(&c);
		tc_end(&tc);
	}
}

/* Connections detached with operations on the device are freed as they come back. */
/*
 * A client that stops reading must not hold the worker's shared device
 * buffers: once the socket is full, the encrypted records wait in the
 * connection's own memory. Then the client reads everything, intact.
 */
static void drain(void);

static void test_stalled_client(void)
{
	for (size_t s = 0; s < NSUITES; s++) {
		struct copt o = opt_of(&suites[s]);
		size_t n = 4u << 20, sent = 0;
		uint8_t *a = pattern(n, (uint32_t)(s + 77));
		uint64_t deadline = now_ms() + XFER_MS;
		struct tcase tc;
		struct conn c;
		bool full = false;

		tc_begin(&tc, "%s/%s/stalled_client_holds_no_device_buffers", pmd, suites[s].name);
		if (!conn_setup(&tc, &c, &o)) {
			tc_end(&tc);
			free(a);
			continue;
		}
		/* The client reads nothing until the engine reports a full socket. */
		while (!full && sent < n && now_ms() < deadline) {
			if (may_call(&c)) {
				ssize_t r = c.oc.ops->send(&c.oc, a + sent, n - sent);

				after_call(&c, r);
				if (r > 0)
					sent += (size_t)r;
				else if (r == -EAGAIN && c.oc.want == OFFLOAD_WANT_WRITE)
					full = true;
				else if (r != -EAGAIN)
					break;
			}
			offload_poll();
		}
		if (!full) {
			tc_fail(&tc, "the socket never filled (sent %zu of %zu)", sent, n);
		} else {
			drain();
			expect_long(&tc, "device buffers held while the client does not read", 0,
				    (long)offload_dpdk_buffers_in_use());
			/* Now the client reads: everything arrives, in order. */
			uint8_t *got = malloc(n);
			size_t have = 0;
			if (!got)
				abort();
			while (have < sent && now_ms() < deadline + XFER_MS) {
				if (may_call(&c)) {
					ssize_t r = c.oc.ops->send(&c.oc, a + sent, n - sent);
					after_call(&c, r);
					if (r > 0)
						sent += (size_t)r;
				}
				offload_poll();
				if (cli_pump(&c) < 0 || cli_read(&tc, &c, got, n, &have) < 0)
					break;
			}
			if (have < sent)
				tc_fail(&tc, "client read %zu of %zu bytes", have, sent);
			else
				expect_same(&tc, "client read", a, got, have);
			free(got);
		}
		tc_end(&tc);
		conn_close(&c);
		free(a);
	}
}

static void drain(void)
{
	for (int i = 0; i < 1000 && offload_busy(); i++)
		offload_poll();
}

static int run_pmd(const char *name)
{
	char args[256], err[256], prog[96];
	struct tcase tc;
	int qp;

	pmd = name;
	offload_init(OFFLOAD_REQ_DPDK);
	offload_set_counter(count_ev);
	snprintf(args, sizeof(args), "--no-huge --no-pci --no-shconf -m 256 --vdev %s", name);
	if (offload_dpdk_init(args, 1, err, sizeof(err)) < 0) {
		printf("SKIP: %s: DPDK with %s unavailable: %s\n", name, name, err);
		return 0;
	}
	tc_begin(&tc, "%s/worker_start", pmd);
	qp = offload_dpdk_take_qp();
	if (qp < 0)
		tc_fail(&tc, "no queue pair free");
	else if (offload_worker_start(qp, err, sizeof(err)) < 0)
		tc_fail(&tc, "offload_worker_start: %s", err);
	if (make_identity() < 0)
		tc_fail(&tc, "server key and certificate: %s", ssl_err());
	tc_end(&tc);
	if (tc.nfail == 0) {
		test_device();
		test_matrix();
		test_small_buffer();
		test_tickets_resumption();
		test_padding();
		test_close_notify();
		test_keyupdate();
		test_bad_mac();
		test_batch();
		test_declined();
		test_stalled_client();
		drain();
	}
	for (size_t i = 0; i < sizeof(server_ctxs) / sizeof(server_ctxs[0]); i++)
		SSL_CTX_free(server_ctxs[i]);
	free_identity();
	snprintf(prog, sizeof(prog), "test_dpdk[%s]", name);
	return check_exit(prog);
}

int main(int argc, char **argv)
{
	static const char *const pmds[] = { "crypto_aesni_gcm0", "crypto_openssl0" };
	int failed = 0;

	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 2) {
		alarm(CHILD_S);
		return run_pmd(argv[1]);
	}
	/* The EAL starts once per process: one child per PMD, before any EAL call. */
	for (size_t i = 0; i < sizeof(pmds) / sizeof(pmds[0]); i++) {
		pid_t pid;
		int st;

		fflush(stdout);
		fflush(stderr);
		pid = fork();
		if (pid < 0) {
			printf("FAIL: %s: fork: %s\n", pmds[i], strerror(errno));
			failed++;
			continue;
		}
		if (pid == 0) {
			alarm(CHILD_S); /* a hang is a failure */
			exit(run_pmd(pmds[i]) ? CHILD_CASES_FAILED : 0);
		}
		if (waitpid(pid, &st, 0) < 0) {
			printf("FAIL: %s: waitpid: %s\n", pmds[i], strerror(errno));
			failed++;
		} else if (WIFSIGNALED(st)) {
			printf("FAIL: %s: killed by signal %d%s\n", pmds[i], WTERMSIG(st),
			       WTERMSIG(st) == SIGALRM ? " (over the time limit)" : "");
			failed++;
		} else if (WEXITSTATUS(st) == CHILD_CASES_FAILED) {
			failed++; /* its FAIL lines say why */
		} else if (WEXITSTATUS(st) != 0) {
			printf("FAIL: %s: exited with status %d\n", pmds[i], WEXITSTATUS(st));
			failed++;
		}
	}
	printf("test_dpdk: %zu devices, %d failed\n", sizeof(pmds) / sizeof(pmds[0]), failed);
	return failed ? 1 : 0;
}
