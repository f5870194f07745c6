/*
 * bpfctl.c - the mail-port classifier from the command line, for tests and
 * operators.
 *
 *   bpfctl attach [--pin PATH] --if IFACE [--if ...] [--port PORT/KIND ...]
 *                 [--max-flows N]
 *       load, pin, attach; stay in the foreground until SIGTERM or SIGINT,
 *       then detach and unpin.  Prints one "attached ..." line when ready.
 *   bpfctl dump [--pin PATH]
 *       every counter as "family port label value", one per line.
 *   bpfctl mark [--pin PATH] LOCAL_IP:PORT PEER_IP:PORT
 *       mark a flow as handed to NIC TLS offload ([v6addr]:port for IPv6).
 *
 * Exit status: 0 done, 1 failure (message on stderr), 2 usage.
 */
#include "bpfmap.h"

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_IFACES 32
#define MAX_PORTS  57   /* 64 rows less the standard seven */

static int usage(void)
{
	fprintf(stderr,
		"usage: bpfctl attach [--pin PATH] --if IFACE [--if IFACE ...] "
		"[--port PORT/KIND ...] [--max-flows N]\n"
		"       bpfctl dump [--pin PATH]\n"
		"       bpfctl mark [--pin PATH] LOCAL_IP:PORT PEER_IP:PORT\n"
		"KIND: smtp imap pop3 (STARTTLS) smtps imaps pop3s (implicit TLS); "
		"default pin path " BPFMAP_DEFAULT_PIN "\n");
	return 2;
}

static int parse_uint(const char *s, unsigned long max, unsigned int *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v > max)
		return -1;
	*out = (unsigned int)v;
	return 0;
}

/* "PORT/KIND" */
static int parse_port(const char *arg, struct bpfmap_port *p)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(arg, &end, 10);
	if (errno || end == arg || *end != '/' || v < 1 || v > 65535)
		return -1;
	p->port = (unsigned int)v;
	p->kind = end + 1;
	return bpfmap_kind_parse(p->kind) < 0 ? -1 : 0;
}

/* "1.2.3.4:25" or "[fd00::1]:25" */
static int parse_endpoint(const char *arg, struct sockaddr_storage *ss)
{
	struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
	char host[INET6_ADDRSTRLEN + 1];
	const char *colon, *h = arg;
	unsigned int port;
	size_t hl;

	memset(ss, 0, sizeof(*ss));
	if (*arg == '[') {
		const char *rb = strchr(arg, ']');

		if (!rb || rb[1] != ':')
			return -1;
		h = arg + 1;
		hl = (size_t)(rb - h);
		colon = rb + 1;
	} else {
		colon = strrchr(arg, ':');
		if (!colon)
			return -1;
		hl = (size_t)(colon - arg);
	}
	if (hl == 0 || hl >= sizeof(host) || parse_uint(colon + 1, 65535, &port))
		return -1;
	memcpy(host, h, hl);
	host[hl] = '\0';
	if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
		s4->sin_family = AF_INET;
		s4->sin_port = htons((unsigned short)port);
		return 0;
	}
	if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons((unsigned short)port);
		return 0;
	}
	return -1;
}

static int cmd_attach(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "pin", required_argument, NULL, 'p' },
		{ "if", required_argument, NULL, 'i' },
		{ "port", required_argument, NULL, 'P' },
		{ "max-flows", required_argument, NULL, 'm' },
		{ NULL, 0, NULL, 0 },
	};
	const char *ifaces[MAX_IFACES];
	struct bpfmap_port ports[MAX_PORTS];
	struct bpfmap_opts o = { .ifaces = ifaces, .ports = ports };
	unsigned int in_id, eg_id;
	struct bpfmap *m;
	char err[256];
	sigset_t set;
	int c, sig, ret;

	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'p':
			o.pin_path = optarg;
			break;
		case 'i':
			if (o.n_ifaces == MAX_IFACES)
				return usage();
			ifaces[o.n_ifaces++] = optarg;
			break;
		case 'P':
			if (o.n_ports == MAX_PORTS || parse_port(optarg, &ports[o.n_ports])) {
				fprintf(stderr, "bpfctl: bad --port %s (want PORT/KIND)\n", optarg);
				return 2;
			}
			o.n_ports++;
			break;
		case 'm':
			if (parse_uint(optarg, 1u << 24, &o.max_flows) || o.max_flows == 0)
				return usage();
			break;
		default:
			return usage();
		}
	}
	if (optind != argc || o.n_ifaces == 0)
		return usage();

	/* Signals are taken with sigwait: block them before any thread or
	 * child could see them. */
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	sigprocmask(SIG_BLOCK, &set, NULL);

	ret = bpfmap_open(&o, &m, err, sizeof(err));
	if (ret) {
		fprintf(stderr, "bpfctl: %s\n", err);
		return 1;
	}
	bpfmap_prog_ids(m, &in_id, &eg_id);
	printf("attached pin=%s ifaces=", o.pin_path ? o.pin_path : BPFMAP_DEFAULT_PIN);
	for (size_t i = 0; i < o.n_ifaces; i++)
		printf("%s%s", i ? "," : "", ifaces[i]);
	printf(" prog_ingress=%u prog_egress=%u\n", in_id, eg_id);
	fflush(stdout);

	do {
		if (sigwait(&set, &sig))
			sig = SIGTERM;
	} while (sig == SIGHUP);

	bpfmap_close(m);
	printf("detached\n");
	return 0;
}

static void print_counter(void *arg, const char *family, unsigned int port,
			  const char *label, unsigned long long value)
{
	(void)arg;
	printf("%s %u %s %llu\n", family, port, label, value);
}

static int pin_only(int argc, char **argv, const char **pin)
{
	static const struct option opts[] = {
		{ "pin", required_argument, NULL, 'p' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	*pin = NULL;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (c != 'p')
			return -1;
		*pin = optarg;
	}
	return 0;
}

static int cmd_dump(int argc, char **argv)
{
	const char *pin;
	int ret;

	if (pin_only(argc, argv, &pin) || optind != argc)
		return usage();
	ret = bpfmap_read_counters(pin, print_counter, NULL);
	if (ret) {
		fprintf(stderr, "bpfctl: reading counters under %s: %s%s\n",
			pin ? pin : BPFMAP_DEFAULT_PIN, strerror(-ret),
			ret == -ENOENT ? " (not loaded, or bpffs not mounted)" :
			ret == -EPERM ? " (not root / no CAP_BPF)" : "");
		return 1;
	}
	return fflush(stdout) ? 1 : 0;
}

static int cmd_mark(int argc, char **argv)
{
	struct sockaddr_storage local, peer;
	struct bpfmap *m;
	const char *pin;
	char err[256];
	int ret;

	if (pin_only(argc, argv, &pin) || argc - optind != 2)
		return usage();
	if (parse_endpoint(argv[optind], &local) || parse_endpoint(argv[optind + 1], &peer)) {
		fprintf(stderr, "bpfctl: want IP:PORT or [IPV6]:PORT\n");
		return 2;
	}
	ret = bpfmap_open_pinned(pin, &m, err, sizeof(err));
	if (ret) {
		fprintf(stderr, "bpfctl: %s\n", err);
		return 1;
	}
	ret = bpfmap_mark_offloaded(m, (struct sockaddr *)&local, (struct sockaddr *)&peer);
	bpfmap_close(m);
	if (ret) {
		fprintf(stderr, "bpfctl: mark: %s\n", strerror(-ret));
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return usage();
	/* Subcommand options start after the subcommand. */
	optind = 2;
	if (strcmp(argv[1], "attach") == 0)
		return cmd_attach(argc, argv);
	if (strcmp(argv[1], "dump") == 0)
		return cmd_dump(argc, argv);
	if (strcmp(argv[1], "mark") == 0)
		return cmd_mark(argc, argv);
	return usage();
}
