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
	/* NIC inline crypto (TLS_HW) and kernel software TLS (TLS_SW): the
	 * kernel picks the device when the NIC offers it, else software. */
	&offload_ktls,
	/* DPDK cryptodev would go here. */
	&offload_userspace,
};

const char *offload_request_name(enum offload_request req)
{
	return req == OFFLOAD_REQ_USERSPACE ? "userspace" : req == OFFLOAD_REQ_KTLS ? "ktls" : "auto";
}

const char *offload_mode_name(enum offload_mode m)
{
	return m == OFFLOAD_MODE_KTLS_HW ? "ktls_hw" : m == OFFLOAD_MODE_KTLS_SW ? "ktls_sw" :
									     "userspace";
}

int offload_attach(enum offload_request req, struct offload_conn *c)
{
	size_t i;
	int rc = -ENOTSUP;

	c->tx_kernel = c->rx_kernel = c->modes_verified = false;
	c->tx_mode = c->rx_mode = OFFLOAD_MODE_USERSPACE;

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
