/*
 * proto.h - the pre-TLS dialogue of SMTP, IMAP and POP3 as pure state
 * machines, plus the few things the gateway must understand of the backend's
 * replies (its greeting and the capability reply it relays after TLS).
 *
 * Nothing here touches a socket: a session feeds complete command lines in
 * and gets back a reply text and a verdict telling it what to do next. That
 * keeps the rules testable as case tables (tests/unit) and fuzzable
 * (tests/fuzz), and keeps the event loop free of protocol knowledge.
 *
 * One table per protocol (struct proto_ops), as nginx's mail module does.
 */
#ifndef MAILGW_PROTO_H
#define MAILGW_PROTO_H

#include <stdbool.h>
#include <stddef.h>

enum proto_kind { PROTO_SMTP, PROTO_IMAP, PROTO_POP3, PROTO_COUNT };

/* What the session does after sending proto_reply.text to the client. */
enum proto_verdict {
	PV_REPLY,    /* keep reading commands */
	PV_STARTTLS, /* start the TLS handshake once the reply is flushed */
	PV_CLOSE,    /* close once the reply is flushed */
	PV_RELAY,    /* plaintext pass-through: this line and all after it go to the backend */
};

/* Why a session is being ended by the gateway itself. */
enum proto_error {
	PE_LINE_TOO_LONG,
	PE_TOO_MANY_COMMANDS,
	PE_IDLE_TIMEOUT,
	PE_BACKEND_DOWN,
	PE_INJECTION,
	PE_OVERLOAD,
	PE_SHUTDOWN,
};

/* Per-listener facts the dialogue depends on. */
struct proto_conf {
	enum proto_kind kind;
	bool starttls;     /* listener offers STARTTLS/STLS */
	bool require_tls;  /* refuse everything but the basics before TLS */
	const char *hostname; /* at most 255 bytes (config.c), so replies keep their CRLF */
	unsigned max_commands; /* pre-TLS command budget; 0 = unlimited */
};

/* Everything learned from the client before TLS; wiped at STARTTLS. */
struct proto_state {
	unsigned ncommands;
	bool helo_seen;
	bool esmtp;
	char helo[256]; /* argument of the last EHLO/HELO, replayed on pass-through */
};

#define PROTO_REPLY_MAX 1024

struct proto_reply {
	char text[PROTO_REPLY_MAX];
	size_t len;
	/* Counter to bump for this command, or -1 (see stats.h). */
	int counter;
};

/* Greeting sent when a plaintext or STARTTLS session opens. */
void proto_greeting(const struct proto_conf *pc, struct proto_reply *r);

/* One complete command line (terminator stripped). */
enum proto_verdict proto_command(const struct proto_conf *pc, struct proto_state *st,
				 const char *line, size_t len, struct proto_reply *r);

/* Protocol's own way of saying goodbye for gateway-side errors. */
void proto_error_reply(const struct proto_conf *pc, enum proto_error e,
		       struct proto_reply *r);

/* Forget everything learned before TLS (RFC 3207 §4.2, RFC 2595 §3.1). */
void proto_forget(struct proto_state *st);

/*
 * Lines the gateway sends the backend before relaying a plaintext session:
 * SMTP replays the client's EHLO/HELO. Returns the length written to out,
 * 0 when nothing is to be replayed.
 */
size_t proto_replay(const struct proto_conf *pc, const struct proto_state *st,
		    char *out, size_t cap);

/* --- backend responses ------------------------------------------------- */

enum proto_resp_kind {
	RESP_GREETING,   /* the backend's banner */
	RESP_CAPS,       /* reply to EHLO / CAPABILITY / CAPA */
	RESP_REPLAY,     /* reply to a replayed EHLO/HELO */
};

struct proto_resp {
	enum proto_resp_kind what;
	enum proto_kind kind;
	unsigned nlines;
	bool ok;           /* positive completion (2xx / OK / +OK) */
	char tag[64];      /* IMAP: tag of the command whose reply this is */
};

/*
 * Feed one response line. Returns 1 when the response is complete (st->ok
 * tells whether it was positive), 0 when more lines follow, -1 when the
 * line cannot belong to such a response.
 */
int proto_resp_line(struct proto_resp *st, const char *line, size_t len);

/*
 * If this post-TLS client line asks for capabilities (EHLO/HELO,
 * CAPABILITY, CAPA), set up *st to parse its reply and return true.
 */
bool proto_caps_command(enum proto_kind kind, const char *line, size_t len,
			struct proto_resp *st);

/*
 * Rewrite a complete capability reply (or IMAP greeting) so it no longer
 * offers STARTTLS/STLS or LOGINDISABLED: inside TLS they are meaningless and
 * an upgrade request would only confuse the backend. Returns the output
 * length, or -1 if out is too small.
 */
long proto_filter_caps(enum proto_kind kind, const char *in, size_t len,
		       char *out, size_t cap);

/* Default command line limit (terminator included) per protocol. */
unsigned proto_default_max_line(enum proto_kind kind);
const char *proto_name(enum proto_kind kind);
int proto_parse_name(const char *s, enum proto_kind *out);

#endif
