import math

import numpy as np
import pytest
import torch
from torch import nn

import mmbook
from mmbook.optim import SGD, Adagrad, Adam, AdamW, EarlyStopping, RMSprop, WarmupCosine, clip_grad_norm


def _model_and_batches(dtype=torch.float64, steps=10):
    mmbook.set_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    batches = [(torch.randn(16, 6, dtype=dtype), torch.randint(0, 3, (16,))) for _ in range(steps)]
    return model, batches


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


CASES = [
    (SGD, torch.optim.SGD, {"lr": 0.1}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (Adam, torch.optim.Adam, {"lr": 0.01}),
    (Adam, torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    (Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    (AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (Adagrad, torch.optim.Adagrad, {"lr": 0.1}),
    (Adagrad, torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-6, "weight_decay": 0.01, "initial_accumulator_value": 0.1}),
    (RMSprop, torch.optim.RMSprop, {"lr": 0.01}),
    (RMSprop, torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01, "momentum": 0.9}),
]


@pytest.mark.parametrize(("ours", "ref", "kwargs"), CASES)
def test_matches_torch_optim_float64(ours, ref, kwargs):
    model, batches = _model_and_batches()
    twin, _ = _model_and_batches()
    got = _train(model, ours(model.parameters(), **kwargs), batches)
    want = _train(twin, ref(twin.parameters(), **kwargs), batches)
    for a, b in zip(got, want, strict=True):
        # Same equations; only rounding order differs (float64, 10 steps).
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adam_without_bias_correction_would_differ():
    # A check that can fail: the first Adam step moves every weight by ~lr (bias-corrected).
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    p.grad = torch.tensor([1e-3, 5.0, -200.0], dtype=torch.float64)
    Adam([p], lr=0.1).step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -2.1, 3.1], dtype=torch.float64), rtol=0, atol=1e-6)


def test_closure_and_param_groups():
    w = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = SGD([{"params": [w], "lr": 0.5}, {"params": [b]}], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum() + (b**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(8.0)
    assert w.item() == pytest.approx(2.0 - 0.5 * 4.0)
    assert b.item() == pytest.approx(2.0 - 0.1 * 4.0)


def test_optim_bad_input():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr must be a number >= 0, got -0.1"):
        SGD(p, lr=-0.1)
    with pytest.raises(TypeError, match="lr must be a number, got str"):
        SGD(p, lr="0.1")
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.0"):
        Adam(p, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas must be a pair"):
        AdamW(p, betas=0.9)
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0"):
        AdamW(p, weight_decay=-1.0)
    with pytest.raises(ValueError, match="eps must be a number >= 0, got nan"):
        Adam(p, eps=math.nan)


def test_early_stopping_patience_and_restore():
    model = nn.Linear(1, 1, bias=False)
    stopper = EarlyStopping(patience=2)
    values = [3.0, 2.0, 2.5, 1.0, 1.5, float("nan"), 0.5]
    stops = []
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        stops.append(stopper.step(v, model))
    # improves at epochs 1, 2, 4; epochs 5 and 6 do not (NaN never improves) -> stop at 6
    assert stops == [False, False, False, False, False, True, False]
    assert (stopper.best, stopper.best_epoch) == (0.5, 7)
    with torch.no_grad():
        model.weight.fill_(9.0)
    stopper.restore(model)
    assert model.weight.item() == 0.5
    maxer = EarlyStopping(patience=1, min_delta=0.1, mode="max")
    assert maxer.step(torch.tensor(0.5)) is False  # tensors and numpy scalars are accepted
    assert maxer.step(np.float32(0.55)) is True  # not better by more than min_delta


def test_early_stopping_bad_input():
    with pytest.raises(ValueError, match="patience must be a positive int, got 0"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'best'"):
        EarlyStopping(mode="best")
    stopper = EarlyStopping()
    with pytest.raises(TypeError, match="value must be a float, got str"):
        stopper.step("0.3")
    with pytest.raises(ValueError, match=r"value must be a scalar, got shape \(2,\)"):
        stopper.step(torch.zeros(2))
    with pytest.raises(ValueError, match="no weights were kept"):
        stopper.restore(nn.Linear(1, 1))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        stopper.restore("model")


def test_bad_settings_are_named():
    w = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="SGD: params must be an iterable of tensors or parameter groups, got int"):
        SGD(3, lr=0.1)
    with pytest.raises(TypeError, match="SGD: nesterov must be True or False, got int"):
        SGD(w, lr=0.1, momentum=0.9, nesterov=1)
    with pytest.raises(ValueError, match=r"Adam: betas\[0\] must be in \[0, 1\), got nan"):
        Adam(w, betas=(math.nan, 0.9))
    with pytest.raises(ValueError, match="AdamW: eps must be a number >= 0, got inf"):
        AdamW(w, eps=math.inf)
    with pytest.raises(TypeError, match="EarlyStopping: patience must be an int, got float"):
        EarlyStopping(2.5)


def test_weight_decay_groups_decay_matrices_only():
    from mmbook.gpt import GPT, GPTConfig
    from mmbook.optim import weight_decay_groups

    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, d_model=16))
    decay, no_decay = weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    assert any("ln" in n for n in no_decay_names) and any("bias" in n for n in no_decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # AdamW with the groups leaves a gain untouched when its gradient is zero, and shrinks a matrix
    gain = next(p for p in no_decay["params"] if p.dim() == 1)
    matrix = decay["params"][0]
    before_gain, before_matrix = gain.detach().clone(), matrix.detach().clone()
    opt = torch.optim.AdamW(weight_decay_groups(model, 0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(gain, before_gain) and torch.allclose(matrix, before_matrix * (1 - 0.1 * 0.5))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        weight_decay_groups([matrix], 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        weight_decay_groups(model, -1.0)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        weight_decay_groups(frozen, 0.1)


def test_adagrad_steps_shrink_like_one_over_sqrt_t():
    # A constant gradient g: s_t = t g^2, so step t moves lr / sqrt(t) (eps = 0).
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = Adagrad([p], lr=1.0, eps=0.0)
    before = 0.0
    for t in range(1, 6):
        p.grad = torch.tensor([3.0], dtype=torch.float64)
        opt.step()
        assert abs((before - p.item()) - 1 / math.sqrt(t)) < 1e-12
        before = p.item()


def test_clip_grad_norm_matches_torch_and_keeps_direction():
    model, batches = _model_and_batches()
    twin, _ = _model_and_batches()
    for m in (model, twin):
        x, y = batches[0]
        nn.functional.cross_entropy(m(x), y).backward()
    raw = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
    for max_norm in (1e-3, 1e6):
        ours = clip_grad_norm(model.parameters(), max_norm)
        ref = nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert abs(clipped.norm().item() - 1e-3) < 1e-8  # the large max_norm left it alone
    torch.testing.assert_close(clipped / clipped.norm(), raw / raw.norm(), rtol=1e-10, atol=1e-12)
    single = torch.zeros(3, requires_grad=True)
    assert clip_grad_norm(single, 1.0).item() == 0.0  # no gradient yet: nothing to clip


def test_clip_grad_norm_bad_input():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="clip_grad_norm: max_norm must be a positive number, got 0"):
        clip_grad_norm([p], 0)
    with pytest.raises(TypeError, match="clip_grad_norm: max_norm must be a number"):
        clip_grad_norm([p], "1")
    with pytest.raises(TypeError, match=r"clip_grad_norm: parameters\[1\] must be a tensor"):
        clip_grad_norm([p, 3.0], 1.0)
    with pytest.raises(TypeError, match="clip_grad_norm: parameters must be a tensor or an iterable"):
        clip_grad_norm(5, 1.0)


def test_warmup_cosine_matches_torch_schedulers():
    from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, SequentialLR

    w, t, f_min, lr = 4, 20, 0.1, 0.5
    p = nn.Parameter(torch.zeros(1))
    o1, o2 = torch.optim.SGD([p], lr=lr), torch.optim.SGD([p], lr=lr)
    ours = LambdaLR(o1, WarmupCosine(w, t, f_min))
    ref = SequentialLR(o2, [LinearLR(o2, start_factor=1 / w, total_iters=w - 1),
                            CosineAnnealingLR(o2, T_max=t - w, eta_min=lr * f_min)], milestones=[w])
    for _ in range(t + 1):
        assert abs(o1.param_groups[0]["lr"] - o2.param_groups[0]["lr"]) < 1e-12
        o1.step(), o2.step()
        ours.step(), ref.step()
    schedule = WarmupCosine(w, t, f_min)
    assert schedule(0) == 1 / w and schedule(w - 1) == 1.0 and schedule(t) == pytest.approx(f_min)
    assert schedule(t + 100) == f_min
    assert "scheduler" not in repr(schedule) and "warmup_steps=4" in repr(schedule)


def test_warmup_cosine_without_warmup_is_cosine_annealing():
    from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR

    t, f_min, lr = 20, 0.1, 0.5
    p = nn.Parameter(torch.zeros(1))
    o1, o2 = torch.optim.SGD([p], lr=lr), torch.optim.SGD([p], lr=lr)
    ours, ref = LambdaLR(o1, WarmupCosine(0, t, f_min)), CosineAnnealingLR(o2, T_max=t, eta_min=lr * f_min)
    assert WarmupCosine(0, t, f_min)(0) == 1.0
    for _ in range(t + 1):
        assert abs(o1.param_groups[0]["lr"] - o2.param_groups[0]["lr"]) < 1e-12
        o1.step(), o2.step()
        ours.step(), ref.step()


def test_warmup_cosine_bad_input():
    with pytest.raises(ValueError, match="WarmupCosine: total_steps must be larger than warmup_steps"):
        WarmupCosine(10, 10)
    with pytest.raises(ValueError, match="WarmupCosine: warmup_steps must be an int >= 0, got -1"):
        WarmupCosine(-1, 10)
    with pytest.raises(TypeError, match="WarmupCosine: total_steps must be an int"):
        WarmupCosine(2, 10.0)
    with pytest.raises(ValueError, match=r"WarmupCosine: min_factor must be in \[0, 1\], got 2"):
        WarmupCosine(2, 10, 2)
    with pytest.raises(ValueError, match="WarmupCosine: step must be an int >= 0, got -1"):
        WarmupCosine(2, 10)(-1)


def test_adagrad_rmsprop_bad_input():
    p = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="Adagrad: lr must be a number >= 0, got -1"):
        Adagrad(p, lr=-1)
    with pytest.raises(ValueError, match="Adagrad: initial_accumulator_value must be a number >= 0"):
        Adagrad(p, initial_accumulator_value=-0.5)
    with pytest.raises(ValueError, match=r"RMSprop: alpha must be in \[0, 1\), got 1"):
        RMSprop(p, alpha=1)
    with pytest.raises(ValueError, match="RMSprop: momentum must be a number >= 0"):
        RMSprop(p, momentum=-0.1)
    with pytest.raises(TypeError, match="RMSprop: params must be an iterable"):
        RMSprop(3)
