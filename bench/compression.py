#!/usr/bin/env python3
"""Benchmark block compression on the link: LZ4 against raw, side by side.

Two clusters run side by side, each a copy of cluster-configs/local.toml on
free ports (the `stretch up` of bench/multi-site.py, whose Cluster and Fio
this script uses): both with the a<->b link at --delay-ms one way and
--bandwidth-mbit, one with `link_compression = "lz4"` (the default) and one
with `link_compression = "off"`. Both processes are pinned to one CPU and fio
to the other; runs alternate between the clusters (the order flips each
repeat) and the table shows medians. Before every run both clusters are
quiet (site b applied every delta of site a).

Workloads, each a sequential fio write of --mib MiB (1 MiB writes, QD8) on
its own async volume owned by a, buffers refilled for every write:
- compressible: fio's --buffer_compress_percentage=75 (three quarters of
  each 4 KiB repeat, the rest random: an operating system's or a database's
  files compress about that well);
- half compressible: --buffer_compress_percentage=50 (no compressor can
  take such a block below half);
- incompressible: random buffers (encrypted or already compressed guest
  data).

Per run, from site a's metrics across the run: block bytes sent to b
(stretch_link_block_bytes_total{peer="b"}) and what they took on the link
(stretch_link_sent_block_bytes_total{peer="b"}); fio's write throughput at
a (the owner acknowledges locally: compression must not slow it); and the
time from the end of fio until b applied everything (the backlog drain: the
lag an operator sees, RPO). Targets: compressible sent ÷ blocks <= 0.5;
incompressible drain lz4 ÷ off <= 1.05 (no loss of replication
throughput). The owner's write throughput is shown for reference: a run
of 128 MiB at a few hundred MiB/s lasts well under a second, so it is
noisy.

Needs a release build (cargo build --release -p stretch-cli), fio with its
nbd engine, taskset and two CPUs. A default run takes about 4 minutes.
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
_spec = importlib.util.spec_from_file_location("multi_site", os.path.join(HERE, "multi-site.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

MIB = bench.MIB
# The shipped local.toml (bench.LOCAL_CONFIG is pointed at each copy in turn).
SHIPPED_CONFIG = bench.LOCAL_CONFIG


def cluster_config(workdir, label, delay_ms, bandwidth_mbit, compression):
    """A copy of local.toml with the link shaped and compression set."""
    with open(SHIPPED_CONFIG) as source:
        text = source.read()
    for needle in ("delay_ms = 25\n", 'link_compression = "lz4"\n'):
        if text.count(needle) != 1:
            bench.die(f"cluster-configs/local.toml no longer has one `{needle.strip()}` line; "
                      "update bench/compression.py")
    if bandwidth_mbit:
        text = text.replace("delay_ms = 25\n",
                            f"delay_ms = 25\nbandwidth_mbit = {bandwidth_mbit}\n")
    text = text.replace('link_compression = "lz4"\n', f'link_compression = "{compression}"\n')
    path = os.path.join(workdir, f"local-{label}.toml")
    with open(path, "w") as out:
        out.write(text)
    # Cluster.start replaces the delay and the ports of this file.
    return path


def start(cluster, config):
    bench.LOCAL_CONFIG = config
    cluster.start()


def link_bytes(cluster):
    samples = cluster.metrics("a")
    return (bench.metric(samples, "stretch_link_block_bytes_total", peer="b"),
            bench.metric(samples, "stretch_link_sent_block_bytes_total", peer="b"))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=128, help="MiB each run writes; default 128")
    parser.add_argument("--repeats", type=int, default=5, help="runs per cluster; default 5")
    parser.add_argument("--delay-ms", type=int, default=25, help="one-way delay; default 25")
    parser.add_argument("--bandwidth-mbit", type=int, default=200,
                        help="a<->b bandwidth, each way; 0: unlimited (the CPU bounds the "
                             "drain); default 200")
    parser.add_argument("--drain-timeout", type=int, default=300)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--fio-cpu", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    for tool, package in (("fio", "fio"), ("taskset", "util-linux")):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found (apt-get install {package})")
    if not os.path.exists(bench.BUILT):
        sys.exit("bench: build first: cargo build --release -p stretch-cli")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs 2 CPUs (stretch and fio on different CPUs)")

    commit = subprocess.run(["git", "-C", bench.REPO, "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    print(f"    $ {' '.join(['bench/compression.py', *sys.argv[1:]])}")
    print(f"    commit {commit}; --mib {args.mib} --repeats {args.repeats} --delay-ms "
          f"{args.delay_ms} --bandwidth-mbit {args.bandwidth_mbit}; both `stretch up` on CPU "
          f"{args.server_cpu}, fio on CPU {args.fio_cpu}")

    workdir = tempfile.mkdtemp(prefix="stretch-compression-",
                               dir=os.path.join(bench.REPO, "target"))
    bench.STRETCH = os.path.join(workdir, "stretch-under-test")
    shutil.copy2(bench.BUILT, bench.STRETCH)
    clusters = [bench.Cluster("lz4", args.delay_ms, workdir, args.server_cpu),
                bench.Cluster("off", args.delay_ms, workdir, args.server_cpu)]
    fio = bench.Fio(workdir, args.fio_cpu, clusters)
    size = args.mib * MIB
    workloads = [
        ("compressible (fio buffer_compress_percentage=75)", "text",
         ["--buffer_compress_percentage=75", "--buffer_compress_chunk=4k", "--refill_buffers"]),
        ("half compressible (buffer_compress_percentage=50)", "half",
         ["--buffer_compress_percentage=50", "--buffer_compress_chunk=4k", "--refill_buffers"]),
        ("incompressible (random buffers)", "noise", ["--refill_buffers"]),
    ]
    results = {}
    def measure():
        for cluster in clusters:
            bench.log(f"starting cluster {cluster.label} ...")
            config = cluster_config(workdir, cluster.label, args.delay_ms,
                                    args.bandwidth_mbit, cluster.label)
            start(cluster, config)
            for _, volume, _ in workloads:
                cluster.create_volume(volume, f"{2 * args.mib}M", "async")
        for name, volume, data_args in workloads:
            for repeat in range(args.repeats):
                for cluster in bench.order(clusters, repeat):
                    for other in clusters:
                        other.wait_quiet(args.drain_timeout)
                    blocks_before, sent_before = link_bytes(cluster)
                    job = fio.nbd(f"{name}, {cluster.label}", cluster.nbd("a", volume),
                                  ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}",
                                   *data_args])
                    drain = cluster.wait_quiet(args.drain_timeout)
                    blocks_after, sent_after = link_bytes(cluster)
                    blocks, sent = blocks_after - blocks_before, sent_after - sent_before
                    run = {"blocks_mib": blocks / MIB, "sent_mib": sent / MIB,
                           "ratio": sent / blocks if blocks else float("nan"),
                           "write_mibs": job["write"]["bw_bytes"] / MIB,
                           "fio_s": job["_elapsed"], "drain_s": drain}
                    results.setdefault((volume, cluster.label), []).append(run)
                    bench.log(f"  {name[:30]:<30} {cluster.label:<4} run {repeat + 1}: "
                              f"{run['sent_mib']:.1f} of {run['blocks_mib']:.1f} MiB on the "
                              f"link ({run['ratio']:.3f}), fio {run['write_mibs']:.1f} MiB/s, "
                              f"drained {drain:.1f} s after fio")
        bandwidth = f"{args.bandwidth_mbit} Mbit/s" if args.bandwidth_mbit else "unlimited"
        print(f"\n### Block compression on a {args.delay_ms} ms, {bandwidth} link: "
              f"LZ4 against raw\n")
        print(f"Median of {args.repeats}; each run writes {args.mib} MiB sequentially at a "
              f"(fio nbd, 1M, QD8). Sent ÷ blocks: bytes on the link for the blocks sent to b. "
              f"Drain: seconds from the end of fio until b applied every delta.\n")
        print("| workload | lz4 sent ÷ blocks | off sent ÷ blocks | lz4 drain s | off drain s "
              "| drain lz4 ÷ off | lz4 write MiB/s | off write MiB/s | write lz4 ÷ off | target |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for name, volume, _ in workloads:
            lz4, off = results[(volume, "lz4")], results[(volume, "off")]
            write_ratio = bench.ratio(bench.median(lz4, "write_mibs"),
                                      bench.median(off, "write_mibs"))
            drain_ratio = bench.ratio(bench.median(lz4, "drain_s"), bench.median(off, "drain_s"))
            if volume == "text":
                target = f"sent ÷ blocks ≤ 0.5: {bench.verdict(bench.median(lz4, 'ratio') <= 0.5)}"
            elif volume == "half":
                target = "(none: half of each block is random, so ≥ 0.5)"
            else:
                target = f"drain lz4 ÷ off ≤ 1.05: {bench.verdict(drain_ratio <= 1.05)}"
            print(f"| {name} | {bench.median(lz4, 'ratio'):.3f} | {bench.median(off, 'ratio'):.3f} "
                  f"| {bench.median(lz4, 'drain_s'):.1f} | {bench.median(off, 'drain_s'):.1f} "
                  f"| {drain_ratio:.2f} | {bench.median(lz4, 'write_mibs'):.0f} "
                  f"| {bench.median(off, 'write_mibs'):.0f} | {write_ratio:.2f} | {target} |")
    bench.run_guarded(clusters, workdir, args.keep, measure)


if __name__ == "__main__":
    main()
