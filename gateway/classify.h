/*
 * classify.h - the gateway's side of the eBPF classifier (bpf/): load and
 * attach it from the master at start and on reload, per [bpf].
 */
#ifndef MAILGW_CLASSIFY_H
#define MAILGW_CLASSIFY_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

struct config;
struct bpfmap;

/*
 * Start per the config. [bpf] enable = on: a failure is fatal (-1, reason
 * in err). auto: a failure is logged and the gateway runs without it (0).
 */
int classify_start(const struct config *c, char *err, size_t errlen);
void classify_stop(void);
bool classify_running(void);
/* Would the classifier be set up differently for b than for a? */
bool classify_changed(const struct config *a, const struct config *b);
/* Pin path of the running classifier, or NULL. */
const char *classify_pin_path(void);
struct bpfmap *classify_map(void);

/*
 * A NIC here has TLS TX offload on: its flows leave the stack as plaintext
 * records for the NIC to encrypt, which the classifier would count as
 * violations. Sessions are then marked before their handshake.
 */
void classify_set_nic_offload(bool on);
/* Worker, before a session's handshake; a no-op unless both are active. */
void classify_mark_session(const struct sockaddr *local, const struct sockaddr *peer);

#endif
