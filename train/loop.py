"""What pre-training and fine-tuning share: options, data order, seeds, optimizer and LR schedule,
precision, the run folder (checkpoint, training state, JSON-lines log) and the step loop itself.

Every random draw of step k derives from (seed, k, rank), so a run resumed from a saved step
repeats exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import struct
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm import tqdm

from rrcm.checkpoint import CONFIG, TRAIN_STATE, WEIGHTS, load_train_state, read_config, save_train_state
from rrcm.checks import MAX_SEED, check_int
from rrcm.data import ImageDataset, TensorImageDataset, load_dataset
from rrcm.datasets import DATASETS
from rrcm.device import upload
from rrcm.errors import UserError, first_line
from rrcm.eta import duration
from rrcm.outputs import OutputLock, atomic_write, check_writable, make_folder, write_error
from rrcm.presets import ModelConfig, get_preset
from rrcm.resources import check_fits, vit_training_bytes
from rrcm.schedule import PIXEL_MEAN, PIXEL_STD
from rrcm.distributed import DistEnv, on_rank_zero
from rrcm.train.distributed import all_reduce_mean

LOG = "log.jsonl"
RUN_FILES = (WEIGHTS, CONFIG, TRAIN_STATE, LOG)  # all a run folder may hold, with their .tmp while being written
MAX_STEPS = 10**10
MAX_EPOCHS = 10**6
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")


# --- command-line options ---------------------------------------------------------------------

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
    check_positive(batch_size=args.batch_size, lr=args.lr, max_train_images=args.max_train_images)
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UserError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    check_int("--log-every", args.log_every, 1, MAX_STEPS)
    check_int("--save-every", args.save_every, 0, MAX_STEPS)
    if args.warmup is not None:
        check_int("--warmup", args.warmup, 0, MAX_STEPS)
    check_int("--seed", args.seed, 0, MAX_SEED)
    for name, limit in (("steps", MAX_STEPS), ("epochs", MAX_EPOCHS)):
        if (getattr(args, name, None) or 0) > limit:
            raise UserError(f"--{name} must be at most {limit:,}, got {getattr(args, name):,}")
    if args.batch_size % env.world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {env.world_size} processes")


def check_memory(cfg: ModelConfig, batch_size: int, copies: int, env: DistEnv) -> None:
    """Refuse, before the model is built, a step whose `copies` views of `batch_size` images (global) cannot
    fit in the memory of this process's device."""
    per_process = batch_size // env.world_size
    need = vit_training_bytes(cfg, copies * per_process, cfg.approx_parameters())
    check_fits(need, f"a training step on {per_process} images per process ({copies} views each)", env.device,
               "lower --batch-size or the model's size")


def load_split(cfg: ModelConfig, split: str, data_dir: str | None, device: torch.device) -> ImageDataset:
    """The `split` of the model's dataset at its image size, held on `device` when it fits in a tensor
    (Fashion-MNIST, CIFAR-10), so that batches are gathered there; image folders (ImageNet) stay on the host,
    decoded per item."""
    data = load_dataset(cfg.dataset, split, data_dir, cfg.image_size if cfg.dataset == "imagenet" else None)
    return data.to(device) if isinstance(data, TensorImageDataset) else data


def load_train_data(args: argparse.Namespace, cfg: ModelConfig, device: torch.device) -> ImageDataset:
    """The training set (`load_split`), the first --max-train-images of it when given."""
    data = load_split(cfg, "train", args.data_dir, device)
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

    @property
    def device(self) -> torch.device:
        return self.data.device

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
    """Global batch indices of step k: epochs are fresh permutations of (seed, epoch), last partial batch dropped.

    The permutation is drawn on the host, the same on every device and process, and sent to `device`
    (the dataset's) once per epoch; a step's indices are a slice of it there.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, device: torch.device = torch.device("cpu")):
        self.num_items, self.batch_size, self.seed, self.device = num_items, batch_size, seed, device
        self.steps_per_epoch = num_items // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int, env: DistEnv) -> torch.Tensor:
        """This process's share of step `step`'s global batch, on `device`."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            perm = torch.randperm(self.num_items, generator=make_generator("cpu", self.seed, epoch, 0))
            self._epoch, self._perm = epoch, upload(perm, self.device)
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


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW, fused: one kernel per step, and no step count read back to the host (the default
    implementations keep it there), on the CPU as on a GPU."""
    return torch.optim.AdamW(groups, lr=lr, fused=True)


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

    Made before any work: the folder must be writable and hold nothing but these files, and it is this
    run's alone (an `OutputLock`, held until `close()` or until the RunFolder is gone). A folder is
    resumed only if its recorded recipe (model, data, schedule, seed...) equals this run's.
    """

    def __init__(self, out: str | Path, kind: str, recipe: dict, env: DistEnv):
        self.path, self.kind, self.recipe, self.env = Path(out), kind, recipe, env
        self._lock = OutputLock(self.path)
        self._resumed_step: int | None = None  # log lines after it are dropped once the run writes again
        on_rank_zero(env.rank, env.world_size, self._claim)
        self._release = weakref.finalize(self, self._lock.release)

    def _claim(self) -> None:
        check_writable(self.path, folder=True)
        self._lock.acquire()
        names = {p.name for p in self.path.iterdir()} if self.path.is_dir() else set()
        foreign = sorted(names - set(RUN_FILES) - {f + ".tmp" for f in RUN_FILES})
        if foreign:
            self._lock.release()
            shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
            raise UserError(f"--out {self.path} holds files rrcm did not write ({shown}): not writing there; "
                            "choose a new or empty folder")

    def close(self) -> None:
        """Give up the folder's lock (also done when the RunFolder is garbage-collected or the process ends)."""
        self._release()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def resume(self) -> dict | None:
        """The saved training state, or None for a fresh run."""
        has_config, state = (self.path / CONFIG).is_file(), load_train_state(self.path)
        if not has_config and state is None:
            self._check_fresh()
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
        self._resumed_step = state["step"]
        return state

    def _check_fresh(self) -> None:
        """A folder without a saved run may hold only what a run killed before its first save leaves: its log
        (dropped once this run writes) and temporary files. Anything else under our names is not ours."""
        if (self.path / WEIGHTS).exists():
            raise UserError(f"--out {self.path} holds a {WEIGHTS} without the {CONFIG} and {TRAIN_STATE} a run of "
                            "rrcm saves with it: not writing there; choose a new or empty folder")
        log = self.path / LOG
        if not log.exists():
            return
        try:
            *lines, tail = log.read_bytes().split(b"\n")
        except OSError as e:
            raise UserError(f"cannot read {log}: {e.strerror}") from None
        head = b'{"step": '
        if not (all(_is_log_record(line) for line in lines) and head.startswith(tail[:len(head)])):
            raise UserError(f"--out {self.path} holds a {LOG} that rrcm did not write: not writing there; "
                            "choose a new or empty folder")
        self._resumed_step = 0  # the killed run's lines go once this run writes

    def _truncate_log(self) -> None:
        """Drop log lines written after the resumed step (or cut off) by the run that was stopped: only once
        this run writes again, so a state that turns out not to fit the run leaves the log as it was."""
        step, self._resumed_step = self._resumed_step, None
        path = self.path / LOG
        if step is None or not path.is_file():
            return
        kept = []
        for line in path.read_bytes().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + b"\n")
            except (ValueError, KeyError, TypeError):  # a line cut off by the kill (or not UTF-8)
                pass
        atomic_write(path, b"".join(kept))

    def log(self, record: dict) -> None:
        if self.env.is_main:
            self._truncate_log()
            make_folder(self.path)
            try:
                with open(self.path / LOG, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise write_error(self.path / LOG, e) from None

    def save_state(self, state: dict) -> None:
        if self.env.is_main:
            self._truncate_log()
            save_train_state(self.path, {**state, "recipe": self.recipe})


def _is_log_record(line: bytes) -> bool:
    """A complete line of a run's log.jsonl: a JSON object with its step first."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and isinstance(next(iter(record.values()), None), int) and next(iter(record)) == "step"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # the devices this machine has of those saved
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def training_state(step: int, parts: dict, **extra) -> dict:
    """What resuming at `step` needs: each part's state_dict() under its name (model, optimizer, ...), the RNGs,
    and `extra` plain values (the plan, the seconds spent)."""
    return {"step": step, **{name: part.state_dict() for name, part in parts.items()}, "rng": rng_state(), **extra}


def load_training_state(state: dict, parts: dict) -> int:
    """Restore `parts` and the RNGs from a `training_state`; returns its step."""
    name = "rng"
    try:
        for name, part in parts.items():
            part.load_state_dict(state[name])
        name = "rng"
        set_rng_state(state["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        raise UserError(f"{TRAIN_STATE}: its {name} does not fit this run ({first_line(e)}); "
                        "use the --out of this run, or remove the file to start over") from None
    return int(state["step"])


# --- run length: fixed, or sized from a time budget --------------------------------------------------

BUDGET_FILL = 0.95  # share of the budget left after measuring that the steps fill; logs, saves and jitter take the rest
MEASURE_WARMUP, MEASURE_STEPS = 2, 10  # untimed steps (first kernels, allocations), then the timed ones


@dataclass
class Plan:
    """A run's length, fixed before its first step and kept by a resume: `steps` and `warmup`, and with a
    time budget the throughput they were sized from."""

    steps: int
    warmup: int
    time_budget: float | None = None
    seconds_per_step: float | None = None  # measured
    measure_seconds: float = 0.0  # what measuring took, counted against the budget

    def note(self) -> str:
        """How a run sized by a time budget got its steps (for its first printed line); '' without a budget."""
        if self.time_budget is None:
            return ""
        return f" (the {self.time_budget:g} s budget at {self.seconds_per_step * 1e3:.1f} ms a step)"


def length_recipe(args: argparse.Namespace, steps: int | None) -> dict:
    """The recipe's share of a run's length: `steps` (with --time-budget: at most that many, None for no limit)
    and the warm-up (with --time-budget a tenth of the steps that fit, unless --warmup)."""
    if args.time_budget is None:
        return {"steps": steps, "warmup": steps // 10 if args.warmup is None else args.warmup}
    return {"steps": steps, "warmup": args.warmup, "time_budget": args.time_budget}


def plan_run(args: argparse.Namespace, state: dict | None, steps: int | None,
             measure: Callable[[], tuple[float, float]]) -> tuple[Plan, float]:
    """(plan, seconds already spent): `steps` steps, or with --time-budget as many as fit (at most `steps`)
    at the throughput `measure()` reports as (seconds per step, seconds it took). A resumed run keeps its plan."""
    if state is not None and "plan" in state:
        return Plan(**state["plan"]), float(state["train_seconds"])
    if args.time_budget is None:  # also a state saved before plans were recorded: it had no budget
        return Plan(steps, length_recipe(args, steps)["warmup"]), 0.0
    per_step, spent = measure()
    fit = max(1, int((args.time_budget - spent) * BUDGET_FILL / per_step))
    steps = fit if steps is None else min(steps, fit)
    warmup = steps // 10 if args.warmup is None else args.warmup
    return Plan(steps, warmup, args.time_budget, per_step, spent), spent


def progress(plan: Plan, step: int, seconds: float, batch_size: int, num_images: int) -> dict:
    """What config.json records of a run's length: the planned steps, the step reached, epochs (images seen /
    training images), the seconds spent in the step loop over all sessions (measuring included: what a
    time budget pays) and the images/s of the training steps (measuring excluded)."""
    stepping = seconds - plan.measure_seconds
    record = {"step": step, "steps": plan.steps, "epochs": round(step * batch_size / num_images, 4),
              "train_seconds": round(seconds, 3),
              "images_per_s": round(step * batch_size / stepping, 1) if stepping > 0 else None}
    if plan.time_budget is not None:
        record.update(time_budget=plan.time_budget, seconds_per_step=plan.seconds_per_step)
    return record


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the step loop ---------------------------------------------------------------------------------

class Trainer(Protocol):
    """What the step loop drives (Pretrainer, Finetuner)."""

    module: nn.Module  # whose gradient norm is clipped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimize at `step` and detached parts to log."""

    def after_step(self, step: int) -> dict:
        """Work after the update (e.g. the EMA); returns values to log."""

    def parts(self) -> dict:
        """What a saved training state holds, by name."""


@dataclass
class LoopSettings:
    steps: int
    warmup: int
    lr: float
    batch_size: int  # global
    log_every: int
    save_every: int
    num_images: int  # in the training set, for epochs
    clip: float | None = None  # gradient-norm clipping, only after warm-up
    time_budget: float | None = None  # seconds; checked at each log line


@dataclass
class LoopResult:
    start: int
    end: int  # the step reached
    seconds: float  # in this call's loop
    total_seconds: float  # in the run's loops so far, earlier sessions (and measuring) included
    out_of_time: bool  # stopped by the time budget (also: found it spent)
    last: dict  # the last log record, {} if no step ran

    def summary(self, settings: LoopSettings) -> str:
        """What the run did, for its last printed line: steps, time, images/s, epochs, final loss."""
        s = settings
        if self.end == self.start:
            why = f"its time budget of {s.time_budget:g} s is spent" if self.out_of_time else "it is complete"
            return f"nothing to train: the run stopped at step {self.end} of {s.steps}, {why}"
        rate = (self.end - self.start) * s.batch_size / max(self.seconds, 1e-9)
        text = (f"steps {self.start + 1}-{self.end} of {s.steps} in {self.seconds:.1f} s, {rate:,.0f} images/s; "
                f"{self.end * s.batch_size / s.num_images:.2f} epochs in all")
        if self.out_of_time:
            text += f", stopped by the time budget ({self.total_seconds:.1f} of {s.time_budget:g} s)"
        return text + (f"; final loss {self.last['loss']:.4f}" if "loss" in self.last else "")


def optimizer_step(s: LoopSettings, trainer: Trainer, step: int) -> tuple[torch.Tensor, dict, dict, float]:
    """Step `step`: loss, backward, clipping after warm-up, optimizer step, `after_step`.
    Returns (loss, its parts, after_step's values, lr)."""
    lr = s.lr * lr_factor(step, s.warmup, s.steps)
    set_lr(trainer.optimizer, lr)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, parts = trainer.step_loss(step)
    trainer.scaler.scale(loss).backward()
    if s.clip is not None and step >= s.warmup:
        trainer.scaler.unscale_(trainer.optimizer)
        nn.utils.clip_grad_norm_(trainer.module.parameters(), s.clip)
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    return loss, parts, trainer.after_step(step), lr


def measure_step_seconds(trainer: Trainer, lr: float, clip: float | None, env: DistEnv) -> tuple[float, float]:
    """(seconds per step, seconds it took): MEASURE_WARMUP + MEASURE_STEPS steps from step 0, timed after the
    warm-up, then undone (the parts and RNGs restored). The processes take the mean, so that they plan alike."""
    t0 = time.perf_counter()
    saved = copy.deepcopy(training_state(0, trainer.parts()))
    s = LoopSettings(MEASURE_WARMUP + MEASURE_STEPS, warmup=0, lr=lr, batch_size=1, log_every=1, save_every=0,
                     num_images=1, clip=clip)  # only the optimizer step's fields matter here
    for step in range(s.steps):
        if step == MEASURE_WARMUP:
            synchronize(env.device)
            t1 = time.perf_counter()
        optimizer_step(s, trainer, step)
    synchronize(env.device)
    per_step = (time.perf_counter() - t1) / MEASURE_STEPS
    load_training_state(saved, trainer.parts())
    measured = torch.tensor([per_step, time.perf_counter() - t0], dtype=torch.float64, device=env.device)
    per_step, spent = all_reduce_mean(measured).tolist()
    return per_step, spent


def run_loop(settings: LoopSettings, trainer: Trainer, start_step: int, save: Callable[[int, float], None],
             log: Callable[[dict], None], env: DistEnv, desc: str, spent: float = 0.0) -> LoopResult:
    """Steps start_step..steps-1 of `optimizer_step`; logs every `log_every` steps, saves every `save_every`
    and at the end. `save(step, seconds)` gets the loop seconds of the run so far (`spent` by earlier sessions).

    Between log lines nothing is read back from the device, so that a GPU runs ahead of the host (but for the
    two waits that time MEASURE_STEPS steps after MEASURE_WARMUP, from which the main process prints the time
    left: `eta_line`). At a log line the processes agree whether the time budget is spent; if so the run saves
    and stops there. A loss that is no longer a number stops the run there, before its state is saved.
    """
    s = settings
    t0 = time.perf_counter()

    def seconds() -> float:
        return spent + time.perf_counter() - t0

    if s.time_budget is not None and start_step > 0 and spent >= s.time_budget:  # a fresh run takes its >= 1 steps
        return LoopResult(start_step, start_step, 0.0, spent, True, {})
    with tqdm(total=s.steps, initial=start_step, desc=desc, disable=not env.is_main, dynamic_ncols=True) as bar:
        return _steps(s, trainer, start_step, save, log, bar, seconds, t0)


def eta_line(desc: str, s: LoopSettings, done: int, per_step: float, spent: float) -> str:
    """The time a run has left after step `done`, at `per_step` seconds a step (timed over the MEASURE_STEPS
    steps before), and where its time budget (after `spent` seconds) stops it sooner."""
    left = s.steps - done
    line = (f"rrcm {desc}: about {duration(left * per_step)} for the {left:,} steps left ({per_step * 1e3:.1f} ms a "
            f"step over steps {done - MEASURE_STEPS + 1}-{done})")
    if s.time_budget is not None and s.time_budget - spent < left * per_step:
        line += f"; the time budget stops it in about {duration(max(s.time_budget - spent, 0.0))}"
    return line


def _steps(s: LoopSettings, trainer: Trainer, start_step: int, save: Callable[[int, float], None],
           log: Callable[[dict], None], bar: tqdm, seconds: Callable[[], float], t0: float) -> LoopResult:
    window: dict[str, torch.Tensor] = {}
    count, last, tick, done, out_of_time = 0, {}, time.perf_counter(), start_step, False
    timed_from, timed_to, timed_start = start_step + MEASURE_WARMUP, start_step + MEASURE_WARMUP + MEASURE_STEPS, 0.0
    for step in range(start_step, s.steps):
        loss, parts, extra, lr = optimizer_step(s, trainer, step)
        for k, v in {"loss": loss.detach(), **parts}.items():
            window[k] = window.get(k, 0) + v.detach().float()
        count += 1
        done = step + 1
        bar.update(1)
        if done in (timed_from, timed_to) and timed_to < s.steps:
            synchronize(loss.device)
            if done == timed_from:
                timed_start = time.perf_counter()
            elif not bar.disable:
                per_step = (time.perf_counter() - timed_start) / MEASURE_STEPS
                bar.write(eta_line(bar.desc, s, done, per_step, seconds()))
        if done % s.log_every == 0 or done == s.steps:
            clock = torch.full((), seconds(), device=loss.device)  # a fill, not a copy from the host
            *means, elapsed = all_reduce_mean(torch.stack([v / count for v in window.values()] + [clock])).tolist()
            out_of_time = s.time_budget is not None and elapsed >= s.time_budget
            now = time.perf_counter()
            last = {"step": done, **{k: round(v, 6) for k, v in zip(window, means)}, "lr": lr, **extra,
                    "epoch": round(done * s.batch_size / s.num_images, 4),
                    "images_per_s": round(count * s.batch_size / (now - tick), 1), "seconds": round(elapsed, 2)}
            if out_of_time:
                last["stopped"] = "time budget"
            log(last)
            if not math.isfinite(last["loss"]) and not trainer.scaler.is_enabled():  # fp16's scaler skips such steps
                raise UserError(f"the training loss is {last['loss']} by step {done}: the weights stopped being numbers "
                                f"(a learning rate too high?); nothing after the last saved step was kept: lower --lr and "
                                f"start again in another --out")
            bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}")
            window, count, tick = {}, 0, time.perf_counter()
        if (s.save_every and done % s.save_every == 0) or done == s.steps or out_of_time:
            save(done, seconds())
        if out_of_time:
            break
    return LoopResult(start_step, done, time.perf_counter() - t0, seconds(), out_of_time, last)
