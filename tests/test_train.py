"""The trainer learns, writes a complete run directory and resumes exactly."""

import json
import os
import re
import signal

import pytest
import torch

from conftest import FAST_TRAIN, finish, lnsp, read_json, release, spawn, wait_until
from lnsp.train import checkpoint
from lnsp.rundir import RunDir


@pytest.fixture(scope="module")
def learn_data(tmp_path_factory):
    from lnsp.data import synth

    return synth.write(tmp_path_factory.mktemp("learn"), chains=400, length=16, dim=256)


def test_model_beats_copy_last_by_2x(learn_data, tmp_path):
    run = tmp_path / "run"
    r = lnsp("train", "--data", learn_data, "--run-dir", run, "--epochs", "2", "--hidden", "64",
             "--k", "50", "--eval-windows", "500")
    assert r.returncode == 0, r.stdout + r.stderr
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["hit@10"] >= 2 * last["baseline_hit@10"], last
    assert last["hit@10"] >= 0.35 and last["mrr"] > last["baseline_mrr"], last
    # An honest demo: noisy chains stay hard, so the model is far from solving it.
    assert last["hit@1"] <= 0.85 and last["baseline_hit@10"] >= 0.03, last
    assert last["hit@10"] > last["blend_hit@10"] and 0 <= last["blend_decay"] <= 1, last


def test_run_directory_is_complete(small_data, tmp_path):
    run = tmp_path / "run"
    r = lnsp("train", "--data", small_data, "--run-dir", run, "--epochs", "2", *FAST_TRAIN)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("config.json", "run.json", "training.log", "heartbeat.json", "metrics.jsonl",
                 "exit.json", "plots.png", "checkpoints/last.pt", "checkpoints/best.pt",
                 "checkpoints/epoch_001.pt", "checkpoints/epoch_002.pt"):
        assert (run / name).exists(), name
    beat = read_json(run / "heartbeat.json")
    assert set(beat) >= {"pid", "epoch", "step", "phase", "loss", "samples_per_s", "rss_mb",
                         "time"}
    run_json = read_json(run / "run.json")
    assert run_json["backend"] == "foreground" and run_json["pid"] == beat["pid"]
    assert read_json(run / "exit.json")["state"] == "finished"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert set(metrics[0]) >= {"epoch", "step", "loss", "hit@1", "hit@5", "hit@10", "mrr",
                               "baseline_hit@1", "baseline_hit@5", "baseline_hit@10",
                               "baseline_mrr", "blend_hit@1", "blend_hit@5", "blend_hit@10",
                               "blend_mrr", "blend_decay"}
    log = (run / "training.log").read_text()
    assert re.search(r"^\[\d\d:\d\d:\d\d\] Epoch 2/2 \| Step \d+ \| Loss \d+\.\d+ \| "
                     r"\d+\.\d+ it/s$", log, re.M), log
    state = torch.load(run / "checkpoints/last.pt", weights_only=False)
    assert state["config"]["epochs"] == 2 and state["step"] == beat["step"]


def test_stop_and_resume_match_an_uninterrupted_run(small_data, tmp_path):
    """SIGTERM mid-run, --resume: same steps and the same weights as one run."""
    common = ["--data", small_data, "--epochs", "3", *FAST_TRAIN, "--checkpoint-every", "0"]
    whole = tmp_path / "whole"
    assert lnsp("train", "--run-dir", whole, *common).returncode == 0

    gate = tmp_path / "gate"
    os.mkfifo(gate)
    part = tmp_path / "part"
    marker = tmp_path / "blocked"
    proc = spawn("train", "--run-dir", part, *common, fault="blocked_read", at_step=40,
                 marker=marker, extra_env={"LNSP_TEST_GATE": gate})
    wait_until(lambda: marker.exists() or proc.poll() is not None, 60, what="step 40 blocked")
    proc.send_signal(signal.SIGTERM)  # lands while step 40 is blocked
    release(gate)
    code, out = finish(proc)
    assert code == 0, out
    stopped = read_json(part / "exit.json")
    assert stopped["state"] == "stopped" and stopped["step"] == 40, stopped

    r = lnsp("train", "--run-dir", part, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    a = torch.load(whole / "checkpoints/last.pt", weights_only=False)
    b = torch.load(part / "checkpoints/last.pt", weights_only=False)
    assert a["step"] == b["step"] == read_json(part / "exit.json")["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_non_finite_loss_stops_before_the_step(small_data, tmp_path):
    proc = spawn("train", "--data", small_data, "--run-dir", tmp_path / "run", *FAST_TRAIN,
                 fault="nan", at_step=2)
    code, out = finish(proc)
    assert code == 1 and "non-finite loss" in out and "Traceback" not in out, out
    ended = read_json(tmp_path / "run" / "exit.json")
    assert ended["state"] == "failed" and ended["step"] == 1


def test_missing_device_is_a_clear_error(small_data, tmp_path):
    r = lnsp("train", "--data", small_data, "--run-dir", tmp_path / "run", "--device", "cuda")
    assert r.returncode == 2 and "cuda" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(small_data, tmp_path):
    run = tmp_path / "run"
    assert lnsp("train", "--data", small_data, "--run-dir", run, "--max-steps", "3",
                *FAST_TRAIN).returncode == 0
    r = lnsp("train", "--data", small_data, "--run-dir", run, *FAST_TRAIN)
    assert r.returncode == 2 and "--resume" in r.stderr


def test_ivf_index_is_built_once_and_saved_beside_the_data(small_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    args = ["--data", data, "--index", "ivf", "--nlist", "16", "--nprobe", "4",
            "--max-steps", "3", *FAST_TRAIN]
    first = lnsp("train", "--run-dir", tmp_path / "a", *args)
    assert first.returncode == 0, first.stderr
    assert "Saved IVF index" in first.stdout and list(data.glob("index.ivf16-*.faiss"))
    # nprobe calibrated, then checked on the model's own queries every 2 searches: the
    # latest measure goes in steps.jsonl, the check's state in the checkpoint.
    second = lnsp("train", "--run-dir", tmp_path / "b", *args[:6], "--recall-every", "2",
                  "--max-steps", "4", *FAST_TRAIN)
    assert second.returncode == 0 and "Loaded cached IVF index" in second.stdout
    assert "IVF calibrated: nprobe" in second.stdout
    miner = RunDir(tmp_path / "b").read_steps()[-1].extra["miner"]
    # checked at searches 1 and 3 of 4
    assert miner["searches"] == 3 and miner["k"] == 20 + 10 + 1 and 0 <= miner["recall"] <= 1
    saved = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert saved["miner"] == {"searches": 4, "nprobe": miner["nprobe"]}, saved["miner"]


def test_memory_growth_past_the_first_epoch_is_logged(tmp_path):
    from lnsp.guard.watchdog import Heartbeat

    said = []
    beat = Heartbeat(tmp_path / "heartbeat.json", said.append, margin_mb=16)
    beat.epoch_end(1)
    hoard = bytearray(64 * 2**20)  # 64 MB, touched so that it is resident
    for i in range(0, len(hoard), 4096):
        hoard[i] = 1
    beat.epoch_end(2)
    assert any("[MEMORY] warning" in line for line in said), said
    del hoard


def test_logs_prints_the_run_log(small_data, tmp_path):
    run = tmp_path / "run"
    assert lnsp("train", "--data", small_data, "--run-dir", run, "--max-steps", "5",
                *FAST_TRAIN).returncode == 0
    r = lnsp("logs", run, "-f")  # a finished run: -f returns at the end of the log
    assert r.returncode == 0 and "Finished: 5 steps" in r.stdout
    r = lnsp("logs", tmp_path / "nothing")
    assert r.returncode == 2 and "not a run directory" in r.stderr


@pytest.mark.skipif(not torch.backends.mps.is_available(),
                    reason="no MPS device: Apple silicon only (the macOS CI job runs it)")
def test_a_run_on_mps_times_its_phases_and_resumes_with_its_rng(small_data, tmp_path):
    """--device mps: phase timings wait for the GPU, and last.pt carries MPS's RNG
    state beside the CPU's, so a stopped run resumes where it was."""
    run = tmp_path / "run"
    r = lnsp("train", "--data", small_data, "--run-dir", run, *FAST_TRAIN, "--device", "mps",
             "--epochs", "1", "--max-steps", "20", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_json(run / "exit.json")["state"] == "finished"
    saved = checkpoint.load(run / "checkpoints" / "last.pt")
    assert "mps_rng" in saved and saved["step"] == 20
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps and all(s["phases"].get("retrieve", 0) > 0 for s in steps)
