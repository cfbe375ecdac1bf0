"""Random-weight models for GPU timing, and their parameter and multiply-accumulate counts.

The baseline of the 85x claim is diffusion-denoised smoothing (Carlini et al., 2023): one step of
the 256 px ADM U-Net (Dhariwal & Nichol, 552M parameters), then an ImageNet ViT: ViT-L/16 at 224 px,
or a BEiT-L-sized one at 512 px. The ViTs reuse rrcm.model's blocks (no qkv bias, like rRCM).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rrcm.classifier import NoisyImageClassifier
from rrcm.engine.throughput import count_flops
from rrcm.model import Block, Classifier, PatchEmbed
from rrcm.presets import get_preset


# ---------------------------------------------------------------- ADM U-Net (guided-diffusion layout)
@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 256
    in_chans: int = 3
    out_chans: int = 6  # eps and the variance interpolation ("learn_sigma")
    channels: int = 256
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    head_channels: int = 64


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding as scale and shift of the second norm."""

    def __init__(self, ch: int, out: int, emb_dim: int, resample: str | None = None):
        super().__init__()
        self.in_norm, self.in_conv = nn.GroupNorm(32, ch), nn.Conv2d(ch, out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out)
        self.out_norm, self.out_conv = nn.GroupNorm(32, out), nn.Conv2d(out, out, 3, padding=1)
        self.skip = nn.Identity() if out == ch else nn.Conv2d(ch, out, 1)
        self.resample = resample

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return F.interpolate(x, scale_factor=2, mode="nearest") if self.resample == "up" else x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.in_norm(x)))
        h = self.in_conv(h)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(self._resample(x)) + self.out_conv(F.silu(h))


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, head_channels: int):
        super().__init__()
        self.heads = ch // head_channels
        self.norm, self.qkv, self.proj = nn.GroupNorm(32, ch), nn.Linear(ch, 3 * ch), nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).flatten(2).transpose(1, 2)).view(B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(out).transpose(1, 2).view(B, C, H, W)


class UNetStage(nn.ModuleList):
    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h) if isinstance(layer, nn.Conv2d) else layer(h, emb)
        return h


class UNet(nn.Module):
    """The ADM noise-prediction U-Net: eps_hat (and variance channels) of x_t at integer timesteps t."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        ch, emb = cfg.channels, 4 * cfg.channels
        self.channels = cfg.channels
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([UNetStage([nn.Conv2d(cfg.in_chans, ch, 3, padding=1)])])
        skips, res = [ch], cfg.image_size
        attn = lambda c: [AttentionBlock(c, cfg.head_channels)] if res in cfg.attention_resolutions else []  # noqa: E731
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = ResBlock(ch, mult * cfg.channels, emb)
                ch = mult * cfg.channels
                self.input_blocks.append(UNetStage([block, *attn(ch)]))
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.input_blocks.append(UNetStage([ResBlock(ch, ch, emb, "down")]))
                skips.append(ch)
                res //= 2
        self.middle = UNetStage([ResBlock(ch, ch, emb), AttentionBlock(ch, cfg.head_channels), ResBlock(ch, ch, emb)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                block = ResBlock(ch + skips.pop(), mult * cfg.channels, emb)
                ch = mult * cfg.channels
                layers = [block, *attn(ch)]
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, ch, emb, "up"))
                    res *= 2
                self.output_blocks.append(UNetStage(layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_chans, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.channels).to(x.dtype))
        skips, h = [], x
        for stage in self.input_blocks:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# ---------------------------------------------------------------- classifiers
VIT_SIZES = {"vit-b16": (768, 12, 12), "vit-l16": (1024, 24, 16)}  # width, depth, heads


class ViT(nn.Module):
    """A plain ImageNet ViT (cls token, learned positions) built from rRCM's blocks."""

    def __init__(self, image_size: int, dim: int, depth: int, heads: int, patch: int = 16, num_classes: int = 1000):
        super().__init__()
        self.patch_embed = PatchEmbed(3, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, 4.0) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x)[:, 0]))


def vit(name: str, image_size: int = 224) -> ViT:
    dim, depth, heads = VIT_SIZES[name]
    return ViT(image_size, dim, depth, heads)


# ---------------------------------------------------------------- diffusion-denoised smoothing
def linear_alpha_bar(steps: int = 1000) -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, steps, dtype=torch.float64, device="cpu"), dim=0)


class Denoiser(nn.Module):
    """One-shot ADM denoising (Carlini et al.): x + sigma * z in [-1, 1] (noise std 2 sigma) is scaled to
    x_t of the timestep whose noise level matches, and x0 is read off the predicted noise."""

    def __init__(self, unet: UNet, sigma: float):
        super().__init__()
        alpha_bar = linear_alpha_bar()
        self.timestep = int(((1 - alpha_bar) / alpha_bar - (2 * sigma) ** 2).abs().argmin())
        self.sqrt_ab, self.sqrt_1mab = math.sqrt(alpha_bar[self.timestep]), math.sqrt(1 - alpha_bar[self.timestep])
        self.unet = unet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_t = self.sqrt_ab * x
        eps = self.unet(x_t, torch.full((x.shape[0],), self.timestep, device=x.device))[:, :3]
        return ((x_t - self.sqrt_1mab * eps) / self.sqrt_ab).clamp(-1, 1)


class DenoisedSmoothing(nn.Module):
    """Carlini et al.'s base classifier: denoise at 256 px, resize to the classifier's size, classify."""

    def __init__(self, denoiser: Denoiser, classifier: nn.Module, classifier_size: int):
        super().__init__()
        self.denoiser, self.classifier, self.classifier_size = denoiser, classifier, classifier_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = F.interpolate(self.denoiser(x), size=self.classifier_size, mode="bicubic", align_corners=False)
        return self.classifier(x0)


# ---------------------------------------------------------------- the models timed, and their costs
MODELS = ("rrcm-b-cifar", "rrcm-b-imagenet", "vit-b16", "vit-l16", "adm-256", "dds-vit-l16-224", "dds-vit-l16-512",
          "dds-tiny")
TINY_UNET = UNetConfig(image_size=32, channels=32, channel_mult=(1, 2, 2), attention_resolutions=(16, 8))


def build(name: str, sigma: float = 0.5, device: torch.device | str = "cpu") -> tuple[nn.Module, tuple[int, int, int]]:
    """A timing model by name (one of MODELS), and the (C, H, W) of one input sample."""
    with torch.device(device):
        return _build(name, sigma)


def _build(name: str, sigma: float) -> tuple[nn.Module, tuple[int, int, int]]:
    if name in ("rrcm-b-cifar", "rrcm-b-imagenet"):
        cfg = get_preset(name)
        return NoisyImageClassifier(Classifier(cfg), sigma), cfg.input_shape
    if name in VIT_SIZES:
        return vit(name), (3, 224, 224)
    if name == "adm-256":
        return Denoiser(UNet(), sigma), (3, 256, 256)
    if name in ("dds-vit-l16-224", "dds-vit-l16-512"):
        size = int(name[-3:])
        return DenoisedSmoothing(Denoiser(UNet(), sigma), vit("vit-l16", size), size), (3, 256, 256)
    if name == "dds-tiny":  # the same pipeline at 32 px, for tests and the CPU rehearsal of scripts/gpu_run.sh
        return DenoisedSmoothing(Denoiser(UNet(TINY_UNET), sigma), ViT(48, dim=64, depth=2, heads=2), 48), (3, 32, 32)
    raise KeyError(name)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(name: str) -> tuple[int, int]:
    """(parameters, multiply-accumulates per sample) of `build(name)`, counted on the meta device."""
    model, shape = build(name, device="meta")
    return count_parameters(model), count_flops(model, shape) // 2


class PixelSpace(nn.Module):
    """A classifier of [-1, 1] images as the engine takes one: pixel-space images in [0, 1], noise std `sigma`.

    The engine's sampler writes input_scale * (x + sigma z) + input_shift = 2 (x + sigma z) - 1 straight into
    the model's input, so the model sees Carlini et al.'s noise of std 2 sigma in [-1, 1].
    """

    input_scale, input_shift = 2.0, -1.0

    def __init__(self, model: nn.Module, sigma: float, input_shape: tuple[int, int, int], num_classes: int = 1000,
                 channels_last: bool = False):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.sigma, self.input_shape, self.num_classes, self.channels_last = sigma, input_shape, num_classes, channels_last

    def forward_model_input(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(u.contiguous(memory_format=torch.channels_last) if self.channels_last else u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_model_input(self.input_scale * x + self.input_shift)
