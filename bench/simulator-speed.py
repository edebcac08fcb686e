#!/usr/bin/env python3
"""How fast the simulator runs against simulated time, per scenario, for
one build or two side by side.

Runs `stretch sim` on the scenarios the README quotes (hundred-volumes and
two-sites, seeds 1-3 at their own durations and seed 1 for 600 simulated
seconds, where the checker's history is long) and the CI swarm, pinned to
one CPU, and prints each run's multiple of real time (the best of
`--repeats` runs: this machine's noise only ever slows a run down). With
`--baseline PATH` the runs alternate between the two builds and the table
shows both and their ratio; the traces must match (a speed change must
not change what is simulated).

    python3 bench/simulator-speed.py
    python3 bench/simulator-speed.py --baseline /tmp/stretch-before
"""

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPEED = re.compile(r"in ([0-9.]+) wall s \(([0-9]+)x\)")
TRACE = re.compile(r"trace ([0-9a-f]+)")


def runs(swarm_seeds):
    """(label, arguments) of every run in the table."""
    table = []
    for scenario in ("hundred-volumes", "two-sites"):
        path = os.path.join(ROOT, "simulation", f"{scenario}.toml")
        for seed in (1, 2, 3):
            table.append((f"{scenario} seed {seed}", ["--scenario", path, "--seed", str(seed)]))
        table.append(
            (f"{scenario} seed 1, 600 s", ["--scenario", path, "--seed", "1", "--duration", "600"])
        )
    if swarm_seeds:
        table.append(
            (f"swarm of {swarm_seeds} seeds", ["--swarm", "--seeds", str(swarm_seeds), "--from", "1"])
        )
    return table


def measure(binary, arguments, cpu):
    """Runs one simulation; returns (multiple of real time, wall s, trace)."""
    command = ["taskset", "-c", str(cpu), binary, "sim", *arguments]
    done = subprocess.run(command, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{output}")
    speeds = SPEED.findall(output)
    if not speeds:
        sys.exit(f"no speed in the output of {' '.join(command)}:\n{output}")
    wall, multiple = speeds[-1]
    trace = TRACE.search(output)
    return int(multiple), float(wall), trace.group(1) if trace else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--binary",
        default=os.path.join(ROOT, "target", "release", "stretch"),
        help="the stretch build to measure (default: target/release/stretch)",
    )
    parser.add_argument("--baseline", help="another build, measured alternately with --binary")
    parser.add_argument(
        "--swarm-seeds", type=int, default=1000, help="seeds of the swarm row; 0 leaves it out"
    )
    parser.add_argument("--cpu", type=int, default=1, help="the CPU every run is pinned to")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per build and row; the fastest counts"
    )
    arguments = parser.parse_args()
    builds = [arguments.binary] + ([arguments.baseline] if arguments.baseline else [])
    for build in builds:
        if not os.access(build, os.X_OK):
            sys.exit(f"{build} is not an executable; build it with cargo build --release -p stretch-cli")
    if arguments.swarm_seeds < 0:
        sys.exit("--swarm-seeds must be 0 or more")
    if arguments.repeats < 1:
        sys.exit("--repeats must be 1 or more")

    if arguments.baseline:
        print(f"{'run':<32} {'baseline':>9} {'this':>9} {'ratio':>6}")
    else:
        print(f"{'run':<32} {'x real':>9} {'wall s':>8}")
    for label, command in runs(arguments.swarm_seeds):
        best = {}
        traces = set()
        for _ in range(arguments.repeats):
            for build in reversed(builds):
                multiple, wall, trace = measure(build, command, arguments.cpu)
                traces.add(trace)
                if multiple > best.get(build, (0, 0))[0]:
                    best[build] = (multiple, wall)
        if len(traces) > 1:
            sys.exit(f"{label}: traces differ ({', '.join(sorted(traces))}): not the same simulation")
        this, wall = best[arguments.binary]
        if not arguments.baseline:
            print(f"{label:<32} {this:>8}x {wall:>8.2f}", flush=True)
            continue
        base = best[arguments.baseline][0]
        print(f"{label:<32} {base:>8}x {this:>8}x {this / base:>6.2f}", flush=True)

if __name__ == "__main__":
    main()
