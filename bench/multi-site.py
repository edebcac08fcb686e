#!/usr/bin/env python3
"""Benchmark the multi-site data plane: a 25 ms link against a 0 ms baseline.

Two clusters run side by side, each a copy of cluster-configs/local.toml on
free ports (data sites a and b plus a witness, all nodes in one `stretch up`
process): the WAN cluster with `delay_ms = DELAY` on the a<->b link (25 ms
one way, 50 ms round trip, by default) and the baseline cluster with
`delay_ms = 0`. Their data lives in a temporary folder under target/ (the
disk of the repository). Both processes are pinned to one CPU and fio to the
other; every fio run alternates between the clusters (the order flips each
repeat) and tables show medians. Before every measured run both clusters
are quiet: site a's backlog, dirty bytes and resync are 0 and site b has
applied every delta. Figures from different runs of this script are not
comparable (shared, noisy machines): compare within one run.

Volumes are created with `stretch volume create` at site a's node, so a owns
them; fio uses its nbd engine (nbd://127.0.0.1:PORT/NAME).

1. Owner writes. 4 KiB random writes, QD1 and QD16, at site a on an async
   volume: IOPS, p50 and p99 completion latency, ratios 25 ms / 0 ms.
   Target: p50 ratio <= 1.1 (the WAN does not slow the owner's writes).
   Each run stops after --runtime seconds or --write-cap bytes, whichever
   comes first, so that the WAN cluster's backlog stays below its
   backlog_bytes_max (256M) and drains between runs in bounded time. The
   table also shows, for the WAN cluster, the backlog and the volume's lag
   (stretch_volume_lag_seconds) as the run ends, how long the backlog took
   to drain, and writes throttled by the backlog bound (both clusters).

2. Strict reads at the replica. --read-region is written at a (1 MiB writes)
   and replicated (the backlog drained), then 4 KiB random reads at QD1 for
   --runtime seconds: at b through the strict export NAME (each read asks
   the owner for newer blocks: one round trip), at b through NAME@snapshot
   (local, no round trip), and at a (the owner), for reference. Printed
   with the configured round trip (2 x DELAY) and the measured rtt_ms of
   /v1/status at b. Target: strict p50 at b <= RTT + 1 ms. The count of
   stretch_remote_reads_total at b per fio read checks that every strict
   read went to the owner.

3. WAN efficiency. Bytes shipped by a (stretch_shipped_bytes_total, delta
   across the run, read once the backlog drained) divided by
   (a) the bytes the client wrote and (b) the distinct bytes written:
   - a sequential write of --seq-mib MiB (1 MiB writes, QD8), written once:
     client bytes = distinct bytes. Target: shipped / written <= 1.05;
   - 4 KiB random writes, QD1, --rand-mib MiB in total over a --rand-region
     region: fio's random map writes each block of the region exactly once
     per pass (--loops = rand-mib / rand-region), so distinct bytes = the
     region. Deltas replace overwritten blocks only within one delta
     (delta_interval_ms = 100), so shipped / distinct shows how much of the
     overwriting reaches the WAN while the link keeps up;
   - the same random writes with the a-b link cut for the whole fio run
     and healed after it: b is behind, and a ships what it kept merged
     (each block once per merged record). Target: shipped / distinct <= 1.1.
   Also shown: the seconds the backlog took to drain after fio finished and
   the catch-up rate, shipped bytes / (fio time + drain time), and the drain
   rate, backlog when fio ended / drain time: the WAN replication rate.
   --wan-repeats runs per cluster (the ratios hardly vary).

4. Flush latency by mode. One volume per mode (async, flush-sync, sync);
   4 KiB random writes at QD1 with a FLUSH after each (fio --fsync=1), for
   --runtime seconds: write and flush (fio's "sync" latencies) p50/p99 and
   the mean write+flush cycle (1 / IOPS). Reference row: fio's psync engine
   writing 4 KiB + fdatasync to a file in the work folder (the local
   durability cost). Expectation: async flush ~ local fdatasync; flush-sync
   and sync flush ~ RTT (they wait for site b's journal).

Latency percentiles of reads and writes are exact (nearest rank over fio's
per-I/O completion latency log; fio's own percentiles are ~1.5 % wide
buckets, 0.5 ms at 50 ms); FLUSH percentiles are fio's (it logs no per-I/O
flush latency). Tables 1 and 3 also count UDP datagrams the kernel dropped
because a socket's receive buffer was full during each run (/proc/net/snmp
RcvbufErrors, system-wide): QUIC takes them for congestion.

A default run (--runtime 3 --repeats 3) takes about 4-5 minutes. The script
aborts with a message if fio reports an error or exits non-zero, if a
stretch process exits, or if a backlog does not drain within
--drain-timeout seconds; the clusters get SIGINT (they drain and stop) at
the end or on abort. The work folder (target/stretch-multi-site-*: configs,
stretch logs, data) is removed at the end, kept with --keep or on abort.
Every stretch command of a run (servers and CLI) is a private copy of
target/release/stretch taken at start, so a rebuild during the run cannot
mix two versions; the header shows when that build was made.

Needs: a release build (cargo build --release -p stretch-cli), fio with its
nbd engine, taskset, 2+ CPUs.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT = os.path.join(REPO, "target", "release", "stretch")
# The private copy every command of a run uses (set in main).
STRETCH = BUILT
LOCAL_CONFIG = os.path.join(REPO, "cluster-configs", "local.toml")
# Ports of local.toml: nbd a1, b1; admin a1, b1, w1; peer (UDP) a1, b1, w1.
LOCAL_PORTS = [10809, 10810, 9180, 9181, 9182, 7400, 7401, 7402]
SITES = ["a", "b", "w"]
MIB = 1 << 20
# --ship-window: the tuning.ship_window_bytes_max both clusters run with
# (None: local.toml's); --ship-window-min: their ship_window_bytes_min
# (None: the default, 1M or the maximum if smaller); --bandwidth-mbit: the
# a<->b link's bandwidth in both clusters (None: unlimited).
SHIP_WINDOW = None
SHIP_WINDOW_MIN = None
BANDWIDTH_MBIT = None
# tuning.link_congestion_control of both clusters (None: local.toml's, bbr);
# set by bench/catch-up.py --congestion.
LINK_CONGESTION = None


class BenchError(Exception):
    """A reason to abort the benchmark."""


def die(message):
    raise BenchError(message)


def log(message):
    print(message, file=sys.stderr, flush=True)


def parse_size(text):
    units = {"K": 10, "M": 20, "G": 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(text[:-1]) << units[text[-1]]
    return int(text)


def free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def parse_metrics(text):
    """Prometheus text -> list of (name, labels dict, value)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = {}
        for part in rest.rstrip("}").split(","):
            if "=" in part:
                key, _, quoted = part.partition("=")
                labels[key.strip()] = quoted.strip().strip('"')
        samples.append((name, labels, float(value)))
    return samples


def metric(samples, name, **labels):
    return sum(value for sample, sample_labels, value in samples
               if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()))


def set_line(text, line, replacement):
    """`text` (a copy of cluster-configs/local.toml) with its one `line`
    (newline included) replaced."""
    if text.count(line) != 1:
        die(f"cluster-configs/local.toml no longer has one `{line.strip()}` line; "
            "update bench/multi-site.py")
    return text.replace(line, replacement)


class Cluster:
    """One `stretch up` of local.toml on free ports with a given a<->b delay."""

    def __init__(self, label, delay_ms, workdir, cpu):
        self.label = label
        self.delay_ms = delay_ms
        self.dir = os.path.join(workdir, label)
        self.cpu = cpu
        self.process = None
        self.ports = None
        os.makedirs(self.dir)

    # -- lifecycle -----------------------------------------------------
    def start(self):
        with open(LOCAL_CONFIG) as source:
            shipped = source.read()
        link = f"delay_ms = {self.delay_ms}\n"
        if BANDWIDTH_MBIT is not None:
            link += f"bandwidth_mbit = {BANDWIDTH_MBIT}\n"
        shipped = set_line(shipped, "delay_ms = 25\n", link)
        if SHIP_WINDOW is not None or SHIP_WINDOW_MIN is not None:
            window = f'ship_window_bytes_max = "{SHIP_WINDOW or "32M"}"\n'
            if SHIP_WINDOW_MIN is not None:
                window += f'ship_window_bytes_min = "{SHIP_WINDOW_MIN}"\n'
            shipped = set_line(shipped, 'ship_window_bytes_max = "32M"\n', window)
        if LINK_CONGESTION is not None:
            shipped = set_line(shipped, 'link_congestion_control = "bbr"\n',
                               f'link_congestion_control = "{LINK_CONGESTION}"\n')
        for attempt in range(5):
            self.ports = free_ports(len(LOCAL_PORTS))
            text = shipped
            for old, new in zip(LOCAL_PORTS, self.ports):
                needle = f'127.0.0.1:{old}"'
                if needle not in text:
                    die(f"cluster-configs/local.toml no longer uses port {old}; "
                        "update bench/multi-site.py")
                text = text.replace(needle, f'127.0.0.1:{new}"')
            self.config = os.path.join(self.dir, "cluster.toml")
            with open(self.config, "w") as out:
                out.write(text)
            self.log_path = os.path.join(self.dir, f"stretch-{attempt}.log")
            log_file = open(self.log_path, "w")
            env = dict(os.environ, NO_COLOR="1")
            env.pop("STRETCH_ADMIN", None)
            self.process = subprocess.Popen(
                [STRETCH, "up", self.config, "--data-dir", os.path.join(self.dir, "data")],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            log_file.close()
            if self.wait_ready():
                break
            self.process = None
            log(f"[{self.label}] a port was taken meanwhile; retrying on other ports")
        else:
            die(f"[{self.label}] could not start a cluster on free ports; see {self.log_path}")
        subprocess.run(["taskset", "-a", "-p", "-c", str(self.cpu), str(self.process.pid)],
                       check=True, stdout=subprocess.DEVNULL)
        self.wait_until("sites a and b connected", 30, self.connected)

    def wait_ready(self):
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.process.poll() is not None:
                text = self.log_tail()
                if "cannot listen" in text or "cannot bind" in text:
                    return False
                die(f"[{self.label}] stretch up exited at start "
                    f"(code {self.process.returncode}):\n{text}")
            try:
                for site in SITES:
                    http(self.admin(site) + "/v1/status", timeout=1)
                return True
            except (OSError, urllib.error.URLError):
                time.sleep(0.05)
        die(f"[{self.label}] admin APIs not answering after 30 s:\n{self.log_tail()}")

    def connected(self):
        return all(peer.get("connected") for site in ("a", "b")
                   for peer in self.status(site)["peers"]) and all(
            self.status(site)["peers"] for site in ("a", "b"))

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log(f"[{self.label}] did not stop within 60 s of SIGINT; killing it")
            self.process.kill()
            self.process.wait()

    def check_alive(self):
        if self.process is not None and self.process.poll() is not None:
            die(f"[{self.label}] stretch up exited (code {self.process.returncode}) "
                f"in the middle of the benchmark{self.stop_reason()}; log tail:\n"
                f"{self.log_tail()}")

    def stop_reason(self):
        """Why the process is stopping, if its log says it was told to."""
        if "shutting down" in self.log_tail(400):
            return (" (its log says 'shutting down': it got SIGINT or SIGTERM from "
                    "outside the benchmark)")
        return ""

    def log_tail(self, lines=25):
        try:
            with open(self.log_path, errors="replace") as source:
                return "".join(source.readlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- addresses and APIs ---------------------------------------------
    def admin(self, site):
        return f"http://127.0.0.1:{self.ports[2 + SITES.index(site)]}"

    def nbd(self, site, export):
        return f"nbd://127.0.0.1:{self.ports[SITES.index(site)]}/{export}"

    def status(self, site):
        self.check_alive()
        try:
            return json.loads(http(self.admin(site) + "/v1/status"))
        except (OSError, urllib.error.URLError, ValueError) as error:
            self.check_alive()
            die(f"[{self.label}] /v1/status at {site}: {error}")

    def metrics(self, site):
        self.check_alive()
        try:
            samples = parse_metrics(http(self.admin(site) + "/metrics"))
            # Only this node's samples (every node of `stretch up` has its own).
            return [sample for sample in samples if sample[1].get("site") in (None, site)]
        except (OSError, urllib.error.URLError, ValueError) as error:
            self.check_alive()
            die(f"[{self.label}] /metrics at {site}: {error}")

    def cli(self, site, *args):
        self.check_alive()
        # `stretch up` created the admin token in DATA_DIR/pki.
        token = os.path.join(self.dir, "data", "pki", "admin.token")
        result = subprocess.run([STRETCH, "--admin", self.admin(site), "--token-file", token,
                                 *args], capture_output=True, text=True)
        if result.returncode != 0:
            die(f"[{self.label}] stretch {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def create_volume(self, name, size, mode):
        self.cli("a", "volume", "create", name, "--size", size, "--mode", mode)

        def known_at_b():
            try:
                http(self.admin("b") + f"/v1/volumes/{name}", timeout=1)
                return True
            except (OSError, urllib.error.URLError):
                return False
        self.wait_until(f"volume {name} known at site b", 30, known_at_b)

    def wait_until(self, what, seconds, done, interval=0.05):
        deadline = time.time() + seconds
        while not done():
            self.check_alive()
            if time.time() > deadline:
                die(f"[{self.label}] {what}: not within {seconds} s; log tail:\n{self.log_tail()}")
            time.sleep(interval)

    def quiet(self):
        a = self.status("a")
        return (a["backlog_bytes"] == 0 and a["dirty_bytes"] == 0
                and a["resync_regions_left"] == 0 and a["open_deltas"] == 0
                and self.status("b")["unapplied_deltas"] == 0)

    def wait_quiet(self, timeout):
        """Waits until b applied everything a wrote; returns the seconds taken."""
        started = time.time()
        self.wait_until("backlog drained (site b applied every delta of site a)",
                        timeout, self.quiet, interval=0.05)
        return time.time() - started


class Fio:
    """fio pinned to one CPU, JSON output, every I/O's completion latency logged.

    fio's own percentiles are histogram buckets (about 1.5 % wide: 0.5 ms
    at 50 ms), too coarse to compare a strict read with the round trip, so
    read and write percentiles are computed exactly from the per-I/O
    completion latency log (--write_lat_log, --log_avg_msec=0). fio does not
    log FLUSH latencies: those percentiles are fio's own.
    """

    def __init__(self, workdir, cpu, clusters):
        self.output = os.path.join(workdir, "fio.json")
        self.log_prefix = os.path.join(workdir, "fio-latency")
        self.cpu = cpu
        self.clusters = clusters

    def run(self, label, args, engine_args):
        for cluster in self.clusters:
            cluster.check_alive()
        clat_log = f"{self.log_prefix}_clat.1.log"
        for path in (self.output, clat_log, f"{self.log_prefix}_lat.1.log",
                     f"{self.log_prefix}_slat.1.log"):
            if os.path.exists(path):
                os.remove(path)
        command = ["taskset", "-c", str(self.cpu), "fio", "--name=bench", *engine_args,
                   "--output-format=json", f"--output={self.output}",
                   f"--write_lat_log={self.log_prefix}", "--log_avg_msec=0", *args]
        started = time.time()
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        elapsed = time.time() - started
        for cluster in self.clusters:
            cluster.check_alive()
        try:
            with open(self.output) as source:
                job = json.load(source)["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError):
            job = None
        if result.returncode != 0 or job is None or job.get("error", 0) != 0:
            error = job.get("error") if job else "no JSON output"
            stopping = "".join(f"\n  cluster {cluster.label}: stretch up is stopping"
                               f"{cluster.stop_reason()}" for cluster in self.clusters
                               if cluster.stop_reason())
            die(f"fio failed ({label}): exit code {result.returncode}, job error {error}\n"
                f"  command: {' '.join(command)}\n  stderr: {result.stderr.strip()[-2000:]}"
                f"{stopping}")
        job["_elapsed"] = elapsed
        # Completion latencies in ns by direction (0 read, 1 write).
        job["_clat"] = {0: [], 1: []}
        try:
            with open(clat_log) as source:
                for line in source:
                    fields = line.split(",")
                    if len(fields) >= 3 and int(fields[2]) in job["_clat"]:
                        job["_clat"][int(fields[2])].append(int(fields[1]))
        except OSError:
            pass
        return job

    def nbd(self, label, uri, args):
        return self.run(label, args, ["--ioengine=nbd", f"--uri={uri}"])


def run_guarded(clusters, workdir, keep, measure):
    """Runs `measure()`, then stops `clusters` whatever happened. The work
    folder (configs, stretch logs) is kept when `keep` is set or the run
    failed; a failed or interrupted run exits with status 1."""
    failed = False
    try:
        measure()
    except BenchError as error:
        failed = True
        print(f"\nbench: ABORTED: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        print("\nbench: interrupted", file=sys.stderr)
    finally:
        for cluster in clusters:
            cluster.stop()
        if keep or failed:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        sys.exit(1)


def percentile(values, fraction):
    """Nearest-rank percentile of a sorted list."""
    rank = max(1, -(-len(values) * fraction // 1))
    return values[int(rank) - 1]


def figures(job, side):
    data = job[side]
    latencies = sorted(job["_clat"][0 if side == "read" else 1])
    if len(latencies) < data["total_ios"] * 0.9:
        die(f"fio logged {len(latencies)} latencies for {data['total_ios']} I/Os")
    figure = {
        "iops": data["iops"],
        "ios": data["total_ios"],
        "bytes": data["io_bytes"],
        "p50_us": percentile(latencies, 0.50) / 1e3,
        "p99_us": percentile(latencies, 0.99) / 1e3,
        "mean_us": data["clat_ns"]["mean"] / 1e3,
        "elapsed": job["_elapsed"],
    }
    sync = job.get("sync", {}).get("lat_ns", {})
    if sync.get("N"):
        sync_percentiles = sync.get("percentile", {})
        figure["sync_p50_us"] = sync_percentiles.get("50.000000", 0) / 1e3
        figure["sync_p99_us"] = sync_percentiles.get("99.000000", 0) / 1e3
        figure["sync_n"] = sync["N"]
    return figure


def udp_receive_drops():
    """System-wide UDP datagrams dropped because a socket's receive buffer
    was full (/proc/net/snmp RcvbufErrors): QUIC takes them for loss."""
    try:
        with open("/proc/net/snmp") as source:
            rows = [line.split() for line in source if line.startswith("Udp:")]
        return int(dict(zip(rows[0][1:], rows[1][1:]))["RcvbufErrors"])
    except (OSError, IndexError, KeyError, ValueError):
        return 0


def median(runs, key):
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else float("nan")


def ratio(a, b):
    return a / b if b else float("inf")


def verdict(ok):
    return "**met**" if ok else "**NOT met**"


def order(clusters, repeat):
    """Alternate which cluster runs first, repeat by repeat."""
    return clusters if repeat % 2 == 0 else list(reversed(clusters))


# ---------------------------------------------------------------------------
def owner_writes(args, clusters, fio):
    jobs = [("4K randwrite QD1", 1), ("4K randwrite QD16", 16)]
    results = {}
    for cluster in clusters:
        cluster.create_volume("ow", "1G", "async")
    fio_args = ["--rw=randwrite", "--bs=4k", "--size=1G", f"--runtime={args.runtime}",
                f"--io_size={args.write_cap}", "--randseed=42"]
    for name, depth in jobs:
        for repeat in range(args.repeats):
            for cluster in order(clusters, repeat):
                for other in clusters:
                    other.wait_quiet(args.drain_timeout)
                before = cluster.metrics("a")
                drops = udp_receive_drops()
                job = fio.nbd(f"{name} at a, {cluster.label}", cluster.nbd("a", "ow"),
                              [*fio_args, f"--iodepth={depth}"])
                after = cluster.metrics("a")
                run = figures(job, "write")
                run["backlog_mib"] = metric(after, "stretch_backlog_bytes") / MIB
                run["lag_s"] = metric(after, "stretch_volume_lag_seconds", volume="ow", peer="b")
                run["throttled"] = (
                    metric(after, "stretch_backlog_throttled_writes_total")
                    - metric(before, "stretch_backlog_throttled_writes_total")
                    + metric(after, "stretch_writes_throttled_total")
                    - metric(before, "stretch_writes_throttled_total"))
                run["drain_s"] = cluster.wait_quiet(args.drain_timeout)
                run["udp_drops"] = udp_receive_drops() - drops
                results.setdefault((name, cluster.label), []).append(run)
                log(f"  1. {name:<18} {cluster.label:<6} run {repeat + 1}: "
                    f"{run['iops']:>8.0f} IOPS p50 {run['p50_us']:>7.1f} µs "
                    f"p99 {run['p99_us']:>8.1f} µs, {run['ios']} writes, "
                    f"backlog {run['backlog_mib']:.0f} MiB drained in {run['drain_s']:.1f} s")
    wan, lan = clusters[0].label, clusters[1].label
    print(f"\n### 1. Owner-site 4 KiB random writes at site a, async volume\n")
    print(f"fio {' '.join(fio_args)} --iodepth=1|16 (nbd engine, site a); "
          f"each run ends at --runtime or --write-cap, whichever first; "
          f"median of {args.repeats}.\n")
    print(f"| job | {wan} IOPS | {wan} p50 µs | {wan} p99 µs | {lan} IOPS | {lan} p50 µs "
          f"| {lan} p99 µs | ratio p50 ({wan}/{lan}) | ratio p99 | ratio IOPS "
          f"| {wan} backlog at end MiB | {wan} lag at end s | {wan} drain s "
          f"| throttled writes ({wan}/{lan}) | UDP rcvbuf drops ({wan}/{lan}) "
          f"| target p50 ratio ≤ 1.1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, _ in jobs:
        w, l = results[(name, wan)], results[(name, lan)]
        r50 = ratio(median(w, "p50_us"), median(l, "p50_us"))
        print(f"| {name} | {median(w, 'iops'):.0f} | {median(w, 'p50_us'):.1f} "
              f"| {median(w, 'p99_us'):.1f} | {median(l, 'iops'):.0f} | {median(l, 'p50_us'):.1f} "
              f"| {median(l, 'p99_us'):.1f} | {r50:.2f} "
              f"| {ratio(median(w, 'p99_us'), median(l, 'p99_us')):.2f} "
              f"| {ratio(median(w, 'iops'), median(l, 'iops')):.2f} "
              f"| {median(w, 'backlog_mib'):.0f} | {median(w, 'lag_s'):.2f} "
              f"| {median(w, 'drain_s'):.1f} "
              f"| {sum(r['throttled'] for r in w):.0f}/{sum(r['throttled'] for r in l):.0f} "
              f"| {sum(r['udp_drops'] for r in w)}/{sum(r['udp_drops'] for r in l)} "
              f"| {verdict(r50 <= 1.1)} |")


# ---------------------------------------------------------------------------
def strict_reads(args, clusters, fio):
    region = args.read_region
    for cluster in clusters:
        cluster.create_volume("rr", "1G", "async")
        fio.nbd(f"prefill rr at a, {cluster.label}", cluster.nbd("a", "rr"),
                ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={region}"])
    for cluster in clusters:
        cluster.wait_quiet(args.drain_timeout)
    rtts = {}
    for cluster in clusters:
        rtts[cluster.label] = {
            site: next((peer.get("rtt_ms") for peer in cluster.status(site)["peers"]), None)
            for site in ("a", "b")}
    reads = [("strict at b (rr)", "b", "rr"), ("snapshot at b (rr@snapshot)", "b", "rr@snapshot"),
             ("owner at a (rr)", "a", "rr")]
    fio_args = ["--rw=randread", "--bs=4k", "--iodepth=1", f"--size={region}", "--time_based",
                f"--runtime={args.runtime}", "--randseed=42"]
    results = {}
    for name, site, export in reads:
        for repeat in range(args.repeats):
            for cluster in order(clusters, repeat):
                for other in clusters:
                    other.wait_quiet(args.drain_timeout)
                before = cluster.metrics(site)
                job = fio.nbd(f"{name}, {cluster.label}", cluster.nbd(site, export), fio_args)
                after = cluster.metrics(site)
                run = figures(job, "read")
                remote = (metric(after, "stretch_remote_reads_total")
                          - metric(before, "stretch_remote_reads_total"))
                run["remote_per_read"] = remote / max(run["ios"], 1)
                results.setdefault((name, cluster.label), []).append(run)
                log(f"  2. {name:<27} {cluster.label:<6} run {repeat + 1}: "
                    f"{run['iops']:>8.0f} IOPS p50 {run['p50_us']:>9.1f} µs "
                    f"p99 {run['p99_us']:>9.1f} µs, remote reads/read {run['remote_per_read']:.2f}")
    wan, lan = clusters[0].label, clusters[1].label
    rtt = 2 * args.delay_ms
    print(f"\n### 2. 4 KiB random reads QD1 after replication ({region // MIB} MiB written at a)\n")
    print(f"fio {' '.join(fio_args)} (nbd engine); median of {args.repeats}.")
    for cluster in clusters:
        measured = ", ".join(f"at {site} {value:.2f} ms" if value is not None
                             else f"at {site} none" for site, value in rtts[cluster.label].items())
        print(f"Round trip a<->b, {cluster.label}: configured {2 * cluster.delay_ms} ms; "
              f"measured rtt_ms (/v1/status) {measured}.")
    print()
    print(f"| read | {wan} IOPS | {wan} p50 ms | {wan} p99 ms | {lan} IOPS | {lan} p50 ms "
          f"| {lan} p99 ms | {wan} p50 − RTT {rtt} ms | {wan} p50 − measured rtt_ms at b "
          f"| {wan} − {lan} p50 ms | remote reads per read ({wan}/{lan}) "
          f"| target: strict p50 ≤ RTT + 1 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    measured_b = rtts[wan]["b"]
    for name, *_ in reads:
        w, l = results[(name, wan)], results[(name, lan)]
        wp50, lp50 = median(w, "p50_us") / 1e3, median(l, "p50_us") / 1e3
        strict = name.startswith("strict")
        over_rtt = f"{wp50 - rtt:+.3f}" if strict else "–"
        over_measured = (f"{wp50 - measured_b:+.3f}" if strict and measured_b is not None
                         else "–")
        target = verdict(wp50 <= rtt + 1.0) if strict else "(reference)"
        print(f"| {name} | {median(w, 'iops'):.0f} | {wp50:.3f} | {median(w, 'p99_us') / 1e3:.3f} "
              f"| {median(l, 'iops'):.0f} | {lp50:.3f} | {median(l, 'p99_us') / 1e3:.3f} "
              f"| {over_rtt} | {over_measured} | {wp50 - lp50:+.3f} "
              f"| {median(w, 'remote_per_read'):.2f}/{median(l, 'remote_per_read'):.2f} "
              f"| {target} |")


# ---------------------------------------------------------------------------
# Counters at a the WAN-efficiency runs log the change of, to show what
# was shipped how.
COUNTED = ("stretch_shipped_deltas_total", "stretch_merged_deltas_total",
           "stretch_resync_regions_done_total", "stretch_backlog_folds_total")


def wan_efficiency(args, clusters, fio):
    seq_bytes = args.seq_mib * MIB
    rand_bytes, rand_region = args.rand_mib * MIB, args.rand_region
    if rand_bytes % rand_region:
        die("--rand-mib must be a multiple of --rand-region")
    loops = rand_bytes // rand_region
    workloads = [
        (f"seq write {args.seq_mib} MiB once (1M, QD8)", "seq", seq_bytes, seq_bytes,
         ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={seq_bytes}"]),
        (f"4K randwrite QD1, {args.rand_mib} MiB over {rand_region // MIB} MiB "
         f"({loops} passes)", "rnd", rand_bytes, rand_region,
         ["--rw=randwrite", "--bs=4k", "--iodepth=1", f"--size={rand_region}",
          f"--loops={loops}", "--randrepeat=1", "--norandommap=0", "--randseed=42"]),
        (f"same, with the a–b link cut during fio (b behind, then catching up)", "away",
         rand_bytes, rand_region,
         ["--rw=randwrite", "--bs=4k", "--iodepth=1", f"--size={rand_region}",
          f"--loops={loops}", "--randrepeat=1", "--norandommap=0", "--randseed=42"]),
    ]
    for cluster in clusters:
        cluster.create_volume("seq", "1G", "async")
        cluster.create_volume("rnd", "1G", "async")
        cluster.create_volume("away", "1G", "async")
    results = {}
    for name, volume, written, distinct, fio_args in workloads:
        for repeat in range(args.wan_repeats):
            for cluster in order(clusters, repeat):
                for other in clusters:
                    other.wait_quiet(args.drain_timeout)
                before = metric(cluster.metrics("a"), "stretch_shipped_bytes_total")
                counted = {name: metric(cluster.metrics("a"), name) for name in COUNTED}
                drops = udp_receive_drops()
                if volume == "away":
                    # b misses every delta of the run; a keeps them (the
                    # backlog bound is above what fio writes) and ships
                    # them once the link is back.
                    cluster.cli("a", "link", "cut", "a", "b")
                job = fio.nbd(f"{name}, {cluster.label}", cluster.nbd("a", volume), fio_args)
                fio_seconds = job["_elapsed"]
                backlog = metric(cluster.metrics("a"), "stretch_backlog_bytes")
                if volume == "away":
                    cluster.cli("a", "link", "heal", "a", "b")
                drain = cluster.wait_quiet(args.drain_timeout)
                shipped = metric(cluster.metrics("a"), "stretch_shipped_bytes_total") - before
                after = cluster.metrics("a")
                counts = ", ".join(f"{name.removeprefix('stretch_')} "
                                   f"{metric(after, name) - counted[name]:.0f}"
                                   for name in COUNTED)
                client = job["write"]["io_bytes"]
                if client != written:
                    die(f"fio wrote {client} bytes, expected {written} ({name})")
                run = {"shipped_mib": shipped / MIB, "per_client": shipped / client,
                       "per_distinct": shipped / distinct, "drain_s": drain,
                       "rate": shipped / MIB / (fio_seconds + drain),
                       "backlog_mib": backlog / MIB,
                       "drain_rate": backlog / MIB / drain if drain > 0 else float("nan"),
                       "udp_drops": udp_receive_drops() - drops}
                results.setdefault((name, cluster.label), []).append(run)
                log(f"  3. {name[:34]:<34} {cluster.label:<6} run {repeat + 1}: shipped "
                    f"{run['shipped_mib']:.1f} MiB ({run['per_client']:.3f}x written, "
                    f"{run['per_distinct']:.3f}x distinct), drained in {drain:.1f} s; {counts}")
    wan, lan = clusters[0].label, clusters[1].label
    print(f"\n### 3. WAN efficiency: stretch_shipped_bytes_total at a ÷ bytes written\n")
    print(f"Median of {args.wan_repeats}; shipped read after the backlog drained. "
          f"Catch-up = shipped ÷ (fio wall time + drain time); drain rate = backlog when fio "
          f"ended ÷ time it took to reach 0 (the WAN's replication throughput).\n")
    for name, _, _, _, fio_args in workloads:
        print(f"- {name}: fio {' '.join(fio_args)}")
    print()
    print(f"| workload | written MiB | distinct MiB | {wan} shipped MiB | {wan} shipped ÷ written "
          f"| {wan} shipped ÷ distinct | {lan} shipped MiB | {lan} shipped ÷ written "
          f"| {lan} shipped ÷ distinct | {wan} drain s | {wan} catch-up MiB/s "
          f"| {wan} backlog at fio end MiB | {wan} drain rate MiB/s "
          f"| {lan} drain s | {lan} catch-up MiB/s | UDP rcvbuf drops ({wan}/{lan}) "
          f"| target (seq: shipped ÷ written ≤ 1.05) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, _, written, distinct, _ in workloads:
        w, l = results[(name, wan)], results[(name, lan)]
        if name.startswith("seq"):
            target = verdict(median(w, "per_client") <= 1.05
                             and median(l, "per_client") <= 1.05)
        elif name.startswith("same"):
            target = verdict(median(w, "per_distinct") <= 1.1
                             and median(l, "per_distinct") <= 1.1) + " (÷ distinct ≤ 1.1)"
        else:
            target = "(no target)"
        print(f"| {name} | {written / MIB:.0f} | {distinct / MIB:.0f} "
              f"| {median(w, 'shipped_mib'):.1f} | {median(w, 'per_client'):.3f} "
              f"| {median(w, 'per_distinct'):.3f} | {median(l, 'shipped_mib'):.1f} "
              f"| {median(l, 'per_client'):.3f} | {median(l, 'per_distinct'):.3f} "
              f"| {median(w, 'drain_s'):.1f} | {median(w, 'rate'):.1f} "
              f"| {median(w, 'backlog_mib'):.1f} | {median(w, 'drain_rate'):.1f} "
              f"| {median(l, 'drain_s'):.1f} | {median(l, 'rate'):.1f} "
              f"| {sum(r['udp_drops'] for r in w)}/{sum(r['udp_drops'] for r in l)} | {target} |")


# ---------------------------------------------------------------------------
def flush_latency(args, clusters, fio, workdir):
    modes = ["async", "flush-sync", "sync"]
    for cluster in clusters:
        for mode in modes:
            cluster.create_volume(f"f-{mode}", "1G", mode)
    fio_args = ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1", "--size=64M",
                "--time_based", f"--runtime={args.runtime}", "--randseed=42"]
    reference_file = os.path.join(workdir, "fdatasync-reference.dat")
    reference_args = ["--rw=randwrite", "--bs=4k", "--fdatasync=1", "--size=64M",
                      "--time_based", f"--runtime={args.runtime}", "--randseed=42"]
    results = {}
    for repeat in range(args.repeats):
        for cluster in clusters:
            cluster.wait_quiet(args.drain_timeout)
        job = fio.run("local write + fdatasync", reference_args,
                      ["--ioengine=psync", f"--filename={reference_file}"])
        run = figures(job, "write")
        results.setdefault(("local", None), []).append(run)
        log(f"  4. local write+fdatasync          run {repeat + 1}: "
            f"flush p50 {run.get('sync_p50_us', float('nan')):>9.1f} µs")
        for mode in modes:
            for cluster in order(clusters, repeat):
                for other in clusters:
                    other.wait_quiet(args.drain_timeout)
                before = {site: cluster.metrics(site) for site in ("a", "b")}
                job = fio.nbd(f"{mode} write+flush, {cluster.label}",
                              cluster.nbd("a", f"f-{mode}"), fio_args)
                run = figures(job, "write")
                for site in ("a", "b"):
                    after = cluster.metrics(site)
                    seconds = (metric(after, "stretch_journal_fsync_seconds_sum")
                               - metric(before[site], "stretch_journal_fsync_seconds_sum"))
                    count = (metric(after, "stretch_journal_fsync_seconds_count")
                             - metric(before[site], "stretch_journal_fsync_seconds_count"))
                    run[f"fsync_{site}_ms"] = seconds / count * 1e3 if count else float("nan")
                if "sync_p50_us" not in run:
                    # No separate flush latencies: the write completion stands in.
                    run["sync_p50_us"], run["sync_p99_us"] = run["p50_us"], run["p99_us"]
                    run["flush_from_write"] = True
                results.setdefault((mode, cluster.label), []).append(run)
                log(f"  4. {mode:<10} {cluster.label:<6} run {repeat + 1}: "
                    f"write p50 {run['p50_us']:>9.1f} µs, flush p50 {run['sync_p50_us']:>9.1f} µs, "
                    f"{run['iops']:.1f} cycles/s")
    os.remove(reference_file)
    wan, lan = clusters[0].label, clusters[1].label
    rtt = 2 * args.delay_ms
    local = results[("local", None)]
    local_p50 = median(local, "sync_p50_us") / 1e3
    print(f"\n### 4. Write + FLUSH latency by mode, at site a (owner)\n")
    print(f"fio {' '.join(fio_args)} (nbd engine, a FLUSH after every write); "
          f"median of {args.repeats}. Flush = fio's sync latencies; cycle = 1 ÷ IOPS.")
    print(f"Local reference: fio --ioengine=psync {' '.join(reference_args)} on a file in the "
          f"work folder: write p50 {median(local, 'p50_us') / 1e3:.3f} ms, "
          f"fdatasync p50 {local_p50:.3f} ms, p99 {median(local, 'sync_p99_us') / 1e3:.3f} ms.\n")
    print(f"| mode | {wan} write p50 ms | {wan} write p99 ms | {wan} flush p50 ms "
          f"| {wan} flush p99 ms | {wan} cycle ms | {lan} write p50 ms | {lan} flush p50 ms "
          f"| {lan} flush p99 ms | {lan} cycle ms | {wan} flush p50 ÷ local fdatasync p50 "
          f"| {wan} flush p50 ÷ RTT {rtt} ms | {wan} cycle ÷ RTT "
          f"| {wan} journal fsync mean ms at a / b | {lan} journal fsync mean ms at a / b "
          f"| expectation |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    def fsyncs(runs):
        if "fsync_a_ms" not in runs[0]:
            return "–"
        return f"{median(runs, 'fsync_a_ms'):.3f} / {median(runs, 'fsync_b_ms'):.3f}"
    rows = [("local fdatasync (file)", "local", None)] + [(mode, mode, mode) for mode in modes]
    for title, key, mode in rows:
        if key == "local":
            w = l = local
        else:
            w, l = results[(key, wan)], results[(key, lan)]
        w_cycle = 1e3 / median(w, "iops")
        l_cycle = 1e3 / median(l, "iops")
        w_flush = median(w, "sync_p50_us") / 1e3
        if mode is None:
            expectation = "(reference)"
        elif mode == "async":
            expectation = "flush ≈ local fdatasync"
        else:
            expectation = "flush (sync: write) ≈ RTT"
        if mode is None:
            # One measurement, not per cluster: shown once.
            lan_columns = "| – | – | – | – "
            ratios = "| 1.00 | – | – "
        else:
            lan_columns = (f"| {median(l, 'p50_us') / 1e3:.3f} "
                           f"| {median(l, 'sync_p50_us') / 1e3:.3f} "
                           f"| {median(l, 'sync_p99_us') / 1e3:.3f} | {l_cycle:.3f} ")
            ratios = (f"| {ratio(w_flush, local_p50):.2f} | {ratio(w_flush, rtt):.2f} "
                      f"| {ratio(w_cycle, rtt):.2f} ")
        print(f"| {title} | {median(w, 'p50_us') / 1e3:.3f} | {median(w, 'p99_us') / 1e3:.3f} "
              f"| {w_flush:.3f} | {median(w, 'sync_p99_us') / 1e3:.3f} | {w_cycle:.3f} "
              f"{lan_columns}{ratios}| {fsyncs(w)} | {fsyncs(l)} | {expectation} |")
    if any(run.get("flush_from_write") for runs in results.values() for run in runs):
        print("\n(fio reported no separate flush latencies for some runs: "
              "their flush columns repeat the write completion latency)")


def set_ship_window(window, window_min):
    """Sets the clusters' tuning.ship_window_bytes_max and _min (None: as
    local.toml has them), checked the way stretch checks them, so a bad
    --ship-window or --ship-window-min stops the benchmark before any
    cluster starts."""
    global SHIP_WINDOW, SHIP_WINDOW_MIN
    if window is not None:
        if parse_size(window) < 4096:
            sys.exit("bench: --ship-window must be at least 4K")
        SHIP_WINDOW = window
    if window_min is not None:
        if parse_size(window_min) < 4096:
            sys.exit("bench: --ship-window-min must be at least 4K")
        if parse_size(window_min) > parse_size(SHIP_WINDOW or "32M"):
            sys.exit("bench: --ship-window-min must be at most the window (--ship-window)")
        SHIP_WINDOW_MIN = window_min


# ---------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", type=int, default=3,
                        help="seconds per timed fio run (measurements 1, 2, 4); default 3")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs per job and cluster for measurements 1, 2 and 4 "
                             "(median shown); default 3")
    parser.add_argument("--delay-ms", type=int, default=25,
                        help="one-way a<->b delay of the WAN cluster (the baseline has 0); "
                             "default 25, as in cluster-configs/local.toml")
    parser.add_argument("--write-cap", default="64M",
                        help="measurement 1: most bytes one owner-write run writes (fio "
                             "--io_size), so the WAN backlog stays bounded; default 64M")
    parser.add_argument("--read-region", default="16M",
                        help="measurement 2: region written at a and read at b; default 16M")
    parser.add_argument("--seq-mib", type=int, default=64,
                        help="measurement 3: MiB written sequentially once; default 64")
    parser.add_argument("--rand-mib", type=int, default=64,
                        help="measurement 3: MiB of 4K random writes in total; default 64")
    parser.add_argument("--rand-region", default="16M",
                        help="measurement 3: region the random writes cover (each block once "
                             "per pass); default 16M")
    parser.add_argument("--ship-window", default=None,
                        help="tuning.ship_window_bytes_max for both clusters (e.g. 1M); "
                             "default: local.toml's")
    parser.add_argument("--ship-window-min", default=None,
                        help="tuning.ship_window_bytes_min for both clusters (the window "
                             "before the link is measured, and its least size); equal to "
                             "--ship-window, a fixed window; default: 1M")
    parser.add_argument("--bandwidth-mbit", type=int, default=None,
                        help="a<->b bandwidth limit of both clusters, Mbit/s each way "
                             "(measurement 3 then shows a link that falls behind); "
                             "default: unlimited")
    parser.add_argument("--wan-repeats", type=int, default=1,
                        help="measurement 3: runs per workload and cluster; default 1")
    parser.add_argument("--drain-timeout", type=int, default=180,
                        help="seconds a backlog may take to drain before the benchmark "
                             "aborts; default 180")
    parser.add_argument("--only", default="1,2,3,4",
                        help="comma-separated measurements to run; default 1,2,3,4")
    parser.add_argument("--server-cpu", type=int, default=0,
                        help="CPU both stretch processes are pinned to; default 0")
    parser.add_argument("--fio-cpu", type=int, default=1, help="CPU fio is pinned to; default 1")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (configs, stretch logs) and print its path")
    args = parser.parse_args()
    global BANDWIDTH_MBIT
    set_ship_window(args.ship_window, args.ship_window_min)
    if args.bandwidth_mbit is not None:
        if args.bandwidth_mbit < 1:
            sys.exit("bench: --bandwidth-mbit must be at least 1")
        BANDWIDTH_MBIT = args.bandwidth_mbit
    args.write_cap = parse_size(args.write_cap)
    args.read_region = parse_size(args.read_region)
    args.rand_region = parse_size(args.rand_region)
    only = {int(part) for part in args.only.split(",") if part.strip()}

    for tool, package in (("fio", "fio"), ("taskset", "util-linux")):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found (apt-get install {package})")
    if not os.path.exists(BUILT):
        sys.exit("bench: build first: cargo build --release -p stretch-cli")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs 2 CPUs (stretch and fio on different CPUs)")

    commit = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(BUILT)))
    print(f"    $ {' '.join(['bench/multi-site.py', *sys.argv[1:]])}")
    print(f"    commit {commit} (tree now; target/release/stretch built {built}); ship window {SHIP_WINDOW or 'as in local.toml'}, least {SHIP_WINDOW_MIN or 'default'}; a-b bandwidth {f'{BANDWIDTH_MBIT} Mbit/s' if BANDWIDTH_MBIT else 'unlimited'}; effective: --runtime {args.runtime} --repeats {args.repeats} "
          f"--delay-ms {args.delay_ms} --write-cap {args.write_cap // MIB}M "
          f"--read-region {args.read_region // MIB}M --seq-mib {args.seq_mib} "
          f"--rand-mib {args.rand_mib} --rand-region {args.rand_region // MIB}M "
          f"--wan-repeats {args.wan_repeats}")
    print(f"    clusters: '{args.delay_ms}ms' (a<->b delay_ms = {args.delay_ms}, "
          f"RTT {2 * args.delay_ms} ms) and '0ms' (delay_ms = 0), copies of "
          f"cluster-configs/local.toml on free ports; both `stretch up` on CPU "
          f"{args.server_cpu}, fio on CPU {args.fio_cpu}")

    workdir = tempfile.mkdtemp(prefix="stretch-multi-site-", dir=os.path.join(REPO, "target"))
    # Every command of the run uses one private copy of the build: a rebuild
    # of target/release/stretch meanwhile cannot mix two versions.
    global STRETCH
    STRETCH = os.path.join(workdir, "stretch-under-test")
    shutil.copy2(BUILT, STRETCH)
    clusters = [Cluster(f"{args.delay_ms}ms", args.delay_ms, workdir, args.server_cpu),
                Cluster("0ms", 0, workdir, args.server_cpu)]
    fio = Fio(workdir, args.fio_cpu, clusters)
    started = time.time()
    def measure():
        for cluster in clusters:
            log(f"starting cluster {cluster.label} ...")
            cluster.start()
        if 1 in only:
            owner_writes(args, clusters, fio)
        if 2 in only:
            strict_reads(args, clusters, fio)
        if 3 in only:
            wan_efficiency(args, clusters, fio)
        if 4 in only:
            flush_latency(args, clusters, fio, workdir)
        for cluster in clusters:
            a = cluster.metrics("a")
            b = cluster.metrics("b")
            print(f"\n    {cluster.label}: at a: refused peer messages "
                  f"{metric(a, 'stretch_refused_peer_messages_total'):.0f}, remote timeouts "
                  f"{metric(b, 'stretch_remote_timeouts_total'):.0f} (at b), malformed peer "
                  f"messages {metric(a, 'stretch_peer_malformed_messages_total'):.0f}/"
                  f"{metric(b, 'stretch_peer_malformed_messages_total'):.0f} (a/b)", end="")
        print(f"\n\n    total {time.time() - started:.0f} s")
    run_guarded(clusters, workdir, args.keep, measure)


if __name__ == "__main__":
    main()
