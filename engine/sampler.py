"""Noise, forward pass and counting of one certification call, batch by batch, on the backend's device.

A sampler turns images (k, C, H, W), a sample count per image and a noise stream per image into
(k, num_classes) int64 class counts on the device, with no host synchronization: the certifier reads
the counts of a whole call once. Both samplers draw the same law, x + sigma * z with z ~ N(0, I) in pixel
space, written straight in the model's input space and dtype:

- `TorchSampler`: a torch.Generator per stream, torch ops (`rrcm.kernels.noisy_inputs`), argmax and
  `index_add_` counts. Image i's noise is drawn in pieces of batch_size samples (the last one shorter)
  whatever else is in the call, so a generator state and a sample count always give the same counts.
  The only sampler of sound (1/255-grid) noise.
- `TritonSampler` (CUDA, or Triton's interpreter on the CPU): a Philox stream per image, named by its
  seed, and a position in it: sample j of a stream is draws j*C*H*W .. of that seed whatever the batching,
  so batches are packed full. One launch writes a batch, one launch counts it. With `static_batches`
  every batch runs at the full batch size (the last one padded with rows of no image, which are never
  counted), and with `cuda_graphs` that fixed-size step (sampler, model, counting) is captured once in a
  CUDA graph and replayed.

Either sampler calls its `on_batch` (None: nothing), where set, with the number of real samples of each batch
once that batch is sent through the model: for progress and rate measurement (`rrcm.engine.timing.Meter`), never
touching counts or noise.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rrcm.errors import UserError
from rrcm.kernels import count_predictions, noisy_inputs
from rrcm.kernels.sound import sound_noisy_inputs

SAMPLERS = ("torch", "triton")
STATIC_IMAGE_BYTES = 64 << 20  # the fixed-size step holds at most this much of the images it samples from


def split(total: int, size: int) -> Iterator[int]:
    """Pieces of `size` that add up to `total`, the last one shorter: yielded, never listed."""
    for start in range(0, total, size):
        yield min(size, total - start)


class TorchSampler:
    """Noise from torch.Generator streams through torch ops; counts with argmax and index_add_."""

    name = "torch"
    on_batch: Callable[[int], None] | None = None

    def __init__(self, backend, num_classes: int, sigma: float, batch_size: int, sound: bool = False):
        self.backend, self.num_classes, self.sigma, self.batch_size = backend, num_classes, sigma, batch_size
        self.noisy = sound_noisy_inputs if sound else noisy_inputs
        self.finite = torch.ones((), dtype=torch.bool, device=backend.device)  # cleared by a NaN or Inf logit

    def streams(self, keys: Sequence[int | None]) -> list[torch.Generator]:
        """One generator per key (a 64-bit seed), or seeded afresh from the OS where the key is None."""
        gens = []
        for key in keys:
            g = torch.Generator(device=self.backend.device)
            g.seed() if key is None else g.manual_seed(key)
            gens.append(g)
        return gens

    def counts(self, images: torch.Tensor, num_samples: Sequence[int], streams: Sequence[torch.Generator]) -> torch.Tensor:
        """(k, num_classes) counts of the model's argmax on num_samples[i] noisy copies of images[i]; pieces of
        several images share one forward pass when they fit in a batch."""
        counts = torch.zeros((len(images), self.num_classes), dtype=torch.int64, device=self.backend.device)
        batch: list[tuple[int, int]] = []
        filled = 0
        for i, m in enumerate(num_samples):
            for size in split(m, self.batch_size):
                if filled + size > self.batch_size:
                    counts += self._count_batch(images, batch, streams, filled)
                    batch, filled = [], 0
                batch.append((i, size))
                filled += size
        if batch:
            counts += self._count_batch(images, batch, streams, filled)
        return counts

    def _count_batch(self, images: torch.Tensor, pieces: list[tuple[int, int]], streams, rows: int) -> torch.Tensor:
        b = self.backend
        parts, ids = [], []
        for i, size in pieces:
            parts.append(self.noisy(images[i:i + 1], [size], self.sigma, streams[i], b.input_scale, b.input_shift, b.input_dtype))
            ids.append(torch.full((size,), i, dtype=torch.int64, device=b.device))
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        logits = b.forward(batch)
        self.finite &= torch.isfinite(logits).all()
        counts = count_predictions(logits, ids[0] if len(ids) == 1 else torch.cat(ids), len(images))
        if self.on_batch is not None:
            self.on_batch(rows)
        return counts


@dataclass
class PhiloxStream:
    """A noise stream of the Triton sampler: its Philox key and the samples of it used so far."""

    seed: int  # in [0, 2**63)
    drawn: int = 0


@dataclass(frozen=True)
class BatchPlan:
    """The rows of one batch, laid out on the host: `table` (4, B) int64 holds per row the local image
    (-1: padding), the first draw and the Philox seed; its last row starts with the call's index of each
    of the batch's `images` local images. `rows` rows are real."""

    table: np.ndarray
    rows: int
    images: int


class TritonSampler:
    """Noise from Philox streams, one fused Triton launch per batch; counts by one Triton launch.

    cuda_graphs=True (CUDA only, the torch backend): the fixed-size step is captured once and replayed.
    static_batches=True: every batch runs at the full batch size, the last one padded (what a graph needs).
    """

    name = "triton"
    on_batch: Callable[[int], None] | None = None

    def __init__(self, backend, num_classes: int, sigma: float, batch_size: int, *, cuda_graphs: bool = False,
                 static_batches: bool = False):
        from rrcm.kernels import triton_counting, triton_sampling  # imports triton: only when this sampler is used

        device = backend.device
        if cuda_graphs and device.type != "cuda":
            raise UserError("CUDA graphs need a CUDA device")
        if device.type != "cuda" and not (triton_sampling.INTERPRETED and device.type == "cpu"):
            raise UserError(f"the triton sampler runs on CUDA devices, not {device} (use the torch sampler)")
        if cuda_graphs and backend.name != "torch":
            raise UserError(f"CUDA graphs capture the torch backend only, not {backend.name}")
        self.backend, self.num_classes, self.sigma, self.batch_size = backend, num_classes, sigma, batch_size
        self.cuda_graphs = cuda_graphs
        self.static_batches = static_batches or cuda_graphs
        self.finite = torch.ones((), dtype=torch.bool, device=device)  # cleared by a NaN or Inf logit of a real row
        self._write, self._count = triton_sampling.write_noisy_rows, triton_counting.count_predictions_triton
        self._buffers: dict | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    def streams(self, keys: Sequence[int | None]) -> list[PhiloxStream]:
        """One stream per key (a 64-bit seed, folded to Philox's 63 bits), or a random one where the key is None."""
        return [PhiloxStream(secrets.randbits(63) if key is None else key >> 1) for key in keys]

    def counts(self, images: torch.Tensor, num_samples: Sequence[int], streams: Sequence[PhiloxStream]) -> torch.Tensor:
        """(k, num_classes) counts on num_samples[i] noisy copies of images[i], continuing streams[i]."""
        device = self.backend.device
        counts = torch.zeros((len(images), self.num_classes), dtype=torch.int64, device=device)
        if sum(num_samples) == 0:
            return counts
        buffers = self._prepare(images)
        chw = images[0].numel()
        for plan in self.plans(num_samples, streams, chw, len(buffers["images"])):
            table = torch.from_numpy(plan.table)
            if device.type == "cuda":
                buffers["plan"].copy_(table.pin_memory(), non_blocking=True)
            else:
                buffers["plan"].copy_(table)
            index = buffers["plan"][3, :plan.images]
            torch.index_select(images, 0, index, out=buffers["images"][:plan.images])
            self._step(plan.rows)
            counts.index_add_(0, index, buffers["counts"][:plan.images])
            if self.on_batch is not None:
                self.on_batch(int((plan.table[0] >= 0).sum()))
        for stream, m in zip(streams, num_samples):
            stream.drawn += m
        return counts

    def plans(self, num_samples: Sequence[int], streams: Sequence[PhiloxStream], chw: int,
              max_images: int) -> Iterator[BatchPlan]:
        """The batches of a call: the streams' next samples packed in order, batch_size rows (the last batch
        shorter unless static) and at most `max_images` images per batch."""
        size = self.batch_size
        table = np.zeros((4, size), dtype=np.int64)
        table[0] = -1
        rows = local = 0

        def flush() -> BatchPlan:
            plan = BatchPlan(table.copy(), size if self.static_batches else rows, local)
            table[0], table[1:3] = -1, 0  # padding rows: no image
            return plan

        for i, (m, stream) in enumerate(zip(num_samples, streams)):
            done = 0
            while done < m:
                if rows == size or local == max_images:
                    yield flush()
                    rows = local = 0
                take = min(m - done, size - rows)
                first = stream.drawn + done
                table[0, rows:rows + take] = local
                table[1, rows:rows + take] = np.arange(first, first + take, dtype=np.int64) * chw
                table[2, rows:rows + take] = stream.seed
                table[3, local] = i
                rows, local, done = rows + take, local + 1, done + take
        if rows:
            yield flush()

    def _prepare(self, images: torch.Tensor) -> dict:
        """The fixed buffers every batch reads and writes (a CUDA graph's addresses), made at the first call."""
        shape = tuple(images.shape[1:])
        if self._buffers is not None and self._buffers["images"].shape[1:] == shape:
            return self._buffers
        b, device = self.backend, self.backend.device
        max_images = max(1, min(self.batch_size, STATIC_IMAGE_BYTES // (4 * images[0].numel())))
        self._buffers = {
            "images": torch.zeros((max_images, *shape), device=device),
            "plan": torch.full((4, self.batch_size), -1, dtype=torch.int64, device=device),
            "inputs": torch.empty((self.batch_size, *shape), dtype=b.input_dtype, device=device),
            "counts": torch.zeros((max_images, self.num_classes), dtype=torch.int64, device=device),
        }
        self._graph = None
        return self._buffers

    def _run(self, rows: int) -> None:
        """Sampler, model and counting of the first `rows` rows of the plan buffer into the local counts."""
        buf, b = self._buffers, self.backend
        plan, inputs = buf["plan"][:, :rows], buf["inputs"][:rows]
        buf["counts"].zero_()
        self._write(inputs, buf["images"], plan[0], plan[1], plan[2], self.sigma, b.input_scale, b.input_shift,
                    aligned=True)  # row starts are multiples of C*H*W
        logits = b.forward(inputs)
        self.finite &= (torch.isfinite(logits).all(1) | (plan[0] < 0)).all()  # padding rows (-1) are not counted
        self._count(logits, plan[0], len(buf["counts"]), buf["counts"])

    def _step(self, rows: int) -> None:
        if not self.cuda_graphs:
            self._run(rows)
            return
        if self._graph is None:
            self._graph = self._capture()
        self._graph.replay()

    def _capture(self) -> torch.cuda.CUDAGraph:
        """The full-size step as a CUDA graph: warmed up on a side stream (kernels compiled and loaded,
        torch.compile's first run), then captured. Both read the buffers as they are: no draw is consumed."""
        size = self.batch_size
        side = torch.cuda.Stream(self.backend.device)
        side.wait_stream(torch.cuda.current_stream(self.backend.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run(size)
        torch.cuda.current_stream(self.backend.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run(size)
        return graph


def make_sampler(name: str | None, backend, num_classes: int, sigma: float, batch_size: int, *, sound: bool = False,
                 cuda_graphs: bool = False):
    """The sampler `name` ("torch" or "triton"; None: triton on CUDA when triton imports, else torch)."""
    if name is None:
        name = "triton" if backend.device.type == "cuda" and not sound and _triton_imports() else "torch"
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    if name == "torch":
        if cuda_graphs:
            raise UserError("CUDA graphs need the triton sampler (the torch sampler's counts are not a fixed-size step)")
        return TorchSampler(backend, num_classes, sigma, batch_size, sound)
    if sound:
        raise UserError("sound sampling draws grid noise with the torch sampler; drop --sampler triton")
    if not _triton_imports():
        raise UserError("the triton sampler needs triton: pip install 'rrcm[gpu]'")
    return TritonSampler(backend, num_classes, sigma, batch_size, cuda_graphs=cuda_graphs)


def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
