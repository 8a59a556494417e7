"""Blocks in open() of a FIFO that nobody opens for writing (argv[1])."""
import os
import sys

os.mkfifo(sys.argv[1])
print("ready", flush=True)
with open(sys.argv[1]) as fifo:
    fifo.read()
