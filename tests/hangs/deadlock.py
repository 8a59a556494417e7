"""Two threads take two locks in opposite orders: each holds what the other wants."""
import threading

a, b = threading.Lock(), threading.Lock()
both = threading.Barrier(2)


def first():
    with a:
        both.wait()
        with b:
            pass


def second():
    with b:
        both.wait()
        with a:
            pass


threads = [threading.Thread(target=first, name="first"), threading.Thread(target=second, name="second")]
for t in threads:
    t.start()
print("ready", flush=True)
for t in threads:
    t.join()
