/*
 * rtpgen: the RTP load generator and sink of the media benchmark (benchmarks/media_bench.py).
 *
 * Python is too slow to offer 100,000+ packets/s, so the benchmark compiles this file with gcc
 * into a cache directory and drives one long-lived rtpgen process over stdin/stdout.  Every
 * socket rtpgen opens is a phone's media port: it sends RTP to its relay port and counts what
 * the relay forwards back to it (symmetric RTP: the relay latches to the source and sends to
 * it), so one socket is the source of one stream and the sink of the opposite one.
 *
 * Commands, one a line; each answered by one JSON line unless said otherwise:
 *   open IP COUNT          bind COUNT new UDP sockets on IP (ephemeral ports): {"ports":[...]}
 *   dest INDEX IP PORT     socket INDEX sends to IP:PORT (no reply)
 *   sync                   {"ok":true} (after a batch of dest lines)
 *   run RATE SECONDS FIRST COUNT DRAIN
 *                          sockets FIRST..FIRST+COUNT-1 send RATE packets/s in total, round
 *                          robin (each stream RATE/COUNT), for SECONDS; every socket counts
 *                          what it receives until DRAIN seconds after the last send:
 *                          {"sent":N,"received":N,"elapsed":S,"cpu":S,"tx":[...],"rx":[...]}
 *                          (tx/rx per socket, this run only), preceded by the line
 *                          {"sending_done":true} as the last packet is sent
 *   quit
 *
 * Packets are PCMU-sized RTP (RFC 3550 5.1: 12-byte header, V=2, PT 0, 160 bytes of payload),
 * each stream with its own SSRC, sequence number +1 and timestamp +160 per packet.  Sends are
 * paced to the total rate at a 50 us grain (epoll_pwait2), batched per socket with sendmmsg;
 * receives use epoll + recvmmsg.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 160
#define HEADER 12
#define BATCH 64
#define RCVBUF (4 << 20)
#define SNDBUF (4 << 20)
#define GRAIN_NS 50000L

struct stream {
    int fd;
    int has_dest;
    struct sockaddr_in dest;
    uint16_t seq;
    uint32_t ts;
    uint32_t ssrc;
    uint64_t tx, rx;
};

static struct stream *streams;
static int nstreams, capstreams;
static int epfd;
static unsigned char payload[PAYLOAD];

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static double cpu_s(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (double)r.ru_utime.tv_sec + r.ru_utime.tv_usec * 1e-6 + (double)r.ru_stime.tv_sec +
           r.ru_stime.tv_usec * 1e-6;
}

static uint32_t mix(uint32_t x) { /* a fixed scramble: distinct SSRCs and start values */
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static void cmd_open(const char *ip, int count) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
        printf("{\"error\":\"bad address\"}\n");
        return;
    }
    printf("{\"ports\":[");
    for (int i = 0; i < count; i++) {
        if (nstreams == capstreams) {
            capstreams = capstreams ? capstreams * 2 : 256;
            streams = realloc(streams, sizeof *streams * (size_t)capstreams);
            if (!streams) { perror("realloc"); exit(1); }
        }
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0) { perror("socket"); exit(1); }
        int size = RCVBUF;
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
        size = SNDBUF;
        if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
        sa.sin_port = 0;
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("bind"); exit(1); }
        struct sockaddr_in got;
        socklen_t len = sizeof got;
        getsockname(fd, (struct sockaddr *)&got, &len);
        struct stream *s = &streams[nstreams];
        memset(s, 0, sizeof *s);
        s->fd = fd;
        s->ssrc = mix((uint32_t)nstreams * 2654435761U + 1U);
        s->seq = (uint16_t)mix(s->ssrc);
        s->ts = mix(s->ssrc + 7U);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)nstreams};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) { perror("epoll_ctl"); exit(1); }
        printf("%s%d", i ? "," : "", ntohs(got.sin_port));
        nstreams++;
    }
    printf("]}\n");
}

static void cmd_dest(int index, const char *ip, int port) {
    if (index < 0 || index >= nstreams) return;
    struct stream *s = &streams[index];
    memset(&s->dest, 0, sizeof s->dest);
    s->dest.sin_family = AF_INET;
    s->dest.sin_port = htons((uint16_t)port);
    s->has_dest = inet_pton(AF_INET, ip, &s->dest.sin_addr) == 1;
}

/* Read whatever is queued on the ready sockets; wait at most timeout_ns for the first. */
static struct epoll_event events[1024];
static unsigned char rxbuf[BATCH][2048];
static struct mmsghdr rxmsgs[BATCH];
static struct iovec rxiov[BATCH];

static uint64_t drain(long timeout_ns) {
    struct timespec t = {.tv_sec = timeout_ns / 1000000000L, .tv_nsec = timeout_ns % 1000000000L};
    int n = epoll_pwait2(epfd, events, 1024, &t, NULL);
    uint64_t got = 0;
    for (int i = 0; i < n; i++) {
        struct stream *s = &streams[events[i].data.u32];
        for (;;) {
            int r = recvmmsg(s->fd, rxmsgs, BATCH, MSG_DONTWAIT, NULL);
            if (r <= 0) break;
            s->rx += (uint64_t)r;
            got += (uint64_t)r;
            if (r < BATCH) break;
        }
    }
    return got;
}

static unsigned char txhead[BATCH][HEADER];
static struct iovec txiov[BATCH][2];
static struct mmsghdr txmsgs[BATCH];

static void send_burst(struct stream *s, int k) {
    while (k > 0) {
        int n = k < BATCH ? k : BATCH;
        for (int i = 0; i < n; i++) {
            unsigned char *h = txhead[i];
            h[0] = 0x80; /* V=2, no padding, no extension, no CSRC */
            h[1] = 0;    /* PT 0 (PCMU), no marker */
            uint16_t seq = htons(s->seq);
            uint32_t ts = htonl(s->ts), ssrc = htonl(s->ssrc);
            memcpy(h + 2, &seq, 2);
            memcpy(h + 4, &ts, 4);
            memcpy(h + 8, &ssrc, 4);
            s->seq++;
            s->ts += PAYLOAD;
            txmsgs[i].msg_hdr.msg_name = &s->dest;
            txmsgs[i].msg_hdr.msg_namelen = sizeof s->dest;
        }
        int done = 0;
        while (done < n) {
            int r = sendmmsg(s->fd, txmsgs + done, (unsigned)(n - done), 0);
            if (r < 0) {
                if (errno == EINTR || errno == EAGAIN || errno == ENOBUFS) continue;
                break; /* e.g. ECONNREFUSED from an earlier ICMP: the packet is lost, count it sent */
            }
            done += r;
        }
        s->tx += (uint64_t)n;
        k -= n;
    }
}

static void cmd_run(double rate, double seconds, int first, int count, double drain_s) {
    if (first < 0) first = 0;
    if (first + count > nstreams) count = nstreams - first;
    int *active = malloc(sizeof(int) * (size_t)(count > 0 ? count : 1));
    int nactive = 0;
    for (int i = first; i < first + count; i++)
        if (streams[i].has_dest) active[nactive++] = i;
    for (int i = 0; i < nstreams; i++) streams[i].tx = streams[i].rx = 0;
    uint64_t total = nactive && rate > 0 ? (uint64_t)(rate * seconds) : 0, sent = 0;
    int cursor = 0;
    double cpu0 = cpu_s(), t0 = now_s(), t = t0;
    int *burst = calloc((size_t)(nactive > 0 ? nactive : 1), sizeof(int));
    while (sent < total) {
        t = now_s();
        uint64_t due = (uint64_t)((t - t0) * rate) + 1;
        if (due > total) due = total;
        if (due > sent) {
            uint64_t n = due - sent;
            if (n > 4096) n = 4096; /* far behind: keep reading between bursts */
            /* n packets, round robin from the cursor: each active stream per/+1 of them */
            uint64_t per = n / (uint64_t)nactive, rem = n % (uint64_t)nactive;
            if (per == 0) {
                for (uint64_t i = 0; i < rem; i++) {
                    send_burst(&streams[active[cursor]], 1);
                    if (++cursor == nactive) cursor = 0;
                }
            } else {
                for (int i = 0; i < nactive; i++) burst[i] = (int)per;
                for (uint64_t i = 0; i < rem; i++) {
                    burst[cursor]++;
                    if (++cursor == nactive) cursor = 0;
                }
                for (int i = 0; i < nactive; i++) send_burst(&streams[active[i]], burst[i]);
            }
            sent += n;
            drain(0);
        } else {
            double next = t0 + (double)(sent + 1) / rate;
            long wait = (long)((next - t) * 1e9);
            if (wait < GRAIN_NS) wait = GRAIN_NS;
            drain(wait);
        }
    }
    double elapsed = (sent ? now_s() : t) - t0;
    printf("{\"sending_done\":true}\n"); /* the caller reads the relay's CPU here */
    fflush(stdout);
    double end = now_s() + drain_s;
    for (double left = drain_s; left > 0; left = end - now_s()) drain((long)(left * 1e9));
    uint64_t received = 0;
    for (int i = 0; i < nstreams; i++) received += streams[i].rx;
    printf("{\"sent\":%llu,\"received\":%llu,\"elapsed\":%.6f,\"cpu\":%.6f,\"tx\":[", (unsigned long long)sent,
           (unsigned long long)received, elapsed, cpu_s() - cpu0);
    for (int i = 0; i < nstreams; i++) printf("%s%llu", i ? "," : "", (unsigned long long)streams[i].tx);
    printf("],\"rx\":[");
    for (int i = 0; i < nstreams; i++) printf("%s%llu", i ? "," : "", (unsigned long long)streams[i].rx);
    printf("]}\n");
    free(active);
    free(burst);
}

int main(void) {
    epfd = epoll_create1(0);
    if (epfd < 0) { perror("epoll_create1"); return 1; }
    memset(payload, 0xff, sizeof payload); /* PCMU silence */
    for (int i = 0; i < BATCH; i++) {
        txiov[i][0].iov_base = txhead[i];
        txiov[i][0].iov_len = HEADER;
        txiov[i][1].iov_base = payload;
        txiov[i][1].iov_len = PAYLOAD;
        memset(&txmsgs[i], 0, sizeof txmsgs[i]);
        txmsgs[i].msg_hdr.msg_iov = txiov[i];
        txmsgs[i].msg_hdr.msg_iovlen = 2;
        rxiov[i].iov_base = rxbuf[i];
        rxiov[i].iov_len = sizeof rxbuf[i];
        memset(&rxmsgs[i], 0, sizeof rxmsgs[i]);
        rxmsgs[i].msg_hdr.msg_iov = &rxiov[i];
        rxmsgs[i].msg_hdr.msg_iovlen = 1;
    }
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char ip[64];
        int a, b, c;
        double rate, seconds, drain_s;
        if (sscanf(line, "open %63s %d", ip, &a) == 2) {
            cmd_open(ip, a);
        } else if (sscanf(line, "dest %d %63s %d", &a, ip, &b) == 3) {
            cmd_dest(a, ip, b);
            continue;
        } else if (strncmp(line, "sync", 4) == 0) {
            printf("{\"ok\":true}\n");
        } else if (sscanf(line, "run %lf %lf %d %d %lf", &rate, &seconds, &b, &c, &drain_s) == 5) {
            cmd_run(rate, seconds, b, c, drain_s);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        } else {
            printf("{\"error\":\"unknown command\"}\n");
        }
        fflush(stdout);
    }
    return 0;
}
