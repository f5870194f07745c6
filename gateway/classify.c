/*
 * classify.c - loads the eBPF mail-port classifier for the master.
 *
 * The port table is the standard seven plus every listener's port (with the
 * kind its protocol and TLS mode imply) plus [bpf] ports. The master keeps
 * the handle for the process's life (workers inherit it, to mark flows that
 * go to NIC TLS offload); a reload rebuilds it only when [bpf] or the
 * listener ports change, since rebuilding restarts the per-flow state.
 */
#include "classify.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#include "bpfmap.h"
#include "config.h"
#include "log.h"

static struct bpfmap *map;
static char pin[256];
static bool nic_offload;

void classify_set_nic_offload(bool on)
{
	nic_offload = on;
}

void classify_mark_session(const struct sockaddr *local, const struct sockaddr *peer)
{
	if (map && nic_offload && bpfmap_mark_offloaded(map, local, peer) < 0)
		log_debug("cannot mark a NIC-offloaded flow in the classifier");
}

static const char *listener_kind(const struct listener_conf *l)
{
	static const char *const kinds[PROTO_COUNT][2] = {
		[PROTO_SMTP] = { "smtp", "smtps" },
		[PROTO_IMAP] = { "imap", "imaps" },
		[PROTO_POP3] = { "pop3", "pop3s" },
	};
	return kinds[l->protocol][l->tls == TLSM_IMPLICIT];
}

static unsigned listen_port(const struct listener_conf *l)
{
	const struct sockaddr_in *a = (const void *)&l->listen.ss;
	const struct sockaddr_in6 *a6 = (const void *)&l->listen.ss;

	return ntohs(l->listen.ss.ss_family == AF_INET6 ? a6->sin6_port : a->sin_port);
}

int classify_start(const struct config *c, char *err, size_t errlen)
{
	struct bpfmap_port ports[CONFIG_MAX_LISTENERS + 64];
	const char *ifaces[8];
	struct bpfmap_opts o = { 0 };
	char why[256];
	size_t n = 0;
	unsigned i;
	int rc;

	if (c->bpf_enable == BPF_OFF)
		return 0;
	if (!c->bpf_nifaces) {
		log_info("eBPF classifier off: no [bpf] interfaces");
		return 0;
	}
	for (i = 0; i < c->nlisteners; i++)
		ports[n++] = (struct bpfmap_port){ listen_port(&c->listeners[i]),
						   listener_kind(&c->listeners[i]) };
	for (i = 0; i < c->bpf_nports; i++)
		ports[n++] = (struct bpfmap_port){ c->bpf_ports[i].port, c->bpf_ports[i].kind };
	for (i = 0; i < c->bpf_nifaces; i++)
		ifaces[i] = c->bpf_ifaces[i];
	o.pin_path = c->bpf_pin_path;
	o.ifaces = ifaces;
	o.n_ifaces = c->bpf_nifaces;
	o.ports = ports;
	o.n_ports = n;

	rc = bpfmap_open(&o, &map, why, sizeof(why));
	if (rc < 0) {
		map = NULL;
		if (c->bpf_enable == BPF_ON) {
			snprintf(err, errlen, "[bpf] cannot load the classifier: %s", why);
			return -1;
		}
		log_warn("eBPF classifier not loaded (enable = auto): %s", why);
		return 0;
	}
	snprintf(pin, sizeof(pin), "%s", c->bpf_pin_path);
	{
		unsigned in = 0, eg = 0;
		bpfmap_prog_ids(map, &in, &eg);
		log_info("eBPF classifier attached on %u interface(s), %zu extra ports, maps "
			 "pinned at %s (prog ids ingress %u, egress %u)",
			 c->bpf_nifaces, n, pin, in, eg);
	}
	return 0;
}

void classify_stop(void)
{
	if (map) {
		bpfmap_close(map);
		log_info("eBPF classifier detached");
	}
	map = NULL;
	pin[0] = '\0';
}

bool classify_running(void)
{
	return map != NULL;
}

bool classify_changed(const struct config *a, const struct config *b)
{
	unsigned i;

	if (a->bpf_enable != b->bpf_enable || a->bpf_nifaces != b->bpf_nifaces ||
	    a->bpf_nports != b->bpf_nports || strcmp(a->bpf_pin_path, b->bpf_pin_path) ||
	    a->nlisteners != b->nlisteners)
		return true;
	for (i = 0; i < a->bpf_nifaces; i++)
		if (strcmp(a->bpf_ifaces[i], b->bpf_ifaces[i]))
			return true;
	for (i = 0; i < a->bpf_nports; i++)
		if (a->bpf_ports[i].port != b->bpf_ports[i].port ||
		    strcmp(a->bpf_ports[i].kind, b->bpf_ports[i].kind))
			return true;
	for (i = 0; i < a->nlisteners; i++)
		if (listen_port(&a->listeners[i]) != listen_port(&b->listeners[i]) ||
		    strcmp(listener_kind(&a->listeners[i]), listener_kind(&b->listeners[i])))
			return true;
	return false;
}

const char *classify_pin_path(void)
{
	return map ? pin : NULL;
}

struct bpfmap *classify_map(void)
{
	return map;
}
