"""Data-parallel training of our GPT with ``torch.distributed`` and ``DistributedDataParallel``.

Two ways in, one training function (:func:`ddp_train`):

* :func:`run_ddp` starts ``world_size`` processes on this machine with
  ``torch.multiprocessing`` (the ``gloo`` backend, CPU, ``127.0.0.1`` and a free port), waits for
  them with a time limit and returns what each rank computed — the gradients of the first step
  after DDP's all-reduce, the losses and the final parameters. Chapter 16 compares them with
  single-process training.
* ``torchrun`` runs this module as a script, on one machine or many, with ``nccl`` on GPUs::

      torchrun --standalone --nproc_per_node=2 -m mmbook.distributed --steps 20
      torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \\
               --rdzv_endpoint=HOST:29500 -m mmbook.distributed --steps 20

  ``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
  in each process; :func:`main` reads them, uses GPU ``LOCAL_RANK`` when CUDA is available.

:func:`run_parallel` starts processes the same way for :func:`parallel_train`, which trains a
:class:`ParallelJob` — a dataset of windows — as real runs do: a ``DistributedSampler`` with
``set_epoch``, gradient accumulation under DDP's ``no_sync()``, a checkpoint written by rank 0 and
read by every rank, and the same training with ``ZeroRedundancyOptimizer`` (ZeRO stage 1) and with
FSDP2's ``fully_shard`` (stage 3), reporting what each rank holds in bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from mmbook.checks import check_device, check_ids, check_int, check_number
from mmbook.core import seed, set_seed, torch_generator
from mmbook.gpt import GPT, GPTConfig

__all__ = [
    "DDPJob",
    "DDPResult",
    "ParallelJob",
    "ParallelResult",
    "ddp_train",
    "find_free_port",
    "main",
    "parallel_train",
    "run_ddp",
    "run_parallel",
    "save_checkpoint",
    "shard",
    "zero_partition",
]

_BACKENDS = ("gloo", "nccl")


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now: bind to port 0 and let the OS choose one."""
    if not isinstance(host, str) or not host:
        raise TypeError(f"find_free_port: host must be a non-empty str, got {host!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of the rows of ``x`` ``(batch, ...)``: ``(batch / world_size, ...)``.

    The batch must divide evenly, so that every rank's mean loss averages the same number of
    tokens and the average of the ranks' gradients is the gradient of the whole batch.
    """
    fn = "shard"
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise TypeError(f"{fn}: x must be a tensor with a batch dimension, got {type(x).__name__}")
    for name, v in (("rank", rank), ("world_size", world_size)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{fn}: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if x.shape[0] % world_size:
        raise ValueError(f"{fn}: batch size {x.shape[0]} is not divisible by world_size={world_size}")
    n = x.shape[0] // world_size
    return x[rank * n:(rank + 1) * n]


@dataclass
class DDPJob:
    """What every rank trains: a GPT built with ``seed`` in ``dtype``, AdamW at ``lr``, one step per batch.

    ``batches`` is a list of ``(idx, targets)`` pairs of the *global* batch, each ``(batch, T)``
    int64; rank ``r`` trains on ``shard(., r, world_size)`` of each.
    """

    config: GPTConfig
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    dtype: torch.dtype = torch.float64
    backend: str = "gloo"

    def __post_init__(self) -> None:
        fn = "DDPJob"
        if not isinstance(self.config, GPTConfig):
            raise TypeError(f"{fn}: config must be a GPTConfig, got {type(self.config).__name__}")
        if not isinstance(self.batches, list) or not self.batches:
            raise ValueError(f"{fn}: batches must be a non-empty list of (idx, targets) pairs")
        for i, pair in enumerate(self.batches):
            ok = isinstance(pair, tuple) and len(pair) == 2 and all(
                isinstance(t, torch.Tensor) and t.dtype == torch.long and t.ndim == 2 for t in pair)
            if not ok or pair[0].shape != pair[1].shape:
                raise TypeError(f"{fn}: batches[{i}] must be a pair of int64 (batch, T) tensors of equal shape")
            if pair[0].shape[1] > self.config.block_size:
                raise ValueError(f"{fn}: batches[{i}] has T={pair[0].shape[1]} > block_size={self.config.block_size}")
            check_ids(f"batches[{i}] idx", pair[0], fn, self.config.vocab_size)  # checked here, not in a child process
            check_ids(f"batches[{i}] targets", pair[1], fn, self.config.vocab_size, allow=(-100,))
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{fn}: dtype must be torch.float32 or torch.float64, got {self.dtype}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"{fn}: backend must be one of {_BACKENDS}, got {self.backend!r}")
        check_number("lr", self.lr, fn, 0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, fn, 0.0)
        check_int("seed", self.seed, fn, 0, 2**32 - 1)


@dataclass
class DDPResult:
    """What each rank reports, indexed by rank.

    ``first_grads[r]`` maps parameter names to rank ``r``'s gradients after the first backward
    pass (already all-reduced by DDP); ``losses[r]`` its local losses, one per step;
    ``params[r]`` its parameters after the last step.
    """

    first_grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    params: list[dict[str, torch.Tensor]] = field(default_factory=list)


def ddp_train(job: DDPJob, rank: int, world_size: int, device: torch.device | None = None) -> dict[str, Any]:
    """Train ``job`` as rank ``rank`` of an initialised process group; returns this rank's report.

    Builds the model (same seed everywhere; DDP also broadcasts rank 0's weights), wraps it in
    ``DistributedDataParallel`` and runs one AdamW step per batch on this rank's shard. DDP
    all-reduces (averages) the gradients during ``backward()``, so every rank applies the same
    update. Returns ``{"first_grads", "losses", "params"}`` on the CPU.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ddp_train: call torch.distributed.init_process_group first")
    if not isinstance(job, DDPJob):
        raise TypeError(f"ddp_train: job must be a DDPJob, got {type(job).__name__}")
    device = torch.device("cpu") if device is None else check_device("device", device, "ddp_train")
    set_seed(job.seed)
    model = GPT(job.config).to(device=device, dtype=job.dtype)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    losses, first_grads = [], {}
    for step, (idx, targets) in enumerate(job.batches):
        x = shard(idx, rank, world_size).to(device)
        y = shard(targets, rank, world_size).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = ddp_model(x, y).loss
        loss.backward()  # DDP averages the gradients over the ranks here
        if step == 0:
            first_grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    return {"first_grads": first_grads, "losses": losses, "params": params}


def _spawn_entry(rank: int, world_size: int, port: int, job: Any, out_dir: str, timeout_s: float) -> None:
    """Body of each process that :func:`run_ddp` and :func:`run_parallel` start: quiet, single-threaded, gloo."""
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")  # kept open for the life of the process
    os.dup2(log.fileno(), 1)  # C++ warnings of gloo go to the log, not to the notebook
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    torch.set_num_threads(1)
    dist.init_process_group(job.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        if isinstance(job, ParallelJob):
            checkpoint_dir = os.path.join(out_dir, "checkpoints")
            report = parallel_train(job, rank, world_size, checkpoint_dir)
        else:
            report = ddp_train(job, rank, world_size)
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _log_tails(out_dir: str, world_size: int) -> str:
    tails = []
    for r in range(world_size):
        path = Path(out_dir) / f"rank{r}.log"
        text = path.read_text(errors="replace")[-1500:] if path.exists() else "(no log)"
        tails.append(f"--- rank {r} ---\n{text}")
    return "\n".join(tails)


def _check_local_job(fn: str, job: object, kind: type) -> None:
    """``job`` is a ``kind`` that runs on this machine's CPU processes (the gloo backend)."""
    if not isinstance(job, kind):
        raise TypeError(f"{fn}: job must be a {kind.__name__}, got {type(job).__name__}")
    if job.backend != "gloo":
        raise ValueError(f"{fn}: processes on this machine use the gloo backend (CPU); got backend={job.backend!r}")


def _check_launch(fn: str, world_size: int, timeout_s: float, start_method: str | None) -> str:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{fn}: world_size must be a positive int, got {world_size!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"{fn}: timeout_s must be a positive number, got {timeout_s!r}")
    if start_method is None:  # fork is unsafe once this process has initialised CUDA
        linux = sys.platform.startswith("linux")
        start_method = "fork" if linux and not torch.cuda.is_initialized() else "spawn"
    if start_method not in mp.get_all_start_methods():
        raise ValueError(f"{fn}: start_method must be one of {mp.get_all_start_methods()}, got {start_method!r}")
    return start_method


def _launch(fn: str, job: Any, world_size: int, timeout_s: float, start_method: str) -> tuple[list[dict], list[str]]:
    """Start the ranks, wait for them, return their reports and the files in the checkpoint folder."""
    if start_method == "fork":
        importlib.import_module("torch._dynamo")  # DDP imports it: once here, not in every child
    with tempfile.TemporaryDirectory(prefix="mmbook-ddp-") as out_dir:
        port = find_free_port()
        ctx = mp.start_processes(_spawn_entry, args=(world_size, port, job, out_dir, float(timeout_s)),
                                 nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{fn}: the {world_size} processes did not finish within {timeout_s} s\n"
                                       + _log_tails(out_dir, world_size))
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            raise RuntimeError(f"{fn}: a rank failed: {err}\n{_log_tails(out_dir, world_size)}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
                    if p.is_alive():
                        p.kill()
                        p.join()
        reports = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
        ckpt = Path(out_dir) / "checkpoints"
        files = sorted(f.name for f in ckpt.iterdir()) if ckpt.is_dir() else []
    return reports, files


def run_ddp(
    job: DDPJob, world_size: int = 2, timeout_s: float = 120.0, start_method: str | None = None
) -> DDPResult:
    """Run ``job`` with DDP in ``world_size`` new processes on this machine; returns every rank's report.

    The processes are started with ``torch.multiprocessing`` — by default ``"fork"`` on Linux
    (the children inherit the already imported ``torch``, which saves seconds per process) and
    ``"spawn"`` elsewhere or once this process has initialised CUDA; only CPU tensors cross
    into them. They find each other over TCP
    on ``127.0.0.1`` at a port from :func:`find_free_port`, and use one CPU thread each. The
    whole run is bounded by ``timeout_s`` seconds: processes still alive then are terminated
    and ``TimeoutError`` is raised, with the tail of each rank's log. A rank that fails raises
    ``RuntimeError`` with its log.
    """
    fn = "run_ddp"
    _check_local_job(fn, job, DDPJob)
    start_method = _check_launch(fn, world_size, timeout_s, start_method)
    for i, (idx, _) in enumerate(job.batches):
        if idx.shape[0] % world_size:
            raise ValueError(f"{fn}: batch {i} has {idx.shape[0]} rows, not divisible by world_size={world_size}")
    reports, _ = _launch(fn, job, world_size, timeout_s, start_method)
    return DDPResult([r["first_grads"] for r in reports], [r["losses"] for r in reports],
                     [r["params"] for r in reports])


# ----------------------------------------------------------------------------- sampler, no_sync, ZeRO, FSDP2

_STRATEGIES = ("ddp", "zero", "fsdp")


@dataclass
class ParallelJob:
    """A dataset of windows trained data-parallel, the way real runs feed and shard it.

    ``inputs`` and ``targets`` are ``(n, T)`` int64 (every target a real token: each rank's
    micro-batches must hold equal token counts for the averaged gradient to be the batch's).
    Every epoch a ``DistributedSampler`` (shuffled with ``seed``, ``set_epoch(epoch)`` called)
    hands each rank ``n / world_size`` of the rows; a step takes ``batch_size`` of them per rank
    and splits them into ``accumulation_steps`` micro-batches. ``strategies`` are trained one
    after another in the same process group, each from the same initial weights:

    * ``"ddp"`` — ``DistributedDataParallel``; the first micro-batches under ``no_sync()``,
      the last one synchronised; afterwards rank 0 writes a checkpoint and every rank loads it;
    * ``"zero"`` — DDP with ``torch.distributed.optim.ZeroRedundancyOptimizer`` (ZeRO stage 1);
    * ``"fsdp"`` — FSDP2, ``torch.distributed.fsdp.fully_shard`` on every block and the model
      (ZeRO stage 3), gradient sync switched off for all but the last micro-batch.

    All three use AdamW with ``lr`` and ``weight_decay`` (0 by default, as in :class:`DDPJob`).
    """

    config: GPTConfig
    inputs: torch.Tensor
    targets: torch.Tensor
    batch_size: int = 4
    accumulation_steps: int = 2
    epochs: int = 2
    seed: int = 0
    lr: float = 1e-2
    weight_decay: float = 0.0
    dtype: torch.dtype = torch.float64
    strategies: tuple[str, ...] = _STRATEGIES
    backend: str = "gloo"

    def __post_init__(self) -> None:
        fn = "ParallelJob"
        if not isinstance(self.config, GPTConfig):
            raise TypeError(f"{fn}: config must be a GPTConfig, got {type(self.config).__name__}")
        for name in ("inputs", "targets"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.ndim != 2:
                raise TypeError(f"{fn}: {name} must be an int64 (n, T) tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if self.inputs.shape != self.targets.shape:
            raise ValueError(f"{fn}: inputs {tuple(self.inputs.shape)} and targets {tuple(self.targets.shape)} "
                             "must have the same shape")
        if self.inputs.shape[1] > self.config.block_size:
            raise ValueError(f"{fn}: T={self.inputs.shape[1]} > block_size={self.config.block_size}")
        check_ids("inputs", self.inputs, fn, self.config.vocab_size)
        check_ids("targets", self.targets, fn, self.config.vocab_size)
        check_int("batch_size", self.batch_size, fn, 1)
        check_int("accumulation_steps", self.accumulation_steps, fn, 1)
        check_int("epochs", self.epochs, fn, 1)
        check_int("seed", self.seed, fn, 0, 2**32 - 1)
        check_number("lr", self.lr, fn, 0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, fn, 0.0)
        if self.batch_size % self.accumulation_steps:
            raise ValueError(f"{fn}: batch_size={self.batch_size} is not divisible by "
                             f"accumulation_steps={self.accumulation_steps}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{fn}: dtype must be torch.float32 or torch.float64, got {self.dtype}")
        names = self.strategies
        if (not isinstance(names, tuple) or not names or any(s not in _STRATEGIES for s in names)
                or len(set(names)) < len(names)):
            raise ValueError(f"{fn}: strategies must be a non-empty tuple of distinct names from {_STRATEGIES}, "
                             f"got {self.strategies!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"{fn}: backend must be one of {_BACKENDS}, got {self.backend!r}")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _local_bytes(tensors: Any) -> int:
    """Sum of ``numel * element_size`` over this rank's local shards."""
    return sum(_local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def zero_partition(numels: list[int], world_size: int) -> list[list[int]]:
    """The tensors each rank of ``ZeroRedundancyOptimizer`` updates, predicted from their sizes alone.

    ``numels[i]`` is tensor ``i``'s element count (one parameter group). As PyTorch does, the
    tensors are sorted by size, largest first (a stable sort: equal sizes keep their order), and
    each goes to the rank holding the fewest elements so far (the lowest rank on a tie).
    Returns, per rank, the indices of its tensors in the order they were assigned.
    """
    fn = "zero_partition"
    check_int("world_size", world_size, fn, 1)
    if not isinstance(numels, (list, tuple)):
        raise TypeError(f"{fn}: numels must be a list of ints, got {type(numels).__name__}")
    for i, n in enumerate(numels):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{fn}: numels[{i}] must be a non-negative int, got {n!r}")
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    sizes = [0] * world_size
    for i in sorted(range(len(numels)), key=lambda j: numels[j], reverse=True):
        r = sizes.index(min(sizes))
        ranks[r].append(i)
        sizes[r] += numels[i]
    return ranks


def save_checkpoint(state: dict[str, torch.Tensor], path: str | os.PathLike) -> bool:
    """Write ``state`` to ``path`` with exclusive create (``open(path, "xb")``); returns True once written.

    A second writer of the same path raises ``FileExistsError`` instead of silently overwriting
    (or interleaving with) the first: "only one rank writes" becomes a property that can fail.
    """
    with open(path, "xb") as f:
        torch.save(state, f)
    return True


def _counting_allreduce(calls, bucket):  # noqa: ANN001, ANN202 (DDP rejects annotations other than GradBucket)
    """DDP's default communication: average one bucket over the ranks with an all-reduce; counts the calls."""
    calls[0] += 1
    tensor = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])


def _build(job: ParallelJob, strategy: str, device: torch.device) -> tuple[GPT, torch.nn.Module, Any]:
    """The same initial model on every rank, wrapped and given an optimizer for ``strategy``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    set_seed(job.seed)
    model = GPT(job.config).to(device=device, dtype=job.dtype)
    adamw = {"lr": job.lr, "weight_decay": job.weight_decay}
    if strategy == "fsdp":
        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        return model, model, torch.optim.AdamW(model.parameters(), **adamw)
    # gradient_as_bucket_view: .grad *is* a view into DDP's all-reduce buckets, not a second gradient-sized copy
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)
    if strategy == "zero":
        return model, wrapped, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **adamw)
    return model, wrapped, torch.optim.AdamW(model.parameters(), **adamw)


def _state_bytes(model: GPT, optimizer: Any, strategy: str) -> dict[str, int]:
    """This rank's parameter, gradient and optimizer-state bytes (local shards)."""
    params = list(model.parameters())
    state = optimizer.optim.state if strategy == "zero" else optimizer.state
    return {"param_bytes": _local_bytes(params),
            "grad_bytes": _local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer_state_bytes": _local_bytes(v for s in state.values() for v in s.values())}


def _checkpoint_roundtrip(job: ParallelJob, model: GPT, rank: int, checkpoint_dir: str,
                          device: torch.device) -> dict[str, bool]:
    """Rank 0 writes the (replicated) weights; after a barrier every rank loads them into a fresh model."""
    path = os.path.join(checkpoint_dir, "model.pt")
    wrote = False
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        wrote = save_checkpoint(model.state_dict(), path)
    dist.barrier()  # the other ranks wait until the file is complete
    set_seed(job.seed + 1)  # different initial weights, so that loading must overwrite them
    fresh = GPT(job.config).to(device=device, dtype=job.dtype)
    fresh.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    loaded = all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))
    dist.barrier()  # nobody leaves (and nobody deletes the folder) before every rank has read the file
    return {"wrote_checkpoint": wrote, "loaded_equal": loaded}


def parallel_train(
    job: ParallelJob, rank: int, world_size: int, checkpoint_dir: str, device: torch.device | None = None
) -> dict[str, Any]:
    """Train ``job`` as rank ``rank`` of an initialised process group; returns this rank's report.

    The report holds ``"sampler"`` (this rank's row indices, one list per epoch) and, per
    strategy, a dict with ``"losses"`` (one per micro-batch), ``"params"`` (the full trained
    parameters, gathered from the shards for FSDP), ``"param_bytes"``, ``"grad_bytes"`` and
    ``"optimizer_state_bytes"`` (this rank's tensors after the last step: ``numel *
    element_size`` of the local shards), and ``"allreduce_calls"`` (per step, the bucket
    all-reduces of each micro-batch's backward, counted by a DDP communication hook; FSDP: 0). ``"ddp"`` adds
    ``"grads_before_sync"`` and ``"grads_after_sync"`` (first step, after all but the last
    micro-batch under ``no_sync()`` and after the last one), ``"wrote_checkpoint"`` (whether
    this rank's exclusive-create write succeeded) and ``"loaded_equal"`` (every rank's model
    loaded from rank 0's checkpoint equals its trained weights). ``checkpoint_dir`` must be a
    folder every rank can read (rank 0 creates it). The rows must divide into steps of
    ``world_size * batch_size``: otherwise ``DistributedSampler`` would pad with repeated rows.
    """
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    fn = "parallel_train"
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: call torch.distributed.init_process_group first")
    if not isinstance(job, ParallelJob):
        raise TypeError(f"{fn}: job must be a ParallelJob, got {type(job).__name__}")
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"{fn}: checkpoint_dir must be a path, got {type(checkpoint_dir).__name__}")
    _check_rows(fn, job, world_size)
    device = torch.device("cpu") if device is None else check_device("device", device, fn)
    dataset = TensorDataset(job.inputs, job.targets)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed(job.seed))
    loader = DataLoader(dataset, batch_size=job.batch_size, sampler=sampler, drop_last=True)
    report: dict[str, Any] = {"sampler": []}
    for epoch in range(job.epochs):
        sampler.set_epoch(epoch)  # without it every epoch repeats epoch 0's order
        report["sampler"].append(list(sampler))
    k = job.accumulation_steps

    for strategy in job.strategies:
        model, wrapped, optimizer = _build(job, strategy, device)
        out: dict[str, Any] = {"losses": [], "allreduce_calls": []}
        calls = [0]
        if strategy != "fsdp":
            wrapped.register_comm_hook(calls, _counting_allreduce)
        first = True
        for epoch in range(job.epochs):
            sampler.set_epoch(epoch)
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                step_calls = []
                for i, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
                    calls[0] = 0
                    last = i == k - 1
                    if strategy == "fsdp":
                        model.set_requires_gradient_sync(last)
                        ctx = contextlib.nullcontext()
                    else:
                        ctx = contextlib.nullcontext() if last else wrapped.no_sync()
                    if first and last and strategy == "ddp" and k > 1:
                        out["grads_before_sync"] = {n: p.grad.detach().cpu().clone()
                                                    for n, p in model.named_parameters()}
                    with ctx:
                        loss = wrapped(xm.to(device), ym.to(device)).loss
                        (loss / k).backward()  # equal micro-batches: the batch mean is the mean of the means
                    out["losses"].append(loss.item())
                    step_calls.append(calls[0])
                if first and strategy == "ddp":
                    out["grads_after_sync"] = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
                first = False
                out["allreduce_calls"].append(step_calls)
                optimizer.step()
        out.update(_state_bytes(model, optimizer, strategy))
        out["params"] = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
                         for n, p in model.named_parameters()}
        if strategy == "ddp":
            out.update(_checkpoint_roundtrip(job, model, rank, checkpoint_dir, device))
        report[strategy] = out
    return report


def _check_rows(fn: str, job: ParallelJob, world_size: int) -> None:
    n, step = job.inputs.shape[0], world_size * job.batch_size
    if n < step or n % step:
        raise ValueError(f"{fn}: the job's n={n} rows must be a positive multiple of world_size * batch_size = "
                         f"{world_size} * {job.batch_size} (DistributedSampler would pad with repeated rows)")


@dataclass
class ParallelResult:
    """What :func:`run_parallel` returns: ``ranks[r]`` is rank ``r``'s report from :func:`parallel_train`,
    ``checkpoint_files`` the names in the checkpoint folder after the run."""

    ranks: list[dict[str, Any]]
    checkpoint_files: list[str]


def run_parallel(
    job: ParallelJob, world_size: int = 2, timeout_s: float = 120.0, start_method: str | None = None
) -> ParallelResult:
    """Run ``job`` in ``world_size`` new gloo processes on this machine, as :func:`run_ddp` does.

    The dataset's rows must be a positive multiple of ``world_size * batch_size`` (so that every
    rank takes the same number of equal steps and no rank's sampler pads with repeated rows).
    """
    fn = "run_parallel"
    _check_local_job(fn, job, ParallelJob)
    start_method = _check_launch(fn, world_size, timeout_s, start_method)
    _check_rows(fn, job, world_size)
    reports, files = _launch(fn, job, world_size, timeout_s, start_method)
    return ParallelResult(reports, files)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``torchrun -m mmbook.distributed``: a small GPT trained data-parallel on random tokens.

    Reads ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from the environment ``torchrun`` sets;
    uses ``nccl`` and GPU ``LOCAL_RANK`` when CUDA is available, else ``gloo`` on the CPU.
    Runs :func:`parallel_train` (the chapter's sampler, ``no_sync`` accumulation, rank-0
    checkpoint, ZeRO-1 and FSDP2) for each ``--strategy``; rank 0 prints the loss of each step
    and every rank's bytes. Returns the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m mmbook.distributed", description=main.__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (rows), split over the ranks")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--accumulation-steps", type=int, default=1, help="micro-batches per rank and step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--strategy", nargs="+", choices=_STRATEGIES, default=["ddp"],
                        help="one or more of ddp, zero (ZeRO-1), fsdp (FSDP2), trained one after another")
    parser.add_argument("--checkpoint-dir", default="checkpoints",
                        help="folder for rank 0's checkpoint (ddp); every rank must be able to read it")
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                        ("--accumulation-steps", args.accumulation_steps), ("--lr", args.lr)):
        if not value > 0 or value == float("inf"):
            parser.error(f"{flag} must be positive, got {value}")
    if len(set(args.strategy)) < len(args.strategy):
        parser.error(f"--strategy names must be distinct, got {args.strategy}")
    if "RANK" not in os.environ:
        parser.error("run me under torchrun, e.g. torchrun --standalone --nproc_per_node=2 -m mmbook.distributed")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    per_rank = args.batch_size // world_size
    if args.batch_size % world_size or per_rank % args.accumulation_steps:
        parser.error(f"--batch-size {args.batch_size} must split into {world_size} ranks of "
                     f"--accumulation-steps {args.accumulation_steps} equal micro-batches")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=120))
    try:
        config = GPTConfig(block_size=args.seq_len)
        # every rank draws the same dataset; the sampler gives each its rows
        tokens = torch.randint(0, config.vocab_size, (args.steps * args.batch_size, args.seq_len + 1),
                               generator=torch_generator(1))
        job = ParallelJob(config, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), batch_size=per_rank,
                          accumulation_steps=args.accumulation_steps, epochs=1, lr=args.lr, dtype=torch.float32,
                          strategies=tuple(args.strategy), backend=backend)
        report = parallel_train(job, rank, world_size, args.checkpoint_dir, device)
        k = args.accumulation_steps
        for strategy in args.strategy:
            out = report[strategy]
            held = [out["param_bytes"], out["grad_bytes"], out["optimizer_state_bytes"],
                    out.get("wrote_checkpoint"), out.get("loaded_equal")]
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, held)
            if rank == 0:
                for step in range(args.steps):
                    loss = sum(out["losses"][step * k:(step + 1) * k]) / k
                    print(f"{strategy} step {step}: loss on rank 0's rows {loss:.4f}")
                for r, (p, g, s, _, _) in enumerate(gathered):
                    print(f"{strategy} rank {r}: parameter bytes {p:,}, gradient bytes {g:,}, "
                          f"optimizer-state bytes {s:,}")
                if strategy == "ddp":
                    writers = [r for r, held in enumerate(gathered) if held[3]]
                    print(f"ddp checkpoint model.pt: written by ranks {writers}, loaded back equal on every rank: "
                          f"{all(held[4] for held in gathered)}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
