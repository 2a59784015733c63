"""Mixed precision: the backbone and the embedding layer run in bf16 or fp16, but the L2 normalisation and the
cosine similarities are float32 computed outside autocast, so what reaches the loss is not rounded to bf16's
steps (~0.004 near +-1: a quarter logit at scale 64). Real steps on the CPU, whose autocast has both dtypes;
which dtype `amp: auto` takes on a GPU is decided by torch's capability check, run on the CUDA stand-in."""
import pytest
import torch
import torch.nn.functional as F
from fake_cuda import fake_cuda

from tune_upl.config import make_config
from tune_upl.engine import resolve_amp, train_epoch


@pytest.mark.parametrize("capability, low", [((9, 0), torch.bfloat16), ((7, 5), torch.float16)])
def test_similarities_reach_the_loss_in_float32_unrounded_while_the_backbone_runs_low(
        tiny_values, small_run, capability, low):
    with fake_cuda(capability=capability):  # a GPU with native bf16 (H100) or without (T4)
        assert resolve_amp("auto", torch.device("cuda", 0)) == low
    amp = "bf16" if low == torch.bfloat16 else "fp16"
    cfg = make_config(tiny_values, num_epochs=1, feature_dim=16, lr=1e-2, optimizer="sgd", amp=amp,
                      image_size=32, batch_size=16)
    run = small_run(cfg, train_batches=2, eval_images=32)
    assert run.amp_dtype == low and (run.scaler is not None) == (low == torch.float16)
    seen: dict[str, list] = {"backbone": [], "embedding": [], "head": [], "loss": []}
    net = run.model.net
    hooks = [
        net.backbone.register_forward_hook(lambda m, args, out: seen["backbone"].append(out.dtype)),
        net.embedding.register_forward_hook(lambda m, args, out: seen["embedding"].append(out.dtype)),
        run.model.head.register_forward_hook(lambda m, args, out: seen["head"].append(
            (args[0].detach().clone(), m.proxies.detach().clone()))),
        run.loss_fn.register_forward_pre_hook(lambda m, args: seen["loss"].append(args[0].detach().clone())),
    ]
    metrics = train_epoch(run)
    for hook in hooks:
        hook.remove()
    assert seen["backbone"] and set(seen["backbone"]) == {low}  # the network really ran in low precision
    assert set(seen["embedding"]) == {low}
    assert len(seen["loss"]) == len(seen["head"]) == 2
    for similarities, (embeddings, proxies) in zip(seen["loss"], seen["head"]):
        assert similarities.dtype == embeddings.dtype == torch.float32
        assert torch.allclose(embeddings.norm(dim=1), torch.ones(len(embeddings)), atol=1e-6)
        exact = embeddings.double() @ F.normalize(proxies.double(), dim=-1).t()
        assert (similarities.double() - exact).abs().max() < 1e-6
        rounded = similarities.to(low).float()  # what the loss saw when the head ran under autocast
        assert (rounded - similarities).abs().max() > 1e-4
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and metrics["val_recall@1"] > 0


def test_channels_last_reaches_the_backbone_after_the_models_normalisation(tiny_values, small_run):
    run = small_run(make_config(tiny_values, num_epochs=1, feature_dim=8, image_size=32, batch_size=16,
                                channels_last=True), train_batches=1, eval_images=16)
    formats = []
    hook = run.model.net.backbone.register_forward_pre_hook(lambda m, args: formats.append(
        (args[0].dtype, args[0].is_contiguous(memory_format=torch.channels_last))))
    train_epoch(run)
    hook.remove()
    assert formats and set(formats) == {(torch.float32, True)}


def test_adamp_steps_channels_last_weights_as_the_package_steps_contiguous_ones():
    """The `adamp` package's AdamP fails on a channels-last conv weight (`.view`); channels-last is the GPU
    default. Ours (`optimizer: adamp`) steps it as the package steps the same weight stored contiguous."""
    import adamp

    from tune_upl.optim import OPTIMIZERS

    torch.manual_seed(0)
    plain = torch.nn.Conv2d(3, 8, 3)
    last = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    last.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 8)
    probe = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    probe(x.contiguous(memory_format=torch.channels_last)).sum().backward()
    with pytest.raises(RuntimeError, match="view"):
        adamp.AdamP(probe.parameters()).step()
    for net, inputs, make in (
            (plain, x, lambda groups: adamp.AdamP(groups, weight_decay=1e-4)),
            (last, x.contiguous(memory_format=torch.channels_last), lambda groups: OPTIMIZERS["adamp"](groups, 1e-4))):
        optimizer = make([{"params": list(net.parameters()), "lr": 1e-2}])
        for _ in range(3):
            optimizer.zero_grad()
            net(inputs).square().sum().backward()
            optimizer.step()
    assert last.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain.weight, last.weight, atol=1e-6)
