"""`rrcm pretrain`: the rRCM objective (method.md section 4) and its training loop.

Per batch: views (x, a, b), one Gaussian draw n shared by every term and one time index i shared
by the batch and all processes (drawn on the host from (seed, step), so every process draws the
same i without a broadcast, and no value is read back from the device).
- contrastive: online(a + t_min n) against the EMA target(b + t_min n), and the swap, InfoNCE on
  the projections z;
- consistency: online features at x + t_i n against the same network, without gradient, at
  x + t_{i+1} n, InfoNCE on the representations h.
Negatives are the whole global batch: the stop-gradient keys are gathered from all processes.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, replace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rrcm.augment import PretrainViews
from rrcm.checkpoint import save_checkpoint
from rrcm.data import ImageDataset
from rrcm.model import Encoder
from rrcm.presets import ModelConfig
from rrcm.schedule import T_MIN, karras_times, num_scales, target_ema
from rrcm.train import loop
from rrcm.train.commands import DEFAULT_STEPS
from rrcm.distributed import DistEnv
from rrcm.train.distributed import gather_keys, global_batchnorm
from rrcm.train.losses import TEMPERATURE, info_nce, symmetric_info_nce

NOISE, VIEWS, TIME = 1, 2, 3  # random streams of a step
CLIP = 2.0  # gradient-norm clipping after warm-up


class OnlineNet(nn.Module):
    """The online encoder's share of a step as one forward, so that DDP sees a single call.

    One transformer pass over [a, b, x] (per-sample times); the projection head runs per view so
    that its BatchNorm statistics are each view's, as with separate forwards.
    """

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, inputs: torch.Tensor, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h_a, h_b, h_x = self.encoder.features(inputs, times).chunk(3)
        head = self.encoder.projection_head
        return head(h_a), head(h_b), h_x


@torch.no_grad()
def target_projections(target: Encoder, a_t: torch.Tensor, b_t: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    h_a, h_b = target.features(torch.cat([a_t, b_t]), loop.full_time(t, 2 * len(a_t), a_t.device)).chunk(2)
    return target.projection_head(h_a), target.projection_head(h_b)


@torch.no_grad()
def consistency_target(encoder: Encoder, x_t: torch.Tensor, t: float) -> torch.Tensor:
    """The online network's representation one grid step closer to the data, as a constant."""
    return encoder.features(x_t, loop.full_time(t, len(x_t), x_t.device))


def rrcm_loss(online: nn.Module, encoder: Encoder, target: Encoder, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              noise: torch.Tensor, t_cur: float, t_next: float, rank: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean rRCM loss of this process's batch and its two terms (detached).

    x, a, b: the views in model space (B, C, H, W); noise: the shared draw n; t_cur = t_i > t_next =
    t_{i+1}. `online` is OnlineNet(encoder), possibly wrapped in DDP; `rank` places this batch's
    positives among the gathered keys.
    """
    B = len(x)
    a_t, b_t = a + T_MIN * noise, b + T_MIN * noise
    x_cur, x_next = x + t_cur * noise, x + t_next * noise
    times = torch.cat([loop.full_time(T_MIN, 2 * B, x.device), loop.full_time(t_cur, B, x.device)])
    z_a, z_b, h = online(torch.cat([a_t, b_t, x_cur]), times)
    k_a, k_b = (gather_keys(k) for k in target_projections(target, a_t, b_t, T_MIN))
    k_h = gather_keys(consistency_target(encoder, x_next, t_next))
    contrastive = symmetric_info_nce(z_a, z_b, k_a, k_b, TEMPERATURE, rank * B).mean()
    consistency = info_nce(h, k_h, TEMPERATURE, rank * B).mean()
    return contrastive + consistency, {"contrastive": contrastive.detach(), "consistency": consistency.detach()}


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, rate: float) -> None:
    """target <- rate * target + (1 - rate) * online, for the parameters (buffers follow their own forwards)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - rate)


class Pretrainer:
    """Model, target, optimizer and data of one pre-training run; `step_loss` is one step's loss.

    `steps`, the run's length, shapes the Karras-grid and EMA schedules; a time-budgeted run sets it
    once a few timed steps have fixed it.
    """

    def __init__(self, cfg: ModelConfig, data: ImageDataset, args: argparse.Namespace, env: DistEnv, precision: str,
                 steps: int):
        self.cfg, self.data, self.env, self.precision = cfg, data, env, precision
        self.steps, self.seed = steps, args.seed
        torch.manual_seed(args.seed)
        encoder = Encoder(cfg)
        if env.distributed:
            global_batchnorm(encoder)
        self.encoder = encoder.to(env.device)
        self.target = copy.deepcopy(self.encoder).requires_grad_(False)
        online = OnlineNet(self.encoder)
        self.online = DistributedDataParallel(online, device_ids=[env.device] if env.device.type == "cuda" else None) \
            if env.distributed else online
        self.optimizer = loop.adamw(loop.param_groups(self.encoder, args.weight_decay), args.lr)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
        self.order = loop.BatchOrder(len(data), args.batch_size, args.seed, data.device)
        self.views = PretrainViews(image_size=cfg.image_size)

    @property
    def module(self) -> nn.Module:
        """What the gradient clipping applies to."""
        return self.encoder

    def parts(self) -> dict:
        """What a saved training state holds, by name."""
        return {"model": self.encoder, "target": self.target, "optimizer": self.optimizer, "scaler": self.scaler}

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        env, dev = self.env, self.env.device
        images, _ = self.data.batch(self.order.indices(step, env))
        images = images.to(dev, non_blocking=True)  # a no-op for a dataset held on the device
        x, a, b = (loop.model_space(v) for v in self.views(images, loop.make_generator(dev, self.seed, step, env.rank, VIEWS)))
        noise = torch.randn(x.shape, generator=loop.make_generator(dev, self.seed, step, env.rank, NOISE), device=dev)
        grid = karras_times(num_scales(step, self.steps))
        i = int(torch.randint(len(grid) - 1, (1,), generator=loop.make_generator("cpu", self.seed, step, 0, TIME)))
        with loop.autocast(self.precision, dev):
            return rrcm_loss(self.online, self.encoder, self.target, x, a, b, noise, float(grid[i]), float(grid[i + 1]), env.rank)

    def after_step(self, step: int) -> dict:
        rate = target_ema(step, self.steps)
        ema_update(self.target, self.encoder, rate)
        return {"ema": rate, "num_scales": num_scales(step, self.steps)}


def recipe(args: argparse.Namespace, cfg: ModelConfig, steps: int | None) -> dict:
    """The settings a resumed run must share with the saved one."""
    return {"model": cfg.to_dict(), **loop.length_recipe(args, steps), "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "seed": args.seed, "max_train_images": args.max_train_images}


def pretrain(args: argparse.Namespace, env: DistEnv) -> int:
    loop.check_positive(steps=args.steps, time_budget=args.time_budget)
    loop.check_training_args(args, env)
    cfg = loop.model_config(args)
    loop.check_memory(cfg, args.batch_size, 3, env)  # views a, b and x through the online network
    precision = loop.resolve_precision(args.precision, env.device)
    steps = args.steps if args.steps is not None or args.time_budget is not None else DEFAULT_STEPS
    folder = loop.RunFolder(args.out, "encoder", recipe(args, cfg, steps), env)
    data = loop.load_train_data(args, cfg, env.device)
    trainer = Pretrainer(cfg, data, args, env, precision, steps or loop.MEASURE_WARMUP + loop.MEASURE_STEPS)
    state = folder.resume()
    start = loop.load_training_state(state, trainer.parts()) if state is not None else 0
    plan, spent = loop.plan_run(args, state, steps, lambda: loop.measure_step_seconds(trainer, args.lr, CLIP, env))
    trainer.steps = plan.steps
    if env.is_main:
        what = f"resuming at step {start}" if start else "starting"
        print(f"rrcm pretrain: {cfg.dataset} ({len(data)} images), {plan.steps} steps of {args.batch_size}{plan.note()}, "
              f"{env.world_size} process(es) on {env.device}, {precision}; {what} in {args.out}", flush=True)

    def save(step: int, seconds: float) -> None:
        if env.is_main:
            # The grid reached at this step is the one a classifier fine-tuned from it is conditioned on.
            reached = replace(cfg, grid_points=num_scales(step, plan.steps))
            save_checkpoint(args.out, trainer.encoder, reached, kind="encoder", dataset=cfg.dataset,
                            **loop.progress(plan, step, seconds, args.batch_size, len(data)))
        folder.save_state(loop.training_state(step, trainer.parts(), plan=asdict(plan), train_seconds=seconds))

    settings = loop.LoopSettings(plan.steps, plan.warmup, args.lr, args.batch_size, args.log_every, args.save_every,
                                 len(data), CLIP, plan.time_budget)
    result = loop.run_loop(settings, trainer, start, save, folder.log, env, "pretrain", spent)
    if env.is_main:
        print(f"rrcm pretrain: {result.summary(settings)}; encoder checkpoint in {args.out}", flush=True)
    return 0

