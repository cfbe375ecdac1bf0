"""`rrcm finetune`: a classifier for one noise level (method.md section 5).

The classifier head on h and the whole encoder are trained, with layer-wise learning-rate decay,
on m = 2 noisy copies of each image (pixel noise sigma, i.e. model-space time t = 2 sigma, the
network conditioned on the grid time nearest to t) with cross-entropy + consistency
regularization. `--from-scratch` runs the same loop from a random initialization: the Gaussian
augmentation + consistency baseline.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from rrcm.augment import finetune_view
from rrcm.checkpoint import load_weights, read_config, save_checkpoint
from rrcm.data import ImageDataset, load_dataset
from rrcm.errors import UserError
from rrcm.model import Classifier
from rrcm.presets import ModelConfig
from rrcm.schedule import grid_time_for_sigma, time_for_sigma
from rrcm.train import loop
from rrcm.train.distributed import DistEnv, run_in_process_group
from rrcm.train.losses import consistency_finetune_loss

COPIES = 2
NOISE, FLIP, EVAL = 1, 2, 3  # random streams


def default_lam(sigma: float) -> float:
    """The paper's consistency weight: 10 at sigma = 0.25, 20 at larger noise."""
    return 10.0 if sigma <= 0.25 else 20.0


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


def noisy_copies(x: torch.Tensor, copies: int, t: float, generator: torch.Generator) -> torch.Tensor:
    """`copies` model-space noisy versions of pixel images x, stacked copy-major: (copies * B, C, H, W)."""
    x = loop.model_space(x).repeat(copies, 1, 1, 1)
    return x + t * torch.randn(x.shape, generator=generator, device=x.device)


@torch.no_grad()
def noisy_accuracy(model: Classifier, data: ImageDataset, sigma: float, num_images: int, batch_size: int,
                   seed: int, env: DistEnv) -> tuple[int, int]:
    """(correct, total) of single noisy draws of the first `num_images` images, summed over processes."""
    t_noise, t_cond = time_for_sigma(sigma), grid_time_for_sigma(sigma)
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=env.device)
    mine = torch.arange(min(num_images, len(data)))[env.rank::env.world_size]
    gen = loop.make_generator(env.device, seed, 0, env.rank, EVAL)
    for chunk in mine.split(batch_size):
        images, labels = data.batch(chunk)
        x = noisy_copies(images.to(env.device), 1, t_noise, gen)
        correct += (model(x, loop.full_time(t_cond, len(x), env.device)).argmax(1).cpu() == labels).sum().to(env.device)
    if env.distributed:
        torch.distributed.all_reduce(correct)
    model.train()
    return int(correct), min(num_images, len(data))


class Finetuner:
    """Model, optimizer and data of one fine-tuning run; `step_loss` is one step's loss."""

    def __init__(self, cfg: ModelConfig, init: Path | None, data: ImageDataset, args: argparse.Namespace, env: DistEnv,
                 precision: str, steps: int, layer_decay: float):
        self.cfg, self.data, self.env, self.precision, self.steps = cfg, data, env, precision, steps
        self.seed, self.sigma, self.lam, self.eta = args.seed, args.sigma, args.lam, args.eta
        self.t_noise, self.t_cond = time_for_sigma(args.sigma), grid_time_for_sigma(args.sigma)
        torch.manual_seed(args.seed)
        model = Classifier(cfg)
        if init is not None:
            load_weights(init, model.base_model)
        self.model = model.to(env.device)
        self.net = DistributedDataParallel(self.model, device_ids=[env.device] if env.device.type == "cuda" else None) \
            if env.distributed else self.model
        groups = loop.param_groups(self.model, args.weight_decay, layer_decay_scale(cfg, layer_decay))
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
        self.order = loop.BatchOrder(len(data), args.batch_size, args.seed)

    def parts(self) -> dict:
        """What a saved training state holds, by name."""
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler}

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        env, dev = self.env, self.env.device
        images, labels = self.data.batch(self.order.indices(step, env))
        images = finetune_view(images.to(dev, non_blocking=True), loop.make_generator("cpu", self.seed, step, env.rank, FLIP))
        labels = labels.to(dev, non_blocking=True)
        x = noisy_copies(images, COPIES, self.t_noise, loop.make_generator(dev, self.seed, step, env.rank, NOISE))
        with loop.autocast(self.precision, dev):
            logits = self.net(x, loop.full_time(self.t_cond, len(x), dev))
        loss, parts = consistency_finetune_loss(list(logits.chunk(COPIES)), labels, self.lam, self.eta)
        parts["accuracy"] = (logits.detach().argmax(1) == labels.repeat(COPIES)).float().mean()
        return loss, parts


class _Finetune:
    help = "fine-tune an encoder into a classifier for one noise level"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        start = p.add_mutually_exclusive_group(required=True)
        start.add_argument("--init", help="pre-trained encoder checkpoint folder (from rrcm pretrain); its projector is dropped")
        start.add_argument("--from-scratch", action="store_true",
                           help="random initialization: the Gaussian augmentation + consistency baseline")
        p.add_argument("--sigma", type=float, required=True, help="pixel-space noise std to train for (> 0), e.g. 0.25, 0.5, 1.0")
        p.add_argument("--lam", type=float, help="consistency weight lambda (default 10 for sigma <= 0.25, else 20)")
        p.add_argument("--eta", type=float, default=0.5, help="entropy weight eta (default 0.5)")
        p.add_argument("--layer-decay", type=float,
                       help="layer-wise lr decay (default 0.65 with --init, 1.0 (none) with --from-scratch)")
        length = p.add_mutually_exclusive_group()
        length.add_argument("--epochs", type=float, help="passes over the training images (default 10)")
        length.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
        p.add_argument("--eval-images", type=int, default=1000,
                       help="at the end, accuracy on one noisy draw of the first N test images, 0: skip (default 1000)")
        loop.add_model_arguments(p, preset_default=None, preset_note=" (with --from-scratch; default fmnist-s)")
        loop.add_training_arguments(p, lr=5e-4)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        return run_in_process_group(finetune, args)


def encoder_config(init: str) -> ModelConfig:
    config = read_config(init)
    if config.get("kind") != "encoder":
        raise UserError(f"--init {init}: a {config.get('kind', 'unknown')} checkpoint, not a pre-trained encoder")
    return config["model"]


def finetune(args: argparse.Namespace, env: DistEnv) -> int:
    time_for_sigma(args.sigma)  # refuses sigma <= 0, NaN, inf
    loop.check_training_args(args, env)
    loop.check_positive(steps=args.steps, epochs=args.epochs)
    if args.lam is None:
        args.lam = default_lam(args.sigma)
    for name in ("lam", "eta"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.eval_images < 0:
        raise UserError(f"--eval-images must be >= 0, got {args.eval_images}")
    init = None if args.from_scratch else Path(args.init)
    if init is None and args.preset is None:
        args.preset = "fmnist-s"
    cfg = loop.model_config(args, encoder_config(args.init) if init is not None else None)
    layer_decay = args.layer_decay if args.layer_decay is not None else (1.0 if init is None else 0.65)
    if not 0 < layer_decay <= 1:
        raise UserError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    precision = loop.resolve_precision(args.precision, env.device)
    data = loop.load_train_data(args, cfg)
    steps = args.steps or max(1, round((args.epochs or 10) * (len(data) // args.batch_size)))
    warmup = steps // 10 if args.warmup is None else args.warmup
    recipe = {"model": cfg.to_dict(), "init": str(init.resolve()) if init else "scratch", "sigma": args.sigma,
              "lam": args.lam, "eta": args.eta, "layer_decay": layer_decay, "steps": steps, "batch_size": args.batch_size,
              "lr": args.lr, "warmup": warmup, "weight_decay": args.weight_decay, "seed": args.seed,
              "max_train_images": args.max_train_images}
    folder = loop.RunFolder(args.out, "classifier", recipe, env)
    trainer = Finetuner(cfg, init, data, args, env, precision, steps, layer_decay)
    state = folder.resume()
    start = loop.load_training_state(state, trainer.parts()) if state is not None else 0
    meta = dict(kind="classifier", sigma=args.sigma, dataset=cfg.dataset, init=recipe["init"])
    if env.is_main:
        what = f"resuming at step {start}" if start else "starting"
        print(f"rrcm finetune: sigma {args.sigma:g} (t = {trainer.t_noise:g}, conditioned on {trainer.t_cond:.4f}), "
              f"from {recipe['init']}; {cfg.dataset} ({len(data)} images), {steps} steps of {args.batch_size}, "
              f"{env.world_size} process(es) on {env.device}, {precision}; {what} in {args.out}", flush=True)

    def save(step: int) -> None:
        if env.is_main:
            save_checkpoint(args.out, trainer.model, cfg, step=step, **meta)
        folder.save_state(loop.training_state(step, trainer.parts()))

    settings = loop.LoopSettings(steps, warmup, args.lr, args.batch_size, args.log_every, args.save_every)
    t0 = time.perf_counter()
    loop.run_loop(settings, trainer.model, trainer.optimizer, trainer.scaler, start, trainer.step_loss,
                  lambda step: {}, save, folder.log, env, desc=f"finetune sigma={args.sigma:g}")
    elapsed = time.perf_counter() - t0
    if args.eval_images:
        done = read_config(args.out) if start == steps else {}
        if done.get("eval_images") == args.eval_images:  # a finished run, evaluated already
            accuracy, total = done["test_accuracy"], done["test_images"]
        else:
            test = load_dataset(cfg.dataset, "test", args.data_dir, cfg.image_size if cfg.dataset == "imagenet" else None)
            correct, total = noisy_accuracy(trainer.model, test, args.sigma, args.eval_images, args.batch_size, args.seed, env)
            accuracy = correct / total
            if env.is_main:
                save_checkpoint(args.out, trainer.model, cfg, step=steps, test_accuracy=accuracy, test_images=total,
                                eval_images=args.eval_images, **meta)
                folder.log({"step": steps, "test_accuracy": accuracy, "test_images": total})
        if env.is_main:
            print(f"rrcm finetune: accuracy at sigma {args.sigma:g} (one noisy draw per image) on the first {total} "
                  f"test images: {100 * accuracy:.2f}%", flush=True)
    if env.is_main:
        print(f"rrcm finetune: {elapsed:.0f} s of training; classifier checkpoint in {args.out}", flush=True)
    return 0


COMMAND = _Finetune()
