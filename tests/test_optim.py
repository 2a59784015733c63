"""`tune_upl.optim.AdamP` makes the `adamp` package's update: 200 steps side by side on every shape class the
models have, with gradients built so that each projection branch (channel, layer, none) is taken; it loads
the package's checkpoints. (Channels-last conv weights, where the package fails: tests/test_precision.py.)"""
import adamp
import pytest
import torch

from tune_upl import optim

SHAPES = {  # the shape classes of the models' weights
    "conv": (16, 8, 3, 3),
    "linear": (32, 64),
    "embedding": (16, 32),
    "proxies": (10, 16),
    "bias": (32,),
    "batchnorm": (16,),
}
KINDS = ("channel", "layer", "neither")


DELTA = 0.1  # AdamP's default: the thresholds are DELTA/sqrt(channel size) and DELTA/sqrt(numel)


def _channel_orthogonal(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """r minus its part along p, per channel (row of the channel view)."""
    r_c, p_c = r.reshape(len(r), -1), p.reshape(len(p), -1)
    return (r_c - (r_c * p_c).sum(1, keepdim=True) / (p_c * p_c).sum(1, keepdim=True) * p_c).reshape(p.shape)


def _at_cosine(orthogonal: torch.Tensor, p: torch.Tensor, cosine: float, dim: int) -> torch.Tensor:
    """A unit mix of `orthogonal` (orthogonal to p along `dim`: 1 per channel, None the whole) and p, at `cosine`."""
    unit = lambda x: x / x.norm(dim=dim, keepdim=True)  # noqa: E731
    return (1 - cosine ** 2) ** 0.5 * unit(orthogonal) + cosine * unit(p)


def gradient(p: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A gradient for which the package takes branch `kind`, each near its threshold so that a wrong bound
    changes the branch: every channel at 0.9 times the channel bound (channel); each channel a multiple of
    itself, the whole at 0.9 times the layer bound (layer); the same at 1.1 times it (neither)."""
    r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    if p.dim() == 1:
        return r.float()
    p64 = p.detach().double()
    flat_r, flat_p = r.reshape(len(p), -1), p64.reshape(len(p), -1)
    if kind == "channel":
        bound = DELTA / flat_p.shape[1] ** 0.5
        return _at_cosine(_channel_orthogonal(flat_r, flat_p), flat_p, 0.9 * bound, 1).reshape(p.shape).float()
    w = flat_p.square().sum(1)  # each channel's squared norm
    s = torch.randn(len(p), generator=gen, dtype=torch.float64)
    s = s - (s @ w) / (w @ w) * w  # sum_c s_c |p_c|^2 = 0: orthogonal to p as a whole
    orthogonal = s[:, None] * flat_p + 0.01 * _channel_orthogonal(flat_r, flat_p)
    bound = DELTA / p.numel() ** 0.5
    g = _at_cosine(orthogonal.reshape(1, -1), flat_p.reshape(1, -1), (0.9 if kind == "layer" else 1.1) * bound, 1)
    return g.reshape(p.shape).float()


def _package_branches(monkeypatch) -> list[str]:
    """The branch of every projection `adamp.AdamP` makes, read from its own `_projection` calls."""
    taken: list[str] = []
    original_projection, original_cosine = adamp.AdamP._projection, adamp.AdamP._cosine_similarity
    calls = []

    def cosine(self, *args):
        calls.append(1)
        return original_cosine(self, *args)

    def projection(self, p, grad, perturb, delta, wd_ratio, eps):
        calls.clear()
        perturb, wd = original_projection(self, p, grad, perturb, delta, wd_ratio, eps)
        taken.append("neither" if wd == 1 else ("channel", "layer")[len(calls) - 1])
        return perturb, wd

    monkeypatch.setattr(adamp.AdamP, "_cosine_similarity", cosine)
    monkeypatch.setattr(adamp.AdamP, "_projection", projection)
    return taken


def _our_branches(monkeypatch) -> list[torch.Tensor]:
    """Our decisions (device tensors, read only here, after the run)."""
    taken: list[torch.Tensor] = []
    original = optim.projection

    def projection(*args):
        perturb, by_channel, by_layer = original(*args)
        taken.append(torch.stack([by_channel, by_layer]))
        return perturb, by_channel, by_layer

    monkeypatch.setattr(optim, "projection", projection)
    return taken


def _names(decisions: list[torch.Tensor]) -> list[str]:
    return ["channel" if c else "layer" if l else "neither" for c, l in torch.stack(decisions).tolist()]


def relative_errors(ours: dict, theirs: dict) -> dict[str, float]:
    return {n: float((ours[n] - theirs[n]).norm() / theirs[n].norm()) for n in theirs}


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("nesterov", [False, True])
def test_200_steps_equal_the_package_on_every_shape_and_branch(monkeypatch, weight_decay, nesterov):
    gen = torch.Generator().manual_seed(1)
    start = {n: torch.randn(shape, generator=gen) for n, shape in SHAPES.items()}
    params = {"ours": {n: t.clone().requires_grad_() for n, t in start.items()},
              "package": {n: t.clone().requires_grad_() for n, t in start.items()}}

    def groups(which):  # two groups, as the engine's backbone and proxies
        named = params[which]
        return [{"params": [t for n, t in named.items() if n != "proxies"], "lr": 1e-2},
                {"params": [named["proxies"]], "lr": 5e-2}]

    kwargs = dict(weight_decay=weight_decay, nesterov=nesterov)
    ours = optim.AdamP(groups("ours"), delta=DELTA, **kwargs)
    theirs = adamp.AdamP(groups("package"), delta=DELTA, **kwargs)
    package_taken, our_taken = _package_branches(monkeypatch), _our_branches(monkeypatch)
    for step in range(200):
        for i, name in enumerate(SHAPES):
            kind = KINDS[(step + i) % 3]
            for which in params:  # each its own gradient of its own weights, from the same random draw
                p = params[which][name]
                p.grad = gradient(p, kind, torch.Generator().manual_seed(1000 * step + i))
        ours.step()
        theirs.step()
    errors = relative_errors({n: t.detach() for n, t in params["ours"].items()},
                             {n: t.detach() for n, t in params["package"].items()})
    assert max(errors.values()) < 1e-6, errors
    intended = [KINDS[(step + i) % 3] for step in range(200) for i, shape in enumerate(SHAPES.values())
                if len(shape) > 1]
    assert package_taken == intended  # the gradients take the branch they were built for
    assert _names(our_taken) == intended  # and so does ours, tensor by tensor, step by step
    assert {kind: intended.count(kind) for kind in KINDS} == {"channel": 267, "layer": 267, "neither": 266}


def test_the_package_checkpoint_loads_and_continues_as_the_package_does():
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(shape, generator=gen) for shape in SHAPES.values()]
    theirs_params = [t.clone().requires_grad_() for t in start]
    theirs = adamp.AdamP(theirs_params, lr=1e-2, weight_decay=0.05)

    def step(optimizer, tensors, k):
        for i, p in enumerate(tensors):
            p.grad = gradient(p, KINDS[(k + i) % 3], torch.Generator().manual_seed(100 * k + i))
        optimizer.step()

    for k in range(5):
        step(theirs, theirs_params, k)
    saved = torch.load(_saved(theirs.state_dict()), weights_only=True)
    ours_params = [t.detach().clone().requires_grad_() for t in theirs_params]
    ours = optim.AdamP(ours_params, lr=1e-3)
    ours.load_state_dict(saved)
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.state[ours_params[0]]["step"] == 5
    for k in range(5, 25):
        step(theirs, theirs_params, k)
        step(ours, ours_params, k)
    for mine, package in zip(ours_params, theirs_params):
        assert float((mine - package).detach().norm() / package.detach().norm()) < 1e-6
    assert type(ours.state_dict()["state"][0]["step"]) is int  # and back: the package's own layout


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_weights_frozen_for_a_while_keep_their_own_bias_correction():
    """Under warm-up the backbone gets no gradient while the proxies train, so their step counts differ (one
    foreach pass per count here, the package's per-tensor corrections there)."""
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(shape, generator=gen) for shape in (SHAPES["conv"], SHAPES["proxies"], SHAPES["bias"])]
    copies = {which: [t.clone().requires_grad_() for t in start] for which in ("ours", "package")}
    optimizers = {"ours": optim.AdamP(copies["ours"], lr=1e-2, weight_decay=0.05),
                  "package": adamp.AdamP(copies["package"], lr=1e-2, weight_decay=0.05)}
    for k in range(12):
        for which, tensors in copies.items():
            for i, p in enumerate(tensors):
                frozen = i != 1 and k < 4  # the conv weight and the bias wait 4 steps
                p.grad = None if frozen else gradient(p, KINDS[k % 3], torch.Generator().manual_seed(10 * k + i))
            optimizers[which].step()
    assert [optimizers["ours"].state[p]["step"] for p in copies["ours"]] == [8, 12, 8]
    for mine, package in zip(copies["ours"], copies["package"]):
        assert float((mine - package).detach().norm() / package.detach().norm()) < 1e-6
