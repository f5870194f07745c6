/*
 * proxy.c - PROXY protocol v1 and v2 header builders.
 *
 * The header is written to the backend before any client byte, so the
 * backend logs and applies its policy to the client's address, not the
 * gateway's. v2 also carries what the backend cannot see for itself: that
 * the client used TLS, which version and which cipher.
 */
#include "proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

static const unsigned char v2sig[12] = {
	0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
};

long proxy_build_v1(const struct sockaddr *src, const struct sockaddr *dst,
		    char *out, size_t cap)
{
	char sa[INET6_ADDRSTRLEN], da[INET6_ADDRSTRLEN];
	unsigned sp, dp;
	const char *fam;
	int n;

	if (src->sa_family != dst->sa_family)
		return -1;
	if (src->sa_family == AF_INET) {
		const struct sockaddr_in *s = (const void *)src, *d = (const void *)dst;
		inet_ntop(AF_INET, &s->sin_addr, sa, sizeof(sa));
		inet_ntop(AF_INET, &d->sin_addr, da, sizeof(da));
		sp = ntohs(s->sin_port);
		dp = ntohs(d->sin_port);
		fam = "TCP4";
	} else if (src->sa_family == AF_INET6) {
		const struct sockaddr_in6 *s = (const void *)src, *d = (const void *)dst;
		inet_ntop(AF_INET6, &s->sin6_addr, sa, sizeof(sa));
		inet_ntop(AF_INET6, &d->sin6_addr, da, sizeof(da));
		sp = ntohs(s->sin6_port);
		dp = ntohs(d->sin6_port);
		fam = "TCP6";
	} else {
		return -1;
	}
	/* proxy-protocol.txt §2.1: at most 107 bytes including CRLF. */
	n = snprintf(out, cap, "PROXY %s %s %s %u %u\r\n", fam, sa, da, sp, dp);
	if (n < 0 || (size_t)n >= cap || n > 107)
		return -1;
	return n;
}

static int put_tlv(unsigned char *out, size_t cap, size_t *off, unsigned type,
		   const void *val, size_t len)
{
	if (len > 0xffff || cap - *off < 3 + len)
		return -1;
	out[(*off)++] = (unsigned char)type;
	out[(*off)++] = (unsigned char)(len >> 8);
	out[(*off)++] = (unsigned char)len;
	memcpy(out + *off, val, len);
	*off += len;
	return 0;
}

long proxy_build_v2(const struct sockaddr *src, const struct sockaddr *dst,
		    const struct proxy_tls_info *tls, unsigned char *out, size_t cap)
{
	size_t off = 16;

	if (cap < 16 + 36 || src->sa_family != dst->sa_family)
		return -1;
	memcpy(out, v2sig, sizeof(v2sig));
	out[12] = 0x21; /* version 2, PROXY command */
	if (src->sa_family == AF_INET) {
		const struct sockaddr_in *s = (const void *)src, *d = (const void *)dst;
		out[13] = 0x11; /* TCP over IPv4 */
		memcpy(out + off, &s->sin_addr, 4);
		memcpy(out + off + 4, &d->sin_addr, 4);
		memcpy(out + off + 8, &s->sin_port, 2);
		memcpy(out + off + 10, &d->sin_port, 2);
		off += 12;
	} else if (src->sa_family == AF_INET6) {
		const struct sockaddr_in6 *s = (const void *)src, *d = (const void *)dst;
		out[13] = 0x21; /* TCP over IPv6 */
		memcpy(out + off, &s->sin6_addr, 16);
		memcpy(out + off + 16, &d->sin6_addr, 16);
		memcpy(out + off + 32, &s->sin6_port, 2);
		memcpy(out + off + 34, &d->sin6_port, 2);
		off += 36;
	} else {
		return -1;
	}
	if (tls && tls->sni && *tls->sni &&
	    put_tlv(out, cap, &off, PP2_TYPE_AUTHORITY, tls->sni, strlen(tls->sni)) < 0)
		return -1;
	if (tls && tls->version) {
		/* PP2_TYPE_SSL: client flags (1), verify (4), then sub-TLVs. */
		size_t vlen = strlen(tls->version);
		size_t clen = tls->cipher ? strlen(tls->cipher) : 0;
		size_t body = 5 + 3 + vlen + (clen ? 3 + clen : 0);
		unsigned char head[5] = { PP2_CLIENT_SSL, 0, 0, 0, 0 };

		if (body > 0xffff || cap - off < 3 + body)
			return -1;
		out[off++] = PP2_TYPE_SSL;
		out[off++] = (unsigned char)(body >> 8);
		out[off++] = (unsigned char)body;
		memcpy(out + off, head, sizeof(head));
		off += sizeof(head);
		if (put_tlv(out, cap, &off, PP2_SUBTYPE_SSL_VERSION, tls->version, vlen) < 0 ||
		    (clen && put_tlv(out, cap, &off, PP2_SUBTYPE_SSL_CIPHER, tls->cipher, clen) < 0))
			return -1;
	}
	out[14] = (unsigned char)((off - 16) >> 8);
	out[15] = (unsigned char)(off - 16);
	return (long)off;
}
