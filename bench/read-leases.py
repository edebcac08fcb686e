#!/usr/bin/env python3
"""Benchmark read leases: strict reads at the site that does not own a volume.

Two clusters run side by side, each a copy of cluster-configs/local.toml on
free ports (the `stretch up` of bench/multi-site.py, whose Cluster and Fio
this script uses), both with the a<->b link at --delay-ms one way: 'leases'
as shipped (tuning.read_lease_ms = 2000) and 'off' (read_lease_ms = 0, every
strict read at b asks the owner). Both processes are pinned to one CPU,
fio and the clients to the other. Every volume is owned by a.

1. e2fsck: an ext4 file system (mkfs.ext4 -d of --files files of up to
   --file-bytes-max bytes) is copied to a 1 GiB volume at a (nbdcopy); once b applied it,
   `e2fsck -fn` runs through nbdfuse (read-only) on a's export, twice, then
   on b's strict export, twice. Shown: each check's time, and the second
   check at b against the second at a (target with leases <= 1.5).
2. 4 KiB random reads QD1 (fio, --runtime s, over --read-region written at
   a) at b's strict export after a warm-up pass there, and at a: p50 at b
   against p50 at a (target with leases <= 2).
3. Owner 4 KiB random writes QD1 at a on a volume b does not read (no
   region leased): p50 with leases against without (target <= 1.1).
4. The first write to a leased region: b reads one block of each of
   --regions 1 MiB regions twice (the second read must be served at b, under
   a lease), then a writes 4 KiB into each region twice, timed one by one
   with libnbd (QD1). Shown: p50 of the first writes (each waits for its
   lease to be revoked: one round trip) and of the second (the region is
   not leased again while a writes it), against the same in 'off'.

Runs alternate between the clusters (the order flips each repeat); tables
show medians of --repeats runs. Needs a release build (cargo build
--release -p stretch-cli), fio with its nbd engine, nbdcopy, nbdfuse,
mkfs.ext4 and e2fsck, the python3 libnbd bindings (Debian python3-libnbd;
run with /usr/bin/python3), taskset and two CPUs. A default run takes about
5 minutes.
"""

import argparse
import importlib.util
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("multi_site", os.path.join(HERE, "multi-site.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

MIB = bench.MIB
SHIPPED_CONFIG = bench.LOCAL_CONFIG
LEASE_LINE = "read_lease_ms = 2000\n"


def cluster_config(workdir, label, read_lease_ms):
    """A copy of local.toml with read_lease_ms set."""
    with open(SHIPPED_CONFIG) as source:
        text = source.read()
    if text.count(LEASE_LINE) != 1:
        bench.die(f"cluster-configs/local.toml no longer has one `{LEASE_LINE.strip()}` line; "
                  "update bench/read-leases.py")
    text = text.replace(LEASE_LINE, f"read_lease_ms = {read_lease_ms}\n")
    path = os.path.join(workdir, f"local-{label}.toml")
    with open(path, "w") as out:
        out.write(text)
    return path


def strict_reads(cluster, volume):
    """(served at b under a lease, asked the owner) so far, for `volume`."""
    samples = cluster.metrics("b")
    return (bench.metric(samples, "stretch_volume_strict_reads_total", volume=volume,
                         served="local"),
            bench.metric(samples, "stretch_volume_strict_reads_total", volume=volume,
                         served="owner"))


class Fuse:
    """An export mounted read-only as a file with nbdfuse."""

    def __init__(self, uri, mountpoint, cpu):
        os.makedirs(mountpoint, exist_ok=True)
        self.mountpoint = mountpoint
        self.process = subprocess.Popen(["taskset", "-c", str(cpu), "nbdfuse", "-r",
                                         mountpoint, uri])
        deadline = time.time() + 20
        while not os.path.exists(self.file()):
            if time.time() > deadline or self.process.poll() is not None:
                self.close()
                bench.die(f"nbdfuse could not mount {uri}")
            time.sleep(0.05)

    def file(self):
        return os.path.join(self.mountpoint, "nbd")

    def close(self):
        subprocess.run(["umount", self.mountpoint], stderr=subprocess.DEVNULL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def e2fsck_seconds(path, cpu):
    started = time.perf_counter()
    result = subprocess.run(["taskset", "-c", str(cpu), "e2fsck", "-fn", path],
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        bench.die(f"e2fsck -fn {path} exited {result.returncode}: {result.stdout[-2000:]}"
                  f"{result.stderr[-2000:]}")
    return elapsed


def file_system(args, clusters, workdir):
    tree = os.path.join(workdir, "tree")
    os.makedirs(tree)
    rng = random.Random(7)
    for index in range(args.files):
        with open(os.path.join(tree, f"file-{index}"), "wb") as out:
            out.write(rng.randbytes(rng.randint(1, args.file_bytes_max)))
    image = os.path.join(workdir, "fs.img")
    with open(image, "wb") as out:
        out.truncate(1 << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, image], check=True)
    for cluster in clusters:
        cluster.create_volume("fs", "1G", "async")
        subprocess.run(["nbdcopy", image, cluster.nbd("a", "fs")], check=True)
    for cluster in clusters:
        cluster.wait_quiet(args.drain_timeout)
    results = {}
    for cluster in clusters:
        for site in ("a", "b"):
            mount = Fuse(cluster.nbd(site, "fs"),
                         os.path.join(workdir, f"mnt-{cluster.label}-{site}"), args.fio_cpu)
            try:
                before = strict_reads(cluster, "fs")
                first = e2fsck_seconds(mount.file(), args.fio_cpu)
                middle = strict_reads(cluster, "fs")
                second = e2fsck_seconds(mount.file(), args.fio_cpu)
                after = strict_reads(cluster, "fs")
            finally:
                mount.close()
            results[(cluster.label, site)] = (first, second, middle[1] - before[1],
                                              after[1] - middle[1], after[0] - middle[0])
            bench.log(f"  1. e2fsck at {site}, {cluster.label}: {first:.2f} s then "
                      f"{second:.2f} s; owner asked {middle[1] - before[1]:.0f} then "
                      f"{after[1] - middle[1]:.0f} times")
    print(f"\n### 1. e2fsck -fn through nbdfuse ({args.files} files on ext4, 1 GiB volume "
          f"owned by a)\n")
    print("| cluster | at a: 1st s | at a: 2nd s | at b: 1st s | at b: 2nd s | b 2nd ÷ a 2nd "
          "| strict reads b asked a (1st / 2nd) | b 2nd served locally | target ≤ 1.5 |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---|")
    for cluster in clusters:
        a, b = results[(cluster.label, "a")], results[(cluster.label, "b")]
        ratio = bench.ratio(b[1], a[1])
        target = bench.verdict(ratio <= 1.5) if cluster.label == "leases" else "(baseline)"
        print(f"| {cluster.label} | {a[0]:.2f} | {a[1]:.2f} | {b[0]:.2f} | {b[1]:.2f} "
              f"| {ratio:.2f} | {b[2]:.0f} / {b[3]:.0f} | {b[4]:.0f} | {target} |")


def random_reads(args, clusters, fio):
    region = args.read_region
    for cluster in clusters:
        cluster.create_volume("rr", "1G", "async")
        fio.nbd(f"prefill rr, {cluster.label}", cluster.nbd("a", "rr"),
                ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={region}"])
    for cluster in clusters:
        cluster.wait_quiet(args.drain_timeout)
    base = ["--rw=randread", "--bs=4k", "--iodepth=1", f"--size={region}", "--time_based",
            "--randseed=42"]
    for cluster in clusters:
        fio.nbd(f"warm-up at b, {cluster.label}", cluster.nbd("b", "rr"),
                base + ["--runtime=2"])
    results = {}
    for repeat in range(args.repeats):
        for cluster in bench.order(clusters, repeat):
            for site in ("b", "a"):
                before = strict_reads(cluster, "rr")
                job = fio.nbd(f"reads at {site}, {cluster.label}", cluster.nbd(site, "rr"),
                              base + [f"--runtime={args.runtime}"])
                after = strict_reads(cluster, "rr")
                run = bench.figures(job, "read")
                run["asked"] = (after[1] - before[1]) / max(run["ios"], 1)
                results.setdefault((cluster.label, site), []).append(run)
                bench.log(f"  2. reads at {site}, {cluster.label} run {repeat + 1}: "
                          f"p50 {run['p50_us']:.1f} µs, asked the owner per read "
                          f"{run['asked']:.3f}")
    print(f"\n### 2. 4 KiB random reads QD1 over {region // MIB} MiB written at a "
          f"(fio, {args.runtime} s, median of {args.repeats})\n")
    print("| cluster | at b p50 ms | at b p99 ms | at a p50 ms | b p50 ÷ a p50 "
          "| b asked the owner per read | target ≤ 2 |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for cluster in clusters:
        b, a = results[(cluster.label, "b")], results[(cluster.label, "a")]
        ratio = bench.ratio(bench.median(b, "p50_us"), bench.median(a, "p50_us"))
        target = bench.verdict(ratio <= 2.0) if cluster.label == "leases" else "(baseline)"
        print(f"| {cluster.label} | {bench.median(b, 'p50_us') / 1e3:.3f} "
              f"| {bench.median(b, 'p99_us') / 1e3:.3f} | {bench.median(a, 'p50_us') / 1e3:.3f} "
              f"| {ratio:.2f} | {bench.median(b, 'asked'):.3f} | {target} |")


def owner_writes(args, clusters, fio):
    for cluster in clusters:
        cluster.create_volume("rw", "1G", "async")
    job_args = ["--rw=randwrite", "--bs=4k", "--iodepth=1", f"--size={args.read_region}",
                "--time_based", f"--runtime={args.runtime}", "--randseed=43"]
    results = {}
    for repeat in range(args.repeats):
        for cluster in bench.order(clusters, repeat):
            for other in clusters:
                other.wait_quiet(args.drain_timeout)
            job = fio.nbd(f"owner writes, {cluster.label}", cluster.nbd("a", "rw"), job_args)
            run = bench.figures(job, "write")
            results.setdefault(cluster.label, []).append(run)
            bench.log(f"  3. owner writes, {cluster.label} run {repeat + 1}: "
                      f"p50 {run['p50_us']:.1f} µs")
    leases, off = results["leases"], results["off"]
    ratio = bench.ratio(bench.median(leases, "p50_us"), bench.median(off, "p50_us"))
    print(f"\n### 3. Owner 4 KiB random writes QD1 on regions no site leases "
          f"(fio, {args.runtime} s, median of {args.repeats})\n")
    print("| leases p50 µs | off p50 µs | leases ÷ off | leases p99 µs | off p99 µs "
          "| target ≤ 1.1 |")
    print("|---:|---:|---:|---:|---:|---|")
    print(f"| {bench.median(leases, 'p50_us'):.1f} | {bench.median(off, 'p50_us'):.1f} "
          f"| {ratio:.2f} | {bench.median(leases, 'p99_us'):.1f} "
          f"| {bench.median(off, 'p99_us'):.1f} | {bench.verdict(ratio <= 1.1)} |")


def first_writes(args, clusters):
    import nbd  # Debian python3-libnbd
    regions = args.regions
    block = b"\x5a" * 4096
    results = {}
    for cluster in clusters:
        cluster.create_volume("lw", f"{regions}M", "async")
        writer = nbd.NBD()
        writer.connect_uri(cluster.nbd("a", "lw"))
        for region in range(regions):
            writer.pwrite(block, region * MIB)
        cluster.wait_quiet(args.drain_timeout)
        reader = nbd.NBD()
        reader.connect_uri(cluster.nbd("b", "lw"))
        before = strict_reads(cluster, "lw")
        for region in range(regions):
            reader.pread(4096, region * MIB + 8192)
            reader.pread(4096, region * MIB + 8192)
        after = strict_reads(cluster, "lw")
        first, second = [], []
        for region in range(regions):
            for timings in (first, second):
                started = time.perf_counter()
                writer.pwrite(block, region * MIB + 4096)
                timings.append((time.perf_counter() - started) * 1e3)
        reader.shutdown()
        writer.shutdown()
        results[cluster.label] = (first, second, after[0] - before[0], after[1] - before[1])
        bench.log(f"  4. {cluster.label}: b served {after[0] - before[0]:.0f} reads locally, "
                  f"asked the owner {after[1] - before[1]:.0f} times; first writes p50 "
                  f"{statistics.median(first):.2f} ms, second {statistics.median(second):.2f} ms")
    print(f"\n### 4. The first write to a leased region ({regions} regions read twice at b, "
          f"then written twice at a; libnbd, QD1)\n")
    print("| cluster | reads at b served locally / asked a | first write p50 ms "
          "| first write max ms | second write p50 ms | RTT ms |")
    print("|---|---|---:|---:|---:|---:|")
    for cluster in clusters:
        first, second, local, asked = results[cluster.label]
        print(f"| {cluster.label} | {local:.0f} / {asked:.0f} | {statistics.median(first):.2f} "
              f"| {max(first):.2f} | {statistics.median(second):.2f} | {2 * args.delay_ms} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=int, default=25,
                        help="one-way a<->b delay of both clusters; default 25")
    parser.add_argument("--runtime", type=int, default=3,
                        help="seconds per timed fio run (2, 3); default 3")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs per cluster (2, 3); default 3")
    parser.add_argument("--files", type=int, default=20000,
                        help="files in the ext4 file system of 1; default 20000")
    parser.add_argument("--file-bytes-max", type=int, default=8192,
                        help="largest file of 1, in bytes (sizes drawn uniformly from 1); "
                             "default 8192")
    parser.add_argument("--read-region", default="16M",
                        help="bytes read at random by 2 and written by 3; default 16M")
    parser.add_argument("--regions", type=int, default=32,
                        help="leased regions written by 4; default 32")
    parser.add_argument("--drain-timeout", type=int, default=180,
                        help="seconds a backlog may take to drain; default 180")
    parser.add_argument("--only", default="1,2,3,4",
                        help="comma-separated measurements to run; default 1,2,3,4")
    parser.add_argument("--server-cpu", type=int, default=0,
                        help="CPU both stretch processes are pinned to; default 0")
    parser.add_argument("--fio-cpu", type=int, default=1,
                        help="CPU fio and the clients are pinned to; default 1")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (configs, stretch logs) and print its path")
    args = parser.parse_args()
    args.read_region = bench.parse_size(args.read_region)
    only = {int(part) for part in args.only.split(",") if part.strip()}

    for tool, package in (("fio", "fio"), ("taskset", "util-linux"), ("nbdcopy", "libnbd-bin"),
                          ("nbdfuse", "nbdfuse"), ("mkfs.ext4", "e2fsprogs"),
                          ("e2fsck", "e2fsprogs")):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found (apt-get install {package})")
    if 4 in only and importlib.util.find_spec("nbd") is None:
        sys.exit("bench: the libnbd python bindings are missing (apt-get install "
                 "python3-libnbd; run with /usr/bin/python3)")
    if not os.path.exists(bench.BUILT):
        sys.exit("bench: build first: cargo build --release -p stretch-cli")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs 2 CPUs (stretch and the clients on different CPUs)")

    commit = subprocess.run(["git", "-C", bench.REPO, "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    print(f"    $ {' '.join(['bench/read-leases.py', *sys.argv[1:]])}")
    print(f"    commit {commit}; clusters 'leases' (read_lease_ms = 2000) and 'off' "
          f"(read_lease_ms = 0), a<->b delay_ms = {args.delay_ms} (RTT {2 * args.delay_ms} ms), "
          f"copies of cluster-configs/local.toml on free ports; both `stretch up` on CPU "
          f"{args.server_cpu}, clients on CPU {args.fio_cpu}")

    workdir = tempfile.mkdtemp(prefix="stretch-read-leases-",
                               dir=os.path.join(bench.REPO, "target"))
    bench.STRETCH = os.path.join(workdir, "stretch-under-test")
    shutil.copy2(bench.BUILT, bench.STRETCH)
    clusters = [bench.Cluster("leases", args.delay_ms, workdir, args.server_cpu),
                bench.Cluster("off", args.delay_ms, workdir, args.server_cpu)]
    configs = {"leases": cluster_config(workdir, "leases", 2000),
               "off": cluster_config(workdir, "off", 0)}
    fio = bench.Fio(workdir, args.fio_cpu, clusters)
    started = time.time()
    def measure():
        for cluster in clusters:
            bench.log(f"starting cluster {cluster.label} ...")
            bench.LOCAL_CONFIG = configs[cluster.label]
            cluster.start()
        if 1 in only:
            file_system(args, clusters, workdir)
        if 2 in only:
            random_reads(args, clusters, fio)
        if 3 in only:
            owner_writes(args, clusters, fio)
        if 4 in only:
            first_writes(args, clusters)
        print(f"\n    total {time.time() - started:.0f} s")
    bench.run_guarded(clusters, workdir, args.keep, measure)


if __name__ == "__main__":
    main()
