/*
 * nic.c - which network interfaces offer TLS offload (kTLS TLS_HW).
 *
 * Read with the ethtool ioctl at start-up: the feature names come from the
 * kernel (ETH_SS_FEATURES), so no table of bit numbers is hard-coded. The
 * kernel picks TLS_HW by itself when the egress device has the feature on;
 * this report tells the operator whether that can happen at all.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/ethtool.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "offload.h"

static const char *const tls_features[] = {
	"tls-hw-tx-offload", "tls-hw-rx-offload", "tls-hw-record",
};

static int feature_names(int fd, const char *ifname, struct ethtool_gstrings **out)
{
	struct {
		struct ethtool_sset_info hdr;
		uint32_t count;
	} ss = { .hdr = { .cmd = ETHTOOL_GSSET_INFO, .sset_mask = 1ull << ETH_SS_FEATURES } };
	struct ethtool_gstrings *gs;
	struct ifreq ifr;
	uint32_t n;

	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
	ifr.ifr_data = (void *)&ss;
	if (ioctl(fd, SIOCETHTOOL, &ifr) < 0 || !ss.hdr.sset_mask)
		return -1;
	n = ss.count;
	if (n == 0 || n > 4096)
		return -1;
	gs = calloc(1, sizeof(*gs) + (size_t)n * ETH_GSTRING_LEN);
	if (!gs)
		return -1;
	gs->cmd = ETHTOOL_GSTRINGS;
	gs->string_set = ETH_SS_FEATURES;
	gs->len = n;
	ifr.ifr_data = (void *)gs;
	if (ioctl(fd, SIOCETHTOOL, &ifr) < 0) {
		free(gs);
		return -1;
	}
	*out = gs;
	return (int)n;
}

void offload_nic_report(void (*report)(const char *ifname, const char *feature, bool available,
				       bool active))
{
	struct if_nameindex *ifs = if_nameindex(), *i;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (!ifs || fd < 0)
		goto out;
	for (i = ifs; i->if_index; i++) {
		struct ethtool_gstrings *names = NULL;
		struct ethtool_gfeatures *gf;
		struct ifreq ifr;
		int n = feature_names(fd, i->if_name, &names), k;
		unsigned blocks;

		if (n <= 0)
			continue;
		blocks = ((unsigned)n + 31) / 32;
		gf = calloc(1, sizeof(*gf) + blocks * sizeof(gf->features[0]));
		if (!gf) {
			free(names);
			continue;
		}
		gf->cmd = ETHTOOL_GFEATURES;
		gf->size = blocks;
		memset(&ifr, 0, sizeof(ifr));
		snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", i->if_name);
		ifr.ifr_data = (void *)gf;
		if (ioctl(fd, SIOCETHTOOL, &ifr) == 0) {
			for (k = 0; k < n; k++) {
				const char *name = (const char *)names->data + (size_t)k * ETH_GSTRING_LEN;
				unsigned f;
				for (f = 0; f < sizeof(tls_features) / sizeof(tls_features[0]); f++) {
					if (strncmp(name, tls_features[f], ETH_GSTRING_LEN) == 0) {
						uint32_t bit = 1u << (k % 32);
						report(i->if_name, tls_features[f],
						       gf->features[k / 32].available & bit,
						       gf->features[k / 32].active & bit);
					}
				}
			}
		}
		free(gf);
		free(names);
	}
out:
	if (ifs)
		if_freenameindex(ifs);
	if (fd >= 0)
		close(fd);
}
