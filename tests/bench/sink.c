/* Benchmark backend for mailgw: a single-threaded epoll server that speaks
 * just enough SMTP and IMAP to sink or source data, plus a tiny HTTP
 * responder for nginx's mail auth_http protocol. It must never be the
 * bottleneck: no parsing beyond command verbs, fixed buffers, no logging.
 *
 * usage: sink SMTP_PORT IMAP_PORT AUTH_PORT
 *
 * SMTP verbs: EHLO/HELO, MAIL, RCPT, RSET, NOOP, DATA (until CRLF.CRLF),
 * BDAT n [LAST] (swallows n raw bytes), XSRC n (sends n raw bytes), QUIT.
 * IMAP: CAPABILITY, LOGIN, LOGOUT; every other command gets "tag OK".
 * auth_http: every request gets Auth-Status OK pointing at the SMTP or IMAP
 * port, chosen by the Auth-Protocol header. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

enum kind { K_SMTP, K_IMAP, K_AUTH };
enum mode { M_CMD, M_DATA, M_BDAT, M_CLOSING };

#define IBUF 65536
#define OBUF 4096

struct conn {
    int fd;
    enum kind kind;
    enum mode mode;
    int dot;              /* matched prefix of "\r\n.\r\n" in DATA mode */
    uint64_t bdat_left;   /* raw bytes still to swallow (BDAT) */
    uint64_t src_left;    /* raw bytes still to send (XSRC) */
    size_t ilen;
    size_t olen, ooff;
    char ibuf[IBUF];
    char obuf[OBUF];
};

static int smtp_port_g, imap_port_g;
static char pattern[65536];

static void die(const char *m) { perror(m); exit(1); }

static int listen_on(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void out(struct conn *c, const char *s)
{
    size_t n = strlen(s);
    if (c->ooff > 0 && c->olen + n > OBUF) {
        memmove(c->obuf, c->obuf + c->ooff, c->olen - c->ooff);
        c->olen -= c->ooff;
        c->ooff = 0;
    }
    if (c->olen + n > OBUF) { c->mode = M_CLOSING; return; }
    memcpy(c->obuf + c->olen, s, n);
    c->olen += n;
}

/* Flush pending replies, then any XSRC data. Returns -1 on a dead socket. */
static int flush(struct conn *c)
{
    while (c->ooff < c->olen) {
        ssize_t n = send(c->fd, c->obuf + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        c->ooff += (size_t)n;
    }
    c->ooff = c->olen = 0;
    while (c->src_left > 0) {
        size_t want = c->src_left < sizeof pattern ? c->src_left : sizeof pattern;
        ssize_t n = send(c->fd, pattern, want, MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        c->src_left -= (uint64_t)n;
    }
    return 0;
}

static void smtp_line(struct conn *c, char *l)
{
    if (!strncasecmp(l, "EHLO", 4))
        out(c, "250-sink.bench\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250 SIZE 0\r\n");
    else if (!strncasecmp(l, "HELO", 4))
        out(c, "250 sink.bench\r\n");
    else if (!strncasecmp(l, "DATA", 4)) {
        out(c, "354 go ahead\r\n");
        c->mode = M_DATA;
        c->dot = 2; /* the DATA line's own CRLF counts as the leading CRLF */
    } else if (!strncasecmp(l, "BDAT ", 5)) {
        c->bdat_left = strtoull(l + 5, NULL, 10);
        c->mode = M_BDAT;
        if (c->bdat_left == 0) { out(c, "250 2.0.0 chunk ok\r\n"); c->mode = M_CMD; }
    } else if (!strncasecmp(l, "XSRC ", 5))
        c->src_left += strtoull(l + 5, NULL, 10);
    else if (!strncasecmp(l, "QUIT", 4)) {
        out(c, "221 2.0.0 bye\r\n");
        c->mode = M_CLOSING;
    } else if (!strncasecmp(l, "MAIL", 4) || !strncasecmp(l, "RCPT", 4) ||
               !strncasecmp(l, "RSET", 4) || !strncasecmp(l, "NOOP", 4) ||
               !strncasecmp(l, "XCLIENT", 7))
        out(c, "250 2.0.0 ok\r\n");
    else
        out(c, "500 5.5.1 unknown\r\n");
}

static void imap_line(struct conn *c, char *l)
{
    char tag[64];
    char *sp = strchr(l, ' ');
    size_t tl = sp ? (size_t)(sp - l) : strlen(l);
    if (tl >= sizeof tag - 1) tl = sizeof tag - 2;
    memcpy(tag, l, tl);
    tag[tl] = 0;
    const char *cmd = sp ? sp + 1 : "";
    char r[256];
    if (!strncasecmp(cmd, "CAPABILITY", 10)) {
        snprintf(r, sizeof r, "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n%s OK done\r\n", tag);
    } else if (!strncasecmp(cmd, "LOGOUT", 6)) {
        snprintf(r, sizeof r, "* BYE sink\r\n%s OK bye\r\n", tag);
        c->mode = M_CLOSING;
    } else {
        snprintf(r, sizeof r, "%s OK done\r\n", tag);
    }
    out(c, r);
}

static void auth_reply(struct conn *c)
{
    c->ibuf[c->ilen < IBUF ? c->ilen : IBUF - 1] = 0;
    int port = strcasestr(c->ibuf, "Auth-Protocol: imap") ? imap_port_g : smtp_port_g;
    char r[256];
    snprintf(r, sizeof r, "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"
             "Auth-Port: %d\r\n\r\n", port);
    out(c, r);
    c->mode = M_CLOSING;
}

/* Consume input; returns -1 to close now. */
static int process(struct conn *c)
{
    size_t off = 0;
    while (off < c->ilen && c->mode != M_CLOSING) {
        if (c->mode == M_BDAT) {
            size_t take = c->ilen - off;
            if (take > c->bdat_left) take = (size_t)c->bdat_left;
            off += take;
            c->bdat_left -= take;
            if (c->bdat_left == 0) { out(c, "250 2.0.0 chunk ok\r\n"); c->mode = M_CMD; }
            continue;
        }
        if (c->mode == M_DATA) {
            static const char end[] = "\r\n.\r\n";
            while (off < c->ilen) {
                char ch = c->ibuf[off++];
                if (c->dot == 0) {
                    /* fast skip to the next CR */
                    if (ch != '\r') {
                        char *p = memchr(c->ibuf + off, '\r', c->ilen - off);
                        if (!p) { off = c->ilen; break; }
                        off = (size_t)(p - c->ibuf) + 1;
                    }
                    c->dot = 1;
                } else if (ch == end[c->dot]) {
                    if (++c->dot == 5) break;
                } else {
                    c->dot = ch == '\r' ? 1 : 0;
                }
            }
            if (c->dot == 5) { out(c, "250 2.0.0 queued\r\n"); c->mode = M_CMD; c->dot = 0; }
            continue;
        }
        if (c->kind == K_AUTH) {
            if (memmem(c->ibuf, c->ilen, "\r\n\r\n", 4)) { auth_reply(c); off = c->ilen; }
            break;
        }
        char *nl = memchr(c->ibuf + off, '\n', c->ilen - off);
        if (!nl) break;
        *nl = 0;
        if (nl > c->ibuf + off && nl[-1] == '\r') nl[-1] = 0;
        char *line = c->ibuf + off;
        off = (size_t)(nl - c->ibuf) + 1;
        if (c->kind == K_SMTP) smtp_line(c, line); else imap_line(c, line);
    }
    if (c->kind == K_AUTH && c->mode != M_CLOSING) {
        if (c->ilen == IBUF) return -1;
        return 0;
    }
    if (off < c->ilen) memmove(c->ibuf, c->ibuf + off, c->ilen - off);
    c->ilen -= off;
    if (c->ilen == IBUF) return -1; /* a line longer than the buffer */
    return 0;
}

static void drop(int ep, struct conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

int main(int argc, char **argv)
{
    if (argc != 4) { fprintf(stderr, "usage: sink SMTP_PORT IMAP_PORT AUTH_PORT\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }
    for (size_t i = 0; i < sizeof pattern; i++) pattern[i] = (char)('a' + i % 26);
    smtp_port_g = atoi(argv[1]);
    imap_port_g = atoi(argv[2]);
    int lfd[3] = { listen_on(smtp_port_g), listen_on(imap_port_g), listen_on(atoi(argv[3])) };
    int ep = epoll_create1(0);
    for (int i = 0; i < 3; i++) {
        struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint64_t)i };
        epoll_ctl(ep, EPOLL_CTL_ADD, lfd[i], &ev);
    }
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 < 3) {
                int k = (int)evs[i].data.u64;
                for (;;) {
                    int fd = accept4(lfd[k], NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *c = calloc(1, sizeof *c);
                    if (!c) { close(fd); continue; }
                    c->fd = fd;
                    c->kind = (enum kind)k;
                    if (k == K_SMTP) out(c, "220 sink.bench ESMTP ready\r\n");
                    else if (k == K_IMAP) out(c, "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] sink ready\r\n");
                    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLET | EPOLLRDHUP,
                                              .data.ptr = c };
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            struct conn *c = evs[i].data.ptr;
            int dead = 0;
            /* Edge-triggered: read until EAGAIN unless blocked on writing,
             * in which case the EPOLLOUT edge brings us back here. */
            for (;;) {
                if (flush(c) < 0) { dead = 1; break; }
                if (c->olen > 0 || c->src_left > 0) break;
                if (c->mode == M_CLOSING) { dead = 1; break; }
                ssize_t r = recv(c->fd, c->ibuf + c->ilen, IBUF - c->ilen, 0);
                if (r == 0) { dead = 1; break; }
                if (r < 0) { if (errno != EAGAIN && errno != EINTR) dead = 1; if (errno != EINTR) break; continue; }
                c->ilen += (size_t)r;
                if (process(c) < 0) { dead = 1; break; }
            }
            if (dead) drop(ep, c);
        }
    }
}
