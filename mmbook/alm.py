"""An audio-language model built from the book's parts (chapter 21): chapter 14's recipe with ears instead of eyes.

``speech -> log-mel frames -> a frozen audio encoder -> num_audio_tokens pooled frames -> projector -> audio
tokens`` placed at the ``<audio>`` positions of a sequence that a causal language model (:class:`mmbook.gpt.GPT`)
reads like any other:

    [<audio> x N] [prompt words] [response words] <eos>

The loss is :func:`mmbook.vlm.masked_lm_loss` on the response positions only, the layout is
:func:`mmbook.vlm.encode_examples` with the ``<audio>`` id in place of ``<image>``.

* :class:`RecognizerEncoder` — the hidden states under the output layer of a trained
  :class:`mmbook.asr.CTCRecognizer` (its "penultimate layer", as LLaVA reads CLIP's), one per 40 ms frame.
* :func:`pool_frames` — each utterance's valid frames averaged over ``num_tokens`` equal spans: a fixed
  number of audio tokens for any duration (the spans of ``torch.nn.functional.adaptive_avg_pool1d``).
* :class:`AudioLanguageModel` — projector and language model over pooled encoder features; greedy decoding
  with or without the KV cache.
* :func:`digit_string_turns`, :func:`alm_vocab`, :func:`rule_answer` — the questions about a spoken digit string,
  their words, and the rule that answers them from a transcript (the "transcribe, then answer" pipeline).
* :func:`train_alm` — trains the projector and/or the language model with everything else frozen;
  :func:`train_alm_stages` runs the chapter's schedule (a text-only language model, then LLaVA's stage 1, the
  projector alone on transcription, and stage 2, projector and language model on every task).
* :func:`respond` — prompts (and audio) in, decoded strings out.
* :func:`encode_audio` — log-mel features through the frozen encoder to pooled audio tokens;
  :func:`pretrained_digit_alm` — the chapter's model, trained once on chapter 15's training strings and cached.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mmbook.asr import CHAPTER15_CTC_RECIPE, CTCDigitsRecipe, CTCRecognizer, pretrained_ctc_recognizer
from mmbook.checks import (
    check_bool,
    check_device,
    check_float_tensor,
    check_ids,
    check_instance,
    check_int,
    check_int_tensor,
    check_number,
    positive_int,
)
from mmbook.core import numpy_rng, torch_generator
from mmbook.data import DIGIT_WORDS, WordVocab
from mmbook.gpt import GPT, GPTConfig, GPTOutput
from mmbook.vlm import VLMExamples, decode_responses, encode_examples, greedy_decode, lm_optimizer, masked_lm_loss

__all__ = [
    "ALMRecipe",
    "AudioLanguageModel",
    "QUESTION_KINDS",
    "RecognizerEncoder",
    "TRANSCRIBE_PROMPT",
    "alm_vocab",
    "digit_string_turns",
    "encode_audio",
    "pool_frames",
    "pretrained_digit_alm",
    "respond",
    "rule_answer",
    "train_alm",
    "train_alm_stages",
]

TRANSCRIBE_PROMPT = "what was said?"
QUESTION_KINDS = ("transcribe", "count", "first", "last", "contains", "larger")
_PROMPTS = {
    "transcribe": TRANSCRIBE_PROMPT,
    "count": "how many digits were said?",
    "first": "what was the first digit?",
    "last": "what was the last digit?",
    "contains": "was there a {}?",
    "larger": "which was larger, the first or the last digit?",
}
PARTS = ("projector", "lm")


# ----------------------------------------------------------------------------- the encoder side
class RecognizerEncoder(nn.Module):
    """The frozen audio encoder: a trained :class:`mmbook.asr.CTCRecognizer` read below its output layer.

    ``forward(features (batch, n_mels, T), lengths (batch,))`` returns ``(hidden (batch, T_out, 2 * hidden),
    out_lengths (batch,))``: the bidirectional GRU's states that the recogniser's ``head`` turns into symbol
    log-probabilities (captured with a forward hook on ``head``, so the recogniser's own code runs unchanged).
    Frames past ``out_lengths`` are padding. The parameters are frozen (``requires_grad=False``).
    """

    def __init__(self, recognizer: CTCRecognizer) -> None:
        super().__init__()
        check_instance("recognizer", recognizer, "RecognizerEncoder", CTCRecognizer, "a CTCRecognizer")
        self.recognizer = recognizer.requires_grad_(False)
        self.d_audio = recognizer.head.in_features

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.recognizer.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            _, out_lengths = self.recognizer(features, lengths)  # checks the arguments
        finally:
            handle.remove()
        return captured[0], out_lengths


def pool_frames(frames: torch.Tensor, lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    r"""A fixed number of audio tokens from a variable number of frames: ``(batch, num_tokens, d)``.

    ``frames`` ``(batch, T, d)`` (padded), ``lengths`` ``(batch,)`` in ``[1, T]``. Token :math:`i` of an
    utterance with :math:`L` valid frames is the mean of frames :math:`\lfloor iL/N \rfloor` to
    :math:`\lceil (i+1)L/N \rceil - 1` (:math:`N` = ``num_tokens``): equal spans that cover every valid frame
    and never read the padding, the spans of ``adaptive_avg_pool1d`` on the valid frames. With :math:`L < N`
    spans repeat frames.
    """
    fn = "pool_frames"
    frames = check_float_tensor("frames", frames, fn, 3, "(batch, T, d)", nonempty=True)
    lengths = check_int_tensor("lengths", lengths, fn, 1, "(batch,)")
    batch, total, _ = frames.shape
    if lengths.shape[0] != batch:
        raise ValueError(f"{fn}: lengths must have shape ({batch},), one per utterance, got {tuple(lengths.shape)}")
    if int(lengths.min()) < 1 or int(lengths.max()) > total:
        raise ValueError(f"{fn}: lengths must lie in [1, {total}], got values in [{int(lengths.min())}, "
                         f"{int(lengths.max())}]")
    num_tokens = positive_int("num_tokens", num_tokens, fn)
    lengths = lengths.to(frames.device).long()
    i = torch.arange(num_tokens, device=frames.device)
    start = torch.div(i[None] * lengths[:, None], num_tokens, rounding_mode="floor")  # (batch, N)
    end = -torch.div(-(i[None] + 1) * lengths[:, None], num_tokens, rounding_mode="floor")  # ceil
    t = torch.arange(total, device=frames.device)
    weights = ((t[None, None] >= start[..., None]) & (t[None, None] < end[..., None])).to(frames.dtype)
    weights = weights / weights.sum(dim=-1, keepdim=True)  # (batch, N, T): each row a mean over its span
    return weights @ frames


# ----------------------------------------------------------------------------- the model
class AudioLanguageModel(nn.Module):
    """Projector and causal language model over audio tokens, LLaVA-style (chapter 14's model without the image
    encoder: the audio encoder is frozen and runs once, outside).

    ``audio`` is ``(batch, num_audio_tokens, d_audio)`` pooled encoder features (:func:`pool_frames`);
    ``projector`` is ``Linear -> GELU -> Linear`` to ``(batch, num_audio_tokens, d_model)``; ``lm`` is a
    :class:`GPT` whose vocabulary has one extra id, ``audio_token_id = vocab_size``, the ``<audio>`` placeholder.
    A sequence holds exactly ``num_audio_tokens`` placeholders; :meth:`embed` replaces their word embeddings by
    the projected features, in order. With ``audio=None`` they keep the embedding of ``<audio>`` itself: the
    model is then a text-only language model (the blind baseline).
    """

    def __init__(self, vocab_size: int, d_audio: int, num_audio_tokens: int = 16, d_model: int = 64,
                 n_layer: int = 2, n_head: int = 4, block_size: int = 40, dropout: float = 0.0) -> None:
        super().__init__()
        fn = "AudioLanguageModel"
        self.vocab_size = positive_int("vocab_size", vocab_size, fn)
        self.d_audio = positive_int("d_audio", d_audio, fn)
        self.num_audio_tokens = positive_int("num_audio_tokens", num_audio_tokens, fn)
        d_model, block_size = positive_int("d_model", d_model, fn), positive_int("block_size", block_size, fn)
        if block_size <= self.num_audio_tokens:
            raise ValueError(f"{fn}: block_size ({block_size}) must exceed the {self.num_audio_tokens} audio tokens")
        self.projector = nn.Sequential(nn.Linear(d_audio, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        config = GPTConfig(vocab_size=vocab_size + 1, block_size=block_size, n_layer=n_layer, n_head=n_head,
                           d_model=d_model, dropout=dropout, kernels="torch")
        self.lm = GPT(config)
        with torch.no_grad():  # the width-scaled init of chapter 14's VisionLanguageModel (see its comment)
            for block in self.lm.h:
                nn.init.normal_(block.attn.qkv.weight, std=d_model ** -0.5)
                nn.init.normal_(block.mlp.fc.weight, std=d_model ** -0.5)
        self.audio_token_id = vocab_size

    @property
    def device(self) -> torch.device:
        return self.lm.wte.weight.device

    def _check_audio(self, audio: Any, fn: str, batch: int | None = None) -> torch.Tensor:
        audio = check_float_tensor("audio", audio, fn, 3, f"(batch, {self.num_audio_tokens}, {self.d_audio})")
        if audio.shape[1:] != (self.num_audio_tokens, self.d_audio):
            raise ValueError(f"{fn}: audio must have shape (batch, {self.num_audio_tokens}, {self.d_audio}), got "
                             f"{tuple(audio.shape)}")
        if batch is not None and audio.shape[0] != batch:
            raise ValueError(f"{fn}: audio must hold {batch} utterances (one per row of ids), got {audio.shape[0]}")
        return audio

    def embed(self, ids: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings ``(batch, T, d_model)`` for ``ids`` ``(batch, T)``: word embeddings, with row ``i``'s
        ``<audio>`` positions replaced by the projected ``audio[i]`` (``None``: left as the ``<audio>`` embedding)."""
        fn = "AudioLanguageModel.embed"
        ids = check_ids("ids", ids, fn, self.vocab_size + 1, 2, "(batch, T)")
        x = self.lm.wte(ids.long())
        if audio is None:
            return x
        is_audio = ids == self.audio_token_id
        counts = is_audio.sum(dim=1)
        if (counts != self.num_audio_tokens).any():
            raise ValueError(f"{fn}: every row of ids must hold exactly {self.num_audio_tokens} <audio> tokens "
                             f"(id {self.audio_token_id}), got counts {counts.tolist()}")
        audio = self._check_audio(audio, fn, ids.shape[0])
        tokens = self.projector(audio.to(x.device)).to(x.dtype)
        return x.masked_scatter(is_audio[..., None], tokens)  # row-major: utterance 0's tokens, then 1's, ...

    def forward(self, ids: torch.Tensor, audio: torch.Tensor | None = None, *, past_key_values: list | None = None,
                use_cache: bool = False) -> GPTOutput:
        """Logits ``(batch, T, vocab_size + 1)`` (and the KV cache with ``use_cache``) of ``ids`` with its audio."""
        return self.lm(inputs_embeds=self.embed(ids, audio), past_key_values=past_key_values, use_cache=use_cache)

    def prompt_ids(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(batch, N + P)``: the ``N`` ``<audio>`` placeholders followed by the prompt's word ids ``(batch, P)``."""
        fn = "AudioLanguageModel.prompt_ids"
        prompt_ids = check_ids("prompt_ids", prompt_ids, fn, self.vocab_size, 2, "(batch, P)")
        audio = torch.full((prompt_ids.shape[0], self.num_audio_tokens), self.audio_token_id, dtype=torch.long,
                           device=prompt_ids.device)
        return torch.cat([audio, prompt_ids.long()], dim=1)

    @torch.no_grad()
    def generate(self, audio: torch.Tensor | None, prompt_ids: torch.Tensor, max_new_tokens: int, *,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding: ``(batch, max_new_tokens)`` int64 new tokens, ``<pad>`` after a row's ``<eos>``.

        ``prompt_ids`` ``(batch, P)`` word ids (the audio placeholders are prepended here); ``audio``
        ``(batch, N, d_audio)`` or ``None`` (blind). With the cache the prompt is read once and each step feeds
        only the newest token; without it each step re-reads the whole sequence. ``<pad>``, ``<unk>``, ``<bos>``
        and ``<audio>`` are never chosen.
        """
        fn = "AudioLanguageModel.generate"
        check_bool("use_cache", use_cache, fn)
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens, fn)
        ids = self.prompt_ids(prompt_ids)
        if ids.shape[1] + max_new_tokens > self.lm.config.block_size:
            raise ValueError(f"{fn}: {ids.shape[1]} prompt positions + max_new_tokens={max_new_tokens} exceed "
                             f"block_size={self.lm.config.block_size}")
        if audio is not None:
            self._check_audio(audio, fn, ids.shape[0])
        was_training = self.training
        self.eval()
        try:  # chapter 14's greedy loop, shared
            return greedy_decode(self.lm, self.embed(ids, audio), max_new_tokens,
                                 [WordVocab.PAD, WordVocab.UNK, WordVocab.BOS, self.audio_token_id],
                                 use_cache=use_cache)
        finally:
            self.train(was_training)


# ----------------------------------------------------------------------------- the data
def _check_digits(digits: Any, fn: str, name: str = "digits") -> list[int]:
    if isinstance(digits, (str, bytes)) or not isinstance(digits, Sequence) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 9 for d in digits):
        raise TypeError(f"{fn}: {name} must be a list of ints in [0, 9], got {digits!r}")
    return list(digits)


def _answers(digits: list[int], probe: int) -> dict[str, str]:
    """The answer of every kind of question about ``digits`` (``probe``: the digit "was there a ...?" asks about)."""
    if not digits:  # an empty transcript: nothing can be answered
        return {kind: "" for kind in QUESTION_KINDS}
    larger = "neither" if digits[0] == digits[-1] else ("the first" if digits[0] > digits[-1] else "the last")
    return {"transcribe": " ".join(DIGIT_WORDS[d] for d in digits), "count": DIGIT_WORDS[len(digits)],
            "first": DIGIT_WORDS[digits[0]], "last": DIGIT_WORDS[digits[-1]],
            "contains": "yes" if probe in digits else "no", "larger": larger}


def digit_string_turns(digits: Sequence[int], seed: int = 0) -> list[tuple[str, str, str]]:
    """The ``(kind, prompt, answer)`` turns about one spoken digit string, one per kind of :data:`QUESTION_KINDS`.

    ``transcribe``: "what was said?" -> the digit words; ``count``: how many digits (a number word); ``first`` /
    ``last``: that digit's word; ``contains``: "was there a *d*?" -> yes/no, with *d* drawn (seeded) from the string
    half of the time and from the other digits otherwise, so that both answers are equally likely; ``larger``:
    "which was larger, the first or the last digit?" -> "the first", "the last" or "neither" (equal, and always
    for one digit). At most nine digits (the count must be a digit word).
    """
    fn = "digit_string_turns"
    digits = _check_digits(digits, fn)
    if not 1 <= len(digits) <= 9:
        raise ValueError(f"{fn}: digits must hold 1 to 9 digits, got {len(digits)}")
    rng = numpy_rng(check_int("seed", seed, fn, 0))
    absent = [d for d in range(10) if d not in digits]
    pool = digits if (rng.random() < 0.5 or not absent) else absent
    probe = int(pool[int(rng.integers(len(pool)))])
    answers = _answers(digits, probe)
    return [(kind, _PROMPTS[kind].format(DIGIT_WORDS[probe]), answers[kind]) for kind in QUESTION_KINDS]


def alm_vocab() -> WordVocab:
    """The words of every prompt and answer of :func:`digit_string_turns` (all digit strings use the same ones)."""
    texts = [_PROMPTS[k].format(w) for k in QUESTION_KINDS for w in DIGIT_WORDS]
    return WordVocab([*texts, *DIGIT_WORDS, "yes", "no", "the first", "the last", "neither"])


_CONTAINS = re.compile(r"^was there a (\w+)\?$")


def rule_answer(question: str, heard: Sequence[int]) -> str:
    """Answer one of :func:`digit_string_turns`' questions from a transcript ``heard`` (digits) by rule: the second
    half of a "transcribe, then answer" pipeline. An empty transcript answers ``""`` (always wrong); a question
    that is none of the templates raises ``ValueError``."""
    fn = "rule_answer"
    if not isinstance(question, str):
        raise TypeError(f"{fn}: question must be a str, got {type(question).__name__}")
    heard = _check_digits(heard, fn, "heard")
    match = _CONTAINS.match(question)
    if match and match.group(1) in DIGIT_WORDS:
        return _answers(heard, DIGIT_WORDS.index(match.group(1)))["contains"]
    for kind in QUESTION_KINDS:
        if kind != "contains" and question == _PROMPTS[kind]:
            return _answers(heard, 0)[kind]
    raise ValueError(f"{fn}: question must be one of the templates of digit_string_turns, got {question!r}")


# ----------------------------------------------------------------------------- training
def train_alm(model: AudioLanguageModel, audio: torch.Tensor | None, examples: VLMExamples, *,
              trainable: Sequence[str] = ("projector",), epochs: int = 3, batch_size: int = 64, lr: float = 3e-3,
              seed: int = 0) -> list[float]:
    """Train the ``trainable`` parts of ``model`` (a subset of ``("projector", "lm")``) on ``examples`` with
    :func:`mmbook.vlm.masked_lm_loss`; the other part is frozen (restored after).

    ``audio`` ``(num_utterances, N, d_audio)`` pooled encoder features (row ``examples.image_index[i]`` belongs
    to example ``i``), or ``None`` to train without audio (text only: the placeholders stay ``<audio>``).
    AdamW with a one-cycle schedule (chapter 14's); the order of the examples is drawn with ``seed``.
    Returns the mean training loss of each epoch.
    """
    fn = "train_alm"
    check_instance("model", model, fn, AudioLanguageModel, "an AudioLanguageModel")
    if isinstance(trainable, str) or not trainable or any(t not in PARTS for t in trainable):
        raise ValueError(f"{fn}: trainable must be a non-empty subset of {PARTS}, got {trainable!r}")
    check_instance("examples", examples, fn, VLMExamples, "VLMExamples (see mmbook.vlm.encode_examples)")
    epochs, batch_size = positive_int("epochs", epochs, fn), positive_int("batch_size", batch_size, fn)
    lr = check_number("lr", lr, fn, 0.0, 1.0, low_open=True)
    seed = check_int("seed", seed, fn, 0)
    check_ids("examples.ids", examples.ids, fn, model.vocab_size + 1)
    device = model.device
    if audio is not None:
        model._check_audio(audio, fn)
        check_ids("examples.image_index", examples.image_index, fn, audio.shape[0])
        audio = audio.to(device)
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for name in PARTS:
        getattr(model, name).requires_grad_(name in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    ids, targets, mask = (t.to(device) for t in examples[:3])
    index = examples.image_index.to(device)
    generator = torch_generator(seed)
    optimizer, scheduler = lm_optimizer(params, lr, epochs * math.ceil(ids.shape[0] / batch_size), device)
    history = []
    try:
        model.train()
        for _ in range(epochs):
            total = 0.0
            for rows in torch.randperm(ids.shape[0], generator=generator).split(batch_size):
                rows = rows.to(device)
                width = int(mask[rows].nonzero()[:, 1].max()) + 1  # drop the all-padding tail of the batch
                out = model(ids[rows, :width], None if audio is None else audio[index[rows]])
                loss = masked_lm_loss(out.logits, targets[rows, :width], mask[rows, :width])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * rows.numel()
            history.append(total / ids.shape[0])
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
        model.eval()
    return history


@dataclass(frozen=True)
class ALMRecipe:
    """The settings of :func:`train_alm_stages` (a cache key holds all of them: ``asdict(recipe)``).
    ``align_epochs=0`` skips stage 1 (an ablation)."""

    num_audio_tokens: int = 8
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    block_size: int = 32
    lm_epochs: int = 1
    align_epochs: int = 3
    full_epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3

    def __post_init__(self) -> None:
        fn = "ALMRecipe"
        for name in ("num_audio_tokens", "d_model", "n_layer", "n_head", "block_size", "lm_epochs", "full_epochs",
                     "batch_size"):
            positive_int(name, getattr(self, name), fn)
        check_int("align_epochs", self.align_epochs, fn, 0)
        check_number("lr", self.lr, fn, 0.0, 1.0, low_open=True)

    def build(self, vocab: WordVocab, d_audio: int) -> AudioLanguageModel:
        """A fresh :class:`AudioLanguageModel` of this size for ``vocab`` and encoder width ``d_audio``."""
        check_instance("vocab", vocab, "ALMRecipe.build", WordVocab, "a WordVocab")
        return AudioLanguageModel(len(vocab), d_audio, self.num_audio_tokens, self.d_model, self.n_layer, self.n_head,
                                  self.block_size)

    def as_key(self) -> dict:
        """The recipe as a dict of JSON values (for :func:`mmbook.cache.cached_training`)."""
        return asdict(self)


def train_alm_stages(model: AudioLanguageModel, vocab: WordVocab, audio: torch.Tensor,
                     turns: Sequence[Sequence[tuple[str, str, str]]], recipe: ALMRecipe | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """The chapter's schedule on utterances ``audio`` ``(num, N, d_audio)`` and their ``turns`` (one list of
    :func:`digit_string_turns` per utterance):

    * ``lm``: the language model alone on every turn's text, no audio (the stand-in for a pretrained LLM; its
      weights afterwards are the blind baseline);
    * ``align`` (stage 1): the projector alone on the transcription turns (skipped with ``recipe.align_epochs == 0``);
    * ``full`` (stage 2): projector and language model on every turn, one turn per example.

    The encoder is not trained (its features are ``audio``). Returns ``{"history": {stage: losses},
    "lm_state": the state dict after stage ``lm``}`` (tensors on the CPU). ``model`` ends in eval mode.
    """
    fn = "train_alm_stages"
    check_instance("model", model, fn, AudioLanguageModel, "an AudioLanguageModel")
    check_instance("vocab", vocab, fn, WordVocab, "a WordVocab")
    recipe = ALMRecipe() if recipe is None else check_instance("recipe", recipe, fn, ALMRecipe, "an ALMRecipe")
    if len(vocab) != model.vocab_size:
        raise ValueError(f"{fn}: vocab must be the model's ({model.vocab_size} words), got {len(vocab)} words")
    audio = model._check_audio(audio, fn)
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence) or len(turns) != audio.shape[0]:
        raise ValueError(f"{fn}: turns must hold one list of turns per utterance ({audio.shape[0]}), got "
                         f"{len(turns) if isinstance(turns, Sequence) else type(turns).__name__}")
    n = model.num_audio_tokens
    every = [(i, (p, a)) for i, ts in enumerate(turns) for _, p, a in ts]
    transcribe = [(i, (p, a)) for i, ts in enumerate(turns) for k, p, a in ts if k == "transcribe"]

    def examples(items: list) -> VLMExamples:
        return encode_examples(vocab, [[t] for _, t in items], model.audio_token_id, n, [i for i, _ in items])

    all_turns = examples(every)
    common = {"batch_size": recipe.batch_size, "lr": recipe.lr, "seed": seed}
    history = {"lm": train_alm(model, None, all_turns, trainable=("lm",), epochs=recipe.lm_epochs, **common)}
    lm_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    history["align"] = [] if recipe.align_epochs == 0 else train_alm(
        model, audio, examples(transcribe), trainable=("projector",), epochs=recipe.align_epochs, **common)
    history["full"] = train_alm(model, audio, all_turns, trainable=("projector", "lm"), epochs=recipe.full_epochs,
                                **common)
    return {"history": history, "lm_state": lm_state}


# ----------------------------------------------------------------------------- strings in, strings out
def respond(model: AudioLanguageModel, vocab: WordVocab, audio: torch.Tensor | None, prompts: Sequence[str], *,
            max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to ``prompts[i]`` about ``audio[i]`` (``(batch, N, d_audio)``; ``None``: blind), decoded up
    to ``<eos>``. Prompts of equal length are decoded together."""
    fn = "respond"
    check_instance("model", model, fn, AudioLanguageModel, "an AudioLanguageModel")
    check_instance("vocab", vocab, fn, WordVocab, "a WordVocab")
    if len(vocab) != model.vocab_size:
        raise ValueError(f"{fn}: vocab must be the model's ({model.vocab_size} words), got {len(vocab)} words")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{fn}: prompts must be a sequence of strings, got {type(prompts).__name__}")
    if audio is not None:
        model._check_audio(audio, fn, len(prompts))
    encoded = [vocab.encode(p) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    out = [""] * len(prompts)
    for length in sorted(groups):
        rows = groups[length]
        prompt_ids = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=model.device)
        tokens = model.generate(None if audio is None else audio[rows].to(model.device), prompt_ids,
                                max_new_tokens).cpu()
        for i, text in zip(rows, decode_responses(vocab, tokens), strict=True):
            out[i] = text
    return out



# ----------------------------------------------------------------------------- the chapter's trained model
def encode_audio(encoder: RecognizerEncoder, features: torch.Tensor, lengths: torch.Tensor,
                 num_tokens: int) -> torch.Tensor:
    """Pooled audio tokens ``(batch, num_tokens, d_audio)`` of log-mel ``features`` ``(batch, n_mels, T)`` with
    ``lengths`` ``(batch,)``: the frozen ``encoder``'s states (no gradient), then :func:`pool_frames`. The
    features go to the encoder's device; the tokens stay there."""
    fn = "encode_audio"
    check_instance("encoder", encoder, fn, RecognizerEncoder, "a RecognizerEncoder")
    num_tokens = positive_int("num_tokens", num_tokens, fn)
    device = encoder.recognizer.head.weight.device
    with torch.no_grad():
        states, state_lengths = encoder(features.to(device), lengths.to(device))
        return pool_frames(states, state_lengths, num_tokens)


def pretrained_digit_alm(device: torch.device | str | None = None, recipe: ALMRecipe | None = None,
                         seed: int = 21, *, recordings: dict[str, Any] | None = None
                         ) -> tuple[AudioLanguageModel, dict[str, Any], bool]:
    """Chapter 21's trained audio-language model, in eval mode on ``device`` (default: :func:`get_device`).

    Trained with :func:`train_alm_stages` (``recipe``, default :class:`ALMRecipe`; ``seed`` before the weights are
    drawn and for the batch order) on chapter 15's training strings (:data:`mmbook.asr.CHAPTER15_CTC_RECIPE`:
    600 strings, 13 voices) with :func:`digit_string_turns` seeded ``1000 + i`` for string ``i``, over the audio
    tokens of the frozen :func:`mmbook.asr.pretrained_ctc_recognizer` (a :class:`RecognizerEncoder`), on the
    first call, and cached (:func:`mmbook.cache.cached_training`, keyed by the recipe, the encoder's recipe, the
    seed, the seed shift and the device type); later calls load it. The
    training data is built only when the model is trained (``recordings`` as for
    :func:`mmbook.asr.pretrained_ctc_recognizer`). Returns ``(model, record, loaded)``: ``record["history"]``
    holds each stage's losses per epoch and ``record["lm_state"]`` the weights after the text-only stage (the
    blind baseline); ``loaded`` says whether the weights came from the cache.
    """
    from mmbook.cache import cached_training
    from mmbook.core import get_device, set_seed

    fn = "pretrained_digit_alm"
    device = check_device("device", device, fn) if device is not None else get_device()
    recipe = ALMRecipe() if recipe is None else check_instance("recipe", recipe, fn, ALMRecipe, "an ALMRecipe")
    seed = check_int("seed", seed, fn, 0)
    ctc_recipe: CTCDigitsRecipe = CHAPTER15_CTC_RECIPE
    encoder = RecognizerEncoder(pretrained_ctc_recognizer(device, ctc_recipe, recordings=recordings)[0])
    vocab = alm_vocab()
    key = {"chapter": 21, "what": "digit_alm", "version": 1, "recipe": recipe.as_key(),
           "encoder": ctc_recipe.as_key(), "strings": ctc_recipe.strings, "turn_seed": 1000, "seed": seed}

    def train(model: AudioLanguageModel) -> dict[str, Any]:
        data = ctc_recipe.training_data(recordings)
        audio = encode_audio(encoder, data["features"], data["lengths"], recipe.num_audio_tokens)
        turns = [digit_string_turns(d, seed=1000 + i) for i, d in enumerate(data["strings"]["digits"])]
        return train_alm_stages(model, vocab, audio, turns, recipe, seed=seed)

    set_seed(seed)
    model = recipe.build(vocab, encoder.d_audio).to(device)
    record, loaded = cached_training("ch21_alm", key, model, train, fn=fn)
    return model.eval(), record, loaded
