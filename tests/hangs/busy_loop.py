"""Spins forever in one Python loop that never meets its exit condition."""
print("ready", flush=True)
n = 0
while n >= 0:
    n = (n + 1) % 1000
