"""Text read and cut into units: the documents of a folder, a text file or a .jsonl in
reading order, each split into sentences (or paragraphs); the first pass of an ingest
writes the units of the chains it keeps into texts.jsonl."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lnsp.errors import DataError

SUFFIXES = (".txt", ".md", ".rst")

# A line that starts a list item or a Markdown heading starts a new block, so that items
# are not run together into one "sentence" when the lines of a paragraph are joined.
_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)]|#{1,6})\s+")
# A line made only of repeated punctuation (reST section adornment, a Markdown rule)
# separates blocks and is not text.
_RULE = re.compile(r"^\s*([=\-~^\"'`#*+_:.])\1{2,}\s*$")
_BLANK = re.compile(r"\n[ \t\r\f\v]*\n")
_WORD = re.compile(r"\w")


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
    # sentences/s, far ahead of the encoder. See docs/own-text.md.
    from syntok import segmenter

    out = []
    for block in blocks(text):
        for paragraph in segmenter.analyze(block):
            for sentence in paragraph:
                s = "".join(t.spacing + t.value for t in sentence).strip()
                if s:
                    out.append(s)
    return out


def split_all(src: Path, texts_path: Path, unit: str, min_chain: int, check) -> Counts:
    """First pass: split every document; stream the units of kept chains into
    texts.jsonl, one line per future bank row. `check()` between documents raises to
    stop (an interrupt)."""
    counts = Counts()
    with open(texts_path, "w", encoding="utf-8") as texts:
        for doc in documents(src):
            check()
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
