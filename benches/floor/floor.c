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

#include "floor_common.h"

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

static void queue_cb(void *c, void *p, size_t n) { queue(c, p, n); }

/* Consumes what it can of c->in; returns -1 to close. */
static int handle(struct conn *c) {
    return floor_parse(&c->t, &c->state, c->in, &c->in_len, queue_cb, c);
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
