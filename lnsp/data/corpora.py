"""Real text that is on the machine offline, as documents for `lnsp data from-text`:
the manual pages and the docstrings of installed Python packages. Each writer
yields documents (`id`, `title`, `text`, paragraphs separated by blank lines) and
`write` stores them as a `.jsonl` file, one document per line, written atomically.

No one here wrote either corpus, so a model measured on them is measured on text a
user could bring: that is what the results table in docs/results.md is built from.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

MAN_ROOT = Path("/usr/share/man")
# Sections of a manual page that are not prose (or not the page's own words).
MAN_SKIP = {"NAME", "SYNOPSIS", "SEE ALSO", "AUTHOR", "AUTHORS", "COPYRIGHT", "REPORTING BUGS",
            "BUGS", "HISTORY", "COLOPHON", "FILES", "ENVIRONMENT", "EXAMPLES", "EXAMPLE"}
# numpy-style docstring sections that hold code or cross references, not sentences.
DOC_SKIP = {"Examples", "See Also", "References", "Notes", "Example", "Examples:"}
MIN_CHARS = 600  # shorter documents rarely hold a window's worth of sentences
MAX_CHARS = 3000  # documents are cut after about this much (about 25 sentences)


def man_pages(root: Path = MAN_ROOT, sections: str = "18", limit: int = 0) -> Iterator[dict]:
    """English manual pages of the given sections (`man1`, `man8`, ...), in path order,
    rendered to plain text by groff when it is installed (else roff stripped here)."""
    groff = shutil.which("groff")
    pages = sorted(p for s in sections for p in (root / f"man{s}").glob("*") if p.is_file())
    count = 0
    for page in pages:
        try:
            source = _read_roff(page)
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        if source.lstrip().startswith(".so "):  # an alias of another page
            continue
        rendered = _groff(source, groff) if groff else None
        text = _man_prose(rendered) if rendered else _strip_roff(source)
        if len(text) < MIN_CHARS:
            continue
        name = page.name.removesuffix(".gz")
        yield {"id": f"man:{name}", "title": name, "text": text}
        count += 1
        if limit and count >= limit:
            return


def _read_roff(path: Path) -> str:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _groff(source: str, groff: str) -> str | None:
    """Plain text of a page: no bold/underline overstrikes, no hyphenation, long lines
    (paragraphs come out as one line each)."""
    try:
        out = subprocess.run([groff, "-t", "-man", "-Tutf8", "-P-cbou", "-rLL=2000n", "-rcR=1",
                              "-rHY=0"], input=source.encode(), capture_output=True, timeout=20,
                             env={**os.environ, "GROFF_NO_SGR": "1"})
    except (subprocess.TimeoutExpired, OSError):
        return None
    return out.stdout.decode("utf-8", errors="replace") if out.returncode == 0 else None


def _man_prose(rendered: str) -> str:
    """The paragraphs of the prose sections of a rendered page."""
    paragraphs, section, current = [], "", []

    def flush():
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for line in rendered.splitlines()[1:-1]:  # header and footer lines
        if line and not line[0].isspace():  # a section heading at column 0
            flush()
            section = line.strip().upper()
            continue
        if section in MAN_SKIP:
            continue
        line = line.strip()
        if not line:
            flush()
        else:
            current.append(line)
    flush()
    # Option lists render as "-x  text": keep them, they are sentences too; drop the
    # bare lines (a flag alone, a table rule) that carry no sentence.
    return "\n\n".join(p for p in paragraphs if len(p.split()) >= 4)


_ROFF_ESCAPE = re.compile(r"\\f[BIRPC]|\\f\(..|\\f\[[^]]*\]|\\s[+-]?\d"  # fonts, sizes
                          r"|\\\(..|\\\[[^]]*\]|\\[&|^%e-]")  # glyphs, spacing


def _strip_roff(source: str) -> str:
    """Paragraphs of a page without groff: requests dropped, escapes removed."""
    paragraphs, current, skip = [], [], False
    for line in source.splitlines():
        if line.startswith((".SH", ".Sh")):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            skip = line[3:].strip().strip('"').upper() in MAN_SKIP
            continue
        if line.startswith((".PP", ".P", ".LP", ".TP", ".IP", ".sp", ".br")) or not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if skip or line.startswith(("'", '.\\"', ".\\}")):
            continue
        if line.startswith("."):  # .B word, .I word: keep the words
            line = line.split(None, 1)[1] if len(line.split(None, 1)) == 2 else ""
            line = line.replace('"', "")
        line = _ROFF_ESCAPE.sub("", line).replace("\\-", "-").replace("\\", "").strip()
        if line:
            current.append(line)
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in paragraphs if len(p.split()) >= 4)


DEFAULT_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.polynomial",
                   "numpy.ma", "torch", "torch.nn", "torch.nn.functional", "torch.linalg",
                   "torch.fft", "torch.optim", "torch.distributions", "torch.utils.data")


def docstrings(modules=DEFAULT_MODULES, limit: int = 0) -> Iterator[dict]:
    """One document per public module, class and function docstring of the given
    modules (and of a class's public methods), in name order, each object once."""
    import importlib
    import inspect

    seen, count = set(), 0

    def emit(name, obj):
        nonlocal count
        if id(obj) in seen:
            return None
        seen.add(id(obj))
        doc = inspect.getdoc(obj)
        text = _doc_prose(doc) if isinstance(doc, str) else ""
        if len(text) < MIN_CHARS:
            return None
        count += 1
        return {"id": f"doc:{name}", "title": name, "text": text}

    for modname in modules:
        try:
            module = importlib.import_module(modname)
        except ImportError:
            continue
        items = [(modname, module)]
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            try:
                obj = getattr(module, attr)
            except Exception:  # lazy attributes that fail to import
                continue
            if inspect.ismodule(obj):
                continue
            items.append((f"{modname}.{attr}", obj))
            if inspect.isclass(obj):
                for meth, fn in sorted(vars(obj).items()):
                    if not meth.startswith("_") and callable(fn):
                        items.append((f"{modname}.{attr}.{meth}", fn))
        for name, obj in items:
            doc = emit(name, obj)
            if doc:
                yield doc
                if limit and count >= limit:
                    return


def _doc_prose(doc: str) -> str:
    """The paragraphs of a docstring without code, directives and section rules."""
    paragraphs, current, skip = [], [], False
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        underline = i + 1 < len(lines) and re.fullmatch(r"-{3,}|={3,}", lines[i + 1].strip() or "x")
        if underline:  # a numpydoc section title
            if current:
                paragraphs.append(" ".join(current))
                current = []
            skip = stripped in DOC_SKIP
            continue
        if re.fullmatch(r"-{3,}|={3,}", stripped):
            continue
        if stripped.rstrip(":") in DOC_SKIP and stripped.endswith(":"):  # Google style
            skip = True
            continue
        if not stripped or stripped.startswith((">>>", "...", ".. ")):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if not skip:
            current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in paragraphs if len(p.split()) >= 4)


def unique_paragraphs(documents) -> Iterator[dict]:
    """Drop every paragraph already seen in an earlier document (ufunc boilerplate,
    common options): a repeated sentence is in the bank twice and its copy is a false
    negative for every method alike. Documents left too short are dropped."""
    seen = set()
    for doc in documents:
        kept = []
        for paragraph in doc["text"].split("\n\n"):
            if paragraph not in seen:
                seen.add(paragraph)
                kept.append(paragraph)
        text = "\n\n".join(kept)
        if len(text) >= MIN_CHARS:
            yield {**doc, "text": text}


KINDS = ("man", "docstrings")


def documents(kind: str, limit: int = 0, modules=DEFAULT_MODULES,
              max_chars: int = MAX_CHARS) -> Iterator[dict]:
    """The first `limit` documents (all when 0) of a corpus, repeated paragraphs
    dropped, each cut after the paragraph that reaches `max_chars` (0 = whole)."""
    import itertools

    source = man_pages() if kind == "man" else docstrings(modules)
    docs = (truncate(d, max_chars) for d in unique_paragraphs(source))
    return itertools.islice(docs, limit) if limit else docs


def truncate(doc: dict, max_chars: int) -> dict:
    """The document's opening paragraphs up to about max_chars: many short chains
    make a fairer held-out split (by chain) than a few long manuals."""
    if not max_chars or len(doc["text"]) <= max_chars:
        return doc
    kept, size = [], 0
    for paragraph in doc["text"].split("\n\n"):
        kept.append(paragraph)
        size += len(paragraph) + 2
        if size >= max_chars:
            break
    return {**doc, "text": "\n\n".join(kept)}


def write(documents, out: str | Path) -> int:
    """Write documents as JSON lines to `out` (atomically); returns how many."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(out)
    return n
