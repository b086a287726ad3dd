#!/usr/bin/python3
"""Capture the bytes a real libtorrent (python3-libtorrent) sends to a BEP 9 peer.

Pins the wire format of src/wire/ to a real client: the unit tests there decode the files
this script writes under tests/golden/.

A plain TCP server on 127.0.0.1 plays the peer that has the metadata. libtorrent gets a
magnet whose only peer is that server (x.pe), connects, and the server records:
  <prefix>_handshake.bin        libtorrent's 68-byte BitTorrent handshake
  <prefix>_ext_handshake.bin    its BEP 10 extension handshake frame (length prefix included)
  <prefix>_metadata_request.bin its ut_metadata request frame(s), concatenated
  <prefix>_stream.bin           every byte it sent after the handshake, in order
after replying with a handshake (BEP 10 + Fast bits) and the extension handshake
  d1:md11:ut_metadatai3ee13:metadata_sizei20000ee
It never answers the request: the capture ends once the request(s) arrived.

libtorrent runs on its default transports, as users run it: it dials uTP first, gets no
answer from this TCP-only server, and falls back to TCP a few seconds later (docs/transports.md), so each capture takes about 6 s. The bytes on TCP are the same either way.

Run (system python: python3-libtorrent is a Debian package, not in pyenv):
    /usr/bin/python3 tests/interop/capture_golden.py [out_dir]   # default tests/golden
"""

import os
import socket
import struct
import sys
import tempfile
import threading
import time

import libtorrent as lt

OUR_UT_METADATA_ID = 3
METADATA_SIZE = 20000
OUR_EXT_HANDSHAKE = b"d1:md11:ut_metadatai%dee13:metadata_sizei%dee" % (
    OUR_UT_METADATA_ID,
    METADATA_SIZE,
)
OUR_PEER_ID = b"-MG0001-goldencapture"[:20]

# Arbitrary hashes: nobody has these torrents, which is the point (metadata miss).
V1_HASH_HEX = "c8295ce630f2064f08440db1534e37da6b4eabc7"
V2_HASH_HEX = "8c7bd5ac8a5a6aa8b7e0e3ad1b2ac0f1be0e3b5f2b4a6e3e1d0c9b8a79685746"

CAPTURES = [
    ("libtorrent", "magnet:?xt=urn:btih:%s&dn=golden&x.pe=127.0.0.1:{port}" % V1_HASH_HEX),
    ("libtorrent_v2", "magnet:?xt=urn:btmh:1220%s&dn=golden&x.pe=127.0.0.1:{port}" % V2_HASH_HEX),
    (
        "libtorrent_hybrid",
        "magnet:?xt=urn:btih:%s&xt=urn:btmh:1220%s&dn=golden&x.pe=127.0.0.1:{port}"
        % (V1_HASH_HEX, V2_HASH_HEX),
    ),
]

TIMEOUT_S = 20.0
# After the first ut_metadata request, keep listening this long for pipelined ones.
LINGER_AFTER_REQUEST_S = 1.5


def read_exact(conn, n, deadline):
    buf = b""
    while len(buf) < n:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def serve_one(listener, result):
    """Accept libtorrent's connection and record what it sends."""
    try:
        deadline = time.monotonic() + TIMEOUT_S
        listener.settimeout(TIMEOUT_S)
        conn, _ = listener.accept()
        handshake = read_exact(conn, 68, deadline)
        result["handshake"] = handshake
        info_hash = handshake[28:48]
        reserved = bytearray(8)
        reserved[5] |= 0x10  # BEP 10
        reserved[7] |= 0x04  # BEP 6 Fast
        ext = OUR_EXT_HANDSHAKE
        reply = b"\x13BitTorrent protocol" + bytes(reserved) + info_hash + OUR_PEER_ID
        reply += struct.pack(">IBB", len(ext) + 2, 20, 0) + ext
        conn.sendall(reply)

        stream = b""
        frames = []
        requests = b""
        stop_at = deadline
        while time.monotonic() < stop_at:
            try:
                head = read_exact(conn, 4, stop_at)
                (length,) = struct.unpack(">I", head)
                body = read_exact(conn, length, stop_at) if length else b""
            except (socket.timeout, EOFError):
                break
            frame = head + body
            stream += frame
            frames.append(frame)
            if length >= 2 and body[0] == 20:
                if body[1] == 0 and "ext_handshake" not in result:
                    result["ext_handshake"] = frame
                elif body[1] == OUR_UT_METADATA_ID:
                    requests += frame
                    stop_at = min(stop_at, time.monotonic() + LINGER_AFTER_REQUEST_S)
        result["stream"] = stream
        result["requests"] = requests
        conn.close()
    except Exception as e:  # noqa: BLE001 - report any failure to the main thread
        result["error"] = repr(e)


def capture(prefix, magnet_template, out_dir):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    result = {}
    server = threading.Thread(target=serve_one, args=(listener, result))
    server.start()

    ses = lt.session(
        {
            "listen_interfaces": "127.0.0.1:0",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            # Transports stay at libtorrent's defaults (uTP first, then TCP).
            "alert_mask": 0,
        }
    )
    magnet = magnet_template.format(port=port)
    with tempfile.TemporaryDirectory() as save_path:
        atp = lt.parse_magnet_uri(magnet)
        atp.save_path = save_path
        ses.add_torrent(atp)
        server.join(TIMEOUT_S + 5)
        del ses
    listener.close()

    if "error" in result or "handshake" not in result:
        raise SystemExit("%s: capture failed: %r" % (prefix, result.get("error")))
    files = {
        "handshake": result["handshake"],
        "ext_handshake": result.get("ext_handshake", b""),
        "metadata_request": result.get("requests", b""),
        "stream": result.get("stream", b""),
    }
    for name, data in files.items():
        path = os.path.join(out_dir, "%s_%s.bin" % (prefix, name))
        with open(path, "wb") as f:
            f.write(data)
    hs = result["handshake"]
    print("%s: magnet %s" % (prefix, magnet))
    print("  handshake reserved=%s info_hash=%s peer_id=%r" % (hs[20:28].hex(), hs[28:48].hex(), hs[48:68]))
    print("  ext handshake: %r" % files["ext_handshake"][6:])
    print("  stream frames:")
    s = files["stream"]
    while len(s) >= 4:
        (n,) = struct.unpack(">I", s[:4])
        print("    len=%d %r" % (n, s[4 : 4 + n][:120]))
        s = s[4 + n :]


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "golden")
    os.makedirs(out_dir, exist_ok=True)
    print("libtorrent", lt.__version__)
    for prefix, template in CAPTURES:
        capture(prefix, template, out_dir)


if __name__ == "__main__":
    main()
