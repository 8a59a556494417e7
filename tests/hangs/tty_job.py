"""A background job that reads its terminal and is stopped by SIGTTIN: a session on a
new pseudo-terminal whose second process group reads stdin. Prints `ready PID` (the
job) and keeps the terminal open."""
import os
import pty
import re
import sys
import time

leader, master = pty.fork()
if leader == 0:  # the session leader: the pty is its controlling terminal
    job = os.fork()
    if job == 0:
        os.setpgid(0, 0)  # its own process group: a background job of this session
        sys.stdin.readline()  # a background read of the terminal: SIGTTIN stops it
        os._exit(0)
    os.setpgid(job, job)
    print(f"job {job}", flush=True)
    os.waitpid(job, 0)
    os._exit(0)
seen = b""
while b"\n" not in seen.split(b"job ", 1)[-1]:
    seen += os.read(master, 1024)
print("ready", re.search(rb"job (\d+)", seen).group(1).decode(), flush=True)
time.sleep(3600)
