"""What pre-training and fine-tuning share: options, data order, seeds, optimizer and LR schedule,
precision, the run folder (checkpoint, training state, JSON-lines log) and the step loop itself.

Every random draw of step k derives from (seed, k, rank), so a run resumed from a saved step
repeats exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from rrcm.checkpoint import CONFIG, TRAIN_STATE, load_train_state, read_config, save_train_state
from rrcm.data import DATASETS, ImageDataset, load_dataset
from rrcm.errors import UserError
from rrcm.presets import PRESETS, ModelConfig, get_preset
from rrcm.schedule import PIXEL_MEAN, PIXEL_STD
from rrcm.train.distributed import DistEnv, all_reduce_mean

LOG = "log.jsonl"
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")


# --- command-line options ---------------------------------------------------------------------

def add_model_arguments(p: argparse.ArgumentParser, preset_default: str | None, preset_note: str = "") -> None:
    default = f" (default {preset_default})" if preset_default else ""
    p.add_argument("--preset", default=preset_default, help=f"model size preset: {', '.join(PRESETS)}{preset_note}{default}")
    p.add_argument("--embed-dim", type=int, help="override the preset's width D")
    p.add_argument("--depth", type=int, help="override the preset's number of transformer blocks")
    p.add_argument("--heads", type=int, help="override the preset's number of attention heads")
    p.add_argument("--patch-size", type=int, help="override the preset's patch size")


def add_training_arguments(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--dataset", help=f"training data: {', '.join(DATASETS)} (default: the preset's or checkpoint's)")
    p.add_argument("--data-dir", help="dataset folder (default: the dataset's standard folder, if it has one)")
    p.add_argument("--max-train-images", type=int, help="train on the first N training images only (quick runs)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size, split over processes (default 256)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then cosine decay (default: a tenth of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialization, data order, augmentation and noise (default 0)")
    p.add_argument("--out", required=True, help="run folder: checkpoint, train_state.pt and log.jsonl; "
                   "re-running the same command resumes there")
    p.add_argument("--save-every", type=int, default=500,
                   help="save the training state every N steps, 0: only at the end (default 500)")
    p.add_argument("--log-every", type=int, default=20, help="write a log.jsonl line every N steps (default 20)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available); "
                   "under torchrun each process takes cuda:LOCAL_RANK")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (default auto: bf16 on CUDA, fp32 on CPU); fp16 uses a gradient scaler")


def model_config(args: argparse.Namespace, base: ModelConfig | None = None) -> ModelConfig:
    """The preset (or `base`) with --dataset's image shape and classes and the size overrides applied."""
    overrides = dict(embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads, patch_size=args.patch_size)
    if base is not None:
        if args.preset is not None or any(v is not None for v in overrides.values()):
            raise UserError("--preset and the size overrides apply to a new model, not to an --init checkpoint")
        cfg = base
    else:
        cfg = get_preset(args.preset, **overrides)
    name = args.dataset or cfg.dataset
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    info = DATASETS[name]
    changes = dict(dataset=name, in_chans=info.input_shape[0], num_classes=info.num_classes)
    if name != "imagenet":  # image folders are resized to the model; the others have a fixed size
        changes["image_size"] = info.input_shape[1]
    if base is not None and (changes["in_chans"], changes.get("image_size", cfg.image_size)) != (cfg.in_chans, cfg.image_size):
        raise UserError(f"{name} images {info.input_shape} do not fit the checkpoint's model input {cfg.input_shape}")
    return ModelConfig.from_dict({**cfg.to_dict(), **changes}).validate()


def check_positive(**values: float | int | None) -> None:
    for name, v in values.items():
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")


def check_training_args(args: argparse.Namespace, env: DistEnv) -> None:
    check_positive(batch_size=args.batch_size, lr=args.lr, log_every=args.log_every, max_train_images=args.max_train_images)
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UserError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.warmup is not None and args.warmup < 0 or args.save_every < 0:
        raise UserError("--warmup and --save-every must be >= 0")
    if args.batch_size % env.world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {env.world_size} processes")


def load_train_data(args: argparse.Namespace, cfg: ModelConfig) -> ImageDataset:
    data = load_dataset(cfg.dataset, "train", args.data_dir, cfg.image_size if cfg.dataset == "imagenet" else None)
    if args.max_train_images is not None and args.max_train_images < len(data):
        data = Subset(data, args.max_train_images)
    if len(data) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(data)} training images")
    return data


class Subset(ImageDataset):
    """The first `n` items of a dataset."""

    def __init__(self, data: ImageDataset, n: int):
        super().__init__(data.name, data.num_classes, data.input_shape)
        self.data, self.n = data, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.data[i]

    def batch(self, indices: torch.Tensor):
        return self.data.batch(indices)


# --- seeds, data order, inputs -----------------------------------------------------------------

def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, step, rank, stream...)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_generator(device: torch.device | str, *parts: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


class BatchOrder:
    """Global batch indices of step k: epochs are fresh permutations of (seed, epoch), last partial batch dropped."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.steps_per_epoch = num_items // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int, env: DistEnv) -> torch.Tensor:
        """This process's share of step `step`'s global batch."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=make_generator("cpu", self.seed, epoch, 0))
        local = self.batch_size // env.world_size
        start = pos * self.batch_size + env.rank * local
        return self._perm[start:start + local]


def model_space(x: torch.Tensor) -> torch.Tensor:
    """Pixel-space images in [0, 1] -> the model's normalized space [-1, 1]."""
    return (x - PIXEL_MEAN) / PIXEL_STD


def full_time(t: float, n: int, device: torch.device) -> torch.Tensor:
    return torch.full((n,), float(t), device=device)


# --- optimizer, schedule, precision ----------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float, lr_scale: Callable[[str], float] = lambda name: 1.0) -> list[dict]:
    """AdamW groups: no decay on biases, norms and tokens; `lr_scale(name)` per parameter (layer decay)."""
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim <= 1 or name.endswith(NO_WEIGHT_DECAY) else weight_decay
        key = (decay, lr_scale(name))
        groups.setdefault(key, {"params": [], "weight_decay": decay, "lr_scale": key[1]})["params"].append(p)
    return list(groups.values())


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device")
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# --- run folder ------------------------------------------------------------------------------------

class RunFolder:
    """--out: `save_checkpoint`'s files, train_state.pt (everything a resume needs) and log.jsonl.

    A folder is resumed only if its recorded recipe (model, data, schedule, seed...) equals this run's.
    """

    def __init__(self, out: str | Path, kind: str, recipe: dict, env: DistEnv):
        self.path, self.kind, self.recipe, self.env = Path(out), kind, recipe, env

    def resume(self) -> dict | None:
        """The saved training state, or None for a fresh run."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a folder")
        has_config, state = (self.path / CONFIG).is_file(), load_train_state(self.path)
        if not has_config and state is None:
            return None
        if state is None:
            raise UserError(f"{self.path} holds a checkpoint but no {TRAIN_STATE} to resume from; choose another --out")
        config = read_config(self.path) if has_config else {}
        if config.get("kind", self.kind) != self.kind:
            raise UserError(f"{self.path} holds a checkpoint of kind {config.get('kind')!r}, not {self.kind!r}; "
                            "choose another --out")
        saved = state.get("recipe")
        if saved != self.recipe:
            diff = sorted(k for k in set(self.recipe) | set(saved or {}) if (saved or {}).get(k) != self.recipe.get(k))
            raise UserError(f"{self.path} holds a run with other settings ({', '.join(diff)}); "
                            "use the same command to resume or another --out")
        self._truncate_log(state["step"])
        return state

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the saved step (or cut off) by the run that was stopped."""
        path = self.path / LOG
        if self.env.is_main and path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass
            path.write_text("".join(kept))

    def log(self, record: dict) -> None:
        if self.env.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.path / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_state(self, state: dict) -> None:
        if self.env.is_main:
            save_train_state(self.path, {**state, "recipe": self.recipe})


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # the devices this machine has of those saved
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def training_state(step: int, parts: dict) -> dict:
    """What resuming at `step` needs: each part's state_dict() under its name (model, optimizer, ...) and the RNGs."""
    return {"step": step, **{name: part.state_dict() for name, part in parts.items()}, "rng": rng_state()}


def load_training_state(state: dict, parts: dict) -> int:
    """Restore `parts` and the RNGs from a `training_state`; returns its step."""
    for name, part in parts.items():
        part.load_state_dict(state[name])
    set_rng_state(state["rng"])
    return int(state["step"])


# --- the step loop ---------------------------------------------------------------------------------

@dataclass
class LoopSettings:
    steps: int
    warmup: int
    lr: float
    batch_size: int  # global
    log_every: int
    save_every: int
    clip: float | None = None  # gradient-norm clipping, only after warm-up


def run_loop(
    settings: LoopSettings,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    start_step: int,
    compute_loss: Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    after_step: Callable[[int], dict],
    save: Callable[[int], None],
    log: Callable[[dict], None],
    env: DistEnv,
    desc: str,
) -> dict:
    """Steps start_step..steps-1: loss, backward, (clip), optimizer step, `after_step`; logs and saves.

    `compute_loss(step)` returns the loss to minimize and detached parts to log; `after_step(step)`
    does post-update work (e.g. the EMA) and returns extra values to log. Returns the last log record.
    """
    s = settings
    bar = tqdm(total=s.steps, initial=start_step, desc=desc, disable=not env.is_main, dynamic_ncols=True)
    window: dict[str, torch.Tensor] = {}
    count, last, tick = 0, {}, time.perf_counter()
    for step in range(start_step, s.steps):
        lr = s.lr * lr_factor(step, s.warmup, s.steps)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = compute_loss(step)
        scaler.scale(loss).backward()
        if s.clip is not None and step >= s.warmup:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(module.parameters(), s.clip)
        scaler.step(optimizer)
        scaler.update()
        extra = after_step(step)
        for k, v in {"loss": loss.detach(), **parts}.items():
            window[k] = window.get(k, 0) + v.detach().float()
        count += 1
        done = step + 1
        bar.update(1)
        if done % s.log_every == 0 or done == s.steps:
            means = all_reduce_mean(torch.stack(list(window.values())) / count).tolist()
            now = time.perf_counter()
            last = {"step": done, **{k: round(v, 6) for k, v in zip(window, means)}, "lr": lr, **extra,
                    "images_per_s": round(count * s.batch_size / (now - tick), 1)}
            log(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}")
            window, count, tick = {}, 0, time.perf_counter()
        if (s.save_every and done % s.save_every == 0) or done == s.steps:
            save(done)
    bar.close()
    return last
