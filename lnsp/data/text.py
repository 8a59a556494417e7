"""Text in, a data directory out: documents split into sentences (or paragraphs) in
reading order, embedded by a sentence encoder, one chain per document.

Two passes keep memory flat whatever the corpus size: the first splits every document
and streams the kept units into texts.jsonl (so the bank's size is known), the second
reads texts.jsonl back in batches and streams unit rows into a memory-mapped bank.npy.
Everything is written into a temporary directory beside the output and renamed into
place at the end, so a failed or interrupted ingest leaves no half-written directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from lnsp.data.encode import DEFAULT_ENCODER, embed_all, load_encoder
from lnsp.data.sentences import Counts, split_all
from lnsp.errors import DataError, LnspError


class Interrupted(LnspError):
    """SIGINT or SIGTERM during an ingest: nothing was written. The exit code is the
    shell's for a death by that signal (130, 143), though the process ended cleanly."""

    def __init__(self, signum: int, out: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name}: "
                         f"nothing written to {out}")
        self.exit_code = 128 + signum


# ---------------------------------------------------------------- the ingest

class _Signals:
    """SIGINT/SIGTERM set a flag that the ingest checks between documents and batches;
    a second signal stops at once. Restores the previous handlers on exit."""

    def __init__(self, out: Path):
        self.signum, self.out = None, out
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

    def check(self) -> None:
        """Between documents and batches: a signal that came stops the ingest here."""
        if self.signum is not None:
            raise Interrupted(self.signum, self.out)


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
    with _Signals(out) as signals:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            counts = split_all(src, tmp / "texts.jsonl", unit, min_chain, signals.check)
            model, dim = load_encoder(encoder, thread_policy)
            signals.check()
            echo(f"{counts.documents} documents -> {counts.sentences} {unit}s in "
                 f"{counts.chains} chains ({counts.chains_dropped} chains of fewer than "
                 f"{min_chain} dropped, {counts.documents_empty} empty); embedding with "
                 f"{encoder} ({dim}-d)")
            threads_used = embed_all(model, dim, tmp, counts.sentences, batch_size,
                                     signals.check, unit)
            manifest = write_rest(tmp, counts, src, encoder, dim, unit, min_chain,
                                  batch_size, threads_used, time.monotonic() - started)
            signals.check()
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
