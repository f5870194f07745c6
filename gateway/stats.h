/*
 * stats.h - gateway counters.
 *
 * One row of counters per worker in a shared anonymous mapping created by
 * the master before it forks: a worker only ever writes its own row, the
 * master sums rows when asked (SIGUSR1 today, the metrics endpoint later).
 * Rows survive a worker's restart, so counters stay monotonic.
 *
 * The names are the stable interface: they appear in the `stats:` log line
 * and become Prometheus metric labels.
 */
#ifndef MAILGW_STATS_H
#define MAILGW_STATS_H

#include <stddef.h>
#include <stdint.h>

#define STATS_COUNTERS(X)                                                     \
	X(connections)          /* accepted client connections */             \
	X(connections_rejected) /* refused: worker at max_connections */      \
	X(sessions_active)      /* gauge: sessions open now */                \
	X(tls_handshake_ok)                                                   \
	X(tls_handshake_fail)                                                 \
	X(handshake_timeout)                                                  \
	X(idle_timeout)                                                       \
	X(starttls)             /* STARTTLS/STLS accepted */                  \
	X(starttls_injection)   /* bytes pipelined after STARTTLS */          \
	X(require_tls_refused)  /* commands refused before TLS */             \
	X(line_too_long)                                                      \
	X(pretls_limit)         /* too many commands before TLS */            \
	X(plaintext_relay)      /* sessions relayed without TLS */            \
	X(backend_ok)                                                         \
	X(backend_fail)         /* connect failed, timed out or bad greeting */ \
	X(bytes_client_to_backend)                                            \
	X(bytes_backend_to_client)                                            \
	X(offload_userspace_tx)                                               \
	X(offload_userspace_rx)                                               \
	X(offload_ktls_sw_tx)                                                 \
	X(offload_ktls_sw_rx)                                                 \
	X(offload_ktls_hw_tx)                                                 \
	X(offload_ktls_hw_rx)                                                 \
	X(ktls_fallback)        /* kTLS wanted, a direction stayed in userspace */ \
	X(ktls_keyupdate)       /* sessions ended by a KeyUpdate kTLS cannot follow */ \
	X(offload_dpdk_tx)                                                    \
	X(offload_dpdk_rx)                                                    \
	X(dpdk_fallback)        /* DPDK wanted, the session stayed in userspace */ \
	X(dpdk_records_tx)      /* records encrypted on the crypto device */  \
	X(dpdk_records_rx)      /* records decrypted on the crypto device */  \
	X(dpdk_bursts)          /* enqueue bursts to the device */            \
	X(dpdk_bad_mac)         /* records that failed authentication */      \
	X(dpdk_device_error)    /* operations the device failed */            \
	X(dpdk_peer_alert)      /* fatal alerts received from clients */      \
	X(dpdk_protocol_error)  /* unexpected records or messages */          \
	X(dpdk_keyupdate)       /* TLS 1.3 KeyUpdates followed */

enum stat_id {
#define STATS_ENUM(name) STAT_##name,
	STATS_COUNTERS(STATS_ENUM)
#undef STATS_ENUM
	STAT_COUNT
};

/* Rows, one per live worker process: a reload briefly runs two generations. */
#define STATS_MAX_WORKERS 256
#define STATS_MAX_LISTENERS 64
#define STATS_NAME_MAX 64

/* Handshake duration histogram upper bounds, seconds (Prometheus "le"). */
#define STATS_HS_BUCKETS(X) X(0.001) X(0.0025) X(0.005) X(0.01) X(0.025) X(0.05) \
	X(0.1) X(0.25) X(0.5) X(1) X(2.5) X(5) X(10)
#define STATS_HS_NBUCKETS 13

/*
 * Per-listener counters, for the labelled metric families. A listener keeps
 * its slot (by name) across reloads, so its series stay monotonic.
 */
enum lstat_id {
	LS_connections,
	LS_active,
	LS_handshake_ok_tls12,
	LS_handshake_ok_tls13,
	LS_handshake_error,
	LS_starttls_ok,
	LS_starttls_rejected,
	LS_starttls_injection,
	LS_bytes_client_to_backend,
	LS_bytes_backend_to_client,
	LS_backend_connect,   /* connect failed */
	LS_backend_timeout,   /* no connection or greeting in time */
	LS_backend_refused,   /* negative greeting or EHLO reply */
	LS_backend_closed,    /* closed before its greeting or reply */
	LS_limit_line_length,
	LS_limit_pretls_commands,
	LS_limit_max_connections,
	LS_limit_handshake_timeout,
	LS_limit_idle_timeout,
	LS_hs_bucket0, /* STATS_HS_NBUCKETS cumulative-by-reader buckets follow */
	LS_hs_inf = LS_hs_bucket0 + STATS_HS_NBUCKETS,
	LS_hs_sum_us,
	LS_COUNT
};

struct stats_row {
	uint64_t v[STAT_COUNT];
} __attribute__((aligned(64)));

struct stats_lrow {
	uint64_t v[LS_COUNT];
} __attribute__((aligned(64)));

int stats_init(void);                 /* master: map the shared rows */
void stats_select_row(unsigned idx);  /* worker: which row is ours */
/* Master, when a worker is gone: its open-session gauges no longer hold. */
void stats_clear_gauges(unsigned idx);
void stats_add(enum stat_id id, int64_t delta);
static inline void stats_inc(enum stat_id id) { stats_add(id, 1); }
uint64_t stats_sum(enum stat_id id);
const char *stats_name(enum stat_id id);

/* Master: the slot of a listener name (same name, same slot); -1 when full. */
int stats_listener_slot(const char *name, const char *protocol);
/* Worker: per-listener counters; slot < 0 is ignored. */
void stats_ladd(int slot, enum lstat_id id, int64_t delta);
static inline void stats_linc(int slot, enum lstat_id id) { stats_ladd(slot, id, 1); }
void stats_handshake_time(int slot, uint64_t usec);
/* Reader: sum over workers; name/protocol of a slot ("" when unused). */
uint64_t stats_lsum(int slot, enum lstat_id id);
const char *stats_listener_name(int slot);
const char *stats_listener_protocol(int slot);
extern const double stats_hs_bounds[STATS_HS_NBUCKETS];
/* "name=value name=value ..." of every counter, for the log. */
void stats_format(char *out, size_t cap);

#endif
