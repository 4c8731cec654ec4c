"""Unit tests of mmbook.pretrain (the training loop of chapter 17's comparisons)."""

import math

import pytest
import torch

import mmbook
from mmbook.decoder import Decoder, DecoderConfig
from mmbook.gpt import GPT, GPTConfig
from mmbook.pretrain import TrainResult, evaluate_lm, train_lm

IDS = torch.tensor(list(b"the cat sat on the mat. " * 40), dtype=torch.long)


def _decoder():
    mmbook.set_seed(0)
    return Decoder(DecoderConfig(vocab_size=256, max_seq_len=16, n_layer=1, n_head=2, d_model=16))


def test_train_lm_lowers_the_loss_and_is_reproducible():
    runs = []
    for _ in range(2):
        model = _decoder()
        before = evaluate_lm(model, IDS, 8, n_windows=16)
        result = train_lm(model, IDS, steps=40, batch_size=8, seq_len=8, lr=1e-2, warmup=5, seed=3)
        runs.append(result)
        assert isinstance(result, TrainResult) and len(result.losses) == 40 and result.cpu_seconds >= 0
        assert model.training
        after = evaluate_lm(model, IDS, 8, n_windows=16)
        assert abs(before - math.log(256)) < 0.5 and after < before - 1.0
    assert runs[0].losses == runs[1].losses  # same seeds, same CPU: the same run


def test_train_lm_works_for_chapter_7s_gpt_and_evaluate_restores_the_mode():
    mmbook.set_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, d_model=16))
    train_lm(model, IDS, steps=3, batch_size=2, seq_len=8, lr=1e-3, warmup=1)
    model.eval()
    loss = evaluate_lm(model, IDS, 8, n_windows=4, batch_size=3)
    assert not model.training and math.isfinite(loss)


def test_evaluate_lm_equals_the_mean_over_windows():
    model = _decoder().eval()
    stride = (IDS.numel() - 1) // 5
    with torch.no_grad():
        losses = [model(IDS[s:s + 8][None], IDS[s + 1:s + 9][None]).loss.item() for s in range(0, 5 * stride, stride)]
    assert abs(evaluate_lm(model, IDS, 8, n_windows=5, batch_size=2) - sum(losses) / 5) < 1e-6


def test_pretrain_bad_input():
    model = _decoder()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        train_lm("gpt", IDS, steps=1, batch_size=1, seq_len=4, lr=1e-3)
    with pytest.raises((TypeError, ValueError), match="ids"):
        train_lm(model, IDS.float(), steps=1, batch_size=1, seq_len=4, lr=1e-3)
    with pytest.raises((TypeError, ValueError), match="ids"):
        train_lm(model, IDS[None], steps=1, batch_size=1, seq_len=4, lr=1e-3)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_lm(model, IDS, steps=0, batch_size=1, seq_len=4, lr=1e-3)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        train_lm(model, IDS, steps=1, batch_size=1, seq_len=4, lr=0.0)
    with pytest.raises(ValueError, match="clip"):
        train_lm(model, IDS, steps=1, batch_size=1, seq_len=4, lr=1e-3, clip=-1.0)
    with pytest.raises(ValueError, match="do not fit without overlap"):
        evaluate_lm(model, IDS, 8, n_windows=1000)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        evaluate_lm(model, IDS, 0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        evaluate_lm(None, IDS, 8)
