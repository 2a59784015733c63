"""Each row's `depth` nearest neighbours, ordered by (-rounded similarity, index).

The tie rule: similarities are compared at a resolution of 2^-RESOLUTION_BITS (`cells`: each value rounded
to the nearest multiple, halves up), and neighbours whose rounded similarities are equal are ordered by
ascending index. Why round: exact ties in real arithmetic (duplicated images, collapsed embeddings, grid-like
features) come out of a matrix product a few units in the last place apart, and how they differ depends on
the kernel (the BLAS library, the CPU, the GPU, the product's shape). Compared exactly, such ties would be
broken by those roundings; rounded, they stay ties and are broken by index. What is guaranteed: the order
depends on each similarity's rounded value only, so a product that rounds differently changes it only
where a similarity lies within that product's error (a few units in the last place of float32: about 1e-7
near 1 at d = 6, typically under 1e-6 at d = 512) of a rounding boundary (an odd multiple of
2^-(RESOLUTION_BITS + 1)). At 2^-14 (6.1e-5 in cosine) the resolution is far finer than the network's own
precision (bf16 keeps 8 bits), so rounding merges only neighbours no model can tell apart.

This is where exact retrieval spends its time after the matrix product, so it avoids `topk` over whole
rows (about 4 ns an element on a CPU core: 40% of the product's time at depth 100, d = 512). Instead it bounds
each row's `depth`-th value from below by block maxima, which cost one pass of vectorised `max`:
`depth` disjoint blocks whose maxima are all >= t hold `depth` values >= t (super-blocks of 64 columns
where a row has `depth` of them, else blocks of 8: a row needs 8 x depth columns for this, narrower ones
take `topk`). Every value >= that bound is
then a candidate, so the candidates hold every value at or above the row's `depth`-th, ties included:
sorting the candidates by (-value, index) is sorting the whole row. A row has ~1.4 x depth candidates, so
this costs a pass of `max`, a few small gathers and a sort of a few hundred values per row.
With rounding, the bound is lowered to the bottom of its cell, so the candidates hold every value whose
rounded similarity reaches the row's `depth`-th; only the candidates are rounded.
Rows where the bound admits too many candidates (heavy ties: duplicated or collapsed embeddings) are
sorted in full, a few rows at a time, so memory stays a few columns per row either way.
"""
from __future__ import annotations

import torch

RESOLUTION_BITS = 14  # similarities are compared at multiples of 2^-14 (see the module's docstring)
BLOCK = 8  # columns per block, and blocks per super-block: a row of n columns has n / 64 super-blocks
MAX_BLOCKS = 4  # a row whose candidate blocks exceed MAX_BLOCKS * depth + 64 is sorted in full instead
FULL_SORT_ROWS = 64  # rows sorted in full at a time: 64 x n values and int64 indices


def cells(values: torch.Tensor) -> torch.Tensor:
    """Similarities as they are compared: rounded to multiples of 2^-RESOLUTION_BITS, in units of it (whole
    numbers as float32, halves rounded up; -inf stays -inf). Exact for |value| <= 1: the scaling is by a power
    of two, and the fraction is compared with a half instead of added to it (an addition would round)."""
    scaled = values * 2.0 ** RESOLUTION_BITS
    whole = torch.floor(scaled)
    return whole + (scaled - whole >= 0.5)


def cell_bottom(values: torch.Tensor) -> torch.Tensor:
    """The smallest similarity in each value's cell: every value at or above it rounds to the same cell or a
    higher one."""
    return (cells(values) - 0.5) / 2.0 ** RESOLUTION_BITS


def _stable_order(values: torch.Tensor, depth: int) -> torch.Tensor:
    """Positions of the first `depth` of each row under a stable descending sort."""
    return torch.sort(values, dim=1, descending=True, stable=True).indices[:, :depth]


def _full_sort(sims: torch.Tensor, rows: torch.Tensor, depth: int, out: torch.Tensor) -> None:
    """`out[rows]` = the first `depth` of each row's stable descending sort of its cells, a few rows at a time."""
    for start in range(0, len(rows), FULL_SORT_ROWS):
        part = rows[start:start + FULL_SORT_ROWS]
        out[part] = _stable_order(cells(sims[part]), depth)


def top_depth_by_topk(sims: torch.Tensor, depth: int) -> torch.Tensor:
    """The same order for rows too narrow for blocks to pay (and the method before them): `topk` of
    `depth + 1` cells, its first `depth` reordered by (-cell, index); a row with a tie across the cut is
    sorted in full, since topk may have picked the wrong ones."""
    keys = cells(sims)
    if depth >= keys.shape[1]:
        return _stable_order(keys, depth)
    values, indices = torch.topk(keys, depth + 1, dim=1)  # sorted; one more, to see a tie at the cut
    tied = values[:, depth] == values[:, depth - 1]
    indices, by_index = indices[:, :depth].sort(dim=1)
    indices = indices.gather(1, _stable_order(values[:, :depth].gather(1, by_index), depth))
    if bool(tied.any()):
        _full_sort(sims, tied.nonzero().squeeze(1), depth, indices)
    return indices


def _block_max(values: torch.Tensor) -> torch.Tensor:
    """Maxima of BLOCK strided blocks: block j of a row holds columns j, j + m, j + 2m, ... (m = n // BLOCK),
    so the reduction is BLOCK vectorised row maxima. The last n % BLOCK columns are in no block."""
    rows, n = values.shape
    m = n // BLOCK
    return values[:, :BLOCK * m].view(rows, BLOCK, m).amax(dim=1)


def _ragged(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, num_rows: int, fill_col: int):
    """Row-major (row, col, value) triples, rows ascending, as a padded (num_rows, widest) pair of value and
    column matrices; padding is -inf at column `fill_col`, so it sorts after every real entry."""
    counts = torch.bincount(rows, minlength=num_rows)
    width = int(counts.max()) if len(rows) else 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=rows.device) - starts[rows]
    padded = torch.full((num_rows, width), float("-inf"), dtype=values.dtype, device=values.device)
    padded_cols = torch.full((num_rows, width), fill_col, dtype=torch.long, device=values.device)
    padded[rows, slot] = values
    padded_cols[rows, slot] = cols
    return padded, padded_cols


def top_depth(sims: torch.Tensor, depth: int) -> torch.Tensor:
    """Indices of the `depth` largest entries of each row, ordered by (-value, index): a stable sort's first
    `depth` columns, exactly, without sorting whole rows."""
    sims = sims.contiguous()
    num_rows, n = sims.shape
    m = n // BLOCK  # blocks of BLOCK columns
    if m < depth or depth < 1:
        return top_depth_by_topk(sims, depth)
    blocks = _block_max(sims)  # (rows, m)
    # disjoint groups of columns: super-blocks of BLOCK blocks where a row has `depth` of them, else the
    # blocks themselves (a deep search on a narrow row, e.g. Recall@1000 over SOP's 60,502 images)
    groups = _block_max(blocks) if m // BLOCK >= depth else blocks
    # the depth-th largest group maximum: depth disjoint groups hold a value >= it; lowered to the bottom of
    # its cell, so every value rounding to the row's depth-th cell or above is a candidate
    bound = cell_bottom(torch.topk(groups, depth, dim=1, sorted=False).values.amin(dim=1, keepdim=True))
    # candidate blocks: those whose maximum reaches the bound (a block below it holds no candidate)
    block_rows, block_ids = (blocks >= bound).nonzero(as_tuple=True)
    heavy = torch.bincount(block_rows, minlength=num_rows) > MAX_BLOCKS * depth + 64
    any_heavy = bool(heavy.any())
    if any_heavy:
        keep = (~heavy[block_rows]).nonzero().squeeze(1)
        block_rows, block_ids = block_rows[keep], block_ids[keep]
    # every column of those blocks (flat positions in `sims`), values below the bound dropped
    flat = ((block_rows * n + block_ids)[:, None] + torch.arange(BLOCK, device=sims.device) * m).view(-1)
    values = sims.view(-1).index_select(0, flat)
    above = (values.view(-1, BLOCK) >= bound.view(-1).index_select(0, block_rows)[:, None]).view(-1)
    above = above.nonzero().squeeze(1)
    flat, values = flat[above], values[above]
    padded, padded_cols = _ragged(flat // n, flat % n, values, num_rows, n)
    if BLOCK * m < n:  # the columns in no block
        tail = sims[:, BLOCK * m:]
        above = tail >= bound
        padded = torch.cat([padded, torch.where(above, tail, float("-inf"))], dim=1)
        tail_cols = torch.arange(BLOCK * m, n, device=sims.device).expand_as(tail)
        padded_cols = torch.cat([padded_cols, torch.where(above, tail_cols, n)], dim=1)
    if not any_heavy:
        return _sorted_candidates(padded, padded_cols, depth)
    order = torch.empty(num_rows, depth, dtype=torch.long, device=sims.device)
    light = (~heavy).nonzero().squeeze(1)
    if len(light):  # each light row has at least `depth` candidates
        order[light] = _sorted_candidates(padded[light], padded_cols[light], depth)
    _full_sort(sims, heavy.nonzero().squeeze(1), depth, order)
    return order


def _sorted_candidates(values: torch.Tensor, cols: torch.Tensor, depth: int) -> torch.Tensor:
    """The columns of each row's first `depth` candidates by (-cell, column): one sort of a whole-number key
    (padding and the query itself, at -inf, sort last)."""
    limit = 2**RESOLUTION_BITS + 1  # beyond every cell of a similarity in [-1, 1]
    rank = limit - cells(values).clamp(min=-limit).long()  # 0 for the highest similarity
    keys = rank * (cols.max() + 1) + cols if cols.numel() else cols
    return cols.gather(1, keys.sort(dim=1).indices[:, :depth])
