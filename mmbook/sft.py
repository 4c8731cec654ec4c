"""Supervised fine-tuning (SFT): chats as token ids with an assistant-only loss mask, packing, and an instruction set.

An instruction-tuned model is a base model trained further, with the ordinary next-token loss, on conversations
written in its chat template (:mod:`mmbook.chat`). Two details make that work:

* **Assistant-only loss.** Only the tokens the model should learn to *write* - each assistant answer and the
  ``<|im_end|>`` that closes it - carry a target; the system and user text and the template's markup get
  ``-100``, which :func:`torch.nn.functional.cross_entropy` ignores, so they contribute exactly zero gradient.
  :func:`tokenize_chat` returns the ids and that mask; :func:`sft_targets` turns them into targets.
* **Packing.** Conversations are short and of unequal length; padding each to the longest wastes compute.
  :func:`pack_examples` lays several end to end in one row, with a document id per token and positions that
  restart at 0 for each conversation; :func:`packed_forward` runs a :class:`mmbook.decoder.Decoder` with the
  block-diagonal causal mask of :func:`document_mask`, so that no conversation sees another: the result equals
  running each conversation on its own.

The chapter's small model reads bytes: :class:`ChatByteTokenizer` adds the two ChatML tokens ``<|im_start|>``
(256) and ``<|im_end|>`` (257) to the 256 byte values. :func:`instruction_dataset` writes an offline instruction
set from :data:`TASKS` (short word manipulations with checkable answers, every answer in the format
``Answer: ...``), so that whole task types can be held out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.chat import IM_END, IM_START, chatml_prompt
from mmbook.checks import check_bool, check_ids, check_instance, check_int, check_int_tensor, check_number, positive_int
from mmbook.core import python_rng, torch_generator
from mmbook.decoder import Decoder, DecoderOutput
from mmbook.moe import load_balancing_loss
from mmbook.optim import WarmupCosine

__all__ = [
    "BASE_CONFIG",
    "BASE_RECIPE",
    "TASKS",
    "ChatByteTokenizer",
    "PackedBatch",
    "chat_segments",
    "corpus_chat_stream",
    "document_mask",
    "evaluate_instructions",
    "format_ok",
    "instruction_dataset",
    "make_words",
    "numerics_key",
    "pack_examples",
    "packed_forward",
    "packed_hidden",
    "pretrained_chat_base",
    "sft_targets",
    "tokenize_chat",
    "train_sft",
]

_ANSWER = re.compile(r"Answer: [A-Za-z0-9]+( [A-Za-z0-9]+)*")


def _vowelless(w: str) -> str:
    return "".join(c for c in w if c not in "aeiou") or "none"


#: Task type -> (instruction template with ``{w}``, the answer as a function of the word). All answers are
#: written ``Answer: <result>``; the chapter trains on some types and holds others out whole.
TASKS: dict[str, tuple[str, Callable[[str], str]]] = {
    "upper": ("Capitals: {w}", lambda w: w.upper()),
    "first": ("First letter: {w}", lambda w: w[0]),
    "last": ("Last letter: {w}", lambda w: w[-1]),
    "double": ("Twice: {w}", lambda w: f"{w} {w}"),
    "copy": ("Repeat: {w}", lambda w: w),
    "reverse": ("Reverse: {w}", lambda w: w[::-1]),
    "length": ("Length: {w}", lambda w: str(len(w))),
    "vowels": ("No vowels: {w}", _vowelless),
}


class ChatByteTokenizer:
    """Bytes 0-255 plus ``<|im_start|>`` = 256 and ``<|im_end|>`` = 257 (``vocab_size`` 258).

    ``encode(text)`` maps the two marker strings to their ids and everything else to its UTF-8 bytes;
    ``decode(ids)`` inverts it (invalid UTF-8 is replaced, so a model's output always decodes). The marker strings
    become special ids wherever they occur, in user text too: a user who types ``<|im_end|>`` closes their own
    turn (template injection). Real tokenizers encode user content with special tokens switched off.
    """

    im_start_id = 256
    im_end_id = 257
    vocab_size = 258
    _split = re.compile(f"({re.escape(IM_START)}|{re.escape(IM_END)})")

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ChatByteTokenizer.encode: text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece == IM_START:
                ids.append(self.im_start_id)
            elif piece == IM_END:
                ids.append(self.im_end_id)
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out, buf = [], bytearray()
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"ChatByteTokenizer.decode: ids must be ints in [0, {self.vocab_size}), got {i!r}")
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(IM_START if i == self.im_start_id else IM_END)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def chat_segments(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False,
                  default_system: str | None = None) -> list[tuple[str, bool]]:
    """Split the ChatML text of ``messages`` into ``(text, trained)`` pieces; their concatenation is
    :func:`mmbook.chat.chatml_prompt` of the same arguments.

    ``trained`` is True for each assistant message's content followed by its ``<|im_end|>`` (what the model must
    learn to write, including when to stop), False for everything else (system and user turns, role headers,
    the newline after ``<|im_end|>``, the generation prompt). The defaults are those of training data (no
    generation prompt, no implicit system message), unlike :func:`~mmbook.chat.chatml_prompt`, whose defaults
    are those of asking SmolLM2 a question (generation prompt, SmolLM2's default system message).
    """
    fn = "chat_segments"
    text = chatml_prompt(messages, add_generation_prompt, default_system)  # validates the arguments
    segments: list[tuple[str, bool]] = []
    if messages[0]["role"] != "system" and default_system is not None:
        segments.append((f"{IM_START}system\n{default_system}{IM_END}\n", False))
    for m in messages:
        if m["role"] == "assistant":
            segments += [(f"{IM_START}assistant\n", False), (f"{m['content']}{IM_END}", True), ("\n", False)]
        else:
            segments.append((f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n", False))
    if add_generation_prompt:
        segments.append((f"{IM_START}assistant\n", False))
    if "".join(s for s, _ in segments) != text:  # pragma: no cover - a guard on the two functions agreeing
        raise RuntimeError(f"{fn}: the segments do not add up to chatml_prompt's text")
    return segments


def tokenize_chat(messages: Sequence[Mapping[str, str]], encode: Callable[[str], Sequence[int]], *,
                  add_generation_prompt: bool = False,
                  default_system: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(T,)`` int64 of the chat and a mask ``(T,)`` bool, True on the tokens of assistant answers.

    Each piece of :func:`chat_segments` is encoded separately with ``encode`` (text -> ids; it must turn
    ``<|im_start|>`` and ``<|im_end|>`` into their special ids), so the mask follows the pieces exactly. For a
    byte-level BPE tokenizer this equals encoding the whole text unless a piece boundary falls inside a
    pre-tokenizer piece: an answer that begins with two whitespace characters lets the whole text merge the
    template's newline with the first of them. The chapter checks both cases.
    """
    fn = "tokenize_chat"
    if not callable(encode):
        raise TypeError(f"{fn}: encode must be a function text -> ids, got {type(encode).__name__}")
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in chat_segments(messages, add_generation_prompt, default_system):
        piece = list(encode(text))
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in piece):
            raise ValueError(f"{fn}: encode must return non-negative int ids, got {piece[:8]!r} for {text[:30]!r}")
        ids += piece
        mask += [trained] * len(piece)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


def sft_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets for inputs ``ids`` (``(T,)`` or ``(batch, T)``): ``targets[t] = ids[t + 1]`` where
    ``mask[t + 1]`` is True, else ``-100`` (ignored by the loss); the last position is always ``-100``.

    Used as ``model(ids, sft_targets(ids, mask))``: the loss is the mean over answer tokens only.
    """
    fn = "sft_targets"
    check_int_tensor("ids", ids, fn, (1, 2))
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape:
        raise ValueError(f"{fn}: mask must be a bool tensor of the shape of ids {tuple(ids.shape)}, got "
                         f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__} "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else ''}")
    targets = torch.full_like(ids, -100, dtype=torch.long)
    targets[..., :-1] = torch.where(mask[..., 1:], ids[..., 1:].long(), torch.tensor(-100))
    return targets


class PackedBatch(NamedTuple):
    """Rows of packed conversations, each ``(rows, seq_len)``: ``ids`` (padding ``pad_id``), ``targets``
    (``-100`` outside answers, at each conversation's last token and on padding), ``positions`` (restarting at 0
    for each conversation), ``doc_ids`` (0, 1, ... within a row; ``-1`` on padding)."""

    ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor


def pack_examples(examples: Sequence[tuple[torch.Tensor, torch.Tensor]], seq_len: int,
                  pad_id: int = 0) -> PackedBatch:
    """Pack ``(ids, mask)`` pairs from :func:`tokenize_chat`, in order, into rows of ``seq_len`` tokens.

    A conversation that does not fit in the current row starts a new one (conversations are never split); one
    longer than ``seq_len`` is an error. Targets come from :func:`sft_targets` per conversation, so no target
    crosses from one conversation into the next.
    """
    fn = "pack_examples"
    seq_len = positive_int("seq_len", seq_len, fn)
    check_int("pad_id", pad_id, fn, 0)
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence) or not examples:
        raise TypeError(f"{fn}: examples must be a non-empty list of (ids, mask) pairs, got {type(examples).__name__}")
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[]]
    used = 0
    for i, ex in enumerate(examples):
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2):
            raise TypeError(f"{fn}: examples[{i}] must be an (ids, mask) pair")
        ids, mask = ex
        check_int_tensor(f"examples[{i}] ids", ids, fn, 1, "(T,)")
        try:
            targets = sft_targets(ids, mask)
        except ValueError as err:
            raise ValueError(f"{fn}: examples[{i}]: {err}") from None
        n = ids.numel()
        if n == 0 or n > seq_len:
            raise ValueError(f"{fn}: examples[{i}] has {n} tokens; each must have 1 to seq_len={seq_len}")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids.long(), targets))
        used += n
    out = PackedBatch(*(torch.full((len(rows), seq_len), v, dtype=torch.long) for v in (pad_id, -100, 0, -1)))
    for r, row in enumerate(rows):
        start = 0
        for d, (ids, targets) in enumerate(row):
            n = ids.numel()
            out.ids[r, start:start + n] = ids
            out.targets[r, start:start + n] = targets
            out.positions[r, start:start + n] = torch.arange(n)
            out.doc_ids[r, start:start + n] = d
            start += n
    return out


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask ``(batch, T, T)`` bool of ``doc_ids`` ``(batch, T)``: query ``i`` may
    attend to key ``j`` when ``j <= i`` and both tokens belong to the same document."""
    check_int_tensor("doc_ids", doc_ids, "document_mask", 2, "(batch, T)")
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return causal[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])


def _check_packed(model: Decoder, ids: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor,
                  fn: str) -> None:
    check_instance("model", model, fn, Decoder, "a mmbook Decoder")
    c = model.config
    if c.positional != "rope" or c.sliding_window is not None:
        raise ValueError(f"{fn}: needs a RoPE decoder without a sliding window, got positional={c.positional!r}, "
                         f"sliding_window={c.sliding_window}")
    check_ids("ids", ids, fn, c.vocab_size, 2, "(batch, T)")
    for name, t in (("positions", positions), ("doc_ids", doc_ids)):
        check_int_tensor(name, t, fn, 2, "(batch, T)")
        if t.shape != ids.shape:
            raise ValueError(f"{fn}: {name} must have the shape of ids {tuple(ids.shape)}, got {tuple(t.shape)}")
    if int(positions.min()) < 0:
        raise ValueError(f"{fn}: positions must be >= 0, got a minimum of {int(positions.min())}")


def _blocks(model: Decoder, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, start: int,
            stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Blocks ``start`` to ``stop`` of ``model`` (their own :meth:`mmbook.decoder.DecoderBlock.forward`) at explicit
    positions and with the mask ``allowed``; returns the residual stream and the routers' logits (MoE layers)."""
    router_logits: list[torch.Tensor] = []
    for block in model.layers[start:stop]:
        x, _, routed = block(x, positions=positions, attn_mask=allowed)
        if routed is not None:
            router_logits.append(routed)
    return x, router_logits


def packed_hidden(model: Decoder, ids: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor,
                  n_layers: int) -> torch.Tensor:
    """The residual stream ``(batch, T, d_model)`` of packed rows after the first ``n_layers`` blocks (the input
    :func:`packed_forward` takes with ``start_layer=n_layers``). When those blocks are frozen - LoRA on the top
    layers only - it is a fixed function of the data: compute it once, outside the training loop."""
    fn = "packed_hidden"
    _check_packed(model, ids, positions, doc_ids, fn)
    n_layers = check_int("n_layers", n_layers, fn, 0, model.config.n_layer)
    return _blocks(model, model.embed_tokens(ids), positions, document_mask(doc_ids)[:, None], 0, n_layers)[0]


def packed_forward(model: Decoder, ids: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor,
                   targets: torch.Tensor | None = None, *, start_layer: int = 0,
                   hidden: torch.Tensor | None = None, all_logits: bool = True) -> DecoderOutput:
    """Run ``model`` on packed rows ``ids`` ``(batch, T)`` with :func:`document_mask` and per-token ``positions``.

    The same weights and layers as :meth:`mmbook.decoder.Decoder.forward`; only attention differs: RoPE rotates
    each token to its own position within its conversation, and the scores are masked block-diagonally (a
    boolean mask, passed to the attention kernel the model's config names: ``kernel="mmbook"``, the default, is
    the book's own :func:`mmbook.attention.scaled_dot_product_attention`, ``"torch"`` PyTorch's). Returns
    logits ``(batch, T, vocab_size)`` and the mean loss over the targets that are not ``-100``. With
    ``start_layer = k`` and ``hidden`` from :func:`packed_hidden` (``k`` layers), the first ``k`` blocks are
    skipped. With ``all_logits=False`` (and
    ``targets``) the output layer runs only where a target exists and ``logits`` is ``(n_targets, vocab_size)``:
    with a 49k-token vocabulary and short answers that is most of the cost saved. Each block is the model's own
    :class:`mmbook.decoder.DecoderBlock` (called with the positions and the mask), so a mixture-of-experts model
    returns its ``router_logits`` as :meth:`~mmbook.decoder.Decoder.forward` does, for the load-balancing loss.
    Needs ``positional="rope"`` and no sliding window.
    """
    fn = "packed_forward"
    _check_packed(model, ids, positions, doc_ids, fn)
    c = model.config
    start_layer = check_int("start_layer", start_layer, fn, 0, c.n_layer)
    b, t = ids.shape
    if start_layer == 0:
        x = model.embed_tokens(ids)
    else:
        check_instance("hidden", hidden, fn, torch.Tensor, "the tensor packed_hidden returns")
        if hidden.shape != (b, t, c.d_model):
            raise ValueError(f"{fn}: hidden must have shape {(b, t, c.d_model)}, got {tuple(hidden.shape)}")
        x = hidden
    check_bool("all_logits", all_logits, fn)
    if targets is not None:
        check_ids("targets", targets, fn, c.vocab_size, 2, "(batch, T)", allow=(-100,))
        if targets.shape != ids.shape:
            raise ValueError(f"{fn}: targets must have the shape of ids {tuple(ids.shape)}, got {tuple(targets.shape)}")
    elif not all_logits:
        raise ValueError(f"{fn}: all_logits=False needs targets")
    x, routed = _blocks(model, x, positions, document_mask(doc_ids)[:, None], start_layer, c.n_layer)
    router_logits = routed or None
    if not all_logits:
        keep = targets != -100
        if not bool(keep.any()):
            raise ValueError(f"{fn}: targets has no position that is not -100 (all_logits=False needs one)")
        logits = model.lm_head(model.norm(x[keep]))  # (n_targets, vocab_size)
        return DecoderOutput(logits, F.cross_entropy(logits, targets[keep]), None, router_logits)
    logits = model.lm_head(model.norm(x))
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.reshape(b * t, -1), targets.reshape(-1), ignore_index=-100)
    return DecoderOutput(logits, loss, None, router_logits)


def make_words(n: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[str]:
    """``n`` distinct random lowercase words of ``min_len`` to ``max_len`` letters (a seeded Python generator)."""
    fn = "make_words"
    n = positive_int("n", n, fn)
    min_len = positive_int("min_len", min_len, fn)
    max_len = check_int("max_len", max_len, fn, min_len)
    if n > 26 ** min_len:
        raise ValueError(f"{fn}: cannot draw {n} distinct words of {min_len}+ letters from 26 letters")
    rng = python_rng(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        length = rng.randint(min_len, max_len)
        words["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))] = None
    return list(words)


def instruction_dataset(tasks: Sequence[str], words: Sequence[str]) -> list[list[dict[str, str]]]:
    """One conversation per (task type, word): a user instruction from :data:`TASKS` and the assistant's
    ``Answer: <result>``, in the order task by task, word by word."""
    fn = "instruction_dataset"
    if isinstance(tasks, str) or not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"{fn}: tasks must be a non-empty list of names from {sorted(TASKS)}, got {tasks!r}")
    if isinstance(words, str) or not words or any(not (isinstance(w, str) and w.isalpha() and w.islower())
                                                  for w in words):
        raise ValueError(f"{fn}: words must be a non-empty list of lowercase words, got {words!r:.80}")
    out = []
    for task in tasks:
        template, answer = TASKS[task]
        for w in words:
            out.append([{"role": "user", "content": template.format(w=w)},
                        {"role": "assistant", "content": f"Answer: {answer(w)}"}])
    return out


def format_ok(response: str) -> bool:
    """Whether a generated ``response`` (the text up to and including ``<|im_end|>``) has the dataset's format:
    ``Answer: `` then words of letters and digits separated by single spaces, closed by ``<|im_end|>``."""
    if not isinstance(response, str):
        raise TypeError(f"format_ok: response must be a str, got {type(response).__name__}")
    return response.endswith(IM_END) and _ANSWER.fullmatch(response[: -len(IM_END)]) is not None


@torch.no_grad()
def evaluate_instructions(model: nn.Module, tokenizer: ChatByteTokenizer,
                          conversations: Sequence[Sequence[Mapping[str, str]]],
                          max_new_tokens: int = 24) -> tuple[float, float, list[str]]:
    """Greedy answers of ``model`` to the user turn of each conversation; returns ``(exact_match, format_rate,
    responses)``.

    The prompt is the chat up to the generation prompt; generation stops at ``<|im_end|>``. A response is an
    exact match when it equals the reference answer followed by ``<|im_end|>``; :func:`format_ok` decides the
    format. Prompts of equal length are decoded as one batch.
    """
    fn = "evaluate_instructions"
    check_instance("model", model, fn, Decoder, "a mmbook Decoder")
    check_instance("tokenizer", tokenizer, fn, ChatByteTokenizer, "a ChatByteTokenizer")
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens, fn)
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) or not conversations:
        raise ValueError(f"{fn}: conversations must be a non-empty list of chats")
    for i, conv in enumerate(conversations):
        if (isinstance(conv, (str, bytes)) or not isinstance(conv, Sequence) or len(conv) < 2
                or not isinstance(conv[-1], Mapping) or conv[-1].get("role") != "assistant"):
            raise ValueError(f"{fn}: conversations[{i}] must be a chat of two or more messages ending in the "
                             "assistant's reference answer")
    device = model.embed_tokens.weight.device
    prompts = [tokenize_chat(conv[:-1], tokenizer.encode, add_generation_prompt=True)[0] for conv in conversations]
    responses: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.numel(), []).append(i)
    for length in sorted(by_length):
        group = by_length[length]
        idx = torch.stack([prompts[i] for i in group]).to(device)
        out = model.generate(idx, max_new_tokens, eos_token_id=tokenizer.im_end_id)[:, length:].cpu().tolist()
        for i, row in zip(group, out, strict=True):
            if tokenizer.im_end_id in row:
                row = row[: row.index(tokenizer.im_end_id) + 1]
            responses[i] = tokenizer.decode(row)
    exact = sum(r == conv[-1]["content"] + IM_END for r, conv in zip(responses, conversations, strict=True))
    fmt = sum(format_ok(r) for r in responses)
    return exact / len(responses), fmt / len(responses), responses


def train_sft(model: nn.Module, batch: PackedBatch, *, steps: int, batch_size: int, lr: float, warmup: int = 10,
              weight_decay: float = 0.0, clip: float = 1.0, seed: int = 0, start_layer: int = 0,
              callback: Callable[[int, nn.Module], None] | None = None, every: int = 1,
              aux_loss_weight: float = 0.01) -> list[float]:
    """Fine-tune the trainable parameters of ``model`` for ``steps`` AdamW steps on rows of a :class:`PackedBatch`.

    Each step draws ``batch_size`` rows (a seeded generator, :func:`mmbook.torch_generator`) and minimises the
    assistant-only loss of :func:`packed_forward`. Only parameters with ``requires_grad`` are optimised (all of
    them for full fine-tuning, the adapters after :func:`mmbook.lora.apply_lora`). The learning rate follows
    :class:`mmbook.optim.WarmupCosine`: ``warmup`` steps of linear warm-up, then a cosine towards ``0.1 lr`` at
    step ``steps``. With ``start_layer = k`` the first ``k`` blocks must be frozen: their output (:func:`packed_hidden`)
    is computed once for all rows and the steps run the rest. ``callback(step, model)``, if given, is called in eval
    mode after every ``every``-th step (``step`` counts from 1), e.g. to record a validation loss along the way.
    A mixture-of-experts model also minimises ``aux_loss_weight`` times :func:`mmbook.moe.load_balancing_loss`
    of its routers (as in pretraining; Mixtral and Qwen3-MoE use 0.01 or less). Returns the answer loss of every
    step (without the auxiliary term); the model is left in eval mode.
    """
    fn = "train_sft"
    check_instance("model", model, fn, Decoder, "a mmbook Decoder")
    check_instance("batch", batch, fn, PackedBatch, "a PackedBatch")
    steps = positive_int("steps", steps, fn)
    batch_size = positive_int("batch_size", batch_size, fn)
    lr = check_number("lr", lr, fn, 0.0, low_open=True)
    warmup = positive_int("warmup", warmup, fn)
    weight_decay = check_number("weight_decay", weight_decay, fn, 0.0)
    clip = check_number("clip", clip, fn, 0.0, low_open=True)
    if callback is not None and not callable(callback):
        raise TypeError(f"{fn}: callback must be a function callback(step, model), got {type(callback).__name__}")
    every = positive_int("every", every, fn)
    aux_loss_weight = check_number("aux_loss_weight", aux_loss_weight, fn, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{fn}: model has no trainable parameters")
    start_layer = check_int("start_layer", start_layer, fn, 0, model.config.n_layer)
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and
              (n.startswith("embed_tokens") or any(n.startswith(f"layers.{i}.") for i in range(start_layer)))]
    if start_layer and frozen:
        raise ValueError(f"{fn}: start_layer={start_layer} needs the blocks below it frozen, but {frozen[0]} trains")
    if warmup >= steps:
        raise ValueError(f"{fn}: warmup must be smaller than steps, got warmup={warmup}, steps={steps}")
    device = model.embed_tokens.weight.device
    hidden = None
    if start_layer:
        with torch.no_grad():
            hidden = torch.cat([packed_hidden(model, *(t[i:i + 16].to(device) for t in (batch.ids, batch.positions,
                                                                                        batch.doc_ids)), start_layer)
                                for i in range(0, batch.ids.shape[0], 16)])
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, steps, min_factor=0.1))
    generator = torch_generator(seed)
    rows = batch.ids.shape[0]
    losses = []
    model.train()
    for step in range(1, steps + 1):
        pick = torch.randint(rows, (batch_size,), generator=generator)
        ids, targets, positions, doc_ids = (t[pick].to(device) for t in batch)
        h = None if hidden is None else hidden[pick.to(device)]
        out = packed_forward(model, ids, positions, doc_ids, targets, start_layer=start_layer, hidden=h,
                             all_logits=False)
        loss = out.loss
        objective = loss
        if out.router_logits is not None and aux_loss_weight > 0:
            objective = loss + aux_loss_weight * load_balancing_loss(out.router_logits, model.config.top_k)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if callback is not None and step % every == 0:
            model.eval()
            callback(step, model)
            model.train()
    model.eval()
    return losses


def corpus_chat_stream(tokenizer: ChatByteTokenizer | None = None) -> torch.Tensor:
    """The book's corpus (:func:`mmbook.corpus.load_documents`) as one byte stream ``(N,)`` int64, documents
    separated by ``<|im_end|>`` (257): the base model's end-of-document token, which the chat template reuses as
    the end of a turn."""
    from mmbook.corpus import load_documents

    tokenizer = tokenizer if tokenizer is not None else ChatByteTokenizer()
    check_instance("tokenizer", tokenizer, "corpus_chat_stream", ChatByteTokenizer, "a ChatByteTokenizer")
    ids: list[int] = []
    for doc in load_documents():
        ids += list(doc.encode("utf-8")) + [tokenizer.im_end_id]
    return torch.tensor(ids, dtype=torch.long)


#: The chapter's small base model and its pretraining recipe (2 layers, d = 64: chapter 17's ablation size).
BASE_CONFIG = {"vocab_size": 258, "max_seq_len": 128, "n_layer": 2, "n_head": 4, "d_model": 64,
               "kernel": "torch", "fused": True}
# Bumped whenever mmbook.pretrain.train_lm's loop changes, so that a cached base trained by older code is not reused.
BASE_VERSION = "train_lm 2: weight decay on matrices only; random_windows draws every valid start"
BASE_RECIPE = {"steps": 200, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "warmup": 20, "train_fraction": 0.9}


def numerics_key() -> dict[str, object]:
    """What changes a trained model's floating-point results on this machine besides the recipe, for cache keys:
    the intra-op thread count, the default dtype, the CPU code path ATen's kernels dispatch to
    (``torch.backends.cpu.get_cpu_capability()``, e.g. ``"AVX2"``, ``"AVX512"`` or ``"DEFAULT"``) and the two
    environment variables that select code paths (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``; empty when unset)."""
    return {"threads": torch.get_num_threads(), "dtype": str(torch.get_default_dtype()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{k: os.environ.get(k, "") for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}}


def pretrained_chat_base(seed: int = 0) -> tuple[Decoder, torch.Tensor, torch.Tensor]:
    """The chapter's base model: a :class:`mmbook.decoder.Decoder` of :data:`BASE_CONFIG` pretrained with
    :func:`mmbook.pretrain.train_lm` on the first 90% of :func:`corpus_chat_stream` (:data:`BASE_RECIPE`).

    Returns ``(model, train_ids, val_ids)``. The weights are cached with :mod:`mmbook.cache` (validated on load),
    under a key that also holds :func:`numerics_key` (the thread count and CPU code path it was trained with), so
    a run with other numerics trains its own base instead of loading another's; ``seed`` seeds the initialisation
    (``seed``) and the batches (``seed + 1``), both through mmbook.
    """
    from mmbook.cache import cache_path, load_tensors, save_tensors
    from mmbook.core import set_seed
    from mmbook.decoder import DecoderConfig
    from mmbook.pretrain import train_lm

    fn = "pretrained_chat_base"
    seed = check_int("seed", seed, fn, 0)
    data = corpus_chat_stream()
    cut = int(BASE_RECIPE["train_fraction"] * data.numel())
    train_ids, val_ids = data[:cut], data[cut:]
    config = DecoderConfig(**BASE_CONFIG)
    key = {"config": BASE_CONFIG, "recipe": BASE_RECIPE, "version": BASE_VERSION, "seed": seed,
           "tokens": int(data.numel()), "numerics": numerics_key()}
    path = cache_path("chat_base", key, ".pt")
    set_seed(seed)
    model = Decoder(config)
    if path.is_file():
        state = load_tensors(path, key, fn=fn)["state"]
        expected = model.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise RuntimeError(f"{fn}: {path} holds other weights; delete it and run again (it is rebuilt)")
        model.load_state_dict(state)
    else:
        r = BASE_RECIPE
        train_lm(model, train_ids, steps=r["steps"], batch_size=r["batch_size"], seq_len=r["seq_len"], lr=r["lr"],
                 warmup=r["warmup"], seed=seed + 1)
        save_tensors(path, key, {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}})
    model.eval()
    return model, train_ids, val_ids
