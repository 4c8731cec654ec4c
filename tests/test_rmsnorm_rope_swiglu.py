"""Unit tests of mmbook.rmsnorm, mmbook.rope and mmbook.swiglu (chapter 17)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmbook
from mmbook.rmsnorm import RMSNorm, rms
from mmbook.rope import (
    apply_rope,
    interleaved_to_half_permutation,
    rope_cos_sin,
    rope_frequencies,
    rotate_half,
    rotate_pairs,
)
from mmbook.swiglu import SwiGLU, silu, swiglu_hidden_size

# ---------------------------------------------------------------- RMSNorm


def test_rmsnorm_matches_torch_and_formula():
    mmbook.set_seed(0)
    ours, theirs = RMSNorm(16, eps=1e-6), nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = 3 * torch.randn(4, 5, 16, dtype=torch.float64)
    ours, theirs = ours.double(), theirs.double()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-12)
    fused = RMSNorm(16, eps=1e-6, fused=True).double()
    fused.load_state_dict(ours.state_dict())
    torch.testing.assert_close(fused(x), ours(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(rms(x), x.pow(2).mean(-1, keepdim=True).sqrt())


def test_rmsnorm_half_precision_is_normalised_in_float32():
    x = torch.full((2, 8), 300.0, dtype=torch.float16)  # x^2 = 90000 overflows float16
    y = RMSNorm(8)(x.float()).half()
    torch.testing.assert_close(RMSNorm(8).half()(x), y)


def test_rmsnorm_bad_input():
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        RMSNorm(4, eps=0.0)
    with pytest.raises(ValueError, match="must end in d_model=4"):
        RMSNorm(4)(torch.ones(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        RMSNorm(4)(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        rms(torch.ones(3), eps=-1.0)
    with pytest.raises(ValueError, match="must not be empty"):
        rms(torch.ones(0))


# ---------------------------------------------------------------- RoPE


def test_rope_frequencies_and_cos_sin_layouts():
    theta = rope_frequencies(8, base=100.0)
    torch.testing.assert_close(theta, torch.tensor([1.0, 100 ** -0.25, 100 ** -0.5, 100 ** -0.75], dtype=torch.float64))
    cos_h, _ = rope_cos_sin(torch.tensor([3]), 8, 100.0, "half", torch.float64)
    cos_i, _ = rope_cos_sin(torch.tensor([3]), 8, 100.0, "interleaved", torch.float64)
    torch.testing.assert_close(cos_h[0], torch.cos(3 * theta).repeat(2))
    torch.testing.assert_close(cos_i[0], torch.cos(3 * theta).repeat_interleave(2))


def test_rotations_match_a_2x2_rotation():
    x = torch.arange(1.0, 9.0)
    assert rotate_half(x).tolist() == [-5.0, -6.0, -7.0, -8.0, 1.0, 2.0, 3.0, 4.0]
    assert rotate_pairs(x).tolist() == [-2.0, 1.0, -4.0, 3.0, -6.0, 5.0, -8.0, 7.0]
    mmbook.set_seed(0)
    q = torch.randn(1, 1, 1, 2, dtype=torch.float64)
    angle = torch.tensor(7 * 1.0, dtype=torch.float64)
    rot = torch.tensor([[torch.cos(angle), -torch.sin(angle)], [torch.sin(angle), torch.cos(angle)]])
    for pairing in ("half", "interleaved"):
        torch.testing.assert_close(apply_rope(q, torch.tensor([7]), pairing=pairing)[0, 0, 0], rot @ q[0, 0, 0])


def test_rope_relative_position_and_pairings_and_offset():
    mmbook.set_seed(0)
    q, k = torch.randn(2, 3, 1, 16, dtype=torch.float64), torch.randn(2, 3, 1, 16, dtype=torch.float64)
    scores = []
    for m, n in ((5, 2), (13, 10), (103, 100)):
        qm = apply_rope(q, torch.tensor([m]))
        kn = apply_rope(k, torch.tensor([n]))
        scores.append((qm * kn).sum(-1))
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(scores[0], scores[2], rtol=0, atol=1e-12)
    perm = interleaved_to_half_permutation(16)
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    pos = torch.arange(4, 11)
    torch.testing.assert_close(apply_rope(x[..., perm], pos, pairing="half"),
                               apply_rope(x, pos, pairing="interleaved")[..., perm], rtol=0, atol=1e-12)
    full = apply_rope(x, torch.arange(7))
    torch.testing.assert_close(apply_rope(x[:, :, 4:], torch.arange(4, 7)), full[:, :, 4:], rtol=0, atol=0)
    per_row = apply_rope(x, torch.stack([torch.arange(7), torch.arange(7)]))
    torch.testing.assert_close(per_row, full, rtol=0, atol=0)


def test_rope_bad_input():
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_frequencies(7)
    with pytest.raises(ValueError, match="base must be a number > 1"):
        rope_frequencies(8, base=1.0)
    with pytest.raises(ValueError, match="pairing must be one of"):
        rope_cos_sin(torch.arange(3), 8, pairing="gptj")
    with pytest.raises(TypeError, match="integer tensor"):
        rope_cos_sin(torch.zeros(3), 8)
    with pytest.raises(ValueError, match="shape \\(batch, heads, T, head_dim\\)"):
        apply_rope(torch.zeros(3, 8), torch.arange(3))
    with pytest.raises(ValueError, match="do not fit x"):
        apply_rope(torch.zeros(1, 1, 3, 8), torch.arange(4))
    with pytest.raises(ValueError, match="head_dim must be even"):
        rotate_half(torch.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        rotate_pairs(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        interleaved_to_half_permutation(0)


# ---------------------------------------------------------------- SwiGLU


def test_swiglu_hidden_size_rule():
    assert swiglu_hidden_size(4096, multiple_of=256) == 11008  # Llama-7B
    assert swiglu_hidden_size(96) == 256
    assert swiglu_hidden_size(4096, 256, 1.3) == 14336  # Llama-3-8B
    d = 192
    assert abs(3 * d * swiglu_hidden_size(d) - 8 * d * d) <= 3 * d


def test_swiglu_matches_llama_mlp():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2,
                                      num_key_value_heads=2)
    mmbook.set_seed(0)
    theirs = transformers.models.llama.modeling_llama.LlamaMLP(config).double()
    ours = SwiGLU(16, 40).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-12)
    fused = SwiGLU(16, 40, fused=True).double()
    fused.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fused(x), theirs(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(silu(x), F.silu(x), rtol=0, atol=1e-15)


def test_swiglu_bad_input():
    with pytest.raises(ValueError, match="d_ff must be a positive int"):
        SwiGLU(8, 0)
    with pytest.raises(ValueError, match="must end in d_model=8"):
        SwiGLU(8, 16)(torch.zeros(2, 7))
    with pytest.raises(TypeError, match="has dtype torch.float64"):
        SwiGLU(8, 16)(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple_of must be a positive int"):
        swiglu_hidden_size(8, multiple_of=0)
    with pytest.raises(ValueError, match="ffn_dim_multiplier must be a positive number"):
        swiglu_hidden_size(8, 1, -1.0)
    with pytest.raises(TypeError, match="floating-point"):
        silu(torch.ones(2, dtype=torch.long))
