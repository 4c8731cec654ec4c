"""Tests of mmbook.crossmodal against independent references (torch.nn, explicit formulas)."""

import math

import pytest
import torch
from torch import nn

from mmbook.crossmodal import (
    CrossAttentionBlock,
    FeedForward,
    FiLM,
    GatedCrossAttentionBlock,
    PatchEncoder,
    PerceiverResampler,
    SelfAttentionBlock,
    TextTransformer,
    VQAModel,
    fit_vqa,
    masked_mean,
    predict_vqa,
    sincos_position_embedding_2d,
    train_vqa,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread


def _torch_mha(ours):
    """A torch.nn.MultiheadAttention with the weights of our MultiHeadAttention."""
    ref = nn.MultiheadAttention(ours.d_model, ours.num_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref


# ----------------------------------------------------------------------------- helpers
def test_sincos_position_embedding_matches_loop():
    grid, d = 3, 8
    pe = sincos_position_embedding_2d(grid, d)
    assert pe.shape == (9, 8) and pe.dtype == torch.float32
    half = d // 2
    for r in range(grid):
        for c in range(grid):
            for i in range(half // 2):
                w = 10000.0 ** (-2 * i / half)
                expected = [math.sin(r * w), math.cos(r * w), math.sin(c * w), math.cos(c * w)]
                got = pe[r * grid + c, [2 * i, 2 * i + 1, half + 2 * i, half + 2 * i + 1]].tolist()
                assert got == pytest.approx(expected, abs=1e-6)


def test_sincos_position_embedding_is_two_one_d_encodings():
    from mmbook.gpt import sinusoidal_positional_encoding

    for grid, d in ((3, 32), (4, 8), (14, 64)):
        one_d = sinusoidal_positional_encoding(grid, d // 2)
        expected = torch.cat([one_d.repeat_interleave(grid, dim=0), one_d.repeat(grid, 1)], dim=1)
        assert torch.equal(sincos_position_embedding_2d(grid, d), expected)


def test_sincos_position_embedding_bad_input():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding_2d(3, 6)
    with pytest.raises(TypeError, match="grid"):
        sincos_position_embedding_2d(3.0, 8)


def test_masked_mean_matches_loop_and_rejects_bad_mask():
    x = torch.randn(3, 5, 4)
    lengths = [5, 2, 1]
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    ref = torch.stack([x[b, :n].mean(0) for b, n in enumerate(lengths)])
    torch.testing.assert_close(masked_mean(x, mask), ref)
    torch.testing.assert_close(masked_mean(x, None), x.mean(1))
    with pytest.raises(ValueError, match="mask"):
        masked_mean(x, mask.float())
    with pytest.raises(ValueError, match="x must"):
        masked_mean(x[0], None)


def test_feedforward_and_self_attention_block():
    torch.manual_seed(0)
    ff = FeedForward(8, 2)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ff(x), ff.net[2](nn.functional.gelu(ff.net[0](x))))
    block = SelfAttentionBlock(8, 2)
    h = x + _torch_mha(block.attn)(block.norm1(x), block.norm1(x), block.norm1(x))[0]
    ref = h + block.ff(block.norm2(h))
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mult"):
        FeedForward(8, 0)


# ----------------------------------------------------------------------------- encoders
def test_patch_encoder_shapes_and_locality():
    torch.manual_seed(0)
    enc = PatchEncoder(d_model=16, grid=3, hidden=8)
    assert enc.patch == 11 and enc.padding == (0, 1, 0, 1)
    images = torch.rand(2, 3, 32, 32)
    tokens = enc(images)
    assert tokens.shape == (2, 9, 16)
    torch.testing.assert_close(tokens, enc.feature_map(images).flatten(2).transpose(1, 2))
    changed = images.clone()
    changed[:, :, 22:, 22:] = 0.0  # only the bottom-right patch (row 2, col 2)
    diff = (enc(changed) - tokens).abs().amax(dim=(0, 2))
    assert (diff[:8] == 0).all() and diff[8] > 0
    assert PatchEncoder(d_model=16, grid=4)(images).shape == (2, 16, 16)


def test_patch_encoder_first_layer_is_unfold_matmul():
    torch.manual_seed(0)
    enc = PatchEncoder(d_model=16, grid=4, hidden=8)
    images = torch.rand(2, 3, 32, 32)
    x = (images - enc.pixel_mean) / enc.pixel_std
    cols = nn.functional.unfold(x, kernel_size=8, stride=8)  # (2, 3*64, 16)
    conv = enc.embed[0]
    ref = conv.weight.reshape(8, -1) @ cols + conv.bias[:, None]
    torch.testing.assert_close(conv(x).flatten(2), ref, rtol=1e-5, atol=1e-5)


def test_patch_encoder_bad_input():
    enc = PatchEncoder(d_model=16)
    with pytest.raises(ValueError, match="images must have shape"):
        enc(torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        enc(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="gamma"):
        enc.feature_map(torch.rand(2, 3, 32, 32), torch.ones(2, 5), torch.zeros(2, 16))
    with pytest.raises(ValueError, match="pixel_std"):
        PatchEncoder(pixel_std=0.0)


def test_text_transformer_causal_and_padding():
    torch.manual_seed(0)
    lm = TextTransformer(20, d_model=16, num_heads=2, num_layers=2, causal=True).eval()
    ids = torch.randint(4, 20, (2, 6))
    other = ids.clone()
    other[:, 4:] = 5
    torch.testing.assert_close(lm(ids)[:, :4], lm(other)[:, :4])  # the future does not leak
    enc = TextTransformer(20, d_model=16, num_heads=2).eval()
    lengths = torch.tensor([3, 6])
    padded = ids.clone()
    padded[0, 3:] = 0
    torch.testing.assert_close(enc(ids, lengths)[0, :3], enc(padded, lengths)[0, :3])
    torch.testing.assert_close(enc(ids, lengths)[0, :3], enc(ids[:1, :3], lengths[:1])[0])


def test_text_transformer_bad_input():
    enc = TextTransformer(20, d_model=16, num_heads=2, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        enc(torch.zeros(1, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids"):
        enc(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([1]))
    with pytest.raises(ValueError, match="cross block"):
        enc(torch.zeros(1, 3, dtype=torch.int64), visual=torch.zeros(1, 2, 16), cross_blocks=[])


# ----------------------------------------------------------------------------- cross-modal blocks
def test_cross_attention_block_matches_torch_mha():
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 4)
    x, v = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    out, weights = block(x, v)
    kv = block.norm_kv(v)
    ref_attn, ref_w = _torch_mha(block.attn)(block.norm_q(x), kv, kv, average_attn_weights=False)
    h = x + ref_attn
    torch.testing.assert_close(out, h + block.ff(block.norm_ff(h)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)
    assert weights.shape == (2, 4, 5, 9)
    with pytest.raises(ValueError, match="visual"):
        block(x, torch.randn(2, 9, 8))


def test_gated_block_identity_at_init_and_gate_gradient():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, 4)
    x, v = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    out, _ = block(x, v)
    assert torch.equal(out, x)
    out.pow(2).sum().backward()
    assert block.alpha_attn.grad.abs() > 0 and block.alpha_ff.grad.abs() > 0
    assert (block.attn.q_proj.weight.grad == 0).all()
    with torch.no_grad():
        block.alpha_attn.fill_(0.3)
        block.alpha_ff.fill_(-0.2)
    kv = block.norm_kv(v)
    h = x + math.tanh(0.3) * _torch_mha(block.attn)(block.norm_q(x), kv, kv)[0]
    ref = h + math.tanh(-0.2) * block.ff(block.norm_ff(h))
    torch.testing.assert_close(block(x, v)[0], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="x must"):
        block([1.0], v)


def test_film_matches_formula_and_is_identity_at_init():
    torch.manual_seed(0)
    film = FiLM(6, 4)
    x, c = torch.randn(3, 4, 2, 2), torch.randn(3, 6)
    torch.testing.assert_close(film(x, c), x)
    nn.init.normal_(film.proj.weight)
    nn.init.normal_(film.proj.bias)
    out = film(x, c)
    w, b = film.proj.weight, film.proj.bias
    for n in range(3):
        for ch in range(4):
            gamma = 1 + (w[ch] @ c[n] + b[ch])
            beta = w[4 + ch] @ c[n] + b[4 + ch]
            torch.testing.assert_close(out[n, ch], gamma * x[n, ch] + beta, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x must"):
        film(torch.randn(3, 5, 2, 2), c)
    with pytest.raises(ValueError, match="c must"):
        film(x, torch.randn(3, 5))


def test_perceiver_resampler_shapes_permutation_and_mask():
    torch.manual_seed(0)
    res = PerceiverResampler(16, num_latents=4, num_heads=2, depth=2)
    for n in (1, 9, 30):
        assert res(torch.randn(2, n, 16)).shape == (2, 4, 16)
    x = torch.randn(2, 9, 16)
    perm = torch.randperm(9)
    torch.testing.assert_close(res(x[:, perm]), res(x), rtol=1e-5, atol=1e-5)
    padded = torch.cat([x, torch.randn(2, 3, 16)], dim=1)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 9:] = False
    torch.testing.assert_close(res(padded, mask), res(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        res(padded, mask[:, :5])
    with pytest.raises(ValueError, match="x must"):
        res(torch.randn(2, 9, 8))


# ----------------------------------------------------------------------------- VQA
def _tiny_data(n_scenes=12, per_scene=2, vocab=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n_scenes, 3, 32, 32, generator=g)
    scene_index = torch.arange(n_scenes).repeat_interleave(per_scene)
    n = scene_index.numel()
    ids = torch.randint(4, vocab, (n, 5), generator=g)
    lengths = torch.randint(2, 6, (n,), generator=g)
    answers = (ids[:, 0] % 3) + 3 * (images[scene_index, 0].mean((1, 2)) > 0.5).long()
    return images, scene_index, ids, lengths, answers


@pytest.mark.parametrize("fusion", ["question", "image", "concat", "film", "cross", "gated", "perceiver"])
def test_vqa_model_image_index_matches_repeated_images(fusion):
    torch.manual_seed(0)
    model = VQAModel(fusion, vocab_size=10, num_answers=6, d_model=16, num_heads=2).eval()
    images, scene_index, ids, lengths, _ = _tiny_data()
    a = model(images, ids, lengths, scene_index)
    b = model(images[scene_index], ids, lengths)
    assert a.shape == (24, 6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if fusion in ("cross", "gated"):
        assert model.last_attention.shape == (24, 2, 5, 9)


def test_vqa_model_bad_input():
    with pytest.raises(ValueError, match="fusion"):
        VQAModel("sum", 10, 6)
    model = VQAModel("concat", 10, 6, d_model=16, num_heads=2)
    images, scene_index, ids, lengths, _ = _tiny_data()
    with pytest.raises(ValueError, match="batch size"):
        model(images, ids, lengths)
    with pytest.raises(ValueError, match="image_index"):
        model(images, ids, lengths, scene_index.float())


def test_train_and_predict_vqa():
    torch.manual_seed(0)
    data = _tiny_data(n_scenes=40)
    model = VQAModel("concat", 10, 6, d_model=16, num_heads=2)
    history = train_vqa(model, *data, epochs=6, scenes_per_batch=8, lr=1e-2, seed=0)
    assert len(history) == 6 and history[-1] < history[0]
    pred = predict_vqa(model, *data[:4], scenes_per_batch=7)
    with torch.no_grad():
        ref = model.eval()(data[0], data[2], data[3], data[1]).argmax(-1)
    assert torch.equal(pred, ref)
    with pytest.raises(ValueError, match="scene_index"):
        train_vqa(model, data[0], data[1] + 100, *data[2:], epochs=1)
    with pytest.raises(ValueError, match="answers"):
        train_vqa(model, *data[:4], data[4][:3], epochs=1)
    with pytest.raises(TypeError, match="model"):
        train_vqa(nn.Linear(2, 2), *data, epochs=1)
    with pytest.raises(ValueError, match="scenes_per_batch"):
        predict_vqa(model, *data[:4], scenes_per_batch=0)


def test_negative_indices_empty_questions_and_dtype_mixes_are_refused():
    images = torch.rand(2, 3, 32, 32)
    ids, lengths = torch.randint(0, 10, (2, 5)), torch.tensor([5, 3])
    for fusion in ("question", "image", "concat", "film", "cross", "gated", "perceiver"):
        model = VQAModel(fusion, 10, 5, d_model=16, num_heads=2)
        for bad in (-1, 2):  # -1 silently meant the last image
            with pytest.raises(ValueError, match=r"VQAModel: image_index must lie in \[0, 2\)"):
                model(images, ids, lengths, torch.tensor([bad, 0]))
        with pytest.raises(ValueError, match=r"VQAModel: lengths must lie in \[1, T=5\]"):
            model(images, ids, torch.tensor([0, 3]))  # an empty question got an input-independent answer
    model = VQAModel("cross", 10, 5, d_model=16, num_heads=2)
    with pytest.raises(ValueError, match=r"TextTransformer: ids must lie in \[0, 10\)"):
        model(images, torch.full((2, 5), -1), lengths)
    with pytest.raises(TypeError, match="PatchEncoder: images has dtype torch.float64"):
        model(images.double(), ids, lengths)
    scene_index, answers = torch.tensor([0, 1]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"train_vqa: answers must lie in \[0, 5\)"):
        train_vqa(model, images, scene_index, ids, lengths, torch.tensor([1, 5]), epochs=1)
    with pytest.raises(ValueError, match="train_vqa: lr must be a positive number, got nan"):
        train_vqa(model, images, scene_index, ids, lengths, answers, epochs=1, lr=math.nan)
    with pytest.raises(TypeError, match="predict_vqa: model must be a VQAModel, got NoneType"):
        predict_vqa(None, images, scene_index, ids, lengths)
    x, visual = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    for block in (CrossAttentionBlock(16, 2), GatedCrossAttentionBlock(16, 2)):
        with pytest.raises(TypeError, match="CrossAttentionBlock: visual has dtype torch.float64"):
            block(x, visual.double())  # not LayerNorm's "mixed dtype (CPU)"
    with pytest.raises(TypeError, match="PerceiverResampler: x has dtype torch.float64"):
        PerceiverResampler(16, 4, 2)(x.double())
    with pytest.raises(ValueError, match=r"FeedForward: x must have shape \(\.\.\., 16\), got \(2, 5, 8\)"):
        FeedForward(16)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"SelfAttentionBlock: x must have shape \(batch, seq, 16\)"):
        SelfAttentionBlock(16, 2)(torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="FiLM: c has dtype torch.float64"):
        FiLM(16, 16)(torch.randn(2, 16), torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="PatchEncoder: pixel_std must be a positive number, got inf"):
        PatchEncoder(pixel_std=math.inf)  # every pixel would become 0
    with pytest.raises(TypeError, match="TextTransformer: causal must be True or False, got str"):
        TextTransformer(10, causal="no")
    with pytest.raises(TypeError, match="masked_mean: x must be a floating-point tensor"):
        masked_mean(torch.ones(2, 3, 4, dtype=torch.long), None)


def test_gated_and_perceiver_fusions():
    torch.manual_seed(0)
    images, scene_index, ids, lengths, _ = _tiny_data()
    gated = VQAModel("gated", 10, 6, d_model=16, num_heads=2).eval()
    # tanh gates at 0: the image cannot reach the answer, so any other image gives bit-for-bit the same logits
    torch.testing.assert_close(gated(images, ids, lengths, scene_index),
                               gated(torch.rand_like(images), ids, lengths, scene_index), rtol=0, atol=0)
    assert gated.last_attention.shape == (24, 2, 5, 9)
    with torch.no_grad():
        gated.cross[0].alpha_attn.fill_(1.0)
    assert not torch.equal(gated(images, ids, lengths, scene_index),
                           gated(torch.rand_like(images), ids, lengths, scene_index))
    perceiver = VQAModel("perceiver", 10, 6, d_model=16, num_heads=2, num_latents=3).eval()
    logits = perceiver(images, ids, lengths, scene_index)
    assert logits.shape == (24, 6) and perceiver.last_attention.shape == (24, 2, 5, 3)
    torch.testing.assert_close(logits, perceiver(images[scene_index], ids, lengths), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_latents"):
        VQAModel("perceiver", 10, 6, num_latents=0)


def test_vqa_head_hidden_sets_the_parameter_count():
    base = VQAModel("concat", 10, 6, d_model=16, num_heads=2, text_layers=0)
    wide = VQAModel("concat", 10, 6, d_model=16, num_heads=2, text_layers=0, head_hidden=50)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # the head's hidden layer: (2 d + 1) weights and biases in, (num_answers) weights out per unit, 18 more units
    assert count(wide) - count(base) == (50 - 32) * (2 * 16 + 1 + 6)
    assert wide.head[1].out_features == 50 and base.head[1].out_features == 32
    for bad in (0, -3):
        with pytest.raises(ValueError, match="head_hidden"):
            VQAModel("concat", 10, 6, head_hidden=bad)
    with pytest.raises(TypeError, match="head_hidden"):
        VQAModel("concat", 10, 6, head_hidden=2.5)


def test_fit_vqa_keeps_the_best_validation_epoch():
    torch.manual_seed(0)
    train, validation = _tiny_data(n_scenes=40), _tiny_data(n_scenes=12, seed=1)
    model = VQAModel("concat", 10, 6, d_model=16, num_heads=2)
    fit = fit_vqa(model, train, validation, epochs=5, scenes_per_batch=8, lr=1e-2, seed=0)
    assert len(fit["loss"]) == len(fit["validation"]) == 5
    best = max(fit["validation"])
    assert fit["best_epoch"] == fit["validation"].index(best) + 1  # the earliest best epoch
    restored = (predict_vqa(model, *validation[:4]) == validation[4]).double().mean().item()
    assert restored == best  # the weights of that epoch are back
    # the same training without validation: the same losses (the validation passes draw no random numbers)
    torch.manual_seed(0)
    again = VQAModel("concat", 10, 6, d_model=16, num_heads=2)
    assert train_vqa(again, *train, epochs=5, scenes_per_batch=8, lr=1e-2, seed=0) == pytest.approx(fit["loss"])


def test_fit_vqa_bad_input():
    train, validation = _tiny_data(n_scenes=10), _tiny_data(n_scenes=4)
    model = VQAModel("concat", 10, 6, d_model=16, num_heads=2)
    with pytest.raises(TypeError, match="model"):
        fit_vqa(nn.Linear(2, 2), train, validation)
    with pytest.raises(TypeError, match="validation"):
        fit_vqa(model, train, validation[0])
    with pytest.raises(TypeError, match="train"):
        fit_vqa(model, train[:4], validation)
    with pytest.raises(ValueError, match="answers"):
        fit_vqa(model, train, (*validation[:4], validation[4] + 100))
    with pytest.raises(ValueError, match="epochs"):
        fit_vqa(model, train, validation, epochs=0)
