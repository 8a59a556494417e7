"""Touches every page of a buffer larger than its memory limit, over and over: under a
cgroup memory limit with swap, each pass swaps the buffer back in."""
import sys

size = int(sys.argv[1]) << 20
buf = bytearray(size)
pages = size // 4096
value = 1
while True:
    buf[::4096] = bytes([value]) * pages  # one write per page
    if value == 1:
        print("ready", flush=True)
    value = value % 250 + 1
