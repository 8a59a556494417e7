"""torch.distributed through torchrun, with real processes on loopback: a 2-rank run,
a frozen rank detected and the job restarted, a rank that leaves making the others
fail fast, two "nodes", and the same results as one rank."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import DRIVER, FAST_TRAIN, env, lnsp, read_json, wait_until
from lnsp import procs
from lnsp.config import TrainConfig
from lnsp.launch.ddp import torchrun_argv

# torchrun start-ups and a restart; one worker runs them all (rendezvous ports, 2 ranks each)
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("torchrun")]

DDP = [a for a in FAST_TRAIN if a not in ("--batch-size", "16")] + ["--batch-size", "32"]


def launch(run, data, *extra, cwd):
    r = lnsp("launch", "ddp", "--nproc", "2", "--data", data, "--run-dir", run, *DDP, *extra,
             cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return wait_until(lambda: (read_json(run / "run.json") or {}).get("ranks"), 90,
                      what="the ranks in run.json")


def ended(run):
    e = read_json(run / "exit.json")
    return e if e and e["state"] != "stalled" else None


@pytest.fixture
def reap_ranks():
    runs = []
    yield runs.append
    for run in runs:
        info = read_json(run / "run.json") or {}
        for pid in [r["pid"] for r in info.get("ranks", [])] + [info.get("supervisor_pid")]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (OSError, TypeError):
                pass


def test_two_ranks_finish_a_run(small_data, tmp_path, reap_ranks):
    run = tmp_path / "run"
    reap_ranks(run)
    ranks = launch(run, small_data, "--epochs", "3", cwd=tmp_path)
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    done = wait_until(lambda: ended(run), 120, what="the 2-rank run to finish")
    assert done["state"] == "finished"
    for r in (0, 1):
        assert read_json(run / f"heartbeat-rank{r}.json")["step"] == done["step"]
    log = (run / "training.log").read_text()
    assert "2 ranks" in log and "[rank 1] Epoch" not in log  # rank 0 alone logs steps
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    rows = json.loads(lnsp("status", run, "--json", cwd=tmp_path).stdout)
    assert rows[0]["state"] == "finished" and [k["rank"] for k in rows[0]["ranks"]] == [0, 1]
    text = lnsp("status", run, cwd=tmp_path).stdout
    assert "rank 0" in text and "rank 1" in text


def test_dump_reaches_every_rank_and_stop_ends_them_together(small_data, tmp_path,
                                                             reap_ranks):
    run = tmp_path / "run"
    reap_ranks(run)
    launch(run, small_data, "--epochs", "300", cwd=tmp_path)
    wait_until(lambda: (read_json(run / "heartbeat.json") or {}).get("step", 0) >= 5, 90,
               what="step 5")
    r = lnsp("dump", run, cwd=tmp_path)
    assert r.returncode == 0 and "Thread" in r.stdout, r.stderr
    wait_until(lambda: {p.name[:5] for p in (run / "dumps").glob("rank*.txt")} ==
               {"rank0", "rank1"}, 60, what="a dump from each rank")
    r = lnsp("stop", run, "--grace", "60", cwd=tmp_path)
    assert r.returncode == 0 and "stopped at step" in r.stdout, r.stdout + r.stderr
    stopped = read_json(run / "exit.json")
    assert stopped["state"] == "stopped"
    beats = [read_json(run / f"heartbeat-rank{k}.json")["step"] for k in (0, 1)]
    assert beats == [stopped["step"]] * 2  # both ranks stopped at the same step


def test_a_frozen_rank_is_named_dumped_killed_and_the_job_restarts(small_data, tmp_path,
                                                                    reap_ranks):
    run = tmp_path / "run"
    reap_ranks(run)
    ranks = launch(run, small_data, "--epochs", "20", "--max-restarts", "1", "--pg-timeout",
                   "6", "--stall-timeout", "3", "--checkpoint-every", "10", cwd=tmp_path)
    wait_until(lambda: (read_json(run / "heartbeat.json") or {}).get("step", 0) >= 30, 90,
               what="step 30")
    frozen = next(r["pid"] for r in ranks if r["rank"] == 1)
    os.kill(frozen, signal.SIGSTOP)
    done = wait_until(lambda: ended(run), 180, what="the restarted job to finish")
    assert done["state"] == "finished", done
    log = (run / "training.log").read_text()
    assert "[WATCHDOG] no progress" in log and f"rank 1 stalled (pid {frozen}" in log
    assert "[DISTRIBUTED] rank 0: a collective timed out" in log
    assert f"killing stalled rank pid {frozen}" in log and "Resumed from" in log
    assert list((run / "dumps").glob("rank0-*stall*.txt"))
    config = read_json(run / "config.json")
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(epochs)) == list(range(1, config["epochs"] + 1))
    assert done["step"] == read_json(run / "heartbeat-rank1.json")["step"]


def test_a_rank_that_leaves_makes_the_others_fail_fast(small_data, tmp_path, reap_ranks):
    run = tmp_path / "run"
    reap_ranks(run)
    ranks = launch(run, small_data, "--epochs", "200", "--pg-timeout", "120", cwd=tmp_path)
    wait_until(lambda: (read_json(run / "heartbeat.json") or {}).get("step", 0) >= 10, 90,
               what="step 10")
    os.kill(next(r["pid"] for r in ranks if r["rank"] == 1), signal.SIGKILL)
    t = time.monotonic()
    rank0 = next(r["pid"] for r in ranks if r["rank"] == 0)
    wait_until(lambda: not procs.alive(rank0), 30, what="rank 0 to end")
    assert time.monotonic() - t < 30  # far inside the 120 s collective timeout
    log = (run / "training.log").read_text()
    assert "[DISTRIBUTED] rank 0: another rank left the job" in log, log[-2000:]
    ended = read_json(run / "exit.json")
    assert ended["state"] == "failed" and "another rank left the job" in ended["cause"], ended
    # the survivor names the rank it lost (no heartbeat after the kill) and ends with 3
    assert ended["exit_code"] == 3 and "lost rank 1 (node " in ended["cause"], ended


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback(small_data, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(data=str(small_data), run_dir=str(run), epochs=2, hidden=32, k=20,
                         batch_size=32, eval_windows=200, threads="safe")
    master = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen(torchrun_argv(config, 1, 2, r, master), env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=tmp_path) for r in (0, 1)]
    try:
        outs = [n.communicate(timeout=150)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert read_json(run / "exit.json")["state"] == "finished"
    assert read_json(run / "run.json")["world_size"] == 2


def test_two_ranks_learn_as_well_as_one_and_share_the_evaluation(tmp_path):
    """Each rank evaluates its own slice of the held-out windows (no rank waits at a
    barrier for a whole evaluation), and the all-reduced figures are the ones a single
    process computes for the same weights."""
    import numpy as np
    import torch

    from lnsp.data import dataset as lnsp_data
    from lnsp.train import evaluate
    from lnsp.model import miner
    from lnsp.data import synth
    from lnsp.model.tower import QueryTower

    data = synth.write(tmp_path / "data", chains=400, length=16, dim=256)
    config = TrainConfig(data=str(data), epochs=2, hidden=64, k=50, batch_size=32,
                         eval_windows=500, threads="safe")
    one = lnsp("train", *config.replace(run_dir=str(tmp_path / "one")).to_argv(), timeout=180)
    assert one.returncode == 0, one.stderr
    argv = torchrun_argv(config.replace(run_dir=str(tmp_path / "two")), 2)
    at = argv.index("-m", argv.index("--monitor-interval=1"))
    argv[at:at + 2] = [str(DRIVER)]  # the ranks run through the driver, which logs evaluations
    calls = tmp_path / "evaluations.jsonl"
    two = subprocess.run(argv, env=env(LNSP_TEST_EVAL_LOG=calls), capture_output=True,
                         text=True, timeout=180)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    def last(name):
        return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])

    a, b = last("one"), last("two")
    assert a["hit@10"] >= 2 * a["baseline_hit@10"] and b["hit@10"] >= 2 * a["baseline_hit@10"]
    assert abs(a["hit@10"] - b["hit@10"]) <= 0.1, (a, b)

    ds = lnsp_data.load(data, config.ctx_len)
    _, held = lnsp_data.windows(ds, config.ctx_len, config.val_fraction, config.seed)
    val = evaluate.subset(held, config.eval_windows, config.seed)
    seen = [json.loads(x) for x in calls.read_text().splitlines()]
    # The same calls every epoch (chunks of each rank's slice); a barrier follows each
    # evaluation, so the last evaluation's calls are the last lines.
    assert len(seen) % config.epochs == 0, seen
    final: dict = {}
    for c in seen[-len(seen) // config.epochs:]:
        final.setdefault(c["rank"], []).extend(c["windows"])
    assert sorted(final) == [0, 1], seen
    assert not set(final[0]) & set(final[1])
    assert sorted(final[0] + final[1]) == sorted(val.tolist())

    saved = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    # The tower and the miner as the trainer built them (the precision it chose, kept in
    # the checkpoint; the auto miner).
    model = QueryTower(ds.dim, config.hidden, bf16=saved["bf16"])
    model.load_state_dict(saved["model"])
    index = miner.build(ds.bank, config.index, config.nlist, config.nprobe, ds.root,
                        lambda m: None, config.seed, k=config.k + 1)
    alone = evaluate.evaluate(model, ds, index, val, config.ctx_len, torch.device("cpu"))
    # The ranks evaluate in other batch shapes than one process does, and a matrix
    # product's last bits depend on the shape: a near tie may order differently. So
    # the figures agree to one window of the held-out set, not to the last bit; a
    # window counted twice or lost would move them by far more.
    for key, value in alone.items():
        assert np.isclose(b[key], value, rtol=0, atol=1.0 / len(val)), (key, b[key], value)


def test_torchrun_does_not_rerun_an_ending_a_restart_would_repeat(small_data, tmp_path):
    """torchrun's agent restarts on any failure; each restarted attempt reads how the
    last one ended and does not train again after a non-finite loss."""
    config = TrainConfig(data=str(small_data), run_dir=str(tmp_path / "run"), hidden=32,
                         batch_size=32, k=20, threads="safe", max_restarts=2)
    argv = torchrun_argv(config, 2)
    at = argv.index("-m", argv.index("--monitor-interval=1"))
    argv[at:at + 2] = [str(DRIVER)]  # the ranks run through the driver: a NaN at step 3
    job = subprocess.run(argv, env=env(LNSP_TEST_FAULT="nan", LNSP_TEST_FAULT_STEP=3),
                         capture_output=True, text=True, timeout=240)
    assert job.returncode != 0
    log = (tmp_path / "run" / "training.log").read_text()
    assert log.count("Training ") == 1, log  # the restarts did not train
    # torchrun's agent may give up before it has used every restart: at least one
    # restarted attempt read the ending and refused to train.
    assert log.count("[RESTART] the last attempt ended: non-finite") >= 1, log
    ended = read_json(tmp_path / "run" / "exit.json")
    assert ended["exit_code"] == 1 and "non-finite" in ended["cause"], ended
