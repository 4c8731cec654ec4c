"""The book's offline English corpus: the Python standard library's own documentation topics.

``pydoc_data.topics`` ships with every CPython, but its text changes between Python
versions. So that every reader trains on the same text, the book uses a snapshot taken from
Python 3.11.7 and committed as ``data/pydoc_topics.txt.gz`` (79 documents, 0.47 MB; PSF
licence, see ``data/README.md``). When that file is not available (``mmbook`` installed on
its own), :func:`load_documents` falls back to the running Python's ``pydoc_data``.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

from mmbook.checks import check_fractions
from mmbook.core import python_rng

__all__ = ["SNAPSHOT", "load_corpus", "load_documents", "split_documents"]

SNAPSHOT = Path(__file__).resolve().parent.parent / "data" / "pydoc_topics.txt.gz"
_SEPARATOR = "\n\x1e\n"


def load_documents(source: str = "snapshot") -> list[str]:
    """Return the documentation topics as a list of documents, in a fixed (sorted-title) order.

    ``source="snapshot"`` reads the committed snapshot (falling back to the live module when
    the file is missing); ``source="live"`` reads this Python's ``pydoc_data.topics``. Each
    document starts with its topic title on the first line.
    """
    if source not in ("snapshot", "live"):
        raise ValueError(f"load_documents: source must be 'snapshot' or 'live', got {source!r}")
    if source == "snapshot" and SNAPSHOT.is_file():
        with gzip.open(SNAPSHOT, "rt", encoding="utf-8") as f:
            return f.read().split(_SEPARATOR)
    from pydoc_data.topics import topics

    return [f"{key}\n{topics[key]}" for key in sorted(topics)]


def load_corpus(source: str = "snapshot") -> str:
    """The whole corpus as one string, documents separated by blank lines (about 465k characters)."""
    return "\n\n".join(load_documents(source))


def split_documents(
    documents: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> list[list[str]]:
    """Shuffle whole documents with ``seed`` and cut them into parts of the given fractions.

    Splitting by document, not by character, keeps held-out text genuinely unseen. Every part
    gets at least one document. Returns one list of documents per fraction.
    """
    if isinstance(documents, str) or not isinstance(documents, Sequence) or not documents \
            or not all(isinstance(d, str) for d in documents):
        raise ValueError("split_documents: documents must be a non-empty sequence of strings")
    check_fractions("fractions", fractions, "split_documents")
    if len(documents) < len(fractions):
        raise ValueError(
            f"split_documents: need at least {len(fractions)} documents for {len(fractions)} parts, "
            f"got {len(documents)}"
        )
    order = list(range(len(documents)))
    python_rng(seed).shuffle(order)
    sizes = [max(1, round(f * len(documents))) for f in fractions[:-1]]
    sizes.append(len(documents) - sum(sizes))
    if sizes[-1] < 1:
        raise ValueError(f"split_documents: fractions {tuple(fractions)} leave the last part empty")
    parts, start = [], 0
    for size in sizes:
        parts.append([documents[i] for i in order[start:start + size]])
        start += size
    return parts
