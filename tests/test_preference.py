"""Unit tests of mmbook.preference (Bradley-Terry, reward model, KL-regularised optimum, DPO)."""

import math

import pytest
import torch

import mmbook
from mmbook.decoder import Decoder, DecoderConfig
from mmbook.preference import (
    RewardModel,
    bradley_terry_loss,
    dpo_loss,
    kl_optimal_policy,
    sequence_logprob,
    token_logprobs,
)


def test_bradley_terry_loss_is_the_logistic_nll():
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    want = sum(math.log1p(math.exp(-(a - b))) for a, b in zip(rc.tolist(), rr.tolist(), strict=True)) / 3
    assert abs(bradley_terry_loss(rc, rr).item() - want) < 1e-6


def test_bradley_terry_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="r_rejected"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(TypeError, match="r_chosen"):
        bradley_terry_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3))


def test_reward_model_pools_only_the_masked_tokens():
    mmbook.set_seed(0)
    rm = RewardModel(10, d_model=8, hidden=16)
    ids = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 9]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    r = rm(ids, mask)
    assert r.shape == (2,) and torch.allclose(r[0], r[1])
    with pytest.raises(ValueError, match="at least one"):
        rm(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="ids"):
        rm(ids + 10, mask)
    with pytest.raises(TypeError, match="mask"):
        rm(ids, mask.long())


def test_kl_optimal_policy_matches_the_formula_and_limits():
    ref = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), 0)
    r = torch.tensor([1.0, 0.5, -0.2], dtype=torch.float64)
    p = kl_optimal_policy(ref, r, 0.5).exp()
    want = ref.exp() * torch.exp(r / 0.5)
    torch.testing.assert_close(p, want / want.sum())
    assert int(kl_optimal_policy(ref, r, 1e-4).argmax()) == 0  # beta -> 0: the best response
    torch.testing.assert_close(kl_optimal_policy(ref, r, 1e4), ref, atol=1e-3, rtol=0)  # beta -> inf: the reference
    with pytest.raises(ValueError, match="normalised"):
        kl_optimal_policy(ref + 1, r, 0.5)
    with pytest.raises(ValueError, match="beta"):
        kl_optimal_policy(ref, r, 0.0)
    with pytest.raises(ValueError, match="rewards"):
        kl_optimal_policy(ref, r[:2], 0.5)


def test_dpo_loss_formula_and_bad_input():
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-1.0, -2.0, -1.5, -1.5))
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert abs(out.loss.item() - math.log1p(math.exp(-0.5 * 1.0))) < 1e-12
    assert abs(out.chosen_rewards.item() - 0.25) < 1e-12 and abs(out.rejected_rewards.item() + 0.25) < 1e-12
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=-1.0)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(pc, pr, rc, torch.zeros(2, dtype=torch.float64))


def test_sequence_logprob_sums_the_response_tokens():
    mmbook.set_seed(0)
    model = Decoder(DecoderConfig(vocab_size=7, max_seq_len=8, n_layer=1, n_head=2, d_model=8)).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[False, False, False, True, True]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits, -1)[0]
        want = logp[2, 4] + logp[3, 5]
        got = sequence_logprob(model, ids, mask)
        assert token_logprobs(model, ids).shape == (1, 4)
    torch.testing.assert_close(got[0], want)
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprob(model, ids, torch.ones_like(mask))
    with pytest.raises(ValueError, match="response_mask"):
        sequence_logprob(model, ids, mask[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        token_logprobs(model, ids[:, :1])
