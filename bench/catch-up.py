#!/usr/bin/env python3
"""Catch-up at the speed of the link: replication after a cut against the link's limit.

The limit: `link_bulk` (crates/transport/examples/link_bulk.rs) sends bytes
over one QUIC stream between two endpoints built exactly as the nodes build
theirs (mutual TLS, transport windows, socket buffers) through the same link
shaper, both in one process pinned to the CPU stretch gets: the most a link
between two nodes carries on this machine.

Against it, two clusters side by side (copies of cluster-configs/local.toml
on free ports, `stretch up` pinned to CPU 0, fio to CPU 1, the a<->b link at
--delay-ms and at 0 ms), each run, per repeat:

- drain: the a-b link is cut and the cut noticed (a shows b disconnected),
  fio writes --drain-mib MiB at a (1 MiB sequential writes, QD8, fresh
  random bytes per write: nothing compresses), all of it kept as deltas
  (under the 256 MiB backlog bound); the link is healed and, from the
  moment a and b are connected again, the time until b applied every delta;
- resync: the same with --resync-mib MiB, past the backlog bound, so a folds
  what b lacks into regions and b is resynced by region (1 MiB chunks).

Rate = MiB written ÷ seconds from reconnection to b holding everything;
ratio = rate ÷ the bulk limit at the same delay. Target: ≥ 0.8 for both at
both delays. Medians of --repeats.

    /usr/bin/python3 bench/catch-up.py                       # after cargo build --release
    /usr/bin/python3 bench/catch-up.py --congestion cubic    # quinn's loss-based default, for comparison
"""

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("multi_site", os.path.join(HERE, "multi-site.py"))
multi_site = importlib.util.module_from_spec(spec)
spec.loader.exec_module(multi_site)

REPO = multi_site.REPO
MIB = multi_site.MIB
BULK = os.path.join(REPO, "target", "release", "examples", "link_bulk")


def log(message):
    multi_site.log(message)


def bulk_rate(delay_ms, mib, cpu, congestion):
    """MiB/s of one link_bulk run."""
    result = subprocess.run(["taskset", "-c", str(cpu), BULK, "--delay-ms", str(delay_ms),
                             "--mib", str(mib), "--congestion", congestion],
                            capture_output=True, text=True)
    if result.returncode != 0:
        multi_site.die(f"link_bulk failed: {result.stderr.strip()}")
    # "link_bulk: ... : 1.702 s, 150.4 MiB/s"
    return float(result.stdout.strip().split(",")[-1].split()[0])


def catch_up(cluster, fio, volume, mib, timeout):
    """Seconds from reconnection until b holds all `mib` MiB written during a cut."""
    cluster.wait_quiet(timeout)
    cluster.cli("a", "link", "cut", "a", "b")
    # Written while a knows b is away, so nothing is in flight on the dead link.
    cluster.wait_until("a notices the cut", 30,
                       lambda: not cluster.connected(), interval=0.1)
    folds_before = multi_site.metric(cluster.metrics("a"), "stretch_backlog_folds_total")
    fio.nbd(f"{mib} MiB at a, {cluster.label}", cluster.nbd("a", volume),
            ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={mib * MIB}",
             "--refill_buffers=1", "--randrepeat=0"])
    backlog = multi_site.metric(cluster.metrics("a"), "stretch_backlog_bytes")
    folded = multi_site.metric(cluster.metrics("a"), "stretch_backlog_folds_total") > folds_before
    cluster.cli("a", "link", "heal", "a", "b")
    cluster.wait_until("a and b connected again", 60, cluster.connected, interval=0.01)
    seconds = cluster.wait_quiet(timeout)
    return {"seconds": seconds, "rate": mib / seconds, "backlog_mib": backlog / MIB,
            "folded": folded}


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=int, default=25,
                        help="one-way a<->b delay of the WAN cluster (the baseline has 0); "
                             "default 25")
    parser.add_argument("--drain-mib", type=int, default=192,
                        help="MiB written during the cut for the drain row (under the 256M "
                             "backlog bound); default 192")
    parser.add_argument("--resync-mib", type=int, default=384,
                        help="MiB written during the cut for the resync row (past the "
                             "backlog bound); default 384")
    parser.add_argument("--bulk-mib", type=int, default=256,
                        help="MiB link_bulk sends per run; default 256")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each measurement (median shown); default 3")
    parser.add_argument("--timeout", type=int, default=300,
                        help="seconds a catch-up may take before the benchmark aborts; "
                             "default 300")
    parser.add_argument("--ship-window", default=None,
                        help="tuning.ship_window_bytes_max of both clusters; default 32M")
    parser.add_argument("--ship-window-min", default=None,
                        help="tuning.ship_window_bytes_min of both clusters (equal to the "
                             "maximum: a fixed window); default 1M")
    parser.add_argument("--congestion", choices=["bbr", "cubic"], default="bbr",
                        help="congestion control of the clusters' links and of link_bulk "
                             "(tuning.link_congestion_control); default bbr")
    parser.add_argument("--binary", default=None,
                        help="the stretch binary to measure (another build, side by side "
                             "with this one); default target/release/stretch")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--fio-cpu", type=int, default=1)
    args = parser.parse_args()
    if args.drain_mib < 1 or args.drain_mib >= 256:
        sys.exit("bench: --drain-mib must be 1 to 255 (the backlog bound is 256M)")
    if args.resync_mib <= 256 or args.resync_mib > 1000:
        sys.exit("bench: --resync-mib must be 257 to 1000 (past the backlog bound, "
                 "within the 1G volume)")
    for tool, package in (("fio", "fio"), ("taskset", "util-linux")):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found (apt-get install {package})")
    for built, how in ((multi_site.BUILT, "cargo build --release -p stretch-cli"),
                       (BULK, "cargo build --release -p stretch-transport --example link_bulk")):
        if not os.path.exists(built):
            sys.exit(f"bench: build first: {how}")

    multi_site.set_ship_window(args.ship_window, args.ship_window_min)
    multi_site.LINK_CONGESTION = args.congestion
    commit = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    print(f"    $ {' '.join(['bench/catch-up.py', *sys.argv[1:]])}")
    print(f"    commit {commit}; --delay-ms {args.delay_ms} --drain-mib {args.drain_mib} "
          f"--resync-mib {args.resync_mib} --bulk-mib {args.bulk_mib} --repeats {args.repeats} "
          f"--ship-window {args.ship_window or '32M'} "
          f"--ship-window-min {args.ship_window_min or '1M'} --congestion {args.congestion} "
          f"--binary {args.binary or 'target/release/stretch'}")

    workdir = tempfile.mkdtemp(prefix="stretch-catch-up-", dir=os.path.join(REPO, "target"))
    multi_site.STRETCH = os.path.join(workdir, "stretch-under-test")
    shutil.copy2(args.binary or multi_site.BUILT, multi_site.STRETCH)
    delays = [args.delay_ms, 0]
    clusters = [multi_site.Cluster(f"{delay}ms", delay, workdir, args.server_cpu)
                for delay in delays]
    fio = multi_site.Fio(workdir, args.fio_cpu, clusters)
    started = time.time()
    results = {}
    def measure():
        for delay in delays:
            for repeat in range(args.repeats):
                rate = bulk_rate(delay, args.bulk_mib, args.server_cpu, args.congestion)
                results.setdefault(("bulk", delay), []).append(rate)
                log(f"  link_bulk {delay} ms run {repeat + 1}: {rate:.1f} MiB/s")
        for cluster in clusters:
            log(f"starting cluster {cluster.label} ...")
            cluster.start()
            cluster.create_volume("drain", "1G", "async")
            cluster.create_volume("resync", "1G", "async")
        for repeat in range(args.repeats):
            for cluster, delay in zip(clusters, delays):
                for row, volume, mib in (("drain", "drain", args.drain_mib),
                                         ("resync", "resync", args.resync_mib)):
                    run = catch_up(cluster, fio, volume, mib, args.timeout)
                    expected_fold = row == "resync"
                    if run["folded"] != expected_fold:
                        multi_site.die(f"{row} at {cluster.label}: the backlog "
                                       f"{'did not fold' if expected_fold else 'folded'} "
                                       f"(backlog {run['backlog_mib']:.0f} MiB at the end of "
                                       f"fio); the row would measure the other path")
                    results.setdefault((row, delay), []).append(run["rate"])
                    log(f"  {row} {cluster.label} run {repeat + 1}: {mib} MiB in "
                        f"{run['seconds']:.2f} s after reconnecting, {run['rate']:.1f} MiB/s "
                        f"(backlog at fio end {run['backlog_mib']:.0f} MiB)")
        print("\n| a–b delay (one way) | QUIC bulk limit MiB/s | drain MiB/s | drain ÷ limit "
              "| resync MiB/s | resync ÷ limit | target |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for delay in delays:
            limit = median(results[("bulk", delay)])
            drain = median(results[("drain", delay)])
            resync = median(results[("resync", delay)])
            met = drain / limit >= 0.8 and resync / limit >= 0.8
            print(f"| {delay} ms | {limit:.1f} | {drain:.1f} | {drain / limit:.2f} "
                  f"| {resync:.1f} | {resync / limit:.2f} "
                  f"| {'met' if met else '**NOT met**'} (both ≥ 0.8) |")
        print(f"\n    total {time.time() - started:.0f} s")
    multi_site.run_guarded(clusters, workdir, False, measure)


if __name__ == "__main__":
    main()
