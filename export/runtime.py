"""What every exported format's runtime shares: the metadata a model records about itself, batches run
in chunks of a graph's fixed size, and the check of a runtime against the torch classifier it came from.

Exported graphs record their facts as strings under "rrcm.*" keys (ONNX metadata_props, AOTInductor
package metadata); `to_metadata` writes them and `from_metadata` reads them back, checked. A graph for
one sigma records "sigma"; a graph that takes the noise level as an input records the sigmas it serves
("sigmas" or "sigma_range") instead, and its runtime is built for one of them (`runtime_sigma`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from rrcm.checks import check_int
from rrcm.classifier import SigmaInputClassifier
from rrcm.device import full_fp32
from rrcm.errors import UserError
from rrcm.resources import check_fits
from rrcm.sigma_set import SigmaSet

PREFIX = "rrcm."


@dataclass(frozen=True)
class ModelInfo:
    """What a model records about itself; None where it does not say. `serves`: the sigmas a graph with a
    sigma input serves (its runtime's info then gives the one it runs at as `sigma`)."""

    sigma: float | None = None
    num_classes: int | None = None
    input_shape: tuple[int, int, int] | None = None
    dataset: str | None = None
    serves: SigmaSet | None = None

    def noise_levels(self) -> str:
        """'sigma 0.25', or for a graph with a sigma input e.g. 'sigma input (sigma 0.25, 0.5 and 1)'."""
        return f"sigma {self.sigma:g}" if self.serves is None else f"sigma input ({self.serves.describe()})"


def exported_info(classifier: nn.Module) -> ModelInfo:
    """What an export of `classifier` records: a SigmaInputClassifier the sigmas it serves, any other its `sigma`."""
    sigma_input = isinstance(classifier, SigmaInputClassifier)
    return ModelInfo(None if sigma_input else classifier.sigma, classifier.num_classes, tuple(classifier.input_shape),
                     getattr(getattr(classifier, "cfg", None), "dataset", None), classifier.trained if sigma_input else None)


def to_metadata(info: ModelInfo) -> dict[str, str]:
    """The metadata of an exported graph: for one sigma (`info.sigma`), or with a sigma input (`info.serves`)."""
    values = {
        **({"sigma": repr(float(info.sigma))} if info.serves is None else info.serves.to_metadata()),
        "num_classes": str(info.num_classes),
        "input_shape": ",".join(map(str, info.input_shape)),
        "dataset": info.dataset or "",
    }
    return {PREFIX + k: v for k, v in values.items()}


def from_metadata(metadata: dict[str, str], source: str) -> ModelInfo:
    """The ModelInfo recorded by `to_metadata`; all fields None for a model of other origin."""
    values = {k.removeprefix(PREFIX): v for k, v in metadata.items() if k.startswith(PREFIX)}
    if not values:
        return ModelInfo()
    serves = SigmaSet.from_metadata(values, source)
    try:
        info = ModelInfo(None if serves else float(values["sigma"]), int(values["num_classes"]),
                         tuple(int(d) for d in values["input_shape"].split(",")), values["dataset"] or None, serves)
    except (KeyError, ValueError) as e:
        raise UserError(f"{source}: corrupt rrcm metadata ({type(e).__name__}: {e})") from None
    if not (serves or (info.sigma > 0 and math.isfinite(info.sigma))) or info.num_classes < 2 or len(info.input_shape) != 3:
        raise UserError(f"{source}: corrupt rrcm metadata (impossible sigma, classes or input shape)")
    return info


def runtime_sigma(recorded: ModelInfo, sigma: float | None, source: str) -> float | None:
    """The sigma a runtime of a graph runs at: for a graph with a sigma input, `sigma` (required, and one it serves);
    for a graph of one sigma, the recorded one, which a given `sigma` must equal."""
    if recorded.serves is not None:
        if sigma is None:
            raise UserError(f"{source} takes the noise level as an input and serves {recorded.serves.describe()}: "
                            "give the sigma to run at (--sigma)")
        return recorded.serves.choose(sigma, source)
    if sigma is not None and recorded.sigma is not None and not math.isclose(sigma, recorded.sigma, rel_tol=1e-9):
        raise UserError(f"{source}: the classifier was built for sigma {recorded.sigma:g}, not {sigma:g}")
    return recorded.sigma


def check_batch(name: str, batch: int, input_shape: tuple[int, ...], device: torch.device | str) -> int:
    """A fixed batch size for an export: an integer >= 1 whose float32 example batch fits in memory."""
    batch = check_int(name, batch, 1)
    check_fits(batch * math.prod(input_shape) * 4, f"an example batch of {batch:,} images", device, f"lower {name}")
    return batch


def run_in_chunks(run, batch: torch.Tensor, size: int | None, pad: bool = True) -> torch.Tensor:
    """run(chunk) over chunks of at most `size` rows (one call when size is None); with `pad`, a short
    last chunk is zero-padded to `size` rows (for graphs built for one batch size) and the padding's rows dropped."""
    if size is None or len(batch) == size:
        return run(batch)
    chunks = []
    for chunk in batch.split(size):
        rows = len(chunk)
        if pad and rows < size:
            chunk = torch.cat([chunk, chunk.new_zeros((size - rows, *chunk.shape[1:]))])
        chunks.append(run(chunk)[:rows])
    return torch.cat(chunks)


@dataclass(frozen=True)
class Agreement:
    max_logit_diff: float
    argmax_agreement: float  # fraction of inputs with the same top class
    samples: int


def backend_agreement(classifier: nn.Module, backend, samples: int = 256, seed: int = 0,
                      inputs: torch.Tensor | None = None, batch: int = 256) -> Agreement:
    """A runtime (anything with the engine's backend interface) against `classifier` in float32 (no TF32), on
    `inputs` (noisy pixel-space images (k, C, H, W)) or else on `samples` random noisy images x + sigma * z,
    x uniform in [0, 1]; `batch` inputs at a time."""
    if inputs is None:
        g = torch.Generator().manual_seed(seed)
        inputs = torch.rand((samples, *classifier.input_shape), generator=g)
        inputs = inputs + classifier.sigma * torch.randn(inputs.shape, generator=g)
    device = next(classifier.parameters()).device
    diff, same = 0.0, 0
    with torch.no_grad(), full_fp32():
        for x in inputs.float().split(batch):
            expected = classifier(x.to(device)).float().to(backend.device)
            got = backend.forward((x * backend.input_scale + backend.input_shift).to(backend.device, backend.input_dtype))
            for logits, what in ((expected, "the classifier"), (got, f"its {backend.name} runtime")):
                if not torch.isfinite(logits).all():
                    raise UserError(f"{what} gives NaN or Inf logits on noisy inputs: a model that answers them "
                                    "cannot be certified")
            diff = max(diff, float((got - expected).abs().max()))
            same += int((got.argmax(1) == expected.argmax(1)).sum())
    return Agreement(diff, same / len(inputs), len(inputs))


def agreement_at_each_sigma(classifier: nn.Module, runtime: Callable[[float | None], Any], samples: int = 256,
                            seed: int = 0) -> Agreement:
    """`backend_agreement` of `runtime(sigma)` against the classifier; for a SigmaInputClassifier, at each sigma that
    stands for the ones it serves (`SigmaSet.representatives`) against its constant-sigma classifier there, pooled."""
    if not isinstance(classifier, SigmaInputClassifier):
        return backend_agreement(classifier, runtime(None), samples, seed)
    checks = [backend_agreement(classifier.at_sigma(s), runtime(s), samples, seed) for s in classifier.trained.representatives()]
    total = sum(c.samples for c in checks)
    return Agreement(max(c.max_logit_diff for c in checks), sum(c.argmax_agreement * c.samples for c in checks) / total, total)
