"""`lnsp doctor`: what in this process and on this machine can make a run hang, with
each known hazard named next to its fix."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys

from lnsp import system
from lnsp.guard.threads import THREAD_VARS, USER_KMP_DUPLICATE_LIB_OK


def facts(snapshot: bool = False) -> dict:
    """`snapshot`: as this process is now, for a hang bundle taken inside a stuck run:
    the pools are read, not resized, and the container engine is not asked."""
    import faiss
    import numpy
    import torch

    from lnsp.guard import threads

    if not snapshot:
        threads.enforce()
    pools = threads.pools()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    docker_engine = "not asked (snapshot of a running process)" if snapshot else _docker_engine()
    return {
        "platform": platform.platform(), "machine": platform.machine(),
        "python": sys.version.split()[0], "cores": threads.cpu_count(),
        "versions": {"torch": torch.__version__, "numpy": numpy.__version__,
                     "faiss": faiss.__version__},
        "torch_threads": torch.get_num_threads(), "pools": pools,
        "thread_env": {**{k: os.environ.get(k) for k in (*THREAD_VARS, "OMP_WAIT_POLICY",
                                                         "KMP_BLOCKTIME", "GOMP_SPINCOUNT")},
                       # the user's, read before threadpoolctl could set its own
                       "KMP_DUPLICATE_LIB_OK": USER_KMP_DUPLICATE_LIB_OK},
        # What this process runs with: threadpoolctl's True when the user set nothing.
        "kmp_duplicate_lib_ok_here": os.environ.get("KMP_DUPLICATE_LIB_OK"),
        "start_method": multiprocessing.get_start_method(allow_none=True) or
        multiprocessing.get_context().get_start_method(),
        "open_files": {"soft": soft, "hard": hard},
        "stdout_tty": sys.stdout.isatty(),
        "python_unbuffered": bool(os.environ.get("PYTHONUNBUFFERED")),
        "tools": {"caffeinate": shutil.which("caffeinate"), "tmux": shutil.which("tmux"),
                  "docker": shutil.which("docker"), "py-spy": system.tool("py-spy")},
        "docker_engine": docker_engine,
    }


def _docker_engine() -> str:
    try:
        import docker

        client = docker.from_env(timeout=3)
        return "reachable, version " + client.version().get("Version", "?")
    except Exception as e:  # any failure means: not usable from here
        return f"not reachable ({type(e).__name__})"


def hazards(f: dict) -> list[str]:
    found = []
    omp = [p for p in f["pools"] if p["api"] == "openmp"]
    conflict = system.openmp_conflict([p.get("filepath") or p["library"] for p in omp])
    if conflict:
        kind, line = conflict
        fix = {"copies": "never fork after OpenMP work (lnsp uses spawn for workers); keep "
                         "one thread (--threads safe) if a library forks behind your back.",
               "duplicate": "install builds that share one OpenMP runtime (conda-forge's "
                            "torch and faiss link one libomp), or --threads safe; never rely "
                            "on KMP_DUPLICATE_LIB_OK.",
               "mixed": "install builds that use one runtime (pip torch and faiss-cpu use GNU "
                        "libgomp on Linux; drop intel-openmp/llvm-openmp, or "
                        "MKL_THREADING_LAYER=GNU); never set KMP_DUPLICATE_LIB_OK=TRUE."}[kind]
        found.append(f"{len(omp)} OpenMP runtimes loaded: {line}. Fix: {fix}")
        here = f.get("kmp_duplicate_lib_ok_here")
        if kind != "copies" and system.kmp_duplicate_ok(here) and \
                not system.kmp_duplicate_ok(f["thread_env"].get("KMP_DUPLICATE_LIB_OK")):
            # threadpoolctl's import set it (os.environ.setdefault): this process may have
            # lived through the second copy only because of that.
            found.append(f"KMP_DUPLICATE_LIB_OK={here} in this process was set by "
                         "threadpoolctl's import, not by you: it hides the duplicate runtime "
                         "here; a script that does not import threadpoolctl aborts instead.")
    if system.kmp_duplicate_ok(f["thread_env"].get("KMP_DUPLICATE_LIB_OK")):
        # Intel's runtime aborts when it finds a second OpenMP runtime; this variable
        # silences the abort and leaves two runtimes that are reported to hang at 0% CPU
        # in the OpenMP barrier (https://github.com/pytorch/pytorch/issues/193520).
        found.append("KMP_DUPLICATE_LIB_OK=TRUE hides a duplicate OpenMP runtime (libiomp5 "
                     "beside libgomp/libomp), which is reported upstream to hang. Fix: unset "
                     "it and install packages that share one OpenMP runtime; `lnsp diagnose` "
                     "names the runtimes a stuck process maps.")
    # An OpenMP-threaded BLAS runs in its OpenMP runtime's pool, not one of its own.
    busy = [p for p in f["pools"] if p["threads"] > 1 and p.get("threading_layer") != "openmp"]
    if len(busy) > 2:
        found.append(f"{len(busy)} thread pools sized above one thread: they oversubscribe "
                     "the cores. Fix: set the thread variables before importing numpy/torch/faiss "
                     "(lnsp does), or --threads safe.")
    if f["start_method"] == "fork":
        found.append("multiprocessing start method is fork: a child forked after OpenMP "
                     "work hangs. Fix: spawn (lnsp's DataLoader workers always use spawn).")
    if not f["stdout_tty"] and not f["python_unbuffered"]:
        found.append("stdout is not a terminal and PYTHONUNBUFFERED is unset: output is "
                     "block-buffered and a background run looks silent. Fix: python -u or "
                     "PYTHONUNBUFFERED=1 (the launchers set it).")
    if f["open_files"]["soft"] < 4096:
        found.append(f"open-file limit {f['open_files']['soft']} is low for DataLoader "
                     "workers. Fix: ulimit -n 4096 (the launchers raise it).")
    if system.is_macos() and not f["tools"]["caffeinate"]:
        found.append("caffeinate not found: App Nap can throttle a background run to a "
                     "standstill. Fix: run in the foreground, or restore /usr/bin/caffeinate.")
    if system.is_macos():
        found.append("macOS: background processes can be throttled by App Nap. Fix: "
                     "make train-nohup / train-tmux hold `caffeinate -i -s -w PID` for each trainer.")
    if system.is_macos() and f["tools"]["py-spy"] and os.geteuid() != 0:
        found.append(f"{system.ptrace_problem()}: without it dumps carry no native frames "
                     "and a stall's diagnosis has no stacks to judge. Fix: "
                     "sudo lnsp diagnose PID (or sudo py-spy dump --pid PID).")
    if not f["tools"]["py-spy"]:
        found.append("py-spy missing: dumps show Python frames only, not the native frame "
                     "of a hang in OpenMP/BLAS. Fix: pip install py-spy.")
    return found


def report(as_json: bool = False) -> str:
    f = facts()
    f["hazards"] = hazards(f)
    if as_json:
        return json.dumps(f, indent=2)
    lines = [f"platform      {f['platform']} ({f['cores']} cores)",
             f"python        {f['python']}  torch {f['versions']['torch']}  "
             f"numpy {f['versions']['numpy']}  faiss {f['versions']['faiss']}",
             f"torch threads {f['torch_threads']}", "thread pools:"]
    lines += [f"  {p['api']:<8} {p['threads']:>3} threads  {p['library']}" for p in f["pools"]]
    lines += ["thread variables:"]
    lines += [f"  {k}={v}" for k, v in f["thread_env"].items()]
    lines += [f"start method  {f['start_method']}",
              f"open files    soft {f['open_files']['soft']}, hard {f['open_files']['hard']}",
              f"stdout        {'terminal' if f['stdout_tty'] else 'not a terminal'}, "
              f"PYTHONUNBUFFERED {'set' if f['python_unbuffered'] else 'unset'}"]
    lines += [f"tool {name:<11}{path or 'not found'}" for name, path in f["tools"].items()]
    lines += [f"docker engine {f['docker_engine']}", "hazards:"]
    lines += [f"  ! {h}" for h in f["hazards"]] or ["  none found"]
    return "\n".join(lines)
