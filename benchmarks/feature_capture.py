"""Feature capture throughput: one batched UNet call vs. the same samples one by one (the
authors' code runs at batch size 1).

    python benchmarks/feature_capture.py [--model-id embedded/tiny-sd] [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
from timing import best_time

from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-id", default="embedded/tiny-sd")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = StableDiffusionBackbone(BackboneConfig(model_id=args.model_id, dtype=args.dtype)).to(device)
    size = backbone.unet.config.sample_size
    latents = torch.randn(args.batch, backbone.unet.config.in_channels, size, size, device=device)
    embeds = backbone.encode_prompts(["a photograph of a dog and a cat"] * args.batch)
    t = torch.full((args.batch,), backbone.timestep, device=device)

    batched = best_time(lambda: backbone.features(latents, t, embeds), args.repeats, warmup=True)
    singles = best_time(
        lambda: [backbone.features(latents[i : i + 1], t[:1], embeds[i : i + 1]) for i in range(args.batch)],
        args.repeats,
        warmup=True,
    )
    print(f"model {args.model_id} ({args.dtype}) on {device}, batch {args.batch}, latent {size}x{size}")
    print(f"batched:     {args.batch / batched:8.1f} samples/s")
    print(f"one by one:  {args.batch / singles:8.1f} samples/s")
    print(f"speed-up:    {singles / batched:8.2f}x")


if __name__ == "__main__":
    main()
