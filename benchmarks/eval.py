"""eval suite: time and peak extra memory of Recall@K + MAP@R (`metrics.retrieval_metrics`, row chunks and an
exact top-k) against the naive full N x N similarity matrix, sorted, and against the implementation before
it (row chunks, each fully sorted); and whether the three results are equal.

Both baselines are written here, apart from the platform's code: each computes every query's neighbour
order and scores it with `naive_scores`, the definitions applied to whole orders. Its means are summed over
the same 1024-row blocks as `retrieval_metrics` sums its chunks, so equal orders give bit-equal results and
"equal" means equal. Imports only torch and `tune_upl.metrics` (no pydantic, no Ray).
"""
from __future__ import annotations

import argparse
import gc
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
import torch.nn.functional as F

from benchmarks.harness import Row, SuiteResult, fmt, sync

if TYPE_CHECKING:
    from tune_upl.metrics import RetrievalResult

CHUNK_SIZE = 1024  # rows per chunk of `retrieval_metrics`, and per block of the baselines' sums


def _rss_kb(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", text).group(1))


def _release_freed_memory() -> None:
    """glibc: large blocks always mmap-ed and returned on free (no dynamic threshold), freed heap trimmed,
    so RSS follows what is in use and a block freed by an earlier measurement is not silently reused."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator statistics, or on CPU the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs) above its RSS at the start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra_mb: Optional[float] = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.start = _rss_kb("VmRSS") * 1024
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.start is not None:
            self.extra_mb = (_rss_kb("VmHWM") * 1024 - self.start) / 2**20


def clustered_embeddings(n: int, dim: int, classes: int, device: torch.device, seed: int = 0):
    """Class centres plus noise (recall well below 1), labels balanced over `classes`."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=gen)
    emb = centres[labels] + 3.0 * torch.randn(n, dim, generator=gen)
    return emb.to(device), labels.to(device)


def others_in_class(labels: torch.Tensor) -> torch.Tensor:
    """R of each query: how many other images share its class."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] - 1


def neighbour_depth(labels: torch.Tensor, ks: Iterable[int]) -> int:
    """How many neighbours the metrics read: the largest k or R, at most all other images."""
    return max(1, min(max(max(ks), int(others_in_class(labels).max())), len(labels) - 1))


def naive_scores(order: torch.Tensor, labels: torch.Tensor, ks: Iterable[int]) -> RetrievalResult:
    """Recall@K, MAP@R and R-precision of every query's neighbour order (N x depth), read off the whole
    relevance matrix; the sums over queries are taken block by block as `retrieval_metrics` takes them."""
    from tune_upl.metrics import RetrievalResult

    r = others_in_class(labels)
    valid = r > 0
    counted = int(valid.sum())
    relevant = labels[order] == labels[:, None]
    ranks = torch.arange(1, order.shape[1] + 1, device=order.device)
    in_top_r = relevant & (ranks <= r[:, None])
    r = r.clamp(min=1).double()
    map_sum = rp_sum = 0.0
    for block in (slice(s, s + CHUNK_SIZE) for s in range(0, len(labels), CHUNK_SIZE)):
        hits, mask = in_top_r[block], valid[block]
        map_sum += float(((hits.cumsum(dim=1).double() / ranks * hits).sum(dim=1) / r[block])[mask].sum())
        rp_sum += float((hits.sum(dim=1).double() / r[block])[mask].sum())
    share = (lambda total: total / counted) if counted else (lambda total: 0.0)
    recall = {k: share(int((relevant[:, :k].any(dim=1) & valid).sum())) for k in sorted(set(ks))}
    return RetrievalResult(recall=recall, map_at_r=share(map_sum), r_precision=share(rp_sum), num_queries=counted,
                           num_excluded=len(labels) - counted)


def naive_metrics(emb: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> RetrievalResult:
    """The full N x N similarity matrix, its diagonal masked, every row sorted (stable: ties by index)."""
    normed = F.normalize(emb.float(), dim=-1)
    sims = normed @ normed.t()
    sims.fill_diagonal_(float("-inf"))
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :neighbour_depth(labels, ks)].clone()
    del sims
    return naive_scores(order, labels, ks)


def previous_metrics(emb: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> RetrievalResult:
    """The implementation before this benchmark: row chunks, each fully sorted (stable)."""
    normed = F.normalize(emb.float(), dim=-1)
    depth = neighbour_depth(labels, ks)
    orders = []
    for start in range(0, len(labels), CHUNK_SIZE):
        rows = torch.arange(start, min(start + CHUNK_SIZE, len(labels)), device=emb.device)
        sims = normed[rows] @ normed.t()
        sims[torch.arange(len(rows), device=emb.device), rows] = float("-inf")
        orders.append(torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth].clone())
    return naive_scores(torch.cat(orders), labels, ks)


def measure(args: argparse.Namespace) -> SuiteResult:
    """Each size: the three implementations' time, peak extra memory and results, side by side."""
    from tune_upl.metrics import retrieval_metrics

    result = SuiteResult("eval")
    device = torch.device(args.device)
    sizes = ((1000, 98), (3000, 100)) if args.quick else ((8131, 98), (20000, 200))
    ks = (1, 2, 4, 8)
    methods = {
        "naive": naive_metrics,
        "previous": previous_metrics,
        "current": lambda emb, labels, ks: retrieval_metrics(emb, labels, ks, CHUNK_SIZE),
    }
    for n, classes in sizes:
        emb, labels = clustered_embeddings(n, 512, classes, device)
        seen: dict[str, Any] = {}
        timing: dict[str, float] = {}
        memory: dict[str, Optional[float]] = {}
        for name, method in methods.items():
            with PeakMemory(device) as peak:
                start = time.perf_counter()
                seen[name] = method(emb, labels, ks)
                sync(device)
                timing[name] = time.perf_counter() - start
            memory[name] = peak.extra_mb
            gc.collect()
        equal = seen["current"] == seen["naive"] == seen["previous"]
        result.details[n] = {name: r for name, r in seen.items()}
        result.details.setdefault("equal", []).append(equal)
        label = f"N = {n:,}, d = 512, {classes} classes"
        result.rows += [
            Row("eval", f"time, {label}", timing["current"], "s", "naive N x N", timing["naive"],
                "<= 1.2x naive", timing["current"] <= 1.2 * timing["naive"],
                note=f"previous chunked full sort: {timing['previous']:.2f} s"),
            Row("eval", f"peak extra memory, {label}", memory["current"] if memory["current"] is not None else float("nan"),
                "MB", "naive N x N", memory["naive"], "<= 15% of naive at N = 20,000",
                (memory["current"] <= 0.15 * memory["naive"]) if (n == 20000 and None not in (memory["current"], memory["naive"])) else None,
                note=f"previous chunked full sort: {fmt(memory['previous'])} MB; the N x N float32 matrix alone: "
                     f"{n * n * 4 / 2**20:,.0f} MB"
                     + (f" ({memory['current'] / (n * n * 4 / 2**20):.1%} of it)" if memory["current"] else "")),
            Row("eval", f"results equal to naive (Recall@1,2,4,8, MAP@R, R-precision), {label}", float(equal), "bool",
                target="equal", met=equal,
                note=f"Recall@1 {seen['current'].recall[1]:.4f}, MAP@R {seen['current'].map_at_r:.4f}"),
        ]
        del emb, labels
    return result
