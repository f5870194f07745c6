/*
 * dpdk.c - DPDK cryptodev engine: after OpenSSL's handshake the engine owns
 * the TLS record layer and sends each record's AEAD through a DPDK crypto
 * device (a lookaside accelerator such as QAT, mlx5 or cnxk; in a lab a
 * software PMD, crypto_aesni_gcm or crypto_openssl).
 *
 * Keys: TLS 1.3 from the application traffic secrets (caught by the key log
 * callback, RFC 8446 §7.3); TLS 1.2 from the key block (RFC 5246 §6.3, the
 * TLS PRF over the master secret). AES-128-GCM and AES-256-GCM; any other
 * suite is declined and stays with OpenSSL (counted as a fallback).
 *
 * Sequence numbers: OpenSSL wrote some records under the final keys during
 * the handshake (TLS 1.2: the Finished; TLS 1.3: NewSessionTickets), so the
 * first TX sequence number is the count of those (engine.h). The client's
 * first record after the handshake is 1 (TLS 1.2, after its Finished) or 0
 * (TLS 1.3), given that OpenSSL holds no client record beyond the handshake
 * (SSL_has_pending() is 0; no read-ahead).
 *
 * Batching: send() and recv() only build crypto operations and queue them
 * on the worker's list; offload_poll(), once per event-loop turn, enqueues
 * everything in bursts on the worker's queue pair, dequeues what is done and
 * wakes the connections concerned. A send() the device has not finished
 * returns -EAGAIN with OFFLOAD_WANT_ENGINE and is retried with the same
 * bytes (like SSL_write); it returns the byte count once their records are
 * on the wire.
 *
 * Memory: the EAL heap is a shared mapping, inherited by the forked
 * workers, so every pool is created by the master before it forks, one set
 * per queue pair, and a worker process takes a queue pair nobody else holds
 * (offload_dpdk_take_qp). Pools have no per-lcore cache: every process runs
 * as the same lcore. Per connection: up to DP_TX_SLOTS records encrypted
 * ahead, DP_RX_SLOTS records decrypting, and a receive buffer of four full
 * records, released when empty.
 *
 * Control: alerts and close_notify are encrypted and written synchronously
 * (the device is polled until the record is done); a TLS 1.3 KeyUpdate from
 * the peer installs the next receive keys (and, when it asks for it, ours go
 * out with our next record). Records decrypted with keys that a KeyUpdate
 * ahead of them retired are submitted again with the new keys. A record
 * failing authentication ends that session with bad_record_mac.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/ssl.h>

#include "engine.h"
#include "keys.h"
#include "offload.h"

#ifdef MAILGW_HAVE_DPDK
#define ALLOW_EXPERIMENTAL_API /* the 22.11 session pool call is still marked experimental */
#include <rte_cryptodev.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

#define DP_MAX_QP 16
#define DP_MAX_PLAIN 16384                   /* RFC 8446 §5.1 */
#define DP_MAX_BODY (DP_MAX_PLAIN + 256)     /* RFC 8446 §5.2 ciphertext limit */
#define DP_HDR 5
#define DP_TAG 16
#define DP_EXPLICIT 8                        /* TLS 1.2 GCM explicit nonce */
#define DP_RBUF (4 * (DP_HDR + DP_MAX_BODY)) /* four full records: reads as large as the relay buffers */
#define DP_TX_SLOTS 4
#define DP_RX_SLOTS 8
#define DP_MBUFS 2047       /* per queue pair: 16.6 KiB each */
#define DP_OPS 2047
#define DP_SESSIONS 2047
#define DP_DESCRIPTORS 2048
#define DP_BURST 64
#define DP_PENDING 4096     /* operations queued for the next burst, per worker */
#define DP_SYNC_MS 50       /* longest wait for a control record */

#define REC_CCS 20
#define REC_ALERT 21
#define REC_HANDSHAKE 22
#define REC_APPDATA 23
#define HS_KEY_UPDATE 24

#define ALERT_CLOSE_NOTIFY 0
#define ALERT_UNEXPECTED_MESSAGE 10
#define ALERT_BAD_RECORD_MAC 20
#define ALERT_RECORD_OVERFLOW 22
#define ALERT_DECODE_ERROR 50
#define ALERT_INTERNAL_ERROR 80

/* Layout of each operation's private area, after the sym op. */
#define OP_IV_OFF (sizeof(struct rte_crypto_op) + sizeof(struct rte_crypto_sym_op))
#define OP_AAD_OFF (OP_IV_OFF + 16)
#define OP_META_OFF (OP_AAD_OFF + 32)
#define OP_PRIV (16 + 32 + sizeof(struct op_meta))

enum slot_state { SLOT_FREE, SLOT_QUEUED, SLOT_DONE, SLOT_FAILED, SLOT_DEVERR };

struct dp_conn;

struct op_meta {
	struct dp_conn *conn;
	uint8_t dir;  /* 0 tx, 1 rx, 2 control */
	uint8_t slot;
	uint8_t epoch;
};

struct slot {
	struct rte_mbuf *m;
	uint32_t rec_len;   /* whole record: header, body, tag */
	uint32_t off;       /* first plaintext byte in the mbuf */
	uint32_t plain_len; /* plaintext bytes (content only, after processing) */
	uint32_t done_len;  /* tx: bytes written; rx: plaintext bytes delivered */
	uint8_t state;
	uint8_t epoch;
	uint8_t type;       /* rx: content type, once processed */
	bool processed;
};

struct dp_keys {
	void *sess[2];      /* by epoch parity: the current and the previous */
	uint8_t epoch;
	uint64_t seq;
	uint8_t iv[12];     /* TLS 1.3: full nonce base; TLS 1.2: 4-byte salt */
	uint8_t secret[KEYS_SECRET_MAX]; /* TLS 1.3 traffic secret, for KeyUpdate */
	size_t secret_len;
};

struct dp_conn {
	struct offload_conn *oc; /* NULL once detached */
	struct dp_qp *qp;
	uint16_t version;
	const struct keys_suite *suite; /* TLS 1.3 */
	size_t key_len;
	struct dp_keys tx, rx;
	struct slot txs[DP_TX_SLOTS];
	unsigned tx_head, tx_count;
	uint8_t *txq;         /* encrypted records parked while the client is not reading */
	size_t txq_len, txq_off;
	size_t tx_accepted;   /* plaintext bytes the queued TX records carry */
	bool send_keyupdate;  /* answer the peer's update_requested */
	struct slot rxs[DP_RX_SLOTS];
	unsigned rx_head, rx_count;
	uint8_t *rbuf;        /* ciphertext kept until its record is consumed */
	size_t rstart, rend, rsub; /* rsub: bytes from rstart already submitted */
	unsigned inflight;    /* operations queued or on the device */
	int fatal;            /* negative errno once the session is over */
	bool peer_closed, sock_eof, alert_sent;
	bool wake_pending, starved;
	struct dp_conn *next_wake, *next_starved;
};

struct dp_qp {
	struct rte_mempool *mbufs, *ops, *sessions;
};

static struct {
	bool eal;           /* EAL up in this process (the master's, inherited) */
	bool ready;         /* this worker holds a queue pair */
	uint8_t dev;
	uint16_t nqp;
	int socket;         /* the device's NUMA node, where its pools live */
	int qp;             /* this process's queue pair */
	char desc[160];
	struct dp_qp qps[DP_MAX_QP];
	bool taken[DP_MAX_QP];  /* master's view: held by a live worker */
	struct rte_crypto_op *pend[DP_PENDING];
	unsigned npend;
	unsigned ondev;     /* enqueued, not yet dequeued */
	struct dp_conn *wake;     /* connections with results, to wake */
	struct dp_conn *starved;  /* connections that ran out of buffers or slots */
	bool freed;               /* buffers went back to the pools since the last wake */
} dp = { .qp = -1 };

static void conn_free(struct dp_conn *c);
static uint64_t mono_ms(void);

/* --- EAL and device ------------------------------------------------------- */

static int find_device(char *err, size_t errlen)
{
	int n = rte_cryptodev_count(), d;

	for (d = 0; d < n; d++) {
		struct rte_cryptodev_sym_capability_idx idx = {
			.type = RTE_CRYPTO_SYM_XFORM_AEAD,
			.algo.aead = RTE_CRYPTO_AEAD_AES_GCM,
		};
		const struct rte_cryptodev_symmetric_capability *cap =
			rte_cryptodev_sym_capability_get((uint8_t)d, &idx);
		if (cap && rte_cryptodev_sym_capability_check_aead(cap, 16, DP_TAG, 13, 12) == 0 &&
		    rte_cryptodev_sym_capability_check_aead(cap, 32, DP_TAG, 13, 12) == 0 &&
		    rte_cryptodev_sym_capability_check_aead(cap, 16, DP_TAG, 5, 12) == 0)
			return d;
	}
	snprintf(err, errlen, "%s", n ? "no crypto device offers AES-GCM with 128 and 256-bit keys" :
					"no crypto device (add one, e.g. --vdev crypto_aesni_gcm0)");
	return -1;
}

static int make_pools(unsigned q)
{
	struct dp_qp *p = &dp.qps[q];
	char name[RTE_MEMPOOL_NAMESIZE];
	uint32_t ssz = rte_cryptodev_sym_get_private_session_size(dp.dev);

	snprintf(name, sizeof(name), "mgw_mbuf%u", q);
	p->mbufs = rte_pktmbuf_pool_create(name, DP_MBUFS, 0, 0,
					   RTE_PKTMBUF_HEADROOM + DP_HDR + DP_MAX_BODY, dp.socket);
	snprintf(name, sizeof(name), "mgw_op%u", q);
	p->ops = rte_crypto_op_pool_create(name, RTE_CRYPTO_OP_TYPE_SYMMETRIC, DP_OPS, 0, OP_PRIV,
					   dp.socket);
	snprintf(name, sizeof(name), "mgw_sess%u", q);
	p->sessions = rte_cryptodev_sym_session_pool_create(name, DP_SESSIONS, ssz, 0, 0, dp.socket);
	return p->mbufs && p->ops && p->sessions ? 0 : -1;
}

int offload_dpdk_init(const char *args, unsigned nworkers, char *err, size_t errlen)
{
	char *copy = NULL, *tok, *save = NULL;
	char *argv[64];
	int argc = 0, d, rc = -1;
	unsigned q;
	cpu_set_t cpus;
	bool have_cpus;
	struct rte_cryptodev_info info;
	struct rte_cryptodev_config conf = { 0 };
	struct rte_cryptodev_qp_conf qpc = { 0 };

	if (dp.eal)
		return 0;
	copy = strdup(args ? args : "");
	if (!copy) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	argv[argc++] = (char *)"mailgw";
	argv[argc++] = (char *)"--log-level=warning"; /* the operator's args may override */
	/* No telemetry socket: mailgw reports through its own /metrics. */
	if (!strstr(copy, "--telemetry"))
		argv[argc++] = (char *)"--no-telemetry";
	for (tok = strtok_r(copy, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save)) {
		if (argc >= (int)(sizeof(argv) / sizeof(argv[0])) - 1) {
			snprintf(err, errlen, "dpdk_args: more than 60 arguments");
			goto out;
		}
		argv[argc++] = tok;
	}
	argv[argc] = NULL;
	/* The EAL pins the calling thread to its main lcore; the workers
	 * forked from here must keep the whole machine. */
	have_cpus = sched_getaffinity(0, sizeof(cpus), &cpus) == 0;
	if (rte_eal_init(argc, argv) < 0) {
		snprintf(err, errlen, "EAL start failed (%s); check dpdk_args",
			 rte_strerror(rte_errno));
		goto out;
	}
	if (have_cpus)
		sched_setaffinity(0, sizeof(cpus), &cpus);
	dp.eal = true;
	d = find_device(err, errlen);
	if (d < 0)
		goto out;
	dp.dev = (uint8_t)d;
	rte_cryptodev_info_get(dp.dev, &info);
	/* Two per worker: a reload briefly runs two generations. */
	dp.nqp = (uint16_t)(2 * (nworkers ? nworkers : 1));
	if (dp.nqp > info.max_nb_queue_pairs)
		dp.nqp = (uint16_t)info.max_nb_queue_pairs;
	if (dp.nqp > DP_MAX_QP)
		dp.nqp = DP_MAX_QP;
	if (dp.nqp == 0) {
		snprintf(err, errlen, "%s offers no queue pair", info.driver_name);
		goto out;
	}
	dp.socket = rte_cryptodev_socket_id(dp.dev);
	if (dp.socket < 0)
		dp.socket = 0;
	conf.socket_id = dp.socket;
	conf.nb_queue_pairs = dp.nqp;
	if (rte_cryptodev_configure(dp.dev, &conf) < 0) {
		snprintf(err, errlen, "cannot configure %s", info.driver_name);
		goto out;
	}
	for (q = 0; q < dp.nqp; q++) {
		if (make_pools(q) < 0) {
			snprintf(err, errlen,
				 "cannot create buffer pools for %u queue pairs (%s): give the EAL "
				 "more memory (-m 256)", dp.nqp, rte_strerror(rte_errno));
			goto out;
		}
		qpc.nb_descriptors = DP_DESCRIPTORS;
		qpc.mp_session = dp.qps[q].sessions;
		if (rte_cryptodev_queue_pair_setup(dp.dev, (uint16_t)q, &qpc, conf.socket_id) < 0) {
			qpc.nb_descriptors = 512;
			if (rte_cryptodev_queue_pair_setup(dp.dev, (uint16_t)q, &qpc,
							   conf.socket_id) < 0) {
				snprintf(err, errlen, "cannot set up queue pair %u", q);
				goto out;
			}
		}
	}
	if (rte_cryptodev_start(dp.dev) < 0) {
		snprintf(err, errlen, "cannot start %s", info.driver_name);
		goto out;
	}
	snprintf(dp.desc, sizeof(dp.desc), "%s (%s), %u queue pairs", rte_cryptodev_name_get(dp.dev),
		 info.driver_name, dp.nqp);
	rc = 0;
out:
	free(copy);
	if (rc < 0)
		dp.nqp = 0;
	return rc;
}

const char *offload_dpdk_describe(void)
{
	return dp.desc;
}

int offload_dpdk_take_qp(void)
{
	unsigned q;

	for (q = 0; dp.eal && q < dp.nqp; q++) {
		if (!dp.taken[q]) {
			dp.taken[q] = true;
			return (int)q;
		}
	}
	return -1;
}

void offload_dpdk_give_qp(int qp, bool clean)
{
	struct rte_crypto_op *ops[DP_BURST];
	struct dp_qp *p;

	if (qp < 0 || qp >= dp.nqp)
		return;
	dp.taken[qp] = false;
	if (clean)
		return;
	/* Nothing the device still holds for the dead process is wanted; a
	 * lookaside device may still be working on it, so wait a little. */
	{
		uint64_t quiet = mono_ms() + 20;
		while (mono_ms() < quiet)
			if (rte_cryptodev_dequeue_burst(dp.dev, (uint16_t)qp, ops, DP_BURST) > 0)
				quiet = mono_ms() + 20;
	}
	/*
	 * A worker that died may have held buffers and sessions: the only
	 * way to have them back is new pools (the master is the only process
	 * that ever allocates from the EAL heap, so this is safe).
	 */
	p = &dp.qps[qp];
	rte_mempool_free(p->mbufs);
	rte_mempool_free(p->ops);
	rte_mempool_free(p->sessions);
	if (make_pools((unsigned)qp) < 0) {
		dp.taken[qp] = true; /* unusable from now on */
		p->mbufs = p->ops = p->sessions = NULL;
	}
}

int offload_worker_start(int qp, char *err, size_t errlen)
{
	if (!dp.eal || dp.nqp == 0)
		return 0;
	if (qp < 0 || qp >= dp.nqp) {
		snprintf(err, errlen, "no free queue pair (all %u held)", dp.nqp);
		return -1;
	}
	if (!dp.qps[qp].mbufs) {
		snprintf(err, errlen, "queue pair %d has no buffer pools", qp);
		return -1;
	}
	dp.qp = qp;
	dp.ready = true;
	return 0;
}

bool offload_dpdk_usable(void)
{
	return dp.ready;
}

unsigned offload_dpdk_buffers_in_use(void)
{
	return dp.ready ? rte_mempool_in_use_count(dp.qps[dp.qp].mbufs) : 0;
}

/* --- keys ------------------------------------------------------------------- */

static void *make_session(struct dp_conn *c, const uint8_t *key, bool encrypt)
{
	struct rte_crypto_sym_xform x = {
		.type = RTE_CRYPTO_SYM_XFORM_AEAD,
		.aead = {
			.op = encrypt ? RTE_CRYPTO_AEAD_OP_ENCRYPT : RTE_CRYPTO_AEAD_OP_DECRYPT,
			.algo = RTE_CRYPTO_AEAD_AES_GCM,
			.key = { .data = key, .length = (uint16_t)c->key_len },
			.iv = { .offset = OP_IV_OFF, .length = 12 },
			.digest_length = DP_TAG,
			.aad_length = c->version == TLS1_3_VERSION ? DP_HDR : 13,
		},
	};

	return rte_cryptodev_sym_session_create(dp.dev, &x, c->qp->sessions);
}

/* Install key into k's next epoch (or the first one). 0 or -1. */
static int set_keys(struct dp_conn *c, struct dp_keys *k, const uint8_t *key, const uint8_t *iv,
		    size_t iv_len, bool encrypt, bool next)
{
	uint8_t e = next ? (uint8_t)(k->epoch + 1) : k->epoch;
	void *s = make_session(c, key, encrypt);

	if (!s)
		return -1;
	if (k->sess[e & 1])
		rte_cryptodev_sym_session_free(dp.dev, k->sess[e & 1]);
	k->sess[e & 1] = s;
	k->epoch = e;
	memcpy(k->iv, iv, iv_len);
	return 0;
}

/* TLS 1.3: derive and install the keys of a traffic secret. */
static int keys13(struct dp_conn *c, struct dp_keys *k, bool encrypt, bool next)
{
	uint8_t key[32], iv[12];
	int rc = -1;

	if (keys_tls13_traffic(c->suite, k->secret, k->secret_len, key, iv) == 0)
		rc = set_keys(c, k, key, iv, sizeof(iv), encrypt, next);
	OPENSSL_cleanse(key, sizeof(key));
	OPENSSL_cleanse(iv, sizeof(iv));
	return rc;
}

/* RFC 8446 §7.2: application_traffic_secret_N+1. */
static int next_secret(struct dp_conn *c, struct dp_keys *k)
{
	uint8_t out[KEYS_SECRET_MAX];
	int rc = keys_hkdf_expand_label(c->suite->digest, k->secret, k->secret_len, "traffic upd",
					out, k->secret_len);

	if (rc == 0)
		memcpy(k->secret, out, k->secret_len);
	OPENSSL_cleanse(out, sizeof(out));
	return rc;
}

/* RFC 5246 §6.3 key block for an AEAD suite: client key, server key, client IV, server IV. */
static int keys12(struct dp_conn *c, SSL *ssl, char *why, size_t cap)
{
	const SSL_CIPHER *ci = SSL_get_current_cipher(ssl);
	const EVP_MD *md = ci ? SSL_CIPHER_get_handshake_digest(ci) : NULL;
	uint8_t master[48], seed[13 + 2 * SSL3_RANDOM_SIZE], block[2 * 32 + 2 * 4];
	size_t mlen, need = 2 * c->key_len + 8;
	EVP_KDF *kdf = NULL;
	EVP_KDF_CTX *kctx = NULL;
	OSSL_PARAM params[4];
	int rc = -1;

	mlen = SSL_SESSION_get_master_key(SSL_get_session(ssl), master, sizeof(master));
	if (!md || mlen == 0) {
		snprintf(why, cap, "no TLS 1.2 master secret");
		return -1;
	}
	memcpy(seed, "key expansion", 13);
	SSL_get_server_random(ssl, seed + 13, SSL3_RANDOM_SIZE);
	SSL_get_client_random(ssl, seed + 13 + SSL3_RANDOM_SIZE, SSL3_RANDOM_SIZE);
	kdf = EVP_KDF_fetch(NULL, "TLS1-PRF", NULL);
	kctx = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST,
						     (char *)EVP_MD_get0_name(md), 0);
	params[1] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SECRET, master, mlen);
	params[2] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SEED, seed, sizeof(seed));
	params[3] = OSSL_PARAM_construct_end();
	if (!kctx || EVP_KDF_derive(kctx, block, need, params) != 1) {
		snprintf(why, cap, "TLS 1.2 key block derivation failed");
		goto out;
	}
	/* We are the server: we write with the server's keys. */
	if (set_keys(c, &c->rx, block, block + 2 * c->key_len, 4, false, false) < 0 ||
	    set_keys(c, &c->tx, block + c->key_len, block + 2 * c->key_len + 4, 4, true, false) < 0) {
		snprintf(why, cap, "cannot create device sessions");
		goto out;
	}
	rc = 0;
out:
	OPENSSL_cleanse(master, sizeof(master));
	OPENSSL_cleanse(block, sizeof(block));
	EVP_KDF_CTX_free(kctx);
	EVP_KDF_free(kdf);
	return rc;
}

/* --- operations ------------------------------------------------------------- */

static void put_be64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

/* Fill op's nonce and AAD for a record of body length blen at sequence seq. */
static void op_params(struct dp_conn *c, struct dp_keys *k, struct rte_crypto_op *op,
		      const uint8_t *hdr, uint64_t seq, size_t plain_len)
{
	uint8_t *iv = rte_crypto_op_ctod_offset(op, uint8_t *, OP_IV_OFF);
	uint8_t *aad = rte_crypto_op_ctod_offset(op, uint8_t *, OP_AAD_OFF);

	if (c->version == TLS1_3_VERSION) {
		uint8_t s[8];
		memcpy(iv, k->iv, 12);
		put_be64(s, seq);
		for (int i = 0; i < 8; i++)
			iv[4 + i] ^= s[i];
		memcpy(aad, hdr, DP_HDR);
	} else {
		memcpy(iv, k->iv, 4);
		memcpy(iv + 4, hdr + DP_HDR, DP_EXPLICIT); /* explicit nonce */
		put_be64(aad, seq);
		aad[8] = hdr[0];
		aad[9] = 0x03;
		aad[10] = 0x03;
		aad[11] = (uint8_t)(plain_len >> 8);
		aad[12] = (uint8_t)plain_len;
	}
	op->sym->aead.aad.data = aad;
	op->sym->aead.aad.phys_addr = rte_crypto_op_ctophys_offset(op, OP_AAD_OFF);
}

static struct rte_crypto_op *new_op(struct dp_conn *c, struct rte_mbuf *m, void *sess,
				    uint32_t off, uint32_t len, uint8_t dir, uint8_t slot,
				    uint8_t epoch)
{
	struct rte_crypto_op *op = rte_crypto_op_alloc(c->qp->ops, RTE_CRYPTO_OP_TYPE_SYMMETRIC);
	struct op_meta *meta;

	if (!op)
		return NULL;
	rte_crypto_op_attach_sym_session(op, sess);
	op->sym->m_src = m;
	op->sym->m_dst = NULL;
	op->sym->aead.data.offset = off;
	op->sym->aead.data.length = len;
	op->sym->aead.digest.data = rte_pktmbuf_mtod_offset(m, uint8_t *, off + len);
	op->sym->aead.digest.phys_addr = rte_pktmbuf_iova_offset(m, off + len);
	meta = rte_crypto_op_ctod_offset(op, struct op_meta *, OP_META_OFF);
	meta->conn = c;
	meta->dir = dir;
	meta->slot = slot;
	meta->epoch = epoch;
	return op;
}

/*
 * Build one TLS record of type with plaintext p[0..n) in a fresh mbuf and
 * its encryption operation. Consumes a TX sequence number.
 */
static struct rte_crypto_op *seal(struct dp_conn *c, uint8_t type, const void *p, size_t n,
				  uint8_t dir, uint8_t slot, struct rte_mbuf **mout)
{
	bool v13 = c->version == TLS1_3_VERSION;
	size_t expl = v13 ? 0 : DP_EXPLICIT, inner = n + (v13 ? 1 : 0);
	size_t total = DP_HDR + expl + inner + DP_TAG;
	struct rte_mbuf *m = rte_pktmbuf_alloc(c->qp->mbufs);
	struct rte_crypto_op *op;
	uint8_t *h;

	if (!m)
		return NULL;
	h = (uint8_t *)rte_pktmbuf_append(m, (uint16_t)total);
	if (!h) {
		rte_pktmbuf_free(m);
		return NULL;
	}
	h[0] = v13 ? REC_APPDATA : type;
	h[1] = 0x03;
	h[2] = 0x03;
	h[3] = (uint8_t)((total - DP_HDR) >> 8);
	h[4] = (uint8_t)(total - DP_HDR);
	if (!v13)
		put_be64(h + DP_HDR, c->tx.seq);
	memcpy(h + DP_HDR + expl, p, n);
	if (v13)
		h[DP_HDR + n] = type;
	op = new_op(c, m, c->tx.sess[c->tx.epoch & 1], (uint32_t)(DP_HDR + expl),
		    (uint32_t)inner, dir, slot, c->tx.epoch);
	if (!op) {
		rte_pktmbuf_free(m);
		return NULL;
	}
	op_params(c, &c->tx, op, h, c->tx.seq, n);
	c->tx.seq++;
	*mout = m;
	return op;
}

static void queue_op(struct dp_conn *c, struct rte_crypto_op *op)
{
	dp.pend[dp.npend++] = op;
	c->inflight++;
}

static bool room_for_ops(unsigned n)
{
	return dp.npend + n <= DP_PENDING;
}

static void mark_starved(struct dp_conn *c)
{
	if (c->starved)
		return;
	c->starved = true;
	c->next_starved = dp.starved;
	dp.starved = c;
}

static void want_wake(struct dp_conn *c)
{
	if (c->wake_pending || !c->oc)
		return;
	c->wake_pending = true;
	c->next_wake = dp.wake;
	dp.wake = c;
}

/* A finished operation: record its result with its connection. */
static void complete(struct rte_crypto_op *op)
{
	struct op_meta *meta = rte_crypto_op_ctod_offset(op, struct op_meta *, OP_META_OFF);
	struct dp_conn *c = meta->conn;
	uint8_t st = op->status == RTE_CRYPTO_OP_STATUS_SUCCESS     ? SLOT_DONE :
		     op->status == RTE_CRYPTO_OP_STATUS_AUTH_FAILED ? SLOT_FAILED :
								      SLOT_DEVERR;
	struct rte_mbuf *m = op->sym->m_src;
	uint8_t dir = meta->dir, slot = meta->slot;

	if (st == SLOT_DEVERR)
		offload_count(OFFLOAD_EV_DPDK_DEVICE_ERR, 1);
	rte_crypto_op_free(op);
	dp.freed = true;
	c->inflight--;
	if (!c->oc) {
		rte_pktmbuf_free(m); /* the connection is gone */
		dp.freed = true;
		if (c->inflight == 0)
			conn_free(c);
		return;
	}
	if (dir == 0) {
		c->txs[slot].state = st;
		offload_count(OFFLOAD_EV_DPDK_RECORD_TX, 1);
	} else {
		c->rxs[slot].state = st;
		offload_count(OFFLOAD_EV_DPDK_RECORD_RX, 1);
	}
	want_wake(c);
}

/* Enqueue what is pending, dequeue what is done. Returns ops completed. */
static unsigned run_device(void)
{
	struct rte_crypto_op *done[DP_BURST];
	unsigned sent = 0, got = 0;
	uint16_t n, i;

	while (sent < dp.npend) {
		uint16_t want = (uint16_t)(dp.npend - sent > DP_BURST ? DP_BURST : dp.npend - sent);
		n = rte_cryptodev_enqueue_burst(dp.dev, (uint16_t)dp.qp, dp.pend + sent, want);
		if (n > 0)
			offload_count(OFFLOAD_EV_DPDK_BURST, 1);
		sent += n;
		dp.ondev += n;
		if (n < want)
			break; /* queue full: the rest next turn */
	}
	if (sent) {
		memmove(dp.pend, dp.pend + sent, (dp.npend - sent) * sizeof(dp.pend[0]));
		dp.npend -= sent;
	}
	while (dp.ondev > 0) {
		n = rte_cryptodev_dequeue_burst(dp.dev, (uint16_t)dp.qp, done, DP_BURST);
		if (n == 0)
			break;
		dp.ondev -= n;
		got += n;
		for (i = 0; i < n; i++)
			complete(done[i]);
	}
	return got;
}

static void run_wakes(void)
{
	struct dp_conn *c;

	/* Buffers came back: connections that ran short get another try. */
	while (dp.freed && (c = dp.starved) != NULL) {
		dp.starved = c->next_starved;
		c->starved = false;
		want_wake(c);
	}
	dp.freed = false;
	while ((c = dp.wake) != NULL) {
		dp.wake = c->next_wake;
		c->wake_pending = false;
		if (c->oc && c->oc->wake)
			c->oc->wake(c->oc);
	}
}

bool offload_poll(void)
{
	if (!dp.ready)
		return false;
	if (dp.npend || dp.ondev)
		run_device();
	/* Also results collected while a control record was waited for. */
	if (dp.wake || (dp.starved && dp.freed))
		run_wakes();
	return offload_busy();
}

bool offload_busy(void)
{
	/* Starved connections alone do not keep the loop awake: they wait
	 * until some buffer is freed, by a completion or a session. */
	return dp.npend > 0 || dp.ondev > 0 || dp.wake || (dp.starved && dp.freed);
}

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

bool offload_drain(void)
{
	uint64_t deadline = mono_ms() + 1000;

	while (dp.ready && (dp.npend || dp.ondev) && mono_ms() < deadline)
		run_device();
	dp.wake = NULL; /* no session is left to wake */
	dp.starved = NULL;
	return !dp.npend && !dp.ondev;
}

/* Run the device until *state leaves SLOT_QUEUED (control records, draining). */
static bool wait_slot(const uint8_t *state, uint64_t deadline)
{
	while (*state == SLOT_QUEUED) {
		run_device();
		if (*state != SLOT_QUEUED)
			break;
		if (mono_ms() > deadline)
			return false;
	}
	return true;
}

/* --- writing ---------------------------------------------------------------- */

/* The session is over: the first reason is the one kept (for the log). */
static int set_fatal(struct dp_conn *c, int e, const char *why)
{
	if (!c->fatal) {
		c->fatal = e;
		if (c->oc)
			snprintf(c->oc->err, sizeof(c->oc->err), "%s", why);
	}
	return c->fatal;
}

/*
 * Write encrypted TX records at the head to the socket, in order. Returns
 * 1 when no record is left, 0 when blocked on the device, -EAGAIN when the
 * socket is full, negative errno on failure.
 */
static int write_err(struct dp_conn *c)
{
	if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
		return -EAGAIN;
	return set_fatal(c, errno == EPIPE || errno == ECONNRESET ? -EPIPE : -errno,
			 strerror(errno));
}

/* The TX record at the head is on the wire (or parked): its buffer goes back. */
static void pop_tx(struct dp_conn *c)
{
	struct slot *s = &c->txs[c->tx_head];

	rte_pktmbuf_free(s->m);
	dp.freed = true;
	s->m = NULL;
	s->state = SLOT_FREE;
	c->tx_head = (c->tx_head + 1) % DP_TX_SLOTS;
	c->tx_count--;
}

/*
 * The client is not reading: move the encrypted records at the head out of
 * their device buffers into the connection's own queue, so that a slow or
 * stalled client never holds the worker's shared buffers.
 */
static void park(struct dp_conn *c)
{
	while (c->tx_count) {
		struct slot *s = &c->txs[c->tx_head];
		size_t n = s->rec_len - s->done_len;
		uint8_t *q;

		if (s->state != SLOT_DONE)
			break;
		q = realloc(c->txq, c->txq_len + n);
		if (!q)
			break; /* keep the buffer; it goes when the socket takes it */
		c->txq = q;
		memcpy(c->txq + c->txq_len, rte_pktmbuf_mtod_offset(s->m, uint8_t *, s->done_len), n);
		c->txq_len += n;
		pop_tx(c);
	}
}

static int write_out(struct dp_conn *c)
{
	/* Parked records first: they precede everything still in slots. */
	while (c->txq_len > c->txq_off) {
		ssize_t w = write(c->oc->fd, c->txq + c->txq_off, c->txq_len - c->txq_off);
		if (w < 0) {
			int r = write_err(c);
			if (r == -EAGAIN)
				park(c);
			return r;
		}
		c->txq_off += (size_t)w;
	}
	if (c->txq) {
		free(c->txq);
		c->txq = NULL;
		c->txq_len = c->txq_off = 0;
	}
	while (c->tx_count) {
		struct iovec iov[DP_TX_SLOTS];
		unsigned i, k = 0;
		ssize_t w;

		for (i = 0; i < c->tx_count; i++) {
			struct slot *s = &c->txs[(c->tx_head + i) % DP_TX_SLOTS];
			if (s->state == SLOT_QUEUED)
				break;
			if (s->state != SLOT_DONE)
				return set_fatal(c, -EIO, "crypto device failed to encrypt a record");
			iov[k].iov_base = rte_pktmbuf_mtod_offset(s->m, uint8_t *, s->done_len);
			iov[k].iov_len = s->rec_len - s->done_len;
			k++;
		}
		if (k == 0)
			return 0;
		w = writev(c->oc->fd, iov, (int)k);
		if (w < 0) {
			int r = write_err(c);
			if (r == -EAGAIN)
				park(c);
			return r;
		}
		while (w > 0) {
			struct slot *s = &c->txs[c->tx_head];
			size_t left = s->rec_len - s->done_len;
			if ((size_t)w < left) {
				s->done_len += (uint32_t)w;
				break;
			}
			w -= (ssize_t)left;
			pop_tx(c);
		}
	}
	return 1;
}

/* Queue a record for the TX ring. 0, or -1 when out of buffers. */
static int queue_record(struct dp_conn *c, uint8_t type, const void *p, size_t n)
{
	unsigned idx = (c->tx_head + c->tx_count) % DP_TX_SLOTS;
	struct slot *s = &c->txs[idx];
	struct rte_crypto_op *op;
	struct rte_mbuf *m;

	if (!room_for_ops(1))
		return -1;
	op = seal(c, type, p, n, 0, (uint8_t)idx, &m);
	if (!op)
		return -1;
	memset(s, 0, sizeof(*s));
	s->m = m;
	s->rec_len = rte_pktmbuf_data_len(m);
	s->state = SLOT_QUEUED;
	c->tx_count++;
	queue_op(c, op);
	return 0;
}

/* RFC 8446 §4.6.3: our KeyUpdate, then new TX keys. */
static int send_keyupdate(struct dp_conn *c)
{
	static const uint8_t ku[5] = { HS_KEY_UPDATE, 0, 0, 1, 0 /* update_not_requested */ };

	if (queue_record(c, REC_HANDSHAKE, ku, sizeof(ku)) < 0)
		return -1;
	if (next_secret(c, &c->tx) < 0 || keys13(c, &c->tx, true, true) < 0)
		return set_fatal(c, -EIO, "cannot install the next send keys");
	c->tx.seq = 0;
	c->send_keyupdate = false;
	return 0;
}

static ssize_t dp_send(struct offload_conn *oc, const void *buf, size_t len)
{
	struct dp_conn *c = oc->priv;
	const uint8_t *p = buf;
	size_t off = 0;
	int r;

	if (c->fatal)
		return c->fatal;
	if (c->tx_count || c->txq_len) {
		r = write_out(c);
		if (r < 0 && r != -EAGAIN)
			return r;
		if (c->tx_count == 0 && c->txq_len == 0 && c->tx_accepted) {
			size_t n = c->tx_accepted;
			c->tx_accepted = 0;
			if (n > len) /* the retry must offer at least the bytes already sent */
				return set_fatal(c, -EINVAL, "send retried with fewer bytes");
			return (ssize_t)n;
		}
		if (c->tx_count || c->txq_len) {
			oc->want = r == -EAGAIN ? OFFLOAD_WANT_WRITE : OFFLOAD_WANT_ENGINE;
			return -EAGAIN;
		}
	}
	if (len == 0)
		return 0;
	if (c->send_keyupdate && (r = send_keyupdate(c)) != 0) {
		if (r < 0 && c->fatal)
			return c->fatal;
		mark_starved(c);
		oc->want = OFFLOAD_WANT_ENGINE;
		return -EAGAIN;
	}
	while (off < len && c->tx_count < DP_TX_SLOTS) {
		size_t n = len - off > DP_MAX_PLAIN ? DP_MAX_PLAIN : len - off;
		if (queue_record(c, REC_APPDATA, p + off, n) < 0)
			break;
		off += n;
	}
	c->tx_accepted = off;
	if (off == 0)
		mark_starved(c); /* out of buffers: retried when some come back */
	oc->want = OFFLOAD_WANT_ENGINE;
	return -EAGAIN;
}

/*
 * Encrypt and write one control record now (alert, close_notify): earlier
 * records first. Best effort on the socket; 0 written, -1 not.
 */
static int send_control(struct dp_conn *c, uint8_t type, const uint8_t *p, size_t n)
{
	uint64_t deadline = mono_ms() + DP_SYNC_MS; /* for the whole record */
	unsigned i;

	/* Records already encrypted go first, in order. */
	for (i = 0; i < c->tx_count; i++)
		if (!wait_slot(&c->txs[(c->tx_head + i) % DP_TX_SLOTS].state, deadline))
			return -1;
	if (write_out(c) != 1)
		return -1;
	if (c->tx_count == 0)
		c->tx_accepted = 0;
	if (queue_record(c, type, p, n) < 0)
		return -1;
	if (!wait_slot(&c->txs[c->tx_head].state, deadline))
		return -1;
	return write_out(c) == 1 ? 0 : -1;
}

static void send_alert(struct dp_conn *c, uint8_t desc)
{
	uint8_t a[2] = { desc == ALERT_CLOSE_NOTIFY ? 1 : 2, desc };

	if (c->alert_sent || !c->oc)
		return;
	c->alert_sent = true;
	send_control(c, REC_ALERT, a, sizeof(a));
}

static int fail(struct dp_conn *c, uint8_t alert, int e, const char *why)
{
	set_fatal(c, e, why);
	send_alert(c, alert);
	return c->fatal;
}

/* --- reading ---------------------------------------------------------------- */

/*
 * Submit complete records from the receive buffer while slots and buffers
 * last. 0, 1 when a complete record waits for device buffers, or fatal.
 */
static int submit_rx(struct dp_conn *c)
{
	bool v13 = c->version == TLS1_3_VERSION;
	size_t expl = v13 ? 0 : DP_EXPLICIT;

	while (c->rx_count < DP_RX_SLOTS && !c->peer_closed) {
		const uint8_t *h = c->rbuf + c->rstart + c->rsub;
		size_t avail = c->rend - c->rstart - c->rsub, body;
		unsigned idx;
		struct slot *s;
		struct rte_mbuf *m;
		struct rte_crypto_op *op;
		uint8_t *d;

		if (avail < DP_HDR)
			break;
		body = (size_t)h[3] << 8 | h[4];
		if (h[1] != 0x03 || h[2] != 0x03) {
			offload_count(OFFLOAD_EV_DPDK_PROTOCOL, 1);
			return fail(c, ALERT_DECODE_ERROR, -EPROTO, "record with a bad version");
		}
		if (body > DP_MAX_BODY) {
			offload_count(OFFLOAD_EV_DPDK_PROTOCOL, 1);
			return fail(c, ALERT_RECORD_OVERFLOW, -EPROTO, "record over 2^14+256 bytes");
		}
		if (v13 ? h[0] != REC_APPDATA : (h[0] != REC_APPDATA && h[0] != REC_ALERT)) {
			offload_count(OFFLOAD_EV_DPDK_PROTOCOL, 1);
			return fail(c, ALERT_UNEXPECTED_MESSAGE, -EPROTO,
				    h[0] == REC_HANDSHAKE ? "handshake record after the handshake "
							    "(renegotiation is not supported)" :
							    "unexpected record type");
		}
		if (body < expl + DP_TAG + (v13 ? 1 : 0)) {
			offload_count(OFFLOAD_EV_DPDK_PROTOCOL, 1);
			return fail(c, ALERT_DECODE_ERROR, -EPROTO, "record too short");
		}
		if (avail < DP_HDR + body)
			break;
		m = room_for_ops(1) ? rte_pktmbuf_alloc(c->qp->mbufs) : NULL;
		if (!m) {
			mark_starved(c); /* a whole record waits for buffers */
			return 1;
		}
		d = (uint8_t *)rte_pktmbuf_append(m, (uint16_t)(DP_HDR + body));
		if (!d) {
			rte_pktmbuf_free(m);
			return fail(c, ALERT_INTERNAL_ERROR, -EIO, "record larger than a device buffer");
		}
		memcpy(d, h, DP_HDR + body);
		idx = (c->rx_head + c->rx_count) % DP_RX_SLOTS;
		op = new_op(c, m, c->rx.sess[c->rx.epoch & 1], (uint32_t)(DP_HDR + expl),
			    (uint32_t)(body - expl - DP_TAG), 1, (uint8_t)idx, c->rx.epoch);
		if (!op) {
			rte_pktmbuf_free(m);
			mark_starved(c);
			return 1;
		}
		op_params(c, &c->rx, op, d, c->rx.seq, body - expl - DP_TAG);
		c->rx.seq++;
		s = &c->rxs[idx];
		memset(s, 0, sizeof(*s));
		s->m = m;
		s->rec_len = (uint32_t)(DP_HDR + body);
		s->off = (uint32_t)(DP_HDR + expl);
		s->plain_len = (uint32_t)(body - expl - DP_TAG);
		s->state = SLOT_QUEUED;
		s->epoch = c->rx.epoch;
		s->type = h[0];
		c->rx_count++;
		c->rsub += DP_HDR + body;
		queue_op(c, op);
	}
	return 0;
}

static void pop_rx(struct dp_conn *c, bool consumed)
{
	struct slot *s = &c->rxs[c->rx_head];

	if (consumed) {
		c->rstart += s->rec_len;
		c->rsub -= s->rec_len;
	}
	rte_pktmbuf_free(s->m);
	dp.freed = true;
	memset(s, 0, sizeof(*s));
	c->rx_head = (c->rx_head + 1) % DP_RX_SLOTS;
	c->rx_count--;
	if (c->rstart == c->rend && c->rx_count == 0) {
		free(c->rbuf); /* idle connections keep no receive buffer */
		c->rbuf = NULL;
		c->rstart = c->rend = c->rsub = 0;
	}
}

/* A post-handshake message from the client (TLS 1.3). 0 or fatal. */
static int handshake_msg(struct dp_conn *c, const uint8_t *p, size_t n)
{
	if (n != 5 || p[0] != HS_KEY_UPDATE || p[1] || p[2] || p[3] != 1 || p[4] > 1) {
		offload_count(OFFLOAD_EV_DPDK_PROTOCOL, 1);
		return fail(c, ALERT_UNEXPECTED_MESSAGE, -EPROTO,
			    n >= 1 && p[0] == HS_KEY_UPDATE ? "malformed KeyUpdate" :
							      "unexpected post-handshake message");
	}
	if (next_secret(c, &c->rx) < 0 || keys13(c, &c->rx, false, true) < 0)
		return fail(c, ALERT_INTERNAL_ERROR, -EIO, "cannot install the next receive keys");
	c->rx.seq = 0;
	if (p[4] == 1)
		c->send_keyupdate = true; /* ours goes out before our next record */
	offload_count(OFFLOAD_EV_DPDK_KEYUPDATE, 1);
	return 0;
}

/* Look at the decrypted record at the head: strip TLS 1.3 padding, act on control. */
static int process_head(struct dp_conn *c)
{
	struct slot *s = &c->rxs[c->rx_head];
	uint8_t *p = rte_pktmbuf_mtod_offset(s->m, uint8_t *, s->off);

	if (s->processed)
		return 0;
	s->processed = true;
	if (c->version == TLS1_3_VERSION) {
		size_t n = s->plain_len;
		if (n > DP_MAX_PLAIN + 1) { /* RFC 8446 §5.4: content, type, padding */
			offload_count(OFFLOAD_EV_DPDK_PROTOCOL, 1);
			return fail(c, ALERT_RECORD_OVERFLOW, -EPROTO, "inner plaintext over 2^14+1 bytes");
		}
		while (n > 0 && p[n - 1] == 0)
			n--;
		if (n == 0) {
			offload_count(OFFLOAD_EV_DPDK_PROTOCOL, 1);
			return fail(c, ALERT_UNEXPECTED_MESSAGE, -EPROTO, "record with no content type");
		}
		s->type = p[n - 1];
		s->plain_len = (uint32_t)(n - 1);
	}
	if (s->plain_len > DP_MAX_PLAIN) {
		offload_count(OFFLOAD_EV_DPDK_PROTOCOL, 1);
		return fail(c, ALERT_RECORD_OVERFLOW, -EPROTO, "plaintext over 2^14 bytes");
	}
	switch (s->type) {
	case REC_APPDATA:
		return 0;
	case REC_ALERT:
		if (s->plain_len != 2) {
			offload_count(OFFLOAD_EV_DPDK_PROTOCOL, 1);
			return fail(c, ALERT_DECODE_ERROR, -EPROTO, "malformed alert");
		}
		if (p[1] == ALERT_CLOSE_NOTIFY) {
			c->peer_closed = true;
			return 0;
		}
		if (p[0] == 1 && c->version != TLS1_3_VERSION)
			return 0; /* TLS 1.2 warning alerts are ignored */
		offload_count(OFFLOAD_EV_DPDK_PEER_ALERT, 1);
		c->alert_sent = true; /* no answer to a fatal alert */
		{
			char why[48];
			snprintf(why, sizeof(why), "client sent alert %u", p[1]);
			return set_fatal(c, -ECONNRESET, why);
		}
	case REC_HANDSHAKE:
		if (c->version == TLS1_3_VERSION)
			return handshake_msg(c, p, s->plain_len);
		/* fall through */
	default:
		offload_count(OFFLOAD_EV_DPDK_PROTOCOL, 1);
		return fail(c, ALERT_UNEXPECTED_MESSAGE, -EPROTO, "unexpected record content type");
	}
}

/*
 * Hand out decrypted application data from the head slots. Returns bytes,
 * 0 when nothing is ready, or a fatal error.
 */
static ssize_t deliver(struct dp_conn *c, uint8_t *out, size_t len)
{
	size_t got = 0;

	while (c->rx_count && got < len && !c->peer_closed) {
		struct slot *s = &c->rxs[c->rx_head];

		if (s->state == SLOT_QUEUED)
			break;
		if (s->epoch != c->rx.epoch) {
			/* Decrypted with keys a KeyUpdate ahead of it retired: its
			 * ciphertext is still in rbuf and goes again (rsub reset). */
			pop_rx(c, false);
			continue;
		}
		if (got && s->state != SLOT_DONE)
			break; /* what came before the bad record first, like OpenSSL */
		if (s->state == SLOT_FAILED) {
			offload_count(OFFLOAD_EV_DPDK_BAD_MAC, 1);
			return fail(c, ALERT_BAD_RECORD_MAC, -EBADMSG,
				    "bad record MAC from the client");
		}
		if (s->state == SLOT_DEVERR)
			return fail(c, ALERT_INTERNAL_ERROR, -EIO,
				    "crypto device failed to decrypt a record");
		if (process_head(c) < 0)
			return got ? (ssize_t)got : c->fatal; /* the error comes next time */
		if (s->type == REC_APPDATA && s->done_len < s->plain_len) {
			size_t n = s->plain_len - s->done_len;
			if (n > len - got)
				n = len - got;
			memcpy(out + got, rte_pktmbuf_mtod_offset(s->m, uint8_t *, s->off + s->done_len),
			       n);
			s->done_len += (uint32_t)n;
			got += n;
			if (s->done_len < s->plain_len)
				break;
		}
		if (s->type == REC_HANDSHAKE) {
			/* Records behind the KeyUpdate went with the old keys: they
			 * are dropped as they come back and submitted again. */
			pop_rx(c, true);
			c->rsub = 0;
			continue;
		}
		pop_rx(c, true);
		if (c->peer_closed)
			break;
	}
	return (ssize_t)got;
}

static ssize_t dp_recv(struct offload_conn *oc, void *buf, size_t len)
{
	struct dp_conn *c = oc->priv;
	ssize_t r;

	for (;;) {
		if (c->fatal)
			return c->fatal;
		r = deliver(c, buf, len);
		if (r != 0)
			return r;
		if (c->peer_closed) {
			while (c->rx_count && c->rxs[c->rx_head].state != SLOT_QUEUED)
				pop_rx(c, false);
			return 0;
		}
		if (!c->rbuf) {
			c->rbuf = malloc(DP_RBUF);
			if (!c->rbuf)
				return set_fatal(c, -ENOMEM, "out of memory");
		}
		r = submit_rx(c);
		if (r < 0)
			return c->fatal;
		if (r > 0 && c->rx_count == 0) {
			oc->want = OFFLOAD_WANT_ENGINE; /* woken when buffers come back */
			return -EAGAIN;
		}
		/* Read more while there is room: the next records decrypt in the same burst. */
		if (c->rstart > 0 && c->rend - c->rstart < DP_RBUF / 2) {
			memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
			c->rend -= c->rstart;
			c->rstart = 0;
		}
		if (c->rend < DP_RBUF && !c->sock_eof) {
			ssize_t n = read(oc->fd, c->rbuf + c->rend, DP_RBUF - c->rend);
			if (n > 0) {
				c->rend += (size_t)n;
				continue;
			}
			if (n == 0) {
				c->sock_eof = true;
			} else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
				return set_fatal(c, errno == ECONNRESET ? -ECONNRESET : -errno,
						 strerror(errno));
			} else if (c->rx_count == 0) {
				oc->want = OFFLOAD_WANT_READ;
				return -EAGAIN;
			}
		}
		if (c->rx_count) {
			oc->want = OFFLOAD_WANT_ENGINE;
			return -EAGAIN;
		}
		if (c->sock_eof) {
			if (c->rend > c->rstart)
				return set_fatal(c, -EPIPE, "connection closed inside a record");
			return 0;
		}
		/* A full buffer always holds a complete record (DP_RBUF holds four). */
		oc->want = OFFLOAD_WANT_ENGINE;
		mark_starved(c);
		return -EAGAIN;
	}
}

static bool dp_pending(struct offload_conn *oc)
{
	struct dp_conn *c = oc->priv;

	return c->rx_count && c->rxs[c->rx_head].state != SLOT_QUEUED;
}

static int dp_shutdown(struct offload_conn *oc)
{
	struct dp_conn *c = oc->priv;

	if (c->fatal)
		return 1;
	send_alert(c, ALERT_CLOSE_NOTIFY);
	return 1;
}

/* --- attach / detach ---------------------------------------------------------- */

static void conn_free(struct dp_conn *c)
{
	unsigned i;

	for (i = 0; i < 2; i++) {
		if (c->tx.sess[i])
			rte_cryptodev_sym_session_free(dp.dev, c->tx.sess[i]);
		if (c->rx.sess[i])
			rte_cryptodev_sym_session_free(dp.dev, c->rx.sess[i]);
	}
	for (i = 0; i < DP_TX_SLOTS; i++)
		if (c->txs[i].m && c->txs[i].state != SLOT_QUEUED)
			rte_pktmbuf_free(c->txs[i].m);
	for (i = 0; i < DP_RX_SLOTS; i++)
		if (c->rxs[i].m && c->rxs[i].state != SLOT_QUEUED)
			rte_pktmbuf_free(c->rxs[i].m);
	free(c->rbuf);
	free(c->txq);
	OPENSSL_cleanse(c, sizeof(*c));
	free(c);
}

static int dp_attach(struct offload_conn *oc)
{
	SSL *ssl = oc->ssl;
	const SSL_CIPHER *ci = SSL_get_current_cipher(ssl);
	struct offload_secret *sec = offload_secret_get(ssl);
	int nid = ci ? SSL_CIPHER_get_cipher_nid(ci) : NID_undef;
	struct dp_conn *c;
	char why[96] = "";

	if (!dp.ready)
		return -ENOTSUP;
	/* Room for this session's keys and a KeyUpdate each way (4), and others'. */
	if (rte_mempool_avail_count(dp.qps[dp.qp].sessions) < 16) {
		snprintf(oc->err, sizeof(oc->err), "DPDK session pool exhausted in this worker");
		return -ENOTSUP;
	}
	if (nid != NID_aes_128_gcm && nid != NID_aes_256_gcm) {
		snprintf(oc->err, sizeof(oc->err), "cipher %s not supported by the DPDK engine",
			 ci ? SSL_CIPHER_get_name(ci) : "?");
		return -ENOTSUP;
	}
	if (!sec) {
		snprintf(oc->err, sizeof(oc->err), "handshake secrets not captured");
		return -ENOTSUP;
	}
	if (SSL_has_pending(ssl) || BIO_get_ktls_send(SSL_get_wbio(ssl)) == 1 ||
	    BIO_get_ktls_recv(SSL_get_rbio(ssl)) == 1) {
		snprintf(oc->err, sizeof(oc->err), "client data already buffered in OpenSSL");
		return -ENOTSUP;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		snprintf(oc->err, sizeof(oc->err), "out of memory");
		return -ENOMEM;
	}
	c->oc = oc;
	c->qp = &dp.qps[dp.qp];
	c->version = (uint16_t)SSL_version(ssl);
	c->key_len = nid == NID_aes_128_gcm ? 16 : 32;
	if (c->version == TLS1_3_VERSION) {
		c->suite = keys_suite_tls13(SSL_CIPHER_get_protocol_id(ci));
		if (!c->suite || sec->client_len <= 0 || sec->server_len <= 0) {
			snprintf(why, sizeof(why), "no TLS 1.3 traffic secrets");
			goto decline;
		}
		memcpy(c->rx.secret, sec->client, (size_t)sec->client_len);
		c->rx.secret_len = (size_t)sec->client_len;
		memcpy(c->tx.secret, sec->server, (size_t)sec->server_len);
		c->tx.secret_len = (size_t)sec->server_len;
		if (keys13(c, &c->rx, false, false) < 0 || keys13(c, &c->tx, true, false) < 0) {
			snprintf(why, sizeof(why), "cannot create device sessions");
			goto decline;
		}
		c->rx.seq = 0;
	} else if (c->version == TLS1_2_VERSION) {
		if (keys12(c, ssl, why, sizeof(why)) < 0)
			goto decline;
		c->rx.seq = 1; /* after the client's Finished */
	} else {
		snprintf(why, sizeof(why), "%s not supported by the DPDK engine",
			 SSL_get_version(ssl));
		goto decline;
	}
	c->tx.seq = sec->tx_records;
	oc->priv = c;
	oc->tx_mode = oc->rx_mode = OFFLOAD_MODE_DPDK;
	oc->tx_kernel = oc->rx_kernel = false;
	oc->err[0] = '\0';
	return 0;
decline:
	snprintf(oc->err, sizeof(oc->err), "%s", why);
	conn_free(c);
	return -ENOTSUP;
}

static void dp_detach(struct offload_conn *oc)
{
	struct dp_conn *c = oc->priv;
	unsigned i;

	if (!c)
		return;
	oc->priv = NULL;
	c->oc = NULL;
	/* Buffers the device still holds are freed as their operations come back. */
	for (i = 0; i < DP_TX_SLOTS; i++)
		if (c->txs[i].state == SLOT_QUEUED)
			c->txs[i].m = NULL;
	for (i = 0; i < DP_RX_SLOTS; i++)
		if (c->rxs[i].state == SLOT_QUEUED)
			c->rxs[i].m = NULL;
	if (c->starved) {
		struct dp_conn **pp = &dp.starved;
		while (*pp && *pp != c)
			pp = &(*pp)->next_starved;
		if (*pp)
			*pp = c->next_starved;
	}
	if (c->wake_pending) {
		struct dp_conn **pp = &dp.wake;
		while (*pp && *pp != c)
			pp = &(*pp)->next_wake;
		if (*pp)
			*pp = c->next_wake;
	}
	if (c->inflight == 0)
		conn_free(c);
}

#else /* !MAILGW_HAVE_DPDK */

int offload_dpdk_init(const char *args, unsigned nworkers, char *err, size_t errlen)
{
	(void)args;
	(void)nworkers;
	snprintf(err, errlen, "this mailgw was built without DPDK (libdpdk-dev)");
	return -1;
}

const char *offload_dpdk_describe(void) { return "none"; }
int offload_dpdk_take_qp(void) { return -1; }
void offload_dpdk_give_qp(int qp, bool clean) { (void)qp; (void)clean; }
int offload_worker_start(int qp, char *err, size_t errlen) { (void)qp; (void)err; (void)errlen; return 0; }
bool offload_dpdk_usable(void) { return false; }
unsigned offload_dpdk_buffers_in_use(void) { return 0; }
bool offload_poll(void) { return false; }
bool offload_busy(void) { return false; }
bool offload_drain(void) { return true; }
static int dp_attach(struct offload_conn *oc) { (void)oc; return -ENOTSUP; }
static ssize_t dp_recv(struct offload_conn *oc, void *b, size_t n) { (void)oc; (void)b; (void)n; return -EIO; }
static ssize_t dp_send(struct offload_conn *oc, const void *b, size_t n) { (void)oc; (void)b; (void)n; return -EIO; }
static bool dp_pending(struct offload_conn *oc) { (void)oc; return false; }
static int dp_shutdown(struct offload_conn *oc) { (void)oc; return 1; }
static void dp_detach(struct offload_conn *oc) { (void)oc; }

#endif

const struct offload_ops offload_dpdk = {
	.name = "dpdk",
	.available = offload_dpdk_usable,
	.attach = dp_attach,
	.recv = dp_recv,
	.send = dp_send,
	.pending = dp_pending,
	.shutdown = dp_shutdown,
	.detach = dp_detach,
};
