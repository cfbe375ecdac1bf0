"""Pre-training throughput on the CPU: images per second of whole optimizer steps.

One step is everything `rrcm pretrain` does per batch: the three views, the noise, the online
forward over 3 B images with backward, the target and consistency-target forwards (3 B images
without gradient), gradient clipping, AdamW and the EMA update.

Run: python -m pytest benchmarks/test_bench_pretrain.py --benchmark-only --benchmark-enable \
       --benchmark-json benchmarks/results/pretrain-cpu.json
images/s = batch / median step time in extra_info["images_per_s"], batch / fastest step in
extra_info["images_per_s_best"].
"""
import argparse

import pytest
import torch

from rrcm.data import TensorImageDataset
from rrcm.train import loop
from rrcm.train.distributed import DistEnv
from rrcm.train.pretrain import Pretrainer

BATCH = 64
ROUNDS = {"tiny": 10, "fmnist-s": 3}
# fp32 is the CPU default; bf16 autocast is much faster on CPUs with AVX512-BF16 or AMX.
PRECISIONS = ["fp32", "bf16"]


def make_trainer(preset: str, precision: str = "fp32") -> Pretrainer:
    args = argparse.Namespace(preset=preset, embed_dim=None, depth=None, heads=None, patch_size=None, dataset=None,
                              batch_size=BATCH, lr=5e-4, weight_decay=0.05, seed=0, steps=1000)
    cfg = loop.model_config(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4 * BATCH, *cfg.input_shape), generator=g, dtype=torch.uint8)
    data = TensorImageDataset(cfg.dataset, cfg.num_classes, images, torch.randint(0, 10, (4 * BATCH,), generator=g))
    return Pretrainer(cfg, data, args, DistEnv(), precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("preset", list(ROUNDS))
def test_pretrain_step(benchmark, preset, precision):
    trainer = make_trainer(preset, precision)
    step = iter(range(10**6))

    def train_step():
        k = next(step) + 100  # past the first scales, like most of a run
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer.step_loss(k)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.encoder.parameters(), 2.0)
        trainer.optimizer.step()
        trainer.after_step(k)
        return loss

    loss = benchmark.pedantic(train_step, rounds=ROUNDS[preset], warmup_rounds=1)
    assert torch.isfinite(loss)
    # Other work on a shared machine only slows steps down: the fastest step is the best estimate of
    # what the machine can do, the median what a run saw.
    stats = benchmark.stats.stats
    benchmark.extra_info.update(preset=preset, batch=BATCH, threads=torch.get_num_threads(), device="cpu",
                                precision=precision, images_per_s=round(BATCH / stats.median, 1),
                                images_per_s_best=round(BATCH / stats.min, 1))
