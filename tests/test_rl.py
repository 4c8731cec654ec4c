"""Unit tests of mmbook.rl (REINFORCE, PPO clip, GRPO, pass@k, majority vote, the parity task)."""

import math

import pytest
import torch

import mmbook
from mmbook.decoder import Decoder, DecoderConfig
from mmbook.preference import token_logprobs
from mmbook.rl import (
    chapter19_recipes,
    chapter19_sft_model,
    decode,
    encode,
    generate_answers,
    group_advantages,
    grpo_loss,
    grpo_train,
    kl_k3,
    majority_vote,
    parity_answer,
    parity_problems,
    parity_prompt,
    parity_reward,
    pass_at_k,
    ppo_clip_loss,
    reinforce_loss,
    sequence_kl,
    train_answers,
)


def test_reinforce_loss_weights_log_probs_by_centred_rewards():
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss = reinforce_loss(logps, torch.tensor([1.0, 0.0]), baseline=0.5)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([-0.25, 0.25]))
    with pytest.raises(ValueError, match="rewards"):
        reinforce_loss(logps, torch.zeros(3))


def test_ppo_clip_loss_clips_only_in_the_direction_of_the_advantage():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss = ppo_clip_loss(new, old, adv, 0.2)
    # terms: min(1.5, 1.2)=1.2; min(0.5, 0.8)=0.5; min(-1.5, -1.2)=-1.5; min(-0.5, -0.8)=-0.8
    assert abs(loss.item() + (1.2 + 0.5 - 1.5 - 0.8) / 4) < 1e-6
    loss.backward()
    assert new.grad[0] == 0 and new.grad[3] == 0 and new.grad[1] != 0 and new.grad[2] != 0
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_clip_loss(new, old, adv, 1.5)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(new, old, adv[:3], 0.2)


def test_ppo_clip_loss_per_token_averages_each_response_over_its_masked_tokens():
    new = torch.log(torch.tensor([[1.5, 0.5, 9.0], [1.5, 0.5, 1.0]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # row 0: min(1.5, 1.2) = 1.2, min(0.5, 0.8) = 0.5 (the padded 9.0 never counts); row 1: -1.5, -0.8, -1.0
    expected = -((1.2 + 0.5) / 2 + (-1.5 - 0.8 - 1.0) / 3) / 2
    assert abs(ppo_clip_loss(new, torch.zeros(2, 3), adv, 0.2, mask=mask).item() - expected) < 1e-6
    with pytest.raises(ValueError, match="ppo_clip_loss: per-token log-probabilities .* need mask"):
        ppo_clip_loss(new, torch.zeros(2, 3), adv, 0.2)
    with pytest.raises(ValueError, match="ppo_clip_loss: mask is for per-token"):
        ppo_clip_loss(new[:, 0], torch.zeros(2), adv, 0.2, mask=mask)
    with pytest.raises(ValueError, match="ppo_clip_loss: every row of mask"):
        ppo_clip_loss(new, torch.zeros(2, 3), adv, 0.2, mask=torch.tensor([[True] * 3, [False] * 3]))
    with pytest.raises(ValueError, match="ppo_clip_loss"):
        ppo_clip_loss(new, torch.zeros(2, 3), adv, 0.2, mask=mask[:, :2])


def test_group_advantages_and_kl_k3():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    a = group_advantages(r)
    assert torch.allclose(a[1], torch.zeros(4)) and torch.allclose(a[0].mean(), torch.tensor(0.0))
    assert torch.allclose(a[0], (r[0] - 0.5) / (r[0].std() + 1e-6))
    assert torch.equal(group_advantages(r, scale=False)[0], r[0] - 0.5)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(3, 1))
    lp, rp = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    k3 = kl_k3(lp, rp)
    assert (k3 >= 0).all() and kl_k3(lp, lp).abs().max() == 0
    with pytest.raises(ValueError, match="ref_logp"):
        kl_k3(lp, rp[:1])


def test_grpo_loss_reduces_to_the_policy_gradient_on_policy():
    mmbook.set_seed(0)
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True] * 4])
    loss, kl = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, 0.2, 0.1)
    assert kl.item() == 0
    loss.backward()
    m = mask.double()
    torch.testing.assert_close(logp.grad, -(adv[:, None] * m / m.sum(1, keepdim=True)) / 3)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.zeros_like(mask), 0.2, 0.1)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, 0.2, -1.0)


def test_pass_at_k_is_the_exact_combinatorial_probability():
    assert pass_at_k(10, 0, 3) == 0.0 and pass_at_k(10, 10, 1) == 1.0 and pass_at_k(5, 3, 3) == 1.0
    assert abs(pass_at_k(10, 3, 1) - 0.3) < 1e-12
    assert abs(pass_at_k(10, 3, 4) - (1 - math.comb(7, 4) / math.comb(10, 4))) < 1e-12
    with pytest.raises(ValueError, match="c"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(5, 2, 6)


def test_majority_vote_breaks_ties_by_first_appearance():
    assert majority_vote(["3", "5", "5", "3", "7"]) == "3"
    assert majority_vote([1, 2, 2]) == 2
    with pytest.raises(ValueError, match="empty"):
        majority_vote([])
    with pytest.raises(TypeError, match="sequence"):
        majority_vote("355")


def test_encode_and_decode_round_trip():
    assert decode(encode("12+3=,")) == "12+3=," and decode(torch.tensor(encode("0110="))) == "0110="
    with pytest.raises(ValueError, match="text"):
        encode("1-2")
    with pytest.raises(TypeError, match="text"):
        encode(5)


def _parity_setup(n_bits=3):
    mmbook.set_seed(0)
    model = Decoder(DecoderConfig(vocab_size=13, max_seq_len=12, n_layer=1, n_head=2, d_model=16))
    probs = parity_problems(n_bits)
    prompts = torch.tensor([encode(parity_prompt(p)) for p in probs])
    answers = torch.tensor([encode(parity_answer(p, scratchpad=True)) for p in probs])
    return model, probs, prompts, answers


def test_training_helpers_run_and_reject_bad_input():
    model, probs, prompts, answers = _parity_setup()
    hist = train_answers(model, prompts, answers, steps=30, batch_size=8, lr=1e-2, seed=1,
                         evaluate=lambda m: 1.0, eval_every=20)
    assert hist.losses[-1] < hist.losses[0] and hist.eval_steps == [20, 30] and hist.evals == [1.0, 1.0]
    texts = generate_answers(model, prompts[:5], 3)
    assert len(texts) == 5 and all(len(t) == 3 for t in texts)
    import copy
    ref = copy.deepcopy(model)
    hist = grpo_train(model, ref, probs, steps=2, n_prompts=4, group=3, n_new=3, lr=1e-4, seed=4,
                      prompt_fn=parity_prompt, reward_fn=parity_reward, evaluate=lambda m: 0.5, eval_every=1)
    assert len(hist["reward"]) == 2 and hist["eval_step"] == [0, 1, 2]
    seqs = torch.cat([prompts[:4], answers[:4]], 1)
    assert sequence_kl(ref, ref, seqs, 3).abs().max() < 1e-6
    with pytest.raises(ValueError, match="answers"):
        train_answers(model, prompts, answers[:3], steps=1, batch_size=2, lr=1e-3)
    with pytest.raises(ValueError, match="group"):
        grpo_train(model, ref, probs, steps=1, n_prompts=2, group=1, n_new=3, lr=1e-4,
                   prompt_fn=parity_prompt, reward_fn=parity_reward)


def test_train_answers_follows_warmup_cosine():
    """The learning rate train_answers hands to AdamW at every step: WarmupCosine's cosine, capped by the warm-up."""
    from mmbook.optim import WarmupCosine

    model, _, prompts, answers = _parity_setup()
    seen = []
    orig_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return orig_step(self, *args, **kwargs)

    torch.optim.AdamW.step = spy
    try:
        train_answers(model, prompts, answers, steps=20, batch_size=4, lr=1e-2, seed=1)
    finally:
        torch.optim.AdamW.step = orig_step
    cosine = WarmupCosine(0, 20)
    assert seen == pytest.approx([1e-2 * min((s + 1) / 2, cosine(s)) for s in range(20)], rel=1e-12)
    assert seen[0] == pytest.approx(5e-3) and seen[-1] < 1e-4  # warm-up, then the cosine towards 0


def test_grpo_train_leaves_the_reference_as_it_was():
    import copy

    model, probs, _, _ = _parity_setup()
    ref = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    grpo_train(model, ref, probs, steps=2, n_prompts=4, group=3, n_new=3, lr=1e-3, seed=4,
               prompt_fn=parity_prompt, reward_fn=parity_reward)
    assert ref.training and all(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the policy did move
    ref.eval().requires_grad_(False)
    grpo_train(model, ref, probs, steps=1, n_prompts=4, group=3, n_new=3, lr=1e-3, seed=4,
               prompt_fn=parity_prompt, reward_fn=parity_reward)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def test_grpo_train_rejects_bad_settings_and_bad_rewards():
    import copy

    model, probs, _, _ = _parity_setup()
    ref = copy.deepcopy(model)
    kw = {"steps": 1, "n_prompts": 4, "group": 3, "n_new": 3, "lr": 1e-3, "prompt_fn": parity_prompt,
          "reward_fn": parity_reward}
    for bad, match in (({"beta": -0.1}, "grpo_train.*beta"), ({"clip_eps": 1.5}, "grpo_train.*clip_eps"),
                       ({"clip_eps": 0.0}, "grpo_train.*clip_eps"), ({"seed": -1}, "grpo_train.*seed")):
        with pytest.raises(ValueError, match=match):
            grpo_train(model, ref, probs, **{**kw, **bad})
    with pytest.raises(TypeError, match="grpo_train.*seed"):
        grpo_train(model, ref, probs, **{**kw, "seed": 1.5})
    with pytest.raises(TypeError, match="grpo_train.*reward_fn must be callable"):
        grpo_train(model, ref, probs, **{**kw, "reward_fn": None})
    with pytest.raises(ValueError, match="grpo_train.*ref must be a separate"):
        grpo_train(model, model, probs, **kw)
    with pytest.raises(TypeError, match="prompt_fn"):
        grpo_train(model, ref, probs, steps=1, n_prompts=4, group=3, n_new=3, lr=1e-3, reward_fn=parity_reward)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    bad_rewards = (
        (lambda t, p: parity_reward(t, p)[:-1], ValueError, r"reward_fn must return one reward per sampled answer, "
                                                            r"shape \(12,\)"),
        (lambda t, p: parity_reward(t, p).long(), TypeError, "reward_fn must return a floating-point tensor"),
        (lambda t, p: [1.0] * len(t), TypeError, "reward_fn must return a floating-point tensor, got list"),
        (lambda t, p: parity_reward(t, p) / 0.0 - 1.0, ValueError, "reward_fn returned NaN or infinite"),
    )
    for reward_fn, err, match in bad_rewards:
        with pytest.raises(err, match="grpo_train: " + match):
            grpo_train(model, ref, probs, **{**kw, "reward_fn": reward_fn})
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # no step was taken


def test_bad_input_of_sampling_and_format_helpers():
    model = Decoder(DecoderConfig(vocab_size=13, max_seq_len=12, n_layer=1, n_head=2, d_model=16))
    ids = torch.tensor([encode("07+35=042")])
    with pytest.raises(ValueError, match="n_response"):
        sequence_kl(model, model, ids, ids.shape[1])
    with pytest.raises(TypeError, match="ids"):
        sequence_kl(model, model, ids.float(), 3)
    with pytest.raises(TypeError, match="prompts"):
        generate_answers(model, ids.float(), 3)
    with pytest.raises(ValueError, match="n_new"):
        generate_answers(model, ids, 0)
    with pytest.raises(ValueError, match="ids"):
        decode([0, 13])
    with pytest.raises(ValueError, match="ids"):
        decode([1.0])
    with pytest.raises(TypeError, match="scratchpad"):
        parity_answer((0, 1), scratchpad=1)


def test_shape_mismatches_name_both_arguments():
    lp = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="ref_logp must have the shape of logp"):
        kl_k3(lp, lp[:, :2])
    with pytest.raises(ValueError, match="mask must have the shape of logp_new"):
        grpo_loss(lp, lp, lp, torch.zeros(4, dtype=torch.float64), torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="rewards must have the shape of logps"):
        reinforce_loss(lp[:, 0], torch.zeros(3, dtype=torch.float64))


def test_float64_models_keep_float64_log_probabilities():
    mmbook.set_seed(0)
    model = Decoder(DecoderConfig(vocab_size=13, max_seq_len=12, n_layer=1, n_head=2, d_model=16)).double()
    ids = torch.tensor([encode("07+35=042")])
    assert token_logprobs(model, ids).dtype == torch.float64
    assert sequence_kl(model, model, ids, 3).dtype == torch.float64


def test_parity_task_formats_rewards_and_rejects_bad_input():
    probs = parity_problems(4)
    assert len(probs) == 16 and len(set(probs)) == 16 and probs[5] == (1, 0, 1, 0)
    assert parity_prompt((0, 1, 1, 0)) == "0110=" and parity_answer((0, 1, 1, 0)) == "0"
    assert parity_answer((0, 1, 1, 0), scratchpad=True) == "0100" and parity_answer((1, 1, 1), True) == "101"
    assert all(parity_answer(p, True)[-1] == parity_answer(p) == str(sum(p) % 2) for p in probs)
    assert parity_reward(["0100", "1", "0", ""], [(0, 1, 1, 0)] * 4).tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="bits"):
        parity_prompt((0, 2))
    with pytest.raises(ValueError, match="bits"):
        parity_answer(())
    with pytest.raises(ValueError, match="n_bits"):
        parity_problems(0)
    with pytest.raises(ValueError, match="problems"):
        parity_reward(["1"], [])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        parity_reward(["1", [0, 1]], [(0, 1)] * 2)  # token lists would otherwise score a silent 0.0
    with pytest.raises(TypeError, match="texts must be a sequence"):
        parity_reward("01", [(0, 1)] * 2)


def test_grpo_train_takes_a_reward_and_a_prompt_function():
    mmbook.set_seed(0)
    model = Decoder(DecoderConfig(vocab_size=13, max_seq_len=12, n_layer=1, n_head=2, d_model=16))
    import copy
    ref = copy.deepcopy(model)
    hist = grpo_train(model, ref, parity_problems(4), steps=2, n_prompts=4, group=3, n_new=4, lr=1e-4, seed=4,
                      prompt_fn=parity_prompt, reward_fn=parity_reward)
    assert len(hist["reward"]) == 2 and all(0.0 <= r <= 1.0 for r in hist["reward"])
    with pytest.raises(ValueError, match="same length"):
        grpo_train(model, ref, [(0, 1), (0, 1, 1)], steps=1, n_prompts=1, group=2, n_new=2, lr=1e-4,
                   prompt_fn=parity_prompt, reward_fn=parity_reward)


def test_noisy_parity_trace_flips_steps_at_rate_p_and_the_answer_follows_the_trace():
    from mmbook.rl import noisy_parity_trace

    bits = (1, 0, 1, 1, 0, 0, 1, 0)
    assert noisy_parity_trace(bits, 0.0, mmbook.torch_generator(0)) == parity_answer(bits, scratchpad=True)
    assert noisy_parity_trace(bits, 1.0, mmbook.torch_generator(0)) == "".join(
        str(int(c) ^ (i % 2 == 0)) for i, c in enumerate(parity_answer(bits, scratchpad=True)))
    gen = mmbook.torch_generator(1)
    traces = [noisy_parity_trace(bits, 0.1, gen) for _ in range(2000)]
    slips = sum(ch != str(int(prev) ^ b) for t in traces for prev, ch, b in zip("0" + t[:-1], t, bits, strict=True))
    rate = slips / (8 * len(traces))
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / (8 * len(traces))) ** 0.5, rate


def test_noisy_parity_trace_rejects_bad_input():
    from mmbook.rl import noisy_parity_trace

    with pytest.raises(ValueError, match="noisy_parity_trace.*bits"):
        noisy_parity_trace((0, 2), 0.1, mmbook.torch_generator(0))
    with pytest.raises(ValueError, match="noisy_parity_trace.*p"):
        noisy_parity_trace((0, 1), 1.5, mmbook.torch_generator(0))
    with pytest.raises(TypeError, match="noisy_parity_trace.*generator"):
        noisy_parity_trace((0, 1), 0.1, 0)


def test_sequence_kl_is_the_sequence_level_kl_by_enumeration():
    """Averaged over every response y with weight pi(y | x), sequence_kl (the per-position full KLs along y) equals
    KL(pi(. | x) || pi_ref(. | x)) over whole responses, computed by enumerating all V^3 of them (chain rule of KL;
    float64 sums of 125 terms: 1e-12). A wrong direction, KL(pi_ref || pi), is far off."""
    import itertools

    mmbook.set_seed(3)
    config = DecoderConfig(vocab_size=5, max_seq_len=8, n_layer=1, n_head=2, d_model=16)
    policy, ref = Decoder(config).double().eval(), Decoder(config).double().eval()
    prefix = [1, 4]
    ys = torch.tensor(list(itertools.product(range(5), repeat=3)))
    ids = torch.cat([torch.tensor(prefix).repeat(len(ys), 1), ys], 1)  # (125, 5): every response after the prefix
    with torch.no_grad():
        lp_pi, lp_ref = (token_logprobs(m, ids)[:, -3:].sum(-1) for m in (policy, ref))  # log pi(y | x), (125,)
        exact = (lp_pi.exp() * (lp_pi - lp_ref)).sum()
        reverse = (lp_ref.exp() * (lp_ref - lp_pi)).sum()
        weighted = (lp_pi.exp() * sequence_kl(policy, ref, ids, 3)).sum()
    assert abs(lp_pi.exp().sum().item() - 1) < 1e-12  # the 125 responses are all there is
    torch.testing.assert_close(weighted, exact, rtol=1e-12, atol=1e-14)
    assert exact.item() > 1e-3 and abs(reverse.item() - exact.item()) > 1e-4


def test_sample_and_grade_groups_the_samples_of_each_prompt():
    from mmbook.rl import sample_and_grade

    model, probs, prompts, _ = _parity_setup()
    seqs, rewards = sample_and_grade(model, prompts[:3], probs[:3], k=4, n_new=3, reward_fn=parity_reward,
                                     generator=mmbook.torch_generator(5))
    assert seqs.shape == (12, prompts.shape[1] + 3) and rewards.shape == (3, 4)
    assert bool((seqs[:, :prompts.shape[1]] == prompts[:3].repeat_interleave(4, 0)).all())
    texts = [decode(r) for r in seqs[:, prompts.shape[1]:]]
    want = parity_reward(texts, [p for p in probs[:3] for _ in range(4)]).view(3, 4)
    assert torch.equal(rewards, want)
    again, _ = sample_and_grade(model, prompts[:3], probs[:3], k=4, n_new=3, reward_fn=parity_reward,
                                generator=mmbook.torch_generator(5))
    assert torch.equal(seqs, again)  # the generator makes it reproducible


def test_sample_and_grade_rejects_bad_input():
    from mmbook.rl import sample_and_grade

    model, probs, prompts, _ = _parity_setup()
    kw = {"k": 2, "n_new": 3, "reward_fn": parity_reward}
    with pytest.raises(ValueError, match="sample_and_grade.*problems"):
        sample_and_grade(model, prompts[:3], probs[:2], **kw)
    with pytest.raises(ValueError, match="sample_and_grade.*k"):
        sample_and_grade(model, prompts[:3], probs[:3], **{**kw, "k": 0})
    with pytest.raises(TypeError, match="sample_and_grade.*reward_fn"):
        sample_and_grade(model, prompts[:3], probs[:3], **{**kw, "reward_fn": None})
    with pytest.raises(TypeError, match="sample_and_grade.*prompts"):
        sample_and_grade(model, prompts[:3].float(), probs[:3], **kw)


# Chapter 19's recipes as the chapter wrote them before they moved into mmbook.rl: the cache keys must not change.
_CH19_PARITY = {"bits": 8, "split_seed": 70, "n_train": 128, "n_layer": 2, "n_head": 4, "d_model": 64,
                "steps": 300, "batch": 64, "lr": 3e-3, "weight_decay": 0.1, "seeds": [71, 72]}
_CH19_SFT = {"task": "noisy parity", "p": 0.1, "copies": 16, "steps": 150, "lr": 3e-3, "seeds": [80, 82],
             "start": {"task": "scratchpad", **_CH19_PARITY}, "version": 2}
_CH19_RL = {"sft": _CH19_SFT, "steps": 100, "optimizer": "policy_optimizer, warm-up 10, clip 1",
            "eval": {"strings": "test_bits[:32]", "samples": 16, "seed": 90, "every": 20}, "version": 4}


def _notebook_code(path):
    import json
    from pathlib import Path

    nb = json.loads((Path(__file__).resolve().parents[1] / path).read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_chapter19_recipes_are_the_chapters_and_both_notebooks_use_them():
    recipes = chapter19_recipes()
    assert recipes == {"parity": _CH19_PARITY, "scratchpad": {"task": "scratchpad", **_CH19_PARITY},
                       "noisy_sft": _CH19_SFT, "rl_common": _CH19_RL}
    recipes["noisy_sft"]["p"] = 0.5  # a fresh copy each call: no shared mutable state
    assert chapter19_recipes()["noisy_sft"]["p"] == 0.1
    chapter = _notebook_code("chapters/19_preferences_and_reasoning.ipynb")
    solutions = _notebook_code("chapters/solutions/19_preferences_and_reasoning_solutions.ipynb")
    assert "chapter19_recipes()" in chapter and "chapter19_sft_model(" in solutions
    for code in (chapter, solutions):  # no re-pasted recipe
        pasted = [lit for lit in ('"task": "noisy parity"', '"split_seed": 70', '"optimizer": "') if lit in code]
        assert not pasted, pasted


def test_chapter19_sft_model_uses_the_recipes_and_rejects_bad_devices(monkeypatch):
    import mmbook.rl as rl

    calls = []
    monkeypatch.setattr(rl, "cached_training", lambda prefix, key, model, train: calls.append((prefix, key)))
    built = chapter19_sft_model("cpu")
    recipes = chapter19_recipes()
    assert calls == [("ch19_parity", recipes["scratchpad"]), ("ch19_noisy_sft", recipes["noisy_sft"])]
    assert sum(p.numel() for p in built.model.parameters()) == 99_200 and not built.model.training
    assert len(built.train_bits) == len(built.test_bits) == 128 and not set(built.train_bits) & set(built.test_bits)
    assert tuple(built.train_prompts.shape) == tuple(built.test_prompts.shape) == (128, 9)
    with pytest.raises(TypeError, match="device"):
        chapter19_sft_model(3)
    with pytest.raises(ValueError, match="device"):
        chapter19_sft_model("no-such-device")
