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


def test_sampled_speculative_generate_has_the_target_distribution():
    # A 5-token vocabulary and peaked logits: the first two sampled tokens (25 outcomes) must follow the target's
    # joint p(a) p(b | a) - a chi-square goodness-of-fit test - and must be told apart from the draft's own joint.
    from scipy.stats import chisquare

    mmbook.set_seed(0)
    target = Decoder(DecoderConfig(vocab_size=5, n_layer=2, n_head=2, d_model=16)).double().eval()
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(4.0)  # far from uniform, so the draft (layer 0 only) differs from the target
    draft = layer_skip_draft(target, [0])
    prompt = torch.tensor([[1, 3]])

    def joint(model: Decoder) -> torch.Tensor:
        with torch.no_grad():
            first = torch.softmax(model(prompt).logits[0, -1], -1)
            rows = [torch.softmax(model(torch.cat([prompt, torch.tensor([[a]])], 1)).logits[0, -1], -1)
                    for a in range(5)]
        return first[:, None] * torch.stack(rows)  # (a, b)

    p_target, p_draft = joint(target), joint(draft)
    assert (p_target - p_draft).abs().sum() > 0.2  # the control below has something to detect
    gen = mmbook.torch_generator(11)
    counts = torch.zeros(5, 5)
    n = 200
    for _ in range(n):
        out = speculative_generate(target, draft, prompt, 2, 2, temperature=1.0, generator=gen).tokens[0, 2:4]
        counts[out[0], out[1]] += 1
    keep = p_target.flatten() * n >= 5  # cells with an expected count of at least 5
    observed = counts.flatten()[keep].double()

    def p_value(expected_probs: torch.Tensor) -> float:
        expected = expected_probs.flatten()[keep] * n
        expected = expected * observed.sum() / expected.sum()  # the cells kept carry the same total
        return float(chisquare(observed.numpy(), expected.numpy()).pvalue)

    assert p_value(p_target) > 1e-3  # the rule leaves the target's distribution (a false alarm at 0.1%)
    assert p_value(p_draft) < 1e-6  # ... and the test has the power to reject the draft's
