/*
 * bpfmap.c - userspace side of the mail-port classifier: load the skeleton,
 * pin its maps, fill the port table, attach at tc clsact ingress/egress,
 * mark offloaded flows, read the per-CPU counters back from the pins.
 *
 * Security stance: everything here needs CAP_BPF (or CAP_SYS_ADMIN); attach
 * also CAP_NET_ADMIN.  Nothing a peer sends reaches this file: the
 * programs only count.  Pins are created mode 0600 by the kernel; the pin
 * directory is 0755 so that a reader with CAP_BPF finds the files.
 */
#include "bpfmap.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/magic.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "mailgw_bpf.h"
#include "mailgw.skel.h"

#ifndef CAP_BPF
#define CAP_BPF 39
#endif

/* tc filter identity: priority 1 runs before most other filters, so the
 * counters see every packet; the handle tells ours apart ("MG"). */
#define BPFMAP_TC_PRIO   1
#define BPFMAP_TC_HANDLE 0x4d47

#define BPFMAP_MAX_IFACES 32
#define BPFMAP_PATH_MAX   200

struct bpfmap_iface {
	int ifindex;
	char name[IF_NAMESIZE];
	int hook_created;       /* the clsact qdisc is ours to remove */
	int ingress;            /* our filter is attached there */
	int egress;
};

struct bpfmap {
	struct mailgw_bpf *skel;        /* NULL for bpfmap_open_pinned */
	char pin[BPFMAP_PATH_MAX];
	unsigned char reused[4];        /* pin_names[i] was there before us */
	int ports_fd, flows_fd, offload_fd, stats_fd;
	int own_fds;                    /* fds from bpf_obj_get, closed by us */
	struct bpfmap_iface ifs[BPFMAP_MAX_IFACES];
	size_t n_ifs;
};

static const struct {
	unsigned int port;
	int proto;
} std_ports[] = {
	{ 25, MGW_PROTO_SMTP },  { 587, MGW_PROTO_SMTP }, { 465, MGW_PROTO_SMTPS },
	{ 143, MGW_PROTO_IMAP }, { 993, MGW_PROTO_IMAPS },
	{ 110, MGW_PROTO_POP3 }, { 995, MGW_PROTO_POP3S },
};

static const char *const pin_names[] = {
	MGW_PIN_PORTS, MGW_PIN_FLOWS, MGW_PIN_OFFLOAD, MGW_PIN_STATS,
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

int bpfmap_kind_parse(const char *kind)
{
	for (int p = MGW_PROTO_NONE + 1; p < MGW_PROTO_MAX; p++)
		if (kind && strcmp(kind, mgw_proto_name(p)) == 0)
			return p;
	return -EINVAL;
}

/* --- preflight: the reasons a load fails, told plainly ------------------ */

static int have_cap(int cap)
{
	struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3 };
	struct __user_cap_data_struct d[2];

	memset(d, 0, sizeof(d));
	if (syscall(SYS_capget, &h, d))
		return 1;       /* cannot tell: let the kernel decide */
	return !!(d[cap / 32].effective & (1u << (cap % 32)));
}

static int check_caps(int attach, char *err, size_t errlen)
{
	if (!have_cap(CAP_BPF) && !have_cap(CAP_SYS_ADMIN)) {
		set_err(err, errlen, "not root / no CAP_BPF: the BPF maps and programs need "
			"CAP_BPF (or CAP_SYS_ADMIN)");
		return -EPERM;
	}
	if (attach && !have_cap(CAP_NET_ADMIN)) {
		set_err(err, errlen, "not root / no CAP_NET_ADMIN: attaching at tc needs it");
		return -EPERM;
	}
	return 0;
}

static int pin_path_of(const char *pin_path, char *out, char *err, size_t errlen)
{
	size_t n;

	if (!pin_path || !*pin_path)
		pin_path = BPFMAP_DEFAULT_PIN;
	n = strlen(pin_path);
	while (n > 1 && pin_path[n - 1] == '/')
		n--;
	if (pin_path[0] != '/' || n + 1 + 16 >= BPFMAP_PATH_MAX) {
		set_err(err, errlen, "pin path %s: must be absolute and under %d bytes",
			pin_path, BPFMAP_PATH_MAX - 20);
		return -EINVAL;
	}
	memcpy(out, pin_path, n);
	out[n] = '\0';
	return 0;
}

/* The pin path (or, before it exists, its parent) must be on a bpffs. */
static int check_bpffs(const char *pin, char *err, size_t errlen)
{
	char parent[BPFMAP_PATH_MAX];
	struct statfs fs;
	char *slash;

	if (statfs(pin, &fs) == 0) {
		if (fs.f_type == BPF_FS_MAGIC)
			return 0;
	} else if (errno == ENOENT) {
		snprintf(parent, sizeof(parent), "%s", pin);
		slash = strrchr(parent, '/');
		if (slash == parent)
			slash[1] = '\0';
		else if (slash)
			*slash = '\0';
		if (statfs(parent, &fs) == 0 && fs.f_type == BPF_FS_MAGIC)
			return 0;
	}
	set_err(err, errlen, "bpffs not mounted: %s is not on a BPF filesystem "
		"(mount -t bpf bpf /sys/fs/bpf)", pin);
	return -ENOENT;
}

static int check_btf(char *err, size_t errlen)
{
	if (access("/sys/kernel/btf/vmlinux", R_OK) == 0)
		return 0;
	set_err(err, errlen, "no BTF: /sys/kernel/btf/vmlinux is missing (kernel without "
		"CONFIG_DEBUG_INFO_BTF); the classifier is CO-RE and needs it");
	return -ENOENT;
}

/* bpf_loop() came with 5.17. */
static int old_kernel(void)
{
	struct utsname u;
	unsigned int major = 0, minor = 0;

	if (uname(&u) || sscanf(u.release, "%u.%u", &major, &minor) != 2)
		return 0;
	return major < 5 || (major == 5 && minor < 17);
}

/* --- pins --------------------------------------------------------------- */

static void pin_file(const struct bpfmap *m, const char *name, char *out, size_t outlen)
{
	snprintf(out, outlen, "%s/%s", m->pin, name);
}

/*
 * A pin left by an earlier owner is kept when it is the same kind of map
 * (libbpf then reuses it: the counters carry on); anything else under one
 * of our names is removed so a fresh map takes its place.
 */
static void drop_stale_pin(const struct bpfmap *m, struct bpf_map *map, const char *name)
{
	struct bpf_map_info info;
	__u32 len = sizeof(info);
	char path[BPFMAP_PATH_MAX + 32];
	int fd, same = 0;

	pin_file(m, name, path, sizeof(path));
	fd = bpf_obj_get(path);
	if (fd < 0) {
		if (errno != ENOENT)
			unlink(path);
		return;
	}
	memset(&info, 0, sizeof(info));
	if (bpf_obj_get_info_by_fd(fd, &info, &len) == 0)
		same = info.type == bpf_map__type(map) &&
		       info.key_size == bpf_map__key_size(map) &&
		       info.value_size == bpf_map__value_size(map) &&
		       info.max_entries == bpf_map__max_entries(map) &&
		       info.map_flags == bpf_map__map_flags(map);
	close(fd);
	if (!same)
		unlink(path);
}

/* all: our own pins (close); else only those this open created (errors),
 * so a failed open leaves an earlier owner's pins alone. */
static void unpin_all(const struct bpfmap *m, int all)
{
	char path[BPFMAP_PATH_MAX + 32];

	for (size_t i = 0; i < sizeof(pin_names) / sizeof(pin_names[0]); i++) {
		if (!all && m->reused[i])
			continue;
		pin_file(m, pin_names[i], path, sizeof(path));
		unlink(path);
	}
	rmdir(m->pin);  /* fails, harmlessly, if someone else keeps files there */
}

/* --- port table ---------------------------------------------------------- */

struct want_port {
	unsigned int port;
	int proto;
	int slot;
};

static int zero_stats_row(int stats_fd, __u32 slot)
{
	int ncpu = libbpf_num_possible_cpus();
	void *zero;
	int ret;

	if (ncpu <= 0)
		return ncpu ? ncpu : -EINVAL;
	zero = calloc((size_t)ncpu, sizeof(struct mgw_port_stats));
	if (!zero)
		return -ENOMEM;
	ret = bpf_map_update_elem(stats_fd, &slot, zero, BPF_ANY) ? -errno : 0;
	free(zero);
	return ret;
}

/*
 * The standard seven plus the extra ports.  A port that was in a reused
 * table keeps its counter row; new ports get a free, zeroed row.
 */
static int fill_ports(struct bpfmap *m, const struct bpfmap_opts *o, char *err, size_t errlen)
{
	struct want_port want[MGW_MAX_PORTS];
	unsigned char used[MGW_MAX_PORTS];
	struct mgw_portbits *bits = NULL;
	__u32 old[MGW_MAX_PORTS], key, next, *prev = NULL;
	size_t n = 0, n_old = 0, i, j;
	struct mgw_port_info info;
	int ret, proto;

	for (i = 0; i < sizeof(std_ports) / sizeof(std_ports[0]); i++) {
		want[n].port = std_ports[i].port;
		want[n].proto = std_ports[i].proto;
		want[n++].slot = -1;
	}
	for (i = 0; i < o->n_ports; i++) {
		proto = bpfmap_kind_parse(o->ports[i].kind);
		if (proto < 0 || o->ports[i].port < 1 || o->ports[i].port > 65535) {
			set_err(err, errlen, "port %u/%s: want 1-65535 and one of smtp imap "
				"pop3 smtps imaps pop3s", o->ports[i].port,
				o->ports[i].kind ? o->ports[i].kind : "(null)");
			return -EINVAL;
		}
		for (j = 0; j < n && want[j].port != o->ports[i].port; j++)
			;
		if (j == n) {
			if (n == MGW_MAX_PORTS) {
				set_err(err, errlen, "more than %d ports", MGW_MAX_PORTS);
				return -E2BIG;
			}
			want[n].port = o->ports[i].port;
			want[n++].slot = -1;
		}
		want[j].proto = proto;
	}

	/* What a reused table holds: keep rows, drop ports no longer wanted. */
	memset(used, 0, sizeof(used));
	while (n_old < MGW_MAX_PORTS && bpf_map_get_next_key(m->ports_fd, prev, &next) == 0) {
		old[n_old] = next;
		prev = &old[n_old++];
	}
	for (i = 0; i < n_old; i++) {
		key = old[i];
		for (j = 0; j < n && want[j].port != key; j++)
			;
		if (j == n) {
			bpf_map_delete_elem(m->ports_fd, &key);
			continue;
		}
		if (bpf_map_lookup_elem(m->ports_fd, &key, &info) == 0 &&
		    info.slot < MGW_MAX_PORTS && !used[info.slot]) {
			want[j].slot = (int)info.slot;
			used[info.slot] = 1;
		}
	}

	bits = calloc(1, sizeof(*bits));
	if (!bits) {
		ret = -ENOMEM;
		goto err_update;
	}
	for (i = 0; i < n; i++) {
		bits->bits[want[i].port / 64] |= 1ull << (want[i].port % 64);
		if (want[i].slot < 0) {
			for (j = 0; j < MGW_MAX_PORTS && used[j]; j++)
				;
			used[j] = 1;
			want[i].slot = (int)j;
			ret = zero_stats_row(m->stats_fd, (__u32)j);
			if (ret)
				goto err_update;
		}
		key = want[i].port;
		info.proto = (__u32)want[i].proto;
		info.slot = (__u32)want[i].slot;
		if (bpf_map_update_elem(m->ports_fd, &key, &info, BPF_ANY)) {
			ret = -errno;
			goto err_update;
		}
	}
	/* Last: the programs look at a port only once its row is there. */
	key = 0;
	if (bpf_map_update_elem(bpf_map__fd(m->skel->maps.mgw_portbits), &key, bits, BPF_ANY)) {
		ret = -errno;
		goto err_update;
	}
	free(bits);
	return 0;

err_update:
	free(bits);
	set_err(err, errlen, "filling the port table: %s", strerror(-ret));
	return ret;
}

/* --- tc attach ----------------------------------------------------------- */

static int is_loopback(const char *name)
{
	struct ifreq ifr;
	int fd, lo = 0;

	fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return 0;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", name);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) == 0)
		lo = !!(ifr.ifr_flags & IFF_LOOPBACK);
	close(fd);
	return lo;
}

static int tc_attach_one(int ifindex, enum bpf_tc_attach_point point, int prog_fd)
{
	LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex, .attach_point = point);
	LIBBPF_OPTS(bpf_tc_opts, opts, .handle = BPFMAP_TC_HANDLE,
		    .priority = BPFMAP_TC_PRIO, .prog_fd = prog_fd,
		    .flags = BPF_TC_F_REPLACE);

	return bpf_tc_attach(&hook, &opts);
}

static void tc_detach_one(int ifindex, enum bpf_tc_attach_point point)
{
	LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex, .attach_point = point);
	LIBBPF_OPTS(bpf_tc_opts, opts, .handle = BPFMAP_TC_HANDLE,
		    .priority = BPFMAP_TC_PRIO);

	bpf_tc_detach(&hook, &opts);
}

static void detach_iface(struct bpfmap_iface *i)
{
	if (i->ingress)
		tc_detach_one(i->ifindex, BPF_TC_INGRESS);
	if (i->egress)
		tc_detach_one(i->ifindex, BPF_TC_EGRESS);
	if (i->hook_created) {
		LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = i->ifindex,
			    .attach_point = BPF_TC_INGRESS | BPF_TC_EGRESS);

		bpf_tc_hook_destroy(&hook);
	}
	i->ingress = i->egress = i->hook_created = 0;
}

static int attach_iface(struct bpfmap *m, const char *name, char *err, size_t errlen)
{
	struct bpfmap_iface *i = &m->ifs[m->n_ifs];
	int ret, ifindex;

	ifindex = (int)if_nametoindex(name);
	if (!ifindex) {
		set_err(err, errlen, "interface %s not found", name);
		return -ENODEV;
	}
	memset(i, 0, sizeof(*i));
	i->ifindex = ifindex;
	snprintf(i->name, sizeof(i->name), "%s", name);
	{
		LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex,
			    .attach_point = BPF_TC_INGRESS | BPF_TC_EGRESS);

		ret = bpf_tc_hook_create(&hook);
	}
	if (ret && ret != -EEXIST) {
		set_err(err, errlen, "%s: creating the clsact qdisc: %s", name, strerror(-ret));
		return ret;
	}
	i->hook_created = ret == 0;
	m->n_ifs++;     /* from here on, bpfmap_close() undoes what is done */

	ret = tc_attach_one(ifindex, BPF_TC_INGRESS,
			    bpf_program__fd(m->skel->progs.mgw_tc_ingress));
	if (ret)
		goto err_attach;
	i->ingress = 1;
	if (is_loopback(name))
		return 0;
	ret = tc_attach_one(ifindex, BPF_TC_EGRESS,
			    bpf_program__fd(m->skel->progs.mgw_tc_egress));
	if (ret)
		goto err_attach;
	i->egress = 1;
	return 0;

err_attach:
	set_err(err, errlen, "%s: tc attach: %s%s", name, strerror(-ret),
		ret == -EPERM ? " (not root / no CAP_NET_ADMIN)" : "");
	return ret;
}

/* --- open / close -------------------------------------------------------- */

static struct bpfmap *bpfmap_new(void)
{
	struct bpfmap *m = calloc(1, sizeof(*m));

	if (m)
		m->ports_fd = m->flows_fd = m->offload_fd = m->stats_fd = -1;
	return m;
}

static int load_skel(struct bpfmap *m, const struct bpfmap_opts *o, char *err, size_t errlen)
{
	struct bpf_map *maps[4];
	char path[BPFMAP_PATH_MAX + 32];
	int ret;

	m->skel = mailgw_bpf__open();
	if (!m->skel) {
		ret = -errno;
		set_err(err, errlen, "opening the BPF object: %s", strerror(-ret));
		return ret;
	}
	maps[0] = m->skel->maps.mgw_ports;
	maps[1] = m->skel->maps.mgw_flows;
	maps[2] = m->skel->maps.mgw_offload;
	maps[3] = m->skel->maps.mgw_stats;
	if (o->max_flows) {
		bpf_map__set_max_entries(maps[1], o->max_flows);
		bpf_map__set_max_entries(maps[2], o->max_flows);
	}
	for (int i = 0; i < 4; i++) {
		drop_stale_pin(m, maps[i], pin_names[i]);
		pin_file(m, pin_names[i], path, sizeof(path));
		m->reused[i] = access(path, F_OK) == 0;
		ret = bpf_map__set_pin_path(maps[i], path);
		if (ret) {
			set_err(err, errlen, "pin path %s: %s", path, strerror(-ret));
			return ret;
		}
	}
	ret = mailgw_bpf__load(m->skel);
	if (ret) {
		set_err(err, errlen, "loading the BPF programs: %s%s", strerror(-ret),
			ret == -EPERM || ret == -EACCES ?
			" (not root / no CAP_BPF, or the verifier refused: see the log above)" :
			ret == -EINVAL && old_kernel() ?
			" (kernel older than 5.17: bpf_loop and BTF-typed maps are needed)" : "");
		return ret;
	}
	m->ports_fd = bpf_map__fd(maps[0]);
	m->flows_fd = bpf_map__fd(maps[1]);
	m->offload_fd = bpf_map__fd(maps[2]);
	m->stats_fd = bpf_map__fd(maps[3]);
	return 0;
}

int bpfmap_open(const struct bpfmap_opts *o, struct bpfmap **out, char *err, size_t errlen)
{
	struct bpfmap *m;
	int ret;

	*out = NULL;
	if (!o || (o->n_ifaces && !o->ifaces) || (o->n_ports && !o->ports)) {
		set_err(err, errlen, "bpfmap_open: bad options");
		return -EINVAL;
	}
	if (o->n_ifaces > BPFMAP_MAX_IFACES) {
		set_err(err, errlen, "more than %d interfaces", BPFMAP_MAX_IFACES);
		return -E2BIG;
	}
	m = bpfmap_new();
	if (!m) {
		set_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	ret = pin_path_of(o->pin_path, m->pin, err, errlen);
	if (ret)
		goto err_free;
	ret = check_caps(1, err, errlen);
	if (ret)
		goto err_free;
	ret = check_btf(err, errlen);
	if (ret)
		goto err_free;
	ret = check_bpffs(m->pin, err, errlen);
	if (ret)
		goto err_free;
	for (size_t i = 0; i < o->n_ifaces; i++) {
		if (!o->ifaces[i] || !if_nametoindex(o->ifaces[i])) {
			set_err(err, errlen, "interface %s not found",
				o->ifaces[i] ? o->ifaces[i] : "(null)");
			ret = -ENODEV;
			goto err_free;
		}
	}
	if (mkdir(m->pin, 0755) && errno != EEXIST) {
		ret = -errno;
		set_err(err, errlen, "creating %s: %s", m->pin, strerror(errno));
		goto err_free;
	}

	ret = load_skel(m, o, err, errlen);
	if (ret)
		goto err_unpin;
	ret = fill_ports(m, o, err, errlen);
	if (ret)
		goto err_unpin;
	for (size_t i = 0; i < o->n_ifaces; i++) {
		ret = attach_iface(m, o->ifaces[i], err, errlen);
		if (ret)
			goto err_detach;
	}
	*out = m;
	return 0;

err_detach:
	for (size_t i = 0; i < m->n_ifs; i++)
		detach_iface(&m->ifs[i]);
err_unpin:
	unpin_all(m, 0);
	mailgw_bpf__destroy(m->skel);
err_free:
	free(m);
	return ret;
}

int bpfmap_open_pinned(const char *pin_path, struct bpfmap **out, char *err, size_t errlen)
{
	char path[BPFMAP_PATH_MAX + 32];
	int *fds[4];
	struct bpfmap *m;
	int ret;

	*out = NULL;
	m = bpfmap_new();
	if (!m) {
		set_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	m->own_fds = 1;
	fds[0] = &m->ports_fd;
	fds[1] = &m->flows_fd;
	fds[2] = &m->offload_fd;
	fds[3] = &m->stats_fd;
	ret = pin_path_of(pin_path, m->pin, err, errlen);
	if (ret)
		goto err_free;
	ret = check_caps(0, err, errlen);
	if (ret)
		goto err_free;
	ret = check_bpffs(m->pin, err, errlen);
	if (ret)
		goto err_free;
	for (int i = 0; i < 4; i++) {
		pin_file(m, pin_names[i], path, sizeof(path));
		*fds[i] = bpf_obj_get(path);
		if (*fds[i] < 0) {
			ret = -errno;
			set_err(err, errlen, "%s: %s%s", path, strerror(errno),
				ret == -ENOENT ? " (is the classifier loaded with this pin path?)" :
				ret == -EPERM ? " (not root / no CAP_BPF)" : "");
			goto err_close;
		}
	}
	*out = m;
	return 0;

err_close:
	for (int i = 0; i < 4; i++)
		if (*fds[i] >= 0)
			close(*fds[i]);
err_free:
	free(m);
	return ret;
}

void bpfmap_close(struct bpfmap *m)
{
	if (!m)
		return;
	if (m->skel) {
		for (size_t i = 0; i < m->n_ifs; i++)
			detach_iface(&m->ifs[i]);
		unpin_all(m, 1);
		mailgw_bpf__destroy(m->skel);
	} else if (m->own_fds) {
		close(m->ports_fd);
		close(m->flows_fd);
		close(m->offload_fd);
		close(m->stats_fd);
	}
	free(m);
}

void bpfmap_prog_ids(const struct bpfmap *m, unsigned int *ingress, unsigned int *egress)
{
	struct bpf_program *progs[2] = { NULL, NULL };
	unsigned int *ids[2] = { ingress, egress };

	if (m && m->skel) {
		progs[0] = m->skel->progs.mgw_tc_ingress;
		progs[1] = m->skel->progs.mgw_tc_egress;
	}
	for (int i = 0; i < 2; i++) {
		struct bpf_prog_info info;
		__u32 len = sizeof(info);

		if (!ids[i])
			continue;
		*ids[i] = 0;
		memset(&info, 0, sizeof(info));
		if (progs[i] && bpf_obj_get_info_by_fd(bpf_program__fd(progs[i]), &info, &len) == 0)
			*ids[i] = info.id;
	}
}

/* --- offload marks ------------------------------------------------------- */

/* One endpoint as the key stores it; IPv4-mapped IPv6 becomes IPv4. */
static int endpoint_of(const struct sockaddr *sa, __u32 addr[4], __u16 *port, int *family)
{
	static const unsigned char v4mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

	memset(addr, 0, 16);
	if (!sa)
		return -EINVAL;
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;

		memcpy(&addr[0], &s4->sin_addr, 4);
		*port = ntohs(s4->sin_port);
		*family = 4;
		return 0;
	}
	if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;

		if (memcmp(&s6->sin6_addr, v4mapped, sizeof(v4mapped)) == 0) {
			memcpy(&addr[0], (const unsigned char *)&s6->sin6_addr + 12, 4);
			*family = 4;
		} else {
			memcpy(addr, &s6->sin6_addr, 16);
			*family = 6;
		}
		*port = ntohs(s6->sin6_port);
		return 0;
	}
	return -EAFNOSUPPORT;
}

int bpfmap_mark_offloaded(struct bpfmap *m, const struct sockaddr *local,
			  const struct sockaddr *peer)
{
	struct mgw_offload_val val = { .flags = MGW_OFFLOAD_TLS_HW };
	struct mgw_flow_key key;
	__u32 la[4], pa[4];
	__u16 lp, pp;
	int lf, pf, ret;

	if (!m || m->offload_fd < 0)
		return -EINVAL;
	ret = endpoint_of(local, la, &lp, &lf);
	if (!ret)
		ret = endpoint_of(peer, pa, &pp, &pf);
	if (ret)
		return ret;
	if (lf != pf)
		return -EINVAL;
	memset(&key, 0, sizeof(key));
	key.family = (__u8)lf;
	if (mgw_endpoint_first(la, lp, pa, pp)) {
		memcpy(key.addr_a, la, 16);
		memcpy(key.addr_b, pa, 16);
		key.port_a = lp;
		key.port_b = pp;
	} else {
		memcpy(key.addr_a, pa, 16);
		memcpy(key.addr_b, la, 16);
		key.port_a = pp;
		key.port_b = lp;
	}
	return bpf_map_update_elem(m->offload_fd, &key, &val, BPF_ANY) ? -errno : 0;
}

/* --- counters ------------------------------------------------------------ */

struct port_row {
	unsigned int port;
	__u32 slot;
};

static int row_cmp(const void *a, const void *b)
{
	const struct port_row *x = a, *y = b;

	return (x->port > y->port) - (x->port < y->port);
}

static void emit_row(const struct mgw_port_stats *s, unsigned int port,
		     bpfmap_counter_fn cb, void *arg)
{
	for (unsigned int c = 0; c < MGW_CLASS_MAX; c++)
		cb(arg, "packets", port, mgw_class_name(c), s->packets[c]);
	for (unsigned int c = 0; c < MGW_CLASS_MAX; c++)
		cb(arg, "bytes", port, mgw_class_name(c), s->bytes[c]);
	for (unsigned int k = 0; k < MGW_KIND_MAX; k++)
		cb(arg, "flows", port, mgw_kind_name(k), s->flows[k]);
	for (unsigned int r = 0; r < MGW_REASON_MAX; r++)
		cb(arg, "violations", port, mgw_reason_name(r), s->violations[r]);
	for (unsigned int r = 0; r < MGW_REASON_MAX; r++)
		cb(arg, "violation_bytes", port, mgw_reason_name(r), s->violation_bytes[r]);
	for (unsigned int d = 0; d < MGW_DIR_MAX; d++)
		cb(arg, "untracked", port, mgw_dir_name(d), s->untracked[d]);
}

static void sum_cpus(const struct mgw_port_stats *per, int ncpu, struct mgw_port_stats *sum)
{
	const __u64 *src;
	__u64 *dst = (__u64 *)sum;
	size_t words = sizeof(*sum) / sizeof(__u64);

	memset(sum, 0, sizeof(*sum));
	for (int c = 0; c < ncpu; c++) {
		src = (const __u64 *)&per[c];
		for (size_t w = 0; w < words; w++)
			dst[w] += src[w];
	}
}

int bpfmap_read_counters(const char *pin_path, bpfmap_counter_fn cb, void *arg)
{
	struct port_row rows[MGW_MAX_PORTS];
	struct mgw_port_stats *per = NULL, sum;
	struct mgw_port_info info;
	struct bpfmap *m = NULL;
	__u32 key, next, *prev = NULL;
	size_t n = 0;
	int ncpu, ret;

	if (!cb)
		return -EINVAL;
	ncpu = libbpf_num_possible_cpus();
	if (ncpu <= 0)
		return ncpu ? ncpu : -EINVAL;
	ret = bpfmap_open_pinned(pin_path, &m, NULL, 0);
	if (ret)
		return ret;
	per = calloc((size_t)ncpu, sizeof(*per));
	if (!per) {
		ret = -ENOMEM;
		goto err_close;
	}
	while (n < MGW_MAX_PORTS && bpf_map_get_next_key(m->ports_fd, prev, &next) == 0) {
		key = next;
		prev = &key;
		if (bpf_map_lookup_elem(m->ports_fd, &key, &info) || info.slot >= MGW_MAX_PORTS)
			continue;
		rows[n].port = key;
		rows[n++].slot = info.slot;
	}
	qsort(rows, n, sizeof(rows[0]), row_cmp);
	for (size_t i = 0; i < n; i++) {
		if (bpf_map_lookup_elem(m->stats_fd, &rows[i].slot, per)) {
			ret = -errno;
			goto err_free;
		}
		sum_cpus(per, ncpu, &sum);
		emit_row(&sum, rows[i].port, cb, arg);
	}
	ret = 0;

err_free:
	free(per);
err_close:
	bpfmap_close(m);
	return ret;
}
