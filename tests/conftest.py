"""Shared, session-scoped fixtures: the embedded dataset is generated once per test run."""
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray must not write auth tokens in tests


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache folder for the whole run, so the synthetic dataset is generated once."""
    return str(tmp_path_factory.mktemp("cache"))


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
    """TrialConfig values of the demo's fixed part: tiny backbone, 64 px, synthetic data, 2 threads."""
    return {
        "data_name": "synthetic",
        "backbone_type": "tiny",
        "image_size": 64,
        "warm_up": 0,
        "cache_dir": cache_dir,
        "num_workers": 0,
        "num_threads": 2,
    }


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test run (ray.init costs seconds and ~700 MB)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
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
