"""How many trials run at once, per study and in all: plain arithmetic on the spec and the plan, without Ray,
so that `--dry-run` says it without starting (or importing) Ray. `search` applies it to the Tune run.
"""
from __future__ import annotations

import math
from typing import Optional

from tune_upl.planning import Study, final_runs, search_trials
from tune_upl.spec import SearchSpec


def per_study(spec: SearchSpec, study: Study) -> int:
    """A study's trials at once: its `max_concurrent`, or fewer when it never has that many to run (its
    search trials, then its final runs)."""
    return min(spec.max_concurrent, max(search_trials(spec, study), final_runs(spec)))


def trials_at_once(spec: SearchSpec, studies: list[Study], cluster: Optional[dict[str, float]] = None) -> int:
    """How many trials of all studies run at once: `max_concurrent_total`, else what the cluster holds at the
    per-trial request (`cluster`: `ray.cluster_resources()`; None: not known, as for a growing cluster),
    and never more than every study's `max_concurrent` together. A number, never "unlimited": it also
    bounds how far ahead of their results the samplers propose."""
    wanted = sum(per_study(spec, study) for study in studies)
    if spec.max_concurrent_total is not None:
        return min(wanted, spec.max_concurrent_total)
    if cluster is None:
        return wanted
    fits = [cluster.get("CPU", 0.0) / spec.resources.cpu]
    if spec.resources.gpu > 0:
        fits.append(cluster.get("GPU", 0.0) / spec.resources.gpu)
    return max(1, min(wanted, math.floor(min(fits) + 1e-9)))
