"""Experiments on an S3 URI (`--storage s3://...`), against a real S3 server (moto's, on localhost): the
driver's files are pushed as they are written, Tune writes its folders there, and another machine (another
cache_dir, so another mirror) reports on it or is refused where moving folders would mean copying them."""
import json
import os
import sys

import pytest
from experiments import cli
from searches import MINI, write_spec

from tune_upl.layout import driver_file, report_file
from tune_upl.storage import Remote, is_uri, mirror_root

BUCKET = "tune-upl-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 endpoint and the environment that points pyarrow (and so Ray Tune) at it."""
    pafs = pytest.importorskip("pyarrow.fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="test", secret_key="test",
                      region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def test_locations_and_filters():
    assert is_uri("s3://b/runs") and is_uri("gs://b/x") and not is_uri("/tmp/runs") and not is_uri("runs")
    assert mirror_root("s3://b/runs", "/c") == mirror_root("s3://b/runs", "/c") != mirror_root("s3://b/other", "/c")
    assert str(mirror_root("s3://b/runs", "/c")).startswith("/c/mirrors/s3_b_runs-")
    assert driver_file("search_spec.json") and driver_file("study/selection.json") and driver_file("optuna.db")
    assert not driver_file("study/abc/result.json") and not driver_file("study/experiment_state-x.json")
    assert report_file("study/abc/result.json") and not report_file("study/abc/checkpoint_000002/state.pt")
    assert report_file("trials/abc.final/checkpoint_000002/test_embeddings.pt")  # a final model is kept
    assert not report_file("trials/abc/checkpoint_000002/state.pt")


def test_push_then_pull_round_trips_and_replaces_the_mirror(s3, tmp_path):
    remote = Remote(f"s3://{BUCKET}/unit/")
    local = tmp_path / "one" / "exp"
    (local / "study").mkdir(parents=True)
    (local / "search_spec.json").write_text('{"a": 1}')
    (local / "study" / "selection.json").write_bytes(b"\x00\x01 selection")
    assert not remote.exists("exp")
    remote.push(local, "search_spec.json")
    remote.push(local, "study/selection.json")
    assert remote.exists("exp")
    other = tmp_path / "two" / "exp"
    (other / "stale").mkdir(parents=True)  # a mirror is replaced, not merged
    assert remote.pull("exp", other) == 2
    assert (other / "search_spec.json").read_text() == '{"a": 1}'
    assert (other / "study" / "selection.json").read_bytes() == b"\x00\x01 selection"
    assert not (other / "stale").exists()
    assert remote.pull("exp", tmp_path / "three" / "exp", lambda rel: "/" not in rel) == 1


def test_an_unopenable_storage_is_refused_before_ray_starts(tmp_path):
    spec = write_spec(tmp_path)
    out = cli("--space", str(spec), "--storage", "nosuchscheme://bucket/runs", "--cache_dir", str(tmp_path / "c"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: --storage nosuchscheme://bucket/runs: cannot open it")
    assert "allowed: a local folder, or a URI pyarrow opens" in out.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_a_search_on_s3_completes_and_reports_from_another_machine(s3, tmp_path, cache_dir, synthetic_root):
    spec = write_spec(tmp_path, num_samples=2, fixed={**MINI["fixed"], "num_epochs": 2})
    uri = f"s3://{BUCKET}/runs"
    out = cli("--space", str(spec), "--storage", uri, "--cache_dir", cache_dir,
              "--reports_dir", str(tmp_path / "reports"))
    assert out.returncode == 0, out.stderr[-3000:]
    remote = Remote(uri)
    files = remote.files("mini")
    for name in ("search_spec.json", "record.json", "COMPLETE", "optuna.db", "main/selection.json"):
        assert name in files, (name, files)
    results = [f for f in files if f.endswith("/result.json")]
    finals = [f for f in results if f.split("/")[1].endswith(".final")]
    assert len(results) - len(finals) == 2  # the two trials, written by Tune to S3
    assert len(finals) == 2  # two final seeds
    assert any(".final/" in f and f.endswith("test_embeddings.pt") for f in files)
    selection = json.loads((mirror_root(uri, cache_dir) / "mini" / "main" / "selection.json").read_text())
    assert selection["config"]["num_epochs"] == 2
    assert "test R@1" in (tmp_path / "reports" / "mini.md").read_text()  # the final runs' results reached it

    # another machine: its own cache_dir, so an empty mirror; the report is built from the URI alone
    elsewhere = tmp_path / "elsewhere"
    report = cli("report", "--storage", uri, "--name", "mini", "--cache_dir", str(elsewhere),
                 "--reports_dir", str(elsewhere / "reports"))
    assert report.returncode == 0, report.stderr[-3000:]
    here, there = ((folder / "reports" / "mini.md").read_text().splitlines() for folder in (tmp_path, elsewhere))
    assert here[2] == there[2].replace(there[2][10:29], here[2][10:29])  # the same but for the time written
    assert f"from `{uri}/mini`; regenerate with `python run_search.py report --name mini --storage {uri}`" in here[2]
    assert here[3:] == there[3:]
    pulled = mirror_root(uri, str(elsewhere)) / "pulled" / "mini"
    assert not list(pulled.glob("main/*/checkpoint_*"))  # the search's checkpoints stay remote

    pictures = cli("retrieve", "--storage", uri, "--name", "mini", "--cache_dir", cache_dir, "--retrieval_num", "4",
                   "--query_img_name", "images/025.h0_w0_p1/h0_w0_p1_0001.jpg", "--output", str(tmp_path / "pics"))
    assert pictures.returncode == 0, pictures.stderr[-3000:]  # the final model's test embeddings came down
    assert "of 4 retrieved images share the query's class" in pictures.stdout

    again = cli("--space", str(spec), "--storage", uri, "--cache_dir", str(elsewhere),
                "--reports_dir", str(elsewhere / "reports"))
    assert again.returncode == 0 and "is complete already" in again.stdout
    overwrite = cli("--space", str(spec), "--storage", uri, "--cache_dir", str(elsewhere), "--overwrite")
    assert overwrite.returncode == 2 and "choose another --name" in overwrite.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_a_two_study_search_killed_on_s3_resumes_from_an_empty_folder_with_optuna_and_tune_agreeing(
        s3, tmp_path, cache_dir, synthetic_root):
    """SIGKILL of the driver's session once trials have been told, then `--resume` from another machine (an
    empty mirror): the search finishes, and every Optuna trial was told about the Tune trial of its number."""
    import pickle
    import shutil

    import optuna
    import pyarrow.fs as pafs
    from experiments import kill_when, result_rows, saved_trials

    from tune_upl.layout import OPTUNA_NUMBER_KEY, STUDY_KEY

    spec = write_spec(tmp_path, name="killed", num_samples=3, studies={"lr": [1.0e-3, 3.0e-3]},
                      space={"feature_dim": {"choice": [16, 32, 64]}},
                      fixed={**{k: v for k, v in MINI["fixed"].items() if k != "feature_dim"}, "num_epochs": 2,
                             "checkpoint_every": 1}, final_seeds=1)
    uri = f"s3://{BUCKET}/killed"

    state = tmp_path / "state"

    def saved_on_s3() -> dict:
        """Tune's newest saved experiment state in the bucket (what a resume restores)."""
        fs, path = pafs.FileSystem.from_uri(f"{uri}/killed/trials")
        found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                       if i.base_name.startswith("experiment_state-"))
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir()
        if found:
            with fs.open_input_stream(found[-1]) as source:
                (state / found[-1].rsplit("/", 1)[1]).write_bytes(source.read())
        saved = saved_trials(state)
        books = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                       if i.base_name.startswith("searcher-state-"))
        if not books:
            return {}
        try:
            with fs.open_input_stream(books[-1]) as source:
                known = pickle.loads(source.read()).entries
        except (OSError, EOFError, pickle.UnpicklingError):  # read while Tune's sync rewrites it: not yet
            return {}
        # a kill while Tune uploads its state can leave the searcher's older than the trials' (a known limit):
        # kill only where the bucket holds one consistent snapshot
        return saved if set(saved) <= set(known) else {}

    def ready() -> bool:
        """A trial has ended (told, and `optuna.db` pushed then), and Tune's state in the bucket holds a trial
        that has reported an epoch and not ended since: one asked after that push, or running beside it."""
        saved = [v for v in saved_on_s3().values() if not v[2]]
        return (sum(status == "TERMINATED" for status, _, _ in saved) >= 1 and
                sum(epochs >= 1 for _, epochs, _ in saved) >= 3 and
                any(status != "TERMINATED" and epochs >= 1 for status, epochs, _ in saved))

    kill_when([sys.executable, "run_search.py", "--space", str(spec), "--storage", uri, "--cache_dir", cache_dir,
               "--reports_dir", str(tmp_path / "reports")], ready)
    elsewhere = tmp_path / "elsewhere"
    out = cli("search", "--resume", "--name", "killed", "--storage", uri, "--cache_dir", str(elsewhere),
              "--reports_dir", str(elsewhere / "reports"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pulled = elsewhere / "check"
    assert Remote(uri).pull("killed", pulled) > 0
    storage = f"sqlite:///{pulled / 'optuna.db'}"
    tune_trials = [(json.loads((p.parent / "params.json").read_text()), result_rows(p))
                   for p in (pulled / "trials").glob("*/result.json") if not p.parent.name.endswith(".final")]
    assert len(tune_trials) == 6  # every search trial once
    numbers = {}
    for config, rows in tune_trials:
        key, number = config[STUDY_KEY], config[OPTUNA_NUMBER_KEY]
        assert (key, number) not in numbers  # no Optuna number handed to two Tune trials
        numbers[(key, number)] = config
        trial = optuna.load_study(study_name=key, storage=storage).trials[number]
        assert trial.params == {"feature_dim": config["feature_dim"]}, (trial, config)
        assert trial.state.name == "COMPLETE" and trial.value == pytest.approx(rows[-1]["val_recall@1"])
        assert trial.intermediate_values == pytest.approx({r["training_iteration"]: r["val_recall@1"] for r in rows})
