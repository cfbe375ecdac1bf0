"""Batched augmentations of images (B, C, H, W) in [0, 1].

Each image gets its own random parameters, all drawn from one optional `torch.Generator`, so a
seed reproduces a batch of views exactly. The draws are made on the generator's device (a
generator on the images' device keeps everything there; a CPU generator also drives GPU tensors,
at the cost of a copy per draw). The recipes are torchvision's (RandomResizedCrop, ColorJitter, ...)
as batched tensor ops: no loop over images, and no value read back to the host, so that on a GPU
a batch of views is queued without waiting for the device. A random choice per image is a
`torch.where` between the transformed and the untouched batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rrcm.errors import UserError

Range = tuple[float, float]


def _rand(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _uniform(shape, lo: float, hi: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(shape, generator, device)


def _coin(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return _rand(n, generator, device) < p


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise UserError(f"augmentations take float images (B, C, H, W), got {x.dtype} {tuple(x.shape)}")


def _check_range(name: str, r: Range, lo: float, hi: float = math.inf) -> None:
    if not lo <= r[0] <= r[1] <= hi:
        raise UserError(f"{name} must be an interval (min, max) inside [{lo}, {hi}], got {tuple(r)}")


def _where(mask: torch.Tensor, changed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """changed[i] where mask[i] holds, else x[i]."""
    return torch.where(mask.view(-1, 1, 1, 1), changed, x)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) as (B, 1, H, W); one-channel images are returned as they are."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)  # weights as Python numbers: a weight tensor would be a copy to the device per call
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Short side to `size` (antialiased bilinear), then the centre `size` x `size` square."""
    _check_batch(x)
    h, w = x.shape[-2:]
    if h == w == size:
        return x
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bilinear", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size].clamp(0, 1)


def random_resized_crop(x: torch.Tensor, size: int, scale: Range = (0.2, 1.0), ratio: Range = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """A random box per image (area fraction in `scale`, log-uniform aspect in `ratio`), resized to `size`."""
    _check_batch(x)
    _check_range("crop scale", scale, 1e-6, 1.0)
    _check_range("crop ratio", ratio, 1e-6)
    b, c, h, w = x.shape
    dev = x.device
    tries = 10  # torchvision's: the first box that fits, else the whole image at the nearest valid ratio
    area = _uniform((b, tries), *scale, generator, dev) * (h * w)
    aspect = torch.exp(_uniform((b, tries), math.log(ratio[0]), math.log(ratio[1]), generator, dev))
    cw, ch = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (cw <= w) & (ch <= h)
    first = fits.float().argmax(1, keepdim=True)
    any_fits = fits.any(1)
    fallback_w = min(w, h * ratio[1])
    fallback_h = min(h, w / ratio[0])
    cw = torch.where(any_fits, cw.gather(1, first).squeeze(1), fallback_w)
    ch = torch.where(any_fits, ch.gather(1, first).squeeze(1), fallback_h)
    left = torch.where(any_fits, _rand(b, generator, dev), 0.5) * (w - cw)
    top = torch.where(any_fits, _rand(b, generator, dev), 0.5) * (h - ch)
    # Output pixel grid [-1, 1]^2 (align_corners=False) onto the box, in input-normalized coordinates.
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=dev)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp_(0, 1)


def random_flip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image mirrored left-right with probability p."""
    _check_batch(x)
    return _where(_coin(len(x), p, generator, x.device), x.flip(-1), x)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), f)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), f)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    v, argmax = x.max(1)
    delta = v - x.amin(1)
    s = delta / v.clamp_min(1e-12)
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (v - r) / d, (v - g) / d, (v - b) / d
    h = torch.where(argmax == 0, bc - gc, torch.where(argmax == 1, 2 + rc - bc, 4 + gc - rc)) / 6
    h = (h + shift.view(-1, 1, 1)) % 1
    # HSV -> RGB: channel n in (R, G, B) = (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    n = torch.arange(5, 0, -2, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)  # (5, 3, 1), made on the device
    k = (n + 6 * h.unsqueeze(1)) % 6
    rgb = (v - v * s).unsqueeze(1) + (v * s).unsqueeze(1) * (1 - torch.minimum(k, 4 - k).clamp(0, 1))
    return rgb.clamp_(0, 1)


def color_jitter(x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2,
                 hue: float = 0.1, p: float = 0.8, generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's RandomApply([ColorJitter(...)], p) per image: factors uniform in [1 - s, 1 + s], hue
    shift in [-hue, hue], the four in a random order. One channel: brightness and contrast only."""
    _check_batch(x)
    if not 0 <= hue <= 0.5:
        raise UserError(f"hue jitter must be in [0, 0.5], got {hue}")
    b, c = x.shape[:2]
    dev = x.device
    apply = _coin(b, p, generator, dev)
    factors = [_uniform(b, max(0.0, 1 - s), 1 + s, generator, dev) for s in (brightness, contrast, saturation)]
    factors.append(_uniform(b, -hue, hue, generator, dev))
    order = _rand((b, 4), generator, dev).argsort(1)
    ops = [(_brightness, brightness), (_contrast, contrast)]
    if c == 3:
        ops += [(_saturation, saturation), (_hue, hue)]
    out = x
    for step in range(4):
        for j, (op, strength) in enumerate(ops):
            if strength > 0:
                out = _where(apply & (order[:, step] == j), op(out, factors[j]), out)
    return out


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each RGB image replaced by its luma in all three channels with probability p."""
    _check_batch(x)
    if x.shape[1] == 1:
        return x
    return _where(_coin(len(x), p, generator, x.device), grayscale(x).expand_as(x), x)


def _blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, image i with std sigma[i], reflected at the borders.

    The kernel's radius, 3 max_sigma, comes from the range and not from the drawn sigmas, so that its
    size is known without reading them back; the extra taps of a smaller sigma are ~0.
    """
    h, w = x.shape[-2:]
    radius = min(math.ceil(3 * max_sigma), h - 1, w - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(-1, 1, 1, 1, 2 * radius + 1)  # (B, 1, 1, 1, taps)
    y = F.pad(x, (radius,) * 4, mode="reflect")
    y = (y.unfold(-1, 2 * radius + 1, 1) * kernel).sum(-1)  # along rows: (B, C, H + 2r, W)
    y = (y.unfold(-2, 2 * radius + 1, 1) * kernel).sum(-1)  # along columns: (B, C, H, W)
    return y.clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, p: float = 0.5, sigma: Range = (0.1, 2.0),
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image blurred with probability p by a Gaussian whose std (pixels) is uniform in `sigma`."""
    _check_batch(x)
    _check_range("blur sigma", sigma, 1e-6)
    apply = _coin(len(x), p, generator, x.device)
    sigmas = _uniform(len(x), *sigma, generator, x.device)
    return _where(apply, _blur(x, sigmas, sigma[1]), x)


def solarize(x: torch.Tensor, p: float = 0.2, threshold: float = 0.5,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image, with probability p, has its pixels >= threshold inverted (v -> 1 - v)."""
    _check_batch(x)
    apply = _coin(len(x), p, generator, x.device).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1 - x, x)


def finetune_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The fine-tuning view: a random horizontal flip."""
    return random_flip(x, 0.5, generator)


@dataclass
class PretrainViews:
    """The three pre-training views (method.md section 4): x = centre view + flip; a, b = the asymmetric
    strong views of MoCo v3 / BYOL (blur always on a and rarely on b, solarize only on b)."""

    image_size: int
    crop_scale: Range = (0.2, 1.0)
    crop_ratio: Range = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: Range | None = None  # default: (0.1, 2.0) pixels at 224 px, scaled to image_size
    blur_p_a: float = 1.0
    blur_p_b: float = 0.1
    solarize_p_a: float = 0.0
    solarize_p_b: float = 0.2
    flip_p: float = 0.5

    def __post_init__(self):
        if self.image_size < 1:
            raise UserError(f"image size must be positive, got {self.image_size}")
        if self.blur_sigma is None:
            # The recipe's blur is for 224 px images; at 28 px a 2-pixel blur would erase the object.
            scale = min(1.0, self.image_size / 224)
            self.blur_sigma = (0.1 * scale, 2.0 * scale)
        for name in ("jitter_p", "grayscale_p", "blur_p_a", "blur_p_b", "solarize_p_a", "solarize_p_b", "flip_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be a probability, got {getattr(self, name)}")
        _check_range("crop scale", self.crop_scale, 1e-6, 1.0)
        _check_range("crop ratio", self.crop_ratio, 1e-6)
        _check_range("blur sigma", self.blur_sigma, 1e-6)

    def strong(self, x: torch.Tensor, blur_p: float, solarize_p: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_resized_crop(x, self.image_size, self.crop_scale, self.crop_ratio, generator)
        x = color_jitter(x, self.brightness, self.contrast, self.saturation, self.hue, self.jitter_p, generator)
        x = random_grayscale(x, self.grayscale_p, generator)
        x = gaussian_blur(x, blur_p, self.blur_sigma, generator)
        x = solarize(x, solarize_p, generator=generator)
        return random_flip(x, self.flip_p, generator)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(x_simple, a, b) for a batch x (B, C, H, W) in [0, 1]."""
        simple = random_flip(resize_center_crop(x, self.image_size), self.flip_p, generator)
        a = self.strong(x, self.blur_p_a, self.solarize_p_a, generator)
        b = self.strong(x, self.blur_p_b, self.solarize_p_b, generator)
        return simple, a, b
