"""The statistics behind the report's comparisons, on plain numbers: Welch's interval for the difference of
two means over seeds (is loss A better than loss B, or inside the noise of the seeds?) and the non-dominated
points of a cost/accuracy trade-off (what each embedding size or trial-hour buys)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """mean(a) − mean(b) with its two-sided Welch interval and Welch–Satterthwaite degrees of freedom."""

    difference: float
    low: float
    high: float
    df: float

    @property
    def holds_zero(self) -> bool:
        """The seeds cannot tell the two apart at this level."""
        return self.low <= 0.0 <= self.high


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Optional[Interval]:
    """The `level` interval of mean(a) − mean(b) without assuming equal variances: SE = sqrt(s_a²/n_a +
    s_b²/n_b), df by Satterthwaite, the t quantile at (1 + level)/2. None when a side has fewer than 2 values
    (one seed has no spread to estimate). Two sides without any spread give the difference itself."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import t  # loaded only when a report compares

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    difference = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return Interval(difference, difference, difference, float(len(a) + len(b) - 2))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(t.ppf((1 + level) / 2, df)) * math.sqrt(va + vb)
    return Interval(difference, difference - half, difference + half, df)


def pareto_front(costs: Sequence[float], values: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, cheapest first: no other point costs at most as much and reaches
    at least as high with one of the two strictly better. NaN values never enter."""
    order = sorted((i for i, v in enumerate(values) if not math.isnan(v)), key=lambda i: (costs[i], -values[i]))
    front: list[int] = []
    for i in order:
        if not front or values[i] > values[front[-1]]:
            front.append(i)
    return front
