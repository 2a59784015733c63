"""Shared, session-scoped fixtures, and the split of the run over two xdist workers.

The default run uses both cores (`-n 2 --dist loadgroup` in pytest.ini): every test that starts or joins
Ray, or starts a search driver that does, is put in the one `ray` xdist group, so a single worker runs
them, one after another, against one session-scoped Ray (two Rays of two CPUs each on two cores would
make the timing of the kill and resume tests flaky); the other worker runs the pure-torch tests. The
generated dataset lives in one cache folder shared by both workers (its generation is locked)."""
import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray must not write auth tokens in tests

RAY_GROUP = "ray"
RAY_FIXTURES = {"ray_session"}


def worker_count() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def worker_threads() -> int:
    """The cores this process's torch may use: all of them alone, a share of them beside other workers."""
    from tune_upl.config import available_cpus

    return max(1, available_cpus() // worker_count())


torch.set_num_threads(worker_threads())  # tests that build models directly, not through a TrialConfig


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests that need Ray (the `ray_session` fixture, also through another fixture) or carry the `ray`
    marker (they start a driver process that starts Ray) share one xdist group: one worker runs them."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache folder for the whole run, shared by the xdist workers, so the dataset is generated once."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "cache"
    folder.mkdir(exist_ok=True)
    return str(folder)


@pytest.fixture(scope="session")
def synthetic_root(cache_dir):
    """The generated dataset, prepared (manifest and pixel cache): trials read only the prepared cache."""
    from tune_upl.config import make_config
    from tune_upl.prepare import prepare_dataset
    from tune_upl.synthetic import ensure_synthetic

    prepare_dataset(make_config(data_name="synthetic", cache_dir=cache_dir), progress=False)
    return ensure_synthetic(cache_dir, dataset_seed=0)


@pytest.fixture(scope="session")
def tiny_values(cache_dir, synthetic_root):
    """TrialConfig values of the demo's fixed part: tiny backbone, 64 px, synthetic data, this worker's threads."""
    return {
        "data_name": "synthetic",
        "backbone_type": "tiny",
        "image_size": 64,
        "warm_up": 0,
        "cache_dir": cache_dir,
        "num_workers": 0,
        "num_threads": worker_threads(),
    }


@pytest.fixture
def small_run():
    """`small_run(cfg, train_batches, eval_images)`: a run of `cfg` whose epochs see only the first few
    training batches and an evenly spaced slice of the evaluation split, for tests of a schedule, a
    checkpoint or a precision path that need the real loop but not a full epoch."""
    from tune_upl.data import ImageDataset, make_loader
    from tune_upl.engine import build_run

    def build(cfg, train_batches: int = 2, eval_images: int = 48):
        run = build_run(cfg)
        train, evaluation = run.train_loader.dataset, run.eval_loader.dataset
        step = max(1, len(train) // (train_batches * cfg.batch_size))  # spread over the classes
        records = train.records[::step][: train_batches * cfg.batch_size]
        run.train_loader = make_loader(ImageDataset(records, train.transform), cfg, train=True)
        spaced = evaluation.records[:: max(1, len(evaluation) // eval_images)][:eval_images]
        run.eval_loader = make_loader(ImageDataset(spaced, evaluation.transform), cfg, train=False)
        return run

    return build


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test run (ray.init costs seconds and ~700 MB). Its one GPU is fake: Ray
    gives it to trials that ask for one (their torch sees no CUDA), trials asking for none are unaffected."""
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_search(ray_session, cache_dir, synthetic_root, tmp_path_factory):
    """The small real search of `searches.small_demo` (about a minute), run once, with its report."""
    from searches import small_demo

    from tune_upl.experiment import Options, run_search
    from tune_upl.report import write_report

    spec = small_demo()
    storage = tmp_path_factory.mktemp("runs")
    experiment = run_search(spec, {"cache_dir": cache_dir, "num_workers": 0}, Options(storage=storage))
    report = write_report(experiment, tmp_path_factory.mktemp("reports"))
    return spec, experiment, report
