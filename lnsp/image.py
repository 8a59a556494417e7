"""The container image: built through docker-py from docker/Dockerfile, with the
build's progress shown as it goes."""

from __future__ import annotations

from pathlib import Path

from lnsp.errors import LaunchError
from lnsp.rundir import ExitCode
from lnsp.launch.docker import IMAGE, client

SOURCE = Path(__file__).resolve().parent.parent  # the checkout that holds docker/


def build(base_image: str | None = None, tag: str = IMAGE, echo=print) -> str:
    dockerfile = SOURCE / "docker" / "Dockerfile"
    if not dockerfile.exists():
        raise LaunchError(f"{dockerfile}: not found (build from a source checkout of lnsp)")
    (SOURCE / ".cache" / "wheelhouse").mkdir(parents=True, exist_ok=True)
    args = {"BASE_IMAGE": base_image} if base_image else {}
    image_id = None
    for chunk in client().api.build(path=str(SOURCE), dockerfile="docker/Dockerfile", tag=tag,
                                    buildargs=args, decode=True, rm=True, forcerm=True):
        if "stream" in chunk and chunk["stream"].strip():
            echo(chunk["stream"].rstrip())
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
        if "error" in chunk:
            raise LaunchError(f"docker build failed: {chunk['error'].strip()}", ExitCode.INTERNAL)
    echo(f"built {tag} ({(image_id or '?')[:19]})")
    return tag
