/*
 * metrics.h - the Prometheus endpoint (GET /metrics, GET /healthz), served
 * by libmicrohttpd from the master process, which never carries mail: a slow
 * or hostile scraper cannot delay a worker. Values are the shared counters
 * of stats.h, summed over workers when a scrape comes in.
 */
#ifndef MAILGW_METRICS_H
#define MAILGW_METRICS_H

#include <stdbool.h>
#include <stddef.h>

#include "config.h"

/* Start serving on addr; returns 0 or -1 with err set. */
int metrics_start(const struct sockaddr_any *addr, char *err, size_t errlen);
void metrics_stop(void);
bool metrics_running(void);
/* Descriptor to poll for readability (libmicrohttpd's epoll set), or -1. */
int metrics_fd(void);
/* Serve whatever is ready; never blocks. */
void metrics_run(void);
/* /healthz answers 503 once draining. */
void metrics_set_draining(bool draining);
/* In a freshly forked worker: drop the endpoint's descriptors. */
void metrics_forget_in_child(void);

/* The exposition text; caller frees. Exposed for tests. */
char *metrics_render(size_t *len);

#endif
