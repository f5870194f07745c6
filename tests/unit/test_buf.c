/*
 * test_buf.c - unit tests for gateway/buf.c: the line splitter every
 * pre-TLS dialogue goes through, and the fixed-capacity buffers.
 *
 * Build and run from the repository root:
 *   mkdir -p build/tests
 *   gcc -std=gnu11 -Wall -Wextra -Werror -Igateway tests/unit/test_buf.c gateway/buf.c gateway/proto.c gateway/smtp.c gateway/imap.c gateway/pop3.c gateway/stats.c gateway/proxy.c -o build/tests/test_buf
 *   build/tests/test_buf
 * and the same with -fsanitize=address,undefined -fno-sanitize-recover=all
 * added to the gcc line.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "check.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))
#define SKIP ((size_t)-1)

static const char *status_name(enum line_status s)
{
	switch (s) {
	case LINE_OK:
		return "LINE_OK";
	case LINE_PARTIAL:
		return "LINE_PARTIAL";
	case LINE_TOO_LONG:
		return "LINE_TOO_LONG";
	}
	return "?";
}

/*
 * Input is `fill` bytes of 'x' followed by `in` (in_len bytes, or strlen(in)
 * when in_len is 0), so limit cases can be written without huge literals.
 */
struct input {
	size_t fill;
	const char *in;
	size_t in_len;
};

static uint8_t *make_input(const struct input *s, size_t *n)
{
	size_t tail = s->in_len ? s->in_len : strlen(s->in);
	uint8_t *p = malloc(s->fill + tail + 1); /* exact size: ASan sees overreads */

	if (!p)
		abort();
	memset(p, 'x', s->fill);
	memcpy(p + s->fill, s->in, tail);
	*n = s->fill + tail;
	return p;
}

/* --- line_next: one call ------------------------------------------------ */

struct line_case {
	const char *name;
	struct input input;
	size_t maxlen;
	enum line_status status;
	/* for LINE_OK: */
	size_t line_fill;  /* expected line is line_fill 'x' bytes then line */
	const char *line;
	size_t line_len;   /* of `line`; strlen when 0 */
	size_t adv;
};

static const struct line_case line_cases[] = {
	{ "CRLF line", { 0, "EHLO a.example\r\n", 0 }, 512, LINE_OK, 0, "EHLO a.example", 0, 16 },
	{ "bare LF line", { 0, "EHLO a.example\n", 0 }, 512, LINE_OK, 0, "EHLO a.example", 0, 15 },
	{ "first of two CRLF lines", { 0, "NOOP\r\nQUIT\r\n", 0 }, 512, LINE_OK, 0, "NOOP", 0, 6 },
	{ "first of LF then CRLF lines", { 0, "NOOP\nQUIT\r\n", 0 }, 512, LINE_OK, 0, "NOOP", 0, 5 },
	{ "empty CRLF line", { 0, "\r\n", 0 }, 512, LINE_OK, 0, "", 0, 2 },
	{ "empty LF line", { 0, "\n", 0 }, 512, LINE_OK, 0, "", 0, 1 },
	{ "empty line before a command", { 0, "\r\nNOOP\r\n", 0 }, 512, LINE_OK, 0, "", 0, 2 },
	{ "CR inside a line is kept", { 0, "A\rB\r\n", 0 }, 512, LINE_OK, 0, "A\rB", 0, 5 },
	{ "only one CR is stripped", { 0, "A\r\r\n", 0 }, 512, LINE_OK, 0, "A\r", 0, 4 },
	{ "NUL inside a line is kept", { 0, "A\0B\r\n", 5 }, 512, LINE_OK, 0, "A\0B", 3, 5 },
	{ "partial: no terminator", { 0, "EHLO", 0 }, 512, LINE_PARTIAL, 0, NULL, 0, 0 },
	{ "partial: CR without LF", { 0, "EHLO\r", 0 }, 512, LINE_PARTIAL, 0, NULL, 0, 0 },
	{ "partial: empty input", { 0, "", 0 }, 512, LINE_PARTIAL, 0, NULL, 0, 0 },
	/* maxlen counts the terminator (RFC 5321 §4.5.3.1.4). */
	{ "at limit: 6+CRLF in 8", { 0, "ABCDEF\r\n", 0 }, 8, LINE_OK, 0, "ABCDEF", 0, 8 },
	{ "at limit: 7+LF in 8", { 0, "ABCDEFG\n", 0 }, 8, LINE_OK, 0, "ABCDEFG", 0, 8 },
	{ "over limit: 7+CRLF in 8", { 0, "ABCDEFG\r\n", 0 }, 8, LINE_TOO_LONG, 0, NULL, 0, 0 },
	{ "over limit: 8+LF in 8", { 0, "ABCDEFGH\n", 0 }, 8, LINE_TOO_LONG, 0, NULL, 0, 0 },
	{ "over limit: 8 bytes, no terminator", { 0, "ABCDEFGH", 0 }, 8, LINE_TOO_LONG, 0, NULL, 0, 0 },
	{ "over limit: 7+CR fills 8", { 0, "ABCDEFG\r", 0 }, 8, LINE_TOO_LONG, 0, NULL, 0, 0 },
	{ "over limit: LF only after more data", { 0, "ABCDEFGHIJ\r\n", 0 }, 8, LINE_TOO_LONG, 0, NULL, 0, 0 },
	{ "below limit: 7 bytes partial in 8", { 0, "ABCDEFG", 0 }, 8, LINE_PARTIAL, 0, NULL, 0, 0 },
	{ "short line followed by a long one", { 0, "AB\r\nCDEFGHIJKLMNOP\r\n", 0 }, 8, LINE_OK, 0, "AB", 0, 4 },
	{ "maxlen 1: bare LF fits", { 0, "\n", 0 }, 1, LINE_OK, 0, "", 0, 1 },
	{ "maxlen 1: CRLF does not fit", { 0, "\r\n", 0 }, 1, LINE_TOO_LONG, 0, NULL, 0, 0 },
	{ "maxlen 2: CRLF fits", { 0, "\r\n", 0 }, 2, LINE_OK, 0, "", 0, 2 },
	/* The real limits: SMTP 512, POP3 255, IMAP 8192. */
	{ "SMTP 510+CRLF fits 512", { 510, "\r\n", 0 }, 512, LINE_OK, 510, "", 0, 512 },
	{ "SMTP 511+CRLF exceeds 512", { 511, "\r\n", 0 }, 512, LINE_TOO_LONG, 0, NULL, 0, 0 },
	{ "SMTP 511+LF fits 512", { 511, "\n", 0 }, 512, LINE_OK, 511, "", 0, 512 },
	{ "SMTP 511 partial in 512", { 511, "", 0 }, 512, LINE_PARTIAL, 0, NULL, 0, 0 },
	{ "SMTP 512 without terminator", { 512, "", 0 }, 512, LINE_TOO_LONG, 0, NULL, 0, 0 },
	{ "POP3 253+CRLF fits 255", { 253, "\r\n", 0 }, 255, LINE_OK, 253, "", 0, 255 },
	{ "POP3 254+CRLF exceeds 255", { 254, "\r\n", 0 }, 255, LINE_TOO_LONG, 0, NULL, 0, 0 },
	{ "IMAP 8190+CRLF fits 8192", { 8190, "\r\n", 0 }, 8192, LINE_OK, 8190, "", 0, 8192 },
	{ "IMAP 8191+CRLF exceeds 8192", { 8191, "\r\n", 0 }, 8192, LINE_TOO_LONG, 0, NULL, 0, 0 },
};

static void run_line_case(const struct line_case *c)
{
	struct tcase tc;
	size_t n, len = SKIP, adv = SKIP;
	const char *line = NULL;
	uint8_t *p;
	enum line_status st;

	tc_begin(&tc, "line_next: %s", c->name);
	p = make_input(&c->input, &n);
	st = line_next(p, n, c->maxlen, &line, &len, &adv);
	if (st != c->status) {
		tc_fail(&tc, "status: expected %s, got %s", status_name(c->status), status_name(st));
	} else if (st == LINE_OK) {
		size_t tail = c->line_len ? c->line_len : strlen(c->line);
		size_t elen = c->line_fill + tail;

		expect_true(&tc, "line does not point at the input start", line == (const char *)p);
		expect_long(&tc, "len", (long)elen, (long)len);
		expect_long(&tc, "adv", (long)c->adv, (long)adv);
		if (len == elen && line == (const char *)p) {
			size_t i;

			for (i = 0; i < c->line_fill; i++)
				if (line[i] != 'x')
					break;
			if (i != c->line_fill || memcmp(line + c->line_fill, c->line, tail) != 0)
				tc_fail(&tc, "line: expected %zu x + \"%s\", got \"%s\"", c->line_fill,
					esc(c->line, tail), esc(line, len));
		}
	}
	free(p);
	tc_end(&tc);
}

/* --- line_next: splitting a whole buffer, as the session loop does ------- */

struct split_case {
	const char *name;
	struct input input;
	size_t maxlen;
	const char *lines[6];      /* expected lines, NULL-terminated */
	enum line_status last;     /* status that stops the loop */
	size_t leftover;           /* unconsumed bytes when it stops */
};

static const struct split_case split_cases[] = {
	{ "mixed terminators then partial", { 0, "EHLO a\r\nNOOP\nQUIT\r\nPART", 0 }, 512,
	  { "EHLO a", "NOOP", "QUIT" }, LINE_PARTIAL, 4 },
	{ "empty lines only", { 0, "\r\n\r\n\n", 0 }, 512, { "", "", "" }, LINE_PARTIAL, 0 },
	{ "line then over-long line", { 0, "A\r\nBCDEFGHIJ\r\n", 0 }, 8, { "A" }, LINE_TOO_LONG, 11 },
	{ "lines exactly at limit in a row", { 0, "ABCDEF\r\nGHIJKL\r\nMNOPQRS\n", 0 }, 8,
	  { "ABCDEF", "GHIJKL", "MNOPQRS" }, LINE_PARTIAL, 0 },
	{ "STARTTLS with a pipelined command", { 0, "STARTTLS\r\nMAIL FROM:<a@b>\r\n", 0 }, 512,
	  { "STARTTLS", "MAIL FROM:<a@b>" }, LINE_PARTIAL, 0 },
	{ "trailing CR is held back", { 0, "NOOP\r\nQUIT\r", 0 }, 512, { "NOOP" }, LINE_PARTIAL, 5 },
};

static void run_split_case(const struct split_case *c)
{
	struct tcase tc;
	size_t n, off = 0, i = 0;
	uint8_t *p;
	enum line_status st;

	tc_begin(&tc, "line_next split: %s", c->name);
	p = make_input(&c->input, &n);
	for (;;) {
		const char *line;
		size_t len, adv;

		st = line_next(p + off, n - off, c->maxlen, &line, &len, &adv);
		if (st != LINE_OK)
			break;
		if (i >= N_ELEMS(c->lines) || !c->lines[i]) {
			tc_fail(&tc, "unexpected extra line \"%s\"", esc(line, len));
			break;
		}
		expect_bytes(&tc, "line", c->lines[i], line, len);
		if (adv == 0 || adv > n - off) {
			tc_fail(&tc, "adv %zu out of range (%zu bytes left)", adv, n - off);
			break;
		}
		off += adv;
		i++;
	}
	if (i < N_ELEMS(c->lines) && c->lines[i])
		tc_fail(&tc, "stopped with %s before expected line \"%s\"", status_name(st),
			escz(c->lines[i]));
	else if (st != c->last)
		tc_fail(&tc, "final status: expected %s, got %s", status_name(c->last),
			status_name(st));
	expect_long(&tc, "leftover bytes", (long)c->leftover, (long)(n - off));
	free(p);
	tc_end(&tc);
}

/* --- struct buf ---------------------------------------------------------- */

enum buf_opcode { OP_END, OP_APPEND, OP_CONSUME, OP_COMPACT, OP_PRODUCE, OP_RESET, OP_RELEASE };

struct buf_op {
	enum buf_opcode op;
	const char *data; /* OP_APPEND, OP_PRODUCE: bytes written */
	size_t n;         /* OP_CONSUME: count; OP_APPEND/OP_PRODUCE: strlen(data) when 0 */
	int ret;          /* OP_APPEND */
	size_t rpos, wpos; /* SKIP: not checked */
	const char *unread; /* expected buf_rptr()[0..buf_len()) */
};

struct buf_case {
	const char *name;
	size_t cap;
	struct buf_op ops[8];
};

static const struct buf_case buf_cases[] = {
	{ "append fits", 8, {
		{ OP_APPEND, "abc", 0, 0, 0, 3, "abc" },
	} },
	{ "append fills exactly", 8, {
		{ OP_APPEND, "abcdefgh", 0, 0, 0, 8, "abcdefgh" },
		{ OP_APPEND, "", 0, 0, 0, 8, "abcdefgh" },
	} },
	{ "append one byte too many into empty buffer", 8, {
		{ OP_APPEND, "abcdefghi", 0, -ENOSPC, 0, 0, "" },
	} },
	{ "append into full buffer", 8, {
		{ OP_APPEND, "abcdefgh", 0, 0, 0, 8, "abcdefgh" },
		{ OP_APPEND, "i", 0, -ENOSPC, 0, 8, "abcdefgh" },
	} },
	{ "append compacts consumed space", 8, {
		{ OP_APPEND, "abcdef", 0, 0, 0, 6, "abcdef" },
		{ OP_CONSUME, NULL, 4, 0, 4, 6, "ef" },
		{ OP_APPEND, "ghij", 0, 0, 0, 6, "efghij" },
	} },
	{ "append compacts to exactly full", 8, {
		{ OP_APPEND, "abcdef", 0, 0, 0, 6, "abcdef" },
		{ OP_CONSUME, NULL, 2, 0, 2, 6, "cdef" },
		{ OP_APPEND, "ghij", 0, 0, 0, 8, "cdefghij" },
	} },
	{ "append too big even after compaction leaves data intact", 8, {
		{ OP_APPEND, "abcdef", 0, 0, 0, 6, "abcdef" },
		{ OP_CONSUME, NULL, 2, 0, 2, 6, "cdef" },
		{ OP_APPEND, "ghijk", 0, -ENOSPC, SKIP, SKIP, "cdef" },
		{ OP_APPEND, "ghij", 0, 0, 0, 8, "cdefghij" },
	} },
	{ "consume everything resets positions", 8, {
		{ OP_APPEND, "abc", 0, 0, 0, 3, "abc" },
		{ OP_CONSUME, NULL, 3, 0, 0, 0, "" },
	} },
	{ "consume more than held is bounded", 8, {
		{ OP_APPEND, "abc", 0, 0, 0, 3, "abc" },
		{ OP_CONSUME, NULL, 100, 0, 0, 0, "" },
		{ OP_APPEND, "abcdefgh", 0, 0, 0, 8, "abcdefgh" },
	} },
	{ "consume zero changes nothing", 8, {
		{ OP_APPEND, "abc", 0, 0, 0, 3, "abc" },
		{ OP_CONSUME, NULL, 0, 0, 0, 3, "abc" },
	} },
	{ "compact at front is a no-op", 8, {
		{ OP_APPEND, "abc", 0, 0, 0, 3, "abc" },
		{ OP_COMPACT, NULL, 0, 0, 0, 3, "abc" },
	} },
	{ "compact moves unread bytes to the front", 8, {
		{ OP_APPEND, "abcdefg", 0, 0, 0, 7, "abcdefg" },
		{ OP_CONSUME, NULL, 5, 0, 5, 7, "fg" },
		{ OP_COMPACT, NULL, 0, 0, 0, 2, "fg" },
	} },
	{ "compact of an empty buffer", 8, {
		{ OP_COMPACT, NULL, 0, 0, 0, 0, "" },
	} },
	{ "produce after writing at wptr", 8, {
		{ OP_PRODUCE, "hello", 0, 0, 0, 5, "hello" },
		{ OP_CONSUME, NULL, 2, 0, 2, 5, "llo" },
		{ OP_PRODUCE, "!!!", 0, 0, 2, 8, "llo!!!" },
	} },
	{ "reset drops everything", 8, {
		{ OP_APPEND, "abcdef", 0, 0, 0, 6, "abcdef" },
		{ OP_CONSUME, NULL, 1, 0, 1, 6, "bcdef" },
		{ OP_RESET, NULL, 0, 0, 0, 0, "" },
		{ OP_APPEND, "12345678", 0, 0, 0, 8, "12345678" },
	} },
	{ "one-byte buffer", 1, {
		{ OP_APPEND, "ab", 0, -ENOSPC, 0, 0, "" },
		{ OP_APPEND, "a", 0, 0, 0, 1, "a" },
		{ OP_APPEND, "b", 0, -ENOSPC, 0, 1, "a" },
		{ OP_CONSUME, NULL, 1, 0, 0, 0, "" },
		{ OP_APPEND, "b", 0, 0, 0, 1, "b" },
	} },
	{ "release gives memory back only when empty", 8, {
		{ OP_APPEND, "abc", 0, 0, 0, 3, "abc" },
		{ OP_RELEASE, NULL, 0, 0, 0, 3, "abc" },
		{ OP_CONSUME, NULL, 3, 0, 0, 0, "" },
		{ OP_RELEASE, NULL, 0, 0, 0, 0, "" },
		{ OP_APPEND, "defgh", 0, 0, 0, 5, "defgh" },
	} },
	{ "produce after release takes memory again", 4, {
		{ OP_RELEASE, NULL, 0, 0, 0, 0, "" },
		{ OP_PRODUCE, "wxyz", 0, 0, 0, 4, "wxyz" },
		{ OP_CONSUME, NULL, 2, 0, 2, 4, "yz" },
		{ OP_RELEASE, NULL, 0, 0, 2, 4, "yz" },
	} },
};

static const char *op_name(enum buf_opcode op)
{
	static const char *const names[] = { "end", "append", "consume", "compact", "produce",
					     "reset", "release" };
	return names[op];
}

static void run_buf_case(const struct buf_case *c)
{
	struct tcase tc;
	struct buf b;
	size_t i;

	tc_begin(&tc, "buf: %s", c->name);
	if (buf_init(&b, c->cap) != 0) {
		tc_fail(&tc, "buf_init(%zu) failed", c->cap);
		tc_end(&tc);
		return;
	}
	if (b.cap != c->cap || b.rpos || b.wpos || buf_len(&b) || buf_room(&b) != c->cap)
		tc_fail(&tc, "fresh buffer: cap %zu rpos %zu wpos %zu", b.cap, b.rpos, b.wpos);
	if (b.data)
		tc_fail(&tc, "fresh buffer already holds memory (it is taken on first use)");
	for (i = 0; i < N_ELEMS(c->ops) && c->ops[i].op != OP_END; i++) {
		const struct buf_op *o = &c->ops[i];
		size_t n = o->data ? (o->n ? o->n : strlen(o->data)) : o->n;
		int ret = 0;
		char what[64];

		switch (o->op) {
		case OP_APPEND:
			ret = buf_append(&b, o->data, n);
			break;
		case OP_CONSUME:
			buf_consume(&b, n);
			break;
		case OP_COMPACT:
			buf_compact(&b);
			break;
		case OP_PRODUCE:
			if (buf_room(&b) < n) {
				tc_fail(&tc, "step %zu: no room to produce %zu", i + 1, n);
				goto out;
			}
			if (buf_reserve(&b) < 0) {
				tc_fail(&tc, "step %zu: buf_reserve failed", i + 1);
				goto out;
			}
			memcpy(buf_wptr(&b), o->data, n);
			buf_produce(&b, n);
			break;
		case OP_RESET:
			buf_reset(&b);
			break;
		case OP_RELEASE:
			buf_release(&b);
			if ((b.data == NULL) != (buf_len(&b) == 0))
				tc_fail(&tc, "step %zu: release with %zu unread bytes left memory %s",
					i + 1, buf_len(&b), b.data ? "held" : "freed");
			break;
		case OP_END:
			break;
		}
		snprintf(what, sizeof(what), "step %zu (%s) ret", i + 1, op_name(o->op));
		expect_long(&tc, what, o->ret, ret);
		if (o->rpos != SKIP) {
			snprintf(what, sizeof(what), "step %zu (%s) rpos", i + 1, op_name(o->op));
			expect_long(&tc, what, (long)o->rpos, (long)b.rpos);
		}
		if (o->wpos != SKIP) {
			snprintf(what, sizeof(what), "step %zu (%s) wpos", i + 1, op_name(o->op));
			expect_long(&tc, what, (long)o->wpos, (long)b.wpos);
		}
		if (b.rpos > b.wpos || b.wpos > b.cap) {
			tc_fail(&tc, "step %zu: broken positions rpos %zu wpos %zu cap %zu", i + 1,
				b.rpos, b.wpos, b.cap);
			goto out;
		}
		snprintf(what, sizeof(what), "step %zu (%s) unread", i + 1, op_name(o->op));
		expect_bytes(&tc, what, o->unread, buf_rptr(&b), buf_len(&b));
		if (buf_room(&b) != b.cap - b.wpos)
			tc_fail(&tc, "step %zu: buf_room %zu != cap - wpos", i + 1, buf_room(&b));
	}
out:
	buf_free(&b);
	if (b.data || b.cap || b.rpos || b.wpos)
		tc_fail(&tc, "buf_free left state behind");
	tc_end(&tc);
}

int main(void)
{
	size_t i;

	for (i = 0; i < N_ELEMS(line_cases); i++)
		run_line_case(&line_cases[i]);
	for (i = 0; i < N_ELEMS(split_cases); i++)
		run_split_case(&split_cases[i]);
	for (i = 0; i < N_ELEMS(buf_cases); i++)
		run_buf_case(&buf_cases[i]);
	return check_exit("test_buf");
}
