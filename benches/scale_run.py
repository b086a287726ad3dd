#!/usr/bin/env python3
"""One measured run of benches/scale.sh: start a server over K torrents, time it to ready
and to serving every hash of a sample, read its RSS, run a short churn load, stop it.

  scale_run.py --server magnetar|libtorrent --data DIR --bound SECONDS [options]

DIR holds hashes.txt (all K v1 info-hashes), sample.txt (the S probed), store/ (magnetar's
data dir) and torrents/ (libtorrent's .torrent files). The caller pins this process to the
load CPU (taskset); the server is started pinned to --server-cpu. Prints one JSON line.

magnetar reads the store's index.ckpt into the page cache before t0 (a warm restart: the
checkpoint the last stop wrote is in memory), reporting how much of it was resident before
(checkpoint_resident_before_warming). magnetar-cold is magnetar after the page cache was dropped (sync; echo 3 >
/proc/sys/vm/drop_caches: a cold restart, needs root); magnetar-cgroup the same with the
server in a memory cgroup (v1, /sys/fs/cgroup/memory/magnetar-scale) limited to --cgroup-mb
(its page cache and anonymous memory both count): cgroup_max_usage_kb, cgroup_failcnt and
oom_kills of the run are reported.

Definitions (times from just before the server process is spawned, t0):
  ready_s     the server's "ready" line on stdout (magnetar: store recovered and listening;
              lt_seed.py: every torrent added and listening);
  serving_s   the moment the last hash of the sample answered a full BEP 9 fetch whose
              assembled info dict hashes (SHA-1) to it. The probe starts at t0 and goes
              round after round over the hashes not answered yet (32 connections at a
              time, 5 s per fetch) until all have answered, the bound has passed, the
              server has exited or its private memory (RssAnon + RssShmem: not
              the page cache it maps, which the kernel can drop) has outgrown --rss-max-mb; a hash that answered once is not
              asked again. While nothing answers, a round asks only 8 hashes (a scout), so
              that a server still starting up is not flooded; the first answer starts a
              full round. The next round comes 20 ms after one with a refused connection or a
              new answer, else 0.5 s after;
  rss         VmRSS (and RssAnon, RssFile) of the server process when all had answered,
              or when the bound passed;
  churn       magnetar-loadgen --mode churn over all K hashes, after a warm-up, only when
              all of the sample answered; churn_server_cpu is the server's CPU time over
              that run's wall time (1.0: its core busy).
Every wait is bounded: the probe by --bound, each loadgen run by its duration + 60 s, the
stop by 10 s before SIGKILL.
"""
import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_CONNECTIONS = 32
PROBE_FETCH_TIMEOUT_S = 5.0


# --- bencode (just what ut_metadata messages need) ---------------------------------------
def bdecode(b, i=0):
    c = b[i:i + 1]
    if c == b"i":
        j = b.index(b"e", i)
        return int(b[i + 1:j]), j + 1
    if c == b"l":
        i, out = i + 1, []
        while b[i:i + 1] != b"e":
            v, i = bdecode(b, i)
            out.append(v)
        return out, i + 1
    if c == b"d":
        i, out = i + 1, {}
        while b[i:i + 1] != b"e":
            k, i = bdecode(b, i)
            v, i = bdecode(b, i)
            out[k] = v
        return out, i + 1
    if c.isdigit():
        j = b.index(b":", i)
        n = int(b[i:j])
        return b[j + 1:j + 1 + n], j + 1 + n
    raise ValueError("bad bencode at %d" % i)


def bencode(v):
    if isinstance(v, int):
        return b"i%de" % v
    if isinstance(v, bytes):
        return b"%d:%s" % (len(v), v)
    if isinstance(v, dict):
        return b"d" + b"".join(bencode(k) + bencode(v[k]) for k in sorted(v)) + b"e"
    raise TypeError(type(v))


OUR_UT_METADATA = 3


async def read_msg(reader):
    n = int.from_bytes(await reader.readexactly(4), "big")
    return await reader.readexactly(n) if n else b""


async def fetch(port, key):
    """One full BEP 9 fetch of `key` (20 bytes) from 127.0.0.1:port; True when the
    assembled dict hashes to it. Raises on refusal, close, timeout or a wrong answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        reserved = bytearray(8)
        reserved[5] |= 0x10  # extension protocol (BEP 10)
        writer.write(b"\x13BitTorrent protocol" + bytes(reserved) + key + b"-SP0001-" + os.urandom(12))
        writer.write(b"\x00\x00\x00\x00")  # nothing yet: a keep-alive is harmless
        ext = bencode({b"m": {b"ut_metadata": OUR_UT_METADATA}, b"v": b"scale_probe"})
        msg = b"\x14\x00" + ext
        writer.write(len(msg).to_bytes(4, "big") + msg)
        await writer.drain()
        head = await reader.readexactly(68)
        if head[28:48] != key:
            return False
        size = peer_ut = None
        pieces = {}
        while True:
            m = await read_msg(reader)
            if len(m) < 2 or m[0] != 20:
                continue  # keep-alive, bitfield, have-all/none, unchoke, ...
            if m[1] == 0:
                hs, _ = bdecode(m, 2)
                peer_ut = hs.get(b"m", {}).get(b"ut_metadata")
                size = hs.get(b"metadata_size")
                if not peer_ut or not size or size > 64 << 20:
                    return False
                n = (size + 16383) // 16384
                out = b""
                for p in range(n):
                    r = bytes([20, peer_ut]) + bencode({b"msg_type": 0, b"piece": p})
                    out += len(r).to_bytes(4, "big") + r
                writer.write(out)
                await writer.drain()
            elif m[1] == OUR_UT_METADATA and size:
                d, end = bdecode(m, 2)
                if d.get(b"msg_type") != 1:
                    return False  # reject
                pieces[d[b"piece"]] = m[end:]
                if len(pieces) == (size + 16383) // 16384:
                    info = b"".join(pieces[p] for p in sorted(pieces))
                    return hashlib.sha1(info).digest() == key
    finally:
        writer.close()


class Probe:
    def __init__(self, port, keys, t0, deadline):
        self.port, self.t0, self.deadline = port, t0, deadline
        self.pending = list(keys)
        self.answered = {}  # key -> seconds since t0
        self.rounds = 0
        self.last_round_s = 0.0
        self.errors = {}

    async def one(self, sem, key, outcome):
        async with sem:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return
            try:
                ok = await asyncio.wait_for(fetch(self.port, key), min(PROBE_FETCH_TIMEOUT_S, left))
            except ConnectionRefusedError:
                outcome["refused"] += 1
                return
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError, ValueError,
                    KeyError) as e:
                name = type(e).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
                return
            if ok:
                self.answered[key] = time.monotonic() - self.t0
            else:
                self.errors["wrong_or_rejected"] = self.errors.get("wrong_or_rejected", 0) + 1

    async def round(self, scout):
        """Asks every pending hash (or 8 of them when scouting); returns (asked, refused)."""
        sem = asyncio.Semaphore(PROBE_CONNECTIONS)
        outcome = {"refused": 0}
        start = time.monotonic()
        ask = self.pending[:8] if scout else list(self.pending)
        await asyncio.gather(*(self.one(sem, k, outcome) for k in ask))
        self.pending = [k for k in self.pending if k not in self.answered]
        if scout:  # next scout asks other hashes
            self.pending = self.pending[8:] + self.pending[:8]
        self.rounds += 1
        self.last_round_s = time.monotonic() - start
        return len(ask), outcome["refused"]


def proc_status(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


CGROUP = "/sys/fs/cgroup/memory/magnetar-scale"


def warm_checkpoint(store):
    """Reads D/index.ckpt (if any) into the page cache; returns the share of it that was
    resident before (fincore), or None."""
    path = os.path.join(store, "index.ckpt")
    if not os.path.exists(path):
        return None
    resident = None
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", path], capture_output=True,
                             text=True, timeout=30).stdout.split()
        resident = round(int(out[0]) / max(1, int(out[1])), 3)
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        pass
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    return resident


def cg_write(cgroup, name, value):
    with open(os.path.join(cgroup, name), "w") as f:
        f.write(value)


def cg_read(cgroup, name):
    with open(os.path.join(cgroup, name)) as f:
        return f.read().strip()


def cg_oom_kills(cgroup):
    for line in cg_read(cgroup, "memory.oom_control").splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def free_port():
    """A port free on 127.0.0.1 for TCP and UDP (both servers also listen on uTP)."""
    for _ in range(50):
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    raise SystemExit("no free port")


def loadgen(args, port, seconds, json_out):
    cmd = [args.loadgen, "--target", "127.0.0.1:%d" % port, "--hashes",
           os.path.join(args.data, "hashes.txt"), "--mode", "churn", "--connections",
           str(args.connections), "--duration", "%gs" % seconds, "--threads", "1",
           "--timeout", "10"] + (["--json"] if json_out else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        return None, "loadgen did not finish within %g s" % (seconds + 60)
    if p.returncode != 0:
        return None, "loadgen exit %d: %s" % (p.returncode, p.stderr.strip()[-300:])
    if not json_out:
        return None, None
    return json.loads(p.stdout.strip().splitlines()[-1]), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True,
                    choices=["magnetar", "magnetar-cold", "magnetar-cgroup", "libtorrent",
                             "libtorrent-seedmode"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--run", type=int, default=1)
    ap.add_argument("--bound", type=float, required=True)
    ap.add_argument("--server-cpu", default="0")
    ap.add_argument("--churn-s", type=float, default=5)
    ap.add_argument("--warmup-s", type=float, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--magnetar", required=True)
    ap.add_argument("--loadgen", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--rss-max-mb", type=float, default=6144)
    ap.add_argument("--cgroup-mb", type=int, default=1024)
    args = ap.parse_args()
    magnetar = args.server.startswith("magnetar")

    keys = [bytes.fromhex(line.strip()) for line in open(os.path.join(args.data, "sample.txt"))
            if line.strip()]
    port = free_port()
    env = dict(os.environ)
    preexec, cgroup = None, None
    if args.server in ("magnetar-cold", "magnetar-cgroup"):
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    if args.server == "magnetar-cgroup":
        cgroup = CGROUP
        os.makedirs(cgroup, exist_ok=True)
        cg_write(cgroup, "memory.limit_in_bytes", str(args.cgroup_mb << 20))
        cg_write(cgroup, "memory.max_usage_in_bytes", "0")
        cg_write(cgroup, "memory.failcnt", "0")
        oom_before = cg_oom_kills(cgroup)

        def preexec():
            cg_write(cgroup, "cgroup.procs", str(os.getpid()))
    if args.server == "magnetar":
        # Warm means what a restart on the same machine finds: the checkpoint the last stop
        # wrote, in the page cache. A run after a magnetar-cgroup run would otherwise find it
        # partly evicted (written inside the cgroup's limit) and read it from disk.
        warm_resident_before = warm_checkpoint(os.path.join(args.data, "store"))
    if magnetar:
        cmd = [args.magnetar, "serve", "--data-dir", os.path.join(args.data, "store"),
               "--listen", "127.0.0.1:%d" % port, "--no-dht", "--admin", "off", "--threads", "1",
               "--connections-per-ip-max", "4096", "--shutdown-grace-ms", "500"]
    else:
        cmd = ["/usr/bin/python3", os.path.join(ROOT, "benches", "lt_seed.py"),
               os.path.join(args.data, "torrents"), "127.0.0.1", str(port)]
        env["LT_SEED_ADD_TIMEOUT_S"] = str(args.bound)
        env["LT_SEED_MODE"] = "seed" if args.server == "libtorrent-seedmode" else "metadata-only"
    log = open(args.log, "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(["taskset", "-c", args.server_cpu] + cmd, stdout=subprocess.PIPE,
                            stderr=log, env=env, text=True, bufsize=1, preexec_fn=preexec)
    state = {"ready_s": None, "added": 0 if not magnetar else None,
             "added_at_s": None}
    added_re = re.compile(r"^added (\d+) of (\d+)")

    def read_stdout():
        for line in proc.stdout:
            t = time.monotonic() - t0
            log.write("[%9.3f] %s" % (t, line))
            log.flush()
            if line.startswith("ready ") and state["ready_s"] is None:
                m = re.search(r"torrents=(\d+)", line)
                if not magnetar and m:
                    state["added"], state["added_at_s"] = int(m.group(1)), t
                    if int(m.group(1)) == args.k:
                        state["ready_s"] = t
                    else:
                        state["ready_partial_s"] = t
                else:
                    state["ready_s"] = t
            m = re.match(r"^queued (\d+) of", line)
            if m:
                state["queued"] = int(m.group(1))
            m = added_re.match(line)
            if m:
                state["added"], state["added_at_s"] = int(m.group(1)), t
                if int(m.group(1)) == args.k and state.get("ready_partial_s") and \
                        state["ready_s"] is None:
                    state["ready_s"] = t  # all added after lt_seed's ready line

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()

    probe = Probe(port, keys, t0, t0 + args.bound)
    progress = []  # [seconds, answered, torrents added]
    guard = {"rss_over": None, "status": None, "cpu": None, "added": None}
    done = threading.Event()

    def watchdog():
        # Private memory over the cap: note where it got, then SIGKILL (bounded memory).
        while not done.wait(0.5) and proc.poll() is None:
            st = proc_status(proc.pid)
            if (st.get("RssAnon", 0) + st.get("RssShmem", 0)) / 1024 > args.rss_max_mb:
                guard.update(rss_over=round(time.monotonic() - t0, 3), status=st,
                             cpu=cpu_seconds(proc.pid), added=state["added"])
                proc.kill()
                return

    dog = threading.Thread(target=watchdog, daemon=True)
    dog.start()

    async def probe_until_done():
        scout = True
        while probe.pending and time.monotonic() - t0 < args.bound and proc.poll() is None:
            before = len(probe.answered)
            asked, refused = await probe.round(scout)
            t = time.monotonic() - t0
            if not progress or progress[-1][1] != len(probe.answered) or t - progress[-1][0] > 10:
                progress.append([round(t, 3), len(probe.answered), state["added"]])
            scout = len(probe.answered) == before and not (refused and scout)
            if probe.pending:
                # Not listening yet, or some answered: again soon. Else 0.5 s.
                await asyncio.sleep(0.02 if refused or len(probe.answered) > before else 0.5)

    asyncio.run(probe_until_done())
    done.set()
    dog.join(5)
    t_end = time.monotonic() - t0
    alive = proc.poll() is None
    served = not probe.pending and alive
    status = proc_status(proc.pid) if alive else (guard["status"] or {})
    cpu_at_served = cpu_seconds(proc.pid) if alive else guard["cpu"]
    r = {
        "server": args.server, "k": args.k, "run": args.run, "sample": len(keys),
        "bound_s": args.bound, "port": port,
        "ready_s": state["ready_s"],
        "served_all": served,
        "serving_s": max(probe.answered.values()) if served else None,
        "answered": len(probe.answered),
        "first_answer_s": min(probe.answered.values()) if probe.answered else None,
        "probe_rounds": probe.rounds, "probe_last_round_s": round(probe.last_round_s, 3),
        "probe_errors": probe.errors,
        "stopped_at_s": round(t_end, 3),
        "stopped_rss_over_max_at_s": guard["rss_over"], "rss_max_mb": args.rss_max_mb,
        "server_exited": not alive and guard["rss_over"] is None,
        "torrents_added": state["added"] if not magnetar else args.k,
        "torrents_added_at_s": state["added_at_s"],
        "torrents_queued": state.get("queued"),
        "server_cpu_s": cpu_at_served,
        "rss_kb": status.get("VmRSS"), "rss_anon_kb": status.get("RssAnon"),
        "rss_file_kb": status.get("RssFile"), "hwm_kb": status.get("VmHWM"),
        "progress": progress,
    }
    if served and alive:
        _, err = loadgen(args, port, args.warmup_s, False)
        c0, w0 = cpu_seconds(proc.pid), time.monotonic()
        res, err2 = loadgen(args, port, args.churn_s, True) if not err else (None, err)
        c1, w1 = cpu_seconds(proc.pid), time.monotonic()
        if res and c0 is not None and c1 is not None:
            res["server_cpu"] = round((c1 - c0) / (w1 - w0), 3)
        if res:
            r.update(churn_fetches_per_sec=res["fetches_per_sec"], churn_errors=res["errors"],
                     churn_p50_us=res["p50_us"], churn_p99_us=res["p99_us"],
                     churn_fetches=res.get("fetches"), churn_s=args.churn_s,
                     churn_server_cpu=res.get("server_cpu"))
        else:
            r["churn_error"] = err2
        st = proc_status(proc.pid)
        r.update(rss_after_churn_kb=st.get("VmRSS"), rss_anon_after_churn_kb=st.get("RssAnon"),
                 rss_file_after_churn_kb=st.get("RssFile"), hwm_after_churn_kb=st.get("VmHWM"))
    elif r["server_exited"]:
        r["server_exit_code"] = proc.returncode
    # Stop: SIGTERM, 10 s, SIGKILL.
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    reader.join(5)
    r["ready_s"] = state["ready_s"]
    r["torrents_added"] = state["added"] if not magnetar else args.k
    if guard["rss_over"] is not None and not magnetar:
        r["torrents_added"] = guard["added"]
    r["torrents_added_at_s"] = state["added_at_s"]
    if args.server == "magnetar":
        r["checkpoint_resident_before_warming"] = warm_resident_before
    if cgroup:
        r.update(cgroup_mb=args.cgroup_mb,
                 cgroup_max_usage_kb=int(cg_read(cgroup, "memory.max_usage_in_bytes")) // 1024,
                 cgroup_failcnt=int(cg_read(cgroup, "memory.failcnt")),
                 cgroup_oom_kills=cg_oom_kills(cgroup) - oom_before)
    log.close()
    for k in ("ready_s", "serving_s", "first_answer_s", "torrents_added_at_s", "server_cpu_s"):
        if r.get(k) is not None:
            r[k] = round(r[k], 3)
    print(json.dumps(r, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
