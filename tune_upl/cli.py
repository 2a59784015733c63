"""Command line: `python run_search.py [search|train|prepare|report] [options]`.

Every `TrialConfig` field is an option under its own name (`--feature_dim`) and its dash spelling
(`--feature-dim`). This module is the one place that reads the environment (home folder, working
directory, CPU count, cache variables): it resolves them into fields and a `Paths` table
(`$TUNE_UPL_CACHE` into `cache_dir`'s default, torch's hub cache into `weights_dir`'s), so nothing behind a
`TrialConfig` looks at global state.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from tune_upl.config import FIELD_DEFAULTS, FIELD_HELP, FIELD_NAMES, Paths, is_path, make_config, validate_field
from tune_upl.errors import (
    ConfigError, DatasetError, DivergedError, ExperimentError, Incomplete, OutOfMemory, SpecError, SplitAccessError,
    StorageError, Terminated, WeightsMissing,
)
from tune_upl.layout import NAME_PATTERN, PULLED_FOLDER, report_file, search_command
from tune_upl.versions import warn_versions

if TYPE_CHECKING:
    from tune_upl.storage import Remote

EXIT_BAD_INPUT = 2


def option_spellings(name: str) -> list[str]:
    """`--feature_dim` and `--feature-dim`: both spellings of every long option."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    return spellings


def add_config_options(parser: argparse.ArgumentParser, names: Sequence[str] = FIELD_NAMES,
                       title: str = "training options (TrialConfig fields)") -> None:
    group = parser.add_argument_group(title)
    for name in names:
        default = FIELD_DEFAULTS[name]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else "unset" if default is None else default
        group.add_argument(
            *option_spellings(name),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=f"{FIELD_HELP[name]} [default: {shown}]",
        )


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrialConfig fields given on the command line, as strings for pydantic to convert."""
    return {name: getattr(args, name) for name in FIELD_NAMES if hasattr(args, name)}


def absolute_path(value: str) -> str:
    """`~` expanded and made absolute here: trials run in other working directories."""
    return str(Path(value).expanduser().resolve())


def torch_hub_checkpoints() -> str:
    """The folder torch's hub caches downloaded weights in, found as `torch.hub.get_dir()` finds it (without
    importing torch): $TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch; then hub/checkpoints."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return os.path.join(os.path.expanduser(home), "hub", "checkpoints")


def driver_paths(*sources: dict[str, Any]) -> Paths:
    """The defaults of data_path, cache_dir ($TUNE_UPL_CACHE, else the field's own) and weights_dir (torch's
    hub cache) and every path named in `sources`, made absolute on this machine; planning applies them to
    each study."""
    defaults = {"data_path": FIELD_DEFAULTS["data_path"],
                "cache_dir": os.environ.get("TUNE_UPL_CACHE") or FIELD_DEFAULTS["cache_dir"],
                "weights_dir": torch_hub_checkpoints()}
    named = sorted({v for values in sources for k, v in values.items() if is_path(k, v)})
    return Paths({k: absolute_path(v) for k, v in defaults.items()}, {v: absolute_path(v) for v in named})


def with_paths(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with data_path, cache_dir and weights_dir filled in and every path absolute (one run, no spec)."""
    return driver_paths(values).apply(values)


def experiment_name(value: Optional[str]) -> Optional[str]:
    """`--name` is one folder under the storage: no path separators, no `..` (a report must not read, nor a
    search write, outside the storage)."""
    if value is not None and not re.fullmatch(NAME_PATTERN, value):
        raise ConfigError(f"--name {value!r}: an experiment name is one plain folder name; allowed: letters, digits "
                          "and _ . - (starting with a letter or digit), no path separators")
    return value


def format_metrics(metrics: dict[str, float], prefix: str) -> str:
    keys = [k for k in metrics if k.startswith(f"{prefix}_recall@")]
    return " ".join(f"R@{k.split('@')[1]} {metrics[k]:.3f}" for k in keys)


def cmd_train(args: argparse.Namespace) -> int:
    """One run of one configuration, printing a line per epoch (the seed's train.py)."""
    cfg = make_config(with_paths(config_overrides(args)))  # bad input is named before the engine loads
    from tune_upl.engine import build_run, final_test, train_epoch
    from tune_upl.prepare import prepare_dataset
    from tune_upl.weights import ensure_weights

    start = time.perf_counter()
    prepared = prepare_dataset(cfg)  # data, then weights: the search driver's order
    if prepared.built:
        print(prepared.summary(cfg), flush=True)
    ensure_weights([cfg])
    run = build_run(cfg, gpu_share=0)  # outside Ray: no GPU was given, `auto` takes one torch sees
    where = run.metric_prefix
    print(
        f"train {cfg.data_name}/{cfg.backbone_type}/{cfg.loss_name} d={cfg.feature_dim} on {run.device}: "
        f"{len(run.train_loader.dataset)} training images in {run.train_loader.dataset.num_classes} classes, "
        f"{len(run.eval_loader.dataset)} {where} images; protocol {cfg.protocol}",
        flush=True,
    )
    best: tuple[float, int, dict[str, float]] | None = None
    for _ in range(cfg.num_epochs):
        m = train_epoch(run)
        print(
            f"epoch {m['epoch']:>3}/{cfg.num_epochs}  loss {m['train_loss']:.4f}  {where} {format_metrics(m, where)}  "
            f"{m['images_per_s']:.0f} img/s  {m['epoch_seconds']:.1f} s",
            flush=True,
        )
        score = m[f"{where}_recall@{cfg.recalls[0]}"]
        if best is None or score > best[0]:
            best = (score, m["epoch"], m)
    if cfg.protocol == "seed":
        assert best is not None
        print(f"best epoch {best[1]} (test-selected, as the seed): test {format_metrics(best[2], 'test')}")
    else:
        test = final_test(run)
        print(f"test after epoch {run.epoch} (classes unseen in training and selection): {format_metrics(test, 'test')}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def storage_location(args: argparse.Namespace) -> tuple[Path, Optional[Remote]]:
    """`--storage`: a local (or shared) folder, made absolute; or a URI (s3://, gs://, ...), returned beside the
    local mirror folder of the driver's files (under cache_dir)."""
    from tune_upl.storage import Remote, is_uri, mirror_root

    if is_uri(args.storage):
        return mirror_root(args.storage, with_paths(config_overrides(args))["cache_dir"]), Remote(args.storage)
    return Path(args.storage).expanduser().resolve(), None


def pulled_experiment(local: Path, remote: Optional[Remote], name: str) -> Path:
    """The experiment folder a report reads: the local one, or a copy pulled from the URI (without the
    search's checkpoints) into the mirror's `pulled/` folder, apart from a running driver's files."""
    if remote is None:
        return local / name
    experiment = local / PULLED_FOLDER / name
    if not remote.pull(name, experiment, report_file):
        raise ExperimentError(f"no experiment {name!r} in {remote.uri}")
    return experiment


def search_spec(args: argparse.Namespace, storage: Path,
                remote: Optional[Remote] = None) -> tuple[Any, dict[str, Any], Paths]:
    """The spec, the overrides (the training options given on the command line, validated) and the driver's
    paths: from the file, the command line and this machine, or from the experiment's record (--resume)."""
    from tune_upl.experiment import resolve_resume
    from tune_upl.spec import load_spec, parse_spec

    experiment_name(args.name)
    if args.resume:
        if args.space is not None:
            raise ExperimentError("--resume reads the spec from the experiment's record; drop --space")
        if args.name is None:
            raise ExperimentError("--resume needs --name NAME of the experiment to continue")
        return resolve_resume(args.name, storage, remote)
    path = args.space or str(DEFAULT_SPEC)
    spec = load_spec(path)
    updates = {k: v for k, v in (("name", args.name), ("num_samples", args.num_samples),
                                 ("max_concurrent", args.max_concurrent)) if v is not None}
    resources = {k: v for k, v in (("cpu", args.cpus_per_trial), ("gpu", args.gpus_per_trial)) if v is not None}
    if resources:
        updates["resources"] = {**spec.resources.model_dump(), **resources}
    if updates:
        spec = parse_spec({**spec.model_dump(), **updates}, f"{path} (with command-line options)")
    overrides = {k: validate_field(k, v) for k, v in config_overrides(args).items()}  # fails before Ray
    return spec, overrides, driver_paths(spec.fixed, *spec.study_points(), overrides)


def _spec_name(args: argparse.Namespace) -> str:
    from tune_upl.spec import load_spec

    try:
        return load_spec(args.space or str(DEFAULT_SPEC)).name
    except Exception:  # only for the message; the name is in the spec file
        return "NAME"


def reports_folder(args: argparse.Namespace) -> Path:
    """`--reports-dir`, absolute and writable (checked before any work: a search must not run for hours to
    fail at its report)."""
    from tune_upl.storage import writable_folder

    folder = Path(args.reports_dir).expanduser().resolve()
    writable_folder(folder, "--reports-dir")
    return folder


def cmd_search(args: argparse.Namespace) -> int:
    """Validate the spec and the output folders (before Ray starts), run or resume the search, write the
    report. A stop signal at any moment ends it with exit 130 or 143 and the command that resumes it."""
    storage, remote = storage_location(args)
    spec, overrides, paths = search_spec(args, storage, remote)  # a bad spec is named before Ray and torch load
    reports = reports_folder(args)
    from tune_upl import signals
    from tune_upl.experiment import Options, describe, run_search
    from tune_upl.report import write_report
    from tune_upl.planning import plan_studies

    if args.dry_run:
        print(describe(spec, plan_studies(spec, overrides, paths)))
        return 0
    options = Options(storage=storage, remote=remote, verbose=args.verbose, address=args.address,
                      resume=args.resume, overwrite=args.overwrite, autoscaling=args.autoscaling,
                      allow_cpu=args.allow_cpu, loggers=tuple(args.logger), check_nodes=not args.skip_node_check)
    start = time.perf_counter()
    signals.install(resume_command(args), watchdog=True)
    try:
        experiment = run_search(spec, overrides, options, paths)
        if remote:
            experiment = pulled_experiment(storage, remote, spec.name)
        report = write_report(experiment, reports, remote and remote.uri)
    finally:
        signals.uninstall()
    from tune_upl.results import load_experiment

    unselectable = load_experiment(experiment).unselectable
    if unselectable:
        print(f"error: search {spec.name} ended without a selection in stud{'y' if len(unselectable) == 1 else 'ies'} "
              f"{', '.join(unselectable)} ({'; '.join(unselectable.values())}); the other studies are done, and the "
              f"report names why: {report}", file=sys.stderr)
        return 1
    print(f"search {spec.name} done in {time.perf_counter() - start:.0f} s; report: {report}")
    return 0


WEIGHTS_FIELDS = ("backbone_type", "pretrained", "weights_dir")  # the prepare options that fetch weights


def cmd_prepare(args: argparse.Namespace) -> int:
    """Manifest and pixel cache of one dataset variant (the seed's data_utils.py), and/or a backbone's ImageNet
    weights: with backbone options only, the weights alone; with none or some dataset options, the data."""
    from tune_upl.prepare import DATA_FIELDS, prepare_dataset

    given = config_overrides(args)
    cfg = make_config(with_paths(given))
    if set(given) & set(WEIGHTS_FIELDS):
        from tune_upl.models import weights_file
        from tune_upl.weights import ensure_weights, needed_weights

        ensure_weights([cfg])
        if needed_weights([cfg]):
            print(f"weights of {cfg.backbone_type}: {weights_file(cfg)}")
        else:
            print(f"no ImageNet weights to fetch for {cfg.backbone_type} with pretrained {cfg.pretrained}")
    if not set(given) & set(WEIGHTS_FIELDS) or set(given) & set(DATA_FIELDS):
        print(prepare_dataset(cfg).summary(cfg))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tune_upl.report import write_report

    local, remote = storage_location(args)
    reports = reports_folder(args)
    experiment = pulled_experiment(local, remote, experiment_name(args.name))
    print(write_report(experiment, reports, remote and remote.uri))
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    """The query and its top-k test images, framed green (same class) or red, and one grid (the seed's test.py)."""
    from tune_upl.retrieve import retrieve

    experiment = pulled_experiment(*storage_location(args), experiment_name(args.name))
    output = Path(args.output or Path(args.reports_dir) / args.name / "retrieval").expanduser().resolve()
    found = retrieve(experiment, args.query_img_name, args.retrieval_num, output, args.study)
    correct = sum(bool(hit.correct) for hit in found.hits)
    known = "" if found.query.label is not None else " (the query's class is unknown: grey frames)"
    print(f"{correct} of {len(found.hits)} retrieved images share the query's class{known}; pictures in "
          f"{found.folder}, grid: {found.grid}")
    return 0


def add_option(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    parser.add_argument(*option_spellings(name), dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_search.py",
        description="Hyper-parameter search for proxy-based deep metric learning (Ray Tune + Optuna + ASHA).",
    )
    commands = parser.add_subparsers(dest="command", metavar="{search,train,prepare,report,retrieve}")
    search = commands.add_parser("search", help="run a search spec on Ray Tune (the default command)")
    add_option(search, "space", default=None, help="search spec YAML [default: search_spaces/demo.yaml]")
    add_option(search, "name", help="experiment name [default: the spec's name]")
    add_option(search, "num_samples", type=int, help="trials per study [default: the spec's]")
    add_option(search, "max_concurrent", type=int, help="trials of one study running at once [default: the spec's]")
    add_option(search, "cpus_per_trial", type=float, help="CPUs per trial, > 0 [default: the spec's resources.cpu]")
    add_option(search, "gpus_per_trial", type=float,
               help="GPUs per trial, 0 to 1; fractions pack trials onto one GPU [default: the spec's resources.gpu]")
    search.add_argument("--resume", action="store_true",
                        help="continue the interrupted experiment --name (its spec comes from its record)")
    search.add_argument("--overwrite", action="store_true",
                        help="start again although the experiment exists (the old folder is moved aside, kept)")
    add_option(search, "dry_run", action="store_true", help="print studies, trials, epochs, resources; start nothing")
    search.add_argument("--logger", action="append", choices=["mlflow", "wandb"], default=[],
                        help="also log to MLflow or Weights & Biases (Ray Tune's callbacks; package not included)")
    search.add_argument("--autoscaling", action="store_true",
                        help="the Ray cluster grows on demand: skip the check that one node can hold a trial")
    add_option(search, "allow_cpu", action="store_true",
               help="a spec that asks for GPUs runs on CPUs when the cluster has none")
    search.add_argument("--skip-node-check", action="store_true",
                        help="start without probing every node first (storage, prepared data, weights files, GPUs "
                             "and their free memory: see docs/what-happens-when.md); a node that cannot run a trial "
                             "then fails each trial it takes")
    add_option(search, "storage", default="runs",
               help="experiment folder root, made absolute, shared by every node of a cluster; or a URI "
                    "(s3://bucket/runs, gs://bucket/runs) [default: runs]")
    add_option(search, "reports_dir", default="reports", help="where the markdown report goes [default: reports]")
    add_option(search, "address", default=None,
               help="Ray cluster to join, e.g. auto (or set RAY_ADDRESS) [default: start a local Ray]")
    search.add_argument("--verbose", action="store_true", help="show Ray's own progress tables and logs")
    add_config_options(search)
    search.set_defaults(handler=cmd_search)
    report = commands.add_parser("report", help="(re)write the markdown report of an experiment")
    add_option(report, "name", default="demo", help="experiment name [default: demo]")
    add_option(report, "storage", default="runs", help="experiment folder root or URI [default: runs]")
    add_option(report, "reports_dir", default="reports", help="where the report goes [default: reports]")
    add_config_options(report, ("cache_dir",), "where a URI's experiment is copied to (its mirror)")
    report.set_defaults(handler=cmd_report)
    retrieve = commands.add_parser("retrieve", help="a query image and its top-k test images (the seed's test.py)")
    add_option(retrieve, "name", default="demo", help="experiment name [default: demo]")
    add_option(retrieve, "query_img_name", required=True,
               help="a test image (its path, or a unique end of it) or any image file, embedded by the model")
    add_option(retrieve, "retrieval_num", type=int, default=8, help="how many images to retrieve [default: 8]")
    add_option(retrieve, "study", default=None, help="the study whose selected model to use [default: the first]")
    add_option(retrieve, "storage", default="runs", help="experiment folder root or URI [default: runs]")
    add_option(retrieve, "reports_dir", default="reports", help="reports folder [default: reports]")
    add_option(retrieve, "output", default=None,
               help="where the pictures go, in a folder named after the query [default: REPORTS_DIR/NAME/retrieval]")
    add_config_options(retrieve, ("cache_dir",), "where a URI's experiment is copied to (its mirror)")
    retrieve.set_defaults(handler=cmd_retrieve)
    train = commands.add_parser("train", help="train one configuration and report Recall@K")
    add_config_options(train)
    train.set_defaults(handler=cmd_train)
    prepare = commands.add_parser("prepare", help="prepare a dataset once (manifest and pre-resized image cache), "
                                                  "or fetch a backbone's ImageNet weights (--backbone_type)")
    from tune_upl.prepare import DATA_FIELDS

    add_config_options(prepare, DATA_FIELDS, "dataset options (TrialConfig fields)")
    add_config_options(prepare, WEIGHTS_FIELDS, "weights options (TrialConfig fields): given, only the weights "
                                                "are fetched, unless dataset options are given too")
    prepare.set_defaults(handler=cmd_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["search", *argv]  # `python run_search.py [--option ...]` is the search command
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    warn_versions()  # one line naming any package outside the tested ranges (a warning: the command still runs)

    try:
        return handler(args)
    except (ConfigError, SpecError, DatasetError, SplitAccessError, ExperimentError, StorageError, WeightsMissing,
            FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (DivergedError, OutOfMemory) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Incomplete as error:
        print(f"error: {error}; continue with: {resume_command(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:  # SIGINT or SIGTERM (tune_upl.signals), before or during a search
        from tune_upl import signals

        where = f" ({error})" if str(error) else ""
        resume = ""
        if args.command == "search" and not getattr(args, "dry_run", False):
            resume = f"; continue with: {resume_command(args)}"
        print(f"{'terminated' if isinstance(error, Terminated) else 'interrupted'}{where}{resume}", file=sys.stderr,
              flush=True)
        signals.said()
        return signals.exit_code(error)


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this search from any working directory, quoted for the shell: its name,
    storage (absolute, or the URI), the reports folder and the cluster address when they are not the defaults."""
    from tune_upl.storage import is_uri

    storage = args.storage if is_uri(args.storage) else absolute_path(args.storage)
    reports = absolute_path(args.reports_dir) if args.reports_dir != "reports" else None
    return search_command("search", "--resume", name=args.name or _spec_name(args), storage=storage,
                          reports_dir=reports, address=args.address)
