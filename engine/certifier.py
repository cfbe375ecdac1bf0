"""Cohen et al.'s CERTIFY and PREDICT for any classifier of noisy pixel-space images.

The certifier only samples and counts; `rrcm.engine.stats` turns counts into guarantees. All noise goes
through `sample_counts`, which hands it to a sampler (`rrcm.engine.sampler`): noise drawn on the backend's
device and written in the model's input space and dtype, argmax and counts on the device, and the counts
of a whole call come to the host once. On CUDA the default sampler is one fused Triton launch per batch.

Seeds: image seed s gives the selection stream (s, 0) and the estimation stream (s, 1), two independent
noise streams (torch.Generators, or Philox keys for the Triton sampler); without a seed each stream is
seeded afresh from the OS.

Sound mode (`sound=True`) draws grid-rounded noise through `rrcm.kernels.sound` for images on the 1/255 grid,
unclipped, as the classifier saw noise in training; its sampled law is within tv_per_pixel(sigma) * num_pixels
(`slack()`) of exact Gaussian smoothing of the quantized classifier x' -> f(round(255 x') / 255), so every
lower bound on a class probability is lowered by that much (and an upper bound raised).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.special import ndtr, ndtri
from torch import nn

from rrcm.engine import sequential, stats
from rrcm.engine.adaptive import certify_adaptive as adaptive_certify
from rrcm.engine.backends import make_backend
from rrcm.engine.sampler import make_sampler
from rrcm.engine.sequential import RadiusDecision
from rrcm.device import upload
from rrcm.errors import UserError, first_line
from rrcm.kernels.sound import to_grid, tv_per_pixel

SELECTION, ESTIMATION = 0, 1


def derive_seed(*keys: int) -> int:
    """A 64-bit generator seed from non-negative integer keys, e.g. (run seed, image index) or (seed, stream)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class CertifyResult:
    prediction: int  # the certified class, or Certifier.ABSTAIN
    radius: float  # L2 radius in pixel space; 0.0 when abstaining
    p_lower: float  # Clopper-Pearson lower bound on the probability of the selected class
    counts: np.ndarray  # (num_classes,) int64 class counts of the n estimation samples
    samples: int | None = None  # noisy forward passes spent: n0 selection + estimation samples


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _as_float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None


def _check_alpha(alpha: float) -> float:
    alpha = _as_float("alpha", alpha)
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha must be in (0, 1), got {alpha!r}")
    return alpha


class Certifier:
    """Randomized-smoothing certification of `model` at noise level `sigma` (pixel space, images in [0, 1]).

    model: a torch module mapping noisy pixel-space batches (N, C, H, W) to logits (N, num_classes), e.g.
    `rrcm.load_classifier(...)`; or a path to an exported file (.onnx, .pt2, .plan; one with a sigma input runs at `sigma`). backend: a name in `backends.BACKENDS`
    (default: onnxruntime for a path, torch for a module) made with `backend_options` (torch: compile=True,
    dtype=torch.bfloat16, or dtype=torch.int8 with calibration=...; onnxruntime: threads=N), or a ready
    backend object that runs `model`.
    Monte-Carlo samples run through the model `batch_size` at a time. sound=True: grid-rounded noise for
    images on the 1/255 grid (Voracek & Hein, 2023), other images are refused.
    """

    ABSTAIN = stats.ABSTAIN

    def __init__(self, model: nn.Module | str | Path, num_classes: int, sigma: float, *, batch_size: int = 1000,
                 device: str | torch.device = "cpu", backend=None, sound: bool = False, sampler: str | None = None,
                 cuda_graphs: bool = False, **backend_options):
        sigma = _as_float("sigma", sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise UserError(f"sigma must be a positive number, got {sigma!r}")
        self.num_classes = _check_count("num_classes", num_classes)
        if self.num_classes < 2:
            raise UserError(f"num_classes must be >= 2, got {num_classes}")
        self.batch_size = _check_count("batch size", batch_size)
        self.sigma = sigma
        self.sound = bool(sound)
        if backend is None or isinstance(backend, str):
            backend = make_backend(model, device, backend, sigma=sigma, **backend_options)
        self.backend = backend
        self.device = self.backend.device
        info = self.backend.info
        self.source = source = str(model) if isinstance(model, (str, Path)) else type(model).__name__
        if info.sigma is not None and not math.isclose(info.sigma, self.sigma, rel_tol=1e-9):
            raise UserError(f"{source}: the classifier was built for sigma {info.sigma:g}, not {self.sigma:g}")
        if info.num_classes is not None and info.num_classes != self.num_classes:
            raise UserError(f"{source}: the classifier has {info.num_classes} classes, not {self.num_classes}")
        self.sampler = make_sampler(sampler, self.backend, self.num_classes, self.sigma, self.batch_size,
                                    sound=self.sound, cuda_graphs=cuda_graphs)
        self.input_shape: tuple[int, ...] | None = None
        if info.input_shape is not None:
            self.check_input(tuple(info.input_shape), source)

    def describe(self) -> dict:
        """What runs: backend, device, input dtype, compile, sampler, CUDA graphs (for sidecars and benchmarks)."""
        b = self.backend
        return {"backend": b.name, "device": str(self.device), "dtype": str(getattr(b, "dtype", b.input_dtype)).removeprefix("torch."),
                "compile": bool(getattr(b, "compiled", False)), "sampler": self.sampler.name,
                "cuda_graphs": bool(getattr(self.sampler, "cuda_graphs", False)), "batch": self.batch_size}

    def check_input(self, shape: tuple[int, ...], source: str = "model") -> None:
        """One forward pass: the model must take images of `shape` (C, H, W) and give num_classes logits."""
        probe = torch.full((2, *shape), 0.5 * self.backend.input_scale + self.backend.input_shift,
                           device=self.device, dtype=self.backend.input_dtype)
        # A backend's `probe` runs its model without compiling it for a batch of 2 (torch.compile would, then
        # compile again for the real batches).
        forward = getattr(self.backend, "probe", self.backend.forward)
        try:
            logits = forward(probe)
        except UserError:
            raise
        except Exception as e:  # whatever the runtime raises for inputs the model cannot take
            raise UserError(f"{source}: cannot run on inputs of shape {shape}: {first_line(e)}") from None
        if logits.dim() != 2 or logits.shape != (2, self.num_classes):
            raise UserError(f"{source}: output of shape {tuple(logits.shape)[1:]} per image, expected ({self.num_classes},) "
                            f"logits for num_classes={self.num_classes}")
        if not torch.isfinite(logits).all():
            raise UserError(f"{source}: NaN or Inf logits on a gray image; a model that answers them cannot be certified")
        self.input_shape = shape

    def _images(self, xs) -> torch.Tensor:
        """xs (k, C, H, W), or a sequence of (C, H, W) images, checked and on the device."""
        if isinstance(xs, (torch.Tensor, np.ndarray)) and xs.ndim == 4:
            batch = torch.as_tensor(xs)
        else:
            images = [torch.as_tensor(x) for x in xs]
            if not images or any(x.ndim != 3 for x in images):
                raise UserError(f"images must be (C, H, W) tensors, got shapes {[tuple(x.shape) for x in images]}")
            if len({tuple(x.shape) for x in images}) > 1:
                raise UserError("images of different shapes in one call")
            batch = torch.stack(images)
        shape = tuple(batch.shape[1:])
        if self.input_shape is None:
            self.check_input(shape)
        if shape != self.input_shape:
            raise UserError(f"image of shape {shape} does not fit the model's input {self.input_shape} (C, H, W)")
        if batch.is_complex() or batch.dtype == torch.bool:
            raise UserError(f"images must be real-valued, got {batch.dtype}")
        batch = batch.float()  # checked where it is (usually the CPU): no device synchronization
        if not torch.isfinite(batch).all():
            raise UserError("image contains NaN or Inf values")
        low, high = batch.min().item(), batch.max().item()
        if low < 0.0 or high > 1.0:
            raise UserError(f"image values must be in [0, 1] (pixel space), got min {low:g}, max {high:g}")
        if self.sound:
            batch = to_grid(batch)  # uint8 grid values, checked once here rather than per noise batch
        return upload(batch, self.device) if batch.device.type == "cpu" else batch.to(self.device)

    def _streams(self, seeds: Sequence[int | None], stream: int) -> list:
        """The sampler's noise streams for `seeds` (None: fresh noise) and stream SELECTION or ESTIMATION."""
        keys = []
        for seed in seeds:
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
                raise UserError(f"seed must be a non-negative integer or None, got {seed!r}")
            keys.append(None if seed is None else derive_seed(int(seed), stream))
        return self.sampler.streams(keys)

    def sample_counts(self, images: torch.Tensor, num_samples: Sequence[int], streams: Sequence) -> torch.Tensor:
        """(k, num_classes) int64 counts on the device: argmax of the model on num_samples[i] noisy copies
        of images[i] (k, C, H, W), noise from streams[i] (`_streams`), whatever else is in the call."""
        return self.sampler.counts(images, num_samples, streams)

    def _read(self, counts: torch.Tensor) -> torch.Tensor:
        """`sample_counts` on the host, read with the sampler's flag of finite logits (one synchronization):
        a model that answered NaN or Inf (its argmax means nothing) is refused, never certified."""
        host = torch.cat([counts.flatten(), self.sampler.finite.view(1).to(counts.dtype)]).cpu()
        if not host[-1]:
            self.sampler.finite.fill_(True)
            raise UserError(f"{self.source}: the model gave NaN or Inf logits on noisy inputs; it cannot be certified")
        return host[:-1].view(counts.shape)

    def slack(self) -> float:
        """How far the smoothed class probabilities may lie from the sampled ones, either way: the total variation
        distance of sound noise from exact Gaussian noise (0 for ordinary sampling)."""
        return tv_per_pixel(self.sigma) * math.prod(self.input_shape) if self.sound else 0.0

    def _certificate(self, prediction: int, p_lower: float, counts: np.ndarray, samples: int) -> CertifyResult:
        p_lower -= self.slack()
        if prediction == self.ABSTAIN or p_lower < 0.5:
            return CertifyResult(self.ABSTAIN, 0.0, p_lower, counts, samples)
        return CertifyResult(prediction, float(stats.certified_radius(p_lower, self.sigma)), p_lower, counts, samples)

    def certify_many(self, xs, n0: int, n: int, alpha: float, seeds: Sequence[int | None] | None = None) -> list[CertifyResult]:
        """CERTIFY for each image of xs; seeds[i] (or fresh noise when None) makes image i's result exactly
        reproducible, the same as `certify(xs[i], n0, n, alpha, seeds[i])`."""
        n0, n, alpha = _check_count("n0", n0), _check_count("n", n), _check_alpha(alpha)
        images = self._images(xs)
        k = len(images)
        seeds = [None] * k if seeds is None else list(seeds)
        if len(seeds) != k:
            raise UserError(f"{len(seeds)} seeds for {k} images")
        streams = self._streams(seeds, SELECTION) + self._streams(seeds, ESTIMATION)
        counts = self._read(self.sample_counts(images.repeat(2, 1, 1, 1), [n0] * k + [n] * k, streams)).numpy()
        results = []
        for selection, estimation in zip(counts[:k], counts[k:]):
            prediction, _, p_lower = stats.certify_from_counts(selection, estimation, self.sigma, alpha)
            results.append(self._certificate(prediction, p_lower, estimation, n0 + n))
        return results

    def predict_many(self, xs, n: int, alpha: float, seeds: Sequence[int | None] | None = None) -> list[int]:
        """PREDICT for each image of xs (noise from the estimation stream of seeds[i])."""
        n, alpha = _check_count("n", n), _check_alpha(alpha)
        images = self._images(xs)
        seeds = [None] * len(images) if seeds is None else list(seeds)
        if len(seeds) != len(images):
            raise UserError(f"{len(seeds)} seeds for {len(images)} images")
        counts = self._read(self.sample_counts(images, [n] * len(images), self._streams(seeds, ESTIMATION))).numpy()
        return [stats.predict_from_counts(c, alpha) for c in counts]

    def draws(self, x, seed: int | None):
        """(select, estimate): draw(m) -> (num_classes,) counts of m fresh noisy copies of image x, from the
        selection and estimation streams of `seed`; each call continues its stream."""
        image = self._images([x])
        streams = self._streams([seed], SELECTION) + self._streams([seed], ESTIMATION)
        return [lambda m, s=s: self._read(self.sample_counts(image, [m], [s]))[0] for s in streams]

    def certify(self, x, n0: int, n: int, alpha: float, seed: int | None = None, *, adaptive: bool = False,
                max_samples: int | None = None, tolerance: float = 0.01) -> CertifyResult:
        """CERTIFY(x): class from n0 selection samples, radius from n estimation samples at level alpha.

        adaptive=True: up to max_samples (default n) estimation samples read at doubling checkpoints, stopping
        once more would not raise the radius by over `tolerance` (`rrcm.engine.adaptive`); `samples` and
        `counts` then tell what was spent.
        """
        if not adaptive:
            return self.certify_many([x], n0, n, alpha, [seed])[0]
        n0, alpha = _check_count("n0", n0), _check_alpha(alpha)
        budget = _check_count("max_samples", n if max_samples is None else max_samples)
        tolerance = _as_float("tolerance", tolerance)
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise UserError(f"tolerance must be a positive number, got {tolerance!r}")
        select, estimate = self.draws(x, seed)
        counts = np.zeros(self.num_classes, dtype=np.int64)

        def counted(m: int) -> torch.Tensor:
            drawn = estimate(m)
            counts[:] += drawn.cpu().numpy()
            return drawn

        result = adaptive_certify(select, counted, self.num_classes, self.sigma, alpha, n0=n0, max_samples=budget,
                                  tolerance=tolerance)
        return self._certificate(result.prediction, result.p_lower, counts, result.samples)

    def certify_radius(self, x, r: float, alpha: float, *, beta: float | None = 1e-3, n0: int = 100,
                       max_samples: int = 100_000, seed: int | None = None) -> RadiusDecision:
        """Is the smoothed prediction for x robust at L2 radius r? An anytime-valid sequential test
        (`rrcm.engine.sequential`) that stops as soon as the samples settle it: P(false certificate) <= alpha."""
        r, alpha = _as_float("radius", r), _check_alpha(alpha)
        n0, max_samples = _check_count("n0", n0), _check_count("max_samples", max_samples)
        if not (math.isfinite(r) and r >= 0):
            raise UserError(f"radius must be a number >= 0, got {r!r}")
        select, estimate = self.draws(x, seed)
        if self.sound:  # test the sampled probability against p0 + slack, so the exact one exceeds p0
            p0 = min(float(ndtr(r / self.sigma)) + self.slack(), float(np.nextafter(1.0, 0.0)))
            r = float(self.sigma * ndtri(p0))
        return sequential.certify_radius(select, estimate, self.num_classes, self.sigma, r, alpha, beta=beta, n0=n0,
                                         max_samples=max_samples, batch_size=self.batch_size)

    def predict(self, x, n: int, alpha: float, seed: int | None = None) -> int:
        """PREDICT(x): the smoothed classifier's class, or ABSTAIN."""
        return self.predict_many([x], n, alpha, [seed])[0]
