"""The memory planner's table for the real backbones (docs/gpus.md, README): predict's peak per
device at batch 1, native size, as stored and quantized; no GPU and no weights needed.

    python benchmarks/memory_plans.py
"""

from grounded_diffusion.memory_plan import GB, plan_memory, with_memory_settings
from grounded_diffusion.models.backbones import BackboneConfig

INT8, NF4 = {"backend": "torchao", "type": "int8wo"}, {"backend": "bitsandbytes", "type": "nf4"}
ROWS = [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "float16", ["unet", "text_encoder"]),
    ("stabilityai/stable-diffusion-xl-base-1.0", "float16", ["unet", "text_encoder_2"]),
    ("stabilityai/stable-diffusion-3.5-large", "bfloat16", ["transformer", "text_encoder_3"]),
    ("black-forest-labs/FLUX.1-dev", "bfloat16", ["transformer", "text_encoder_2"]),
    ("black-forest-labs/FLUX.2-dev", "bfloat16", ["transformer", "text_encoder"]),
]


def main() -> None:
    print(
        "| backbone | px | weights GB | predict GB | int8 (torchao) GB | nf4 (bitsandbytes) GB | nf4 + model offload GB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model_id, dtype, big in ROWS:
        config = BackboneConfig(model_id=model_id, dtype=dtype)
        plan = plan_memory(config, batch_size=1)
        cells = []
        for quantization, offload in ((INT8, "none"), (NF4, "none"), (NF4, "model")):
            variant = BackboneConfig(
                model_id=model_id, dtype=dtype, quantization=dict.fromkeys(big, quantization), offload=offload
            )
            cells.append(f"{with_memory_settings(plan, variant).peak('predict') / GB:.1f}")
        weights = sum(c.weight_bytes for c in plan.components.values())
        print(
            f"| {model_id} ({dtype}) | {plan.image_size} | {weights / GB:.1f} | {plan.peak('predict') / GB:.1f} | "
            + " | ".join(cells)
            + " |"
        )


if __name__ == "__main__":
    main()
