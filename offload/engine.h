/*
 * engine.h - what the record engines share inside offload/: the secrets and
 * record counts caught during the handshake, for engines that install keys
 * themselves (kernel TLS RX on TLS 1.3, the DPDK engine both ways).
 */
#ifndef MAILGW_OFFLOAD_ENGINE_H
#define MAILGW_OFFLOAD_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "keys.h"
#include "offload.h"

/*
 * Per connection, attached to the SSL as ex_data by offload_prepare() when
 * an engine may need it; wiped and freed by offload_secret_wipe() or with
 * the SSL.
 */
struct offload_secret {
	uint8_t client[KEYS_SECRET_MAX]; /* CLIENT_TRAFFIC_SECRET_0 (TLS 1.3) */
	int client_len;
	uint8_t server[KEYS_SECRET_MAX]; /* SERVER_TRAFFIC_SECRET_0 (TLS 1.3) */
	int server_len;
	/*
	 * Records OpenSSL wrote under the current write keys: after the
	 * ChangeCipherSpec (TLS 1.2: the Finished) or after the server
	 * application traffic secret appeared (TLS 1.3: NewSessionTickets).
	 * This is the first sequence number an engine taking over TX uses.
	 */
	uint64_t tx_records;
};

struct offload_secret *offload_secret_get(const SSL *ssl);
void offload_secret_wipe(SSL *ssl);

bool offload_ktls_usable(void);  /* ktls.c: the kernel has the tls module */
bool offload_dpdk_usable(void);  /* dpdk.c: EAL up and a queue pair taken */

#endif
