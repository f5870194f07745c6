/*
 * buf.c - fixed-capacity byte buffers and the line splitter.
 */
#include "buf.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

uint8_t buf_none[1];

int buf_init(struct buf *b, size_t cap)
{
	b->data = NULL;
	b->cap = cap;
	b->rpos = b->wpos = 0;
	return 0;
}

int buf_reserve(struct buf *b)
{
	if (!b->data) {
		b->data = malloc(b->cap);
		if (!b->data)
			return -ENOMEM;
	}
	return 0;
}

void buf_release(struct buf *b)
{
	if (b->data && b->rpos == b->wpos) {
		free(b->data);
		b->data = NULL;
		b->rpos = b->wpos = 0;
	}
}

void buf_free(struct buf *b)
{
	free(b->data);
	b->data = NULL;
	b->cap = b->rpos = b->wpos = 0;
}

void buf_compact(struct buf *b)
{
	if (b->rpos == 0 || !b->data)
		return;
	if (b->rpos != b->wpos)
		memmove(b->data, b->data + b->rpos, b->wpos - b->rpos);
	b->wpos -= b->rpos;
	b->rpos = 0;
}

void buf_consume(struct buf *b, size_t n)
{
	b->rpos += n;
	if (b->rpos >= b->wpos)
		b->rpos = b->wpos = 0;
}

void buf_produce(struct buf *b, size_t n)
{
	b->wpos += n;
}

void buf_reset(struct buf *b)
{
	b->rpos = b->wpos = 0;
}

int buf_append(struct buf *b, const void *p, size_t n)
{
	if (n == 0)
		return 0;
	if (buf_reserve(b) < 0)
		return -ENOMEM;
	if (buf_room(b) < n)
		buf_compact(b);
	if (buf_room(b) < n)
		return -ENOSPC;
	memcpy(b->data + b->wpos, p, n);
	b->wpos += n;
	return 0;
}

enum line_status line_next(const uint8_t *p, size_t n, size_t maxlen,
			   const char **line, size_t *len, size_t *adv)
{
	size_t lim = n < maxlen ? n : maxlen;
	const uint8_t *nl;
	size_t l;

	if (lim == 0)
		return n >= maxlen ? LINE_TOO_LONG : LINE_PARTIAL;
	nl = memchr(p, '\n', lim);

	if (!nl)
		return n >= maxlen ? LINE_TOO_LONG : LINE_PARTIAL;
	l = (size_t)(nl - p);
	*adv = l + 1;
	if (l > 0 && p[l - 1] == '\r')
		l--;
	*line = (const char *)p;
	*len = l;
	return LINE_OK;
}
