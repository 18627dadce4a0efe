"""How well the shapes world's trained text-to-image model draws what its prompts name: for each
prompt group of paper Tab. 1, the fraction of generated images in which the oracle finds every
named object (score >= ``min_score``). ``make world`` prints it after training; the README
quotes it.

    python -m grounded_diffusion.world --per-group 50
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from grounded_diffusion.data.prompts import GROUPS, PromptSet
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.models.backbone import load_pipeline
from grounded_diffusion.models.oracle import SegmenterOracle
from grounded_diffusion.models.shapes_sd import SHAPES_ORACLE_ID, SHAPES_SD_ID


@torch.no_grad()
def found_rates(
    pipe, oracle, split: CategorySplit, per_group: int, guidance_scale: float = 4.0, num_inference_steps: int = 20,
    min_score: float = 0.5, seed: int = 0, batch_size: int = 25, progress: bool = True,
) -> dict[str, float]:  # fmt: skip
    """Generate ``per_group`` prompts of each group (PromptSet's samples, seeded by id) and
    return, per group, the fraction of images in which the oracle finds every named object."""
    prompts = PromptSet({"eval": {g: per_group for g in GROUPS}}, seed=seed)
    samples = [prompts.sample(*item, split) for item in prompts.ids()]
    found = {g: [] for g in GROUPS}
    for start in tqdm(range(0, len(samples), batch_size), desc="generate + oracle", disable=not progress):
        batch = samples[start : start + batch_size]
        generators = [torch.Generator(pipe.device).manual_seed(s["seed"]) for s in batch]
        images = pipe(
            [s["prompt"] for s in batch], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            generator=generators, output_type="pt",
        ).images  # fmt: skip
        _, scores = oracle((images * 255).round().to(torch.uint8), [s["categories"] for s in batch])
        for sample, sample_scores in zip(batch, scores):
            found[sample["group"]].append(bool((sample_scores[: len(sample["categories"])] >= min_score).all()))
    return {g: sum(v) / len(v) for g, v in found.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default=SHAPES_SD_ID)
    parser.add_argument("--oracle", default=SHAPES_ORACLE_ID)
    parser.add_argument("--per-group", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1, help="prompt set seed (the quickstart synthesises with 0)")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model_id, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rates = found_rates(
        pipe, SegmenterOracle(args.oracle), CategorySplit.named("shapes", 1), args.per_group, args.guidance_scale,
        args.steps, seed=args.seed,
    )  # fmt: skip
    print(f"\nImages in which the oracle finds every named object ({args.per_group} prompts per group, "
          f"guidance {args.guidance_scale:g}, {args.steps} DDIM steps):\n")  # fmt: skip
    print("| " + " | ".join(GROUPS) + " |")
    print("|" + "---|" * len(GROUPS))
    print("| " + " | ".join(f"{100 * rates[g]:.0f}%" for g in GROUPS) + " |")


if __name__ == "__main__":
    main()
