"""Training on a CUDA GPU: the data path on the device, no host synchronization between log lines,
exact resume, a time-budgeted command. Skipped without CUDA; on a GPU machine:
python -m pytest -m cuda tests/test_train_cuda.py
"""
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: set before its first use

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from torch.nn.attention import SDPBackend, sdpa_kernel

import rrcm
from rrcm.augment import PretrainViews, finetune_view
from rrcm.cli import main
from rrcm.data import TensorImageDataset
from rrcm.distributed import DistEnv
from rrcm.train import loop
from test_train import (common, fmnist_dir, read_log, same_weights, six_steps,  # noqa: F401 (fmnist_dir: a fixture)
                        straight_and_killed, trainer_for)

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture
def no_sync():
    """Inside, a host synchronization raises (torch.cuda.set_sync_debug_mode("error")); `no_sync(False)` ends it early."""
    def switch(on: bool = True) -> None:
        torch.cuda.set_sync_debug_mode("error" if on else "default")
    yield switch
    switch(False)


@pytest.fixture
def deterministic():
    """Bit-for-bit repeatable kernels: deterministic algorithms and the math attention backend."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    with sdpa_kernel([SDPBackend.MATH]):
        yield
    torch.use_deterministic_algorithms(False)


def test_data_and_batch_order_on_the_device_match_the_host(fmnist_dir):
    g = torch.Generator().manual_seed(0)
    data = TensorImageDataset("fashion-mnist", 10, torch.randint(0, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8),
                              torch.arange(40) % 10)
    on_gpu = data.to(CUDA)
    host, device = loop.BatchOrder(40, 8, seed=3), loop.BatchOrder(40, 8, seed=3, device=CUDA)
    for step in range(12):  # across epochs: a new permutation every 5 steps
        idx = device.indices(step, DistEnv(device=CUDA))
        assert idx.is_cuda and torch.equal(idx.cpu(), host.indices(step, DistEnv()))
        x, y = on_gpu.batch(idx)
        x0, y0 = data.batch(idx.cpu())
        assert x.is_cuda and torch.equal(x.cpu(), x0) and torch.equal(y.cpu(), y0)


@pytest.mark.parametrize("channels", [1, 3])
def test_views_on_the_device_queue_without_synchronizing(channels, no_sync):
    x = torch.rand(256, channels, 28, 28, device=CUDA)
    views = PretrainViews(28, blur_sigma=(0.5, 2.0))
    views(x, loop.make_generator(CUDA, 0, 0, 0, 2))  # first kernels and allocations
    no_sync()
    out = (*views(x, loop.make_generator(CUDA, 0, 1, 0, 2)), finetune_view(x, loop.make_generator(CUDA, 0, 1, 0, 3)))
    again = (*views(x, loop.make_generator(CUDA, 0, 1, 0, 2)), finetune_view(x, loop.make_generator(CUDA, 0, 1, 0, 3)))
    no_sync(False)
    for u, v in zip(out, again):
        assert u.is_cuda and u.shape == x.shape and torch.equal(u, v)  # the seed reproduces the views


@pytest.mark.parametrize("command, noise", [("pretrain", ()), ("finetune", ("--sigma", "0.5")),
                                            ("finetune", ("--sigmas", "0.25,0.5,1")), ("finetune", ("--sigma-range", "0.12:1"))])
def test_bf16_steps_do_not_synchronize_between_log_lines(command, noise, fmnist_dir, no_sync):
    trainer, data = trainer_for(command, fmnist_dir, device="cuda", precision="bf16", noise=noise)
    assert data.device.type == "cuda"
    step_loss, after_step = trainer.step_loss, trainer.after_step

    def checked(step):
        if step == 2:  # after the first kernels, cuBLAS handles and allocations
            no_sync()
        return step_loss(step)

    def until_the_log_line(step):
        values = after_step(step)
        if step == 7:  # the log line of step 8 reads its means back: that is allowed
            no_sync(False)
        return values

    trainer.step_loss, trainer.after_step = checked, until_the_log_line
    records = []
    # 96 images in batches of 16: step 6 starts a new epoch, whose permutation goes up without a wait too.
    settings = loop.LoopSettings(8, 2, 1e-3, 16, 8, 0, len(data), clip=2.0, time_budget=1e9)
    result = loop.run_loop(settings, trainer, 0, lambda step, seconds: None, records.append, DistEnv(device=CUDA), "test")
    assert result.end == 8 and len(records) == 1 and torch.isfinite(torch.tensor(records[0]["loss"]))


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_kill_and_resume_on_the_device_gives_identical_weights(command, fmnist_dir, tmp_path, monkeypatch, deterministic):
    extra = six_steps(command, "--device", "cuda", "--precision", "bf16", *(["--eval-images", "20"] if command == "finetune" else []))
    straight, resumed = straight_and_killed(command, extra, fmnist_dir, tmp_path, monkeypatch)
    assert main([command, *extra, *common(fmnist_dir, resumed)]) == 0
    assert same_weights(straight, resumed)
    assert [r.get("loss") for r in read_log(straight)] == [r.get("loss") for r in read_log(resumed)]


def test_time_budgeted_pretraining_on_the_device(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "enc"
    argv = ["pretrain", "--preset", "tiny", "--device", "cuda", "--time-budget", "4", *common(fmnist_dir, out),
            "--log-every", "10"]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "images/s" in last and "epochs in all" in last
    config = rrcm.checkpoint.read_config(out)
    assert config["time_budget"] == 4 and 1 <= config["step"] <= config["steps"] and config["train_seconds"] > 0
    assert config["images_per_s"] > 0 and read_log(out)[-1]["step"] == config["step"]
