"""Tests of mmbook.retrieval against independent references (scikit-learn, transformers, brute force)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import label_ranking_average_precision_score, top_k_accuracy_score

from mmbook.corpus import load_documents
from mmbook.retrieval import (
    DocumentStore,
    Hit,
    load_minilm,
    mean_reciprocal_rank,
    rank_of_first_relevant,
    recall_at_k,
    topic_passages,
)


def _random_problem(seed=0, queries=30, items=12):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(queries, items, generator=g, dtype=torch.float64)
    target = torch.randint(items, (queries,), generator=g)
    return scores, target


def test_rank_matches_a_sort():
    scores, target = _random_problem()
    order = scores.argsort(dim=1, descending=True)
    expected = torch.tensor([int((row == t).nonzero()) + 1 for row, t in zip(order, target, strict=True)])
    assert torch.equal(rank_of_first_relevant(scores, target), expected)


def test_mrr_and_recall_match_sklearn():
    scores, target = _random_problem(1)
    mask = torch.nn.functional.one_hot(target, scores.shape[1]).bool()
    ref = label_ranking_average_precision_score(mask.int().numpy(), scores.numpy())
    assert mean_reciprocal_rank(scores, target) == pytest.approx(ref, abs=1e-12)
    assert mean_reciprocal_rank(scores, mask) == pytest.approx(ref, abs=1e-12)
    for k in (1, 2, 5):
        ref_k = top_k_accuracy_score(target.numpy(), scores.numpy(), k=k, labels=np.arange(scores.shape[1]))
        assert recall_at_k(scores, target, k) == pytest.approx(ref_k, abs=1e-12)


def test_several_relevant_items_use_the_best_ranked_one():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[False, True, True, False], [True, False, True, False]])
    assert rank_of_first_relevant(scores, mask).tolist() == [2, 2]
    assert mean_reciprocal_rank(scores, mask) == pytest.approx(0.5)


def test_ties_count_against_the_relevant_item():
    scores = torch.zeros(2, 5)
    assert rank_of_first_relevant(scores, torch.tensor([0, 4])).tolist() == [5, 5]


def test_metric_bad_inputs():
    scores, target = _random_problem()
    with pytest.raises(ValueError, match="scores"):
        mean_reciprocal_rank(scores[0], target)
    with pytest.raises(ValueError, match="relevant indices"):
        mean_reciprocal_rank(scores, target + 100)
    with pytest.raises(ValueError, match="at least one relevant"):
        rank_of_first_relevant(scores, torch.zeros_like(scores, dtype=torch.bool))
    with pytest.raises(TypeError, match="relevant"):
        rank_of_first_relevant(scores, [0] * 30)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(scores, target, 0)


def test_topic_passages():
    docs = load_documents()
    titles, passages = topic_passages(docs, max_chars=300)
    assert len(titles) == len(passages) == len(docs) == 79
    assert titles[0] == "assert" and all(p.startswith(t + ":") for t, p in zip(titles, passages, strict=True))
    assert max(map(len, passages)) <= 300 and "  " not in passages[0]
    with pytest.raises(ValueError, match="max_chars"):
        topic_passages(docs, max_chars=10)
    with pytest.raises(TypeError, match="documents"):
        topic_passages("not a list")


def test_document_store_search_is_cosine_ranking():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 8, generator=g) * torch.arange(1, 7)[:, None]  # different norms: cosine must ignore them
    store = DocumentStore([f"t{i}" for i in range(6)], [f"p{i}" for i in range(6)], emb)
    queries = torch.randn(3, 8, generator=g)
    cos = torch.nn.functional.cosine_similarity(queries[:, None], emb[None], dim=-1)
    torch.testing.assert_close(store.scores(queries), cos, rtol=1e-5, atol=1e-6)
    hits = store.search(queries, k=2)
    assert all(isinstance(h, Hit) for row in hits for h in row)
    assert [[h.index for h in row] for row in hits] == cos.topk(2, dim=1).indices.tolist()
    with pytest.raises(ValueError, match="k must be"):
        store.search(queries, k=7)
    with pytest.raises(ValueError, match="queries"):
        store.scores(torch.randn(3, 5))
    with pytest.raises(ValueError, match="as many titles"):
        DocumentStore(["a"], ["b", "c"], torch.randn(2, 4))


def test_load_minilm_gives_a_working_sentence_encoder():
    from mmbook.encoders import BertEncoder, sentence_embeddings

    encoder, tokenizer = load_minilm()
    assert isinstance(encoder, BertEncoder) and not encoder.training
    vectors = sentence_embeddings(encoder, tokenizer, ["how do I define a function?",
                                                       "how do you write a function in python?",
                                                       "what colour is the triangle?"])
    assert vectors.shape == (3, 384)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.3  # a paraphrase is much closer than an unrelated question


def test_nan_scores_and_degenerate_embeddings_are_refused():
    scores = torch.randn(3, 5)
    relevant = torch.tensor([0, 1, 2])
    for bad in (torch.full((3, 5), float("nan")), scores.masked_fill(scores > 0, float("nan"))):
        with pytest.raises(ValueError, match="rank_of_first_relevant: scores contains NaN"):
            rank_of_first_relevant(bad, relevant)  # was rank 1: NaN compares False with everything
        with pytest.raises(ValueError, match="scores contains NaN"):
            recall_at_k(bad, relevant, 1)
    with pytest.raises(ValueError, match="DocumentStore: embeddings contains NaN"):
        DocumentStore(["a", "b"], ["x", "y"], torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="DocumentStore: every embedding row must be non-zero"):
        DocumentStore(["a", "b"], ["x", "y"], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    store = DocumentStore(["a", "b"], ["x", "y"], torch.eye(2))
    with pytest.raises(ValueError, match="DocumentStore.scores: queries contains NaN"):
        store.search(torch.tensor([[float("nan"), 1.0]]), k=1)
