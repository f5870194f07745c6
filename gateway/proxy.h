/*
 * proxy.h - PROXY protocol headers (HAProxy's proxy-protocol.txt, v1 text
 * and v2 binary) that tell the backend who the client really is.
 */
#ifndef MAILGW_PROXY_H
#define MAILGW_PROXY_H

#include <stddef.h>
#include <sys/socket.h>

/* v2 TLV types used by the gateway (proxy-protocol.txt §2.2). */
#define PP2_TYPE_AUTHORITY 0x02
#define PP2_TYPE_SSL 0x20
#define PP2_SUBTYPE_SSL_VERSION 0x21
#define PP2_SUBTYPE_SSL_CIPHER 0x23
#define PP2_CLIENT_SSL 0x01

/* Room for the largest header the gateway builds. */
#define PROXY_HDR_MAX 536

struct proxy_tls_info {
	const char *version; /* "TLSv1.3"; NULL for a plaintext session */
	const char *cipher;  /* "TLS_AES_256_GCM_SHA384" */
	const char *sni;     /* server name the client asked for, or NULL */
};

/*
 * Build a header for a connection from src to dst (the address the client
 * connected to). Returns its length, or -1 when it does not fit or the
 * address families differ or are not IPv4/IPv6.
 */
long proxy_build_v1(const struct sockaddr *src, const struct sockaddr *dst,
		    char *out, size_t cap);
long proxy_build_v2(const struct sockaddr *src, const struct sockaddr *dst,
		    const struct proxy_tls_info *tls, unsigned char *out, size_t cap);

#endif
