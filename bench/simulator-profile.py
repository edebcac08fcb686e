#!/usr/bin/env python3
"""Where a simulation's time goes: the code under test (the engine, the
journal and leg code) against the simulator's own parts (the checker,
the simulated disk's crash handling, the network, the event loop).

Samples one `stretch sim` run with `perf record --call-graph dwarf` and
charges each sample to the innermost frame that names one of the parts
below (a leg write's copy into the simulated file counts as the simulated
disk's, which stands in for a real disk's DMA). The shares bound what a
faster simulator can gain: if the code under test takes 60 % of a run,
nothing outside it can make the run more than 1 / 0.6 times faster.

    python3 bench/simulator-profile.py simulation/hundred-volumes.toml --duration 120
"""

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (part, substring of a frame's symbol), first match from the innermost
# frame outwards.
PARTS = [
    ("simulated disk (its copies of the bytes)", "stretch_storage::sim_filesystem"),
    ("checker (simulator)", "stretch_sim::checker"),
    ("journal code", "stretch_storage::journal"),
    ("leg code", "stretch_storage::leg"),
    ("recovery code", "stretch_storage::start"),
    ("engine", "stretch_core::"),
    ("simulated network", "stretch_sim::network"),
]
UNDER_TEST = {"journal code", "leg code", "recovery code", "engine"}


def part_of(frames):
    for frame in frames:
        for part, needle in PARTS:
            if needle in frame:
                return part
    return "event loop and the rest (simulator)"


def samples(script_output):
    """The frames of each sample, innermost first."""
    frames = []
    for line in script_output.splitlines():
        if not line.strip():
            if frames:
                yield frames
            frames = []
        elif line[0] in " \t":
            frames.append(line.strip())
    if frames:
        yield frames


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", help="a scenario file, e.g. simulation/two-sites.toml")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, help="simulated seconds (default: the scenario's)")
    parser.add_argument(
        "--binary",
        default=os.path.join(ROOT, "target", "release", "stretch"),
        help="the stretch build to profile (default: target/release/stretch)",
    )
    parser.add_argument("--frequency", type=int, default=499, help="samples per second")
    arguments = parser.parse_args()
    if not os.path.exists(arguments.scenario):
        sys.exit(f"{arguments.scenario}: no such scenario file")
    if not os.access(arguments.binary, os.X_OK):
        sys.exit(f"{arguments.binary} is not an executable; build it with cargo build --release -p stretch-cli")
    if subprocess.run(["perf", "--version"], capture_output=True).returncode != 0:
        sys.exit("perf is not installed (apt-get install linux-perf)")

    command = [arguments.binary, "sim", "--scenario", arguments.scenario, "--seed", str(arguments.seed)]
    if arguments.duration is not None:
        command += ["--duration", str(arguments.duration)]
    with tempfile.TemporaryDirectory() as directory:
        data = os.path.join(directory, "perf.data")
        recorded = subprocess.run(
            ["taskset", "-c", "1", "perf", "record", "-q", "-F", str(arguments.frequency),
             "--call-graph", "dwarf,32768", "-o", data, *command],
            capture_output=True, text=True,
        )
        if recorded.returncode != 0:
            sys.exit(f"perf record failed:\n{recorded.stderr}")
        summary = [line for line in recorded.stdout.splitlines() if "wall s" in line]
        script = subprocess.run(
            ["perf", "script", "-i", data], capture_output=True, text=True, errors="replace"
        )
    counts = {}
    total = 0
    for frames in samples(script.stdout):
        part = part_of(frames)
        counts[part] = counts.get(part, 0) + 1
        total += 1
    if total == 0:
        sys.exit("perf recorded no samples")
    print(*summary, sep="\n")
    for part, count in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"{part:<46} {100 * count / total:5.1f} %")
    under_test = sum(count for part, count in counts.items() if part in UNDER_TEST) / total
    print(f"{'code under test':<46} {100 * under_test:5.1f} % of {total} samples")
    print(f"a simulator that cost nothing would run at most {1 / under_test:.2f}x faster")


if __name__ == "__main__":
    main()
