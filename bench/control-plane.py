#!/usr/bin/python3
"""Benchmark the metadata control plane on cluster-configs/local.toml.

Runs a1, b1 and the witness w1 as separate `stretch node` processes (as in
production: one process per node) on free ports, a<->b 25 ms one way, and
prints:

1. Memory: resident set (VmRSS) and its peak (VmHWM) of the witness and of
   a data node, after --volumes volumes were created and each written
   (1 MiB at a). Target for the witness: RSS <= 30 MiB.
2. Latency of metadata changes asked at a1 (median of --repeats): create,
   move (an idle volume to b and back), delete. Each is one Raft commit
   plus the confirmations the command waits for.
3. A site cut from both others: how long `volume create` at a takes to
   fail (the bound is 5 s), and that the same create at b succeeds.
4. Failover timings, with a writer (libnbd: 4 KiB write + FLUSH in a
   loop, one connection) on an `auto` volume owned by a (fa) and one owned
   by b (fb): the longest write (its latency, which includes any pause)
   and the failed writes while
   - a-b is cut and both still reach the witness (nothing may suspend);
   - the witness is killed (nothing may suspend);
   - a is cut from both b and w: how long after the cut b serves fa (a
     write at b to fa succeeds), b's own fb meanwhile, and a's writes to
     fa (they must fail, not be acknowledged).

Figures from different runs are not comparable on shared machines.
Usage: bench/control-plane.py [--volumes N] [--repeats N] [--keep] [--failover-only | --memory-only]
The binary is REPO/target/release/stretch, or the path in $STRETCH.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import threading
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# STRETCH names another build of the binary (e.g. one with its own
# CARGO_TARGET_DIR); by default, this checkout's release build.
STRETCH = os.environ.get("STRETCH") or os.path.join(REPO, "target", "release", "stretch")
LOCAL_CONFIG = os.path.join(REPO, "cluster-configs", "local.toml")
LOCAL_PORTS = [10809, 10810, 9180, 9181, 9182, 7400, 7401, 7402]
NODES = ["a1", "b1", "w1"]


def log(message):
    print(message, file=sys.stderr, flush=True)


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


def http(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


class Cluster:
    def __init__(self, workdir):
        self.dir = workdir
        self.ports = free_ports(len(LOCAL_PORTS))
        text = open(LOCAL_CONFIG).read()
        for old, new in zip(LOCAL_PORTS, self.ports):
            needle = f'127.0.0.1:{old}"'
            if needle not in text:
                sys.exit(f"local.toml no longer uses port {old}; update this script")
            text = text.replace(needle, f'127.0.0.1:{new}"')
        self.config = os.path.join(workdir, "cluster.toml")
        open(self.config, "w").write(text)
        self.pki = os.path.join(workdir, "pki")
        self.data = os.path.join(workdir, "data")
        subprocess.run([STRETCH, "init", self.config, "--dir", self.pki], check=True,
                       stdout=subprocess.DEVNULL)
        self.processes = {}
        for node in NODES:
            self.start(node)
        for index in range(3):
            self.wait(lambda i=index: self.status(i) is not None, "admin APIs answer")
        self.wait(lambda: all((self.status(i) or {}).get("metadata", {}).get("leader")
                              for i in range(3)), "a metadata leader")

    def start(self, node):
        out = open(os.path.join(self.dir, f"{node}.log"), "a")
        self.processes[node] = subprocess.Popen(
            [STRETCH, "node", "--config", self.config, "--node", node,
             "--pki-dir", self.pki, "--data-dir", self.data],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, NO_COLOR="1"))

    def nbd_uri(self, index, volume):
        return f"nbd://127.0.0.1:{self.ports[index]}/{volume}"

    def admin(self, index):
        return f"http://127.0.0.1:{self.ports[2 + index]}"

    def status(self, index):
        try:
            import json
            return json.loads(http(self.admin(index) + "/v1/status"))
        except Exception:
            return None

    def cli(self, index, *args, check=True):
        result = subprocess.run(
            [STRETCH, "--admin", self.admin(index), "--token-file",
             os.path.join(self.pki, "admin.token"), *args],
            capture_output=True, text=True)
        if check and result.returncode != 0:
            sys.exit(f"stretch {' '.join(args)} failed: {result.stderr}")
        return result

    def wait(self, done, what, timeout=30):
        deadline = time.time() + timeout
        while not done():
            if time.time() > deadline:
                sys.exit(f"timed out waiting for {what}")
            time.sleep(0.1)

    def memory_kib(self, node):
        fields = {}
        with open(f"/proc/{self.processes[node].pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    fields[key] = int(value.split()[0])
        return fields

    def stop(self):
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


class Writer:
    """Writes 4 KiB + FLUSH in a loop on one NBD connection; records each
    write's latency and the failures, until stopped."""

    def __init__(self, uri):
        import nbd
        self.handle = nbd.NBD()
        self.handle.connect_uri(uri)
        self.latencies, self.failures, self.errors = [], 0, []
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        buffer = bytearray(os.urandom(4096))
        while self.running:
            started = time.monotonic()
            try:
                self.handle.pwrite(buffer, 0)
                self.handle.flush()
                self.latencies.append(time.monotonic() - started)
            except Exception as error:
                self.failures += 1
                self.errors.append(f"{time.monotonic():.2f}: {error}")
                time.sleep(0.05)

    def stop(self):
        self.running = False
        self.thread.join(timeout=30)
        return self

    def summary(self):
        longest = max(self.latencies) * 1000 if self.latencies else float("nan")
        return f"{len(self.latencies)} ok, {self.failures} failed, longest {longest:.0f} ms"


def owner_at(cluster, index, volume):
    import json
    try:
        info = json.loads(http(cluster.admin(index) + f"/v1/volumes/{volume}"))
        return info.get("owner"), info.get("epoch")
    except Exception:
        return None, None


def leases_held(cluster):
    return all(((cluster.status(i) or {}).get("lease") or {}).get("valid") for i in (0, 1))


def whole(cluster):
    """Every node reaches every voter and is connected to every peer, and
    a and b hold leases: a fault measured from here starts from a whole
    cluster (a link healed a moment ago may still be reconnecting)."""
    for index in range(3):
        status = cluster.status(index) or {}
        voters = (status.get("metadata") or {}).get("voters") or []
        if not voters or not all(voter.get("reachable") for voter in voters):
            return False
        if not all(peer.get("connected") for peer in status.get("peers") or []):
            return False
    return leases_held(cluster)


def failover_timings(cluster):
    cluster.wait(lambda: whole(cluster), "the cluster whole", timeout=60)
    cluster.cli(0, "volume", "create", "fa", "--size", "16M", "--failover", "auto")
    cluster.cli(1, "volume", "create", "fb", "--size", "16M", "--failover", "auto")
    print("| fault (a-b 25 ms one way) | writes at a to fa | writes at b to fb | owner of fa after |")
    print("|---|---|---|---|")
    for label, cut, heal in [
        ("a-b cut, both reach w (6 s)",
         lambda: (cluster.cli(0, "link", "cut", "a", "b"), cluster.cli(1, "link", "cut", "a", "b")),
         lambda: (cluster.cli(0, "link", "heal", "a", "b"), cluster.cli(1, "link", "heal", "a", "b"))),
        ("witness killed (6 s)",
         lambda: cluster.processes["w1"].kill(),
         lambda: cluster.start("w1")),
    ]:
        writers = [Writer(cluster.nbd_uri(0, "fa")), Writer(cluster.nbd_uri(1, "fb"))]
        time.sleep(1)
        cut()
        time.sleep(6)
        for writer in writers:
            writer.stop()
        owner = owner_at(cluster, 0, "fa")
        print(f"| {label} | {writers[0].summary()} | {writers[1].summary()} | {owner[0]} (epoch {owner[1]}) |")
        heal()
        cluster.wait(lambda: whole(cluster), "the cluster whole again", timeout=60)
    a_writer, b_writer = Writer(cluster.nbd_uri(0, "fa")), Writer(cluster.nbd_uri(1, "fb"))
    time.sleep(1)
    cut_at = time.monotonic()
    cluster.cli(0, "link", "cut", "a", "b")
    cluster.cli(0, "link", "cut", "a", "w")
    cluster.cli(1, "link", "cut", "a", "b")
    cluster.cli(2, "link", "cut", "a", "w")
    served = None
    deadline = cut_at + 30
    while time.monotonic() < deadline and served is None:
        if owner_at(cluster, 1, "fa")[0] == "b":
            import nbd
            handle = nbd.NBD()
            handle.connect_uri(cluster.nbd_uri(1, "fa"))
            handle.pwrite(bytearray(4096), 4096)
            handle.flush()
            served = time.monotonic() - cut_at
        else:
            time.sleep(0.02)
    time.sleep(2)
    a_writer.stop()
    b_writer.stop()
    served_text = f"{served:.2f} s" if served is not None else "NOT within 30 s"
    print(f"| a cut from b and w | {a_writer.summary()} | {b_writer.summary()} | b, served at b {served_text} after the cut |")
    for name, writer in [("a", a_writer), ("b", b_writer)]:
        for error in writer.errors[:3]:
            log(f"write error at {name} ({error.split(':')[0]} s, cut at {cut_at:.2f}): {error}")
    print()
    print("Writes at a that completed after the cut were acknowledged under a's lease, "
          "which ends before b's takeover starts (lease + drift + margin).")


def timed(action):
    started = time.monotonic()
    action()
    return time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--failover-only", action="store_true",
                        help="measure only the failover timings (section 4)")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure only the memory (section 1)")
    args = parser.parse_args()
    if not os.path.exists(STRETCH):
        sys.exit("build first: cargo build --release")
    workdir = tempfile.mkdtemp(prefix="stretch-control-plane-", dir=os.path.join(REPO, "target"))
    cluster = Cluster(workdir)
    try:
        if args.failover_only:
            failover_timings(cluster)
            return
        log(f"creating and writing {args.volumes} volumes")
        for n in range(args.volumes):
            cluster.cli(0, "volume", "create", f"v{n}", "--size", "16M")
            uri = f"nbd://127.0.0.1:{cluster.ports[0]}/v{n}"
            subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", uri],
                           check=True, stdout=subprocess.DEVNULL)
        time.sleep(2)
        witness, data = cluster.memory_kib("w1"), cluster.memory_kib("a1")
        print("| node | RSS | peak RSS | threads |")
        print("|---|---:|---:|---:|")
        for label, fields in [("witness w1", witness), ("data node a1", data)]:
            print(f"| {label} | {fields['VmRSS'] / 1024:.1f} MiB | {fields['VmHWM'] / 1024:.1f} MiB "
                  f"| {fields['Threads']} |")
        verdict = "ok" if witness["VmRSS"] <= 30 * 1024 else "OVER"
        print(f"witness RSS target <= 30 MiB: {verdict} ({args.volumes} volumes)")
        print()
        if args.memory_only:
            return
        creates, moves, deletes = [], [], []
        for n in range(args.repeats):
            name = f"t{n}"
            creates.append(timed(lambda: cluster.cli(0, "volume", "create", name, "--size", "16M")))
            moves.append(timed(lambda: cluster.cli(0, "volume", "move", name, "--to", "b")))
            moves.append(timed(lambda: cluster.cli(1, "volume", "move", name, "--to", "a")))
            deletes.append(timed(lambda: cluster.cli(0, "volume", "delete", name)))
        print("| change at a1 (25 ms one way to b) | median | max |")
        print("|---|---:|---:|")
        for label, values in [("volume create", creates), ("volume move (idle)", moves),
                              ("volume delete", deletes)]:
            print(f"| {label} | {statistics.median(values) * 1000:.0f} ms "
                  f"| {max(values) * 1000:.0f} ms |")
        print()
        cluster.cli(0, "link", "cut", "a", "b")
        cluster.cli(0, "link", "cut", "a", "w")
        refused = []
        took = timed(lambda: refused.append(cluster.cli(0, "volume", "create", "cut-a",
                                                        "--size", "16M", check=False)))
        ok = cluster.cli(1, "volume", "create", "cut-b", "--size", "16M", check=False)
        print(f"a cut from b and w: create at a failed after {took:.1f} s "
              f"({'refused' if refused[0].returncode != 0 else 'SUCCEEDED?'}: "
              f"{refused[0].stderr.strip()}); create at b "
              f"{'succeeded' if ok.returncode == 0 else 'FAILED: ' + ok.stderr.strip()}")
        cluster.cli(0, "link", "heal", "a", "b")
        cluster.cli(0, "link", "heal", "a", "w")
        print()
        failover_timings(cluster)
    finally:
        cluster.stop()
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
