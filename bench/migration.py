#!/usr/bin/python3
"""Benchmark live migration: the pause a writer sees, by backlog.

Runs a1, b1 and the witness w1 as separate `stretch node` processes on
cluster-configs/local.toml (a<->b 25 ms one way, 50 ms round trip), and for
each backlog (what b lacks of the volume when the move starts: a's link to
b is cut while that much is written at a, then healed) moves a 1 GiB
volume from a to b while a writer (libnbd, one connection at a: 4 KiB
write + FLUSH in a loop) keeps writing it, with

- `stretch volume migrate` (drain: b catches up while a keeps writing,
  writes are held only at the switchover),
- `stretch volume migrate --mode fast` (ownership moves at once; b then
  copies what it lacks from a, a write waiting only for the region it
  touches), and
- `stretch volume move` (the hand-over that holds the writes first and
  waits for b to catch up), as the baseline,

and prints, per row: the pause the node reports (how long writes were
held), the writer's longest write (its latency includes the pause, and
after the switchover each write is forwarded to b: one round trip), the
writer's failed writes, and the command's total time (for fast mode,
until b copied everything).

The a-b link is shaped to --bandwidth-mbit (200) so that a backlog takes
seconds to drain, as over a WAN. Figures from different runs are not
comparable on shared machines.
Usage: bench/migration.py [--backlogs 0,64,512] [--bandwidth-mbit 200] [--keep]
The binary is REPO/target/release/stretch, or the path in $STRETCH.
"""

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "control_plane", os.path.join(REPO, "bench", "control-plane.py"))
control_plane = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(control_plane)
Cluster, Writer, whole, log = (control_plane.Cluster, control_plane.Writer,
                               control_plane.whole, control_plane.log)
STRETCH = control_plane.STRETCH
MIB = 1 << 20


def make_backlog(cluster, volume, mib, workdir):
    """b lacks `mib` MiB of `volume` when this returns: written at a while
    a's side of the a-b link was cut, then healed."""
    if mib == 0:
        return
    data = os.path.join(workdir, f"backlog-{mib}.bin")
    if not os.path.exists(data):
        with open(data, "wb") as out:
            for _ in range(mib):
                out.write(os.urandom(MIB))
    cluster.cli(0, "link", "cut", "a", "b")
    subprocess.run(["nbdcopy", "--target-is-zero", data, cluster.nbd_uri(0, volume)],
                   check=True)
    cluster.cli(0, "link", "heal", "a", "b")
    # The move needs b connected: the link redials within a second or two.
    cluster.wait(lambda: whole(cluster), "b reconnected after the heal", timeout=60)


def one_move(cluster, command, volume):
    writer = Writer(cluster.nbd_uri(0, volume))
    time.sleep(1.0)
    started = time.monotonic()
    result = cluster.cli(0, "volume", command[0], volume, "--to", "b", *command[1:], check=False)
    took = time.monotonic() - started
    time.sleep(1.0)
    writer.stop()
    if result.returncode != 0:
        return None, writer, took, result.stderr.strip()
    paused = re.search(r"writes paused (\d+) ms", result.stdout)
    return (int(paused.group(1)) if paused else None), writer, took, result.stdout.strip()


def switched_after(output, took):
    """When ownership moved: reported in fast mode, the end otherwise."""
    moved = re.search(r"ownership moved after ([0-9.]+) s", output)
    return float(moved.group(1)) if moved else took


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", default="0,64,512",
                        help="backlogs to measure, in MiB, comma-separated")
    parser.add_argument("--bandwidth-mbit", type=int, default=200,
                        help="shape the a-b link to this rate (0: unshaped)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    try:
        backlogs = [int(value) for value in args.backlogs.split(",")]
    except ValueError:
        sys.exit(f"--backlogs: comma-separated MiB counts, not {args.backlogs!r}")
    if args.bandwidth_mbit < 0:
        sys.exit("--bandwidth-mbit must be 0 or more")
    if not os.path.exists(STRETCH):
        sys.exit("build first: cargo build --release")
    workdir = tempfile.mkdtemp(prefix="stretch-migration-", dir=os.path.join(REPO, "target"))
    cluster = Cluster(workdir)
    rows = []
    try:
        cluster.cli(0, "link", "set", "a", "b", "--bandwidth-mbit", str(args.bandwidth_mbit))
        for backlog in backlogs:
            for label, command in [("migrate (drain)", ["migrate"]),
                                   ("migrate (fast)", ["migrate", "--mode", "fast"]),
                                   ("move (hold first)", ["move"])]:
                volume = f"m{backlog}{command[0]}{command[-1]}"
                cluster.cli(0, "volume", "create", volume, "--size", "1G")
                cluster.wait(lambda: whole(cluster), "a whole cluster", timeout=60)
                log(f"{label}: backlog {backlog} MiB")
                make_backlog(cluster, volume, backlog, workdir)
                paused, writer, took, output = one_move(cluster, command, volume)
                longest = max(writer.latencies) * 1000 if writer.latencies else float("nan")
                rows.append((backlog, label, paused, longest, writer.failures, took,
                             switched_after(output, took), output))
                log(f"  {output}")
    finally:
        cluster.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("| backlog | command | writes held (node) | writer's longest write | failed writes "
          "| owner moved after | command time |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for backlog, label, paused, longest, failures, took, switched, output in rows:
        held = f"{paused} ms" if paused is not None else ("-" if "move" in label else "FAILED")
        print(f"| {backlog} MiB | {label} | {held} | {longest:.0f} ms | {failures} "
              f"| {switched:.1f} s | {took:.1f} s |")
    print()
    print(f"(one run; a<->b 25 ms one way, {args.bandwidth_mbit} Mbit/s; `volume move` reports "
          "no pause: its writes are held from the start, so the writer's longest write is its "
          "pause; fast mode's command time includes the copy after the switchover)")


if __name__ == "__main__":
    main()
