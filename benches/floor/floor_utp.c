/* The UDP floor for benches/compare.sh: the cheapest server that still holds magnetar's
 * uTP conversation with magnetar-loadgen (the uTP rows' physical limit, as floor.c is the
 * TCP rows'). One thread, one UDP socket; every byte it sends is precomputed at start-up
 * (floor_common.h), and it keeps only what a uTP peer must see:
 *
 *   client SYN                    -> ST_STATE (the SYN-ACK); the connection is filed
 *   client DATA, next in order    -> its bytes parsed as floor.c parses a TCP stream; the
 *                                    answer leaves as DATA packets of PAYLOAD bytes, each
 *                                    acking the client's last packet (no separate ack)
 *   client DATA that asks nothing -> one ST_STATE (the ack the client waits for)
 *   client DATA out of order      -> ST_STATE repeating the last ack
 *   client FIN                    -> our FIN, acking it; the connection is forgotten
 *   client ST_STATE (its acks)    -> nothing: the floor never retransmits, has no
 *                                    congestion window and no timers
 *
 * System calls: recvmmsg (MSG_WAITFORONE) of up to BATCH datagrams per wake-up, and every
 * answer of the batch in sendmmsg calls where each message is one UDP GSO send
 * (UDP_SEGMENT: up to GSO_SEGMENTS_MAX equal packets, one pass through the stack). What
 * magnetar does beyond this (congestion control, retransmission, anti-amplification,
 * SACK, validation, limits, counters, a store) is what the floor/magnetar ratio prices.
 * On loopback nothing is lost, so the floor's missing reliability costs nothing there;
 * it is a bench instrument, not a uTP implementation.
 *
 * Usage: floor_utp FILE HOST PORT   (prints "ready listen=HOST:PORT" when bound)
 * FLOOR_GSO=0 sends one datagram per packet (sendmmsg only), to price GSO itself.
 *
 * FLOOR_CWND=N adds the one thing every uTP sender must do that the floor skips: a
 * congestion window. An answer then leaves N packets at first (slow start from N, as
 * magnetar's --utp-initial-window-packets), and each packet the client acks lets one
 * more go on top of the one it frees (the window doubles per round trip, never shrinks:
 * loopback loses nothing). The client's acks are read for their ack_nr and clock the
 * rest of the answer out. This prices congestion control alone, on the floor's own
 * costs: magnetar / floor-with-window is what the rest of magnetar (reliability, SACK,
 * timers, validation, limits, the store) costs.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "floor_common.h"

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

enum { ST_DATA = 0, ST_FIN = 1, ST_STATE = 2, ST_RESET = 3, ST_SYN = 4 };
#define HDR 20
#define PAYLOAD 1400            /* magnetar's PAYLOAD_BYTES_DEFAULT */
#define BATCH 64                /* datagrams per recvmmsg, as magnetar's RECV_BATCH_MAX */
#define DGRAM 2048
#define GSO_SEGMENTS_MAX 44     /* 44 x 1420 < 65507, the largest UDP payload */
#define OUT_PKTS 4096           /* packets queued per batch before a sendmmsg */
#define OUT_MSGS 512
#define RANGES 64               /* answer ranges queued per connection */
#define WINDOW (1u << 20)

struct uconn {
    struct uconn *next;         /* hash chain */
    struct sockaddr_in peer;
    uint16_t recv_id, send_id;  /* ids the client sends with / we send with */
    uint16_t seq_nr;            /* our next sequence number */
    uint16_t ack_nr;            /* the client's last in-order packet */
    int state;                  /* floor_parse's */
    struct torrent *t;
    uint8_t in[INBUF];
    size_t in_len;
    /* answer ranges not sent yet: queued by floor_parse, sent as the window allows */
    struct iovec out[RANGES];
    int out_n;
    /* FLOOR_CWND only: packets the window holds, and the client's last ack of ours */
    uint32_t cwnd;
    uint16_t their_ack;
};

#define TABLE (1u << 16)
static struct uconn *conns[TABLE];

static uint32_t conn_slot(const struct sockaddr_in *a, uint16_t id) {
    uint32_t h = a->sin_addr.s_addr * 2654435761u ^ (uint32_t)a->sin_port * 40503u ^ id * 97u;
    return (h ^ (h >> 16)) & (TABLE - 1);
}

static struct uconn **find(const struct sockaddr_in *a, uint16_t id) {
    struct uconn **p = &conns[conn_slot(a, id)];
    while (*p && !((*p)->recv_id == id && (*p)->peer.sin_port == a->sin_port &&
                   (*p)->peer.sin_addr.s_addr == a->sin_addr.s_addr))
        p = &(*p)->next;
    return p;
}

/* The batch's outgoing packets: headers here, payload iovecs into the precomputed bytes. */
static uint8_t hdrs[OUT_PKTS][HDR];
static struct iovec iovs[OUT_PKTS * 4];
static struct mmsghdr msgs[OUT_MSGS];
static char cmsgs[OUT_MSGS][CMSG_SPACE(sizeof(uint16_t))];
static struct sockaddr_in names[OUT_MSGS];
static int npkts, niovs, nmsgs;
static int sock, gso = 1;
static uint32_t cwnd_initial; /* FLOOR_CWND; 0 = no window (everything at once) */
static uint32_t now_us;
static unsigned long long sent_datagrams, send_errors;

static void flush_out(void) {
    int at = 0;
    while (at < nmsgs) {
        int n = sendmmsg(sock, msgs + at, nmsgs - at, 0);
        if (n < 0) {
            if (errno == EIO && gso) { /* no GSO on this path: go on without it */
                fprintf(stderr, "floor_utp: UDP GSO refused (EIO); sending without it\n");
                gso = 0;
            }
            send_errors++;
            at++;                      /* that message is lost, as a full buffer loses it */
            continue;
        }
        at += n;
    }
    sent_datagrams += nmsgs;
    npkts = niovs = nmsgs = 0;
}

static void put_hdr(uint8_t *h, int type, struct uconn *c, uint16_t seq, uint32_t their_ts) {
    h[0] = type << 4 | 1;
    h[1] = 0;
    h[2] = c->send_id >> 8; h[3] = c->send_id;
    uint32_t diff = now_us - their_ts;
    h[4] = now_us >> 24; h[5] = now_us >> 16; h[6] = now_us >> 8; h[7] = now_us;
    h[8] = diff >> 24; h[9] = diff >> 16; h[10] = diff >> 8; h[11] = diff;
    h[12] = (uint8_t)(WINDOW >> 24); h[13] = (uint8_t)(WINDOW >> 16); h[14] = (uint8_t)(WINDOW >> 8); h[15] = (uint8_t)WINDOW;
    h[16] = seq >> 8; h[17] = seq;
    h[18] = c->ack_nr >> 8; h[19] = c->ack_nr;
}

/* Starts a message to `c`'s peer; its packets are the next ones queued. */
static struct msghdr *begin_msg(struct uconn *c) {
    if (nmsgs == OUT_MSGS || npkts + GSO_SEGMENTS_MAX > OUT_PKTS || niovs + 4 * GSO_SEGMENTS_MAX > OUT_PKTS * 4)
        flush_out();
    names[nmsgs] = c->peer;
    struct msghdr *m = &msgs[nmsgs].msg_hdr;
    memset(m, 0, sizeof *m);
    m->msg_name = &names[nmsgs];
    m->msg_namelen = sizeof names[nmsgs];
    m->msg_iov = &iovs[niovs];
    nmsgs++;
    return m;
}

/* Marks `m` as a GSO send of `segments` packets of `seg` bytes (the last may be shorter). */
static void set_gso(struct msghdr *m, int segments, uint16_t seg) {
    if (segments < 2) return;
    m->msg_control = cmsgs[(struct mmsghdr *)m - msgs];
    m->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
    struct cmsghdr *cm = CMSG_FIRSTHDR(m);
    cm->cmsg_level = SOL_UDP;
    cm->cmsg_type = UDP_SEGMENT;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(cm), &seg, sizeof seg);
}

/* One header-only packet (SYN-ACK, ack, FIN). */
static void send_control(struct uconn *c, int type, uint16_t seq, uint32_t their_ts) {
    struct msghdr *m = begin_msg(c);
    put_hdr(hdrs[npkts], type, c, seq, their_ts);
    iovs[niovs].iov_base = hdrs[npkts++];
    iovs[niovs++].iov_len = HDR;
    m->msg_iovlen = 1;
}

/* Packets in flight: sent and not acked yet. */
static uint32_t in_flight(const struct uconn *c) {
    return (uint16_t)(c->seq_nr - 1 - c->their_ack);
}

/* The queued answer ranges as DATA packets of PAYLOAD bytes, GSO_SEGMENTS_MAX per send;
 * with a window, only as many packets as it has room for (the rest stays queued). */
static void send_answer(struct uconn *c, uint32_t their_ts) {
    int r = 0;
    size_t off = 0;
    uint32_t budget = UINT32_MAX;
    if (cwnd_initial) {
        uint32_t f = in_flight(c);
        budget = c->cwnd > f ? c->cwnd - f : 0;
    }
    while (r < c->out_n && budget) {
        struct msghdr *m = begin_msg(c);
        int segs = 0;
        while (r < c->out_n && budget && segs < (gso ? GSO_SEGMENTS_MAX : 1)) {
            budget--;
            put_hdr(hdrs[npkts], ST_DATA, c, c->seq_nr++, their_ts);
            iovs[niovs].iov_base = hdrs[npkts++];
            iovs[niovs++].iov_len = HDR;
            m->msg_iovlen++;
            size_t room = PAYLOAD;
            while (room && r < c->out_n) {
                size_t take = c->out[r].iov_len - off;
                if (take > room) take = room;
                iovs[niovs].iov_base = (uint8_t *)c->out[r].iov_base + off;
                iovs[niovs++].iov_len = take;
                m->msg_iovlen++;
                room -= take;
                off += take;
                if (off == c->out[r].iov_len) { r++; off = 0; }
            }
            segs++;
            if (room) break; /* a short packet ends the message (GSO: only the last) */
        }
        set_gso(m, segs, HDR + PAYLOAD);
    }
    /* What the window held back stays queued, from where this send stopped. */
    if (r < c->out_n && off) {
        c->out[r].iov_base = (uint8_t *)c->out[r].iov_base + off;
        c->out[r].iov_len -= off;
    }
    memmove(c->out, c->out + r, (c->out_n - r) * sizeof c->out[0]);
    c->out_n -= r;
}

/* FLOOR_CWND: the client's ack_nr acks our packets up to it; each one acked frees its
 * place in the window and adds one (slow start). */
static void on_ack(struct uconn *c, uint16_t ack) {
    uint16_t acked = (uint16_t)(ack - c->their_ack);
    if (!cwnd_initial || acked == 0 || acked > in_flight(c)) return; /* old or bogus */
    c->their_ack = ack;
    c->cwnd += acked;
}

static void queue_cb(void *cv, void *p, size_t n) {
    struct uconn *c = cv;
    if (c->out_n && (uint8_t *)c->out[c->out_n - 1].iov_base + c->out[c->out_n - 1].iov_len == p) {
        c->out[c->out_n - 1].iov_len += n;
    } else if (c->out_n < RANGES) {
        c->out[c->out_n].iov_base = p;
        c->out[c->out_n++].iov_len = n;
    } else {
        /* Dropping a range would truncate an answer and stall its client: a measurement
         * that silently loses fetches. Stop instead (raise RANGES). */
        fprintf(stderr, "floor_utp: more than %d answer ranges queued on one connection\n", RANGES);
        exit(2);
    }
}

static void forget(struct uconn *c) {
    struct uconn **p = find(&c->peer, c->recv_id);
    *p = c->next;
    free(c);
}

static void on_datagram(const uint8_t *d, size_t n, const struct sockaddr_in *from) {
    if (n < HDR || (d[0] & 15) != 1) return;
    int type = d[0] >> 4;
    uint16_t id = d[2] << 8 | d[3];
    uint32_t ts = (uint32_t)d[4] << 24 | d[5] << 16 | d[6] << 8 | d[7];
    uint16_t seq = d[16] << 8 | d[17];
    /* skip the extension chain */
    size_t at = HDR;
    for (int ext = d[1]; ext; ) {
        if (at + 2 > n || at + 2 + d[at + 1] > n) return;
        ext = d[at];
        at += 2 + d[at + 1];
    }
    if (type == ST_SYN) {
        struct uconn **p = find(from, id + 1);
        struct uconn *c = *p;
        if (!c) {
            c = calloc(1, sizeof *c);
            c->peer = *from;
            c->recv_id = id + 1;
            c->send_id = id;
            c->seq_nr = (uint16_t)random();
            c->ack_nr = seq;
            c->cwnd = cwnd_initial;
            c->their_ack = c->seq_nr - 1; /* nothing of ours in flight yet */
            *p = c;
        }
        send_control(c, ST_STATE, c->seq_nr, ts); /* the SYN-ACK: our first DATA's number */
        return;
    }
    struct uconn *c = *find(from, id);
    if (c && cwnd_initial && type != ST_RESET) {
        on_ack(c, d[18] << 8 | d[19]);
        if (type == ST_STATE && c->out_n) send_answer(c, ts);
    }
    if (!c || type == ST_STATE || type == ST_RESET) {
        if (c && type == ST_RESET) forget(c);
        return;
    }
    if (seq != (uint16_t)(c->ack_nr + 1)) { /* a repeat or a gap: say where we are */
        send_control(c, ST_STATE, c->seq_nr, ts);
        return;
    }
    c->ack_nr = seq;
    if (type == ST_FIN) {
        send_control(c, ST_FIN, c->seq_nr, ts);
        forget(c);
        return;
    }
    size_t len = n - at;
    if (len > INBUF - c->in_len) len = INBUF - c->in_len;
    memcpy(c->in + c->in_len, d + at, len);
    c->in_len += len;
    if (floor_parse(&c->t, &c->state, c->in, &c->in_len, queue_cb, c) < 0) {
        uint8_t h[HDR];
        put_hdr(h, ST_RESET, c, c->seq_nr, ts);
        sendto(sock, h, HDR, 0, (struct sockaddr *)&c->peer, sizeof c->peer);
        forget(c);
        return;
    }
    uint16_t before = c->seq_nr;
    if (c->out_n) send_answer(c, ts);
    /* The ack goes with the answer's first packet; alone if there is none, or if the
     * window held the whole answer back. */
    if (c->seq_nr == before) send_control(c, ST_STATE, c->seq_nr, ts);
}

static void on_term(int sig) {
    (void)sig;
    fprintf(stderr, "floor_utp: %llu messages sent, %llu send errors\n", sent_datagrams, send_errors);
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: floor_utp FILE HOST PORT\n"); return 2; }
    const char *g = getenv("FLOOR_GSO");
    if (g && strcmp(g, "0") == 0) gso = 0;
    const char *w = getenv("FLOOR_CWND");
    if (w) cwnd_initial = (uint32_t)atoi(w);
    signal(SIGTERM, on_term);
    load(argv[1]);
    srandom(getpid());
    sock = socket(AF_INET, SOCK_DGRAM, 0);
    int bufsz = 8 << 20;
    setsockopt(sock, SOL_SOCKET, SO_RCVBUFFORCE, &bufsz, sizeof bufsz);
    setsockopt(sock, SOL_SOCKET, SO_SNDBUFFORCE, &bufsz, sizeof bufsz);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &sa.sin_addr);
    if (bind(sock, (struct sockaddr *)&sa, sizeof sa)) { perror("bind"); return 2; }
    socklen_t sl = sizeof sa;
    getsockname(sock, (struct sockaddr *)&sa, &sl);
    printf("ready listen=%s:%d driver=recvmmsg+%s torrents=%zu cwnd=%u\n", argv[2],
           ntohs(sa.sin_port), gso ? "gso" : "sendmmsg", ntorrents, cwnd_initial);
    fflush(stdout);
    static uint8_t bufs[BATCH][DGRAM];
    static struct sockaddr_in froms[BATCH];
    static struct iovec riov[BATCH];
    static struct mmsghdr rmsgs[BATCH];
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            riov[i].iov_base = bufs[i];
            riov[i].iov_len = DGRAM;
            memset(&rmsgs[i].msg_hdr, 0, sizeof rmsgs[i].msg_hdr);
            rmsgs[i].msg_hdr.msg_name = &froms[i];
            rmsgs[i].msg_hdr.msg_namelen = sizeof froms[i];
            rmsgs[i].msg_hdr.msg_iov = &riov[i];
            rmsgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(sock, rmsgs, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) { if (errno == EINTR) continue; perror("recvmmsg"); return 1; }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        now_us = (uint32_t)(ts.tv_sec * 1000000ull + ts.tv_nsec / 1000);
        for (int i = 0; i < n; i++)
            if (!(rmsgs[i].msg_hdr.msg_flags & MSG_TRUNC))
                on_datagram(bufs[i], rmsgs[i].msg_len, &froms[i]);
        flush_out();
    }
}
