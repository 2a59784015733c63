"""The probe of every node before the first trial (`tune_upl.probe`): what one node finds (the storage token, the
files trials read, its GPUs and their free memory, under the CUDA stand-in), the table of problems, and a start
on this machine's Ray refused before anything is written. Several nodes: `test_probe_cluster.py` (slow)."""
from __future__ import annotations

import pytest
from fake_cuda import GIB, fake_cuda

from tune_upl.errors import ExperimentError
from tune_upl.probe import FileNeed, Finding, Needs, Node, look, problem_table


def _needs(tmp_path, token_text: str = "abc", gpu: float = 0.0) -> Needs:
    (tmp_path / "runs").mkdir(exist_ok=True)
    token = tmp_path / "runs" / ".demo.probe-abc"
    token.write_text("abc")
    cache = tmp_path / "pixels.u8"
    cache.write_bytes(b"x" * 100)
    files = (FileNeed("prepared synthetic dataset", ((str(tmp_path / "marker.json"), 0), (str(cache), 100)),
                      "run there: prepare"),
             FileNeed("resnet50 ImageNet weights", ((str(tmp_path / "resnet50-0676ba61.pth"), 10),), "run there: weights"))
    (tmp_path / "marker.json").write_bytes(b"")
    return Needs(str(tmp_path / "runs"), str(token), token_text, files, gpu)


def test_a_node_names_each_missing_or_different_file_and_an_unseen_storage_with_its_fix(tmp_path):
    problems, seconds = look(_needs(tmp_path, token_text="another start's"), gpus=0)
    assert [what for what, _ in problems] == [
        f"does not see the storage {tmp_path / 'runs'} (the driver's token .demo.probe-abc is not there)",
        f"no resnet50 ImageNet weights: {tmp_path / 'resnet50-0676ba61.pth'}",
    ]
    assert problems[0][1].startswith(f"mount {tmp_path / 'runs'} on this node at the same path")
    assert problems[1][1] == "run there: weights" and 0 <= seconds < 5
    needs = _needs(tmp_path)
    (tmp_path / "pixels.u8").write_bytes(b"x" * 60)  # a partial copy
    (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"w" * 10)
    problems, _ = look(needs, gpus=0)
    assert problems == (("prepared synthetic dataset differs from the driver's: "
                         f"{tmp_path / 'pixels.u8'} has 60 bytes here, 100 on the driver (a partial or other copy)",
                         "run there: prepare"),)


def test_a_node_whose_torch_sees_fewer_gpus_than_ray_advertises_is_named_with_its_cuda_visible_devices(tmp_path):
    (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"w" * 10)
    with fake_cuda(physical=1):
        problems, _ = look(_needs(tmp_path, gpu=0.5), gpus=2)
    (what, fix), = problems
    assert what.startswith("Ray advertises 2 GPUs, torch ") and what.endswith("sees 1 (CUDA_VISIBLE_DEVICES unset)")
    assert fix == "mend the node's NVIDIA driver (nvidia-smi), or start Ray there with --num-gpus 1"
    with fake_cuda(visible_devices="1", physical=1):  # an ordinal past the devices: none visible
        (what, fix), = look(_needs(tmp_path, gpu=1), gpus=1)[0]
    assert what.endswith("sees 0 (CUDA_VISIBLE_DEVICES '1')") and "without CUDA_VISIBLE_DEVICES=1" in fix


def test_each_gpu_needs_the_free_memory_of_the_trials_packed_on_it(tmp_path):
    (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"w" * 10)
    with fake_cuda(physical=2, total_memory=80 * GIB, free_memory=79 * GIB):  # the probe's own context: 1 GiB
        assert look(_needs(tmp_path, gpu=0.25), gpus=2)[0] == ()
    with fake_cuda(physical=2, total_memory=80 * GIB, free_memory=40 * GIB):  # someone holds half of each
        problems, _ = look(_needs(tmp_path, gpu=0.25), gpus=2)
    assert [what for what, _ in problems] == [
        f"GPU {i} has 40.0 GiB free of 80.0 GiB; 4 trials at resources.gpu 0.25 need 78.2 GiB" for i in (0, 1)]
    assert problems[0][1] == "free it: another process holds its memory (nvidia-smi on that node names it)"


def test_the_table_has_one_row_per_problem_naming_the_node_by_ip_host_and_ray_id():
    a = Node("a" * 56, "10.0.0.5", "gpu-3", 1.0)
    b = Node("b" * 56, "10.0.0.6", "gpu-4", 1.0)
    table = problem_table([Finding(a, (("no x", "make x"), ("no y", "make y")), 0.1), Finding(b, (), 0.1)])
    lines = table.splitlines()
    assert lines[0] == "2 problems on 1 of 2 nodes that can run a trial; nothing was started or written:"
    assert lines[1].split() == ["node", "what", "is", "wrong", "fix"]
    rows = [line for line in lines[3:]]
    assert len(rows) == 2 and all(row.startswith("10.0.0.5 (gpu-3, node aaaaaaaa)") for row in rows)
    assert rows[0].split("  ")[-1].strip() == "make x" and "no y" in rows[1]


@pytest.mark.ray
def test_a_start_whose_node_advertises_a_gpu_its_torch_cannot_see_is_refused_before_anything_is_written(
        ray_session, cache_dir, synthetic_root, tmp_path, capsys):
    """The session's Ray advertises one (fake) GPU that torch here cannot see: a CUDA spec is refused by the
    probe with the node's line, no experiment folder and no token left; a CPU spec on the same Ray passes."""
    import ray
    from searches import small_demo

    from tune_upl.experiment import Options, run_search
    from tune_upl.spec import parse_spec

    data = small_demo().model_dump(mode="json")
    data["resources"] = {"cpu": 1, "gpu": 1}
    data["fixed"] = {**data["fixed"], "device": "auto"}
    with pytest.raises(ExperimentError) as refused:
        run_search(parse_spec(data), {"cache_dir": cache_dir, "num_workers": 0}, Options(storage=tmp_path))
    node = next(n for n in ray.nodes() if n["Alive"])
    lines = str(refused.value).splitlines()
    assert lines[0] == "1 problem on 1 of 1 node that can run a trial; nothing was started or written:"
    assert lines[3].startswith(f"{node['NodeManagerAddress']} ({node['NodeManagerHostname']}, node "
                               f"{node['NodeID'][:8]})")
    assert "Ray advertises 1 GPU, torch" in lines[3] and "sees 0" in lines[3]
    assert list(tmp_path.iterdir()) == []  # no experiment, no token, no lock


@pytest.mark.ray
def test_a_healthy_node_passes_saying_what_was_checked_and_how_long_it_took(ray_session, cache_dir, synthetic_root,
                                                                           tmp_path):
    from searches import small_demo

    from tune_upl.planning import plan_studies, study_configs
    from tune_upl.probe import check_nodes

    spec = small_demo()
    configs = [cfg for s in plan_studies(spec, {"cache_dir": cache_dir}) for cfg in study_configs(s)]
    line = check_nodes(tmp_path, None, spec.name, configs, cpu=1, gpu=0, cuda_share=0)
    assert line.startswith("checked 1 node in ") and "(storage, 3 files; slowest node " in line
    assert line.endswith("): each can run a trial") and list(tmp_path.iterdir()) == []  # the token is gone
    seconds = float(line.split(" in ")[1].split(" s ")[0])
    assert seconds < 30  # one task on a warm local node: a worker start, no torch


def test_a_node_that_cannot_list_a_uri_storage_is_named_with_the_credentials_fix():
    problems, _ = look(Needs("nosuchscheme://bucket/runs", None, "", (), 0.0), gpus=0)
    (what, fix), = problems
    assert what.startswith("cannot list the storage nosuchscheme://bucket/runs (--storage nosuchscheme://bucket/runs:")
    assert fix == "give this node credentials for it (its environment or instance role) and network access"
