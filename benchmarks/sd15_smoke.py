"""The whole method once at Stable Diffusion 1.5's real sizes, with random weights: every stage
through the real CLI and configs, at batch 2 with 2 DDIM steps, on CPU or CUDA.

    python benchmarks/sd15_smoke.py [--dir outputs/sd15_smoke]     (or: make smoke)

1. the SD-1.5-shaped pipeline (860 M UNet, CLIP ViT-L/14, SD's VAE) saved in diffusers format;
2. synthesis (experiments/synth/pascal_split1_train.yaml): 512 px generation with both guidance
   branches, all 25 UNet blocks captured, DAAM, the full-size Mask R-CNN at its real input size
   (800 px, random weights), written as a ``latents`` cache;
3. fit (experiments/pascal_split1.yaml): the paper-size head for 2 steps, replaying the latents;
4. test (Protocol I on the cache's val split, against DAAM);
5. grounded generation (experiments/generate.yaml) with that head;
6. Protocol II (experiments/protocol2/pascal_maskformer.yaml): one MaskFormer step with a
   ResNet-101-shaped backbone at 224 px on the generated images.

Each stage runs in its own process; the table gives its wall time and peak RSS (and, on CUDA,
``torch.cuda.max_memory_allocated``). It must fit a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def save_sd15_shaped(folder: Path) -> None:
    if (folder / "model_index.json").exists():
        return
    sys.path.insert(0, str(REPO))
    from grounded_diffusion.models.tiny_sd import build_sd15_shaped_stable_diffusion

    build_sd15_shaped_stable_diffusion().save_pretrained(folder)


def run_stage(name: str, args: list[str], log: Path) -> dict:
    """One CLI run in its own process: wall time, its peak RSS (wait4), and the peak CUDA memory
    it printed (callbacks.peak_memory)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        path = os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
        )  # keep the caller's (wheels on a GPU machine)
        process = subprocess.Popen(
            [sys.executable, "-m", "grounded_diffusion", *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": path},
        )
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"stage '{name}' failed; its output: {log}\n" + "\n".join(text.splitlines()[-15:]))
    cuda = re.findall(r"peak memory: rss [\d.]+ GiB, cuda ([\d.]+) GiB", text)
    return {
        "stage": name,
        "seconds": seconds,
        "rss_gib": usage.ru_maxrss / 2**20,
        "cuda_gib": float(cuda[-1]) if cuda else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=REPO / "outputs" / "sd15_smoke")
    parser.add_argument(
        "--start", type=int, default=1, help="first stage to run (earlier ones: results.json of the last run)"
    )
    args = parser.parse_args()
    import torch

    root = args.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else "CPU"
    dtype = "float16" if gpu else "float32"  # the configs' float16 is refused on a CPU
    start = time.perf_counter()
    save_sd15_shaped(root / "sd15-shaped")
    print(
        f"SD-1.5-shaped pipeline at {root / 'sd15-shaped'} ({time.perf_counter() - start:.0f} s)", flush=True
    )

    backbone = [
        "--model.init_args.backbone.model_id",
        str(root / "sd15-shaped"),
        "--model.init_args.backbone.dtype",
        dtype,
        "--model.init_args.backbone.num_inference_steps",
        "2",
        "--model.init_args.backbone.capture_step",
        "1",
    ]
    hardware = [
        "--trainer.accelerator",
        "auto",
        "--trainer.devices",
        "1",
        "--trainer.strategy",
        "auto",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+=callbacks.peak_memory.PeakMemory",
    ]
    cache = [
        "--data.init_args.cache_dir",
        str(root / "cache"),
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.num_workers",
        "0",
    ]
    writer = json.dumps(
        [{"class_path": "callbacks.cache_writer.TripletCacheWriter", "init_args": {"storage": "latents"}}]
    )
    oracle = json.dumps(
        {
            "class_path": "grounded_diffusion.models.oracle.MaskRCNNOracle",
            "init_args": {"weights": None, "score_threshold": 0.0},
        }
    )  # full size, random: no weights offline
    fit_run = [
        "--config",
        str(EXPERIMENTS / "pascal_split1.yaml"),
        *backbone,
        *cache,
        "--trainer.default_root_dir",
        str(root / "fit"),
    ]
    stages = [
        (
            "synthesis (generate + capture + DAAM + Mask R-CNN)",
            [
                "predict",
                "--config",
                str(EXPERIMENTS / "synth/pascal_split1_train.yaml"),
                *backbone,
                *cache,
                "--model.init_args.oracle",
                oracle,
                "--data.init_args.max_per_group",
                "1",
                "--trainer.default_root_dir",
                str(root / "synth"),
                *hardware,
                "--trainer.callbacks",
                writer,
                "--trainer.callbacks+=callbacks.peak_memory.PeakMemory",
            ],
        ),
        (
            "fit (paper head, replay, 2 steps)",
            ["fit", *fit_run, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", *hardware],
        ),
        (
            "test (Protocol I vs DAAM)",
            [
                "test",
                *fit_run,
                "--data.init_args.test_split",
                "val",
                "--ckpt_path",
                "last",
                "--verbose",
                "false",
                *hardware,
            ],
        ),
        (
            "grounded generation",
            [
                "predict",
                "--config",
                str(EXPERIMENTS / "generate.yaml"),
                "--ckpt_path",
                str(root / "fit" / "checkpoints" / "last.ckpt"),
                *backbone,
                "--data.init_args.batch_size",
                "2",
                "--trainer.default_root_dir",
                str(root / "generated"),
                *hardware,
            ],
        ),
        (
            "Protocol II (MaskFormer R101-shaped, 224 px, 1 step)",
            [
                "fit",
                "--config",
                str(EXPERIMENTS / "protocol2/pascal_maskformer.yaml"),
                "--model.init_args.backbone",
                "random-resnet-101",
                "--model.init_args.pretrained_backbone",
                "false",
                "--data.init_args.train",
                json.dumps(
                    [
                        {
                            "class_path": "FolderSegmentationSet",
                            "init_args": {"root": str(root / "generated"), "split": "images"},
                        }
                    ]
                ),
                "--data.init_args.val",
                json.dumps(
                    {
                        "class_path": "FolderSegmentationSet",
                        "init_args": {"root": str(root / "generated"), "split": "images"},
                    }
                ),
                "--data.init_args.split",
                "null",
                "--data.init_args.background",
                "class",
                "--data.init_args.batch_size",
                "2",
                "--data.init_args.num_workers",
                "0",
                "--trainer.max_steps",
                "1",
                "--trainer.val_check_interval",
                "1",
                "--trainer.default_root_dir",
                str(root / "protocol2"),
                *hardware,
            ],
        ),
    ]
    saved = root / "results.json"
    results = json.loads(saved.read_text())["stages"][: args.start - 1] if args.start > 1 else []
    for number, (name, stage_args) in enumerate(stages[args.start - 1 :], args.start):
        print(f"{name} ...", flush=True)
        results.append(run_stage(name, stage_args, root / f"stage{number}.log"))
        print(f"  {results[-1]['seconds']:.0f} s", flush=True)
        saved.write_text(json.dumps({"device": device, "dtype": dtype, "stages": results}, indent=2))

    print(f"\nSD-1.5 shapes, random weights, {dtype}, {device}, batch 2, 2 DDIM steps")
    print(f"| {'stage':52s} | {'time (s)':>8s} | {'peak RSS (GiB)':>14s} | {'peak CUDA (GiB)':>15s} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 16}|{'-' * 17}|")
    for r in results:
        cuda = f"{r['cuda_gib']:.2f}" if r["cuda_gib"] is not None else "-"
        print(f"| {r['stage']:52s} | {r['seconds']:8.0f} | {r['rss_gib']:14.2f} | {cuda:>15s} |")


if __name__ == "__main__":
    main()
