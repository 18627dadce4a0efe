"""How well the shapes world's trained text-to-image model draws what its prompts name: for each
prompt group of paper Tab. 1, the fraction of generated images in which the oracle finds every
named object (score >= ``min_score``). ``make world`` prints it after training; the README
quotes it. With ``--daam-by-resolution``: how well DAAM's maps from the cross-attention layers of
each latent resolution alone localise the named object, and from their inverted maps.

    python -m grounded_diffusion.shapes_world --per-group 50
    python -m grounded_diffusion.shapes_world --daam-by-resolution --per-group 50
    python -m grounded_diffusion.shapes_world --segment outputs/shapes/head   # a head's mIoU on rendered scenes
    python -m grounded_diffusion.shapes_world --world shapes_wide --per-group 50   # the wide world's models
    python -m grounded_diffusion.shapes_world --text-space --split word_green   # unseen embeddings among seen ones
    python -m grounded_diffusion.shapes_world --features CACHE --split word_green   # do the UNet features separate them?
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassJaccardIndex
from tqdm import tqdm

from grounded_diffusion.data.cache import TripletCache, unpack_masks
from grounded_diffusion.data.prompts import GROUPS, PromptSet
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.errors import ConfigError
from grounded_diffusion.metrics import CategoryIoU
from grounded_diffusion.models.backbones import load_pipeline
from grounded_diffusion.models.daam import DAAMTracer, normalized_heat_maps
from grounded_diffusion.models.embedded import pipeline_options
from grounded_diffusion.models.oracle import SegmenterOracle
from grounded_diffusion.shapes_world.models import WORLD_MODELS
from grounded_diffusion.shapes_world.render import render_shapes_scene, world_categories


def generate(
    pipe, samples: list[dict], guidance_scale: float, num_inference_steps: int, options: dict | None = None
) -> torch.Tensor:
    """uint8 images [B, 3, H, W] of the samples' prompts, each drawn from its own seed; ``options``:
    what the model needs beyond the pipeline's defaults (``embedded.pipeline_options``)."""
    images = pipe(
        [s["prompt"] for s in samples],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator(pipe.device).manual_seed(s["seed"]) for s in samples],
        output_type="pt",
        **(options or {}),
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
    options: dict | None = None,
) -> dict[str, float]:
    """Generate ``per_group`` prompts of each group (PromptSet's samples, seeded by id) and
    return, per group, the fraction of images in which the oracle finds every named object
    (``options``: for the pipeline, see ``generate``)."""
    prompts = PromptSet({"eval": {g: per_group for g in GROUPS}}, seed=seed)
    samples = [prompts.sample(*item, split) for item in prompts.ids()]
    found = {g: [] for g in GROUPS}
    for start in tqdm(range(0, len(samples), batch_size), desc="generate + oracle", disable=not progress):
        batch = samples[start : start + batch_size]
        images = generate(pipe, batch, guidance_scale, num_inference_steps, options)
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


def split_name(args) -> int | str:
    split = args.split or WORLD_MODELS[args.world][2]
    return int(split) if str(split).isdigit() else split


def world_split(args) -> CategorySplit:
    return CategorySplit.named(args.world, split_name(args))


def print_daam_by_resolution(pipe, args) -> None:
    table = daam_by_resolution(
        pipe,
        SegmenterOracle(args.oracle),
        world_split(args),
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
    world: str = "shapes",
) -> dict[str, float]:
    """mIoU (%) of a trained head segmenting rendered scenes (``GroundedGenerator.segment``, the
    real-image path): each scene with the names of the objects it holds and the paper's caption as
    prompt; its label map scored against the scene's own (torchmetrics), over the categories present:
    all, seen and unseen by the head, in the ``world`` whose categories ``split`` divides."""
    categories = world_categories(world)
    rendered = [render_shapes_scene(i, seed=seed, world=world) for i in range(scenes)]
    out = generator.segment(
        [s[0] for s in rendered],
        [s[2] for s in rendered],
        mode=mode,
        batch_size=batch_size,
        progress=progress,
    )
    to_world = torch.tensor(
        [0] + [categories.index(c) + 1 for c in out.classes]
    )  # the output's labels -> the world's
    predicted = torch.stack([to_world[torch.from_numpy(m).long()] for m in out.label_maps()])
    truth = torch.from_numpy(np.stack([s[1] for s in rendered])).long()
    iou = MulticlassJaccardIndex(num_classes=len(categories) + 1, average="none")(predicted, truth)[1:]
    present = torch.bincount(truth.flatten(), minlength=len(categories) + 1)[1:] > 0

    def mean(names) -> float:
        values = [iou[categories.index(c)] for c in names if present[categories.index(c)]]
        return 100 * float(torch.stack(values).mean())

    return {"miou": mean(categories), "seen_miou": mean(split.seen), "unseen_miou": mean(split.unseen)}


def print_segment_scores(args) -> None:
    from grounded_diffusion.api import GroundedGenerator

    generator = GroundedGenerator.from_pretrained(args.segment, device="cpu")
    scores = segment_scores(generator, world_split(args), args.scenes, seed=3, world=args.world)
    print(
        f"\nsegment() of {args.scenes} rendered scenes (seed 3) with {args.segment}, mIoU (%): "
        + ", ".join(f"{k.removesuffix('_miou') if k != 'miou' else 'all'} {v:.1f}" for k, v in scores.items())
    )


def text_space(embeddings: torch.Tensor, split: CategorySplit) -> list[dict]:
    """Where each unseen category's text embedding falls among the seen ones' ([N, D], in the
    order of ``split.categories``), centred on the seen mean (a component every embedding
    shares): ``outside``, the share of its norm outside the span of the seen embeddings, which
    the head's text projection, fit on seen categories only, never constrains; and its
    ``nearest`` seen category by cosine (``cosine``)."""
    index = [split.categories.index(c) for c in split.seen]
    seen = embeddings[index].double()
    centre = seen.mean(0)
    _, singular, directions = torch.linalg.svd(seen - centre, full_matrices=False)
    basis = directions[singular > 1e-6 * singular[0]]
    rows = []
    for name in split.unseen:
        offset = embeddings[split.categories.index(name)].double() - centre
        inside = (offset @ basis.T) @ basis
        cosine = F.cosine_similarity(offset[None], seen - centre)
        nearest = int(cosine.argmax())
        rows.append(
            {
                "category": name,
                "outside": float((offset - inside).norm() / offset.norm()),
                "nearest": split.seen[nearest],
                "cosine": float(cosine[nearest]),
            }
        )
    return rows


def print_text_space(args) -> None:
    from grounded_diffusion.models.backbones import BackboneConfig, build_backbone

    options = pipeline_options(args.model_id)  # (the DiT's text stream: no T5 tokens)
    backbone = build_backbone(BackboneConfig(model_id=args.model_id, dtype="float32", **options))
    split = world_split(args)
    with torch.no_grad():
        embeddings = backbone.category_embeddings(list(split.categories))
    print(f"\nUnseen categories of {args.world} split {split_name(args)} in {args.model_id}'s text space:\n")
    print("| unseen category | outside the seen span | nearest seen (cosine) |\n|---|---|---|")
    for row in text_space(embeddings, split):
        print(
            f"| {row['category']} | {100 * row['outside']:.0f} % | {row['nearest']} ({row['cosine']:.2f}) |"
        )


def object_features(cache_dir: str | Path, subset: str = "test") -> tuple[torch.Tensor, list[str]]:
    """One vector per object of a triplet cache's ``subset`` samples: the captured UNet
    features (every resolution group, resized to the finest) averaged over the object's mask
    ([N, C]), with the object's category."""
    cache = TripletCache(cache_dir)
    vectors, names = [], []
    for record in cache.manifest():
        if record["split"] != subset:
            continue
        tensors, metadata = cache.load(record["id"])
        keys = sorted((k for k in tensors if k.startswith("features.")), key=lambda k: int(k.split(".")[1]))
        size = tensors[keys[-1]].shape[-2:]
        features = torch.cat(
            [F.interpolate(tensors[k][None].float(), size=size, mode="bilinear")[0] for k in keys]
        )
        masks = F.interpolate(
            unpack_masks(tensors["masks"], metadata["mask_shape"])[None].float(), size=size, mode="area"
        )[0]
        for mask, name in zip(masks, record["categories"]):
            if mask.sum() > 0:  # (the oracle found the object)
                vectors.append((features * mask).sum((1, 2)) / mask.sum())
                names.append(name)
    return torch.stack(vectors), names


def nearest_centroid_accuracy(vectors: torch.Tensor, labels: list[str]) -> torch.Tensor:
    """Per vector, whether the centroid nearest to it (features standardised; its own class's
    centroid without it: leave-one-out) is its own label's. A linear read-out is enough when
    this is high: the features separate the classes."""
    x = ((vectors - vectors.mean(0)) / vectors.std(0).clamp_min(1e-6)).double()
    classes = sorted(set(labels))
    label = torch.tensor([classes.index(n) for n in labels])
    one_hot = F.one_hot(label, len(classes)).double()
    sums, counts = one_hot.T @ x, one_hot.sum(0)
    centroids = sums / counts[:, None]
    distances = torch.cdist(x, centroids)
    # x minus the mean of its class's other vectors: (n x - sum) / (n - 1)
    others = counts[label, None] - 1
    own = ((x * counts[label, None] - sums[label]) / others.clamp_min(1)).norm(dim=1)
    own[others[:, 0] == 0] = float("inf")  # a class of one: nothing left to compare with
    distances[torch.arange(len(x)), label] = own  # leave-one-out: the own centroid without the vector
    return distances.argmin(1) == label


def print_feature_probe(args) -> None:
    """Do the UNet features separate the held-out word's objects? Nearest-centroid accuracy on
    the word of the held-out word's kind (colour or shape), over the cache's test objects."""
    split = str(split_name(args))
    if not split.startswith("word_"):
        raise SystemExit(
            f"error: --features needs a held-out-word split (--split word_green or word_cross), not {split}"
        )
    word = split.removeprefix("word_")
    vectors, names = object_features(args.features)
    position = 0 if any(name.split()[0] == word for name in names) else 1  # a colour word, or a shape word
    labels = [name.split()[position] for name in names]
    correct = nearest_centroid_accuracy(vectors, labels)
    held_out = torch.tensor([label == word for label in labels])
    print(
        f"\nNearest-centroid accuracy of the {'colour' if position == 0 else 'shape'} word from the UNet "
        f"features of {len(labels)} test objects in {args.features}: objects with '{word}' "
        f"{100 * correct[held_out].float().mean():.1f} % ({int(held_out.sum())}), the others "
        f"{100 * correct[~held_out].float().mean():.1f} %"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m grounded_diffusion.shapes_world", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--world", choices=list(WORLD_MODELS), default="shapes", help="whose models and scenes"
    )
    parser.add_argument("--model-id", default=None, help="default: the world's Stable Diffusion")
    parser.add_argument("--oracle", default=None, help="default: the world's oracle")
    parser.add_argument(
        "--split", default=None, help="the unseen categories (default: the world's first split)"
    )
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
    parser.add_argument(
        "--text-space",
        action="store_true",
        help="where the split's unseen category embeddings fall among the seen ones' instead",
    )
    parser.add_argument(
        "--features",
        metavar="CACHE",
        help="a held-out-word split's triplet cache: do its UNet features separate that word's objects?",
    )
    parser.add_argument("--scenes", type=int, default=200, help="rendered scenes that --segment scores")
    args = parser.parse_args(argv)
    model_id, oracle, _ = WORLD_MODELS[args.world]
    args.model_id, args.oracle = args.model_id or model_id, args.oracle or oracle
    if args.features:
        print_feature_probe(args)
        return
    if args.text_space:
        print_text_space(args)
        return
    if args.segment:
        print_segment_scores(args)
        return
    pipe = load_pipeline(args.model_id, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if args.daam_by_resolution:
        if not hasattr(pipe, "unet"):
            raise ConfigError(
                f"--daam-by-resolution reads a UNet's cross-attention; {args.model_id} has none"
            )
        print_daam_by_resolution(pipe, args)
        return
    rates = found_rates(
        pipe,
        SegmenterOracle(args.oracle),
        world_split(args),
        args.per_group,
        args.guidance_scale,
        args.steps,
        seed=args.seed,
        options=pipeline_options(args.model_id) or None,
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
