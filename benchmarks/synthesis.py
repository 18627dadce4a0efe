"""Synthesis throughput (prompts -> images, features, DAAM maps, oracle masks): batched, as the
predict run does it, vs. one sample at a time, as the authors' code does; plus what DAAM tracing
and the oracle cost.

    python benchmarks/synthesis.py [--model-id embedded/tiny-sd] [--batch 8] [--steps 50]

On the embedded backbone the oracle is a random Mask R-CNN at 128 px (as experiments/offline.yaml).
"""

from __future__ import annotations

import argparse

import torch
from timing import best_time

from grounded_diffusion.data.prompts import PromptSet
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone
from grounded_diffusion.models.oracle import MaskRCNNOracle

OFFLINE_DETECTOR = {
    "min_size": 128,
    "max_size": 128,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 100,
    "box_detections_per_img": 10,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-id", default="embedded/tiny-sd")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--oracle-weights", default=None, help="Mask R-CNN weights (default: random)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    config = BackboneConfig(
        model_id=args.model_id, dtype=args.dtype, branches="uncond+cond", num_inference_steps=args.steps
    )
    backbone = StableDiffusionBackbone(config).to(device)
    detector = OFFLINE_DETECTOR if args.oracle_weights is None else {}
    oracle = MaskRCNNOracle(
        weights=args.oracle_weights,
        score_threshold=0.0 if args.oracle_weights is None else 0.5,
        detector_kwargs=detector,
    ).to(device)
    split = CategorySplit.named("pascal", 1)
    samples = list(PromptSet({"test": {"two_seen_unseen": args.batch}}).dataset(split))
    prompts, seeds = [s["prompt"] for s in samples], [s["seed"] for s in samples]
    words = [s["categories"] for s in samples]

    def synthesise(lo: int, hi: int, trace: bool = True) -> None:
        generation = backbone.generate(prompts[lo:hi], seeds[lo:hi], 7.5, words[lo:hi] if trace else None)
        oracle(generation.images, words[lo:hi])

    synthesise(0, 1)  # warm-up
    batched = best_time(lambda: synthesise(0, args.batch))
    singles = best_time(lambda: [synthesise(i, i + 1) for i in range(args.batch)])
    untraced = best_time(lambda: backbone.generate(prompts, seeds, 7.5, None), repeats=3)
    traced = best_time(lambda: backbone.generate(prompts, seeds, 7.5, words), repeats=3)
    images = backbone.generate(prompts, seeds, 7.5, None).images
    labelling = best_time(lambda: oracle(images, words))

    n = args.batch
    print(f"{args.model_id} ({args.dtype}) on {device}, {args.steps} DDIM steps, guidance 7.5, batch {n}")
    print(f"batched synthesis:    {n / batched:8.2f} samples/s")
    print(f"one sample at a time: {n / singles:8.2f} samples/s")
    print(f"speed-up:             {singles / batched:8.2f}x")
    print(f"DAAM tracing cost:    {100 * (traced / untraced - 1):+8.1f} % of generation time")
    print(f"oracle share:         {100 * labelling / batched:8.1f} % of batched synthesis time")


if __name__ == "__main__":
    main()
