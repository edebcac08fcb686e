#!/usr/bin/env python3
"""What NBD over TLS costs: stretch against nbdkit, plain and TLS, side by side.

One stretch node runs with `nbd_tls = "on"` (so the same server answers
nbd:// and nbds://) and one `nbdkit --tls=on --tls-certificates=DIR file
FILE`; both present the same certificate (made with openssl for
127.0.0.1, signed by a throw-away CA). nbdcopy copies the same source file
into each export (write) and copies each export out to null: (read), over
plain NBD and over TLS. Servers are pinned to CPU 0 and nbdcopy to CPU 1.
Every copy runs against every server alternately, REPEATS times; the table
shows median throughput, the TLS/plain ratio of each server and the
stretch/nbdkit ratio over TLS. Figures from different runs are not
comparable: these machines are shared and noisy.

Usage: bench/nbd-tls.py [--size 1G] [--repeats N]
Needs: a release build (cargo build --release), nbdkit, nbdcopy (libnbd-bin),
openssl, taskset.
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


def certificates(workdir):
    """A CA and a server certificate for 127.0.0.1, in the file names both
    nbdkit (server side) and libnbd (client side) read from one folder."""
    certs = os.path.join(workdir, "certs")
    os.makedirs(certs)

    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=certs, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", "ca.key", "-out", "ca-cert.pem", "-days", "2",
        "-subj", "/CN=bench CA")
    ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(certs, "ext.cnf"), "w") as out:
        out.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                  "extendedKeyUsage=serverAuth\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "ext.cnf")
    return certs


def start_stretch(workdir, size, certs):
    nbd, admin = free_port(), free_port()
    config = os.path.join(workdir, "bench.toml")
    with open(os.path.join(REPO, "cluster-configs", "single-site.toml")) as source:
        text = source.read()
    text = text.replace("127.0.0.1:10809", f"127.0.0.1:{nbd}")
    text = text.replace("127.0.0.1:9180", f"127.0.0.1:{admin}")
    text = text.replace('nbd_tls = "off"', 'nbd_tls = "on"')
    text = text.replace('# nbd_tls_cert = "/etc/stretch/nbd-a1.pem"',
                        f'nbd_tls_cert = "{certs}/server-cert.pem"')
    text = text.replace('# nbd_tls_key = "/etc/stretch/nbd-a1.key"',
                        f'nbd_tls_key = "{certs}/server-key.pem"')
    with open(config, "w") as out:
        out.write(text)
    log = open(os.path.join(workdir, "stretch.log"), "w")
    data_dir = os.path.join(workdir, "stretch-data")
    pki_dir = os.path.join(data_dir, "pki")
    subprocess.run([STRETCH, "init", config, "--dir", pki_dir],
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(pki_dir, "admin.token")) as source:
        token = source.read().strip()
    process = subprocess.Popen(
        [STRETCH, "node", "--config", config, "--node", "a1", "--data-dir", data_dir],
        stdout=log, stderr=log)
    wait_port(admin)
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}/v1/volumes",
        data=json.dumps({"name": "bench", "size": size}).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {token}"}, method="POST")
    urllib.request.urlopen(request).read()
    pin(process.pid, 0)
    return process, nbd, "bench"


def start_nbdkit(workdir, size, certs):
    port = free_port()
    image = os.path.join(workdir, "nbdkit.raw")
    with open(image, "wb") as out:
        out.truncate(size)
    process = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1",
         "-p", str(port), "--tls=on", f"--tls-certificates={certs}",
         "file", image],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    pin(process.pid, 0)
    return process, port, ""


def uri(port, export, tls, certs):
    if tls:
        return f"nbds://127.0.0.1:{port}/{export}?tls-certificates={certs}"
    return f"nbd://127.0.0.1:{port}/{export}"


def nbdcopy(source, target):
    start = time.monotonic()
    subprocess.run(["taskset", "-c", "1", "nbdcopy", source, target], check=True)
    return time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="export and copy size")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per copy")
    args = parser.parse_args()
    need("nbdkit", "nbdkit")
    need("nbdcopy", "libnbd-bin")
    need("openssl", "openssl")
    need("taskset", "util-linux")
    if not os.path.exists(STRETCH):
        sys.exit("bench: build first: cargo build --release")
    units = {"K": 10, "M": 20, "G": 30}
    size = int(args.size[:-1]) << units[args.size[-1].upper()]

    workdir = tempfile.mkdtemp(prefix="stretch-bench-tls-", dir=os.path.join(REPO, "target"))
    processes = []
    try:
        certs = certificates(workdir)
        source = os.path.join(workdir, "source.raw")
        with open(source, "wb") as out:
            for _ in range(size >> 20):
                out.write(os.urandom(1 << 20))
        stretch, stretch_port, stretch_export = start_stretch(workdir, size, certs)
        processes.append(stretch)
        nbdkit, nbdkit_port, nbdkit_export = start_nbdkit(workdir, size, certs)
        processes.append(nbdkit)
        targets = [
            ("stretch", False, uri(stretch_port, stretch_export, False, certs)),
            ("stretch", True, uri(stretch_port, stretch_export, True, certs)),
            ("nbdkit", False, uri(nbdkit_port, nbdkit_export, False, certs)),
            ("nbdkit", True, uri(nbdkit_port, nbdkit_export, True, certs)),
        ]
        results = {}
        for repeat in range(args.repeats):
            for server, tls, target in targets:
                for direction in ("write", "read"):
                    if direction == "write":
                        seconds = nbdcopy(source, target)
                    else:
                        seconds = nbdcopy(target, "null:")
                    mib = size / 2**20 / seconds
                    results.setdefault((server, tls, direction), []).append(mib)
                    label = "TLS" if tls else "plain"
                    print(f"  {server:<8} {label:<5} {direction:<5} run {repeat + 1}: "
                          f"{mib:8.1f} MiB/s", file=sys.stderr)
        median = {key: statistics.median(runs) for key, runs in results.items()}
        print(f"\nnbdcopy, {args.size} file, median of {args.repeats} alternating runs; "
              "servers on CPU 0, nbdcopy on CPU 1; MiB/s\n")
        print("| copy | stretch plain | stretch TLS | stretch TLS/plain "
              "| nbdkit plain | nbdkit TLS | nbdkit TLS/plain | stretch/nbdkit (TLS) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for direction, name in (("write", "file → export"), ("read", "export → null")):
            sp, st = median[("stretch", False, direction)], median[("stretch", True, direction)]
            kp, kt = median[("nbdkit", False, direction)], median[("nbdkit", True, direction)]
            print(f"| {name} | {sp:.0f} | {st:.0f} | {st / sp:.2f} "
                  f"| {kp:.0f} | {kt:.0f} | {kt / kp:.2f} | {st / kt:.2f} |")
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
