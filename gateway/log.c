/*
 * log.c - timestamped single-write log lines on stderr.
 */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "session.h"

static enum log_level level = LOG_INFO;
static char proc[16] = "master";
static const char *const names[] = { "debug", "info", "warn", "error" };

void log_set_level(enum log_level lvl) { level = lvl; }
int log_enabled(enum log_level lvl) { return lvl >= level; }

void log_set_proc(const char *tag)
{
	snprintf(proc, sizeof(proc), "%s", tag);
}

int log_parse_level(const char *s, enum log_level *out)
{
	unsigned i;

	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcmp(s, names[i]) == 0) {
			*out = (enum log_level)i;
			return 0;
		}
	}
	return -1;
}

static void log_write_escaped(const char *line, size_t len);

static void log_emit(enum log_level lvl, const char *prefix, const char *fmt, va_list ap)
{
	char line[2048];
	struct timeval tv;
	struct tm tm;
	size_t off;
	int n;

	gettimeofday(&tv, NULL);
	gmtime_r(&tv.tv_sec, &tm);
	off = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
	n = snprintf(line + off, sizeof(line) - off, ".%03ldZ %s %s %s", (long)tv.tv_usec / 1000,
		     names[lvl], proc, prefix);
	if (n > 0)
		off += (size_t)n;
	if (off < sizeof(line)) {
		n = vsnprintf(line + off, sizeof(line) - off, fmt, ap);
		if (n > 0)
			off += (size_t)n;
	}
	if (off > sizeof(line) - 1)
		off = sizeof(line) - 1;
	log_write_escaped(line, off);
}

/*
 * One event, one line, and nothing a peer sends can move the cursor, clear
 * the screen or forge a line: control bytes and non-ASCII are written as
 * \xNN.
 */
static void log_write_escaped(const char *line, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	char out[2048 * 4 + 2];
	size_t i, o = 0;

	for (i = 0; i < len; i++) {
		unsigned char c = (unsigned char)line[i];
		if (c >= 0x20 && c < 0x7f && c != '\\') {
			out[o++] = (char)c;
		} else {
			out[o++] = '\\';
			out[o++] = 'x';
			out[o++] = hex[c >> 4];
			out[o++] = hex[c & 15];
		}
	}
	out[o++] = '\n';
	(void)!write(STDERR_FILENO, out, o);
}

void log_msg(enum log_level lvl, const char *fmt, ...)
{
	va_list ap;

	if (lvl < level)
		return;
	va_start(ap, fmt);
	log_emit(lvl, "", fmt, ap);
	va_end(ap);
}

void log_sess(enum log_level lvl, const struct session *s, const char *fmt, ...)
{
	char prefix[256];
	va_list ap;

	if (lvl < level)
		return;
	session_log_prefix(s, prefix, sizeof(prefix));
	va_start(ap, fmt);
	log_emit(lvl, prefix, fmt, ap);
	va_end(ap);
}
