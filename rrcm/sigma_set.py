"""The noise levels a classifier was fine-tuned for: one sigma, a list of them, or a range.

`rrcm finetune --sigma`, `--sigmas` and `--sigma-range` make one; a checkpoint's config records it
(`sigma`, `sigmas` or `sigma_range`), an exported model's metadata too, and `choose` checks the sigma
a user asks of the classifier against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rrcm.errors import UserError


def check_sigma(name: str, value: float) -> float:
    """`value` as a float, or a UserError unless it is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{name}: not a number: {text.strip()!r}") from None
    return check_sigma(f"{name}: each sigma", value)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _g(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


@dataclass(frozen=True)
class SigmaSet:
    """Listed sigmas (`values`, increasing; one for a per-sigma classifier) or a range (`bounds`, lo < hi)."""

    values: tuple[float, ...] = ()
    bounds: tuple[float, float] | None = None

    def __post_init__(self):
        if (self.bounds is None) == (not self.values):
            raise ValueError("a SigmaSet holds either listed values or bounds")
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise ValueError(f"a sigma range needs lo < hi, got {self.bounds}")
        if any(b <= a for a, b in zip(self.values, self.values[1:])):
            raise ValueError(f"listed sigmas must increase, got {self.values}")

    @classmethod
    def listed(cls, values, name: str = "sigmas") -> "SigmaSet":
        """Sigmas in any order, each a positive number, none twice."""
        checked = sorted(check_sigma(name, v) for v in values)
        if not checked:
            raise UserError(f"{name}: no sigma given")
        if any(_close(a, b) for a, b in zip(checked, checked[1:])):
            raise UserError(f"{name}: each sigma once, got {_g(checked)}")
        return cls(values=tuple(checked))

    @classmethod
    def between(cls, lo: float, hi: float, name: str = "sigma range") -> "SigmaSet":
        lo, hi = check_sigma(name, lo), check_sigma(name, hi)
        if not lo < hi:
            raise UserError(f"{name}: the lower end must be below the upper one, got {lo:g}:{hi:g}")
        return cls(bounds=(lo, hi))

    @classmethod
    def parse(cls, sigma: float | None = None, sigmas: str | None = None, sigma_range: str | None = None) -> "SigmaSet":
        """From the command-line options: --sigma S, --sigmas S1,S2,... or --sigma-range LO:HI (exactly one)."""
        if sum(v is not None for v in (sigma, sigmas, sigma_range)) != 1:
            raise UserError("give exactly one of --sigma, --sigmas and --sigma-range")
        if sigma is not None:
            return cls(values=(check_sigma("sigma", sigma),))
        if sigmas is not None:
            return cls.listed([_number("--sigmas", part) for part in sigmas.split(",")], "--sigmas")
        ends = sigma_range.split(":")
        if len(ends) != 2:
            raise UserError(f"--sigma-range: LO:HI, e.g. 0.12:1.0, got {sigma_range!r}")
        return cls.between(*(_number("--sigma-range", end) for end in ends), name="--sigma-range")

    @property
    def single(self) -> float | None:
        """The one sigma of a per-sigma classifier; None for several or a range."""
        return self.values[0] if len(self.values) == 1 else None

    def __contains__(self, sigma: float) -> bool:
        if self.bounds is not None:
            lo, hi = self.bounds
            return (lo <= sigma <= hi) or _close(sigma, lo) or _close(sigma, hi)
        return any(_close(sigma, v) for v in self.values)

    def describe(self) -> str:
        """'sigma 0.25', 'sigma 0.25, 0.5 and 1' or 'sigma in [0.12, 1]'."""
        if self.bounds is not None:
            return f"sigma in [{_g(self.bounds)}]"
        if len(self.values) == 1:
            return f"sigma {self.values[0]:g}"
        return f"sigma {_g(self.values[:-1])} and {self.values[-1]:g}"

    def choose(self, sigma: float | None, source: str) -> float:
        """The sigma to run at: `sigma` if the classifier was trained for it (None: the only one it was trained for)."""
        if sigma is None:
            if self.single is None:
                raise UserError(f"{source}: fine-tuned for {self.describe()}: give the sigma to use (--sigma)")
            return self.single
        sigma = check_sigma("sigma", sigma)
        if sigma not in self:
            raise UserError(f"{source}: fine-tuned for {self.describe()}, not {sigma:g}")
        return sigma

    def representatives(self) -> tuple[float, ...]:
        """Sigmas that stand for the set when it is evaluated: the listed ones, or a range's ends and geometric middle
        (the median of the log-uniform draws that train it)."""
        if self.bounds is None:
            return self.values
        lo, hi = self.bounds
        return lo, math.sqrt(lo * hi), hi

    def to_config(self) -> dict:
        """The checkpoint config's entry: {"sigma": s}, {"sigmas": [...]} or {"sigma_range": [lo, hi]}."""
        if self.bounds is not None:
            return {"sigma_range": list(self.bounds)}
        return {"sigma": self.single} if self.single is not None else {"sigmas": list(self.values)}

    @classmethod
    def from_config(cls, config: dict, source: str) -> "SigmaSet | None":
        """What `to_config` wrote; None when the config records no sigma."""
        try:
            if config.get("sigma_range") is not None:
                return cls.between(*config["sigma_range"], name=f"{source}: sigma_range")
            if config.get("sigmas") is not None:
                return cls.listed(config["sigmas"], f"{source}: sigmas")
            if config.get("sigma") is not None:
                return cls(values=(check_sigma(f"{source}: sigma", config["sigma"]),))
        except TypeError:
            raise UserError(f"{source}: corrupt sigma entries in its config") from None
        return None

    def to_metadata(self) -> dict[str, str]:
        """Exported models' metadata (without prefix): "sigmas": "0.25,0.5,1" or "sigma_range": "0.12,1", exact reprs."""
        key = "sigma_range" if self.bounds is not None else "sigmas"
        return {key: ",".join(repr(float(v)) for v in (self.bounds or self.values))}

    @classmethod
    def from_metadata(cls, values: dict[str, str], source: str) -> "SigmaSet | None":
        """What `to_metadata` wrote; None when neither key is there."""
        for key, make in (("sigma_range", lambda v: cls.between(*v, name=f"{source}: sigma_range")),
                          ("sigmas", lambda v: cls.listed(v, f"{source}: sigmas"))):
            if key in values:
                try:
                    return make([float(v) for v in values[key].split(",")])
                except (ValueError, TypeError):
                    raise UserError(f"{source}: corrupt rrcm metadata ({key} {values[key]!r})") from None
        return None
