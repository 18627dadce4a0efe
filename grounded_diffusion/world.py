"""How well the shapes world's trained text-to-image model draws what its prompts name: for each
prompt group of paper Tab. 1, the fraction of generated images in which the oracle finds every
named object (score >= ``min_score``). ``make world`` prints it after training; the README
quotes it. With ``--daam-by-resolution``: how well DAAM's maps from the cross-attention layers of
each latent resolution alone localise the named object, and from their inverted maps.

    python -m grounded_diffusion.world --per-group 50
    python -m grounded_diffusion.world --daam-by-resolution --per-group 50
    python -m grounded_diffusion.world --segment outputs/shapes/head   # a head's mIoU on rendered scenes
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torchmetrics.classification import MulticlassJaccardIndex
from tqdm import tqdm

from grounded_diffusion.data.prompts import GROUPS, PromptSet
from grounded_diffusion.data.shapes_world import SHAPES_WORLD, render_shapes_scene
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.metrics import CategoryIoU
from grounded_diffusion.models.backbone import load_pipeline
from grounded_diffusion.models.daam import DAAMTracer, normalized_heat_maps
from grounded_diffusion.models.oracle import SegmenterOracle
from grounded_diffusion.models.shapes_sd import SHAPES_ORACLE_ID, SHAPES_SD_ID


def generate(pipe, samples: list[dict], guidance_scale: float, num_inference_steps: int) -> torch.Tensor:
    """uint8 images [B, 3, H, W] of the samples' prompts, each drawn from its own seed."""
    images = pipe(
        [s["prompt"] for s in samples],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator(pipe.device).manual_seed(s["seed"]) for s in samples],
        output_type="pt",
    ).images
    return (images * 255).round().to(torch.uint8)


@torch.no_grad()
def found_rates(
    pipe,
    oracle,
    split: CategorySplit,
    per_group: int,
    guidance_scale: float = 4.0,
    num_inference_steps: int = 20,
    min_score: float = 0.5,
    seed: int = 0,
    batch_size: int = 25,
    progress: bool = True,
) -> dict[str, float]:
    """Generate ``per_group`` prompts of each group (PromptSet's samples, seeded by id) and
    return, per group, the fraction of images in which the oracle finds every named object."""
    prompts = PromptSet({"eval": {g: per_group for g in GROUPS}}, seed=seed)
    samples = [prompts.sample(*item, split) for item in prompts.ids()]
    found = {g: [] for g in GROUPS}
    for start in tqdm(range(0, len(samples), batch_size), desc="generate + oracle", disable=not progress):
        batch = samples[start : start + batch_size]
        images = generate(pipe, batch, guidance_scale, num_inference_steps)
        _, scores = oracle(images, [s["categories"] for s in batch])
        for sample, sample_scores in zip(batch, scores):
            found[sample["group"]].append(
                bool((sample_scores[: len(sample["categories"])] >= min_score).all())
            )
    return {g: sum(v) / len(v) for g, v in found.items()}


@torch.no_grad()
def daam_by_resolution(
    pipe,
    oracle,
    split: CategorySplit,
    per_group: int,
    thresholds=(0.4, 0.6),
    guidance_scale: float = 4.0,
    num_inference_steps: int = 20,
    min_score: float = 0.7,
    seed: int = 0,
    batch_size: int = 20,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """mIoU (%, over the categories drawn) of DAAM masks on one-object images against the oracle's
    (objects it scores under ``min_score`` left out, as Protocol I's test filter): from all
    traced layers (DAAM itself), from the layers of each latent resolution alone, and from the same
    maps inverted (1 - map: attention that avoids the object). Keys: row, then "map > τ" or
    "inverted > τ"; the row "all-foreground" is the trivial predictor."""
    prompts = PromptSet({"eval": {"one_seen": per_group, "one_unseen": per_group}}, seed=seed)
    samples = [prompts.sample(*item, split) for item in prompts.ids()]
    metrics: dict[tuple[str, str], CategoryIoU] = {}

    def score(row: str, column: str, masks, truth, categories) -> None:
        metric = metrics.setdefault((row, column), CategoryIoU(len(split.categories)))
        metric.update(masks, truth, categories)

    for start in tqdm(
        range(0, len(samples), batch_size), desc="generate + DAAM + oracle", disable=not progress
    ):
        batch = samples[start : start + batch_size]
        words = [s["categories"] for s in batch]
        tracer = DAAMTracer(pipe.unet)
        with tracer.trace(pipe.tokenizer, [s["prompt"] for s in batch], words, pipe.unet.config.sample_size):
            images = generate(pipe, batch, guidance_scale, num_inference_steps)
        truth, scores = oracle(images, words)
        truth = truth[:, :1].bool()
        categories = torch.tensor([[split.index(w[0])] for w in words])
        categories = torch.where(scores[:, :1] >= min_score, categories, -1)  # -1: not scored
        score("all-foreground", "", torch.ones_like(truth), truth, categories)
        sides = tracer.layer_sides()
        rows = {"all layers (DAAM)": None} | {
            f"{side}² layers only": [layer for layer, s in sides.items() if s == side]
            for side in sorted(set(sides.values()), reverse=True)
        }
        for row, layers in rows.items():
            maps = normalized_heat_maps(tracer.word_maps(layers)[:, :1], truth.shape[-2:])
            for tau in thresholds:
                score(row, f"map > {tau:g}", maps > tau, truth, categories)
                score(row, f"inverted > {tau:g}", 1 - maps > tau, truth, categories)
    table: dict[str, dict[str, float]] = {}
    for (row, column), metric in metrics.items():
        iou = metric.compute()
        table.setdefault(row, {})[column] = 100 * float(iou[~iou.isnan()].mean())
    return table


def print_daam_by_resolution(pipe, args) -> None:
    table = daam_by_resolution(
        pipe,
        SegmenterOracle(args.oracle),
        CategorySplit.named("shapes", 1),
        args.per_group,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        seed=args.seed,
    )
    trivial = table.pop("all-foreground")[""]
    columns = list(next(iter(table.values())))
    print(
        f"\nDAAM mIoU (%) on {2 * args.per_group} one-object images (guidance {args.guidance_scale:g}, "
        f"{args.steps} DDIM steps; all-foreground scores {trivial:.1f}):\n"
    )
    print("| cross-attention layers | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row, values in table.items():
        print(f"| {row} | " + " | ".join(f"{values[c]:.1f}" for c in columns) + " |")


@torch.no_grad()
def segment_scores(
    generator,
    split: CategorySplit,
    scenes: int = 200,
    seed: int = 3,
    mode: str | None = None,
    batch_size: int = 25,
    progress: bool = True,
) -> dict[str, float]:
    """mIoU (%) of a trained head segmenting rendered scenes (``GroundedGenerator.segment``, the
    real-image path): each scene with the names of the objects it holds and the paper's caption as
    prompt; its label map scored against the scene's own (torchmetrics), over the categories present:
    all, seen and unseen by the head."""
    rendered = [render_shapes_scene(i, seed=seed) for i in range(scenes)]
    out = generator.segment(
        [s[0] for s in rendered],
        [s[2] for s in rendered],
        mode=mode,
        batch_size=batch_size,
        progress=progress,
    )
    to_world = torch.tensor(
        [0] + [SHAPES_WORLD.index(c) + 1 for c in out.classes]
    )  # the output's labels -> the world's
    predicted = torch.stack([to_world[torch.from_numpy(m).long()] for m in out.label_maps()])
    truth = torch.from_numpy(np.stack([s[1] for s in rendered])).long()
    iou = MulticlassJaccardIndex(num_classes=len(SHAPES_WORLD) + 1, average="none")(predicted, truth)[1:]
    present = torch.bincount(truth.flatten(), minlength=len(SHAPES_WORLD) + 1)[1:] > 0

    def mean(names) -> float:
        values = [iou[SHAPES_WORLD.index(c)] for c in names if present[SHAPES_WORLD.index(c)]]
        return 100 * float(torch.stack(values).mean())

    return {"miou": mean(SHAPES_WORLD), "seen_miou": mean(split.seen), "unseen_miou": mean(split.unseen)}


def print_segment_scores(args) -> None:
    from grounded_diffusion.generator import GroundedGenerator

    generator = GroundedGenerator.from_pretrained(args.segment, device="cpu")
    scores = segment_scores(generator, CategorySplit.named("shapes", 1), args.scenes, seed=3)
    print(
        f"\nsegment() of {args.scenes} rendered scenes (seed 3) with {args.segment}, mIoU (%): "
        + ", ".join(f"{k.removesuffix('_miou') if k != 'miou' else 'all'} {v:.1f}" for k, v in scores.items())
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default=SHAPES_SD_ID)
    parser.add_argument("--oracle", default=SHAPES_ORACLE_ID)
    parser.add_argument("--per-group", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--seed", type=int, default=1, help="prompt set seed (the quickstart synthesises with 0)"
    )
    parser.add_argument(
        "--daam-by-resolution",
        action="store_true",
        help="DAAM per latent resolution instead (one-object prompts)",
    )
    parser.add_argument(
        "--segment", metavar="HEAD", help="a trained head's folder: its mIoU on rendered scenes instead"
    )
    parser.add_argument("--scenes", type=int, default=200, help="rendered scenes that --segment scores")
    args = parser.parse_args(argv)
    if args.segment:
        print_segment_scores(args)
        return
    pipe = load_pipeline(args.model_id, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if args.daam_by_resolution:
        print_daam_by_resolution(pipe, args)
        return
    rates = found_rates(
        pipe,
        SegmenterOracle(args.oracle),
        CategorySplit.named("shapes", 1),
        args.per_group,
        args.guidance_scale,
        args.steps,
        seed=args.seed,
    )
    print(
        f"\nImages in which the oracle finds every named object ({args.per_group} prompts per group, "
        f"guidance {args.guidance_scale:g}, {args.steps} DDIM steps):\n"
    )
    print("| " + " | ".join(GROUPS) + " |")
    print("|" + "---|" * len(GROUPS))
    print("| " + " | ".join(f"{100 * rates[g]:.0f}%" for g in GROUPS) + " |")


if __name__ == "__main__":
    main()
