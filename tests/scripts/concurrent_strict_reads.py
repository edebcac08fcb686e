#!/usr/bin/python3
"""Concurrent strict reads against owner writes, checked (libnbd, a real
client): one thread rewrites a random tenth of the regions at the owner's
export over and over, the other reads the whole volume at the other site's
strict export in a loop, at the same time.

Every 4 KiB block written carries its region, its version and a checksum-like
fill. A read of a block must show a version at least as new as the newest
write of that block acknowledged before the read began (G2: nothing older),
and never one that was not written yet. Prints a summary line and exits 1
on the first violation.

Usage: concurrent_strict_reads.py OWNER_URI OTHER_URI REGIONS SECONDS SEED
"""

import struct
import sys
import threading
import time
import random

import nbd  # Debian python3-libnbd

MIB = 1 << 20
BLOCK = 4096
# Blocks of each 1 MiB region that are written and checked: a few spread
# over the region, so a read of one block says something about its region.
CHECKED_BLOCKS = (0, 5, 128, 255)


def block_bytes(region, version):
    head = struct.pack("<QQ", region, version)
    fill = bytes([(region * 31 + version * 7) % 251 + 1]) * (BLOCK - len(head))
    return head + fill


def decode(data, region):
    found_region, version = struct.unpack("<QQ", data[:16])
    if data == bytes(BLOCK):
        return 0
    if found_region != region or data != block_bytes(region, version):
        return None
    return version


def main():
    owner_uri, other_uri, regions, seconds, seed = sys.argv[1:6]
    regions, seconds, seed = int(regions), float(seconds), int(seed)
    lock = threading.Lock()
    # Per region: newest version acknowledged, newest version issued.
    acknowledged = [0] * regions
    issued = [0] * regions
    failures = []
    counts = {"writes": 0, "reads": 0}
    deadline = time.monotonic() + seconds

    writer_handle = nbd.NBD()
    writer_handle.connect_uri(owner_uri)
    # Version 1 of every region first, then the other site is read.
    for region in range(regions):
        for block in CHECKED_BLOCKS:
            writer_handle.pwrite(block_bytes(region, 1), region * MIB + block * BLOCK)
        acknowledged[region] = issued[region] = 1

    def writer():
        rng = random.Random(seed)
        while time.monotonic() < deadline and not failures:
            chosen = rng.sample(range(regions), max(1, regions // 10))
            for region in chosen:
                with lock:
                    version = issued[region] + 1
                    issued[region] = version
                for block in CHECKED_BLOCKS:
                    writer_handle.pwrite(block_bytes(region, version),
                                         region * MIB + block * BLOCK)
                with lock:
                    acknowledged[region] = version
                    counts["writes"] += 1
            time.sleep(rng.uniform(0, 0.2))

    def reader():
        handle = nbd.NBD()
        handle.connect_uri(other_uri)
        while time.monotonic() < deadline and not failures:
            for region in range(regions):
                with lock:
                    floor = acknowledged[region]
                for block in CHECKED_BLOCKS:
                    data = handle.pread(BLOCK, region * MIB + block * BLOCK)
                    version = decode(data, region)
                    with lock:
                        ceiling = issued[region]
                    if version is None or version < floor or version > ceiling:
                        failures.append(
                            f"region {region} block {block}: read version {version}, but "
                            f"version {floor} was acknowledged before the read began "
                            f"(newest issued {ceiling})")
                        return
                with lock:
                    counts["reads"] += 1
        handle.shutdown()

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer_handle.shutdown()
    print(f"{counts['writes']} region writes, {counts['reads']} region reads, "
          f"{len(failures)} violations")
    if failures:
        print(failures[0])
        sys.exit(1)


if __name__ == "__main__":
    main()
