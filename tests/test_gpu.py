"""Trials use the GPU Ray gave them or fail at once saying so; a packed trial is capped at its share of GPU
memory less its process's overhead; any failure while a GPU trial starts ends it, not retried; out of memory
anywhere ends only its trial; one node must hold a trial's CPUs and GPU together.

The GPU is proven on this CPU machine by a CUDA stand-in beneath torch (`fake_cuda`: torch's own checks run),
and by a Ray that declares a fake GPU (its trials' torch sees no CUDA)."""
import json
import os
import socket

import pytest
import torch
from experiments import cli, on_cluster, result_rows
from fake_cuda import GIB, fake_cuda

from tune_upl.config import make_config
from tune_upl.data import ImageDataset, eval_transform, load_records, make_loader
from tune_upl.engine import claim_gpu, resolve_amp, resolve_device, train_epoch
from tune_upl.gpu_memory import PROCESS_OVERHEAD_BYTES
from tune_upl.errors import DatasetError, OutOfMemory
from tune_upl.layout import ERRORED, trial_state
from tune_upl.loop import TrialHooks, run_trial


def test_a_trial_given_a_gpu_it_cannot_see_fails_naming_the_node():
    from tune_upl.errors import NoGPU

    with fake_cuda(visible_devices="3", physical=2):  # Ray's choice, on a node whose torch sees 2 GPUs: none visible
        for name in ("auto", "cuda", "cuda:1"):
            with pytest.raises(NoGPU, match=rf"Ray gave this trial 0.5 GPU but torch on node {socket.gethostname()} "
                                            r"sees no CUDA device \(CUDA_VISIBLE_DEVICES='3'"):
                resolve_device(name, gpu_share=0.5)
        assert resolve_device("cpu", gpu_share=0.5) == torch.device("cpu")  # asked for explicitly: honoured
        assert resolve_device("auto", gpu_share=0) == torch.device("cpu")  # outside Ray (the train command)


def test_the_cuda_stand_in_runs_torchs_own_checks_and_leaves_torch_as_it_found_it():
    before = (torch.cuda.is_available(), torch.cuda.is_initialized(), torch.cuda.device_count(),
              os.environ.get("CUDA_VISIBLE_DEVICES"))
    with fake_cuda(visible_devices="0,1", physical=4) as gpu:
        assert torch.cuda.device_count() == 2 and torch.cuda.get_device_properties(1).major == 9
        with pytest.raises(RuntimeError, match=r"invalid device ordinal \(device 3 of 2 visible\)"):
            torch.cuda.set_per_process_memory_fraction(0.5, 3)
        with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):  # torch's check
            torch.cuda.set_per_process_memory_fraction(0.5, torch.device("cuda"))
        torch.cuda.set_per_process_memory_fraction(0.5, torch.device("cuda", 1))
        assert gpu.calls == [("init",), ("setMemoryFraction", 0.5, 1)]
    assert (torch.cuda.is_available(), torch.cuda.is_initialized(), torch.cuda.device_count(),
            os.environ.get("CUDA_VISIBLE_DEVICES")) == before


def test_the_device_always_carries_the_index_torch_can_use():
    """Ray makes the trial's GPU the only visible one: `auto` and `cuda` are its index 0, and an index past
    what torch sees is refused in one line naming what is allowed."""
    with fake_cuda(visible_devices="3", physical=4):
        assert resolve_device("auto", gpu_share=0.5) == resolve_device("cuda", 1) == torch.device("cuda", 0)
        assert resolve_device("cuda:0", gpu_share=1) == torch.device("cuda", 0)
        with pytest.raises(RuntimeError, match=r"device 'cuda:1': torch sees 1 CUDA device\(s\) here "
                                               r"\(CUDA_VISIBLE_DEVICES='3'\); allowed: auto, cuda or cuda:0 to cuda:0"):
            resolve_device("cuda:1", gpu_share=1)
    with fake_cuda(physical=2):
        assert resolve_device("cuda:1") == torch.device("cuda", 1)  # the train command on a 2-GPU machine


@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_a_trial_starts_on_its_gpu_at_each_share_capped_at_its_share_less_the_overhead(
        share, tiny_values):
    """The start of a trial as a Ray worker runs it (one visible GPU, the node's fourth): device, memory cap,
    peak-memory reset, precision and loader settings, through torch's own checks. `1 / share` such trials,
    each with its process's overhead, fit the card."""
    total = 80 * GIB
    with fake_cuda(visible_devices="3", physical=4, total_memory=total) as gpu:
        cfg = make_config(tiny_values, num_workers=2, num_threads=3)
        device = resolve_device(cfg.device, share)
        cap = claim_gpu(device, share)
        assert device == torch.device("cuda", 0)
        assert gpu.named("resetPeakMemoryStats") == [("resetPeakMemoryStats", 0)]
        if share == 1:
            assert cap is None and gpu.named("setMemoryFraction") == []  # a whole GPU: no neighbour to protect
        else:
            assert gpu.named("setMemoryFraction") == [("setMemoryFraction", cap, 0)]
            assert cap == pytest.approx(share * 0.99 - 1 / 80) and cap * total <= share * total - PROCESS_OVERHEAD_BYTES
            assert round(1 / share) * (cap * total + PROCESS_OVERHEAD_BYTES) <= 0.99 * total  # 1% left to the driver
        assert resolve_amp(cfg.amp, device) == torch.bfloat16  # a Hopper has native bf16
        loader = make_loader(ImageDataset(load_records(cfg)[:8], eval_transform(32)), cfg, train=True)
        assert loader.pin_memory and loader.num_workers == 2


def test_a_share_too_small_for_the_process_overhead_is_refused_with_the_figures():
    from tune_upl.gpu_memory import memory_cap

    assert memory_cap(0.25, 16 * GIB) == pytest.approx(0.25 * 0.99 - 1 / 16)
    with pytest.raises(ValueError, match=r"resources.gpu 0.05 of a 16.0 GiB GPU is 0.80 GiB, which leaves no memory "
                                         r"for training after the process's 1 GiB outside torch's allocator"):
        memory_cap(0.05, 16 * GIB)


@pytest.mark.filterwarnings("ignore:0 loader workers")
def test_any_failure_while_a_gpu_trial_starts_ends_it_as_errored_with_its_first_line(tiny_values):
    """Under the stand-in the trial claims its share, then fails where it first puts the model on the GPU
    (torch finds no driver): one last result with the flag and the error's first line, never raised (so never
    retried). The same failure in a CPU trial is raised, for Tune to retry."""
    reports = []
    hooks = TrialHooks(report=lambda result, folder: reports.append((result, folder)), node="n7")
    cfg = make_config(tiny_values, feature_dim=16)
    with fake_cuda(visible_devices="1", physical=2, total_memory=40 * GIB) as gpu:
        run_trial(cfg, 0.5, hooks)
        assert gpu.named("setMemoryFraction") == [("setMemoryFraction", pytest.approx(0.5 * 0.99 - 1 / 40), 0)]
    [(result, folder)] = reports
    assert folder is None and result["gpu_start_failed"] is True and result["val_recall@1"] == 0.0
    assert result["error"].startswith("the trial's start on its GPU failed (Ray node n7, CUDA_VISIBLE_DEVICES='1'): "
                                      "RuntimeError: Found no NVIDIA driver on your system.")
    assert "\n" not in result["error"]
    assert trial_state("TERMINATED", result, 20) == ERRORED
    with pytest.raises(DatasetError, match="synthetic is not prepared"):  # a CPU trial's: left to Tune's retries
        run_trial(cfg.replace(dataset_seed=99), 0.0, hooks)
    assert len(reports) == 1


@pytest.mark.parametrize("error, expected", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("a training step failed"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_is_recognised_in_each_form_torch_raises_it(error, expected):
    from tune_upl.engine import is_out_of_memory

    assert is_out_of_memory(error) is expected


def test_a_cudnn_allocation_failure_in_training_is_out_of_memory(tiny_values, small_run):
    run = small_run(make_config(tiny_values, num_epochs=1, feature_dim=16, batch_size=32))

    def failing(images):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")

    run.forward = failing
    with pytest.raises(OutOfMemory, match=r"out of memory with batch_size 32, backbone tiny, image_size 64 on cpu: "
                                          r".*\(cuDNN error: CUDNN_STATUS_ALLOC_FAILED\)"):
        train_epoch(run)


def test_out_of_memory_anywhere_in_a_trial_ends_it_and_other_errors_are_retried(tiny_values):
    from tune_upl.errors import NoGPU, WeightsMissing
    from tune_upl.loop import stop_result

    cfg = make_config(tiny_values, feature_dim=16, batch_size=32)
    evaluation = stop_result(cfg, None, RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"), "n1")  # e.g. in `.to(device)`
    assert evaluation["oom"] is True and evaluation["val_recall@1"] == 0.0 and evaluation["epoch"] == 1
    assert evaluation["error"].startswith("out of memory with batch_size 32, backbone tiny, image_size 64")
    no_gpu = stop_result(cfg, None, NoGPU("Ray gave this trial 1 GPU but ..."), "n1")
    assert no_gpu["no_gpu"] is True and no_gpu["error"] == "Ray gave this trial 1 GPU but ... (Ray node n1)"
    no_file = stop_result(cfg, None, WeightsMissing([("resnet50", "/w/resnet50-0676ba61.pth", "https://x")]), "n2")
    assert no_file["no_weights"] is True and no_file["val_recall@1"] == 0.0 and "(Ray node n2)" in no_file["error"]
    assert stop_result(cfg, None, RuntimeError("a training step failed"), "n1") is None


def test_more_than_one_gpu_per_trial_is_refused_on_the_command_line(tmp_path):
    out = cli("search", "--gpus-per-trial", "2", "--dry-run", "--storage", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "resources.gpu = 2.0: one GPU per trial at most" in out.stderr


@pytest.fixture(scope="module")
def gpu_search(ray_session, cache_dir, synthetic_root, tmp_path_factory):
    """Two trials that Ray each gives half of the session's fake GPU: `device: auto` (must fail: its torch
    sees no CUDA) and `device: cpu` (trains, and is counted as CPU time), with retries allowed; without the
    node probe (`Options.check_nodes`), which would refuse the start (`test_probe.py`)."""
    from tune_upl.experiment import Options, run_search
    from tune_upl.report import write_report
    from tune_upl.spec import parse_spec

    spec = parse_spec({
        "name": "gpuslot", "searcher": {"type": "grid"}, "scheduler": {"type": "fifo"}, "num_samples": 1,
        "max_concurrent": 2, "max_failures": 2, "baseline": False, "final_seeds": 1,
        "resources": {"cpu": 1, "gpu": 0.5},
        "fixed": {"data_name": "synthetic", "backbone_type": "tiny", "image_size": 16, "num_epochs": 1,
                  "warm_up": 0, "feature_dim": 16, "num_workers": 0},
        "space": {"device": {"choice": ["auto", "cpu"]}},
    })
    # the node probe would refuse this start (the fake GPU is one torch cannot see): what is proven here is the
    # trial's own check, for a node that joins after the start (--autoscaling) or a probe skipped
    experiment = run_search(spec, {"cache_dir": cache_dir}, Options(storage=tmp_path_factory.mktemp("runs"),
                                                                     check_nodes=False))
    trials = {json.loads((p.parent / "params.json").read_text())["device"]: (p.parent, result_rows(p))
              for p in (experiment / "trials").glob("*/result.json") if not p.parent.name.endswith(".final")}
    return experiment, trials, write_report(experiment, tmp_path_factory.mktemp("reports")).read_text()


def test_a_trial_given_a_gpu_without_cuda_ends_at_once_as_errored_not_retried(gpu_search):
    experiment, trials, report = gpu_search
    folder, rows = trials["auto"]
    assert len(rows) == 1 and rows[0]["no_gpu"] is True and rows[0]["val_recall@1"] == 0.0
    assert "sees no CUDA device (CUDA_VISIBLE_DEVICES=" in rows[0]["error"]
    assert f"Ray node {rows[0]['node_id']}" in rows[0]["error"] and socket.gethostname() in rows[0]["error"]
    assert not list(folder.glob("error*"))  # never raised, so never retried (max_failures 2)
    line = next(line for line in report.splitlines() if f"| {folder.name} " in line)
    assert "| errored " in line and "sees no CUDA device" in line


def test_a_cpu_trial_with_a_gpu_share_trains_and_counts_as_cpu_hours(gpu_search):
    experiment, trials, report = gpu_search
    folder, rows = trials["cpu"]
    assert [r["device"] for r in rows] == ["cpu"] and rows[-1]["val_recall@1"] > 0
    final = [result_rows(p) for p in (experiment / "trials").glob("*.final/result.json")]
    assert [rows[-1]["device"] for rows in final] == ["cpu"]
    hours = sum(r[-1]["time_total_s"] for r in [rows, *final]) / 3600
    expected = (f"- accelerator-hours: 0.00 (0.5 GPU per trial, on CUDA); 2 runs trained on the CPU despite the "
                f"GPU share and count as CPU-hours instead: {hours:.3f} (1 CPU per trial)")
    assert expected in report


CHECK = r'''
import json
from tune_upl.errors import SpecError
from tune_upl.search import check_resources
from tune_upl.spec import parse_spec

found = {}
for cpu in (3, 2):
    try:
        found[cpu] = check_resources(parse_spec({"name": "x", "resources": {"cpu": cpu, "gpu": 1}})).resources.gpu
    except SpecError as error:
        found[cpu] = str(error)
print(json.dumps(found))
'''


@pytest.mark.slow  # ~10 s for two Ray nodes; the rule itself is tested in milliseconds on node lists (test_search.py)
@pytest.mark.ray
def test_a_real_two_node_cluster_refuses_a_trial_no_one_node_holds():
    out = on_cluster(CHECK, {"num_cpus": 4, "num_gpus": 0}, {"num_cpus": 2, "num_gpus": 1}, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["2"] == 1  # the GPU node holds 2 CPUs and its GPU
    assert found["3"].startswith("resources = 3 CPU + 1 GPU per trial: no node of this Ray cluster holds that")
    assert "1 × 4 CPU + 0 GPU" in found["3"] and "1 × 2 CPU + 1 GPU" in found["3"]

