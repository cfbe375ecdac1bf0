"""How fast, and so how long: throughput probes of forward functions, and the cost of a certification run.

- `samples_per_second`, `timed_rounds`, `best_rates`: short probes of how many samples per second a forward
  function takes on this machine, now.
- `Workload` and `Meter`: a run's samples left, the estimate printed before (or, where no rate is known yet,
  during) its first image, the refusal of a run that no machine finishes (`TooLong`, unless forced), and a bar
  of samples inside an image that runs long. The meter only watches batches: it changes no count.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from rrcm.errors import UserError
from rrcm.eta import DAY, duration

Forward = Callable[[torch.Tensor], Any]

FEASIBLE_DAYS = 100  # a day of the measured rate times a generous factor: longer runs are refused without --force
MEASURE_SECONDS = 2.0  # of sampling after the first batch (its warm-up excluded) that measure a run's rate
INNER_BAR_SECONDS = 5.0  # an image (or group of images) running longer than this gets a bar of its samples
FAR_BELOW = 0.5  # a run measuring below this share of the rate it was planned on is news (estimate, runtime choice)


def samples_per_second(forward: Forward, batch: torch.Tensor, seconds: float) -> float:
    """Rows of `batch` per second that `forward` takes, calling it until `seconds` have passed (at least once)."""
    calls, start = 0, time.perf_counter()
    with torch.no_grad():
        while True:
            forward(batch)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return calls * len(batch) / elapsed


def timed_rounds(candidates: dict[str, tuple[Forward, torch.Tensor]], seconds: float,
                 rounds: int = 3) -> list[dict[str, float]]:
    """Samples/s of each (forward, batch) candidate in each of `rounds` rounds: one untimed call each first
    (where compilation happens), then per round a turn of seconds / rounds each, the order rotated from round
    to round, so that load on the machine falls on turns, and a comparison within a round is a paired one."""
    with torch.no_grad():
        for forward, batch in candidates.values():
            forward(batch)
    names = list(candidates)
    results = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        results.append({name: samples_per_second(*candidates[name], seconds / rounds) for name in order})
    return [{name: result[name] for name in names} for result in results]


def best_rates(candidates: dict[str, tuple[Forward, torch.Tensor]], seconds: float, rounds: int = 3) -> dict[str, float]:
    """Each candidate's best turn of `timed_rounds`."""
    results = timed_rounds(candidates, seconds, rounds)
    return {name: max(result[name] for result in results) for name in candidates}


def _rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


class TooLong(UserError):
    """A run that would take more than FEASIBLE_DAYS at the rate measured here (refused unless forced)."""


@dataclass(frozen=True)
class Workload:
    """The work a run has left: `images` of `per_image` noisy samples each (at most that many where `at_most`:
    modes that stop early)."""

    what: str
    images: int
    per_image: int
    at_most: bool = False

    @property
    def samples(self) -> int:
        return self.images * self.per_image

    def seconds(self, rate: float) -> float:
        return self.samples / rate

    def estimate(self, rate: float, source: str) -> str:
        """One line: the work, and about how long it takes at `rate` samples/s (whose origin `source` names)."""
        bound = "at most " if self.at_most else ""
        return (f"rrcm: {self.what} of {self.images:,} image(s) x {bound}{self.per_image:,} samples: "
                f"{bound}about {duration(self.seconds(rate))} at {_rate(rate)} samples/s ({source})")

    def check(self, rate: float, source: str) -> None:
        """Refuse (TooLong) work that would take more than FEASIBLE_DAYS at `rate`."""
        if self.seconds(rate) > FEASIBLE_DAYS * DAY:
            raise TooLong(f"{self.what} of {self.images:,} image(s) x {'at most ' if self.at_most else ''}"
                          f"{self.per_image:,} samples would take about {duration(self.seconds(rate))} at "
                          f"{_rate(rate)} samples/s ({source}), more than {FEASIBLE_DAYS} days: lower --n or --max, "
                          f"or give --force to run it anyway")


class Meter:
    """Watches a run's batches (`on_batch`, the samplers' callback) to tell its cost.

    `rate` (samples/s, e.g. what `--precision auto` timed; `source` says so) gives the estimate before the
    first image; without it the rate is measured over the first MEASURE_SECONDS of sampling after the first
    batch (or the first groups, where they are shorter) and the estimate printed then. Work longer than
    FEASIBLE_DAYS at either rate is refused with TooLong unless `force`; a measured rate far below the given
    one (FAR_BELOW) prints a new estimate. `sync` waits for the device before the clock is read (CUDA).
    """

    def __init__(self, rate: float | None = None, source: str = "", *, force: bool = False,
                 clock: Callable[[], float] = time.perf_counter, write: Callable[[str], None] = tqdm.write):
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise UserError(f"a throughput must be a positive number of samples/s, got {rate!r}")
        self.prior, self.source, self.force, self.clock, self.write = rate, source, force, clock, write
        self.work: Workload | None = None
        self.rate: float | None = None  # measured on the first batches
        self.span = 0.0  # seconds watched after the first batch, once closed: the run's rate is `average`
        self.sync: Callable[[], None] = lambda: None
        self.show, self.refuse_measured = False, True
        self._t0: float | None = None  # end of the first batch: the clock of the measurement starts there
        self._measured_samples = 0  # sampled after the first batch
        self._group_start, self._group_bound, self._group_done = 0.0, 0, 0
        self._bar: tqdm | None = None

    def begin(self, work: Workload, *, show: bool = True, refuse_measured: bool = True,
              sync: Callable[[], None] | None = None) -> None:
        """Start watching `work`: with a given rate, print its estimate (`show`) and refuse it if too long.
        `refuse_measured`: also refuse on the measured rate (off where processes must stop together)."""
        self.work, self.show, self.refuse_measured = work, show, refuse_measured
        self.sync = sync or self.sync
        if self.prior is not None and work.images:
            if show:
                self.write(work.estimate(self.prior, self.source))
            if not self.force:
                work.check(self.prior, self.source)

    def start_group(self, bound: int) -> None:
        """An image (or a group of images) of at most `bound` samples starts."""
        self._group_start, self._group_bound, self._group_done = self.clock(), bound, 0

    def on_batch(self, rows: int) -> None:
        """A batch of `rows` noisy samples has been sent through the model."""
        self._group_done += rows
        if self._t0 is None:
            self.sync()
            self._t0 = self.clock()
        else:
            self._measured_samples += rows
            if self.rate is None and self.clock() - self._t0 >= MEASURE_SECONDS:
                self._measure()
        if self.show and self.work is not None:
            if self._bar is None and self.clock() - self._group_start >= INNER_BAR_SECONDS:
                self._bar = tqdm(total=self._group_bound, initial=self._group_done, unit="sample", unit_scale=True,
                                 desc="  this image", leave=False, position=1, dynamic_ncols=True)
            elif self._bar is not None:
                self._bar.update(rows)

    def end_group(self) -> None:
        """The group's results are on the host (the device is idle): a rate not yet measured is measured here."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.rate is None and self._measured_samples:
            self._measure()

    def close(self) -> None:
        """The run is over (or stopped): the inner bar closed, the seconds watched recorded."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._t0 is not None:
            self.sync()
            self.span = self.clock() - self._t0

    @property
    def average(self) -> float | None:
        """Samples/s over the whole run after its first batch (None before `close`, or with nothing measured)."""
        return self._measured_samples / self.span if self.span > 0 and self._measured_samples else None

    def _measure(self) -> None:
        self.sync()
        seconds = self.clock() - self._t0
        if seconds <= 0:
            return
        self.rate = self._measured_samples / seconds
        if self.work is None or (self.prior is not None and self.rate >= FAR_BELOW * self.prior):
            return
        source = "measured on this run's first images" if self.prior is None else \
            f"measured on this run's first images, far below the {self.prior:,.0f} {self.source}"
        if self.show:
            self.write(self.work.estimate(self.rate, source))
        if self.refuse_measured and not self.force:
            self.work.check(self.rate, source)
