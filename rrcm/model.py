"""The rRCM network: a ViT encoder with a time token (method.md section 3).

Parameter names follow the public checkpoints (patch_embed.proj, cls_token, pos_embed, time_embed,
blocks.{i}.*, norm, projection_head.*, and base_model.* / linear_head for a classifier), so their
state dicts load with strict checking.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rrcm.presets import ModelConfig
from rrcm.schedule import c_in, time_embedding


class PatchEmbed(nn.Module):
    """Non-overlapping patches through a strided convolution: (B, C, H, W) -> (B, L, D)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention without qkv bias, through scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def projection_head(dim: int, hidden: int, out: int) -> nn.Sequential:
    """3-layer MLP without bias, BatchNorm + ReLU between layers (indices 0..6 as in public checkpoints)."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out, bias=False),
    )


class Encoder(nn.Module):
    """ViT over [cls, time, patches]; `features` gives the representation h, `forward` gives (z, h).

    Inputs are model-space noisy images x_t (normalized to [-1, 1] plus noise of std t); the c_in(t)
    scaling and the time token are applied here.
    """

    def __init__(self, cfg: ModelConfig, with_projection: bool = True):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.in_chans, D, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 2, D))
        self.time_embed = (
            nn.Sequential(nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D)) if cfg.mlp_time_embed else nn.Identity()
        )
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D)
        self.projection_head = projection_head(D, cfg.proj_hidden, cfg.proj_dim) if with_projection else None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def time_token(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) times -> (B, 1, D) tokens."""
        return self.time_embed(time_embedding(t, self.cfg.embed_dim)).unsqueeze(1)

    def cls_output(self, x_in: torch.Tensor, time_tok: torch.Tensor) -> torch.Tensor:
        """The last block's cls token (B, D), before the final norm, for already-scaled inputs c_in * x_t
        and a ready time token."""
        patches = self.patch_embed(x_in)
        B = patches.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), time_tok.expand(B, -1, -1).to(patches.dtype), patches], 1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x[:, 0]

    def tokens_to_features(self, x_in: torch.Tensor, time_tok: torch.Tensor) -> torch.Tensor:
        """The representation h: the final norm of `cls_output`."""
        return self.norm(self.cls_output(x_in, time_tok))

    def scaled_inputs(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_in(t) * x_t, time tokens) of noisy images x_t at times t (B,)."""
        return c_in(t).to(x_t.dtype).view(-1, 1, 1, 1) * x_t, self.time_token(t)

    def features(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Representation h (B, D) of noisy images x_t at times t (B,)."""
        return self.tokens_to_features(*self.scaled_inputs(x_t, t))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, h): projection (for the contrastive term) and representation."""
        if self.projection_head is None:
            raise RuntimeError("this encoder was built without a projection head")
        h = self.features(x_t, t)
        return self.projection_head(h), h


class Classifier(nn.Module):
    """Fine-tuned rRCM: encoder (as `base_model`) + linear head on its cls token, after the final norm
    only if `cfg.final_norm` (the paper's fine-tuning `layernorm` option)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.base_model = Encoder(cfg, with_projection=False)
        if not cfg.final_norm:  # kept for the public state dicts' `norm.*`; frozen so that DDP sees no unused parameter
            self.base_model.norm.requires_grad_(False)
        self.linear_head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.linear_head.weight, std=2e-5)
        nn.init.zeros_(self.linear_head.bias)

    def logits_from_tokens(self, x_in: torch.Tensor, time_tok: torch.Tensor) -> torch.Tensor:
        """Logits for already-scaled inputs c_in * x_t with a ready time token."""
        h = self.base_model.cls_output(x_in, time_tok)
        return self.linear_head(self.base_model.norm(h) if self.cfg.final_norm else h)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.logits_from_tokens(*self.base_model.scaled_inputs(x_t, t))


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per part: encoder (without heads), projector, classifier head."""
    with torch.device("meta"):
        enc = Encoder(cfg)
        head = nn.Linear(cfg.embed_dim, cfg.num_classes)
    encoder = count_parameters(enc) - count_parameters(enc.projection_head)
    return {"encoder": encoder, "projector": count_parameters(enc.projection_head), "classifier_head": count_parameters(head)}
