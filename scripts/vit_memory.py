"""The activation memory of a ViT training step, measured on the CPU: the bytes of every tensor autograd saves
for backward (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once) in one forward of the
embedding network and its proxies under bf16 autocast, per image, and what that gives at a batch, beside the
fp32 weights, gradients and AdamW's two moments. The figure behind `gpu: 0.25` in search_spaces/vit_optuna.yaml.

    PYTHONPATH=. python scripts/vit_memory.py [--batch 180] [--image_size 224]

On a GPU the fused attention saves about as little as the CPU's flash kernel; the CUDA context and evaluation
batches come on top (about 1 GiB), and the GPU check's part (e) measures the peak on a real GPU.
"""
from __future__ import annotations

import argparse

import torch

from tune_upl.config import make_config
from tune_upl.facts import BACKBONES, is_vit
from tune_upl.models import build_model


def saved_bytes_per_image(backbone: str, image_size: int, images: int = 8) -> tuple[float, int]:
    """(bytes autograd saves per image, parameter count) of one forward of the model and its proxies."""
    model = build_model(make_config(backbone_type=backbone, pretrained="none", image_size=image_size,
                                    feature_dim=384), 100)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    batch = torch.randint(0, 256, (images, 3, image_size, image_size), dtype=torch.uint8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings = model(batch)
        model.head(embeddings).sum()
    return sum(storages.values()) / images, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=180)
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args()
    for backbone in (name for name in BACKBONES if is_vit(name) and name.endswith(".dino")):
        per_image, params = saved_bytes_per_image(backbone, args.image_size)
        activations, states = args.batch * per_image / 2**30, params * 16 / 2**30  # weights, grads, 2 moments
        print(f"{backbone}: {params / 1e6:.1f} M parameters; {per_image / 2**20:.1f} MiB saved a image at "
              f"{args.image_size} px; batch {args.batch}: {activations:.2f} GiB of activations + {states:.2f} GiB "
              f"of fp32 weights, gradients and AdamW state = {activations + states:.2f} GiB")


if __name__ == "__main__":
    main()
