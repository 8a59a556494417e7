"""What differs between macOS and Linux, and between machines (a cgroup's CPU quota,
where py-spy is, how the OpenMP runtime reads its variables), in one place: the rest of
lnsp asks here. Tests fake another system with LNSP_FAKE_PLATFORM (read only in `system()`).

Standard library only: lnsp's import (which sets the thread variables) reads it.
Nothing in the macOS branches was run on a Mac: each is reasoned from upstream sources
and exercised on Linux through the fake (docs/background.md, "macOS").
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

FAKE_ENV = "LNSP_FAKE_PLATFORM"
# Apple's BLAS (Accelerate/vecLib) reads this when it loads; numpy's macOS arm64 wheels
# (numpy >= 2.0, macOS >= 14) and torch's macOS wheels do their BLAS there.
ACCELERATE_THREADS = "VECLIB_MAXIMUM_THREADS"

# Signal numbers that are not the same on both systems (signal(7) on Linux x86/arm,
# <sys/signal.h> on Darwin). The others (HUP 1 ... TERM 15, TTIN 21, TTOU 22, XCPU 24 ...
# WINCH 28) agree. SIGUSR1 is 30 on macOS and 30 is SIGPWR on Linux, whose default
# action ends the process: across a boundary between the two a signal goes by name.
_DIFFERENT = {
    "linux": {"SIGBUS": 7, "SIGUSR1": 10, "SIGUSR2": 12, "SIGCHLD": 17, "SIGCONT": 18,
              "SIGSTOP": 19, "SIGTSTP": 20, "SIGURG": 23, "SIGIO": 29, "SIGPWR": 30,
              "SIGSYS": 31},
    "darwin": {"SIGEMT": 7, "SIGBUS": 10, "SIGSYS": 12, "SIGURG": 16, "SIGSTOP": 17,
               "SIGTSTP": 18, "SIGCONT": 19, "SIGCHLD": 20, "SIGIO": 23, "SIGINFO": 29,
               "SIGUSR1": 30, "SIGUSR2": 31},
}
_SHARED = {"SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6,
           "SIGFPE": 8, "SIGKILL": 9, "SIGSEGV": 11, "SIGPIPE": 13, "SIGALRM": 14,
           "SIGTERM": 15, "SIGTTIN": 21, "SIGTTOU": 22, "SIGXCPU": 24, "SIGXFSZ": 25,
           "SIGVTALRM": 26, "SIGPROF": 27, "SIGWINCH": 28}


def system(fake: str | None = None) -> str:
    """sys.platform ('darwin', 'linux'), or the system a test asks for (`fake`, else
    LNSP_FAKE_PLATFORM)."""
    return fake or os.environ.get(FAKE_ENV) or sys.platform


def is_macos(fake: str | None = None) -> bool:
    return system(fake) == "darwin"


def has_proc(fake: str | None = None) -> bool:
    """Whether /proc/PID/... can be read (Linux; not macOS, which has no /proc)."""
    return system(fake).startswith("linux") and os.path.isdir("/proc/self")


# ---------------------------------------------------------------- signals

def _table(name: str) -> dict[str, int]:
    return {**_SHARED, **_DIFFERENT.get("darwin" if name == "darwin" else "linux", {})}


def signal_name(signum: int, fake: str | None = None) -> str:
    """'SIGUSR1' for this system's number of it (30 on macOS, 10 on Linux)."""
    if system(fake) == sys.platform:
        return signal.Signals(int(signum)).name
    for name, number in _table(system(fake)).items():
        if number == int(signum):
            return name
    raise ValueError(f"no signal {int(signum)} on {system(fake)}")


def signal_number(name: str, fake: str | None = None) -> int:
    """This system's number of a signal name ('SIGUSR1' or 'USR1')."""
    name = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    if system(fake) == sys.platform:
        return int(signal.Signals[name])
    try:
        return _table(system(fake))[name]
    except KeyError:
        raise ValueError(f"no signal {name} on {system(fake)}") from None


# ---------------------------------------------------------------- processes

def read_file(path: str) -> str | None:
    """A /proc or /sys file's text (bytes that are not UTF-8 replaced), None where it
    cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


# Interpreter file names: python, python3.11, pypy3, and a macOS framework build's
# `.../Python.framework/.../Python.app/Contents/MacOS/Python` (python.org, Homebrew).
_PYTHON_NAME = re.compile(r"(python|pypy)([0-9.]*[a-z]?)?(\.exe)?$", re.IGNORECASE)


def is_python(exe_or_name: str) -> bool:
    """Whether an executable path or process name is a Python interpreter's."""
    return bool(_PYTHON_NAME.match(os.path.basename(exe_or_name or "")))


def tool(name: str) -> str | None:
    """A helper program's path (py-spy, pystack), or None: first beside this interpreter
    (installed with lnsp into its environment, a build that knows this Python), then
    beside lnsp's own interpreter (LNSP_PYTHON: a guarded script's interpreter may lack
    it), last on PATH (a system-wide copy, perhaps older than this Python)."""
    for python in (sys.executable, os.environ.get("LNSP_PYTHON", "")):
        beside = os.path.join(os.path.dirname(python), name) if python else ""
        if beside and os.path.isfile(beside) and os.access(beside, os.X_OK):
            return beside
    return shutil.which(name)


def ptrace_problem(fake: str | None = None) -> str:
    """Why py-spy may not read another process, in this system's words."""
    if is_macos(fake):
        return "py-spy needs sudo on macOS (in every mode)"
    return ("no ptrace permission (run as the process's user with "
            "/proc/sys/kernel/yama/ptrace_scope 0, or as root)")


def caffeinate_held(pid: int) -> bool:
    """Whether a live `caffeinate` holds a power assertion for `pid`: one started as
    `caffeinate ... -w PID` (the supervisor starts it beside the trainer, a sibling), or
    one that is the process's parent (`caffeinate python ...`)."""
    import psutil

    try:
        if any(p.name() == "caffeinate" for p in psutil.Process(pid).parents()):
            return True
    except psutil.Error:
        return False
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] != "caffeinate":
            continue
        argv = p.info["cmdline"] or []
        if any(a == "-w" and b == str(pid) for a, b in zip(argv, argv[1:])):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                continue
    return False


# ---------------------------------------------------------------- memory and cores

def peak_rss_bytes(maxrss: int | None = None, fake: str | None = None) -> int:
    """Peak resident memory of this process from getrusage's ru_maxrss, which is in
    kilobytes on Linux and in bytes on macOS (getrusage(2) on each)."""
    if maxrss is None:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if is_macos(fake) else int(maxrss) * 1024


def performance_cores(fake: str | None = None) -> int | None:
    """On macOS, the performance cores (`sysctl hw.perflevel0.physicalcpu`, Apple
    silicon; macOS 12+): an OpenMP region split evenly waits for its slowest thread, so
    threads on the efficiency cores slow every region down. None where the OS does not
    say (Linux, an Intel Mac)."""
    if not is_macos(fake):
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True,
                             text=True, timeout=5, stdin=subprocess.DEVNULL)
        n = int(out.stdout.strip()) if out.returncode == 0 else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return n if n > 0 else None


def cgroup_cpu(pid: int | str = "self", fake: str | None = None) -> dict | None:
    """The CPU quota of a process's cgroup and how often it held the process back:
    {"cgroup": its folder, "quota": "QUOTA PERIOD" as cgroup v2's cpu.max writes it,
    "cores": the quota in cores (None: no limit), "nr_throttled": periods throttled,
    "throttled_s": seconds throttled}. cgroup v2, or v1's cpu controller; None where no
    cgroup says (macOS, no cpu controller)."""
    if not has_proc(fake):
        return None
    for line in (read_file(f"/proc/{pid}/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            roots = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        elif "cpu" in controllers.split(","):
            roots = [f"/sys/fs/cgroup/{controllers}", "/sys/fs/cgroup/cpu",
                     "/sys/fs/cgroup/cpu,cpuacct"]
        else:
            continue
        # Last the roots themselves: in a container that shares the host's cgroup
        # namespace, /proc names the host's path and the container's own group is
        # mounted at the root.
        for folder in [root + path.rstrip("/") for root in roots] + roots:
            try:
                found = _cpu_quota(folder)
            except ValueError:  # not a number where the kernel writes one: no quota known
                found = None
            if found:
                return found
    return None


def _cpu_quota(folder: str) -> dict | None:
    quota = (read_file(f"{folder}/cpu.max") or "").split()  # v2: "max 100000", "50000 100000"
    if not quota:  # v1: -1 for no limit
        v1 = read_file(f"{folder}/cpu.cfs_quota_us"), read_file(f"{folder}/cpu.cfs_period_us")
        if None in v1:
            return None
        quota = ["max" if int(v1[0]) < 0 else v1[0].strip(), v1[1].strip()]
    counters = dict(line.split(None, 1) for line in
                    (read_file(f"{folder}/cpu.stat") or "").splitlines() if " " in line)
    throttled = (int(counters["throttled_time"]) / 1e9 if "throttled_time" in counters  # v1: ns
                 else int(counters.get("throttled_usec", 0)) / 1e6)
    return {"cgroup": folder, "quota": " ".join(quota),
            "cores": None if quota[0] == "max" else int(quota[0]) / int(quota[1]),
            "nr_throttled": int(counters.get("nr_throttled", 0)), "throttled_s": throttled}


# ---------------------------------------------------------------- OpenMP runtimes

def openmp_family(name: str) -> str | None:
    """Which OpenMP runtime a library file is (libgomp.so.1, libgomp-a34b3233.so.1,
    libomp.dylib, libiomp5.so)."""
    name = os.path.basename(name)
    if re.match(r"libgomp[.-]", name):
        return "GNU libgomp"
    if re.match(r"libiomp5", name):
        return "Intel libiomp5"
    if re.match(r"libomp[.-]", name):
        return "LLVM libomp"
    return None


def openmp_conflict(paths: list[str], fake: str | None = None) -> tuple[str, str] | None:
    """The hazard of the OpenMP runtimes loaded in one process (their file paths), as
    (kind, one line), or None for one runtime or none:

    - "mixed": different runtimes (libgomp + libiomp5, libgomp + libomp): they share no
      threads or locks; reported to hang at 0% CPU in a barrier.
    - "duplicate": two copies of LLVM libomp or Intel libiomp5 (macOS: torch's and
      faiss-cpu's wheels each bundle a libomp.dylib): the second aborts with "OMP:
      Error #15" unless KMP_DUPLICATE_LIB_OK hides it, and then can crash or hang
      (pytorch#149201, faiss-wheels#73).
    - "copies": two copies of GNU libgomp (torch's and faiss's Linux wheels): two pools
      that each size themselves to the cores, and a fork after either has run hangs
      the child.
    """
    families: dict[str, list[str]] = {}
    for path in dict.fromkeys(paths):
        family = openmp_family(path)
        if family:
            families.setdefault(family, []).append(path)
    listed = "; ".join(f"{fam}: {', '.join(p)}" for fam, p in families.items())
    if len(families) > 1:
        return "mixed", (f"{len(families)} different OpenMP runtimes loaded ({listed}): they "
                         "share no threads or locks and are reported to hang at 0% CPU")
    if not families:
        return None
    (family, copies), = families.items()
    if len(copies) < 2:
        return None
    if family != "GNU libgomp":
        where = (" (torch's and faiss-cpu's macOS wheels each bundle one)"
                 if is_macos(fake) else "")
        return "duplicate", (f"{len(copies)} copies of {family} loaded{where} ({listed}): the "
                             "second aborts with 'OMP: Error #15' unless KMP_DUPLICATE_LIB_OK "
                             "hides it, and then they can crash or hang")
    return "copies", (f"{len(copies)} copies of {family} loaded ({listed}): two pools that "
                      "each size themselves to the cores, and a fork after either has run "
                      "hangs the child")


# What Intel's and LLVM's OpenMP runtime read as yes (__kmp_str_match_true, kmp_str.cpp):
# a word, case aside, cut to no fewer than this many letters (0: the whole word only).
_KMP_TRUE = (("true", 1), ("on", 2), ("1", 1), (".true.", 2), (".t.", 2), ("yes", 1),
             ("enabled", 0))


def kmp_duplicate_ok(value: str | None) -> bool:
    """Whether KMP_DUPLICATE_LIB_OK=`value` lets a second copy of libomp or libiomp5
    start instead of aborting with OMP: Error #15: as the runtime reads it, so "y", "on"
    and "10" are yes and "0", "FALSE" and "enable" no."""
    for word, least in _KMP_TRUE:
        n = min(len(word), len(value or ""))
        if value and word[:n] == value[:n].lower() and (
                n >= least if least else n == len(word) == len(value)):
            return True
    return False


def mapped_files(pid: int, fake: str | None = None) -> list[str]:
    """The files mapped into a process, in order, each once: /proc/PID/maps on Linux;
    on macOS `lsof -p PID -Fn`, whose `txt` entries are the executable and the loaded
    dylibs outside the shared cache (site-packages' libomp.dylib among them). Empty
    when neither can be read."""
    paths: list[str] = []
    if has_proc(fake):
        text = read_file(f"/proc/{pid}/maps")
        if text is None:
            return []
        for line in text.splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                paths.append(parts[5].strip())
    elif is_macos(fake):
        try:
            out = subprocess.run(["lsof", "-n", "-P", "-p", str(pid), "-Fn"], capture_output=True,
                                 text=True, timeout=10, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return []
        paths = [line[1:] for line in out.stdout.splitlines() if line.startswith("n/")]
    return list(dict.fromkeys(paths))


def gloo_loopback(environ=None, fake: str | None = None) -> dict[str, str]:
    """For ranks that all run on this machine, on macOS: GLOO_SOCKET_IFNAME=lo0. gloo
    picks its interface by resolving the host's name, and a Mac's `.local` name may
    resolve to no address or to a LAN one (reported on GitHub's macOS runners: the
    rendezvous fails or crawls). A user's own value wins; Linux resolves to loopback
    already and is left alone."""
    environ = os.environ if environ is None else environ
    if not is_macos(fake) or environ.get("GLOO_SOCKET_IFNAME"):
        return {}
    return {"GLOO_SOCKET_IFNAME": "lo0"}


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths in one system call (Linux renameat2 RENAME_EXCHANGE, macOS
    renamex_np RENAME_SWAP): no moment in which either name is missing. False where
    the system or the file system cannot; the caller then renames in two steps."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    a, b = os.fsencode(a), os.fsencode(b)
    if sys.platform == "darwin":
        swap = getattr(libc, "renamex_np", None)
        return swap is not None and swap(a, b, 0x00000002) == 0  # RENAME_SWAP
    swap = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    return swap is not None and swap(at_fdcwd, a, at_fdcwd, b, rename_exchange) == 0


def share_openmp(site_packages: str | os.PathLike | None = None,
                 fake: str | None = None) -> list[str]:
    """macOS: one OpenMP runtime per process. torch's and faiss-cpu's wheels each bundle
    a libomp.dylib, and a process that imports both loads two (above); faiss's copy is
    replaced by a link to torch's, so both load the same file and dyld maps it once.
    Run by `make setup` after the install; nothing to do elsewhere (Linux wheels use
    GNU libgomp, which tolerates its copies). Returns what was linked."""
    import sysconfig
    from pathlib import Path

    if not is_macos(fake):
        return []
    root = Path(site_packages or sysconfig.get_paths()["purelib"])
    torch_omp = root / "torch" / "lib" / "libomp.dylib"
    if not torch_omp.is_file():
        return []
    linked = []
    for copy in sorted((root / "faiss").glob("**/libomp*.dylib")):
        if copy.is_symlink() and copy.resolve() == torch_omp.resolve():
            continue
        copy.unlink()
        copy.symlink_to(torch_omp)
        linked.append(f"{copy} -> {torch_omp}")
    return linked
