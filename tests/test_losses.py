"""Proxy losses: literal values, an independent float64 reference, stability at scale 64."""
import math

import pytest
import torch

from tune_upl.facts import LOSS_PARAMETERS
from tune_upl.losses import LOSSES, build_loss


def reference_proxy_anchor(sims, labels, scale, margin):
    """Proxy-Anchor as plain float64 loops over proxies and samples (Kim et al. 2020, eq. 4)."""
    n, c = len(sims), len(sims[0])
    pos_sum, n_pos_proxies, neg_sum = 0.0, 0, 0.0
    for p in range(c):
        positives = [math.exp(-scale * (sims[x][p] - margin)) for x in range(n) if labels[x] == p]
        negatives = [math.exp(scale * (sims[x][p] + margin)) for x in range(n) if labels[x] != p]
        if positives:
            pos_sum += math.log(1 + sum(positives))
            n_pos_proxies += 1
        neg_sum += math.log(1 + sum(negatives))
    return pos_sum / n_pos_proxies + neg_sum / c


def test_proxy_anchor_literal_2x2():
    # S = [[0.5, -0.2], [0.1, 0.3]], labels [0, 1], scale 1, margin 0:
    # pos: proxy 0 has x0 (s=0.5): log(1+e^-0.5) = 0.474077; proxy 1 has x1 (s=0.3): log(1+e^-0.3) = 0.554355
    #      mean over the 2 proxies with positives = 0.514216
    # neg: proxy 0 sees x1 (s=0.1): log(1+e^0.1) = 0.744397; proxy 1 sees x0 (s=-0.2): log(1+e^-0.2) = 0.598139
    #      mean over all 2 proxies = 0.671268
    # total = 1.185484
    sims = torch.tensor([[0.5, -0.2], [0.1, 0.3]])
    loss = build_loss("proxy_anchor", scale=1.0, margin=0.0)(sims, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(1.185484, abs=1e-5)


def test_proxy_anchor_equals_float64_reference():
    gen = torch.Generator().manual_seed(0)
    sims = torch.rand(16, 7, generator=gen) * 2 - 1
    labels = torch.randint(0, 5, (16,), generator=gen)  # proxies 5 and 6 have no positives
    loss = build_loss("proxy_anchor", scale=32, margin=0.1)(sims, labels)
    expected = reference_proxy_anchor(sims.double().tolist(), labels.tolist(), 32.0, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_finite_at_scale_64_extremes(name):
    loss_fn = build_loss(name, **{p: {"scale": 64, "margin": 0.1}.get(p) for p in LOSS_PARAMETERS[name]})
    for sims, labels in [
        (torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), torch.tensor([1, 0])),  # all wrong, saturated
        (torch.ones(4, 3), torch.zeros(4, dtype=torch.long)),  # one class in the batch
        (torch.tensor([[-1.0]]), torch.tensor([0])),  # B = 1, C = 1: no negatives at all
    ]:
        sims = sims.clone().requires_grad_(True)
        loss = loss_fn(sims, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(sims.grad).all()
        low = sims.detach().bfloat16().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp_loss = loss_fn(low, labels)
        amp_loss.backward()
        assert amp_loss.dtype == torch.float32 and torch.isfinite(amp_loss) and torch.isfinite(low.grad).all()


def test_balanced_proxy_mean_lowers_the_margin_by_log_n_over_scale():
    """The count-balanced term over n entries equals the summed term with the margin lowered by ln(n)/scale."""
    from tune_upl.losses import UnifiedProxyLoss

    sims = torch.rand(8, 1) * 2 - 1
    labels = torch.zeros(8, dtype=torch.long)  # 8 positives for proxy 0, no negatives
    mean = UnifiedProxyLoss(scale=32, margin=0.1, anchor="proxy", aggregation="mean")(sims, labels)
    summed = UnifiedProxyLoss(scale=32, margin=0.1 - math.log(8) / 32, anchor="proxy", aggregation="sum")(sims, labels)
    assert mean.item() == pytest.approx(summed.item(), rel=1e-5)


def test_unknown_loss_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: balanced_proxy, normalized_softmax, proxy_anchor, proxy_nca"):
        build_loss("triplet")


def test_proxy_anchor_is_the_unified_loss_with_proxy_anchor_and_sum():
    from tune_upl.losses import UnifiedProxyLoss

    gen = torch.Generator().manual_seed(1)
    sims, labels = torch.rand(12, 6, generator=gen) * 2 - 1, torch.randint(0, 6, (12,), generator=gen)
    unified = UnifiedProxyLoss(scale=32, margin=0.1, anchor="proxy", aggregation="sum")(sims, labels)
    assert unified.item() == pytest.approx(reference_proxy_anchor(sims.double().tolist(), labels.tolist(), 32, 0.1), rel=1e-5)


def test_proxy_nca_and_normalized_softmax_against_float64_loops():
    gen = torch.Generator().manual_seed(2)
    sims, labels = torch.rand(5, 4, generator=gen) * 2 - 1, torch.tensor([0, 1, 1, 3, 2])
    s, y, a = sims.double().tolist(), labels.tolist(), 16.0
    nca = sum(-a * s[x][y[x]] + math.log(sum(math.exp(a * s[x][p]) for p in range(4) if p != y[x])) for x in range(5)) / 5
    softmax = sum(-a * s[x][y[x]] + math.log(sum(math.exp(a * s[x][p]) for p in range(4))) for x in range(5)) / 5
    assert build_loss("proxy_nca", scale=a)(sims, labels).item() == pytest.approx(nca, rel=1e-5)
    assert build_loss("normalized_softmax", scale=a)(sims, labels).item() == pytest.approx(softmax, rel=1e-5)
    assert build_loss("proxy_nca", scale=a)(torch.ones(3, 1), torch.zeros(3, dtype=torch.long)).item() == 0.0  # C = 1


def test_each_loss_takes_the_config_fields_its_signature_names():
    """A loss's parameters come from its builder's signature: each is a TrialConfig field, a margin exists
    only where the loss has one, and the loss option's help names every loss."""
    from tune_upl.config import FIELD_HELP, FIELD_NAMES

    assert LOSS_PARAMETERS == {"balanced_proxy": ("scale", "margin", "loss_anchor", "loss_aggregation"),
                               "normalized_softmax": ("scale",),
                               "proxy_anchor": ("scale", "margin"), "proxy_nca": ("scale",)}
    assert all(set(params) <= set(FIELD_NAMES) for params in LOSS_PARAMETERS.values())
    assert all(name in FIELD_HELP["loss_name"] for name in LOSSES)
