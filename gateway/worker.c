/*
 * worker.c - the event loop of one worker process.
 *
 * Listening sockets are level-triggered (bounded accept batches stay fair);
 * session sockets are edge-triggered (see session.c). Timeouts are checked
 * by a scan of the worker's sessions every TICK_MS: at a few thousand
 * sessions per worker that costs microseconds and needs no timer structure.
 */
#define _GNU_SOURCE
#include "worker.h"

#include <errno.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../offload/offload.h"
#include "log.h"
#include "session.h"
#include "stats.h"
#include "util.h"

#define TICK_MS 100
#define ACCEPT_BATCH 64
#define MAX_EVENTS 256

static void drop_privileges(const struct config *cfg)
{
	if (!cfg->has_user || geteuid() != 0)
		return;
	if (setgroups(0, NULL) != 0 || initgroups(cfg->user, cfg->gid) != 0 ||
	    setgid(cfg->gid) != 0 || setuid(cfg->uid) != 0) {
		log_error("cannot drop privileges to %s: %s", cfg->user, strerror(errno));
		_exit(1);
	}
	/* Make sure there is no way back (a broken setuid would leave root). */
	if (setuid(0) == 0) {
		log_error("privileges could be regained after dropping to %s", cfg->user);
		_exit(1);
	}
	prctl(PR_SET_DUMPABLE, 0);
}

void worker_schedule(struct worker *w, struct session *s)
{
	if (session_is_ready(s))
		return;
	session_set_ready(s, true);
	*session_next_ready(s) = w->ready;
	w->ready = s;
}

static void pause_listeners(struct worker *w, bool pause)
{
	unsigned i;

	for (i = 0; i < w->nlst; i++) {
		struct epoll_event ee = { .events = EPOLLIN, .data.ptr = &w->lst[i].ev };
		if (w->lst[i].fd < 0)
			continue;
		epoll_ctl(w->epfd, pause ? EPOLL_CTL_DEL : EPOLL_CTL_ADD, w->lst[i].fd, &ee);
	}
}

static void reject_overload(struct worker *w, struct listener_rt *l, int fd)
{
	static uint64_t last_log;
	uint64_t now = now_ms();

	stats_inc(STAT_connections_rejected);
	stats_linc(l->conf->slot, LS_limit_max_connections);
	if (now - last_log > 1000) {
		log_warn("[%s] at max_connections (%u): refusing new connections", l->conf->name,
			 w->cfg->max_connections);
		last_log = now;
	}
	if (l->conf->tls != TLSM_IMPLICIT) {
		struct proto_reply r;
		proto_error_reply(&l->pc, PE_OVERLOAD, &r);
		(void)!send(fd, r.text, r.len, MSG_NOSIGNAL | MSG_DONTWAIT);
	}
	close(fd);
}

/* Returns true when accepting should pause (out of descriptors). */
static bool do_accept(struct worker *w, struct listener_rt *l)
{
	int i;

	for (i = 0; i < ACCEPT_BATCH && !w->stopping; i++) {
		int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		int rc;

		if (fd < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ||
			    errno == ECONNABORTED)
				return false;
			log_error("[%s] accept: %s", l->conf->name, strerror(errno));
			return errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
			       errno == ENOMEM;
		}
		if (w->nsessions >= w->cfg->max_connections) {
			reject_overload(w, l, fd);
			continue;
		}
		rc = session_start(w, l, fd);
		if (rc < 0) {
			log_error("[%s] cannot start session: %s", l->conf->name, strerror(-rc));
			close(fd);
		}
	}
	return false;
}

/*
 * Stop accepting. With a grace period (SIGTERM) sessions have until the
 * deadline; without one (SIGUSR2: replaced by a new generation on reload)
 * they run to their natural end, bounded by their own timeouts.
 */
static void begin_stop(struct worker *w, bool graceful_deadline)
{
	unsigned i;

	if (graceful_deadline && !w->stop_deadline) {
		w->stop_deadline = now_ms() + w->cfg->shutdown_grace_ms;
		log_info("stopping: %u sessions to finish within %u ms", w->nsessions,
			 w->cfg->shutdown_grace_ms);
	} else if (!w->stopping) {
		log_info("retiring after reload: %u sessions continue on the old configuration",
			 w->nsessions);
	}
	if (w->stopping)
		return;
	w->stopping = true;
	for (i = 0; i < w->nlst; i++) {
		if (w->lst[i].fd >= 0) {
			close(w->lst[i].fd); /* no new connections from here on */
			w->lst[i].fd = -1;
		}
	}
}

static void run_ready(struct worker *w)
{
	struct session *list = w->ready, *s;

	w->ready = NULL;
	while ((s = list) != NULL) {
		list = *session_next_ready(s);
		session_set_ready(s, false);
		session_run(s);
	}
}

void worker_main(unsigned idx, const struct config *cfg, struct tls_ctx *tls, const int *fds)
{
	struct epoll_event evs[MAX_EVENTS];
	struct worker w = { 0 };
	uint64_t last_tick = 0, pause_until = 0;
	char tag[16];
	sigset_t ss;
	unsigned i;

	snprintf(tag, sizeof(tag), "w%u", idx);
	log_set_proc(tag);
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	if (getppid() == 1)
		_exit(0); /* the master died before we got here */

	w.idx = idx;
	w.cfg = cfg;
	w.tls = tls;
	w.epfd = epoll_create1(EPOLL_CLOEXEC);
	sigemptyset(&ss);
	sigaddset(&ss, SIGTERM);
	sigaddset(&ss, SIGINT);
	sigaddset(&ss, SIGUSR2);
	w.sigfd = signalfd(-1, &ss, SFD_NONBLOCK | SFD_CLOEXEC);
	if (w.epfd < 0 || w.sigfd < 0) {
		log_error("worker setup: %s", strerror(errno));
		_exit(1);
	}
	/* The master's blocked set is inherited; keep SIGTERM/SIGINT for signalfd. */
	sigaddset(&ss, SIGHUP);
	sigaddset(&ss, SIGUSR1);
	sigaddset(&ss, SIGCHLD);
	sigprocmask(SIG_BLOCK, &ss, NULL);
	w.sigev.type = EV_SIGNAL;
	{
		struct epoll_event ee = { .events = EPOLLIN, .data.ptr = &w.sigev };
		epoll_ctl(w.epfd, EPOLL_CTL_ADD, w.sigfd, &ee);
	}

	w.nlst = cfg->nlisteners;
	for (i = 0; i < w.nlst; i++) {
		struct listener_rt *l = &w.lst[i];
		l->ev.type = EV_LISTEN;
		l->ev.owner = l;
		l->fd = fds[i];
		l->conf = &cfg->listeners[i];
		l->pc.kind = l->conf->protocol;
		l->pc.starttls = l->conf->tls == TLSM_STARTTLS;
		l->pc.require_tls = l->conf->require_tls;
		l->pc.hostname = l->conf->hostname;
		l->pc.max_commands = l->conf->max_pretls_commands;
	}
	drop_privileges(cfg);
	pause_listeners(&w, false);
	log_debug("worker %u ready", idx);

	for (;;) {
		int n, k, timeout = w.ready || w.engine_busy ? 0 : TICK_MS;
		uint64_t now;

		n = epoll_wait(w.epfd, evs, MAX_EVENTS, timeout);
		if (n < 0 && errno != EINTR) {
			log_error("epoll_wait: %s", strerror(errno));
			_exit(1);
		}
		for (k = 0; k < n; k++) {
			struct ev *e = evs[k].data.ptr;

			switch (e->type) {
			case EV_LISTEN:
				if (do_accept(&w, e->owner)) {
					pause_listeners(&w, true);
					pause_until = now_ms() + 100;
				}
				break;
			case EV_CLIENT:
			case EV_BACKEND:
				session_event(e->owner, e->type == EV_BACKEND, evs[k].events);
				break;
			case EV_SIGNAL: {
				struct signalfd_siginfo si;
				while (read(w.sigfd, &si, sizeof(si)) == sizeof(si))
					begin_stop(&w, si.ssi_signo != SIGUSR2);
				break;
			}
			}
		}
		/* Records queued by this turn's sessions go to the device in one burst. */
		offload_poll();
		run_ready(&w);
		session_reap(&w);
		w.engine_busy = offload_busy();

		now = now_ms();
		if (pause_until && now >= pause_until && !w.stopping) {
			pause_until = 0;
			pause_listeners(&w, false);
		}
		if (now - last_tick >= TICK_MS) {
			struct session *s, *next;

			last_tick = now;
			for (s = w.sessions; s; s = next) {
				next = session_next(s);
				session_check_timeout(s, now);
			}
		}
		if (w.stopping) {
			if (w.stop_deadline && now >= w.stop_deadline) {
				struct session *s, *next;
				for (s = w.sessions; s; s = next) {
					next = session_next(s);
					session_shutdown(s);
				}
			}
			session_reap(&w);
			if (w.nsessions == 0) {
				log_debug("worker %u done", idx);
				bool drained = offload_drain();
				/* exit(), not _exit(): the sanitizer build checks for leaks here. */
				close(w.epfd);
				close(w.sigfd);
				exit(drained ? 0 : 3);
			}
		}
	}
}
