"""The benchmark suites (`python -m benchmarks`): every CPU suite runs quickly and writes its report;
the eval suite's three implementations agree; the exact top-k equals a stable sort."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from experiments import ROOT

from benchmarks import harness, knn_peer, search
from tune_upl.metrics import top_depth
from tune_upl.neighbours import cells

HEAVY = ("ray", "optuna", "pydantic", "adamp")


@pytest.mark.parametrize("depth", [1, 3, 7, 20, 39])
def test_top_depth_equals_stable_sort_with_ties(depth):
    gen = torch.Generator().manual_seed(depth)
    sims = torch.randint(0, 5, (30, 40), generator=gen).float()  # many exact ties, at every depth
    sims[:3] = 1.0  # rows tied everywhere
    sims[3, 5] = float("-inf")
    expected = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth]
    assert torch.equal(top_depth(sims, depth), expected)
    noise = torch.rand(30, 40, generator=gen)  # real-valued: ties only within one rounding cell
    expected = torch.sort(cells(noise), dim=1, descending=True, stable=True).indices[:, :depth]
    assert torch.equal(top_depth(noise, depth), expected)


def test_cpu_suites_quick(tmp_path):
    out = tmp_path / "perf.md"
    argv = ["--suite", ",".join(harness.CPU_SUITES), "--quick", "--out", str(out), "--device", "cpu", "--images", "16",
            "--trial_cpus", "2"]
    results = {s.name: s for s in harness.run(argv)}
    assert set(results) == set(harness.CPU_SUITES)
    evaluation = results["eval"]
    assert evaluation.details["equal"] and all(evaluation.details["equal"])
    for n, found in evaluation.details.items():
        if n != "equal":
            assert found["current"] == found["naive"] == found["previous"]
    peer = [row for row in evaluation.rows if "faiss" in row.measure]
    assert len(peer) == 4 and peer[0].baseline_value > 0  # two sizes: time against the flat index, equal scores
    assert "top-1 neighbour equal for 3,000 of 3,000" in peer[3].note
    data = {row.measure: row.value for row in results["data"].rows}
    assert all(value > 0 for value in data.values())
    loader = data["make_loader, 1 worker (a trial of resources.cpu 2)"]  # the trial's own loader, uint8 batches
    assert loader > 0 and "uint8" in results["data"].rows[-1].note
    train = results["train"].rows[0]
    assert train.value > 0 and train.baseline_value > 0
    save = next(row for row in results["train"].rows if row.measure.startswith("engine.save_state, resnet50"))
    assert 0 < save.baseline_value < save.value and "MB against" in save.note  # AdamP's state: ~3x the weights
    assert re.search(r"; \d+\.\d\d% of a resnet50 epoch of CUB under protocol val \(\d+ s: 4690 images", save.note)
    text = out.read_text()
    for needle in ("# Performance", "command: python -m benchmarks", "cpu:", "gpu:", "torch ", "| eval |",
                   "| train |", "| data |", "need `--device cuda`"):
        assert needle in text


def test_knn_peer_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    faiss, line = knn_peer.load()
    assert faiss is None and "faiss is not installed" in line and "\n" not in line


def test_knn_peer_neighbours_drop_the_query_wherever_it_is():
    found = numpy.array([[0, 4, 2], [3, 1, 0], [1, 3, 0]])  # query 1 ranked second (a tie); query 2 absent
    assert knn_peer.without_self(found, 2).tolist() == [[4, 2], [3, 0], [1, 3]]


def test_light_suites_import_no_search_libraries(tmp_path):
    """The eval suite (and the module itself) runs where Ray, Optuna, pydantic, adamp are absent."""
    code = (
        "import sys\n"
        "from benchmarks import harness\n"
        f"harness.run(['--suite', 'eval', '--quick', '--device', 'cpu', '--out', {str(tmp_path / 'p.md')!r}])\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120,
                   cwd=Path(__file__).resolve().parents[1])


def test_unknown_suite_is_refused():
    with pytest.raises(SystemExit):
        harness.parse_args(["--suite", "nope"])


@pytest.mark.slow
def test_overhead_suite(ray_session, tmp_path, cache_dir, synthetic_root):
    argv = ["--suite", "overhead", "--quick", "--out", str(tmp_path / "o.md"), "--cache_dir", cache_dir]
    (result,) = harness.run(argv)
    tuned, fixed, tuned_reused, fixed_reused = result.rows
    assert tuned.value > 0 and tuned.baseline_value > 0 and tuned_reused.value > 0
    assert "errors: 0" in fixed_reused.note
    # reuse means one worker process for all 3 trials (it skips each start-up, ~4 s a trial here when quiet);
    # counted, not timed: the two timings are taken apart, and a busy machine can reorder them
    assert "worker processes: 1" in fixed_reused.note and "worker processes: 3" in fixed.note


def test_search_suite_replays_the_committed_grid(ray_session, tmp_path):
    """Real Tune + Optuna TPE + ASHA searches against the committed grid: every trial replays a recorded
    curve, ASHA stops some, and the epochs spent are counted until the grid's best is (nearly) reached."""
    curves = search.load_grid(Path(harness.DEFAULT_GRID))
    assert len(curves) == 24 and all(len(c) == search.SEARCH_EPOCHS for c in curves.values())
    (result,) = harness.run(["--suite", "search", "--quick", "--out", str(tmp_path / "s.md")])
    spent, best = result.details["spent"], result.details["best"]
    assert best == max(max(c) for c in curves.values())
    assert len(spent) == 2 and all(s is None or 1 <= s <= 24 * search.SEARCH_EPOCHS for s in spent)
    assert all(r <= best for r in result.details["reached"])
    epochs_per_search = result.details["epochs"]
    assert all(e < 24 * search.SEARCH_EPOCHS for e in epochs_per_search)  # ASHA stopped trials early
    searched, shuffled, gap = result.rows
    assert searched.baseline_value == 144 and 0 < shuffled.value <= 144 and gap.value > 0.05


def test_epochs_to_reach_counts_in_trial_order():
    assert search.epochs_to_reach([[0.1, 0.2], [0.5], [0.9, 0.95]], 0.9) == 4
    assert search.epochs_to_reach([[0.1, 0.2], [0.5]], 0.9) is None


@pytest.mark.slow
@pytest.mark.ray
def test_cluster_suite_runs_the_studies_both_ways_on_its_own_ray(tmp_path):
    """The quick cluster suite in its own process (it starts a Ray declaring 16 CPUs and 8 GPUs): the same
    trials one study after another and all at once, each way's wall time and busy slot-seconds reported."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--suite", "cluster", "--quick", "--out",
                          str(tmp_path / "c.md")], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1: a target missed, as it is at the quick size
    text = (tmp_path / "c.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| cluster |")]
    assert len(rows) == 2 and "GPU-slot utilisation" in rows[0] and "wall time" in rows[1]
    ways = re.findall(r"- cluster: (one after another|all at once): (\d+) trials, \d+ epochs, (\d+) busy slot-s in "
                      r"(\d+) s, the first trial started (\d+) s after the start", text)
    assert [(w[0], w[1]) for w in ways] == [("one after another", "6"), ("all at once", "6")]
    assert all(0 < int(first) < int(wall) for _, _, _, wall, first in ways)
