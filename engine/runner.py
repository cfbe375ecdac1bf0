"""Certify (or predict) a dataset into Cohen et al.'s TSV, resumably, sharded across torchrun processes.

FILE.tsv gets one flushed row per image; FILE.tsv.json records the parameters. Re-running the same
command keeps the finished rows and certifies only the missing ones; a run with other parameters is
refused. Image idx uses noise seed derive_seed(seed, idx), so a row does not depend on sharding,
grouping or resuming. Under torchrun each process appends its rows to FILE.tsv.partR; process 0 merges
everything into FILE.tsv, ordered by idx, when the run starts and when it ends.
Radii are written rounded down to 4 decimals: the file never claims more than was certified.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from rrcm.engine.certifier import Certifier, derive_seed
from rrcm.errors import UserError

HEADERS = {
    "certify": "idx\tlabel\tpredict\tradius\tcorrect\ttime",
    "predict": "idx\tlabel\tpredict\tcorrect\ttime",
    "adaptive": "idx\tlabel\tpredict\tradius\tcorrect\tsamples\ttime",  # certify --adaptive
    "radius": "idx\tlabel\tpredict\tcertified\tsamples\ttime",  # certify --radius
}
MODES = ("certify", "predict")
# Sidecar keys that may change between a run and its resumption: they do not change what a row means
# (precision does: its rows certify another classifier).
RESUMABLE_CHANGES = ("model", "max", "batch", "backend", "device", "data_dir", "compile")


@dataclass(frozen=True)
class Job:
    """One dataset pass: `mode` "certify" (n0, n, alpha) or "predict" (n, alpha), over idx 0, skip, 2 skip, ...
    (at most max_images of them), image idx seeded by derive_seed(seed, idx).

    certify variants, with n the estimation budget: `radius` r (a decision at r, `Certifier.certify_radius`),
    or `adaptive` (the largest radius, stopping within `tolerance` of it). `beta` bounds the chance that a
    decision at r gives up early on an image robust at r (0: never gives up before the budget).
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

    @property
    def layout(self) -> str:
        """The key of the TSV's columns in HEADERS."""
        if self.mode == "certify" and self.radius is not None:
            return "radius"
        return "adaptive" if self.mode == "certify" and self.adaptive else self.mode

    def check(self) -> "Job":
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}")
        if (self.radius is not None or self.adaptive) and self.mode != "certify":
            raise UserError("--radius and --adaptive apply to certify only")
        if self.radius is not None and self.adaptive:
            raise UserError("--radius and --adaptive exclude each other: a decision at r, or the largest radius")
        if self.radius is not None and not (math.isfinite(self.radius) and self.radius >= 0):
            raise UserError(f"--radius must be >= 0, got {self.radius}")
        if not 0.0 <= self.beta < 1.0:
            raise UserError(f"--beta must be in [0, 1), got {self.beta}")
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise UserError(f"--tolerance must be > 0, got {self.tolerance}")
        for name in ("n0", "n", "skip", "seed"):
            value = getattr(self, name)
            if value < (0 if name == "seed" else 1):
                raise UserError(f"--{name} must be {'>= 0' if name == 'seed' else '>= 1'}, got {value}")
        if self.max_images is not None and self.max_images < 1:
            raise UserError(f"--max must be >= 1, got {self.max_images}")
        if not 0.0 < self.alpha < 1.0:
            raise UserError(f"--alpha must be in (0, 1), got {self.alpha}")
        return self

    def indices(self, dataset_size: int) -> list[int]:
        return list(range(0, dataset_size, self.skip))[: self.max_images]


def round_down(radius: float) -> float:
    """A radius rounded down to 4 decimals: what a TSV row may claim."""
    return math.floor(radius * 1e4) / 1e4


def _format_row(mode: str, idx: int, label: int, prediction: int, radius: float, seconds: float,
                samples: int = 0, certified: bool = False) -> str:
    """One row of layout `mode` (a HEADERS key); `samples` for adaptive and radius rows, `certified` for radius ones."""
    elapsed = str(datetime.timedelta(seconds=seconds))
    correct = int(prediction == label)
    if mode == "predict":
        return f"{idx}\t{label}\t{prediction}\t{correct}\t{elapsed}"
    if mode == "radius":
        return f"{idx}\t{label}\t{prediction}\t{int(certified)}\t{samples}\t{elapsed}"
    row = f"{idx}\t{label}\t{prediction}\t{round_down(radius):.4f}\t{correct}"
    return f"{row}\t{samples}\t{elapsed}" if mode == "adaptive" else f"{row}\t{elapsed}"


def _read_rows(path: Path, mode: str, has_header: bool) -> dict[int, str]:
    """idx -> row of the complete lines of `path`; a last line without newline (a killed write) is dropped."""
    if not path.exists():
        return {}
    lines = path.read_text().split("\n")[:-1]  # the piece after the last newline is empty or partial
    if has_header:
        if not lines or lines[0] != HEADERS[mode]:
            raise UserError(f"{path}: not a {mode} TSV of this tool (header differs); use another --out")
        lines = lines[1:]
    columns = HEADERS[mode].count("\t") + 1
    rows: dict[int, str] = {}
    for number, line in enumerate(lines, start=2 if has_header else 1):
        fields = line.split("\t")
        if len(fields) != columns or not fields[0].isdigit():
            raise UserError(f"{path}: line {number} is not a {mode} row; fix or remove it")
        rows.setdefault(int(fields[0]), line)
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
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in [HEADERS[mode], *(rows[i] for i in sorted(rows))]))
    os.replace(tmp, out)
    for part in parts:
        part.unlink()
    return rows


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def _prepare(out: Path, mode: str, params: dict[str, Any]) -> set[int]:
    """Check FILE.tsv.json against `params`, merge the finished rows, write the sidecar: the done idx."""
    sidecar = sidecar_path(out)
    if sidecar.exists():
        try:
            recorded = json.loads(sidecar.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{sidecar}: corrupt sidecar ({e}); remove it together with {out.name}") from None
        if not isinstance(recorded, dict):
            raise UserError(f"{sidecar}: corrupt sidecar; remove it together with {out.name}")
        for key in sorted(set(recorded) | set(params)):
            if key not in RESUMABLE_CHANGES and recorded.get(key) != params.get(key):
                raise UserError(f"{out} was made with {key}={recorded.get(key)!r}, this run has {key}={params.get(key)!r}: "
                                f"use another --out, or the same parameters to resume")
    elif out.exists() or _parts(out):
        raise UserError(f"{out} exists without its sidecar {sidecar.name}: not overwriting it; use another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, sidecar)
    return set(_merge(out, mode))


def _on_rank_zero(world: int, rank: int, fn):
    """fn() on rank 0; its result (or its UserError, re-raised everywhere) is shared with every rank."""
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value


def run(certifier: Certifier, dataset, out: str | Path, job: Job, params: dict[str, Any], *,
        rank: int = 0, world: int = 1, progress: bool = True) -> Path:
    """Certify (or predict) `job`'s images of `dataset` into `out`; returns the path of the merged TSV.

    `params` (everything the command line was given, JSON-serializable) becomes the sidecar.
    """
    job = job.check()
    out = Path(out)
    params = {"command": job.mode, "n0": job.n0 if job.mode == "certify" else None, "n": job.n, "alpha": job.alpha,
              "skip": job.skip, "max": job.max_images, "seed": job.seed, **params}
    # Recorded only when used, so that sidecars from before these modes still resume.
    if job.radius is not None:
        params.update(radius=job.radius, beta=job.beta)
    if job.adaptive:
        params.update(adaptive=True, tolerance=job.tolerance)
    layout = job.layout
    done = _on_rank_zero(world, rank, lambda: _prepare(out, layout, params))
    pending = [i for i in job.indices(len(dataset)) if i not in done]
    mine = pending[rank::world]
    per_image = job.n + (job.n0 if job.mode == "certify" else 0)
    # Images whose samples fit in one batch go together; sequential modes take one image at a time.
    group = max(1, certifier.batch_size // per_image) if layout in MODES else 1
    spent = 0
    target = out if world == 1 else out.with_name(f"{out.name}.part{rank}")
    bar = tqdm(total=len(mine), unit="img", desc=f"{job.mode}" + (f" (rank 0 of {world})" if world > 1 else ""),
               disable=not progress or rank != 0, dynamic_ncols=True)
    start = time.perf_counter()
    with open(target, "a") as f:
        for g in range(0, len(mine), group):
            idx = mine[g:g + group]
            images, labels = dataset.batch(torch.tensor(idx))
            seeds = [derive_seed(job.seed, i) for i in idx]
            t0 = time.perf_counter()
            if layout == "radius":
                d = certifier.certify_radius(images[0], job.radius, job.alpha, beta=job.beta or None, n0=job.n0,
                                             max_samples=job.n, seed=seeds[0])
                outcomes = [(d.prediction, 0.0, d.samples, d.certified)]
            elif layout == "adaptive":
                r = certifier.certify(images[0], job.n0, job.n, job.alpha, seeds[0], adaptive=True, tolerance=job.tolerance)
                outcomes = [(r.prediction, r.radius, r.samples, False)]
            elif job.mode == "certify":
                results = certifier.certify_many(images, job.n0, job.n, job.alpha, seeds)
                outcomes = [(r.prediction, r.radius, per_image, False) for r in results]
            else:
                outcomes = [(p, 0.0, per_image, False) for p in certifier.predict_many(images, job.n, job.alpha, seeds)]
            seconds = (time.perf_counter() - t0) / len(idx)
            for i, label, (prediction, radius, samples, certified) in zip(idx, labels.tolist(), outcomes):
                f.write(_format_row(layout, i, label, prediction, radius, seconds, samples, certified) + "\n")
                f.flush()
                spent += samples
            bar.update(len(idx))
            bar.set_postfix(samples_per_s=f"{spent / (time.perf_counter() - start):,.0f}")
    bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        _merge(out, layout)
    return out
