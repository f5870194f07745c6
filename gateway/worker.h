/*
 * worker.h - one event loop per worker process: epoll, edge-triggered,
 * non-blocking sockets, its own SO_REUSEPORT listening socket per listener.
 * No thread per connection; a worker serves up to max_connections sessions.
 */
#ifndef MAILGW_WORKER_H
#define MAILGW_WORKER_H

#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "proto.h"

struct tls_ctx;
struct session;

enum ev_type { EV_LISTEN, EV_CLIENT, EV_BACKEND, EV_SIGNAL };

/* What epoll_event.data.ptr points at. */
struct ev {
	enum ev_type type;
	void *owner;
};

struct listener_rt {
	struct ev ev;
	int fd;
	const struct listener_conf *conf;
	struct proto_conf pc;
};

struct worker {
	unsigned idx;
	int epfd;
	int sigfd;
	struct ev sigev;
	const struct config *cfg;
	struct tls_ctx *tls;
	struct listener_rt lst[CONFIG_MAX_LISTENERS];
	unsigned nlst;
	struct session *sessions; /* all open sessions */
	struct session *ready;    /* sessions with work left after their turn */
	struct session *dead;     /* closed this turn, freed at its end */
	unsigned nsessions;
	bool stopping;
	bool engine_busy;         /* the record engine has work queued or in flight */
	uint64_t stop_deadline;
};

/*
 * Run a worker until it is told to stop (SIGTERM) and its sessions are done
 * or the grace period is over. fds[i] is this worker's socket for listener i.
 * Never returns; exits the process.
 */
void worker_main(unsigned idx, const struct config *cfg, struct tls_ctx *tls, const int *fds)
	__attribute__((noreturn));

/* Queue a session to run again on the next loop turn. */
void worker_schedule(struct worker *w, struct session *s);

#endif
