/* The kernel floor for benches/compare.sh: the cheapest server that still holds magnetar's
 * conversation with magnetar-loadgen. One thread, epoll, non-blocking sockets; every byte
 * it sends is precomputed at start-up, and it parses nothing it does not have to:
 *
 *   client: 68-byte handshake + extension handshake     -> floor: handshake + extension
 *           (any frames)                                   handshake with metadata_size,
 *                                                          precomputed per torrent
 *   client: ut_metadata request for piece N              -> floor: the data message of
 *                                                          piece N, precomputed (header +
 *                                                          16 KiB slice), one write per read
 *
 * The only decisions: hash lookup of the 20-byte info-hash, frame boundaries (4-byte
 * length), and the piece number's digits at a fixed offset of a request. The peer's
 * ut_metadata id is assumed to be magnetar-loadgen's (3); other clients are not served.
 * Anything else a client sends is skipped. What magnetar does beyond this (validation,
 * limits, timeouts, counters, a store) is what the floor/magnetar ratio prices.
 *
 * Input: the file written by `magnetar-loadgen gen-store --floor FILE`:
 *   repeated [20-byte info-hash][u32 LE length][info dict].
 * Usage: floor FILE HOST PORT   (prints "ready listen=HOST:PORT" when accepting)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define LOADGEN_UT_METADATA 3
#define OUR_UT_METADATA 1
#define PIECE (16 * 1024)
#define INBUF 4096

struct torrent {
    uint8_t key[20];
    uint8_t *opening;      /* handshake + ext handshake */
    size_t opening_len;
    uint8_t *pieces;       /* all data messages, back to back */
    size_t *piece_at;      /* offset of piece i's message; piece_at[n] = end */
    uint32_t n;
};

struct conn {
    int fd;
    int state;             /* 0: handshake, 1: frames */
    struct torrent *t;
    uint8_t in[INBUF];
    size_t in_len;
    /* pending output: up to 2 precomputed ranges not yet fully written */
    struct iovec out[64];
    int out_n;
};

static struct torrent *torrents;
static size_t ntorrents, table_size;
static struct torrent **table;

static size_t slot_of(const uint8_t *key) {
    uint64_t h;
    memcpy(&h, key, 8);
    return h & (table_size - 1);
}

static struct torrent *lookup(const uint8_t *key) {
    for (size_t i = slot_of(key);; i = (i + 1) & (table_size - 1)) {
        if (!table[i]) return NULL;
        if (memcmp(table[i]->key, key, 20) == 0) return table[i];
    }
}

static size_t put_str(uint8_t *p, const char *s) {
    size_t n = strlen(s);
    memcpy(p, s, n);
    return n;
}

static void be32(uint8_t *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void precompute(struct torrent *t, const uint8_t *info, uint32_t len) {
    char tmp[128];
    t->opening = malloc(68 + 256);
    uint8_t *p = t->opening;
    p[0] = 19;
    memcpy(p + 1, "BitTorrent protocol", 19);
    memset(p + 20, 0, 8);
    p[25] = 0x10; /* BEP 10 */
    memcpy(p + 28, t->key, 20);
    memcpy(p + 48, "-FL0001-floorfloorfl", 20);
    uint8_t *m = p + 68;
    size_t n = 6;
    n += put_str(m + n, "d1:md11:ut_metadatai1ee13:metadata_sizei");
    sprintf(tmp, "%ue", len);
    n += put_str(m + n, tmp);
    n += put_str(m + n, "1:v5:floore");
    be32(m, n - 4);
    m[4] = 20;
    m[5] = 0;
    t->opening_len = 68 + n;

    t->n = (len + PIECE - 1) / PIECE;
    t->piece_at = malloc((t->n + 1) * sizeof(size_t));
    t->pieces = malloc(len + t->n * 80);
    size_t at = 0;
    for (uint32_t i = 0; i < t->n; i++) {
        uint32_t blen = (i + 1 < t->n) ? PIECE : len - i * PIECE;
        int hl = sprintf(tmp, "d8:msg_typei1e5:piecei%ue10:total_sizei%uee", i, len);
        t->piece_at[i] = at;
        be32(t->pieces + at, 2 + hl + blen);
        t->pieces[at + 4] = 20;
        t->pieces[at + 5] = LOADGEN_UT_METADATA;
        memcpy(t->pieces + at + 6, tmp, hl);
        memcpy(t->pieces + at + 6 + hl, info + (size_t)i * PIECE, blen);
        at += 6 + hl + blen;
    }
    t->piece_at[t->n] = at;
}

static void load(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    size_t cap = 1024;
    torrents = calloc(cap, sizeof *torrents);
    uint8_t key[20];
    uint32_t len;
    uint8_t *info = malloc(64 << 20);
    while (fread(key, 1, 20, f) == 20 && fread(&len, 4, 1, f) == 1) {
        if (len > (64u << 20) || fread(info, 1, len, f) != len) { fprintf(stderr, "bad input\n"); exit(2); }
        if (ntorrents == cap) torrents = realloc(torrents, (cap *= 2) * sizeof *torrents);
        struct torrent *t = &torrents[ntorrents++];
        memset(t, 0, sizeof *t);
        memcpy(t->key, key, 20);
        precompute(t, info, len);
    }
    free(info);
    fclose(f);
    for (table_size = 16; table_size < ntorrents * 2; table_size *= 2) {}
    table = calloc(table_size, sizeof *table);
    for (size_t i = 0; i < ntorrents; i++) {
        size_t s = slot_of(torrents[i].key);
        while (table[s]) s = (s + 1) & (table_size - 1);
        table[s] = &torrents[i];
    }
}

static void close_conn(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

/* Writes the pending iovecs; returns -1 on error, 0 if all written, 1 if blocked. */
static int flush(int ep, struct conn *c) {
    while (c->out_n > 0) {
        ssize_t w = writev(c->fd, c->out, c->out_n);
        if (w < 0) {
            if (errno == EAGAIN) {
                struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                return 1;
            }
            return -1;
        }
        int i = 0;
        while (i < c->out_n && (size_t)w >= c->out[i].iov_len) w -= c->out[i++].iov_len;
        memmove(c->out, c->out + i, (c->out_n - i) * sizeof(struct iovec));
        c->out_n -= i;
        if (c->out_n) {
            c->out[0].iov_base = (uint8_t *)c->out[0].iov_base + w;
            c->out[0].iov_len -= w;
        }
    }
    return 0;
}

static void queue(struct conn *c, void *p, size_t n) {
    /* merge with the previous range when contiguous (pieces requested in order) */
    if (c->out_n && (uint8_t *)c->out[c->out_n - 1].iov_base + c->out[c->out_n - 1].iov_len == p) {
        c->out[c->out_n - 1].iov_len += n;
    } else if (c->out_n < 64) {
        c->out[c->out_n].iov_base = p;
        c->out[c->out_n++].iov_len = n;
    }
}

/* Consumes what it can of c->in; returns -1 to close. */
static int handle(struct conn *c) {
    size_t at = 0;
    if (c->state == 0) {
        if (c->in_len < 68) return 0;
        c->t = lookup(c->in + 28);
        if (!c->t) return -1;
        queue(c, c->t->opening, c->t->opening_len);
        c->state = 1;
        at = 68;
    }
    while (c->in_len - at >= 4) {
        uint32_t len = (uint32_t)c->in[at] << 24 | c->in[at + 1] << 16 | c->in[at + 2] << 8 | c->in[at + 3];
        if (len > INBUF - 4) return -1;
        if (c->in_len - at < 4 + len) break;
        const uint8_t *m = c->in + at + 4;
        /* 20, our id, "d8:msg_typei0e5:piecei" (22 bytes), digits, "ee" */
        if (len > 2 + 22 && m[0] == 20 && m[1] == OUR_UT_METADATA && m[2 + 12] == '0') {
            uint32_t piece = 0;
            for (const uint8_t *d = m + 2 + 22; *d >= '0' && *d <= '9'; d++) piece = piece * 10 + (*d - '0');
            struct torrent *t = c->t;
            if (piece < t->n)
                queue(c, t->pieces + t->piece_at[piece], t->piece_at[piece + 1] - t->piece_at[piece]);
        }
        at += 4 + len;
    }
    memmove(c->in, c->in + at, c->in_len - at);
    c->in_len -= at;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: floor FILE HOST PORT\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    load(argv[1]);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &sa.sin_addr);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 4096)) { perror("listen"); return 2; }
    socklen_t sl = sizeof sa;
    getsockname(ls, (struct sockaddr *)&sa, &sl);
    printf("ready listen=%s:%d driver=epoll torrents=%zu\n", argv[2], ntohs(sa.sin_port), ntorrents);
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                int r = flush(ep, c);
                if (r < 0) { close_conn(ep, c); continue; }
                if (r == 0) {
                    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                if (c->out_n) continue; /* finish writing first; the peer waits for it */
                ssize_t r = read(c->fd, c->in + c->in_len, INBUF - c->in_len);
                if (r == 0 || (r < 0 && errno != EAGAIN)) { close_conn(ep, c); continue; }
                if (r < 0) continue;
                c->in_len += r;
                if (handle(c) < 0 || flush(ep, c) < 0) close_conn(ep, c);
            }
        }
    }
}
