"""The report and the retrieval pictures: numbers checked against Tune's raw result files of the shared small
search (parsed here, not through the report's loader), an interrupted experiment, the published references,
and the frames of a retrieval grid whose answer is known."""
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from experiments import trial_results
from PIL import Image

from tune_upl.cli import main
from tune_upl.references import load_references
from tune_upl.report import benchmark_tables
from tune_upl.results import ExperimentData, FinalResult
from tune_upl.retrieve import GREEN, RED, TILE, Database, draw_picture, make_query, save_retrieval, search, tile_origin
from tune_upl.errors import ExperimentError

ROOT = Path(__file__).resolve().parents[1]


def cells_of(text, first):
    """The cells of every markdown table row whose first cell is `first`."""
    found = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == first:
                found.append(cells)
    return found


def mean_std(values):
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}%"


def test_report_tables_equal_the_raw_results(demo_search):
    spec, experiment, report = demo_search
    text = report.read_text()
    finals = [rows[-1] for rows in trial_results(experiment / "trials", final=True).values()]
    trials = trial_results(experiment / "trials", final=False)
    assert len(finals) == 2 and len(trials) == 3
    dim = json.loads((experiment / "main" / "selection.json").read_text())["config"]["feature_dim"]
    # benchmark: R@1..R@8, then MAP@R and R-precision, mean ± std over the final seeds
    recall, other = cells_of(text, "Tiny")
    assert recall == ["Tiny", "balanced_proxy", str(dim),
                      *[mean_std([r[f"test_recall@{k}"] for r in finals]) for k in (1, 2, 4, 8)], "2"]
    assert other == ["Tiny", "balanced_proxy", str(dim), mean_std([r["test_map@r"] for r in finals]),
                     mean_std([r["test_r_precision"] for r in finals]), "2"]
    # loss comparison: spread over the seeds and the search budget behind the selection
    r1 = [r["test_recall@1"] for r in finals]
    epochs = {tid: rows[-1]["training_iteration"] for tid, rows in trials.items()}
    hours = sum(rows[-1]["time_total_s"] for rows in trials.values()) / 3600
    best = max(r["val_recall@1"] for rows in trials.values() for r in rows)
    (loss,) = cells_of(text, "balanced_proxy")
    assert loss == ["balanced_proxy", str(dim), mean_std(r1), f"{100 * min(r1):.1f}–{100 * max(r1):.1f}%",
                    mean_std([r["test_map@r"] for r in finals]), "2", "3", str(sum(epochs.values())),
                    f"{hours:.3f}", f"{best:.4f}"]
    # search summary: states from the epochs each trial ran (no trial failed here)
    completed = sum(e == 2 for e in epochs.values())
    (summary,) = [cells for cells in cells_of(text, "`main`") if len(cells) == 8]  # not the importance row
    assert summary == ["`main`", "3", str(completed), str(3 - completed), "0", "0", str(sum(epochs.values())),
                       f"{hours:.3f}"]
    parts = [f"{n} {state}" for n, state in ((completed, "completed"), (3 - completed, "stopped early")) if n]
    assert f"- trials: 3 ({', '.join(parts)})" in text
    final_hours = sum(rows[-1]["time_total_s"] for rows in trial_results(experiment / "trials", final=True).values()) / 3600
    assert f"- final stage: 2 runs, {final_hours:.2f} h ({60 * final_hours:.1f} min)" in text
    # the baseline (seed recipe) against the selection, and the leaderboard's epochs
    selected = json.loads((experiment / "main" / "selection.json").read_text())["trial_id"]
    (chosen,) = [cells for cells in cells_of(text, "selected") + cells_of(text, "selected = baseline")]
    assert chosen[1] == f"`{selected}`"
    for tid, n in epochs.items():
        row = next(line for line in text.splitlines() if f"| {tid} " in line)
        assert [c.strip() for c in row.strip("|").split("|")][5] == str(n)


def test_report_figures_are_linked_pngs_and_importance_says_it_has_too_few_trials(demo_search):
    spec, experiment, report = demo_search
    text = report.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    names = {Path(link).name for link in links}
    assert {"best_so_far.png", "epoch_curves.png", "objective_vs_params.png", "retrieval_synthetic.png"} <= names
    for link in links:
        assert (report.parent / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    assert "## Not drawn" not in text
    # which of the two importance notes is right follows from the trials that ran all their epochs
    complete = [tid for tid, rows in trial_results(experiment / "trials", final=False).items()
                if rows[-1]["training_iteration"] == spec.fixed["num_epochs"]]
    configs = [json.loads((experiment / "trials" / tid / "params.json").read_text()) for tid in complete]
    varied = any(len({str(c.get(name)) for c in configs}) > 1 for name in spec.space)
    too_few = f"**Too few trials for these importances to mean anything**: `main` has {len(complete)} complete trials"
    no_importance = "No importance for `main`: fewer than two trials ran all their epochs"
    if len(complete) >= 2 and varied:
        assert too_few in text and no_importance not in text
    else:
        assert no_importance in text and "Too few trials" not in text
    assert len((report.parent / "demo" / "trials.csv").read_text().splitlines()) == 1 + 3


def _interrupt(experiment, target):
    """A copy of a finished experiment as a killed driver leaves one: no selection, no final stage, no
    COMPLETE, and one trial RUNNING in Tune's saved state with its second result half-written."""
    shutil.copytree(experiment, target)
    (target / "COMPLETE").unlink()
    (target / "main" / "selection.json").unlink()
    finals = {name.removesuffix(".final") for name in trial_results(target / "trials", final=True)}
    for name in finals:
        shutil.rmtree(target / "trials" / f"{name}.final")
    state_file = next((target / "trials").glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    state["trial_data"] = [e for e in state["trial_data"] if json.loads(e[0])["trial_id"] not in finals]
    entry = next(e for e in state["trial_data"]
                 if len(trial_results(target / "trials", final=False)[json.loads(e[0])["trial_id"]]) == 2)
    trial = json.loads(entry[0])
    trial["status"] = "RUNNING"
    entry[0] = json.dumps(trial)
    state_file.write_text(json.dumps(state))
    result = target / "trials" / trial["trial_id"] / "result.json"
    first, second = result.read_text().splitlines()[:2]
    result.write_text(first + "\n" + second[: len(second) // 2])
    return trial["trial_id"]


def test_report_of_an_interrupted_experiment_is_written_offline(demo_search, tmp_path):
    _, experiment, _ = demo_search
    running = _interrupt(experiment, tmp_path / "runs" / "demo")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a new process without Ray: read offline
    out = subprocess.run([sys.executable, "run_search.py", "report", "--name", "demo", "--storage",
                          str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "reports" / "demo.md").read_text()
    assert "- status: unfinished: interrupted or still running (1 unfinished or pending trial in" in text
    assert "No selection has been tested yet" in text and "## Not drawn" not in text
    row = next(line for line in text.splitlines() if f"| {running} " in line)
    assert [c.strip() for c in row.strip("|").split("|")][4:6] == ["unfinished", "1"]  # half line skipped
    assert text.count("| main ") == 3


def test_published_numbers_appear_with_their_difference():
    refs = load_references()

    def final(key, data, backbone, loss, dim, r1):
        runs = [{f"test_recall@{k}": v - 0.01 * k for k in (1, 2, 4, 8)} | {"test_recall@1": v} for v in r1]
        config = {"data_name": data, "backbone_type": backbone, "loss_name": loss, "feature_dim": dim,
                  "recalls": [1, 2, 4, 8], "num_epochs": 20}
        return FinalResult(key, {"key": key, "config": config, "test_selected": {}}, runs)

    data = ExperimentData(Path("x"), {"name": "x"}, {}, {}, True, None, None, None, [
        final("a", "car", "resnet50", "balanced_proxy", 512, [0.879, 0.885, 0.873]),
        final("b", "car", "resnet50", "balanced_proxy", 128, [0.80, 0.81]),
        final("c", "cub", "inception", "proxy_anchor", 512, [0.70, 0.69]),
    ])
    text = "\n".join(benchmark_tables(data, refs))
    ours = [0.879, 0.885, 0.873]
    cell = f"{mean_std(ours)} (88.5%, {100 * statistics.mean(ours) - 88.5:+.1f})"
    assert cell == "87.9 ± 0.6% (88.5%, -0.6)"
    car = [cells for cells in cells_of(text, "ResNet50") if len(cells) == 9]
    assert car[0][:4] == ["ResNet50", "balanced_proxy", "512", cell] and car[0][-1] == "[seed README](#references)"
    assert car[1][3] == mean_std([0.80, 0.81]) and car[1][-1] == "-"  # 128-d: nothing published to compare with
    cub = cells_of(text, "Inception")[0]
    assert cub[3] == f"{mean_std([0.70, 0.69])} (68.4%, {100 * statistics.mean([0.70, 0.69]) - 68.4:+.1f})"
    assert cub[-1] == "[Proxy-Anchor paper](#references)"


def test_reference_file_holds_every_number_of_the_seed_recipe_with_its_source():
    refs = load_references()
    assert all(r.source in refs.sources and refs.sources[r.source].where for r in refs.results)
    recipe = ROOT.parent / "shared" / "seed" / "RECIPE.md"
    if not recipe.is_file():
        pytest.skip("shared/seed/RECIPE.md is not beside this checkout")
    names = {"CARS196": "car", "CUB200": "cub", "Cars": "car", "CUB": "cub", "ResNet50": "resnet50",
             "Inception": "inception", "GoogLeNet": "googlenet", "BN-Inception": "inception"}
    found = 0
    for line in recipe.read_text().splitlines():
        source = ("seed_readme", "balanced_proxy") if line.startswith("- Seed README") else \
            ("proxy_anchor_paper", "proxy_anchor") if line.startswith("- Proxy-Anchor paper") else \
            ("proxy_anchor_code", "proxy_anchor") if line.startswith("- Proxy-Anchor official code") else None
        if source is None:
            continue
        head, _, body = line.partition(":")
        for part in body.split(";"):
            m = re.match(r"\s*(\w[\w-]*) ([\d./]+)", part.strip().rstrip("."))
            words = [w.strip(",") for w in head.split()] + [m.group(1)]
            data = next(names[w] for w in words if w in ("CARS196", "CUB200", "Cars", "CUB"))
            backbone = next(names[w] for w in reversed(words) if w in ("ResNet50", "Inception", "GoogLeNet",
                                                                       "BN-Inception"))
            ref = refs.find(data, backbone, source[1], 512)
            assert ref is not None and ref.source == source[0], line
            assert [ref.recall[k] for k in (1, 2, 4, 8)] == [float(v) for v in m.group(2).split("/")], line
            found += 1
    assert found == 10


def _known_database(tmp_path):
    """Six one-colour images; embeddings on a circle at 0, 10, 20, 40, 30 and 50 degrees."""
    colours = [(10, 10, 200), (200, 200, 0), (0, 200, 200), (90, 90, 90), (200, 0, 200), (250, 250, 250)]
    paths = []
    for i, c in enumerate(colours):
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 30), c).save(path)
        paths.append(str(path))
    angles = torch.tensor([0.0, 10, 20, 40, 30, 50]) * math.pi / 180
    embeddings = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1, 0, 2])
    return Database("main", embeddings, labels, paths, {}, tmp_path / "state.pt", "a known case"), colours


def test_retrieval_grid_frames_a_known_case(tmp_path):
    db, colours = _known_database(tmp_path)
    query = make_query(db, "images/img0.png")  # a tail of a database path
    hits = search(db, query, 4)
    assert [h.index for h in hits] == [1, 2, 4, 3] and [h.correct for h in hits] == [True, False, True, False]
    done = save_retrieval(db, query, hits, tmp_path / "out")
    sims = [math.cos(math.radians(a)) for a in (10, 20, 30, 40)]
    assert sorted(p.name for p in done.folder.glob("retrieval_img_*.png")) == \
        [f"retrieval_img_{rank}_{s:.4f}.png" for rank, s in enumerate(sims, 1)]
    grid = Image.open(done.grid).convert("RGB")
    x, y = tile_origin(0, 0)
    assert grid.getpixel((x + 1, y + 1)) == colours[0]  # the query: no frame
    for column, (hit, expected) in enumerate(zip(hits, [GREEN, RED, GREEN, RED]), 1):
        x, y = tile_origin(0, column)
        assert grid.getpixel((x + 1, y + 1)) == expected  # the frame
        assert grid.getpixel((x + TILE - 2, y + TILE // 2)) == expected
        assert grid.getpixel((x + TILE // 2, y + TILE // 2)) == colours[hit.index]  # the image inside
    first = Image.open(done.folder / f"retrieval_img_2_{sims[1]:.4f}.png").convert("RGB")
    assert first.getpixel((0, 0)) == RED and first.size == (224, 224)


def test_retrieve_command_finds_and_embeds_queries(demo_search, tmp_path, capsys):
    _, experiment, _ = demo_search
    storage = str(experiment.parent)
    first = min((experiment / "trials").glob("*.final/params.json"), key=lambda p: json.loads(p.read_text())["seed"])
    saved = torch.load(next(first.parent.glob("checkpoint_*/test_embeddings.pt")), weights_only=True)
    index = 7
    tail = "/".join(Path(saved["paths"][index]).parts[-3:])
    out = tmp_path / "out"
    assert main(["retrieve", "--storage", storage, "--query_img_name", tail, "--retrieval_num", "5",
                 "--output", str(out)]) == 0
    # the expected hits, computed here from the saved database
    e = torch.nn.functional.normalize(saved["embeddings"], dim=-1)
    sims = e @ e[index]
    sims[index] = -math.inf
    top = sims.topk(5)
    folder = out / Path(saved["paths"][index]).stem
    for rank, (s, i) in enumerate(zip(top.values, top.indices), 1):
        picture = Image.open(folder / f"retrieval_img_{rank}_{float(s):.4f}.png").convert("RGB")
        assert picture.getpixel((0, 0)) == (GREEN if saved["labels"][i] == saved["labels"][index] else RED)
    assert f"{sum(int(saved['labels'][i] == saved['labels'][index]) for i in top.indices)} of 5" in \
        capsys.readouterr().out
    # an image outside the database is embedded by the model first: its own original comes back first
    copy = tmp_path / "copy.jpg"
    shutil.copy(saved["paths"][index], copy)
    assert main(["retrieve", "--storage", storage, "--query_img_name", str(copy), "--output", str(out)]) == 0
    best = sorted((out / "copy").glob("retrieval_img_1_*.png"))[0]
    assert float(best.stem.rsplit("_", 1)[1]) > 0.999
    assert "the query's class is unknown" in capsys.readouterr().out
    # an unknown experiment or image: one line, exit code 2
    assert main(["retrieve", "--storage", storage, "--name", "nope", "--query_img_name", tail]) == 2
    assert main(["retrieve", "--storage", storage, "--query_img_name", "no/such.jpg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: no experiment 'nope'") and err[1].startswith("error: --query_img_name no/such")


def test_loss_comparison_puts_losses_side_by_side_on_the_same_budget():
    import pandas as pd

    from tune_upl.report import loss_comparison

    def final(key, loss, r1):
        config = {"data_name": "cub", "backbone_type": "resnet50", "loss_name": loss, "feature_dim": 256,
                  "recalls": [1, 2, 4, 8], "num_epochs": 20}
        return FinalResult(key, {"key": key, "config": config, "test_selected": {}},
                           [{"test_recall@1": v, "test_map@r": v / 3} for v in r1])

    trials = pd.DataFrame([{"study": s, "epochs": e, "hours": 0.5, "objective": o}
                           for s, e, o in (("bp", 20, 0.71), ("bp", 4, 0.5), ("pa", 20, 0.69), ("pa", 8, 0.6))])
    data = ExperimentData(Path("x"), {"name": "x", "num_samples": 2, "objective": {"metric": "val_recall@1",
                                                                                   "mode": "max"}},
                          {}, {}, True, trials, None, None,
                          [final("bp", "balanced_proxy", [0.70, 0.72, 0.71]),
                           final("pa", "proxy_anchor", [0.69, 0.70])])
    text = "\n".join(loss_comparison(data, "x/loss_comparison.png"))
    assert cells_of(text, "balanced_proxy") == [["balanced_proxy", "256", "71.0 ± 1.0%", "70.0–72.0%", "23.7 ± 0.3%",
                                                 "3", "2", "24", "1.000", "0.7100"]]
    assert cells_of(text, "proxy_anchor")[0][2:4] == ["69.5 ± 0.7%", "69.0–70.0%"]
    assert "Same budget: each loss had its own study of 2 trials of up to 20 epochs" in text
    assert "![test Recall@1 of each final seed per loss](x/loss_comparison.png)" in text


def test_the_test_selected_epoch_checkpoint_is_found_or_named_missing(tmp_path):
    """Protocol seed: the retrieval tool embeds with the checkpoint of the selected trial's selected epoch."""
    from tune_upl.saved_models import selected_checkpoint as _selected_checkpoint
    from tune_upl.layout import CHECKPOINT_FILE

    trial = tmp_path / "trials" / "abc_00001"
    (trial / "checkpoint_000002").mkdir(parents=True)
    (trial / "checkpoint_000002" / CHECKPOINT_FILE).write_bytes(b"state")
    (trial / "params.json").write_text("{}")
    rows = [{"training_iteration": e, "checkpoint_dir_name": f"checkpoint_{e - 1:06d}"} for e in (1, 2, 3)]
    (trial / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    selection = {"trial_id": "abc_00001", "epoch": 3}
    assert _selected_checkpoint(tmp_path, selection) == trial / "checkpoint_000002"
    with pytest.raises(ExperimentError, match="the checkpoint of trial abc_00001 at epoch 2 is gone"):
        _selected_checkpoint(tmp_path, {**selection, "epoch": 2})


def test_a_run_draws_the_reports_picture_of_fixed_queries(tmp_path):
    """The picture a run saves when it ends: a row per fixed query (the first image of evenly spaced test
    classes), its nearest images framed by class; images gone from disk come from the prepared records."""
    db, colours = _known_database(tmp_path)
    queries = draw_picture(db, tmp_path / "retrieval.png", queries=3, k=2)
    assert queries == [db.paths[0], db.paths[2], db.paths[5]]  # the first image of classes 0, 1 and 2
    picture = Image.open(tmp_path / "retrieval.png").convert("RGB")
    # per row the two nearest (either order where they tie: 10 and 30 degrees are as near to 20) and their frame
    expected = {0: ([{1}, {2}], [GREEN, RED]), 1: ([{1, 4}, {1, 4}], [RED, RED]), 2: ([{3}, {4}], [RED, RED])}
    for row, (hits, frames) in expected.items():
        x, y = tile_origin(row, 0)
        assert picture.getpixel((x + TILE // 2, y + TILE // 2)) == colours[[0, 2, 5][row]]
        for column, (indices, frame) in enumerate(zip(hits, frames), 1):
            x, y = tile_origin(row, column)
            assert picture.getpixel((x + 1, y + 1)) == frame
            assert picture.getpixel((x + TILE // 2, y + TILE // 2)) in [colours[i] for i in indices]
    assert picture.size == (tile_origin(0, 2)[0] + TILE + 8, tile_origin(2, 0)[1] + TILE + 20 + 8)
    Path(db.paths[1]).unlink()
    with pytest.raises(FileNotFoundError, match="img1.png is gone and not in the prepared cache"):
        draw_picture(db, tmp_path / "again.png", queries=1, k=1)


def test_the_saved_picture_of_a_test_selected_trial_is_found_or_named_missing(tmp_path):
    """Protocol seed: the picture is the one the selected trial drew into its selected epoch's checkpoint."""
    from tune_upl.layout import CHECKPOINT_FILE, SELECTION_FILE, SPEC_FILE
    from tune_upl.saved_models import RETRIEVAL_PICTURE, RETRIEVAL_QUERIES_FILE, saved_picture

    experiment = tmp_path / "x"
    (experiment / "main").mkdir(parents=True)
    (experiment / SPEC_FILE).write_text("{}")
    selection = {"key": "main", "group": {}, "trial_id": "abc_00001", "epoch": 2, "objective": {"test_recall@1": 0.5},
                 "config": {"seed": 1}, "test_selected": {"test_recall@1": 0.5}, "selected_at": 0.0}
    (experiment / "main" / SELECTION_FILE).write_text(json.dumps(selection))
    trial = experiment / "trials" / "abc_00001"
    (trial / "checkpoint_000001").mkdir(parents=True)
    (trial / "checkpoint_000001" / CHECKPOINT_FILE).write_bytes(b"state")
    (trial / "params.json").write_text("{}")
    rows = [{"training_iteration": e, "checkpoint_dir_name": f"checkpoint_{e - 1:06d}"} for e in (1, 2)]
    (trial / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ExperimentError, match="^the trial abc_00001 at its test-selected epoch 2 of study main drew no "
                                              "retrieval picture$"):
        saved_picture(experiment, "main")
    (trial / "checkpoint_000001" / RETRIEVAL_PICTURE).write_bytes(b"png")
    (trial / "checkpoint_000001" / RETRIEVAL_QUERIES_FILE).write_text(json.dumps({"queries": ["/d/a/b/c.jpg"]}))
    found = saved_picture(experiment, "main")
    assert (found.path, found.queries) == (trial / "checkpoint_000001" / RETRIEVAL_PICTURE, ["/d/a/b/c.jpg"])


def _checkpointed_files(run):
    """The files of each checkpoint the loop saves while it trains `run` to its last epoch."""
    from tune_upl.loop import TrialHooks, _epochs

    saved = {}

    def report(result, folder):
        if folder is not None:
            saved[result["epoch"]] = {p.name: p.read_bytes() for p in folder.iterdir()}

    _epochs(run, TrialHooks(report=report))
    return saved


def test_a_final_run_saves_its_retrieval_picture_with_its_last_checkpoint(tiny_values, small_run):
    from tune_upl.config import make_config
    from tune_upl.saved_models import RETRIEVAL_PICTURE, RETRIEVAL_QUERIES_FILE

    run = small_run(make_config(tiny_values, final=True, num_epochs=2, checkpoint_every=1, feature_dim=16,
                                image_size=32, batch_size=16), train_batches=1)
    saved = _checkpointed_files(run)
    assert RETRIEVAL_PICTURE not in saved[1] and "test_embeddings.pt" not in saved[1]  # tested after the last only
    last = saved[2]
    queries = json.loads(last[RETRIEVAL_QUERIES_FILE])["queries"]
    classes = sorted({r.class_id for r in run.eval_loader.dataset.records})
    firsts = {next(str(r.path) for r in run.eval_loader.dataset.records if r.class_id == c) for c in classes}
    assert len(queries) == 3 and set(queries) <= firsts and queries == sorted(queries, key=run.test_database["paths"].index)
    picture = Image.open(io.BytesIO(last[RETRIEVAL_PICTURE]))
    assert picture.size == (tile_origin(0, 8)[0] + TILE + 8, tile_origin(2, 0)[1] + TILE + 20 + 8)  # 3 rows of 1 + 8


def test_a_test_selected_trial_saves_the_picture_of_each_improving_epoch(tiny_values, small_run):
    from tune_upl.config import make_config
    from tune_upl.saved_models import RETRIEVAL_PICTURE

    run = small_run(make_config(tiny_values, protocol="seed", num_epochs=1, feature_dim=16, image_size=32,
                                batch_size=16), train_batches=1)
    assert RETRIEVAL_PICTURE in _checkpointed_files(run)[1]  # the first epoch improves on nothing before it
