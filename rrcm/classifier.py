"""`load_classifier`: a trained rRCM as a plain function from noisy pixel-space images to logits."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from rrcm.checkpoint import load_weights, read_config
from rrcm.errors import UserError
from rrcm.model import Classifier
from rrcm.presets import ModelConfig
from rrcm.schedule import PIXEL_MEAN, PIXEL_STD, c_in, grid_time_for_sigma

BUNDLED_DIR = Path(__file__).parent / "weights"
BUNDLED_SIGMAS = {"fashion-mnist": (0.25, 0.5, 1.0)}


class NoisyImageClassifier(nn.Module):
    """Logits of a fine-tuned rRCM for images in [0, 1] pixel space, noised with std `sigma`.

    forward(x) == network(input_scale * x + input_shift): normalization to [-1, 1] and the c_in
    scaling fold into one affine map, and the time token for sigma's grid time is precomputed.
    Samplers that write model-space inputs directly use `input_scale`, `input_shift` and
    `forward_model_input`.
    """

    def __init__(self, classifier: Classifier, sigma: float):
        super().__init__()
        self.classifier = classifier.eval()
        self.sigma = float(sigma)
        self.t = grid_time_for_sigma(sigma)
        self.cfg: ModelConfig = classifier.cfg
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
        h = self.classifier.base_model.tokens_to_features(u, self.time_token.to(u.dtype))
        return self.classifier.linear_head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_model_input(x * self.input_scale + self.input_shift)


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
        raise UserError(f"bundled model {name!r} has classifiers for sigma in {sigmas}; got sigma={sigma}")
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


def load_classifier(path_or_name: str | Path, sigma: float | None = None, device: str | torch.device = "cpu") -> NoisyImageClassifier:
    """An eval-mode module mapping noisy images (N, C, H, W) in [0, 1] to logits, for noise std `sigma`.

    `path_or_name` is a fine-tuned checkpoint folder or a bundled model name ("fashion-mnist").
    `sigma` defaults to the one the checkpoint was fine-tuned for; another value is refused.
    """
    folder = resolve_checkpoint(path_or_name, sigma)
    config = read_config(folder)
    if config.get("kind") != "classifier":
        raise UserError(f"{folder}: a {config.get('kind', 'unknown')} checkpoint, not a fine-tuned classifier")
    trained_sigma = config.get("sigma")
    if sigma is None:
        sigma = trained_sigma
    elif trained_sigma is not None and not math.isclose(sigma, trained_sigma):
        raise UserError(f"{folder}: fine-tuned for sigma {trained_sigma:g}, not {sigma:g}")
    if sigma is None:
        raise UserError(f"{folder}: no sigma recorded; pass one")
    model = Classifier(config["model"])
    load_weights(folder, model)
    return NoisyImageClassifier(model, sigma).to(device).eval()
