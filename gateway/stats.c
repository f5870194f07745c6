/*
 * stats.c - shared per-worker counter rows.
 */
#include "stats.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

struct stats_shared {
	struct stats_row rows[STATS_MAX_WORKERS];
	char lname[STATS_MAX_LISTENERS][STATS_NAME_MAX];
	char lproto[STATS_MAX_LISTENERS][8];
	struct stats_lrow lrows[STATS_MAX_WORKERS][STATS_MAX_LISTENERS];
};

static struct stats_shared *shm;
static struct stats_row *rows;
static struct stats_row *mine;
static struct stats_lrow *my_lrows;
static struct stats_row fallback; /* before stats_init (unit tests, -t) */

const double stats_hs_bounds[STATS_HS_NBUCKETS] = {
#define STATS_BOUND(b) b,
	STATS_HS_BUCKETS(STATS_BOUND)
#undef STATS_BOUND
};

static const char *const names[STAT_COUNT] = {
#define STATS_NAME(name) #name,
	STATS_COUNTERS(STATS_NAME)
#undef STATS_NAME
};

int stats_init(void)
{
	/* Pages never written stay unbacked: unused workers and listeners cost nothing. */
	void *p = mmap(NULL, sizeof(struct stats_shared), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return -errno;
	shm = p;
	rows = shm->rows;
	mine = &rows[0];
	my_lrows = shm->lrows[0];
	return 0;
}

void stats_select_row(unsigned idx)
{
	if (rows && idx < STATS_MAX_WORKERS) {
		mine = &rows[idx];
		my_lrows = shm->lrows[idx];
	}
}

void stats_clear_gauges(unsigned idx)
{
	int l;

	if (!shm || idx >= STATS_MAX_WORKERS)
		return;
	__atomic_store_n(&shm->rows[idx].v[STAT_sessions_active], 0, __ATOMIC_RELAXED);
	for (l = 0; l < STATS_MAX_LISTENERS; l++)
		__atomic_store_n(&shm->lrows[idx][l].v[LS_active], 0, __ATOMIC_RELAXED);
}

int stats_listener_slot(const char *name, const char *protocol)
{
	int i, free_slot = -1;

	if (!shm)
		return -1;
	for (i = 0; i < STATS_MAX_LISTENERS; i++) {
		if (!strcmp(shm->lname[i], name)) {
			/* A reload may change a listener's protocol; the label follows. */
			snprintf(shm->lproto[i], sizeof(shm->lproto[0]), "%s", protocol);
			return i;
		}
		if (free_slot < 0 && !shm->lname[i][0])
			free_slot = i;
	}
	if (free_slot >= 0) {
		snprintf(shm->lproto[free_slot], sizeof(shm->lproto[0]), "%s", protocol);
		snprintf(shm->lname[free_slot], sizeof(shm->lname[0]), "%s", name);
	}
	return free_slot;
}

void stats_ladd(int slot, enum lstat_id id, int64_t delta)
{
	if (!my_lrows || slot < 0 || slot >= STATS_MAX_LISTENERS)
		return;
	__atomic_fetch_add(&my_lrows[slot].v[id], (uint64_t)delta, __ATOMIC_RELAXED);
}

void stats_handshake_time(int slot, uint64_t usec)
{
	double s = (double)usec / 1e6;
	int b;

	for (b = 0; b < STATS_HS_NBUCKETS && s > stats_hs_bounds[b]; b++)
		;
	/* Stored per bucket; the reader accumulates for Prometheus. */
	stats_linc(slot, b < STATS_HS_NBUCKETS ? (enum lstat_id)(LS_hs_bucket0 + b) : LS_hs_inf);
	stats_ladd(slot, LS_hs_sum_us, (int64_t)usec);
}

uint64_t stats_lsum(int slot, enum lstat_id id)
{
	uint64_t s = 0;
	int w;

	if (!shm || slot < 0 || slot >= STATS_MAX_LISTENERS)
		return 0;
	for (w = 0; w < STATS_MAX_WORKERS; w++)
		s += __atomic_load_n(&shm->lrows[w][slot].v[id], __ATOMIC_RELAXED);
	return s;
}

const char *stats_listener_name(int slot)
{
	return shm && slot >= 0 && slot < STATS_MAX_LISTENERS ? shm->lname[slot] : "";
}

const char *stats_listener_protocol(int slot)
{
	return shm && slot >= 0 && slot < STATS_MAX_LISTENERS ? shm->lproto[slot] : "";
}

void stats_add(enum stat_id id, int64_t delta)
{
	struct stats_row *r = mine ? mine : &fallback;

	__atomic_fetch_add(&r->v[id], (uint64_t)delta, __ATOMIC_RELAXED);
}

uint64_t stats_sum(enum stat_id id)
{
	uint64_t s = 0;
	unsigned i;

	if (!rows)
		return __atomic_load_n(&fallback.v[id], __ATOMIC_RELAXED);
	for (i = 0; i < STATS_MAX_WORKERS; i++)
		s += __atomic_load_n(&rows[i].v[id], __ATOMIC_RELAXED);
	return s;
}

const char *stats_name(enum stat_id id)
{
	return id < STAT_COUNT ? names[id] : "?";
}

void stats_format(char *out, size_t cap)
{
	size_t off = 0;
	int i;

	if (cap)
		out[0] = '\0';
	for (i = 0; i < STAT_COUNT && off < cap; i++) {
		int n = snprintf(out + off, cap - off, "%s%s=%llu", i ? " " : "",
				 names[i], (unsigned long long)stats_sum((enum stat_id)i));
		if (n < 0)
			break;
		off += (size_t)n;
	}
}
