"""`load_classifier`: a trained rRCM as a plain function from noisy pixel-space images to logits, for one
sigma; `SigmaInputClassifier`: the same with the noise level as a second input, for exports of a
classifier fine-tuned for several sigmas."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from rrcm.checkpoint import load_weights, read_config
from rrcm.errors import UserError
from rrcm.model import Classifier
from rrcm.presets import ModelConfig
from rrcm.schedule import PIXEL_MEAN, PIXEL_STD, c_in, grid_time_for_sigma, karras_times, nearest_grid_times
from rrcm.sigma_set import SigmaSet

BUNDLED_DIR = Path(__file__).parent / "weights"
BUNDLED_SIGMAS = {"fashion-mnist": (0.25, 0.5, 1.0)}


class NoisyImageClassifier(nn.Module):
    """Logits of a fine-tuned rRCM for images in [0, 1] pixel space, noised with std `sigma`.

    forward(x) == network(input_scale * x + input_shift): normalization to [-1, 1] and the c_in
    scaling fold into one affine map, and the time token for sigma's grid time (on the checkpoint's
    grid, `cfg.grid_points`) is precomputed.
    Samplers that write model-space inputs directly use `input_scale`, `input_shift` and
    `forward_model_input`. `trained`: the sigmas the network was fine-tuned for, which `at_sigma` checks.
    """

    def __init__(self, classifier: Classifier, sigma: float, trained: SigmaSet | None = None):
        super().__init__()
        self.classifier = classifier.eval()
        self.sigma = float(sigma)
        self.trained = trained
        self.cfg: ModelConfig = classifier.cfg
        self.t = grid_time_for_sigma(sigma, self.cfg.grid_points)
        self.num_classes = self.cfg.num_classes
        self.input_shape = self.cfg.input_shape
        scale = c_in(self.t)
        self.input_scale = scale / PIXEL_STD
        self.input_shift = -scale * PIXEL_MEAN / PIXEL_STD
        with torch.no_grad():
            token = classifier.base_model.time_token(torch.tensor([self.t], dtype=torch.float64))
        self.register_buffer("time_token", token, persistent=False)

    def forward_model_input(self, u: torch.Tensor) -> torch.Tensor:
        """Logits for model-space inputs u = input_scale * x + input_shift."""
        return self.classifier.logits_from_tokens(u, self.time_token.to(u.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_model_input(x * self.input_scale + self.input_shift)

    def at_sigma(self, sigma: float) -> "NoisyImageClassifier":
        """The classifier for another sigma the network was fine-tuned for, sharing this one's weights."""
        if self.trained is not None:
            sigma = self.trained.choose(sigma, "this classifier")
        return NoisyImageClassifier(self.classifier, sigma, self.trained)


class SigmaInputClassifier(nn.Module):
    """Logits of noisy pixel-space images x (N, C, H, W) in [0, 1] at the noise level `sigma`, a float32 tensor
    of shape (1,): `forward(x, sigma)`. The grid time, input scaling and time token that NoisyImageClassifier
    precomputes for its sigma are computed here from the input, with plain tensor ops, so an exported graph
    serves every sigma in `trained`. Whether a sigma is one of those is the caller's check (`trained.choose`).
    """

    def __init__(self, classifier: Classifier, trained: SigmaSet):
        super().__init__()
        self.classifier = classifier.eval()
        self.trained = trained
        self.cfg: ModelConfig = classifier.cfg
        self.num_classes = self.cfg.num_classes
        self.input_shape = self.cfg.input_shape
        self.register_buffer("grid", karras_times(self.cfg.grid_points).float(), persistent=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = nearest_grid_times(sigma / PIXEL_STD, self.grid)  # (1,)
        scale = (c_in(t) / PIXEL_STD).view(-1, 1, 1, 1)
        u = x * scale - scale * PIXEL_MEAN
        return self.classifier.logits_from_tokens(u, self.classifier.base_model.time_token(t))

    def at_sigma(self, sigma: float) -> NoisyImageClassifier:
        """The constant-sigma classifier that this one computes at `sigma`, sharing its weights."""
        return NoisyImageClassifier(self.classifier, self.trained.choose(sigma, "this classifier"), self.trained)


class ModelInput(nn.Module):
    """A classifier's `forward_model_input` as a module's forward, for torch.export and quantization."""

    def __init__(self, classifier: NoisyImageClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.classifier.forward_model_input(u)


def _bundled_folder(name: str, sigma: float | None) -> Path:
    sigmas = BUNDLED_SIGMAS[name]
    if sigma is None or not any(math.isclose(sigma, s) for s in sigmas):
        choices = ", ".join(f"{s:g}" for s in sigmas)
        given = "no --sigma" if sigma is None else f"sigma {sigma:g}"
        raise UserError(f"bundled model {name!r} has a classifier for each of sigma {choices}: give --sigma "
                        f"{choices.replace(', ', ' or ')} ({given} given)")
    folder = BUNDLED_DIR / name / f"sigma-{sigma:g}"
    if not folder.is_dir():
        raise UserError(f"bundled model {name!r} (sigma {sigma:g}) is not installed in {BUNDLED_DIR}")
    return folder


def resolve_checkpoint(path_or_name: str | Path, sigma: float | None = None) -> Path:
    """A checkpoint folder from a folder path or a bundled model name."""
    if str(path_or_name) in BUNDLED_SIGMAS:
        return _bundled_folder(str(path_or_name), sigma)
    folder = Path(path_or_name)
    if not folder.exists():
        raise UserError(f"{folder}: no such checkpoint folder or bundled model (bundled: {', '.join(BUNDLED_SIGMAS)})")
    return folder


def _load_network(path_or_name: str | Path, sigma: float | None) -> tuple[Classifier, SigmaSet | None, Path]:
    """(network, the sigmas it was fine-tuned for (None: not recorded), folder) of a classifier checkpoint."""
    folder = resolve_checkpoint(path_or_name, sigma)
    config = read_config(folder)
    if config.get("kind") != "classifier":
        raise UserError(f"{folder}: a {config.get('kind', 'unknown')} checkpoint, not a fine-tuned classifier")
    trained = SigmaSet.from_config(config, str(folder))
    model = Classifier(config["model"])
    load_weights(folder, model)
    return model, trained, folder


def load_classifier(path_or_name: str | Path, sigma: float | None = None, device: str | torch.device = "cpu") -> NoisyImageClassifier:
    """An eval-mode module mapping noisy images (N, C, H, W) in [0, 1] to logits, for noise std `sigma`.

    `path_or_name` is a fine-tuned checkpoint folder or a bundled model name ("fashion-mnist").
    `sigma` must be one the checkpoint was fine-tuned for (a listed one, or inside its range); it defaults
    to the checkpoint's only sigma, and is required for a classifier of several.
    """
    return _at_sigma(*_load_network(path_or_name, sigma), sigma, device)


def _at_sigma(model: Classifier, trained: SigmaSet | None, folder: Path, sigma: float | None,
              device: str | torch.device) -> NoisyImageClassifier:
    if trained is not None:
        sigma = trained.choose(sigma, str(folder))
    elif sigma is None:
        raise UserError(f"{folder}: no sigma recorded; pass one")
    return NoisyImageClassifier(model, sigma, trained).to(device).eval()


def load_for_export(path_or_name: str | Path, sigma: float | None = None,
                    device: str | torch.device = "cpu") -> NoisyImageClassifier | SigmaInputClassifier:
    """What `rrcm export` exports: `load_classifier`'s classifier for `sigma`, or for a checkpoint fine-tuned for
    several sigmas and no `sigma`, a SigmaInputClassifier serving all of them."""
    model, trained, folder = _load_network(path_or_name, sigma)
    if sigma is None and trained is not None and trained.single is None:
        return SigmaInputClassifier(model, trained).to(device).eval()
    return _at_sigma(model, trained, folder, sigma, device)
