/*
 * session.h - one client connection, from accept to close: the gateway's own
 * pre-TLS dialogue, the handshake, the backend connection and the relay.
 * A session owns every byte of memory and every descriptor it uses, and
 * releases them in one place (session_close).
 */
#ifndef MAILGW_SESSION_H
#define MAILGW_SESSION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct worker;
struct listener_rt;
struct session;

/* Take an accepted, non-blocking client socket. Returns 0 or negative errno. */
int session_start(struct worker *w, struct listener_rt *l, int fd);

/* epoll told us something about one of the session's sockets. */
void session_event(struct session *s, bool backend, uint32_t events);

/* Do whatever work is possible now (called again for scheduled sessions). */
void session_run(struct session *s);

/* Deadline check; returns true when the session was closed. */
bool session_check_timeout(struct session *s, uint64_t now);

/* The worker's grace period is over: say goodbye where the protocol allows, close. */
void session_shutdown(struct session *s);

/* Free sessions closed during the last event batch. */
void session_reap(struct worker *w);

void session_log_prefix(const struct session *s, char *out, size_t cap);

/* List links, for the worker. */
struct session *session_next(struct session *s);
struct session **session_next_ready(struct session *s);
bool session_is_ready(const struct session *s);
void session_set_ready(struct session *s, bool ready);

#endif
