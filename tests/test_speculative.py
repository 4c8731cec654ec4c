import pytest
import torch

import mmbook
from mmbook.decoder import Decoder, DecoderConfig
from mmbook.speculative import (
    acceptance_probability,
    exact_output_distribution,
    layer_skip_draft,
    residual_distribution,
    speculative_generate,
    speculative_step,
)


def _table(seed, v=3):
    logits = torch.randn(v, v, dtype=torch.float64, generator=mmbook.torch_generator(seed)) * 1.5
    return torch.softmax(logits, -1)


def test_one_step_distribution_is_target():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    out = exact_output_distribution(lambda c: p, lambda c: q, (), k=1, n=1)
    torch.testing.assert_close(torch.tensor([out[(y,)] for y in range(3)], dtype=torch.float64), p,
                               rtol=0, atol=1e-15)
    assert abs(float(acceptance_probability(p, q)) - 0.6) < 1e-15
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))


def test_chained_rounds_equal_target_joint():
    tp, tq = _table(0), _table(1)
    target, draft = (lambda c: tp[c[-1]]), (lambda c: tq[c[-1]])
    out = exact_output_distribution(target, draft, (0,), k=2, n=3)
    for seq, prob in out.items():
        ref, prev = 1.0, 0
        for t in seq:
            ref *= float(tp[prev, t])
            prev = t
        assert abs(prob - ref) < 1e-14
    assert abs(sum(out.values()) - 1) < 1e-14


def test_step_frequencies():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    gen = mmbook.torch_generator(3)
    counts = torch.zeros(3)
    for _ in range(3000):
        x = int(torch.multinomial(q, 1, generator=gen))
        counts[speculative_step(p, q, x, gen)[1]] += 1
    assert (counts / 3000 - p).abs().max() < 0.04


def _decoder():
    mmbook.set_seed(0)
    return Decoder(DecoderConfig(vocab_size=30, n_layer=4, n_head=2, d_model=32)).eval()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_target_greedy(k):
    m = _decoder()
    draft = layer_skip_draft(m, [0, 2])
    idx = torch.tensor([[1, 5, 7]])
    res = speculative_generate(m, draft, idx, 12, k)
    assert torch.equal(res.tokens, m.generate(idx, 12))
    assert res.rounds <= 12 and 0 <= res.accepted <= res.checked <= res.proposed
    # every round ends at its first rejection or accepts all its drafts: rejections = checked - accepted <= rounds,
    # and a round emits its accepted drafts plus one token (residual or bonus), cut at max_new_tokens
    assert res.checked - res.accepted <= res.rounds and res.accepted + res.rounds >= 12
    same = speculative_generate(m, layer_skip_draft(m, [0, 1, 2, 3]), idx, 12, k)
    assert same.accepted == same.checked == same.proposed and torch.equal(same.tokens, res.tokens)


def test_greedy_speculative_equals_target_greedy_with_rejections():
    # a draft that disagrees with the target (the target's weights scaled by 4, the draft keeps layer 0 only): the
    # rejection branch (the target's argmax replaces the draft's token, both caches are cut) must run and still
    # give the target's greedy tokens
    m = _decoder()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    draft = layer_skip_draft(m, [0])
    idx = torch.tensor([[1, 5, 7]])
    for k in (1, 2, 4):
        res = speculative_generate(m, draft, idx, 12, k)
        assert torch.equal(res.tokens, m.generate(idx, 12))
        assert res.accepted < res.checked, (k, res)


def test_draft_calls_counts_the_drafts_forward_passes():
    # a forward hook on the draft counts its calls; the prefill is one call, the rest is draft_calls
    m = _decoder()
    idx = torch.randint(0, 30, (1, 12), generator=mmbook.torch_generator(3))
    for keep, k in (([0, 1, 2, 3], 2), ([0, 2], 3), ([0], 1)):
        draft = layer_skip_draft(m, keep)
        calls = []
        hook = draft.register_forward_hook(lambda mod, inp, out, calls=calls: calls.append(1))
        try:
            res = speculative_generate(m, draft, idx, 4, k)
        finally:
            hook.remove()
        assert res.draft_calls == len(calls) - 1, (keep, k, res, len(calls))
        full_rounds = res.rounds - (res.checked - res.accepted)
        # one catch-up pass after each round whose drafts were all accepted, except the last (the run ends there)
        assert res.proposed + full_rounds - 1 <= res.draft_calls <= res.proposed + full_rounds, res
    same = speculative_generate(m, layer_skip_draft(m, [0, 1, 2, 3]), idx, 4, 2)
    assert (same.rounds, same.proposed, same.draft_calls) == (2, 3, 4)  # 2 + catch-up, then 1: not 3 + 2


def test_layer_skip_draft_shares_weights():
    m = _decoder()
    d = layer_skip_draft(m, [1, 3])
    assert d.config.n_layer == 2 and m.config.n_layer == 4 and d.layers[0] is m.layers[1]
    assert d.lm_head.weight is m.lm_head.weight


def test_sampling_runs():
    m = _decoder()
    res = speculative_generate(m, layer_skip_draft(m, [0]), torch.tensor([[1]]), 8, 3, temperature=1.0,
                               generator=mmbook.torch_generator(4))
    assert res.tokens.shape == (1, 9)


def test_bad_input():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="probability distribution"):
        speculative_step(p, torch.tensor([0.7, 0.7], dtype=torch.float64), 0, mmbook.torch_generator(0))
    with pytest.raises(ValueError, match="probability 0"):
        speculative_step(p, torch.tensor([1.0, 0.0], dtype=torch.float64), 1, mmbook.torch_generator(0))
    with pytest.raises(ValueError, match="draft_token"):
        speculative_step(p, p, 2, mmbook.torch_generator(0))
    m = _decoder()
    with pytest.raises(ValueError, match="keep"):
        layer_skip_draft(m, [2, 1])
    with pytest.raises(ValueError, match="idx"):
        speculative_generate(m, m, torch.tensor([[1], [2]]), 3)
    with pytest.raises(TypeError, match="generator"):
        speculative_generate(m, m, torch.tensor([[1]]), 3, temperature=1.0)
    with pytest.raises(ValueError, match="k"):
        exact_output_distribution(lambda c: p, lambda c: p, (), k=0, n=1)


def test_expected_speedup():
    from mmbook.speculative import expected_speedup

    assert expected_speedup(0.0, 3, 0.1) == pytest.approx(1 / 1.3)
    assert expected_speedup(1.0, 3, 0.0) == 4.0
    assert expected_speedup(0.5, 2, 0.25) == pytest.approx((1 + 0.5 + 0.25) / 1.5)
    assert expected_speedup(0.8, 3, 0.3) == pytest.approx(sum(0.8**j for j in range(4)) / 1.9)
    with pytest.raises(ValueError, match="alpha"):
        expected_speedup(1.2, 2, 0.1)
    with pytest.raises(ValueError, match="k"):
        expected_speedup(0.5, 0, 0.1)
    with pytest.raises(ValueError, match="cost"):
        expected_speedup(0.5, 2, -0.1)


def test_layer_skip_draft_leaves_target_alone():
    m = _decoder()
    d = layer_skip_draft(m, [0, 2])
    d.extra = torch.nn.Linear(2, 2)  # a new submodule of the draft
    assert "extra" not in m._modules and len(m.layers) == 4
    m.train()
    speculative_generate(m, d, torch.tensor([[1, 2]]), 3, 2)
    assert all(mod.training for mod in m.modules())  # restored, shared layers included
    m.eval()
    speculative_generate(m, d, torch.tensor([[1, 2]]), 3, 2)
    assert not any(mod.training for mod in m.modules())
    calls = []
    d.register_forward_hook(lambda *a: calls.append(1))  # a hook on the draft ...
    m(torch.tensor([[1, 2]]))
    assert calls == []  # ... does not fire on the target
    d(torch.tensor([[1, 2]]))
    assert calls == [1]


def test_vocab_mismatch():
    m = _decoder()
    other = Decoder(DecoderConfig(vocab_size=31, n_layer=1, n_head=2, d_model=32)).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(m, other, torch.tensor([[1]]), 3)


def test_sampled_speculative_generate_has_the_target_distribution(monkeypatch):
    # Two one-layer float64 models on a 4-token vocabulary (the target, and a draft with other, sharper weights:
    # acceptance about 0.5), k = 1 and 2 new tokens after a 1-token prompt: when the first draft is accepted the
    # second token is the bonus drawn from the target's next distribution, otherwise it comes from a second round.
    # The sampled pairs must follow the target's joint p(a) p(b | a) - a chi-square goodness-of-fit test over the
    # 16 outcomes - and the same test must reject a wrong rule: the residual replaced by p itself (a rejected draft
    # is then followed by a draw from p, so P(out = y) = min(p, q)(y) + (1 - alpha) p(y), not p(y)), run through
    # speculative_generate. Its exact output distribution, enumerated, says how far it is from the target: with
    # n = 400 draws the expected chi-square statistic is about 130 against 51 needed for p < 1e-6 (a miss has
    # probability about 1e-5); a false alarm of the right rule at p < 1e-3 has probability 1e-3. About 3 s on one
    # core, almost all of it in the models' forward passes (2 or 4 per draw).
    from scipy.stats import chisquare

    import mmbook.speculative as spec

    def model(seed: int, scale: float) -> Decoder:
        mmbook.set_seed(seed)
        m = Decoder(DecoderConfig(vocab_size=4, n_layer=1, n_head=2, d_model=8)).double().eval()
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale)  # far from uniform
        return m

    target, draft = model(0, 3.0), model(10, 8.0)
    prompt = torch.tensor([[1]])

    def dist(m: Decoder):
        def next_dist(ctx: tuple[int, ...]) -> torch.Tensor:
            with torch.no_grad():
                return torch.softmax(m(torch.tensor([list(ctx)])).logits[0, -1], -1)
        return next_dist

    first = dist(target)((1,))
    p_target = torch.stack([first[a] * dist(target)((1, a)) for a in range(4)]).flatten()  # (a, b) -> 4 a + b
    assert 0.3 < float(spec.acceptance_probability(first, dist(draft)((1,)))) < 0.7  # both branches are common

    def sample(n: int, seed: int) -> torch.Tensor:
        gen = mmbook.torch_generator(seed)
        counts = torch.zeros(16, dtype=torch.float64)
        for _ in range(n):
            a, b = speculative_generate(target, draft, prompt, 2, 1, temperature=1.0, generator=gen).tokens[0, 1:]
            counts[4 * int(a) + int(b)] += 1
        return counts

    def p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
        keep = probs * counts.sum() >= 5  # cells with an expected count of at least 5
        observed = counts[keep]
        expected = probs[keep] * observed.sum() / probs[keep].sum()  # the cells kept carry the same total
        return float(chisquare(observed.numpy(), expected.numpy()).pvalue)

    n = 400
    assert p_value(sample(n, 11), p_target) > 1e-3  # the rule leaves the target's distribution
    with monkeypatch.context() as mp:
        mp.setattr(spec, "residual_distribution", lambda p, q: p)  # the wrong rule
        wrong = spec.exact_output_distribution(dist(target), dist(draft), (1,), k=1, n=2)
        counts_wrong = sample(n, 12)
    p_wrong = torch.tensor([wrong.get((a, b), 0.0) for a in range(4) for b in range(4)], dtype=torch.float64)
    assert abs(float(p_wrong.sum()) - 1) < 1e-12 and (p_wrong - p_target).abs().sum() > 0.2
    assert p_value(counts_wrong, p_wrong) > 1e-3  # the wrong rule samples what its enumeration says ...
    assert p_value(counts_wrong, p_target) < 1e-6  # ... and the test rejects it
