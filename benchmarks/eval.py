"""eval suite: time and peak extra memory of Recall@K + MAP@R + R-precision (`metrics.retrieval_metrics`)
beside a dedicated k-NN library, faiss's exact flat inner-product index (`faiss.IndexFlatIP`, what
pytorch-metric-learning's AccuracyCalculator uses), and whether the results are equal to the naive full
N x N similarity matrix, sorted.

Rows, per size:
- ours: `retrieval_metrics` from embeddings to RetrievalResult (normalise, products, neighbours, scores);
- faiss: `index.add(x); index.search(x, depth + 1)` on the normalised float32 embeddings (x made before the
  timer), the search alone, not the scoring of its neighbours: the neighbours a k-NN library gives, at the
  depth our metrics read (the largest k or R, plus the query itself). Its neighbours (self removed) are then
  scored apart, untimed, to say whether its results equal ours. faiss is a benchmark-only dependency: the
  platform never imports it; without it the suite says so in one line;
- the previous `retrieval_metrics` (row chunks, `topk` of whole rows, ties repaired by sorting), and the
  naive N x N sort, run once each: the reference for "equal" and for memory. Both rank by the same tie rule
  (similarities rounded to 2^-14, equal ones by index: `neighbours.cells`) over products computed as ours
  are (`chunk_products`), so "equal" compares rankings, not two BLAS libraries' last bits.
Ours and faiss run `--repeats` times (3, quick 1) alternately; each row is the best.

The baselines are written here, apart from the platform's code: each computes every query's neighbour
order and scores it with `naive_scores`, the definitions applied to whole orders. Its means are summed over
the same 1024-query blocks as `retrieval_metrics` sums them, so equal orders give bit-equal results and
"equal" means equal. Imports only torch, `tune_upl.metrics` and, where installed, faiss (no pydantic, no Ray).
"""
from __future__ import annotations

import argparse
import gc
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from benchmarks.harness import Row, SuiteResult, fmt, sync

if TYPE_CHECKING:
    from tune_upl.metrics import RetrievalResult



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
    from tune_upl.metrics import SUM_BLOCK, RetrievalResult

    r = others_in_class(labels)
    valid = r > 0
    counted = int(valid.sum())
    relevant = labels[order] == labels[:, None]
    ranks = torch.arange(1, order.shape[1] + 1, device=order.device)
    in_top_r = relevant & (ranks <= r[:, None])
    r = r.clamp(min=1).double()
    map_sum = rp_sum = 0.0
    for block in (slice(s, s + SUM_BLOCK) for s in range(0, len(labels), SUM_BLOCK)):
        hits, mask = in_top_r[block], valid[block]
        map_sum += float(((hits.cumsum(dim=1).double() / ranks * hits).sum(dim=1) / r[block])[mask].sum())
        rp_sum += float((hits.sum(dim=1).double() / r[block])[mask].sum())
    share = (lambda total: total / counted) if counted else (lambda total: 0.0)
    recall = {k: share(int((relevant[:, :k].any(dim=1) & valid).sum())) for k in sorted(set(ks))}
    return RetrievalResult(recall=recall, map_at_r=share(map_sum), r_precision=share(rp_sum), num_queries=counted,
                           num_excluded=len(labels) - counted)


def chunk_products(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, similarities) of each chunk of `x @ x.T`, computed exactly as `retrieval_metrics` computes
    them: in its chunks of rows (`metrics.CHUNK_SIZE`), through `metrics.chunk_similarities` (on the CPU
    numpy's BLAS, in slabs), into one reused buffer, each chunk's own rows masked (never their own
    neighbour). So "equal" compares rankings, not two products' roundings: a product of another shape may
    round a few similarities across a boundary of the tie rule and move real-valued results in their last
    digits."""
    from tune_upl.metrics import CHUNK_SIZE as ROWS, chunk_similarities, cpu_products

    buffer = torch.empty(min(ROWS, len(x)), len(x), device=x.device)
    with cpu_products(x) as pool:
        for start in range(0, len(x), ROWS):
            stop = min(start + ROWS, len(x))
            sims = chunk_similarities(x[start:stop], x, buffer[:stop - start], pool)
            sims[:, start:stop].diagonal().fill_(float("-inf"))
            yield start, sims


def naive_metrics(emb: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> RetrievalResult:
    """The full N x N matrix of rounded similarities (the tie rule, `neighbours.cells`), its diagonal masked,
    every row sorted in full (stable: equal ones by index)."""
    from tune_upl.neighbours import cells

    normed = F.normalize(emb.float(), dim=-1)
    sims = torch.empty(len(normed), len(normed), device=normed.device)
    for start, chunk in chunk_products(normed):
        sims[start:start + len(chunk)] = cells(chunk)
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :neighbour_depth(labels, ks)].clone()
    del sims
    return naive_scores(order, labels, ks)


def previous_metrics(emb: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> RetrievalResult:
    """The implementation before this one, on the same chunks: `topk` of whole rows with ties repaired by
    sorting (of the rounded similarities: the same tie rule)."""
    from tune_upl.neighbours import top_depth_by_topk

    depth = neighbour_depth(labels, ks)
    orders = [top_depth_by_topk(sims, depth) for _, sims in chunk_products(F.normalize(emb.float(), dim=-1))]
    return naive_scores(torch.cat(orders), labels, ks)


def first_neighbours(x: torch.Tensor) -> torch.Tensor:
    """Each row's nearest other row (the first of equal ones: argmax returns the first maximum), in chunks."""
    return torch.cat([sims.argmax(dim=1) for _, sims in chunk_products(x)])


def timed(method, device: torch.device) -> tuple[Any, float, Optional[float]]:
    """A call's result, seconds and peak extra memory (MB)."""
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        found = method()
        sync(device)
        seconds = time.perf_counter() - start
    gc.collect()
    return found, seconds, peak.extra_mb


SEED_KS = (1, 2, 4, 8)
# N -> (classes, Recall@K): CUB-200-2011's test set, a CARS196-like 20,000, and Stanford Online Products' test
# set (60,502 images of 11,316 classes, its papers' Recall@1,10,100,1000); quick runs use the small two
SIZES: dict[int, tuple[int, tuple[int, ...]]] = {1000: (98, SEED_KS), 3000: (100, SEED_KS), 8131: (98, SEED_KS),
                                                 20000: (200, SEED_KS), 60502: (11316, (1, 10, 100, 1000))}
NAIVE_UP_TO = 20000  # above, the N x N matrix (14.6 GB at SOP's size) is not built: no naive or previous rows
LARGE_MEMORY_SHARE = 0.10  # the bound at SOP's size: peak extra memory within 10% of the N x N float32 matrix


def ours_and_peer(emb: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...], x: torch.Tensor, depth: int,
                  device: torch.device, faiss: Any, repeats: int) -> tuple[dict[str, Any], dict, dict]:
    """Ours and faiss (where loaded) alternately, `repeats` times: each one's result, best seconds and largest
    peak extra memory, by name ("current", "faiss")."""
    from benchmarks import knn_peer
    from tune_upl.metrics import retrieval_metrics

    seconds: dict[str, float] = {}
    memory: dict[str, Optional[float]] = {}
    seen: dict[str, Any] = {}
    methods = {"current": lambda: retrieval_metrics(emb, labels, ks)}
    if faiss is not None:
        methods["faiss"] = lambda: knn_peer.search(faiss, x, depth)
    for _ in range(repeats):
        for name, method in methods.items():
            seen[name], took, extra = timed(method, device)
            seconds[name] = min(seconds.get(name, took), took)
            memory[name] = extra if memory.get(name) is None else max(memory[name], extra or 0.0)
    return seen, seconds, memory


def large_rows(n: int, classes: int, ks: tuple[int, ...], device: torch.device, faiss: Any,
               repeats: int) -> list[Row]:
    """At a size whose N x N matrix does not fit: ours (time, and peak extra memory against the stated bound)
    beside faiss's flat index at the same depth, and whether faiss's neighbours score as ours."""
    emb, labels = clustered_embeddings(n, 512, classes, device)
    depth = neighbour_depth(labels, ks)
    x = F.normalize(emb.float(), dim=-1).cpu().contiguous()
    seen, seconds, memory = ours_and_peer(emb, labels, ks, x, depth, device, faiss, repeats)
    label = f"N = {n:,}, d = 512, {classes:,} classes"
    matrix_mb = n * n * 4 / 2**20
    ours = seen["current"]
    bound = LARGE_MEMORY_SHARE * matrix_mb
    met = memory["current"] <= bound if memory["current"] is not None else None
    k_text = ",".join(str(k) for k in ks)
    rows = [Row("eval", f"time, retrieval_metrics (Recall@{k_text}, MAP@R, R-precision; depth {depth}), {label}",
                seconds["current"], "s", note=f"best of {repeats}; Recall@1 {ours.recall[1]:.4f}, "
                f"Recall@{ks[-1]} {ours.recall[ks[-1]]:.4f}, MAP@R {ours.map_at_r:.4f}"),
            Row("eval", f"peak extra memory, {label}", memory["current"] if memory["current"] is not None else
                float("nan"), "MB", "the N x N float32 matrix (never built)", matrix_mb,
                f"<= {LARGE_MEMORY_SHARE:.0%} of the N x N matrix", met)]
    if faiss is not None:
        rows += _peer_rows(label, depth, x, labels.cpu(), ks, seconds, memory, seen)
    return rows


def measure(args: argparse.Namespace) -> SuiteResult:
    """Each size: ours and faiss alternately (best of `--repeats`), then the previous and the naive once."""
    from benchmarks import knn_peer

    result = SuiteResult("eval")
    device = torch.device(args.device)
    faiss, loaded = knn_peer.load() if device.type == "cpu" else (None, "faiss-cpu is compared on --device cpu only")
    result.notes.append(loaded)
    repeats = args.repeats or (1 if args.quick else 3)
    wanted = [int(v) for v in str(args.eval_sizes).split(",")] if args.eval_sizes else []
    unknown = [n for n in wanted if n not in SIZES]
    if unknown:
        raise ValueError(f"--eval-sizes {unknown[0]}: allowed: {', '.join(str(n) for n in SIZES)}")
    sizes = wanted or ([1000, 3000] if args.quick else [8131, 20000])
    for n in sizes:
        classes, ks = SIZES[n]
        if n > NAIVE_UP_TO:
            result.rows += large_rows(n, classes, ks, device, faiss, repeats)
            continue
        emb, labels = clustered_embeddings(n, 512, classes, device)
        depth = neighbour_depth(labels, ks)
        x = F.normalize(emb.float(), dim=-1).cpu().contiguous()
        seen, seconds, memory = ours_and_peer(emb, labels, ks, x, depth, device, faiss, repeats)
        for name, method in (("previous", previous_metrics), ("naive", naive_metrics)):
            seen[name], seconds[name], memory[name] = timed(lambda: method(emb, labels, ks), device)
        equal = seen["current"] == seen["naive"] == seen["previous"]
        label = f"N = {n:,}, d = 512, {classes} classes"
        result.details[n] = {name: found for name, found in seen.items() if name != "faiss"}
        result.details.setdefault("equal", []).append(equal)
        result.rows += _rows(label, n, depth, seconds, memory, seen, equal, repeats)
        if faiss is not None:
            result.rows += _peer_rows(label, depth, x, labels.cpu(), ks, seconds, memory, seen)
        del emb, labels, x
    return result


def _rows(label: str, n: int, depth: int, seconds: dict, memory: dict, seen: dict, equal: bool,
          repeats: int) -> list[Row]:
    """Ours beside the previous implementation and the naive sort: time, memory, equal results."""
    current = seen["current"]
    matrix_mb = n * n * 4 / 2**20
    return [
        Row("eval", f"time, retrieval_metrics (Recall@1,2,4,8, MAP@R, R-precision; depth {depth}), {label}",
            seconds["current"], "s", "previous (topk of whole rows)", seconds["previous"], "-", None,
            note=f"best of {repeats}; naive N x N sort: {seconds['naive']:.2f} s"),
        Row("eval", f"peak extra memory, {label}", memory["current"] if memory["current"] is not None else float("nan"),
            "MB", "naive N x N", memory["naive"], "<= 15% of naive at N = 20,000",
            (memory["current"] <= 0.15 * memory["naive"]) if (n == 20000 and None not in (memory["current"], memory["naive"])) else None,
            note=f"previous: {fmt(memory['previous'])} MB; the N x N float32 matrix alone: {matrix_mb:,.0f} MB"
                 + (f" ({memory['current'] / matrix_mb:.1%} of it)" if memory["current"] else "")),
        Row("eval", f"results equal to naive and previous (Recall@1,2,4,8, MAP@R, R-precision), {label}",
            float(equal), "bool", target="equal", met=equal,
            note=f"Recall@1 {current.recall[1]:.4f}, MAP@R {current.map_at_r:.4f}"),
    ]


def _peer_rows(label: str, depth: int, x: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...], seconds: dict, memory: dict,
               seen: dict) -> list[Row]:
    """Ours against faiss's flat index: time (the target), its memory, and whether its neighbours score the same."""
    from benchmarks import knn_peer

    neighbours = knn_peer.without_self(seen["faiss"][1], depth)
    peer = naive_scores(neighbours.to(labels.device), labels, ks)
    ours = seen["current"]
    same_first = int((neighbours[:, 0] == first_neighbours(x)).sum())
    ratio = seconds["current"] / seconds["faiss"]
    return [
        Row("eval", f"time, ours against faiss IndexFlatIP add + search at depth {depth + 1} (search only, "
            f"no scoring), {label}", seconds["current"], "s", "faiss IndexFlatIP", seconds["faiss"],
            "<= 1.15x the flat index at N = 20,000", (ratio <= 1.15) if len(x) == 20000 else None,
            note=f"faiss peak extra memory {fmt(memory['faiss'])} MB, ours {fmt(memory['current'])} MB"),
        Row("eval", f"faiss's neighbours scored: results equal to ours, {label}", float(peer == ours), "bool",
            target="-", met=None,
            note=f"top-1 neighbour equal for {same_first:,} of {len(neighbours):,} queries; faiss Recall@1 {peer.recall[1]:.4f}, MAP@R {peer.map_at_r:.4f} (ties and last-bit roundings "
                 f"may order equal-looking neighbours differently)"),
    ]
