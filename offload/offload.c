/*
 * offload.c - choosing the record-crypto engine for a connection.
 *
 * The order below is the whole fallback policy: an engine that declines (or
 * is not available on this host) passes the connection to the next one, and
 * userspace OpenSSL, last, never declines.
 */
#include "offload.h"

#include <errno.h>
#include <string.h>

static const struct offload_ops *const chain[] = {
	/* NIC inline crypto and kernel TLS: see the kernel TLS engine (later). */
	&offload_userspace,
};

const char *offload_request_name(enum offload_request req)
{
	return req == OFFLOAD_REQ_USERSPACE ? "userspace" : "auto";
}

int offload_attach(enum offload_request req, struct offload_conn *c)
{
	size_t i;
	int rc = -ENOTSUP;

	for (i = 0; i < sizeof(chain) / sizeof(chain[0]); i++) {
		const struct offload_ops *ops = chain[i];

		if (req == OFFLOAD_REQ_USERSPACE && ops != &offload_userspace)
			continue;
		if (ops->available && !ops->available())
			continue;
		rc = ops->attach(c);
		if (rc == 0) {
			c->ops = ops;
			return 0;
		}
	}
	return rc;
}

void offload_detach(struct offload_conn *c)
{
	if (c->ops && c->ops->detach)
		c->ops->detach(c);
	c->ops = NULL;
}
