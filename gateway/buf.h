/*
 * buf.h - bounded byte buffers and the line splitter used for every
 * protocol dialogue the gateway itself speaks.
 *
 * A buffer never grows: its capacity is fixed when it is created, so a peer
 * can never make the gateway hold more than that. Lines are found in place
 * and handed out as (pointer, length) views; nothing is copied.
 *
 * Memory is taken when the first byte needs it (buf_reserve, buf_append)
 * and can be given back whenever the buffer is empty (buf_release): an idle
 * session holds no buffer memory at all.
 */
#ifndef MAILGW_BUF_H
#define MAILGW_BUF_H

#include <stddef.h>
#include <stdint.h>

struct buf {
	uint8_t *data;
	size_t cap;
	size_t rpos; /* first unread byte */
	size_t wpos; /* one past the last written byte */
};

/* Set the capacity; no memory is taken yet. Returns 0. */
int buf_init(struct buf *b, size_t cap);
void buf_free(struct buf *b);
/* Make sure the memory exists before writing through buf_wptr(): 0 or -ENOMEM. */
int buf_reserve(struct buf *b);
/* Give the memory back if the buffer is empty. */
void buf_release(struct buf *b);

static inline size_t buf_len(const struct buf *b) { return b->wpos - b->rpos; }
/* Where an empty buffer without memory points: valid for zero-length use. */
extern uint8_t buf_none[1];

static inline uint8_t *buf_rptr(const struct buf *b) { return b->data ? b->data + b->rpos : buf_none; }
static inline size_t buf_room(const struct buf *b) { return b->cap - b->wpos; }
static inline uint8_t *buf_wptr(const struct buf *b) { return b->data ? b->data + b->wpos : buf_none; }

/* Move unread bytes to the front so buf_room() is as large as possible. */
void buf_compact(struct buf *b);
void buf_consume(struct buf *b, size_t n);
void buf_produce(struct buf *b, size_t n);
void buf_reset(struct buf *b);
/* Append; returns 0, or -ENOSPC (nothing appended) when it does not fit. */
int buf_append(struct buf *b, const void *p, size_t n);

enum line_status {
	LINE_OK = 1,        /* line and len set (terminator excluded), adv = bytes to consume */
	LINE_PARTIAL = 0,   /* no terminator yet and still within the limit */
	LINE_TOO_LONG = -1, /* maxlen bytes seen without a terminator */
};

/*
 * Find the next line in [p, p+n). A line ends with CRLF or a bare LF (many
 * hand-typed sessions send LF only); the terminator is not part of *len.
 * maxlen bounds the line including its terminator, as RFC 5321 §4.5.3.1.4
 * counts it.
 */
enum line_status line_next(const uint8_t *p, size_t n, size_t maxlen,
			   const char **line, size_t *len, size_t *adv);

#endif
