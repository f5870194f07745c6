/*
 * stats.c - shared per-worker counter rows.
 */
#include "stats.h"

#include <errno.h>
#include <stdio.h>
#include <sys/mman.h>

static struct stats_row *rows;
static struct stats_row *mine;
static struct stats_row fallback; /* before stats_init (unit tests, -t) */

static const char *const names[STAT_COUNT] = {
#define STATS_NAME(name) #name,
	STATS_COUNTERS(STATS_NAME)
#undef STATS_NAME
};

int stats_init(void)
{
	void *p = mmap(NULL, sizeof(struct stats_row) * STATS_MAX_WORKERS,
		       PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return -errno;
	rows = p;
	mine = &rows[0];
	return 0;
}

void stats_select_row(unsigned idx)
{
	if (rows && idx < STATS_MAX_WORKERS)
		mine = &rows[idx];
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
