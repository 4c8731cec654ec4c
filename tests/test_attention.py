import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmbook
from mmbook.attention import MultiHeadAttention, causal_mask, padding_mask, scaled_dot_product_attention

# float32 results of two different summation orders agree to a few ulps of values O(1)
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _qkv():
    mmbook.set_seed(0)
    return torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)


def test_sdpa_matches_torch_without_and_with_masks():
    q, k, v = _qkv()
    out, w = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **TOL)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5), **TOL)
    mask = padding_mask(torch.tensor([7, 3]), 7)[:, None]  # (2, 1, 1, 7)
    out, w = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)
    assert (w[1, ..., 3:] == 0).all()
    x = torch.randn(2, 6, 8)
    out, w = scaled_dot_product_attention(x, x, x, causal_mask(6))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(x, x, x, is_causal=True), **TOL)
    assert (w.triu(1) == 0).all()


def test_fully_masked_row_gives_zeros():
    q, k, v = _qkv()
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2] = False
    out, w = scaled_dot_product_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and (w[..., 2, :] == 0).all() and (out[..., 2, :] == 0).all()


def test_sdpa_bad_input():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q and k must share d_k"):
        scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="k and v must have the same length S"):
        scaled_dot_product_attention(q, k, v[..., :6, :])
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        scaled_dot_product_attention(q, k, v, torch.ones(5, 7))
    with pytest.raises(ValueError, match=r"mask of shape \(5, 6\) does not broadcast"):
        scaled_dot_product_attention(q, k, v, torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        scaled_dot_product_attention([1.0], k, v)
    with pytest.raises(TypeError, match="floating-point"):
        scaled_dot_product_attention(q.long(), k, v)


def test_mha_matches_torch_with_copied_weights():
    mmbook.set_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    ours = MultiHeadAttention(16, 4).load_from_torch(ref)
    x, y = torch.randn(3, 6, 16), torch.randn(3, 9, 16)
    lengths = torch.tensor([9, 5, 1])
    mask = padding_mask(lengths, 9)
    out, w = ours(x, y, y, mask=mask)
    ref_out, ref_w = ref(x, y, y, key_padding_mask=~mask[:, 0], average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)
    out, _ = ours(x, mask=causal_mask(6))
    ref_out, _ = ref(x, x, x, attn_mask=~causal_mask(6))
    torch.testing.assert_close(out, ref_out, **TOL)


def test_mha_bad_input():
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by num_heads \(4\)"):
        MultiHeadAttention(10, 4)
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq, 8\), got \(2, 3, 6\)"):
        mha(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="must share"):
        mha(torch.randn(2, 3, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="sizes differ"):
        mha.load_from_torch(nn.MultiheadAttention(8, 4))
    with pytest.raises(TypeError, match="must be nn.MultiheadAttention"):
        mha.load_from_torch(nn.Linear(8, 8))


def test_mask_helpers_bad_input():
    with pytest.raises(ValueError, match="length must be a positive int, got 0"):
        causal_mask(0)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, max_len=4\]"):
        padding_mask(torch.tensor([5]), 4)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        padding_mask(torch.tensor([1.0]), 4)


def test_bad_input_dtypes_sizes_and_types_are_named():
    q = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match="scaled_dot_product_attention: k and q must have the same dtype"):
        scaled_dot_product_attention(q, q.double(), q)
    with pytest.raises(TypeError, match="scaled_dot_product_attention: v and q must have the same dtype"):
        scaled_dot_product_attention(q, q, q.double())
    with pytest.raises(ValueError, match="d_k must be at least 1"):  # would divide by sqrt(0): NaN
        scaled_dot_product_attention(q[..., :0], q[..., :0], q)
    with pytest.raises(ValueError, match="lengths must be a 1-D integer tensor"):  # True would count as 1
        padding_mask(torch.tensor([True]), 3)
    with pytest.raises(TypeError, match="MultiHeadAttention: d_model must be an int, got float"):
        MultiHeadAttention(8.0, 2)
    with pytest.raises(ValueError, match=r"MultiHeadAttention: dropout must be in \[0, 1\), got nan"):
        MultiHeadAttention(8, 2, dropout=float("nan"))
    with pytest.raises(TypeError, match="MultiHeadAttention: dropout must be a number, got str"):
        MultiHeadAttention(8, 2, dropout="0.1")
    with pytest.raises(TypeError, match="MultiHeadAttention: bias must be True or False, got str"):
        MultiHeadAttention(8, 2, bias="no")
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(TypeError, match="MultiHeadAttention: query has dtype torch.float64 but the model's"):
        mha(q.double())
    with pytest.raises(TypeError, match="MultiHeadAttention: key has dtype torch.float64"):
        mha(q, q.double())


def test_causal_mask_device_and_bias_mismatch_are_named():
    # an int device would be read as CUDA device 0 (a driver error on a CPU machine)
    with pytest.raises(TypeError, match="causal_mask: device must be a torch.device or a name such as 'cpu', got int"):
        causal_mask(3, 0)
    with pytest.raises(ValueError, match="causal_mask: device must name a torch device such as 'cpu'.*got 'gpu'"):
        causal_mask(3, "gpu")
    assert torch.equal(causal_mask(3, "cpu"), causal_mask(3, torch.device("cpu")))
    # a module without biases loading one with biases would drop them and compute something else
    torch_mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(ValueError, match=r"load_from_torch: the torch module has biases but this one has none"):
        MultiHeadAttention(8, 2, bias=False).load_from_torch(torch_mha)
    ours = MultiHeadAttention(8, 2, bias=False).load_from_torch(nn.MultiheadAttention(8, 2, bias=False))
    assert ours.q_proj.bias is None
