"""Sleeps: the target of a stop (SIGSTOP) and of the `unknown` verdict."""
import time

print("ready", flush=True)
time.sleep(3600)
