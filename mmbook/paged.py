"""A paged KV cache (vLLM's PagedAttention) and continuous batching of ragged prompts over a :class:`Decoder`.

A contiguous KV cache reserves ``max_len`` positions per sequence up front; sequences of unknown length waste most
of it. A **paged** cache cuts memory into fixed-size *blocks* of ``block_size`` positions, hands them out as a
sequence grows, and keeps per sequence a **block table**: the list of its blocks, in order. Position ``t`` of a
sequence lives in block ``table[t // block_size]`` at offset ``t % block_size``. Attention gathers the blocks
through the table; the result is the same as with a contiguous cache (only where the numbers sit has changed).

**Continuous batching** (Orca) runs one forward pass per step over every sequence in flight, each contributing its
own number of new tokens (a whole prompt when it joins, one token per step after); a finished sequence frees its
blocks and a waiting one takes its place at once. Each sequence has its own positions, and masks keep it from
seeing the others' keys and padding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mmbook.attention import scaled_dot_product_attention
from mmbook.checks import (
    check_bool,
    check_float_tensor,
    check_ids,
    check_instance,
    check_int,
    check_int_tensor,
    positive_int,
)
from mmbook.decoder import Decoder
from mmbook.gqa import repeat_kv

__all__ = ["BatchResult", "PagedKVCache", "continuous_batching_generate", "paged_attention", "paged_forward"]


class PagedKVCache:
    """Keys and values of many sequences in ``num_blocks`` blocks of ``block_size`` positions, per layer.

    ``k_blocks`` and ``v_blocks`` ``(n_layer, num_blocks, n_kv_head, block_size, head_dim)``; ``block_tables``
    maps a sequence id to its list of block indices; ``lengths`` to its number of cached positions. Blocks are
    taken from a free list (lowest index first) by :meth:`reserve` and returned by :meth:`free`.
    """

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        fn = "PagedKVCache"
        shape = tuple(positive_int(n, v, fn) for n, v in (("n_layer", n_layer), ("num_blocks", num_blocks),
                                                          ("n_kv_head", n_kv_head), ("block_size", block_size),
                                                          ("head_dim", head_dim)))
        self.block_size = block_size
        self.k_blocks = torch.zeros(shape, dtype=dtype, device=device)
        self.v_blocks = torch.zeros(shape, dtype=dtype, device=device)
        self.free_blocks: list[int] = list(range(num_blocks))
        self.block_tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.k_blocks.shape[1]

    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def _seq(self, seq_id: object, fn: str) -> int:
        seq_id = check_int("seq_id", seq_id, fn, 0)
        if seq_id not in self.lengths:
            raise KeyError(f"{fn}: no sequence {seq_id} in the cache (known: {sorted(self.lengths)})")
        return seq_id

    def add_sequence(self, seq_id: int) -> None:
        """Register an empty sequence (no block is taken until :meth:`reserve`)."""
        seq_id = check_int("seq_id", seq_id, "PagedKVCache.add_sequence", 0)
        if seq_id in self.lengths:
            raise ValueError(f"PagedKVCache.add_sequence: sequence {seq_id} is already in the cache")
        self.block_tables[seq_id], self.lengths[seq_id] = [], 0

    def reserve(self, seq_id: int, n_new: int) -> torch.Tensor:
        """Make room for ``n_new`` more positions of ``seq_id``; returns their flat slots ``block * block_size +
        offset`` ``(n_new,)``. Raises ``MemoryError`` (taking nothing) when the free blocks do not suffice."""
        fn = "PagedKVCache.reserve"
        seq_id = self._seq(seq_id, fn)
        n_new = check_int("n_new", n_new, fn, 0)
        start = self.lengths[seq_id]
        table = self.block_tables[seq_id]
        need = -(-(start + n_new) // self.block_size) - len(table)
        if need > len(self.free_blocks):
            raise MemoryError(f"{fn}: sequence {seq_id} needs {need} more blocks, {len(self.free_blocks)} are free")
        for _ in range(need):
            table.append(self.free_blocks.pop(0))
        self.lengths[seq_id] = start + n_new
        pos = torch.arange(start, start + n_new)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k`` and ``v`` ``(n_kv_head, n, head_dim)`` at ``slots`` ``(n,)`` of ``layer``. ``slots`` are
        flat indices ``block * block_size + offset`` in ``[0, num_blocks * block_size)`` (as :meth:`reserve` returns
        them); a negative or out-of-range slot raises ``ValueError`` instead of wrapping around."""
        fn = "PagedKVCache.write"
        check_int("layer", layer, fn, 0, self.k_blocks.shape[0] - 1)
        check_ids("slots", slots, fn, self.num_blocks * self.block_size, 1, "(n,)")
        for name, t in (("k", k), ("v", v)):
            check_float_tensor(name, t, fn, 3, "(n_kv_head, n, head_dim)")
            if t.shape != (self.k_blocks.shape[2], slots.numel(), self.k_blocks.shape[4]):
                raise ValueError(f"{fn}: {name} must have shape ({self.k_blocks.shape[2]}, {slots.numel()}, "
                                 f"{self.k_blocks.shape[4]}), got {tuple(t.shape)}")
        blocks, offsets = slots // self.block_size, slots % self.block_size
        self.k_blocks[layer, blocks, :, offsets] = k.transpose(0, 1).to(self.k_blocks.dtype)
        self.v_blocks[layer, blocks, :, offsets] = v.transpose(0, 1).to(self.v_blocks.dtype)

    def block_table_tensor(self, seq_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tables, lengths)``: tables ``(batch, max_blocks)`` padded with block 0, lengths ``(batch,)``."""
        fn = "PagedKVCache.block_table_tensor"
        ids = [self._seq(s, fn) for s in seq_ids]
        width = max(1, max(len(self.block_tables[s]) for s in ids))
        tables = torch.zeros(len(ids), width, dtype=torch.long)
        for row, s in enumerate(ids):
            tables[row, :len(self.block_tables[s])] = torch.tensor(self.block_tables[s], dtype=torch.long)
        return tables, torch.tensor([self.lengths[s] for s in ids])

    def gather(self, layer: int, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The contiguous keys and values of one sequence, each ``(n_kv_head, length, head_dim)``."""
        fn = "PagedKVCache.gather"
        check_int("layer", layer, fn, 0, self.k_blocks.shape[0] - 1)
        seq_id = self._seq(seq_id, fn)
        table, n = self.block_tables[seq_id], self.lengths[seq_id]
        k = self.k_blocks[layer, table].transpose(0, 1).flatten(1, 2)[:, :n]
        v = self.v_blocks[layer, table].transpose(0, 1).flatten(1, 2)[:, :n]
        return k, v

    def free(self, seq_id: int) -> None:
        """Return the sequence's blocks to the free list and forget it."""
        seq_id = self._seq(seq_id, "PagedKVCache.free")
        self.free_blocks = sorted(self.free_blocks + self.block_tables.pop(seq_id))
        del self.lengths[seq_id]


def paged_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, block_tables: torch.Tensor,
                    lengths: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """Causal attention of ragged queries over keys and values stored in blocks.

    ``q`` ``(batch, n_head, T, head_dim)``; ``k_blocks``/``v_blocks`` ``(num_blocks, n_kv_head, block_size,
    head_dim)`` (one layer); ``block_tables`` ``(batch, max_blocks)``; ``lengths`` ``(batch,)`` cached positions
    per sequence (the new keys already written); ``q_positions`` ``(batch, T)`` the position of each query (a
    query sees keys at positions ``<= `` its own and ``< length``; padded queries carry position ``-1`` and get
    zeros). Block indices must lie in ``[0, num_blocks)``, lengths in ``[0, max_blocks * block_size]`` and query
    positions in ``[-1, length)``, all integer tensors: anything else raises ``ValueError``/``TypeError`` naming the
    argument (a negative block index would otherwise wrap around silently). Returns ``(batch, n_head, T, head_dim)``.
    """
    fn = "paged_attention"
    check_float_tensor("q", q, fn, 4, "(batch, n_head, T, head_dim)")
    check_float_tensor("k_blocks", k_blocks, fn, 4, "(num_blocks, n_kv_head, block_size, head_dim)")
    if v_blocks.shape != k_blocks.shape:
        raise ValueError(f"{fn}: v_blocks {tuple(v_blocks.shape)} must have the shape of k_blocks")
    b, h, t, hd = q.shape
    num_blocks, n_kv, block_size = k_blocks.shape[:3]
    block_tables = check_ids("block_tables", block_tables, fn, num_blocks, 2, "(batch, max_blocks)")
    lengths = check_int_tensor("lengths", lengths, fn, 1, "(batch,)")
    q_positions = check_int_tensor("q_positions", q_positions, fn, 2, "(batch, T)")
    if block_tables.shape[0] != b or lengths.shape != (b,) or q_positions.shape != (b, t):
        raise ValueError(f"{fn}: block_tables {tuple(block_tables.shape)}, lengths {tuple(lengths.shape)} and "
                         f"q_positions {tuple(q_positions.shape)} must have batch {b} (and T = {t})")
    if h % n_kv or k_blocks.shape[3] != hd:
        raise ValueError(f"{fn}: q {tuple(q.shape)} does not fit blocks {tuple(k_blocks.shape)}")
    capacity = block_tables.shape[1] * block_size
    if b and (int(lengths.min()) < 0 or int(lengths.max()) > capacity):
        raise ValueError(f"{fn}: lengths must lie in [0, {capacity}] (max_blocks {block_tables.shape[1]} x block_size "
                         f"{block_size}), got {lengths.tolist()}")
    real = q_positions >= 0
    if bool((q_positions < -1).any()) or bool((real & (q_positions >= lengths[:, None])).any()):
        raise ValueError(f"{fn}: q_positions must be -1 (padding) or in [0, length) of their sequence "
                         f"(lengths {lengths.tolist()}), got {q_positions.tolist()}")
    k = k_blocks[block_tables].transpose(1, 2).flatten(2, 3)  # (B, n_kv, max_blocks * bs, hd)
    v = v_blocks[block_tables].transpose(1, 2).flatten(2, 3)
    k_pos = torch.arange(k.shape[2], device=q.device)
    mask = (k_pos[None, None, :] <= q_positions[:, :, None]) & (k_pos[None, None, :] < lengths[:, None, None])
    out = scaled_dot_product_attention(q, repeat_kv(k, h // n_kv), repeat_kv(v, h // n_kv), mask[:, None])[0]
    return torch.where(mask.any(-1)[:, None, :, None], out, torch.zeros_like(out))


def _check_model(model: object, fn: str) -> Decoder:
    check_instance("model", model, fn, Decoder, "a Decoder")
    c = model.config
    if c.num_experts or c.sliding_window is not None:
        raise ValueError(f"{fn}: mixture-of-experts and sliding-window decoders are not supported")
    return model


@torch.no_grad()
def paged_forward(model: Decoder, new_tokens: list[list[int]], seq_ids: list[int], cache: PagedKVCache) -> torch.Tensor:
    """One forward pass of ``model`` over ragged new tokens of several sequences, with their keys in ``cache``.

    ``new_tokens[i]`` (at least one token) continues sequence ``seq_ids[i]`` at its cached length. The batch
    is right-padded to the longest; the masks of :func:`paged_attention` keep padding and other sequences out.
    Returns the logits of each sequence's last new token, ``(batch, vocab_size)``.
    """
    fn = "paged_forward"
    model = _check_model(model, fn)
    check_instance("cache", cache, fn, PagedKVCache, "a PagedKVCache")
    if len(new_tokens) != len(seq_ids) or not new_tokens or any(len(t) < 1 for t in new_tokens):
        raise ValueError(f"{fn}: need one non-empty token list per sequence id, got {len(new_tokens)} lists for "
                         f"{len(seq_ids)} ids")
    for i, toks in enumerate(new_tokens):  # an id outside the vocabulary would fail deep inside nn.Embedding
        check_ids(f"new_tokens[{i}]", torch.as_tensor(toks), fn, model.config.vocab_size, 1, "(n,)")
    device = model.embed_tokens.weight.device
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError(f"{fn}: seq_ids must be distinct, got {seq_ids}")
    need = 0
    for toks, s in zip(new_tokens, seq_ids, strict=True):
        start = cache.lengths[cache._seq(s, fn)]
        need += -(-(start + len(toks)) // cache.block_size) - len(cache.block_tables[s])
    if need > len(cache.free_blocks):  # check all before reserving any, so that a failure takes nothing
        raise MemoryError(f"{fn}: the batch needs {need} more blocks, {len(cache.free_blocks)} are free")
    b, t = len(new_tokens), max(len(x) for x in new_tokens)
    ids = torch.zeros(b, t, dtype=torch.long)
    positions = torch.full((b, t), -1, dtype=torch.long)
    slots = []
    for i, (toks, s) in enumerate(zip(new_tokens, seq_ids, strict=True)):
        start = cache.lengths[cache._seq(s, fn)]
        ids[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        positions[i, :len(toks)] = torch.arange(start, start + len(toks))
        slots.append(cache.reserve(s, len(toks)))
    tables, lengths = cache.block_table_tensor(seq_ids)
    ids, positions, tables, lengths = (x.to(device) for x in (ids, positions, tables, lengths))
    rope_pos = positions.clamp(min=0)
    x = model.embed_tokens(ids)
    if model.embed_positions is not None:
        x = x + model.embed_positions(rope_pos)
    for layer, block in enumerate(model.layers):
        attn = block.self_attn
        q, k, v = attn.project(block.input_layernorm(x), rope_pos)
        for i in range(b):
            n = len(new_tokens[i])
            cache.write(layer, slots[i].to(device), k[i, :, :n], v[i, :, :n])
        heads = paged_attention(q, cache.k_blocks[layer], cache.v_blocks[layer], tables, lengths, positions)
        x = x + attn.o_proj(heads.transpose(1, 2).reshape(b, t, attn.n_head * attn.head_dim))
        x = x + block.mlp(block.post_attention_layernorm(x))
    last = torch.tensor([len(toks) - 1 for toks in new_tokens], device=device)
    return model.lm_head(model.norm(x[torch.arange(b, device=device), last]))


class BatchResult(NamedTuple):
    """What :func:`continuous_batching_generate` returns: the new tokens of each prompt (in prompt order), the
    number of forward passes, the largest number of blocks in use at once, and the schedule: for every step, the
    prompt indices that ran in it (in batch order); with ``return_logits=True``, ``logits``: for each prompt the
    logits its tokens were chosen from, ``(n_new, vocab_size)``."""

    tokens: list[list[int]]
    steps: int
    peak_blocks: int
    schedule: tuple[tuple[int, ...], ...] = ()
    logits: tuple[torch.Tensor, ...] = ()


def continuous_batching_generate(model: Decoder, prompts: list[list[int]], max_new_tokens: int | list[int], *,
                                 max_batch: int = 4, block_size: int = 16, num_blocks: int = 64,
                                 eos_token_id: int | None = None, return_logits: bool = False) -> BatchResult:
    """Greedy generation for many ragged prompts with continuous batching over a :class:`PagedKVCache`.

    At every step, waiting prompts join in order while fewer than ``max_batch`` sequences run *and* the pool can
    hold the joining request's worst case: the blocks for its prompt plus ``max_new_tokens - 1`` generated tokens
    (the last token is returned, never fed back), on top of the worst cases already admitted. So no running
    sequence can run out of blocks mid-run, however the others grow; a request that does not fit waits for one to
    leave. The joining prompt's whole prompt is its new input that step; the others bring one token. One
    :func:`paged_forward` runs, each sequence takes its argmax, and a sequence that reached its ``max_new_tokens``
    (a number, or one per prompt) or produced ``eos_token_id`` leaves and frees its blocks (and its reservation).
    A request whose worst case exceeds the whole pool raises ``MemoryError`` before anything runs.
    ``return_logits=True`` also returns the logits each token was chosen from (to compare with the model alone).
    """
    fn = "continuous_batching_generate"
    model = _check_model(model, fn)
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) and p for p in prompts):
        raise ValueError(f"{fn}: prompts must be a non-empty list of non-empty token lists")
    for i, p in enumerate(prompts):
        for tok in p:
            check_int(f"prompts[{i}] token", tok, fn, 0, model.config.vocab_size - 1)
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{fn}: max_new_tokens must be an int or one per prompt ({len(prompts)}), got {len(limits)}")
    for i, m in enumerate(limits):
        check_int(f"max_new_tokens[{i}]", m, fn, 1)
    max_batch = positive_int("max_batch", max_batch, fn)
    if eos_token_id is not None:
        eos_token_id = check_int("eos_token_id", eos_token_id, fn, 0, model.config.vocab_size - 1)
    return_logits = check_bool("return_logits", return_logits, fn)
    c = model.config
    cache = PagedKVCache(c.n_layer, c.kv_heads, c.attn_head_dim, block_size, num_blocks,
                         model.embed_tokens.weight.dtype, model.embed_tokens.weight.device)
    worst = [-(-(len(p) + m - 1) // cache.block_size) for p, m in zip(prompts, limits, strict=True)]
    for i, w in enumerate(worst):
        if w > cache.num_blocks:
            raise MemoryError(f"{fn}: request {i} (prompt {len(prompts[i])} + max_new_tokens {limits[i]} tokens) "
                              f"needs up to {w} blocks of {cache.block_size}, the pool has {cache.num_blocks}")
    waiting = list(range(len(prompts)))
    running: list[int] = []
    pending: dict[int, list[int]] = {}
    out: list[list[int]] = [[] for _ in prompts]
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    steps = peak = 0
    committed = 0  # worst-case blocks of the running sequences
    schedule: list[tuple[int, ...]] = []
    was = {m: m.training for m in model.modules()}  # restored per module (modes may be mixed)
    model.eval()
    try:
        while waiting or running:
            while waiting and len(running) < max_batch and committed + worst[waiting[0]] <= cache.num_blocks:
                s = waiting.pop(0)
                committed += worst[s]
                cache.add_sequence(s)
                running.append(s)
                pending[s] = list(prompts[s])
            logits = paged_forward(model, [pending[s] for s in running], running, cache)
            schedule.append(tuple(running))
            steps += 1
            peak = max(peak, cache.blocks_in_use())
            nxt = logits.argmax(-1).tolist()
            for j, (s, tok) in enumerate(zip(list(running), nxt, strict=True)):
                out[s].append(tok)
                if return_logits:
                    rows[s].append(logits[j])
                pending[s] = [tok]
                if len(out[s]) >= limits[s] or (eos_token_id is not None and tok == eos_token_id):
                    running.remove(s)
                    cache.free(s)
                    committed -= worst[s]
    finally:
        for m, mode in was.items():
            m.training = mode
    return BatchResult(out, steps, peak, tuple(schedule),
                       tuple(torch.stack(r) for r in rows) if return_logits else ())
