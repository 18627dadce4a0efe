"""Generation throughput against two references, measured in one run: the plain diffusers
``StableDiffusionPipeline`` (target: our synthesis step, which adds feature capture, DAAM and the
oracle, at >= 0.8x its images/s at the same batch and dtype), and the card's FLOP bound for SD-1.5
generation (each UNet forward's FLOPs, counted by ``benchmarks/flops.py``: 0.80 TFLOP at SD-1.5's
64² latent; 100 forwards per image: 50 steps x both guidance branches; the bf16 matmul rate measured
here).

    python benchmarks/gpu_throughput.py                       # SD-1.5 shapes, batch 1 8 16, fp16 and bf16 (a GPU)
    python benchmarks/gpu_throughput.py --tiny --steps 4      # the embedded model: checks the script on a CPU
    python benchmarks/gpu_throughput.py --compile inductor    # both sides with the UNet under torch.compile

Random weights at SD-1.5's architecture (no weights are downloaded); the oracle is the full-size
Mask R-CNN with random weights. Prints one table row per (dtype, batch) and the oracle's images/s.
"""

from __future__ import annotations

import argparse

import torch
from flops import tiny_sd_unet_config, unet_forward_tflop
from timing import best_time, synchronize

from grounded_diffusion.data.prompts import PromptSet
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone
from grounded_diffusion.models.oracle import MaskRCNNOracle
from grounded_diffusion.models.tiny_sd import SD15_UNET, TINY_SD_ID, build_sd15_shaped_stable_diffusion

SMALL_DETECTOR = {"min_size": 128, "max_size": 128}


def matmul_tflops(device: str, dtype: torch.dtype, size: int = 8192, repeats: int = 5) -> float:
    """The card's dense matmul rate (TFLOP/s) in ``dtype``."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = best_time(lambda: a @ b, repeats=repeats, warmup=True)
    return 2 * size**3 / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument(
        "--tiny", action="store_true", help="the embedded tiny model (checks the script on a CPU)"
    )
    parser.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="torch.compile the UNet (e.g. inductor), "
        "shared by the plain pipeline and ours; warm-up calls pay the compilation",
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = args.dtypes if device == "cuda" else ["float32"]
    split = CategorySplit.named("pascal", 1)

    rate = matmul_tflops(
        device, torch.bfloat16 if device == "cuda" else torch.float32, 8192 if device == "cuda" else 1024
    )
    unet_tflop = unet_forward_tflop(tiny_sd_unet_config() if args.tiny else SD15_UNET)
    forwards = 2 * args.steps  # both guidance branches
    bound = rate / (unet_tflop * forwards)  # images/s if every FLOP ran at the matmul rate
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"{name}: matmul {rate:.3g} TFLOP/s, UNet {unet_tflop:.3g} TFLOP per forward -> FLOP bound "
        f"{bound:.3g} images/s at {args.steps} steps"
    )

    rows = []
    for dtype in dtypes:
        pipeline = None if args.tiny else build_sd15_shaped_stable_diffusion()
        config = BackboneConfig(
            model_id=TINY_SD_ID if args.tiny else "sd15-shaped-random",
            dtype=dtype,
            branches="uncond+cond",
            num_inference_steps=args.steps,
            capture_step=min(5, args.steps),
            compile_backend=args.compile,
        )
        backbone = StableDiffusionBackbone(config, pipeline=pipeline).to(device)
        oracle = MaskRCNNOracle(
            weights=None, score_threshold=0.0, detector_kwargs=SMALL_DETECTOR if args.tiny else None
        ).to(device)
        plain = backbone.pipeline()
        for batch in args.batches:
            samples = list(PromptSet({"test": {"two_seen_unseen": batch}}).dataset(split))
            prompts, seeds, words = (
                [s["prompt"] for s in samples],
                [s["seed"] for s in samples],
                [s["categories"] for s in samples],
            )
            noise = backbone.initial_noise(seeds)

            def plain_generation():
                plain(
                    prompts,
                    num_inference_steps=args.steps,
                    guidance_scale=5.0,
                    latents=noise,
                    output_type="pt",
                )

            def synthesis():
                generation = backbone.generate(prompts, seeds, 5.0, words)
                oracle(generation.images, words)

            with torch.inference_mode():
                t_plain = best_time(plain_generation, warmup=True)
                t_ours = best_time(synthesis, warmup=True)
            rows.append((dtype, batch, batch / t_plain, batch / t_ours))
            print(
                f"{dtype}, batch {batch}: plain {rows[-1][2]:.3g} img/s, ours {rows[-1][3]:.3g} img/s",
                flush=True,
            )  # kept if stopped
        with torch.inference_mode():
            images = torch.randint(0, 256, (8, 3, 512, 512), dtype=torch.uint8, device=device)
            oracle_rate = 8 / best_time(lambda: oracle(images, [["dog"]] * 8), warmup=True)
        print(
            f"oracle ({dtype}, Mask R-CNN{' at 128 px' if args.tiny else ', 800 px input'}): {oracle_rate:.3g} images/s"
        )
        backbone = oracle = plain = pipeline = None  # freed before the next dtype's models load
        synchronize()

    print(f"\nUNet: {'torch.compile, ' + args.compile if args.compile else 'eager'}")
    print(
        "| dtype | batch | plain diffusers (img/s) | ours: synthesis step (img/s) | ours / plain | plain / FLOP bound |"
    )
    print("|---|---|---|---|---|---|")
    for dtype, batch, plain_rate, ours_rate in rows:
        print(
            f"| {dtype} | {batch} | {plain_rate:.3g} | {ours_rate:.3g} | "
            f"{ours_rate / plain_rate:.3f} | {plain_rate / bound:.3f} |"
        )


if __name__ == "__main__":
    main()
