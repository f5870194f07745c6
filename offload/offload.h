/*
 * offload.h - the record-crypto layer: who encrypts and decrypts TLS records
 * once the handshake is over.
 *
 * The handshake always runs in userspace OpenSSL (gateway/tls.c). Then
 * offload_attach() walks the engines in order of preference and the first
 * one that accepts the connection carries its records for the rest of the
 * session. The chain is visible in one place (offload.c):
 *
 *     NIC (kTLS TLS_HW) -> kernel TLS (TLS_SW) -> DPDK cryptodev -> userspace
 *
 * Only the userspace engine exists today; the others plug in behind the same
 * ops table without the protocol code noticing.
 *
 * Return convention for recv/send: > 0 bytes moved; 0 end of stream (recv,
 * after close_notify or TCP FIN); -EAGAIN when blocked, with c->want set to
 * the readiness (OFFLOAD_WANT_READ or OFFLOAD_WANT_WRITE) that unblocks it;
 * any other negative errno is fatal for the session.
 */
#ifndef MAILGW_OFFLOAD_H
#define MAILGW_OFFLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include <openssl/ssl.h>

enum offload_want { OFFLOAD_WANT_READ = 1, OFFLOAD_WANT_WRITE = 2 };

/* Engine modes an operator may ask for ([offload] mode). */
enum offload_request { OFFLOAD_REQ_AUTO, OFFLOAD_REQ_KTLS, OFFLOAD_REQ_USERSPACE };

/* Where one direction's record crypto really runs (read back from the kernel). */
enum offload_mode { OFFLOAD_MODE_USERSPACE, OFFLOAD_MODE_KTLS_SW, OFFLOAD_MODE_KTLS_HW };

struct offload_conn {
	const struct offload_ops *ops;
	SSL *ssl;          /* owned by the session; engines may read keys from it */
	int fd;            /* client socket */
	unsigned want;     /* enum offload_want, after -EAGAIN */
	enum offload_mode tx_mode, rx_mode;
	bool tx_kernel;    /* the kernel encrypts what we send: splice_to works */
	bool rx_kernel;    /* the kernel decrypts what we receive: splice_from works */
	bool keyupdate;    /* ended by a TLS 1.3 KeyUpdate the kernel cannot follow */
	bool modes_verified; /* tx_mode/rx_mode read back from the kernel (sock_diag) */
	void *priv;        /* engine state */
	char err[128];     /* last fatal error, for the log */
};

struct offload_ops {
	const char *name;
	/* Usable on this host at all? Called once per worker at start-up. */
	bool (*available)(void);
	/* Take the connection (0) or decline it (negative errno, c untouched). */
	int (*attach)(struct offload_conn *c);
	ssize_t (*recv)(struct offload_conn *c, void *buf, size_t len);
	ssize_t (*send)(struct offload_conn *c, const void *buf, size_t len);
	/* Decrypted or raw bytes already inside the engine, not yet returned by recv. */
	bool (*pending)(struct offload_conn *c);
	/* Send close_notify; 1 done, -EAGAIN (see want) or negative errno. */
	int (*shutdown)(struct offload_conn *c);
	void (*detach)(struct offload_conn *c);
	/*
	 * Zero-copy relay (NULL when the engine has none): move plaintext
	 * between the client socket and a pipe, the kernel doing the record
	 * crypto. Same return convention as recv/send.
	 */
	ssize_t (*splice_from)(struct offload_conn *c, int pipe_w, size_t len);
	ssize_t (*splice_to)(struct offload_conn *c, int pipe_r, size_t len);
};

extern const struct offload_ops offload_userspace;
extern const struct offload_ops offload_ktls;

/*
 * Once per process before any handshake: probe the kernel (loading the tls
 * module when allowed) and log what the host offers. Returns true when
 * kernel TLS is usable.
 */
bool offload_init(enum offload_request req);

/*
 * NIC TLS offload per interface (ethtool features tls-hw-tx-offload,
 * tls-hw-rx-offload, tls-hw-record): report() is called for each one the
 * kernel knows on each interface.
 */
void offload_nic_report(void (*report)(const char *ifname, const char *feature, bool available,
				       bool active));

/* Per TLS context and per connection, before the handshake. */
void offload_setup_ctx(enum offload_request req, SSL_CTX *ctx);
void offload_prepare(enum offload_request req, SSL *ssl);

/* Attach the best engine for this connection; returns 0 or negative errno. */
int offload_attach(enum offload_request req, struct offload_conn *c);
void offload_detach(struct offload_conn *c);
const char *offload_request_name(enum offload_request req);
const char *offload_mode_name(enum offload_mode m);

#endif
