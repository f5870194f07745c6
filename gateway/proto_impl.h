/*
 * proto_impl.h - what the three protocol modules share with proto.c.
 * Not for use outside gateway/{proto,smtp,imap,pop3}.c.
 */
#ifndef MAILGW_PROTO_IMPL_H
#define MAILGW_PROTO_IMPL_H

#include "proto.h"

struct proto_ops {
	const char *name;
	unsigned default_max_line;
	void (*greeting)(const struct proto_conf *pc, struct proto_reply *r);
	enum proto_verdict (*command)(const struct proto_conf *pc, struct proto_state *st,
				      const char *line, size_t len, struct proto_reply *r);
	void (*error_reply)(const struct proto_conf *pc, enum proto_error e,
			    struct proto_reply *r);
	size_t (*replay)(const struct proto_state *st, char *out, size_t cap);
	int (*resp_line)(struct proto_resp *st, const char *line, size_t len);
	bool (*caps_command)(const char *line, size_t len, struct proto_resp *st);
	long (*filter_caps)(const char *in, size_t len, char *out, size_t cap);
};

extern const struct proto_ops smtp_ops, imap_ops, pop3_ops;

/* Replace / extend the reply text; output is truncated at PROTO_REPLY_MAX. */
void reply_set(struct proto_reply *r, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
void reply_add(struct proto_reply *r, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* Split "VERB args": word/wlen is the first word, rest/rlen what follows (may be empty). */
void split_word(const char *line, size_t len, const char **word, size_t *wlen,
		const char **rest, size_t *rlen);

/* Count one command against the pre-TLS budget; true when it is exceeded. */
bool over_budget(const struct proto_conf *pc, struct proto_state *st);

/* Iterate the lines of a complete response held in memory. */
bool next_line(const char **p, const char *end, const char **line, size_t *len);

/* Append bytes to out[*off..cap); false when they do not fit. */
bool out_put(char *out, size_t cap, size_t *off, const char *p, size_t n);

#endif
