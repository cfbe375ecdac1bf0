"""Pre-training throughput: images per second of whole optimizer steps, on the CPU and on a CUDA GPU.

One step is `loop.optimizer_step` of `rrcm pretrain`: the batch gathered from the dataset held on
the device, the three views, the noise, the online forward over 3 B images with backward, the target
and consistency-target forwards (3 B images without gradient), gradient clipping, AdamW and the EMA
update. On a GPU each timed step ends with a synchronization (the training loop itself has none
between log lines), so a step's time is the device's.

Run: python -m pytest benchmarks/test_bench_pretrain.py --benchmark-only --benchmark-enable \
       --benchmark-json benchmarks/results/pretrain-cpu.json
images/s = batch / median step time in extra_info["images_per_s"], batch / fastest step in
extra_info["images_per_s_best"].
"""
import argparse

import pytest
import torch

from rrcm.data import TensorImageDataset
from rrcm.distributed import DistEnv
from rrcm.train import loop
from rrcm.train.pretrain import CLIP, Pretrainer

BATCH = {"cpu": 64, "cuda": 4096}  # a GPU needs large batches to be busy with these small models
ROUNDS = {"tiny": 10, "fmnist-xs": 5, "fmnist-s": 3}
# fp32 is the CPU default; bf16 autocast is much faster on CPUs with AVX512-BF16 or AMX, and the GPU default.
CASES = [("cpu", "fp32"), ("cpu", "bf16"),
         pytest.param("cuda", "bf16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def make_trainer(preset: str, device: str = "cpu", precision: str = "fp32") -> Pretrainer:
    batch = BATCH[device]
    args = argparse.Namespace(preset=preset, embed_dim=None, depth=None, heads=None, patch_size=None, dataset=None,
                              batch_size=batch, lr=5e-4, weight_decay=0.05, seed=0)
    cfg = loop.model_config(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4 * batch, *cfg.input_shape), generator=g, dtype=torch.uint8)
    data = TensorImageDataset(cfg.dataset, cfg.num_classes, images, torch.randint(0, 10, (4 * batch,), generator=g))
    env = DistEnv(device=torch.device(device))
    return Pretrainer(cfg, data.to(env.device), args, env, precision, steps=1000)


@pytest.mark.parametrize("device, precision", CASES)
@pytest.mark.parametrize("preset", list(ROUNDS))
def test_pretrain_step(benchmark, preset, device, precision):
    trainer = make_trainer(preset, device, precision)
    settings = loop.LoopSettings(1000, 0, 5e-4, BATCH[device], 1, 0, 4 * BATCH[device], clip=CLIP)
    step = iter(range(10**6))

    def train_step():
        loss, *_ = loop.optimizer_step(settings, trainer, next(step) + 100)  # past the first scales, like most of a run
        loop.synchronize(trainer.env.device)
        return loss

    loss = benchmark.pedantic(train_step, rounds=ROUNDS[preset], warmup_rounds=2)
    assert torch.isfinite(loss)
    # Other work on a shared machine only slows steps down: the fastest step is the best estimate of
    # what the machine can do, the median what a run saw.
    stats = benchmark.stats.stats
    batch = BATCH[device]
    benchmark.extra_info.update(preset=preset, batch=batch, threads=torch.get_num_threads(), device=device,
                                precision=precision, images_per_s=round(batch / stats.median, 1),
                                images_per_s_best=round(batch / stats.min, 1))
