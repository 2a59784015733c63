"""The statistics behind the report's comparisons, on plain numbers: Welch's interval for the difference of
two means over seeds (is loss A better than loss B, or inside the noise of the seeds?), the paired interval of
runs that share their seeds (a study's tuned selection against its recipe, or two losses' runs of the same
seeds), what tuning changes in a loss's lead (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020:
most gains shrink once every loss is tuned alike), and the non-dominated points of a cost/accuracy trade-off
(what each embedding size or trial-hour buys)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

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


@dataclass(frozen=True)
class Paired:
    """a − b over the seeds both sides ran: the mean of the per-seed differences, how many seeds pair, and the
    paired t interval (None below 2 pairs: one difference has no spread to estimate)."""

    difference: float
    pairs: int
    interval: Optional[Interval]


def paired_interval(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Optional[Paired]:
    """a[seed] − b[seed] over the seeds in both: the mean difference d̄ and its two-sided `level` interval
    d̄ ± t((1 + level)/2, n − 1) · s_d/√n. Pairing takes out what a seed does to both runs (its split of the
    batches, its initialisation), so it is narrower than Welch's when the runs of a seed move together. None
    without a shared seed; differences without spread give the difference itself."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    differences = [a[s] - b[s] for s in seeds]
    mean = statistics.mean(differences)
    if len(seeds) < 2:
        return Paired(mean, 1, None)
    from scipy.stats import t  # loaded only when a report compares

    spread = statistics.stdev(differences)
    half = float(t.ppf((1 + level) / 2, len(seeds) - 1)) * spread / math.sqrt(len(seeds))
    return Paired(mean, len(seeds), Interval(mean, mean - half, mean + half, float(len(seeds) - 1)))


@dataclass(frozen=True)
class MethodGain:
    """The loss with the best recipe (`best`) against another one (`other`), each paired by seed: once at their
    recipes, once tuned (their selections' final runs)."""

    best: str
    other: str
    at_recipe: Optional[Paired]
    tuned: Optional[Paired]

    def verdict(self) -> str:
        """One sentence: does the lead at the recipes survive tuning, or can these seeds not tell?"""
        best, other = f"`{self.best}`", f"`{self.other}`"
        lead, tuned = _sign(self.at_recipe), _sign(self.tuned)
        if lead is None:
            return f"At the recipes these seeds cannot tell {best} from {other} (fewer than 2 shared seeds)."
        if lead == 0:
            start = f"At the recipes these seeds cannot tell {best} from {other} (the interval contains 0)"
            ends = {None: "; tuned, they give no interval.", 0: "; tuned, they cannot either.",
                    1: f"; tuned, {best} leads.", -1: f"; tuned, {other} leads."}
            return start + ends[tuned]
        ahead, behind = (best, other) if lead > 0 else (other, best)
        if tuned is None:
            return f"{ahead} leads {behind} at the recipes; tuned, these seeds give no interval."
        if tuned == lead:
            return f"{ahead}'s lead over {behind} at the recipes survives tuning."
        if tuned == 0:
            return (f"{ahead} leads {behind} at the recipes; tuned, these seeds cannot tell them apart (the interval "
                    "contains 0).")
        return f"{ahead} leads {behind} at the recipes; tuning reverses it: tuned, {behind} leads."


def _sign(found: Optional[Paired]) -> Optional[int]:
    """+1 or −1 when the interval excludes 0 (above or below), 0 when it contains it, None without one."""
    if found is None or found.interval is None:
        return None
    return 0 if found.interval.holds_zero else (1 if found.interval.low > 0 else -1)


def method_gains(recipes: Mapping[str, Mapping[int, float]],
                 tuned: Mapping[str, Mapping[int, float]]) -> list[MethodGain]:
    """The loss whose recipe runs have the highest mean (the first listed of equal means) against each other
    loss with recipe runs, at the recipes and tuned, each paired by seed. [] with fewer than two such losses."""
    ran = {label: runs for label, runs in recipes.items() if runs}
    if len(ran) < 2:
        return []
    best = max(ran, key=lambda label: statistics.mean(ran[label].values()))
    return [MethodGain(best, label, paired_interval(ran[best], runs),
                       paired_interval(tuned.get(best, {}), tuned.get(label, {})))
            for label, runs in ran.items() if label != best]


def pareto_front(costs: Sequence[float], values: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, cheapest first: no other point costs at most as much and reaches
    at least as high with one of the two strictly better. NaN values never enter."""
    order = sorted((i for i, v in enumerate(values) if not math.isnan(v)), key=lambda i: (costs[i], -values[i]))
    front: list[int] = []
    for i in order:
        if not front or values[i] > values[front[-1]]:
            front.append(i)
    return front
