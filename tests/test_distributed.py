import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmbook
from mmbook.distributed import (
    DDPJob,
    DDPResult,
    ParallelJob,
    ddp_train,
    find_free_port,
    main,
    parallel_train,
    run_ddp,
    run_parallel,
    save_checkpoint,
    shard,
    zero_partition,
)
from mmbook.gpt import GPT, GPTConfig

TINY = GPTConfig(vocab_size=29, block_size=8, n_layer=1, n_head=2, d_model=8)


def _batches(n=2, batch=4, seq=8, seed=0):
    g = mmbook.torch_generator(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, TINY.vocab_size, (batch, seq + 1), generator=g)
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def test_find_free_port_can_be_bound():
    port = find_free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
    with pytest.raises(TypeError, match="host must be a non-empty str"):
        find_free_port("")


def test_shard_partitions_the_batch():
    x = torch.arange(12).reshape(6, 2)
    parts = [shard(x, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), x)
    with pytest.raises(ValueError, match="not divisible by world_size=4"):
        shard(x, 0, 4)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        shard(x, 3, 3)
    with pytest.raises(TypeError, match="rank must be an int"):
        shard(x, 0.0, 3)


def test_ddp_job_bad_input():
    with pytest.raises(ValueError, match="batches must be a non-empty list"):
        DDPJob(TINY, [])
    with pytest.raises(TypeError, match=r"batches\[0\] must be a pair"):
        DDPJob(TINY, [(torch.zeros(2, 3), torch.zeros(2, 3))])
    with pytest.raises(ValueError, match="backend must be one of"):
        DDPJob(TINY, _batches(1), backend="mpi")
    with pytest.raises(ValueError, match="dtype must be"):
        DDPJob(TINY, _batches(1), dtype=torch.float16)


def test_ddp_train_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group first"):
        ddp_train(DDPJob(TINY, _batches(1)), 0, 1)


def test_run_ddp_bad_input():
    job = DDPJob(TINY, _batches(1, batch=3))
    with pytest.raises(ValueError, match="not divisible by world_size=2"):
        run_ddp(job, 2)
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        run_ddp(DDPJob(TINY, _batches(1)), 2, timeout_s=0)
    with pytest.raises(TypeError, match="job must be a DDPJob"):
        run_ddp({"config": TINY}, 2)


def test_main_outside_torchrun_exits(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit):
        main([])


def test_ddp_two_gloo_processes_equal_single_process():
    batches = _batches(3, batch=4)
    result = run_ddp(DDPJob(TINY, batches, seed=0, lr=1e-2), world_size=2, timeout_s=60)
    assert isinstance(result, DDPResult) and len(result.params) == 2
    mmbook.set_seed(0)
    model = GPT(TINY).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step, (idx, targets) in enumerate(batches):
        opt.zero_grad()
        model(idx, targets).loss.backward()
        if step == 0:
            for rank in range(2):  # the all-reduced gradient is the whole batch's gradient
                for name, p in model.named_parameters():
                    # float64; averaging two half-batch means instead of one mean: round-off ~1e-16
                    torch.testing.assert_close(result.first_grads[rank][name], p.grad, rtol=1e-10, atol=1e-13)
        opt.step()
    for rank in range(2):
        for name, p in model.named_parameters():
            torch.testing.assert_close(result.params[rank][name], p.detach(), rtol=1e-10, atol=1e-12)
    # each rank saw a different half of the batch, so their local losses differ
    assert result.losses[0] != result.losses[1]


def test_job_settings_and_token_ids_are_checked_in_the_parent():
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=8)
    good = torch.zeros(2, 4, dtype=torch.long)
    for bad in (16, -1):  # a child process would fail with a log tail instead
        with pytest.raises(ValueError, match=r"DDPJob: batches\[0\] idx must lie in \[0, 16\)"):
            DDPJob(config, [(torch.full((2, 4), bad), good)])
    with pytest.raises(ValueError, match=r"DDPJob: batches\[0\] has T=9 > block_size=8"):
        DDPJob(config, [(torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long))])
    for name, bad in (("lr", float("nan")), ("weight_decay", float("nan"))):
        with pytest.raises(ValueError, match=f"DDPJob: {name} must be"):
            DDPJob(config, [(good, good)], **{name: bad})
    with pytest.raises(ValueError, match="DDPJob: seed must be an int in"):
        DDPJob(config, [(good, good)], seed=-1)
    with pytest.raises(SystemExit):
        main(["--steps", "0"])


def _windows(n=8, seq=8, seed=0):
    g = mmbook.torch_generator(seed)
    t = torch.randint(0, TINY.vocab_size, (n, seq + 1), generator=g)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def test_parallel_job_bad_input():
    x, y = _windows()
    with pytest.raises(TypeError, match="ParallelJob: inputs must be an int64"):
        ParallelJob(TINY, x.float(), y)
    with pytest.raises(ValueError, match="must have the same shape"):
        ParallelJob(TINY, x, y[:, :4])
    with pytest.raises(ValueError, match=r"ParallelJob: targets must lie in \[0, 29\)"):
        ParallelJob(TINY, x, torch.full_like(y, -100))  # no padding: every micro-batch holds equal token counts
    with pytest.raises(ValueError, match="batch_size=3 is not divisible by accumulation_steps=2"):
        ParallelJob(TINY, x, y, batch_size=3)
    with pytest.raises(ValueError, match="strategies must be a non-empty tuple"):
        ParallelJob(TINY, x, y, strategies=("ddp", "zero3"))
    with pytest.raises(ValueError, match="strategies must be a non-empty tuple"):
        ParallelJob(TINY, x, y, strategies=("ddp", "ddp"))
    with pytest.raises(ValueError, match="ParallelJob: epochs must be"):
        ParallelJob(TINY, x, y, epochs=0)


def test_run_parallel_bad_input(tmp_path):
    x, y = _windows(n=6)
    with pytest.raises(ValueError, match=r"n=6 rows must be a positive multiple of world_size \* batch_size = 2 \* 4"):
        run_parallel(ParallelJob(TINY, x, y), 2)
    with pytest.raises(ValueError, match=r"n=0 rows must be a positive multiple"):  # an empty dataset trains nothing
        run_parallel(ParallelJob(TINY, x[:0], y[:0]), 2)
    with pytest.raises(TypeError, match="job must be a ParallelJob"):
        run_parallel(DDPJob(TINY, _batches(1)), 2)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        run_parallel(ParallelJob(TINY, *_windows()), 0)
    with pytest.raises(RuntimeError, match="init_process_group first"):
        parallel_train(ParallelJob(TINY, *_windows()), 0, 1, str(tmp_path))


def test_sampler_no_sync_checkpoint_zero_and_fsdp_equal_single_process():
    x, y = _windows(n=8)
    job = ParallelJob(TINY, x, y, batch_size=2, accumulation_steps=2, epochs=2, seed=0, lr=1e-2)
    result = run_parallel(job, world_size=2, timeout_s=90)
    assert result.checkpoint_files == ["model.pt"]
    ranks = result.ranks
    for epoch in range(2):  # disjoint shards whose union is the dataset
        a, b = ranks[0]["sampler"][epoch], ranks[1]["sampler"][epoch]
        assert not set(a) & set(b) and sorted(a + b) == list(range(8))
    assert ranks[0]["sampler"][0] != ranks[0]["sampler"][1]  # set_epoch reshuffles
    mmbook.set_seed(0)
    model = GPT(TINY).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for epoch in range(2):
        for step in range(2):
            rows = [i for r in range(2) for i in ranks[r]["sampler"][epoch][2 * step:2 * step + 2]]
            opt.zero_grad()
            model(x[rows], y[rows]).loss.backward()
            if epoch == step == 0:
                for r in range(2):
                    for name, p in model.named_parameters():
                        torch.testing.assert_close(ranks[r]["ddp"]["grads_after_sync"][name], p.grad,
                                                   rtol=1e-10, atol=1e-13)
            opt.step()
    before = [ranks[r]["ddp"]["grads_before_sync"] for r in range(2)]
    assert any(not torch.equal(before[0][n], before[1][n]) for n in before[0])  # no_sync: local gradients
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    for strategy in ("ddp", "zero", "fsdp"):
        for r in range(2):
            for name, p in model.named_parameters():
                torch.testing.assert_close(ranks[r][strategy]["params"][name], p.detach(), rtol=1e-10, atol=1e-12)
    assert [ranks[r]["ddp"]["wrote_checkpoint"] for r in range(2)] == [True, False]  # exclusive create
    for strategy in ("ddp", "zero"):  # no_sync: no all-reduce for the first micro-batch, one bucket for the last
        assert all(ranks[r][strategy]["allreduce_calls"] == [[0, 1]] * 4 for r in range(2))
    assert ranks[0]["ddp"]["grad_bytes"] == 8 * n_params  # gradient_as_bucket_view: .grad is the bucket
    assert all(ranks[r]["ddp"]["loaded_equal"] for r in range(2))
    zero_state = [ranks[r]["zero"]["optimizer_state_bytes"] for r in range(2)]
    assert sum(zero_state) == 16 * n_params + 4 * n_tensors  # exp_avg, exp_avg_sq in float64, float32 steps
    numels = [p.numel() for p in model.parameters()]
    for r, tensors in enumerate(zero_partition(numels, 2)):  # the greedy split, byte for byte
        assert zero_state[r] == sum(16 * numels[i] + 4 for i in tensors)
    # FSDP2 splits every tensor along dim 0 (vocab 29: 15 rows on rank 0, 14 on rank 1): the shards add up to N
    assert sum(ranks[r]["fsdp"]["param_bytes"] for r in range(2)) == 8 * n_params
    assert sum(ranks[r]["fsdp"]["grad_bytes"] for r in range(2)) == 8 * n_params
    assert ranks[0]["ddp"]["param_bytes"] == 8 * n_params


def test_zero_partition_is_greedy_largest_first():
    assert zero_partition([5, 3, 3, 2], 2) == [[0, 3], [1, 2]]
    assert zero_partition([1, 1, 1], 2) == [[0, 2], [1]]  # ties: stable order, lowest rank
    assert zero_partition([], 3) == [[], [], []]
    with pytest.raises(ValueError, match=r"numels\[1\] must be a non-negative int"):
        zero_partition([1, -1], 2)
    with pytest.raises(ValueError, match="world_size must be"):
        zero_partition([1], 0)


def test_save_checkpoint_refuses_a_second_writer(tmp_path):
    path = tmp_path / "model.pt"
    state = {"w": torch.arange(3.0)}
    assert save_checkpoint(state, path) is True  # the first writer (rank 0)
    with pytest.raises(FileExistsError):  # a second rank writing the same path fails instead of racing
        save_checkpoint({"w": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])


def test_parallel_train_checks_rows_and_folder(tmp_path):
    with pytest.raises(TypeError, match="checkpoint_dir must be a path"):
        _with_group(lambda: parallel_train(ParallelJob(TINY, *_windows()), 0, 1, None))
    with pytest.raises(ValueError, match="n=6 rows must be a positive multiple"):
        _with_group(lambda: parallel_train(ParallelJob(TINY, *_windows(n=6)), 0, 1, str(tmp_path)))


def _with_group(fn):
    import torch.distributed as dist

    from mmbook.distributed import find_free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    try:
        return fn()
    finally:
        dist.destroy_process_group()


def test_torchrun_runs_every_strategy(tmp_path):
    """The path section 8 tells readers to use on a cluster, run with two gloo processes."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "mmbook.distributed", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--accumulation-steps", "2",
           "--strategy", "ddp", "zero", "fsdp", "--checkpoint-dir", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for strategy in ("ddp", "zero", "fsdp"):
        assert sum(line.startswith(f"{strategy} step ") for line in lines) == 2
        assert sum(line.startswith(f"{strategy} rank ") for line in lines) == 2
    assert "ddp checkpoint model.pt: written by ranks [0], loaded back equal on every rank: True" in lines
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.pt"]
