/*
 * ktls.c - kernel TLS engine: the kernel (or the NIC, TLS_HW) does the
 * record crypto after OpenSSL's handshake, and the relay moves payload with
 * splice() so it never enters userspace.
 *
 * TX, both versions, and RX for TLS 1.2: OpenSSL installs the keys itself
 * when SSL_OP_ENABLE_KTLS was set before the handshake (offload_prepare) and
 * tells us through BIO_get_ktls_send/recv. RX for TLS 1.3: OpenSSL 3.0 does
 * not offload it, so the engine derives the client application traffic key
 * and IV from CLIENT_TRAFFIC_SECRET_0 (caught by the key log callback, never
 * logged) and installs TLS_RX itself. That is only correct when OpenSSL holds
 * no client record beyond the handshake: SSL_accept reads record by record
 * (no read-ahead), and SSL_has_pending() must be 0; then the next client
 * record is application record 0 (RFC 8446 §5.3: the sequence number resets
 * with each key change). Secrets and keys are wiped right after use.
 *
 * What the kernel really did (TLS_SW or TLS_HW, per direction) is read back
 * with sock_diag (INET_DIAG_ULP_INFO, TLS_INFO_TXCONF/RXCONF), the way
 * `ss -ti` shows it. Without CAP_NET_ADMIN the kernel does not report it and
 * the mode is taken as TLS_SW.
 *
 * Control records on a kTLS RX socket: close_notify ends the stream; any
 * other alert, and a TLS 1.3 KeyUpdate (the 6.1 kernel cannot rekey), end the
 * session with a reason, never with corrupt data.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <linux/tls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine.h"
#include "keys.h"
#include "offload.h"

#ifndef SOL_TLS
#define SOL_TLS 282
#endif
#ifndef TCP_ULP
#define TCP_ULP 31
#endif

#define TLS_RECORD_ALERT 21
#define TLS_RECORD_HANDSHAKE 22
#define TLS_RECORD_APPDATA 23

static int kernel_tls = -1; /* -1 unknown, 0 absent, 1 usable */

/*
 * TCP_ULP "tls" on an unconnected socket: ENOENT means no tls module (the
 * kernel tries to load it first when we may), ENOTCONN means it is there.
 */
bool offload_ktls_usable(void)
{
	if (kernel_tls < 0) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		kernel_tls = 0;
		if (fd >= 0) {
			if (setsockopt(fd, IPPROTO_TCP, TCP_ULP, "tls", sizeof("tls")) == 0 ||
			    errno != ENOENT)
				kernel_tls = 1;
			close(fd);
		}
	}
	return kernel_tls == 1;
}

static bool ktls_available(void)
{
	return offload_ktls_usable();
}

/* --- TLS 1.3 RX ----------------------------------------------------------- */

union crypto_info {
	struct tls_crypto_info info;
	struct tls12_crypto_info_aes_gcm_128 gcm128;
	struct tls12_crypto_info_aes_gcm_256 gcm256;
	struct tls12_crypto_info_chacha20_poly1305 chacha;
};

static int install_rx_tls13(struct offload_conn *c)
{
	struct offload_secret *sec = offload_secret_get(c->ssl);
	const SSL_CIPHER *ci = SSL_get_current_cipher(c->ssl);
	const struct keys_suite *su = ci ? keys_suite_tls13(SSL_CIPHER_get_protocol_id(ci)) : NULL;
	uint8_t key[32], iv[12];
	union crypto_info info;
	size_t len;
	int rc = -1;

	if (!sec || sec->client_len <= 0) {
		snprintf(c->err, sizeof(c->err), "no client traffic secret");
		return -1;
	}
	if (!su) {
		snprintf(c->err, sizeof(c->err), "cipher %s not supported by kernel TLS",
			 ci ? SSL_CIPHER_get_name(ci) : "?");
		return -1;
	}
	if (SSL_has_pending(c->ssl)) {
		snprintf(c->err, sizeof(c->err), "client data already buffered in OpenSSL");
		return -1;
	}
	if (keys_tls13_traffic(su, sec->client, (size_t)sec->client_len, key, iv)) {
		snprintf(c->err, sizeof(c->err), "key derivation failed");
		return -1;
	}
	memset(&info, 0, sizeof(info));
	info.info.version = TLS_1_3_VERSION;
	info.info.cipher_type = su->kernel_cipher;
	/* rec_seq stays 0: the first application record (see the file header). */
	switch (su->kernel_cipher) {
	case TLS_CIPHER_AES_GCM_128:
		memcpy(info.gcm128.salt, iv, 4);
		memcpy(info.gcm128.iv, iv + 4, 8);
		memcpy(info.gcm128.key, key, 16);
		len = sizeof(info.gcm128);
		break;
	case TLS_CIPHER_AES_GCM_256:
		memcpy(info.gcm256.salt, iv, 4);
		memcpy(info.gcm256.iv, iv + 4, 8);
		memcpy(info.gcm256.key, key, 32);
		len = sizeof(info.gcm256);
		break;
	default:
		memcpy(info.chacha.iv, iv, 12);
		memcpy(info.chacha.key, key, 32);
		len = sizeof(info.chacha);
		break;
	}
	if (setsockopt(c->fd, SOL_TLS, TLS_RX, &info, (socklen_t)len) == 0)
		rc = 0;
	else
		snprintf(c->err, sizeof(c->err), "TLS_RX: %s", strerror(errno));
	OPENSSL_cleanse(&info, sizeof(info));
	OPENSSL_cleanse(key, sizeof(key));
	OPENSSL_cleanse(iv, sizeof(iv));
	return rc;
}

/* --- what the kernel reports ---------------------------------------------- */

static enum offload_mode conf_mode(unsigned conf)
{
	return conf == TLS_CONF_HW || conf == TLS_CONF_HW_RECORD ? OFFLOAD_MODE_KTLS_HW :
	       conf == TLS_CONF_SW ? OFFLOAD_MODE_KTLS_SW : OFFLOAD_MODE_USERSPACE;
}

static void parse_tls_info(const struct nlattr *a, int len, unsigned *tx, unsigned *rx)
{
	while (len >= (int)sizeof(*a) && a->nla_len >= sizeof(*a) && a->nla_len <= len) {
		unsigned type = a->nla_type & NLA_TYPE_MASK;
		const void *p = (const char *)a + NLA_HDRLEN;
		if ((type == TLS_INFO_TXCONF || type == TLS_INFO_RXCONF) &&
		    a->nla_len >= NLA_HDRLEN + sizeof(uint16_t)) {
			uint16_t v;
			memcpy(&v, p, sizeof(v));
			*(type == TLS_INFO_TXCONF ? tx : rx) = v;
		}
		len -= NLA_ALIGN(a->nla_len);
		a = (const struct nlattr *)((const char *)a + NLA_ALIGN(a->nla_len));
	}
}

/* 0 when the kernel reported the socket's TLS configuration. */
static int diag_conf(int fd, unsigned *tx, unsigned *rx)
{
	struct {
		struct nlmsghdr nh;
		struct inet_diag_req_v2 req;
	} msg;
	struct sockaddr_storage la, ra;
	socklen_t ll = sizeof(la), rl = sizeof(ra);
	struct sockaddr_nl nl = { .nl_family = AF_NETLINK };
	struct timeval tv = { 1, 0 };
	union {
		char buf[8192];
		struct nlmsghdr align;
	} resp;
	ssize_t n;
	int ns, rc = -1;

	*tx = *rx = 0;
	if (getsockname(fd, (struct sockaddr *)&la, &ll) || getpeername(fd, (struct sockaddr *)&ra, &rl))
		return -1;
	memset(&msg, 0, sizeof(msg));
	msg.nh.nlmsg_len = sizeof(msg);
	msg.nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
	msg.nh.nlmsg_flags = NLM_F_REQUEST;
	msg.req.sdiag_family = (uint8_t)la.ss_family;
	msg.req.sdiag_protocol = IPPROTO_TCP;
	msg.req.idiag_states = 1u << 1; /* TCP_ESTABLISHED */
	msg.req.idiag_ext = 1u << (INET_DIAG_INFO - 1);
	msg.req.id.idiag_cookie[0] = msg.req.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;
	if (la.ss_family == AF_INET) {
		const struct sockaddr_in *l4 = (const void *)&la, *r4 = (const void *)&ra;
		msg.req.id.idiag_sport = l4->sin_port;
		msg.req.id.idiag_dport = r4->sin_port;
		memcpy(msg.req.id.idiag_src, &l4->sin_addr, 4);
		memcpy(msg.req.id.idiag_dst, &r4->sin_addr, 4);
	} else {
		const struct sockaddr_in6 *l6 = (const void *)&la, *r6 = (const void *)&ra;
		msg.req.id.idiag_sport = l6->sin6_port;
		msg.req.id.idiag_dport = r6->sin6_port;
		memcpy(msg.req.id.idiag_src, &l6->sin6_addr, 16);
		memcpy(msg.req.id.idiag_dst, &r6->sin6_addr, 16);
	}
	ns = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
	if (ns < 0)
		return -1;
	setsockopt(ns, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (sendto(ns, &msg, sizeof(msg), 0, (struct sockaddr *)&nl, sizeof(nl)) < 0)
		goto out;
	n = recv(ns, resp.buf, sizeof(resp.buf), 0);
	if (n > 0) {
		const struct nlmsghdr *h = &resp.align;
		if (NLMSG_OK(h, (size_t)n) && h->nlmsg_type == SOCK_DIAG_BY_FAMILY) {
			const struct inet_diag_msg *dm = NLMSG_DATA(h);
			const struct nlattr *a = (const void *)(dm + 1);
			int alen = (int)h->nlmsg_len - (int)NLMSG_LENGTH(sizeof(*dm));
			while (alen >= (int)sizeof(*a) && a->nla_len >= sizeof(*a) && a->nla_len <= alen) {
				if ((a->nla_type & NLA_TYPE_MASK) == INET_DIAG_ULP_INFO) {
					const struct nlattr *u = (const void *)((const char *)a + NLA_HDRLEN);
					int ulen = a->nla_len - NLA_HDRLEN;
					while (ulen >= (int)sizeof(*u) && u->nla_len >= sizeof(*u) &&
					       u->nla_len <= ulen) {
						if ((u->nla_type & NLA_TYPE_MASK) == INET_ULP_INFO_TLS) {
							parse_tls_info((const void *)((const char *)u + NLA_HDRLEN),
								       u->nla_len - NLA_HDRLEN, tx, rx);
							rc = 0;
						}
						ulen -= NLA_ALIGN(u->nla_len);
						u = (const void *)((const char *)u + NLA_ALIGN(u->nla_len));
					}
				}
				alen -= NLA_ALIGN(a->nla_len);
				a = (const void *)((const char *)a + NLA_ALIGN(a->nla_len));
			}
		}
	}
out:
	close(ns);
	return rc;
}

/* --- engine ops ------------------------------------------------------------ */

static int kt_attach(struct offload_conn *c)
{
	bool tx, rx;
	unsigned txconf, rxconf;

	if (!ktls_available()) {
		snprintf(c->err, sizeof(c->err), "kernel has no TLS support (tls module)");
		return -ENOTSUP;
	}
	tx = BIO_get_ktls_send(SSL_get_wbio(c->ssl)) == 1;
	rx = BIO_get_ktls_recv(SSL_get_rbio(c->ssl)) == 1;
	if (!tx) {
		snprintf(c->err, sizeof(c->err), "OpenSSL did not offload TX for %s %s",
			 SSL_get_version(c->ssl),
			 SSL_CIPHER_get_name(SSL_get_current_cipher(c->ssl)));
		return -ENOTSUP; /* the secrets stay for the next engine */
	}
	/* From here on nothing can fail in a way OpenSSL would have to take back. */
	c->err[0] = '\0';
	if (!rx && SSL_version(c->ssl) == TLS1_3_VERSION)
		rx = install_rx_tls13(c) == 0;
	offload_secret_wipe(c->ssl);
	/* c->err keeps why RX stayed in userspace, if it did. */
	c->tx_kernel = true;
	c->rx_kernel = rx;
	c->tx_mode = OFFLOAD_MODE_KTLS_SW;
	c->rx_mode = rx ? OFFLOAD_MODE_KTLS_SW : OFFLOAD_MODE_USERSPACE;
	if (diag_conf(c->fd, &txconf, &rxconf) == 0) {
		c->modes_verified = true;
		c->tx_mode = conf_mode(txconf);
		c->rx_mode = conf_mode(rxconf);
	}
	return 0;
}

/* Read one record the kernel decrypted, telling data from control records. */
static ssize_t kt_recvmsg(struct offload_conn *c, void *buf, size_t len)
{
	char cbuf[CMSG_SPACE(sizeof(unsigned char))];
	struct iovec iov = { buf, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	unsigned char type = TLS_RECORD_APPDATA;
	ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT);

	if (n < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
			c->want = OFFLOAD_WANT_READ;
			return -EAGAIN;
		}
		snprintf(c->err, sizeof(c->err), "kernel TLS receive: %s", strerror(errno));
		return -errno;
	}
	for (cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
		if (cm->cmsg_level == SOL_TLS && cm->cmsg_type == TLS_GET_RECORD_TYPE)
			type = *CMSG_DATA(cm);
	if (type == TLS_RECORD_APPDATA)
		return n;
	if (type == TLS_RECORD_ALERT && n >= 2) {
		const unsigned char *a = buf;
		if (a[1] == 0) /* close_notify (RFC 8446 §6.1) */
			return 0;
		snprintf(c->err, sizeof(c->err), "TLS alert from client: level %u description %u",
			 a[0], a[1]);
		return -EPROTO;
	}
	if (type == TLS_RECORD_HANDSHAKE && n >= 1 && ((const unsigned char *)buf)[0] == 24) {
		c->keyupdate = true;
		snprintf(c->err, sizeof(c->err),
			 "TLS 1.3 KeyUpdate from client: this kernel cannot rekey kTLS RX");
		return -EPROTO;
	}
	snprintf(c->err, sizeof(c->err), "unexpected TLS record type %u after handshake", type);
	return -EPROTO;
}

static ssize_t kt_recv(struct offload_conn *c, void *buf, size_t len)
{
	if (!c->rx_kernel)
		return offload_userspace.recv(c, buf, len);
	return kt_recvmsg(c, buf, len);
}

static ssize_t kt_send(struct offload_conn *c, const void *buf, size_t len)
{
	/* OpenSSL knows TX is in the kernel and writes plaintext to the socket. */
	return offload_userspace.send(c, buf, len);
}

static bool kt_pending(struct offload_conn *c)
{
	return c->rx_kernel ? false : offload_userspace.pending(c);
}

static int kt_shutdown(struct offload_conn *c)
{
	return offload_userspace.shutdown(c);
}

static void kt_detach(struct offload_conn *c)
{
	c->priv = NULL; /* the engine keeps no per-session state of its own */
}

static ssize_t kt_splice_from(struct offload_conn *c, int pipe_w, size_t len)
{
	ssize_t n;

	if (!c->rx_kernel)
		return -ENOTSUP;
	n = splice(c->fd, NULL, pipe_w, NULL, len, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
	if (n >= 0)
		return n;
	if (errno == EAGAIN || errno == EINTR) {
		c->want = OFFLOAD_WANT_READ;
		return -EAGAIN;
	}
	if (errno == EINVAL || errno == EIO || errno == EBADMSG) {
		/* The next record is not application data: take it the slow way. */
		char rec[512];
		n = kt_recvmsg(c, rec, sizeof(rec));
		if (n > 0 && write(pipe_w, rec, (size_t)n) != n) {
			snprintf(c->err, sizeof(c->err), "pipe write failed");
			return -EIO;
		}
		return n;
	}
	snprintf(c->err, sizeof(c->err), "splice from client: %s", strerror(errno));
	return -errno;
}

static ssize_t kt_splice_to(struct offload_conn *c, int pipe_r, size_t len)
{
	ssize_t n = splice(pipe_r, NULL, c->fd, NULL, len, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);

	if (n >= 0)
		return n;
	if (errno == EAGAIN || errno == EINTR) {
		c->want = OFFLOAD_WANT_WRITE;
		return -EAGAIN;
	}
	snprintf(c->err, sizeof(c->err), "splice to client: %s", strerror(errno));
	return -errno;
}

const struct offload_ops offload_ktls = {
	.name = "ktls",
	.available = ktls_available,
	.attach = kt_attach,
	.recv = kt_recv,
	.send = kt_send,
	.pending = kt_pending,
	.shutdown = kt_shutdown,
	.detach = kt_detach,
	.splice_from = kt_splice_from,
	.splice_to = kt_splice_to,
};
