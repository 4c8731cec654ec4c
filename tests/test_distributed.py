import socket

import pytest
import torch

from mmbook.distributed import DDPJob, DDPResult, ddp_train, find_free_port, main, run_ddp, shard
from mmbook.gpt import GPT, GPTConfig

TINY = GPTConfig(vocab_size=29, block_size=8, n_layer=1, n_head=2, d_model=8)


def _batches(n=2, batch=4, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
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
    torch.manual_seed(0)
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
