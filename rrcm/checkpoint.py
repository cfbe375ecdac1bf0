"""Checkpoint I/O: a folder with `model.safetensors` + `config.json`, and a resumable training state.

Nothing here unpickles: weights are safetensors, and the training state (optimizer, RNG) is read
with `torch.load(weights_only=True)`. Public checkpoints of the paper's code load through
`load_public_state_dict`.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rrcm.errors import UserError, first_line
from rrcm.presets import ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(folder: str | Path, model: nn.Module, cfg: ModelConfig, **meta: Any) -> Path:
    """Write weights and config (model sizes plus `meta`, e.g. kind, sigma, step) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, str(p)))
    config = {"format": "rrcm", "model": cfg.to_dict(), **meta}
    _atomic_write(folder / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def read_config(folder: str | Path) -> dict:
    """The config.json of a checkpoint folder, checked to be ours."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(f"{folder}: not a checkpoint folder (no {CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt config ({e})") from None
    if not isinstance(config, dict) or config.get("format") != "rrcm" or "model" not in config:
        raise UserError(f"{path}: not an rrcm checkpoint config")
    config["model"] = ModelConfig.from_dict(config["model"]).validate()
    return config


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a .pt/.pth file without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{path}: unreadable or unsafe weights file ({first_line(e)})") from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: does not hold a state dict of tensors")
    return obj


def load_public_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load with strict checking, accepting the public checkpoints' conventions.

    DDP's `module.` prefix is stripped; for a classifier, the unused pre-training projector
    (`base_model.projection_head.*`) is dropped. Any other missing or unexpected key is an error.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not hasattr(model, "projection_head") or model.projection_head is None:
        state = {k: v for k, v in state.items() if not k.startswith(("base_model.projection_head.", "projection_head."))}
    result = model.load_state_dict(state, strict=False)
    problems = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        shown = ", ".join(problems[:4]) + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
        raise UserError(f"{source}: state dict does not fit the model: {shown}")


def load_weights(folder: str | Path, model: nn.Module) -> None:
    path = Path(folder) / WEIGHTS
    try:
        load_public_state_dict(model, read_state_dict(path), str(path))
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{path}: {first_line(e)}") from None


def save_train_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Optimizer, target network, RNG states and step: only tensors and plain containers."""
    path = Path(folder) / TRAIN_STATE
    _atomic_write(path, lambda p: torch.save(state, p))


def load_train_state(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{path}: unreadable training state ({first_line(e)})") from None
