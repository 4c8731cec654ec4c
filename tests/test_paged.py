import pytest
import torch

import mmbook
from mmbook.decoder import Decoder, DecoderConfig
from mmbook.paged import PagedKVCache, continuous_batching_generate, paged_attention, paged_forward


def _model(**kw):
    mmbook.set_seed(0)
    cfg = dict(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)
    return Decoder(DecoderConfig(**{**cfg, **kw})).double().eval()


def test_block_table_and_free():
    c = PagedKVCache(1, 1, 2, block_size=4, num_blocks=3)
    c.add_sequence(7)
    slots = c.reserve(7, 6)
    assert c.block_tables[7] == [0, 1] and slots.tolist() == [0, 1, 2, 3, 4, 5]
    c.add_sequence(8)
    assert c.reserve(8, 1).tolist() == [8]
    with pytest.raises(MemoryError):
        c.reserve(7, 3)
    assert c.lengths[7] == 6  # nothing taken by the failed call
    c.free(7)
    assert c.free_blocks == [0, 1] and c.blocks_in_use() == 1


def test_paged_forward_equals_contiguous_cache():
    m = _model()
    ids = torch.randint(0, 40, (1, 11), generator=mmbook.torch_generator(1))
    ref = m(ids).logits[0]
    cache = PagedKVCache(2, 2, 8, block_size=4, num_blocks=8, dtype=torch.float64)
    cache.add_sequence(0)
    out = [paged_forward(m, [ids[0, :5].tolist()], [0], cache)[0]]
    for t in range(5, 11):
        out.append(paged_forward(m, [[int(ids[0, t])]], [0], cache)[0])
    torch.testing.assert_close(torch.stack(out), ref[4:], rtol=0, atol=1e-10)
    k, _ = cache.gather(1, 0)
    _, past = m(ids, use_cache=True)[:3:2]
    torch.testing.assert_close(k, past[1][0][0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kw", [{}, {"positional": "learned"}, {"qk_norm": True}])
def test_continuous_batching_same_tokens_as_alone(kw):
    m = _model(**kw)
    gen = mmbook.torch_generator(2)
    prompts = [torch.randint(0, 40, (n,), generator=gen).tolist() for n in (3, 9, 1, 6, 4)]
    limits = [5, 2, 7, 3, 4]
    res = continuous_batching_generate(m, prompts, limits, max_batch=2, block_size=4, num_blocks=16,
                                       return_logits=True)
    for p, n, got, logits in zip(prompts, limits, res.tokens, res.logits, strict=True):
        full = m.generate(torch.tensor([p]), n)
        assert got == full[0, len(p):].tolist()
        # the logits each token was chosen from: the model alone's at the same positions (float64)
        with torch.no_grad():
            torch.testing.assert_close(logits, m(full[:, :-1]).logits[0, len(p) - 1:], rtol=0, atol=1e-10)
    assert res.steps < sum(limits)
    assert continuous_batching_generate(m, prompts, limits, max_batch=2, block_size=4, num_blocks=16).logits == ()


def test_bad_input():
    m = _model()
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(1, 1, 2, block_size=0, num_blocks=3)
    c = PagedKVCache(2, 2, 8, 4, 4, dtype=torch.float64)
    with pytest.raises(KeyError, match="no sequence 3"):
        c.reserve(3, 1)
    with pytest.raises(ValueError, match="one non-empty token list"):
        paged_forward(m, [[]], [0], c)
    with pytest.raises(ValueError, match="prompts"):
        continuous_batching_generate(m, [], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        continuous_batching_generate(m, [[1], [2]], [3])
    with pytest.raises(ValueError, match="token"):
        continuous_batching_generate(m, [[1, 99]], 3)
    with pytest.raises(TypeError, match="model"):
        continuous_batching_generate("gpt", [[1]], 3)
    with pytest.raises(TypeError, match="return_logits"):
        continuous_batching_generate(m, [[1]], 3, return_logits=1)


def test_schedule_staggered_and_admission_by_free_blocks():
    m = _model()
    gen = mmbook.torch_generator(5)
    prompts = [torch.randint(0, 40, (n,), generator=gen).tolist() for n in (3, 5, 2, 4)]
    limits = [2, 5, 3, 2]
    res = continuous_batching_generate(m, prompts, limits, max_batch=2, block_size=4, num_blocks=16)
    assert len(res.schedule) == res.steps and all(len(s) <= 2 for s in res.schedule)
    assert res.schedule[0] == (0, 1) and res.schedule[2] == (1, 2)  # prompt 2 joins the step after 0 finished
    for p, n, got in zip(prompts, limits, res.tokens, strict=True):
        assert got == m.generate(torch.tensor([p]), n)[0, len(p):].tolist()
    # a pool of 3 blocks of 4: prompt 1 (5 tokens, 2 blocks + 1 spare for prompt 0) waits instead of failing
    small = continuous_batching_generate(m, prompts[:2], limits[:2], max_batch=2, block_size=4, num_blocks=3)
    assert small.schedule[0] == (0,) and 1 in small.schedule[-1] and small.tokens == res.tokens[:2]
    with pytest.raises(MemoryError, match="pool"):
        continuous_batching_generate(m, [[1] * 9], 2, block_size=4, num_blocks=2)
    with pytest.raises(ValueError, match="eos_token_id"):
        continuous_batching_generate(m, [[1]], 2, eos_token_id=-1)


def test_paged_forward_failure_takes_nothing():
    m = _model()
    cache = PagedKVCache(2, 2, 8, block_size=4, num_blocks=2, dtype=torch.float64)
    cache.add_sequence(0)
    cache.add_sequence(1)
    with pytest.raises(MemoryError):
        paged_forward(m, [[1, 2, 3], [1] * 5], [0, 1], cache)
    assert cache.free_blocks == [0, 1] and cache.lengths == {0: 0, 1: 0}
    with pytest.raises(ValueError, match="distinct"):
        paged_forward(m, [[1], [2]], [0, 0], cache)
    for bad in (40, -1):  # a token id outside [0, vocab_size): named, and nothing is reserved
        with pytest.raises(ValueError, match=r"new_tokens\[1\] must lie in \[0, 40\)"):
            paged_forward(m, [[1], [2, bad]], [0, 1], cache)
        assert cache.free_blocks == [0, 1] and cache.lengths == {0: 0, 1: 0}


def test_continuous_batching_restores_mixed_modes():
    m = _model()
    m.train()
    m.layers[0].eval()  # mixed per-module modes survive the call
    continuous_batching_generate(m, [[1, 2]], 2)
    assert m.training and not m.layers[0].training and m.layers[1].training


def test_pool_too_small_for_all_at_once_finishes_every_request():
    # 3-token prompts with 8 new tokens need up to ceil(10 / 4) = 3 blocks of 4 each; a pool of 4 blocks holds one
    # such request's worst case at a time. Admitting by the prompt's blocks alone would let two in (1 block each)
    # and run out of blocks when they grow; admission by the worst case serialises them and never fails.
    m = _model()
    gen = mmbook.torch_generator(7)
    prompts = [torch.randint(0, 40, (3,), generator=gen).tolist() for _ in range(3)]
    res = continuous_batching_generate(m, prompts, 8, max_batch=3, block_size=4, num_blocks=4)
    assert all(len(s) == 1 for s in res.schedule) and res.peak_blocks <= 4
    for p, got in zip(prompts, res.tokens, strict=True):
        assert got == m.generate(torch.tensor([p]), 8)[0, len(p):].tolist()
    # a bigger pool runs them together, with the same tokens
    big = continuous_batching_generate(m, prompts, 8, max_batch=3, block_size=4, num_blocks=9)
    assert big.schedule[0] == (0, 1, 2) and big.tokens == res.tokens
    # mixed sizes: a small request runs beside the big one when both worst cases fit
    mixed = continuous_batching_generate(m, prompts, [8, 2, 8], max_batch=3, block_size=4, num_blocks=4)
    assert mixed.schedule[0] == (0, 1) and mixed.tokens[1] == res.tokens[1][:2]


def test_request_that_can_never_fit_raises_before_running():
    m = _model()
    with pytest.raises(MemoryError, match=r"request 1 \(prompt 3 \+ max_new_tokens 14 tokens\) needs up to 4 blocks"):
        continuous_batching_generate(m, [[1, 2], [1, 2, 3]], [2, 14], block_size=4, num_blocks=3)


def test_paged_attention_rejects_bad_tables_lengths_and_positions():
    q = torch.zeros(1, 4, 1, 8, dtype=torch.float64)
    kb = torch.zeros(3, 2, 4, 8, dtype=torch.float64)
    tables, lengths, pos = torch.tensor([[0, 2]]), torch.tensor([5]), torch.tensor([[4]])
    assert paged_attention(q, kb, kb, tables, lengths, pos).shape == (1, 4, 1, 8)
    with pytest.raises(ValueError, match=r"block_tables must lie in \[0, 3\), got values in \[-1, 2\]"):
        paged_attention(q, kb, kb, torch.tensor([[-1, 2]]), lengths, pos)
    with pytest.raises(ValueError, match=r"block_tables must lie in \[0, 3\), got values in \[0, 3\]"):
        paged_attention(q, kb, kb, torch.tensor([[0, 3]]), lengths, pos)
    with pytest.raises(TypeError, match="block_tables must be"):
        paged_attention(q, kb, kb, tables.double(), lengths, pos)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 8\].*got \[9\]"):
        paged_attention(q, kb, kb, tables, torch.tensor([9]), pos)
    with pytest.raises(ValueError, match="lengths must lie"):
        paged_attention(q, kb, kb, tables, torch.tensor([-1]), pos)
    with pytest.raises(TypeError, match="lengths must be"):
        paged_attention(q, kb, kb, tables, lengths.float(), pos)
    with pytest.raises(ValueError, match=r"q_positions must be -1 \(padding\) or in \[0, length\).*got \[\[5\]\]"):
        paged_attention(q, kb, kb, tables, lengths, torch.tensor([[5]]))
    with pytest.raises(ValueError, match="q_positions must be -1"):
        paged_attention(q, kb, kb, tables, lengths, torch.tensor([[-2]]))
    with pytest.raises(TypeError, match="q_positions must be"):
        paged_attention(q, kb, kb, tables, lengths, torch.tensor([[4.0]]))
    with pytest.raises(ValueError, match="must have batch"):
        paged_attention(q, kb, kb, tables, torch.tensor([5, 5]), pos)


def test_cache_write_rejects_bad_slots():
    c = PagedKVCache(1, 2, 8, block_size=4, num_blocks=2, dtype=torch.float64)
    k = torch.ones(2, 1, 8, dtype=torch.float64)
    c.write(0, torch.tensor([7]), k, k)
    assert float(c.k_blocks[0, 1, :, 3].sum()) == 16
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 8\), got values in \[-1, -1\]"):
        c.write(0, torch.tensor([-1]), k, k)
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 8\), got values in \[8, 8\]"):
        c.write(0, torch.tensor([8]), k, k)
    with pytest.raises(TypeError, match="slots must be"):
        c.write(0, torch.tensor([1.0]), k, k)
    with pytest.raises(ValueError, match="slots must have shape"):
        c.write(0, torch.tensor([[1]]), k, k)
    with pytest.raises(ValueError, match="layer"):
        c.write(1, torch.tensor([1]), k, k)
