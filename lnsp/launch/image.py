"""The container image: built through docker-py from docker/Dockerfile, with the
build's progress shown as it goes, and `ensure`: the one way every command and test
gets an image that matches this checkout (built when missing or out of date, online
when a build can reach the package index, else from the offline base + wheelhouse)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

from lnsp.errors import LaunchError
from lnsp.rundir import ExitCode
from lnsp.launch.docker import IMAGE, client

SOURCE = Path(__file__).resolve().parents[2]  # the checkout that holds docker/ (lnsp/launch/ is two down)
ONLINE_BASE = "python:3.11-slim"  # the Dockerfile's default FROM
OFFLINE_BASE = os.environ.get("LNSP_OFFLINE_BASE", "lnsp-base:bookworm")
SOURCE_LABEL = "lnsp.source"  # hash of what the image was built from
WHEELHOUSE = SOURCE / ".cache" / "wheelhouse"
INDEX_CHECK_S = 20  # how long a throwaway container may try the package index
PULL_S = 60


def build(base_image: str | None = None, tag: str = IMAGE, echo=print,
          labels: dict | None = None) -> str:
    from lnsp.progress import Progress

    dockerfile = SOURCE / "docker" / "Dockerfile"
    if not dockerfile.exists():
        raise LaunchError(f"{dockerfile}: not found (build from a source checkout of lnsp)")
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    args = {"BASE_IMAGE": base_image} if base_image else {}
    image_id = None
    with Progress(None, "image build", unit="step") as bar:
        for chunk in client().api.build(path=str(SOURCE), dockerfile="docker/Dockerfile",
                                        tag=tag, buildargs=args, decode=True, rm=True,
                                        forcerm=True, labels=labels or {}):
            text = chunk.get("stream", "").rstrip()
            if text.startswith("Step "):  # "Step 3/14 : RUN ...": the count and the total
                done, bar.total = (int(n) for n in text.split()[1].split("/"))
                bar.set(done - 1, text.split(":", 1)[-1].strip()[:40])
            if text:
                bar.write(text, echo)
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
            if "error" in chunk:
                raise LaunchError(f"docker build failed: {chunk['error'].strip()}",
                                  ExitCode.INTERNAL)
        bar.set(bar.total or bar.done)
    echo(f"built {tag} ({(image_id or '?')[:19]})")
    return tag


# ---------------------------------------------------------------- ensure
def source_hash() -> str:
    """What the Dockerfile copies into the image, hashed: a change rebuilds it (the
    dependency layer stays cached unless the dependencies or the Dockerfile change).
    README.md is copied too but left out: a change of the docs changes no behaviour."""
    h = hashlib.sha256()
    files = [SOURCE / "docker" / "Dockerfile", SOURCE / "constraints.txt",
             SOURCE / "pyproject.toml", SOURCE / "scripts" / "dependencies.py",
             *sorted((SOURCE / "lnsp").rglob("*.py"))]
    for path in files:
        h.update(str(path.relative_to(SOURCE)).encode() + b"\0")
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:16]


def _image(c, tag: str):
    try:
        return c.images.get(tag)
    except Exception:  # docker.errors.ImageNotFound and friends
        return None


def _pull(c, name: str, timeout: float) -> bool:
    """Pull `name` within `timeout` seconds (False when no registry answers)."""
    done: dict = {}

    def pull():
        try:
            c.images.pull(name)
            done["ok"] = True
        except Exception as e:
            done["error"] = e

    t = threading.Thread(target=pull, daemon=True)  # a hung pull must not hang us
    t.start()
    t.join(timeout)
    return bool(done.get("ok"))


def index_reachable(c, base: str, timeout: float = INDEX_CHECK_S) -> tuple[bool, str]:
    """Whether pip inside a throwaway container of `base` can download one pinned wheel
    from the package index (reached and its certificate chain verified), as the build's
    pip would; (ok, the reason when not)."""
    check = ("python3 -m venv /tmp/v >/dev/null && /tmp/v/bin/pip download --quiet "
             "--no-deps --dest /tmp/w --timeout 5 --retries 0 click==8.1.7")
    try:
        container = c.containers.run(base, ["sh", "-c", check], detach=True)
    except Exception as e:
        return False, f"cannot start {base}: {e}"
    try:
        result = container.wait(timeout=timeout)
        code = result.get("StatusCode", 1)
        if code == 0:
            return True, ""
        log = container.logs().decode(errors="replace").strip().splitlines()
        reason = next((line for line in log if "certificate" in line.lower()), None) or \
            (log[-1] if log else f"exit code {code}")
        return False, reason[:200]
    except Exception:  # the wait timed out: no answer from the index
        return False, f"no answer from the package index within {timeout:g}s"
    finally:
        try:
            container.remove(force=True)
        except Exception:
            pass


def choose_base(c, echo=print) -> tuple[str, str]:
    """(base image, "online" | "offline"): online when the default base is here or can
    be pulled and pip inside it reaches the index; else the offline base."""
    forced = os.environ.get("LNSP_IMAGE_MODE", "")
    if forced in ("online", "offline"):
        return (ONLINE_BASE if forced == "online" else OFFLINE_BASE), forced
    if _image(c, ONLINE_BASE) is None and not _pull(c, ONLINE_BASE, PULL_S):
        echo(f"image: {ONLINE_BASE} not here and no registry answers: offline build")
        return OFFLINE_BASE, "offline"
    ok, reason = index_reachable(c, ONLINE_BASE)
    if ok:
        return ONLINE_BASE, "online"
    echo(f"image: pip in a container cannot use the package index ({reason}): offline build")
    return OFFLINE_BASE, "offline"


def _script(name: str, *args: str, echo=print) -> None:
    """Run one of scripts/ from the checkout, its output passed on line by line."""
    env = {**os.environ, "PIP": str(Path(sys.executable).with_name("pip")),
           "PY": sys.executable}
    proc = subprocess.Popen([str(SOURCE / "scripts" / name), *args], cwd=SOURCE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    for line in proc.stdout:
        echo(line.rstrip())
    if proc.wait() != 0:
        raise LaunchError(f"scripts/{name} failed (exit code {proc.returncode}); see above",
                          ExitCode.INTERNAL)


def ensure(tag: str = IMAGE, echo=print, rebuild: bool = False) -> str:
    """The image `tag` built from this checkout: kept when its source label matches,
    else built (online, or offline after making the base image and the wheelhouse)."""
    c = client()
    want = source_hash()
    have = _image(c, tag)
    if have is not None and not rebuild and (have.labels or {}).get(SOURCE_LABEL) == want:
        echo(f"image {tag} is up to date (source {want})")
        return tag
    echo(f"image {tag} " + ("is out of date" if have is not None else "not found")
         + f": building it (source {want})")
    base, mode = choose_base(c, echo)
    if mode == "offline":
        _script("make-base-image.sh", base, echo=echo)
    # The Dockerfile installs from the wheelhouse whenever it holds wheels, so one that
    # is there is made complete first (pip skips the wheels it already has).
    if mode == "offline" or any(WHEELHOUSE.glob("*.whl")):
        _script("make-wheelhouse.sh", str(WHEELHOUSE), echo=echo)
    return build(base, tag, echo=echo, labels={SOURCE_LABEL: want})
