"""A thread holds the GIL inside a native call (ctypes.PyDLL keeps it) while the main
thread waits for it."""
import ctypes
import ctypes.util
import threading
import time

libc = ctypes.PyDLL(ctypes.util.find_library("c"))


def hold():
    print("ready", flush=True)  # the holder prints: the main thread cannot get the GIL
    libc.sleep(3600)  # PyDLL: the GIL stays held for the whole call


threading.Thread(target=hold, name="holder", daemon=True).start()
while True:
    time.sleep(0.01)  # each wake-up needs the GIL back
