"""Synthesis on a diffusion transformer (SD3, FLUX.1, FLUX.2 [klein]): our generation step (block-feature capture,
then with the joint-attention maps of the category words, then with ConceptAttention's too)
against the plain diffusers pipeline, the same modules, batch, dtype, prompts and noise, in one
process.

    python benchmarks/dit_synthesis.py [--model-id embedded/tiny-sd3] [--batch 8] [--steps 28]

The offline tiny models generate 128 px images (an 8x8 token grid); real SD3 / FLUX.1 weights
(a Hub id or a folder) run at their native 1024 px. Guidance: SD3 7.0, FLUX.1 its embedding 3.5,
FLUX.2 [klein] base 4.0 (two transformer calls per step).
"""

from __future__ import annotations

import argparse

import torch
from timing import best_time

from grounded_diffusion.data.prompts import PromptSet
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.models.backbones import BackboneConfig, build_backbone


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-id", default="embedded/tiny-sd3")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--image-size", type=int, default=None, help="default: 128 for the tiny models")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.model_id.startswith("embedded/tiny-")
    config = BackboneConfig(
        model_id=args.model_id,
        dtype=args.dtype,
        num_inference_steps=args.steps,
        capture_step=min(5, args.steps),
        image_size=args.image_size or (128 if tiny else None),
        max_sequence_length=32 if tiny else None,
    )
    backbone = build_backbone(config).to(device)
    samples = list(
        PromptSet({"test": {"two_seen_unseen": args.batch}}).dataset(CategorySplit.named("pascal", 1))
    )
    prompts, seeds = [s["prompt"] for s in samples], [s["seed"] for s in samples]
    words = [s["categories"] for s in samples]
    guidance = {"sd3": 7.0, "flux": 3.5, "flux2": 4.0}[backbone.family]

    pipe = backbone.pipeline()
    noise = backbone.initial_noise(seeds)
    if backbone.family == "flux":
        noise = pipe._pack_latents(noise, len(noise), *backbone.latent_shape())
    size = backbone.image_size

    def plain() -> None:
        pipe(
            prompt=prompts,
            height=size,
            width=size,
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            latents=noise,
            output_type="pt",
            max_sequence_length=backbone.max_sequence_length,
        )

    plain()  # warm-up
    base = best_time(plain, args.repeats)
    capture = best_time(lambda: backbone.generate(prompts, seeds, guidance), args.repeats)
    maps = best_time(
        lambda: backbone.generate(prompts, seeds, guidance, words, concept_attention=False), args.repeats
    )
    concepts = best_time(lambda: backbone.generate(prompts, seeds, guidance, words), args.repeats)

    n = args.batch
    print(f"{args.model_id} ({args.dtype}) on {device}, {size} px, {args.steps} steps, batch {n}")
    print("| run | samples/s | time vs the plain pipeline |")
    print("|---|---|---|")
    print(f"| diffusers pipeline | {n / base:.2f} | 1.00x |")
    print(f"| ours: generation + feature capture | {n / capture:.2f} | {capture / base:.2f}x |")
    print(f"| ours: + joint-attention word maps | {n / maps:.2f} | {maps / base:.2f}x |")
    print(f"| ours: + ConceptAttention maps | {n / concepts:.2f} | {concepts / base:.2f}x |")


if __name__ == "__main__":
    main()
