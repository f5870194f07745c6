/* Load generator for the mailgw benchmarks: N concurrent non-blocking
 * connections on one epoll loop, speaking SMTP or IMAP with STARTTLS,
 * implicit TLS or plaintext, through the gateway under test to
 * tests/bench/sink.
 *
 * Modes:
 *   handshake  connection per session: full TLS 1.3 handshake, EHLO/CAPABILITY, QUIT/LOGOUT
 *   resumed    the same, resuming with the latest session ticket the server sent
 *   txn        SMTP: [STARTTLS,] EHLO, MAIL, RCPT, DATA (SIZE bytes), QUIT per connection
 *   bulk       SMTP: one long session per connection, SIZE-byte messages up (BDAT)
 *              or down (sink's XSRC) in a loop
 *   idle       open CONNS sessions (ramping RAMP at a time), print "ready", hold
 *
 * -W SECONDS (not idle): open the connections and run for SECONDS without
 * counting, then print "measuring" (once every connection has finished its
 * handshake), zero the counters and run DURATION more; the result then covers
 * only that window, so long sessions are measured without their set-up.
 *
 * Output: one "info" line about the negotiated TLS parameters, then one
 * "result key=value ..." line. */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum op {
    OP_CONNECT, OP_HS, OP_SEND, OP_EXPECT_SMTP, OP_EXPECT_GREET, OP_EXPECT_TAG,
    OP_BODY, OP_RAWSEND, OP_RAWRECV, OP_MSG_DONE, OP_JUMP, OP_DONE, OP_HOLD
};

struct step {
    enum op op;
    const char *s;  /* command to send, IMAP tag to wait for */
    char code;      /* SMTP reply class expected */
    int target;     /* OP_JUMP */
};

enum mode { M_HANDSHAKE, M_RESUMED, M_TXN, M_BULK, M_IDLE };

#define RBUF 8192

struct conn {
    int fd;
    int in_use;
    SSL *ssl;
    int pc;               /* index into the script */
    int started_step;     /* the current step has done its set-up */
    double t0;
    /* write source */
    const char *wptr;
    size_t wlen, woff;
    uint64_t raw_left;    /* OP_RAWSEND / OP_RAWRECV bytes left */
    size_t rlen;
    char rbuf[RBUF];
};

static struct step script[64];
static int nsteps;

static enum mode mode = M_HANDSHAKE;
static int proto_imap;
static int tls_mode = 1; /* 0 none, 1 implicit, 2 starttls */
static int up_dir;       /* bulk: 1 up, 0 down */
static int nconns = 32, ramp = 100;
static double duration = 5;
static double hold = 0;
static double warm = 0;  /* -W */
static uint64_t msg_size = 0;
static struct sockaddr_in dst;

static SSL_CTX *ctx;
static SSL_SESSION *last_sess;
static int ep;
static struct conn *conns;
static char pattern[65536];
static char *body;
static size_t body_len;
static char bdat_cmd[64], xsrc_cmd[64];

static uint64_t ops, errors, resumed_ok, handshakes, bytes, msgs;
static uint64_t hs_total; /* handshakes since start, never zeroed */
static double *lat;
static size_t nlat, caplat;
static int stopping, info_done, held, in_setup;
static long attempts;
static volatile sig_atomic_t got_term;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void add(enum op op, const char *s, char code)
{
    script[nsteps++] = (struct step){ .op = op, .s = s, .code = code };
}

static void build_script(void)
{
    add(OP_CONNECT, NULL, 0);
    if (!proto_imap) {
        if (tls_mode == 1) add(OP_HS, NULL, 0);
        add(OP_EXPECT_SMTP, NULL, '2');
        add(OP_SEND, "EHLO loadgen.bench\r\n", 0);
        add(OP_EXPECT_SMTP, NULL, '2');
        if (tls_mode == 2) {
            add(OP_SEND, "STARTTLS\r\n", 0);
            add(OP_EXPECT_SMTP, NULL, '2');
            add(OP_HS, NULL, 0);
            add(OP_SEND, "EHLO loadgen.bench\r\n", 0);
            add(OP_EXPECT_SMTP, NULL, '2');
        }
        switch (mode) {
        case M_HANDSHAKE: case M_RESUMED:
            add(OP_SEND, "QUIT\r\n", 0);
            add(OP_EXPECT_SMTP, NULL, '2');
            add(OP_DONE, NULL, 0);
            break;
        case M_TXN:
            add(OP_SEND, "MAIL FROM:<bench@loadgen.bench>\r\n", 0);
            add(OP_EXPECT_SMTP, NULL, '2');
            add(OP_SEND, "RCPT TO:<sink@sink.bench>\r\n", 0);
            add(OP_EXPECT_SMTP, NULL, '2');
            add(OP_SEND, "DATA\r\n", 0);
            add(OP_EXPECT_SMTP, NULL, '3');
            add(OP_BODY, NULL, 0);
            add(OP_EXPECT_SMTP, NULL, '2');
            add(OP_SEND, "QUIT\r\n", 0);
            add(OP_EXPECT_SMTP, NULL, '2');
            add(OP_DONE, NULL, 0);
            break;
        case M_BULK: {
            add(OP_SEND, "MAIL FROM:<bench@loadgen.bench>\r\n", 0);
            add(OP_EXPECT_SMTP, NULL, '2');
            add(OP_SEND, "RCPT TO:<sink@sink.bench>\r\n", 0);
            add(OP_EXPECT_SMTP, NULL, '2');
            int loop = nsteps;
            if (up_dir) {
                add(OP_SEND, bdat_cmd, 0);
                add(OP_RAWSEND, NULL, 0);
                add(OP_EXPECT_SMTP, NULL, '2');
            } else {
                add(OP_SEND, xsrc_cmd, 0);
                add(OP_RAWRECV, NULL, 0);
            }
            add(OP_MSG_DONE, NULL, 0);
            add(OP_JUMP, NULL, 0);
            script[nsteps - 1].target = loop;
            break;
        }
        case M_IDLE:
            add(OP_HOLD, NULL, 0);
            break;
        }
    } else {
        if (tls_mode == 1) add(OP_HS, NULL, 0);
        add(OP_EXPECT_GREET, NULL, 0);
        if (tls_mode == 2) {
            add(OP_SEND, "a0 STARTTLS\r\n", 0);
            add(OP_EXPECT_TAG, "a0", 0);
            add(OP_HS, NULL, 0);
        }
        add(OP_SEND, "a1 CAPABILITY\r\n", 0);
        add(OP_EXPECT_TAG, "a1", 0);
        if (mode == M_IDLE) {
            add(OP_HOLD, NULL, 0);
        } else {
            add(OP_SEND, "a2 LOGOUT\r\n", 0);
            add(OP_EXPECT_TAG, "a2", 0);
            add(OP_DONE, NULL, 0);
        }
    }
}

static int new_sess_cb(SSL *ssl, SSL_SESSION *s)
{
    (void)ssl;
    if (last_sess) SSL_SESSION_free(last_sess);
    last_sess = s;
    return 1; /* we keep the reference */
}

static void conn_close(struct conn *c)
{
    if (c->ssl) SSL_free(c->ssl);
    c->ssl = NULL;
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->in_use = 0;
}

static int conn_start(struct conn *c)
{
    memset(c, 0, offsetof(struct conn, rbuf));
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { c->fd = -1; errors++; return -1; }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->in_use = 1;
    c->t0 = now();
    attempts++;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLET | EPOLLRDHUP, .data.ptr = c };
    int r = connect(c->fd, (struct sockaddr *)&dst, sizeof dst);
    if (r < 0 && errno != EINPROGRESS) { conn_close(c); errors++; return -1; }
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

/* returns >0 bytes, 0 EOF, -1 would block, -2 error */
static ssize_t c_read(struct conn *c, void *buf, size_t n)
{
    if (c->ssl) {
        int r = SSL_read(c->ssl, buf, (int)n);
        if (r > 0) return r;
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return -1;
        if (e == SSL_ERROR_ZERO_RETURN) return 0;
        ERR_clear_error();
        return -2;
    }
    ssize_t r = recv(c->fd, buf, n, 0);
    if (r >= 0) return r;
    return errno == EAGAIN ? -1 : -2;
}

static ssize_t c_write(struct conn *c, const void *buf, size_t n)
{
    if (c->ssl) {
        int r = SSL_write(c->ssl, buf, (int)n);
        if (r > 0) return r;
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return -1;
        ERR_clear_error();
        return -2;
    }
    ssize_t r = send(c->fd, buf, n, MSG_NOSIGNAL);
    if (r >= 0) return r;
    return errno == EAGAIN ? -1 : -2;
}

/* Flush c->wptr. 1 done, 0 blocked, -1 error. */
static int flush_w(struct conn *c)
{
    while (c->woff < c->wlen) {
        size_t n = c->wlen - c->woff;
        if (n > 16384) n = 16384;
        ssize_t r = c_write(c, c->wptr + c->woff, n);
        if (r == -1) return 0;
        if (r < 0) return -1;
        c->woff += (size_t)r;
    }
    return 1;
}

/* Take one line out of rbuf into line[]; 1 got one, 0 blocked, -1 error/EOF */
static int get_line(struct conn *c, char *line, size_t cap)
{
    for (;;) {
        char *nl = memchr(c->rbuf, '\n', c->rlen);
        if (nl) {
            size_t l = (size_t)(nl - c->rbuf) + 1;
            size_t k = l < cap - 1 ? l : cap - 1;
            memcpy(line, c->rbuf, k);
            line[k] = 0;
            memmove(c->rbuf, c->rbuf + l, c->rlen - l);
            c->rlen -= l;
            return 1;
        }
        if (c->rlen == RBUF) return -1;
        ssize_t r = c_read(c, c->rbuf + c->rlen, RBUF - c->rlen);
        if (r == -1) return 0;
        if (r <= 0) return -1;
        c->rlen += (size_t)r;
    }
}

static void record_info(struct conn *c)
{
    if (info_done || !c->ssl) return;
    info_done = 1;
    int g = SSL_get_negotiated_group(c->ssl);
    printf("info version=%s cipher=%s group=%s\n", SSL_get_version(c->ssl),
           SSL_CIPHER_get_name(SSL_get_current_cipher(c->ssl)), g ? OBJ_nid2sn(g) : "?");
    fflush(stdout);
}

/* Run the script as far as it goes. 1 progress blocked, -1 failed, 2 finished/closed */
static int drive(struct conn *c, uint32_t evmask)
{
    char line[1024];
    for (;;) {
        struct step *st = &script[c->pc];
        switch (st->op) {
        case OP_CONNECT: {
            if (!(evmask & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return 1;
            int err = 0;
            socklen_t l = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err) return -1;
            c->pc++;
            break;
        }
        case OP_HS: {
            if (!c->started_step) {
                c->ssl = SSL_new(ctx);
                SSL_set_fd(c->ssl, c->fd);
                SSL_set_tlsext_host_name(c->ssl, "bench.local");
                if (mode == M_RESUMED && last_sess) SSL_set_session(c->ssl, last_sess);
                SSL_set_connect_state(c->ssl);
                c->started_step = 1;
            }
            int r = SSL_do_handshake(c->ssl);
            if (r != 1) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 1;
                ERR_clear_error();
                return -1;
            }
            handshakes++;
            hs_total++;
            if (SSL_session_reused(c->ssl)) resumed_ok++;
            record_info(c);
            c->started_step = 0;
            c->pc++;
            break;
        }
        case OP_SEND: case OP_BODY: {
            if (!c->started_step) {
                c->wptr = st->op == OP_SEND ? st->s : body;
                c->wlen = st->op == OP_SEND ? strlen(st->s) : body_len;
                c->woff = 0;
                c->started_step = 1;
            }
            int r = flush_w(c);
            if (r == 0) return 1;
            if (r < 0) return -1;
            c->started_step = 0;
            c->pc++;
            break;
        }
        case OP_RAWSEND: {
            if (!c->started_step) { c->raw_left = msg_size; c->started_step = 1; }
            while (c->raw_left > 0) {
                size_t n = c->raw_left < 16384 ? (size_t)c->raw_left : 16384;
                ssize_t r = c_write(c, pattern, n);
                if (r == -1) return 1;
                if (r < 0) return -1;
                c->raw_left -= (uint64_t)r;
                if (!stopping) bytes += (uint64_t)r;
            }
            c->started_step = 0;
            c->pc++;
            break;
        }
        case OP_RAWRECV: {
            static char sink[65536];
            if (!c->started_step) {
                c->raw_left = msg_size;
                c->started_step = 1;
                size_t k = c->rlen < c->raw_left ? c->rlen : (size_t)c->raw_left;
                memmove(c->rbuf, c->rbuf + k, c->rlen - k);
                c->rlen -= k;
                c->raw_left -= k;
                if (!stopping) bytes += k;
            }
            while (c->raw_left > 0) {
                size_t n = c->raw_left < sizeof sink ? (size_t)c->raw_left : sizeof sink;
                ssize_t r = c_read(c, sink, n);
                if (r == -1) return 1;
                if (r <= 0) return -1;
                c->raw_left -= (uint64_t)r;
                if (!stopping) bytes += (uint64_t)r;
            }
            c->started_step = 0;
            c->pc++;
            break;
        }
        case OP_EXPECT_SMTP: {
            int r = get_line(c, line, sizeof line);
            if (r == 0) return 1;
            if (r < 0) return -1;
            size_t l = strlen(line);
            if (l < 3 || line[0] != st->code) {
                if (errors < 5) fprintf(stderr, "loadgen: step %d unexpected: %s", c->pc, line);
                return -1;
            }
            if (l >= 4 && line[3] == '-') break; /* continuation line */
            c->pc++;
            break;
        }
        case OP_EXPECT_GREET: {
            int r = get_line(c, line, sizeof line);
            if (r == 0) return 1;
            if (r < 0) return -1;
            if (strncmp(line, "* OK", 4)) {
                if (errors < 5) fprintf(stderr, "loadgen: bad greeting: %s", line);
                return -1;
            }
            c->pc++;
            break;
        }
        case OP_EXPECT_TAG: {
            int r = get_line(c, line, sizeof line);
            if (r == 0) return 1;
            if (r < 0) return -1;
            size_t tl = strlen(st->s);
            if (strncmp(line, st->s, tl) || line[tl] != ' ') break; /* untagged */
            if (strncmp(line + tl + 1, "OK", 2)) {
                if (errors < 5) fprintf(stderr, "loadgen: tagged failure: %s", line);
                return -1;
            }
            c->pc++;
            break;
        }
        case OP_MSG_DONE:
            if (!stopping) msgs++;
            c->pc++;
            break;
        case OP_JUMP:
            c->pc = st->target;
            break;
        case OP_DONE:
            if (!stopping) {
                ops++;
                if (nlat == caplat) {
                    caplat = caplat ? caplat * 2 : 65536;
                    lat = realloc(lat, caplat * sizeof *lat);
                    if (!lat) { perror("realloc"); exit(1); }
                }
                lat[nlat++] = (now() - c->t0) * 1000.0;
            }
            conn_close(c);
            return 2;
        case OP_HOLD:
            if (c->started_step) {
                /* an event on a held connection: the server closed it, or data */
                ssize_t r = c_read(c, line, sizeof line);
                if (r == -1 || r > 0) return 1;
                held--;
                return -1;
            }
            c->started_step = 1;
            held++;
            in_setup--;
            return 1;
        }
        evmask = 0;
    }
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void on_term(int s) { (void)s; got_term = 1; }

static void usage(void)
{
    fprintf(stderr,
        "usage: loadgen -p PORT [-h 127.0.0.1] [-P smtp|imap] [-t implicit|starttls|none]\n"
        "       [-m handshake|resumed|txn|bulk|idle] [-c CONNS] [-d SECONDS]\n"
        "       [-s BYTES] [-u] (bulk upload; default download) [-r RAMP] [-H HOLD_SECONDS]\n"
        "       [-W WARM_SECONDS] (count only after WARM_SECONDS, see the top of loadgen.c)\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    int port = 0, opt;
    while ((opt = getopt(argc, argv, "h:p:P:t:m:c:d:s:ur:H:W:")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'P': proto_imap = !strcmp(optarg, "imap"); break;
        case 't': tls_mode = !strcmp(optarg, "none") ? 0 : !strcmp(optarg, "implicit") ? 1 : 2; break;
        case 'm':
            if (!strcmp(optarg, "handshake")) mode = M_HANDSHAKE;
            else if (!strcmp(optarg, "resumed")) mode = M_RESUMED;
            else if (!strcmp(optarg, "txn")) mode = M_TXN;
            else if (!strcmp(optarg, "bulk")) mode = M_BULK;
            else if (!strcmp(optarg, "idle")) mode = M_IDLE;
            else usage();
            break;
        case 'c': nconns = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 's': msg_size = strtoull(optarg, NULL, 10); break;
        case 'u': up_dir = 1; break;
        case 'r': ramp = atoi(optarg); break;
        case 'H': hold = atof(optarg); break;
        case 'W': warm = atof(optarg); break;
        default: usage();
        }
    }
    if (!port || nconns < 1) usage();
    if (proto_imap && (mode == M_TXN || mode == M_BULK)) {
        fprintf(stderr, "loadgen: txn and bulk are SMTP only\n");
        return 2;
    }
    if ((mode == M_HANDSHAKE || mode == M_RESUMED) && tls_mode == 0) {
        fprintf(stderr, "loadgen: handshake modes need TLS\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }

    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1) usage();

    for (size_t i = 0; i < sizeof pattern; i++) pattern[i] = (char)('A' + i % 26);
    if (!msg_size) msg_size = mode == M_BULK ? 1048576 : 10240;
    if (mode == M_TXN) {
        /* 76-character lines, none starting with a dot, then the terminator */
        body_len = msg_size + 5;
        body = malloc(body_len);
        for (size_t i = 0; i < msg_size; i++) body[i] = (i % 78 == 76) ? '\r' : (i % 78 == 77) ? '\n' : 'x';
        memcpy(body + msg_size, "\r\n.\r\n", 5);
    }
    snprintf(bdat_cmd, sizeof bdat_cmd, "BDAT %llu LAST\r\n", (unsigned long long)msg_size);
    snprintf(xsrc_cmd, sizeof xsrc_cmd, "XSRC %llu\r\n", (unsigned long long)msg_size);
    build_script();

    if (tls_mode) {
        ctx = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
        SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
        if (!SSL_CTX_set_ciphersuites(ctx, "TLS_AES_256_GCM_SHA384") ||
            !SSL_CTX_set1_groups_list(ctx, "X25519")) {
            fprintf(stderr, "loadgen: cannot set TLS parameters\n");
            return 1;
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        if (mode == M_RESUMED) {
            SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
            SSL_CTX_sess_set_new_cb(ctx, new_sess_cb);
        } else {
            SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        }
    }

    ep = epoll_create1(0);
    conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) conns[i].fd = -1;

    double t_start = now(), t_end = t_start + duration, t_ready = 0;
    int counting = mode == M_IDLE || warm <= 0;
    int next = 0; /* idle: next connection slot to open */
    if (mode == M_IDLE) {
        for (; next < nconns && in_setup < ramp; next++)
            if (conn_start(&conns[next]) == 0) in_setup++;
    } else {
        for (int i = 0; i < nconns; i++) conn_start(&conns[i]);
    }
    struct epoll_event evs[512];
    long idle_fail = 0;
    for (;;) {
        double t = now();
        if (got_term) break;
        if (mode == M_IDLE) {
            if (!t_ready && held == nconns) {
                t_ready = t;
                printf("ready held=%d setup_s=%.3f errors=%llu\n", held, t - t_start,
                       (unsigned long long)errors);
                fflush(stdout);
            }
            if (t_ready && t - t_ready >= hold) break;
            if (!t_ready && t - t_start > 300) { fprintf(stderr, "loadgen: idle set-up timed out\n"); break; }
        } else if (!counting) {
            /* every connection past its handshake, or give up waiting after 30 s */
            int all = hs_total >= (uint64_t)nconns || !tls_mode;
            if (t - t_start >= warm && (all || t - t_start > warm + 30)) {
                if (!all) fprintf(stderr, "loadgen: only %llu of %d handshakes done after warm-up\n",
                                  (unsigned long long)hs_total, nconns);
                ops = resumed_ok = handshakes = bytes = msgs = 0;
                nlat = 0;
                counting = 1;
                t_start = t;
                t_end = t + duration;
                printf("measuring\n");
                fflush(stdout);
            }
        } else if (t >= t_end) {
            break;
        }
        int timeout = 100;
        int n = epoll_wait(ep, evs, 512, timeout);
        if (n < 0) { if (errno == EINTR) continue; perror("epoll_wait"); break; }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c->in_use) continue;
            int r = drive(c, evs[i].events);
            if (r == 1) continue;
            if (r < 0) {
                errors++;
                if (script[c->pc].op != OP_HOLD || !c->started_step) {
                    if (mode == M_IDLE) in_setup--;
                }
                conn_close(c);
                if (mode == M_IDLE) {
                    idle_fail++;
                    if (idle_fail > nconns) { fprintf(stderr, "loadgen: too many idle failures\n"); goto out; }
                    if (conn_start(c) == 0) in_setup++;
                    continue;
                }
            }
            if (mode != M_IDLE) conn_start(c);
        }
        if (mode == M_IDLE) {
            for (; next < nconns && in_setup < ramp; next++)
                if (conn_start(&conns[next]) == 0) in_setup++;
        }
    }
out:
    stopping = 1;
    double el = now() - t_start;
    if (mode == M_IDLE) el = t_ready ? t_ready - t_start : el;
    double p50 = 0, p99 = 0;
    if (nlat) {
        qsort(lat, nlat, sizeof *lat, cmp_d);
        p50 = lat[(size_t)(0.50 * (double)(nlat - 1))];
        p99 = lat[(size_t)(0.99 * (double)(nlat - 1))];
    }
    static const char *mn[] = { "handshake", "resumed", "txn", "bulk", "idle" };
    printf("result mode=%s proto=%s tls=%s conns=%d elapsed_s=%.3f ops=%llu ops_per_s=%.1f "
           "handshakes=%llu resumed=%llu bytes=%llu msgs=%llu mb_per_s=%.2f p50_ms=%.3f p99_ms=%.3f "
           "errors=%llu held=%d\n",
           mn[mode], proto_imap ? "imap" : "smtp",
           tls_mode == 0 ? "none" : tls_mode == 1 ? "implicit" : "starttls", nconns, el,
           (unsigned long long)ops, (double)ops / el, (unsigned long long)handshakes,
           (unsigned long long)resumed_ok, (unsigned long long)bytes, (unsigned long long)msgs,
           (double)bytes / 1e6 / el, p50, p99, (unsigned long long)errors, held);
    fflush(stdout);
    return 0;
}
