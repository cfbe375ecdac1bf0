"""Certify (or predict) a dataset into Cohen et al.'s TSV, resumably, sharded across torchrun processes.

FILE.tsv gets one flushed row per image; FILE.tsv.json records the parameters. Re-running the same
command keeps the finished rows and certifies only the missing ones; a run with other parameters is
refused. Image idx uses noise seed derive_seed(seed, idx), so a row does not depend on sharding,
grouping or resuming. Under torchrun each process appends its rows to FILE.tsv.partR; process 0 merges
everything into FILE.tsv, ordered by idx, when the run starts and when it ends.
Radii are written rounded down to 4 decimals: the file never claims more than was certified.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from rrcm.checks import MAX_SEED, check_int, check_number
from rrcm.distributed import on_rank_zero
from rrcm.engine.certifier import Certifier, derive_seed
from rrcm.engine.cascade import Cascade
from rrcm.engine.timing import Meter, TooLong, Workload
from rrcm.engine.tsv import FIELDS, HEADERS
from rrcm.errors import UserError
from rrcm.outputs import OutputLock, atomic_write, check_writable, make_folder, write_error
from rrcm.resources import check_fits

MODES = ("certify", "predict")
MAX_SAMPLES = 10**15  # per image: far beyond any run, and counts stay exact in float64 statistics
# Sidecar keys that may change between a run and its resumption: they do not change what a row means
# (precision does: its rows certify another classifier).
RESUMABLE_CHANGES = ("model", "max", "batch", "backend", "device", "data_dir", "compile", "sampler", "cuda_graphs",
                     "agreement")


@dataclass(frozen=True)
class Job:
    """One dataset pass: `mode` "certify" (n0, n, alpha) or "predict" (n, alpha), over idx 0, skip, 2 skip, ...
    (at most max_images of them), image idx seeded by derive_seed(seed, idx).

    certify variants, with n the estimation budget: `radius` r (a decision at r, `Certifier.certify_radius`),
    or `adaptive` (the largest radius, stopping within `tolerance` of it). `beta` bounds the chance that a
    decision at r gives up early on an image robust at r (0: never gives up before the budget).
    `sigmas` > 1: the cascade over that many sigmas at threshold `p0` (`rrcm.engine.cascade`): certify, decide
    at r, or predict with it; n0 and n per stage.
    """

    mode: str
    n: int
    alpha: float
    n0: int = 100
    skip: int = 1
    max_images: int | None = None
    seed: int = 0
    radius: float | None = None
    adaptive: bool = False
    tolerance: float = 0.01
    beta: float = 1e-3
    sigmas: int = 1
    p0: float = 0.5

    @property
    def layout(self) -> str:
        """The key of the TSV's columns in HEADERS."""
        if self.sigmas > 1:
            return {"certify": "radius-cascade" if self.radius is not None else "cascade", "predict": "predict-cascade"}[self.mode]
        if self.mode == "certify" and self.radius is not None:
            return "radius"
        return "adaptive" if self.mode == "certify" and self.adaptive else self.mode

    @property
    def samples_per_image(self) -> int:
        """Noisy forward passes of one image at a fixed budget; at most that for modes that stop early (a cascade
        runs n0 + n per stage)."""
        return self.sigmas * (self.n + (self.n0 if self.mode == "certify" or self.sigmas > 1 else 0))

    def check(self) -> "Job":
        """Every value checked (type and range) before any is used; returns self."""
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}")
        if (self.radius is not None or self.adaptive) and self.mode != "certify":
            raise UserError("--radius and --adaptive apply to certify only")
        if self.radius is not None and self.adaptive:
            raise UserError("--radius and --adaptive exclude each other: a decision at r, or the largest radius")
        check_int("sigmas", self.sigmas, 1)
        if self.sigmas > 1 and self.adaptive:
            raise UserError("several sigmas (a cascade) and --adaptive exclude each other")
        check_number("--p0", self.p0, 0.5, 1.0, high_open=True)
        if self.radius is not None:
            check_number("--radius", self.radius, 0.0, math.inf)
        check_number("--beta", self.beta, 0.0, 1.0, high_open=True)
        check_number("--tolerance", self.tolerance, 0.0, math.inf, low_open=True)
        check_number("--alpha", self.alpha, 0.0, 1.0, low_open=True, high_open=True)
        check_int("--n0", self.n0, 1, MAX_SAMPLES)
        check_int("--n", self.n, 1, MAX_SAMPLES)
        check_int("--skip", self.skip, 1)
        check_int("--seed", self.seed, 0, MAX_SEED)
        if self.max_images is not None:
            check_int("--max", self.max_images, 1)
        return self

    def indices(self, dataset_size: int) -> range:
        """The image indices of this pass over a dataset of `dataset_size` images (never more than it has)."""
        return range(0, dataset_size, self.skip)[: self.max_images]


def round_down(radius: float) -> float:
    """A radius rounded down to 4 decimals: what a TSV row may claim."""
    return math.floor(radius * 1e4) / 1e4


def _format_row(mode: str, idx: int, label: int, prediction: int, radius: float, seconds: float,
                samples: int = 0, certified: bool = False, sigma: float | None = None) -> str:
    """One row of layout `mode` (a HEADERS key); `samples` for adaptive, radius and cascade rows, `certified` for
    radius ones, `sigma` (None: "-") for cascade rows."""
    values = {"idx": idx, "label": label, "predict": prediction, "radius": f"{round_down(radius):.4f}",
              "correct": int(prediction == label), "certified": int(certified), "samples": samples,
              "sigma": "-" if sigma is None else f"{sigma:g}", "time": datetime.timedelta(seconds=seconds)}
    return "\t".join(str(values[column]) for column in HEADERS[mode].split("\t"))


def _read_rows(path: Path, mode: str, has_header: bool) -> dict[int, str]:
    """idx -> row of the complete lines of `path`; a last line without newline (a killed write) is dropped.
    Anything else that is not a row of this layout is refused, naming the line; the file is left as it is."""
    if not path.exists():
        return {}
    try:
        lines = path.read_bytes().split(b"\n")[:-1]  # the piece after the last newline is empty or partial
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    row = re.compile("\t".join(f"(?:{FIELDS[name]})" for name in HEADERS[mode].split("\t")))
    rows: dict[int, str] = {}
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: line {number} is not UTF-8 text; fix or remove it") from None
        if has_header and number == 1:
            if line != HEADERS[mode]:
                raise UserError(f"{path}: not a {mode} TSV of this tool (header differs); use another --out")
            continue
        if not row.fullmatch(line):
            raise UserError(f"{path}: line {number} is not a {mode} row; fix or remove it")
        rows.setdefault(int(line.split("\t", 1)[0]), line)
    if has_header and not lines:
        raise UserError(f"{path}: not a {mode} TSV of this tool (no header); use another --out")
    return rows


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".part*"))


def _merge(out: Path, mode: str) -> dict[int, str]:
    """Fold the rows of FILE.tsv and any FILE.tsv.partR into FILE.tsv, ordered by idx."""
    rows = _read_rows(out, mode, has_header=True)
    parts = _parts(out)
    for part in parts:
        for idx, row in _read_rows(part, mode, has_header=False).items():
            rows.setdefault(idx, row)
    atomic_write(out, "".join(line + "\n" for line in [HEADERS[mode], *(rows[i] for i in sorted(rows))]))
    for part in parts:
        part.unlink()
    return rows


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def _prepare(out: Path, mode: str, params: dict[str, Any]) -> set[int]:
    """Check FILE.tsv.json against `params`, merge the finished rows, write the sidecar: the done idx."""
    sidecar = sidecar_path(out)
    check_writable(sidecar)
    if sidecar.exists():
        try:
            recorded = json.loads(sidecar.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise UserError(f"{sidecar}: corrupt sidecar ({e}); remove it together with {out.name}") from None
        if not isinstance(recorded, dict):
            raise UserError(f"{sidecar}: corrupt sidecar; remove it together with {out.name}")
        for key in sorted(set(recorded) | set(params)):
            if key not in RESUMABLE_CHANGES and recorded.get(key) != params.get(key):
                raise UserError(f"{out} was made with {key}={recorded.get(key)!r}, this run has {key}={params.get(key)!r}: "
                                f"use another --out, or the same parameters to resume")
    elif out.exists() or _parts(out):
        raise UserError(f"{out} exists without its sidecar {sidecar.name}: not overwriting it; use another --out")
    make_folder(out.parent)
    atomic_write(sidecar, json.dumps(params, indent=2) + "\n")
    return set(_merge(out, mode))


def check_batch(rows: int, input_shape: tuple[int, ...] | None, device: torch.device | str, input_bytes: int = 4) -> int:
    """`rows` noisy samples per forward pass (--batch): an integer >= 1 whose float32 noise and model inputs
    (`input_bytes` per element) alone fit in the device's memory, where the input shape is known."""
    check_int("--batch", rows, 1)
    if input_shape is not None:
        need = rows * math.prod(input_shape) * (4 + input_bytes)
        check_fits(need, f"a batch of {rows:,} noisy samples", device, "lower --batch")
    return rows


def run(certifier: Certifier | Sequence[Certifier], dataset, out: str | Path, job: Job, params: dict[str, Any], *,
        rank: int = 0, world: int = 1, progress: bool = True, meter: Meter | None = None) -> Path:
    """Certify (or predict) `job`'s images of `dataset` into `out`; returns the path of the merged TSV.

    `certifier`: one, or one per sigma (job.sigmas of them) for certification at several sigmas.
    `params` (everything the command line was given, JSON-serializable) becomes the sidecar.
    `meter` (default: one that measures the rate on the first images) prints the run's estimate and refuses
    work no machine finishes (`TooLong`, unless it is forced); refused before its first row, a new run leaves
    no file behind.
    """
    certifiers = [certifier] if isinstance(certifier, Certifier) else list(certifier)
    certifier = certifiers[0]
    if len(certifiers) != job.sigmas:
        raise UserError(f"{len(certifiers)} certifiers for a job at {job.sigmas} sigma(s)")
    job = job.check()
    out = Path(out)
    params = {"command": job.mode, "n0": job.n0 if job.mode == "certify" else None, "n": job.n, "alpha": job.alpha,
              "skip": job.skip, "max": job.max_images, "seed": job.seed, **params}
    # Recorded only when used, so that sidecars from before these modes still resume.
    if job.radius is not None:
        params.update(radius=job.radius)
    if job.radius is not None or job.sigmas > 1:
        params.update(beta=job.beta)
    if job.adaptive:
        params.update(adaptive=True, tolerance=job.tolerance)
    if job.sigmas > 1:
        params.update(n0=job.n0, p0=job.p0)
    layout = job.layout
    check_batch(min(certifier.batch_size, job.samples_per_image * len(job.indices(len(dataset)))),
                certifier.input_shape or certifier.backend.info.input_shape, certifier.device,
                certifier.backend.input_dtype.itemsize)
    lock = OutputLock(out)  # taken by rank 0 for the whole job: shards write their parts under it
    meter = meter or Meter()
    fresh = not sidecar_path(out).exists()

    def prepare() -> set[int]:
        check_writable(out)
        lock.acquire()
        return _prepare(out, layout, params)

    try:
        done = on_rank_zero(rank, world, prepare)
        pending = [i for i in job.indices(len(dataset)) if i not in done]
        mine = pending[rank::world]
        target = out if world == 1 else out.with_name(f"{out.name}.part{rank}")
        try:
            stops_early = job.radius is not None or job.adaptive or job.sigmas > 1
            sync = (lambda: torch.cuda.synchronize(certifier.device)) if certifier.device.type == "cuda" else None
            meter.begin(Workload(job.mode, len(mine), job.samples_per_image, stops_early), show=progress and rank == 0,
                        refuse_measured=world == 1, sync=sync)
            _write_rows(certifiers, dataset, job, mine, target, progress and rank == 0,
                        f"{job.mode}" + (f" (rank 0 of {world})" if world > 1 else ""), meter)
        except TooLong:
            if fresh and rank == 0 and world == 1 and out.read_text() == HEADERS[layout] + "\n":
                out.unlink()
                sidecar_path(out).unlink()
            raise
        except OSError as e:
            raise write_error(target, e) from None
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            raise UserError(f"out of memory on {certifier.device} with batches of {certifier.batch_size} samples: "
                            "lower --batch (the rows written so far are kept)") from None
        if world > 1:
            dist.barrier()
        if rank == 0:
            _merge(out, layout)
    finally:
        lock.release()
    return out


def _outcomes(certifiers: list[Certifier], job: Job, images: torch.Tensor, seeds: list[int]) -> list[tuple]:
    """(prediction, radius, samples, certified, sigma) of each image, as `job` asks."""
    certifier, layout = certifiers[0], job.layout
    beta = job.beta or None
    if layout == "radius":
        d = certifier.certify_radius(images[0], job.radius, job.alpha, beta=beta, n0=job.n0, max_samples=job.n, seed=seeds[0])
        return [(d.prediction, 0.0, d.samples, d.certified, None)]
    if layout == "radius-cascade":
        d = Cascade(certifiers, job.p0).certify_radius(images[0], job.radius, job.alpha, beta=beta, n0=job.n0,
                                                       max_samples=job.n, seed=seeds[0])
        return [(d.prediction, 0.0, d.samples, d.certified, d.sigma)]
    if layout in ("cascade", "predict-cascade"):
        c = Cascade(certifiers, job.p0).certify(images[0], job.n0, job.n, job.alpha, seeds[0], beta=beta)
        return [(c.prediction, c.radius, c.samples, False, c.sigma)]
    if layout == "adaptive":
        r = certifier.certify(images[0], job.n0, job.n, job.alpha, seeds[0], adaptive=True, tolerance=job.tolerance)
        return [(r.prediction, r.radius, r.samples, False, None)]
    if job.mode == "certify":
        return [(r.prediction, r.radius, job.samples_per_image, False, None)
                for r in certifier.certify_many(images, job.n0, job.n, job.alpha, seeds)]
    return [(p, 0.0, job.samples_per_image, False, None) for p in certifier.predict_many(images, job.n, job.alpha, seeds)]


def _write_rows(certifiers: list[Certifier], dataset, job: Job, mine: list[int], target: Path, progress: bool,
                desc: str, meter: Meter) -> None:
    """Certify (or predict) images `mine` of `dataset`, appending one flushed row per image to `target`;
    `meter` watches every batch (the samplers' `on_batch`)."""
    layout = job.layout
    # Images whose samples fit in one batch go together; sequential modes take one image at a time.
    group = max(1, certifiers[0].batch_size * job.sigmas // job.samples_per_image) if layout in ("certify", "predict") else 1
    spent = 0
    bar = tqdm(total=len(mine), unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    samplers = [c.sampler for c in certifiers]
    for sampler in samplers:
        sampler.on_batch = meter.on_batch
    with open(target, "a") as f, contextlib.ExitStack() as cleanup:
        cleanup.callback(meter.close)
        for sampler in samplers:
            cleanup.callback(setattr, sampler, "on_batch", None)
        for g in range(0, len(mine), group):
            idx = mine[g:g + group]
            images, labels = dataset.batch(torch.tensor(idx))
            seeds = [derive_seed(job.seed, i) for i in idx]
            t0 = time.perf_counter()
            meter.start_group(job.samples_per_image * len(idx))
            outcomes = _outcomes(certifiers, job, images, seeds)
            meter.end_group()
            seconds = (time.perf_counter() - t0) / len(idx)
            for i, label, (prediction, radius, samples, certified, sigma) in zip(idx, labels.tolist(), outcomes):
                f.write(_format_row(layout, i, label, prediction, radius, seconds, samples, certified, sigma) + "\n")
                f.flush()
                spent += samples
            bar.update(len(idx))
            bar.set_postfix(samples_per_s=f"{spent / (time.perf_counter() - start):,.0f}")
    bar.close()
