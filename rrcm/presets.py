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
    # Conventions a fine-tuned classifier was trained with (the paper's code: `layernorm` option, and the
    # Karras grid size N(k) reached at the pre-training step it was fine-tuned from).
    final_norm: bool = True  # the final LayerNorm on the cls token before the linear head
    # Points of the Karras grid whose nearest time conditions the classifier: rrcm.schedule.FINAL_SCALES, written
    # out so that presets load without torch (for --help); tests/test_cli.py checks that they agree.
    grid_points: int = 81

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
        if not isinstance(d, dict):
            raise UserError(f"a model config must be a JSON object of sizes, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def approx_parameters(self) -> int:
        """About how many parameters the encoder, projector and head have (arithmetic only, nothing is built)."""
        d, hidden, tokens = self.embed_dim, int(self.embed_dim * self.mlp_ratio), self.num_patches + 2
        return (self.depth * (4 * d * d + 2 * d * hidden) + self.in_chans * self.patch_size ** 2 * d + tokens * d
                + d * d + d * self.proj_hidden + self.proj_hidden * self.proj_dim + d * self.num_classes)

    def validate(self) -> "ModelConfig":
        """Check every size (type, range, divisibility) before any arithmetic uses it; returns self."""
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"model size {name} must be an integer, got {value!r}")
            if not 1 <= value <= limit:
                raise UserError(f"model size {name} must be in [1, {limit:,}], got {value:,}")
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= MAX_MLP_RATIO \
                or int(self.embed_dim * ratio) < 1:
            raise UserError(f"mlp_ratio must be a number in (0, {MAX_MLP_RATIO}] giving a hidden width >= 1, got {ratio!r}")
        for name in ("mlp_time_embed", "final_norm"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"model option {name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise UserError(f"dataset must be a name, got {self.dataset!r}")
        if self.grid_points < 2:
            raise UserError(f"grid_points must be >= 2 (a Karras grid has two ends), got {self.grid_points}")
        if self.image_size % self.patch_size:
            raise UserError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.embed_dim % 2:
            raise UserError(f"embed_dim {self.embed_dim} must be even and divisible by num_heads {self.num_heads}")
        if self.approx_parameters() > MAX_PARAMETERS:
            raise UserError(f"a model of these sizes has about {self.approx_parameters():,} parameters, more than "
                            f"{MAX_PARAMETERS:,}")
        return self


# Upper bounds far above the paper's models (ViT-B: 224 px, patch 16, width 768, depth 12, 1000 classes)
# that keep a model buildable and its arithmetic in range.
SIZE_LIMITS = {"image_size": 4096, "in_chans": 64, "patch_size": 4096, "embed_dim": 16384, "depth": 1024,
               "num_heads": 1024, "proj_hidden": 65536, "proj_dim": 65536, "num_classes": 1_000_000,
               "grid_points": 100_000}
MAX_MLP_RATIO = 64
MAX_PARAMETERS = 2**32


PRESETS: dict[str, ModelConfig] = {
    # The paper's sizes.
    "rrcm-b-imagenet": ModelConfig(224, 3, 16, 768, 12, 12, 4.0, 4096, 256, False, 1000, "imagenet"),
    "rrcm-s-imagenet": ModelConfig(224, 3, 16, 512, 6, 8, 4.0, 2048, 256, False, 1000, "imagenet"),
    "rrcm-b-cifar": ModelConfig(32, 3, 4, 768, 12, 12, 4.0, 2048, 256, False, 10, "cifar10", final_norm=False),
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
