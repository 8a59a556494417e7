"""`lnsp bench`'s parts: a worker runs as `python -m lnsp.bench.suite`, not through hidden
flags of the user's command, and leaves no temporary directory behind."""

import json
import subprocess
import sys

from click.testing import CliRunner

from conftest import env
from lnsp.cli import main


def test_the_user_command_has_no_worker_flags():
    r = CliRunner().invoke(main, ["bench", "--help"])
    assert r.exit_code == 0, r.output
    assert "--part" not in r.output and "--seconds" in r.output
    r = CliRunner().invoke(main, ["bench", "--part", "worker"])
    assert r.exit_code == 2 and "No such option" in r.output, r.output


def test_a_worker_measures_and_cleans_up(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lnsp.bench.suite", "worker", "--batch", "8",
                        "--seconds", "0.1", "--threads", "safe"], capture_output=True,
                       text=True, timeout=120, env=env(TMPDIR=tmp_path),
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["batch"] == 8 and result["hardened_samples_per_s"] > 0
    assert 0 < result["hardened_ratio"] < 2, result
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("lnsp-")]
    assert left == [], left


def test_lnsp_against_a_plain_loop_that_loads_no_lnsp_code():
    """Both loops run warm, in turns; the plain one sees none of lnsp's variables."""
    from lnsp.bench import versus

    r = versus.compare(4, hidden=16, ctx=3, k=5, bank_rows=300, dim=32, blocks=2, block_s=0.05)
    assert r["plain_ready"] == {"ready": True, "lnsp_loaded": False, "omp_wait_policy": None}
    assert r["lnsp_index"] == "ExactIndex"  # auto, on a small bank
    assert r["plain_samples_per_s"] > 0 and r["lnsp_samples_per_s"] > 0
    assert r["ratio"] == r["lnsp_samples_per_s"] / r["plain_samples_per_s"]


def test_seed_scale_chains_stay_within_a_topic(tmp_path):
    """The seed-scale bank's chains walk the rows of one topic each (a document near its
    subject), never a random row of the whole bank: queries of a model over them sit
    near the data, as a trained model's do."""
    import numpy as np

    from lnsp.bench import suite as bench
    from lnsp.data import synth

    info = synth.write_topic_bank(tmp_path / "bank.npy", 6000, 96, topics=15,
                                  labels=tmp_path / "bank.topics.npy")
    labels = np.load(tmp_path / "bank.topics.npy")
    assert info["topics"] == 15 and labels.shape == (6000,) and labels.max() == 14
    ids, offsets = bench.topic_chains(labels, length=24, chains=100)
    assert len(offsets) == 101 and len(ids) == 2400 and len(set(ids.tolist())) == 2400
    for a, b in zip(offsets[:-1], offsets[1:]):
        assert len(set(labels[ids[a:b]].tolist())) == 1
    assert len(set(labels[ids].tolist())) >= 6  # several topics, not one
    bank = np.load(tmp_path / "bank.npy", mmap_mode="r")
    same = (bank[ids[0]] * bank[ids[1]]).sum()
    other = (bank[ids[0]] * bank[ids[-1]]).sum() if labels[ids[0]] != labels[ids[-1]] else 0
    assert same > 0.3 > other


def test_the_guards_own_work_is_timed_on_a_real_runtime_and_leaves_this_process_as_it_was():
    """`make bench`'s guard figure times a real runtime's hook and ticks in the bench's
    process: the figures are there, and the runtime's signal handlers do not stay."""
    import signal

    from lnsp.bench.versus import guard_work
    from lnsp.guard import runtime

    before = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                               signal.SIGUSR1, signal.SIGCONT)}
    work = guard_work(steps=200, ticks=20)
    assert work["step_us"] > 0 and work["tick_us"] > 0 and work["ticks_per_s"] == 4
    assert {n: signal.getsignal(n) for n in before} == before
    assert runtime.current is None
