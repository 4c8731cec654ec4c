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
    "shard",
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
    if not isinstance(job, DDPJob):
        raise TypeError(f"{fn}: job must be a DDPJob, got {type(job).__name__}")
    if job.backend != "gloo":
        raise ValueError(f"{fn}: processes on this machine use the gloo backend (CPU); got backend={job.backend!r}")
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
    """

    config: GPTConfig
    inputs: torch.Tensor
    targets: torch.Tensor
    batch_size: int = 4
    accumulation_steps: int = 2
    epochs: int = 2
    seed: int = 0
    lr: float = 1e-2
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


def parallel_train(
    job: ParallelJob, rank: int, world_size: int, checkpoint_dir: str, device: torch.device | None = None
) -> dict[str, Any]:
    """Train ``job`` as rank ``rank`` of an initialised process group; returns this rank's report.

    The report holds ``"sampler"`` (this rank's row indices, one list per epoch) and, per
    strategy, a dict with ``"losses"`` (one per micro-batch), ``"params"`` (the full trained
    parameters, gathered from the shards for FSDP), ``"param_bytes"``, ``"grad_bytes"`` and
    ``"optimizer_state_bytes"`` (this rank's tensors after the last step: ``numel *
    element_size`` of the local shards). ``"ddp"`` adds ``"grads_before_sync"`` and
    ``"grads_after_sync"`` (first step, after all but the last micro-batch under ``no_sync()``
    and after the last one), ``"wrote_checkpoint"`` and ``"loaded_equal"`` (every rank's model
    loaded from rank 0's checkpoint equals its trained weights). ``checkpoint_dir`` must be a
    folder every rank can read (rank 0 creates it).
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    fn = "parallel_train"
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: call torch.distributed.init_process_group first")
    if not isinstance(job, ParallelJob):
        raise TypeError(f"{fn}: job must be a ParallelJob, got {type(job).__name__}")
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
        set_seed(job.seed)
        model = GPT(job.config).to(device=device, dtype=job.dtype)
        if strategy == "fsdp":
            for block in model.h:
                fully_shard(block)
            fully_shard(model)
            wrapped = model
            optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=0.0)
        else:
            wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            if strategy == "zero":
                optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                                    lr=job.lr, weight_decay=0.0)
            else:
                optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=0.0)
        out: dict[str, Any] = {"losses": []}
        first = True
        for epoch in range(job.epochs):
            sampler.set_epoch(epoch)
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                for i, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
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
                if first and strategy == "ddp":
                    out["grads_after_sync"] = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
                first = False
                optimizer.step()
        params = list(model.parameters())
        out["param_bytes"] = _local_bytes(params)
        out["grad_bytes"] = _local_bytes(p.grad for p in params if p.grad is not None)
        state = optimizer.optim.state if strategy == "zero" else optimizer.state
        out["optimizer_state_bytes"] = _local_bytes(v for s in state.values() for v in s.values())
        out["params"] = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
                         for n, p in model.named_parameters()}
        if strategy == "ddp":  # rank 0 writes, the others wait at the barrier, then everyone reads
            path = os.path.join(checkpoint_dir, "model.pt")
            out["wrote_checkpoint"] = rank == 0
            if rank == 0:
                os.makedirs(checkpoint_dir, exist_ok=True)
                torch.save(model.state_dict(), path)
            dist.barrier()
            set_seed(job.seed + 1)  # different initial weights, so that loading must overwrite them
            fresh = GPT(job.config).to(device=device, dtype=job.dtype)
            fresh.load_state_dict(torch.load(path, map_location=device, weights_only=True))
            out["loaded_equal"] = all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(),
                                                                        strict=True))
            dist.barrier()  # nobody leaves (and nobody deletes the folder) before every rank has read the file
        report[strategy] = out
    return report


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

    The dataset's rows must divide into ``world_size * batch_size`` per step (so that every rank
    takes the same number of equal steps and no rank's sampler pads with repeated rows).
    """
    fn = "run_parallel"
    if not isinstance(job, ParallelJob):
        raise TypeError(f"{fn}: job must be a ParallelJob, got {type(job).__name__}")
    if job.backend != "gloo":
        raise ValueError(f"{fn}: processes on this machine use the gloo backend (CPU); got backend={job.backend!r}")
    start_method = _check_launch(fn, world_size, timeout_s, start_method)
    n = job.inputs.shape[0]
    if n % (world_size * job.batch_size):
        raise ValueError(f"{fn}: {n} rows do not divide into steps of world_size * batch_size = "
                         f"{world_size} * {job.batch_size}")
    reports, files = _launch(fn, job, world_size, timeout_s, start_method)
    return ParallelResult(reports, files)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``torchrun -m mmbook.distributed``: DDP training of a small GPT on random tokens.

    Reads ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from the environment ``torchrun`` sets;
    uses ``nccl`` and GPU ``LOCAL_RANK`` when CUDA is available, else ``gloo`` on the CPU.
    Rank 0 prints the loss of each step. Returns the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m mmbook.distributed", description=main.__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (rows), split over the ranks")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                        ("--lr", args.lr)):
        if not value > 0 or value == float("inf"):
            parser.error(f"{flag} must be positive, got {value}")
    if "RANK" not in os.environ:
        parser.error("run me under torchrun, e.g. torchrun --standalone --nproc_per_node=2 -m mmbook.distributed")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=120))
    try:
        config = GPTConfig(block_size=args.seq_len)
        gen = torch_generator(1)  # every rank draws the same global batches
        batches = []
        for _ in range(args.steps):
            tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
            batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
        job = DDPJob(config, batches, lr=args.lr, dtype=torch.float32, backend=backend)
        report = ddp_train(job, rank, world_size, device)
        if rank == 0:
            for step, loss in enumerate(report["losses"]):
                print(f"step {step}: loss on rank 0's shard {loss:.4f}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
