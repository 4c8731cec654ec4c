"""Tests of mmbook.asr against independent references: torch's CTC loss, brute-force enumeration of alignments
and labellings, torchaudio's edit distance."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchaudio

from mmbook.asr import (
    CTCDigitsRecipe,
    CTCRecognizer,
    ctc_greedy_decode,
    ctc_loss,
    ctc_prefix_beam_search,
    digit_sequences,
    edit_distance,
    error_rate,
    log_mel_features,
    pretrained_ctc_recognizer,
    train_ctc_recognizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread


def collapse(path, blank=0):
    return tuple(s for i, s in enumerate(path) if s != blank and (i == 0 or s != path[i - 1]))


def brute_force_labellings(log_probs, blank=0):
    """log p(labelling) for every labelling, by summing the probabilities of all V^T paths."""
    num_frames, num_symbols = log_probs.shape
    totals = {}
    for path in itertools.product(range(num_symbols), repeat=num_frames):
        p = math.exp(sum(float(log_probs[t, s]) for t, s in enumerate(path)))
        key = collapse(path, blank)
        totals[key] = totals.get(key, 0.0) + p
    return {k: math.log(v) for k, v in totals.items()}


def random_problem(seed=0, batch=6, frames=12, symbols=6, max_labels=4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, frames, symbols, dtype=torch.float64, generator=gen)
    targets = torch.randint(1, symbols, (batch, max_labels), generator=gen)
    targets[0, :3] = torch.tensor([2, 2, 2])  # repeats need a blank between them
    input_lengths = torch.tensor([12, 10, 7, 6, 12, 9])[:batch]
    target_lengths = torch.tensor([3, 4, 2, 2, 0, 4])[:batch]
    return logits, targets, input_lengths, target_lengths


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_ctc_loss_equals_torch_values_and_gradients(reduction):
    logits, targets, input_lengths, target_lengths = random_problem()
    weights = torch.randn(logits.shape[0] if reduction == "none" else (), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1))
    grads = []
    for which in ("ours", "torch"):
        z = logits.clone().requires_grad_()
        lp = z.log_softmax(-1)
        if which == "ours":
            loss = ctc_loss(lp, targets, input_lengths, target_lengths, reduction=reduction)
        else:
            loss = F.ctc_loss(lp.transpose(0, 1), targets, input_lengths, target_lengths, reduction=reduction)
        grads.append((loss.detach(), torch.autograd.grad((loss * weights).sum(), z)[0]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)


def test_ctc_loss_equals_brute_force_sum_over_alignments():
    gen = torch.Generator().manual_seed(3)
    log_probs = torch.randn(1, 5, 3, dtype=torch.float64, generator=gen).log_softmax(-1)
    table = brute_force_labellings(log_probs[0])
    for labels in [(), (1,), (2, 1), (1, 1), (1, 2, 1), (2, 2, 2)]:
        target = torch.tensor([list(labels) + [1] * (3 - len(labels))])
        loss = ctc_loss(log_probs, target, torch.tensor([5]), torch.tensor([len(labels)]), reduction="none")
        assert abs(float(loss[0]) + table[labels]) < 1e-12, labels
    # three repeats need five frames; with four the alignment is impossible
    target = torch.tensor([[2, 2, 2]])
    assert ctc_loss(log_probs, target, torch.tensor([4]), torch.tensor([3]), reduction="none").item() == math.inf
    zero = ctc_loss(log_probs, target, torch.tensor([4]), torch.tensor([3]), reduction="sum", zero_infinity=True)
    assert zero.item() == 0.0


def test_ctc_loss_impossible_alignment_matches_torch_with_zero_infinity():
    logits, targets, input_lengths, target_lengths = random_problem()
    input_lengths = input_lengths.clone()
    input_lengths[1] = 3  # four labels in three frames: impossible
    z = logits.clone().requires_grad_()
    ours = ctc_loss(z.log_softmax(-1), targets, input_lengths, target_lengths, zero_infinity=True)
    g_ours = torch.autograd.grad(ours, z)[0]
    z2 = logits.clone().requires_grad_()
    ref = F.ctc_loss(z2.log_softmax(-1).transpose(0, 1), targets, input_lengths, target_lengths, zero_infinity=True)
    g_ref = torch.autograd.grad(ref, z2)[0]
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(g_ours).all()


def test_ctc_loss_bad_inputs():
    logits, targets, input_lengths, target_lengths = random_problem()
    lp = logits.log_softmax(-1)
    with pytest.raises(ValueError, match="ctc_loss: log_probs must have shape"):
        ctc_loss(lp[0], targets, input_lengths, target_lengths)
    with pytest.raises(TypeError, match="ctc_loss: targets must be an integer tensor"):
        ctc_loss(lp, targets.double(), input_lengths, target_lengths)
    with pytest.raises(ValueError, match="ctc_loss: input_lengths must lie in"):
        ctc_loss(lp, targets, input_lengths + 1, target_lengths)
    with pytest.raises(ValueError, match="ctc_loss: target_lengths must have shape"):
        ctc_loss(lp, targets, input_lengths, target_lengths[:3])
    bad = targets.clone()
    bad[1, 0] = 0
    with pytest.raises(ValueError, match="ctc_loss: targets must not contain the blank"):
        ctc_loss(lp, bad, input_lengths, target_lengths)
    bad[1, 0] = 6
    with pytest.raises(ValueError, match=r"ctc_loss: targets must lie in \[0, 6\)"):
        ctc_loss(lp, bad, input_lengths, target_lengths)
    with pytest.raises(ValueError, match="ctc_loss: reduction must be one of"):
        ctc_loss(lp, targets, input_lengths, target_lengths, reduction="avg")
    with pytest.raises(ValueError, match="ctc_loss: blank must be"):
        ctc_loss(lp, targets, input_lengths, target_lengths, blank=6)
    with_nan = lp.clone()
    with_nan[2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="ctc_loss: log_probs contains NaN"):
        ctc_loss(with_nan, targets, input_lengths, target_lengths)


def test_greedy_decode_merges_repeats_and_drops_blanks():
    path = torch.tensor([[0, 1, 1, 0, 1, 2, 2, 0, 3, 3]])
    scores = F.one_hot(path, 4).double()
    assert ctc_greedy_decode(scores) == [[1, 1, 2, 3]]
    assert ctc_greedy_decode(scores, torch.tensor([6])) == [[1, 1, 2]]
    assert ctc_greedy_decode(scores, blank=3) == [[0, 1, 0, 1, 2, 0]]
    with pytest.raises(ValueError, match="ctc_greedy_decode: input_lengths must lie in"):
        ctc_greedy_decode(scores, torch.tensor([0]))
    with pytest.raises(TypeError, match="ctc_greedy_decode: log_probs must be a torch.Tensor"):
        ctc_greedy_decode([[0.0, 1.0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_beam_search_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    log_probs = (2 * torch.randn(5, 3, dtype=torch.float64, generator=gen)).log_softmax(-1)
    table = brute_force_labellings(log_probs)
    full = ctc_prefix_beam_search(log_probs, beam_width=1000)
    assert len(full) == len(table)  # nothing pruned: every labelling of up to 5 symbols over 2 labels
    for labels, score in full:
        assert abs(score - table[labels]) < 1e-12
    best = max(table, key=table.get)
    assert full[0][0] == best
    narrow = ctc_prefix_beam_search(log_probs, beam_width=3)
    assert len(narrow) == 3 and [s for _, s in narrow] == sorted((s for _, s in narrow), reverse=True)
    # the scores of surviving prefixes are lower bounds of the true labelling probabilities
    assert all(score <= table[labels] + 1e-12 for labels, score in narrow)


def test_prefix_beam_search_beats_greedy_where_alignments_split_the_mass():
    # Greedy picks blank at each frame (0.4 > 0.3), but "1" collects 1 - 0.4^2 - 0.3^2 ... more mass in total.
    probs = torch.tensor([[0.4, 0.3, 0.3], [0.4, 0.3, 0.3]], dtype=torch.float64)
    log_probs = probs.log()
    assert ctc_greedy_decode(log_probs[None]) == [[]]
    best, score = ctc_prefix_beam_search(log_probs, beam_width=10)[0]
    table = brute_force_labellings(log_probs)
    assert best == (1,) or best == (2,)
    assert abs(math.exp(score) - (0.3 * 0.3 + 0.4 * 0.3 * 2)) < 1e-12
    assert table[()] < table[best]
    with pytest.raises(ValueError, match="ctc_prefix_beam_search: log_probs must have shape"):
        ctc_prefix_beam_search(log_probs[None])
    with pytest.raises(ValueError, match="ctc_prefix_beam_search: beam_width must be a positive int"):
        ctc_prefix_beam_search(log_probs, beam_width=0)


def test_edit_distance_and_error_rate_equal_torchaudio():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        a = torch.randint(0, 4, (int(torch.randint(0, 7, (1,), generator=gen)),), generator=gen).tolist()
        b = torch.randint(0, 4, (int(torch.randint(0, 7, (1,), generator=gen)),), generator=gen).tolist()
        assert edit_distance(a, b) == torchaudio.functional.edit_distance(a, b)
    refs, hyps = [["one", "two"], ["three"]], [["one"], ["three", "three", "four"]]
    assert error_rate(refs, hyps) == (1 + 2) / 3
    with pytest.raises(TypeError, match="edit_distance: reference must be a sequence"):
        edit_distance("one two", ["one"])
    with pytest.raises(ValueError, match="error_rate: references and hypotheses must have the same length"):
        error_rate(refs, hyps[:1])
    with pytest.raises(ValueError, match="error_rate: references must hold at least one symbol"):
        error_rate([[]], [["x"]])


def fake_recordings(voices=("a", "b", "c"), per=2, samples=1600):
    gen = torch.Generator().manual_seed(0)
    waves, labels, names = [], [], []
    for v in voices:
        for d in range(10):
            for _ in range(per):
                w = torch.zeros(samples)
                w[200:1200] = 0.1 * torch.randn(1000, generator=gen) + 0.01 * (d + 1)
                waves.append(w)
                labels.append(d)
                names.append(v)
    return {"waveforms": torch.stack(waves), "labels": torch.tensor(labels), "voices": names, "sample_rate": 16000}


def test_digit_sequences_segments_and_voices():
    rec = fake_recordings()
    out = digit_sequences(20, ["a", "b"], 2, 3, seed=4, recordings=rec)
    assert len(out["waveforms"]) == len(out["digits"]) == len(out["segments"]) == 20
    assert set(out["voices"]) <= {"a", "b"}
    for wave, digits, segments in zip(out["waveforms"], out["digits"], out["segments"], strict=True):
        assert 2 <= len(digits) <= 3 and len(segments) == len(digits)
        for (_, end), (next_start, _) in zip(segments, segments[1:], strict=False):
            assert end <= next_start
        for start, end in segments:  # every segment is one trimmed recording: non-silent at both ends
            assert 900 <= end - start <= 1000 and wave[start].abs() > 1e-3 and wave[end - 1].abs() > 1e-3
    again = digit_sequences(20, ["a", "b"], 2, 3, seed=4, recordings=rec)
    assert again["digits"] == out["digits"] and all(torch.equal(x, y) for x, y in
                                                    zip(again["waveforms"], out["waveforms"], strict=True))
    with pytest.raises(ValueError, match="digit_sequences: voices must each have recordings of all ten digits"):
        digit_sequences(2, ["z"], recordings=rec)
    with pytest.raises(ValueError, match="digit_sequences: max_digits must be"):
        digit_sequences(2, ["a"], 3, 2, recordings=rec)
    with pytest.raises(TypeError, match="digit_sequences: voices must be a non-empty list"):
        digit_sequences(2, "a", recordings=rec)
    with pytest.raises(ValueError, match=r"digit_sequences: gap_seconds\[1\] must be"):
        digit_sequences(2, ["a"], gap_seconds=(0.2, 0.1), recordings=rec)


def test_log_mel_features_shapes_and_normalisation():
    gen = torch.Generator().manual_seed(0)
    waves = [torch.randn(4000, generator=gen), torch.randn(2400, generator=gen)]
    feats, lengths = log_mel_features(waves, n_mels=20)
    assert feats.shape == (2, 20, 26) and lengths.tolist() == [26, 16]
    torch.testing.assert_close(feats[1, :, :16].mean(1), torch.zeros(20), atol=1e-5, rtol=0)
    assert (feats[1, :, 16:] == 0).all()
    with pytest.raises(ValueError, match=r"log_mel_features: waveforms\[0\] must have at least 400 samples"):
        log_mel_features([torch.zeros(100)])
    with pytest.raises(TypeError, match="log_mel_features: waveforms must be a non-empty list"):
        log_mel_features(torch.zeros(2, 4000))


def test_recognizer_shapes_and_padding_invariance():
    torch.manual_seed(0)
    model = CTCRecognizer(num_symbols=5, n_mels=8, channels=6, hidden=4).eval()
    x = torch.randn(2, 8, 30)
    lengths = torch.tensor([30, 17])
    log_probs, out_lengths = model(x, lengths)
    assert log_probs.shape == (2, 8, 5) and out_lengths.tolist() == [8, 5]
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 8))
    alone, _ = model(x[1:, :, :17], lengths[1:])  # the short example, unpadded
    torch.testing.assert_close(log_probs[1, :5], alone[0], rtol=1e-5, atol=1e-6)
    assert model.output_lengths(torch.tensor([1, 2, 3, 4, 5, 100])).tolist() == [1, 1, 1, 1, 2, 25]
    with pytest.raises(ValueError, match="CTCRecognizer: features must have 8 mel bands"):
        model(torch.randn(2, 7, 30), lengths)
    with pytest.raises(ValueError, match="CTCRecognizer: lengths must lie in"):
        model(x, torch.tensor([31, 3]))
    with pytest.raises(ValueError, match="CTCRecognizer: num_symbols must be"):
        CTCRecognizer(num_symbols=1)


def test_training_reduces_the_loss_and_both_losses_agree():
    gen = torch.Generator().manual_seed(0)
    n, frames = 16, 24
    targets = torch.randint(1, 4, (n, 2), generator=gen)
    features = torch.randn(n, 6, frames, generator=gen)
    for i in range(n):  # make each label audible: a bump in band = label
        features[i, int(targets[i, 0]), 2:10] += 3.0
        features[i, int(targets[i, 1]), 14:22] += 3.0
    lengths, target_lengths = torch.full((n,), frames), torch.full((n,), 2)
    records = {}
    for loss_fn in ("ours", "torch"):
        torch.manual_seed(0)
        model = CTCRecognizer(num_symbols=4, n_mels=6, channels=8, hidden=8)
        records[loss_fn] = train_ctc_recognizer(model, features, lengths, targets, target_lengths, epochs=30,
                                                batch_size=8, lr=1e-2, seed=0, loss_fn=loss_fn)["loss"]
    assert records["ours"][-1] < 0.5 * records["ours"][0]
    assert abs(records["ours"][0] - records["torch"][0]) < 1e-4  # same data order, same first-epoch losses
    with pytest.raises(TypeError, match="train_ctc_recognizer: model must be a CTCRecognizer"):
        train_ctc_recognizer(torch.nn.Linear(2, 2), features, lengths, targets, target_lengths)
    with pytest.raises(ValueError, match="train_ctc_recognizer: loss_fn must be one of"):
        train_ctc_recognizer(model, features, lengths, targets, target_lengths, loss_fn="mine")
    with pytest.raises(ValueError, match=r"train_ctc_recognizer: targets must lie in \[0, 4\)"):
        train_ctc_recognizer(model, features, lengths, targets + 3, target_lengths)


# ----------------------------------------------------------------------------- chapter 15's recipe and loader
def test_chapter15_recipe_key_is_the_historical_one():
    # the dict chapter 15 passed to cached_training before the recipe object existed: the same key finds the
    # same cached weights
    from mmbook.asr import CHAPTER15_CTC_RECIPE

    assert CHAPTER15_CTC_RECIPE.as_key() == {
        "chapter": 15, "what": "ctc_digits", "version": 3, "strings": 600, "max_digits": 3,
        "held_out": ["m4", "f4", "klatt2", "croak"], "epochs": 16, "batch": 16, "lr": 0.005, "channels": 48,
        "hidden": 48, "data_seed": 151}
    assert "seed" in CTCDigitsRecipe(seed=3).as_key()  # another seed, another entry
    assert not set(CHAPTER15_CTC_RECIPE.train_voices()) & set(CHAPTER15_CTC_RECIPE.held_out)


def test_ctc_recipe_rejects_bad_settings():
    with pytest.raises(ValueError, match="epochs"):
        CTCDigitsRecipe(epochs=0)
    with pytest.raises(TypeError, match="held_out"):
        CTCDigitsRecipe(held_out=["m4"])
    with pytest.raises(ValueError, match="lr"):
        CTCDigitsRecipe(lr=0.0)


def test_pretrained_ctc_recognizer_trains_once_then_loads():
    recipe = CTCDigitsRecipe(strings=8, epochs=1, batch_size=4, channels=8, hidden=8)
    data = recipe.training_data()
    assert data["features"].shape[:2] == (8, 40) and data["targets"].shape == (8, 3)
    assert all(data["targets"][i, :n].min() >= 1 for i, n in enumerate(data["target_lengths"].tolist()))
    first, record, loaded = pretrained_ctc_recognizer("cpu", recipe)
    again, record_again, loaded_again = pretrained_ctc_recognizer("cpu", recipe)
    assert not loaded and loaded_again and len(record["loss"]) == 1 and record_again == record
    assert not first.training and not again.training
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                  strict=True))


def test_pretrained_ctc_recognizer_rejects_bad_input():
    with pytest.raises(TypeError, match="device"):
        pretrained_ctc_recognizer(3)
    with pytest.raises(TypeError, match="recipe"):
        pretrained_ctc_recognizer("cpu", {"epochs": 16})
    with pytest.raises(TypeError, match="recordings"):
        pretrained_ctc_recognizer("cpu", recordings=[1, 2])
