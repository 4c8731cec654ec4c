"""Contrastive alignment of two modalities: CLIP and CLAP in miniature.

Building blocks of chapter 13:

* :func:`clip_logits` and :func:`clip_loss` — cosine similarities scaled by a learned temperature, and the
  symmetric InfoNCE loss of CLIP (optionally with extra hard-negative texts, as in NegCLIP);
  :func:`siglip_loss` — SigLIP's pairwise sigmoid loss with a learned scale and bias.
* :class:`BagOfWordsEncoder` and :class:`TransformerTextEncoder` — two text towers, one blind to word order and
  one that is not (it reuses :class:`mmbook.crossmodal.TextTransformer`).
* :class:`DualEncoder` — two towers, L2-normalised embeddings and a learned logit scale;
  :func:`train_dual_encoder` trains one (with either loss), :func:`distinct_group_batches` builds batches
  without duplicates, :func:`encode` embeds a whole data set in batches.
* :func:`recall_at_k`, :func:`prompt_ensemble`, :func:`zero_shot_classify` — retrieval and zero-shot evaluation.

The caption twins of the compositionality test (``swap_relation``, ``swap_attributes``, ``converse_caption``) live
in :mod:`mmbook.data`, next to the caption grammar they rewrite.

Convention: ``logit_scale`` is the *multiplier* ``1 / temperature`` (positive), as in open_clip's loss; CLIP and
``transformers`` store its logarithm as the parameter and pass ``logit_scale.exp()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mmbook.checks import (
    check_choice,
    check_device,
    check_finite,
    check_float_tensor,
    check_instance,
    check_int,
    check_like,
    check_number,
    check_scalar,
    check_token_batch,
)
from mmbook.checks import positive_int as _positive_int
from mmbook.core import torch_generator
from mmbook.crossmodal import TextTransformer, masked_mean

__all__ = [
    "BagOfWordsEncoder",
    "DualEncoder",
    "TransformerTextEncoder",
    "clip_logits",
    "clip_loss",
    "decay_groups",
    "distinct_group_batches",
    "encode",
    "prompt_ensemble",
    "recall_at_k",
    "siglip_loss",
    "train_dual_encoder",
    "zero_shot_classify",
]


# ----------------------------------------------------------------------------- argument checks
def _check_embeds(name: str, x: object, fn: str) -> torch.Tensor:
    return check_float_tensor(name, x, fn, 2, "(batch, embed_dim)", nonempty=True)


def _check_scale(logit_scale: object, fn: str) -> torch.Tensor | float:
    return check_scalar("logit_scale", logit_scale, fn, 0.0, low_open=True,
                        hint=" (it is 1 / temperature, not its log)")


def _check_pairs(image_embeds: object, text_embeds: object, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``(N, embed_dim)`` tensors of matching pairs, same shape, dtype and device."""
    image_embeds = _check_embeds("image_embeds", image_embeds, fn)
    text_embeds = _check_embeds("text_embeds", text_embeds, fn)
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"{fn}: image_embeds and text_embeds must have the same shape (N, embed_dim) -- row i of "
                         f"each is a matching pair -- got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
    check_like("text_embeds", text_embeds, fn, "image_embeds", image_embeds)
    return image_embeds, text_embeds


def _scaled_cosines(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                    logit_scale: torch.Tensor | float) -> torch.Tensor:
    """``logit_scale * cos``, arguments already checked."""
    image_embeds = nn.functional.normalize(image_embeds, dim=-1)
    text_embeds = nn.functional.normalize(text_embeds, dim=-1)
    return logit_scale * image_embeds @ text_embeds.T


# ----------------------------------------------------------------------------- the loss
def clip_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                logit_scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's logits: ``logit_scale * cos(image_i, text_j)``.

    ``image_embeds`` ``(n_images, embed_dim)`` and ``text_embeds`` ``(n_texts, embed_dim)`` are L2-normalised here
    (normalising an already unit vector changes it only by rounding); ``logit_scale`` ``= 1 / temperature`` is a
    positive number or scalar tensor (gradients flow into it). Returns ``logits_per_image`` ``(n_images,
    n_texts)``; its transpose is ``logits_per_text``.
    """
    fn = "clip_logits"
    image_embeds = _check_embeds("image_embeds", image_embeds, fn)
    text_embeds = _check_embeds("text_embeds", text_embeds, fn)
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"{fn}: image_embeds and text_embeds must share embed_dim, got {tuple(image_embeds.shape)} "
                         f"and {tuple(text_embeds.shape)}")
    check_like("text_embeds", text_embeds, fn, "image_embeds", image_embeds)
    return _scaled_cosines(image_embeds, text_embeds, _check_scale(logit_scale, fn))


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    hard_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """The symmetric InfoNCE loss of CLIP for ``N`` matching pairs ``(image_i, text_i)``.

    With ``L = logit_scale * cos`` the ``(N, N)`` matrix of :func:`clip_logits`, the loss is the mean of two
    cross-entropies whose targets are the diagonal:

    ``0.5 * ( mean_i -log softmax_j(L[i, :])[i]  +  mean_j -log softmax_i(L[:, j])[j] )``

    (image -> text over each row, text -> image over each column). ``image_embeds`` and ``text_embeds`` are
    ``(N, embed_dim)``. ``hard_negatives`` ``(M, embed_dim)``, optional, are extra texts that match no image (e.g.
    captions with swapped words, as in NegCLIP): they are appended as ``M`` more columns to the image -> text term
    only. Returns a scalar tensor.
    """
    fn = "clip_loss"
    image_embeds, text_embeds = _check_pairs(image_embeds, text_embeds, fn)
    texts = text_embeds
    if hard_negatives is not None:
        hard_negatives = _check_embeds("hard_negatives", hard_negatives, fn)
        if hard_negatives.shape[1] != text_embeds.shape[1]:
            raise ValueError(f"{fn}: hard_negatives must be (M, {text_embeds.shape[1]}), got "
                             f"{tuple(hard_negatives.shape)}")
        check_like("hard_negatives", hard_negatives, fn, "text_embeds", text_embeds)
        texts = torch.cat([text_embeds, hard_negatives], dim=0)
    logits = _scaled_cosines(image_embeds, texts, _check_scale(logit_scale, fn))  # (N, N + M)
    n = image_embeds.shape[0]
    targets = torch.arange(n, device=logits.device)
    image_to_text = nn.functional.cross_entropy(logits, targets)
    text_to_image = nn.functional.cross_entropy(logits[:, :n].T, targets)
    return 0.5 * (image_to_text + text_to_image)


def siglip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss for ``N`` matching pairs ``(image_i, text_i)``.

    With ``z_ij = logit_scale * cos_ij + logit_bias`` the ``(N, N)`` logits (cosines of the L2-normalised
    ``image_embeds`` and ``text_embeds``, both ``(N, embed_dim)``) and labels ``y_ij = +1`` on the diagonal, ``-1``
    off it (the paper writes ``z_ij`` for the labels), every pair is its own binary classification, matching or not:

    ``-(1 / N) * sum_i sum_j log sigmoid(y_ij * z_ij)``

    a sum over the ``N`` candidates and a mean over the ``N`` images (SigLIP's normalisation; no softmax, so
    no row or column couples the pairs). ``logit_scale`` ``= exp(theta)`` is positive, as in :func:`clip_loss`
    (``theta`` is :class:`DualEncoder`'s ``log_logit_scale``); ``logit_bias`` ``b`` is any finite number or scalar
    tensor (SigLIP starts at ``theta = log 10``, ``b = -10``).
    Returns a scalar tensor.
    """
    fn = "siglip_loss"
    image_embeds, text_embeds = _check_pairs(image_embeds, text_embeds, fn)
    logit_bias = check_scalar("logit_bias", logit_bias, fn)
    logits = _scaled_cosines(image_embeds, text_embeds, _check_scale(logit_scale, fn)) + logit_bias  # (N, N)
    n = logits.shape[0]
    signs = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1  # +1 matching, -1 not
    return -nn.functional.logsigmoid(signs * logits).sum() / n


# ----------------------------------------------------------------------------- text towers
def _token_mask(ids: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    positions = torch.arange(ids.shape[1], device=ids.device)
    if lengths is None:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return positions[None, :] < lengths.to(ids.device)[:, None]


class BagOfWordsEncoder(nn.Module):
    """A text tower that sees only *which* words occur, not their order.

    The caption becomes its normalised word-count vector ``c / length`` ``(batch, vocab_size)``; multiplied by the
    embedding matrix that is the mean of the word embeddings ``(batch, d_model)``, followed by
    ``LayerNorm -> Linear -> GELU -> Linear`` to ``(batch, embed_dim)``. Because the count vector of a sentence and
    of any permutation of it are the same numbers, the two embeddings are identical bit for bit.

    ``forward(ids, lengths)``: ids ``(batch, T)`` int64, lengths ``(batch,)`` (positions ``>= length`` are
    padding; ``None``: no padding). Returns ``(batch, embed_dim)`` (not normalised).
    """

    def __init__(self, vocab_size: int, embed_dim: int = 32, d_model: int = 64) -> None:
        super().__init__()
        fn = "BagOfWordsEncoder"
        self.vocab_size = _positive_int("vocab_size", vocab_size, fn)
        embed_dim, d_model = _positive_int("embed_dim", embed_dim, fn), _positive_int("d_model", d_model, fn)
        self.embed = nn.Parameter(torch.randn(vocab_size, d_model) * 0.1)
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                  nn.Linear(d_model, embed_dim))

    def word_counts(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, vocab_size)`` word frequencies ``count / length`` of each caption."""
        fn = "BagOfWordsEncoder"
        check_token_batch(ids, lengths, fn)
        if bool((ids < 0).any()) or bool((ids >= self.vocab_size).any()):
            raise ValueError(f"{fn}: ids must lie in [0, {self.vocab_size}), got min {int(ids.min())} "
                             f"max {int(ids.max())}")
        mask = _token_mask(ids, lengths).to(self.embed.dtype)
        counts = torch.zeros(ids.shape[0], self.vocab_size, dtype=self.embed.dtype, device=ids.device)
        counts.scatter_add_(1, ids, mask)  # integers in floating point: exact in any order
        return counts / mask.sum(dim=1, keepdim=True)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.word_counts(ids, lengths) @ self.embed)


class TransformerTextEncoder(nn.Module):
    """A text tower that reads word order: a bidirectional :class:`mmbook.crossmodal.TextTransformer` (word and
    learned position embeddings, ``num_layers`` self-attention blocks), a pooling of its output tokens, and an MLP
    ``Linear -> GELU -> Linear`` to ``embed_dim``.

    ``pooling="concat"`` (default) zeroes the padding positions, pads to ``max_len`` and concatenates the tokens,
    ``(batch, max_len * d_model)``, so that a word reaches the output through weights that depend on its slot;
    ``pooling="mean"`` averages the real tokens, ``(batch, d_model)``, which makes the tower a sum of per-word terms
    that is nearly blind to word order at initialisation; ``pooling="last"`` makes the Transformer *causal* and
    reads the output at each caption's last real token, ``(batch, d_model)``: CLIP's readout (the end-of-text
    token of a causal text Transformer; our captions have none, so their last word takes its place).

    ``forward(ids, lengths)``: ids ``(batch, T)`` int64 with ``T <= max_len``, lengths ``(batch,)`` or ``None``
    (no padding).
    Returns ``(batch, embed_dim)`` (not normalised).
    """

    def __init__(self, vocab_size: int, embed_dim: int = 32, d_model: int = 64, num_heads: int = 4,
                 num_layers: int = 1, max_len: int = 16, pooling: str = "concat") -> None:
        super().__init__()
        fn = "TransformerTextEncoder"
        embed_dim = _positive_int("embed_dim", embed_dim, fn)
        max_len = _positive_int("max_len", max_len, fn)
        pooling = check_choice("pooling", pooling, fn, ("concat", "mean", "last"))
        self.transformer = TextTransformer(vocab_size, d_model=d_model, num_heads=num_heads, num_layers=num_layers,
                                           max_len=max_len, causal=pooling == "last")
        self.pooling, self.max_len = pooling, max_len
        width = d_model * max_len if pooling == "concat" else d_model
        self.proj = nn.Sequential(nn.Linear(width, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, embed_dim))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        fn = "TransformerTextEncoder"
        check_token_batch(ids, lengths, fn)
        if ids.shape[1] > self.max_len:
            raise ValueError(f"{fn}: ids must have at most max_len={self.max_len} positions, got shape "
                             f"{tuple(ids.shape)}")
        tokens = self.transformer(ids, lengths)  # (batch, T, d_model)
        if self.pooling == "last":
            last = (lengths.to(ids.device) - 1) if lengths is not None else torch.full(
                (ids.shape[0],), ids.shape[1] - 1, device=ids.device)
            return self.proj(tokens[torch.arange(ids.shape[0], device=ids.device), last])
        if self.pooling == "concat":
            tokens = tokens * _token_mask(ids, lengths)[..., None]
            tokens = nn.functional.pad(tokens, (0, 0, 0, self.max_len - ids.shape[1]))
            return self.proj(tokens.flatten(1))
        return self.proj(masked_mean(tokens, _token_mask(ids, lengths)))


# ----------------------------------------------------------------------------- two towers
class DualEncoder(nn.Module):
    """Two towers and a learned temperature: CLIP (images and text) or CLAP (audio and text).

    ``media_encoder`` maps a batch of images (or log-mel spectrograms) to ``(batch, embed_dim)``;
    ``text_encoder`` maps ``(ids, lengths)`` to ``(batch, embed_dim)``. Both outputs are L2-normalised. The
    temperature is learned through its logarithm, as in CLIP: the parameter ``log_logit_scale`` starts at
    ``log(1 / init_temperature)`` and :attr:`logit_scale` ``= exp(log_logit_scale)`` is clipped at
    ``max_logit_scale`` (CLIP: 100) so that training cannot make the softmax arbitrarily sharp.

    ``init_logit_bias`` (default ``None``: no bias) adds a learned scalar :attr:`logit_bias` for
    :func:`siglip_loss` (SigLIP starts at ``init_temperature = 0.1``, ``init_logit_bias = -10``).

    ``forward(media, ids, lengths)`` returns ``(media_embeds, text_embeds, logit_scale)``: two ``(batch,
    embed_dim)`` unit-norm tensors and a scalar, the arguments of :func:`clip_loss`.
    """

    def __init__(self, media_encoder: nn.Module, text_encoder: nn.Module, init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0, init_logit_bias: float | None = None) -> None:
        super().__init__()
        fn = "DualEncoder"
        for name, module in (("media_encoder", media_encoder), ("text_encoder", text_encoder)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{fn}: {name} must be an nn.Module, got {type(module).__name__}")
        if not isinstance(init_temperature, (int, float)) or not 0 < init_temperature < math.inf:
            raise ValueError(f"{fn}: init_temperature must be positive, got {init_temperature!r}")
        if not isinstance(max_logit_scale, (int, float)) or not 1.0 / init_temperature <= max_logit_scale < math.inf:
            raise ValueError(f"{fn}: max_logit_scale must be finite and >= 1 / init_temperature = "
                             f"{1.0 / init_temperature:.4g}, got {max_logit_scale!r}")
        self.media_encoder, self.text_encoder = media_encoder, text_encoder
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_logit_scale = float(max_logit_scale)
        self.logit_bias: nn.Parameter | None = None
        if init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(check_number("init_logit_bias", init_logit_bias, fn)))

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(log_logit_scale)`` clipped at ``max_logit_scale``: the scalar ``1 / temperature``."""
        return self.log_logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        """Unit-norm media embeddings ``(batch, embed_dim)``."""
        return nn.functional.normalize(self.media_encoder(media), dim=-1)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-norm text embeddings ``(batch, embed_dim)`` of word ids ``(batch, T)``."""
        return nn.functional.normalize(self.text_encoder(ids, lengths), dim=-1)

    def forward(self, media: torch.Tensor, ids: torch.Tensor,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        media_embeds, text_embeds = self.encode_media(media), self.encode_text(ids, lengths)
        if media_embeds.shape != text_embeds.shape:
            raise ValueError(f"DualEncoder: the towers must give the same (batch, embed_dim), got "
                             f"{tuple(media_embeds.shape)} and {tuple(text_embeds.shape)}")
        return media_embeds, text_embeds, self.logit_scale


def distinct_group_batches(groups: torch.Tensor, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Batches in which no two items share a group label, for ``groups`` ``(N,)`` integer labels.

    Shuffle (a generator seeded with ``seed``), number the items of each group 0, 1, 2, ... in that order, and cut
    every level (all items numbered ``r``) into batches of at most ``batch_size`` separately; the batches come in
    shuffled order. Returns a list of index tensors (int64) that together hold every index once. A level smaller
    than ``batch_size`` gives a smaller batch: with ``G`` groups no batch can exceed ``G`` items.
    """
    fn = "distinct_group_batches"
    batch_size = _positive_int("batch_size", batch_size, fn)
    if not isinstance(groups, torch.Tensor) or groups.ndim != 1 or groups.numel() == 0 \
            or torch.is_floating_point(groups) or groups.dtype == torch.bool or groups.is_complex():
        raise ValueError(f"{fn}: groups must be a non-empty 1-D integer tensor (N,), got "
                         f"{getattr(groups, 'dtype', type(groups).__name__)} {tuple(getattr(groups, 'shape', ()))}")
    return _distinct_group_batches(groups.cpu(), batch_size, torch_generator(seed))


def _distinct_group_batches(groups: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(groups.numel(), generator=generator)
    shuffled = groups[order]
    rank = torch.zeros_like(order)
    seen: dict[int, int] = {}
    for position, label in enumerate(shuffled.tolist()):
        rank[position] = seen.get(label, 0)
        seen[label] = int(rank[position]) + 1
    batches = []
    for level in range(int(rank.max()) + 1):
        items = order[rank == level]
        batches.extend(items.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """AdamW parameter groups as CLIP and open_clip use them: weight decay ``weight_decay`` for the weight matrices
    (and embedding tables, parameters of two or more dimensions), none for the scalars and vectors -- the learned
    ``log_logit_scale`` and ``logit_bias``, LayerNorm gains and every bias -- which decay would pull towards 0
    (a logit scale towards 1) for no reason. Returns ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": the rest, "weight_decay": 0.0}]`` (an empty group is left out)."""
    fn = "decay_groups"
    check_instance("model", model, fn, nn.Module, "an nn.Module")
    weight_decay = check_number("weight_decay", weight_decay, fn, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def train_dual_encoder(
    model: DualEncoder,
    media: torch.Tensor,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: torch.device | str | None = None,
    groups: torch.Tensor | None = None,
    hard_negatives: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss: str = "clip",
    contrast_size: int | None = None,
) -> list[float]:
    """Train a :class:`DualEncoder` with :func:`clip_loss` (or :func:`siglip_loss`), AdamW (weight decay on the
    weight matrices only, :func:`decay_groups`) and a one-cycle learning-rate schedule.

    Pair ``i`` is ``media[i]`` ``(N, ...)`` with the caption ``ids[i]`` ``(N, T)`` of length ``lengths[i]``.
    Batches are drawn by a generator seeded with ``seed`` (the last one may be smaller). Options:

    * ``groups`` ``(N,)`` int labels: no batch holds two items of one group (:func:`distinct_group_batches`).
      Use it when pairs share a caption (e.g. only ten digit words): two identical captions in a batch would be
      *false negatives*.
    * ``hard_negatives(rows) -> (ids, lengths)``: extra negative captions for the batch ``rows`` (NegCLIP),
      passed to :func:`clip_loss` as ``hard_negatives`` (``loss="clip"`` only).
    * ``loss``: ``"clip"`` (symmetric InfoNCE) or ``"siglip"`` (sigmoid; the model needs a ``logit_bias``).
    * ``contrast_size``: the loss of a batch is the mean of the losses of its consecutive chunks of
      ``contrast_size`` pairs (the last may be smaller), so each pair meets only ``contrast_size - 1`` negatives
      while the batches, steps and learning rates stay those of ``batch_size``. The chunks' losses are averaged
      unweighted: a short last chunk counts as much as a full one (its rows weigh more). ``None``: the whole
      batch. It cannot be combined with ``hard_negatives`` (they belong to the whole batch).

    Returns the mean training loss of each epoch.
    """
    fn = "train_dual_encoder"
    if not isinstance(model, DualEncoder):
        raise TypeError(f"{fn}: model must be a DualEncoder, got {type(model).__name__}")
    epochs, batch_size = _positive_int("epochs", epochs, fn), _positive_int("batch_size", batch_size, fn)
    if not isinstance(media, torch.Tensor) or not torch.is_floating_point(media) or media.ndim < 2:
        raise TypeError(f"{fn}: media must be a floating-point tensor (N, ...), got "
                        f"{getattr(media, 'shape', type(media).__name__)}")
    check_token_batch(ids, lengths, fn)
    if lengths is None:
        raise ValueError(f"{fn}: lengths is required, one length per caption")
    check_finite("media", media, fn)
    n = media.shape[0]
    if ids.shape[0] != n:
        raise ValueError(f"{fn}: media and ids must have the same number of pairs, got {n} and {ids.shape[0]}")
    if groups is not None and (not isinstance(groups, torch.Tensor) or groups.shape != (n,)
                               or torch.is_floating_point(groups)):
        raise ValueError(f"{fn}: groups must be an integer tensor of shape ({n},), got "
                         f"{getattr(groups, 'shape', type(groups).__name__)}")
    check_number("lr", lr, fn, 0.0, low_open=True)
    check_number("weight_decay", weight_decay, fn, 0.0)
    if hard_negatives is not None:
        check_instance("hard_negatives", hard_negatives, fn, Callable, "a callable rows -> (ids, lengths) or None")
    check_choice("loss", loss, fn, ("clip", "siglip"))
    if loss == "siglip" and model.logit_bias is None:
        raise ValueError(f"{fn}: loss='siglip' needs a model with a logit_bias (DualEncoder(..., init_logit_bias="
                         "-10.0)), got one without")
    if loss == "siglip" and hard_negatives is not None:
        raise ValueError(f"{fn}: hard_negatives works with loss='clip' only, got loss='siglip'")
    if contrast_size is not None:
        contrast_size = check_int("contrast_size", contrast_size, fn, 2)
        if hard_negatives is not None:  # a chunk would meet the hard negatives of the whole batch
            raise ValueError(f"{fn}: contrast_size and hard_negatives cannot be combined (the hard negatives belong "
                             f"to the whole batch, not to a chunk of {contrast_size} pairs), got both")
    device = check_device("device", device, fn) if device is not None else next(model.parameters()).device
    model.to(device).train()
    generator = torch_generator(seed)
    optimizer = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, fused=device.type in ("cpu", "cuda"))
    if groups is None:
        steps_per_epoch = math.ceil(n / batch_size)
    else:
        steps_per_epoch = len(_distinct_group_batches(groups, batch_size, torch_generator(seed)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.15)
    history = []
    for _ in range(epochs):
        if groups is None:
            batches = torch.randperm(n, generator=generator).split(batch_size)
        else:
            batches = _distinct_group_batches(groups, batch_size, generator)[:steps_per_epoch]
        total, count = 0.0, 0
        for rows in batches:
            media_embeds, text_embeds, scale = model(media[rows].to(device), ids[rows].to(device),
                                                     lengths[rows].to(device))
            negatives = None
            if hard_negatives is not None:
                neg_ids, neg_lengths = hard_negatives(rows)
                negatives = model.encode_text(neg_ids.to(device), neg_lengths.to(device))
            chunk = rows.numel() if contrast_size is None else contrast_size
            losses = []
            for start in range(0, rows.numel(), chunk):
                part = slice(start, start + chunk)
                if loss == "siglip":
                    losses.append(siglip_loss(media_embeds[part], text_embeds[part], scale, model.logit_bias))
                else:
                    losses.append(clip_loss(media_embeds[part], text_embeds[part], scale, hard_negatives=negatives))
            batch_loss = torch.stack(losses).mean()
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            scheduler.step()
            total += batch_loss.item() * rows.numel()
            count += rows.numel()
        history.append(total / count)
    return history


@torch.no_grad()
def encode(encoder: Callable[..., torch.Tensor], *inputs: torch.Tensor, batch_size: int = 512,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Apply ``encoder`` (e.g. ``model.encode_media`` or ``model.encode_text``) to ``inputs`` (tensors sharing
    their first dimension ``N``) in batches, without gradients, and return the stacked ``(N, embed_dim)`` result on
    the CPU. Modules that ``encoder`` belongs to are put in eval mode by the caller."""
    batch_size = _positive_int("batch_size", batch_size, "encode")
    check_instance("encoder", encoder, "encode", Callable, "a callable (e.g. model.encode_media)")
    if device is not None:
        device = check_device("device", device, "encode")
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("encode: inputs must be one or more tensors")
    n = inputs[0].shape[0]
    if any(t.shape[0] != n for t in inputs):
        raise ValueError(f"encode: inputs must share their first dimension, got {[tuple(t.shape) for t in inputs]}")
    outputs = []
    for start in range(0, n, batch_size):
        chunk = [t[start: start + batch_size] for t in inputs]
        if device is not None:
            chunk = [t.to(device) for t in chunk]
        outputs.append(encoder(*chunk).cpu())
    return torch.cat(outputs)


# ----------------------------------------------------------------------------- evaluation
def recall_at_k(similarity: torch.Tensor, k: int, positives: torch.Tensor | None = None) -> float:
    """Recall@k for retrieval: the fraction of queries with a correct candidate among their top ``k``.

    ``similarity`` ``(n_queries, n_candidates)``: higher = more similar. ``positives`` bool ``(n_queries,
    n_candidates)`` marks the correct candidates of each query (default: the identity, candidate ``i`` for query
    ``i``, which needs a square matrix); every query needs at least one. A query's rank is the number of *wrong*
    candidates scoring at least as high as its best correct one, so ties count against the model (a tower that
    cannot tell two captions apart does not get lucky); it is a hit when ``rank < k``.
    """
    fn = "recall_at_k"
    similarity = check_float_tensor("similarity", similarity, fn, 2, "(queries, candidates)", nonempty=True,
                                    finite=True)  # NaN compares False: every query would count as a hit
    k = _positive_int("k", k, fn)
    if positives is None:
        if similarity.shape[0] != similarity.shape[1]:
            raise ValueError(f"{fn}: without positives similarity must be square, got {tuple(similarity.shape)}")
        positives = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    if not isinstance(positives, torch.Tensor) or positives.dtype != torch.bool or positives.shape != similarity.shape:
        raise ValueError(f"{fn}: positives must be a bool tensor of shape {tuple(similarity.shape)}, got "
                         f"{getattr(positives, 'dtype', type(positives).__name__)} "
                         f"{tuple(getattr(positives, 'shape', ()))}")
    if not bool(positives.any(dim=1).all()):
        raise ValueError(f"{fn}: every query needs at least one positive; rows without one: "
                         f"{torch.nonzero(~positives.any(dim=1)).flatten().tolist()[:10]}")
    best_positive = similarity.masked_fill(~positives, -math.inf).amax(dim=1, keepdim=True)
    rank = ((similarity >= best_positive) & ~positives).sum(dim=1)
    return int((rank < k).sum()) / rank.numel()  # exact: hits / queries


def prompt_ensemble(text_embeds: torch.Tensor) -> torch.Tensor:
    """Class embeddings from prompt templates, as in CLIP: normalise each prompt's embedding, average over the
    templates, normalise again. ``text_embeds`` ``(num_classes, num_templates, embed_dim)`` -> ``(num_classes,
    embed_dim)`` unit vectors (one template: just its normalised embedding)."""
    check_float_tensor("text_embeds", text_embeds, "prompt_ensemble", 3, "(num_classes, num_templates, embed_dim)",
                       nonempty=True)
    mean = nn.functional.normalize(text_embeds, dim=-1).mean(dim=1)
    return nn.functional.normalize(mean, dim=-1)


def zero_shot_classify(media_embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """Zero-shot classification: the class whose text embedding has the highest cosine similarity.

    ``media_embeds`` ``(N, embed_dim)``, ``class_embeds`` ``(num_classes, embed_dim)`` (e.g. from
    :func:`prompt_ensemble`). Returns the predicted class indices ``(N,)`` int64. (The temperature does not change
    an arg-max.)"""
    fn = "zero_shot_classify"
    media_embeds = _check_embeds("media_embeds", media_embeds, fn)
    class_embeds = _check_embeds("class_embeds", class_embeds, fn)
    if media_embeds.shape[1] != class_embeds.shape[1]:
        raise ValueError(f"{fn}: media_embeds and class_embeds must share embed_dim, got "
                         f"{tuple(media_embeds.shape)} and {tuple(class_embeds.shape)}")
    check_like("class_embeds", class_embeds, fn, "media_embeds", media_embeds)
    check_finite("media_embeds", media_embeds, fn)  # the arg-max of a NaN row is class 0
    check_finite("class_embeds", class_embeds, fn)
    return clip_logits(media_embeds, class_embeds, 1.0).argmax(dim=1)
