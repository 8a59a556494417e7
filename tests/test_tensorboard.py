"""TensorBoard event files of a real training run, read back with TensorBoard's own
reader, match the run's records; without TensorBoard the writer does nothing."""

import json
import sys

import pytest

from conftest import FAST_TRAIN, lnsp
from lnsp.observe import tensorboard

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_writes_its_records_as_scalars_and_its_config_as_text(small_data, tmp_path):
    run = tmp_path / "run"
    r = lnsp("train", "--data", small_data, "--run-dir", run, *FAST_TRAIN, "--epochs", "2",
             cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\r" not in (run / "training.log").read_text()
    events = tensorboard.read(run / "tb")
    scalars = events["scalars"]

    steps = records(run / "steps.jsonl")
    assert len(steps) >= 4
    assert [s for s, _ in scalars["train/loss"]] == [rec["step"] for rec in steps]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [rec["loss"] for rec in steps], rel=1e-6)
    assert [v for _, v in scalars["train/samples_per_s"]] == pytest.approx(
        [rec["samples_per_s"] for rec in steps], rel=1e-6)
    assert [v for _, v in scalars["system/rss_mb"]] == pytest.approx(
        [rec["rss_mb"] for rec in steps], rel=1e-6)
    for phase in ("load", "forward", "retrieve", "loss", "backward"):
        assert len(scalars[f"phase_s/{phase}"]) == len(steps), sorted(scalars)

    goodput = [v for _, v in scalars["goodput/goodput"]]  # goodput.json per interval
    assert len(goodput) == len(steps) and all(0 < v <= 1 for v in goodput), goodput
    assert "goodput/shares/training" in scalars

    metrics = records(run / "metrics.jsonl")
    assert len(metrics) == 2
    for name in ("hit@1", "hit@5", "hit@10", "mrr"):
        assert scalars[f"model/{name}"] == [
            (m["step"], pytest.approx(m[name], rel=1e-6)) for m in metrics]
        assert scalars[f"baseline/{name}"] == [
            (m["step"], pytest.approx(m[f"baseline_{name}"], rel=1e-6)) for m in metrics]
    config = json.loads((run / "config.json").read_text())
    text = events["text"]["config"][0]
    assert f"| batch_size | `{config['batch_size']}` |" in text


def test_metric_tags_group_every_baseline_beside_the_model():
    tags = tensorboard.metric_tags({"epoch": 1, "step": 7, "loss": 2.0, "hit@10": 0.5,
                                    "mrr": 0.25, "baseline_hit@10": 0.3, "blend_hit@10": 0.4,
                                    "blend_mrr": 0.2, "goodput": 0.9, "note": "text"})
    assert tags == {"model/loss": 2.0, "model/hit@10": 0.5, "model/mrr": 0.25,
                    "baseline/hit@10": 0.3, "blend/hit@10": 0.4, "blend/mrr": 0.2,
                    "eval/goodput": 0.9}
    assert tensorboard.step_tags({"step": 3, "epoch": 1, "loss": 1.5, "time": 5.0,
                                  "phases": {"forward": 0.01}, "rss_mb": 100.0,
                                  "eta_s": 12.0}) == {
        "train/epoch": 1.0, "train/loss": 1.5, "phase_s/forward": 0.01,
        "system/rss_mb": 100.0, "train/eta_s": 12.0}


def test_without_tensorboard_the_writer_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    writer = tensorboard.open_writer(tmp_path / "tb", {"lr": 0.1})
    writer.step({"step": 1, "loss": 1.0})
    writer.metrics({"step": 1, "hit@1": 0.5})
    writer.close()
    assert isinstance(writer, tensorboard.NullWriter) and not (tmp_path / "tb").exists()
