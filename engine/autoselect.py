"""`--precision auto`: the fastest runtime for a classifier's own precision (fp32) on this CPU, by a timed probe.

Every candidate runs the same fp32 classifier, so the choice changes the speed, not the certificate; lower
precisions certify another classifier and stay an explicit choice. Candidates (RUNTIMES): eager torch,
torch.compile with frozen weights, ONNX Runtime on the model exported on the fly. Each runs the real model at
the real batch size; compilation happens before the timing and the winner's compiled graph is the one the run
uses. The timing is made to survive a busy machine: PROBE_ROUNDS interleaved rounds, and a runtime takes the
choice from those before it in RUNTIMES' order (eager torch first, the default) only when it leads each of them
clearly: faster in every round, by CLEAR_LEAD in the median of the rounds' paired ratios (`decide`). Load that
comes and goes slows turns, not a runtime; load that slows one kind of runtime throughout misleads the choice
only where it skews their ratio by more than CLEAR_LEAD (20%).

The choice is cached in $XDG_CACHE_HOME/rrcm/runtimes.json (default ~/.cache/rrcm), keyed by the model's
sha256, the CPU (`rrcm.cpu`), the torch and onnxruntime versions, the thread count, the batch and the
candidates, so a machine probes each model once; a corrupt cache is ignored and rewritten. A run that
measures far below the rate its choice was made on (`recheck`) drops the entry, so the next run times again.
RRCM_AUTO_RUNTIMES (e.g. "eager,onnxruntime") limits the candidates; a single one is used without a probe.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rrcm.cpu import cpu_info
from rrcm.distributed import on_rank_zero
from rrcm.engine.backends import make_backend
from rrcm.engine.timing import FAR_BELOW, timed_rounds
from rrcm.errors import UserError, first_line
from rrcm.outputs import atomic_write

# name -> (backend, its options, what the summary calls it)
RUNTIMES: dict[str, tuple[str, dict[str, Any], str]] = {
    "eager": ("torch", {}, "torch eager"),
    "compiled": ("torch", {"compile": True}, "torch.compile"),
    "onnxruntime": ("onnxruntime", {}, "ONNX Runtime"),
}
DEFAULT = "eager"  # what runs when no other runtime leads clearly: what --precision fp32 runs
PROBE_SECONDS = 1.0  # of timing per candidate, after its compilation, over all rounds
PROBE_ROUNDS = 5
CLEAR_LEAD = 1.2  # the median paired ratio a runtime needs over the one it replaces
RECHECK_SECONDS = 10.0  # of a run's sampling, at least, to judge its rate by
CACHE_VERSION = 1


@dataclass(frozen=True)
class Choice:
    """The runtime auto picked, what each candidate measured (samples/s), and where the choice came from."""

    runtime: str
    rates: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it could not run
    source: str = "probe"  # "probe", "cache", "only" (one candidate: no probe) or "cuda" (no probe: fp32 torch)
    digest: str | None = None  # its cache entry's key

    @property
    def backend(self) -> str:
        return RUNTIMES[self.runtime][0]

    @property
    def compile(self) -> bool:
        return bool(RUNTIMES[self.runtime][1].get("compile"))

    def summary(self, batch: int) -> str:
        """One line: the runtime, its samples/s and how it was chosen."""
        label = RUNTIMES[self.runtime][2]
        if self.source == "cuda":
            return f"runtime: {label}, fp32 (--precision auto does not probe GPU runtimes yet)"
        if self.source == "only":
            return f"runtime: {label}, fp32 (the one runtime RRCM_AUTO_RUNTIMES allows: not timed)"
        others = [f"{RUNTIMES[n][2]} {r:,.0f}" for n, r in self.rates.items() if n != self.runtime]
        others += [f"{RUNTIMES[n][2]} skipped: {why}" for n, why in self.skipped.items()]
        how = "cached choice" if self.source == "cache" else f"probed, {PROBE_ROUNDS} rounds"
        return (f"runtime: {label}, {self.rates[self.runtime]:,.0f} samples/s (fp32, batch {batch}, "
                f"{torch.get_num_threads()} threads; {how}; {', '.join(others) or 'no other candidate ran'})")


def cache_path() -> Path:
    """$XDG_CACHE_HOME/rrcm/runtimes.json, or ~/.cache/rrcm/runtimes.json."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "rrcm" / "runtimes.json"


def candidates() -> list[str]:
    """The RUNTIMES auto chooses from: all, or those RRCM_AUTO_RUNTIMES names (comma-separated)."""
    value = os.environ.get("RRCM_AUTO_RUNTIMES", "")
    names = {name.strip() for name in value.split(",") if name.strip()}
    if not names:
        return list(RUNTIMES)
    if not names <= set(RUNTIMES):
        raise UserError(f"RRCM_AUTO_RUNTIMES={value!r}: name runtimes among {', '.join(RUNTIMES)}, separated by commas")
    return [name for name in RUNTIMES if name in names]


def cache_key(fingerprint: str, batch: int, device: torch.device) -> dict[str, Any]:
    """Everything a probe's result depends on besides the load on the machine."""
    try:
        ort = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        ort = None
    return {"model_sha256": fingerprint, "cpu": cpu_info().to_dict(), "torch": torch.__version__, "onnxruntime": ort,
            "threads": torch.get_num_threads(), "batch": batch, "device": str(device), "candidates": candidates()}


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_entries(path: Path) -> dict[str, Any]:
    """The cache's entries; {} for a missing, unreadable or corrupt file (rewritten on the next probe)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: invalid JSON or text
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None
    return entries if isinstance(entries, dict) else {}


def _cached_choice(path: Path, digest: str) -> Choice | None:
    entry = _read_entries(path).get(digest)
    if not isinstance(entry, dict) or entry.get("runtime") not in RUNTIMES:
        return None
    rates = entry.get("rates")
    if not isinstance(rates, dict) or not all(n in RUNTIMES and isinstance(r, (int, float)) for n, r in rates.items()):
        return None
    if not isinstance(rates.get(entry["runtime"]), (int, float)):
        return None
    return Choice(entry["runtime"], {n: float(r) for n, r in rates.items()}, source="cache", digest=digest)


def _store(path: Path, digest: str, key: dict[str, Any], choice: Choice) -> None:
    """Add the choice to the cache; a cache that cannot be written costs a probe next time, nothing else."""
    entries = _read_entries(path)
    entries[digest] = {"key": key, "runtime": choice.runtime, "rates": choice.rates,
                       "probed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1) + "\n")
    except (OSError, UserError):
        pass


def build_runtime(model: nn.Module, runtime: str, device: torch.device):
    """The backend of `runtime` (a RUNTIMES name) for `model` in fp32."""
    name, options, _ = RUNTIMES[runtime]
    if name == "onnxruntime":
        options = {**options, "threads": torch.get_num_threads()}  # as many as torch, for a fair race
    return make_backend(model, device, name, **options)


def probe(model: nn.Module, batch: int, device: torch.device, runtimes: list[str],
          seconds: float = PROBE_SECONDS) -> tuple[Choice, dict[str, Any]]:
    """Time `runtimes` on `batch` noisy inputs: (the fastest as a Choice, the backends built)."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise UserError("--precision auto needs a model that records its input shape; give --precision fp32")
    if batch < 1:
        raise UserError(f"batch size must be >= 1, got {batch}")
    x = 0.5 + 0.25 * torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    backends, timed, skipped = {}, {}, {}
    for runtime in runtimes:
        try:
            backend = build_runtime(model, runtime, device)
            u = (x * backend.input_scale + backend.input_shift).to(backend.input_dtype)
            backend.forward(u)  # compiles (torch.compile) before the timing
        except Exception as e:  # a runtime that cannot run this model here (not installed, export or compile fails)
            skipped[runtime] = first_line(e)
            continue
        backends[runtime], timed[runtime] = backend, (backend.forward, u)
    if not timed:
        reasons = "; ".join(f"{RUNTIMES[name][2]}: {why}" for name, why in skipped.items())
        raise UserError(f"no runtime could run this model: {reasons}")
    runtime, rates = decide(timed_rounds(timed, seconds, PROBE_ROUNDS))
    return Choice(runtime, rates, skipped), backends


def decide(rounds: list[dict[str, float]]) -> tuple[str, dict[str, float]]:
    """(runtime, median samples/s of each) from the rounds of a probe (samples/s by runtime in each round).

    The runtimes are taken in RUNTIMES' order: the first timed one (DEFAULT where it ran) holds the lead, and a
    later one takes it only by leading clearly over every runtime before it: faster in every round, and by
    CLEAR_LEAD in the median of the per-round ratios. A lead that is unclear (close, or seen only in some rounds:
    load on the machine) leaves the choice where it was."""
    names = [name for name in RUNTIMES if name in rounds[0]]
    rates = {name: statistics.median(r[name] for r in rounds) for name in names}

    def leads(name: str, other: str) -> bool:
        ratios = [r[name] / r[other] for r in rounds]
        return min(ratios) > 1.0 and statistics.median(ratios) >= CLEAR_LEAD

    chosen = names[0]
    for i, name in enumerate(names[1:], start=1):
        if all(leads(name, other) for other in names[:i]):
            chosen = name
    return chosen, rates


def select_runtime(model: nn.Module, fingerprint: str, batch: int, device: torch.device, *, rank: int = 0,
                   world: int = 1, cache: Path | None = None) -> tuple[Any, Choice]:
    """(backend, choice): the fastest fp32 runtime for `model` (sha256 `fingerprint`) at `batch` rows, from the
    cache or probed (by rank 0 under torchrun, every rank then runs the same runtime)."""
    if device.type != "cpu":
        # Seam: a GPU probe (CUDA graphs, TensorRT, fp16 kernels) would go here; until then fp32 torch.
        return make_backend(model, device, "torch"), Choice("eager", source="cuda")
    runtimes = candidates()
    if len(runtimes) == 1:
        return build_runtime(model, runtimes[0], device), Choice(runtimes[0], source="only")
    cache = cache or cache_path()
    built: dict[str, Any] = {}

    def choose() -> Choice:
        key = cache_key(fingerprint, batch, device)
        digest = _digest(key)
        choice = _cached_choice(cache, digest)
        if choice is None:
            print(f"rrcm: timing {', '.join(RUNTIMES[r][2] for r in runtimes)} for this model on this CPU, "
                  f"once (the choice is cached in {cache})", flush=True)
            choice, backends = probe(model, batch, device, runtimes, PROBE_SECONDS)
            choice = replace(choice, digest=digest)
            built.update(backends)
            _store(cache, digest, key, choice)
        return choice

    choice = on_rank_zero(rank, world, choose)
    backend = built.get(choice.runtime) or build_runtime(model, choice.runtime, device)
    return backend, choice


def recheck(choice: Choice, measured: float | None, seconds: float, cache: Path | None = None) -> str | None:
    """After a run on `choice` that measured `measured` samples/s over `seconds` (at least RECHECK_SECONDS):
    when that is below FAR_BELOW of the rate the choice was made on (the probe ran on a quieter machine, or this
    one changed), its cache entry is dropped so that the next run times the runtimes again; returns the line
    that says so, else None. A run's rate counts noise and counting besides the model, hence the generous FAR_BELOW."""
    cached = choice.rates.get(choice.runtime)
    if choice.digest is None or cached is None or measured is None or seconds < RECHECK_SECONDS \
            or measured >= FAR_BELOW * cached:
        return None
    cache = cache or cache_path()
    entries = _read_entries(cache)
    if entries.pop(choice.digest, None) is not None:
        try:
            atomic_write(cache, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1) + "\n")
        except UserError:
            return None
    return (f"rrcm: this run measured {measured:,.0f} samples/s, far below the {cached:,.0f} that "
            f"{RUNTIMES[choice.runtime][2]} was chosen on: the runtimes are timed again at the next run")
