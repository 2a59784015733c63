"""Every node that could run a trial, checked before the first one.

Why: the driver's own checks (`experiment.preflight`) see only the driver's machine. On a cluster a node that
does not see the storage fails at its first checkpoint upload; one without the prepared cache or a weights
file fails each trial it takes within seconds and takes the next, burning every study's budget; one whose
torch sees fewer GPUs than Ray advertises fails each trial with `no_gpu`. Each is visible before any trial: one
small Ray task per node (pinned there, `max_calls=1` so the worker that imported torch with every GPU visible
is never reused for a trial) looks, and any problem stops the start with one table, node by node, before
anything is written into the experiment.

`look` is what runs on a node: plain data in (`Needs`), plain data out, no Ray and no torch unless the spec asks
for GPUs. The driver side (`needs_of`, `probe_nodes`, `problem_table`) uses only Ray's public API
(`ray.nodes`, `ray.remote`, `NodeAffinitySchedulingStrategy`).
"""
from __future__ import annotations

import os
import secrets
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tune_upl.errors import first_line
from tune_upl.gpu_memory import free_needed, trials_per_gpu

PROBE_TIMEOUT_S = 300.0  # a node's first task starts a Python worker there (and imports torch for the GPU check)
GIB = 2**30


@dataclass(frozen=True)
class FileNeed:
    """Files every trial of some study reads (a prepared dataset's three, or one weights file), as the driver
    has them; a node lacking any of them gets one line naming the first one missing."""

    what: str  # "prepared synthetic dataset", "resnet50 ImageNet weights"
    files: tuple[tuple[str, int], ...]  # (path, bytes on the driver's machine: another size is a partial copy)
    fix: str  # what provides them on a node that lacks them


@dataclass(frozen=True)
class Needs:
    """What a node must offer a trial: the experiment's storage, the files trials read, and (when the spec asks
    for GPUs) every GPU Ray advertises for it with the free memory the trials packed on it are promised."""

    storage: str  # the local folder (or URI) the experiments are written to
    token: Optional[str]  # local storage: a file the driver wrote beside the experiment; None for a URI
    token_text: str
    files: tuple[FileNeed, ...]
    gpu: float  # resources.gpu per trial; 0: no GPU check (torch is not imported)


@dataclass(frozen=True)
class Node:
    """An alive Ray node, as `ray.nodes()` describes it."""

    node_id: str
    ip: str
    host: str
    gpus: float  # the GPUs Ray advertises for it

    @property
    def label(self) -> str:
        return f"{self.ip} ({self.host}, node {self.node_id[:8]})"


@dataclass(frozen=True)
class Finding:
    """What the probe found on one node: (what is wrong, the fix) pairs, and how long it took there."""

    node: Node
    problems: tuple[tuple[str, str], ...]
    seconds: float


# ---------------------------------------------------------------- on the node
def look(needs: Needs, gpus: float) -> tuple[tuple[tuple[str, str], ...], float]:
    """Check this machine against `needs` (Ray advertises `gpus` GPUs for it): ((problem, fix), ...), seconds."""
    start = time.perf_counter()
    problems = [*_storage_problems(needs), *_file_problems(needs.files)]
    if needs.gpu > 0:
        problems += _gpu_problems(gpus, needs.gpu)
    return tuple(problems), time.perf_counter() - start


def _storage_problems(needs: Needs) -> list[tuple[str, str]]:
    if needs.token is None:
        from tune_upl.storage import Remote

        try:
            Remote(needs.storage).check()
        except Exception as error:  # pyarrow's errors for credentials, network, a missing bucket
            return [(f"cannot list the storage {needs.storage} ({first_line(error)})",
                     "give this node credentials for it (its environment or instance role) and network access")]
        return []
    try:
        seen = Path(needs.token).read_text()
    except OSError:
        seen = None
    if seen != needs.token_text:
        return [(f"does not see the storage {needs.storage} (the driver's token {Path(needs.token).name} is not there)",
                 f"mount {needs.storage} on this node at the same path (a filesystem every node shares), or use "
                 "--storage s3://... or gs://...")]
    return []


def _file_problems(needs: tuple[FileNeed, ...]) -> list[tuple[str, str]]:
    problems = []
    for need in needs:
        for path, expected in need.files:
            try:
                size = os.stat(path).st_size
            except OSError:
                problems.append((f"no {need.what}: {path}", need.fix))
                break
            if size != expected:
                problems.append((f"{need.what} differs from the driver's: {path} has {size} bytes here, {expected} "
                                 "on the driver (a partial or other copy)", need.fix))
                break
    return problems


def _gpu_problems(advertised: float, share: float) -> list[tuple[str, str]]:
    """Every GPU Ray advertises must be one torch sees, with the free memory the trials packed on it need."""
    import torch

    want = int(advertised)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "unset" if visible is None else repr(visible)
    try:
        seen = torch.cuda.device_count()
    except Exception as error:  # a driver that cannot be loaded
        return [(f"torch cannot count CUDA devices ({first_line(error)})", "mend the node's NVIDIA driver (nvidia-smi)")]
    if seen < want:
        if torch.version.cuda is None:
            fix = f"install a CUDA build of torch there (this one, {torch.__version__}, is CPU-only)"
        elif visible is not None:
            fix = f"start Ray there without CUDA_VISIBLE_DEVICES={visible}, or with --num-gpus {seen}"
        else:
            fix = f"mend the node's NVIDIA driver (nvidia-smi), or start Ray there with --num-gpus {seen}"
        return [(f"Ray advertises {want} GPU{'' if want == 1 else 's'}, torch {torch.__version__} sees {seen} "
                 f"(CUDA_VISIBLE_DEVICES {shown})", fix)]
    problems = []
    for index in range(want):
        try:
            free, total = torch.cuda.mem_get_info(index)
        except Exception as error:  # CUDA initialisation: a driver older than torch's CUDA, a busy device
            return [(f"CUDA fails on GPU {index} ({first_line(error)})",
                     "mend the node's NVIDIA driver (its CUDA version must hold torch's), or free the device")]
        need = free_needed(share, total)
        if free < need:
            packed = trials_per_gpu(share)
            problems.append((f"GPU {index} has {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB; {packed} "
                             f"trial{'' if packed == 1 else 's'} at resources.gpu {share:g} need {need / GIB:.1f} GiB",
                             "free it: another process holds its memory (nvidia-smi on that node names it)"))
    return problems


# ---------------------------------------------------------------- on the driver
def write_token(storage: Path, name: str) -> tuple[Path, str]:
    """A file beside the experiment `name` (not in it: nothing is written there before every check passed)
    that a node sees only if it sees the storage. Its text is new each start."""
    text = secrets.token_hex(16)
    token = storage / f".{name}.probe-{text[:8]}"
    token.write_text(text)
    return token, text


def file_needs(configs: list[Any]) -> list[FileNeed]:
    """The prepared caches and weights files these trial configs read, each once, with the driver's sizes."""
    from tune_upl.models import weights_file
    from tune_upl.prepare import MANIFEST_FILE, MARKER_FILE, PIXELS_FILE, entry_dir, prepare_command

    def sized(*paths: Path) -> tuple[tuple[str, int], ...]:
        return tuple((str(path), path.stat().st_size) for path in paths)

    needs: dict[str, FileNeed] = {}
    for cfg in configs:
        entry = entry_dir(cfg)
        if str(entry) not in needs:
            needs[str(entry)] = FileNeed(
                f"prepared {cfg.data_name} dataset", sized(*(entry / n for n in (MARKER_FILE, MANIFEST_FILE, PIXELS_FILE))),
                f"run there: {prepare_command(cfg)}; or set cache_dir to a folder every node mounts")
        weights = weights_file(cfg)
        if weights is not None and str(weights) not in needs:
            if cfg.pretrained == "auto":
                needs[str(weights)] = FileNeed(
                    f"{cfg.backbone_type} ImageNet weights", sized(weights),
                    f"run there: python run_search.py prepare --backbone_type {cfg.backbone_type} --weights_dir "
                    f"{shlex.quote(str(weights.parent))}; or set weights_dir to a folder every node mounts")
            else:
                needs[str(weights)] = FileNeed("weights file (pretrained)", sized(weights),
                                               "copy it there at the same path, or name one on a filesystem every node mounts")
    return list(needs.values())


def trial_nodes(cpu: float, gpu: float, nodes: Optional[list[dict[str, Any]]] = None) -> list[Node]:
    """The alive nodes that can hold one trial (its CPUs and GPU together); `nodes`: `ray.nodes()` by default."""
    import ray

    found = []
    for node in ray.nodes() if nodes is None else nodes:
        resources = node.get("Resources", {})
        if node.get("Alive") and resources.get("CPU", 0) >= cpu and resources.get("GPU", 0) >= gpu:
            found.append(Node(node["NodeID"], node.get("NodeManagerAddress", "?"),
                              node.get("NodeManagerHostname", "?"), float(resources.get("GPU", 0))))
    return found


def probe_nodes(needs: Needs, nodes: list[Node], timeout: float = PROBE_TIMEOUT_S) -> list[Finding]:
    """Run `look` on each node (one task pinned there) and gather what each found; a node whose task fails or
    does not answer within `timeout` is a finding too."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_calls=1)(look)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                         name=f"tune_upl probe {node.node_id[:8]}").remote(needs, node.gpus): node for node in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    findings = []
    for ref in ready:
        node = refs[ref]
        try:
            problems, seconds = ray.get(ref)
        except Exception as error:  # the task could not run there: tune_upl or its packages missing, ...
            cause = getattr(error, "cause", None) or error
            problems, seconds = ((f"the probe could not run there ({type(cause).__name__}: {first_line(cause)})",
                                  "install this project and its requirements on that node, as on the driver"),), 0.0
        findings.append(Finding(node, problems, seconds))
    for ref in late:
        ray.cancel(ref, force=True)
        findings.append(Finding(refs[ref], ((f"did not answer the probe within {timeout:g} s",
                                             "see `ray status` and that node's raylet log"),), timeout))
    order = {node.node_id: i for i, node in enumerate(nodes)}
    return sorted(findings, key=lambda f: order[f.node.node_id])


def problem_table(findings: list[Finding]) -> str:
    """One row per problem, node by node: the node (IP, host name, Ray node id), what is wrong, the fix."""
    from tabulate import tabulate

    rows = [(f.node.label, what, fix) for f in findings for what, fix in f.problems]
    bad = sum(1 for f in findings if f.problems)
    return (f"{len(rows)} problem{'' if len(rows) == 1 else 's'} on {bad} of {len(findings)} "
            f"node{'' if len(findings) == 1 else 's'} that can run a trial; nothing was started or written:\n"
            + tabulate(rows, headers=("node", "what is wrong", "fix"), tablefmt="simple"))


def healthy_line(findings: list[Finding], needs: Needs, seconds: float) -> str:
    """What was checked, where, and how long it took (the slowest node's own time in brackets)."""
    files = sum(len(need.files) for need in needs.files)
    checked = ["storage", f"{files} file{'' if files == 1 else 's'}"]
    if needs.gpu > 0:
        checked.append("GPUs and their free memory")
    slowest = max((f.seconds for f in findings), default=0.0)
    return (f"checked {len(findings)} node{'' if len(findings) == 1 else 's'} in {seconds:.1f} s "
            f"({', '.join(checked)}; slowest node {slowest:.1f} s): each can run a trial")


def check_nodes(storage: Path, remote_uri: Optional[str], name: str, configs: list[Any], cpu: float, gpu: float,
                cuda_share: float, autoscaling: bool = False, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Probe every node that can hold a trial of `cpu` CPUs and `gpu` GPU; `cuda_share`: the GPU share whose
    devices and memory are checked (0 when no trial runs on CUDA). Returns the line to print, or raises
    `ExperimentError` with the table of problems. The token is removed whatever happens."""
    from tune_upl.errors import ExperimentError

    start = time.perf_counter()
    nodes = trial_nodes(cpu, gpu)
    if not nodes:  # only with --autoscaling (check_resources refuses it otherwise)
        return "no node can hold a trial yet (--autoscaling): nodes that join later are not checked"
    token, text = (None, "") if remote_uri else write_token(storage, name)
    try:
        needs = Needs(remote_uri or str(storage.resolve()), str(token) if token else None, text,
                      tuple(file_needs(configs)), cuda_share)
        findings = probe_nodes(needs, nodes, timeout)
    finally:
        if token is not None:
            token.unlink(missing_ok=True)
    if any(f.problems for f in findings):
        raise ExperimentError(problem_table(findings))
    later = "; nodes that join later are not checked" if autoscaling else ""
    return healthy_line(findings, needs, time.perf_counter() - start) + later
