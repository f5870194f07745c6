/*
 * bpfmap.h - load, pin and attach the mail-port classifier (mailgw.bpf.c),
 * mark flows handed to NIC TLS offload, and read its counters.
 *
 * One process owns a pin path: bpfmap_open() loads the programs, fills the
 * port table, pins the maps under the pin path and attaches at tc ingress
 * and egress; bpfmap_close() detaches and unpins.  Any other process (the
 * metrics exporter, bpfctl) reads or marks through the pins alone.
 *
 * Every function that can fail returns 0 or a negative errno; those taking
 * err/errlen leave a one-line reason there.
 */
#ifndef BPFMAP_H
#define BPFMAP_H

#include <stddef.h>
#include <sys/socket.h>

#define BPFMAP_DEFAULT_PIN "/sys/fs/bpf/mailgw"

struct bpfmap;

/* A server port besides the standard seven (25, 587 smtp; 465 smtps;
 * 143 imap; 993 imaps; 110 pop3; 995 pop3s), or one of them redefined. */
struct bpfmap_port {
	unsigned int port;
	const char *kind;       /* smtp imap pop3 (STARTTLS) smtps imaps pop3s (implicit) */
};

struct bpfmap_opts {
	const char *pin_path;                   /* NULL or "": BPFMAP_DEFAULT_PIN */
	const char *const *ifaces;              /* tc ingress + egress on each */
	size_t n_ifaces;
	const struct bpfmap_port *ports;
	size_t n_ports;
	unsigned int max_flows;                 /* 0: 65536 flows tracked (LRU) */
};

/*
 * Load and attach.  Pins left by an earlier owner that died are reused
 * when their layout matches (counters carry on) and replaced when not.
 * On a loopback interface only ingress is attached: every packet there
 * passes egress and ingress, and would be seen twice.
 */
int bpfmap_open(const struct bpfmap_opts *o, struct bpfmap **out, char *err, size_t errlen);

/* A handle on another process's pinned maps (no programs, no attach). */
int bpfmap_open_pinned(const char *pin_path, struct bpfmap **out, char *err, size_t errlen);

/* Detach and unpin (bpfmap_open), or just let go (bpfmap_open_pinned). */
void bpfmap_close(struct bpfmap *m);

/*
 * The connection local <-> peer (AF_INET or AF_INET6; IPv4-mapped IPv6
 * counts as IPv4) was handed to NIC TLS offload (TLS_HW): it is never
 * counted as a violation from now on.  Call it before installing the
 * TLS_HW keys: from then on the stack sends plaintext records.
 */
int bpfmap_mark_offloaded(struct bpfmap *m, const struct sockaddr *local,
			  const struct sockaddr *peer);

/*
 * Read every counter through the pins of pin_path (NULL: the default),
 * summed over CPUs, from any process with CAP_BPF.  cb gets, per server
 * port, one call per (family, label):
 *   packets, bytes    tls plaintext
 *   flows             starttls_upgraded plaintext_only implicit_tls
 *   violations,       plaintext_after_starttls_to_server
 *   violation_bytes   plaintext_after_upgrade_to_client plaintext_on_implicit_port
 *   untracked         to_server to_client
 * Ports come in ascending order; zero values are reported too.
 */
typedef void (*bpfmap_counter_fn)(void *arg, const char *family, unsigned int port,
				  const char *label, unsigned long long value);
int bpfmap_read_counters(const char *pin_path, bpfmap_counter_fn cb, void *arg);

/* Program ids of the loaded classifier (0 where none), for bpftool. */
void bpfmap_prog_ids(const struct bpfmap *m, unsigned int *ingress, unsigned int *egress);

/* "smtp" ... "pop3s" to the protocol number of mailgw_bpf.h, or -EINVAL. */
int bpfmap_kind_parse(const char *kind);

#endif /* BPFMAP_H */
