//! Every cap magnetar enforces, named with its unit last, with the reason for its value.
//!
//! Protocol caps (codec) are constants: they protect the decoder and are not operator
//! policy. Operator policy (connection counts, timeouts) has a default here and a CLI flag
//! in `config`.

/// BEP 9 metadata pieces are 16 KiB; only the last may be shorter.
pub const METADATA_PIECE_BYTES: usize = 16 * 1024;

/// Largest info dict magnetar stores or serves. libtorrent caps received metadata at
/// 30 MiB, rqbit at 32 MiB, anacrolix at 16 MiB (docs/protocol-facts.md §10); users complain
/// about 14–24 MB dicts being refused, so we accept up to 64 MiB ourselves and let each
/// client apply its own cap.
pub const METADATA_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Number of 16 KiB pieces in the largest metadata: 64 MiB / 16 KiB.
pub const METADATA_PIECES_MAX: usize = METADATA_BYTES_MAX / METADATA_PIECE_BYTES;

/// Largest frame (length prefix value) we decode. The biggest legitimate frame we ever
/// receive is a BEP 9 data message: 16 KiB payload + a small bencoded header; a BEP 3
/// `piece` message carries 16 KiB blocks. A bitfield for a huge torrent can be larger
/// (1 bit per piece), so allow 128 KiB: a 1M-piece torrent's bitfield. Anything larger is
/// a hostile or broken peer and the connection is closed.
pub const FRAME_BYTES_MAX: usize = 128 * 1024;

/// Bytes a connection may hold received but unhandled (a partial frame, or what a peer
/// sent while our reply was out), on every transport: a frame of the largest size plus a
/// receive buffer, times four (528 KiB). A client that reads its answers never gets near
/// it (a full burst of reqq requests is ~8 KiB); a peer past it sends without reading and
/// is closed as a flood (`server/pump.rs`). The io_uring path stops receiving well before
/// (`INPUT_HELD_BYTES_MAX`), so this bounds what its multishot receive may already have
/// taken in one turn.
pub const UNHANDLED_BYTES_MAX: usize = 4 * (FRAME_BYTES_MAX + READ_BUFFER_BYTES_INITIAL);

/// Bencode nesting depth cap. The deepest legitimate structure on the wire is the
/// extension handshake (`d1:md...ee`: depth 2); info dicts nest `file tree` one level per
/// directory plus a few, so 64 leaves room for deep directory trees while a bomb of
/// `llllll…` cannot recurse without bound.
pub const BENCODE_DEPTH_MAX: usize = 64;

/// Largest BEP 10 extension handshake payload. Real ones are 100–400 bytes; libtorrent
/// caps its own at 16 KiB.
pub const EXT_HANDSHAKE_BYTES_MAX: usize = 16 * 1024;

/// Largest ut_metadata message without its data: the bencoded header is ~50 bytes.
pub const UT_METADATA_HEADER_BYTES_MAX: usize = 256;

/// Largest ut_pex message we look at (BEP 11 caps added peers at 50 per message).
pub const UT_PEX_BYTES_MAX: usize = 8 * 1024;

/// Requests we answer per connection in one batch (one read's worth). We advertise this
/// as `reqq`; requests past it in the same batch are rejected (msg_type 2), which is the
/// flood protection: a peer cannot make one connection hold more than this many blocks
/// (4 MiB of iovecs into the mmap) in flight. The default of `--requests-queued-max`,
/// which may not exceed `REQUESTS_QUEUED_MAX_LIMIT`.
pub const REQUESTS_QUEUED_MAX: usize = 250;

/// Default cap on open connections over all cores. Each idle session costs a few KiB
/// (read buffer + task), so 100k is ~0.5 GiB; operators raise it with `--connections-max`.
pub const CONNECTIONS_MAX_DEFAULT: usize = 100_000;

/// Default cap on open connections from one IP address. A metadata fetch needs one
/// connection; NAT gateways carry many users, so allow some, but one host cannot take
/// the whole table.
pub const CONNECTIONS_PER_IP_MAX_DEFAULT: usize = 64;

/// Time a peer has to send the 48 bytes that name the info-hash after connecting.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// A connection that sends nothing for this long is closed. Clients drop us right after
/// they have the metadata; one that lingers silently holds a slot for nothing.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 120_000;

/// We send a keep-alive after this much silence on our side: well under libtorrent's
/// 120 s peer timeout (docs/protocol-facts.md §9).
pub const KEEPALIVE_INTERVAL_MS_DEFAULT: u64 = 30_000;

/// Per-connection read buffer: one full frame of the largest size plus slack, allocated
/// lazily as frames grow; starts small because most connections only ever carry a
/// handshake and a few requests.
pub const READ_BUFFER_BYTES_INITIAL: usize = 4 * 1024;

/// Default size of one segment file. Records never span segments; a record larger than
/// this gets a segment of its own size. 64 MiB keeps the number of mappings small (16 per
/// GiB) while eviction (segment-wise) stays fine-grained.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// Largest segment the store creates (a larger `segment_bytes` is lowered to it): an index
/// entry holds a record's offset in 24 bits of 8-byte units (`store/index.rs`, 8 bytes per
/// entry). A record larger than this still gets a segment of its own, at offset 0.
pub const INDEX_SEGMENT_BYTES_MAX: u64 = 128 * 1024 * 1024;

/// Segments holding indexed records at once: an index entry names its segment in 14 bits.
/// 16384 × 64 MiB is 1 TiB of records; a store that needs more uses larger segments.
pub const INDEX_SEGMENT_SLOTS: usize = 1 << 14;

/// iovecs in one writev: the kernel's IOV_MAX is 1024. A batch that needs more cannot be
/// sent in one call, so the settings that size a batch are capped below
/// (`REQUESTS_QUEUED_MAX_LIMIT`).
pub const IOVECS_PER_WRITE_MAX: usize = 1024;

/// iovecs one ut_metadata data message takes in a batch: its header in the batch's small
/// `head` buffer, its block in the mmap (`server/send.rs`). Rejects, handshakes and
/// keep-alives are head bytes: they share the iovec of the next header.
pub const IOVECS_PER_DATA_MESSAGE: usize = 2;

/// iovecs a batch needs besides its data messages: the head bytes after the last block
/// (rejects, keep-alive, an extension handshake).
pub const IOVECS_PER_BATCH_FIXED: usize = 1;

/// Data messages one batch can carry, in units of reqq. Worst case: a miss's held
/// requests (at most reqq, `server/conn.rs`) are answered when the fetch lands, in the
/// same batch as a full burst (at most reqq) that arrived with the outcome.
pub const DATA_MESSAGES_PER_BATCH_PER_REQQ: usize = 2;

/// Largest `--requests-queued-max`: the worst-case batch (`DATA_MESSAGES_PER_BATCH_PER_REQQ`
/// × reqq data messages plus the fixed parts) must fit one writev. (1024 - 1) / 4 = 255.
pub const REQUESTS_QUEUED_MAX_LIMIT: usize = (IOVECS_PER_WRITE_MAX - IOVECS_PER_BATCH_FIXED)
    / (DATA_MESSAGES_PER_BATCH_PER_REQQ * IOVECS_PER_DATA_MESSAGE);

// The relation `OutBatch::seal` asserts at run time, checked here for every allowed reqq
// (`config` refuses a larger one), so the run-time assertion cannot fire.
const _: () = assert!(
    REQUESTS_QUEUED_MAX_LIMIT * DATA_MESSAGES_PER_BATCH_PER_REQQ * IOVECS_PER_DATA_MESSAGE
        + IOVECS_PER_BATCH_FIXED
        <= IOVECS_PER_WRITE_MAX
);
const _: () = assert!(REQUESTS_QUEUED_MAX >= 1 && REQUESTS_QUEUED_MAX <= REQUESTS_QUEUED_MAX_LIMIT);

/// Bytes a uTP session may have written but not yet seen acked before its next write
/// waits: one full request burst (`REQUESTS_QUEUED_MAX` blocks of 16 KiB). The queue holds
/// iovecs into the mmap, not copies, so this bounds work in flight, not memory.
pub const UTP_SEND_BACKLOG_BYTES_MAX: usize = REQUESTS_QUEUED_MAX * METADATA_PIECE_BYTES;

/// Default cap on uTP connections per core that have not finished the uTP handshake (the
/// peer has not acked our SYN-ACK). uTP has no SYN cookie: each SYN costs a connection
/// entry until `connect_timeout`, so this bounds a SYN flood from many (spoofed) sources;
/// past it SYNs are dropped unanswered. A real client finishes the handshake in one RTT,
/// so 4096 half-open entries a core absorb thousands of new connections a second.
pub const UTP_HALF_OPEN_PER_CORE_MAX_DEFAULT: usize = 4096;

/// Default receive/send buffer of a uTP socket: 8 MiB holds several thousand datagrams, a
/// burst of requests and acks from thousands of peers of one core. The kernel default
/// (~208 KiB) dropped ~8 000 datagrams in 5 s of 64-connection churn (benches/compare.sh).
pub const UTP_SOCKET_BUFFER_BYTES_DEFAULT: usize = 8 * 1024 * 1024;

/// Default cap on MSE handshakes one address (per-/64) may start per second on a core. A
/// handshake costs one 768-bit modular exponentiation (~0.1–0.3 ms); a real client opens
/// one or two connections per torrent, a crawler a few per second. 20 a second bounds what
/// one address can make a core compute to a few percent.
pub const MSE_HANDSHAKES_PER_IP_PER_SECOND_MAX_DEFAULT: u32 = 20;

/// MSE (Diffie-Hellman) handshakes one core starts per second from all addresses together
/// (a token bucket, burst one second's worth). The per-address window does not hold
/// against many addresses: 200 loopback sources made ~2 000 DH a second on one core, ~42 %
/// of it. One responder handshake costs ~0.19 ms here (SECURITY.md), so 1 000 a second
/// bounds DH work to ~20 % of a core, far above what real encrypted clients open (each a
/// connection or two per torrent); past it the connection is closed before any DH work.
pub const MSE_HANDSHAKES_PER_CORE_PER_SECOND_MAX_DEFAULT: u32 = 1_000;

/// Addresses each core's MSE rate table tracks (past it, new addresses are refused until
/// the window rolls over): bounds its memory under a spoofed-source flood.
pub const MSE_RATE_KEYS_PER_CORE_MAX: usize = 65_536;

/// Largest MSE/PE padding (PadA, PadB, PadC, PadD): the MSE spec allows 0..=512 random
/// bytes, libtorrent disconnects on a `len(pad)` over 512 (`invalid_pad_size`).
pub const MSE_PAD_BYTES_MAX: usize = 512;

/// Bytes after Ya the MSE responder searches for `HASH('req1', S)`: PadA (at most
/// `MSE_PAD_BYTES_MAX`) and the 20-byte hash itself. libtorrent gives up at the same
/// point (`sync_hash_not_found`).
pub const MSE_REQ1_SYNC_BYTES_MAX: usize = MSE_PAD_BYTES_MAX + 20;

/// Bytes after Yb the MSE initiator searches for the encrypted verification constant:
/// PadB (at most `MSE_PAD_BYTES_MAX`) and the 8-byte VC (libtorrent: 512 + 8).
pub const MSE_VC_SYNC_BYTES_MAX: usize = MSE_PAD_BYTES_MAX + 8;

/// Largest MSE initial payload (IA) we accept or send. The field is 16 bits, but IA only
/// carries the start of the BitTorrent stream: libtorrent, Transmission and Vuze put their
/// 68-byte handshake there, and a client could add its first message; the largest first
/// message we ever read is a BEP 10 extension handshake (`EXT_HANDSHAKE_BYTES_MAX` plus the
/// 6-byte frame header), so a handshake and one such frame.
pub const MSE_IA_BYTES_MAX: usize = 68 + 6 + EXT_HANDSHAKE_BYTES_MAX;

/// Everything an MSE responder reads before the stream starts: Ya (96), the req1 search
/// window, `HASH('req2') xor HASH('req3')` (20), VC + crypto_provide + len(PadC) (14),
/// PadC, len(IA) (2) and IA. Each part is capped on its own; this is their sum, what one
/// encrypted connection can make the server buffer before it is served or closed.
pub const MSE_HANDSHAKE_BYTES_MAX: usize =
    96 + MSE_REQ1_SYNC_BYTES_MAX + 20 + 14 + MSE_PAD_BYTES_MAX + 2 + MSE_IA_BYTES_MAX;

/// After our extension handshake announces `metadata_size`, a peer that has not asked for
/// a piece within this long gets one keep-alive. Transmission 3 (uTP + MSE) leaves bytes
/// that arrived in the same packet as our handshake unread until more bytes come, so our
/// extension handshake sat there until the first keep-alive, 30 s later (libtorrent seeds:
/// 60 s); clients that read it ask within milliseconds and never see the nudge.
pub const REQUEST_NUDGE_MS: u64 = 250;

// ---- The public HTTP listener (`--http`, server/http) ----

/// Largest HTTP request head (request line and headers) we read. Browsers send 0.5–2 KiB;
/// nginx's default `large_client_header_buffers` is 8 KiB per line. Past it: 431 and close.
/// Also the most a connection buffers while its head is incomplete.
pub const HTTP_REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;

/// Most headers in one request (httparse needs the array up front: 32 × 32 bytes on the
/// stack). Browsers send ~15; more is 431 and close.
pub const HTTP_HEADERS_MAX: usize = 32;

/// Longest request target. The longest valid one, `/torrent/<64 hex>.torrent?title=` plus a
/// 255-byte name percent-encoded (×3), is ~850 bytes; past this: 414 and close.
pub const HTTP_TARGET_BYTES_MAX: usize = 2 * 1024;

/// TCP_DEFER_ACCEPT on the HTTP listener while connections come in bursts, in seconds:
/// the kernel hands a connection over when its first bytes (the request) arrive, so
/// accepting it costs no empty read, no registration with a poller and no wait (at 64 and
/// 256 `Connection: close` clients half the connections were accepted before their
/// request came; BENCHMARKS.md). A client that sends nothing is handed over after this
/// long anyway (at the SYN-ACK retransmission), and `HTTP_REQUEST_TIMEOUT_MS_DEFAULT`
/// runs from then. Off while connections come one at a time (`server::http`).
pub const HTTP_DEFER_ACCEPT_S: u32 = 1;

/// Time a connection has to deliver a whole request head once it started one, or to
/// send its first byte after accept (slowloris: a client trickling one byte at a time
/// holds a connection and a buffer only this long). Default of `--http-request-timeout-ms`.
pub const HTTP_REQUEST_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// How long a keep-alive connection may sit idle between requests (nginx: 75 s; browsers
/// keep pooled connections ~60–300 s, and reconnect when we close first).
pub const HTTP_KEEPALIVE_IDLE_MS: u64 = 30_000;

/// Time a response may take to leave (a reader that stops reading is closed after it).
pub const HTTP_WRITE_TIMEOUT_MS: u64 = 30_000;

/// Requests served on one connection before we close it after the answer, so one client
/// cannot hold a connection (and its place under `connections-per-ip-max`) forever.
pub const HTTP_REQUESTS_PER_CONNECTION_MAX: u32 = 10_000;

/// Default of `--http-miss-wait-ms`: how long a request for an unknown hash waits for the
/// miss path. Tools give each .torrent mirror ~5 s (Jackett, Sonarr, FlexGet), so answer
/// (200 or 404) before that.
pub const HTTP_MISS_WAIT_MS_DEFAULT: u64 = 4_000;

/// `Retry-After` of a 429 (a refused miss): the per-IP miss budget is per minute.
pub const HTTP_RETRY_AFTER_S: u64 = 60;

/// After an answer that closes the connection on a bad request, the server reads (and
/// drops) what the client still sends for at most this long and this many bytes before
/// closing: closing with unread bytes makes the kernel send a reset, which can destroy
/// the answer before the client reads it (nginx's `lingering_close`, 5 s / unbounded).
pub const HTTP_LINGER_MS: u64 = 1_000;
pub const HTTP_LINGER_BYTES_MAX: usize = 64 * 1024;

/// Default of `--http-cache-mib`: the file each worker keeps whole .torrent answers in
/// (server/http/cache.rs), so an answer is one sendfile. 64 MiB holds ~1 300 answers of a
/// typical 40 KiB .torrent per worker (16 KiB-aligned: the popular set); it is page cache of
/// an unnamed file on the data dir's filesystem (written back once, reclaimable), or shmem
/// where O_TMPFILE is missing. 0 turns the cache off (answers come from the segment files).
pub const HTTP_CACHE_MIB_DEFAULT: u64 = 64;

/// An answer larger than the cache's size / this is not cached: one huge .torrent (the
/// store takes info dicts of up to several MiB) must not flush the whole cache.
pub const HTTP_CACHE_ENTRY_FRACTION: u64 = 16;

/// Default of `--page-in-threads`: threads reading records that are not in the page cache
/// (`server/pagein.rs`). Each blocks on one fault (one random read) at a time, so this is
/// the number of cold reads in flight: 16 keeps an SSD's queue busy (most reach full
/// random-read throughput at a queue depth of 8–32) while costing only 16 mostly-sleeping
/// threads (their stacks are reserved, not resident). One pool serves every core.
pub const PAGE_IN_THREADS_DEFAULT: usize = 16;

/// Most page-in threads `--page-in-threads` accepts: beyond a deep NVMe queue more
/// threads add no reads in flight, only stacks and scheduling.
pub const PAGE_IN_THREADS_MAX: usize = 256;

/// Default of `--page-in-nice`: how many nice levels below the workers the page-in threads
/// run. They share the cores with the workers (a 1-core server shares its one core), and
/// their CPU (madvise, the faults, the first-serve hash of a checkpointed record, the
/// wake-ups) is spent for connections that already wait for the disk, while a worker's CPU
/// serves every resident connection of its core: when both are runnable the worker goes
/// first. 10 levels is a weight of about 1/10 (the kernel's nice table), so under a full
/// core the pool still gets a tenth of it and cold fetches slow down rather than stop.
pub const PAGE_IN_NICE_DEFAULT: i32 = 10;

/// Most `--page-in-nice` accepts: the lowest priority Linux has is nice 19.
pub const PAGE_IN_NICE_MAX: i32 = 19;

/// Default of `--page-in-per-core`: page-ins one core may have in flight at once; its
/// further cold connections wait on the core for a permit (`server/pagein.rs`), so a core
/// flooded with cold fetches cannot take more than this share of the pool, nor more of its
/// own CPU for them (a `mincore`, a hand-off and a wake-up each). The default is the pool's
/// default size: one core alone may still keep every page-in thread busy (the disk's
/// queue). Lower it where a core is saturated by cold fetches: in issue 20's 10M-record
/// cgroup run the worker core was not (51–63 % busy), and 1 or 4 showed no gain there.
pub const PAGE_IN_PER_CORE_DEFAULT: usize = PAGE_IN_THREADS_DEFAULT;

/// Most `--page-in-per-core` accepts: the pool's own most threads (more permits than
/// threads only queue in the pool).
pub const PAGE_IN_PER_CORE_MAX: usize = PAGE_IN_THREADS_MAX;

/// Cold lookups waiting for a page-in thread; past it a connection's task waits for room
/// on its own core's runtime (the core goes on serving). Sized so a burst of cold
/// handshakes from every core queues without waiting: 4096 × ~40 B.
pub const PAGE_IN_QUEUE_MAX: usize = 4096;
