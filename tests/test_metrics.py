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
    with pytest.raises(ValueError, match="k must be >= 2, got 1"):
        kfold_indices(10, 1)
    with pytest.raises(TypeError, match="shuffle must be a bool, got int"):
        kfold_indices(10, 2, shuffle=1)
