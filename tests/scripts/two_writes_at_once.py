#!/usr/bin/python3
"""Writes two ranges of random bytes with one NBD connection, both
requests in flight together: URI FIRST_BYTES SECOND_BYTES SEED OUT.

The first range starts at 0, the second at 8 MiB. Writes to the file OUT
the volume's first 8 MiB + SECOND_BYTES as the writes leave them (the gap
between the ranges, if any, as zeros on a fresh volume).
"""

import random
import sys

import nbd

uri, first_bytes, second_bytes, seed, out = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    sys.argv[5],
)
rng = random.Random(seed)
first = rng.randbytes(first_bytes)
second = rng.randbytes(second_bytes)
handle = nbd.NBD()
handle.connect_uri(uri)
handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(first)), 0)
handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(second)), 8 << 20)
while handle.aio_in_flight() > 0:
    handle.poll(-1)
handle.shutdown()
with open(out, "wb") as image:
    image.write(first + bytes((8 << 20) - first_bytes) + second)
