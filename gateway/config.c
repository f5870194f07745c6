/*
 * config.c - INI configuration: parsing (libinih), defaults, validation.
 *
 * Every error names the file and line it comes from. libinih does not pass
 * line numbers to the handler in Debian's build, so the file is fed through
 * our own reader, which counts lines and notes where each section starts.
 */
#define _GNU_SOURCE
#include "config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <grp.h>
#include <ini.h>
#include <limits.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

#define CONFIG_LINE_MAX 4096

/* Listener keys, as bits in listener_conf.seen. */
enum {
	LK_LISTEN = 1u << 0,
	LK_PROTOCOL = 1u << 1,
	LK_TLS = 1u << 2,
	LK_REQUIRE_TLS = 1u << 3,
	LK_BACKEND = 1u << 4,
	LK_PROXY = 1u << 5,
	LK_HOSTNAME = 1u << 6,
	LK_MAX_LINE = 1u << 7,
	LK_MAX_CMDS = 1u << 8,
	LK_HS_TIMEOUT = 1u << 9,
	LK_IDLE_TIMEOUT = 1u << 10,
	LK_CONNECT_TIMEOUT = 1u << 11,
};

struct parse_ctx {
	struct config *cfg;
	FILE *fp;
	int line;          /* line being parsed */
	bool truncated;    /* reader met a line over CONFIG_LINE_MAX */
	bool failed;       /* err/err_line hold the first error */
	int err_line;
	char err[256];
	char cur_section[128];
	struct listener_conf *cur_listener;
	unsigned global_seen, tls_seen, offload_seen, metrics_seen, bpf_seen;
};

static int fail(struct parse_ctx *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct parse_ctx *p, const char *fmt, ...)
{
	va_list ap;

	if (p->failed)
		return 0; /* keep the first error */
	p->failed = true;
	p->err_line = p->line;
	va_start(ap, fmt);
	vsnprintf(p->err, sizeof(p->err), fmt, ap);
	va_end(ap);
	return 0;
}

static char *reader(char *str, int num, void *stream)
{
	struct parse_ctx *p = stream;
	size_t n;

	if (!fgets(str, num, p->fp))
		return NULL;
	p->line++;
	n = strlen(str);
	if (n == (size_t)num - 1 && str[n - 1] != '\n' && !feof(p->fp)) {
		int c;

		/* Skip the rest of the over-long line; report it as an error. */
		while ((c = fgetc(p->fp)) != EOF && c != '\n')
			;
		if (!p->failed) {
			p->failed = true;
			p->err_line = p->line;
			snprintf(p->err, sizeof(p->err), "line too long (limit %d bytes)", num - 2);
		}
		str[0] = '\0';
	}
	return str;
}

const char *tls_mode_name(enum tls_mode m)
{
	return m == TLSM_STARTTLS ? "starttls" : m == TLSM_IMPLICIT ? "implicit" : "none";
}

int config_parse_addr(const char *s, struct sockaddr_any *out)
{
	char host[INET6_ADDRSTRLEN + 2];
	const char *colon, *port;
	char *end;
	unsigned long pn;
	size_t hl;

	memset(out, 0, sizeof(*out));
	if (s[0] == '[') {
		const char *rb = strchr(s, ']');
		if (!rb || rb[1] != ':')
			return -1;
		hl = (size_t)(rb - s - 1);
		if (hl == 0 || hl >= sizeof(host))
			return -1;
		memcpy(host, s + 1, hl);
		host[hl] = '\0';
		port = rb + 2;
	} else {
		colon = strrchr(s, ':');
		if (!colon || strchr(s, ':') != colon)
			return -1;
		hl = (size_t)(colon - s);
		if (hl == 0 || hl >= sizeof(host))
			return -1;
		memcpy(host, s, hl);
		host[hl] = '\0';
		port = colon + 1;
	}
	if (!isdigit((unsigned char)port[0]))
		return -1;
	errno = 0;
	pn = strtoul(port, &end, 10);
	if (errno || *end || pn == 0 || pn > 65535)
		return -1;
	if (s[0] == '[') {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&out->ss;
		if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1)
			return -1;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons((uint16_t)pn);
		out->len = sizeof(*a);
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&out->ss;
		if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
			return -1;
		a->sin_family = AF_INET;
		a->sin_port = htons((uint16_t)pn);
		out->len = sizeof(*a);
	}
	return 0;
}

void config_format_addr(const struct sockaddr *sa, char *out, size_t cap)
{
	char h[INET6_ADDRSTRLEN];

	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *a = (const void *)sa;
		inet_ntop(AF_INET, &a->sin_addr, h, sizeof(h));
		snprintf(out, cap, "%s:%u", h, ntohs(a->sin_port));
	} else if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *a = (const void *)sa;
		inet_ntop(AF_INET6, &a->sin6_addr, h, sizeof(h));
		snprintf(out, cap, "[%s]:%u", h, ntohs(a->sin6_port));
	} else {
		snprintf(out, cap, "?");
	}
}

static int parse_bool(const char *v, bool *out)
{
	if (!strcmp(v, "yes") || !strcmp(v, "true") || !strcmp(v, "on") || !strcmp(v, "1"))
		*out = true;
	else if (!strcmp(v, "no") || !strcmp(v, "false") || !strcmp(v, "off") || !strcmp(v, "0"))
		*out = false;
	else
		return -1;
	return 0;
}

static int parse_uint(const char *v, unsigned lo, unsigned hi, unsigned *out)
{
	char *end;
	unsigned long n;

	if (!isdigit((unsigned char)v[0]))
		return -1;
	errno = 0;
	n = strtoul(v, &end, 10);
	if (errno || *end || n < lo || n > hi)
		return -1;
	*out = (unsigned)n;
	return 0;
}

/* Durations: "30" or "30s", "500ms", "5m", "1h"; result in milliseconds. */
static int parse_duration(const char *v, unsigned *out_ms)
{
	char *end;
	unsigned long n, mult = 1000;

	if (!isdigit((unsigned char)v[0]))
		return -1;
	errno = 0;
	n = strtoul(v, &end, 10);
	if (errno)
		return -1;
	if (!strcmp(end, "ms"))
		mult = 1;
	else if (!strcmp(end, "") || !strcmp(end, "s"))
		mult = 1000;
	else if (!strcmp(end, "m"))
		mult = 60000;
	else if (!strcmp(end, "h"))
		mult = 3600000;
	else
		return -1;
	if (n == 0 || n > 86400000ul / mult)
		return -1;
	*out_ms = (unsigned)(n * mult);
	return 0;
}

static bool seen_once(struct parse_ctx *p, unsigned *seen, unsigned bit, const char *name)
{
	if (*seen & bit) {
		fail(p, "duplicate key '%s'", name);
		return false;
	}
	*seen |= bit;
	return true;
}

static int global_key(struct parse_ctx *p, const char *name, const char *v)
{
	struct config *c = p->cfg;

	if (!strcmp(name, "workers")) {
		if (!seen_once(p, &p->global_seen, 1, name))
			return 0;
		if (parse_uint(v, 1, CONFIG_MAX_WORKERS, &c->workers))
			return fail(p, "workers: expected 1..%d", CONFIG_MAX_WORKERS);
	} else if (!strcmp(name, "user")) {
		struct passwd *pw;
		if (!seen_once(p, &p->global_seen, 2, name))
			return 0;
		if (!*v)
			return 1;
		pw = getpwnam(v);
		if (!pw)
			return fail(p, "user: no such user '%s'", v);
		strlcpy0(c->user, v, sizeof(c->user));
		c->uid = pw->pw_uid;
		c->gid = pw->pw_gid;
		c->has_user = true;
	} else if (!strcmp(name, "log_level")) {
		if (!seen_once(p, &p->global_seen, 4, name))
			return 0;
		if (log_parse_level(v, &c->log_level))
			return fail(p, "log_level: expected debug, info, warn or error");
	} else if (!strcmp(name, "shutdown_grace")) {
		if (!seen_once(p, &p->global_seen, 8, name))
			return 0;
		if (parse_duration(v, &c->shutdown_grace_ms))
			return fail(p, "shutdown_grace: expected a duration such as 30s");
	} else if (!strcmp(name, "max_connections")) {
		if (!seen_once(p, &p->global_seen, 16, name))
			return 0;
		if (parse_uint(v, 1, 1000000, &c->max_connections))
			return fail(p, "max_connections: expected 1..1000000");
	} else {
		return fail(p, "unknown key '%s' in [global]", name);
	}
	return 1;
}

static int tls_key(struct parse_ctx *p, const char *name, const char *v)
{
	struct config *c = p->cfg;

	if (!strcmp(name, "certificate")) {
		if (c->ncerts && !c->certs[c->ncerts - 1].key)
			return fail(p, "certificate: the previous certificate has no private_key");
		if (c->ncerts >= CONFIG_MAX_CERTS)
			return fail(p, "certificate: at most %d pairs", CONFIG_MAX_CERTS);
		if (!*v)
			return fail(p, "certificate: empty path");
		c->certs[c->ncerts].cert = strdup(v);
		c->certs[c->ncerts].cert_line = p->line;
		c->ncerts++;
	} else if (!strcmp(name, "private_key")) {
		struct cert_pair *cp = c->ncerts ? &c->certs[c->ncerts - 1] : NULL;
		if (!cp || cp->key)
			return fail(p, "private_key: must follow its certificate");
		if (!*v)
			return fail(p, "private_key: empty path");
		cp->key = strdup(v);
		cp->key_line = p->line;
	} else if (!strcmp(name, "min_version")) {
		if (!seen_once(p, &p->tls_seen, 1, name))
			return 0;
		if (!strcmp(v, "TLSv1.2"))
			c->min_version = TLS1_2_VERSION;
		else if (!strcmp(v, "TLSv1.3"))
			c->min_version = TLS1_3_VERSION;
		else
			return fail(p, "min_version: expected TLSv1.2 or TLSv1.3");
	} else if (!strcmp(name, "ciphers") || !strcmp(name, "ciphersuites") ||
		   !strcmp(name, "groups")) {
		char **dst = name[0] == 'g' ? &c->groups :
			     !strcmp(name, "ciphers") ? &c->ciphers : &c->ciphersuites;
		unsigned bit = name[0] == 'g' ? 2 : !strcmp(name, "ciphers") ? 4 : 8;
		if (!seen_once(p, &p->tls_seen, bit, name))
			return 0;
		if (!*v)
			return fail(p, "%s: empty list", name);
		free(*dst);
		*dst = strdup(v);
	} else if (!strcmp(name, "session_tickets")) {
		if (!seen_once(p, &p->tls_seen, 16, name))
			return 0;
		if (parse_bool(v, &c->session_tickets))
			return fail(p, "session_tickets: expected yes or no");
	} else {
		return fail(p, "unknown key '%s' in [tls]", name);
	}
	return 1;
}

static int offload_key(struct parse_ctx *p, const char *name, const char *v)
{
	if (!strcmp(name, "mode")) {
		if (!seen_once(p, &p->offload_seen, 1, name))
			return 0;
		if (!strcmp(v, "auto"))
			p->cfg->offload = OFFLOAD_REQ_AUTO;
		else if (!strcmp(v, "ktls"))
			p->cfg->offload = OFFLOAD_REQ_KTLS;
		else if (!strcmp(v, "userspace"))
			p->cfg->offload = OFFLOAD_REQ_USERSPACE;
		else if (!strcmp(v, "dpdk"))
			p->cfg->offload = OFFLOAD_REQ_DPDK;
		else
			return fail(p, "mode: expected auto, ktls, dpdk or userspace");
		return 1;
	}
	if (!strcmp(name, "dpdk_args")) {
		if (!seen_once(p, &p->offload_seen, 2, name))
			return 0;
		if (strlen(v) >= sizeof(p->cfg->dpdk_args))
			return fail(p, "dpdk_args: longer than %zu bytes",
				    sizeof(p->cfg->dpdk_args) - 1);
		if (!*v)
			return fail(p, "dpdk_args: empty (leave it out when DPDK is not used)");
		snprintf(p->cfg->dpdk_args, sizeof(p->cfg->dpdk_args), "%s", v);
		return 1;
	}
	return fail(p, "unknown key '%s' in [offload]", name);
}

static const char *const bpf_kinds[] = { "smtp", "imap", "pop3", "smtps", "imaps", "pop3s" };

static int bpf_key(struct parse_ctx *p, const char *name, const char *v)
{
	struct config *c = p->cfg;
	char buf[1024], *tok, *save = NULL;

	if (!strcmp(name, "enable")) {
		if (!seen_once(p, &p->bpf_seen, 1, name))
			return 0;
		if (!strcmp(v, "auto"))
			c->bpf_enable = BPF_AUTO;
		else if (!strcmp(v, "on"))
			c->bpf_enable = BPF_ON;
		else if (!strcmp(v, "off"))
			c->bpf_enable = BPF_OFF;
		else
			return fail(p, "enable: expected auto, on or off");
	} else if (!strcmp(name, "interfaces")) {
		if (!seen_once(p, &p->bpf_seen, 2, name))
			return 0;
		snprintf(buf, sizeof(buf), "%s", v);
		for (tok = strtok_r(buf, " ,\t", &save); tok; tok = strtok_r(NULL, " ,\t", &save)) {
			if (c->bpf_nifaces >= ARRAY_SIZE(c->bpf_ifaces))
				return fail(p, "interfaces: at most %zu", ARRAY_SIZE(c->bpf_ifaces));
			if (strlen(tok) >= 16)
				return fail(p, "interfaces: '%s' is not an interface name", tok);
			strlcpy0(c->bpf_ifaces[c->bpf_nifaces++], tok, sizeof(c->bpf_ifaces[0]));
		}
	} else if (!strcmp(name, "pin_path")) {
		if (!seen_once(p, &p->bpf_seen, 4, name))
			return 0;
		if (v[0] != '/' || strlen(v) >= sizeof(c->bpf_pin_path))
			return fail(p, "pin_path: expected an absolute path under a bpffs mount");
		strlcpy0(c->bpf_pin_path, v, sizeof(c->bpf_pin_path));
	} else if (!strcmp(name, "ports")) {
		if (!seen_once(p, &p->bpf_seen, 8, name))
			return 0;
		snprintf(buf, sizeof(buf), "%s", v);
		for (tok = strtok_r(buf, " ,\t", &save); tok; tok = strtok_r(NULL, " ,\t", &save)) {
			char *slash = strchr(tok, '/');
			unsigned port, k;
			if (!slash)
				return fail(p, "ports: expected PORT/KIND, got '%s'", tok);
			*slash = '\0';
			if (parse_uint(tok, 1, 65535, &port))
				return fail(p, "ports: bad port '%s'", tok);
			for (k = 0; k < ARRAY_SIZE(bpf_kinds) && strcmp(slash + 1, bpf_kinds[k]); k++)
				;
			if (k == ARRAY_SIZE(bpf_kinds))
				return fail(p, "ports: kind must be smtp, imap, pop3, smtps, imaps or pop3s, got '%s'",
					    slash + 1);
			if (c->bpf_nports >= ARRAY_SIZE(c->bpf_ports))
				return fail(p, "ports: at most %zu", ARRAY_SIZE(c->bpf_ports));
			c->bpf_ports[c->bpf_nports].port = port;
			strlcpy0(c->bpf_ports[c->bpf_nports].kind, bpf_kinds[k],
				 sizeof(c->bpf_ports[0].kind));
			c->bpf_nports++;
		}
	} else {
		return fail(p, "unknown key '%s' in [bpf]", name);
	}
	return 1;
}

static int metrics_key(struct parse_ctx *p, const char *name, const char *v)
{
	struct config *c = p->cfg;

	if (!strcmp(name, "listen")) {
		if (!seen_once(p, &p->metrics_seen, 1, name))
			return 0;
		if (config_parse_addr(v, &c->metrics_listen))
			return fail(p, "listen: expected IPV4:PORT or [IPV6]:PORT, got '%s'", v);
		config_format_addr((struct sockaddr *)&c->metrics_listen.ss, c->metrics_str,
				   sizeof(c->metrics_str));
		c->has_metrics = true;
		return 1;
	}
	return fail(p, "unknown key '%s' in [metrics]", name);
}

static int listener_key(struct parse_ctx *p, struct listener_conf *l, const char *name,
			const char *v)
{
	static const struct {
		const char *name;
		unsigned bit;
	} keys[] = {
		{ "listen", LK_LISTEN }, { "protocol", LK_PROTOCOL }, { "tls", LK_TLS },
		{ "require_tls", LK_REQUIRE_TLS }, { "backend", LK_BACKEND },
		{ "proxy_protocol", LK_PROXY }, { "hostname", LK_HOSTNAME },
		{ "max_line_length", LK_MAX_LINE }, { "max_pretls_commands", LK_MAX_CMDS },
		{ "handshake_timeout", LK_HS_TIMEOUT }, { "idle_timeout", LK_IDLE_TIMEOUT },
		{ "connect_timeout", LK_CONNECT_TIMEOUT },
	};
	unsigned bit = 0, i;

	for (i = 0; i < ARRAY_SIZE(keys); i++)
		if (!strcmp(name, keys[i].name))
			bit = keys[i].bit;
	if (!bit)
		return fail(p, "unknown key '%s' in [listener %s]", name, l->name);
	if (!seen_once(p, &l->seen, bit, name))
		return 0;

	switch (bit) {
	case LK_LISTEN:
	case LK_BACKEND: {
		struct sockaddr_any *a = bit == LK_LISTEN ? &l->listen : &l->backend;
		char *s = bit == LK_LISTEN ? l->listen_str : l->backend_str;
		if (config_parse_addr(v, a))
			return fail(p, "%s: expected IPV4:PORT or [IPV6]:PORT, got '%s'", name, v);
		config_format_addr((struct sockaddr *)&a->ss, s, sizeof(l->listen_str));
		break;
	}
	case LK_PROTOCOL:
		if (proto_parse_name(v, &l->protocol))
			return fail(p, "protocol: expected smtp, imap or pop3, got '%s'", v);
		break;
	case LK_TLS:
		if (!strcmp(v, "starttls"))
			l->tls = TLSM_STARTTLS;
		else if (!strcmp(v, "implicit"))
			l->tls = TLSM_IMPLICIT;
		else if (!strcmp(v, "none"))
			l->tls = TLSM_NONE;
		else
			return fail(p, "tls: expected starttls, implicit or none, got '%s'", v);
		break;
	case LK_REQUIRE_TLS:
		if (parse_bool(v, &l->require_tls))
			return fail(p, "require_tls: expected yes or no");
		break;
	case LK_PROXY:
		if (!strcmp(v, "off"))
			l->proxy = PROXY_OFF;
		else if (!strcmp(v, "v1"))
			l->proxy = PROXY_V1;
		else if (!strcmp(v, "v2"))
			l->proxy = PROXY_V2;
		else
			return fail(p, "proxy_protocol: expected off, v1 or v2");
		break;
	case LK_HOSTNAME:
		for (i = 0; v[i]; i++)
			if (!isalnum((unsigned char)v[i]) && !strchr(".-_[]:", v[i]))
				return fail(p, "hostname: invalid character in '%s'", v);
		if (i == 0 || i >= sizeof(l->hostname))
			return fail(p, "hostname: expected 1..%zu characters", sizeof(l->hostname) - 1);
		strlcpy0(l->hostname, v, sizeof(l->hostname));
		break;
	case LK_MAX_LINE:
		if (parse_uint(v, 64, 65536, &l->max_line))
			return fail(p, "max_line_length: expected 64..65536");
		break;
	case LK_MAX_CMDS:
		if (parse_uint(v, 1, 10000, &l->max_pretls_commands))
			return fail(p, "max_pretls_commands: expected 1..10000");
		break;
	case LK_HS_TIMEOUT:
	case LK_IDLE_TIMEOUT:
	case LK_CONNECT_TIMEOUT: {
		unsigned *dst = bit == LK_HS_TIMEOUT ? &l->handshake_timeout_ms :
				bit == LK_IDLE_TIMEOUT ? &l->idle_timeout_ms : &l->connect_timeout_ms;
		if (parse_duration(v, dst))
			return fail(p, "%s: expected a duration such as 30s", name);
		break;
	}
	}
	return 1;
}

static struct listener_conf *new_listener(struct parse_ctx *p, const char *name)
{
	struct config *c = p->cfg;
	struct listener_conf *l;
	unsigned i;

	if (!*name || strlen(name) >= CONFIG_NAME_MAX) {
		fail(p, "[listener NAME]: name must be 1..%d characters", CONFIG_NAME_MAX - 1);
		return NULL;
	}
	for (i = 0; name[i]; i++) {
		if (!isalnum((unsigned char)name[i]) && !strchr("-_.", name[i])) {
			fail(p, "[listener %s]: name may hold letters, digits, '-', '_', '.'", name);
			return NULL;
		}
	}
	for (i = 0; i < c->nlisteners; i++) {
		if (!strcmp(c->listeners[i].name, name)) {
			fail(p, "[listener %s] defined twice (first at line %d)", name,
			     c->listeners[i].line);
			return NULL;
		}
	}
	if (c->nlisteners >= CONFIG_MAX_LISTENERS) {
		fail(p, "at most %d listeners", CONFIG_MAX_LISTENERS);
		return NULL;
	}
	l = &c->listeners[c->nlisteners++];
	memset(l, 0, sizeof(*l));
	strlcpy0(l->name, name, sizeof(l->name));
	l->line = p->line;
	l->tls = TLSM_STARTTLS;
	l->slot = -1;
	return l;
}

static int handler(void *user, const char *section, const char *name, const char *value)
{
	struct parse_ctx *p = user;

	if (p->failed)
		return 0;
	/* A new section: libinih only tells us through the first key in it. */
	if (strcmp(section, p->cur_section) != 0) {
		strlcpy0(p->cur_section, section, sizeof(p->cur_section));
		p->cur_listener = NULL;
		if (!strncmp(section, "listener", 8) && (section[8] == ' ' || section[8] == '\0')) {
			const char *n = section + 8;
			while (*n == ' ')
				n++;
			p->cur_listener = new_listener(p, n);
			if (!p->cur_listener)
				return 0;
		}
	}
	if (!strcmp(section, "global"))
		return global_key(p, name, value);
	if (!strcmp(section, "tls"))
		return tls_key(p, name, value);
	if (!strcmp(section, "offload"))
		return offload_key(p, name, value);
	if (!strcmp(section, "metrics"))
		return metrics_key(p, name, value);
	if (!strcmp(section, "bpf"))
		return bpf_key(p, name, value);
	if (p->cur_listener)
		return listener_key(p, p->cur_listener, name, value);
	if (!*section)
		return fail(p, "key '%s' outside any section", name);
	return fail(p, "unknown section [%s]", section);
}

/*
 * Second pass over the raw file: section headers without keys never reach
 * the handler, and the line of each [listener] header is wanted for errors.
 */
static int scan_sections(struct parse_ctx *p)
{
	char line[CONFIG_LINE_MAX];
	int lineno = 0;

	rewind(p->fp);
	while (fgets(line, sizeof(line), p->fp)) {
		char *s = line, *e;
		lineno++;
		while (*s == ' ' || *s == '\t')
			s++;
		if (*s != '[')
			continue;
		e = strchr(s, ']');
		if (!e)
			continue; /* libinih already reported it */
		*e = '\0';
		s++;
		if (!strcmp(s, "global") || !strcmp(s, "tls") || !strcmp(s, "offload") ||
		    !strcmp(s, "metrics") || !strcmp(s, "bpf")) {
			if (!strcmp(s, "tls") && !p->cfg->tls_line)
				p->cfg->tls_line = lineno;
			if (!strcmp(s, "bpf") && !p->cfg->bpf_line)
				p->cfg->bpf_line = lineno;
			if (!strcmp(s, "offload") && !p->cfg->offload_line)
				p->cfg->offload_line = lineno;
			continue;
		}
		if (!strncmp(s, "listener", 8) && (s[8] == ' ' || s[8] == '\0')) {
			char *n = s + 8;
			unsigned i;
			bool found = false;
			while (*n == ' ')
				n++;
			for (i = 0; i < p->cfg->nlisteners; i++) {
				if (!strcmp(p->cfg->listeners[i].name, n)) {
					if (!found)
						p->cfg->listeners[i].line = lineno;
					found = true;
				}
			}
			if (!found) {
				p->line = lineno;
				return fail(p, "[listener %s] has no keys", n), -1;
			}
			continue;
		}
		p->line = lineno;
		return fail(p, "unknown section [%s]", s), -1;
	}
	return 0;
}

static int finish_listener(struct parse_ctx *p, struct listener_conf *l)
{
	const char *miss = !(l->seen & LK_LISTEN) ? "listen" :
			   !(l->seen & LK_PROTOCOL) ? "protocol" :
			   !(l->seen & LK_BACKEND) ? "backend" : NULL;

	p->line = l->line;
	if (miss)
		return fail(p, "[listener %s]: missing required key '%s'", l->name, miss), -1;
	if (l->tls == TLSM_NONE && l->require_tls)
		return fail(p, "[listener %s]: require_tls = yes needs tls = starttls", l->name), -1;
	if (l->tls == TLSM_IMPLICIT && l->require_tls)
		l->require_tls = false; /* implicit TLS is TLS from the first byte */
	if (l->tls != TLSM_NONE && p->cfg->ncerts == 0)
		return fail(p, "[listener %s]: tls = %s needs a certificate in [tls]", l->name,
			    tls_mode_name(l->tls)), -1;
	if (!(l->seen & LK_HOSTNAME)) {
		if (gethostname(l->hostname, sizeof(l->hostname)) != 0 || !l->hostname[0])
			strlcpy0(l->hostname, "localhost", sizeof(l->hostname));
		l->hostname[sizeof(l->hostname) - 1] = '\0';
	}
	if (!(l->seen & LK_MAX_LINE))
		l->max_line = proto_default_max_line(l->protocol);
	if (!(l->seen & LK_MAX_CMDS))
		l->max_pretls_commands = 20;
	if (!(l->seen & LK_HS_TIMEOUT))
		l->handshake_timeout_ms = 10000;
	if (!(l->seen & LK_IDLE_TIMEOUT))
		/* RFC 5321 §4.5.3.2.7 (5 min), RFC 9051 §5.4 (30 min), RFC 1939 §3 (10 min) */
		l->idle_timeout_ms = l->protocol == PROTO_SMTP ? 300000 :
				     l->protocol == PROTO_IMAP ? 1800000 : 600000;
	if (!(l->seen & LK_CONNECT_TIMEOUT))
		l->connect_timeout_ms = 10000;
	return 0;
}

static bool same_addr(const struct sockaddr_any *a, const struct sockaddr_any *b)
{
	return a->len == b->len && memcmp(&a->ss, &b->ss, a->len) == 0;
}

int config_load(const char *path, struct config **out, char *err, size_t errlen)
{
	struct parse_ctx p = { 0 };
	struct config *c;
	unsigned i, j;
	long n;
	int rc;

	*out = NULL;
	c = calloc(1, sizeof(*c));
	if (!c) {
		snprintf(err, errlen, "%s: out of memory", path);
		return -1;
	}
	c->path = strdup(path);
	n = sysconf(_SC_NPROCESSORS_ONLN);
	c->workers = n > 0 ? (unsigned)MIN(n, CONFIG_MAX_WORKERS) : 1;
	c->log_level = LOG_INFO;
	c->shutdown_grace_ms = 30000;
	c->max_connections = 4096;
	c->min_version = TLS1_2_VERSION;
	c->session_tickets = true;
	c->offload = OFFLOAD_REQ_AUTO;
	c->bpf_enable = BPF_AUTO;
	strlcpy0(c->bpf_pin_path, "/sys/fs/bpf/mailgw", sizeof(c->bpf_pin_path));

	p.cfg = c;
	p.fp = fopen(path, "r");
	if (!p.fp) {
		snprintf(err, errlen, "%s:0: cannot open: %s", path, strerror(errno));
		config_free(c);
		return -1;
	}
	ini_allow_multiline = false;
	rc = ini_parse_stream(reader, &p, handler, &p);
	if (rc != 0 && !p.failed) {
		p.failed = true;
		p.err_line = rc > 0 ? rc : p.line;
		snprintf(p.err, sizeof(p.err), "syntax error");
	}
	if (!p.failed)
		scan_sections(&p);
	fclose(p.fp);

	if (!p.failed && c->ncerts && !c->certs[c->ncerts - 1].key) {
		p.line = c->certs[c->ncerts - 1].cert_line;
		fail(&p, "certificate: missing its private_key");
	}
	if (!p.failed && c->bpf_enable == BPF_ON && c->bpf_nifaces == 0) {
		p.line = c->bpf_line;
		fail(&p, "[bpf] enable = on needs interfaces");
	}
	if (!p.failed && c->offload == OFFLOAD_REQ_DPDK && !c->dpdk_args[0]) {
		p.line = c->offload_line;
		fail(&p, "[offload] mode = dpdk needs dpdk_args (EAL arguments naming a crypto "
			 "device, e.g. --no-huge --no-pci --no-shconf --vdev crypto_aesni_gcm0)");
	}
	/* Monitor mode: no listener, the eBPF classifier only. */
	if (!p.failed && c->nlisteners == 0 && !(c->bpf_enable != BPF_OFF && c->bpf_nifaces)) {
		p.line = 0;
		fail(&p, "no [listener NAME] section (and no [bpf] interfaces for monitor mode)");
	}
	for (i = 0; !p.failed && i < c->nlisteners; i++) {
		if (finish_listener(&p, &c->listeners[i]))
			break;
		for (j = 0; j < i; j++) {
			if (same_addr(&c->listeners[i].listen, &c->listeners[j].listen)) {
				p.line = c->listeners[i].line;
				fail(&p, "[listener %s]: listen %s already used by [listener %s]",
				     c->listeners[i].name, c->listeners[i].listen_str,
				     c->listeners[j].name);
				break;
			}
		}
	}
	if (!p.failed && c->nlisteners == 0)
		c->workers = 0; /* monitor mode: nothing to accept */
	if (p.failed) {
		snprintf(err, errlen, "%s:%d: %s", path, p.err_line, p.err);
		config_free(c);
		return -1;
	}
	*out = c;
	return 0;
}

void config_free(struct config *c)
{
	unsigned i;

	if (!c)
		return;
	for (i = 0; i < c->ncerts; i++) {
		free(c->certs[i].cert);
		free(c->certs[i].key);
	}
	free(c->ciphers);
	free(c->ciphersuites);
	free(c->groups);
	free(c->path);
	free(c);
}
