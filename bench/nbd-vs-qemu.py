#!/usr/bin/env python3
"""Benchmark stretch against qemu-nbd with fio's nbd engine, side by side.

Both servers export a raw file of the same size on the same disk; both are
pinned to CPU 0 and fio to CPU 1 (small-I/O figures otherwise depend mostly
on where the scheduler puts the processes). Every job runs against stretch
and qemu-nbd alternately, REPEATS times, and the table shows medians and
the stretch/qemu-nbd ratio. Figures from two different runs are not
comparable: these machines are shared and noisy.

Usage: bench/nbd-vs-qemu.py [--runtime SECONDS] [--repeats N] [--size 1G]
                            [--only TEXT]
Needs: a release build (cargo build --release), fio, qemu-nbd, taskset.
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
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRETCH = os.path.join(REPO, "target", "release", "stretch")

JOBS = [
    # name, fio rw, block size, queue depth, extra fio arguments
    ("4K randread QD1", "randread", "4k", 1, []),
    ("4K randread QD32", "randread", "4k", 32, []),
    ("4K randwrite QD1", "randwrite", "4k", 1, []),
    ("4K randwrite QD32", "randwrite", "4k", 32, []),
    ("1M seqread QD8", "read", "1m", 8, []),
    ("1M seqwrite QD8", "write", "1m", 8, []),
    # The same with a FLUSH every 64 writes: what a guest that wants its
    # data durable does. qemu-nbd then pays for durability too.
    ("1M seqwrite QD8 +flush/64M", "write", "1m", 8, ["--fsync=64"]),
]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def need(tool, package):
    if shutil.which(tool) is None:
        sys.exit(f"bench: {tool} not found (apt-get install {package})")


def wait_port(port, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: nothing listens on port {port} after {seconds} s")


def pin(pid, cpu):
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)],
                   check=True, stdout=subprocess.DEVNULL)


def start_stretch(workdir, size):
    nbd, admin = free_port(), free_port()
    config = os.path.join(workdir, "bench.toml")
    with open(os.path.join(REPO, "cluster-configs", "single-site.toml")) as source:
        text = source.read()
    text = text.replace("127.0.0.1:10809", f"127.0.0.1:{nbd}")
    text = text.replace("127.0.0.1:9180", f"127.0.0.1:{admin}")
    with open(config, "w") as out:
        out.write(text)
    log = open(os.path.join(workdir, "stretch.log"), "w")
    data_dir = os.path.join(workdir, "stretch-data")
    pki_dir = os.path.join(data_dir, "pki")
    # The admin token (and certificates) a node reads at start.
    subprocess.run([STRETCH, "init", config, "--dir", pki_dir],
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(pki_dir, "admin.token")) as source:
        token = source.read().strip()
    process = subprocess.Popen(
        [STRETCH, "node", "--config", config, "--node", "a1",
         "--data-dir", data_dir],
        stdout=log, stderr=log)
    wait_port(admin)
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}/v1/volumes",
        data=json.dumps({"name": "bench", "size": size}).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {token}"}, method="POST")
    urllib.request.urlopen(request).read()
    pin(process.pid, 0)
    return process, f"nbd://127.0.0.1:{nbd}/bench", admin


def start_qemu_nbd(workdir, size):
    port = free_port()
    image = os.path.join(workdir, "qemu.raw")
    with open(image, "wb") as out:
        out.truncate(size)
    process = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port),
         "--shared=8", "-t", "-x", "bench", image],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    pin(process.pid, 0)
    return process, f"nbd://127.0.0.1:{port}/bench"


def fio(uri, rw, bs, depth, runtime, size, workdir, extra=(), time_based=True):
    output = os.path.join(workdir, "fio.json")
    command = ["taskset", "-c", "1", "fio", "--name=bench", "--ioengine=nbd",
               f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
               f"--size={size}", "--output-format=json", f"--output={output}",
               "--randseed=42", *extra]
    if time_based:
        command += ["--time_based", f"--runtime={runtime}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(output) as source:
        job = json.load(source)["jobs"][0]
    if job.get("error", 0) != 0:
        sys.exit(f"bench: fio reported error {job['error']} against {uri}; see the server log")
    side = job["read"] if rw in ("read", "randread") else job["write"]
    percentiles = side["clat_ns"].get("percentile", {})
    return {
        "iops": side["iops"],
        "mib": side["bw_bytes"] / 2**20,
        "mean_us": side["lat_ns"]["mean"] / 1000,
        "p99_us": percentiles.get("99.000000", 0) / 1000,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per job")
    parser.add_argument("--size", default="1G", help="export size (fio --size)")
    parser.add_argument("--only", default="",
                        help="run only the jobs whose name contains this text")
    args = parser.parse_args()
    jobs = [job for job in JOBS if args.only in job[0]]
    if not jobs:
        sys.exit(f"bench: no job name contains {args.only!r}")
    need("fio", "fio")
    need("qemu-nbd", "qemu-utils")
    need("taskset", "util-linux")
    if not os.path.exists(STRETCH):
        sys.exit("bench: build first: cargo build --release")
    units = {"K": 10, "M": 20, "G": 30}
    size = int(args.size[:-1]) << units[args.size[-1].upper()]

    workdir = tempfile.mkdtemp(prefix="stretch-bench-", dir=os.path.join(REPO, "target"))
    stretch = qemu = None
    try:
        stretch, stretch_uri, admin = start_stretch(workdir, size)
        qemu, qemu_uri = start_qemu_nbd(workdir, size)
        servers = [("stretch", stretch_uri), ("qemu-nbd", qemu_uri)]
        print(f"prefilling both {args.size} exports ...", file=sys.stderr)
        for _, uri in servers:
            fio(uri, "write", "1m", 8, 0, args.size, workdir, time_based=False)
        results = {}
        for name, rw, bs, depth, extra in jobs:
            for repeat in range(args.repeats):
                for server, uri in servers:
                    figures = fio(uri, rw, bs, depth, args.runtime, args.size, workdir, extra)
                    results.setdefault((name, server), []).append(figures)
                    print(f"  {name:<26} {server:<8} run {repeat + 1}: "
                          f"{figures['iops']:>9.0f} IOPS {figures['mib']:>8.1f} MiB/s",
                          file=sys.stderr)
        print(f"\nfio nbd engine, {args.size} export, {args.runtime} s runs, "
              f"median of {args.repeats} alternating runs; servers on CPU 0, fio on CPU 1\n")
        print("| job | stretch IOPS | stretch MiB/s | stretch mean µs | stretch p99 µs "
              "| qemu-nbd IOPS | qemu-nbd MiB/s | qemu-nbd mean µs | qemu-nbd p99 µs "
              "| ratio (IOPS) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, *_ in jobs:
            row = []
            medians = {}
            for server in ("stretch", "qemu-nbd"):
                runs = results[(name, server)]
                median = {key: statistics.median(run[key] for run in runs)
                          for key in ("iops", "mib", "mean_us", "p99_us")}
                medians[server] = median
                row += [f"{median['iops']:.0f}", f"{median['mib']:.1f}",
                        f"{median['mean_us']:.0f}", f"{median['p99_us']:.0f}"]
            ratio = medians["stretch"]["iops"] / max(medians["qemu-nbd"]["iops"], 1e-9)
            print(f"| {name} | " + " | ".join(row) + f" | {ratio:.2f} |")
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics") as response:
            metrics = response.read().decode()
        for line in metrics.splitlines():
            if line.startswith(("stretch_writes_throttled_total", "stretch_journal_syncs_total",
                                 "stretch_leg_apply_seconds_sum", "stretch_leg_apply_seconds_count",
                                 "stretch_journal_fsync_seconds_sum", "stretch_journal_fsync_seconds_count")):
                print(f"\n    {line}", end="")
        print()
    finally:
        for process in (stretch, qemu):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
