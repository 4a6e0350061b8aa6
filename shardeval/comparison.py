"""What a comparison of two runs says: the records behind ``comparison.json`` and its errors.

:mod:`shardeval.compare` computes a :class:`Comparison`; the CLI, the alerts, the API
and ``--baseline`` read one, and :meth:`Comparison.from_dict` reads a stored one back. Kept
apart from the computation, these records need neither pandas nor the statistics. The JSON
shape is design.md's "Comparison" object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardeval.errors import EXIT_USAGE, ShardevalError

EXIT_QUALITY_GATE = 3


class RegressionDetected(ShardevalError):
    """``--fail-on-regression`` and a metric's verdict is regression: the quality gate (exit 3)."""

    exit_code = EXIT_QUALITY_GATE


class UnknownMetric(ShardevalError):
    """A requested metric is not scored in both runs."""

    exit_code = EXIT_USAGE


STORED_FLIPS = 100
"""Broken and fixed rows per metric kept in a comparison's JSON (counts stay exact)."""


@dataclass(frozen=True)
class Flip:
    """One row whose score changed between the runs."""

    item_id: str
    trial: int
    base_score: float
    cand_score: float
    base_response: str | None
    cand_response: str | None
    target: str | None = None
    prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return dict(self.__dict__)


@dataclass
class MetricComparison:
    """The comparison of one metric (``score_<name>`` in both runs)."""

    name: str
    n: int
    """Paired rows (scored in both runs)."""
    n_items: int
    n_left_out: int
    base: float | None
    cand: float | None
    delta: float | None
    se: float | None
    ci95: list[float] | None
    p: float | None
    test: str
    fixed: int
    broken: int
    mde: float | None
    p_adjusted: float | None = None
    verdict: str = "inconclusive"
    broken_rows: list[Flip] = field(default_factory=list)
    fixed_rows: list[Flip] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """design.md's per-metric object, plus n, n_items, n_left_out and mde."""
        return {
            "base": self.base,
            "cand": self.cand,
            "delta": self.delta,
            "se": self.se,
            "ci95": self.ci95,
            "p": self.p,
            "p_adjusted": self.p_adjusted,
            "test": self.test,
            "fixed": self.fixed,
            "broken": self.broken,
            "verdict": self.verdict,
            "n": self.n,
            "n_items": self.n_items,
            "n_left_out": self.n_left_out,
            "mde": self.mde,
        }


@dataclass
class Comparison:
    """The comparison of two runs: ``.verdict``, ``.to_dict()``, ``.flips``."""

    base: str
    cand: str
    n_aligned: int
    only_base: int
    only_cand: int
    alpha: float
    metrics: dict[str, MetricComparison]
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``regression`` if any metric regressed, else improvement if any, else inconclusive."""
        verdicts = {m.verdict for m in self.metrics.values()}
        for verdict in ("regression", "improvement"):
            if verdict in verdicts:
                return verdict
        return "inconclusive"

    @property
    def flips(self) -> dict[str, dict[str, list[Flip]]]:
        """Per metric, the ``broken`` (1→0, or down) and ``fixed`` (0→1, or up) rows."""
        return {
            name: {"broken": m.broken_rows, "fixed": m.fixed_rows}
            for name, m in self.metrics.items()
        }

    def to_dict(self, *, flips: int = STORED_FLIPS) -> dict[str, Any]:
        """The JSON object of design.md ("Comparison"), plus verdict, alpha and warnings.

        ``flips`` holds the first broken and fixed rows of each metric (what a report or a
        reader of comparison.json shows side by side).
        """
        return {
            "base": self.base,
            "cand": self.cand,
            "n_aligned": self.n_aligned,
            "only_base": self.only_base,
            "only_cand": self.only_cand,
            "metrics": {name: m.to_dict() for name, m in self.metrics.items()},
            "verdict": self.verdict,
            "alpha": self.alpha,
            "warnings": list(self.warnings),
            "flips": {
                name: {
                    "broken": [f.to_dict() for f in m.broken_rows[:flips]],
                    "fixed": [f.to_dict() for f in m.fixed_rows[:flips]],
                }
                for name, m in self.metrics.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        """A comparison read back from :meth:`to_dict` (flips as far as they were kept)."""
        flips = data.get("flips") or {}
        metrics = {}
        for name, m in data["metrics"].items():
            kept = flips.get(name) or {}
            fields = {k: m[k] for k in MetricComparison.__dataclass_fields__ if k in m}
            metrics[name] = MetricComparison(
                name=name,
                **{k: v for k, v in fields.items() if k != "name"},
                broken_rows=[Flip(**f) for f in kept.get("broken", [])],
                fixed_rows=[Flip(**f) for f in kept.get("fixed", [])],
            )
        return cls(
            base=data["base"],
            cand=data["cand"],
            n_aligned=data["n_aligned"],
            only_base=data["only_base"],
            only_cand=data["only_cand"],
            alpha=data.get("alpha", 0.05),
            metrics=metrics,
            warnings=list(data.get("warnings") or []),
        )
