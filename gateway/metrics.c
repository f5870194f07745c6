/*
 * metrics.c - Prometheus text exposition (format 0.0.4) of mailgw's
 * counters, and the health check.
 *
 * Conventions: base units (seconds, bytes), counters end in _total, every
 * family has HELP and TYPE, label values come from the config (listener names
 * are restricted to [A-Za-z0-9._-]) or fixed tables, so nothing needs
 * escaping. Per-worker values are summed here, so an increment is never
 * lost to concurrency: each worker adds only to its own row.
 */
#define _GNU_SOURCE
#include "metrics.h"

#include <microhttpd.h>
#include <openssl/crypto.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bpfmap.h"
#include "classify.h"
#include "log.h"
#include "stats.h"

#ifndef MAILGW_VERSION
#define MAILGW_VERSION "0.1.0"
#endif

static struct MHD_Daemon *daemon_;
/* A worker's inherited copy: never stopped there (the master owns the
 * socket), kept reachable so leak checkers do not flag it. */
static struct MHD_Daemon *volatile inherited_;
static bool draining;

struct out {
	char *p;
	size_t len, cap;
	bool oom;
};

static void put(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(struct out *o, const char *fmt, ...)
{
	va_list ap;
	int n;

	for (;;) {
		if (o->oom)
			return;
		va_start(ap, fmt);
		n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
		va_end(ap);
		if (n < 0) {
			o->oom = true;
			return;
		}
		if ((size_t)n < o->cap - o->len) {
			o->len += (size_t)n;
			return;
		}
		size_t ncap = (o->cap + (size_t)n + 1) * 2;
		char *np = realloc(o->p, ncap);
		if (!np) {
			o->oom = true;
			return;
		}
		o->p = np;
		o->cap = ncap;
	}
}

static void family(struct out *o, const char *name, const char *type, const char *help)
{
	put(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

#define EACH_LISTENER(i) \
	for (int i = 0; i < STATS_MAX_LISTENERS; i++) if (stats_listener_name(i)[0])

static void per_listener(struct out *o, const char *name, enum lstat_id id)
{
	EACH_LISTENER(i)
		put(o, "%s{listener=\"%s\"} %llu\n", name, stats_listener_name(i),
		    (unsigned long long)stats_lsum(i, id));
}

typedef struct {
	const char *value;
	enum lstat_id id;
} lv;

static void labelled(struct out *o, const char *name, const char *label, const lv *tab, size_t n)
{
	EACH_LISTENER(i)
		for (size_t k = 0; k < n; k++)
			put(o, "%s{listener=\"%s\",%s=\"%s\"} %llu\n", name, stats_listener_name(i),
			    label, tab[k].value, (unsigned long long)stats_lsum(i, tab[k].id));
}

/* Gateway-wide counters (no listener label), one series per label value. */
typedef struct {
	const char *value;
	enum stat_id id;
} glv;

static void gateway_labelled(struct out *o, const char *name, const char *label, const glv *tab,
			     size_t n)
{
	for (size_t k = 0; k < n; k++)
		put(o, "%s{%s=\"%s\"} %llu\n", name, label, tab[k].value,
		    (unsigned long long)stats_sum(tab[k].id));
}

/* A gateway-wide counter with no labels: its HELP, TYPE and one sample. */
static void gateway_counter(struct out *o, const char *name, const char *help, enum stat_id id)
{
	family(o, name, "counter", help);
	put(o, "%s %llu\n", name, (unsigned long long)stats_sum(id));
}

/* eBPF classifier counters, read from its pinned per-CPU maps. */
struct bpf_sample {
	char family[24];
	unsigned port;
	char label[48];
	unsigned long long value;
};

struct bpf_collect {
	struct bpf_sample *v;
	size_t n, cap;
};

static void bpf_cb(void *arg, const char *family, unsigned port, const char *label,
		   unsigned long long value)
{
	struct bpf_collect *c = arg;

	if (c->n == c->cap) {
		size_t ncap = c->cap ? c->cap * 2 : 256;
		struct bpf_sample *nv = realloc(c->v, ncap * sizeof(*nv));
		if (!nv)
			return;
		c->v = nv;
		c->cap = ncap;
	}
	snprintf(c->v[c->n].family, sizeof(c->v[0].family), "%s", family);
	snprintf(c->v[c->n].label, sizeof(c->v[0].label), "%s", label);
	c->v[c->n].port = port;
	c->v[c->n].value = value;
	c->n++;
}

static void render_bpf(struct out *o, const char *pin)
{
	static const struct {
		const char *family, *metric, *label, *help;
	} fams[] = {
		{ "packets", "mailgw_bpf_packets_total", "class",
		  "Packets on the mail ports seen by the eBPF classifier, by class (tls, plaintext)." },
		{ "bytes", "mailgw_bpf_bytes_total", "class",
		  "Bytes (L3 length) on the mail ports, by class." },
		{ "flows", "mailgw_bpf_flows_total", "kind",
		  "Flows on the mail ports, by kind, counted once per flow." },
		{ "violations", "mailgw_bpf_violations_total", "reason",
		  "Flows with plaintext where TLS was due, once per flow and reason." },
		{ "violation_bytes", "mailgw_bpf_violation_bytes_total", "reason",
		  "Payload bytes of those violations." },
		{ "untracked", "mailgw_bpf_untracked_total", "direction",
		  "Flow directions whose TLS record tracking was lost (once per flow and direction)." },
	};
	struct bpf_collect c = { 0 };

	if (bpfmap_read_counters(pin, bpf_cb, &c) < 0) {
		free(c.v);
		return;
	}
	for (size_t f = 0; f < sizeof(fams) / sizeof(fams[0]); f++) {
		family(o, fams[f].metric, "counter", fams[f].help);
		for (size_t k = 0; k < c.n; k++)
			if (!strcmp(c.v[k].family, fams[f].family))
				put(o, "%s{port=\"%u\",%s=\"%s\"} %llu\n", fams[f].metric, c.v[k].port,
				    fams[f].label, c.v[k].label, c.v[k].value);
	}
	free(c.v);
}

char *metrics_render(size_t *len)
{
	struct out o = { 0 };
	static const lv backend_reasons[] = {
		{ "connect", LS_backend_connect }, { "timeout", LS_backend_timeout },
		{ "refused", LS_backend_refused }, { "closed", LS_backend_closed },
	};
	static const lv limits[] = {
		{ "line_length", LS_limit_line_length },
		{ "pretls_commands", LS_limit_pretls_commands },
		{ "max_connections", LS_limit_max_connections },
		{ "handshake_timeout", LS_limit_handshake_timeout },
		{ "idle_timeout", LS_limit_idle_timeout },
	};
	static const lv starttls[] = { { "ok", LS_starttls_ok }, { "rejected", LS_starttls_rejected } };
	static const lv bytes[] = { { "client_to_backend", LS_bytes_client_to_backend },
				    { "backend_to_client", LS_bytes_backend_to_client } };
	static const glv dpdk_records[] = { { "tx", STAT_dpdk_records_tx },
					    { "rx", STAT_dpdk_records_rx } };
	static const glv dpdk_errors[] = {
		{ "bad_record_mac", STAT_dpdk_bad_mac }, { "device", STAT_dpdk_device_error },
		{ "peer_alert", STAT_dpdk_peer_alert }, { "protocol", STAT_dpdk_protocol_error },
	};
	static const struct { const char *mode, *dir; enum stat_id id; } offload[] = {
		{ "ktls_hw", "tx", STAT_offload_ktls_hw_tx }, { "ktls_hw", "rx", STAT_offload_ktls_hw_rx },
		{ "ktls_sw", "tx", STAT_offload_ktls_sw_tx }, { "ktls_sw", "rx", STAT_offload_ktls_sw_rx },
		{ "dpdk", "tx", STAT_offload_dpdk_tx }, { "dpdk", "rx", STAT_offload_dpdk_rx },
		{ "userspace", "tx", STAT_offload_userspace_tx },
		{ "userspace", "rx", STAT_offload_userspace_rx },
	};

	family(&o, "mailgw_build_info", "gauge", "Version of mailgw and of the OpenSSL it runs on.");
	put(&o, "mailgw_build_info{version=\"%s\",openssl=\"%s\"} 1\n", MAILGW_VERSION,
	    OpenSSL_version(OPENSSL_VERSION_STRING));

	family(&o, "mailgw_up", "gauge", "1 while accepting connections, 0 while draining.");
	put(&o, "mailgw_up %d\n", draining ? 0 : 1);

	family(&o, "mailgw_connections_total", "counter", "Client connections accepted.");
	EACH_LISTENER(i)
		put(&o, "mailgw_connections_total{listener=\"%s\",protocol=\"%s\"} %llu\n",
		    stats_listener_name(i), stats_listener_protocol(i),
		    (unsigned long long)stats_lsum(i, LS_connections));

	family(&o, "mailgw_active_connections", "gauge", "Client sessions open now.");
	per_listener(&o, "mailgw_active_connections", LS_active);

	family(&o, "mailgw_tls_handshakes_total", "counter",
	       "TLS handshakes by negotiated version and result (timeouts are errors).");
	EACH_LISTENER(i) {
		const char *n = stats_listener_name(i);
		put(&o, "mailgw_tls_handshakes_total{listener=\"%s\",version=\"TLSv1.2\",result=\"ok\"} %llu\n",
		    n, (unsigned long long)stats_lsum(i, LS_handshake_ok_tls12));
		put(&o, "mailgw_tls_handshakes_total{listener=\"%s\",version=\"TLSv1.3\",result=\"ok\"} %llu\n",
		    n, (unsigned long long)stats_lsum(i, LS_handshake_ok_tls13));
		put(&o, "mailgw_tls_handshakes_total{listener=\"%s\",version=\"unknown\",result=\"error\"} %llu\n",
		    n, (unsigned long long)stats_lsum(i, LS_handshake_error));
	}

	family(&o, "mailgw_handshake_duration_seconds", "histogram",
	       "Time from the start of the TLS handshake to its successful end.");
	EACH_LISTENER(i) {
		const char *n = stats_listener_name(i);
		unsigned long long cum = 0;
		for (int b = 0; b < STATS_HS_NBUCKETS; b++) {
			cum += stats_lsum(i, (enum lstat_id)(LS_hs_bucket0 + b));
			put(&o, "mailgw_handshake_duration_seconds_bucket{listener=\"%s\",le=\"%g\"} %llu\n",
			    n, stats_hs_bounds[b], cum);
		}
		cum += stats_lsum(i, LS_hs_inf);
		put(&o, "mailgw_handshake_duration_seconds_bucket{listener=\"%s\",le=\"+Inf\"} %llu\n",
		    n, cum);
		put(&o, "mailgw_handshake_duration_seconds_sum{listener=\"%s\"} %.6f\n", n,
		    (double)stats_lsum(i, LS_hs_sum_us) / 1e6);
		put(&o, "mailgw_handshake_duration_seconds_count{listener=\"%s\"} %llu\n", n, cum);
	}

	family(&o, "mailgw_starttls_total", "counter",
	       "STARTTLS/STLS requests: ok (upgrade started) or rejected (pipelined data).");
	labelled(&o, "mailgw_starttls_total", "result", starttls, 2);

	family(&o, "mailgw_starttls_injection_total", "counter",
	       "Connections that sent bytes behind STARTTLS/STLS before the handshake (CVE-2011-0411 class); all rejected.");
	per_listener(&o, "mailgw_starttls_injection_total", LS_starttls_injection);

	family(&o, "mailgw_offload_total", "counter",
	       "Sessions by record-crypto engine, one count per session and direction.");
	for (size_t k = 0; k < sizeof(offload) / sizeof(offload[0]); k++)
		put(&o, "mailgw_offload_total{mode=\"%s\",direction=\"%s\"} %llu\n", offload[k].mode,
		    offload[k].dir, (unsigned long long)stats_sum(offload[k].id));

	gateway_counter(&o, "mailgw_ktls_fallback_total",
			"Sessions where kernel TLS was wanted but a direction stayed in userspace.",
			STAT_ktls_fallback);
	gateway_counter(&o, "mailgw_ktls_keyupdate_total",
			"Sessions ended by a TLS 1.3 KeyUpdate that kernel TLS cannot follow.",
			STAT_ktls_keyupdate);

	gateway_counter(&o, "mailgw_dpdk_fallback_total",
			"Sessions where the DPDK engine was wanted but declined (cipher, device), left in userspace.",
			STAT_dpdk_fallback);
	family(&o, "mailgw_dpdk_records_total", "counter",
	       "TLS records through the DPDK crypto device, by direction (tx: encrypted, rx: decrypted).");
	gateway_labelled(&o, "mailgw_dpdk_records_total", "direction", dpdk_records, 2);
	gateway_counter(&o, "mailgw_dpdk_bursts_total",
			"Enqueue bursts to the DPDK crypto device (records per burst = records / bursts).",
			STAT_dpdk_bursts);
	family(&o, "mailgw_dpdk_errors_total", "counter",
	       "Sessions ended by the DPDK engine: bad_record_mac, device, peer_alert, protocol.");
	gateway_labelled(&o, "mailgw_dpdk_errors_total", "reason", dpdk_errors, 4);
	gateway_counter(&o, "mailgw_dpdk_keyupdates_total",
			"TLS 1.3 KeyUpdate messages followed by the DPDK engine (new receive keys).",
			STAT_dpdk_keyupdate);

	family(&o, "mailgw_relay_bytes_total", "counter", "Payload bytes relayed, by direction.");
	labelled(&o, "mailgw_relay_bytes_total", "direction", bytes, 2);

	family(&o, "mailgw_backend_errors_total", "counter",
	       "Sessions the backend failed: connect, timeout, refused (negative greeting), closed.");
	labelled(&o, "mailgw_backend_errors_total", "reason", backend_reasons, 4);

	family(&o, "mailgw_limit_rejections_total", "counter",
	       "Sessions ended by a configured limit.");
	labelled(&o, "mailgw_limit_rejections_total", "limit", limits, 5);

	gateway_counter(&o, "mailgw_require_tls_refusals_total",
			"Commands refused before TLS on require_tls listeners.",
			STAT_require_tls_refused);
	gateway_counter(&o, "mailgw_plaintext_relays_total",
			"Sessions relayed to the backend without TLS (require_tls off).",
			STAT_plaintext_relay);

	if (classify_pin_path())
		render_bpf(&o, classify_pin_path());

	if (o.oom) {
		free(o.p);
		return NULL;
	}
	*len = o.len;
	return o.p;
}

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned code, const char *ctype,
			       char *body, size_t len, enum MHD_ResponseMemoryMode mode)
{
	struct MHD_Response *r = MHD_create_response_from_buffer(len, body, mode);
	enum MHD_Result rc;

	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
	rc = MHD_queue_response(conn, code, r);
	MHD_destroy_response(r);
	return rc;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *conn, const char *url,
			       const char *method, const char *version, const char *upload,
			       size_t *upload_len, void **state)
{
	(void)cls;
	(void)version;
	(void)upload;
	(void)state;
	if (*upload_len)
		return MHD_NO; /* no request bodies */
	if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
		return respond(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", "GET only\n", 9,
			       MHD_RESPMEM_PERSISTENT);
	if (!strcmp(url, "/metrics")) {
		size_t len = 0;
		char *text = metrics_render(&len);
		if (!text)
			return respond(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "text/plain",
				       "out of memory\n", 14, MHD_RESPMEM_PERSISTENT);
		return respond(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", text,
			       len, MHD_RESPMEM_MUST_FREE);
	}
	if (!strcmp(url, "/healthz"))
		return draining ? respond(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain",
					  "draining\n", 9, MHD_RESPMEM_PERSISTENT) :
				  respond(conn, MHD_HTTP_OK, "text/plain", "ok\n", 3,
					  MHD_RESPMEM_PERSISTENT);
	return respond(conn, MHD_HTTP_NOT_FOUND, "text/plain", "not found\n", 10,
		       MHD_RESPMEM_PERSISTENT);
}

int metrics_start(const struct sockaddr_any *addr, char *err, size_t errlen)
{
	/* External polling from the master's loop: no threads in the master. */
	daemon_ = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_IPv6 * (addr->ss.ss_family == AF_INET6),
				   0, NULL, NULL, handler, NULL,
				   MHD_OPTION_SOCK_ADDR, (const struct sockaddr *)&addr->ss,
				   MHD_OPTION_CONNECTION_LIMIT, (unsigned)16,
				   MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)8,
				   MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
				   MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)32768,
				   MHD_OPTION_END);
	if (!daemon_) {
		snprintf(err, errlen, "cannot serve metrics on that address (in use or not local?)");
		return -1;
	}
	return 0;
}

void metrics_stop(void)
{
	if (daemon_)
		MHD_stop_daemon(daemon_);
	daemon_ = NULL;
}

bool metrics_running(void)
{
	return daemon_ != NULL;
}

int metrics_fd(void)
{
	const union MHD_DaemonInfo *i;

	if (!daemon_)
		return -1;
	i = MHD_get_daemon_info(daemon_, MHD_DAEMON_INFO_EPOLL_FD);
	return i ? i->epoll_fd : -1;
}

void metrics_run(void)
{
	if (daemon_)
		MHD_run(daemon_);
}

void metrics_set_draining(bool d)
{
	draining = d;
}

void metrics_forget_in_child(void)
{
	const union MHD_DaemonInfo *i;

	if (!daemon_)
		return;
	i = MHD_get_daemon_info(daemon_, MHD_DAEMON_INFO_LISTEN_FD);
	if (i)
		close(i->listen_fd);
	close(metrics_fd());
	inherited_ = daemon_;
	daemon_ = NULL;
}
