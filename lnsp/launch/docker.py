"""docker backend (docker-py): a detached container named and labelled after the run,
with an init process so signals reach the trainer, the data mounted read-only, the
run directory read-write, the invoking user's uid:gid and SYS_PTRACE for native dumps.

Both are mounted at their own absolute paths, so config.json holds the same paths
inside and out, and a run can be resumed natively or in a container alike."""

from __future__ import annotations

import os
from pathlib import Path

from lnsp import procs
from lnsp.errors import LaunchError
from lnsp.launch.command import environment
from lnsp.rundir import ExitCode, RunRecord
from lnsp.guard.threads import user_environment

IMAGE = "lnsp:latest"
LABEL = "lnsp.run"
# Seconds an engine call may take (LNSP_DOCKER_TIMEOUT): past it, the engine is
# "not answering", which says nothing about whether the container still runs.
TIMEOUT_S = float(os.environ.get("LNSP_DOCKER_TIMEOUT", "30"))


class EngineError(LaunchError):
    """The engine did not answer (down, timed out, a server error): a container's state
    is unknown, not gone."""

    exit_code = ExitCode.INTERNAL


def client():
    try:
        import docker

        c = docker.from_env(timeout=TIMEOUT_S)
        c.ping()
        return c
    except Exception as e:  # any failure here means: no usable engine
        raise EngineError(f"Docker engine not reachable ({type(e).__name__}: {e}); "
                          "start it (sudo dockerd, or Docker Desktop) and retry") from None


def run_tag(run_dir: str) -> str:
    """The run directory's name, made safe for a container name, and a hash of its
    whole path: runs/a/exp1 and runs/b/exp1 get containers of their own."""
    import hashlib

    path = str(Path(run_dir).resolve())
    name = "".join(c if c.isalnum() or c in "_-" else "-" for c in Path(run_dir).name)
    return f"{name[:40]}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def container_name(run_dir: str) -> str:
    return f"lnsp-{run_tag(run_dir)}"


def existing(c, name: str):
    """The container of exactly this name, or None. The engine's name filter is a
    regular expression and a substring match: the exact name is checked here."""
    return next((x for x in c.containers.list(all=True, filters={"name": name})
                 if x.name == name), None)


def make_room(c, *names: str) -> None:
    """Ended containers of these names (a stopped run, a lost node) are removed; a
    running one is refused."""
    for name in names:
        old = existing(c, name)
        if old is not None and old.status == "running":
            raise LaunchError(f"container {name} is already running")
        if old is not None:
            old.remove(force=True)


def require_image(c, options: dict) -> str:
    """The image the run asks for, which must be in the engine: one line if not."""
    image = options.get("image") or IMAGE
    try:
        c.images.get(image)
    except Exception:
        raise LaunchError(f"image {image} not found; build it with `lnsp image ensure` "
                          "(`make image`; `make train-docker` and `make train-ddp-docker` "
                          "do it for you)") from None
    return image


def plan(config, options: dict) -> dict:
    c = client()
    image = require_image(c, options)
    name = container_name(config.run_dir)
    make_room(c, name)
    return {"container_name": name, "image": image, "cpus": options.get("cpus"),
            "memory": options.get("memory")}


def run_labels(run: str) -> dict[str, str]:
    """The labels that tie a container (or a network) to its run directory."""
    return {LABEL: Path(run).name, "lnsp.run_dir": run}


def container_environment(config, backend: str, ranks: int = 1, **more: str) -> dict[str, str]:
    """A run's environment inside a container: the native one (thread policy,
    unbuffered output), a HOME any uid can write, `more`, and the user's own LNSP_
    settings except those that name host paths or the backend."""
    env = {**environment(config, backend, ranks), "HOME": "/tmp", **more}
    env.update({k: v for k, v in user_environment().items() if k.startswith("LNSP_")
                and k not in ("LNSP_DATA", "LNSP_RUN_DIR", "LNSP_BACKEND")})
    return env


def create(c, info: dict, name: str, run: str, labels: dict | None = None, **options):
    """One container of the run, created for the caller to start: labelled with its run
    directory, an init process so signals reach the trainer, the invoking user's
    uid:gid, SYS_PTRACE for native dumps, 1 GB of /dev/shm, and plan's image and
    --cpus and --memory limits (`info`). `options` go to docker-py as they are (the
    command, volumes, working folder, environment)."""
    if info.get("cpus"):
        options["nano_cpus"] = int(float(info["cpus"]) * 1e9)
    if info.get("memory"):
        options["mem_limit"] = info["memory"]
    return c.containers.create(
        info["image"], name=name, labels={**run_labels(run), **(labels or {})}, init=True,
        detach=True, user=f"{os.getuid()}:{os.getgid()}", cap_add=["SYS_PTRACE"],
        shm_size="1g", **options)


def start(config, info: dict) -> None:
    from lnsp.rundir import RunDir

    rd = RunDir(config.run_dir)
    run = str(rd.root.resolve())
    if info.get("command"):  # a user's command under the guard: its folders read-only
        command, volumes, workdir = command_mounts(config, info["command"], run)
    else:
        data = str(Path(config.data).resolve())
        inside = config.replace(data=data, run_dir=run)
        command, workdir = ["supervise", *inside.to_argv()], run
        volumes = {data: {"bind": data, "mode": "ro"}, run: {"bind": run, "mode": "rw"}}
    container = create(client(), info, info["container_name"], run, command=command,
                       volumes=volumes, working_dir=workdir,
                       environment=container_environment(config, "docker"))
    rd.update_run(container_id=container.id)
    container.start()


def command_mounts(config, command: list[str], run: str) -> tuple[list[str], dict, str]:
    """`lnsp run` inside the image for a user's command: the working folder and the
    script's folder mounted read-only at their own paths, the run directory read-write;
    an interpreter named by a host path becomes the image's `python` (torch, numpy and
    faiss are there; the host's virtual environment is not)."""
    from lnsp.config import GUARD_FIELDS
    from lnsp.launch.runner import _interpreter

    cwd = os.getcwd()
    inside = list(command)
    if _interpreter(inside[0]) == inside[0] and os.sep in inside[0]:
        inside[0] = "python"
    volumes = {cwd: {"bind": cwd, "mode": "ro"}}
    for arg in command[1:]:
        if arg.endswith(".py") and os.path.isfile(arg):  # the script, wherever it lives
            folder = str(Path(arg).resolve().parent)
            if not folder.startswith(cwd + os.sep) and folder != cwd:
                volumes[folder] = {"bind": folder, "mode": "ro"}
            break
    volumes[run] = {"bind": run, "mode": "rw"}
    flags = config.replace(run_dir=run).to_argv(GUARD_FIELDS)
    return ["run", *flags, "--", *inside], volumes, cwd


def notes(config, info: dict) -> list[str]:
    return [f"  container: {info['container_name']} (image {info['image']})"]


def _container(run: RunRecord):
    """The run's container; None when the engine says it does not exist (removed). Any
    other failure (a timeout, a server error) is an EngineError: not an answer."""
    import docker

    engine = client()
    try:
        return engine.containers.get(run.container_id)
    except docker.errors.NotFound:
        return None
    except Exception as e:
        raise EngineError(f"Docker engine did not answer about container "
                          f"{run.container_id[:12]} ({type(e).__name__}: {e})") from None


def alive(run: RunRecord) -> bool:
    c = _container(run) if run.container_id else None
    return bool(c and c.status in ("created", "running", "restarting"))


trainer_alive = alive


def send(run: RunRecord, signum: int) -> None:
    """Through the engine: the init process passes the signal to the supervisor,
    which passes it to the trainer. By name: the container is Linux, where this host's
    number may mean another signal (macOS's SIGUSR1, 30, is Linux's SIGPWR, which ends
    the process)."""
    from lnsp.system import signal_name

    c = _container(run)
    if c is None:
        raise LaunchError(f"container {(run.container_id or '?')[:12]} not found")
    c.kill(signal=signal_name(signum))


def kill(run: RunRecord) -> None:
    """SIGKILL through the engine: the container ends, its supervisor and trainer with it."""
    import signal

    send(run, signal.SIGKILL)


def kill_supervisor(run: RunRecord) -> None:
    """Nothing left to do: the supervisor lives in the container kill() ended."""


def wait_gone(run: RunRecord, timeout: float) -> bool:
    return procs.wait_for(lambda: not alive(run), timeout, interval=0.2)


def extra_status(run: RunRecord) -> dict:
    c = _container(run) if run.container_id else None
    if c is None:
        return {"container": None}
    state = c.attrs.get("State", {})
    return {"container": c.short_id, "container_state": state.get("Status"),
            "container_exit_code": None if state.get("Running") else state.get("ExitCode")}
