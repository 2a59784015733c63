"""The markdown report of an experiment, read offline from its folder (`results.load_experiment`).

`<reports_dir>/<name>.md` with its figures under `<reports_dir>/<name>/`: benchmark tables in the seed
README's format beside the published numbers (`references.yaml`), the loss comparison, the search
summary (states, trial-hours, baseline against selection), figures, hyper-parameter importance,
retrieval pictures, the leaderboard and the references. Works on finished, interrupted and running
experiments. The figures are written first, the markdown last and atomically (a temporary file, then
a rename), so a reader never sees half a report. A figure that cannot be drawn is named in the report
instead of failing it.
"""
from __future__ import annotations

import math
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
from tune_upl.ablation import (
    UNIFIED,
    Comparison,
    ablation_groups,
    as_published,
    compare_to_best,
    embedding_sizes,
    loss_label,
    trial_points,
)
from tune_upl.comparisons import Paired, method_gains, paired_interval
from tune_upl.facts import BACKBONES, DATASETS, LOSS_PARAMETERS, standard_recalls
from tune_upl.loss_axes import AGGREGATIONS, ANCHORS, DEFAULT_CELL, PROXY_ANCHOR_CELL
from tune_upl.importance import (
    MEANINGFUL_TRIALS, MIN_TOP_TRIALS, TARGET_QUANTILE, Importance, importances, told_study,
)
from tune_upl.references import References, load_references
from tune_upl.layout import (
    COMPLETED, DIVERGED, ERRORED, OPEN_STATES, OPTUNA_FILE, STATES, STOPPED_EARLY, WARM_START_KEY, search_command,
)
from tune_upl.results import ExperimentData, FinalResult, load_experiment
from tune_upl.storage import is_uri
from tune_upl.errors import ExperimentError

LEADERBOARD_TOP = 50  # trials per study in the markdown; every trial is in <name>/trials.csv
SEARCH_STATES = (COMPLETED, STOPPED_EARLY, DIVERGED, ERRORED)  # always shown, even at 0


def backbone_display(name: str) -> str:
    """A backbone's name in reports, from its facts; a name the facts lack (an old experiment's) as is."""
    return BACKBONES[name].display if name in BACKBONES else name


def data_display(name: str) -> str:
    """A dataset's name in reports, from its facts (or as is, like `backbone_display`)."""
    return DATASETS[name].display if name in DATASETS else name


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _mean_std(values: list[float]) -> str:
    """Percent with one decimal, as the seed's tables: `mean ± std%` (sample std) over the seeds."""
    if len(values) == 1:
        return _percent(values[0])
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}%"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _hours(hours: float) -> str:
    return f"{hours:.2f} h ({60 * hours:.1f} min)" if hours < 1 else f"{hours:.2f} h"


def _table(rows: list[dict[str, Any]], align: str = "center") -> str:
    frame = pd.DataFrame(rows).fillna("-")  # a row without a column (a k a source does not publish) shows "-"
    return frame.to_markdown(index=False, colalign=[align] * len(frame.columns), disable_numparse=True)


def _shown_path(path: Path) -> str:
    """Relative to the working directory when inside it, so committed reports carry no home folders."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _group(config: dict[str, Any]) -> tuple[str, str, str, int]:
    """Dataset, backbone, the loss as the report names it (a cell of balanced_proxy apart) and dimension."""
    return config["data_name"], config["backbone_type"], loss_label(config), int(config["feature_dim"])


def _values(final: FinalResult, name: str) -> list[float]:
    return [float(run[name]) for run in final.runs if name in run and not pd.isna(run[name])]


# ---------------------------------------------------------------- benchmark
def _tested(data: ExperimentData) -> dict[str, list[FinalResult]]:
    by_data: dict[str, list[FinalResult]] = {}
    for final in data.finals:
        if final.runs:
            by_data.setdefault(final.config["data_name"], []).append(final)
    return by_data


def resume_hint(data: ExperimentData, storage: Optional[str] = None) -> str:
    """The command that continues the experiment: its storage is the URI it was pulled from, or its folder's."""
    return search_command("search", "--resume", name=data.name, storage=storage or str(data.folder.parent))


def benchmark_tables(data: ExperimentData, refs: References, storage: Optional[str] = None) -> list[str]:
    """The seed README's format: per dataset, rows backbone × loss (with the dimension), Recall@K on the
    test classes, the published number and our difference beside each; then MAP@R and R-precision."""
    lines: list[str] = []
    tested = _tested(data)
    if not tested:
        return ["No selection has been tested yet (the search or its final stage is still running, or was "
                f"interrupted: `{resume_hint(data, storage)}`).", ""]
    for data_name, finals in sorted(tested.items()):
        ks = standard_recalls(data_name, finals[0].config.get("recalls") or ())  # each dataset's own columns
        selected = any(f.test_selected for f in finals)
        shown = data_display(data_name)
        lines += [f"### {shown}" + (f" (`{data_name}`)" if shown != data_name else ""), ""]
        recall_rows, other_rows, cited = [], [], False
        for final in finals:
            name, backbone, loss, dim = _group(final.config)
            ref = refs.find(name, backbone, loss, dim) if as_published(final.config) else None
            head = {"Backbone": backbone_display(backbone), "Loss": loss, "Dim": dim}
            row = dict(head)
            for k in ks:
                values = _values(final, f"test_recall@{k}")
                row[f"R@{k}"] = _with_reference(values, ref.recall.get(k) if ref else None)
            row["Runs"] = len(final.runs)
            if ref is not None:
                row["Published"] = f"[{refs.sources[ref.source].label}](#references)"
                cited = True
            recall_rows.append(row)
            other = dict(head)
            for label, metric in (("MAP@R", "test_map@r"), ("R-precision", "test_r_precision")):
                values = _values(final, metric)
                other[label] = _mean_std(values) if values else "-"
            other["Runs"] = len(final.runs)
            other_rows.append(other)
        backbones = {final.config["backbone_type"] for final in finals}
        for ref in refs.results:  # another method's published rows on these backbones (Hyp-ViT's, OML's), as rows
            if ref.data == data_name and ref.backbone in backbones and ref.loss not in LOSS_PARAMETERS:
                row = {"Backbone": backbone_display(ref.backbone), "Loss": f"{ref.loss} (published)", "Dim": ref.dim,
                       **{f"R@{k}": f"{ref.recall[k]:.1f}" if k in ref.recall else "-" for k in ks},
                       "Runs": "-", "Published": f"[{refs.sources[ref.source].label}](#references)"}
                recall_rows.append(row)
                cited = True
        if cited:
            for row in recall_rows:
                row.setdefault("Published", "-")
        lines += [_table(recall_rows), ""]
        how = ("test-selected: the epoch and trial were chosen on the test classes, as the seed did (the "
               "published numbers were selected the same way)." if selected else
               "Selected on the validation classes, then retrained on all training classes with each final "
               "seed and tested once after its last epoch: mean ± std over the seeds (Runs). The published "
               "numbers selected their best epoch on the test classes, which flatters them.")
        ref_note = (" In brackets: the published number for the same dataset, backbone, loss and dimension, and "
                    "our difference in points; a row marked (published) is another method's published result on "
                    "the same backbone (its protocol under References)." if cited else
                    f" No published numbers exist for `{data_name}` with these backbones, losses and dimensions "
                    "(the references cover CARS196 and CUB200-2011).")
        lines += [f"*{how}{ref_note}*", "", _table(other_rows), "",
                  "*MAP@R and R-precision (Musgrave et al., 2020) on the same test runs; the seed and the "
                  "papers published none.*", ""]
    return lines


def _with_reference(values: list[float], published: Optional[float]) -> str:
    if not values:
        return "-"
    cell = _mean_std(values)
    if published is None:
        return cell
    return f"{cell} ({published:.1f}%, {100 * statistics.mean(values) - published:+.1f})"


# ---------------------------------------------------------------- loss comparison
def _study_budget(data: ExperimentData, key: str) -> dict[str, Any]:
    mine = data.trials[data.trials["study"] == key] if not data.trials.empty else data.trials
    return {"Trials": len(mine), "Epochs run": int(mine["epochs"].sum()) if len(mine) else 0,
            "Trial-hours": f"{mine['hours'].sum():.3f}" if len(mine) else "0.000",
            f"Best {data.metric}": f"{mine['objective'].max() if data.mode == 'max' else mine['objective'].min():.4f}"
            if len(mine) and mine["objective"].notna().any() else "-"}


def loss_groups(data: ExperimentData) -> dict[tuple[str, str], dict[str, FinalResult]]:
    groups: dict[tuple[str, str], dict[str, FinalResult]] = {}
    for final in data.finals:
        if final.runs:
            name, backbone, loss, _ = _group(final.config)
            groups.setdefault((name, backbone), {})[loss] = final
    return groups


def loss_comparison(data: ExperimentData, figure: Optional[str]) -> list[str]:
    """Each loss against the others per dataset and backbone: test numbers with their spread over the
    final seeds, and the search budget that found each configuration."""
    groups = loss_groups(data)
    if not groups:
        return ["Nothing tested yet.", ""]
    lines = []
    for (name, backbone), losses in sorted(groups.items()):
        lines += [f"### {data_display(name)} / {backbone_display(backbone)}", ""]
        rows = []
        for loss, final in sorted(losses.items()):
            r1 = _values(final, "test_recall@1")
            spread = f"{100 * min(r1):.1f}–{100 * max(r1):.1f}%" if len(r1) > 1 else "-"
            maps = _values(final, "test_map@r")
            rows.append({"Loss": loss, "Dim": final.config["feature_dim"], "R@1": _mean_std(r1) if r1 else "-",
                         "R@1 range over seeds": spread, "MAP@R": _mean_std(maps) if maps else "-",
                         "Seeds": len(final.runs), **_study_budget(data, final.key)})
        lines += [_table(rows), ""]
        budgets = {(row["Trials"], data.spec["num_samples"]) for row in rows}
        if len(losses) == 1:
            lines += [f"*Only `{next(iter(losses))}` was searched for this dataset and backbone. To compare "
                      "losses on the same budget, list them under `studies` (e.g. `loss_name: [balanced_proxy, "
                      "proxy_anchor]`, as `search_spaces/upl_optuna.yaml` does): each loss then gets its own "
                      "study with the same trials, epochs and search space.*", ""]
        elif len(budgets) == 1:
            lines += [f"*Same budget: each loss had its own study of {rows[0]['Trials']} trials of up to "
                      f"{data.finals[0].config['num_epochs']} epochs over the same space.*", ""]
        else:
            lines += ["*The studies ran different numbers of trials (an unfinished search?): compare with care.*", ""]
        lines += comparison_lines(losses)
    if figure:
        lines += [f"![test Recall@1 of each final seed per loss]({figure})", ""]
    return lines


def comparison_lines(losses: dict[str, FinalResult]) -> list[str]:
    """Each loss (or cell) against the best of its dataset and backbone on test R@1, with a Welch interval
    over the final seeds: a difference inside the noise of the seeds is said to be one."""
    found = compare_to_best({label: _values(final, "test_recall@1") for label, final in sorted(losses.items())})
    if not found:
        return []
    lines = [f"Against the best test R@1 here, `{found[0].best}` (differences in points; the interval is the 95% "
             "Welch interval of the difference of the means over the final seeds, Satterthwaite's degrees of "
             "freedom):", ""]
    return lines + [f"- {_comparison_line(c)}" for c in found] + [""]


def _comparison_line(c: Comparison) -> str:
    head = f"`{c.label}` − `{c.best}`: {100 * c.difference:+.1f} ({c.seeds[0]} and {c.seeds[1]} seeds)"
    if c.interval is None:
        return head + ": one seed on a side, so no interval can be given"
    i = c.interval
    verdict = "not distinguishable at these seeds" if i.holds_zero else f"`{c.best}` is better at these seeds"
    return head + f", 95% interval [{100 * i.low:+.1f}, {100 * i.high:+.1f}] ({i.df:.1f} df): {verdict}"


# ---------------------------------------------------------------- tuning gain and method gain
def _by_seed(runs: list[dict[str, Any]], name: str = "test_recall@1") -> dict[int, float]:
    """Each run's `name` by its seed (runs without it are left out)."""
    return {int(run["seed"]): float(run[name]) for run in runs if name in run and not pd.isna(run[name])}


def gain_groups(data: ExperimentData) -> dict[tuple[str, str], dict[str, FinalResult]]:
    """Per dataset and backbone, each loss (or cell) whose selection or recipe has a tested final run."""
    groups: dict[tuple[str, str], dict[str, FinalResult]] = {}
    for final in data.finals:
        if not final.test_selected and (final.runs or final.recipe_runs):
            name, backbone, loss, _ = _group(final.config)
            groups.setdefault((name, backbone), {})[loss] = final
    return groups


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _paired_cell(found: Optional[Paired]) -> str:
    """`+1.2 [-0.3, +2.7] (3 seeds)` in points; without an interval, the difference and why."""
    if found is None:
        return "- (no shared seed)"
    if found.interval is None:
        return f"{_points(found.difference)} (1 seed: no interval)"
    i = found.interval
    return f"{_points(found.difference)} [{_points(i.low)}, {_points(i.high)}] ({found.pairs} seeds)"


def gains_section(data: ExperimentData) -> list[str]:
    """Per dataset and backbone: each loss's recipe and tuned selection on test R@1 (mean ± std over the final
    seeds), the tuning gain (selection − recipe) paired by seed, and the method gain of the loss with the best
    recipe over each other loss, at the recipes and tuned, paired by seed, with one sentence per pair."""
    groups = gain_groups(data)
    if not any(final.recipe_runs for losses in groups.values() for final in losses.values()):
        return ["No recipe run has been tested yet.", ""]
    lines = []
    for (name, backbone), losses in sorted(groups.items()):
        recipes = {loss: _by_seed(final.recipe_runs) for loss, final in sorted(losses.items())}
        tuned = {loss: _by_seed(final.runs) for loss, final in sorted(losses.items())}
        rows = [{"Loss": loss,
                 "Recipe R@1": _mean_std(list(recipes[loss].values())) if recipes[loss] else "-",
                 "Tuned R@1": _mean_std(list(tuned[loss].values())) if tuned[loss] else "-",
                 "Tuning gain (tuned − recipe)": _paired_cell(paired_interval(tuned[loss], recipes[loss])),
                 "Seeds (recipe, tuned)": f"{len(recipes[loss])}, {len(tuned[loss])}"}
                for loss in recipes]
        lines += [f"### {data_display(name)} / {backbone_display(backbone)}", "", _table(rows), ""]
        gains = method_gains(recipes, tuned)
        if gains:
            best = gains[0].best
            rows = [{"Pair": f"`{g.best}` − `{g.other}`", "At the recipes": _paired_cell(g.at_recipe),
                     "Tuned": _paired_cell(g.tuned)} for g in gains]
            lines += [f"Method gain of `{best}`, the best recipe here, over each other loss (points, 95% interval "
                      "paired by seed):", "", _table(rows), "", *[f"- {g.verdict()}" for g in gains], ""]
    return lines + ["*Test R@1, mean ± std over the final seeds. Recipe: the loss's published recipe "
                    "(`tune_upl/references.yaml`) for the fields it names, the study's fixed values and the seed's "
                    "defaults for the rest, retrained on all training classes with the same final seeds as the tuned "
                    "selection and tested once. Gains are differences in points with their 95% paired t interval "
                    "over the seeds both sides ran (n − 1 degrees of freedom; the runs of one seed share its "
                    "initialisation and batches); an interval that contains 0 means these seeds cannot tell the two "
                    "apart.*", ""]


# ---------------------------------------------------------------- the ablation of the Unified Proxy Loss
def ablation_section(data: ExperimentData, refs: References) -> list[str]:
    """Per dataset and backbone with two or more tested cells: anchor rows × aggregation columns of test R@1,
    Proxy-Anchor's corner and the default marked; a published number beside the default cell only."""
    lines = []
    for (name, backbone), cells in sorted(ablation_groups(data).items()):
        rows = []
        for anchor in ANCHORS:
            row = {"anchor / aggregation": anchor}
            for aggregation in AGGREGATIONS:
                final = cells.get((anchor, aggregation))
                row[aggregation] = _ablation_cell(final, (anchor, aggregation), refs) if final else "not run"
            rows.append(row)
        lines += [f"### {data_display(name)} / {backbone_display(backbone)}", "", _table(rows), ""]
    if not lines:
        return []
    return lines + [f"*Test R@1, mean ± std over the final seeds, of each cell's own study (same budget and space). "
                    f"**default**: `{UNIFIED}` as it is ({'/'.join(DEFAULT_CELL)}); **Proxy-Anchor**: the "
                    f"{'/'.join(PROXY_ANCHOR_CELL)} corner, the loss of Kim et al. (2020). A published number "
                    "stands beside the default cell only: the other cells are not what the papers measured.*", ""]


def _ablation_cell(final: FinalResult, which: tuple[str, str], refs: References) -> str:
    values = _values(final, "test_recall@1")
    seeds = f"{len(values)} seed{'' if len(values) == 1 else 's'}"
    text = f"{_mean_std(values)} ({seeds}, {final.config['feature_dim']}-d)" if values else "-"
    if which == PROXY_ANCHOR_CELL:
        text += " **Proxy-Anchor**"
    if which == DEFAULT_CELL:
        text += " **default**"
        ref = refs.find(final.config["data_name"], final.config["backbone_type"], UNIFIED, final.config["feature_dim"])
        if ref is not None and 1 in ref.recall:
            text += f"; published {ref.recall[1]:.1f}% ([{refs.sources[ref.source].label}](#references))"
    return text


# ---------------------------------------------------------------- embedding size
def embedding_section(data: ExperimentData, figures: Figures) -> list[str]:
    """Per study, the best validation R@1 reached at each feature_dim its trials ran with, and the trial-hours
    spent there; the figure joins the non-dominated trials (no smaller or cheaper trial reached as high)."""
    from tune_upl import figures as draw

    metric = data.metric.split("_")[0] + "_recall@1"
    points = trial_points(data, metric)
    if points.empty:
        return ["No trial has reported a result yet.", ""]
    table = embedding_sizes(points)
    rows = [{"study": f"`{r.study}`", "feature_dim": r.feature_dim, "trials": r.trials,
             f"best {metric}": f"{r.best:.4f}" + (" ◆" if r.front else ""), "trial-hours": f"{r.hours:.3f}"}
            for r in table.itertuples()]
    lines = [_table(rows), "",
             f"*Each feature_dim the trials of a study ran with: the best `{metric}` of any of them (over its "
             "epochs) and the trial-hours they took together. ◆: no smaller dimension of the study reached as "
             "high, so these are the sizes worth their index cost. An ASHA-stopped trial's best came from fewer "
             "epochs.*", ""]
    link = figures.draw("embedding_size.png", lambda p: draw.embedding_size(points, p, metric))
    if link:
        lines += [f"![{metric} against feature_dim and trial-hours]({link})", "",
                  "*Each trial's best against its feature_dim (left) and its trial-hours (right); the line joins "
                  "the non-dominated trials of each study.*", ""]
    return lines


# ---------------------------------------------------------------- search summary
def _state_counts(trials: pd.DataFrame) -> dict[str, int]:
    counts = trials["state"].value_counts().to_dict() if not trials.empty else {}
    return {state: int(counts.get(state, 0)) for state in [*STATES, *sorted(set(counts) - set(STATES))]
            if state in SEARCH_STATES or counts.get(state)}


def search_summary(data: ExperimentData) -> list[str]:
    trials = data.trials
    if trials.empty:
        return ["No trial has started yet.", ""]
    rows = []
    for study in data.studies:
        mine = trials[trials["study"] == study]
        if mine.empty:
            continue
        rows.append({"study": f"`{study}`", "trials": len(mine), **_state_counts(mine),
                     "epochs run": int(mine["epochs"].sum()), "trial-hours": f"{mine['hours'].sum():.3f}"})
    lines = ["Trials by state (*stopped early*: by ASHA, on a rung; *diverged*: a non-finite loss, stopped with "
             "the worst score):", "", _table(rows), ""]
    finals = data.final_trials
    search_hours = float(trials["hours"].sum())
    final_hours = float(finals["hours"].sum()) if not finals.empty else 0.0
    starts = pd.concat([trials["start"], finals["start"] if not finals.empty else pd.Series(dtype=float)])
    ends = pd.concat([trials["end"], finals["end"] if not finals.empty else pd.Series(dtype=float)])
    wall = (ends.max() - starts.min()) / 3600 if starts.notna().any() else math.nan
    runs = pd.concat([trials, finals], ignore_index=True) if not finals.empty else trials
    accel = _accelerator_hours(runs, data.spec["resources"])
    lines += [
        f"- search: {len(trials)} trials, {int(trials['epochs'].sum())} epochs, {_hours(search_hours)} of "
        "trial time (each trial's training and evaluation time, added up)",
        f"- final stage: {len(finals)} run{'' if len(finals) == 1 else 's'}{_recipe_count(finals)}, "
        f"{_hours(final_hours)} of trial time",
        f"- accelerator-hours: {accel}",
        f"- wall time: {_hours(wall) if not math.isnan(wall) else '-'}, from the first trial's start to the last "
        "result (including any time the experiment was stopped)",
        f"- hardware: {_hardware(data.record)}",
        "",
    ]
    return lines


def _recipe_count(finals: pd.DataFrame) -> str:
    """` (N of them recipe runs)` where the final stage ran recipes, else nothing."""
    count = int(finals["recipe"].sum()) if "recipe" in finals else 0
    return f" ({count} of them recipe run{'' if count == 1 else 's'})" if count else ""


def _accelerator_hours(runs: pd.DataFrame, resources: dict[str, Any]) -> str:
    """GPU share × hours of the runs (search and final) that trained on CUDA; a run that trained on the CPU
    counts as CPU-hours instead. A run that never said its device (an older experiment) counts by the spec."""
    gpu, cpu = float(resources["gpu"]), float(resources["cpu"])
    if gpu == 0:
        return "0 (the trials ran on CPUs)"
    device = runs["trained_on"].dropna().astype(str) if "trained_on" in runs else pd.Series(dtype=str)
    on_cpu = runs.index.isin(device[~device.str.startswith("cuda")].index)
    line = f"{gpu * float(runs.loc[~on_cpu, 'hours'].sum()):.2f} ({gpu:g} GPU per trial, on CUDA)"
    if on_cpu.any():
        count = int(on_cpu.sum())
        line += (f"; {count} run{'' if count == 1 else 's'} trained on the CPU despite the GPU share and count "
                 f"as CPU-hours instead: {cpu * float(runs.loc[on_cpu, 'hours'].sum()):.3f} ({cpu:g} CPU per trial)")
    return line


def _hardware(record: dict[str, Any]) -> str:
    if not record:
        return "not recorded"
    hw = record.get("hardware", {})
    cluster = hw.get("cluster_resources", {})
    gpus = ", ".join(hw.get("cuda_devices", [])) or "none"
    packages = record.get("packages", {})
    return (f"cluster {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs; "
            f"driver `{hw.get('driver', '?')}` with GPUs: {gpus}; torch {packages.get('torch', '?')}, "
            f"ray {packages.get('ray', '?')}")


def baseline_against_selected(data: ExperimentData) -> list[str]:
    """Per study: the baseline trial (the seed's recipe for every searched field whose range holds it)
    against the selected one, on the objective; the selection's test numbers are in the benchmark."""
    lines = []
    for final in data.finals:
        mine = data.trials[data.trials["study"] == final.key] if not data.trials.empty else data.trials
        chosen = mine[mine["trial"] == final.selection["trial_id"]]
        base = mine[mine["baseline"] == "yes"]
        rows = []
        for label, frame in (("baseline (seed's recipe)", base), ("selected", chosen)):
            if frame.empty:
                continue
            row = frame.iloc[0]
            rows.append({"": label, "trial": f"`{row['trial']}`", "state": row["state"],
                         "epochs": row["epochs"], "best epoch": row["best_epoch"],
                         data.metric: f"{row['objective']:.4f}" if not pd.isna(row["objective"]) else "-",
                         **{n: _fmt(row[n]) for n in data.searched}})
        if len(data.finals) > 1:
            lines += [f"#### `{final.key}`", ""]
        if len(rows) == 2 and rows[0]["trial"] == rows[1]["trial"]:
            rows = [{**rows[1], "": "selected = baseline"}]
        if rows:
            lines += [_table(rows, "left"), ""]
        if base.empty:
            lines += ["*No baseline trial in this study (`baseline: false`, or no searched range holds the "
                      "seed's values).*", ""]
        tested = _values(final, "test_recall@1")
        if tested:
            runs = "test-selected run" if final.test_selected else "final seed" + ("s" if len(tested) > 1 else "")
            recipe = list(_by_seed(final.recipe_runs).values())
            also = (f" The loss's recipe, retrained and tested with the same seeds: {_mean_std(recipe)} (see the "
                    "tuning gain above)." if recipe else "")
            lines += [f"*The selection's test R@1: {_mean_std(tested)} over {len(tested)} {runs}; the baseline "
                      f"was not retrained or tested (its test numbers stay unseen).{also}*", ""]
    return lines or ["No study has been selected yet.", ""]


# ---------------------------------------------------------------- warm start
def warm_started(trials: pd.DataFrame) -> pd.Series:
    """Which search trials ran a warm-start point (their config names its source: `layout.WARM_START_KEY`)."""
    if trials.empty:
        return pd.Series(dtype=bool)
    return trials["_config"].map(lambda config: bool(config.get(WARM_START_KEY)))


def warm_start_lines(data: ExperimentData) -> list[str]:
    """Per study, where its warm-start trials came from (`warm_start.json`) and which source values fell
    outside its space (dropped from the point: its sampler chose them)."""
    from tune_upl.warm_start import load  # the recorded warm starts: only for a warm-started experiment

    starts = load(data.folder)
    if not starts:
        return []
    lines = ["### Warm start", "", f"Each study ran first, after its baseline, the best completed trials (by their "
             f"best epoch's `{next(iter(starts.values())).metric}`) of a finished experiment's study of the same "
             "loss and backbone, marked *warm start* in the leaderboard; a value outside the study's space was "
             "dropped from the point and left to the sampler.", ""]
    for key, start in starts.items():
        ran = int(warm_started(data.trials[data.trials["study"] == key]).sum()) if not data.trials.empty else 0
        trials = ", ".join(f"`{t}` ({v:.4f})" for t, v in zip(start.trials, start.objectives))
        dropped = "; ".join(f"point {i + 1} (`{start.trials[i]}`): " + ", ".join(f"{n}={_fmt(v)}" for n, v in d.items())
                            for i, d in enumerate(start.dropped) if d)
        lines.append(f"- `{key}`: {len(start.points)} point{'' if len(start.points) == 1 else 's'} from `{start.source}`"
                     f", its trials {trials}; {ran} warm-start trial{'' if ran == 1 else 's'} ran; dropped: "
                     f"{dropped or 'none'}")
    return lines + [""]


# ---------------------------------------------------------------- leaderboard
def leaderboard(data: ExperimentData, csv_name: str) -> list[str]:
    if data.trials.empty:
        return ["No trial has started yet.", ""]
    lines = [f"Best epoch of each trial on the objective, best first; the top {LEADERBOARD_TOP} of each study "
             f"(all trials, with their configurations' full columns: [{csv_name}]({csv_name})). *baseline*: "
             "the trial that runs the seed's recipe for every searched field whose range contains it.", ""]
    for study in data.studies:
        mine = data.trials[data.trials["study"] == study]
        if mine.empty:
            continue
        shown = mine.head(LEADERBOARD_TOP)[["study", "baseline", "trial", "state", "epochs", "objective",
                                            *data.searched, "note"]].copy()
        if warm_started(data.trials).any():  # a column only where the experiment was warm-started
            shown.insert(2, "warm start", warm_started(mine.head(LEADERBOARD_TOP)).map({True: "yes", False: ""}))
        shown["objective"] = shown["objective"].map(lambda v: "-" if pd.isna(v) else f"{v:.4f}")
        for name in data.searched:
            shown[name] = shown[name].map(_fmt)
        shown.insert(0, "rank", range(1, len(shown) + 1))
        if not shown["note"].astype(bool).any():
            shown = shown.drop(columns=["note"])
        if len(data.studies) > 1:
            lines += [f"#### `{study}`", ""]
        align = ["right" if c in ("rank", "epochs", "objective", *data.searched) else "left" for c in shown.columns]
        shown = shown.astype(str).rename(columns={"objective": data.metric})
        lines += [shown.to_markdown(index=False, colalign=align, disable_numparse=True), ""]
        if len(mine) > LEADERBOARD_TOP:
            lines += [f"*{len(mine) - LEADERBOARD_TOP} more trials in {csv_name}.*", ""]
    return lines


# ---------------------------------------------------------------- figures, importance, retrieval
class Figures:
    """Draws each figure into the report's folder; one that fails is named in the report, not fatal."""

    def __init__(self, folder: Path, link: str):
        self.folder, self.link = folder, link
        self.failures: list[str] = []
        self.drawn: set[str] = set()

    def draw(self, file: str, draw: Callable[[Path], Any]) -> Optional[str]:
        """Run `draw(path)`; the markdown link when it drew something, else None."""
        try:
            drawn = draw(self.folder / file)
        except Exception as error:  # a report must not fail on one figure: say which one and why
            self.fail(f"{file}: {type(error).__name__}: {error}")
            return None
        if drawn is False:
            return None
        self.drawn.add(file)
        return f"{self.link}/{file}"

    def fail(self, message: str) -> None:
        print(f"warning: report: not drawn: {message}", file=sys.stderr)
        self.failures.append(message)

    def remove_stale(self) -> None:
        """PNGs of an earlier report that this one did not draw (subfolders, e.g. `retrieval/`, stay)."""
        for path in self.folder.glob("*.png"):
            if path.name not in self.drawn:
                path.unlink()


def figure_sections(data: ExperimentData, figures: Figures) -> list[str]:
    from tune_upl import figures as draw

    lines = []
    link = figures.draw("best_so_far.png", lambda p: draw.best_so_far(data, p))
    if link:
        lines += ["### Best objective so far", "", f"![best objective so far]({link})", "",
                  "*Left: the best objective after each trial, in the order the trials started (dots: each "
                  "trial's own best epoch; star: the baseline). Right: the same over wall time, every epoch's "
                  "result counted when it arrived.*", ""]
    metric = data.metric.split("_")[0] + "_recall@1"
    link = figures.draw("epoch_curves.png", lambda p: draw.epoch_curves(data, p, metric))
    if link:
        lines += [f"### `{metric}` per epoch of the top trials", "", f"![{metric} per epoch]({link})", "",
                  "*The five best trials of each study; a line that ends early is a trial ASHA stopped.*", ""]
    link = figures.draw("objective_vs_params.png", lambda p: draw.objective_vs_params(data, p))
    if link:
        lines += ["### Objective against each hyper-parameter", "", f"![objective against each searched "
                  f"hyper-parameter]({link})", "", "*Each trial's best objective; an ASHA-stopped trial's "
                  "best came from fewer epochs, so it sits lower for its budget as much as for its values.*", ""]
    return lines or ["No trial has reported a result yet.", ""]


def importance_section(data: ExperimentData, figures: Figures) -> list[str]:
    from tune_upl import figures as draw

    if not data.searched or data.trials.empty:
        return ["Nothing was searched." if not data.searched else "No trial has finished yet.", ""]
    found: list[Importance] = []
    skipped, untold = [], []
    for key in data.studies:
        if data.trials[data.trials["study"] == key].empty:
            continue
        try:
            study = told_study(data.folder / OPTUNA_FILE, key)
            result = importances(key, study, data.searched) if study is not None else None
        except Exception as error:  # an analysis beside the results must not fail the report: name it
            figures.fail(f"importance of {key}: {type(error).__name__}: {error}")
            continue
        (found.append(result) if result else (untold if study is None else skipped).append(f"`{key}`"))
    lines = ["Optuna's PED-ANOVA importance evaluator on each study's Optuna study (`optuna.db`), as the search "
             "told it: the trials that ran all their epochs are complete and are scored; ASHA-stopped trials are "
             "pruned (their value came from a smaller budget) and errored, faulted and diverged ones failed, so "
             "neither counts. Importance is how much each field's values differ between the best "
             f"{TARGET_QUANTILE:.0%} of the complete trials and all of them.", ""]
    if found:
        rows = [{"study": f"`{i.study}`", "complete trials": i.completed,
                 **{n: f"{i.values[n]:.2f}" if n in i.values else "-" for n in data.searched}} for i in found]
        lines += [_table(rows), ""]
        link = figures.draw("importance.png", lambda p: draw.importance_chart(found, p))
        if link:
            lines += [f"![hyper-parameter importance]({link})", ""]
        few = [i for i in found if not i.meaningful]
        if few:
            lines += [f"**Too few trials for these importances to mean anything**: "
                      f"{', '.join(f'`{i.study}` has {i.completed}' for i in few)} complete trials, while "
                      f"PED-ANOVA needs at least {MIN_TOP_TRIALS} in its top {TARGET_QUANTILE:.0%}, that is "
                      f"{MEANINGFUL_TRIALS} or more. Read them as a description of these few trials, not "
                      "of the search space.", ""]
    if skipped:
        lines += [f"No importance for {', '.join(skipped)}: fewer than two trials ran all their epochs, or "
                  "no searched field varied among them.", ""]
    if untold:
        lines += [f"No importance for {', '.join(untold)}: no Optuna study of it in `{OPTUNA_FILE}` (the file "
                  "is missing, or the study never started).", ""]
    return lines


def retrieval_section(data: ExperimentData, figures: Figures) -> list[str]:
    """A grid of fixed queries for the best-tested study of each dataset (the seed's test.py pictures): the
    picture the tested run drew when it ended, copied here (no model is loaded)."""
    from tune_upl.saved_models import RETRIEVAL_NUM, RETRIEVAL_QUERIES, SavedPicture, saved_picture, tail

    tested = _tested(data)
    if not tested:
        return ["No tested model yet.", ""]
    lines = []
    for data_name, finals in sorted(tested.items()):
        best = max(finals, key=lambda f: statistics.mean(_values(f, "test_recall@1") or [0.0]))
        info: dict[str, Any] = {}

        def copy(path: Path, key: str = best.key) -> bool:
            try:
                info["picture"] = saved_picture(data.folder, key)
            except ExperimentError as error:  # no picture was drawn: the section says how to make one
                info["why"] = str(error)
                return False
            shutil.copyfile(info["picture"].path, path)
            return True

        link = figures.draw(f"retrieval_{data_name}.png", copy)
        lines += [f"### {data_display(data_name)}: `{best.key}`", ""]
        if not link:
            if "why" in info:
                command = shlex.join(["python", "run_search.py", "retrieve", "--name", data.name, "--study", best.key,
                                      "--query_img_name", "IMAGE"])
                lines += [f"*No picture: {info['why']} (`{command}` embeds the test images and retrieves for any "
                          "image).*", ""]
            continue
        picture: SavedPicture = info["picture"]
        example = tail(picture.queries[0]) if picture.queries else "IMAGE"
        lines += [f"![retrieval: query and its top {RETRIEVAL_NUM}]({link})", "",
                  f"*Each row: a query from the test classes (the first image of {RETRIEVAL_QUERIES} evenly "
                  f"spaced test classes) and its {RETRIEVAL_NUM} nearest test images by cosine similarity (under "
                  "each), framed green when of the query's class, red otherwise, drawn by the run when it ended. "
                  f"Model: the {picture.source}. Any image: `" + shlex.join(
                      ["python", "run_search.py", "retrieve", "--name", data.name, "--study", best.key, "--query_img_name",
                       example, "--retrieval_num", str(RETRIEVAL_NUM)]) + "`.*", ""]
    return lines


def experiment_backbones(data: ExperimentData) -> set[str]:
    """The backbones the experiment's trials and final runs trained."""
    found = {final.config["backbone_type"] for final in data.finals}
    if not data.trials.empty:
        found |= {config.get("backbone_type") for config in data.trials["_config"] if isinstance(config, dict)}
    return {name for name in found if name}


def references_section(refs: References, backbones: Optional[set[str]] = None) -> list[str]:
    """The published rows and their sources; with `backbones`, only those backbones' rows (a ViT study is not
    set beside ResNet rows), and a line saying so."""
    if backbones is not None:
        shown = ", ".join(f"`{b}`" for b in sorted(backbones))
        refs = refs.for_backbones(backbones)
        if not refs.results:
            return [f"`tune_upl/references.yaml` has no published rows for this experiment's backbones ({shown}).",
                    ""]
    lines = ["Published Recall@K (%) from `tune_upl/references.yaml`" +
             (f", for this experiment's backbones ({shown})" if backbones is not None else "") +
             ". The protocol column says where a row's protocol differs from ours; every row without one "
             "selected its best epoch on the test classes.", ""]
    for source in refs.sources.values():
        lines.append(f"- **{source.label}**: {source.title}. {source.where}. {source.note}")
    lines.append("")
    for data_name in sorted({r.data for r in refs.results}):  # a table per dataset: each has its own Recall@K
        ks = sorted({k for r in refs.results if r.data == data_name for k in r.recall})
        rows = [{"source": refs.sources[r.source].label, "data": r.data, "backbone": r.backbone, "loss": r.loss,
                 "dim": r.dim, **{f"R@{k}": f"{r.recall[k]:.1f}" if k in r.recall else "-" for k in ks},
                 **({"protocol": r.protocol or "-"} if any(x.protocol for x in refs.results) else {})}
                for r in refs.results if r.data == data_name]
        lines += [_table(rows, "left"), ""]
    return lines


# ---------------------------------------------------------------- the whole report
def _header(data: ExperimentData, storage: Optional[str] = None) -> list[str]:
    spec = data.spec
    fixed = {**spec["fixed"], **data.overrides}  # the overrides are the command line's own options
    counts = {k: v for k, v in _state_counts(data.trials).items() if v}
    open_trials = sum(counts.get(s, 0) for s in OPEN_STATES)
    storage = storage or _shown_path(data.folder.parent)
    where = f"{storage}/{data.name}" if is_uri(storage) else _shown_path(data.folder)
    status = ("complete" if data.complete else
              f"unfinished: interrupted or still running ({open_trials} unfinished or pending "
              f"trial{'' if open_trials == 1 else 's'} in Tune's last saved state; continue with "
              f"`{resume_hint(data, storage if is_uri(storage) else None)}`)")
    return [
        f"# Search `{data.name}`",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{where}`; regenerate with "
        f"`{search_command('report', name=data.name, storage=storage if is_uri(storage) else str(data.folder.parent))}`.",
        "",
        f"- status: {status}",
        f"- searcher: {spec['searcher']['type']} (seed {spec['searcher']['seed']}), scheduler: "
        f"{spec['scheduler']['type']}, objective: `{data.metric}` ({data.mode}), protocol: {spec['protocol']}",
        f"- studies: {', '.join(f'`{s}`' for s in data.studies) or 'none yet'}; searched: "
        f"{', '.join(data.searched) or 'nothing'}",
        f"- trials: {len(data.trials)} ({', '.join(f'{v} {k}' for k, v in counts.items()) or 'none yet'})",
        f"- fixed: {', '.join(f'{k}={v}' for k, v in fixed.items()) or 'nothing'}",
        "",
    ]


def damaged_note(data: ExperimentData) -> list[str]:
    """Result files with rows that could not be read: named, so that no count or hour shrinks unseen."""
    if not data.damaged:
        return []
    return ["## Damaged files", "",
            "These trial result files have rows that cannot be read (cut short, garbled, or a metric that is not "
            "a number; a row still being written by a running trial shows here too). The tables use their other "
            "rows; a trial's epochs and hours lack the skipped ones.", "",
            *[f"- `{line}`" for line in data.damaged], ""]


def unselectable_note(data: ExperimentData) -> list[str]:
    """Studies where no trial reported the objective: the search is done with them, and says why here."""
    if not data.unselectable:
        return []
    return ["## Studies without a selection", "",
            *[f"- `{key}`: {reason} (the trials' errors are in the trial table)" for key, reason in
              data.unselectable.items()], ""]


def render(data: ExperimentData, folder: Path, storage: Optional[str] = None) -> str:
    """The markdown; figures go into `folder` (linked by its name, beside the markdown file). `storage`: the
    URI the experiment was pulled from, if it was."""
    refs = load_references()
    figures = Figures(folder, folder.name)
    if not data.trials.empty:
        data.trials.drop(columns=["_config"]).to_csv(folder / "trials.csv", index=False)
    from tune_upl import figures as draw

    groups = {k: {loss: _values(f, "test_recall@1") for loss, f in v.items()} for k, v in loss_groups(data).items()}
    loss_figure = figures.draw("loss_comparison.png", lambda p: draw.loss_comparison(groups, p, "test R@1"))
    lines = _header(data, storage) + damaged_note(data) + unselectable_note(data)
    lines += ["## Benchmark (test classes)", "", *benchmark_tables(data, refs, storage)]
    lines += ["## Loss comparison", "", *loss_comparison(data, loss_figure)]
    if data.spec.get("recipe_runs") or any(final.recipe_runs for final in data.finals):
        lines += ["## Tuning gain and method gain (recipe against tuned)", "", *gains_section(data)]
    ablation = ablation_section(data, refs)
    if ablation:
        lines += ["## Ablation of the Unified Proxy Loss (anchor × aggregation)", "", *ablation]
    lines += ["## What each embedding size buys", "", *embedding_section(data, figures)]
    lines += ["## Search summary", "", *search_summary(data), *warm_start_lines(data)]
    lines += ["### Baseline (the seed's recipe) against the selected configuration", "",
              *baseline_against_selected(data)]
    lines += ["## Figures", "", *figure_sections(data, figures)]
    lines += ["## Hyper-parameter importance", "", *importance_section(data, figures)]
    lines += ["## Retrieval", "", *retrieval_section(data, figures)]
    lines += ["## Leaderboard", "", *leaderboard(data, f"{folder.name}/trials.csv")]
    lines += ["## References", "", *references_section(refs, experiment_backbones(data))]
    figures.remove_stale()
    if figures.failures:
        lines += ["## Not drawn", "", *[f"- {failure}" for failure in figures.failures], ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(experiment: Path, reports_dir: Path, storage: Optional[str] = None) -> Path:
    """Write `<reports_dir>/<name>.md` and its figures in `<reports_dir>/<name>/` (figures first, then the
    markdown through a temporary file and a rename). `storage`: the URI `experiment` was pulled from."""
    data = load_experiment(experiment)
    folder = reports_dir / experiment.name
    folder.mkdir(parents=True, exist_ok=True)
    target = reports_dir / f"{experiment.name}.md"
    tmp = target.with_suffix(".md.tmp")
    tmp.write_text(render(data, folder, storage))
    tmp.replace(target)
    return target
