"""`rrcm finetune`: a classifier for one noise level, or one for several (method.md section 5).

The classifier head on h and the whole encoder are trained, with layer-wise learning-rate decay,
on m = 2 noisy copies of each image (pixel noise sigma, i.e. model-space time t = 2 sigma, the
network conditioned on the grid time nearest to t) with cross-entropy + consistency
regularization. `--from-scratch` runs the same loop from a random initialization: the Gaussian
augmentation + consistency baseline.

With `--sigmas` (a list) or `--sigma-range` one classifier learns several noise levels: each image
draws its own sigma (both its copies share it, so the consistency term compares like with like),
uniformly from the list, or log-uniformly from the range; its time token is the grid time of 2 sigma
and its consistency weight the paper's rule at its sigma. The loss is otherwise the same.

`--diversity W` (for the cascade of section 7 of method.md) makes an image whose noisy copies miss its label
spread its votes instead: see `consistency_finetune_loss`. `--init` takes a pre-trained encoder, or a
classifier whose encoder starts the run with a new head.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from rrcm.augment import finetune_view
from rrcm.checkpoint import WEIGHTS, load_public_state_dict, load_weights, read_config, read_state_dict, save_checkpoint
from rrcm.data import ImageDataset
from rrcm.errors import UserError
from rrcm.model import Classifier
from rrcm.presets import ModelConfig
from rrcm.schedule import PIXEL_STD, grid_time_for_sigma, karras_times, nearest_grid_times, time_for_sigma
from rrcm.sigma_set import SigmaSet
from rrcm.train import loop
from rrcm.train.commands import DEFAULT_EPOCHS
from rrcm.distributed import DistEnv
from rrcm.train.losses import consistency_finetune_loss

COPIES = 2
NOISE, FLIP, EVAL, SIGMA = 1, 2, 3, 4  # random streams
LAM_SMALL, LAM_LARGE, LAM_STEP = 10.0, 20.0, 0.25  # the paper's consistency weights and where they change


def default_lam(sigma: float) -> float:
    """The paper's consistency weight: 10 at sigma = 0.25, 20 at larger noise."""
    return LAM_SMALL if sigma <= LAM_STEP else LAM_LARGE


def trained_sigmas(args: argparse.Namespace) -> SigmaSet:
    """The sigmas of --sigma, --sigmas or --sigma-range."""
    return SigmaSet.parse(args.sigma, getattr(args, "sigmas", None), getattr(args, "sigma_range", None))


class NoiseLevels:
    """Each image's noise level for one step: model-space noise std t = 2 sigma, the grid time the network is
    conditioned on, and the consistency weight lambda. Python floats for one sigma; for several, (B,) tensors
    drawn on the device (uniform over a list, log-uniform over a range: the usual sigmas 0.12, 0.25, 0.5, 1
    are log-spaced, and so, roughly, are the grid points between them)."""

    def __init__(self, trained: SigmaSet, grid_points: int, lam: float | None, device: torch.device):
        self.trained, self.lam = trained, lam
        if trained.single is not None:
            self.t_noise, self.t_cond = time_for_sigma(trained.single), grid_time_for_sigma(trained.single, grid_points)
            return
        self.grid = karras_times(grid_points).float().to(device)
        if trained.bounds is None:
            sigmas = torch.tensor(trained.values, dtype=torch.float32)
            self.table = torch.stack([sigmas / PIXEL_STD,
                                      torch.tensor([grid_time_for_sigma(s, grid_points) for s in trained.values]),
                                      torch.tensor([default_lam(s) if lam is None else lam for s in trained.values])]).to(device)
        else:
            self.log_bounds = [math.log(b) for b in trained.bounds]

    def draw(self, n: int, generator: torch.Generator) -> tuple[float | torch.Tensor, float | torch.Tensor, float | torch.Tensor]:
        """(t_noise, t_cond, lam) for n images."""
        if self.trained.single is not None:
            return self.t_noise, self.t_cond, self.lam
        device = self.grid.device
        if self.trained.bounds is None:
            return tuple(self.table[:, torch.randint(len(self.trained.values), (n,), generator=generator, device=device)])
        lo, hi = self.log_bounds
        sigma = torch.exp(lo + (hi - lo) * torch.rand(n, generator=generator, device=device))
        lam = torch.where(sigma <= LAM_STEP, LAM_SMALL, LAM_LARGE) if self.lam is None else self.lam
        t = sigma / PIXEL_STD
        return t, nearest_grid_times(t, self.grid), lam


def copy_times(t: float | torch.Tensor, copies: int, n: int, device: torch.device) -> torch.Tensor:
    """The times of `copies` stacked copies of n images (copy-major), from one time or one per image (n,)."""
    return t.repeat(copies) if isinstance(t, torch.Tensor) else loop.full_time(t, copies * n, device)


def layer_decay_scale(cfg: ModelConfig, decay: float):
    """lr multiplier per parameter name: head and final norm 1, block i decay^(depth - i), embeddings decay^(depth + 1)."""
    def scale(name: str) -> float:
        name = name.removeprefix("base_model.")
        if name.startswith(("linear_head.", "norm.")):
            return 1.0
        if name.startswith("blocks."):
            return decay ** (cfg.depth - int(name.split(".")[1]))
        return decay ** (cfg.depth + 1)
    return scale


def noisy_copies(x: torch.Tensor, copies: int, t: float | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`copies` model-space noisy versions of pixel images x, stacked copy-major: (copies * B, C, H, W), with noise
    std t, one for all or one per image (B,)."""
    x = loop.model_space(x).repeat(copies, 1, 1, 1)
    std = t.repeat(copies).view(-1, 1, 1, 1) if isinstance(t, torch.Tensor) else t
    return x + std * torch.randn(x.shape, generator=generator, device=x.device)


@torch.no_grad()
def noisy_accuracy(model: Classifier, data: ImageDataset, sigma: float, num_images: int, batch_size: int,
                   seed: int, env: DistEnv) -> tuple[int, int]:
    """(correct, total) of single noisy draws of the first `num_images` images, summed over processes."""
    t_noise, t_cond = time_for_sigma(sigma), grid_time_for_sigma(sigma, model.cfg.grid_points)
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=env.device)
    mine = torch.arange(min(num_images, len(data)), device=data.device)[env.rank::env.world_size]
    gen = loop.make_generator(env.device, seed, 0, env.rank, EVAL)
    for chunk in mine.split(batch_size):
        images, labels = data.batch(chunk)
        x = noisy_copies(images.to(env.device), 1, t_noise, gen)
        correct += (model(x, loop.full_time(t_cond, len(x), env.device)).argmax(1) == labels.to(env.device)).sum()
    if env.distributed:
        torch.distributed.all_reduce(correct)
    model.train()
    return int(correct), min(num_images, len(data))


class Finetuner:
    """Model, optimizer and data of one fine-tuning run; `step_loss` is one step's loss."""

    def __init__(self, cfg: ModelConfig, init: Path | None, data: ImageDataset, args: argparse.Namespace, env: DistEnv,
                 precision: str, layer_decay: float):
        self.cfg, self.data, self.env, self.precision = cfg, data, env, precision
        self.seed, self.eta, self.diversity = args.seed, args.eta, args.diversity
        self.levels = NoiseLevels(trained_sigmas(args), cfg.grid_points, args.lam, env.device)
        torch.manual_seed(args.seed)
        model = Classifier(cfg)
        if init is not None:
            load_encoder(init, model)
        self.model = model.to(env.device)
        self.net = DistributedDataParallel(self.model, device_ids=[env.device] if env.device.type == "cuda" else None) \
            if env.distributed else self.model
        groups = loop.param_groups(self.model, args.weight_decay, layer_decay_scale(cfg, layer_decay))
        self.optimizer = loop.adamw(groups, args.lr)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
        self.order = loop.BatchOrder(len(data), args.batch_size, args.seed, data.device)

    @property
    def module(self) -> torch.nn.Module:
        """What the gradient clipping would apply to."""
        return self.model

    def parts(self) -> dict:
        """What a saved training state holds, by name."""
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler}

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        env, dev = self.env, self.env.device
        images, labels = self.data.batch(self.order.indices(step, env))
        # .to: a no-op for a dataset held on the device
        images = finetune_view(images.to(dev, non_blocking=True), loop.make_generator(dev, self.seed, step, env.rank, FLIP))
        labels = labels.to(dev, non_blocking=True)
        levels = loop.make_generator(dev, self.seed, step, env.rank, SIGMA) if self.levels.trained.single is None else None
        t_noise, t_cond, lam = self.levels.draw(len(labels), levels)
        x = noisy_copies(images, COPIES, t_noise, loop.make_generator(dev, self.seed, step, env.rank, NOISE))
        with loop.autocast(self.precision, dev):
            logits = self.net(x, copy_times(t_cond, COPIES, len(labels), dev))
        loss, parts = consistency_finetune_loss(list(logits.chunk(COPIES)), labels, lam, self.eta, self.diversity)
        parts["accuracy"] = (logits.detach().argmax(1) == labels.repeat(COPIES)).float().mean()
        return loss, parts

    def after_step(self, step: int) -> dict:
        return {}


def encoder_config(init: str) -> ModelConfig:
    """The model sizes of --init: a pre-trained encoder, or a classifier whose encoder starts the run."""
    config = read_config(init)
    if config.get("kind") not in ("encoder", "classifier"):
        raise UserError(f"--init {init}: a {config.get('kind', 'unknown')} checkpoint, not a pre-trained encoder or a classifier")
    return config["model"]


def load_encoder(init: Path, model: Classifier) -> None:
    """Load the encoder of --init into `model.base_model`: an encoder checkpoint without its projector, or a
    classifier checkpoint without its head (the run trains a new one)."""
    if read_config(init).get("kind") == "encoder":
        load_weights(init, model.base_model)
        return
    state = read_state_dict(init / WEIGHTS)
    encoder = {k.removeprefix("base_model."): v for k, v in state.items() if k.startswith("base_model.")}
    load_public_state_dict(model.base_model, encoder, str(init / WEIGHTS))


def finetune(args: argparse.Namespace, env: DistEnv) -> int:
    trained = trained_sigmas(args)  # refuses sigmas <= 0, NaN, inf, repeated ones and empty ranges
    loop.check_training_args(args, env)
    loop.check_positive(steps=args.steps, epochs=args.epochs, time_budget=args.time_budget)
    if args.lam is None and trained.single is not None:
        args.lam = default_lam(trained.single)
    for name in ("lam", "eta", "diversity") if args.lam is not None else ("eta", "diversity"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.eval_images < 0:
        raise UserError(f"--eval-images must be >= 0, got {args.eval_images}")
    init = None if args.from_scratch else Path(args.init)
    if init is None and args.preset is None:
        args.preset = "fmnist-s"
    cfg = loop.model_config(args, encoder_config(args.init) if init is not None else None)
    loop.check_memory(cfg, args.batch_size, COPIES, env)
    layer_decay = args.layer_decay if args.layer_decay is not None else (1.0 if init is None else 0.65)
    if not 0 < layer_decay <= 1:
        raise UserError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    precision = loop.resolve_precision(args.precision, env.device)
    data = loop.load_train_data(args, cfg, env.device)
    epochs = args.epochs if args.epochs is not None or args.time_budget is not None else DEFAULT_EPOCHS
    steps = args.steps or (max(1, round(epochs * (len(data) // args.batch_size))) if epochs else None)
    recipe = {"model": cfg.to_dict(), "init": str(init.resolve()) if init else "scratch", **trained.to_config(),
              "lam": args.lam, "eta": args.eta, "layer_decay": layer_decay, **loop.length_recipe(args, steps),
              "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
              "max_train_images": args.max_train_images,
              **({"diversity": args.diversity} if args.diversity else {})}  # absent when off: older runs still resume
    folder = loop.RunFolder(args.out, "classifier", recipe, env)
    trainer = Finetuner(cfg, init, data, args, env, precision, layer_decay)
    state = folder.resume()
    start = loop.load_training_state(state, trainer.parts()) if state is not None else 0
    plan, spent = loop.plan_run(args, state, steps, lambda: loop.measure_step_seconds(trainer, args.lr, None, env))
    meta = dict(kind="classifier", **trained.to_config(), dataset=cfg.dataset, init=recipe["init"], diversity=args.diversity)
    if env.is_main:
        what = f"resuming at step {start}" if start else "starting"
        noise = (f"(t = {trainer.levels.t_noise:g}, conditioned on {trainer.levels.t_cond:.4f})" if trained.single is not None
                 else "(one per image and step: uniform)" if trained.bounds is None else "(one per image and step: log-uniform)")
        print(f"rrcm finetune: {trained.describe()} {noise}, from {recipe['init']}; {cfg.dataset} ({len(data)} images), {plan.steps} steps of {args.batch_size}{plan.note()}, "
              f"{env.world_size} process(es) on {env.device}, {precision}; {what} in {args.out}", flush=True)

    def save(step: int, seconds: float) -> None:
        if env.is_main:
            save_checkpoint(args.out, trainer.model, cfg, **meta, **loop.progress(plan, step, seconds, args.batch_size, len(data)))
        folder.save_state(loop.training_state(step, trainer.parts(), plan=asdict(plan), train_seconds=seconds))

    settings = loop.LoopSettings(plan.steps, plan.warmup, args.lr, args.batch_size, args.log_every, args.save_every,
                                 len(data), time_budget=plan.time_budget)
    result = loop.run_loop(settings, trainer, start, save, folder.log, env, f"finetune {trained.describe()}", spent)
    if args.eval_images:
        done = read_config(args.out) if result.end == result.start else {}
        if done.get("eval_images") == args.eval_images:  # a finished run, evaluated already
            accuracy, total = done["test_accuracy"], done["test_images"]
        else:
            test = loop.load_split(cfg, "test", args.data_dir, env.device)
            by_sigma = {f"{s:g}": noisy_accuracy(trainer.model, test, s, args.eval_images, args.batch_size, args.seed, env)
                        for s in trained.representatives()}
            total = min(num for _, num in by_sigma.values())
            accuracy = {s: correct / num for s, (correct, num) in by_sigma.items()}
            if trained.single is not None:  # a number, as before classifiers of several sigmas
                (accuracy,) = accuracy.values()
            if env.is_main:
                length = loop.progress(plan, result.end, result.total_seconds, args.batch_size, len(data))
                save_checkpoint(args.out, trainer.model, cfg, test_accuracy=accuracy, test_images=total,
                                eval_images=args.eval_images, **meta, **length)
                folder.log({"step": result.end, "test_accuracy": accuracy, "test_images": total})
        if env.is_main:
            for s, value in (accuracy.items() if isinstance(accuracy, dict) else [(f"{trained.single:g}", accuracy)]):
                print(f"rrcm finetune: accuracy at sigma {s} (one noisy draw per image) on the first {total} "
                      f"test images: {100 * value:.2f}%", flush=True)
    if env.is_main:
        print(f"rrcm finetune: {result.summary(settings)}; classifier checkpoint in {args.out}", flush=True)
    return 0

