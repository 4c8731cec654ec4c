import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmbook
from mmbook.attention import causal_mask
from mmbook.gpt import (
    GPT,
    Block,
    CausalSelfAttention,
    FeedForward,
    GPTConfig,
    LayerNorm,
    gelu,
    gpt_param_count,
    load_hf_gpt2_weights,
    sample_next_token,
    sinusoidal_positional_encoding,
    top_k_filter,
    top_p_filter,
)

TINY = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, d_model=16)


def _model(**overrides):
    mmbook.set_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


# ---------------------------------------------------------------- configuration and parameter count


@pytest.mark.parametrize(
    "overrides",
    [{}, {"bias": False}, {"tie_embeddings": False}, {"positional": "sinusoidal"}, {"d_ff": 24, "n_layer": 3}],
)
def test_param_count_matches_numel(overrides):
    model = _model(**overrides)
    assert gpt_param_count(model.config) == sum(p.numel() for p in model.parameters())


def test_param_count_gpt2_small():
    assert gpt_param_count(GPTConfig.gpt2_small()) == 124_439_808
    with torch.device("meta"):
        model = GPT(GPTConfig.gpt2_small())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_config_bad_input():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(d_model=10, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="positional must be one of"):
        GPTConfig(positional="rotary")
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        gpt_param_count({"d_model": 8})
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT({"d_model": 8})
    assert GPTConfig(block_size=64).n_positions == 64


# ---------------------------------------------------------------- building blocks


def test_sinusoidal_matches_loop_reference():
    pe = sinusoidal_positional_encoding(9, 6).numpy()
    ref = np.zeros((9, 6))
    for p in range(9):
        for i in range(3):
            ref[p, 2 * i] = math.sin(p / 10000 ** (2 * i / 6))
            ref[p, 2 * i + 1] = math.cos(p / 10000 ** (2 * i / 6))
    np.testing.assert_allclose(pe, ref, rtol=0, atol=1e-7)  # float32 rounding of values in [-1, 1]
    with pytest.raises(ValueError, match="d_model must be even"):
        sinusoidal_positional_encoding(4, 5)
    with pytest.raises(ValueError, match="n_positions must be a positive int"):
        sinusoidal_positional_encoding(0, 4)


def test_gelu_matches_torch():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(gelu(x), F.gelu(x), rtol=0, atol=1e-14)
    torch.testing.assert_close(gelu(x, "tanh"), F.gelu(x, approximate="tanh"), rtol=0, atol=1e-14)
    assert 1e-4 < (gelu(x) - gelu(x, "tanh")).abs().max() < 1e-3  # the approximation is close, not equal
    with pytest.raises(ValueError, match="approximate must be"):
        gelu(x, "sigmoid")
    with pytest.raises(TypeError, match="floating-point"):
        gelu(torch.arange(3))


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(bias):
    mmbook.set_seed(0)
    ours, ref = LayerNorm(8, eps=1e-5, bias=bias), nn.LayerNorm(8, eps=1e-5, bias=bias)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
        if bias:
            ours.bias.normal_()
            ref.bias.copy_(ours.bias)
    x = 3 * torch.randn(4, 5, 8) + 2
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must end in d_model=8"):
        ours(torch.randn(3, 7))
    with pytest.raises(ValueError, match="eps must be a positive number"):
        LayerNorm(8, eps=0.0)


def test_block_matches_torch_pre_ln_encoder_layer():
    mmbook.set_seed(0)
    block = Block(GPTConfig(n_head=4, d_model=32, activation="gelu")).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = nn.TransformerEncoderLayer(32, 4, dim_feedforward=128, dropout=0.0, activation="gelu",
                                     batch_first=True, norm_first=True)
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
        ref.self_attn.out_proj.load_state_dict(block.attn.proj.state_dict())
        ref.linear1.load_state_dict(block.mlp.fc.state_dict())
        ref.linear2.load_state_dict(block.mlp.proj.state_dict())
        ref.norm1.load_state_dict(block.ln_1.state_dict())
        ref.norm2.load_state_dict(block.ln_2.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        ours, present = block(x, use_cache=True)
        theirs = ref.train()(x, src_mask=~causal_mask(9))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert present[0].shape == (2, 4, 9, 8)
    for cls in (Block, CausalSelfAttention, FeedForward):
        with pytest.raises(TypeError, match=f"{cls.__name__}: config must be a GPTConfig"):
            cls({"d_model": 32})


# ---------------------------------------------------------------- the model


def test_matches_transformers_gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    mmbook.set_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=24, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = GPT.from_hf_gpt2(hf).eval()
    idx = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, hf(idx).logits, rtol=0, atol=1e-5)
    assert gpt_param_count(ours.config) == hf.num_parameters()
    with pytest.raises(TypeError, match="hf_model must be a transformers GPT-2 model"):
        GPT.from_hf_gpt2(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="shape mismatch|no parameter"):
        load_hf_gpt2_weights(GPT(GPTConfig(vocab_size=50, block_size=24, n_layer=2, n_head=4, d_model=16)), hf)


def test_torch_kernels_agree():
    a, b = _model(), _model(kernels="torch")
    idx = torch.randint(0, 37, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(a(idx).logits, b(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ["mmbook", "torch"])
def test_dropout_in_training_and_generate_restores_mode(kernels):
    model = _model(dropout=0.2, kernels=kernels).train()
    idx = torch.randint(0, 37, (2, 8))
    a, b = model(idx).logits, model(idx).logits
    assert not torch.equal(a, b)  # dropout is active in training mode
    model.generate(idx[:, :2], 3)
    assert model.training
    model.eval()
    torch.testing.assert_close(model(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_kv_cache_logits_match_full_forward():
    model = _model(positional="sinusoidal")
    idx = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        full = model(idx).logits
        out = model(idx[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 12):
            out = model(idx[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert out.past_key_values[0][0].shape == (2, 2, 12, 8)


def test_generate_with_and_without_cache_agree():
    model = _model()
    prompt = torch.randint(0, 37, (2, 3))
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 10, "top_p": 0.9}):
        outs = [
            model.generate(prompt, 20, use_cache=c, generator=torch.Generator().manual_seed(1), **kwargs)
            for c in (True, False)
        ]  # 23 tokens > block_size 16: also exercises the re-read past the context window
        assert outs[0].shape == (2, 23)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0][:, :3], prompt)


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_forward_inputs_embeds_and_ignore_index(positional):
    model = _model(positional=positional)
    idx = torch.randint(0, 37, (2, 8))
    targets = idx.roll(-1, dims=1)
    with torch.no_grad():
        a = model(idx, targets)
        b = model(inputs_embeds=model.wte(idx), targets=targets)
        masked = targets.clone()
        masked[:, :4] = -100
        c = model(idx, masked)
        ref = F.cross_entropy(a.logits[:, 4:].reshape(-1, 37), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(c.loss, ref, rtol=1e-6, atol=1e-6)


def test_forward_and_generate_bad_input():
    model = _model()
    with pytest.raises(ValueError, match=r"idx must lie in \[0, 37\)"):
        model(torch.tensor([[0, 40]]))
    with pytest.raises(ValueError, match="exceed block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="idx must be an int64 tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="exactly one of idx and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="targets must be an int64 tensor of shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), -1)
    with pytest.raises(TypeError, match="idx must be a non-empty int64 tensor"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)


# ---------------------------------------------------------------- sampling


def test_top_k_and_top_p_filters():
    mmbook.set_seed(0)
    logits = torch.randn(50, 30, dtype=torch.float64)
    kept = torch.isfinite(top_k_filter(logits, 5))
    ref = torch.zeros_like(kept).scatter(1, logits.topk(5).indices, True)
    assert torch.equal(kept, ref)
    probs = logits.softmax(-1)
    for p in (0.1, 0.5, 0.9):
        keep = torch.isfinite(top_p_filter(logits, p))
        mass = (probs * keep).sum(-1)
        smallest_kept = probs.masked_fill(~keep, 2.0).min(-1).values
        assert (mass >= p).all() and ((mass - smallest_kept) < p).all()  # enough mass, and minimal
        dropped_max = probs.masked_fill(keep, -1.0).max(-1).values
        assert (dropped_max <= smallest_kept).all()  # the kept tokens are the most probable ones
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_k_filter(logits, 0)
    with pytest.raises(ValueError, match=r"p must be a number in \(0, 1\]"):
        top_p_filter(logits, 0.0)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        top_k_filter(torch.arange(4), 2)


def test_sample_next_token():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    draws = sample_next_token(logits.expand(20000, 4), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / 20000
    # 4 standard errors of a frequency near 0.3 with n = 20000 is about 0.013
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), rtol=0, atol=0.015)
    assert torch.equal(sample_next_token(logits, temperature=0), torch.tensor([3]))
    topk = sample_next_token(logits.expand(2000, 4), top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(topk.tolist()) == {2, 3}
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        sample_next_token(logits, temperature=-1.0)
    with pytest.raises(ValueError, match=r"shape \(batch, vocab_size\)"):
        sample_next_token(logits[0])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample_next_token(logits, generator=0)


def test_nan_logits_and_nonsense_settings_never_become_a_token():
    nan, inf = float("nan"), float("inf")
    for temperature in (1.0, 0):  # sampling and greedy: argmax and the inverse CDF would pick an id
        with pytest.raises(ValueError, match="sample_next_token: logits contain NaN"):
            sample_next_token(torch.full((2, 5), nan), temperature=temperature)
    with pytest.raises(ValueError, match="finite largest entry"):
        sample_next_token(torch.full((1, 5), -inf))
    with pytest.raises(ValueError, match="finite largest entry"):
        sample_next_token(torch.tensor([[inf, 0.0]]))
    assert sample_next_token(torch.tensor([[inf, 0.0]]), temperature=0).tolist() == [0]  # greedy may take +inf
    for temperature in (nan, inf):
        with pytest.raises(ValueError, match="sample_next_token: temperature must be a number >= 0"):
            sample_next_token(torch.zeros(1, 5), temperature=temperature)
    with pytest.raises(ValueError, match="sample_next_token: top_k must be a positive int, got 0"):
        sample_next_token(torch.zeros(1, 5), temperature=0, top_k=0)  # checked even when greedy ignores it
    model = _model()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="GPT.generate: temperature must be a number >= 0, got nan"):
        model.generate(idx, 2, temperature=nan)
    with pytest.raises(TypeError, match="GPT.generate: use_cache must be True or False, got str"):
        model.generate(idx, 2, use_cache="no")
    for bad in (TINY["vocab_size"], -1):  # targets: cross_entropy's "Target 37 is out of bounds"
        with pytest.raises(ValueError, match=r"GPT.forward: targets must lie in \[0, 37\) \(or -100\)"):
            model(idx, torch.full((1, 3), bad))
    assert model(idx, torch.full((1, 3), -100)).loss.isnan()  # every position ignored: the mean of nothing
    with pytest.raises(TypeError, match="GPT.forward: inputs_embeds has dtype torch.float64"):
        model(inputs_embeds=torch.zeros(1, 3, TINY["d_model"], dtype=torch.float64))
    with pytest.raises(TypeError, match=r"GPT.forward: past_key_values\[0\] must be a \(key, value\) pair"):
        model(idx, past_key_values=[1] * TINY["n_layer"])
    with pytest.raises(ValueError, match=r"GPT.forward: past_key_values\[0\] must hold keys and values of shape"):
        model(idx, past_key_values=[(torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1))] * TINY["n_layer"])


def test_building_blocks_name_wrong_shapes_dtypes_and_settings():
    config = GPTConfig(**TINY)
    d = TINY["d_model"]
    for bad in (float("inf"), True):
        with pytest.raises((TypeError, ValueError), match="GPTConfig: layer_norm_eps must be a"):
            GPTConfig(**{**TINY, "layer_norm_eps": bad})
    with pytest.raises(ValueError, match="sinusoidal_positional_encoding: base must be a number > 1, got inf"):
        sinusoidal_positional_encoding(4, 8, base=float("inf"))
    with pytest.raises(ValueError, match="LayerNorm: eps must be a positive number, got nan"):
        LayerNorm(4, eps=float("nan"))
    with pytest.raises(TypeError, match="LayerNorm: fused must be True or False"):
        LayerNorm(4, fused="no")
    with pytest.raises(TypeError, match="LayerNorm: x must be a floating-point tensor"):
        LayerNorm(4)(torch.ones(2, 4, dtype=torch.long))
    attention, ff = CausalSelfAttention(config), FeedForward(config)
    for module, name in ((attention, "CausalSelfAttention"), (ff, "FeedForward"), (Block(config), "CausalSel")):
        with pytest.raises(ValueError, match=rf"{name}\w*: x must have shape \(batch, T, {d}\), got \(3, {d}\)"):
            module(torch.ones(3, d))
    with pytest.raises(ValueError, match=rf"FeedForward: x must have shape \(batch, T, {d}\), got \(2, 3, 8\)"):
        ff(torch.ones(2, 3, 8))  # not "mat1 and mat2 shapes cannot be multiplied"
    with pytest.raises(TypeError, match="CausalSelfAttention: x has dtype torch.float64"):
        attention(torch.ones(2, 3, d, dtype=torch.float64))
    with pytest.raises(TypeError, match="CausalSelfAttention: past must be a \\(key, value\\) pair of tensors"):
        attention(torch.ones(2, 3, d), past=[1, 2])


def test_loading_gpt2_weights_checks_settings_no_shape_reveals():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=24, n_embd=32, n_layer=1,
                                                              n_head=4)).eval()
    sizes = {"vocab_size": 50, "block_size": 24, "n_layer": 1, "d_model": 32}
    # two heads of 16 instead of four of 8: every weight has the same shape, the attention differs
    with pytest.raises(ValueError, match="load_hf_gpt2_weights: ours has n_head=2 but hf_model has 4"):
        load_hf_gpt2_weights(GPT(GPTConfig(n_head=2, **sizes)), hf)
    with pytest.raises(ValueError, match="load_hf_gpt2_weights: ours has activation='gelu' but hf_model has "
                                         "'gelu_tanh'"):
        load_hf_gpt2_weights(GPT(GPTConfig(n_head=4, activation="gelu", **sizes)), hf)
    with pytest.raises(ValueError, match="load_hf_gpt2_weights: ours has layer_norm_eps=0.001 but hf_model has 1e-05"):
        load_hf_gpt2_weights(GPT(GPTConfig(n_head=4, layer_norm_eps=1e-3, **sizes)), hf)
    ours = load_hf_gpt2_weights(GPT(GPTConfig(n_head=4, **sizes)), hf).eval()
    idx = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, hf(idx).logits, rtol=0, atol=1e-5)


def test_changed_config_and_foreign_kv_cache_are_named():
    config = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, d_model=8)
    config.n_head = 3  # a dataclass field changed after construction: 8 is not divisible by 3
    with pytest.raises(ValueError, match="GPTConfig: d_model=8 must be divisible by n_head=3"):
        GPT(config)
    config.n_head = 2
    model = GPT(config)
    idx = torch.zeros(1, 1, dtype=torch.long)
    past = model(idx, use_cache=True).past_key_values
    doubles = [(k.double(), v.double()) for k, v in past]
    # not scaled_dot_product_attention's 'k and q must have the same dtype'
    with pytest.raises(TypeError, match=r"GPT.forward: past_key_values\[0\] and the model's parameters must have the "
                                        "same dtype, got torch.float64 and torch.float32"):
        model(idx, past_key_values=doubles)
    with pytest.raises(TypeError, match="CausalSelfAttention: past and x must have the same dtype"):
        model.h[0].attn(torch.zeros(1, 1, 8), past=doubles[0])
    with pytest.raises(ValueError, match=r"past_key_values\[0\] must hold keys and values of shape "
                                         r"\('batch', 2, 'P', 4\), got \(1,\)"):
        model(idx, past_key_values=[(torch.zeros(1), torch.zeros(1))])
    assert model(idx, past_key_values=past).logits.shape == (1, 1, 20)
