/*
 * test_proto.c - unit tests for the pre-TLS dialogues of SMTP, IMAP and POP3
 * (gateway/proto.c, smtp.c, imap.c, pop3.c) and for what the gateway
 * understands and rewrites of the backend's responses.
 *
 * Build and run from the repository root:
 *   mkdir -p build/tests
 *   gcc -std=gnu11 -Wall -Wextra -Werror -Igateway tests/unit/test_proto.c gateway/buf.c gateway/proto.c gateway/smtp.c gateway/imap.c gateway/pop3.c gateway/stats.c gateway/proxy.c -o build/tests/test_proto
 *   build/tests/test_proto
 * and the same with -fsanitize=address,undefined -fno-sanitize-recover=all
 * added to the gcc line.
 *
 * References: RFC 5321 + RFC 3207 (SMTP, STARTTLS), RFC 9051 (IMAP; STARTTLS
 * §6.2.1, LOGINDISABLED §6.2.3), RFC 1939 + RFC 2449 + RFC 2595 (POP3, CAPA,
 * STLS).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "check.h"
#include "proto.h"
#include "stats.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

#define HOST "mx.example.test"

/* Listener flags used by the tables. */
#define OFFER 1u   /* starttls */
#define REQUIRE 2u /* require_tls */

static const char *const kind_names[] = { "SMTP", "IMAP", "POP3" };

static const char *verdict_name(enum proto_verdict v)
{
	switch (v) {
	case PV_REPLY:
		return "PV_REPLY";
	case PV_STARTTLS:
		return "PV_STARTTLS";
	case PV_CLOSE:
		return "PV_CLOSE";
	case PV_RELAY:
		return "PV_RELAY";
	}
	return "?";
}

static struct proto_conf make_conf(enum proto_kind kind, unsigned tls, unsigned max_commands)
{
	struct proto_conf pc = {
		.kind = kind,
		.starttls = (tls & OFFER) != 0,
		.require_tls = (tls & REQUIRE) != 0,
		.hostname = HOST,
		.max_commands = max_commands,
	};
	return pc;
}

/* The counter a reply asks for: NULL means none (-1). */
static bool expect_counter(struct tcase *tc, const char *what, const char *exp, int got)
{
	if (!exp) {
		if (got == -1)
			return true;
		return tc_fail(tc, "%s: expected no counter (-1), got %d (%s)", what, got,
			       got >= 0 && got < STAT_COUNT ? stats_name((enum stat_id)got) : "?");
	}
	if (got >= 0 && got < STAT_COUNT && strcmp(stats_name((enum stat_id)got), exp) == 0)
		return true;
	return tc_fail(tc, "%s: expected counter %s, got %d (%s)", what, exp, got,
		       got >= 0 && got < STAT_COUNT ? stats_name((enum stat_id)got) : "none");
}

/* What every reply must look like, whatever the command. */
static void expect_well_formed(struct tcase *tc, const char *what, const struct proto_reply *r)
{
	size_t i;

	if (r->len >= PROTO_REPLY_MAX) {
		tc_fail(tc, "%s: reply length %zu >= PROTO_REPLY_MAX", what, r->len);
		return;
	}
	if (strlen(r->text) != r->len)
		tc_fail(tc, "%s: len %zu but text holds %zu bytes", what, r->len, strlen(r->text));
	if (r->len && (r->len < 2 || r->text[r->len - 2] != '\r' || r->text[r->len - 1] != '\n'))
		tc_fail(tc, "%s: reply does not end with CRLF: \"%s\"", what, esc(r->text, r->len));
	for (i = 0; i < r->len; i++) {
		bool cr = r->text[i] == '\r', lf = r->text[i] == '\n';

		if ((cr && (i + 1 >= r->len || r->text[i + 1] != '\n')) ||
		    (lf && (i == 0 || r->text[i - 1] != '\r'))) {
			tc_fail(tc, "%s: bare CR/LF at %zu: \"%s\"", what, i, esc(r->text, r->len));
			break;
		}
	}
}

/* ======================================================================
 * Greetings
 * ====================================================================== */

struct greeting_case {
	const char *name;
	enum proto_kind kind;
	unsigned tls;
	const char *text;
};

static const struct greeting_case greeting_cases[] = {
	{ "SMTP plain", PROTO_SMTP, 0, "220 " HOST " ESMTP mailgw\r\n" },
	{ "SMTP starttls+require", PROTO_SMTP, OFFER | REQUIRE, "220 " HOST " ESMTP mailgw\r\n" },
	{ "IMAP plain", PROTO_IMAP, 0, "* OK [CAPABILITY IMAP4rev1 ID] " HOST " mailgw ready\r\n" },
	{ "IMAP starttls", PROTO_IMAP, OFFER,
	  "* OK [CAPABILITY IMAP4rev1 ID STARTTLS] " HOST " mailgw ready\r\n" },
	{ "IMAP starttls+require advertises LOGINDISABLED", PROTO_IMAP, OFFER | REQUIRE,
	  "* OK [CAPABILITY IMAP4rev1 ID STARTTLS LOGINDISABLED] " HOST " mailgw ready\r\n" },
	{ "POP3 plain", PROTO_POP3, 0, "+OK " HOST " mailgw ready\r\n" },
	{ "POP3 starttls+require", PROTO_POP3, OFFER | REQUIRE, "+OK " HOST " mailgw ready\r\n" },
};

static void run_greeting_case(const struct greeting_case *c)
{
	struct proto_conf pc = make_conf(c->kind, c->tls, 0);
	struct proto_reply r;
	struct tcase tc;

	tc_begin(&tc, "greeting: %s", c->name);
	memset(&r, 0x55, sizeof(r));
	proto_greeting(&pc, &r);
	expect_well_formed(&tc, "greeting", &r);
	expect_bytes(&tc, "greeting", c->text, r.text, r.len);
	expect_counter(&tc, "greeting", NULL, r.counter);
	tc_end(&tc);
}

/* ======================================================================
 * Dialogues: one command line at a time through proto_command
 * ====================================================================== */

struct step {
	const char *line;   /* command, terminator stripped; NULL ends the dialogue */
	size_t len;         /* strlen(line) when 0 */
	enum proto_verdict verdict;
	const char *reply;  /* exact reply ("" = nothing sent), or NULL */
	const char *prefix; /* reply prefix, or NULL */
	const char *counter; /* counter name, or NULL for none */
};

/* Exact reply; prefix; relay (nothing answered). */
#define X(l, v, rep, ctr) { (l), 0, (v), (rep), NULL, (ctr) }
#define P(l, v, pfx, ctr) { (l), 0, (v), NULL, (pfx), (ctr) }
#define RELAY(l) { (l), 0, PV_RELAY, "", NULL, NULL }

struct state_check {
	bool check;
	const char *helo;
	bool helo_seen, esmtp;
	unsigned ncommands;
};

struct dialogue_case {
	const char *name;
	enum proto_kind kind;
	unsigned tls;
	unsigned max_commands;
	struct step steps[12];
	struct state_check after;
};

/* SMTP replies */
#define EHLO_TLS                                                                   \
	"250-" HOST "\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-STARTTLS\r\n"         \
	"250 ENHANCEDSTATUSCODES\r\n"
#define EHLO_NOTLS                                                                 \
	"250-" HOST "\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
#define HELO_OK "250 " HOST "\r\n"
#define S_OK "250 2.0.0 OK\r\n"
#define S_TLS "220 2.0.0 Ready to start TLS\r\n"
#define S_BYE "221 2.0.0 Bye\r\n"
#define S_530 "530 5.7.0 Must issue a STARTTLS command first\r\n"
#define S_NOTLS "502 5.5.1 STARTTLS not available\r\n"
#define S_TLSARG "501 5.5.4 Syntax: STARTTLS\r\n"
#define S_EHLOARG "501 5.5.4 Syntax: EHLO hostname\r\n"
#define S_HELOARG "501 5.5.4 Syntax: HELO hostname\r\n"
#define S_500 "500 5.5.2 Syntax error, command unrecognized\r\n"
#define S_421 "421 4.7.0 " HOST " Too many commands before STARTTLS, closing connection\r\n"

/* IMAP replies */
#define I_CAPS_REQ "* CAPABILITY IMAP4rev1 ID STARTTLS LOGINDISABLED\r\n"
#define I_CAPS_TLS "* CAPABILITY IMAP4rev1 ID STARTTLS\r\n"
#define I_CAPS_PLAIN "* CAPABILITY IMAP4rev1 ID\r\n"
#define I_BADTAG "* BAD Invalid tag\r\n"
#define I_BYE_LIMIT "* BYE Too many commands before STARTTLS\r\n"

/* POP3 replies */
#define P_CAPA_REQ "+OK Capability list follows\r\nSTLS\r\n.\r\n"
#define P_CAPA_TLS "+OK Capability list follows\r\nSTLS\r\nUSER\r\n.\r\n"
#define P_CAPA_PLAIN "+OK Capability list follows\r\nUSER\r\n.\r\n"
#define P_STLS "+OK Begin TLS negotiation\r\n"
#define P_NOSTLS "-ERR STLS not available\r\n"
#define P_AUTH "-ERR [AUTH] Use STLS first\r\n"
#define P_NOTALLOWED "-ERR Command not allowed before STLS\r\n"
#define P_LIMIT "-ERR Too many commands before STLS\r\n"

#define REFUSED "require_tls_refused"

/* EHLO names at the 255-byte limit of struct proto_state.helo and one past it. */
#define C10 "0123456789"
#define C50 C10 C10 C10 C10 C10
#define HELO_255 "h" C50 C50 C50 C50 C50 "abcd"
#define HELO_256 HELO_255 "e"
static const char helo_255[] = HELO_255;
_Static_assert(sizeof(HELO_255) == 256, "HELO_255 must be 255 bytes");

static const struct dialogue_case dialogue_cases[] = {
	/* ---------------- SMTP ---------------- */
	{ "SMTP EHLO, NOOP, RSET, STARTTLS", PROTO_SMTP, OFFER, 0, {
		X("EHLO client.example", PV_REPLY, EHLO_TLS, NULL),
		X("NOOP", PV_REPLY, S_OK, NULL),
		X("RSET", PV_REPLY, S_OK, NULL),
		X("STARTTLS", PV_STARTTLS, S_TLS, "starttls"),
	}, { true, "client.example", true, true, 4 } },
	{ "SMTP EHLO without starttls hides STARTTLS", PROTO_SMTP, 0, 0, {
		X("EHLO client.example", PV_REPLY, EHLO_NOTLS, NULL),
		X("QUIT", PV_CLOSE, S_BYE, NULL),
	}, { true, "client.example", true, true, 2 } },
	{ "SMTP HELO then QUIT", PROTO_SMTP, OFFER, 0, {
		X("HELO client.example", PV_REPLY, HELO_OK, NULL),
		X("QUIT", PV_CLOSE, S_BYE, NULL),
	}, { true, "client.example", true, false, 2 } },
	{ "SMTP verbs are case-insensitive", PROTO_SMTP, OFFER, 0, {
		X("ehlo client.example", PV_REPLY, EHLO_TLS, NULL),
		X("nOoP", PV_REPLY, S_OK, NULL),
		X("starttls", PV_STARTTLS, S_TLS, "starttls"),
	}, { false } },
	{ "SMTP NOOP takes an optional string", PROTO_SMTP, OFFER, 0, {
		X("NOOP hello there", PV_REPLY, S_OK, NULL),
	}, { false } },
	{ "SMTP STARTTLS before EHLO is allowed", PROTO_SMTP, OFFER | REQUIRE, 0, {
		X("STARTTLS", PV_STARTTLS, S_TLS, "starttls"),
	}, { true, "", false, false, 1 } },
	{ "SMTP STARTTLS with trailing spaces", PROTO_SMTP, OFFER, 0, {
		X("STARTTLS   ", PV_STARTTLS, S_TLS, "starttls"),
	}, { false } },
	{ "SMTP STARTTLS with an argument is a syntax error", PROTO_SMTP, OFFER, 0, {
		X("EHLO c.example", PV_REPLY, EHLO_TLS, NULL),
		X("STARTTLS now", PV_REPLY, S_TLSARG, NULL),
		X("STARTTLS x y", PV_REPLY, S_TLSARG, NULL),
		X("STARTTLS", PV_STARTTLS, S_TLS, "starttls"),
	}, { false } },
	{ "SMTP STARTTLS on a listener without starttls", PROTO_SMTP, 0, 0, {
		X("EHLO c.example", PV_REPLY, EHLO_NOTLS, NULL),
		X("STARTTLS", PV_REPLY, S_NOTLS, NULL),
		X("STARTTLS now", PV_REPLY, S_NOTLS, NULL),
	}, { false } },
	{ "SMTP require_tls refuses MAIL, RCPT, DATA, AUTH, VRFY", PROTO_SMTP, OFFER | REQUIRE, 0, {
		X("EHLO c.example", PV_REPLY, EHLO_TLS, NULL),
		X("MAIL FROM:<a@example.org>", PV_REPLY, S_530, REFUSED),
		X("RCPT TO:<b@example.org>", PV_REPLY, S_530, REFUSED),
		X("DATA", PV_REPLY, S_530, REFUSED),
		X("AUTH PLAIN AGJvYgBzZWNyZXQ=", PV_REPLY, S_530, REFUSED),
		X("VRFY postmaster", PV_REPLY, S_530, REFUSED),
		X("mail from:<a@example.org>", PV_REPLY, S_530, REFUSED),
		X("XYZZY", PV_REPLY, S_530, REFUSED),
		X("STARTTLS", PV_STARTTLS, S_TLS, "starttls"),
	}, { false } },
	{ "SMTP require_tls still allows NOOP, RSET, HELO, QUIT", PROTO_SMTP, OFFER | REQUIRE, 0, {
		X("HELO c.example", PV_REPLY, HELO_OK, NULL),
		X("NOOP", PV_REPLY, S_OK, NULL),
		X("RSET", PV_REPLY, S_OK, NULL),
		X("QUIT", PV_CLOSE, S_BYE, NULL),
	}, { false } },
	{ "SMTP require_tls without starttls still refuses (never relays)", PROTO_SMTP, REQUIRE, 0, {
		X("EHLO c.example", PV_REPLY, EHLO_NOTLS, NULL),
		X("MAIL FROM:<a@example.org>", PV_REPLY, S_530, REFUSED),
		X("STARTTLS", PV_REPLY, S_NOTLS, NULL),
	}, { false } },
	{ "SMTP MAIL without require_tls is relayed", PROTO_SMTP, OFFER, 0, {
		X("EHLO c.example", PV_REPLY, EHLO_TLS, NULL),
		RELAY("MAIL FROM:<a@example.org>"),
	}, { true, "c.example", true, true, 2 } },
	{ "SMTP plaintext-only listener relays", PROTO_SMTP, 0, 0, {
		X("HELO c.example", PV_REPLY, HELO_OK, NULL),
		RELAY("AUTH LOGIN"),
	}, { false } },
	{ "SMTP wrong order: DATA before MAIL is relayed for the backend to judge", PROTO_SMTP,
	  OFFER, 0, {
		RELAY("DATA"),
	}, { false } },
	{ "SMTP wrong order: RCPT before EHLO under require_tls", PROTO_SMTP, OFFER | REQUIRE, 0, {
		X("RCPT TO:<b@example.org>", PV_REPLY, S_530, REFUSED),
	}, { false } },
	{ "SMTP EHLO/HELO with bad arguments", PROTO_SMTP, OFFER, 0, {
		X("EHLO", PV_REPLY, S_EHLOARG, NULL),
		X("HELO", PV_REPLY, S_HELOARG, NULL),
		X("EHLO    ", PV_REPLY, S_EHLOARG, NULL),
		X("EHLO bad\x01" "name", PV_REPLY, S_EHLOARG, NULL),
		X("EHLO bad\x7f", PV_REPLY, S_EHLOARG, NULL),
		X("EHLO caf\xc3\xa9.example", PV_REPLY, S_EHLOARG, NULL),
		X("EHLO a\tb", PV_REPLY, S_EHLOARG, NULL),
		X("EHLO a\r", PV_REPLY, S_EHLOARG, NULL),
	}, { true, "", false, false, 8 } },
	{ "SMTP EHLO argument of 256 bytes is refused", PROTO_SMTP, OFFER, 0, {
		X("EHLO " HELO_256,
		  PV_REPLY, S_EHLOARG, NULL),
	}, { true, "", false, false, 1 } },
	{ "SMTP EHLO argument of 255 bytes is kept", PROTO_SMTP, OFFER, 0, {
		X("EHLO " HELO_255,
		  PV_REPLY, EHLO_TLS, NULL),
	}, { true, helo_255, true, true, 1 } },
	{ "SMTP EHLO keeps only the first word; address literal allowed", PROTO_SMTP, OFFER, 0, {
		X("EHLO [192.0.2.1] extra words", PV_REPLY, EHLO_TLS, NULL),
	}, { true, "[192.0.2.1]", true, true, 1 } },
	{ "SMTP bad EHLO does not overwrite an earlier good one", PROTO_SMTP, OFFER, 0, {
		X("EHLO good.example", PV_REPLY, EHLO_TLS, NULL),
		X("EHLO", PV_REPLY, S_EHLOARG, NULL),
	}, { true, "good.example", true, true, 2 } },
	{ "SMTP RSET with an argument", PROTO_SMTP, OFFER, 0, {
		X("RSET now", PV_REPLY, "501 5.5.4 Syntax: RSET\r\n", NULL),
	}, { false } },
	{ "SMTP empty and blank lines", PROTO_SMTP, OFFER | REQUIRE, 0, {
		X("", PV_REPLY, S_500, NULL),
		X("   ", PV_REPLY, S_500, NULL),
		X(" MAIL FROM:<a@example.org>", PV_REPLY, S_500, NULL),
	}, { false } },
	{ "SMTP verb with embedded NUL", PROTO_SMTP, OFFER | REQUIRE, 0, {
		{ "STARTTLS\0x", 10, PV_REPLY, S_530, NULL, REFUSED },
		{ "QUIT\0", 5, PV_REPLY, S_530, NULL, REFUSED },
	}, { false } },
	{ "SMTP pre-TLS budget: fourth command of three closes", PROTO_SMTP, OFFER, 3, {
		X("EHLO c.example", PV_REPLY, EHLO_TLS, NULL),
		X("NOOP", PV_REPLY, S_OK, NULL),
		X("NOOP", PV_REPLY, S_OK, NULL),
		X("NOOP", PV_CLOSE, S_421, "pretls_limit"),
	}, { true, "c.example", true, true, 4 } },
	{ "SMTP pre-TLS budget: STARTTLS within budget", PROTO_SMTP, OFFER | REQUIRE, 3, {
		X("EHLO c.example", PV_REPLY, EHLO_TLS, NULL),
		X("MAIL FROM:<a@example.org>", PV_REPLY, S_530, REFUSED),
		X("STARTTLS", PV_STARTTLS, S_TLS, "starttls"),
	}, { false } },
	{ "SMTP pre-TLS budget counts STARTTLS itself", PROTO_SMTP, OFFER, 1, {
		X("EHLO c.example", PV_REPLY, EHLO_TLS, NULL),
		X("STARTTLS", PV_CLOSE, S_421, "pretls_limit"),
	}, { false } },
	{ "SMTP pre-TLS budget counts refused and bad commands", PROTO_SMTP, OFFER | REQUIRE, 2, {
		X("", PV_REPLY, S_500, NULL),
		X("MAIL FROM:<a@example.org>", PV_REPLY, S_530, REFUSED),
		X("QUIT", PV_CLOSE, S_421, "pretls_limit"),
	}, { false } },

	/* ---------------- IMAP ---------------- */
	{ "IMAP CAPABILITY, NOOP, ID, STARTTLS (require_tls)", PROTO_IMAP, OFFER | REQUIRE, 0, {
		X("a1 CAPABILITY", PV_REPLY, I_CAPS_REQ "a1 OK CAPABILITY completed\r\n", NULL),
		X("a2 NOOP", PV_REPLY, "a2 OK NOOP completed\r\n", NULL),
		X("a3 ID (\"name\" \"Thunderbird\")", PV_REPLY,
		  "* ID NIL\r\na3 OK ID completed\r\n", NULL),
		X("a4 ID NIL", PV_REPLY, "* ID NIL\r\na4 OK ID completed\r\n", NULL),
		X("a5 STARTTLS", PV_STARTTLS, "a5 OK Begin TLS negotiation now\r\n", "starttls"),
	}, { true, "", false, false, 5 } },
	{ "IMAP CAPABILITY with starttls, without require_tls", PROTO_IMAP, OFFER, 0, {
		X("A001 CAPABILITY", PV_REPLY, I_CAPS_TLS "A001 OK CAPABILITY completed\r\n", NULL),
	}, { false } },
	{ "IMAP CAPABILITY on a plain listener", PROTO_IMAP, 0, 0, {
		X("A001 CAPABILITY", PV_REPLY, I_CAPS_PLAIN "A001 OK CAPABILITY completed\r\n", NULL),
	}, { false } },
	{ "IMAP commands are case-insensitive", PROTO_IMAP, OFFER | REQUIRE, 0, {
		X("x capability", PV_REPLY, I_CAPS_REQ "x OK CAPABILITY completed\r\n", NULL),
		X("y NoOp", PV_REPLY, "y OK NOOP completed\r\n", NULL),
		X("z starttls", PV_STARTTLS, "z OK Begin TLS negotiation now\r\n", "starttls"),
	}, { false } },
	{ "IMAP LOGOUT", PROTO_IMAP, OFFER, 0, {
		X("a1 LOGOUT", PV_CLOSE,
		  "* BYE " HOST " logging out\r\na1 OK LOGOUT completed\r\n", NULL),
	}, { false } },
	{ "IMAP STARTTLS with arguments", PROTO_IMAP, OFFER | REQUIRE, 0, {
		X("a1 STARTTLS now", PV_REPLY, "a1 BAD STARTTLS not available\r\n", NULL),
		X("a2 STARTTLS", PV_STARTTLS, "a2 OK Begin TLS negotiation now\r\n", "starttls"),
	}, { false } },
	{ "IMAP STARTTLS on a listener without starttls", PROTO_IMAP, 0, 0, {
		X("a1 STARTTLS", PV_REPLY, "a1 BAD STARTTLS not available\r\n", NULL),
	}, { false } },
	{ "IMAP require_tls: LOGIN and AUTHENTICATE get NO [PRIVACYREQUIRED]", PROTO_IMAP,
	  OFFER | REQUIRE, 0, {
		X("a1 LOGIN bob secret", PV_REPLY,
		  "a1 NO [PRIVACYREQUIRED] Use STARTTLS first\r\n", REFUSED),
		X("a2 AUTHENTICATE PLAIN", PV_REPLY,
		  "a2 NO [PRIVACYREQUIRED] Use STARTTLS first\r\n", REFUSED),
		X("a3 login bob secret", PV_REPLY,
		  "a3 NO [PRIVACYREQUIRED] Use STARTTLS first\r\n", REFUSED),
		X("a4 AUTHENTICATE PLAIN AGJvYgBzZWNyZXQ=", PV_REPLY,
		  "a4 NO [PRIVACYREQUIRED] Use STARTTLS first\r\n", REFUSED),
		X("a5 STARTTLS", PV_STARTTLS, "a5 OK Begin TLS negotiation now\r\n", "starttls"),
	}, { false } },
	{ "IMAP require_tls: other commands in the wrong state", PROTO_IMAP, OFFER | REQUIRE, 0, {
		X("a1 SELECT INBOX", PV_REPLY, "a1 BAD Command not allowed before STARTTLS\r\n", REFUSED),
		X("a2 FETCH 1 BODY[]", PV_REPLY, "a2 BAD Command not allowed before STARTTLS\r\n",
		  REFUSED),
		X("a3 CAPABILITY extra", PV_REPLY, "a3 BAD Command not allowed before STARTTLS\r\n",
		  REFUSED),
		X("a4 NOOP x", PV_REPLY, "a4 BAD Command not allowed before STARTTLS\r\n", REFUSED),
		X("a5 LOGOUT x", PV_REPLY, "a5 BAD Command not allowed before STARTTLS\r\n", REFUSED),
	}, { false } },
	{ "IMAP require_tls without starttls still refuses (never relays)", PROTO_IMAP, REQUIRE, 0, {
		X("a1 LOGIN bob secret", PV_REPLY,
		  "a1 NO [PRIVACYREQUIRED] Use STARTTLS first\r\n", REFUSED),
		X("a2 SELECT INBOX", PV_REPLY, "a2 BAD Command not allowed before STARTTLS\r\n",
		  REFUSED),
		X("a3 STARTTLS", PV_REPLY, "a3 BAD STARTTLS not available\r\n", NULL),
	}, { false } },
	{ "IMAP LOGIN without require_tls is relayed", PROTO_IMAP, OFFER, 0, {
		X("a1 CAPABILITY", PV_REPLY, I_CAPS_TLS "a1 OK CAPABILITY completed\r\n", NULL),
		RELAY("a2 LOGIN bob secret"),
	}, { false } },
	{ "IMAP wrong-state command without require_tls is relayed", PROTO_IMAP, 0, 0, {
		RELAY("a1 SELECT INBOX"),
	}, { false } },
	{ "IMAP bad tags", PROTO_IMAP, OFFER | REQUIRE, 0, {
		X("", PV_REPLY, I_BADTAG, NULL),
		X(" a1 NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a+ NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a* NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a% NOOP", PV_REPLY, I_BADTAG, NULL),
		X("(a NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a) NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a{ NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a\" NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a\\ NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a\x01 NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a\xc3\xa9 NOOP", PV_REPLY, I_BADTAG, NULL),
	}, { false } },
	{ "IMAP bad tags: control characters and NUL", PROTO_IMAP, OFFER, 0, {
		X("a\r NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a\tb NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a\x7f NOOP", PV_REPLY, I_BADTAG, NULL),
		{ "a\0b NOOP", 8, PV_REPLY, I_BADTAG, NULL, NULL },
	}, { false } },
	{ "IMAP tag of 64 bytes is refused, 63 accepted", PROTO_IMAP, OFFER, 0, {
		X("t23456789012345678901234567890123456789012345678901234567890123 NOOP", PV_REPLY,
		  "t23456789012345678901234567890123456789012345678901234567890123 OK NOOP completed\r\n",
		  NULL),
		X("t234567890123456789012345678901234567890123456789012345678901234 NOOP", PV_REPLY,
		  I_BADTAG, NULL),
	}, { false } },
	{ "IMAP tags may contain ] . and digits", PROTO_IMAP, OFFER, 0, {
		X("a]1.2 NOOP", PV_REPLY, "a]1.2 OK NOOP completed\r\n", NULL),
	}, { false } },
	{ "IMAP tag without a command", PROTO_IMAP, OFFER | REQUIRE, 0, {
		X("a1", PV_REPLY, "a1 BAD Missing command\r\n", NULL),
		X("a2   ", PV_REPLY, "a2 BAD Missing command\r\n", NULL),
	}, { false } },
	{ "IMAP pre-TLS budget", PROTO_IMAP, OFFER | REQUIRE, 2, {
		X("a1 NOOP", PV_REPLY, "a1 OK NOOP completed\r\n", NULL),
		X("bad+tag NOOP", PV_REPLY, I_BADTAG, NULL),
		X("a3 STARTTLS", PV_CLOSE, I_BYE_LIMIT, "pretls_limit"),
	}, { true, "", false, false, 3 } },

	/* ---------------- POP3 ---------------- */
	{ "POP3 CAPA, NOOP, STLS (require_tls)", PROTO_POP3, OFFER | REQUIRE, 0, {
		X("CAPA", PV_REPLY, P_CAPA_REQ, NULL),
		X("NOOP", PV_REPLY, "+OK\r\n", NULL),
		X("STLS", PV_STARTTLS, P_STLS, "starttls"),
	}, { true, "", false, false, 3 } },
	{ "POP3 CAPA with starttls, without require_tls, offers USER", PROTO_POP3, OFFER, 0, {
		X("CAPA", PV_REPLY, P_CAPA_TLS, NULL),
	}, { false } },
	{ "POP3 CAPA on a plain listener", PROTO_POP3, 0, 0, {
		X("CAPA", PV_REPLY, P_CAPA_PLAIN, NULL),
	}, { false } },
	{ "POP3 commands are case-insensitive", PROTO_POP3, OFFER | REQUIRE, 0, {
		X("capa", PV_REPLY, P_CAPA_REQ, NULL),
		X("noop", PV_REPLY, "+OK\r\n", NULL),
		X("stls", PV_STARTTLS, P_STLS, "starttls"),
	}, { false } },
	{ "POP3 QUIT", PROTO_POP3, OFFER, 0, {
		X("QUIT", PV_CLOSE, "+OK Bye\r\n", NULL),
	}, { false } },
	{ "POP3 STLS with an argument", PROTO_POP3, OFFER, 0, {
		X("STLS now", PV_REPLY, P_NOSTLS, NULL),
		X("STLS", PV_STARTTLS, P_STLS, "starttls"),
	}, { false } },
	{ "POP3 STLS on a listener without starttls", PROTO_POP3, 0, 0, {
		X("STLS", PV_REPLY, P_NOSTLS, NULL),
	}, { false } },
	{ "POP3 require_tls refuses credentials", PROTO_POP3, OFFER | REQUIRE, 0, {
		X("USER bob", PV_REPLY, P_AUTH, REFUSED),
		X("PASS secret", PV_REPLY, P_AUTH, REFUSED),
		X("APOP bob c4c9334bac560ecc979e58001b3e22fb", PV_REPLY, P_AUTH, REFUSED),
		X("AUTH PLAIN", PV_REPLY, P_AUTH, REFUSED),
		X("user bob", PV_REPLY, P_AUTH, REFUSED),
		X("STLS", PV_STARTTLS, P_STLS, "starttls"),
	}, { false } },
	{ "POP3 require_tls: transaction commands in the wrong state", PROTO_POP3,
	  OFFER | REQUIRE, 0, {
		X("STAT", PV_REPLY, P_NOTALLOWED, REFUSED),
		X("RETR 1", PV_REPLY, P_NOTALLOWED, REFUSED),
		X("DELE 1", PV_REPLY, P_NOTALLOWED, REFUSED),
	}, { false } },
	{ "POP3 require_tls without starttls still refuses (never relays)", PROTO_POP3, REQUIRE, 0, {
		X("CAPA", PV_REPLY, "+OK Capability list follows\r\n.\r\n", NULL),
		X("USER bob", PV_REPLY, P_AUTH, REFUSED),
		X("STAT", PV_REPLY, P_NOTALLOWED, REFUSED),
		X("STLS", PV_REPLY, P_NOSTLS, NULL),
	}, { false } },
	{ "POP3 USER without require_tls is relayed", PROTO_POP3, OFFER, 0, {
		X("CAPA", PV_REPLY, P_CAPA_TLS, NULL),
		RELAY("USER bob"),
	}, { false } },
	{ "POP3 wrong-state command without require_tls is relayed", PROTO_POP3, 0, 0, {
		RELAY("RETR 1"),
	}, { false } },
	{ "POP3 empty line", PROTO_POP3, OFFER | REQUIRE, 0, {
		X("", PV_REPLY, "-ERR Missing command\r\n", NULL),
		X(" USER bob", PV_REPLY, "-ERR Missing command\r\n", NULL),
	}, { false } },
	{ "POP3 pre-TLS budget", PROTO_POP3, OFFER | REQUIRE, 2, {
		X("CAPA", PV_REPLY, P_CAPA_REQ, NULL),
		X("USER bob", PV_REPLY, P_AUTH, REFUSED),
		X("STLS", PV_CLOSE, P_LIMIT, "pretls_limit"),
	}, { true, "", false, false, 3 } },
};

static void run_dialogue_case(const struct dialogue_case *c)
{
	struct proto_conf pc = make_conf(c->kind, c->tls, c->max_commands);
	struct proto_state st;
	struct tcase tc;
	size_t i;

	tc_begin(&tc, "dialogue: %s", c->name);
	memset(&st, 0, sizeof(st));
	for (i = 0; i < N_ELEMS(c->steps) && c->steps[i].line; i++) {
		const struct step *s = &c->steps[i];
		size_t len = s->len ? s->len : strlen(s->line);
		struct proto_reply r;
		enum proto_verdict v;
		char what[128];

		snprintf(what, sizeof(what), "step %zu \"%s\"", i + 1, esc(s->line, len));
		memset(&r, 0x55, sizeof(r)); /* proto_command must set every field */
		v = proto_command(&pc, &st, s->line, len, &r);
		if (v != s->verdict)
			tc_fail(&tc, "%s: verdict: expected %s, got %s", what, verdict_name(s->verdict),
				verdict_name(v));
		expect_well_formed(&tc, what, &r);
		if (s->reply)
			expect_bytes(&tc, what, s->reply, r.text, r.len);
		if (s->prefix)
			expect_prefix(&tc, what, s->prefix, r.text, r.len);
		expect_counter(&tc, what, s->counter, r.counter);
		if (v != PV_REPLY && i + 1 < N_ELEMS(c->steps) && c->steps[i + 1].line) {
			tc_fail(&tc, "%s: dialogue ends with %s but the table goes on", what,
				verdict_name(v));
			break;
		}
	}
	if (c->after.check) {
		expect_bytes(&tc, "state helo", c->after.helo, st.helo, strlen(st.helo));
		expect_long(&tc, "state helo_seen", c->after.helo_seen, st.helo_seen);
		expect_long(&tc, "state esmtp", c->after.esmtp, st.esmtp);
		expect_long(&tc, "state ncommands", c->after.ncommands, st.ncommands);
	}
	tc_end(&tc);
}

/* ======================================================================
 * Pre-TLS budget over many commands
 * ====================================================================== */

struct budget_case {
	const char *name;
	enum proto_kind kind;
	unsigned tls;
	unsigned max_commands; /* 0: send `rounds` commands, none may close */
	unsigned rounds;
	const char *line;
	const char *ok_reply;
	const char *close_reply;
};

static const struct budget_case budget_cases[] = {
	{ "SMTP unlimited", PROTO_SMTP, OFFER, 0, 1000, "NOOP", S_OK, NULL },
	{ "SMTP 20 commands", PROTO_SMTP, OFFER, 20, 0, "NOOP", S_OK, S_421 },
	{ "SMTP 1 command", PROTO_SMTP, OFFER, 1, 0, "RSET", S_OK, S_421 },
	{ "IMAP unlimited", PROTO_IMAP, OFFER, 0, 1000, "a NOOP", "a OK NOOP completed\r\n", NULL },
	{ "IMAP 10 commands", PROTO_IMAP, OFFER, 10, 0, "a NOOP", "a OK NOOP completed\r\n",
	  I_BYE_LIMIT },
	{ "POP3 unlimited", PROTO_POP3, OFFER, 0, 1000, "NOOP", "+OK\r\n", NULL },
	{ "POP3 5 commands", PROTO_POP3, OFFER, 5, 0, "NOOP", "+OK\r\n", P_LIMIT },
};

static void run_budget_case(const struct budget_case *c)
{
	struct proto_conf pc = make_conf(c->kind, c->tls, c->max_commands);
	unsigned n = c->max_commands ? c->max_commands : c->rounds, i;
	struct proto_state st;
	struct proto_reply r;
	struct tcase tc;
	enum proto_verdict v;

	tc_begin(&tc, "budget: %s", c->name);
	memset(&st, 0, sizeof(st));
	for (i = 0; i < n; i++) {
		v = proto_command(&pc, &st, c->line, strlen(c->line), &r);
		if (v != PV_REPLY || r.len != strlen(c->ok_reply) ||
		    memcmp(r.text, c->ok_reply, r.len) != 0) {
			tc_fail(&tc, "command %u of %u: expected %s \"%s\", got %s \"%s\"", i + 1, n,
				"PV_REPLY", escz(c->ok_reply), verdict_name(v), esc(r.text, r.len));
			break;
		}
	}
	if (c->close_reply && !tc.nfail) {
		v = proto_command(&pc, &st, c->line, strlen(c->line), &r);
		if (v != PV_CLOSE)
			tc_fail(&tc, "command %u: expected PV_CLOSE, got %s", n + 1, verdict_name(v));
		expect_bytes(&tc, "over-budget reply", c->close_reply, r.text, r.len);
		expect_counter(&tc, "over-budget reply", "pretls_limit", r.counter);
	}
	tc_end(&tc);
}

/* ======================================================================
 * Gateway-side error replies
 * ====================================================================== */

struct error_case {
	enum proto_kind kind;
	enum proto_error err;
	const char *name;
	const char *text;
};

static const struct error_case error_cases[] = {
	{ PROTO_SMTP, PE_LINE_TOO_LONG, "line too long", "500 5.5.2 Line too long\r\n" },
	{ PROTO_SMTP, PE_TOO_MANY_COMMANDS, "too many commands", S_421 },
	{ PROTO_SMTP, PE_IDLE_TIMEOUT, "idle timeout",
	  "421 4.4.2 " HOST " Timeout exceeded, closing connection\r\n" },
	{ PROTO_SMTP, PE_BACKEND_DOWN, "backend down",
	  "421 4.3.0 " HOST " Service temporarily unavailable, try again later\r\n" },
	{ PROTO_SMTP, PE_INJECTION, "injection",
	  "554 5.7.0 Commands pipelined after STARTTLS are rejected\r\n" },
	{ PROTO_SMTP, PE_OVERLOAD, "overload",
	  "421 4.3.2 " HOST " Too many connections, try again later\r\n" },
	{ PROTO_SMTP, PE_SHUTDOWN, "shutdown",
	  "421 4.3.2 " HOST " Service shutting down, try again later\r\n" },
	{ PROTO_IMAP, PE_LINE_TOO_LONG, "line too long", "* BYE Command line too long\r\n" },
	{ PROTO_IMAP, PE_TOO_MANY_COMMANDS, "too many commands", I_BYE_LIMIT },
	{ PROTO_IMAP, PE_IDLE_TIMEOUT, "idle timeout", "* BYE Autologout; idle for too long\r\n" },
	{ PROTO_IMAP, PE_BACKEND_DOWN, "backend down",
	  "* BYE [UNAVAILABLE] Backend unavailable, try again later\r\n" },
	{ PROTO_IMAP, PE_INJECTION, "injection",
	  "* BYE Commands pipelined after STARTTLS are rejected\r\n" },
	{ PROTO_IMAP, PE_OVERLOAD, "overload",
	  "* BYE [UNAVAILABLE] Too many connections, try again later\r\n" },
	{ PROTO_IMAP, PE_SHUTDOWN, "shutdown",
	  "* BYE [UNAVAILABLE] Server shutting down, try again later\r\n" },
	{ PROTO_POP3, PE_LINE_TOO_LONG, "line too long", "-ERR Line too long\r\n" },
	{ PROTO_POP3, PE_TOO_MANY_COMMANDS, "too many commands", P_LIMIT },
	{ PROTO_POP3, PE_IDLE_TIMEOUT, "idle timeout", "-ERR Autologout; idle for too long\r\n" },
	{ PROTO_POP3, PE_BACKEND_DOWN, "backend down",
	  "-ERR [SYS/TEMP] Backend unavailable, try again later\r\n" },
	{ PROTO_POP3, PE_INJECTION, "injection",
	  "-ERR Commands pipelined after STLS are rejected\r\n" },
	{ PROTO_POP3, PE_OVERLOAD, "overload",
	  "-ERR [SYS/TEMP] Too many connections, try again later\r\n" },
	{ PROTO_POP3, PE_SHUTDOWN, "shutdown",
	  "-ERR [SYS/TEMP] Server shutting down, try again later\r\n" },
};

static void run_error_case(const struct error_case *c)
{
	struct proto_conf pc = make_conf(c->kind, OFFER | REQUIRE, 0);
	struct proto_reply r;
	struct tcase tc;

	tc_begin(&tc, "error reply: %s %s", kind_names[c->kind], c->name);
	memset(&r, 0x55, sizeof(r));
	proto_error_reply(&pc, c->err, &r);
	expect_well_formed(&tc, "reply", &r);
	expect_bytes(&tc, "reply", c->text, r.text, r.len);
	expect_counter(&tc, "reply", NULL, r.counter);
	tc_end(&tc);
}

/* ======================================================================
 * proto_forget and proto_replay
 * ====================================================================== */

struct replay_case {
	const char *name;
	enum proto_kind kind;
	unsigned max_commands;
	const char *lines[6]; /* fed through proto_command first */
	bool forget;          /* proto_forget before replaying */
	size_t cap;           /* replay buffer; 512 when 0 */
	const char *replay;   /* expected output ("" = nothing) */
	const char *after;    /* after forget: this command must get... */
	enum proto_verdict after_verdict; /* ...this verdict */
};

static const struct replay_case replay_cases[] = {
	{ "SMTP EHLO is replayed", PROTO_SMTP, 0, { "EHLO client.example" }, false, 0,
	  "EHLO client.example\r\n", NULL, PV_REPLY },
	{ "SMTP HELO is replayed", PROTO_SMTP, 0, { "HELO client.example" }, false, 0,
	  "HELO client.example\r\n", NULL, PV_REPLY },
	{ "SMTP lower-case ehlo is replayed upper-case", PROTO_SMTP, 0, { "ehlo client.example" },
	  false, 0, "EHLO client.example\r\n", NULL, PV_REPLY },
	{ "SMTP last greeting wins", PROTO_SMTP, 0, { "EHLO a.example", "HELO b.example" }, false, 0,
	  "HELO b.example\r\n", NULL, PV_REPLY },
	{ "SMTP bad EHLO keeps the earlier one", PROTO_SMTP, 0, { "HELO a.example", "EHLO" }, false,
	  0, "HELO a.example\r\n", NULL, PV_REPLY },
	{ "SMTP extra EHLO words are not replayed", PROTO_SMTP, 0,
	  { "EHLO a.example junk\x01" "junk" }, false, 0, "EHLO a.example\r\n", NULL, PV_REPLY },
	{ "SMTP nothing to replay without EHLO", PROTO_SMTP, 0, { "NOOP" }, false, 0, "", NULL,
	  PV_REPLY },
	{ "SMTP replay that does not fit yields nothing", PROTO_SMTP, 0, { "EHLO a.example" }, false,
	  15, "", NULL, PV_REPLY },
	{ "SMTP replay fits exactly", PROTO_SMTP, 0, { "EHLO a.example" }, false, 17,
	  "EHLO a.example\r\n", NULL, PV_REPLY },
	{ "SMTP forget drops the EHLO name", PROTO_SMTP, 0, { "EHLO a.example", "NOOP" }, true, 0,
	  "", NULL, PV_REPLY },
	{ "SMTP forget resets the budget", PROTO_SMTP, 2, { "NOOP", "NOOP" }, true, 0, "", "NOOP",
	  PV_REPLY },
	{ "SMTP without forget the budget is spent", PROTO_SMTP, 2, { "NOOP", "NOOP" }, false, 0, "",
	  "NOOP", PV_CLOSE },
	{ "IMAP never replays", PROTO_IMAP, 0, { "a1 CAPABILITY", "a2 NOOP" }, false, 0, "", NULL,
	  PV_REPLY },
	{ "IMAP forget resets the budget", PROTO_IMAP, 1, { "a1 NOOP" }, true, 0, "", "a2 NOOP",
	  PV_REPLY },
	{ "POP3 never replays", PROTO_POP3, 0, { "CAPA" }, false, 0, "", NULL, PV_REPLY },
	{ "POP3 forget resets the budget", PROTO_POP3, 1, { "CAPA" }, true, 0, "", "NOOP",
	  PV_REPLY },
};

static void run_replay_case(const struct replay_case *c)
{
	struct proto_conf pc = make_conf(c->kind, OFFER, c->max_commands);
	struct proto_state st, zero;
	struct proto_reply r;
	struct tcase tc;
	size_t cap = c->cap ? c->cap : 512, n, i;
	char *out = malloc(cap); /* exact size: ASan sees overruns */

	tc_begin(&tc, "replay: %s", c->name);
	if (!out)
		abort();
	memset(&st, 0, sizeof(st));
	memset(&zero, 0, sizeof(zero));
	for (i = 0; i < N_ELEMS(c->lines) && c->lines[i]; i++)
		proto_command(&pc, &st, c->lines[i], strlen(c->lines[i]), &r);
	if (c->forget) {
		memset(&st, 0x5a, sizeof(st));
		proto_forget(&st);
		if (memcmp(&st, &zero, sizeof(st)) != 0)
			tc_fail(&tc, "proto_forget left state behind");
	}
	memset(out, 0x55, cap);
	n = proto_replay(&pc, &st, out, cap);
	if (n > cap)
		tc_fail(&tc, "replay length %zu exceeds cap %zu", n, cap);
	else
		expect_bytes(&tc, "replay", c->replay, out, n);
	if (c->after) {
		enum proto_verdict v = proto_command(&pc, &st, c->after, strlen(c->after), &r);

		if (v != c->after_verdict)
			tc_fail(&tc, "\"%s\" afterwards: expected %s, got %s", c->after,
				verdict_name(c->after_verdict), verdict_name(v));
	}
	free(out);
	tc_end(&tc);
}

/* The longest EHLO name must replay in full. */
static void run_replay_longest(void)
{
	struct proto_conf pc = make_conf(PROTO_SMTP, OFFER, 0);
	struct proto_state st;
	struct proto_reply r;
	struct tcase tc;
	char line[300], exp[300], out[512];
	size_t n;

	tc_begin(&tc, "replay: SMTP 255-byte EHLO name");
	memset(&st, 0, sizeof(st));
	snprintf(line, sizeof(line), "EHLO %s", helo_255);
	snprintf(exp, sizeof(exp), "EHLO %s\r\n", helo_255);
	if (proto_command(&pc, &st, line, strlen(line), &r) != PV_REPLY)
		tc_fail(&tc, "EHLO refused");
	n = proto_replay(&pc, &st, out, sizeof(out));
	expect_bytes(&tc, "replay", exp, out, n);
	tc_end(&tc);
}

/* ======================================================================
 * Pipelining and injection: bytes through line_next + proto_command,
 * as the session loop does
 * ====================================================================== */

enum pipe_end { END_VERDICT, END_PARTIAL, END_TOO_LONG };

struct pipe_case {
	const char *name;
	enum proto_kind kind;
	unsigned tls;
	const char *head;   /* input is head + fill bytes of 'x' + tail */
	size_t fill;
	const char *tail;
	enum proto_verdict verdicts[6]; /* one per complete line handled */
	unsigned nverdicts;
	enum pipe_end end;
	size_t leftover;    /* unconsumed bytes when the loop stops */
	const char *error;  /* END_TOO_LONG: expected PE_LINE_TOO_LONG reply */
};

static const struct pipe_case pipe_cases[] = {
	{ "SMTP STARTTLS with MAIL pipelined behind it", PROTO_SMTP, OFFER | REQUIRE,
	  "STARTTLS\r\nMAIL FROM:<a>\r\n", 0, "", { PV_STARTTLS }, 1, END_VERDICT, 15, NULL },
	{ "SMTP STARTTLS with LF-only MAIL pipelined", PROTO_SMTP, OFFER,
	  "STARTTLS\nMAIL FROM:<a>\n", 0, "", { PV_STARTTLS }, 1, END_VERDICT, 14, NULL },
	{ "SMTP STARTTLS with one stray byte behind it", PROTO_SMTP, OFFER, "EHLO c\r\nSTARTTLS\r\nQ",
	  0, "", { PV_REPLY, PV_STARTTLS }, 2, END_VERDICT, 1, NULL },
	{ "SMTP clean STARTTLS leaves nothing", PROTO_SMTP, OFFER | REQUIRE,
	  "EHLO c\r\nMAIL FROM:<a>\r\nSTARTTLS\r\n", 0, "", { PV_REPLY, PV_REPLY, PV_STARTTLS }, 3,
	  END_VERDICT, 0, NULL },
	{ "SMTP pipelined commands before STARTTLS are answered in order", PROTO_SMTP, OFFER,
	  "EHLO c\r\nNOOP\r\nRSET\r\nSTARTTLS\r\n", 0, "",
	  { PV_REPLY, PV_REPLY, PV_REPLY, PV_STARTTLS }, 4, END_VERDICT, 0, NULL },
	{ "SMTP relay stops at the first relayed line", PROTO_SMTP, OFFER,
	  "EHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\n", 0, "", { PV_REPLY, PV_RELAY }, 2,
	  END_VERDICT, 13, NULL },
	{ "SMTP partial line waits", PROTO_SMTP, OFFER, "EHLO c\r\nSTART", 0, "", { PV_REPLY }, 1,
	  END_PARTIAL, 5, NULL },
	{ "SMTP over-long line", PROTO_SMTP, OFFER, "", 600, "", { PV_REPLY }, 0, END_TOO_LONG, 600,
	  "500 5.5.2 Line too long\r\n" },
	{ "SMTP over-long line after a good one", PROTO_SMTP, OFFER, "NOOP\r\n", 511, "\r\n",
	  { PV_REPLY }, 1, END_TOO_LONG, 513, "500 5.5.2 Line too long\r\n" },
	{ "SMTP 512-byte line is still accepted", PROTO_SMTP, OFFER, "NOOP ", 505, "\r\n",
	  { PV_REPLY }, 1, END_PARTIAL, 0, NULL },
	{ "IMAP STARTTLS with LOGIN pipelined behind it", PROTO_IMAP, OFFER | REQUIRE,
	  "a STARTTLS\r\nb LOGIN u p\r\n", 0, "", { PV_STARTTLS }, 1, END_VERDICT, 13, NULL },
	{ "IMAP over-long line", PROTO_IMAP, OFFER, "a ID ", 8186, "\r\n", { PV_REPLY }, 0,
	  END_TOO_LONG, 8193, "* BYE Command line too long\r\n" },
	{ "IMAP 8192-byte line is still accepted", PROTO_IMAP, OFFER, "a ID ", 8185, "\r\n",
	  { PV_REPLY }, 1, END_PARTIAL, 0, NULL },
	{ "POP3 STLS with USER pipelined behind it", PROTO_POP3, OFFER | REQUIRE,
	  "STLS\r\nUSER bob\r\n", 0, "", { PV_STARTTLS }, 1, END_VERDICT, 10, NULL },
	{ "POP3 CAPA then STLS", PROTO_POP3, OFFER, "CAPA\r\nSTLS\r\n", 0, "",
	  { PV_REPLY, PV_STARTTLS }, 2, END_VERDICT, 0, NULL },
	{ "POP3 over-long line", PROTO_POP3, OFFER, "NOOP ", 249, "\r\n", { PV_REPLY }, 0,
	  END_TOO_LONG, 256, "-ERR Line too long\r\n" },
	{ "POP3 255-byte line is still accepted", PROTO_POP3, OFFER, "NOOP ", 248, "\r\n",
	  { PV_REPLY }, 1, END_PARTIAL, 0, NULL },
};

static void run_pipe_case(const struct pipe_case *c)
{
	struct proto_conf pc = make_conf(c->kind, c->tls, 0);
	size_t maxline = proto_default_max_line(c->kind);
	size_t hl = strlen(c->head), tl = strlen(c->tail), n = hl + c->fill + tl, off = 0;
	uint8_t *p = malloc(n + 1);
	struct proto_state st;
	struct proto_reply r;
	struct tcase tc;
	enum pipe_end end;
	unsigned i = 0;

	tc_begin(&tc, "pipelining: %s", c->name);
	if (!p)
		abort();
	memcpy(p, c->head, hl);
	memset(p + hl, 'x', c->fill);
	memcpy(p + hl + c->fill, c->tail, tl);
	memset(&st, 0, sizeof(st));
	for (;;) {
		const char *line;
		size_t len, adv;
		enum line_status ls = line_next(p + off, n - off, maxline, &line, &len, &adv);
		enum proto_verdict v;

		if (ls == LINE_TOO_LONG) {
			end = END_TOO_LONG;
			proto_error_reply(&pc, PE_LINE_TOO_LONG, &r);
			expect_bytes(&tc, "line-too-long reply", c->error ? c->error : "", r.text,
				     r.len);
			break;
		}
		if (ls == LINE_PARTIAL) {
			end = END_PARTIAL;
			break;
		}
		off += adv;
		v = proto_command(&pc, &st, line, len, &r);
		if (i < c->nverdicts && v != c->verdicts[i])
			tc_fail(&tc, "line %u \"%s\": expected %s, got %s", i + 1, esc(line, len),
				verdict_name(c->verdicts[i]), verdict_name(v));
		i++;
		if (v != PV_REPLY) {
			end = END_VERDICT;
			break;
		}
	}
	expect_long(&tc, "complete lines handled", c->nverdicts, i);
	if (end != c->end)
		tc_fail(&tc, "loop ended by %s, expected %s",
			end == END_VERDICT ? "a verdict" : end == END_PARTIAL ? "a partial line" : "a too-long line",
			c->end == END_VERDICT ? "a verdict" : c->end == END_PARTIAL ? "a partial line" : "a too-long line");
	expect_long(&tc, "unconsumed bytes", (long)c->leftover, (long)(n - off));
	free(p);
	tc_end(&tc);
}

/* ======================================================================
 * Backend responses: proto_caps_command + proto_resp_line
 * ====================================================================== */

struct caps_cmd_case {
	enum proto_kind kind;
	const char *line;
	bool is_caps;
	const char *tag; /* IMAP: expected tag when is_caps */
};

static const struct caps_cmd_case caps_cmd_cases[] = {
	{ PROTO_SMTP, "EHLO gw.example", true, "" },
	{ PROTO_SMTP, "HELO gw.example", true, "" },
	{ PROTO_SMTP, "ehlo gw.example", true, "" },
	{ PROTO_SMTP, "EHLO", true, "" },
	{ PROTO_SMTP, "EHLOX gw.example", false, NULL },
	{ PROTO_SMTP, "MAIL FROM:<a@example.org>", false, NULL },
	{ PROTO_SMTP, "STARTTLS", false, NULL },
	{ PROTO_SMTP, "", false, NULL },
	{ PROTO_IMAP, "a1 CAPABILITY", true, "a1" },
	{ PROTO_IMAP, "A.002 capability", true, "A.002" },
	{ PROTO_IMAP, "a1 CAPABILITY extra", false, NULL },
	{ PROTO_IMAP, "a1 NOOP", false, NULL },
	{ PROTO_IMAP, "CAPABILITY", false, NULL },
	{ PROTO_IMAP, "a+ CAPABILITY", false, NULL },
	{ PROTO_IMAP, "", false, NULL },
	{ PROTO_POP3, "CAPA", true, "" },
	{ PROTO_POP3, "capa", true, "" },
	{ PROTO_POP3, "CAPA  ", true, "" },
	{ PROTO_POP3, "CAPA x", false, NULL },
	{ PROTO_POP3, "STLS", false, NULL },
	{ PROTO_POP3, "", false, NULL },
};

static void run_caps_cmd_case(const struct caps_cmd_case *c)
{
	struct proto_resp st;
	struct tcase tc;
	bool got;

	tc_begin(&tc, "caps command: %s \"%s\"", kind_names[c->kind], escz(c->line));
	memset(&st, 0x55, sizeof(st));
	got = proto_caps_command(c->kind, c->line, strlen(c->line), &st);
	expect_long(&tc, "is a capability command", c->is_caps, got);
	if (got) {
		expect_long(&tc, "what", RESP_CAPS, st.what);
		expect_long(&tc, "kind", c->kind, st.kind);
		expect_long(&tc, "nlines", 0, st.nlines);
		expect_long(&tc, "ok", 0, st.ok);
		if (memchr(st.tag, '\0', sizeof(st.tag)) == NULL)
			tc_fail(&tc, "tag not NUL-terminated");
		else
			expect_bytes(&tc, "tag", c->tag, st.tag, strlen(st.tag));
	}
	tc_end(&tc);
}

struct resp_case {
	const char *name;
	enum proto_kind kind;
	enum proto_resp_kind what;
	const char *caps_cmd; /* RESP_CAPS: the client line that asked */
	const char *lines[8];
	int rets[8];
	bool ok; /* when the last return is 1 */
};

static const struct resp_case resp_cases[] = {
	/* SMTP, RFC 5321 §4.2 */
	{ "SMTP one-line greeting", PROTO_SMTP, RESP_GREETING, NULL,
	  { "220 backend.example ESMTP Postfix" }, { 1 }, true },
	{ "SMTP multi-line greeting", PROTO_SMTP, RESP_GREETING, NULL,
	  { "220-backend.example ESMTP", "220-no UCE", "220 ready" }, { 0, 0, 1 }, true },
	{ "SMTP bare code ends a reply", PROTO_SMTP, RESP_GREETING, NULL, { "220" }, { 1 }, true },
	{ "SMTP 554 greeting is negative", PROTO_SMTP, RESP_GREETING, NULL,
	  { "554 5.3.2 No service" }, { 1 }, false },
	{ "SMTP 421 greeting is negative", PROTO_SMTP, RESP_GREETING, NULL,
	  { "421 4.3.2 busy" }, { 1 }, false },
	{ "SMTP not a reply: text", PROTO_SMTP, RESP_GREETING, NULL, { "hello" }, { -1 }, false },
	{ "SMTP not a reply: short code", PROTO_SMTP, RESP_GREETING, NULL, { "22" }, { -1 }, false },
	{ "SMTP not a reply: code 6xx", PROTO_SMTP, RESP_GREETING, NULL, { "600 x" }, { -1 }, false },
	{ "SMTP not a reply: code 0xx", PROTO_SMTP, RESP_GREETING, NULL, { "020 x" }, { -1 }, false },
	{ "SMTP not a reply: letter in code", PROTO_SMTP, RESP_GREETING, NULL, { "2x0 x" }, { -1 },
	  false },
	{ "SMTP not a reply: bad separator", PROTO_SMTP, RESP_GREETING, NULL, { "220x" }, { -1 },
	  false },
	{ "SMTP bad line in the middle", PROTO_SMTP, RESP_GREETING, NULL, { "220-a", "junk" },
	  { 0, -1 }, false },
	{ "SMTP EHLO reply", PROTO_SMTP, RESP_CAPS, "EHLO gw.example",
	  { "250-backend.example", "250-PIPELINING", "250-STARTTLS", "250-SIZE 10240000",
	    "250 SMTPUTF8" }, { 0, 0, 0, 0, 1 }, true },
	{ "SMTP EHLO refused", PROTO_SMTP, RESP_CAPS, "EHLO gw.example",
	  { "502 5.5.1 Command not implemented" }, { 1 }, false },
	{ "SMTP replay answered", PROTO_SMTP, RESP_REPLAY, NULL, { "250-b.example", "250 OK" },
	  { 0, 1 }, true },

	/* IMAP, RFC 9051 §7.1 */
	{ "IMAP OK greeting", PROTO_IMAP, RESP_GREETING, NULL,
	  { "* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready." }, { 1 }, true },
	{ "IMAP PREAUTH greeting", PROTO_IMAP, RESP_GREETING, NULL,
	  { "* PREAUTH IMAP4rev2 server logged in as Smith" }, { 1 }, true },
	{ "IMAP BYE greeting is negative", PROTO_IMAP, RESP_GREETING, NULL,
	  { "* BYE Autologout; idle for too long" }, { 1 }, false },
	{ "IMAP lower-case ok greeting", PROTO_IMAP, RESP_GREETING, NULL, { "* ok hi" }, { 1 },
	  true },
	{ "IMAP greeting: NO is not a greeting", PROTO_IMAP, RESP_GREETING, NULL, { "* NO x" },
	  { -1 }, false },
	{ "IMAP greeting: tagged line is not a greeting", PROTO_IMAP, RESP_GREETING, NULL,
	  { "a1 OK x" }, { -1 }, false },
	{ "IMAP greeting: continuation is not a greeting", PROTO_IMAP, RESP_GREETING, NULL,
	  { "+ go ahead" }, { -1 }, false },
	{ "IMAP CAPABILITY reply", PROTO_IMAP, RESP_CAPS, "a1 CAPABILITY",
	  { "* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN", "a1 OK Pre-login capabilities listed" },
	  { 0, 1 }, true },
	{ "IMAP CAPABILITY reply with several untagged lines", PROTO_IMAP, RESP_CAPS,
	  "a1 CAPABILITY", { "* CAPABILITY IMAP4rev1", "* OK still here", "a1 OK done" },
	  { 0, 0, 1 }, true },
	{ "IMAP CAPABILITY reply NO", PROTO_IMAP, RESP_CAPS, "a1 CAPABILITY",
	  { "a1 NO not now" }, { 1 }, false },
	{ "IMAP CAPABILITY reply BAD", PROTO_IMAP, RESP_CAPS, "a1 CAPABILITY",
	  { "* CAPABILITY IMAP4rev1", "a1 BAD what" }, { 0, 1 }, false },
	{ "IMAP completion with another tag", PROTO_IMAP, RESP_CAPS, "a1 CAPABILITY",
	  { "b2 OK done" }, { -1 }, false },
	{ "IMAP completion: tag prefix is not the tag", PROTO_IMAP, RESP_CAPS, "a1 CAPABILITY",
	  { "a10 OK done" }, { -1 }, false },
	{ "IMAP completion: tag glued to status", PROTO_IMAP, RESP_CAPS, "a1 CAPABILITY",
	  { "a1OK done" }, { -1 }, false },
	{ "IMAP continuation in a CAPABILITY reply", PROTO_IMAP, RESP_CAPS, "a1 CAPABILITY",
	  { "+ more" }, { -1 }, false },

	/* POP3, RFC 1939 §3, RFC 2449 §5 */
	{ "POP3 +OK greeting", PROTO_POP3, RESP_GREETING, NULL,
	  { "+OK Dovecot ready." }, { 1 }, true },
	{ "POP3 bare +OK greeting", PROTO_POP3, RESP_GREETING, NULL, { "+OK" }, { 1 }, true },
	{ "POP3 -ERR greeting", PROTO_POP3, RESP_GREETING, NULL,
	  { "-ERR [SYS/TEMP] busy" }, { 1 }, false },
	{ "POP3 greeting: junk", PROTO_POP3, RESP_GREETING, NULL, { "hello" }, { -1 }, false },
	{ "POP3 CAPA list", PROTO_POP3, RESP_CAPS, "CAPA",
	  { "+OK Capability list follows", "TOP", "STLS", "SASL PLAIN", "UIDL", "." },
	  { 0, 0, 0, 0, 0, 1 }, true },
	{ "POP3 empty CAPA list", PROTO_POP3, RESP_CAPS, "CAPA", { "+OK", "." }, { 0, 1 }, true },
	{ "POP3 CAPA -ERR", PROTO_POP3, RESP_CAPS, "CAPA", { "-ERR unknown command" }, { 1 },
	  false },
	{ "POP3 CAPA byte-stuffed line is not the end", PROTO_POP3, RESP_CAPS, "CAPA",
	  { "+OK", "..X-ODD", ". ", "." }, { 0, 0, 0, 1 }, true },
	{ "POP3 CAPA junk first line", PROTO_POP3, RESP_CAPS, "CAPA", { "TOP" }, { -1 }, false },
};

static void run_resp_case(const struct resp_case *c)
{
	struct proto_resp st;
	struct tcase tc;
	size_t i;

	tc_begin(&tc, "response: %s", c->name);
	if (c->caps_cmd) {
		if (!proto_caps_command(c->kind, c->caps_cmd, strlen(c->caps_cmd), &st))
			tc_fail(&tc, "\"%s\" not taken as a capability command", c->caps_cmd);
	} else {
		memset(&st, 0, sizeof(st));
		st.kind = c->kind;
		st.what = c->what;
	}
	for (i = 0; !tc.nfail && i < N_ELEMS(c->lines) && c->lines[i]; i++) {
		int ret = proto_resp_line(&st, c->lines[i], strlen(c->lines[i]));
		char what[96];

		snprintf(what, sizeof(what), "line %zu \"%s\"", i + 1, escz(c->lines[i]));
		expect_long(&tc, what, c->rets[i], ret);
		expect_long(&tc, "nlines", (long)i + 1, st.nlines);
		if (ret == 1)
			expect_long(&tc, "ok", c->ok, st.ok);
		if (ret != 0 && i + 1 < N_ELEMS(c->lines) && c->lines[i + 1])
			tc_fail(&tc, "response ended at line %zu but the table goes on", i + 1);
	}
	tc_end(&tc);
}

/* ======================================================================
 * Capability filtering of backend replies
 * ====================================================================== */

struct filter_case {
	const char *name;
	enum proto_kind kind;
	const char *in;
	size_t cap; /* output buffer; 4096 when 0 */
	const char *out; /* NULL: expect -1 */
};

static const struct filter_case filter_cases[] = {
	/* SMTP: RFC 3207 §4 keyword in an RFC 5321 §4.1.1.1 EHLO reply */
	{ "SMTP STARTTLS in the middle", PROTO_SMTP,
	  "250-backend.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 SIZE 10240000\r\n", 0,
	  "250-backend.example\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n" },
	{ "SMTP STARTTLS as the last line", PROTO_SMTP,
	  "250-backend.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n", 0,
	  "250-backend.example\r\n250 PIPELINING\r\n" },
	{ "SMTP STARTTLS as the only extension", PROTO_SMTP,
	  "250-backend.example\r\n250 STARTTLS\r\n", 0, "250 backend.example\r\n" },
	{ "SMTP STARTTLS in lower case with trailing spaces", PROTO_SMTP,
	  "250-b.example\r\n250-starttls  \r\n250 8BITMIME\r\n", 0,
	  "250-b.example\r\n250 8BITMIME\r\n" },
	{ "SMTP STARTTLS keyword with a parameter", PROTO_SMTP,
	  "250-b.example\r\n250-STARTTLS REQUIRED\r\n250 SIZE\r\n", 0,
	  "250-b.example\r\n250 SIZE\r\n" },
	{ "SMTP STARTTLS keyword with a parameter as the last line", PROTO_SMTP,
	  "250-b.example\r\n250-SIZE\r\n250 STARTTLS x\r\n", 0,
	  "250-b.example\r\n250 SIZE\r\n" },
	{ "SMTP no STARTTLS: unchanged", PROTO_SMTP,
	  "250-b.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n", 0,
	  "250-b.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n" },
	{ "SMTP look-alike keywords are kept", PROTO_SMTP,
	  "250-b.example\r\n250-X-STARTTLS\r\n250-STARTTLSX\r\n250 AUTH STARTTLS\r\n", 0,
	  "250-b.example\r\n250-X-STARTTLS\r\n250-STARTTLSX\r\n250 AUTH STARTTLS\r\n" },
	{ "SMTP LF-only reply gets CRLF", PROTO_SMTP,
	  "250-b.example\n250-STARTTLS\n250 SIZE\n", 0, "250-b.example\r\n250 SIZE\r\n" },
	{ "SMTP reply without final CRLF gets one", PROTO_SMTP, "250-b.example\r\n250 SIZE", 0,
	  "250-b.example\r\n250 SIZE\r\n" },
	{ "SMTP one-line HELO reply", PROTO_SMTP, "250 b.example\r\n", 0, "250 b.example\r\n" },
	{ "SMTP error reply", PROTO_SMTP, "502 5.5.1 Command not implemented\r\n", 0,
	  "502 5.5.1 Command not implemented\r\n" },
	{ "SMTP empty input", PROTO_SMTP, "", 0, "" },
	{ "SMTP output exactly fills the buffer", PROTO_SMTP,
	  "250-b.example\r\n250 STARTTLS\r\n", 15, "250 b.example\r\n" },
	{ "SMTP output one byte over the buffer", PROTO_SMTP,
	  "250-b.example\r\n250 STARTTLS\r\n", 14, NULL },
	{ "SMTP one-byte buffer", PROTO_SMTP, "250 b.example\r\n", 1, NULL },

	/* IMAP: RFC 9051 §7.2.2 CAPABILITY response, §7.1 [CAPABILITY] code */
	{ "IMAP untagged CAPABILITY loses STARTTLS and LOGINDISABLED", PROTO_IMAP,
	  "* CAPABILITY IMAP4rev1 SASL-IR STARTTLS LOGINDISABLED AUTH=PLAIN ID\r\n"
	  "a1 OK Pre-login capabilities listed\r\n", 0,
	  "* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID\r\na1 OK Pre-login capabilities listed\r\n" },
	{ "IMAP greeting CAPABILITY code", PROTO_IMAP,
	  "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS "
	  "LOGINDISABLED] Dovecot ready.\r\n", 0,
	  "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+] "
	  "Dovecot ready.\r\n" },
	{ "IMAP tagged completion CAPABILITY code", PROTO_IMAP,
	  "a2 OK [CAPABILITY IMAP4rev1 STARTTLS UIDPLUS] Logged in\r\n", 0,
	  "a2 OK [CAPABILITY IMAP4rev1 UIDPLUS] Logged in\r\n" },
	{ "IMAP hidden words first and last in a code", PROTO_IMAP,
	  "* OK [CAPABILITY STARTTLS IMAP4rev1 LOGINDISABLED] hi\r\n", 0,
	  "* OK [CAPABILITY IMAP4rev1] hi\r\n" },
	{ "IMAP lower-case untagged capability", PROTO_IMAP,
	  "* capability imap4rev1 starttls logindisabled idle\r\n", 0,
	  "* capability imap4rev1 idle\r\n" },
	{ "IMAP lower-case capability code", PROTO_IMAP,
	  "* OK [capability imap4rev1 starttls logindisabled idle] ready\r\n", 0,
	  "* OK [capability imap4rev1 idle] ready\r\n" },
	{ "IMAP mixed-case capability code in a tagged OK", PROTO_IMAP,
	  "a1 OK [Capability IMAP4rev1 StartTLS] done\r\n", 0,
	  "a1 OK [Capability IMAP4rev1] done\r\n" },
	{ "IMAP look-alike capabilities are kept", PROTO_IMAP,
	  "* CAPABILITY IMAP4rev1 X-STARTTLS STARTTLS2 LOGINDISABLEDX AUTH=STARTTLS\r\n", 0,
	  "* CAPABILITY IMAP4rev1 X-STARTTLS STARTTLS2 LOGINDISABLEDX AUTH=STARTTLS\r\n" },
	{ "IMAP repeated spaces collapse", PROTO_IMAP, "* CAPABILITY IMAP4rev1  STARTTLS   IDLE\r\n",
	  0, "* CAPABILITY IMAP4rev1 IDLE\r\n" },
	{ "IMAP STARTTLS in free text is not a capability", PROTO_IMAP,
	  "* OK STARTTLS LOGINDISABLED are words here\r\na1 OK done\r\n", 0,
	  "* OK STARTTLS LOGINDISABLED are words here\r\na1 OK done\r\n" },
	{ "IMAP unterminated code is left alone", PROTO_IMAP,
	  "* OK [CAPABILITY IMAP4rev1 STARTTLS no bracket\r\n", 0,
	  "* OK [CAPABILITY IMAP4rev1 STARTTLS no bracket\r\n" },
	{ "IMAP CAPABILITY line without capabilities", PROTO_IMAP, "* CAPABILITY\r\n", 0,
	  "* CAPABILITY\r\n" },
	{ "IMAP LF-only input gets CRLF", PROTO_IMAP, "* CAPABILITY IMAP4rev1 STARTTLS\na1 OK\n", 0,
	  "* CAPABILITY IMAP4rev1\r\na1 OK\r\n" },
	{ "IMAP output exactly fills the buffer", PROTO_IMAP, "* CAPABILITY IMAP4rev1 STARTTLS\r\n",
	  24, "* CAPABILITY IMAP4rev1\r\n" },
	{ "IMAP output one byte over the buffer", PROTO_IMAP, "* CAPABILITY IMAP4rev1 STARTTLS\r\n",
	  23, NULL },
	{ "IMAP code output one byte over the buffer", PROTO_IMAP,
	  "* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", 31, NULL },
	{ "IMAP code output exactly fills the buffer", PROTO_IMAP,
	  "* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", 32, "* OK [CAPABILITY IMAP4rev1] hi\r\n" },

	/* POP3: RFC 2449 §5 CAPA, RFC 2595 §4 STLS */
	{ "POP3 CAPA loses STLS", PROTO_POP3,
	  "+OK Capability list follows\r\nTOP\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n", 0,
	  "+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN\r\n.\r\n" },
	{ "POP3 lower-case stls with trailing space", PROTO_POP3, "+OK\r\nstls \r\nUIDL\r\n.\r\n", 0,
	  "+OK\r\nUIDL\r\n.\r\n" },
	{ "POP3 STLS with a parameter", PROTO_POP3, "+OK\r\nTOP\r\nSTLS x\r\nUSER\r\n.\r\n", 0,
	  "+OK\r\nTOP\r\nUSER\r\n.\r\n" },
	{ "POP3 look-alikes are kept", PROTO_POP3, "+OK\r\nSTLSX\r\nX-STLS\r\nSASL STLS\r\n.\r\n", 0,
	  "+OK\r\nSTLSX\r\nX-STLS\r\nSASL STLS\r\n.\r\n" },
	{ "POP3 -ERR unchanged", PROTO_POP3, "-ERR no CAPA here\r\n", 0, "-ERR no CAPA here\r\n" },
	{ "POP3 output exactly fills the buffer", PROTO_POP3, "+OK\r\nSTLS\r\n.\r\n", 8,
	  "+OK\r\n.\r\n" },
	{ "POP3 output one byte over the buffer", PROTO_POP3, "+OK\r\nSTLS\r\n.\r\n", 7, NULL },
};

static void run_filter_case(const struct filter_case *c)
{
	size_t cap = c->cap ? c->cap : 4096;
	char *out = malloc(cap); /* exact size: ASan sees overruns */
	struct tcase tc;
	long n;

	tc_begin(&tc, "filter caps: %s", c->name);
	if (!out)
		abort();
	n = proto_filter_caps(c->kind, c->in, strlen(c->in), out, cap);
	if (!c->out) {
		expect_long(&tc, "result", -1, n);
	} else if (n < 0 || (size_t)n > cap) {
		tc_fail(&tc, "expected \"%s\", got %ld (cap %zu)", escz(c->out), n, cap);
	} else {
		expect_bytes(&tc, "output", c->out, out, (size_t)n);
	}
	free(out);
	tc_end(&tc);
}

/* ======================================================================
 * Names, limits and counters
 * ====================================================================== */

struct name_case {
	const char *name;
	int kind; /* -1: proto_parse_name must fail */
	unsigned max_line;
};

static const struct name_case name_cases[] = {
	{ "smtp", PROTO_SMTP, 512 }, /* RFC 5321 §4.5.3.1.4 */
	{ "imap", PROTO_IMAP, 8192 },
	{ "pop3", PROTO_POP3, 255 }, /* RFC 2449 §4 */
	{ "SMTP", -1, 0 },
	{ "pop", -1, 0 },
	{ "", -1, 0 },
};

static void run_name_case(const struct name_case *c)
{
	enum proto_kind k = PROTO_COUNT;
	struct tcase tc;
	int rc;

	tc_begin(&tc, "proto name: \"%s\"", c->name);
	rc = proto_parse_name(c->name, &k);
	if (c->kind < 0) {
		expect_long(&tc, "proto_parse_name", -1, rc);
	} else if (expect_long(&tc, "proto_parse_name", 0, rc) &&
		   expect_long(&tc, "kind", c->kind, k)) {
		expect_bytes(&tc, "proto_name", c->name, proto_name(k), strlen(proto_name(k)));
		expect_long(&tc, "proto_default_max_line", c->max_line, proto_default_max_line(k));
	}
	tc_end(&tc);
}

struct stat_case {
	enum stat_id id;
	const char *name;
};

static const struct stat_case stat_cases[] = {
	{ STAT_starttls, "starttls" },
	{ STAT_starttls_injection, "starttls_injection" },
	{ STAT_require_tls_refused, "require_tls_refused" },
	{ STAT_line_too_long, "line_too_long" },
	{ STAT_pretls_limit, "pretls_limit" },
	{ STAT_plaintext_relay, "plaintext_relay" },
};

static void run_stat_case(const struct stat_case *c)
{
	struct tcase tc;
	uint64_t before;
	char line[4096], want[64];

	tc_begin(&tc, "stats: %s", c->name);
	expect_bytes(&tc, "stats_name", c->name, stats_name(c->id), strlen(stats_name(c->id)));
	/* Without stats_init the counters live in the process-local fallback row. */
	before = stats_sum(c->id);
	stats_inc(c->id);
	stats_add(c->id, 2);
	expect_long(&tc, "stats_sum", (long)(before + 3), (long)stats_sum(c->id));
	stats_format(line, sizeof(line));
	snprintf(want, sizeof(want), " %s=%llu", c->name, (unsigned long long)(before + 3));
	expect_true(&tc, "stats_format lacks the counter", strstr(line, want) != NULL);
	tc_end(&tc);
}

int main(void)
{
	size_t i;

	for (i = 0; i < N_ELEMS(greeting_cases); i++)
		run_greeting_case(&greeting_cases[i]);
	for (i = 0; i < N_ELEMS(dialogue_cases); i++)
		run_dialogue_case(&dialogue_cases[i]);
	for (i = 0; i < N_ELEMS(budget_cases); i++)
		run_budget_case(&budget_cases[i]);
	for (i = 0; i < N_ELEMS(error_cases); i++)
		run_error_case(&error_cases[i]);
	for (i = 0; i < N_ELEMS(replay_cases); i++)
		run_replay_case(&replay_cases[i]);
	run_replay_longest();
	for (i = 0; i < N_ELEMS(pipe_cases); i++)
		run_pipe_case(&pipe_cases[i]);
	for (i = 0; i < N_ELEMS(caps_cmd_cases); i++)
		run_caps_cmd_case(&caps_cmd_cases[i]);
	for (i = 0; i < N_ELEMS(resp_cases); i++)
		run_resp_case(&resp_cases[i]);
	for (i = 0; i < N_ELEMS(filter_cases); i++)
		run_filter_case(&filter_cases[i]);
	for (i = 0; i < N_ELEMS(name_cases); i++)
		run_name_case(&name_cases[i]);
	for (i = 0; i < N_ELEMS(stat_cases); i++)
		run_stat_case(&stat_cases[i]);
	return check_exit("test_proto");
}
