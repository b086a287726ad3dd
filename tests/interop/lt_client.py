#!/usr/bin/python3
"""libtorrent (Debian's python3-libtorrent) as a real client for magnetar's interop tests.

  make-torrents OUTDIR   create v1 / v2 / hybrid torrents, small (1 metadata piece) and
                         large (5+ metadata pieces), and OUTDIR/manifest.json describing them
  make-torrents OUTDIR --v1-metadata-pieces N
                         only one torrent, `v1-pN`: a v1 torrent whose info dict is exactly
                         N metadata pieces long (for transport tests with many round trips)
  fetch MAGNET OUT [--timeout S] [--transport T] [--dht-bootstrap H:P,...]
                         fetch the metadata of MAGNET (give it x.pe=magnetar, a tr=, or a
                         --dht-bootstrap to find it through the DHT) and write the
                         raw info dict libtorrent received to OUT; prints one JSON line:
                         seconds (add_torrent to metadata_received_alert) and the peers it
                         was connected to, each with its transport (utp/tcp); exit 1 on
                         timeout
  seed TORRENT... CONTENT_DIR [--port N] [--tracker URL] [--dht-bootstrap H:P,...]
       [--connect-peer H:P] [--transport T] [--encryption E]
       [--listen-ip IP]
  fetch ... [--encryption E]  the same encryption settings for the fetching client
  dht-node [--port N] [--dht-bootstrap H:P,...]
                         a libtorrent DHT node only (a loopback testnet of libtorrent nodes)
                         seed TORRENT(s) (content under CONTENT_DIR, seed_mode: no check)
                         on IP:N (default 127.0.0.1; N 0 = any); prints `listening PORT` when ready, then
                         runs until killed; each accepted connection is logged to stderr as
                         `incoming utp|tcp ADDR`. With --dht-bootstrap it runs a DHT node
                         that bootstraps from those nodes and announces the torrents to it.

Transports: real clients run with their defaults, and so does this script: libtorrent 2.0
listens on TCP and uTP on one port and dials uTP first (docs/protocol-facts.md §13). --transport
tcp switches uTP off both ways, --transport utp switches TCP off both ways; `default` (the
default) changes nothing. Settings that only keep traffic on this machine (DHT, LSD, UPnP,
NAT-PMP off) are not transport settings.

Encryption: `default` leaves libtorrent's (MSE/PE enabled, plaintext accepted). --encryption
forced refuses plaintext BitTorrent connections both ways (an encryption-required peer, for
the MSE tests); forced-rc4 also allows only RC4 after the MSE handshake.

Diagnostics: LT_PEER_LOG=1 in the environment adds libtorrent's peer log (every message
and socket event) to the alerts `seed` prints and to the ones `fetch` prints when it times
out. Logging only: no setting of the session changes.

Run with /usr/bin/python3: the pyenv python on PATH does not see Debian's libtorrent.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import libtorrent as lt

# LT_PEER_LOG=1: the peer log too (see the module doc); alerts `fetch` keeps for its timeout report.
PEER_LOG = bool(os.environ.get("LT_PEER_LOG"))
PEER_LOG_MASK = lt.alert.category_t.peer_log_notification if PEER_LOG else 0
TIMEOUT_REPORT_ALERTS = 400 if PEER_LOG else 30

METADATA_PIECE = 16 * 1024


def _generate(content_root, name, flags, piece_size):
    fs = lt.file_storage()
    lt.add_files(fs, os.path.join(content_root, name))
    ct = lt.create_torrent(fs, piece_size, flags)
    ct.set_creator("magnetar interop")
    lt.set_piece_hashes(ct, content_root)
    return lt.bencode(ct.generate())


def _describe(path):
    ti = lt.torrent_info(path)
    info = bytes(ti.info_section())
    hashes = ti.info_hashes()
    entry = {
        "torrent": path,
        "info_len": len(info),
        "metadata_pieces": (len(info) + METADATA_PIECE - 1) // METADATA_PIECE,
        "info_sha256": hashlib.sha256(info).hexdigest(),
    }
    if hashes.has_v1():
        entry["v1"] = str(hashes.v1)
    if hashes.has_v2():
        entry["v2"] = str(hashes.v2)
    return entry


def _write_manifest(outdir, manifest):
    with open(os.path.join(outdir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest))


def make_v1_with_metadata_pieces(outdir, pieces):
    """One v1 torrent, `v1-pN`, whose info dict is exactly N metadata pieces long: its
    `pieces` string (20 bytes per 16 KiB piece of a sparse file) is sized so the info dict
    ends half-way into metadata piece N; the rest of the dict is well under 8 KiB."""
    content = os.path.join(outdir, "content")
    os.makedirs(content, exist_ok=True)
    target_len = (pieces - 1) * METADATA_PIECE + METADATA_PIECE // 2
    piece_count = target_len // 20
    name = "p%d.bin" % pieces
    with open(os.path.join(content, name), "wb") as f:
        f.truncate(piece_count * 16 * 1024)
    label = "v1-p%d" % pieces
    path = os.path.join(outdir, label + ".torrent")
    with open(path, "wb") as f:
        f.write(_generate(content, name, lt.create_torrent.v1_only, 16 * 1024))
    entry = _describe(path)
    assert entry["metadata_pieces"] == pieces, entry
    _write_manifest(outdir, {label: entry})


def make_torrents(outdir):
    os.makedirs(outdir, exist_ok=True)
    content = os.path.join(outdir, "content")
    os.makedirs(content, exist_ok=True)
    # One small file: the info dict fits in one 16 KiB metadata piece.
    with open(os.path.join(content, "small.bin"), "wb") as f:
        f.write(os.urandom(100_000))
    # v1 large: 96 MiB in 16 KiB pieces -> 6144 SHA-1s = 120 KiB of `pieces` = 8 metadata pieces.
    # The file is sparse; hashing zeros is as good as hashing data for metadata purposes.
    with open(os.path.join(content, "large.bin"), "wb") as f:
        f.truncate(96 * 1024 * 1024)
    # v2 / hybrid large: the info dict grows with the file tree, so use many files.
    many = os.path.join(content, "many")
    os.makedirs(many, exist_ok=True)
    for i in range(1500):
        with open(os.path.join(many, "file-with-a-longish-name-%05d.dat" % i), "wb") as f:
            f.write(i.to_bytes(4, "little") * 8)

    specs = [
        ("v1-small", "small.bin", lt.create_torrent.v1_only, 0),
        ("v1-large", "large.bin", lt.create_torrent.v1_only, 16 * 1024),
        ("v2-small", "small.bin", lt.create_torrent.v2_only, 0),
        ("v2-large", "many", lt.create_torrent.v2_only, 0),
        ("hybrid-small", "small.bin", 0, 0),
        ("hybrid-large", "many", 0, 0),
    ]
    manifest = {}
    for label, name, flags, piece_size in specs:
        data = _generate(content, name, flags, piece_size)
        path = os.path.join(outdir, label + ".torrent")
        with open(path, "wb") as f:
            f.write(data)
        manifest[label] = _describe(path)
    _write_manifest(outdir, manifest)


TRANSPORTS = ("default", "tcp", "utp")

# peer_info::utp_socket (libtorrent 2.0 peer_info.hpp: bit 17 of flags); the Python
# binding does not name it.
PEER_FLAG_UTP_SOCKET = 1 << 17


def transport_settings(transport):
    """The settings for --transport: nothing for `default`, one transport off both ways
    otherwise."""
    if transport == "tcp":
        return {
            "enable_incoming_utp": False,  # default-off: --transport tcp asks for TCP only
            "enable_outgoing_utp": False,  # default-off: --transport tcp asks for TCP only
        }
    if transport == "utp":
        return {
            "enable_incoming_tcp": False,  # default-off: --transport utp asks for uTP only
            "enable_outgoing_tcp": False,  # default-off: --transport utp asks for uTP only
        }
    assert transport == "default", transport
    return {}


ENCRYPTIONS = ("default", "forced", "forced-rc4")


def encryption_settings(encryption):
    """The settings for --encryption: nothing for `default`; `forced` refuses plaintext
    BitTorrent connections both ways (MSE/PE only, plaintext or RC4 after it, libtorrent
    picks plaintext when offered); `forced-rc4` also allows only RC4 after the handshake."""
    if encryption == "default":
        return {}
    settings = {
        "out_enc_policy": int(lt.enc_policy.forced),  # default-off: encryption-required peer for the MSE tests
        "in_enc_policy": int(lt.enc_policy.forced),  # default-off: encryption-required peer for the MSE tests
    }
    if encryption == "forced-rc4":
        settings["allowed_enc_level"] = int(lt.enc_level.rc4)  # default-off: encryption-required peer for the MSE tests
    else:
        assert encryption == "forced", encryption
    return settings


def local_only():
    """Keeps a session's traffic on this machine: no DHT, LSD, UPnP or NAT-PMP."""
    return {
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
    }


def loopback_dht(dht_bootstrap):
    """A DHT node bootstrapping from `dht_bootstrap` (a loopback testnet)."""
    return {
        "enable_dht": True,
        "dht_bootstrap_nodes": dht_bootstrap,
        # A DHT on loopback: every node is 127.0.0.1, which these filters refuse.
        "dht_restrict_routing_ips": False,
        "dht_restrict_search_ips": False,
        "dht_ignore_dark_internet": False,
        "dht_prefer_verified_node_ids": False,
    }


def fetch(magnet, out, timeout, transport, dht_bootstrap="", encryption="default"):
    settings = {
        "listen_interfaces": "127.0.0.1:0",
        **local_only(),
        **(loopback_dht(dht_bootstrap) if dht_bootstrap else {}),
        **transport_settings(transport),
        **encryption_settings(encryption),
        "alert_mask": lt.alert.category_t.status_notification
        | lt.alert.category_t.error_notification
        | lt.alert.category_t.peer_notification
        | lt.alert.category_t.connect_notification
        | lt.alert.category_t.dht_notification
        | PEER_LOG_MASK,
    }
    ses = lt.session(settings)
    log = []
    if dht_bootstrap:
        # A user's DHT node has long been bootstrapped when a magnet is added; this one
        # starts now. Add the torrent once the bootstrap is done, so its first lookup
        # (libtorrent looks up a new torrent at once, then every dht_announce_interval,
        # 15 minutes) runs on a routing table.
        give_up = time.monotonic() + timeout
        booted = False
        while not booted and time.monotonic() < give_up:
            ses.wait_for_alert(200)
            for a in ses.pop_alerts():
                log.append("%s: %s" % (type(a).__name__, a.message()))
                booted = booted or isinstance(a, lt.dht_bootstrap_alert)
    params = lt.parse_magnet_uri(magnet)
    # Metadata only: nothing is downloaded into it, but libtorrent wants a save path.
    # Beside OUT (a test's own temporary directory, gone with it even when the test kills
    # this process), and removed before every exit of ours (os._exit skips cleanups).
    save_path = tempfile.mkdtemp(prefix="lt-fetch-", dir=os.path.dirname(os.path.abspath(out)))
    params.save_path = save_path
    # Time to metadata: from add_torrent to metadata_received_alert.
    start = time.monotonic()
    handle = ses.add_torrent(params)
    while time.monotonic() - start < timeout:
        ses.wait_for_alert(200)
        for a in ses.pop_alerts():
            log.append("%.3f %s: %s" % (time.monotonic() - start, type(a).__name__, a.message()))
            if isinstance(a, lt.metadata_received_alert):
                seconds = time.monotonic() - start
                info = bytes(handle.torrent_file().info_section())
                with open(out, "wb") as f:
                    f.write(info)
                peers = [{"addr": "%s:%d" % tuple(p.ip),
                          "transport": "utp" if p.flags & PEER_FLAG_UTP_SOCKET else "tcp"}
                         for p in handle.get_peer_info()]
                print(json.dumps({"ok": True, "info_len": len(info),
                                  "seconds": round(seconds, 3), "peers": peers}), flush=True)
                # Leave without tearing the session down: python3-libtorrent 2.0.8 can
                # crash (SIGSEGV) destroying a session with connections still open, which
                # would lose the result we have.
                shutil.rmtree(save_path, ignore_errors=True)
                os._exit(0)
            if isinstance(a, lt.metadata_failed_alert):
                print("metadata_failed: " + a.message(), file=sys.stderr)
    print("timed out after %ss waiting for metadata; alerts:\n  %s" % (timeout, "\n  ".join(log[-TIMEOUT_REPORT_ALERTS:])),
          file=sys.stderr)
    # The peers as libtorrent sees them: tells a connection that moved no bytes (a stall)
    # from one that moved some (slow, or lossy beyond its retries).
    for p in handle.get_peer_info():
        print("  peer %s:%d %s flags=%#x down=%d up=%d last_active=%s last_request=%s" % (
            p.ip[0], p.ip[1], "utp" if p.flags & PEER_FLAG_UTP_SOCKET else "tcp", p.flags,
            p.total_download, p.total_upload, getattr(p, "last_active", "?"),
            getattr(p, "last_request", "?")), file=sys.stderr)
    shutil.rmtree(save_path, ignore_errors=True)
    return 1


def log_seed_alert(a):
    """Every alert to stderr; an accepted connection as `incoming utp|tcp ADDR`, so a test
    (or a person) sees which transport a client came in on."""
    if isinstance(a, lt.incoming_connection_alert):
        kind = "utp" if a.socket_type in (lt.socket_type_t.utp, lt.socket_type_t.utp_ssl) else "tcp"
        print("incoming %s %s:%d" % ((kind,) + tuple(a.endpoint)), file=sys.stderr, flush=True)
    else:
        print("alert %s: %s" % (type(a).__name__, a.message()), file=sys.stderr, flush=True)


def seed(torrents, content_dir, port, trackers, dht_bootstrap, connect_peers, transport,
         encryption="default", listen_ip="127.0.0.1"):
    dht = bool(dht_bootstrap)
    settings = {
        "listen_interfaces": "%s:%d" % (listen_ip, port),
        **local_only(),
        "enable_dht": dht,
        **transport_settings(transport),
        **encryption_settings(encryption),
        # Tests connect many times from 127.0.0.1 (and through magnetar).
        "allow_multiple_connections_per_ip": True,
        "announce_to_all_trackers": True,
        "announce_to_all_tiers": True,
        # SSRF mitigation refuses tracker URLs on localhost whose path is not /announce.
        "ssrf_mitigation": False,
        "alert_mask": lt.alert.category_t.status_notification
        | lt.alert.category_t.error_notification
        | lt.alert.category_t.tracker_notification
        | lt.alert.category_t.dht_notification
        | lt.alert.category_t.peer_notification
        | PEER_LOG_MASK,
    }
    if dht:
        settings.update({
            "dht_bootstrap_nodes": dht_bootstrap,
            # A DHT on loopback: every node is 127.0.0.1, which these filters refuse.
            "dht_restrict_routing_ips": False,
            "dht_restrict_search_ips": False,
            "dht_ignore_dark_internet": False,
            "dht_prefer_verified_node_ids": False,
        })
    ses = lt.session(settings)
    handles = []
    for path in torrents:
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(path)
        params.save_path = content_dir
        params.flags |= lt.torrent_flags.seed_mode
        params.flags &= ~lt.torrent_flags.auto_managed
        params.flags &= ~lt.torrent_flags.paused
        # Assign, do not append: the binding hands out a copy of the list.
        params.trackers = list(trackers)
        handles.append(ses.add_torrent(params))
    for h in handles:
        for p in connect_peers:
            host, _, pport = p.rpartition(":")
            h.connect_peer((host.strip("[]"), int(pport)))
    # Ready means ready to serve: every torrent seeding (seed_mode skips the check).
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up and not all(
            h.status().state == lt.torrent_status.seeding for h in handles):
        ses.wait_for_alert(100)
        for a in ses.pop_alerts():
            log_seed_alert(a)
    print("listening %d" % ses.listen_port(), flush=True)
    last_dht_announce = 0.0
    while True:
        ses.wait_for_alert(1000)
        for a in ses.pop_alerts():
            log_seed_alert(a)
        # The first DHT announce waits for the routing table; on a tiny loopback DHT
        # repeat it so a lookup started later finds the seed.
        if dht and time.monotonic() - last_dht_announce > 5:
            last_dht_announce = time.monotonic()
            for h in handles:
                h.force_dht_announce()


def dht_node(port, dht_bootstrap):
    """A libtorrent DHT node on 127.0.0.1:PORT and nothing else (no torrents): the nodes of
    a loopback DHT testnet built from the implementation most of the public DHT runs.
    Prints `listening PORT` once its DHT is up, then runs until killed."""
    settings = {
        "listen_interfaces": "127.0.0.1:%d" % port,
        **local_only(),
        **loopback_dht(dht_bootstrap),
        "alert_mask": lt.alert.category_t.dht_notification | lt.alert.category_t.error_notification,
    }
    ses = lt.session(settings)
    # With nobody to bootstrap from (the first node) there is no bootstrap alert to wait for.
    give_up = time.monotonic() + (10 if dht_bootstrap else 0)
    while time.monotonic() < give_up:
        ses.wait_for_alert(100)
        if any(isinstance(a, lt.dht_bootstrap_alert) for a in ses.pop_alerts()):
            break
    print("listening %d" % ses.listen_port(), flush=True)
    while True:
        ses.wait_for_alert(1000)
        for a in ses.pop_alerts():
            print("alert %s: %s" % (type(a).__name__, a.message()), file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-torrents")
    m.add_argument("outdir")
    m.add_argument("--v1-metadata-pieces", type=int, default=0)
    f = sub.add_parser("fetch")
    f.add_argument("magnet")
    f.add_argument("out")
    f.add_argument("--timeout", type=float, default=30.0)
    f.add_argument("--transport", choices=TRANSPORTS, default="default")
    f.add_argument("--dht-bootstrap", default="")
    f.add_argument("--encryption", choices=ENCRYPTIONS, default="default")
    d = sub.add_parser("dht-node")
    d.add_argument("--port", type=int, default=0)
    d.add_argument("--dht-bootstrap", default="")
    s = sub.add_parser("seed")
    s.add_argument("paths", nargs="+", metavar="TORRENT... CONTENT_DIR")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--tracker", action="append", default=[])
    s.add_argument("--dht-bootstrap", default="")
    s.add_argument("--connect-peer", action="append", default=[])
    s.add_argument("--transport", choices=TRANSPORTS, default="default")
    s.add_argument("--encryption", choices=ENCRYPTIONS, default="default")
    s.add_argument("--listen-ip", default="127.0.0.1")
    args = ap.parse_args()
    if args.cmd == "make-torrents":
        if args.v1_metadata_pieces:
            make_v1_with_metadata_pieces(args.outdir, args.v1_metadata_pieces)
        else:
            make_torrents(args.outdir)
        return 0
    if args.cmd == "dht-node":
        return dht_node(args.port, args.dht_bootstrap)
    if args.cmd == "seed":
        if len(args.paths) < 2:
            ap.error("seed needs at least one TORRENT and the CONTENT_DIR")
        return seed(args.paths[:-1], args.paths[-1], args.port, args.tracker,
                    args.dht_bootstrap, args.connect_peer, args.transport, args.encryption,
                    args.listen_ip)
    return fetch(args.magnet, args.out, args.timeout, args.transport, args.dht_bootstrap,
                 args.encryption)


if __name__ == "__main__":
    sys.exit(main())
