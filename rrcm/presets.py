"""Model sizes, as plain dataclasses. `PRESETS[name]` is the single source of truth."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from rrcm.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build an rRCM network (method.md section 3)."""

    image_size: int = 28
    in_chans: int = 1
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    proj_hidden: int = 512
    proj_dim: int = 256
    mlp_time_embed: bool = False
    num_classes: int = 10
    dataset: str = "fashion-mnist"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def validate(self) -> "ModelConfig":
        if self.image_size % self.patch_size:
            raise UserError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.embed_dim % 2:
            raise UserError(f"embed_dim {self.embed_dim} must be even and divisible by num_heads {self.num_heads}")
        if min(self.image_size, self.in_chans, self.depth, self.num_heads, self.num_classes) < 1:
            raise UserError("model sizes must be positive")
        return self


PRESETS: dict[str, ModelConfig] = {
    # The paper's sizes.
    "rrcm-b-imagenet": ModelConfig(224, 3, 16, 768, 12, 12, 4.0, 4096, 256, False, 1000, "imagenet"),
    "rrcm-s-imagenet": ModelConfig(224, 3, 16, 512, 6, 8, 4.0, 2048, 256, False, 1000, "imagenet"),
    "rrcm-b-cifar": ModelConfig(32, 3, 4, 768, 12, 12, 4.0, 2048, 256, False, 10, "cifar10"),
    # Fashion-MNIST: the bundled model (trains and certifies fast on 2 CPU cores), a larger CPU one,
    # one sized for a single GPU.
    "fmnist-xs": ModelConfig(28, 1, 7, 64, 3, 2, 4.0, 256, 64, False, 10, "fashion-mnist"),
    "fmnist-s": ModelConfig(28, 1, 4, 192, 6, 3, 4.0, 512, 128, False, 10, "fashion-mnist"),
    "fmnist-b": ModelConfig(28, 1, 4, 384, 8, 6, 4.0, 1024, 256, False, 10, "fashion-mnist"),
    # For tests and smoke runs: seconds, not minutes.
    "tiny": ModelConfig(28, 1, 7, 32, 2, 2, 2.0, 64, 32, False, 10, "fashion-mnist"),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """Return preset `name`, with any non-None field overrides applied."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **changes).validate()
