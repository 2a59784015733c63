"""Proxy losses: one small class each, registered in `LOSSES`, built with `build_loss(name, **params)`; their
names and parameters are `facts.LOSS_PARAMETERS`.

Every loss takes `(similarities [B, C], labels [B])`, where `similarities` are cosines between the
batch's embeddings and the class proxies, and works in float32 with log-sum-exp forms so that it stays
finite at scale 64 with similarities near +-1, also under autocast.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tune_upl.loss_axes import AGGREGATIONS, ANCHORS, DEFAULT_CELL, PROXY_ANCHOR_CELL


def masked_log1p_sum_exp(logits: torch.Tensor, mask: torch.Tensor, dim: int, mean: bool = False) -> torch.Tensor:
    """agg(v, m) = log(1 + sum_j m_j exp(v_j) [/ max(1, sum_j m_j)]) along `dim`.

    A log-sum-exp over [0, v - ln n] with masked entries at -inf: an empty mask gives exactly 0 with
    finite gradients (a `where(m, exp(v), 0)` would overflow in its unused branch and poison gradients).
    """
    masked = logits.masked_fill(~mask, float("-inf"))
    if mean:
        masked = masked - mask.sum(dim=dim, keepdim=True).clamp(min=1).log()
    zeros = torch.zeros_like(masked.narrow(dim, 0, 1))
    return torch.logsumexp(torch.cat([zeros, masked], dim=dim), dim=dim)


def label_mask(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, C] bool, True at each sample's class: `F.one_hot` without its range check (a host sync on a GPU)."""
    return labels[:, None] == torch.arange(num_classes, device=labels.device)


class UnifiedProxyLoss(nn.Module):
    """Proxy-anchored and/or sample-anchored proxy loss with sum or count-balanced (mean) aggregation.

    With S the similarities, Y the one-hot labels, a the scale, d the margin, P+ the proxies with positives:
      T_P = 1/|P+| sum_{p in P+} agg(-a(S[:,p] - d), Y[:,p]) + 1/C sum_p agg(a(S[:,p] + d), 1 - Y[:,p])
      T_S = 1/B sum_x agg(-a(S[x,:] - d), Y[x,:]) + 1/B sum_x agg(a(S[x,:] + d), 1 - Y[x,:])
    `anchor` proxy -> T_P (Proxy-Anchor, Kim et al. CVPR 2020, with `sum`), sample -> T_S, both -> (T_P + T_S)/2.
    """

    def __init__(self, scale: float = 32.0, margin: float = 0.1, anchor: str = "proxy", aggregation: str = "sum"):
        super().__init__()
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be {', '.join(ANCHORS)}, got {anchor!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        self.scale, self.margin = float(scale), float(margin)
        self.anchor, self.mean = anchor, aggregation == "mean"

    def _term(self, sims: torch.Tensor, positive: torch.Tensor, dim: int) -> torch.Tensor:
        """Anchored on the entries of the other axis: dim=0 anchors on proxies, dim=1 on samples."""
        pos = masked_log1p_sum_exp(-self.scale * (sims - self.margin), positive, dim, self.mean)
        neg = masked_log1p_sum_exp(self.scale * (sims + self.margin), ~positive, dim, self.mean)
        if dim == 1:
            return pos.mean() + neg.mean()
        with_positives = positive.any(dim=0)  # a where, not pos[with_positives]: no host sync on a GPU
        return torch.where(with_positives, pos, 0.0).sum() / with_positives.sum().clamp(min=1) + neg.mean()

    def forward(self, similarities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sims = similarities.float()
        positive = label_mask(labels, sims.shape[1])
        if self.anchor == "proxy":
            return self._term(sims, positive, dim=0)
        if self.anchor == "sample":
            return self._term(sims, positive, dim=1)
        return (self._term(sims, positive, dim=0) + self._term(sims, positive, dim=1)) / 2


def proxy_anchor(scale: float = 32.0, margin: float = 0.1) -> UnifiedProxyLoss:
    """Proxy-Anchor: proxy-anchored terms summed over the batch."""
    anchor, aggregation = PROXY_ANCHOR_CELL
    return UnifiedProxyLoss(scale, margin, anchor=anchor, aggregation=aggregation)


def balanced_proxy(scale: float = 32.0, margin: float = 0.1, loss_anchor: Optional[str] = None,
                   loss_aggregation: Optional[str] = None) -> UnifiedProxyLoss:
    """The Unified Proxy Loss as this project defines it: both anchors, count-balanced (mean) terms. Either
    axis can be set (the ablation's cells); None keeps the loss's own, so the default stays this corner."""
    own_anchor, own_aggregation = DEFAULT_CELL
    return UnifiedProxyLoss(scale, margin, anchor=loss_anchor or own_anchor,
                            aggregation=loss_aggregation or own_aggregation)


class ProxyNCALoss(nn.Module):
    """ProxyNCA (Movshovitz-Attias et al., ICCV 2017), the positive excluded from the denominator:
    1/B sum_x [-a S[x, y_x] + log sum_{p != y_x} exp(a S[x, p])]; a sample with no negative proxy adds 0."""

    def __init__(self, scale: float = 32.0):
        super().__init__()
        self.scale = float(scale)

    def forward(self, similarities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.scale * similarities.float()
        positive = label_mask(labels, logits.shape[1])
        has_negative = (~positive).any(dim=1)
        # rows without negatives get finite stand-ins, so no -inf reaches logsumexp's gradient
        negatives = logits.masked_fill(positive, float("-inf")).where(has_negative[:, None], torch.zeros_like(logits))
        terms = torch.logsumexp(negatives, dim=1) - logits.gather(1, labels[:, None]).squeeze(1)
        return (terms * has_negative.float()).mean()


class NormalizedSoftmaxLoss(nn.Module):
    """Normalized softmax (Zhai & Wu, BMVC 2019): cross-entropy over scale * cosine; scale = 1/temperature."""

    def __init__(self, scale: float = 32.0):
        super().__init__()
        self.scale = float(scale)

    def forward(self, similarities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.scale * similarities.float(), labels)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "balanced_proxy": balanced_proxy,
    "normalized_softmax": NormalizedSoftmaxLoss,
    "proxy_anchor": proxy_anchor,
    "proxy_nca": ProxyNCALoss,
}
# Each builder's parameters are named as TrialConfig fields and listed in `facts.LOSS_PARAMETERS`, which config
# validates against without torch; tests/test_facts.py checks them against the signatures.


def build_loss(name: str, **params: float) -> nn.Module:
    """`build_loss('proxy_anchor', scale=32, margin=0.1)`; unknown names say what is allowed."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss_name {name!r}; allowed: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**params)
