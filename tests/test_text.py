"""`lnsp data from-text`: real splitter, real encoder (all-MiniLM-L6-v2 from its offline
package), real processes and signals; each test embeds a few dozen sentences."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FAST_TRAIN, env, finish, lnsp, wait_until

# One xdist worker (make test) runs this module: the embedded corpus is made once.
pytestmark = pytest.mark.xdist_group("text")

try:  # `make setup` installs the text extra: its absence is a failure here, never a skip
    import sentence_transformers  # noqa: F401
    import syntok  # noqa: F401
except ImportError as e:
    pytest.fail(f"the text extra is missing ({e}): make setup, or pip install -e '.[text]'",
                pytrace=False)

WORDS = ["index", "query", "window", "bank", "chain", "miner", "tower", "epoch", "shard",
         "vector", "batch", "token", "probe", "heartbeat", "dump"]


def sentences(topic: str, n: int) -> list[str]:
    """n distinct sentences with an abbreviation, a path and a number inside, which a
    naive split on '. ' would cut."""
    return [f"The {topic} note {j} describes the {WORDS[j % len(WORDS)]} step, e.g. how "
            f"~/.cache/{topic}.{j} is read with v{j}.{j} rules." for j in range(n)]


def prose(sents: list[str]) -> str:
    """Sentences as hard-wrapped lines, as in man pages and docstrings."""
    return textwrap.fill(" ".join(sents), width=60)


# The folder corpus: nested, mixed suffixes, a short document, an empty one, files
# that are not text files, and a hidden folder; in sorted relative-path order.
C_RST = ["Chain format"] + sentences("rst", 11)
SHORT = sentences("short", 3)
Z_MD = ["Retrieval notes"] + sentences("md", 10) + [
    "The first item lists a flag.", "The second item names ~/.ssh/config.",
    "The third item ends the list."]
B_TXT = sentences("txt", 12)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "docs"
    (root / "a" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a" / "deep" / "c.rst").write_text(
        f"{C_RST[0]}\n{'=' * len(C_RST[0])}\n\n{prose(C_RST[1:])}\n")
    (root / "a" / "short.txt").write_text(prose(SHORT) + "\n")
    (root / "a" / "z.md").write_text(
        f"# {Z_MD[0]}\n\n{prose(Z_MD[1:11])}\n\n" + "".join(f"- {s}\n" for s in Z_MD[11:]))
    (root / "b.txt").write_text(prose(B_TXT) + "\n")
    (root / "empty.txt").write_text("  \n\n \n")
    (root / ".hidden" / "x.txt").write_text(prose(sentences("hidden", 20)))
    (root / "notes.pdf").write_bytes(b"%PDF-1.4 \xff\xfe not text")
    return root


def run_cli(*args):
    from lnsp.cli import main

    return CliRunner().invoke(main, ["data", "from-text", *map(str, args)])


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "texts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "docs"
    r = run_cli(corpus, "--out", out, "--min-chain", "6", "--threads", "safe")
    assert r.exit_code == 0, r.output
    assert f"to {out}" in r.stdout
    return out


def test_folder_in_reading_order(built, corpus):
    from lnsp.data import dataset as data

    texts = rows(built)
    expected = [("a/deep/c.rst", C_RST), ("a/z.md", Z_MD), ("b.txt", B_TXT)]
    assert [(t["doc"], t["position"], t["text"]) for t in texts] == [
        (doc, i, s) for doc, units in expected for i, s in enumerate(units)]
    assert [t["id"] for t in texts] == list(range(len(texts)))

    ds = data.load(built, ctx_len=5)
    assert ds.bank.shape == (len(texts), 384) and ds.bank.dtype == np.float32
    assert np.allclose(np.linalg.norm(ds.bank, axis=1), 1, atol=1e-5)
    assert ds.ids.tolist() == list(range(len(texts)))
    assert np.diff(ds.offsets).tolist() == [len(units) for _, units in expected]

    m = json.loads((built / "manifest.json").read_text())
    assert m["encoder"] == "all-MiniLM-L6-v2" and m["dimension"] == 384
    assert m["source"] == str(corpus.resolve()) and m["unit"] == "sentence"
    assert (m["documents"], m["documents_empty"], m["chains"], m["chains_dropped"],
            m["sentences"], m["sentences_dropped"]) == (5, 1, 3, 1, len(texts), len(SHORT))
    assert m["threads"] == 1  # --threads safe reached the encoder's torch pool


def test_bank_rows_are_the_embeddings_of_their_texts(built):
    from lnsp.data import encode

    model, _ = encode.load_encoder(encode.DEFAULT_ENCODER)
    texts = rows(built)
    bank = np.load(built / "bank.npy", mmap_mode="r")
    pick = [0, len(texts) // 2, len(texts) - 1]
    fresh = model.encode([texts[i]["text"] for i in pick], normalize_embeddings=True)
    assert np.allclose(np.sum(fresh * bank[pick], axis=1), 1, atol=1e-4)
    # and not just any sentence: neighbouring rows differ
    assert float(fresh[0] @ bank[1]) < 0.999


def test_jsonl_source_with_ids_titles_and_empty_documents(tmp_path):
    src = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": "first", "title": "One", "text": prose(sentences("one", 7))}),
             "",
             json.dumps({"text": "   "}),
             json.dumps({"id": 42, "text": prose(sentences("two", 6))}),
             json.dumps({"text": prose(sentences("three", 2))})]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    r = run_cli(src, "--out", out, "--min-chain", "5")
    assert r.exit_code == 0, r.output
    texts = rows(out)
    assert [t["doc"] for t in texts] == ["first"] * 7 + ["42"] * 6
    assert [t["text"] for t in texts] == sentences("one", 7) + sentences("two", 6)
    assert all(t["title"] == "One" for t in texts[:7]) and "title" not in texts[7]
    m = json.loads((out / "manifest.json").read_text())
    assert (m["documents"], m["documents_empty"], m["chains_dropped"],
            m["sentences_dropped"]) == (4, 1, 1, 2)
    assert "1 empty documents" in r.stdout and "dropped: 1 chains" in r.stdout


def test_paragraph_unit(tmp_path):
    paragraphs = [prose(sentences(f"p{i}", 2)) for i in range(5)]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "doc.md").write_text("\n\n\n".join(paragraphs) + "\n")
    out = tmp_path / "out"
    r = run_cli(tmp_path / "src", "--out", out, "--unit", "paragraph", "--min-chain", "4")
    assert r.exit_code == 0, r.output
    assert [t["text"] for t in rows(out)] == [" ".join(p.split()) for p in paragraphs]
    m = json.loads((out / "manifest.json").read_text())
    assert m["unit"] == "paragraph" and m["sentences"] == 5
    assert np.load(out / "bank.npy").shape == (5, 384)


def test_splitter_on_man_page_and_markdown_layout():
    from lnsp.data.sentences import split

    page = ("NOTE\n       This manpage is a short description of GNU tar.  For a detailed discus\u2010\n"
            "       sion, see the manual, e.g. with info tar.  Use ~/.ssh/config and\n"
            "       v1.34 rules.\n\nOptions\n=======\n\n- First item.\n- Second item,\n"
            "  wrapped.\n1. Numbered item.\n\n----\n")
    assert split(page) == [
        "NOTE", "This manpage is a short description of GNU tar.",
        "For a detailed discussion, see the manual, e.g. with info tar.",
        "Use ~/.ssh/config and v1.34 rules.", "Options", "First item.",
        "Second item, wrapped.", "Numbered item."]
    assert split(page, "paragraph") == [
        "NOTE This manpage is a short description of GNU tar. For a detailed discussion, "
        "see the manual, e.g. with info tar. Use ~/.ssh/config and v1.34 rules.",
        "Options", "- First item. - Second item, wrapped. 1. Numbered item."]


def _folder(tmp_path, files: dict) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name, content in files.items():
        (src / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return src


def _jsonl(tmp_path, lines: list[str]) -> Path:
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(lines) + "\n")
    return src


GOOD = prose(sentences("good", 12))
BAD_INPUTS = {
    "no such source": (lambda t: t / "missing", [], "missing: no such file or folder"),
    "no text files": (lambda t: _folder(t, {"a.pdf": b"%PDF", "b.html": "<p>x</p>"}), [],
                      "no .txt, .md, .rst files"),
    "not UTF-8": (lambda t: _folder(t, {"a.txt": GOOD, "b.txt": "caf\u00e9 ol\u00e9".encode(
        "latin-1")}), [], "b.txt: not UTF-8 text (byte 0xe9 at offset 3)"),
    "every document empty": (lambda t: _folder(t, {"a.txt": " \n", "b.md": ""}), [],
                             "every document is empty (2 documents)"),
    "no chain long enough": (lambda t: _folder(t, {"a.txt": prose(sentences("s", 4))}), [],
                             "no document has 11 sentences or more"),
    "jsonl not JSON": (lambda t: _jsonl(t, [json.dumps({"text": GOOD}), "{oops"]), [],
                       "docs.jsonl:2: not JSON"),
    "jsonl without text": (lambda t: _jsonl(t, [json.dumps({"text": GOOD}), "",
                                                json.dumps({"body": GOOD})]), [],
                           "docs.jsonl:3: no 'text' field"),
    "jsonl line not UTF-8": (lambda t: _folder(t, {"d.jsonl": json.dumps({"text": GOOD}).encode()
                                                   + b'\n{"text": "caf\xe9"}\n'}) / "d.jsonl",
                             [], "d.jsonl:2: not UTF-8 (byte 0xe9 at column 14)"),
    "jsonl text not a string": (lambda t: _jsonl(t, [json.dumps({"text": ["a"]})]), [],
                                "docs.jsonl:1: 'text' is list"),
    "source of another kind": (lambda t: _folder(t, {"a.txt": GOOD}) / "a.txt.gz", [],
                               "no such file or folder"),
    "encoder folder not a model": (lambda t: _folder(t, {"a.txt": GOOD}),
                                   ["--encoder", "{tmp}/src"], "cannot be loaded"),
    "encoder path missing": (lambda t: _folder(t, {"a.txt": GOOD}),
                             ["--encoder", "./no/such/model"], "no such folder"),
    "output not empty": (lambda t: _folder(t, {"a.txt": GOOD}), ["--out", "{tmp}/src"],
                         "exists and is not empty (--force replaces it)"),
    "output holds the source": (lambda t: _folder(t, {"a.txt": GOOD}),
                                ["--out", "{tmp}", "--force"], "outside SRC"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    make, extra, expected = BAD_INPUTS[case]
    src = make(tmp_path)
    extra = [a.format(tmp=tmp_path) for a in extra]
    out = tmp_path / "out"
    args = [src, *(extra if "--out" in extra else ["--out", out, *extra])]
    r = run_cli(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    assert not out.exists()
    assert not list(tmp_path.glob(".*partial*")), list(tmp_path.iterdir())


def test_min_chain_follows_the_ctx_len_training_will_use(tmp_path):
    src = _folder(tmp_path, {"a.txt": prose(sentences("s", 6))})
    r = lnsp("data", "from-text", src, "--out", tmp_path / "out", timeout=60,
             extra_env={"LNSP_CTX_LEN": "6"})
    assert r.returncode == 2 and "no document has 7 sentences or more" in r.stderr, r.stderr


def test_bad_input_from_a_real_process(tmp_path):
    """The same one line through the installed entry point (no CliRunner)."""
    src = _jsonl(tmp_path, [json.dumps({"text": GOOD}), "not json"])
    r = lnsp("data", "from-text", src, "--out", tmp_path / "out", timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"Error: {src}:2: not JSON (Expecting value: line 1 column 1 (char 0))"]
    assert not (tmp_path / "out").exists()


def test_force_replaces_and_stale_partial_is_removed(corpus, tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "old.txt").write_text("old")
    dead = subprocess.Popen(["true"])  # a pid that no longer runs
    dead.wait()
    stale = tmp_path / f".docs.partial-{dead.pid}"
    stale.mkdir()
    r = run_cli(corpus / "b.txt", "--out", out, "--min-chain", "6", "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "bank.npy", "chains.npz", "manifest.json", "texts.jsonl"]
    assert not stale.exists() and not list(tmp_path.glob(".docs.*"))


def test_interrupted_ingest_leaves_nothing(corpus, tmp_path):
    """SIGTERM a real ingest while it is blocked after its first batch, with the
    temporary directory already holding a partial bank: no DIR, no temporary left."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    out = tmp_path / "docs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lnsp", "data", "from-text", str(corpus), "--out", str(out),
         "--min-chain", "6", "--batch-size", "2", "--threads", "safe"],
        env=env(LNSP_TEST_TEXT_GATE=gate), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def at_gate():
            assert proc.poll() is None, proc.communicate()[0]
            try:  # succeeds only once the ingest has opened the FIFO to read
                return os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return None

        fd = wait_until(at_gate, timeout=100, what="the ingest to reach the gate")
        partial = tmp_path / f".docs.partial-{proc.pid}"
        assert (partial / "bank.npy").is_file() and not out.exists()
        proc.send_signal(signal.SIGTERM)
        os.close(fd)  # the gate opens; the ingest sees the signal at the next check
        code, output = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM, output
    assert output.strip().splitlines()[-1] == (
        f"Error: interrupted by SIGTERM: nothing written to {out}"), output
    assert "Traceback" not in output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["gate"]


def test_train_runs_on_the_result(built, tmp_path):
    run = tmp_path / "run"
    r = lnsp("train", "--data", built, "--run-dir", run, "--ctx-len", "4", "--epochs", "1",
             *FAST_TRAIN, "--batch-size", "4", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    ending = json.loads((run / "exit.json").read_text())
    assert ending["state"] == "finished" and ending["step"] >= 3, ending
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and 0 <= metrics[-1]["hit@10"] <= 1, metrics


def test_embedding_progress_is_lnsps_progress(corpus, tmp_path, monkeypatch):
    """The embedding pass reports through lnsp.progress, as an index build does: off a
    terminal one line per interval (here every batch), the last at the total."""
    from lnsp.data import encode

    monkeypatch.setattr(encode, "PROGRESS_INTERVAL", 0.0)
    monkeypatch.setenv("LNSP_PROGRESS", "lines")
    r = run_cli(corpus / "b.txt", "--out", tmp_path / "docs", "--min-chain", "6",
                "--batch-size", "5", "--threads", "safe")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("embedding")]
    assert [line.split()[1:3] for line in lines] == [["42%", "5/12"], ["83%", "10/12"],
                                                     ["100%", "12/12"]], r.stderr
    assert all(line.startswith("embedding: ") and " sentences/s ETA " in line
               for line in lines), r.stderr
