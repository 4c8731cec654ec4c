import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmbook
from mmbook.gpt import GPT, GPTConfig, gpt_param_count
from mmbook.scaling import (
    FlopCount,
    accumulate_gradients,
    count_parameters,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    gpt_activation_bytes,
    gpt_flops_per_token,
    measure_flops,
    measure_saved_tensor_bytes,
    tensor_bytes,
    training_flops,
    training_state_bytes,
    zero_memory_per_gpu,
)

TINY = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, d_model=16)


def _model(**overrides):
    mmbook.set_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def _tokens(batch=4, seq=16, vocab=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g)


# ---------------------------------------------------------------- parameters and FLOPs


def test_count_parameters_tied_and_trainable():
    model = _model()
    assert count_parameters(model) == gpt_param_count(model.config)
    untied = _model(tie_embeddings=False)
    assert count_parameters(untied) == count_parameters(model) + 37 * 16
    model.wte.weight.requires_grad_(False)  # the tied output layer is the same tensor
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 37 * 16
    with pytest.raises(TypeError, match="model must be a Module"):
        count_parameters([torch.zeros(3)])


def test_flops_per_token_matches_hand_count():
    cfg = GPTConfig(**TINY)
    d, f, v, layers, t = 16, 64, 37, 2, 10
    by_hand = 2 * (layers * (4 * d * d + 2 * d * f) + v * d) + 4 * layers * t * d
    assert gpt_flops_per_token(cfg, t, backward=False) == by_hand
    assert gpt_flops_per_token(cfg, t) == 3 * by_hand
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        gpt_flops_per_token(cfg, 0)
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        gpt_flops_per_token({"d_model": 16}, 4)


def test_measure_flops_equals_formula():
    model = _model()
    idx, targets = _tokens(3, 12)
    counted = measure_flops(model, idx, targets)
    assert isinstance(counted, FlopCount)
    assert counted.forward == gpt_flops_per_token(model.config, 12, backward=False) * 36
    assert counted.backward == 2 * counted.forward and counted.total == 3 * counted.forward
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(TypeError, match="idx must be an int64 tensor"):
        measure_flops(model, idx.float(), targets)
    with pytest.raises(ValueError, match="same shape"):
        measure_flops(model, idx, targets[:, :5])


def test_training_flops():
    assert training_flops(124_000_000, 10**9) == 6 * 124_000_000 * 10**9
    with pytest.raises(ValueError, match="n_tokens must be a positive int"):
        training_flops(10, 0)
    with pytest.raises(TypeError, match="n_params must be an int, got float"):
        training_flops(1.5, 10)


# ---------------------------------------------------------------- memory


def test_tensor_bytes_counts_storage_once():
    x = torch.zeros(10, 4)
    assert tensor_bytes([x]) == 160
    assert tensor_bytes([x, x[2:], x.t()]) == 160  # views share the storage
    assert tensor_bytes([x, torch.zeros(3, dtype=torch.float64)]) == 184
    assert tensor_bytes(x) == 160
    with pytest.raises(TypeError, match="item 1 is list"):
        tensor_bytes([x, [1, 2]])


def test_training_state_bytes_adam():
    model = _model()
    n, n_tensors = count_parameters(model), len(list(model.parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = training_state_bytes(model, opt)
    assert before == (4 * n, 0, 0)
    idx, targets = _tokens()
    model(idx, targets).loss.backward()
    opt.step()
    after = training_state_bytes(model, opt)
    assert after.parameters == after.gradients == 4 * n
    assert after.optimizer_state == 8 * n + 4 * n_tensors  # exp_avg, exp_avg_sq and a float32 step each
    assert after.total == sum(after)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        training_state_bytes(model, "adam")


def test_activation_estimate_against_saved_tensors():
    cfg = GPTConfig(**{**TINY, "kernels": "torch", "block_size": 32})
    mmbook.set_seed(0)
    model = GPT(cfg)
    b, t = 4, 32
    idx, targets = _tokens(b, t)
    out, measured = measure_saved_tensor_bytes(lambda: model(idx, targets), exclude=model.parameters())
    out.loss.backward()
    estimate = gpt_activation_bytes(cfg, b, t)
    d, f, v, layers = 16, 64, 37, 2
    assert estimate == 4 * b * t * (layers * (8 * d + 2 * f) + 2 * d + v)
    # What the estimate leaves out: LayerNorm statistics, log-sum-exp, the float mask, token ids.
    small = layers * (4 * b * t * 4 + b * 2 * t * 4 + t * t * 4) + 2 * b * t * 4 + 2 * b * t * 8 + t * 8 + 4
    assert abs(measured - estimate) <= small
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        gpt_activation_bytes(cfg, 1, 64)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        gpt_activation_bytes(cfg, 0, 8)


def test_measure_saved_tensor_bytes_simple_and_bad_input():
    w = torch.randn(5, 3, requires_grad=True)
    x = torch.randn(7, 5)
    y, measured = measure_saved_tensor_bytes(lambda: torch.tanh(x @ w), exclude=[w])
    assert measured == 7 * 5 * 4 + 7 * 3 * 4  # matmul saves x (w excluded); tanh saves its output
    y.sum().backward()
    assert w.grad is not None
    with pytest.raises(TypeError, match="fn must be callable"):
        measure_saved_tensor_bytes(3)
    with pytest.raises(TypeError, match="exclude must hold tensors"):
        measure_saved_tensor_bytes(lambda: x, exclude=[1.0])


def test_activation_checkpointing_same_gradients_less_memory():
    model = _model(kernels="torch")
    idx, targets = _tokens()
    names = [n for n, _ in model.named_parameters()]
    out, plain_bytes = measure_saved_tensor_bytes(lambda: model(idx, targets), exclude=model.parameters())
    out.loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert enable_activation_checkpointing(model) is model
    assert [n for n, _ in model.named_parameters()] == names
    out, ckpt_bytes = measure_saved_tensor_bytes(lambda: model(idx, targets), exclude=model.parameters())
    out.loss.backward()
    for p, g in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)  # same operations, recomputed
    assert ckpt_bytes < plain_bytes / 2
    model.eval()  # evaluation and KV-cache decoding still work
    assert model.generate(idx[:1, :3], 2).shape == (1, 5)
    disable_activation_checkpointing(model)
    assert "forward" not in model.h[0].__dict__
    enable_activation_checkpointing(model, blocks=[1])
    assert "forward" in model.h[1].__dict__ and "forward" not in model.h[0].__dict__
    with pytest.raises(ValueError, match="blocks must be indices"):
        enable_activation_checkpointing(model, blocks=[2])
    with pytest.raises(TypeError, match="model must be a GPT"):
        enable_activation_checkpointing(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a GPT"):
        disable_activation_checkpointing(nn.Linear(2, 2))


# ---------------------------------------------------------------- gradient accumulation


def test_accumulate_gradients_equals_large_batch_with_padding():
    model = _model().double()
    idx, targets = _tokens(6, 16)
    targets[0, 5:] = -100  # rows with different numbers of target tokens
    targets[3, 2:] = -100
    logits = model(idx).logits
    loss = F.cross_entropy(logits.reshape(-1, 37), targets.reshape(-1), ignore_index=-100)
    loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    mean_loss = accumulate_gradients(model, idx, targets, micro_batch_size=4)  # chunks of 4 and 2 rows
    assert mean_loss == pytest.approx(loss.item(), rel=1e-12)
    for p, g in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-13)  # float64, different summation order


def test_accumulate_gradients_bad_input():
    model = _model()
    idx, targets = _tokens()
    with pytest.raises(ValueError, match="micro_batch_size must be a positive int"):
        accumulate_gradients(model, idx, targets, 0)
    with pytest.raises(ValueError, match="no loss to average"):
        accumulate_gradients(model, idx, torch.full_like(targets, -100), 2)
    with pytest.raises(TypeError, match="model must be a GPT"):
        accumulate_gradients(nn.Linear(2, 2), idx, targets, 2)


# ---------------------------------------------------------------- ZeRO


def test_zero_memory_reproduces_the_paper():
    # ZeRO paper, Figure 1: 7.5B parameters on 64 GPUs with K = 12 -> 120, 31.4, 16.6 and 1.9 GB.
    gb = [zero_memory_per_gpu(7_500_000_000, 64, stage) / 1e9 for stage in range(4)]
    assert [round(x, 1) for x in gb] == [120.0, 31.4, 16.6, 1.9]
    assert zero_memory_per_gpu(1000, 1, 3) == zero_memory_per_gpu(1000, 1, 0) == 16000.0
    assert zero_memory_per_gpu(1000, 4, 0, param_bytes=4, grad_bytes=4, optimizer_bytes=8) == 16000.0
    with pytest.raises(ValueError, match="stage must be 0"):
        zero_memory_per_gpu(1000, 4, 4)
    with pytest.raises(ValueError, match="n_gpus must be a positive int"):
        zero_memory_per_gpu(1000, 0, 1)
    with pytest.raises(ValueError, match="optimizer_bytes must be a number"):
        zero_memory_per_gpu(1000, 2, 1, optimizer_bytes=-1)


def test_accumulate_gradients_range_checks_targets():
    from mmbook.gpt import GPT, GPTConfig

    mmbook_model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=8))
    idx = torch.zeros(2, 4, dtype=torch.long)
    for bad in (16, -1):  # not cross_entropy's "Target 16 is out of bounds"
        with pytest.raises(ValueError, match=r"accumulate_gradients: targets must lie in \[0, 16\) \(or -100\)"):
            accumulate_gradients(mmbook_model, idx, torch.full((2, 4), bad), 1)
    with pytest.raises(TypeError, match="count_parameters: trainable_only must be True or False, got str"):
        count_parameters(mmbook_model, trainable_only="yes")


def test_vit_flops_per_image_by_hand():
    """2 FLOPs per multiply-add: patch embedding, then per layer QKV, scores, weighted values, output and MLP."""
    from mmbook.scaling import vit_flops_per_image

    def by_hand(n, d=64, f=256, layers=2, patch_pixels=4 * 4 * 3, patches=64):
        per_layer = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * f
        return 2 * patches * patch_pixels * d + layers * per_layer

    assert vit_flops_per_image(32, 4, 64, 2, 256) == by_hand(65) == 15_335_936  # 64 patches + the class token
    assert vit_flops_per_image(32, 4, 64, 2, 256, cls_token=False) == by_hand(64) == 15_073_280
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        vit_flops_per_image(30, 4, 64, 2, 256)
    with pytest.raises(TypeError, match="cls_token must be True or False"):
        vit_flops_per_image(32, 4, 64, 2, 256, cls_token="no")
