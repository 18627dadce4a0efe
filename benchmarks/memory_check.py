"""The memory planner against a GPU: for the tiny SD and an SD-1.5-shaped pipeline (random
weights, the real sizes), the planner's peak of synthesis with capture beside
``torch.cuda.max_memory_allocated`` of the same generation, and their ratio (the ``memory`` stage
of benchmarks/gpu_session.sh).

    python benchmarks/memory_check.py [--batch 4] [--folder outputs/gpu_session/sd15_shaped]

Without CUDA it plans the tiny model only and says so (nothing to measure against).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grounded_diffusion.memory_plan import GB, plan_memory  # noqa: E402
from grounded_diffusion.models.backbones import BackboneConfig, build_backbone  # noqa: E402
from grounded_diffusion.models.tiny_sd import TINY_SD_ID, build_sd15_shaped_stable_diffusion  # noqa: E402

PROMPT = "a photograph of a dog and a cat"


def measured_peak(config: BackboneConfig, batch: int) -> int:
    backbone = build_backbone(config).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    backbone.generate([PROMPT] * batch, seeds=list(range(batch)), words=[["dog", "cat"]] * batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del backbone
    torch.cuda.empty_cache()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--folder",
        default="outputs/gpu_session/sd15_shaped",
        help="where the SD-1.5-shaped pipeline is saved",
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    models = [("tiny-sd", TINY_SD_ID)]
    if cuda:
        folder = Path(args.folder)
        if not (folder / "model_index.json").exists():
            build_sd15_shaped_stable_diffusion().save_pretrained(folder)
        models.append(("SD-1.5-shaped", str(folder.resolve())))
    rows = []
    for name, model_id in models:
        config = BackboneConfig(
            model_id=model_id, dtype="float16" if cuda else "float32", num_inference_steps=10, capture_step=5
        )
        planned = plan_memory(config, args.batch).peak("predict")
        measured = measured_peak(config, args.batch) if cuda else None
        ratio = f"{planned / measured:.2f}" if measured else "n/a (no CUDA)"
        shown = f"{measured / GB:.3f}" if measured else "-"
        rows.append(f"| {name} | {config.dtype} | {args.batch} | {planned / GB:.3f} | {shown} | {ratio} |")
    print("| model | dtype | batch | planned GB | measured GB (max_memory_allocated) | planned / measured |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
