// Outbound capture at connect time (the eBPF backend's replacement for the nat REDIRECT).
//
// connect4 (cgroup/connect4, attached at the cgroup2 root; connect6 for IPv4-mapped
// addresses on IPv6 sockets): for a TCP connect made in a
// meshed pod's network namespace, remember where the app was going and send the connect to
// the agent's outbound listener on 127.0.0.1 instead. Nothing is rewritten per packet, so
// the app's connection carries no NAT.
// sockops: when that connection sends its SYN (its local port is known then), file the
// original destination under (namespace, local port), where the agent looks it up on
// accept, as it would ask SO_ORIGINAL_DST.
//
// Maps are LRU: an entry the agent never collects (a connect that failed) ages out.
// Addresses and ports in the maps are in network byte order, as the kernel hands them over,
// except conn_key.port (host order, as bpf_sock_ops.local_port gives it).

#include <uapi/linux/bpf.h>
#define SOCK_STREAM 1  // include/linux/net.h, not in the UAPI headers

#define MAX_POD_IPS 4

struct pod_info {
    __u32 ips[MAX_POD_IPS];  // the pod's own IPv4 addresses: connects to them stay local
    __u32 skip_ip;           // one more address never captured (the kubelet probe source)
    __u32 mark;              // sockets carrying this mark (under mark_mask) are the agent's
    __u32 mark_mask;
    __u16 port;              // the outbound listener
    __u16 pad;
};

struct orig_dst {
    __u32 ip;
    __u16 port;
    __u16 pad;
};

struct conn_key {
    __u64 netns;
    __u32 port;
    __u32 pad;
};

BPF_HASH(pods, __u64, struct pod_info, 4096);
BPF_TABLE("lru_hash", __u64, struct orig_dst, pending, 65536);
BPF_TABLE("lru_hash", struct conn_key, struct orig_dst, origins, 65536);
BPF_ARRAY(stats, __u64, 2);  // [0] connects redirected, [1] origins filed

// The agent's outbound port if this connect (to IPv4 `dst`) is to be captured, else 0; the
// original destination is kept under the socket's cookie for sockops.
static __always_inline __u16 capture(struct bpf_sock_addr *ctx, __u32 dst) {
    if (ctx->type != SOCK_STREAM)
        return 0;
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct pod_info *pod = pods.lookup(&netns);
    if (!pod)
        return 0;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || (sk->mark & pod->mark_mask) == pod->mark)
        return 0;
    if ((bpf_ntohl(dst) >> 24) == 127 || dst == pod->skip_ip)
        return 0;
#pragma unroll
    for (int i = 0; i < MAX_POD_IPS; i++) {
        if (pod->ips[i] && pod->ips[i] == dst)
            return 0;
    }
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst orig = {.ip = dst, .port = (__u16)ctx->user_port};
    pending.update(&cookie, &orig);
    stats.atomic_increment(0);
    return pod->port;
}

int connect4(struct bpf_sock_addr *ctx) {
    __u16 port = capture(ctx, ctx->user_ip4);
    if (port) {
        ctx->user_ip4 = bpf_htonl(0x7f000001);
        ctx->user_port = port;
    }
    return 1;
}

// An IPv6 socket dialling an IPv4-mapped address (::ffff:a.b.c.d) makes an IPv4 connection
// that connect4 never sees (dual-stack clients such as gRPC's core do this): captured the
// same way, to ::ffff:127.0.0.1. Real IPv6 destinations are left to the ip6tables rules.
int connect6(struct bpf_sock_addr *ctx) {
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != bpf_htonl(0xffff))
        return 1;
    __u16 port = capture(ctx, ctx->user_ip6[3]);
    if (port) {
        ctx->user_ip6[3] = bpf_htonl(0x7f000001);
        ctx->user_port = port;
    }
    return 1;
}

int sockops(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct orig_dst *orig = pending.lookup(&cookie);
    if (!orig)
        return 1;
    struct conn_key key = {.netns = bpf_get_netns_cookie(skops), .port = skops->local_port};
    struct orig_dst copy = *orig;
    origins.update(&key, &copy);
    pending.delete(&cookie);
    stats.atomic_increment(1);
    return 1;
}
