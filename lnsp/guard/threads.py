"""Thread policy: how many threads each OpenMP/BLAS pool in the process may use.

Set in two stages: environment variables before numpy/torch/faiss are first imported
(the BLAS libraries read them at load time), then enforced on every loaded pool.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

from lnsp import system

# Variables read by the OpenMP and BLAS runtimes when they load.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
DEFAULT_POLICY = "fast"
# `fast` on an idle machine: idle OpenMP threads spin this long before they sleep
# (libgomp: about 100,000 spins a millisecond, so ~0.1 ms), sparing the wake-ups between
# the GRU's small parallel regions. Measured (docs/performance.md): 1.3-1.5x PASSIVE at
# batch 64 on the idle machine, but 0.3x when other processes share the cores; hence
# only when, at start, no other process wants the policy's cores.
SPIN_COUNT = 10_000
DEFAULTS_MARK = "LNSP_THREAD_DEFAULTS"  # names of the thread variables lnsp set itself


def cpu_count() -> int:
    """Cores this process may use: affinity mask, capped by a cgroup CPU quota; on
    macOS the performance cores where the OS says (an OpenMP region waits for its
    slowest thread, and one on an efficiency core slows every region down)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        n = os.cpu_count() or 1
    n = system.performance_cores() or n
    quota = system.cgroup_cpu()
    if quota and quota["cores"]:
        n = min(n, max(1, int(quota["cores"])))
    return n


def read_env_file(path: str | Path = ".env") -> dict[str, str]:
    """The KEY=VALUE pairs of a .env file ({} when there is none), read by python-dotenv (imported at the call: the guard's processes may lack it):
    quotes, `export`, escapes and `#` comments as a shell would take them. The one reader
    of .env in lnsp."""
    from dotenv import dotenv_values

    if not Path(path).is_file():
        return {}
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def parse_policy(value: str | None, ranks: int | None = None) -> tuple[str, int]:
    """'safe' -> one thread everywhere; 'fast' -> the cores, shared by the ranks on this
    machine (torchrun's LOCAL_WORLD_SIZE); an integer -> fast with N."""
    value = (value or DEFAULT_POLICY).strip().lower()
    if value == "safe":
        return "safe", 1
    if value == "fast":
        ranks = ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return "fast", max(1, cpu_count() // max(1, ranks))
    if value.isdigit() and int(value) > 0:
        return ("safe", 1) if int(value) == 1 else ("fast", int(value))
    raise ValueError(f"threads must be safe, fast or a positive integer, not {value!r}")


def machine_idle(threads: int, load: float | None = None) -> bool:
    """Whether the cores a pool of `threads` would take are free: fewer than half of
    them wanted by other processes now (`load`: measured when not given)."""
    if load is None:
        load = runnable_others()
    return load is not None and load < threads / 2


def runnable_others(reads: int = 3) -> float | None:
    """Other processes runnable at this moment: Linux's procs_running (less this one),
    the median of a few reads 2 ms apart; elsewhere the 1-minute load average (which
    lags: a run that ended seconds ago still counts). None when neither is readable."""
    import time

    counts = []
    for i in range(reads):
        try:
            with open("/proc/stat") as f:
                counts += [int(line.split()[1]) - 1 for line in f
                           if line.startswith("procs_running")]
        except (OSError, ValueError, IndexError):
            break
        if i + 1 < reads:
            time.sleep(0.002)
    if len(counts) == reads:
        return float(sorted(counts)[reads // 2])
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def policy_env(value: str | None, ranks: int | None = None,
               load: float | None = None) -> dict[str, str]:
    """The environment a process of this policy needs before its first heavy import.

    OMP_NUM_THREADS sizes torch's and faiss's OpenMP pools (lnsp's matrix work runs
    there; faiss's bundled OpenBLAS is an OpenMP build that runs on faiss's pool and is
    raised to the same count in enforce()). The pthreads BLAS pools (numpy's) stay at
    one thread: no training phase uses them, and their threads would spin beside the
    OpenMP ones. Idle OpenMP threads sleep (PASSIVE) instead of spinning: torch's and
    faiss's pools take the cores in turn, and on a shared machine a spinning thread
    burns the time slice its partner needs (measured: docs/performance.md). The
    exception: `fast` for one process on a machine idle at start (`load`: processes
    wanting a core, measured when not given) spins SPIN_COUNT times first
    (GOMP_SPINCOUNT, which libgomp reads over OMP_WAIT_POLICY).
    """
    kind, n = parse_policy(value, ranks)
    env = {name: "1" for name in THREAD_VARS}
    env["OMP_NUM_THREADS"] = str(n)
    if system.is_macos():
        # On macOS torch's and numpy's BLAS is Accelerate (vecLib): the GRU's and the
        # miner's matrix products run in its pool, not an OpenMP one, so one thread
        # there would leave `fast` on one core.
        env[system.ACCELERATE_THREADS] = str(n)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["KMP_BLOCKTIME"] = "0"
    one_process = (ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) <= 1
    if kind == "fast" and n > 1 and one_process and machine_idle(n, load):
        env["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return env


def requested_policy(argv: list[str] | None = None) -> str | None:
    """The --threads value of a command line, else a resumed run's, else LNSP_THREADS,
    else .env's."""
    argv = sys.argv if argv is None else argv
    found = None
    for i, arg in enumerate(argv):  # the last one wins, as in click
        if arg == "--threads" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--threads="):
            found = arg.split("=", 1)[1]
    if found:
        return found
    stored = _resumed_policy(argv)
    if stored:
        return stored
    if os.environ.get("LNSP_THREADS"):
        return os.environ["LNSP_THREADS"]

    return read_env_file().get("LNSP_THREADS")


def _resumed_policy(argv: list[str]) -> str | None:
    """A resumed run keeps the policy stored in its run directory's config.json."""
    if "--resume" not in argv or "--run-dir" not in argv[:-1]:
        return None
    import json

    from lnsp.rundir import RunDir  # here: every `import lnsp` runs this module

    path = RunDir(argv[argv.index("--run-dir") + 1]).config
    try:
        with open(path) as f:
            return json.load(f).get("threads")
    except (OSError, ValueError):
        return None


def set_env_defaults(argv: list[str] | None = None) -> None:
    """Before numpy/torch/faiss load: set the thread variables the user has not set,
    and remember which ones lnsp set (a child process chooses its own)."""
    try:
        env = policy_env(requested_policy(argv))
    except ValueError:
        env = policy_env("safe")  # the bad value is reported by config validation
    ours = set(os.environ.get(DEFAULTS_MARK, "").split(","))
    set_here = []
    for name, value in env.items():
        if name not in os.environ or name in ours:
            os.environ[name] = value
            set_here.append(name)
    for name in ours - set(env) - {""}:  # chosen for a parent's policy, not for this one
        os.environ.pop(name, None)
    os.environ[DEFAULTS_MARK] = ",".join(set_here)


# threadpoolctl sets KMP_DUPLICATE_LIB_OK=True in the process that imports it
# (os.environ.setdefault): a child must not inherit that as if the user had hidden a
# duplicate OpenMP runtime. What the user's own environment held is kept here, read
# when lnsp is first imported, before threadpoolctl can be.
USER_KMP_DUPLICATE_LIB_OK = os.environ.get("KMP_DUPLICATE_LIB_OK")


def user_environment(environ=None) -> dict[str, str]:
    """The environment less the thread variables that lnsp (or threadpoolctl) set
    itself: what the user set wins; what was chosen for this process is not passed on
    as if it were theirs."""
    environ = os.environ if environ is None else environ
    ours = set(environ.get(DEFAULTS_MARK, "").split(","))
    if USER_KMP_DUPLICATE_LIB_OK is None:
        ours.add("KMP_DUPLICATE_LIB_OK")
    return {k: v for k, v in environ.items() if k not in ours and k != DEFAULTS_MARK}


def enforce() -> int:
    """After import: size every loaded pool as the environment says. Returns the
    OpenMP count. The environment is the source of truth, so a user's own
    OMP_NUM_THREADS / OPENBLAS_NUM_THREADS win over the policy's."""
    import faiss
    import threadpoolctl
    import torch

    n = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    blas = max(1, int(os.environ.get("OPENBLAS_NUM_THREADS", "1")))
    # A count lnsp chose for the BLAS pools applies to the pthreads ones (numpy's);
    # faiss's OpenBLAS runs on faiss's OpenMP pool and gets the OpenMP count: it is
    # the same threads, so no pool is added (a user's own OPENBLAS_NUM_THREADS wins).
    ours = "OPENBLAS_NUM_THREADS" in os.environ.get(DEFAULTS_MARK, "").split(",")
    for lib in threadpoolctl.ThreadpoolController().lib_controllers:
        if lib.user_api == "blas":
            openmp_blas = getattr(lib, "threading_layer", None) == "openmp"
            lib.set_num_threads(n if ours and openmp_blas else blas)
    # BLAS first: limiting an OpenMP-built OpenBLAS resets its runtime's pool, so the
    # OpenMP counts must be set after it.
    threadpoolctl.threadpool_limits(limits=n, user_api="openmp")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has run
        pass
    faiss.omp_set_num_threads(n)
    # Any child process starts fresh: a forked child of a process that ran OpenMP
    # blocks forever in its first parallel region.
    multiprocessing.set_start_method("spawn", force=True)
    return n


def pools() -> list[dict]:
    """Every loaded BLAS/OpenMP pool with its live thread count."""
    import threadpoolctl

    return [
        {
            "api": p["internal_api"],
            "threads": p["num_threads"],
            "library": os.path.basename(p["filepath"]),
            "filepath": p["filepath"],
            "version": p.get("version"),
            "threading_layer": p.get("threading_layer"),
        }
        for p in threadpoolctl.threadpool_info()
    ]
