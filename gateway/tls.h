/*
 * tls.h - server-side TLS contexts (certificates chosen by SNI, ECDSA and
 * RSA side by side) and the non-blocking handshake.
 */
#ifndef MAILGW_TLS_H
#define MAILGW_TLS_H

#include <openssl/ssl.h>
#include <stddef.h>

#include "offload.h"

struct config;
struct tls_ctx;

/* Build every context the config asks for; errors are "FILE:LINE: message". */
int tls_build(const struct config *c, struct tls_ctx **out, char *err, size_t errlen);
void tls_free(struct tls_ctx *t);

/* A new server SSL on fd, starting with the default certificate, ready for
 * the record engine asked for (kernel TLS needs settings before the handshake). */
SSL *tls_new(struct tls_ctx *t, int fd, enum offload_request req);

/*
 * One handshake step: 1 done, 0 blocked (*want = EPOLLIN or EPOLLOUT),
 * -1 failed (reason in why, no secrets).
 */
int tls_handshake(SSL *ssl, unsigned *want, char *why, size_t cap);

/* Number of certificate contexts and a short description, for the start-up log. */
unsigned tls_count(const struct tls_ctx *t);

#endif
