"""Real fine-tuning tasks built offline from text that ships on a Debian machine, with splits that never meet.

* ``manpages`` (instruction task): every manual page of sections 1, 8 (commands) and 2, 3 (C library calls) has a
  ``NAME`` line, "name, alias \\- one-line description". A row asks "What does the command `ls` do?" and the answer is
  the description. Splits are by *page* (hashed on the description, so aliases and pages sharing a description
  land in one split): a held-out command is one the model never trained on.
* ``nodejs_docs`` (domain adaptation): the Node.js API reference in Markdown that Debian's ``nodejs`` package
  ships (``/usr/share/doc/nodejs/api/*.md``), split by *document*; scored by held-out perplexity.
* ``mmlu_text`` (forgetting): the MMLU dev questions inside lm-eval, each with its correct answer, as plain text
  of another kind; its perplexity before and after a run shows what fine-tuning cost elsewhere.

Every builder is a pure function of a directory, so tests run it on tiny fixtures. ``scripts/prepare_tasks.py``
writes the JSONL files ``train.py`` reads (``configs/tasks/*.yaml``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
HELD_OUT = {"validation": 0.1, "test": 0.15}
"""Fractions of the keys (pages, documents) held out; the rest trains."""
MAN_DIR = Path("/usr/share/man")
MAN_SECTIONS = {"1": "command", "8": "command", "2": "system call", "3": "library function"}
NODEJS_DOCS = Path("/usr/share/doc/nodejs/api")
SKIP_PREFIXES = ("gcloud",)
"""Man pages left out: ~16 600 near-identical generated Google Cloud CLI pages would swamp the real commands."""


class TaskDataMissing(FileNotFoundError):
    """The source text of a task is not on this machine; the message says which package provides it."""


def split_of(key: str, seed: int = 0, held_out: Mapping[str, float] = HELD_OUT) -> str:
    """The split of ``key``: a stable hash, so the assignment never depends on file order or on other keys."""
    u = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12
    edge = 0.0
    for name, frac in held_out.items():
        edge += frac
        if u < edge:
            return name
    return "train"


# ------------------------------------------------------------------------------------------------ man pages
_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\*?\(..|\\\[[^\]]*\]"), " "),
            (re.compile(r"\\[-]"), "-"), (re.compile(r"\\[&|^%]"), ""), (re.compile(r"\\e"), r"\\"),
            (re.compile(r"\\ "), " "), (re.compile(r'\\".*'), ""), (re.compile(r"\\."), "")]


def roff_text(text: str) -> str:
    """Roff markup removed from one line of text (fonts, escapes, hyphens), whitespace collapsed."""
    for pattern, repl in _ESCAPES:
        text = pattern.sub(repl, text)
    return " ".join(text.split())


def man_name_line(source: str) -> str | None:
    """The text of a page's NAME section (``man`` or ``mdoc`` macros), or None (an ``.so`` alias, no NAME)."""
    lines = source.splitlines()
    if any(line.startswith(".so ") for line in lines[:3]):
        return None
    for i, line in enumerate(lines):
        head = line.strip().upper().replace('"', "")
        if line.startswith(".SH") and head in (".SH NAME", ".SH NAME:"):
            body = []
            for nxt in lines[i + 1:]:
                if nxt.startswith((".SH", ".Sh", ".SS")):
                    break
                if nxt.startswith((".\\\"", "'\\\"")):
                    continue
                if nxt.startswith("."):
                    macro, _, rest = nxt.partition(" ")
                    if macro in (".B", ".BR", ".I", ".IR", ".RB"):
                        body.append(rest.replace('"', ""))
                    continue
                body.append(nxt)
            return roff_text(" ".join(body)) or None
        if line.startswith(".Sh NAME"):  # mdoc: .Nm name ... .Nd description
            names, desc = [], []
            for nxt in lines[i + 1:]:
                if nxt.startswith(".Sh"):
                    break
                if nxt.startswith(".Nm"):
                    names.append(roff_text(nxt[3:]).rstrip(" ,"))
                elif nxt.startswith(".Nd"):
                    desc.append(roff_text(nxt[3:]))
            return f"{', '.join(n for n in names if n)} - {' '.join(desc)}" if names and desc else None
    return None


def parse_name_line(text: str) -> tuple[list[str], str] | None:
    """``"gzip, gunzip, zcat - compress or expand files"`` -> ``(["gzip", "gunzip", "zcat"], "compress ...")``."""
    m = re.match(r"^(?P<names>.+?)\s+[-\u2013\u2014]+\s+(?P<desc>.+)$", text)
    if not m:
        return None
    names = [n.strip() for n in m["names"].split(",") if n.strip()]
    desc = m["desc"].strip().rstrip(".")
    if not names or len(desc) < 3 or len(desc) > 200 or any(" " in n for n in names):
        return None
    return names, desc


def read_man_pages(man_dir: str | Path = MAN_DIR, sections: Mapping[str, str] = MAN_SECTIONS) -> list[dict[str, Any]]:
    """One entry per real page: ``{"name", "aliases", "section", "kind", "description", "file"}``, sorted by file.

    Symlinked aliases and ``.so`` redirects are skipped (the page they point at is read once); pages without a
    parsable NAME line are skipped and counted in the log.
    """
    man_dir = Path(man_dir)
    out, skipped = [], 0
    for section, kind in sections.items():
        folder = man_dir / f"man{section}"
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_symlink() or not f.is_file() or f.name.startswith(SKIP_PREFIXES):
                continue
            try:
                raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
            except (OSError, EOFError):
                skipped += 1
                continue
            line = man_name_line(raw.decode("utf-8", errors="replace"))
            parsed = parse_name_line(line) if line else None
            if parsed is None:
                skipped += 1
                continue
            names, desc = parsed
            page_kind = "Perl module" if re.search(r"\.3(perl|pm)\b", f.name) else kind
            out.append({"name": names[0], "aliases": names[1:], "section": section, "kind": page_kind,
                        "description": desc, "file": f"man{section}/{f.name}"})
    logger.info("read %d man pages from %s (%d without a usable NAME line)", len(out), man_dir, skipped)
    return out


def man_question(page: Mapping[str, Any]) -> str:
    """The instruction of one page's row."""
    return f"What does the {page['kind']} `{page['name']}` do? Answer with its one-line description from the manual."


def manpage_task(man_dir: str | Path = MAN_DIR, *, seed: int = 0,
                 sections: Mapping[str, str] = MAN_SECTIONS) -> dict[str, list[dict[str, Any]]]:
    """Train / validation / test rows (``instruction``, ``output``, ``name``, ``section``) of the man-page task.

    A description shared by several pages (e.g. "manual page for X") is kept once; the split is a hash of the
    lower-cased description, so the same answer never appears on both sides.

    Raises:
        TaskDataMissing: fewer than 50 usable pages under ``man_dir``.
    """
    pages = read_man_pages(man_dir, sections)
    if len(pages) < 50:
        raise TaskDataMissing(f"{man_dir}: only {len(pages)} usable man pages; install the manuals "
                              "(apt-get install man-db manpages manpages-dev coreutils) or pass --man-dir")
    seen: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for p in pages:
        key = p["description"].lower()
        if key in seen:
            continue
        seen.add(key)
        splits[split_of(key, seed)].append({"instruction": man_question(p), "output": p["description"],
                                            "name": p["name"], "section": p["section"]})
    return splits


# ------------------------------------------------------------------------------------------------ documents
def read_documents(folder: str | Path, pattern: str = "*.md") -> list[tuple[str, str]]:
    """``(name, text)`` of every document matching ``pattern`` (``.gz`` read too), sorted by name."""
    folder = Path(folder)
    docs = []
    for f in sorted([*folder.glob(pattern), *folder.glob(pattern + ".gz")]):
        raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        text = raw.decode("utf-8", errors="replace").strip()
        if text:
            docs.append((f.name.removesuffix(".gz"), text))
    return docs


def chunk_text(text: str, max_chars: int = 2000) -> list[str]:
    """Paragraph-aligned chunks of at most ``max_chars`` (a longer paragraph is its own chunk): rows of a size
    that ``data.limit`` can count, cut where the text has a break."""
    chunks, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if cur and len(cur) + len(para) + 2 > max_chars:
            chunks.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        chunks.append(cur)
    return chunks


def document_task(folder: str | Path = NODEJS_DOCS, *, seed: int = 0, pattern: str = "*.md",
                  max_chars: int = 2000, min_documents: int = 10) -> dict[str, list[dict[str, Any]]]:
    """``{"text", "doc"}`` rows per split, split by document: no held-out document has a chunk in training.

    Raises:
        TaskDataMissing: fewer than ``min_documents`` documents in ``folder``.
    """
    docs = read_documents(folder, pattern)
    if len(docs) < min_documents:
        raise TaskDataMissing(f"{folder}: {len(docs)} documents matching {pattern} (need {min_documents}); "
                              "the Node.js API docs ship in Debian's nodejs package (apt-get install nodejs)")
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for name, text in docs:
        split = split_of(name, seed)
        splits[split] += [{"text": c, "doc": name} for c in chunk_text(text, max_chars)]
    for split in ("validation", "test"):
        if not splits[split]:  # tiny corpora: make sure both held-out splits have a document
            name, text = docs[SPLITS.index(split)]
            splits["train"] = [r for r in splits["train"] if r["doc"] != name]
            splits[split] = [{"text": c, "doc": name} for c in chunk_text(text, max_chars)]
    return splits


def mmlu_text_rows(items: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """MMLU items as ``{"text"}`` rows: the question, then its correct answer (general text for forgetting)."""
    return [{"text": f"{it['question'].strip()}\nAnswer: {it['choices'][it['answer']].strip()}",
             "subject": it.get("subject", "")} for it in items]


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write rows as JSON Lines (UTF-8); the row count."""
    from owlore.run.fileio import atomic_write

    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines), encoding="utf-8"))
    return len(lines)
