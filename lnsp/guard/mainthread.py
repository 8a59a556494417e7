"""Is the main thread still running Python? A stalled step is either blocked in native
code (a syscall, a lock, a BLAS call, a collective) or running Python that makes no
progress (a loop, a retry): the fixes differ, so the watchdog says which.

The check schedules a pending call with `Py_AddPendingCall`: CPython runs pending
calls only in the main thread, between bytecodes. If it runs within a short time the
main thread is executing Python; if not, it is inside native code (or waiting for the
GIL). This is how NVIDIA's in-process restart tells the two apart.
"""

from __future__ import annotations

import ctypes
import threading

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_add_pending_call = ctypes.pythonapi.Py_AddPendingCall
_add_pending_call.argtypes = [_CALLBACK, ctypes.c_void_p]
_add_pending_call.restype = ctypes.c_int


class MainThreadProbe:
    """One probe at a time; `runs_python(timeout)` from any thread but the main one."""

    def __init__(self):
        self._ran = threading.Event()
        self._lock = threading.Lock()
        # Kept alive for the life of the probe: CPython may call it long after the
        # watchdog gave up waiting (when the main thread leaves native code).
        self._callback = _CALLBACK(self._mark)

    def _mark(self, _arg) -> int:
        self._ran.set()
        return 0

    def runs_python(self, timeout: float = 1.0) -> bool | None:
        """True: the main thread ran our pending call (it executes bytecode); False: it
        did not within `timeout` (native code, or a wait for the GIL); None: the
        pending-call queue was full, so nothing can be said."""
        with self._lock:
            self._ran.clear()
            if _add_pending_call(self._callback, None) != 0:
                return None
            return self._ran.wait(timeout)


def describe(runs_python: bool | None) -> str:
    """Words for the stall line."""
    if runs_python is None:
        return "main thread: unknown (pending-call queue full)"
    if runs_python:
        return "main thread is running Python without progress (a loop or a retry)"
    return "main thread is blocked in native code (a syscall, a lock, a C extension)"
