"""The two cache storage modes at Stable Diffusion 1.5's real shapes (random weights):
bytes per sample (target: a ``latents`` sample at most 1/300 of a ``features`` one), and
training-step throughput when reading stored features vs. replaying the stored latents through
the full-size UNet.

The image is a real photograph (matplotlib's sample grace_hopper.jpg at 512², JPEG quality 90 as
the writer stores it) and the masks two ellipses, as an oracle gives them: random pixels would
measure incompressible noise, not what a generated image costs.

    python benchmarks/cache_storage.py [--batch 2] [--steps 3] [--dtype float32]

Reads are cold: each sample file is evicted from the page cache (posix_fadvise) before it is read,
so the figure is the disk's, not RAM's. Both modes train the paper-sized grounding head.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from timing import synchronize
from torch.utils.data import DataLoader

from callbacks.cache_writer import sample_tensors
from datamodules.triplets import TripletSamples
from grounded_diffusion.data.cache import TripletCache
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.losses import grounding_loss
from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig
from grounded_diffusion.models.tiny_sd import build_sd15_shaped_stable_diffusion

PROMPT = "a photograph of a dog and a cat"


def evict(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def photograph(size: int) -> torch.Tensor:
    """A real photograph, uint8 [3, size, size]."""
    import matplotlib
    import numpy as np
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def ellipse_masks(size: int) -> torch.Tensor:
    """Two object masks [2, size, size], ellipses of a third and a quarter of the image."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack(
        [((x + 0.3) / 0.5) ** 2 + (y / 0.7) ** 2 <= 1, ((x - 0.5) / 0.35) ** 2 + ((y - 0.3) / 0.4) ** 2 <= 1]
    )


def fake_prediction(backbone: StableDiffusionBackbone, batch: int, device: str) -> dict:
    """What a synthesis step hands the writer, at SD-1.5 shapes: real captured features of random
    latents (in the UNet's dtype), a 512² photograph, two masks, DAAM maps and oracle scores."""
    size = backbone.unet.config.sample_size
    latents = torch.randn(batch, 4, size, size, device=device, dtype=backbone.dtype)
    timesteps = torch.full((batch,), backbone.timestep, device=device)
    features = backbone.replay_features(latents, timesteps, [PROMPT] * batch)
    image_size = size * backbone.vae_scale_factor
    return {
        "id": [f"sample-{i}" for i in range(batch)],
        "categories": [["dog", "cat"]] * batch,
        "image": photograph(image_size).expand(batch, -1, -1, -1),
        "masks": ellipse_masks(image_size).expand(batch, -1, -1, -1),
        "daam": torch.rand(batch, 2, size, size),
        "oracle_scores": torch.rand(batch, 2),
        "latents": latents,
        "features": features,
    }


def write_cache(root: Path, storage: str, prediction: dict, copies: int, timestep: int) -> TripletCache:
    cache = TripletCache(root / storage)
    cache.initialise({"storage": storage})
    for copy in range(copies):
        for i in range(len(prediction["id"])):
            tensors, metadata = sample_tensors(prediction, i, storage, timestep)
            record = {"id": f"{copy}-{i}", "prompt": PROMPT, "categories": ["dog", "cat"], "split": "train"}
            cache.write(record, tensors, metadata)
    return cache


def train_steps(cache, backbone, head, embeds, batch: int, steps: int, device: str) -> tuple[float, float]:
    """Seconds per sample of (loading, one whole training step incl. loading)."""
    split = CategorySplit(("dog", "cat"))
    dataset = TripletSamples(cache, cache.manifest(), split, max_objects=2)
    loader = DataLoader(dataset, batch_size=batch)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-4)
    load_time = total_time = 0.0
    for step, batch_data in enumerate(_timed(loader, cache)):
        data, loaded = batch_data
        start = time.perf_counter()
        if "features" in data:
            features = [f.to(device).float() for f in data["features"]]
        else:
            features = backbone.replay_features(
                data["latents"].to(device), data["timestep"].to(device), data["prompt"]
            )
            features = [f.float() for f in features]
        masks, categories = data["masks"].to(device), data["categories"].to(device)
        logits = head(features, embeds[categories.clamp(min=0)], categories >= 0, masks.shape[-2:])
        loss = grounding_loss(logits, masks, categories, ignore_zero_masks=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synchronize()
        if step > 0:  # the first step warms up
            load_time += loaded
            total_time += loaded + time.perf_counter() - start
        if step == steps:
            break
    samples = steps * batch
    return load_time / samples, total_time / samples


def _timed(loader, cache):
    evict(cache.samples_dir.glob("*.safetensors"))
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            data = next(iterator)
        except StopIteration:
            return
        yield data, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument(
        "--dtype", default=None, help="backbone dtype (default: float16 on GPU, float32 on CPU)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the caches (default: a temp folder)"
    )
    args = parser.parse_args()
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("float16" if device == "cuda" else "float32")

    start = time.perf_counter()
    config = BackboneConfig(model_id="sd15-shaped-random", dtype=dtype, branches="uncond+cond")
    backbone = StableDiffusionBackbone(config, pipeline=build_sd15_shaped_stable_diffusion()).to(device)
    print(f"SD-1.5-shaped backbone ({dtype}, {device}) built in {time.perf_counter() - start:.0f} s")
    prediction = fake_prediction(backbone, args.batch, device)
    channels = [f.shape[1] for f in prediction["features"]]
    print(
        f"feature groups (both guidance branches, 25 blocks): {channels} channels at "
        f"{[f.shape[-1] for f in prediction['features']]} px"
    )
    head = GroundingHead(channels, backbone.text_dim, HeadConfig()).to(device)
    embeds = backbone.category_embeddings(["dog", "cat"]).float()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        copies = args.steps + 1
        caches = {
            m: write_cache(Path(tmp), m, prediction, copies, backbone.timestep)
            for m in ("features", "latents")
        }
        sizes = {}
        for mode, cache in caches.items():
            files = list(cache.samples_dir.glob("*.safetensors"))
            sizes[mode] = sum(f.stat().st_size for f in files) / len(files)
        print("\nbytes per sample")
        for mode, size in sizes.items():
            print(f"  {mode:9s} {size / 2**20:10.2f} MiB")
        ratio = sizes["features"] / sizes["latents"]
        print(f"  features / latents: {ratio:.0f}x (target >= 300x: {'met' if ratio >= 300 else 'NOT met'})")
        tensors, _ = sample_tensors(prediction, 0, "latents", backbone.timestep)
        parts = {k: v.numel() * v.element_size() for k, v in tensors.items()}
        print(
            "  latents-mode sample: "
            + ", ".join(f"{k} {v / 2**10:.0f} KiB" for k, v in parts.items())
            + " (image: JPEG quality 90, lossy; masks bit-packed)"
        )

        print(f"\ntraining step, batch {args.batch}, {args.steps} timed steps, cold reads")
        results = {}
        for mode, cache in caches.items():
            load, total = train_steps(cache, backbone, head, embeds, args.batch, args.steps, device)
            results[mode] = total
            print(
                f"  {mode:9s} load {load * 1e3:8.1f} ms/sample   step {total * 1e3:8.1f} ms/sample   "
                f"{1 / total:7.2f} samples/s"
            )
        print(
            f"  replay (latents) / stored (features) step time: {results['latents'] / results['features']:.2f}x"
        )


if __name__ == "__main__":
    main()
