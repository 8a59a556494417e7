"""`lnsp run -- CMD`: a user's own command under the guard, in the foreground (and what
the detached launchers start for a command).

The command runs as a child of this process, which owns the run directory: run.json
with the child's PID and start time, training.log with the command's output line by
line (timestamped; echoed here unchanged), exit.json when the child could not write it,
and restarts (--max-restarts). A Python command gets the in-process guard
(lnsp.guard.boot) before its first line; any other command gets what can be given
from outside: the thread environment, its output in the log, status, stop, restarts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lnsp.errors import LaunchError, RunDirError
from lnsp.guard.restarts import CRASH_LOOP_ATTEMPTS, RESTARTABLE, alike_endings, classify_ending
from lnsp.rundir import ExitCode, RunDir
from lnsp.system import is_python

BOOT = Path(__file__).resolve().parent.parent / "guard" / "boot.py"
# The interpreter's own options that take a value (`python -X dev -W error train.py`).
VALUE_OPTIONS = ("-X", "-W", "--check-hash-based-pycs")
PUMP_DRAIN_S = 2.0  # output read after the child ended, while something else holds the pipe


def _interpreter(argv0: str) -> str | None:
    """The Python interpreter a command starts: argv[0] itself (python, python3.11,
    a framework build's Python, pypy), or a script's `#!...python` line."""
    if is_python(argv0):
        return argv0
    path = shutil.which(argv0) if os.sep not in argv0 else argv0
    try:
        with open(path or argv0, "rb") as f:
            first = f.readline(256).decode(errors="replace")
    except OSError:
        return None
    if first.startswith("#!"):
        words = first[2:].split()
        if words and words[0].endswith("/env") and len(words) > 1:
            words = words[1:]
        if words and is_python(words[0]):
            return words[0]
    return None


def prepare(command: list[str], nproc: int = 0) -> tuple[list[str], bool]:
    """The argv to start (the guard injected into a Python command; with `nproc`, as
    that many torchrun ranks, each guarded) and whether it is guarded in-process. Bad
    commands are refused here, before a run directory exists."""
    if not command:
        raise LaunchError("no command after --: lnsp run [OPTIONS] -- python train.py ARGS")
    exe = command[0]
    found = shutil.which(exe) if os.sep not in exe else (exe if os.path.exists(exe) else None)
    if not found:
        raise LaunchError(f"{exe}: command not found")
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise LaunchError(f"{exe}: not an executable file")
    python = _interpreter(exe)
    if python is None:
        if nproc:
            raise LaunchError(f"{exe}: --nproc runs a Python script as torchrun ranks; "
                              "this command is not Python")
        return list(command), False
    if not is_python(exe):  # ./train.py with a python shebang
        command = [python, exe, *command[1:]]
        if not shutil.which(python) and not os.path.exists(python):
            raise LaunchError(f"{exe}: its interpreter {python} was not found")
    options, rest = [], command[1:]
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c", "-"):
        options.append(rest.pop(0))
        if options[-1] in VALUE_OPTIONS and rest:
            options.append(rest.pop(0))
    if not rest or rest[0] == "-":
        raise LaunchError(f"{' '.join(command)}: give a script, -m MODULE or -c CODE "
                          "(an interactive or stdin interpreter cannot be guarded)")
    if rest[0] in ("-m", "-c") and len(rest) < 2:
        raise LaunchError(f"{' '.join(command)}: {rest[0]} needs an argument")
    if rest[0] not in ("-m", "-c") and not os.path.isfile(rest[0]) and \
            not os.path.isdir(rest[0]):
        raise LaunchError(f"{rest[0]}: no such script")
    guarded = [command[0], *options, str(BOOT), *rest]
    if nproc:  # torchrun starts each rank as this guarded interpreter (no restarts: ours)
        return [command[0], "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", "--max-restarts=0", "--monitor-interval=1",
                "--no-python", *guarded], True
    return guarded, True


def environment(config, guarded: dict | None, attempt: int, ranks: int = 1) -> dict[str, str]:
    """The child's environment: the user's, the thread policy (the user's own values
    win), unbuffered output, the guard's settings and the attempt number."""
    from lnsp.launch.command import environment as thread_environment
    from lnsp.guard.threads import user_environment

    env = {**user_environment(), **thread_environment(config, os.environ.get(
        "LNSP_BACKEND", "foreground"), ranks)}
    env.pop("PYTHONFAULTHANDLER", None)  # the guard enables faulthandler itself
    env["LNSP_ATTEMPT"] = str(attempt)
    env["LNSP_PYTHON"] = sys.executable  # py-spy and the diagnosis live beside it
    if guarded is not None:
        env["LNSP_GUARD"] = json.dumps(guarded)
    return env


class Runner:
    """One guarded command with its restarts; `run()` returns the run's exit code."""

    def __init__(self, command: list[str], config, echo=None, nproc: int = 0):
        self.command, self.config, self.nproc = command, config, nproc
        self.rd = RunDir(config.run_dir)
        self.echo = echo if echo is not None else _write_stdout
        self.stop_requested: str | None = None
        self.proc: subprocess.Popen | None = None
        self.log_file = None
        self.guarded = False

    # ------------------------------------------------------------ the run
    def run(self) -> int:
        argv, guarded = prepare(self.command, self.nproc)
        self.guarded = guarded
        rd, config = self.rd, self.config
        if rd.config.exists() and not config.resume:  # run.json alone: a launcher's
            raise RunDirError(f"{rd.root}: run directory already holds a run; "
                              "pass --resume to continue it or choose another --run-dir")
        # One run per run directory: held for this process's life (a second `lnsp run`,
        # or a trainer, on a live directory is refused).
        self.lock = rd.lock_trainer()
        if self.lock is None:
            raise RunDirError(f"{rd.root}: a run is already live in this run directory "
                              f"(pid {rd.trainer_lock_holder() or '?'}); stop it first "
                              f"(lnsp stop {rd.root}) or choose another --run-dir")
        if not os.environ.get("LNSP_BACKEND"):  # a launcher cleared it when it started us
            rd.clear_stop()  # a stop of an earlier life of the run is not for this one
        from lnsp.rundir import write_json
        from lnsp.guard.watchdog import process_age

        write_json(rd.config, {**config.to_json(), "command": self.command})
        rd.update_run(backend=os.environ.get("LNSP_BACKEND", "foreground"),
                      supervisor_pid=os.getpid(), supervisor_start=time.time() - process_age(),
                      command=self.command, cwd=os.getcwd(), guard=guarded,
                      world_size=self.nproc or 1,
                      stall_timeout=config.stall_timeout,
                      startup_timeout=config.startup_timeout, max_restarts=config.max_restarts)
        self.log_file = open(rd.log, "ab")
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, self._on_signal)
        guard = config.guard_settings("exit", sys.executable) if guarded else None
        attempt = int(rd.read_run().get("attempts", 0)) if config.resume else 0
        restarts, endings = 0, []
        while True:
            code, record = self._attempt(argv, guard, attempt)
            endings.append((code, record.step if record else 0,
                            record.cause if record else None))
            if self.stop_requested or rd.stop_requested() or code == 0:
                return code  # never restarted after a stop (`lnsp stop` writes stop.json)

            kind = classify_ending(code, record)
            if not RESTARTABLE.get(kind, True) or restarts >= config.max_restarts:
                if config.max_restarts:
                    self._log(f"[SUPERVISOR] command ended: {kind} (exit code {code}); "
                              + ("not restarting" if restarts < config.max_restarts else
                                 f"giving up after {restarts} restarts"))
                return code
            if alike_endings(endings):
                self._log(f"[SUPERVISOR] crash loop: the last {CRASH_LOOP_ATTEMPTS} attempts "
                          f"ended the same way ({record.cause if record else kind}) without "
                          f"getting further; not restarting (exit code "
                          f"{int(ExitCode.CRASH_LOOP)})")
                rd.write_exit("failed", ExitCode.CRASH_LOOP, record.step if record else 0,
                              cause=f"crash loop: {CRASH_LOOP_ATTEMPTS} attempts ended alike; "
                                    f"each: {record.cause if record else kind}",
                              attempts=len(endings))
                return ExitCode.CRASH_LOOP
            restarts += 1
            attempt += 1
            rd.update_run(restarts=restarts)
            self._log(f"[SUPERVISOR] command ended: {kind} (exit code {code}); restart "
                      f"{restarts}/{config.max_restarts} (attempt {attempt}: the script reads "
                      "lnsp.guard.attempt() to resume from its own checkpoint)")

    def _attempt(self, argv: list[str], guard: dict | None, attempt: int):
        """Start the command once, copy its output into the log, wait for its end; its
        exit code and exit record (written here when the child could not)."""
        import psutil

        rd = self.rd
        rd.clear_exit()
        started = time.time()
        try:
            self.proc = proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=environment(self.config, guard, attempt, self.nproc or 1))
        except OSError as e:
            raise LaunchError(f"{argv[0]}: cannot be started ({e.strerror})") from None
        from lnsp.launch.command import caffeinate_argv

        power = caffeinate_argv(proc.pid)  # macOS: App Nap would throttle it
        if power:
            subprocess.Popen(power, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            start_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            start_time = started
        rd.update_run(pid=proc.pid, start_time=start_time, attempts=attempt + 1,
                      python=argv[0] if guard else None, argv=argv)
        if self.nproc:
            import threading

            for rank in range(self.nproc):
                rd.rank_exit(rank).unlink(missing_ok=True)
            threading.Thread(target=self._record_ranks, args=(started,), daemon=True,
                             name="lnsp-ranks").start()
        import threading

        board = threading.Thread(target=self._tensorboard, args=(proc, attempt), daemon=True,
                                 name="lnsp-tensorboard")
        board.start()
        self._pump(proc.stdout.fileno(), proc)
        code = proc.wait()
        board.join(30)
        if self.nproc:
            self._merge_ranks(started)
        record = rd.read_exit()
        if record is not None and record.time >= started:
            if self.nproc:  # torchrun says 1 for any failed rank: the named rank's code
                return record.exit_code, record
            return (code if code >= 0 else 128 - code), record
        if code < 0:  # ended by a signal, nothing written: SIGKILL, a segfault, an OOM kill
            name = signal.Signals(-code).name
            if self.stop_requested or rd.stop_requested():  # killed after the stop's grace
                return ExitCode.DONE, rd.write_exit("stopped", ExitCode.DONE, _step(rd),
                                                    signal=name)
            return 128 - code, rd.write_exit("failed", 128 - code, _step(rd),
                                             cause=f"killed by {name}")
        if code == 0:
            return code, rd.write_exit("finished", ExitCode.DONE, _step(rd))
        return code, rd.write_exit("failed", code, _step(rd), cause=f"exit code {code}")

    # ------------------------------------------------------------ TensorBoard
    def _tensorboard(self, proc: subprocess.Popen, attempt: int) -> None:
        """tb/ from steps.jsonl as the command writes it (records, never log text): its
        scalars and the guard's figures. In this process, not the command's, which
        keeps only the standard library; a no-op without the tensorboard extra."""
        from lnsp.observe import tensorboard
        from lnsp.rundir import read_json

        path, offset, writer = self.rd.steps, 0, None
        if attempt and path.exists():  # a restart: what the earlier attempts wrote is there
            offset = path.stat().st_size
        try:
            while True:
                ended = proc.poll() is not None
                try:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        chunk = f.read()
                except OSError:
                    chunk = b""
                whole = chunk[:chunk.rfind(b"\n") + 1]
                offset += len(whole)
                for line in whole.splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if writer is None:
                        writer = tensorboard.open_writer(
                            self.rd.tb, read_json(self.rd.config),
                            purge_step=record["step"] if attempt else None)
                    writer.step(record)
                if ended:
                    return
                time.sleep(2.0)
        finally:
            if writer is not None:
                writer.close()

    # ------------------------------------------------------------ torchrun ranks
    def _record_ranks(self, started: float) -> None:
        """run.json's ranks (PID and host of each), once every rank of this attempt has
        announced itself in its heartbeat: what `lnsp stop` and `dump` signal. One
        writer: this thread, not the ranks."""
        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            beats = {r: b for r, b in self.rd.rank_heartbeats().items() if b.time >= started}
            if len(beats) == self.nproc:
                from lnsp.procs import start_time

                self.rd.update_run(ranks=[{"rank": r, "pid": b.pid, "host": b.host,
                                           "start": start_time(b.pid)}
                                          for r, b in sorted(beats.items())])
                return
            time.sleep(0.2)

    def _merge_ranks(self, started: float) -> None:
        """exit.json from the ranks' own records: the first rank that did not finish
        names the ending (a rank stuck on its own beats one waiting for it in a
        collective); all finished, finished."""
        records = {r: self.rd.read_exit(self.rd.rank_exit(r)) for r in range(self.nproc)}
        records = {r: e for r, e in records.items() if e is not None and e.time >= started}
        if not records:
            return
        bad = sorted(((e.time, r, e) for r, e in records.items() if e.state != "finished"),
                     key=lambda row: (_waits_on_peers(row[2]), row[0]))
        if not bad:
            if len(records) == self.nproc:
                self.rd.write_exit("finished", ExitCode.DONE, max(e.step for e in
                                                                  records.values()))
            return
        _, rank, e = bad[0]
        self.rd.write_exit(e.state, e.exit_code, e.step, cause=f"rank {rank}: {e.cause}"
                           if e.cause else None, rank=rank, **e.extra)

    # ------------------------------------------------------------ output
    def _pump(self, fd: int, proc: subprocess.Popen) -> None:
        """The child's output, as it comes: unchanged to our stdout, and line by line
        (a carriage return ends a line too: progress bars) into training.log. Until the
        pipe closes, or the child has ended and PUMP_DRAIN_S passed (a process it left
        behind may hold the pipe open)."""
        import select

        pending, drain_until = b"", None
        while True:
            if drain_until is None and proc.poll() is not None:
                drain_until = time.monotonic() + PUMP_DRAIN_S
            if drain_until is not None and time.monotonic() > drain_until:
                break
            try:
                if not select.select([fd], [], [], 0.5)[0]:
                    continue
                chunk = os.read(fd, 65536)
            except InterruptedError:
                continue
            if not chunk:
                break
            self.echo(chunk)
            lines = re.split(rb"\r\n|\r|\n", pending + chunk)
            pending = lines.pop()
            self._write_lines(lines)
        if pending:
            self._write_lines([pending])

    def _write_lines(self, lines: list[bytes]) -> None:
        stamp = time.strftime("[%H:%M:%S] ").encode()
        text = b"".join(stamp + line + b"\n" for line in lines if line.strip())
        if text:
            self.log_file.write(text)
            self.log_file.flush()

    def _log(self, message: str) -> None:
        """A line of lnsp's own into the log and to the terminal."""
        line = f"[{time.strftime('%H:%M:%S')}] {message}\n".encode()
        self.log_file.write(line)
        self.log_file.flush()
        self.echo(line)

    # ------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        """A stop of the run: never restarted after. SIGTERM and SIGHUP go on to the
        command; SIGINT (Ctrl-C) reached it from the terminal already (one process
        group), so it is not sent twice (a second SIGINT is the command's hard exit)."""
        if signum != signal.SIGUSR1:  # a dump request (a container's engine sends it
            self.stop_requested = signal.Signals(signum).name  # here): passed on only
        proc = self.proc
        if signum == signal.SIGUSR1 and not (self.guarded and proc is not None and
                                             _catches_usr1(proc.pid)):
            return  # SIGUSR1 would kill a command without the guard's dump handler
        if signum != signal.SIGINT and proc is not None and proc.returncode is None:
            try:
                proc.send_signal(signum)  # our own child, not reaped yet: its PID is ours
            except OSError:
                pass


def _catches_usr1(pid: int) -> bool:
    """The guard's dump handler is installed (no /proc, as on macOS: trusted)."""
    from lnsp.procs import catches

    return catches(pid, signal.SIGUSR1) is not False


def _write_stdout(data: bytes) -> None:
    try:
        os.write(sys.stdout.fileno(), data)
    except (OSError, ValueError):
        pass


def _step(rd: RunDir) -> int:
    beat = rd.read_heartbeat()
    return beat.step if beat else 0



def _waits_on_peers(record) -> bool:
    """A rank whose diagnosis says it waits for others (a collective, a socket to a
    peer) is not the one that stalled."""
    kind = str(record.extra.get("verdict", ""))
    return any(word in kind for word in ("collective", "socket", "peer", "network"))


def run(command: list[str], config, nproc: int = 0) -> int:
    return Runner(command, config, nproc=nproc).run()
