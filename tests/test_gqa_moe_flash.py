"""Unit tests of mmbook.gqa, mmbook.moe and mmbook.flash (chapter 17)."""

import math

import pytest
import torch
import torch.nn.functional as F

import mmbook
from mmbook.flash import (
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    measure_peak_bytes,
    online_softmax,
)
from mmbook.gqa import GroupedQueryAttention, attention_mask, kv_cache_bytes, repeat_kv
from mmbook.moe import SparseMoE, TopKRouter, expert_capacity, load_balancing_loss, load_hf_moe_block

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------- grouped-query attention


def test_repeat_kv_matches_transformers():
    from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

    x = torch.randn(2, 3, 5, 4)
    for n_rep in (1, 2, 4):
        assert torch.equal(repeat_kv(x, n_rep), hf_repeat_kv(x, n_rep))


def test_attention_mask_causal_window_and_offset():
    full = attention_mask(5, 5)
    assert torch.equal(full, torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(attention_mask(2, 5), full[3:])
    window = attention_mask(6, 6, window=2)
    assert window.sum(1).tolist() == [1, 2, 2, 2, 2, 2] and bool(window[5, 4]) and not bool(window[5, 3])


def test_kv_cache_bytes_formula():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, 8192 tokens in bfloat16
    assert kv_cache_bytes(30, 8192, 3, 64) == 2 * 30 * 8192 * 3 * 64 * 2
    assert kv_cache_bytes(2, 10, 4, 8, batch_size=3, bytes_per_value=4) == 2 * 2 * 10 * 4 * 8 * 3 * 4


def test_gqa_cache_equals_full_and_kernels_agree():
    mmbook.set_seed(0)
    attn = GroupedQueryAttention(32, 4, 2, qk_norm=True, sliding_window=3).double().eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    full, present = attn(x, use_cache=True)
    assert present[0].shape == (2, 2, 7, 8)
    first, past = attn(x[:, :4], use_cache=True)
    rest, _ = attn(x[:, 4:], past=past, use_cache=True)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=0, atol=1e-12)
    for kernel in ("torch", "flash"):
        other = GroupedQueryAttention(32, 4, 2, qk_norm=True, sliding_window=3, kernel=kernel).double().eval()
        other.load_state_dict(attn.state_dict())
        torch.testing.assert_close(other(x)[0], full, rtol=0, atol=1e-12)
        torch.testing.assert_close(other(x[:, 4:], past=past)[0], rest, rtol=0, atol=1e-12)


def test_gqa_bad_input():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GroupedQueryAttention(32, 4, 3)
    with pytest.raises(ValueError, match="kernel must be one of"):
        GroupedQueryAttention(32, 4, kernel="cuda")
    attn = GroupedQueryAttention(32, 4, 2)
    with pytest.raises(ValueError, match="shape \\(batch, T, 32\\)"):
        attn(torch.zeros(2, 32))
    with pytest.raises(ValueError, match="past key must have shape \\(1, 2, P, 8\\)"):
        attn(torch.zeros(1, 3, 32), past=(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)))
    with pytest.raises(TypeError, match="past must be a \\(key, value\\) pair"):
        attn(torch.zeros(1, 3, 32), past=torch.zeros(1))
    with pytest.raises(ValueError, match="n_rep must be a positive int"):
        repeat_kv(torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(ValueError, match="cannot exceed k_len"):
        attention_mask(5, 3)
    with pytest.raises(ValueError, match="window must be a positive int"):
        attention_mask(3, 3, window=0)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        kv_cache_bytes(2, 0, 1, 8)


# ---------------------------------------------------------------- mixture of experts


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_matches_qwen3_moe_block(norm_topk_prob):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = transformers.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=12, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
                                         num_attention_heads=2, num_key_value_heads=2)
    mmbook.set_seed(0)
    theirs = Qwen3MoeSparseMoeBlock(config).double()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours = load_hf_moe_block(SparseMoE(16, 12, 4, 2, norm_topk_prob).double(), theirs)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out = ours(x)
    torch.testing.assert_close(out.hidden, theirs(x), rtol=0, atol=1e-10)
    assert int(out.expert_load.sum()) == 18 * 2 and int(out.dropped) == 0
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.testing.assert_close(load_balancing_loss(out.router_logits, 2),
                               load_balancing_loss_func((out.router_logits,), 4, 2).float(), rtol=1e-6, atol=1e-6)


def test_moe_capacity_drops_overflow():
    mmbook.set_seed(0)
    moe = SparseMoE(8, 8, 4, 1, capacity_factor=0.5).double()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 10.0  # every token with x[0] > 0 prefers expert 0
    x = torch.randn(1, 40, 8, dtype=torch.float64).abs()
    out = moe(x)
    cap = expert_capacity(40, 4, 1, 0.5)
    assert cap == 5 and int(out.expert_load[0]) == 40 and int(out.dropped) == 35
    assert torch.equal(out.hidden[0, cap:], torch.zeros(35, 8, dtype=torch.float64))  # dropped: no expert output
    assert load_balancing_loss(out.router_logits, 1).item() > 3.0  # near E * 1 for a collapsed router


def test_moe_uniform_router_loss_is_top_k():
    balanced = torch.eye(4).repeat(3, 1) * 5.0
    assert abs(load_balancing_loss(balanced, 1).item() - 1.0) < 0.05


def test_moe_bad_input():
    with pytest.raises(ValueError, match="top_k=3 cannot exceed num_experts=2"):
        TopKRouter(8, 2, 3)
    with pytest.raises(ValueError, match="capacity_factor must be a positive number"):
        SparseMoE(8, 8, 4, 2, capacity_factor=0.0)
    with pytest.raises(ValueError, match="must end in d_model=8"):
        SparseMoE(8, 8, 4, 2)(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        expert_capacity(0, 4, 2, 1.0)
    with pytest.raises(ValueError, match="shape \\(tokens, num_experts\\)"):
        load_balancing_loss(torch.zeros(4), 1)
    with pytest.raises(TypeError, match="non-empty sequence"):
        load_balancing_loss([], 1)
    with pytest.raises(TypeError, match="must be a SparseMoE"):
        load_hf_moe_block(torch.nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match="sparse MoE block"):
        load_hf_moe_block(SparseMoE(8, 8, 4, 2), torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- FlashAttention


def test_online_softmax_equals_softmax():
    mmbook.set_seed(0)
    x = torch.randn(3, 17, dtype=torch.float64) * 5
    x[0, :5] = -math.inf
    probs, lse = online_softmax(x, block_size=4)
    torch.testing.assert_close(probs, torch.softmax(x, -1), rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, torch.logsumexp(x, -1), rtol=0, atol=1e-13)


@pytest.mark.parametrize(("causal", "window", "L"),
                         [(False, None, 19), (True, None, 19), (True, None, 7), (True, 5, 19)])
def test_flash_forward_backward_match_reference(causal, window, L):
    mmbook.set_seed(0)
    S = 19
    q = torch.randn(2, 3, L, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, S, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, S, 6, dtype=torch.float64, requires_grad=True)
    mask = attention_mask(L, S, window) if causal else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = flash_attention(q, k, v, causal=causal, window=window, block_q=4, block_k=5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), grad),
                               torch.autograd.grad(ref, (q, k, v), grad), rtol=0, atol=1e-12)
    o, lse = flash_attention_forward(q, k, v, causal, window, None, 4, 5)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=0, atol=1e-12)
    dq, dk, dv = flash_attention_backward(q, k, v, o, lse, grad, causal, window, None, 4, 5)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_flash_peak_memory_is_linear():
    def peaks(T):
        q = torch.randn(1, 1, T, 16, dtype=torch.float64)
        _, naive = measure_peak_bytes(lambda: torch.softmax(q @ q.transpose(-2, -1), -1) @ q)
        _, flash = measure_peak_bytes(lambda: flash_attention_forward(q, q, q, block_q=32, block_k=32))
        return naive, flash

    n1, f1 = peaks(128)
    n2, f2 = peaks(256)
    assert n2 >= 3.5 * n1 and f2 <= 2.5 * f1 and f2 < n2 / 4


def test_flash_bad_input():
    q = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="equal leading dimensions"):
        flash_attention_forward(q, torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="window needs causal=True"):
        flash_attention_forward(q, q, q, causal=False, window=2)
    with pytest.raises(ValueError, match="L <= S"):
        flash_attention_forward(torch.zeros(1, 5, 8), q, q)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        flash_attention_forward(q, q, q, block_q=0)
    with pytest.raises(TypeError, match="same dtype"):
        flash_attention(q, q.double(), q.double())
    with pytest.raises(ValueError, match="lse must have shape"):
        flash_attention_backward(q, q, q, q, torch.zeros(1, 5), q)
    with pytest.raises(ValueError, match="at least one finite entry"):
        online_softmax(torch.full((2, 3), -math.inf))
    with pytest.raises(TypeError, match="fn must be callable"):
        measure_peak_bytes(3)


def test_project_gives_the_forward_pass_queries_keys_and_values():
    mmbook.set_seed(0)
    attn = GroupedQueryAttention(32, 4, 2, qk_norm=True).double().eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    q, k, v = attn.project(x, torch.arange(5))
    heads = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True)
    y = attn.o_proj(heads.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(y, attn(x)[0], rtol=0, atol=1e-12)  # float64, same operations in another order
