/* What both floors share (benches/floor/floor.c over TCP, floor_utp.c over uTP): the
 * torrents, loaded from `magnetar-loadgen gen-store --floor FILE`, with every byte a
 * fetch is answered with precomputed at start-up, and the lookup by info-hash. */
#ifndef FLOOR_COMMON_H
#define FLOOR_COMMON_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* Consumes the complete messages at the front of `in` (a peer's byte stream: the 68-byte
 * handshake, then length-prefixed frames), handing each answer to `queue` as a range of
 * the precomputed bytes; keeps a partial message. `*state`: 0 before the handshake, 1
 * after. Returns -1 to close (unknown torrent, oversized frame). */
static int floor_parse(struct torrent **tp, int *state, uint8_t *in, size_t *in_len,
                       void (*queue)(void *, void *, size_t), void *ctx) {
    size_t at = 0;
    if (*state == 0) {
        if (*in_len < 68) return 0;
        *tp = lookup(in + 28);
        if (!*tp) return -1;
        queue(ctx, (*tp)->opening, (*tp)->opening_len);
        *state = 1;
        at = 68;
    }
    while (*in_len - at >= 4) {
        uint32_t len = (uint32_t)in[at] << 24 | in[at + 1] << 16 | in[at + 2] << 8 | in[at + 3];
        if (len > INBUF - 4) return -1;
        if (*in_len - at < 4 + len) break;
        const uint8_t *m = in + at + 4;
        /* 20, our id, "d8:msg_typei0e5:piecei" (22 bytes), digits, "ee" */
        if (len > 2 + 22 && m[0] == 20 && m[1] == OUR_UT_METADATA && m[2 + 12] == '0') {
            uint32_t piece = 0;
            for (const uint8_t *d = m + 2 + 22; *d >= '0' && *d <= '9'; d++) piece = piece * 10 + (*d - '0');
            struct torrent *t = *tp;
            if (piece < t->n)
                queue(ctx, t->pieces + t->piece_at[piece], t->piece_at[piece + 1] - t->piece_at[piece]);
        }
        at += 4 + len;
    }
    memmove(in, in + at, *in_len - at);
    *in_len -= at;
    return 0;
}
#endif
