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
	X(ktls_keyupdate)       /* sessions ended by a KeyUpdate kTLS cannot follow */

enum stat_id {
#define STATS_ENUM(name) STAT_##name,
	STATS_COUNTERS(STATS_ENUM)
#undef STATS_ENUM
	STAT_COUNT
};

#define STATS_MAX_WORKERS 256

struct stats_row {
	uint64_t v[STAT_COUNT];
} __attribute__((aligned(64)));

int stats_init(void);                 /* master: map the shared rows */
void stats_select_row(unsigned idx);  /* worker: which row is ours */
void stats_add(enum stat_id id, int64_t delta);
static inline void stats_inc(enum stat_id id) { stats_add(id, 1); }
uint64_t stats_sum(enum stat_id id);
const char *stats_name(enum stat_id id);
/* "name=value name=value ..." of every counter, for the log. */
void stats_format(char *out, size_t cap);

#endif
