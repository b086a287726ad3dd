#!/usr/bin/python3
"""libtorrent (Debian's python3-libtorrent 2.0.8) as a DHT client of magnetar's node.

  probe NODE INFO_HASH_HEX [--listen IP] [--timeout S]
      a libtorrent session on IP:0 (127.0.0.1 or ::1) with its DHT on its defaults
      except the filters that refuse loopback addresses (`dht_prefer_verified_node_ids`
      stays on, as clients ship it). It is given NODE (magnetar's DHT endpoint) with
      add_dht_node, as a node learnt from a peer, and nothing else. Prints one JSON line:
        in_table   NODE is in libtorrent's routing table (dht_live_nodes) — it answered
                   libtorrent's queries (2-byte transaction ids) and was kept;
        still_in_table  the same, 5 s later;
        samples, num, interval   BEP 51 sample_infohashes sent to NODE;
        peers      what libtorrent's own get_peers lookup of INFO_HASH found.
      Exit 1 if NODE never entered the table.

  fetch NODE MAGNET OUT [--listen IP] [--timeout S]
      a DHT-only libtorrent client on IP:0 (no tracker, no x.pe in MAGNET): given NODE
      with add_dht_node, it waits until NODE is in its table, adds MAGNET, finds peers
      through its DHT lookups, and writes the info dict it receives to OUT. Prints one JSON
      line (seconds from add_torrent to metadata, the peers it was connected to); exit 1
      on timeout.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import libtorrent as lt


def endpoint(s):
    host, _, port = s.rpartition(":")
    return (host.strip("[]"), int(port))


def session(listen_ip):
    host = "[%s]" % listen_ip if ":" in listen_ip else listen_ip
    return lt.session({
        "listen_interfaces": "%s:0" % host,
        "enable_dht": True,
        "dht_bootstrap_nodes": "",
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        # Loopback addresses: these filters refuse them; nothing else is changed.
        "dht_restrict_routing_ips": False,
        "dht_restrict_search_ips": False,
        "dht_ignore_dark_internet": False,
        # On loopback every peer has the same address; libtorrent otherwise keeps one peer
        # per address and lets a later one (itself, announced back) replace magnetar.
        "allow_multiple_connections_per_ip": True,
        "alert_mask": lt.alert.category_t.dht_notification
        | lt.alert.category_t.dht_operation_notification
        | lt.alert.category_t.status_notification
        | lt.alert.category_t.peer_notification
        | lt.alert.category_t.connect_notification
        | lt.alert.category_t.error_notification,
    })


def own_nids(ses):
    state = ses.save_state().get(b"dht state", {})
    return [n[:20] for n in state.get(b"node-id", [])]


def live_nodes(ses, deadline):
    """Endpoints in libtorrent's routing tables (every one of its DHT nodes)."""
    found = set()
    for nid in own_nids(ses):
        ses.dht_live_nodes(lt.sha1_hash(nid))
    pending = len(own_nids(ses))
    while pending and time.monotonic() < deadline:
        ses.wait_for_alert(200)
        for a in ses.pop_alerts():
            if isinstance(a, lt.dht_live_nodes_alert):
                pending -= 1
                for n in a.nodes:
                    ep = n["endpoint"] if isinstance(n, dict) else n[1]
                    found.add((str(ep[0]), int(ep[1])))
    return found


def probe(node, info_hash, listen_ip, timeout):
    ses = session(listen_ip)
    ep = endpoint(node)
    give_up = time.monotonic() + timeout
    ses.add_dht_node(ep)
    in_table = False
    while not in_table and time.monotonic() < give_up:
        time.sleep(0.5)
        in_table = ep in live_nodes(ses, give_up)
    if not in_table:
        print(json.dumps({"in_table": False}), flush=True)
        return 1
    result = {"in_table": True}
    ses.dht_sample_infohashes(ep, lt.sha1_hash(bytes(20)))
    ses.dht_get_peers(lt.sha1_hash(bytes.fromhex(info_hash)))
    peers = set()
    end = time.monotonic() + min(10.0, max(1.0, give_up - time.monotonic()))
    while time.monotonic() < end and ("samples" not in result or not peers):
        ses.wait_for_alert(200)
        for a in ses.pop_alerts():
            if isinstance(a, lt.dht_sample_infohashes_alert):
                result["samples"] = [str(s) for s in a.samples]
                result["num"] = a.num_infohashes
                result["interval"] = int(a.interval.total_seconds()) \
                    if hasattr(a.interval, "total_seconds") else a.interval
            elif isinstance(a, lt.dht_get_peers_reply_alert):
                for p in a.peers():
                    peers.add("%s:%d" % (p[0], p[1]) if ":" not in p[0]
                              else "[%s]:%d" % (p[0], p[1]))
    result["peers"] = sorted(peers)
    time.sleep(5)
    result["still_in_table"] = ep in live_nodes(ses, time.monotonic() + 5)
    print(json.dumps(result), flush=True)
    return 0


def fetch(node, magnet, out, listen_ip, timeout, utp_only=False):
    ses = session(listen_ip)
    if utp_only:
        # Peers over uTP only (libtorrent's default tries both): the fetch then shares
        # the serving UDP port with the DHT queries. Only the shared-port test passes
        # --utp-only; the DHT-only fetch test (dht_only_libtorrent_on_ipv6...) runs the defaults.
        ses.apply_settings({"enable_outgoing_tcp": False, "enable_incoming_tcp": False})  # default-off: proves the metadata came over uTP on the port the DHT shares; with TCP allowed libtorrent may take TCP and the test would not show the shared port works
    ep = endpoint(node)
    give_up = time.monotonic() + timeout
    ses.add_dht_node(ep)
    while ep not in live_nodes(ses, give_up):
        if time.monotonic() > give_up:
            print("%s never entered libtorrent's routing table" % node, file=sys.stderr)
            return 1
        time.sleep(0.5)
    params = lt.parse_magnet_uri(magnet)
    # Metadata only: nothing is downloaded into it, but libtorrent wants a save path.
    # Beside OUT (a test's own temporary directory, gone with it even when the test kills
    # this process), and removed before every exit of ours (os._exit skips cleanups).
    save_path = tempfile.mkdtemp(prefix="lt-dht-fetch-", dir=os.path.dirname(os.path.abspath(out)))
    params.save_path = save_path
    start = time.monotonic()
    handle = ses.add_torrent(params)
    log = []
    while time.monotonic() < give_up:
        ses.wait_for_alert(200)
        for a in ses.pop_alerts():
            log.append("%.3f %s: %s" % (time.monotonic() - start, type(a).__name__, a.message()))
            if isinstance(a, lt.metadata_received_alert):
                info = bytes(handle.torrent_file().info_section())
                with open(out, "wb") as f:
                    f.write(info)
                peers = ["%s:%d" % tuple(p.ip) for p in handle.get_peer_info()]
                print(json.dumps({"ok": True, "seconds": round(time.monotonic() - start, 3),
                                  "peers": peers}), flush=True)
                # python3-libtorrent 2.0.8 can crash tearing a session down with
                # connections open; leave without it.
                shutil.rmtree(save_path, ignore_errors=True)
                os._exit(0)
    print("timed out waiting for metadata; alerts:\n  " + "\n  ".join(log[-30:]), file=sys.stderr)
    shutil.rmtree(save_path, ignore_errors=True)
    return 1


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("node")
    p.add_argument("info_hash")
    p.add_argument("--listen", default="127.0.0.1")
    p.add_argument("--timeout", type=float, default=30.0)
    f = sub.add_parser("fetch")
    f.add_argument("node")
    f.add_argument("magnet")
    f.add_argument("out")
    f.add_argument("--listen", default="127.0.0.1")
    f.add_argument("--timeout", type=float, default=60.0)
    f.add_argument("--utp-only", action="store_true")
    args = ap.parse_args()
    if args.cmd == "fetch":
        return fetch(args.node, args.magnet, args.out, args.listen, args.timeout,
                     args.utp_only)
    if args.cmd == "probe":
        return probe(args.node, args.info_hash, args.listen, args.timeout)
    return 2


if __name__ == "__main__":
    sys.exit(main())
