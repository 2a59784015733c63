"""Selection and the final stage: the only code that lets a run see the test classes.

Selection reads Tune's results only (never the Optuna study, which marks resumed trials as failed) and
picks, per study, the trial whose best epoch is best on the objective. Under protocol `val` the selected
configuration is then retrained from scratch on all training classes with `final_seeds` seeds, each
tested once after its last epoch: trials of the same Tune run as the search (the searcher of
`tune_upl.multistudy` suggests them as soon as the study is selected). Under `recipe_runs` the loss's recipe
(`planning.recipe_config`) is retrained and tested beside them with the same seeds, so the report can pair
each seed's tuned run with its recipe run. Under protocol `seed` there is no final stage: the test metrics of
the test-selected epoch are the result, as in the seed.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from tune_upl.atomic import write_json
from tune_upl.layout import FINAL_RUN_SUFFIX, SELECTION_FILE, UNSELECTABLE_FILE, faulted
from tune_upl.results import Selection, last_per_epoch, read_selection  # Selection: the schema of selection.json
from tune_upl.spec import SearchSpec


def select_trials(spec: SearchSpec, trials: list[tuple[dict[str, Any], pd.DataFrame]], key: str,
                  group: dict[str, Any], where: str = "the trial folders", failed: int = 0) -> Selection:
    """The trial with the best objective over its epochs among those that did not fail: `trials` are
    (config, its results, a row per reported epoch with `trial_id` and `training_iteration`); a trial whose
    last result names a fault (diverged, out of memory, no GPU...) has only the worst score, and is left out
    like the `failed` trials the caller left out (errored)."""
    metric, mode = spec.objective.metric, spec.objective.mode
    good = [(config, last_per_epoch(frame)) for config, frame in trials if not _faulted(frame)]
    candidates = [(config, frame) for config, frame in good if metric in frame]  # retried epochs: the last row
    if not candidates:
        total = failed + len(trials)
        faults = failed + len(trials) - len(good)
        why = (f"all {total} of its trials failed" if faults == total and total else
               f"no trial of it reported {metric}" + (f" ({faults} of {total} failed)" if faults else ""))
        raise RuntimeError(f"study {key}: {why}, so nothing could be selected; see the trial errors under {where}")
    pick = max if mode == "max" else min
    config, frame = pick(candidates, key=lambda c: pick(c[1][metric]))
    row = frame.loc[frame[metric].idxmax() if mode == "max" else frame[metric].idxmin()]
    test = {k: float(row[k]) for k in frame.columns if k.startswith("test_")} if spec.protocol == "seed" else {}
    return Selection(
        key=key,
        group=group,
        trial_id=str(row["trial_id"]),
        epoch=int(row["training_iteration"]),
        objective={metric: float(row[metric])},
        config=dict(config),
        test_selected=test,
        selected_at=time.time(),
    )


def _faulted(frame: pd.DataFrame) -> bool:
    """Whether a trial's last reported epoch is the result of a fault (its flag set)."""
    if frame.empty:
        return False
    last = frame.iloc[-1].to_dict()
    return faulted({k: v for k, v in last.items() if not (isinstance(v, float) and v != v)})  # NaN: not reported


def selected_line(spec: SearchSpec, selection: Selection) -> str:
    metric = spec.objective.metric
    return (f"selected trial {selection.trial_id} of {selection.key} (epoch {selection.epoch}, "
            f"{metric} {selection.objective[metric]:.4f})")


def final_stage_line(spec: SearchSpec, key: str) -> str:
    seeds = f"{spec.final_seeds} seed{'' if spec.final_seeds == 1 else 's'}"
    recipe = (f" (+ {spec.final_seeds} recipe run{'' if spec.final_seeds == 1 else 's'}: the loss's recipe with the "
              "same seeds)" if spec.recipe_runs else "")
    return (f"final stage {key}{FINAL_RUN_SUFFIX}: {seeds} on all training classes, each tested once after its last "
            f"epoch{recipe}")


def save_selection(selection: Selection, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SELECTION_FILE, asdict(selection))


def save_unselectable(key: str, reason: str, folder: Path) -> None:
    """A study where nothing could be selected (no trial reported the objective), on disk: the search is
    done with it, and the report says why."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / UNSELECTABLE_FILE, {"key": key, "reason": reason, "at": time.time()})


def load_selection(folder: Path) -> Optional[Selection]:
    """The study's saved selection, or None before it is selected (a resume does not search it again)."""
    path = folder / SELECTION_FILE
    return Selection(**read_selection(path)) if path.is_file() else None


def final_seeds(spec: SearchSpec, selection: Selection) -> list[int]:
    """seed+1 ... seed+k: fresh seeds, none equal to the one the search used."""
    base = int(selection.config["seed"])
    return [base + i for i in range(1, spec.final_seeds + 1)]


def final_param_space(selection: Selection) -> dict[str, Any]:
    return {**selection.config, "final": True}


def recipe_param_space(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe run's config (without its seed): the study's recipe config (`Study.recipe`), as a final run."""
    return {**recipe, "final": True}


def unfinished(spec: SearchSpec, keys: list[str], experiment: Path) -> list[str]:
    """What the experiment folder still lacks, per study (`keys`), read from the files alone: a selection
    (or the record that nothing could be selected), and under protocol `val` each final seed's run with its
    last epoch and its test result (under `recipe_runs`, each seed's recipe run too). [] when the search is
    done."""
    from tune_upl.results import load_experiment

    data = load_experiment(experiment)
    finals = {f.key: f for f in data.finals}
    missing = []
    for key in keys:
        if key in data.unselectable:
            continue
        final = finals.get(key)
        if final is None:
            missing.append(f"study {key} not selected")
            continue
        if spec.protocol == "seed":
            continue
        epochs = int(final.config["num_epochs"])
        seeds = final_seeds(spec, Selection(**final.selection))
        done = {int(r["seed"]) for r in final.runs if int(r.get("epochs", 0)) >= epochs}
        lacking = [seed for seed in seeds if seed not in done]
        if lacking:
            missing.append(f"study {key}: final run{'s' if len(lacking) > 1 else ''} of seed "
                           f"{', '.join(map(str, lacking))} without {epochs} epochs and a test result")
        if spec.recipe_runs:
            done = {int(r["seed"]) for r in final.recipe_runs if int(r.get("epochs", 0)) >= int(r["planned_epochs"])}
            lacking = [seed for seed in seeds if seed not in done]
            if lacking:
                missing.append(f"study {key}: recipe run{'s' if len(lacking) > 1 else ''} of seed "
                               f"{', '.join(map(str, lacking))} without all its epochs and a test result")
    return missing
