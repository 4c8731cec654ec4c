import pytest
import torch
from torch import nn

import mmbook
from mmbook.decoder import Decoder, DecoderConfig
from mmbook.quant import (
    Int8Linear,
    bits_per_weight,
    dequantize,
    error_bound,
    fake_quantize,
    int8_linear_reference,
    int8_weight_only,
    quantize,
    quantize_decoder,
)


def _w(out=6, inp=64, dtype=torch.float64):
    return torch.randn(out, inp, dtype=dtype, generator=mmbook.torch_generator(0))


@pytest.mark.parametrize("scheme", ["absmax", "zeropoint"])
@pytest.mark.parametrize("granularity,group", [("tensor", None), ("channel", None), ("group", 16)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_bound_holds_for_every_weight(scheme, granularity, group, bits):
    w = _w()
    w[0, 3] = 25.0  # an outlier
    qt = quantize(w, bits, scheme, granularity, group)
    err = (w - dequantize(qt)).abs()
    assert bool((err <= error_bound(qt) * (1 + 1e-12)).all())
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if scheme == "absmax" else (0, 2 ** bits - 1)
    assert int(qt.codes.min()) >= lo and int(qt.codes.max()) <= hi


def test_absmax_hits_extremes_and_zero_exact():
    w = _w()
    qt = quantize(w, 8, "absmax", "channel")
    assert qt.codes.abs().amax(-1).eq(127).all()
    w[:, 0] = 0.0
    assert torch.equal(fake_quantize(w, 8, "zeropoint", "channel")[:, 0], torch.zeros(6, dtype=torch.float64))


def test_smaller_groups_smaller_error_with_outlier():
    w = _w(8, 128)
    w[0, 0] = 40.0
    errs = [(w - fake_quantize(w, 4, "absmax", g, s)).abs().mean().item()
            for g, s in (("tensor", None), ("channel", None), ("group", 32))]
    assert errs[0] > errs[1] > errs[2]


def test_bits_per_weight():
    assert bits_per_weight(4, 32, zero_point=True) == 5.0
    assert bits_per_weight(8, 32) == 8.5
    assert bits_per_weight(8, None, n_in=4, n_out=4) == 9.0


def test_int8_linear_equals_integer_reference():
    lin = nn.Linear(64, 6, bias=False).double()
    layer = Int8Linear.from_linear(lin)
    assert layer.qweight.dtype == torch.int8
    x_int = torch.randint(-1000, 1000, (5, 64), generator=mmbook.torch_generator(1))
    x = x_int.double() / 256
    ref = int8_linear_reference(x_int, 1 / 256, layer.qweight, layer.scale.double())
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_quantize_decoder_changes_weights_within_bound():
    mmbook.set_seed(0)
    m = Decoder(DecoderConfig(vocab_size=32, n_layer=1, d_model=32, n_head=2, d_ff=64))
    before = m.layers[0].mlp.up_proj.weight.detach().clone()
    n = quantize_decoder(m, 4, "absmax", "group", 16)
    after = m.layers[0].mlp.up_proj.weight
    assert n == sum(p.numel() for name, p in m.named_parameters() if "layers" in name and p.ndim == 2)
    assert not torch.equal(before, after)
    assert bool(((before - after).abs() <= error_bound(quantize(before, 4, "absmax", "group", 16)) + 1e-7).all())


def test_bad_input():
    w = _w()
    with pytest.raises(ValueError, match="bits"):
        quantize(w, 9)
    with pytest.raises(ValueError, match="group_size"):
        quantize(w, 4, granularity="group", group_size=5)
    with pytest.raises(ValueError, match="group_size"):
        quantize(w, 4, granularity="group")
    with pytest.raises(ValueError, match="granularity"):
        quantize(w, 4, granularity="row")
    with pytest.raises(ValueError, match="scheme"):
        quantize(w, 4, scheme="minmax")
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.full((2, 2), float("nan")))
    with pytest.raises(TypeError, match="qweight"):
        Int8Linear(torch.zeros(2, 3, dtype=torch.int32), torch.ones(2))
    with pytest.raises(ValueError, match="x must have shape"):
        Int8Linear.from_linear(nn.Linear(4, 2))(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="qt"):
        dequantize(w)
    with pytest.raises(ValueError, match="do not fit"):
        int8_linear_reference(torch.zeros(2, 3, dtype=torch.long), 1.0, torch.zeros(4, 5, dtype=torch.int8),
                              torch.ones(4))


def test_int8_weight_only_matches_fake_quantization():
    mmbook.set_seed(0)
    m = Decoder(DecoderConfig(vocab_size=32, n_layer=2, d_model=32, n_head=2, d_ff=64)).eval()
    ref = Decoder(m.config).eval()
    ref.load_state_dict(m.state_dict())
    quantize_decoder(ref, 8, "absmax", "channel", None)
    assert int8_weight_only(m) == 2 * 7
    assert isinstance(m.layers[0].self_attn.q_proj, Int8Linear) and isinstance(m.lm_head, nn.Linear)
    x = torch.randint(0, 32, (2, 9), generator=mmbook.torch_generator(5))
    torch.testing.assert_close(m(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="skip"):
        int8_weight_only(m, skip="lm_head")


def test_bits_per_weight_integer_zero_point_and_reference_scale_shape():
    assert bits_per_weight(4, 32, zero_point=True, zero_bits=4) == 4 + 20 / 32
    assert bits_per_weight(8, 576, scale_bits=32) == 8 + 32 / 576
    with pytest.raises(ValueError, match="x_scale"):
        int8_linear_reference(torch.zeros(2, 3, dtype=torch.long), torch.ones(3), torch.zeros(4, 3, dtype=torch.int8),
                              torch.ones(4))


def test_q4_1_dequantize_equals_gguf_from_raw_bytes():
    """Our decoding of Q4_1 bytes = the gguf package's dequantize, exactly (the same float32 operations), on blocks
    gguf's own quantizer wrote; bad input is named."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize as gguf_quantize

    from mmbook.quant import q4_1_dequantize

    w = mmbook.numpy_rng(5).standard_normal((6, 64)).astype(np.float32)
    raw = gguf_quantize(w, GGMLQuantizationType.Q4_1)  # (6, 40) bytes: two blocks per row
    ours = q4_1_dequantize(torch.from_numpy(raw.copy()).reshape(-1)).reshape(6, 64)
    assert torch.equal(ours, torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType.Q4_1).copy()))
    assert (ours - torch.from_numpy(w)).abs().max() < 0.5 * (w.max() - w.min()) / 15  # within half a step
    with pytest.raises(ValueError, match="whole blocks of 20 bytes, got 19"):
        q4_1_dequantize(torch.zeros(19, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        q4_1_dequantize(torch.zeros(20, dtype=torch.int64))
