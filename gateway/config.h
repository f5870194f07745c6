/*
 * config.h - the parsed configuration (INI, read with libinih).
 *
 * A struct config is immutable once loaded: the master builds a new one on
 * SIGHUP and hands it to a new generation of workers, so no running session
 * ever sees its settings change under it.
 */
#ifndef MAILGW_CONFIG_H
#define MAILGW_CONFIG_H

#include <stdbool.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "log.h"
#include "offload.h"
#include "proto.h"

#define CONFIG_MAX_LISTENERS 64
#define CONFIG_MAX_CERTS 16
#define CONFIG_MAX_WORKERS 128
#define CONFIG_NAME_MAX 64
#define CONFIG_HOST_MAX 256

enum tls_mode { TLSM_NONE, TLSM_STARTTLS, TLSM_IMPLICIT };
enum proxy_mode { PROXY_OFF, PROXY_V1, PROXY_V2 };

struct sockaddr_any {
	struct sockaddr_storage ss;
	socklen_t len;
};

struct listener_conf {
	char name[CONFIG_NAME_MAX];
	int line; /* of the [listener NAME] header */
	struct sockaddr_any listen;
	char listen_str[80];
	enum proto_kind protocol;
	enum tls_mode tls;
	bool require_tls;
	struct sockaddr_any backend;
	char backend_str[80];
	enum proxy_mode proxy;
	char hostname[CONFIG_HOST_MAX];
	unsigned max_line;
	unsigned max_pretls_commands;
	unsigned handshake_timeout_ms;
	unsigned idle_timeout_ms;
	unsigned connect_timeout_ms;
	unsigned seen; /* bitmask of keys given, for defaults and duplicates */
	int slot;      /* per-listener counter slot (stats.h), set by the master */
};

struct cert_pair {
	char *cert;
	char *key;
	int cert_line;
	int key_line;
};

struct config {
	char *path;

	/* [global] */
	unsigned workers;
	char user[64];
	uid_t uid;
	gid_t gid;
	bool has_user;
	enum log_level log_level;
	unsigned shutdown_grace_ms;
	unsigned max_connections; /* per worker */

	/* [tls] */
	struct cert_pair certs[CONFIG_MAX_CERTS];
	unsigned ncerts;
	int min_version; /* TLS1_2_VERSION, ... */
	char *ciphers;
	char *ciphersuites;
	char *groups;
	bool session_tickets;
	int tls_line; /* of the [tls] header, for errors about the section */

	/* [offload] */
	enum offload_request offload;
	char dpdk_args[512];     /* EAL arguments; empty: DPDK not configured */
	int offload_line;

	/* [bpf] */
	enum { BPF_AUTO, BPF_ON, BPF_OFF } bpf_enable;
	char bpf_ifaces[8][32];
	unsigned bpf_nifaces;
	char bpf_pin_path[256];
	struct {
		unsigned port;
		char kind[8];
	} bpf_ports[64];
	unsigned bpf_nports;
	int bpf_line; /* of the [bpf] header, for errors about the section */

	/* [metrics] */
	bool has_metrics;
	struct sockaddr_any metrics_listen;
	char metrics_str[80];

	struct listener_conf listeners[CONFIG_MAX_LISTENERS];
	unsigned nlisteners;
};

/*
 * Load and validate FILE. On error returns -1 and writes "FILE:LINE: message"
 * to err. Certificates are not opened here (see tls_build).
 */
int config_load(const char *path, struct config **out, char *err, size_t errlen);
void config_free(struct config *c);

/* Parse "1.2.3.4:25" or "[::1]:25" (numeric only). */
int config_parse_addr(const char *s, struct sockaddr_any *out);
/* Format an address as "1.2.3.4:25" / "[::1]:25". */
void config_format_addr(const struct sockaddr *sa, char *out, size_t cap);
const char *tls_mode_name(enum tls_mode m);

#endif
