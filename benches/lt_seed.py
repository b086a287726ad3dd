#!/usr/bin/python3
"""libtorrent (Debian's python3-libtorrent) seeding K torrents' metadata, for benches/compare.sh.

  lt_seed.py TORRENT_DIR HOST PORT

Adds every .torrent in TORRENT_DIR in seed mode (libtorrent trusts that the content is
there and reads nothing until a block is requested; serving metadata (BEP 9) needs only
the info dict), prints "ready listen=HOST:PORT driver=libtorrent torrents=K" once all are
added and listening, and runs until killed. Limits that would make the comparison unfair
are raised: connection count, unchoke slots, peer list size, many connections per IP,
no DHT/LSD/UPnP/NAT-PMP, no rate limits, no connection-rate throttles. It listens on TCP
and uTP (libtorrent's default) at the same port.

LT_SEED_MODE=metadata-only (for benches/scale.sh) adds them without seed mode instead: the
content is absent either way, and libtorrent serves metadata without it. In seed mode with
the content absent, libtorrent 2.0.8 keeps a core at 100% before it answers anything: 336 s
(329 CPU-s) for 1000 torrents of 8 KiB metadata, nothing within 600 s for 10 000; without seed
mode the same 1000 are all served after 0.43 s (BENCHMARKS.md, "Scale"). The default here stays seed mode; benches/compare.sh passes metadata-only (since issue 12).

While torrents are being queued and added it prints "queued N of K" and "added N of K"
once a second (and "added N of K" every 5 s after "ready" if not all made it), for
benches/scale.sh. The ready line comes when all K are added or after LT_SEED_ADD_TIMEOUT_S
seconds (default 120), whichever is first; its torrents= field is the number added by then.

Run with /usr/bin/python3: the pyenv python on PATH does not see Debian's libtorrent.
"""
import os
import shutil
import signal
import sys
import tempfile
import time

import libtorrent as lt


def main():
    tdir, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = {
        "listen_interfaces": "%s:%d" % (host, port),
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        # Transports stay at libtorrent's defaults (uTP and TCP both on): the -utp rows dial
        # uTP, the TCP rows dial TCP.
        "connections_limit": 200000,
        "unchoke_slots_limit": -1,
        "max_peerlist_size": 200000,
        "max_paused_peerlist_size": 200000,
        "allow_multiple_connections_per_ip": True,
        "active_downloads": -1,
        "active_seeds": -1,
        "active_limit": -1,
        "dont_count_slow_torrents": True,
        "upload_rate_limit": 0,
        "download_rate_limit": 0,
        "alert_mask": 0,
        "connection_speed": 1000,
        "listen_queue_size": 4096,
        "max_allowed_in_request_queue": 2000,
        "max_out_request_queue": 2000,
        "peer_timeout": 120,
        "inactivity_timeout": 600,
        "handshake_timeout": 10,
        "close_redundant_connections": False,
        "anonymous_mode": False,
    }
    ses = lt.session(settings)
    save = tempfile.mkdtemp(prefix="lt-seed-")

    # The benches stop this server with SIGTERM: take the (empty) save dir along, and leave
    # without tearing the session down (python3-libtorrent 2.0.8 can crash doing that).
    def stop(_sig, _frame):
        shutil.rmtree(save, ignore_errors=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    seed_mode = os.environ.get("LT_SEED_MODE", "seed") != "metadata-only"
    names = sorted(n for n in os.listdir(tdir) if n.endswith(".torrent"))
    next_progress = time.time() + 1
    for queued, name in enumerate(names):
        if queued % 256 == 0 and time.time() >= next_progress:
            print("queued %d of %d" % (queued, len(names)), flush=True)
            next_progress = time.time() + 1
        ti = lt.torrent_info(os.path.join(tdir, name))
        p = lt.add_torrent_params()
        p.ti = ti
        p.save_path = save
        p.flags = p.flags & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
        if seed_mode:
            p.flags |= lt.torrent_flags.seed_mode
        p.max_connections = 200000
        p.max_uploads = -1
        ses.async_add_torrent(p)
    deadline = time.time() + float(os.environ.get("LT_SEED_ADD_TIMEOUT_S", "120"))
    next_progress = time.time() + 1
    added = len(ses.get_torrents())
    while added < len(names) and time.time() < deadline:
        time.sleep(0.05)
        added = len(ses.get_torrents())
        if time.time() >= next_progress:
            print("added %d of %d" % (added, len(names)), flush=True)
            next_progress = time.time() + 1
    while not ses.is_listening() and time.time() < deadline:
        time.sleep(0.05)
    print("ready listen=%s:%d driver=libtorrent torrents=%d" % (host, ses.listen_port(), added),
          flush=True)
    while added < len(names):
        time.sleep(5)
        added = len(ses.get_torrents())
        print("added %d of %d" % (added, len(names)), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
