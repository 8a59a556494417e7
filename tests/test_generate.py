"""End-to-end generation from a model trained on demo data: all three paths occur,
every step is recorded, and a seed gives the same run twice."""

import json

import pytest

from conftest import lnsp

FIELDS = {"step", "decision", "c", "neighbor_id", "alpha", "lane", "latency_ms"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lnsp import synth

    root = tmp_path_factory.mktemp("gen")
    # The quiet variant of the demo (small steps, little noise): generation needs a model
    # whose next vectors land near bank rows often enough for all three paths to occur.
    data = synth.write(root / "data", chains=400, length=16, dim=256, angle=1.047,
                       step_noise=0.6)
    r = lnsp("train", "--data", data, "--run-dir", root / "run", "--epochs", "10", "--lr",
             "0.01", "--hidden", "64", "--k", "50", "--eval-windows", "500", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return data, root / "run" / "checkpoints" / "best.pt"


def generate(trained, tmp_path, seed, *extra):
    data, checkpoint = trained
    out = tmp_path / f"gen{seed}.jsonl"
    r = lnsp("generate", "--checkpoint", checkpoint, "--data", data, "--steps", "20",
             "--seed", seed, "--out", out, *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    return summary, [json.loads(line) for line in out.read_text().splitlines()]


def test_snap_blend_and_novel_all_occur(trained, tmp_path):
    seen, snaps_true = set(), []
    for seed in range(5):
        summary, steps = generate(trained, tmp_path, seed)
        assert [s["step"] for s in steps] == list(range(1, 21))
        for s in steps:
            assert set(s) == FIELDS and s["lane"] == "neutral"
            assert (s["alpha"] is None) == (s["decision"] != "BLEND")
        seen |= {s["decision"] for s in steps}
        assert summary["held_out"] and sum(summary["decisions"].values()) == 20
        if summary["snap_true_next"] is not None:
            snaps_true.append(summary["snap_true_next"])
    assert {"SNAP", "BLEND", "NOVEL"} <= seen, seen
    assert snaps_true and max(snaps_true) > 0.5  # SNAP finds the true next id


def test_same_seed_same_generation(trained, tmp_path):
    def strip(steps):
        return [{k: v for k, v in s.items() if k != "latency_ms"} for s in steps]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = generate(trained, tmp_path / "a", 3)
    b = generate(trained, tmp_path / "b", 3)
    assert a[0] == b[0] and strip(a[1]) == strip(b[1])


def test_lane_and_context_ids(trained, tmp_path):
    summary, steps = generate(trained, tmp_path, 0, "--lane", "creative", "--context-ids",
                              ",".join(map(str, range(10))))
    assert summary["lane"] == "creative" and {s["lane"] for s in steps} == {"creative"}
    assert not summary["held_out"]


def test_bad_generation_input_is_one_line(trained, tmp_path):
    data, checkpoint = trained
    for args, message in ((["--start", "99999"], "no such chain"),
                          (["--context-ids", "1,2,x"], "invalid literal"),
                          (["--tau-snap", "0.5"], "tau_novel")):
        r = lnsp("generate", "--checkpoint", checkpoint, "--data", data, *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, \
            r.stderr
