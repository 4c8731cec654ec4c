import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmbook
from mmbook.fusion import (
    FUSION_METHODS,
    ConcatFusion,
    ConvFusion,
    CrossAttentionClassifier,
    GatedFusion,
    LateFusionClassifier,
    LowRankFusion,
    MLPEncoder,
    MultimodalClassifier,
    RecurrentFusion,
    TensorFusion,
    WeightedSumFusion,
    audio_visual_features,
    corrupt_images,
    digit_sum_features,
    drop_modalities,
    fusion_classifier,
    make_fusion,
    make_uniform_attention,
    patch_tokens,
    segment_tokens,
    trace_shapes,
)
from mmbook.vision import patchify

# float64 results of two different summation orders over <= 1e4 terms of size <= 10 agree to ~1e-11
TOL64 = {"rtol": 1e-10, "atol": 1e-10}
# float32: a few ulps of O(1) values
TOL32 = {"rtol": 1e-5, "atol": 1e-6}


def _inputs(dims, batch=5, dtype=torch.float32):
    mmbook.set_seed(0)
    return [torch.randn(batch, d, dtype=dtype) for d in dims]


@pytest.mark.parametrize("dims", [(3, 4), (3, 4, 2)])
@pytest.mark.parametrize("name", FUSION_METHODS)
def test_every_method_maps_list_to_batch_by_d_out(name, dims):
    mmbook.set_seed(0)
    fusion = make_fusion(name, dims, 6)
    out = fusion(_inputs(dims))
    assert out.shape == (5, 6) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in fusion.parameters())


def test_weighted_sum_and_concat_match_their_formulas():
    xs = _inputs((3, 4))
    ws = WeightedSumFusion((3, 4), 6)
    with torch.no_grad():
        ws.weight_logits.copy_(torch.tensor([0.3, -0.2]))
    w = torch.softmax(torch.tensor([0.3, -0.2]), 0)
    ref = sum(w[m] * (xs[m] @ ws.projections[m].weight.T + ws.projections[m].bias) for m in range(2))
    torch.testing.assert_close(ws(xs), ref, **TOL32)
    torch.testing.assert_close(ws.modality_weights.sum(), torch.tensor(1.0))
    cat = ConcatFusion((3, 4), 6)
    W, b = cat.linear.weight, cat.linear.bias
    torch.testing.assert_close(cat(xs), xs[0] @ W[:, :3].T + xs[1] @ W[:, 3:].T + b, **TOL32)


def test_gated_fusion_is_the_papers_gmu_for_two_modalities():
    xs = _inputs((3, 4), dtype=torch.float64)
    gmu = GatedFusion((3, 4), 6).double()
    h1 = torch.tanh(gmu.hidden[0](xs[0]))
    h2 = torch.tanh(gmu.hidden[1](xs[1]))
    # softmax over two gate logits a, b is sigmoid(a - b): the paper's single gate W_z = W_a - W_b
    Wg, bg = gmu.gate.weight.view(2, 6, 7), gmu.gate.bias.view(2, 6)
    z = torch.sigmoid(torch.cat(xs, 1) @ (Wg[0] - Wg[1]).T + (bg[0] - bg[1]))
    torch.testing.assert_close(gmu(xs), z * h1 + (1 - z) * h2, **TOL64)
    gates = gmu.gates(xs)
    torch.testing.assert_close(gates.sum(1), torch.ones(5, 6, dtype=torch.float64), **TOL64)


def test_tensor_fusion_features_contain_all_interaction_terms():
    xs = _inputs((3, 4, 2), dtype=torch.float64)
    z = TensorFusion((3, 4, 2), 6).double().features(xs).view(5, 4, 5, 3)
    x1, x2, x3 = xs
    assert (z[:, 3, 4, 2] == 1).all()
    assert torch.equal(z[:, :3, 4, 2], x1) and torch.equal(z[:, 3, :4, 2], x2) and torch.equal(z[:, 3, 4, :2], x3)
    assert torch.equal(z[:, :3, :4, 2], x1[:, :, None] * x2[:, None, :])
    # a triple product is rounded once or twice depending on the order: relative error <= 2u
    torch.testing.assert_close(z[:, :3, :4, :2], torch.einsum("bi,bj,bk->bijk", x1, x2, x3), rtol=1e-15, atol=0)


def test_tensor_fusion_parameter_count():
    tf = TensorFusion((3, 4, 2), 6)
    assert sum(p.numel() for p in tf.parameters()) == 4 * 5 * 3 * 6 + 6
    lr = LowRankFusion((3, 4, 2), 6, rank=2)
    assert sum(p.numel() for p in lr.parameters()) == 2 * (4 + 5 + 3) * 6 + 6


@pytest.mark.parametrize("dims", [(3, 4), (3, 4, 2)])
def test_low_rank_equals_tensor_fusion_with_its_full_weight(dims):
    mmbook.set_seed(1)
    lr = LowRankFusion(dims, 6, rank=3).double()
    with torch.no_grad():
        lr.bias.normal_()
    xs = _inputs(dims, dtype=torch.float64)
    tf = lr.to_tensor_fusion()
    assert tf.linear.weight.dtype == torch.float64
    torch.testing.assert_close(lr(xs), tf(xs), **TOL64)
    # an independent rebuild of the full weight from the factors, one rank-one term at a time
    W = torch.zeros(*(d + 1 for d in dims), 6, dtype=torch.float64)
    for r in range(3):
        for o in range(6):
            term = lr.factors[0][r, :, o]
            for f in lr.factors[1:]:
                term = torch.tensordot(term, f[r, :, o], dims=0)
            W[..., o] += term
    torch.testing.assert_close(lr.full_weight(), W, **TOL64)


def test_conv_fusion_matches_an_explicit_convolution():
    xs = _inputs((3, 4), dtype=torch.float64)
    cf = ConvFusion((3, 4), 5, channels=2, kernel_size=3).double()
    stack = cf.stack(xs)  # (5, 2, 5)
    padded = F.pad(stack, (1, 1))
    conv = torch.zeros(5, 2, 5, dtype=torch.float64)
    for c in range(2):
        for t in range(5):
            conv[:, c, t] = (cf.conv.weight[c] * padded[:, :, t:t + 3]).sum((1, 2)) + cf.conv.bias[c]
    torch.testing.assert_close(cf(xs), cf.out(torch.relu(conv).flatten(1)), **TOL64)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recurrent_fusion_matches_a_step_by_step_cell(cell):
    xs = _inputs((3, 4), dtype=torch.float64)
    rf = RecurrentFusion((3, 4), 5, cell=cell).double()
    seq = rf.sequence(xs)
    step = (nn.GRUCell if cell == "gru" else nn.LSTMCell)(5, 5).double()
    step.load_state_dict({k.replace("_l0", ""): v for k, v in rf.rnn.state_dict().items()})
    h = torch.zeros(5, 5, dtype=torch.float64)
    c = torch.zeros_like(h)
    for t in range(2):
        if cell == "gru":
            h = step(seq[:, t], h)
        else:
            h, c = step(seq[:, t], (h, c))
    torch.testing.assert_close(rf(xs), h, **TOL64)


def test_late_fusion_averages_probabilities_or_logits():
    mmbook.set_seed(0)
    a, b = nn.Linear(3, 4), nn.Linear(2, 4)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    probs = LateFusionClassifier([a, b])(x, y)
    ref = torch.log((torch.softmax(a(x), -1) + torch.softmax(b(y), -1)) / 2)
    torch.testing.assert_close(probs, ref, **TOL32)
    torch.testing.assert_close(probs.exp().sum(-1), torch.ones(6), **TOL32)
    product = LateFusionClassifier([a, b], "product")(x, y)
    ref = torch.log_softmax(torch.log_softmax(a(x), -1) + torch.log_softmax(b(y), -1), -1)
    torch.testing.assert_close(product, ref, **TOL32)
    torch.testing.assert_close(LateFusionClassifier([a, b], "logits")(x, y), product)  # the former name
    assert torch.equal(product.argmax(-1), (a(x) + b(y)).argmax(-1))  # a uniform prior: the arg-max of summed logits


def test_product_rule_is_the_bayes_posterior_of_conditionally_independent_modalities():
    # a discrete world: p(y, x1, x2) = p(y) p(x1 | y) p(x2 | y), x1 in 0..5, x2 in 0..6, four classes
    g = torch.Generator().manual_seed(3)
    prior = torch.softmax(torch.randn(4, generator=g, dtype=torch.float64), 0)
    lik1 = torch.softmax(2 * torch.randn(4, 6, generator=g, dtype=torch.float64), 1)
    lik2 = torch.softmax(2 * torch.randn(4, 7, generator=g, dtype=torch.float64), 1)
    joint = prior[:, None, None] * lik1[:, :, None] * lik2[:, None, :]
    exact = (joint / joint.sum(0)).permute(1, 2, 0).reshape(42, 4)  # p(y | x1, x2), rows (x1, x2)
    # unimodal "classifiers" that return the log of their exact posteriors for a one-hot input
    post1, post2 = prior[:, None] * lik1, prior[:, None] * lik2
    clf1, clf2 = nn.Linear(6, 4, bias=False).double(), nn.Linear(7, 4, bias=False).double()
    with torch.no_grad():
        clf1.weight.copy_((post1 / post1.sum(0)).log())
        clf2.weight.copy_((post2 / post2.sum(0)).log())
    x1 = torch.eye(6, dtype=torch.float64).repeat_interleave(7, 0)
    x2 = torch.eye(7, dtype=torch.float64).repeat(6, 1)
    fused = LateFusionClassifier([clf1, clf2], "product", prior=prior)(x1, x2)
    torch.testing.assert_close(fused.exp(), exact, rtol=0, atol=1e-12)
    without_prior = LateFusionClassifier([clf1, clf2], "product")(x1, x2)
    assert (without_prior.exp() - exact).abs().max() > 1e-2  # the (M - 1) log p(y) term matters


def test_classifier_shapes_and_modality_dropout_only_in_training():
    model = fusion_classifier((3, 4), "gated", d_embed=8, num_classes=7, modality_dropout=1.0)
    xs = _inputs((3, 4))
    assert model(*xs).shape == (5, 7)
    model.eval()
    torch.testing.assert_close(model(*xs), model(*xs))
    single = fusion_classifier((3,), d_embed=8)
    assert single(xs[0]).shape == (5, 10)
    assert isinstance(single.encoders[0], MLPEncoder)


def test_drop_modalities_drops_at_most_one_per_example():
    g = torch.Generator().manual_seed(0)
    xs = [torch.ones(2000, 3), torch.ones(2000, 2, 2)]
    out = drop_modalities(xs, 0.4, generator=g)
    kept = torch.stack([out[0].flatten(1).all(1), out[1].flatten(1).all(1)], 1)
    zeroed = torch.stack([(out[0] == 0).flatten(1).all(1), (out[1] == 0).flatten(1).all(1)], 1)
    assert (kept | zeroed).all() and kept.any(1).all()
    assert abs(zeroed.any(1).float().mean().item() - 0.4) < 0.05
    assert torch.equal(drop_modalities(xs, 0.0)[1], xs[1])


def test_corrupt_images_occludes_one_square_and_adds_noise():
    images = torch.ones(50, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    occluded = corrupt_images(images, noise_std=0.0, occlusion=3, generator=g)
    assert ((occluded == 0).sum((1, 2, 3)) == 9).all()
    noisy = corrupt_images(images, noise_std=0.5, occlusion=0, generator=g)
    assert abs((noisy - 1).std().item() - 0.5) < 0.03


def test_audio_visual_features_are_the_documented_transforms():
    from mmbook.audio import mfcc
    from mmbook.data import audio_visual_digits

    feats = audio_visual_features("test", seed=0)
    ds = audio_visual_digits("test", seed=0, snr_db=(-15.0, -5.0))
    n = len(ds)
    assert feats["image"].shape == (n, 64) and feats["audio"].shape == (n, 100) and feats["mfcc"].shape == (n, 20, 51)
    torch.testing.assert_close(feats["image_clean"], ds.images.flatten(1))
    ref = mfcc(ds.waveform(3), n_mfcc=20, melkwargs={"n_fft": 400, "hop_length": 320, "n_mels": 40})
    torch.testing.assert_close(feats["mfcc"][3], ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(feats["audio"][3].view(20, 5)[:, 0], ref[:, :11].mean(1), rtol=1e-4, atol=1e-3)
    g = torch.Generator().manual_seed(1)  # seed * 2 + 1 for the test split
    torch.testing.assert_close(feats["image"], corrupt_images(ds.images, 0.3, 3, g).flatten(1))


def test_trace_shapes_records_calls_and_the_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2))
    trace = trace_shapes(model, torch.randn(2, 3))
    assert [r[0] for r in trace.rows] == ["0", "1", "2"]
    assert trace.rows[0][2:] == ([(2, 3)], (2, 4)) and trace.rows[2][3] is None
    assert isinstance(trace.error, RuntimeError) and "RAISED" in str(trace)
    ok = trace_shapes(nn.Linear(3, 4), torch.randn(2, 3))
    assert ok.error is None and ok.rows == []  # a leaf as the model itself has no named children


# ----------------------------------------------------------------------------- bad input
def test_fusion_rejects_bad_inputs():
    fusion = ConcatFusion((3, 4), 6)
    with pytest.raises(ValueError, match="expected 2 modality tensors"):
        fusion([torch.randn(5, 3)])
    with pytest.raises(ValueError, match=r"modality 1 must have shape \(batch, 4\), got \(5, 2\)"):
        fusion([torch.randn(5, 3), torch.randn(5, 2)])
    with pytest.raises(ValueError, match="same batch size"):
        fusion([torch.randn(5, 3), torch.randn(4, 4)])
    with pytest.raises(TypeError, match="list of 2 tensors"):
        fusion(torch.randn(5, 7))
    with pytest.raises(TypeError, match="floating-point"):
        fusion([torch.ones(5, 3, dtype=torch.long), torch.randn(5, 4)])


def test_constructors_reject_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        make_fusion("bilinear", (3, 4), 6)
    with pytest.raises(TypeError, match="does not take"):
        make_fusion("concat", (3, 4), 6, rank=2)
    with pytest.raises(TypeError, match="dims"):
        make_fusion("concat", 3, 6)
    with pytest.raises(ValueError, match="dims"):
        make_fusion("tensor", (3, 0), 6)
    with pytest.raises(ValueError, match="d_out"):
        WeightedSumFusion((3, 4), 0)
    with pytest.raises(ValueError, match="rank"):
        LowRankFusion((3, 4), 6, rank=0)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConvFusion((3, 4), 6, kernel_size=2)
    with pytest.raises(ValueError, match="cell"):
        RecurrentFusion((3, 4), 6, cell="rnn")
    with pytest.raises(TypeError, match="must be an int"):
        GatedFusion((3, 4), 6.0)
    with pytest.raises(ValueError, match="dropout"):
        MLPEncoder(3, 4, dropout=1.0)
    with pytest.raises(ValueError, match="d_embed"):
        fusion_classifier((3, 4), d_embed=0)


def test_classifiers_reject_bad_arguments():
    with pytest.raises(ValueError, match="2 encoders for a fusion of 3"):
        MultimodalClassifier([nn.Linear(3, 4)] * 2, ConcatFusion((4, 4, 4), 6), 10)
    with pytest.raises(TypeError, match="fusion must be"):
        MultimodalClassifier([nn.Linear(3, 4)], nn.Linear(4, 4), 10)
    with pytest.raises(ValueError, match="modality_dropout needs at least 2"):
        MultimodalClassifier([nn.Linear(3, 4)], ConcatFusion((4,), 6), 10, modality_dropout=0.5)
    model = fusion_classifier((3, 4))
    with pytest.raises(ValueError, match="expected 2 inputs"):
        model(torch.randn(5, 3))
    with pytest.raises(ValueError, match="combine"):
        LateFusionClassifier([nn.Linear(3, 4)], combine="max")
    with pytest.raises(TypeError, match="classifiers"):
        LateFusionClassifier([])
    with pytest.raises(ValueError, match="prior"):
        LateFusionClassifier([nn.Linear(3, 4)], "product", prior=torch.tensor([0.5, 0.6, -0.1]))
    with pytest.raises(ValueError, match="prior"):
        LateFusionClassifier([nn.Linear(3, 4)], "product", prior=torch.full((2, 2), 0.25))
    with pytest.raises(ValueError, match="product rule only"):
        LateFusionClassifier([nn.Linear(3, 4)], "probs", prior=torch.full((4,), 0.25))
    with pytest.raises(TypeError, match="prior"):
        LateFusionClassifier([nn.Linear(3, 4)], "product", prior=[0.25] * 4)
    with pytest.raises(ValueError, match="prior has 3 classes"):
        LateFusionClassifier([nn.Linear(3, 4)], "product", prior=torch.full((3,), 1 / 3))(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 1 inputs"):
        LateFusionClassifier([nn.Linear(3, 4)])(torch.randn(2, 3), torch.randn(2, 3))


def test_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 tensors"):
        drop_modalities([torch.ones(3, 2)], 0.5)
    with pytest.raises(ValueError, match="p must be in"):
        drop_modalities([torch.ones(3, 2), torch.ones(3, 2)], 1.5)
    with pytest.raises(ValueError, match="share the batch size"):
        drop_modalities([torch.ones(3, 2), torch.ones(4, 2)], 0.5)
    with pytest.raises(ValueError, match=r"images must be .* got \(8, 8\)"):
        corrupt_images(torch.ones(8, 8))
    with pytest.raises(ValueError, match="occlusion"):
        corrupt_images(torch.ones(2, 1, 8, 8), occlusion=9)
    with pytest.raises(ValueError, match="noise_std"):
        corrupt_images(torch.ones(2, 1, 8, 8), noise_std=-1.0)
    with pytest.raises(ValueError, match="n_mfcc"):
        audio_visual_features("test", n_mfcc=41)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        trace_shapes(lambda x: x, torch.ones(1))


def test_parameter_counts_are_finite_and_formula_for_concat():
    for name in FUSION_METHODS:
        n = sum(p.numel() for p in make_fusion(name, (8, 8), 8).parameters())
        assert n > 0 and math.isfinite(n)
    assert sum(p.numel() for p in ConcatFusion((8, 8), 8).parameters()) == 16 * 8 + 8


def test_dtype_mixes_nan_noise_and_caller_names():
    xs = [torch.randn(4, 3), torch.randn(4, 5)]
    for name in FUSION_METHODS:  # not "mat1 and mat2 must have the same dtype" deep inside a Linear
        with pytest.raises(TypeError, match=r"Fusion: modality 0 has dtype torch.float64"):
            make_fusion(name, [3, 5], 6)([xs[0].double(), xs[1]])
    with pytest.raises(TypeError, match=r"GatedFusion.gates: modality 0 has dtype torch.float64"):
        make_fusion("gated", [3, 5], 6).gates([x.double() for x in xs])
    encoder = MLPEncoder(3, 4)
    with pytest.raises(ValueError, match=r"MLPEncoder: x must have shape \(batch, 3\), got \(2, 5\)"):
        encoder(torch.randn(2, 5))
    with pytest.raises(TypeError, match="MLPEncoder: x has dtype torch.float64"):
        encoder(torch.randn(2, 3, dtype=torch.float64))
    images = torch.rand(4, 1, 8, 8)
    for bad in (float("nan"), float("inf"), -0.1):  # NaN failed "> 0" and added no noise at all
        with pytest.raises(ValueError, match="corrupt_images: noise_std must be a number >= 0"):
            corrupt_images(images, noise_std=bad)
    with pytest.raises(TypeError, match="corrupt_images: generator must be a torch.Generator or None, got int"):
        corrupt_images(images, generator=3)
    with pytest.raises(TypeError, match="drop_modalities: generator must be a torch.Generator or None"):
        drop_modalities(xs, 0.5, generator=3)
    with pytest.raises(ValueError, match="audio_visual_features: image_noise must be a number >= 0, got nan"):
        audio_visual_features(image_noise=float("nan"))  # the caller's name, not corrupt_images' noise_std
    with pytest.raises(ValueError, match="fusion_classifier: method must be one of 'sum', 'concat'"):
        fusion_classifier([3, 5], method="attn")  # not make_fusion's "name"


def test_digit_sums_label_needs_both_modalities_and_splits_are_disjoint():
    from mmbook.data import audio_visual_digit_sums, audio_visual_digits

    parts = {s: audio_visual_digit_sums(s, recordings_per_digit=8, pairs_per_image=2) for s in ("train", "val", "test")}
    images = {s: {tuple(x.flatten().tolist()) for x in d.images} for s, d in parts.items()}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]
    # train + val are the images of audio_visual_digits' training split, each used pairs_per_image times
    reference = audio_visual_digits("train", recordings_per_digit=8)
    assert len(parts["train"]) + len(parts["val"]) == 2 * len(reference)
    assert len(parts["test"]) == 2 * len(audio_visual_digits("test", recordings_per_digit=8))
    for d in parts.values():
        assert torch.equal(d.labels, (d.image_digits + d.spoken_digits) % 10)
        assert torch.equal(d.labels, torch.tensor([d[i]["label"].item() for i in range(len(d))]))
        item = d[3]
        assert item["word"] == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                "nine")[item["spoken_digit"]]
        rec_labels = torch.arange(10).repeat_interleave(8)
        assert torch.equal(rec_labels[d.recording_index], d.spoken_digits)
    assert not set(parts["test"].recording_index.tolist()) & set(parts["train"].recording_index.tolist())
    # the spoken digit is drawn independently of the image: every (a, b) cell is populated
    d = audio_visual_digit_sums("train", recordings_per_digit=8, pairs_per_image=3)
    cells = torch.bincount(d.image_digits * 10 + d.spoken_digits, minlength=100)
    assert cells.min() > 5
    again = audio_visual_digit_sums("train", recordings_per_digit=8, pairs_per_image=3)
    assert torch.equal(again.spoken_digits, d.spoken_digits) and torch.equal(again.waveform(4), d.waveform(4))


def test_digit_sum_features_are_the_documented_transforms():
    from mmbook.audio import mfcc
    from mmbook.data import audio_visual_digit_sums

    feats = digit_sum_features("val", pairs_per_image=1)
    ds = audio_visual_digit_sums("val", pairs_per_image=1)
    n = len(ds)
    assert feats["image"].shape == (n, 64) and feats["audio"].shape == (n, 100)
    assert torch.equal(feats["image"], ds.images.flatten(1)) and torch.equal(feats["labels"], ds.labels)
    assert torch.equal(feats["spoken_digits"], ds.spoken_digits) and torch.equal(feats["image_digits"], ds.image_digits)
    ref = mfcc(ds.waveform(3), n_mfcc=20, melkwargs={"n_fft": 400, "hop_length": 320, "n_mels": 40})
    torch.testing.assert_close(feats["audio"][3].view(20, 5)[:, 0], ref[:, :11].mean(1), rtol=1e-4, atol=1e-3)
    assert feats["mfcc"].shape == (n, 20, 51)
    torch.testing.assert_close(feats["mfcc"][3], ref, rtol=1e-4, atol=1e-3)


def test_digit_sums_reject_bad_arguments():
    from mmbook.data import audio_visual_digit_sums

    with pytest.raises(ValueError, match="split"):
        audio_visual_digit_sums("validation")
    with pytest.raises(ValueError, match="pairs_per_image"):
        audio_visual_digit_sums("train", pairs_per_image=0)
    with pytest.raises(ValueError, match="val_fraction"):
        audio_visual_digit_sums("train", val_fraction=0.9)
    with pytest.raises(ValueError, match="snr_db"):
        audio_visual_digit_sums("train", snr_db=(30.0, 10.0))
    with pytest.raises(TypeError, match="snr_db"):
        audio_visual_digit_sums("train", snr_db=10.0)
    with pytest.raises(ValueError, match="n_mfcc"):
        digit_sum_features("test", n_mfcc=41)
    with pytest.raises(TypeError, match="segments"):
        digit_sum_features("test", segments=2.5)


def _cross_attention(token_shapes=((5, 3), (4, 2)), num_heads=2):
    mmbook.set_seed(0)
    model = CrossAttentionClassifier(token_shapes, d_embed=8, num_classes=3, num_heads=num_heads).double().eval()
    x_q = torch.randn(6, *token_shapes[0], dtype=torch.float64)
    x_kv = torch.randn(6, *token_shapes[1], dtype=torch.float64)
    return model, x_q, x_kv


def test_cross_attention_classifier_matches_torch_attention():
    model, x_q, x_kv = _cross_attention()
    out = model(x_q, x_kv)
    assert out.shape == (6, 3)
    # reference: the embeddings written out, torch.nn.MultiheadAttention with the same weights, mean, head
    e = [torch.relu(x @ model.embed[m][0].weight.T + model.embed[m][0].bias) + model.positions[m]
         for m, x in enumerate((x_q, x_kv))]
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    attn = model.attention
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        mha.out_proj.weight.copy_(attn.out_proj.weight)
        mha.out_proj.bias.copy_(attn.out_proj.bias)
        read, weights = mha(e[0], e[1], e[1], average_attn_weights=False)
        ref = model.head[2]((e[0] + read).mean(1).relu())
        torch.testing.assert_close(out, ref, **TOL64)
        ours = model.attention_weights(x_q, x_kv)
        torch.testing.assert_close(ours, weights, **TOL64)
    assert ours.shape == (6, 2, 5, 4)
    torch.testing.assert_close(ours.sum(-1), torch.ones(6, 2, 5, dtype=torch.float64), **TOL64)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cross_attention_over_one_token_is_a_linear_map_of_the_other_modality():
    model, x_q, x_kv = _cross_attention(((5, 3), (1, 2)))
    attn = model.attention
    with torch.no_grad():
        e_q, e_kv = model.embed_tokens(x_q, x_kv)
        read = attn(e_q, e_kv, e_kv)[0]  # (6, 5, 8)
        linear = e_kv @ (attn.out_proj.weight @ attn.v_proj.weight).T + attn.out_proj.weight @ attn.v_proj.bias \
            + attn.out_proj.bias  # (6, 1, 8)
        torch.testing.assert_close(read, linear.expand(-1, 5, -1), **TOL64)
        torch.testing.assert_close(attn(torch.randn_like(e_q), e_kv, e_kv)[0], read, **TOL64)  # the query is ignored
        # with two key tokens the query matters
        model2, x_q2, x_kv2 = _cross_attention(((5, 3), (2, 2)))
        e_q2, e_kv2 = model2.embed_tokens(x_q2, x_kv2)
        moved = model2.attention(torch.randn_like(e_q2), e_kv2, e_kv2)[0] - model2.attention(e_q2, e_kv2, e_kv2)[0]
        assert moved.abs().max() > 1e-3


def test_cross_attention_classifier_rejects_bad_arguments():
    with pytest.raises(TypeError, match="token_shapes must be two"):
        CrossAttentionClassifier((5, 3))
    with pytest.raises(TypeError, match="token_shapes must be two"):
        CrossAttentionClassifier([(5, 3), (4, 2), (1, 1)])
    with pytest.raises(ValueError, match=r"token_shapes\[1\]\[0\]"):
        CrossAttentionClassifier([(5, 3), (0, 2)])
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CrossAttentionClassifier([(5, 3), (4, 2)], d_embed=10, num_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        CrossAttentionClassifier([(5, 3), (4, 2)], dropout=1.0)
    with pytest.raises(ValueError, match="d_embed"):
        CrossAttentionClassifier([(5, 3), (4, 2)], d_embed=0)
    model = CrossAttentionClassifier([(5, 3), (4, 2)], d_embed=8, num_heads=2)
    with pytest.raises(ValueError, match=r"x_kv must have shape \(batch, 4, 2\), got \(6, 2, 4\)"):
        model(torch.randn(6, 5, 3), torch.randn(6, 2, 4))
    with pytest.raises(ValueError, match=r"x_q must have shape"):
        model(torch.randn(6, 15), torch.randn(6, 4, 2))
    with pytest.raises(ValueError, match="same batch size"):
        model(torch.randn(6, 5, 3), torch.randn(5, 4, 2))
    with pytest.raises(TypeError, match="x_q"):
        model(torch.ones(6, 5, 3, dtype=torch.long), torch.randn(6, 4, 2))
    with pytest.raises((TypeError, ValueError), match="x_kv"):
        model(torch.randn(6, 5, 3), torch.randn(6, 4, 2, dtype=torch.float64))


def test_cross_attention_classifier_is_chapter_12s_block_without_layernorms_and_feed_forward():
    from mmbook.crossmodal import CrossAttentionBlock

    model, x_q, x_kv = _cross_attention()
    block = CrossAttentionBlock(8, 2).double().eval()
    block.attn.load_state_dict(model.attention.state_dict())
    block.norm_q = block.norm_kv = block.norm_ff = nn.Identity()
    with torch.no_grad():
        block.ff.net[-1].weight.zero_()
        block.ff.net[-1].bias.zero_()  # the feed-forward layer now adds 0
        e_q, e_kv = model.embed_tokens(x_q, x_kv)
        h, weights = block(e_q, e_kv)
        torch.testing.assert_close(model(x_q, x_kv), model.head(h.mean(1)), **TOL64)
        torch.testing.assert_close(model.attention_weights(x_q, x_kv), weights, **TOL64)


def test_make_uniform_attention_gives_weights_one_over_keys_and_freezes_only_the_queries():
    model, x_q, x_kv = _cross_attention()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert make_uniform_attention(model) is model
    with torch.no_grad():
        weights = model.attention_weights(x_q, x_kv)  # (6, 2, 5, 4)
    torch.testing.assert_close(weights, torch.full_like(weights, 0.25), rtol=0, atol=1e-15)
    # uniform weights: each query token reads the plain mean of the value vectors (written out independently)
    attn = model.attention
    with torch.no_grad():
        e_q, e_kv = model.embed_tokens(x_q, x_kv)
        mean_value = (e_kv @ attn.v_proj.weight.T + attn.v_proj.bias).mean(1, keepdim=True)  # (6, 1, 8)
        torch.testing.assert_close(attn(e_q, e_kv, e_kv)[0],
                                   (mean_value @ attn.out_proj.weight.T + attn.out_proj.bias).expand(-1, 5, -1),
                                   **TOL64)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"attention.q_proj.weight", "attention.q_proj.bias"}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == frozen
    # training moves the other parameters, never the frozen queries; the weights stay uniform
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x_q, x_kv), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
        optimizer.step()
    assert (model.attention.q_proj.weight == 0).all() and (model.attention.q_proj.bias == 0).all()
    # with every query 0 each score is 0 . k_j: the key projection gets exactly zero gradient (AdamW's weight decay
    # alone moves it), while the values keep learning
    assert (model.attention.k_proj.weight.grad == 0).all() and (model.attention.k_proj.bias.grad == 0).all()
    assert not torch.equal(model.attention.v_proj.weight, before["attention.v_proj.weight"])
    with torch.no_grad():
        torch.testing.assert_close(model.attention_weights(x_q, x_kv), weights, rtol=0, atol=1e-15)


def test_make_uniform_attention_rejects_other_models():
    with pytest.raises(TypeError, match="make_uniform_attention: model must be a mmbook.fusion.CrossAttention"):
        make_uniform_attention(fusion_classifier([3, 4]))


def test_segment_tokens_are_the_segments_in_time_order():
    mmbook.set_seed(0)
    coeffs = torch.randn(3, 20, 51)  # (batch, n_mfcc, frames)
    audio = nn.functional.adaptive_avg_pool1d(coeffs, 5).flatten(1)  # how the "audio" feature is made
    tokens = segment_tokens(audio)
    assert tokens.shape == (3, 5, 20) and tokens.is_contiguous()
    for s in range(5):  # segment s averages frames floor(51 s / 5) .. ceil(51 (s + 1) / 5) - 1
        torch.testing.assert_close(tokens[:, s], coeffs[:, :, (51 * s) // 5:-((-51 * (s + 1)) // 5)].mean(-1), **TOL32)
    assert segment_tokens(torch.arange(12.0).view(1, 12), n_mfcc=3).tolist() == [
        [[0.0, 4.0, 8.0], [1.0, 5.0, 9.0], [2.0, 6.0, 10.0], [3.0, 7.0, 11.0]]]


def test_patch_tokens_are_the_quadrants_in_row_major_order():
    images = torch.arange(2 * 64, dtype=torch.float32).view(2, 64)
    tokens = patch_tokens(images)
    assert tokens.shape == (2, 4, 16)
    grid = images.view(2, 8, 8)
    quadrants = [grid[:, :4, :4], grid[:, :4, 4:], grid[:, 4:, :4], grid[:, 4:, 4:]]
    for k, q in enumerate(quadrants):
        assert torch.equal(tokens[:, k], q.flatten(1))
    assert torch.equal(patch_tokens(grid), tokens)  # (batch, side, side) accepted too
    assert torch.equal(patch_tokens(images, patch_size=8), images.view(2, 1, 64))
    assert torch.equal(patch_tokens(images, patch_size=1), images.view(2, 64, 1))
    # a thin wrapper over chapter 9's patchify on (batch, 1, side, side)
    assert torch.equal(tokens, patchify(images.view(2, 1, 8, 8), 4))


def test_token_layouts_reject_bad_input():
    with pytest.raises(TypeError, match="segment_tokens: audio must be a floating-point tensor"):
        segment_tokens(torch.ones(4, 100, dtype=torch.long))
    with pytest.raises(ValueError, match=r"segment_tokens: audio must have shape \(batch, n_mfcc \* segments\)"):
        segment_tokens(torch.randn(4, 20, 5))
    with pytest.raises(ValueError, match=r"n_mfcc = 20, got shape \(4, 90\)"):
        segment_tokens(torch.randn(4, 90))
    with pytest.raises(ValueError, match="n_mfcc"):
        segment_tokens(torch.randn(4, 100), n_mfcc=0)
    with pytest.raises(ValueError, match=r"segment_tokens: audio must hold at least one example.*got shape \(4, 0\)"):
        segment_tokens(torch.randn(4, 0))
    with pytest.raises(ValueError, match=r"segment_tokens: audio must hold at least one example.*got shape \(0, 100\)"):
        segment_tokens(torch.randn(0, 100))
    with pytest.raises(TypeError, match="patch_tokens: images must be a torch.Tensor"):
        patch_tokens([[0.0] * 64])
    with pytest.raises(ValueError, match=r"patch_tokens: images must be square.*got shape \(4, 60\)"):
        patch_tokens(torch.randn(4, 60))
    with pytest.raises(ValueError, match=r"images must be square.*got shape \(4, 8, 6\)"):
        patch_tokens(torch.randn(4, 8, 6))
    with pytest.raises(ValueError, match=r"patch_tokens: images must have shape"):
        patch_tokens(torch.randn(4, 1, 8, 8))
    with pytest.raises(ValueError, match=r"patch_size must divide the image side \(8\), got 3"):
        patch_tokens(torch.randn(4, 64), patch_size=3)
    with pytest.raises(ValueError, match="patch_size"):
        patch_tokens(torch.randn(4, 64), patch_size=0)
