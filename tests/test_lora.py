"""Unit tests of mmbook.lora (LoRALinear, apply_lora, merging, counting, memory)."""

import pytest
import torch
from torch import nn

import mmbook
from mmbook.decoder import Decoder, DecoderConfig
from mmbook.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    training_memory,
    unmerge_lora,
)


def _decoder():
    mmbook.set_seed(0)
    return Decoder(DecoderConfig(vocab_size=50, max_seq_len=16, n_layer=2, n_head=2, d_model=16))


def test_lora_linear_starts_at_base_and_formula():
    mmbook.set_seed(0)
    base = nn.Linear(8, 6).double()
    layer = LoRALinear(base, r=2, alpha=4.0, seed=1)
    x = torch.randn(3, 8, dtype=torch.float64, generator=mmbook.torch_generator(2))
    assert torch.equal(layer(x), base(x))  # B = 0
    assert not base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_(generator=mmbook.torch_generator(3))
    expected = x @ (base.weight + 2.0 * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    adapted = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=1e-12)
    assert layer.scaling == 2.0 and "r=2" in repr(layer)


def test_lora_linear_bad_input():
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Conv1d(2, 2, 1), 1, 1.0)
    with pytest.raises(ValueError, match="r"):
        LoRALinear(nn.Linear(4, 4), 0, 1.0)
    with pytest.raises(ValueError, match="exceeds"):
        LoRALinear(nn.Linear(4, 3), 4, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(4, 4), 1, 0.0)


def test_apply_lora_freezes_counts_and_round_trips():
    model = _decoder()
    ids = torch.randint(50, (2, 7), generator=mmbook.torch_generator(0))
    before = model(ids).logits
    total0 = count_parameters(model)[1]
    names = apply_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, layers=[1])
    assert names == ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    trainable, total = count_parameters(model)
    assert trainable == 2 * 2 * (16 + 16) and total == total0 + trainable
    assert torch.equal(model(ids).logits, before)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(generator=mmbook.torch_generator(1))
    adapted = model(ids).logits
    merge_lora(model)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    state = lora_state_dict(model)
    assert set(state) == {f"{n}.lora_{x}" for n in names for x in "AB"}
    other = _decoder()
    apply_lora(other, ["q_proj", "v_proj"], r=2, alpha=4, layers=[1])
    load_lora_state_dict(other, state)
    torch.testing.assert_close(other(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, ["q_proj"], 1, 1.0)
    with pytest.raises(ValueError, match="exactly"):
        load_lora_state_dict(other, {})


def test_apply_lora_bad_input():
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(_decoder(), ["q_prj"], 2, 4)
    with pytest.raises(TypeError, match="targets"):
        apply_lora(_decoder(), "q_proj", 2, 4)
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(_decoder())
    with pytest.raises(ValueError, match="no LoRA"):
        lora_state_dict(_decoder())


def test_apply_lora_bad_call_leaves_the_model_intact():
    for kwargs, error in (({"r": 2, "alpha": -1.0}, ValueError), ({"r": 10_000, "alpha": 4.0}, ValueError),
                          ({"r": 2, "alpha": 4.0, "layers": [-1]}, ValueError),
                          ({"r": 2, "alpha": 4.0, "layers": ["0"]}, ValueError),
                          ({"r": 2, "alpha": 4.0, "layers": 0}, TypeError)):
        model = _decoder()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error):
            apply_lora(model, ["q_proj", "v_proj"], **kwargs)
        assert all(p.requires_grad for p in model.parameters()), kwargs
        assert not lora_layers(model) and model.state_dict().keys() == before.keys(), kwargs


def test_training_memory_full_vs_lora():
    ids = torch.randint(50, (2, 7), generator=mmbook.torch_generator(0))
    results = {}
    for name in ("full", "lora"):
        model = _decoder()
        if name == "lora":
            apply_lora(model, ["q_proj", "v_proj"], r=2, alpha=4)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        with pytest.raises(ValueError, match="state"):
            training_memory(model, opt)
        model(ids, ids).loss.backward()
        opt.step()
        n_tensors = len([p for p in model.parameters() if p.requires_grad])
        results[name] = (training_memory(model, opt), count_parameters(model)[0], n_tensors)
    for mem, trainable, n_tensors in results.values():
        assert mem["gradients"] == 4 * trainable and mem["trainable"] == 4 * trainable
        assert mem["optimizer"] == 2 * 4 * trainable + 4 * n_tensors  # exp_avg, exp_avg_sq, a float32 step
    assert results["lora"][0]["gradients"] < results["full"][0]["gradients"] / 10
    with pytest.raises(TypeError, match="optimizer"):
        training_memory(_decoder(), None)
