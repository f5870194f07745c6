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
 * Return convention for recv/send: > 0 bytes moved; 0 end of stream (recv,
 * after close_notify or TCP FIN); -EAGAIN when blocked, with c->want set to
 * what unblocks it: socket readiness (OFFLOAD_WANT_READ, OFFLOAD_WANT_WRITE)
 * or, for an engine that works asynchronously (DPDK), OFFLOAD_WANT_ENGINE:
 * the engine calls c->wake once records it holds for the connection have
 * been through the device. Like SSL_write, a send that returned -EAGAIN is
 * retried with the same bytes; the engine may already hold them encrypted.
 * Any other negative errno is fatal for the session.
 */
#ifndef MAILGW_OFFLOAD_H
#define MAILGW_OFFLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include <openssl/ssl.h>

enum offload_want { OFFLOAD_WANT_READ = 1, OFFLOAD_WANT_WRITE = 2, OFFLOAD_WANT_ENGINE = 4 };

/* Engine modes an operator may ask for ([offload] mode). */
enum offload_request { OFFLOAD_REQ_AUTO, OFFLOAD_REQ_KTLS, OFFLOAD_REQ_USERSPACE, OFFLOAD_REQ_DPDK };

/* Where one direction's record crypto really runs (read back from the kernel). */
enum offload_mode {
	OFFLOAD_MODE_USERSPACE,
	OFFLOAD_MODE_KTLS_SW,
	OFFLOAD_MODE_KTLS_HW,
	OFFLOAD_MODE_DPDK,
};

/* Things engines count; the gateway maps them to metrics (offload_set_counter). */
enum offload_event {
	OFFLOAD_EV_DPDK_RECORD_TX,   /* records encrypted on the device */
	OFFLOAD_EV_DPDK_RECORD_RX,   /* records decrypted on the device */
	OFFLOAD_EV_DPDK_BURST,       /* enqueue bursts */
	OFFLOAD_EV_DPDK_BAD_MAC,     /* a record failed authentication */
	OFFLOAD_EV_DPDK_DEVICE_ERR,  /* the device failed an operation */
	OFFLOAD_EV_DPDK_PEER_ALERT,  /* the peer sent a fatal alert */
	OFFLOAD_EV_DPDK_PROTOCOL,    /* unexpected record or message from the peer */
	OFFLOAD_EV_DPDK_KEYUPDATE,   /* TLS 1.3 KeyUpdate received and followed */
	OFFLOAD_EV_MAX
};

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
	/* Set by offload_attach: the engine the request preferred (NULL when that is
	 * userspace). When it is not the one that took the connection, or kernel TLS
	 * took only one direction, err says why. */
	const struct offload_ops *wanted;
	void *priv;        /* engine state */
	/* Set by the owner: called by asynchronous engines (OFFLOAD_WANT_ENGINE). */
	void (*wake)(struct offload_conn *c);
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
	/* Optional: the session waits for the network; give back empty buffers. */
	void (*idle)(struct offload_conn *c);
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
extern const struct offload_ops offload_dpdk;

/*
 * Once per process before any handshake: probe the kernel (loading the tls
 * module when allowed) and log what the host offers. Returns true when
 * kernel TLS is usable.
 */
bool offload_init(enum offload_request req);

/*
 * DPDK: start the EAL once, in the process that forks the workers, with
 * args (whitespace-separated EAL arguments) and check that a cryptodev with
 * AES-GCM exists. nworkers queue pairs are configured. Returns 0, or -1 with
 * a message in err.
 */
int offload_dpdk_init(const char *args, unsigned nworkers, char *err, size_t errlen);
/* Device buffers (mbufs) this worker's queue pair has out of its pool now. */
unsigned offload_dpdk_buffers_in_use(void);
/* Description of the device in use ("crypto_aesni_gcm0 (crypto_aesni_gcm), 2 queue pairs"). */
const char *offload_dpdk_describe(void);
/*
 * Queue pairs are held by one worker process each (the EAL heap and the
 * device are shared by all processes forked from the master). The master
 * takes one before it forks a worker and gives it back when that worker
 * is gone: offload_dpdk_take_qp() returns the index or -1 (none free, or
 * DPDK not started). offload_dpdk_give_qp(): see below.
 */
int offload_dpdk_take_qp(void);
/* clean: the worker exited normally (everything it held was given back). */
void offload_dpdk_give_qp(int qp, bool clean);
/*
 * In the worker after fork, with the queue pair the master took for it.
 * 0 done (or nothing to do: DPDK not started), -1 with a message in err.
 */
int offload_worker_start(int qp, char *err, size_t errlen);
/*
 * Once per event-loop turn: submit the records queued since the last turn
 * in bursts, collect what the device finished and wake the connections
 * concerned. Returns true while work is still queued or in flight (the
 * loop should not sleep).
 */
bool offload_poll(void);
/* Records queued or on the device: the event loop must not sleep. */
bool offload_busy(void);
/* A worker on its way out: let the device finish (1 s at most) so the state
 * of sessions already closed is freed. False when operations were left on
 * the device (the worker then exits non-zero so the master rebuilds the
 * queue pair's pools). */
bool offload_drain(void);

/* Where engine events are counted (the gateway's stats); NULL: not counted. */
void offload_set_counter(void (*count)(enum offload_event ev, unsigned long n));
void offload_count(enum offload_event ev, unsigned long n);

/*
 * NIC TLS offload per interface (ethtool features tls-hw-tx-offload,
 * tls-hw-rx-offload, tls-hw-record): report() is called for each one the
 * kernel knows on each interface.
 */
void offload_nic_report(void (*report)(const char *ifname, const char *feature, bool available,
				       bool active));

/* Per TLS context and per connection, before the handshake. */
void offload_setup_ctx(enum offload_request req, bool dpdk, SSL_CTX *ctx);
void offload_prepare(enum offload_request req, SSL *ssl);

/*
 * Attach the best engine for this connection; returns 0 or negative errno.
 * dpdk: [offload] dpdk_args is set, so auto considers the DPDK engine even in a
 * worker that has no queue pair (that is a fallback, with its reason).
 */
int offload_attach(enum offload_request req, bool dpdk, struct offload_conn *c);
void offload_detach(struct offload_conn *c);
const char *offload_request_name(enum offload_request req);
const char *offload_mode_name(enum offload_mode m);

#endif
