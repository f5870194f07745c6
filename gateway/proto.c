/*
 * proto.c - dispatch to the per-protocol tables and the helpers they share.
 */
#include "proto_impl.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "stats.h"
#include "util.h"

static const struct proto_ops *const ops[PROTO_COUNT] = {
	[PROTO_SMTP] = &smtp_ops,
	[PROTO_IMAP] = &imap_ops,
	[PROTO_POP3] = &pop3_ops,
};

static void reply_vfmt(struct proto_reply *r, size_t off, const char *fmt, va_list ap)
{
	int n = vsnprintf(r->text + off, sizeof(r->text) - off, fmt, ap);

	if (n < 0)
		n = 0;
	r->len = MIN(off + (size_t)n, sizeof(r->text) - 1);
}

void reply_set(struct proto_reply *r, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	reply_vfmt(r, 0, fmt, ap);
	va_end(ap);
}

void reply_add(struct proto_reply *r, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	reply_vfmt(r, r->len, fmt, ap);
	va_end(ap);
}

void split_word(const char *line, size_t len, const char **word, size_t *wlen,
		const char **rest, size_t *rlen)
{
	size_t i = 0;

	*word = line;
	while (i < len && line[i] != ' ')
		i++;
	*wlen = i;
	while (i < len && line[i] == ' ')
		i++;
	*rest = line + i;
	*rlen = len - i;
}

bool over_budget(const struct proto_conf *pc, struct proto_state *st)
{
	st->ncommands++;
	return pc->max_commands && st->ncommands > pc->max_commands;
}

bool next_line(const char **p, const char *end, const char **line, size_t *len)
{
	const char *s = *p, *nl;
	size_t l;

	if (s >= end)
		return false;
	nl = memchr(s, '\n', (size_t)(end - s));
	if (!nl)
		nl = end;
	l = (size_t)(nl - s);
	*p = nl < end ? nl + 1 : end;
	if (l && s[l - 1] == '\r')
		l--;
	*line = s;
	*len = l;
	return true;
}

bool out_put(char *out, size_t cap, size_t *off, const char *p, size_t n)
{
	if (cap - *off < n)
		return false;
	memcpy(out + *off, p, n);
	*off += n;
	return true;
}

void proto_greeting(const struct proto_conf *pc, struct proto_reply *r)
{
	r->counter = -1;
	ops[pc->kind]->greeting(pc, r);
}

enum proto_verdict proto_command(const struct proto_conf *pc, struct proto_state *st,
				 const char *line, size_t len, struct proto_reply *r)
{
	r->counter = -1;
	r->len = 0;
	r->text[0] = '\0';
	return ops[pc->kind]->command(pc, st, line, len, r);
}

void proto_error_reply(const struct proto_conf *pc, enum proto_error e, struct proto_reply *r)
{
	r->counter = -1;
	r->len = 0;
	r->text[0] = '\0';
	ops[pc->kind]->error_reply(pc, e, r);
}

void proto_forget(struct proto_state *st)
{
	memset(st, 0, sizeof(*st));
}

size_t proto_replay(const struct proto_conf *pc, const struct proto_state *st,
		    char *out, size_t cap)
{
	return ops[pc->kind]->replay ? ops[pc->kind]->replay(st, out, cap) : 0;
}

int proto_resp_line(struct proto_resp *st, const char *line, size_t len)
{
	st->nlines++;
	return ops[st->kind]->resp_line(st, line, len);
}

bool proto_caps_command(enum proto_kind kind, const char *line, size_t len,
			struct proto_resp *st)
{
	memset(st, 0, sizeof(*st));
	st->kind = kind;
	st->what = RESP_CAPS;
	return ops[kind]->caps_command(line, len, st);
}

long proto_filter_caps(enum proto_kind kind, const char *in, size_t len, char *out, size_t cap)
{
	return ops[kind]->filter_caps(in, len, out, cap);
}

unsigned proto_default_max_line(enum proto_kind kind)
{
	return ops[kind]->default_max_line;
}

const char *proto_name(enum proto_kind kind)
{
	return kind < PROTO_COUNT ? ops[kind]->name : "?";
}

int proto_parse_name(const char *s, enum proto_kind *out)
{
	int k;

	for (k = 0; k < PROTO_COUNT; k++) {
		if (strcmp(s, ops[k]->name) == 0) {
			*out = (enum proto_kind)k;
			return 0;
		}
	}
	return -1;
}
