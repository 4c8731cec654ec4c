"""Counting what training costs — parameters, FLOPs, memory — and the tricks that reduce it.

Chapter 16 checks every estimate here against a measurement on :class:`mmbook.gpt.GPT`:

* :func:`count_parameters` — the exact count, ``sum(p.numel())`` over unique parameters.
* :func:`gpt_flops_per_token` — the exact matmul FLOPs of our GPT per token (``2 N_matmul``
  forward plus the attention term, three times that for a training step), next to
  :func:`training_flops`, the ``6 N D`` rule of thumb, and :func:`measure_flops`, which counts
  them with ``torch.utils.flop_counter.FlopCounterMode``.
* :func:`tensor_bytes`, :func:`training_state_bytes` (parameters, gradients, optimizer state,
  summed over the real tensors), :func:`gpt_activation_bytes` (the activations a training step
  keeps for backward, from a formula) and :func:`measure_saved_tensor_bytes` (the same,
  measured with ``torch.autograd.graph.saved_tensors_hooks``).
* :func:`enable_activation_checkpointing` / :func:`disable_activation_checkpointing` — recompute
  each Transformer block in the backward pass instead of storing its activations.
* :func:`accumulate_gradients` — gradients of a large batch from micro-batches, weighted by
  their number of target tokens so that the result equals the large-batch gradient.
* :func:`zero_memory_per_gpu` — bytes per GPU for data parallelism and ZeRO stages 1-3.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from mmbook.checks import check_bool, check_ids, check_instance
from mmbook.checks import positive_int as _positive_int  # the name the shown functions use
from mmbook.gpt import GPT, GPTConfig, _check_config

__all__ = [
    "FlopCount",
    "MemoryBreakdown",
    "accumulate_gradients",
    "count_parameters",
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
    "gpt_activation_bytes",
    "gpt_flops_per_token",
    "measure_flops",
    "measure_saved_tensor_bytes",
    "tensor_bytes",
    "training_flops",
    "training_state_bytes",
    "vit_flops_per_image",
    "zero_memory_per_gpu",
]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_module(model: object, fn: str, cls: type = nn.Module) -> None:
    check_instance("model", model, fn, cls, f"a {cls.__name__}")


def _check_tokens(idx: object, targets: object, fn: str) -> None:
    for name, t in (("idx", idx), ("targets", targets)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.ndim != 2:
            raise TypeError(
                f"{fn}: {name} must be an int64 tensor of shape (batch, T), got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
    if idx.shape != targets.shape:
        raise ValueError(f"{fn}: idx and targets must have the same shape, got {tuple(idx.shape)} and "
                         f"{tuple(targets.shape)}")


# ----------------------------------------------------------------------------- parameters and FLOPs


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters of ``model``, each shared (tied) tensor counted once.

    ``model.parameters()`` already yields a tied weight (GPT's token embedding and output layer)
    only once. With ``trainable_only`` only parameters with ``requires_grad`` are counted.
    """
    _check_module(model, "count_parameters")
    check_bool("trainable_only", trainable_only, "count_parameters")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _matmul_params(config: GPTConfig) -> int:
    """Weights of our GPT that multiply an activation (every Linear weight, the output layer)."""
    d, f = config.d_model, config.ff_dim
    return config.n_layer * (4 * d * d + 2 * d * f) + config.vocab_size * d


def gpt_flops_per_token(config: GPTConfig, seq_len: int, backward: bool = True) -> int:
    """Matmul FLOPs of our GPT per token, exactly as ``FlopCounterMode`` counts them.

    A matmul of ``(m, k) @ (k, n)`` costs ``2 m k n`` FLOPs (a multiply and an add per term).
    Per token the forward pass multiplies the activation by every matmul weight once —
    ``2 N_matmul`` with ``N_matmul = L (4 d^2 + 2 d f) + V d`` (the four attention projections,
    the two feed-forward layers and the output layer; embeddings are look-ups and biases and
    LayerNorms are not matmuls) — and each layer's attention adds ``Q K^T`` and ``A V``,
    ``2 T d`` each for a sequence of ``T = seq_len`` (the full ``T x T`` score matrix is
    computed, masked entries included). The backward pass computes two matmuls per forward
    matmul (gradients of both operands), so a training step costs ``3x`` the forward:
    ``6 N_matmul + 12 L T d`` per token.
    """
    fn = "gpt_flops_per_token"
    _check_config(config, fn)
    _positive_int("seq_len", seq_len, fn)
    if not isinstance(backward, bool):
        raise TypeError(f"{fn}: backward must be a bool, got {type(backward).__name__}")
    forward = 2 * _matmul_params(config) + 4 * config.n_layer * seq_len * config.d_model
    return 3 * forward if backward else forward


def training_flops(n_params: int, n_tokens: int) -> int:
    """The rule of thumb ``C = 6 N D``: FLOPs to train ``n_params`` parameters on ``n_tokens`` tokens.

    ``2 N`` per token forward (a multiply-add per parameter) and ``4 N`` backward.
    """
    _positive_int("n_params", n_params, "training_flops")
    _positive_int("n_tokens", n_tokens, "training_flops")
    return 6 * n_params * n_tokens


class FlopCount(NamedTuple):
    """FLOPs of one training step, as :func:`measure_flops` returns them."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def measure_flops(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> FlopCount:
    """Count the FLOPs of ``model(idx, targets).loss`` and of its backward pass.

    ``idx`` and ``targets`` are ``(batch, T)`` int64; ``model`` returns an object with a
    ``.loss`` (a :class:`mmbook.gpt.GPT`). ``FlopCounterMode`` counts matrix multiplications
    (``mm``, ``addmm``, ``bmm``, convolutions, fused attention kernels it knows) at ``2 m k n``;
    elementwise operations, softmax and normalisation are not counted. The gradients are left
    in ``.grad`` (accumulated onto what was there).
    """
    fn = "measure_flops"
    _check_module(model, fn)
    _check_tokens(idx, targets, fn)
    with FlopCounterMode(display=False) as counter:
        loss = model(idx, targets).loss
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return FlopCount(int(forward), int(counter.get_total_flops()))


# ----------------------------------------------------------------------------- memory


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors``, counting each underlying storage once.

    Views and tied tensors share storage, so summing ``numel * element_size`` would count them
    twice; here each storage is counted once, with its full size.
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    seen: dict[tuple[str, int], int] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor_bytes: tensors must be torch.Tensors, item {i} is {type(t).__name__}")
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


class MemoryBreakdown(NamedTuple):
    """Bytes of the training state: parameters, gradients and optimizer state."""

    parameters: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryBreakdown:
    """Measure the bytes of ``model``'s parameters, their ``.grad`` tensors and ``optimizer``'s state.

    Every number is a sum over the real tensors (each storage once): gradients that do not
    exist yet count 0, and the optimizer state exists only after the first ``step()`` (Adam keeps
    ``exp_avg`` and ``exp_avg_sq``, each the size of its parameter, and a one-element ``step``).
    """
    fn = "training_state_bytes"
    _check_module(model, fn)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    state: list[torch.Tensor] = []
    if optimizer is not None:
        for per_param in optimizer.state.values():
            state.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
    return MemoryBreakdown(tensor_bytes(params), tensor_bytes(grads), tensor_bytes(state))


def gpt_activation_bytes(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    bytes_per_value: int = 4,
    checkpointing: bool = False,
) -> int:
    """Estimated bytes of the activations a training step of our GPT keeps for backward.

    For ``kernels="torch"`` (fused LayerNorm, GELU and attention) and no dropout, each block
    saves, per token: its input and the first LayerNorm's output (``d`` each), the ``q, k, v``
    projections (``3d``), the attention output (``d``; merging the heads is a view of it), the
    second LayerNorm's input and output (``d`` each), and the feed-forward layer's
    pre-activation and GELU output (``f`` each) — ``8 d + 2 f`` values (``16 d`` for
    ``f = 4 d``, the count of Korthikanti et al. without dropout masks). The head saves the
    final LayerNorm's input and output (``2 d``) and the log-probabilities for the
    cross-entropy (``V``). Total::

        bytes = bytes_per_value * B * T * (L (8 d + 2 f) + 2 d + V)

    Terms of order ``B T`` (LayerNorm statistics, the token ids, attention's log-sum-exp) and
    ``T^2`` (the causal mask) are left out; a kernel that materialises the ``T x T`` attention
    weights (``kernels="mmbook"``) keeps much more. With ``checkpointing`` each block keeps
    only its input (``d`` per token) and recomputes the rest during backward, which then
    briefly needs one block's activations again (not included).
    """
    fn = "gpt_activation_bytes"
    _check_config(config, fn)
    for name, x in (("batch_size", batch_size), ("seq_len", seq_len), ("bytes_per_value", bytes_per_value)):
        _positive_int(name, x, fn)
    if seq_len > config.block_size:
        raise ValueError(f"{fn}: seq_len={seq_len} exceeds the model's block_size={config.block_size}")
    if not isinstance(checkpointing, bool):
        raise TypeError(f"{fn}: checkpointing must be a bool, got {type(checkpointing).__name__}")
    d, f = config.d_model, config.ff_dim
    per_block = d if checkpointing else 8 * d + 2 * f
    return bytes_per_value * batch_size * seq_len * (config.n_layer * per_block + 2 * d + config.vocab_size)


def measure_saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """Run ``fn()`` and measure the bytes autograd saves for the backward pass; returns ``(result, bytes)``.

    Every tensor an operation saves for backward passes through a
    ``torch.autograd.graph.saved_tensors_hooks`` pack hook; its storage is counted once (views
    and tensors saved by several operations share storage). Storages of ``exclude`` — pass
    ``model.parameters()`` — are not counted: parameters exist anyway and are not activations.
    The result keeps the graph alive, so call ``.backward()`` on it as usual.
    """
    if not callable(fn):
        raise TypeError(f"measure_saved_tensor_bytes: fn must be callable, got {type(fn).__name__}")
    skip = set()
    for t in exclude:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"measure_saved_tensor_bytes: exclude must hold tensors, got {type(t).__name__}")
        skip.add((str(t.device), t.untyped_storage().data_ptr()))
    saved: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in skip:
            saved[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(saved.values())


# ----------------------------------------------------------------------------- activation checkpointing


def _checkpointed_forward(
    self: nn.Module, x: torch.Tensor, past: Any = None, use_cache: bool = False
) -> tuple[torch.Tensor, Any]:
    plain = type(self).forward.__get__(self)
    if not (self.training and torch.is_grad_enabled()) or use_cache or past is not None:
        return plain(x, past, use_cache)
    return checkpoint(plain, x, None, False, use_reentrant=False)


def enable_activation_checkpointing(model: GPT, blocks: Iterable[int] | None = None) -> GPT:
    """Make blocks of ``model`` recompute their activations in the backward pass; returns ``model``.

    ``blocks`` lists the indices of the blocks to checkpoint (default: all of them).
    Each :class:`mmbook.gpt.Block` runs through ``torch.utils.checkpoint.checkpoint`` (with
    ``use_reentrant=False``): the forward pass keeps only the block's input, and the backward
    pass runs the block again to rebuild what it needs. Parameters, their names and the
    results are unchanged; only training-mode forward passes with gradients are checkpointed
    (evaluation and KV-cache decoding run as before). Undo with
    :func:`disable_activation_checkpointing`.
    """
    fn = "enable_activation_checkpointing"
    _check_module(model, fn, GPT)
    n = len(model.h)
    chosen = list(range(n)) if blocks is None else list(blocks)
    for i in chosen:
        if not _is_int(i) or not 0 <= i < n:
            raise ValueError(f"{fn}: blocks must be indices in [0, {n}), got {i!r}")
    for i in chosen:
        model.h[i].forward = types.MethodType(_checkpointed_forward, model.h[i])
    return model


def disable_activation_checkpointing(model: GPT) -> GPT:
    """Undo :func:`enable_activation_checkpointing`; returns ``model``."""
    _check_module(model, "disable_activation_checkpointing", GPT)
    for block in model.h:
        block.__dict__.pop("forward", None)
    return model


# ----------------------------------------------------------------------------- gradient accumulation


def accumulate_gradients(
    model: GPT, idx: torch.Tensor, targets: torch.Tensor, micro_batch_size: int, ignore_index: int = -100
) -> float:
    """Accumulate into ``.grad`` the gradient of the batch's mean token loss, one micro-batch at a time.

    ``idx`` and ``targets`` are ``(batch, T)`` int64; ``batch`` is split into chunks of
    ``micro_batch_size`` rows (the last may be smaller). The large-batch loss is the mean over
    all ``n`` target tokens that are not ``ignore_index``, ``(1/n) sum_i l_i``. Micro-batch ``k``
    therefore contributes ``(1/n) sum_{i in k} l_i`` — its summed loss divided by the *whole*
    batch's token count — not its own mean divided by the number of micro-batches, which is
    only the same when every micro-batch has the same number of target tokens. Gradients are
    added to existing ``.grad`` (call ``zero_grad`` first). Returns the batch's mean loss.
    """
    fn = "accumulate_gradients"
    _check_module(model, fn, GPT)
    _check_tokens(idx, targets, fn)
    _positive_int("micro_batch_size", micro_batch_size, fn)
    if not _is_int(ignore_index):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    check_ids("targets", targets, fn, model.config.vocab_size, allow=(ignore_index,))
    n_tokens = int((targets != ignore_index).sum())
    if n_tokens == 0:
        raise ValueError(f"{fn}: every target equals ignore_index={ignore_index}; there is no loss to average")
    total = 0.0
    for start in range(0, idx.shape[0], micro_batch_size):
        x, y = idx[start:start + micro_batch_size], targets[start:start + micro_batch_size]
        logits = model(x).logits
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   ignore_index=ignore_index, reduction="sum")
        (loss_sum / n_tokens).backward()
        total += loss_sum.item()
    return total / n_tokens


# ----------------------------------------------------------------------------- ZeRO


def zero_memory_per_gpu(
    n_params: int,
    n_gpus: int,
    stage: int,
    param_bytes: int = 2,
    grad_bytes: int = 2,
    optimizer_bytes: int = 12,
) -> float:
    """Bytes per GPU for the model state under data parallelism (``stage=0``) or ZeRO stage 1, 2, 3.

    The defaults are mixed-precision Adam as in the ZeRO paper: 16-bit parameters (2 bytes)
    and gradients (2 bytes) and ``K = 12`` bytes of optimizer state per parameter (a float32
    master copy, momentum and variance). With ``Psi = n_params`` and ``N = n_gpus``:

    * stage 0 (DDP, everything replicated): ``(2 + 2 + K) Psi``
    * stage 1 (optimizer state partitioned): ``(2 + 2) Psi + K Psi / N``
    * stage 2 (+ gradients partitioned): ``2 Psi + (2 + K) Psi / N``
    * stage 3 (+ parameters partitioned, as FSDP's full sharding): ``(2 + 2 + K) Psi / N``

    Activations and temporary buffers are not included.
    """
    fn = "zero_memory_per_gpu"
    _positive_int("n_params", n_params, fn)
    _positive_int("n_gpus", n_gpus, fn)
    if not _is_int(stage) or stage not in (0, 1, 2, 3):
        raise ValueError(f"{fn}: stage must be 0 (DDP), 1, 2 or 3, got {stage!r}")
    for name, x in (("param_bytes", param_bytes), ("grad_bytes", grad_bytes), ("optimizer_bytes", optimizer_bytes)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
            raise ValueError(f"{fn}: {name} must be a number >= 0, got {x!r}")
    p, g, k = param_bytes * n_params, grad_bytes * n_params, optimizer_bytes * n_params
    shards = (k, g, p)[:stage]  # what each stage partitions, in order: optimizer state, gradients, parameters
    replicated = (k, g, p)[stage:]
    return float(sum(replicated) + sum(shards) / n_gpus)


def vit_flops_per_image(
    image_size: int,
    patch_size: int,
    d_model: int,
    num_layers: int,
    d_ff: int,
    *,
    in_channels: int = 3,
    cls_token: bool = True,
) -> int:
    """Forward FLOPs of a ViT encoder on one ``image_size x image_size`` picture (chapter 16, section 9).

    With ``n = (image_size / patch_size)**2`` patches, ``S = n + 1`` tokens with a class token
    (``S = n`` without), ``C = in_channels``, ``d = d_model``, ``f = d_ff`` and ``L = num_layers``:
    ``2 n C p**2 d`` for the patch embedding plus ``L S (8 d**2 + 4 d f + 4 S d)`` for the blocks
    (the four attention projections, the MLP, and ``QK^T`` and ``AV``). Biases, LayerNorms,
    softmax and the final norm are not matmuls and are not counted. The image must split into
    whole patches.
    """
    fn = "vit_flops_per_image"
    for name, value in (("image_size", image_size), ("patch_size", patch_size), ("d_model", d_model),
                        ("num_layers", num_layers), ("d_ff", d_ff), ("in_channels", in_channels)):
        _positive_int(name, value, fn)
    check_bool("cls_token", cls_token, fn)
    if image_size % patch_size:
        raise ValueError(f"{fn}: image_size={image_size} is not a multiple of patch_size={patch_size}")
    n = (image_size // patch_size) ** 2
    s = n + int(cls_token)
    patch_embedding = 2 * n * in_channels * patch_size**2 * d_model
    return patch_embedding + num_layers * s * (8 * d_model**2 + 4 * d_model * d_ff + 4 * s * d_model)
