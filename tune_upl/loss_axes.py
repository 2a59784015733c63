"""The Unified Proxy Loss's two design axes (what its terms anchor on, how a term adds its entries) and its
two named cells.

Defined once, in a leaf without torch, for the config fields (`loss_anchor`, `loss_aggregation`), the loss
itself and the ablation report: the config reads the losses' signatures inside functions, so the loss
module cannot be the home of names the config needs at import time."""
from typing import Literal, get_args

Anchor = Literal["proxy", "sample", "both"]
Aggregation = Literal["sum", "mean"]
ANCHORS: tuple[str, ...] = get_args(Anchor)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
DEFAULT_CELL = ("both", "mean")  # balanced_proxy's own: both anchors, count-balanced terms
PROXY_ANCHOR_CELL = ("proxy", "sum")  # Proxy-Anchor (Kim et al. 2020)
