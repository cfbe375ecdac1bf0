"""Data parallelism: a 2-process gloo run equals the single-process computation on the global batch.

This file is also the worker script: `torchrun --nproc-per-node 2 tests/test_distributed.py OUT`.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rrcm.model import Encoder
from rrcm.presets import get_preset
from rrcm.schedule import karras_times
from rrcm.train import loop, pretrain
from rrcm.distributed import DistEnv, run_in_process_group, setup, teardown
from rrcm.train.distributed import all_reduce_mean, global_batchnorm

TINY = get_preset("tiny")
GLOBAL_BATCH, STEPS, NUM_SCALES = 8, 3, 41
FMNIST = "/usr/share/datasets/fashion-mnist"


def global_inputs(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x, a, b = (torch.rand(GLOBAL_BATCH, *TINY.input_shape, generator=g) * 2 - 1 for _ in range(3))
    return x, a, b, torch.randn(x.shape, generator=g)


def train_steps(env: DistEnv, wrap) -> dict:
    """STEPS steps of the rRCM objective on this process's share of fixed global batches."""
    torch.manual_seed(0)
    enc = Encoder(TINY)
    if env.distributed:
        global_batchnorm(enc)
    target = copy.deepcopy(enc).requires_grad_(False)
    online = wrap(pretrain.OnlineNet(enc))
    opt = torch.optim.AdamW(loop.param_groups(enc, 0.05), lr=1e-3)
    grid = karras_times(NUM_SCALES)
    local = GLOBAL_BATCH // env.world_size
    mine = slice(env.rank * local, (env.rank + 1) * local)
    records = []
    for step in range(STEPS):
        x, a, b, n = (v[mine] for v in global_inputs(step))
        # Every process draws rank 0's time index, as Pretrainer does: the processes agree without a broadcast.
        i = int(torch.randint(NUM_SCALES - 1, (1,), generator=loop.make_generator("cpu", 7, step, 0)))
        opt.zero_grad(set_to_none=True)
        loss, parts = pretrain.rrcm_loss(online, enc, target, x, a, b, n, float(grid[i]), float(grid[i + 1]), env.rank)
        loss.backward()
        records.append({"i": i, "loss": all_reduce_mean(loss), "parts": {k: all_reduce_mean(v) for k, v in parts.items()},
                        "grads": {k: p.grad.clone() for k, p in enc.named_parameters()}})
        opt.step()
        pretrain.ema_update(target, enc, 0.99)
    return {"records": records, "model": enc.state_dict(), "target": target.state_dict()}


def worker(out: Path) -> None:
    env = setup("cpu")
    result = train_steps(env, lambda m: torch.nn.parallel.DistributedDataParallel(m))
    torch.save(result, out / f"rank{env.rank}.pt")
    teardown()


def failing_worker() -> int:
    """Rank 0 fails; rank 1 finishes and waits to leave with the others."""
    def train(args, env: DistEnv) -> int:
        if env.is_main:
            raise SystemExit("rank 0 failed")
        return 0
    return run_in_process_group(train, argparse.Namespace(device="cpu"))


def torchrun(*args: str, timeout: int = 300, succeed: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert (result.returncode == 0) == succeed, result.stderr[-3000:]
    return result


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    torchrun(__file__, str(tmp_path))
    single = train_steps(DistEnv(), lambda m: m)
    for rank in range(2):
        dist = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for ref, got in zip(single["records"], dist["records"]):
            assert got["i"] == ref["i"]  # the time index is rank 0's on every process
            assert close(got["loss"], ref["loss"])
            assert all(close(got["parts"][k], ref["parts"][k]) for k in ref["parts"])
            assert ref["grads"].keys() == got["grads"].keys()
            for name in ref["grads"]:
                assert close(got["grads"][name], ref["grads"][name]), name
        # After the optimizer and EMA steps: same weights, and the same BatchNorm running statistics.
        for state in ("model", "target"):
            assert single[state].keys() == dist[state].keys()
            for name in single[state]:
                assert close(dist[state][name], single[state][name]), (state, name)


def test_single_process_collectives_are_identities():
    t = torch.randn(4, 3)
    assert torch.equal(pretrain.gather_keys(t), t)
    assert torch.equal(all_reduce_mean(t), t)


@pytest.mark.slow
@pytest.mark.skipif(not Path(FMNIST).is_dir(), reason=f"Fashion-MNIST is not installed in {FMNIST}")
def test_pretrain_and_finetune_commands_under_torchrun(tmp_path):
    common = ["--preset", "tiny", "--batch-size", "32", "--max-train-images", "128", "--log-every", "1", "--device", "cpu"]
    enc, clf = tmp_path / "enc", tmp_path / "clf"
    torchrun("-m", "rrcm", "pretrain", "--steps", "3", "--out", str(enc), *common)
    log = [json.loads(line) for line in (enc / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # written once, by rank 0
    result = torchrun("-m", "rrcm", "finetune", "--init", str(enc), "--sigma", "0.5", "--steps", "2", "--eval-images", "50",
                      "--out", str(clf), *common[2:])
    assert "2 process(es)" in result.stdout and "on the first 50 test images" in result.stdout
    config = json.loads((clf / "config.json").read_text())
    assert config["kind"] == "classifier" and config["test_images"] == 50


@pytest.mark.slow
def test_a_failing_process_does_not_leave_the_others_waiting():
    result = torchrun(__file__, "--fail", timeout=120, succeed=False)  # a hang would raise TimeoutExpired
    assert "rank 0 failed" in result.stderr


if __name__ == "__main__":
    sys.exit(failing_worker()) if sys.argv[1] == "--fail" else worker(Path(sys.argv[1]))
