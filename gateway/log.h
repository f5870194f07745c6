/*
 * log.h - one line per event on stderr:
 *   2026-11-23T11:20:00.123Z info [listener] 127.0.0.1:40000 sid=0123456789ab message
 * Each line is written with a single write(2), so lines from several worker
 * processes never interleave. Secrets are never passed to these functions.
 */
#ifndef MAILGW_LOG_H
#define MAILGW_LOG_H

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

void log_set_level(enum log_level lvl);
int log_parse_level(const char *s, enum log_level *out);
int log_enabled(enum log_level lvl);
/* Process tag shown in every line, e.g. "master" or "w0". */
void log_set_proc(const char *tag);

void log_msg(enum log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A session's lines: listener, client address and session id up front. */
struct session;
void log_sess(enum log_level lvl, const struct session *s, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
