"""On real text, at its defaults, the trained model beats every parameter-free
baseline: copy-last and the best fixed blend of the context (its decay chosen on
training windows). The text is the docstrings of the installed numpy and torch, which no one
here wrote, written by `lnsp data corpus` and made into a data directory by
`lnsp data from-text` (syntok, all-MiniLM-L6-v2: the `text` extra, offline)."""

import json

import pytest

from conftest import lnsp

pytest.importorskip("sentence_transformers", reason="the text extra (make setup installs it)")

# numpy's and torch's main modules, the first 250 docstrings (about 2,000 sentences):
# measured on 400 of them, the model reached 2.6x copy-last's Hit@10 and 2.1x the
# blend's, a margin well clear of the noise of a few hundred held-out windows.
MODULES = ("numpy,numpy.linalg,numpy.fft,numpy.random,numpy.polynomial,numpy.ma,torch,torch.nn,"
           "torch.nn.functional,torch.linalg,torch.optim,torch.distributions")


@pytest.fixture(scope="module")
def numpy_docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("realtext")
    r = lnsp("data", "corpus", "docstrings", "--out", root / "docs.jsonl", "--limit", "250",
             "--max-chars", "5000", "--modules", MODULES)
    assert r.returncode == 0, r.stdout + r.stderr
    r = lnsp("data", "from-text", root / "docs.jsonl", "--out", root / "data", "--threads", "1",
             timeout=360)
    assert r.returncode == 0, r.stdout + r.stderr
    return root / "data"


@pytest.mark.timeout(400)
def test_corpus_command_writes_documents(numpy_docs):
    docs = [json.loads(x) for x in (numpy_docs.parent / "docs.jsonl").read_text().splitlines()]
    assert len(docs) == 250 and len({d["id"] for d in docs}) == 250
    assert all(d["id"].startswith(("doc:numpy", "doc:torch")) and len(d["text"]) >= 600
               for d in docs)
    assert not any(">>>" in d["text"] for d in docs)  # examples are code, not sentences


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_model_beats_every_baseline_on_real_text(numpy_docs, tmp_path):
    run = tmp_path / "run"
    # Defaults but the epochs: ~1,500 training windows are 46 steps an epoch, and the
    # model was still rising at the default 6 (1.27x copy-last there, measured);
    # best.pt keeps the best epoch, so more epochs cannot hurt the figure tested.
    r = lnsp("train", "--data", numpy_docs, "--run-dir", run, "--threads", "safe",
             "--val-fraction", "0.2", "--epochs", "12", timeout=360)
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(metrics, key=lambda m: m["hit@10"])  # what best.pt holds
    assert best["blend_decay"] == metrics[0]["blend_decay"]  # chosen once per run
    assert best["hit@10"] > best["blend_hit@10"] and best["mrr"] > best["blend_mrr"], best
    assert best["hit@10"] >= 1.25 * best["baseline_hit@10"], best
