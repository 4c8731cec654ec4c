import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.model_selection import KFold

from mmbook.metrics import (
    classification_report,
    confusion_matrix,
    kfold_indices,
    precision_recall_f1,
    precision_recall_f1_from_confusion,
    split_indices,
)

# Class 3 is never predicted, class 4 never occurs, class 0 is never predicted nor present -> zero divisions.
Y_TRUE = [1, 1, 2, 3, 3, 2, 1, 5, 5, 2, 3, 1]
Y_PRED = [1, 2, 2, 1, 2, 2, 1, 5, 4, 2, 5, 1]
K = 6


def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    ours = confusion_matrix(torch.from_numpy(t), p, 7)
    assert ours.dtype == torch.int64 and ours.shape == (7, 7)
    np.testing.assert_array_equal(ours.numpy(), skm.confusion_matrix(t, p, labels=range(7)))
    assert confusion_matrix([], [], 3).sum().item() == 0


@pytest.mark.parametrize("zero_division", [0.0, 1.0, math.nan])
@pytest.mark.parametrize("average", [None, "micro", "macro", "weighted"])
def test_precision_recall_f1_matches_sklearn(average, zero_division):
    ours = precision_recall_f1(Y_TRUE, Y_PRED, K, average=average, zero_division=zero_division)
    ref = skm.precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=range(K), average=average,
                                              zero_division=zero_division)
    # Counts are exact; ratios are single float64 divisions, averages sums of <= 6 terms: 1e-12 is ample.
    for a, b in zip(ours[:3], ref[:3], strict=True):
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), b, rtol=0, atol=1e-12, equal_nan=True)
    if average is None:
        np.testing.assert_array_equal(ours.support.numpy(), ref[3])
    else:
        assert ours.support == len(Y_TRUE)


def test_classification_report_matches_sklearn():
    names = ["zero", "one", "two", "three", "four", "five"]
    for kwargs in ({}, {"target_names": names, "digits": 4}):
        ours = classification_report(Y_TRUE, Y_PRED, K, **kwargs)
        ref = skm.classification_report(Y_TRUE, Y_PRED, labels=range(K), zero_division=0.0, **kwargs)
        assert ours == ref
    ours = classification_report(np.array(Y_TRUE), torch.tensor(Y_PRED), K, output_dict=True)
    ref = skm.classification_report(Y_TRUE, Y_PRED, labels=range(K), output_dict=True, zero_division=0.0)
    assert list(ours) == list(ref)
    for key, value in ref.items():
        if isinstance(value, dict):
            assert ours[key] == pytest.approx(value, abs=1e-12)
        else:
            assert ours[key] == pytest.approx(value, abs=1e-12)


def test_from_confusion_equals_from_labels():
    cm = confusion_matrix(Y_TRUE, Y_PRED, K)
    a = precision_recall_f1_from_confusion(cm, "macro")
    b = precision_recall_f1(Y_TRUE, Y_PRED, K, "macro")
    assert a == b


def test_metrics_bad_input():
    with pytest.raises(ValueError, match=r"y_pred must lie in 0\.\.2 \(num_classes=3\), got values in 0\.\.3"):
        confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="same length, got 2 and 3"):
        confusion_matrix([0, 1], [0, 1, 1], 3)
    with pytest.raises(ValueError, match=r"y_pred must be 1-D \(num_samples,\), got shape \(2, 3\)"):
        confusion_matrix([0, 1], torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="y_true must hold integer class labels, got dtype torch.float32"):
        confusion_matrix(torch.tensor([0.0, 1.0]), [0, 1], 3)
    with pytest.raises(TypeError, match="num_classes must be an int, got float"):
        confusion_matrix([0], [0], 3.0)
    with pytest.raises(ValueError, match="average must be one of"):
        precision_recall_f1([0], [0], 2, average="binary")
    with pytest.raises(ValueError, match="zero_division must be 0.0, 1.0 or nan, got 0.5"):
        precision_recall_f1([0], [0], 2, zero_division=0.5)
    with pytest.raises(ValueError, match=r"cm must be a square"):
        precision_recall_f1_from_confusion(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="cm must hold integer counts, got dtype torch.float32"):
        precision_recall_f1_from_confusion(torch.eye(3))
    with pytest.raises(ValueError, match="cm must hold counts >= 0, got a minimum of -1"):
        precision_recall_f1_from_confusion(-torch.eye(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target_names must have num_classes=2 entries, got 1"):
        classification_report([0], [0], 2, target_names=["a"])
    with pytest.raises(ValueError, match="digits must be an int >= 0"):
        classification_report([0], [0], 2, digits=-1)


def test_split_indices_partition():
    parts = split_indices(101, (0.6, 0.2, 0.2), seed=3)
    assert [len(p) for p in parts] == [61, 20, 20]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(101))
    assert all(torch.equal(a, b) for a, b in zip(parts, split_indices(101, (0.6, 0.2, 0.2), seed=3), strict=True))
    with pytest.raises(ValueError, match="fractions must be positive and sum to 1"):
        split_indices(10, (0.5, 0.6))
    with pytest.raises(ValueError, match="give an empty part"):
        split_indices(3, (0.8, 0.1, 0.1))
    with pytest.raises(TypeError, match="n must be an int, got float"):
        split_indices(10.0)


def test_kfold_matches_sklearn():
    for n, k in ((10, 3), (17, 5), (6, 6)):
        ours = kfold_indices(n, k)
        ref = list(KFold(n_splits=k).split(np.zeros(n)))
        assert len(ours) == len(ref)
        for (tr, te), (rtr, rte) in zip(ours, ref, strict=True):
            np.testing.assert_array_equal(tr.numpy(), rtr)
            np.testing.assert_array_equal(te.numpy(), rte)
    shuffled = kfold_indices(17, 5, shuffle=True, seed=1)
    assert torch.equal(torch.cat([te for _, te in shuffled]).sort().values, torch.arange(17))
    assert [len(te) for _, te in shuffled] == [len(te) for _, te in KFold(5).split(np.zeros(17))]
    for tr, te in shuffled:
        assert torch.equal(torch.cat([tr, te]).sort().values, torch.arange(17))


def test_kfold_bad_input():
    with pytest.raises(ValueError, match="k=5 folds need at least k samples, got n=3"):
        kfold_indices(3, 5)
    with pytest.raises(ValueError, match="k must be an int >= 2, got 1"):
        kfold_indices(10, 1)
    with pytest.raises(TypeError, match="shuffle must be a bool, got int"):
        kfold_indices(10, 2, shuffle=1)


# ----------------------------------------------------------------------------- BLEU and exact match
from mmbook.metrics import (  # noqa: E402
    brevity_penalty,
    closest_reference_length,
    corpus_bleu,
    exact_match,
    modified_precision,
    sentence_bleu,
)

# The example of Papineni et al. (2002), also used in NLTK's documentation.
PAPER_CANDIDATE_1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
PAPER_CANDIDATE_2 = "It is to insure the troops forever hearing the activity guidebook that party direct"
PAPER_REFERENCES = [
    "It is a guide to action that ensures that the military will forever heed Party commands",
    "It is the guiding principle which guarantees the military forces always being under the command of the Party",
    "It is the practical guide for the army always to heed the directions of the party",
]


def test_modified_precision_reproduces_the_papers_counts():
    assert modified_precision(PAPER_CANDIDATE_1, PAPER_REFERENCES, 1) == (17, 18)
    assert modified_precision(PAPER_CANDIDATE_1, PAPER_REFERENCES, 2) == (10, 17)
    assert modified_precision(PAPER_CANDIDATE_2, PAPER_REFERENCES, 1) == (8, 14)
    assert modified_precision(PAPER_CANDIDATE_2, PAPER_REFERENCES, 2) == (1, 13)
    # clipping: "the" seven times, at most twice in one reference
    assert modified_precision("the the the the the the the", ["the cat is on the mat", "there is a cat on the mat"],
                              1) == (2, 7)


def test_bleu_matches_nltk_documented_values():
    # values printed by nltk.translate.bleu_score.sentence_bleu / corpus_bleu (no smoothing) in NLTK's docs
    assert sentence_bleu(PAPER_CANDIDATE_1, PAPER_REFERENCES) == pytest.approx(0.5045666840058485, abs=1e-12)
    other = ("he read the book because he was interested in world history",
             "he was interested in world history because he read the book")
    score = corpus_bleu([PAPER_CANDIDATE_1, other[0]], [PAPER_REFERENCES, [other[1]]])
    assert score == pytest.approx(0.5920778868801042, abs=1e-12)


def test_bleu_hand_worked_and_edge_cases():
    # "a red circle" against "a red circle above a blue square": p1..p3 = 1, c = 3, r = 7 -> BP = exp(1 - 7/3)
    assert sentence_bleu("a red circle", ["a red circle above a blue square"], max_n=3) == pytest.approx(
        math.exp(1 - 7 / 3))
    assert sentence_bleu("a red circle", ["a red circle"]) == 0.0  # no 4-grams at all
    assert sentence_bleu("a b c d", ["a b c d"]) == 1.0
    assert sentence_bleu("x y z w", ["a b c d"]) == 0.0
    assert sentence_bleu("", ["a b c d"]) == 0.0
    assert brevity_penalty(5, 4) == 1.0 and brevity_penalty(4, 4) == 1.0 and brevity_penalty(0, 3) == 0.0
    assert brevity_penalty(2, 4) == pytest.approx(math.exp(-1))
    assert closest_reference_length(5, [3, 7, 9]) == 3  # tie between 3 and 7: the shorter
    assert closest_reference_length(6, [3, 7]) == 7
    assert sentence_bleu(["a", "b", "c", "d"], [["a", "b", "c", "d"], "z"]) == 1.0  # token lists work too


def test_exact_match():
    assert exact_match(["Yes", "no ", "two"], ["yes", "yes", ["one", "two"]]) == pytest.approx(2 / 3)


def test_bleu_and_exact_match_bad_input():
    with pytest.raises(TypeError, match="references"):
        sentence_bleu("a b", "a b")
    with pytest.raises(ValueError, match="one list of references per candidate"):
        corpus_bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="max_n"):
        corpus_bleu(["a"], [["a"]], max_n=0)
    with pytest.raises(TypeError, match="candidate"):
        modified_precision(3, ["a"], 1)
    with pytest.raises(ValueError, match="reference_length"):
        brevity_penalty(3, -1)
    with pytest.raises(TypeError, match="reference_lengths"):
        closest_reference_length(3, 4)
    with pytest.raises(ValueError, match="one entry per prediction"):
        exact_match(["a"], ["a", "b"])
    with pytest.raises(TypeError, match="strings"):
        exact_match([1], ["a"])


def test_report_and_exact_match_name_bad_input():
    y = [0, 1, 1]
    with pytest.raises(TypeError, match="classification_report: output_dict must be True or False, got str"):
        classification_report(y, y, 2, output_dict="yes")
    with pytest.raises(ValueError, match="classification_report: zero_division must be 0.0, 1.0 or nan, got 2"):
        classification_report(y, y, 2, zero_division=2)
    with pytest.raises(TypeError, match="exact_match: each reference must be a string or a list of strings, got int"):
        exact_match(["a"], [3])
    with pytest.raises(TypeError, match="confusion_matrix: num_classes must be an int, got float"):
        confusion_matrix(y, y, 2.0)
