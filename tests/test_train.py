import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mmbook
from mmbook.optim import WarmupCosine
from mmbook.plot import plot_history
from mmbook.train import accuracy, cross_entropy, evaluate, fit, load_checkpoint, save_checkpoint


def _toy():
    mmbook.set_seed(0)
    x = torch.randn(256, 2)
    y = (x[:, 0] + x[:, 1] > 0).long()
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=32, shuffle=True), DataLoader(ds, batch_size=64)


def test_fit_learns_and_returns_history():
    train, val = _toy()
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hist = fit(model, train, nn.functional.cross_entropy, opt, epochs=5, val_loader=val,
               metrics={"acc": accuracy}, progress=False)
    assert hist["epoch"] == [1, 2, 3, 4, 5]
    assert set(hist) == {"epoch", "train_loss", "val_loss", "val_acc"}
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert hist["val_acc"][-1] > 0.9
    final = evaluate(model, val, nn.functional.cross_entropy, metrics={"acc": accuracy})
    assert final["acc"] == pytest.approx(hist["val_acc"][-1])


def test_fit_dict_batches():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, features):
            return self.lin(features)

    x = torch.randn(16, 2)
    y = torch.zeros(16, dtype=torch.long)
    loader = [{"features": x, "labels": y}]
    model = M()
    hist = fit(model, loader, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
               epochs=2, progress=False)
    assert len(hist["train_loss"]) == 2


def test_fit_bad_input():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        fit(model, [], nn.functional.cross_entropy, opt, epochs=0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got str"):
        fit(model, [], nn.functional.cross_entropy, "adam", epochs=1)
    with pytest.raises(ValueError, match="train_loader produced no batches"):
        fit(model, [], nn.functional.cross_entropy, opt, epochs=1, progress=False)
    with pytest.raises(ValueError, match="batch must be"):
        fit(model, [torch.zeros(2, 2)], nn.functional.cross_entropy, opt, epochs=1, progress=False)
    with pytest.raises(ValueError, match="'labels'"):
        fit(model, [{"x": torch.zeros(2, 2)}], nn.functional.cross_entropy, opt, epochs=1, progress=False)


def test_accuracy_and_bad_shapes():
    out = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(out, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"got \(3, 2\) and \(2,\)"):
        accuracy(out, torch.tensor([0, 1]))


def test_plot_history():
    ax = plot_history({"epoch": [1, 2, 3], "train_loss": [3.0, 2.0, 1.0], "val_loss": [3.5, 2.5, 2.0]},
                      title="t", logy=True)
    assert [line.get_label() for line in ax.get_lines()] == ["train_loss", "val_loss"]
    assert ax.get_xlabel() == "epoch"
    plt.close("all")


def test_plot_history_bad_input():
    with pytest.raises(ValueError, match="'acc'"):
        plot_history({"train_loss": [1.0]}, keys=["acc"])
    with pytest.raises(ValueError, match="non-empty mapping"):
        plot_history({})


def test_notebook_progress_bar_ends_as_its_final_text_line(monkeypatch):
    """In a notebook fit's bar is a widget shown under a display id; when training ends that output becomes the
    finished bar's text, so a saved notebook never shows a bar frozen at 0/epochs."""
    import IPython.display
    import tqdm.auto
    from tqdm.notebook import tqdm_notebook

    shown = []

    class Handle:
        def update(self, obj, raw=False):
            shown.append((obj, raw))

    def fake_display(obj, display_id=False):
        assert display_id is True
        shown.append(obj)
        return Handle()

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm_notebook)
    monkeypatch.setattr(IPython.display, "display", fake_display)
    train, _ = _toy()
    model = nn.Linear(2, 2)
    fit(model, train, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.5), epochs=3)
    assert len(shown) == 2, shown
    final, raw = shown[1]
    assert raw and list(final) == ["text/plain"] and "3/3" in final["text/plain"], final
    assert "100%" in final["text/plain"] and "train_loss=" in final["text/plain"]


def test_progress_bar_outside_a_notebook_has_no_display(capsys):
    from mmbook.train import _epoch_bar

    bar, shown = _epoch_bar(3, progress=False)
    assert list(bar) == [1, 2, 3] and shown is None
    assert capsys.readouterr().err == ""


def test_accuracy_and_loops_name_bad_input():
    out = torch.randn(4, 3)
    with pytest.raises(ValueError, match="accuracy: outputs contains NaN"):  # arg-max of NaN would count as class 0
        accuracy(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long))
    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"accuracy: targets must lie in \[0, 3\)"):
            accuracy(out, torch.tensor([0, 1, 2, bad]))
    with pytest.raises(TypeError, match="accuracy: targets must be an integer tensor"):
        accuracy(out, torch.zeros(4))
    with pytest.raises(TypeError, match="accuracy: outputs must be a torch.Tensor, got list"):
        accuracy([[0.1]], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="with batch > 0"):
        accuracy(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    model = nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    loss, opt = nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), 0.1)
    with pytest.raises(TypeError, match="fit: model must be an nn.Module, got int"):
        fit(3, data, loss, opt, epochs=1, progress=False)
    with pytest.raises(TypeError, match="fit: loss_fn must be a callable"):
        fit(model, data, 3, opt, epochs=1, progress=False)
    with pytest.raises(TypeError, match="fit: train_loader must be an iterable of batches, got int"):
        fit(model, 3, loss, opt, epochs=1, progress=False)
    with pytest.raises(ValueError, match="fit: clip_grad_norm must be a positive number, got nan"):
        fit(model, data, loss, opt, epochs=1, clip_grad_norm=float("nan"), progress=False)
    with pytest.raises(ValueError, match="fit: device must name a torch device"):
        fit(model, data, loss, opt, epochs=1, device="tpu", progress=False)
    with pytest.raises(TypeError, match="fit: metrics must map names to callables"):
        fit(model, data, loss, opt, epochs=1, metrics=[accuracy], progress=False)
    with pytest.raises(TypeError, match="fit: scheduler must have a step"):
        fit(model, data, loss, opt, epochs=1, scheduler=3, progress=False)
    with pytest.raises(TypeError, match="fit: progress must be True or False"):
        fit(model, data, loss, opt, epochs=1, progress="no")
    with pytest.raises(ValueError, match="fit: model has no parameters to take the device from"):
        fit(nn.ReLU(), data, loss, opt, epochs=1, progress=False)
    with pytest.raises(TypeError, match="evaluate: metrics must map names to callables"):
        evaluate(model, data, loss, metrics={"acc": 3})


def test_plot_history_names_bad_arguments():
    history = {"loss": [1.0, 0.5]}
    with pytest.raises(TypeError, match="plot_history: keys must be a sequence of names"):
        plot_history(history, "loss")  # would look up the keys 'l', 'o', 's', 's'
    with pytest.raises(TypeError, match=r"plot_history: history\['loss'\] must be a sequence of numbers, got str"):
        plot_history({"loss": "abc"})
    with pytest.raises(TypeError, match="plot_history: logy must be True or False"):
        plot_history(history, logy="yes")
    with pytest.raises(TypeError, match="plot_history: ax must be a matplotlib Axes or None, got int"):
        plot_history(history, ax=3)
    plt.close("all")


def test_evaluate_computes_metrics_on_the_whole_set_not_per_batch():
    # A fixed "model" whose scores are its input; F1 of the positive class is not a mean over examples.
    scores = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([1, 1, 0, 1, 0, 0])

    def f1(outputs: torch.Tensor, target: torch.Tensor) -> float:
        pred = outputs.argmax(dim=1)
        tp = int(((pred == 1) & (target == 1)).sum())
        fp, fn = int(((pred == 1) & (target == 0)).sum()), int(((pred == 0) & (target == 1)).sum())
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0

    loader = DataLoader(TensorDataset(scores, labels), batch_size=2)
    result = evaluate(nn.Identity(), loader, nn.functional.cross_entropy, metrics={"f1": f1, "acc": accuracy},
                      device="cpu")
    whole_f1 = f1(scores, labels)  # tp=2, fp=1, fn=1 -> 2/3
    per_batch = sum(f1(scores[i:i + 2], labels[i:i + 2]) for i in range(0, 6, 2)) / 3  # (2/3 + 2/3 + 1) / 3 = 7/9
    assert abs(result["f1"] - whole_f1) < 1e-12 and abs(per_batch - whole_f1) > 0.1
    assert abs(result["acc"] - 4 / 6) < 1e-6  # accuracy is a float32 mean
    assert abs(result["loss"] - float(nn.functional.cross_entropy(scores, labels))) < 1e-6
    with pytest.raises(TypeError, match="forward must return"):
        evaluate(nn.Identity(), loader, lambda o, t: o[0].sum(), metrics={"f1": f1},
                 forward=lambda m, b, d: ((b[0],), b[1]), device="cpu")


def test_cross_entropy_is_stable_and_equals_torch():
    mmbook.set_seed(0)
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 4, 2, 3, 3])
    for scale in (1.0, 1e3, 1e5):
        ours = cross_entropy(z * scale, y)
        ref = nn.functional.cross_entropy(z * scale, y)
        assert torch.isfinite(ours)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(cross_entropy(z, y), z)
    (g_ref,) = torch.autograd.grad(nn.functional.cross_entropy(z, y), z)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-15)
    naive = -torch.log(torch.exp(z * 1e3) / torch.exp(z * 1e3).sum(dim=1, keepdim=True))[torch.arange(6), y].mean()
    assert not torch.isfinite(naive)  # the check can fail: the naive formula overflows


def test_cross_entropy_bad_input():
    z = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"cross_entropy: logits must have shape \(batch, num_classes\)"):
        cross_entropy(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cross_entropy: targets must have shape \(3,\)"):
        cross_entropy(z, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="cross_entropy: targets must be an integer tensor"):
        cross_entropy(z, torch.zeros(3))
    with pytest.raises(ValueError, match="cross_entropy: targets"):
        cross_entropy(z, torch.tensor([0, 1, 4]))


def test_fit_steps_a_per_step_scheduler_and_clips():
    train, _ = _toy()
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(4, 16))
    fit(model, train, nn.functional.cross_entropy, opt, epochs=2, scheduler=sched, scheduler_interval="step",
        clip_grad_norm=1.0, progress=False)
    assert sched.last_epoch == 2 * len(train)  # one step per batch, 8 batches per epoch
    per_epoch = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    fit(model, train, nn.functional.cross_entropy, opt, epochs=2, scheduler=per_epoch, progress=False)
    assert per_epoch.last_epoch == 2
    with pytest.raises(ValueError, match="fit: scheduler_interval must be one of 'epoch', 'step', got 'batch'"):
        fit(model, train, nn.functional.cross_entropy, opt, epochs=1, scheduler=per_epoch,
            scheduler_interval="batch", progress=False)


def _resumable_run(tmp_path, steps, stop_at=None, resume=False, forget_optimizer=False):
    mmbook.set_seed(0)
    x = torch.randn(64, 3)
    y = (x.sum(dim=1) > 0).long()
    mmbook.set_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(2, steps))
    gen = mmbook.torch_generator(3)
    start = 0
    path = tmp_path / "run.pt"
    if resume:
        start = load_checkpoint(path, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2)
                                if forget_optimizer else opt, scheduler=sched, generator=gen)
    for step in range(start, steps):
        if stop_at is not None and step == stop_at:
            save_checkpoint(path, model=model, optimizer=opt, step=step, scheduler=sched, generator=gen)
            return None
        idx = torch.randint(0, 64, (16,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


def test_checkpoint_resume_is_bit_for_bit(tmp_path):
    full = _resumable_run(tmp_path, 12)
    assert _resumable_run(tmp_path, 12, stop_at=5) is None

    resumed = _resumable_run(tmp_path, 12, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed, strict=True))
    _resumable_run(tmp_path, 12, stop_at=5)
    broken = _resumable_run(tmp_path, 12, resume=True, forget_optimizer=True)
    assert not all(torch.equal(a, b) for a, b in zip(full, broken, strict=True))


def test_checkpoint_bad_input(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="save_checkpoint: step must be an int >= 0, got -1"):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=-1)
    with pytest.raises(TypeError, match="save_checkpoint: optimizer must be a torch.optim.Optimizer"):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer="adam", step=0)
    with pytest.raises(FileNotFoundError, match="load_checkpoint: no checkpoint at path"):
        load_checkpoint(tmp_path / "missing.pt", model=model, optimizer=opt)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt' is not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt", model=model, optimizer=opt)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=3)
    with pytest.raises(ValueError, match="load_checkpoint: the checkpoint has no generator state"):
        load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, generator=torch.Generator())
    assert load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt) == 3


def test_checkpoint_restores_python_and_numpy_global_rngs(tmp_path):
    import random

    import numpy as np

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mmbook.set_seed(4)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.standard_normal()  # and one in NumPy's
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=0)
    expected = (random.random(), random.gauss(0, 1), np.random.random(3), np.random.standard_normal(), torch.rand(3))
    mmbook.set_seed(99)  # a different state everywhere
    load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)
    got = (random.random(), random.gauss(0, 1), np.random.random(3), np.random.standard_normal(), torch.rand(3))
    assert got[:2] == expected[:2]
    np.testing.assert_array_equal(got[2], expected[2])
    assert got[3] == expected[3]
    assert torch.equal(got[4], expected[4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_restores_the_cuda_rng(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mmbook.set_seed(5)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=0)
    expected = torch.rand(4, device="cuda")
    mmbook.set_seed(6)
    load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a checkpoint from a CUDA machine")
def test_checkpoint_from_a_gpu_run_is_refused_without_cuda(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=0)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state["cuda_rng"] = [torch.get_rng_state()]
    torch.save(state, tmp_path / "gpu.pt")
    with pytest.raises(ValueError, match="gpu.pt' holds CUDA RNG states but CUDA is not available"):
        load_checkpoint(tmp_path / "gpu.pt", model=model, optimizer=opt)
