/*
 * main.c - mailgw's master process.
 *
 * The master stays root (when started as root), owns the listening sockets
 * and the parsed configuration, and never touches a client byte. Workers are
 * forked from it with a finished config and TLS contexts in memory; they
 * drop to [global] user before serving anyone.
 *
 *   SIGHUP   load the config and certificates again; on success fork a new
 *            generation of workers on the same sockets and ask the old one to
 *            finish its sessions and exit. On failure keep running as before.
 *            (SIGUSR2 to the old workers: no deadline, sessions end naturally).
 *   SIGTERM  stop accepting, give sessions shutdown_grace, exit.
 *   SIGUSR1  log one `stats:` line with every counter.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <malloc.h>
#include <poll.h>
#include <sys/signalfd.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "classify.h"
#include "config.h"
#include "log.h"
#include "metrics.h"
#include "stats.h"
#include "tls.h"
#include "util.h"
#include "worker.h"

#define MAX_CHILDREN (2 * CONFIG_MAX_WORKERS)
#define LISTEN_BACKLOG 511

struct child {
	pid_t pid;
	unsigned idx;
	unsigned gen;
	uint64_t started;
	unsigned row; /* its counter row (stats.h) */
	int qp;       /* its DPDK queue pair, or -1 */
};

struct generation {
	struct config *cfg;
	struct tls_ctx *tls;
	int *socks; /* [listener * workers + worker] */
	unsigned gen;
};

static struct child children[MAX_CHILDREN];
static bool row_used[STATS_MAX_WORKERS];

/*
 * Each live worker process gets a counter row of its own, so that the
 * open-session gauges of a worker that dies can be cleared without touching
 * another's. Rows are reused; their counters only ever grow.
 */
static unsigned take_row(unsigned idx)
{
	unsigned r;

	for (r = 0; r < STATS_MAX_WORKERS; r++) {
		if (!row_used[r]) {
			row_used[r] = true;
			return r;
		}
	}
	return idx; /* all taken: share (gauges may then lag after a crash) */
}
static int master_sigfd = -1;
static uint64_t respawn_at[CONFIG_MAX_WORKERS];

static void usage(FILE *out)
{
	fprintf(out,
		"usage: mailgw [-t] -c FILE\n"
		"  -c FILE  configuration file (INI)\n"
		"  -t       check the configuration and certificates, then exit\n"
		"  -h       this help\n");
}

static int open_listener(const struct listener_conf *l, char *err, size_t errlen)
{
	int fd, one = 1;

	fd = socket(l->listen.ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	/* One socket per worker: the kernel spreads connections across them. */
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
		goto fail;
	if (l->listen.ss.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, (const struct sockaddr *)&l->listen.ss, l->listen.len) < 0)
		goto fail;
	if (listen(fd, LISTEN_BACKLOG) < 0)
		goto fail;
	return fd;
fail:
	snprintf(err, errlen, "[listener %s] cannot listen on %s: %s", l->name, l->listen_str,
		 strerror(errno));
	if (fd >= 0)
		close(fd);
	return -1;
}

static bool same_listen(const struct listener_conf *a, const struct listener_conf *b)
{
	return a->listen.len == b->listen.len &&
	       memcmp(&a->listen.ss, &b->listen.ss, a->listen.len) == 0;
}

/*
 * Sockets for generation g: reuse the old generation's socket for the same
 * address and worker slot (no connection is dropped across a reload), open
 * the rest. Old sockets that are not reused are closed by the caller.
 */
static int open_sockets(struct generation *g, struct generation *old, char *err, size_t errlen)
{
	const struct config *c = g->cfg;
	unsigned i, j, w, total = c->nlisteners * c->workers;
	int *from; /* old slot a socket was taken from, or -1 */

	g->socks = malloc(sizeof(int) * (total ? total : 1));
	from = malloc(sizeof(int) * (total ? total : 1));
	if (!g->socks || !from) {
		free(g->socks);
		free(from);
		g->socks = NULL;
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	for (i = 0; i < total; i++)
		g->socks[i] = from[i] = -1;
	for (i = 0; i < c->nlisteners; i++) {
		for (w = 0; w < c->workers; w++) {
			int *slot = &g->socks[i * c->workers + w];

			for (j = 0; old && j < old->cfg->nlisteners && *slot < 0; j++) {
				int *os;
				if (w >= old->cfg->workers ||
				    !same_listen(&c->listeners[i], &old->cfg->listeners[j]))
					continue;
				os = &old->socks[j * old->cfg->workers + w];
				if (*os >= 0) {
					*slot = *os;
					*os = -1;
					from[i * c->workers + w] = (int)(j * old->cfg->workers + w);
				}
			}
			if (*slot < 0 && (*slot = open_listener(&c->listeners[i], err, errlen)) < 0)
				goto fail;
		}
	}
	free(from);
	return 0;
fail:
	/* Give reused sockets back to the old generation, close new ones. */
	for (i = 0; i < total; i++) {
		if (g->socks[i] < 0)
			continue;
		if (from[i] >= 0)
			old->socks[from[i]] = g->socks[i];
		else
			close(g->socks[i]);
	}
	free(from);
	free(g->socks);
	g->socks = NULL;
	return -1;
}

static void close_sockets(struct generation *g)
{
	unsigned i, total;

	if (!g->socks)
		return;
	total = g->cfg->nlisteners * g->cfg->workers;
	for (i = 0; i < total; i++)
		if (g->socks[i] >= 0)
			close(g->socks[i]);
	free(g->socks);
	g->socks = NULL;
}

static pid_t spawn(struct generation *g, unsigned idx)
{
	unsigned row = take_row(idx);
	int qp = offload_dpdk_take_qp();
	pid_t pid = fork();
	unsigned i, w, n = g->cfg->nlisteners, nw = g->cfg->workers;
	int fds[CONFIG_MAX_LISTENERS];
	char err[160];

	if (pid < 0) {
		log_error("fork: %s", strerror(errno));
		row_used[row] = false;
		offload_dpdk_give_qp(qp, true);
		return -1;
	}
	if (pid > 0) {
		for (i = 0; i < MAX_CHILDREN; i++) {
			if (children[i].pid == 0) {
				children[i] = (struct child){ pid, idx, g->gen, now_ms(), row, qp };
				break;
			}
		}
		return pid;
	}
	stats_select_row(row);
	if (offload_worker_start(qp, err, sizeof(err)) < 0)
		log_error("DPDK crypto device for worker %u: %s: its sessions stay in userspace",
			  idx, err);
	/* Child: keep only this worker's sockets, none of the master's. */
	close(master_sigfd);
	metrics_forget_in_child();
	for (i = 0; i < n; i++) {
		for (w = 0; w < nw; w++) {
			int fd = g->socks[i * nw + w];
			if (w == idx)
				fds[i] = fd;
			else if (fd >= 0)
				close(fd);
		}
	}
	worker_main(idx, g->cfg, g->tls, fds);
}

static void signal_generation(unsigned gen, int sig)
{
	unsigned i;

	for (i = 0; i < MAX_CHILDREN; i++)
		if (children[i].pid > 0 && children[i].gen == gen)
			kill(children[i].pid, sig);
}

static unsigned count_children(void)
{
	unsigned i, n = 0;

	for (i = 0; i < MAX_CHILDREN; i++)
		n += children[i].pid > 0;
	return n;
}

static void raise_nofile(const struct config *c)
{
	struct rlimit rl;
	/* client + backend sockets, and two pipes each with kernel TLS */
	rlim_t want = (rlim_t)c->max_connections * 6 + 64;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
		return;
	if (rl.rlim_cur < want) {
		rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want ? want : rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	if (rl.rlim_cur < want)
		log_warn("open file limit %llu is below what max_connections = %u needs (%llu)",
			 (unsigned long long)rl.rlim_cur, c->max_connections,
			 (unsigned long long)want);
}

static int load(const char *path, struct generation *g, char *err, size_t errlen)
{
	memset(g, 0, sizeof(*g));
	if (config_load(path, &g->cfg, err, errlen) < 0)
		return -1;
	if (tls_build(g->cfg, &g->tls, err, errlen) < 0) {
		config_free(g->cfg);
		g->cfg = NULL;
		return -1;
	}
	return 0;
}

/* Per-listener counter slots are kept by name across reloads. */
static void assign_slots(struct config *c)
{
	unsigned i;

	for (i = 0; i < c->nlisteners; i++) {
		struct listener_conf *l = &c->listeners[i];
		l->slot = stats_listener_slot(l->name, proto_name(l->protocol));
		if (l->slot < 0)
			log_warn("[%s] no counter slot left (%d listener names seen): its "
				 "per-listener metrics are not kept", l->name, STATS_MAX_LISTENERS);
	}
}

static void free_generation(struct generation *g)
{
	close_sockets(g);
	tls_free(g->tls);
	config_free(g->cfg);
	memset(g, 0, sizeof(*g));
}

static unsigned nic_tls_capable;

static void nic_report(const char *ifname, const char *feature, bool available, bool active)
{
	if (!available)
		return;
	nic_tls_capable++;
	if (active && !strcmp(feature, "tls-hw-tx-offload"))
		classify_set_nic_offload(true);
	log_info("NIC %s: %s %s", ifname, feature, active ? "on" : "available but off");
}

static void log_stats(void)
{
	char line[1600];

	stats_format(line, sizeof(line));
	log_info("stats: %s", line);
}

/* Engine events into the counters of whichever process saw them. */
static void count_engine_event(enum offload_event ev, unsigned long n)
{
	static const enum stat_id map[OFFLOAD_EV_MAX] = {
		[OFFLOAD_EV_DPDK_RECORD_TX] = STAT_dpdk_records_tx,
		[OFFLOAD_EV_DPDK_RECORD_RX] = STAT_dpdk_records_rx,
		[OFFLOAD_EV_DPDK_BURST] = STAT_dpdk_bursts,
		[OFFLOAD_EV_DPDK_BAD_MAC] = STAT_dpdk_bad_mac,
		[OFFLOAD_EV_DPDK_DEVICE_ERR] = STAT_dpdk_device_error,
		[OFFLOAD_EV_DPDK_PEER_ALERT] = STAT_dpdk_peer_alert,
		[OFFLOAD_EV_DPDK_PROTOCOL] = STAT_dpdk_protocol_error,
		[OFFLOAD_EV_DPDK_KEYUPDATE] = STAT_dpdk_keyupdate,
	};

	if ((unsigned)ev < OFFLOAD_EV_MAX)
		stats_add(map[ev], (int64_t)n);
}

static void reload(const char *path, struct generation *cur, unsigned *next_gen)
{
	struct generation g;
	char err[512];
	unsigned w, old_gen = cur->gen;

	log_info("reloading %s", path);
	if (load(path, &g, err, sizeof(err)) < 0) {
		log_error("reload failed, keeping the running configuration: %s", err);
		return;
	}
	if (open_sockets(&g, cur, err, sizeof(err)) < 0) {
		log_error("reload failed, keeping the running configuration: %s", err);
		tls_free(g.tls);
		config_free(g.cfg);
		return;
	}
	g.gen = (*next_gen)++;
	if (strcmp(g.cfg->dpdk_args, cur->cfg->dpdk_args) ||
	    (g.cfg->offload == OFFLOAD_REQ_DPDK) != (cur->cfg->offload == OFFLOAD_REQ_DPDK))
		log_warn("[offload] DPDK settings changed: they take effect at the next restart "
			 "(the EAL starts once)");
	assign_slots(g.cfg);
	log_set_level(g.cfg->log_level);
	raise_nofile(g.cfg);
	if (classify_changed(cur->cfg, g.cfg)) {
		classify_stop();
		if (classify_start(g.cfg, err, sizeof(err)) < 0)
			log_error("%s", err);
	}
	if (g.cfg->has_metrics != cur->cfg->has_metrics ||
	    (g.cfg->has_metrics && strcmp(g.cfg->metrics_str, cur->cfg->metrics_str))) {
		metrics_stop();
		if (g.cfg->has_metrics) {
			if (metrics_start(&g.cfg->metrics_listen, err, sizeof(err)) < 0)
				log_error("[metrics] listen %s: %s", g.cfg->metrics_str, err);
			else
				log_info("metrics on http://%s/metrics", g.cfg->metrics_str);
		}
	}
	/* Old sockets nobody reuses: the old workers hold their own copies. */
	free_generation(cur);
	*cur = g;
	memset(respawn_at, 0, sizeof(respawn_at));
	for (w = 0; w < cur->cfg->workers; w++)
		spawn(cur, w);
	signal_generation(old_gen, SIGUSR2);
	log_info("reloaded: %u listeners, %u workers; previous workers finish their sessions",
		 cur->cfg->nlisteners, cur->cfg->workers);
}

static void reap(struct generation *cur, bool stopping)
{
	int status;
	pid_t pid;
	unsigned i;

	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (i = 0; i < MAX_CHILDREN; i++) {
			struct child *ch = &children[i];
			if (ch->pid != pid)
				continue;
			if (ch->gen == cur->gen && !stopping) {
				bool fast = now_ms() - ch->started < 1000;
				if (WIFSIGNALED(status))
					log_error("worker %u (pid %d) killed by signal %d", ch->idx,
						  pid, WTERMSIG(status));
				else
					log_error("worker %u (pid %d) exited with status %d", ch->idx,
						  pid, WEXITSTATUS(status));
				/* Restart it; back off if it dies right away. */
				respawn_at[ch->idx] = now_ms() + (fast ? 1000 : 0) + 1;
			} else {
				log_debug("worker %u (pid %d) of generation %u exited", ch->idx,
					  pid, ch->gen);
			}
			/* Sessions of a worker that died are gone with it. */
			stats_clear_gauges(ch->row);
			row_used[ch->row] = false;
			offload_dpdk_give_qp(ch->qp, WIFEXITED(status) && WEXITSTATUS(status) == 0);
			ch->pid = 0;
			break;
		}
	}
}

int main(int argc, char **argv)
{
	const char *path = NULL;
	struct generation cur;
	unsigned next_gen = 1, w;
	bool test_only = false, stopping = false;
	uint64_t stop_deadline = 0;
	char err[512];
	sigset_t ss;
	int opt;

	while ((opt = getopt(argc, argv, "c:th")) != -1) {
		switch (opt) {
		case 'c':
			path = optarg;
			break;
		case 't':
			test_only = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (!path || optind != argc) {
		usage(stderr);
		return 2;
	}
	/*
	 * Sessions take and give back 64 KiB buffers all the time; with glibc's
	 * default (128 KiB, moving) every give-back at the top of the heap
	 * would shrink it with brk() and the next take grow it again.
	 */
	mallopt(M_TRIM_THRESHOLD, 8 << 20);
	if (load(path, &cur, err, sizeof(err)) < 0) {
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	if (test_only) {
		printf("%s: configuration OK: %u listeners, %u certificate contexts, %u workers\n",
		       path, cur.cfg->nlisteners, tls_count(cur.tls), cur.cfg->workers);
		free_generation(&cur);
		return 0;
	}
	log_set_level(cur.cfg->log_level);

	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&ss);
	sigaddset(&ss, SIGTERM);
	sigaddset(&ss, SIGINT);
	sigaddset(&ss, SIGHUP);
	sigaddset(&ss, SIGUSR1);
	sigaddset(&ss, SIGCHLD);
	sigprocmask(SIG_BLOCK, &ss, NULL);
	{
		/* Blocked before fork so a worker never dies of an early SIGUSR2. */
		sigset_t u2;
		sigemptyset(&u2);
		sigaddset(&u2, SIGUSR2);
		sigprocmask(SIG_BLOCK, &u2, NULL);
	}

	if (stats_init() < 0) {
		fprintf(stderr, "cannot map counters: %s\n", strerror(errno));
		return 1;
	}
	assign_slots(cur.cfg);
	raise_nofile(cur.cfg);
	if (offload_init(cur.cfg->offload)) {
		log_info("kernel TLS available: record crypto moves to the kernel after handshakes");
		offload_nic_report(nic_report);
		if (!nic_tls_capable)
			log_info("no NIC offers TLS offload: kernel TLS runs in software (TLS_SW)");
	}
	else if (cur.cfg->offload == OFFLOAD_REQ_AUTO || cur.cfg->offload == OFFLOAD_REQ_KTLS)
		log_warn("kernel TLS not available (no tls module): record crypto stays in userspace");
	offload_set_counter(count_engine_event);
	if (cur.cfg->dpdk_args[0] &&
	    (cur.cfg->offload == OFFLOAD_REQ_DPDK || cur.cfg->offload == OFFLOAD_REQ_AUTO)) {
		if (offload_dpdk_init(cur.cfg->dpdk_args, cur.cfg->workers, err, sizeof(err)) < 0) {
			if (cur.cfg->offload == OFFLOAD_REQ_DPDK) {
				fprintf(stderr, "%s:%d: [offload] dpdk: %s\n", path,
					cur.cfg->offload_line, err);
				return 1;
			}
			log_warn("DPDK not started (%s): record crypto stays with kernel TLS or "
				 "userspace", err);
		} else {
			log_info("DPDK crypto device %s: records are encrypted and decrypted there "
				 "in bursts", offload_dpdk_describe());
		}
	}
	if (classify_start(cur.cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "%s:%d: %s\n", path, cur.cfg->bpf_line, err);
		return 1;
	}
	if (open_sockets(&cur, NULL, err, sizeof(err)) < 0) {
		fprintf(stderr, "%s: %s\n", path, err);
		return 1;
	}
	if (cur.cfg->nlisteners == 0)
		log_info("monitor mode: no listeners, the eBPF classifier only");
	cur.gen = next_gen++;
	for (unsigned i = 0; i < cur.cfg->nlisteners; i++) {
		const struct listener_conf *l = &cur.cfg->listeners[i];
		log_info("[%s] listening on %s: %s, tls=%s%s, backend %s%s", l->name, l->listen_str,
			 proto_name(l->protocol), tls_mode_name(l->tls),
			 l->require_tls ? " (required)" : "", l->backend_str,
			 l->proxy == PROXY_V1 ? " with PROXY v1" :
			 l->proxy == PROXY_V2 ? " with PROXY v2" : "");
	}
	if (cur.cfg->has_metrics) {
		if (metrics_start(&cur.cfg->metrics_listen, err, sizeof(err)) < 0) {
			fprintf(stderr, "%s: [metrics] listen %s: %s\n", path, cur.cfg->metrics_str, err);
			return 1;
		}
		log_info("metrics on http://%s/metrics", cur.cfg->metrics_str);
	}
	log_info("mailgw starting: %u workers, %u certificate contexts, %s", cur.cfg->workers,
		 tls_count(cur.tls), OpenSSL_version(OPENSSL_VERSION));
	for (w = 0; w < cur.cfg->workers; w++)
		if (spawn(&cur, w) < 0)
			return 1;

	master_sigfd = signalfd(-1, &ss, SFD_NONBLOCK | SFD_CLOEXEC);
	if (master_sigfd < 0) {
		fprintf(stderr, "signalfd: %s\n", strerror(errno));
		return 1;
	}
	for (;;) {
		struct pollfd pfd[2] = { { master_sigfd, POLLIN, 0 }, { metrics_fd(), POLLIN, 0 } };
		struct signalfd_siginfo si;
		int sig = -1;
		uint64_t now;

		/* Signals and scrapes; a 200 ms tick for respawns and deadlines. */
		if (poll(pfd, pfd[1].fd >= 0 ? 2 : 1, 200) > 0 && (pfd[1].revents & POLLIN))
			metrics_run();
		if (read(master_sigfd, &si, sizeof(si)) == sizeof(si))
			sig = (int)si.ssi_signo;
		now = now_ms();

		if (sig == SIGCHLD)
			reap(&cur, stopping);
		else if (sig == SIGHUP && !stopping)
			reload(path, &cur, &next_gen);
		else if (sig == SIGUSR1)
			log_stats();
		else if ((sig == SIGTERM || sig == SIGINT) && !stopping) {
			unsigned gen;
			stopping = true;
			stop_deadline = now + cur.cfg->shutdown_grace_ms + 2000;
			log_info("stopping: sessions have %u ms to finish",
				 cur.cfg->shutdown_grace_ms);
			close_sockets(&cur);
			metrics_set_draining(true);
			for (gen = 1; gen < next_gen; gen++)
				signal_generation(gen, SIGTERM);
		}
		if (sig < 0)
			reap(&cur, stopping); /* in case SIGCHLD coalesced */

		if (stopping) {
			if (count_children() == 0) {
				log_stats();
				log_info("stopped");
				metrics_stop();
				classify_stop();
				free_generation(&cur);
				return 0;
			}
			if (now >= stop_deadline) {
				unsigned gen;
				log_warn("workers still running after the grace period: killing them");
				for (gen = 1; gen < next_gen; gen++)
					signal_generation(gen, SIGKILL);
				stop_deadline = now + 1000;
			}
			continue;
		}
		for (w = 0; w < cur.cfg->workers; w++) {
			if (respawn_at[w] && now >= respawn_at[w]) {
				respawn_at[w] = 0;
				spawn(&cur, w);
			}
		}
	}
}
