"""What a guarded Python command runs first, in the user's own interpreter:

    python [interpreter options] lnsp/guard/boot.py (SCRIPT | -m MODULE | -c CODE) [ARGS...]

It installs the guard (lnsp.guard.runtime), then runs the script as `__main__` exactly
as `python SCRIPT ARGS` would: sys.argv, __file__, sys.path[0], `-m`, its exit code and
its exceptions are the script's (the traceback has no frame of lnsp's). Standard library
only, like the runtime it installs; `lnsp run` builds this command line.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_PARENT = os.path.dirname(os.path.dirname(HERE))  # the folder holding lnsp/


def _paths(first: str) -> None:
    """sys.path as plain python would have it, lnsp's folder last (so `import
    lnsp.guard` works in an interpreter that lacks lnsp, and never shadows the user's)."""
    if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
        sys.path.pop(0)
    if not sys.flags.safe_path:  # `python -P` (or -I) puts no script folder first
        sys.path.insert(0, first)
    if PACKAGE_PARENT not in sys.path:
        sys.path.append(PACKAGE_PARENT)


def _code(e: SystemExit) -> int:
    """The process exit code of a SystemExit, as the interpreter computes it."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def _script_frames(tb):
    """The traceback from the script's first frame on: boot and runpy frames dropped."""
    skip = {os.path.abspath(__file__), os.path.abspath(runpy.__file__)}
    while tb is not None and (tb.tb_frame.f_code.co_filename.startswith("<frozen runpy")
                              or os.path.abspath(tb.tb_frame.f_code.co_filename) in skip):
        tb = tb.tb_next
    return tb


def run_main(argv: list[str]) -> tuple[int, BaseException | None]:
    """Run SCRIPT, -m MODULE or -c CODE as __main__; its exit code and the exception
    that ended it (None for a normal end or a SystemExit)."""
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            _paths(os.getcwd())
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            _paths("")
            import __main__

            exec(compile(argv[1], "<string>", "exec"), __main__.__dict__)
        else:
            sys.argv = list(argv)
            _paths(os.path.dirname(os.path.realpath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        return _code(e), None
    except KeyboardInterrupt as e:
        traceback.print_exception(type(e), e, _script_frames(e.__traceback__))
        return 130, e
    except BaseException as e:  # the script's own exception: its traceback, exit 1
        traceback.print_exception(type(e), e, _script_frames(e.__traceback__))
        return 1, e
    return 0, None


def main() -> None:
    from lnsp.guard import runtime

    argv = sys.argv[1:]
    if not argv or (argv[0] in ("-m", "-c") and len(argv) < 2):
        print("usage: boot.py (SCRIPT | -m MODULE | -c CODE) [ARGS...]", file=sys.stderr)
        sys.exit(2)
    rt = runtime.Runtime(json.loads(os.environ[runtime.ENV_SETTINGS])).install()
    code, error = run_main(argv)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    sys.exit(rt.finish(code, error))


if __name__ == "__main__":
    # `import lnsp.guard` from this file's folder: the package's parent goes first for
    # this import alone, then sys.path is put back as the script expects it.
    sys.path.insert(0, PACKAGE_PARENT)
    import lnsp.guard.runtime  # noqa: F401

    sys.path.remove(PACKAGE_PARENT)
    main()
