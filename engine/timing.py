"""Short throughput probes: how many samples per second a forward function takes on this machine, now."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

Forward = Callable[[torch.Tensor], Any]


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


def best_rates(candidates: dict[str, tuple[Forward, torch.Tensor]], seconds: float, rounds: int = 3) -> dict[str, float]:
    """Samples/s of each (forward, batch) candidate: one untimed call each (where compilation happens), then
    `rounds` interleaved turns of seconds / rounds, keeping each one's best turn, so that other load on the
    machine slows turns, not one candidate."""
    with torch.no_grad():
        for forward, batch in candidates.values():
            forward(batch)
    rates = dict.fromkeys(candidates, 0.0)
    for _ in range(rounds):
        for name, (forward, batch) in candidates.items():
            rates[name] = max(rates[name], samples_per_second(forward, batch, seconds / rounds))
    return rates
