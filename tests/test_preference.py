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


def _dpo_setup():
    mmbook.set_seed(0)
    model = Decoder(DecoderConfig(vocab_size=5, max_seq_len=4, n_layer=1, n_head=2, d_model=8))
    ref = Decoder(DecoderConfig(vocab_size=5, max_seq_len=4, n_layer=1, n_head=2, d_model=8))
    ref.load_state_dict(model.state_dict())
    chosen = torch.tensor([[0, 1, 2], [3, 1, 2]])
    rejected = torch.tensor([[0, 4, 4], [3, 4, 4]])
    mask = torch.tensor([[False, True, True]] * 2)
    with torch.no_grad():
        rc, rr = (sequence_logprob(ref, s, mask) for s in (chosen, rejected))
    return model, chosen, rejected, rc, rr, mask


def test_dpo_train_widens_the_margin_and_records_the_implicit_rewards():
    from mmbook.preference import dpo_train

    model, chosen, rejected, rc, rr, mask = _dpo_setup()
    calls = []
    hist = dpo_train(model, chosen, rejected, rc, rr, response_mask=mask, steps=20, batch=2, lr=1e-2, beta=0.5,
                     seed=0, evaluate=lambda m: calls.append(1) or len(calls), eval_every=10)
    assert len(hist["loss"]) == len(hist["chosen_reward"]) == len(hist["rejected_reward"]) == 20
    assert len(hist["reward_accuracy"]) == 20 and all(a in (0.0, 0.5, 1.0) for a in hist["reward_accuracy"])
    assert hist["reward_accuracy"][0] == 0.0  # policy = reference: every implicit reward is 0, no pair is ordered
    assert hist["reward_accuracy"][-1] == 1.0
    assert hist["eval_step"] == [0, 10, 20] and hist["eval"] == [1, 2, 3]
    assert abs(hist["loss"][0] - math.log(2)) < 1e-6  # policy = reference at the first step
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["chosen_reward"][-1] - hist["rejected_reward"][-1] > 0
    assert not model.training


def test_dpo_train_rejects_bad_input():
    from mmbook.preference import dpo_train

    model, chosen, rejected, rc, rr, mask = _dpo_setup()
    kw = {"response_mask": mask, "steps": 2, "batch": 2, "lr": 1e-2, "beta": 0.5}
    with pytest.raises(ValueError, match="dpo_train"):
        dpo_train(model, chosen, rejected[:1], rc, rr, **kw)
    with pytest.raises(ValueError, match="dpo_train.*ref_chosen"):
        dpo_train(model, chosen, rejected, rc[:1], rr, **kw)
    with pytest.raises(ValueError, match="dpo_train.*beta"):
        dpo_train(model, chosen, rejected, rc, rr, **{**kw, "beta": 0.0})
    with pytest.raises(TypeError, match="dpo_train.*evaluate"):
        dpo_train(model, chosen, rejected, rc, rr, **kw, evaluate=3)
    with pytest.raises(ValueError, match="dpo_train.*ref_rejected"):
        dpo_train(model, chosen, rejected, rc, torch.tensor([0.0, float("nan")]), **kw)


def test_upcast_log_softmax_upcasts_half_precision_only():
    from mmbook.preference import upcast_log_softmax

    logits = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    for dtype, want in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float32, torch.float32), (torch.float64, torch.float64)):
        out = upcast_log_softmax(logits.to(dtype))
        assert out.dtype == want
        torch.testing.assert_close(out.double(), torch.log_softmax(logits.to(dtype).double(), -1), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="upcast_log_softmax.*logits"):
        upcast_log_softmax(torch.tensor([1, 2]))


def test_policy_optimizer_is_adamw_with_a_warmup_then_constant_rate():
    from mmbook.preference import policy_optimizer

    w = torch.nn.Parameter(torch.zeros(3))
    opt, sched = policy_optimizer([w], 1e-3, steps=20, warmup=4)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0.0
    rates = []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])


def test_policy_optimizer_rejects_bad_input():
    from mmbook.preference import policy_optimizer

    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="policy_optimizer.*lr"):
        policy_optimizer([w], 0.0, steps=10)
    with pytest.raises(ValueError, match="policy_optimizer.*warmup"):
        policy_optimizer([w], 1e-3, steps=10, warmup=0)
    with pytest.raises(ValueError, match="policy_optimizer.*params"):
        policy_optimizer([], 1e-3, steps=10)


def test_ranked_pairs_pairs_right_with_wrong_within_each_prompt():
    from mmbook.preference import ranked_pairs

    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    chosen, rejected = ranked_pairs(rewards)
    assert chosen.tolist() == [0, 2, 4] and rejected.tolist() == [1, 3, 7]
    assert chosen.dtype == torch.long and bool((rewards.flatten()[chosen] == 1).all())
    assert bool((rewards.flatten()[rejected] == 0).all())
    assert (chosen // 4).tolist() == (rejected // 4).tolist()  # never across prompts


def test_ranked_pairs_rejects_bad_input():
    from mmbook.preference import ranked_pairs

    with pytest.raises(ValueError, match="ranked_pairs.*0 or 1"):
        ranked_pairs(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="ranked_pairs.*rewards"):
        ranked_pairs(torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="ranked_pairs.*rewards"):
        ranked_pairs(torch.tensor([[1, 0]]))
