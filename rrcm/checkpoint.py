"""Checkpoint I/O: a folder with `model.safetensors` + `config.json`, and a resumable training state.

Nothing here unpickles: weights are safetensors, and the training state (optimizer, RNG) is read
with `torch.load(weights_only=True)`. Public checkpoints of the paper's code load through
`load_public_state_dict`, or as a whole, with the conventions they were trained with, through
`load_public_checkpoint`.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from rrcm.archive import check_zip
from rrcm.errors import UserError, first_line
from rrcm.model import Classifier, Encoder
from rrcm.outputs import atomic_write, make_folder
from rrcm.presets import ModelConfig, get_preset
from rrcm.schedule import PAPER_TOTAL_STEPS, num_scales

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
CHECKSUM = "sha256"  # the training state's key for the digest of the rest of its contents


class ConventionWarning(UserWarning):
    """A public checkpoint loaded with a convention (final norm, time grid) assumed rather than given."""


def save_checkpoint(folder: str | Path, model: nn.Module, cfg: ModelConfig, **meta: Any) -> Path:
    """Write weights and config (model sizes plus `meta`, e.g. kind, sigma, step) into `folder`."""
    folder = make_folder(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS, save(tensors))
    config = {"format": "rrcm", "model": cfg.to_dict(), **meta}
    atomic_write(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def read_config(folder: str | Path) -> dict:
    """The config.json of a checkpoint folder, checked to be ours."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(f"{folder}: not a checkpoint folder (no {CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: corrupt config ({first_line(e)})") from None
    if not isinstance(config, dict) or config.get("format") != "rrcm" or "model" not in config:
        raise UserError(f"{path}: not an rrcm checkpoint config")
    config["model"] = ModelConfig.from_dict(config["model"]).validate()
    return config


def _torch_load(path: Path, what: str) -> Any:
    """torch.load of a file of tensors and plain containers, without unpickling code, after `check_zip`
    (torch.save writes zip archives; the older tar format is refused)."""
    check_zip(path, what)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Finite tensors from a .safetensors file, or from a .pt/.pth file without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        obj = load_file(str(path)) if path.suffix == ".safetensors" else _torch_load(path, "weights file")
    except (SafetensorError, pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{path}: unreadable or unsafe weights file ({first_line(e)})") from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: does not hold a state dict of tensors")
    for name, tensor in obj.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not torch.isfinite(tensor).all():
            raise UserError(f"{path}: {name} holds NaN or Inf values; a model with them cannot be run or certified")
    return obj


def load_public_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load with strict checking, accepting the public checkpoints' conventions.

    DDP's `module.` prefix is stripped; for a classifier, the unused pre-training projector
    (`base_model.projection_head.*`) is dropped. Any other missing or unexpected key, or a shape
    that does not fit, is an error. Conventions that are not parameters (the final norm, the time
    grid) are the model's `cfg`: see `load_public_checkpoint`.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not hasattr(model, "projection_head") or model.projection_head is None:
        state = {k: v for k, v in state.items() if not k.startswith(("base_model.projection_head.", "projection_head."))}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches, one per line after a heading
        mismatches = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [first_line(e)]
        more = f" (+{len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        raise UserError(f"{source}: state dict does not fit the model: {mismatches[0]}{more}") from None
    problems = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        shown = ", ".join(problems[:4]) + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
        raise UserError(f"{source}: state dict does not fit the model: {shown}")


def load_weights(folder: str | Path, model: nn.Module) -> None:
    path = Path(folder) / WEIGHTS
    load_public_state_dict(model, read_state_dict(path), str(path))


def load_public_checkpoint(weights: str | Path | dict[str, torch.Tensor], preset: str | ModelConfig, *,
                           final_norm: bool | None = None, pretrain_step: int | None = None) -> Classifier | Encoder:
    """A checkpoint of the paper's code as the rrcm model that computes what it computed there.

    `weights`: a .pt/.pth/.safetensors file or a state dict; one with `linear_head.*` is a fine-tuned
    Classifier, one without an Encoder. `preset`: the sizes (a preset name or a ModelConfig). The
    conventions, recorded in the returned model's `cfg` (and so in a `save_checkpoint` of it):
    - `final_norm`: the fine-tuning's `layernorm` option (default the preset's: off for rrcm-b-cifar,
      on for the ImageNet presets, as in the paper's configs);
    - `pretrain_step`: the pre-training step the checkpoint was fine-tuned from (the paper's
      certify.py `--step`); it fixes the Karras grid, N(k) of its 600k-step 'icm' schedule: 21 points
      at step 0, 41 up to step 258,406 (e.g. 100,000), 81 from 258,407 on. Default: the preset's (81).
    Either one left out is assumed as above, and a ConventionWarning names what was assumed: the weights
    load either way, and a wrong guess changes the logits by several units with no error.
    """
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    if final_norm is not None:
        cfg = replace(cfg, final_norm=final_norm)
    if pretrain_step is not None:
        if isinstance(pretrain_step, bool) or not isinstance(pretrain_step, int) or pretrain_step < 0:
            raise UserError(f"pretrain_step must be a step number >= 0, got {pretrain_step!r}")
        cfg = replace(cfg, grid_points=num_scales(pretrain_step, PAPER_TOTAL_STEPS))
    cfg = cfg.validate()
    source = str(weights) if isinstance(weights, (str, Path)) else "weights"
    state = read_state_dict(weights) if isinstance(weights, (str, Path)) else weights
    fine_tuned = any(k.removeprefix("module.").startswith("linear_head.") for k in state)
    model = Classifier(cfg) if fine_tuned else Encoder(cfg)
    load_public_state_dict(model, state, source)
    assumed = []
    if final_norm is None:
        assumed.append(f"final_norm={cfg.final_norm} (the fine-tuning's layernorm option)")
    if pretrain_step is None:
        assumed.append(f"the {cfg.grid_points}-point time grid (pretrain_step: the pre-training step it was fine-tuned from)")
    if assumed:
        warnings.warn(f"load_public_checkpoint assumed {' and '.join(assumed)}, the defaults of "
                      f"{preset if isinstance(preset, str) else 'this ModelConfig'}; give them as the checkpoint was "
                      "trained: a wrong guess changes the logits by several units with no error",
                      ConventionWarning, stacklevel=2)
    return model.eval()


def _digest(obj: Any, h) -> None:
    """Feed a training state's contents (containers, scalars, strings, tensors), in order, into hash `h`."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            _digest(key, h)
            _digest(value, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}:".encode())
        for value in obj:
            _digest(value, h)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def state_checksum(state: dict[str, Any]) -> str:
    """The sha256 of a training state's contents, without its own CHECKSUM entry."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != CHECKSUM}, h)
    return h.hexdigest()


def save_train_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Optimizer, target network, RNG states and step (only tensors and plain containers), with the checksum
    of its contents, written to a temporary file and renamed into place."""
    state = {**state, CHECKSUM: state_checksum(state)}
    atomic_write(Path(folder) / TRAIN_STATE, lambda f: torch.save(state, f))


def _check_train_state(state: Any, path: Path) -> dict[str, Any]:
    """The structure every training state has: a step, the recipe, the RNG states and state dicts by part name."""
    if not isinstance(state, dict) or not isinstance(state.get(CHECKSUM), str):
        raise UserError(f"{path}: not a training state written by rrcm (no checksum); remove it to start over")
    if state[CHECKSUM] != state_checksum(state):
        raise UserError(f"{path}: training state fails its checksum (corrupt); remove it to start over from step 0")
    step, rng = state.get("step"), state.get("rng")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(state.get("recipe"), dict) \
            or not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise UserError(f"{path}: not a training state of this tool (unexpected structure); remove it to start over")
    return state


def load_train_state(folder: str | Path) -> dict[str, Any] | None:
    """The training state saved in `folder`, checked (checksum and structure), or None when there is none."""
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        state = _torch_load(path, "training state")
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{path}: unreadable training state ({first_line(e)})") from None
    return _check_train_state(state, path)
