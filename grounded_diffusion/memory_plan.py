"""The memory planner: the peak GPU memory of a run, per device, before the run and without a GPU
or weights (``grounded-diffusion plan --config …``).

Each model of the backbone is built from its architecture (a real backbone's published config,
shipped in ``configs/architectures.json``; an embedded or local model's own config files) on the
meta device, then moved onto a fake CUDA device inside ``FakeTensorMode``, where one real step of
it runs (a text encoder's encoding, a denoiser call with the feature capture hooks, a VAE decode,
a head training step with its optimizer) under torch's ``MemTracker``. No tensor holds data, so
FLUX.2 [dev] plans on a laptop; the numbers are what PyTorch's caching allocator is asked for,
phase by phase:

- predict: synthesis with capture (text encoders, then the denoiser's steps with the captured
  features kept, then the VAE decode);
- fit: latent replay (the denoiser again) and the head's training step (weights, gradients,
  optimizer state, activations);
- generate: grounded generation (predict's models and the head's forward).

Weights count at their stored size: a quantized component's linear weights at the backend's
storage (``quantization.QUANT_TYPES``: bits per weight plus the scales), the rest in ``dtype``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F

from grounded_diffusion.errors import ConfigError
from grounded_diffusion.models.backbones.config import DTYPES, BackboneConfig
from grounded_diffusion.models.backbones.dit import evenly_spaced_blocks, image_tokens, transformer_blocks
from grounded_diffusion.models.backbones.quantization import QUANT_TYPES, stored_bytes
from grounded_diffusion.models.backbones.unet import group_by_resolution, unet_blocks
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig

ARCHITECTURES = Path(__file__).parent / "configs" / "architectures.json"
GB = 1e9  # decimal gigabytes, as GPU memory is sold and as nvidia-smi's "GB" cards are named
CUDA = torch.device("cuda", 0)
# Block-scaled storage: the scales each backend keeps beside the low-bit weights (bits per weight).
SCALE_BITS = {"bitsandbytes": {"nf4": 0.5, "fp4": 0.5, "int8": 0.0}}
MAX_OBJECTS = 4  # objects per training sample the head's step is planned for


@dataclass
class Component:
    """One model of the backbone as the planner measured it."""

    name: str
    params: int
    weight_bytes: int
    activation_bytes: int  # the peak of its step, beyond its weights
    quantized: str | None = None
    largest_block_bytes: int = 0  # what group offload keeps on the device


@dataclass
class Plan:
    """Peak bytes per phase on one device, and what makes them up."""

    model_id: str
    batch_size: int
    image_size: int
    offload: str
    components: dict[str, Component]
    extras: dict[str, int]  # captured features, head, gradients, optimizer, head activations
    denoiser: str = "unet"
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    def peak(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    def largest(self) -> tuple[str, int]:
        phase = max(self.phases, key=self.peak)
        return phase, self.peak(phase)


# -- architectures --------------------------------------------------------------------------------


def architecture(model_id: str) -> dict:
    """Components (library, class, config) of a real backbone's published architecture, or of an
    embedded or local model read from its config files (no weights read)."""
    published = json.loads(ARCHITECTURES.read_text())
    if model_id in published:
        return published[model_id]
    from grounded_diffusion.models.embedded import embedded_model

    embedded = embedded_model(model_id, "pipeline")
    folder = Path(embedded.folder()) if embedded is not None else Path(model_id).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ConfigError(
            f"plan: no architecture for '{model_id}': it is none of the published ones "
            f"({', '.join(k for k in published if not k.startswith('_'))}) and not a local diffusers "
            "folder with model_index.json; save the pipeline (weights not needed: its config files) there"
        )
    index = json.loads((folder / "model_index.json").read_text())
    components = {}
    for name, entry in index.items():
        config_file = folder / name / "config.json"
        if isinstance(entry, list) and entry[0] in ("diffusers", "transformers") and config_file.is_file():
            if name.startswith(("unet", "transformer", "text_encoder", "vae")):
                components[name] = {
                    "library": entry[0],
                    "class": entry[1],
                    "config": json.loads(config_file.read_text()),
                }
    pipeline = index["_class_name"]
    return {
        "pipeline": pipeline,
        "image_size": None,
        "guidance_branches": 1 if pipeline in ("FluxPipeline", "Flux2Pipeline") else 2,
        "text_lengths": {},
        "components": components,
    }


def build_on_meta(spec: dict, dtype: torch.dtype) -> nn.Module:
    """A component built from its config on the meta device: its real shapes, no memory."""
    import diffusers
    import transformers

    config = {k: v for k, v in spec["config"].items() if not k.startswith("_")}
    with torch.device("meta"):
        if spec["library"] == "diffusers":
            module = getattr(diffusers, spec["class"]).from_config(config)
        else:
            model_class = getattr(transformers, spec["class"])
            module = model_class(model_class.config_class.from_dict(config))
    # (parameters keep requires_grad: MemTracker hooks them; every frozen step runs under no_grad)
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # (its advice to load in a dtype: nothing to load here)
    try:
        return module.to(dtype).eval()
    finally:
        diffusers.utils.logging.set_verbosity(level)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stored_weight_bytes(module: nn.Module, quantization: dict | None) -> int:
    """Parameters and buffers at their stored size: with ``quantization``, the linear weights at
    the backend's bits per weight plus its scales (per output row for int8 and float8 types)."""
    total = stored_bytes(module)
    if not quantization:
        return total
    backend, kind = quantization["backend"], quantization["type"]
    bits = QUANT_TYPES[backend][kind][1] + SCALE_BITS.get(backend, {}).get(kind, 0.0)
    for linear in (m for m in module.modules() if isinstance(m, nn.Linear)):
        weight = linear.weight
        total -= weight.numel() * weight.element_size()
        total += int(weight.numel() * bits / 8) + weight.shape[0] * weight.element_size()
    return total


def quantized_label(setting: dict | None) -> str | None:
    return f"{setting['backend']} {setting['type']}" if setting else None


def largest_block_bytes(module: nn.Module) -> int:
    """The largest repeated block (a transformer layer, a UNet level): what stays on the device
    at once under group offload."""
    sizes = [
        sum(p.numel() * p.element_size() for p in child.parameters())
        for blocks in module.modules()
        if isinstance(blocks, nn.ModuleList)
        for child in blocks
    ]
    return max(sizes, default=sum(p.numel() * p.element_size() for p in module.parameters()))


# -- one step of each component, on a fake GPU ------------------------------------------------------


@contextlib.contextmanager
def fake_gpu():
    """A fake CUDA device whose attention runs the fused kernels a GPU picks: on fake tensors,
    ``scaled_dot_product_attention`` cannot ask the hardware and falls back to the math kernel,
    which keeps every N x N attention matrix (8.8 GB for one SD-1.5 layer at batch 8)."""
    original = F.scaled_dot_product_attention

    def fused(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        q, k, v = query, key, value
        same = q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and q.shape[-1] == k.shape[-1] == v.shape[-1]
        if q.device.type == "cuda" and same and not enable_gqa:
            with contextlib.suppress(RuntimeError):
                if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
                    return torch.ops.aten._scaled_dot_product_flash_attention(
                        q, k, v, dropout_p, is_causal, scale=scale
                    )[0]
                bias = None if attn_mask is None else attn_mask.to(q.dtype).expand(*q.shape[:-1], k.shape[-2])
                return torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, v, bias, False, dropout_p, is_causal, scale=scale
                )[0]
        return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = fused
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, warnings.catch_warnings():
            # (a library reading a fake tensor's data pointer, where it checks for an empty one)
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            # (MemTracker's module tracker, on a model whose blocks are called more than once)
            warnings.filterwarnings("ignore", message="The module hierarchy tracking maybe be messed up")
            yield mode
    finally:
        F.scaled_dot_product_attention = original


def tracked_peak(modules: list[nn.Module], step, optimizer=None) -> tuple[int, object]:
    """Peak bytes beyond the modules' weights while ``step()`` runs (torch's ``MemTracker``), and
    what it returned."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*modules, *([optimizer] if optimizer is not None else []))
    with tracker:
        result = step()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()), {})
    weights = sum(v for k, v in peak.items() if str(k).endswith(("PARAM", "BUFFER")))
    return int(peak.get("Total", 0) - weights), result


def text_length(arch: dict, name: str, module: nn.Module, config: BackboneConfig) -> int:
    """Tokens a text encoder reads: CLIP's 77; T5's, Qwen3's or Mistral's ``max_sequence_length``,
    else the pipeline's default (SD3: 256; FLUX.1 and FLUX.2: 512)."""
    if type(module).__name__.startswith("CLIP"):
        return 77
    default = 256 if arch["pipeline"].startswith("StableDiffusion3") else 512
    return config.max_sequence_length or arch["text_lengths"].get(name) or default


def denoiser_text_length(arch: dict, lengths: dict[str, int]) -> int:
    """Text tokens of the denoiser's input: SD3's CLIP tokens (the two CLIPs side by side on
    channels) then T5's; FLUX.1's T5 tokens (CLIP gives the pooled vector only); FLUX.2's one
    encoder's; a UNet's CLIP tokens."""
    if arch["pipeline"].startswith("StableDiffusion3"):
        return 77 + lengths.get("text_encoder_3", 0)
    if arch["pipeline"] == "FluxPipeline":
        return lengths["text_encoder_2"]
    return max(lengths.values())


def text_encoder_step(module: nn.Module, batch: int, length: int):
    ids = torch.zeros(batch, length, dtype=torch.long, device=CUDA)

    def step():
        with torch.no_grad():
            return module(input_ids=ids, output_hidden_states=True)

    return step


def denoiser_inputs(module: nn.Module, batch: int, latent: int, side: int, length: int, dtype) -> dict:
    """The keyword arguments of one denoiser call at ``batch`` rows on a ``latent`` grid (``side``
    image tokens along a side) and ``length`` text tokens, as each family's pipeline makes them
    (text widths from the config)."""
    config, kind = module.config, type(module).__name__
    randn = lambda *shape: torch.randn(*shape, device=CUDA, dtype=dtype)  # noqa: E731
    step = torch.full((batch,), 500.0, device=CUDA, dtype=dtype)
    if kind == "UNet2DConditionModel":
        inputs = {
            "sample": randn(batch, config.in_channels, latent, latent),
            "timestep": step,
            "encoder_hidden_states": randn(batch, 77, config.cross_attention_dim),
        }
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": randn(batch, pooled), "time_ids": randn(batch, 6)}
        return inputs
    if kind == "SD3Transformer2DModel":
        return {
            "hidden_states": randn(batch, config.in_channels, latent, latent),
            "timestep": step,
            "encoder_hidden_states": randn(batch, length, config.joint_attention_dim),
            "pooled_projections": randn(batch, config.pooled_projection_dim),
        }
    tokens = side * side
    inputs = {
        "hidden_states": randn(batch, tokens, config.in_channels),
        "timestep": step / 1000,
        "encoder_hidden_states": randn(batch, length, config.joint_attention_dim),
        "guidance": step if config.guidance_embeds else None,
    }
    axes = len(config.axes_dims_rope)
    inputs["img_ids"] = torch.zeros(tokens, axes, device=CUDA)
    inputs["txt_ids"] = torch.zeros(length, axes, device=CUDA)
    if kind == "FluxTransformer2DModel":
        inputs["pooled_projections"] = randn(batch, config.pooled_projection_dim)
    return inputs


def capture_blocks(module: nn.Module, names: list[str] | None) -> dict[str, nn.Module]:
    """The blocks whose outputs the backbone captures (the config's, else its default)."""
    if type(module).__name__ == "UNet2DConditionModel":
        blocks = unet_blocks(module)
        return {n: blocks[n] for n in names or blocks}
    blocks = transformer_blocks(module)
    return {n: blocks[n] for n in names or evenly_spaced_blocks(list(blocks))}


def image_side(module: nn.Module, latent: int, vae: nn.Module) -> int:
    """Image tokens along a side of the latent grid (a UNet: the latent grid itself): SD3 patches
    the latents, FLUX.1's pipeline packs 2x2 of them into a token, FLUX.2's VAE patchifies 2x2."""
    kind = type(module).__name__
    if kind == "UNet2DConditionModel":
        return latent
    if kind == "FluxTransformer2DModel":
        return latent // 2
    if kind == "Flux2Transformer2DModel":
        return latent // tuple(getattr(vae.config, "patch_size", None) or (1,))[0]
    return latent // module.config.patch_size


def denoiser_step(module, inputs, blocks: dict[str, nn.Module], captured: list, tokens: int):
    """One call with the capture hooks: each tapped block's output is kept, as the backbone does
    (a transformer's image tokens, a UNet block's map)."""
    unet = type(module).__name__ == "UNet2DConditionModel"

    def hook(block, args, output):
        out = (output[0] if isinstance(output, tuple) else output) if unet else image_tokens(output, tokens)
        captured.append(out.detach().clone())

    def step():
        handles = [b.register_forward_hook(hook) for b in blocks.values()]
        try:
            with torch.no_grad():
                return module(**inputs)
        finally:
            for handle in handles:
                handle.remove()

    return step


def feature_groups(
    module: nn.Module, captured: list[torch.Tensor], side: int, batch: int
) -> list[torch.Tensor]:
    """The head's input groups of one conditional batch: a UNet's by resolution, a transformer's
    image tokens of each block on its grid."""
    if type(module).__name__ == "UNet2DConditionModel":
        return group_by_resolution([c[-batch:] for c in captured])
    return [c[-batch:].transpose(1, 2).unflatten(-1, (side, side)) for c in captured]


def default_head(groups: int) -> HeadConfig:
    """The paper's head, with one 64-channel group per feature group where there are not four
    (SDXL's three resolutions; a DiT's blocks): an experiment's config gives its own."""
    return HeadConfig() if groups == 4 else HeadConfig(group_channels=[64] * groups)


# -- the plan ---------------------------------------------------------------------------------------


def plan_memory(
    config: BackboneConfig,
    batch_size: int = 1,
    head: HeadConfig | None = None,
    image_size: int | None = None,
) -> Plan:
    """Measure each component's step on a fake GPU and put the phases together (see the module)."""
    arch = architecture(config.model_id)
    dtype = DTYPES[config.dtype]
    specs = arch["components"]
    quantization = config.quantization or {}
    unknown = sorted(set(quantization) - set(specs))
    if unknown:
        raise ConfigError(
            f"plan: model.init_args.backbone.quantization names {unknown}; '{config.model_id}' has {sorted(specs)}"
        )
    denoiser_name = "unet" if "unet" in specs else "transformer"
    size = image_size or config.image_size or arch["image_size"]
    built = {name: build_on_meta(spec, dtype) for name, spec in specs.items()}
    vae_scale = 2 ** (len(built["vae"].config.block_out_channels) - 1)
    if size is None:  # a local model's native size: its denoiser's sample size, in pixels
        size = built[denoiser_name].config.sample_size * vae_scale
    latent = size // vae_scale
    branches = arch["guidance_branches"] if config.branches == "cond" else 2
    rows = batch_size * branches
    components: dict[str, Component] = {}
    extras: dict[str, int] = {}
    for name, module in built.items():  # counted on the meta device, where tied weights are still one
        setting = quantization.get(name)
        components[name] = Component(
            name=name,
            params=count_parameters(module),
            weight_bytes=stored_weight_bytes(module, setting),
            activation_bytes=0,
            quantized=quantized_label(setting),
            largest_block_bytes=largest_block_bytes(module),
        )
    with fake_gpu():
        built = {name: module.to_empty(device=CUDA) for name, module in built.items()}
        text_lengths = {}
        for name, module in built.items():
            if name.startswith("text_encoder"):
                text_lengths[name] = length = text_length(arch, name, module, config)
                prompts = batch_size + (1 if branches == 2 else 0)  # the unconditional row, encoded once
                components[name].activation_bytes, _ = tracked_peak(
                    [module], text_encoder_step(module, prompts, length)
                )
        denoiser = built[denoiser_name]
        captured: list[torch.Tensor] = []
        blocks = capture_blocks(denoiser, config.blocks)
        side = image_side(denoiser, latent, built["vae"])
        inputs = denoiser_inputs(
            denoiser, rows, latent, side, denoiser_text_length(arch, text_lengths), dtype
        )
        components[denoiser_name].activation_bytes, _ = tracked_peak(
            [denoiser], denoiser_step(denoiser, inputs, blocks, captured, side * side)
        )
        groups = feature_groups(denoiser, captured, side, batch_size)
        extras["captured features"] = sum(g.numel() * g.element_size() for g in groups) * config.num_timesteps
        del captured
        vae = built["vae"]
        latents = torch.randn(
            batch_size, vae.config.latent_channels, latent, latent, device=CUDA, dtype=dtype
        )
        with torch.no_grad():
            components["vae"].activation_bytes, _ = tracked_peak([vae], lambda: vae.decode(latents).sample)
        # The head: one training step (forward, backward, AdamW) on the captured groups.
        text_dim = inputs.get("encoder_hidden_states").shape[-1]
        # On the fake CPU: autograd's engine asks a real CUDA device for its context; the bytes are the same.
        with torch.device("cpu"):
            grounding_head = GroundingHead(
                [g.shape[1] for g in groups] * config.num_timesteps,
                text_dim,
                head or default_head(len(groups)),
                config.num_timesteps,
            )
        optimizer = torch.optim.AdamW(grounding_head.parameters())
        head_inputs = [g.float().cpu() for g in groups] * config.num_timesteps
        embeds = torch.randn(batch_size, MAX_OBJECTS, text_dim)
        present = torch.ones(batch_size, MAX_OBJECTS, dtype=torch.bool)

        def train_step():
            logits = grounding_head(head_inputs, embeds, present, (size, size))
            logits.float().sigmoid().mean().backward()
            optimizer.step()
            return logits

        head_peak, _ = tracked_peak([grounding_head], train_step, optimizer)
        head_params = sum(p.numel() * p.element_size() for p in grounding_head.parameters())
        state = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        extras["head"] = head_params
        extras["head gradients"] = head_params
        extras["optimizer state"] = state
        extras["head activations"] = max(head_peak - head_params - state, 0)
        with torch.no_grad():
            forward_peak, _ = tracked_peak(
                [grounding_head], lambda: grounding_head(head_inputs, embeds, present, (size, size))
            )
        extras["head forward"] = forward_peak
    result = Plan(config.model_id, batch_size, size, config.offload, components, extras, denoiser_name)
    result.phases = phases(result)
    return result


def with_memory_settings(plan: Plan, config: BackboneConfig) -> Plan:
    """``plan`` under another quantization or offload, without measuring again: weight-only
    quantization changes the weights' storage, not the activations; offload what stays resident."""
    specs = architecture(config.model_id)["components"]
    quantization = config.quantization or {}
    components = {}
    for name, component in plan.components.items():
        setting = quantization.get(name)
        weights = stored_weight_bytes(build_on_meta(specs[name], DTYPES[config.dtype]), setting)
        components[name] = replace(component, weight_bytes=weights, quantized=quantized_label(setting))
    variant = replace(plan, offload=config.offload, components=components)
    variant.phases = phases(variant)
    return variant


def phases(plan: Plan) -> dict[str, dict[str, int]]:
    """Each phase's peak as weights resident plus the largest step's activations, as the offload
    mode leaves the models: ``none`` all on the device; ``model`` one model at a time (the text
    encoders leave the device before the denoiser runs); ``group`` one block at a time."""
    comps, extras, offload = plan.components, plan.extras, plan.offload
    texts = [n for n in comps if n.startswith("text_encoder")]

    def resident(running: str) -> int:
        if offload == "group":
            return comps[running].largest_block_bytes
        if offload == "model":
            return comps[running].weight_bytes
        return sum(c.weight_bytes for c in comps.values())

    keep = {"captured features": extras["captured features"]}
    synthesis = [
        {
            "weights": resident(n),
            f"{n} activations": comps[n].activation_bytes,
            **({} if n in texts else keep),
        }
        for n in [*texts, plan.denoiser, "vae"]
    ]
    replay = synthesis[:-1]  # (the text encoders and the denoiser again; no decode)
    training = {
        "weights": resident(plan.denoiser) if offload == "none" else 0,
        "head + gradients + optimizer": extras["head"] + extras["head gradients"] + extras["optimizer state"],
        "head activations": extras["head activations"],
        **keep,
    }
    generation = [{**s, "head": extras["head"], "head forward": extras["head forward"]} for s in synthesis]
    biggest = lambda stages: max(stages, key=lambda s: sum(s.values()))  # noqa: E731
    return {
        "predict": biggest(synthesis),
        "fit": biggest([*replay, training]),
        "generate": biggest(generation),
    }


# -- what fits ---------------------------------------------------------------------------------------


def parse_memory(text: str) -> int:
    """``80GB``, ``24 GB``, ``16GiB`` -> bytes; one line otherwise."""
    cleaned = text.replace(" ", "").upper()
    for unit, scale in (("GIB", 2**30), ("GB", GB), ("G", GB)):
        if cleaned.endswith(unit):
            try:
                return int(float(cleaned[: -len(unit)]) * scale)
            except ValueError:
                break
    raise ConfigError(f"--gpu-memory '{text}' is not a size such as 80GB, 24GB or 16GiB")


def smallest_change(
    config: BackboneConfig, batch_size: int, head, gpu_bytes: int, image_size=None, plan: Plan | None = None
) -> str | None:
    """The first change, cheapest first, whose plan fits ``gpu_bytes``: a smaller batch, int8 then
    nf4 quantization of the denoiser and text encoders, model offload, then both. ``plan``: the
    plan of ``config`` and ``batch_size`` if already made."""
    arch = architecture(config.model_id)
    big = [n for n in arch["components"] if n.startswith(("transformer", "unet", "text_encoder"))]
    tries: list[tuple[str, BackboneConfig, int]] = []
    for smaller in sorted({1, max(1, batch_size // 2)}, reverse=True):
        if smaller < batch_size:
            tries.append((f"data.init_args.batch_size: {smaller}", config, smaller))
    quantized = []  # int8, then nf4, of the denoiser and the text encoders
    for kind, backend in (("int8wo", "torchao"), ("nf4", "bitsandbytes")):
        text = ", ".join(f"{n}: {{backend: {backend}, type: {kind}}}" for n in big)
        quantized.append(
            (f"backbone.quantization: {{{text}}}", {n: {"backend": backend, "type": kind} for n in big})
        )
    for label, spec in quantized:
        tries.append((label, replace(config, quantization=spec), batch_size))
    tries.append(("backbone.offload: model", replace(config, offload="model"), batch_size))
    for label, spec in quantized:
        both = replace(config, quantization=spec, offload="model")
        tries.append((f"backbone.offload: model and {label}", both, batch_size))
    measured = {batch_size: plan or plan_memory(config, batch_size, head, image_size)}
    for label, candidate, batch in tries:
        if batch not in measured:
            measured[batch] = plan_memory(config, batch, head, image_size)
        if with_memory_settings(measured[batch], candidate).largest()[1] <= gpu_bytes:
            return label
    return None


def format_plan(plan: Plan, gpu_bytes: int | None = None, devices: int = 1) -> str:
    """The plan as a table: the components, then each phase's peak and its parts."""
    gb = lambda b: f"{b / GB:.2f}"  # noqa: E731
    lines = [
        f"Memory plan for {plan.model_id}: {plan.image_size}x{plan.image_size} px, batch {plan.batch_size} "
        f"per device, offload {plan.offload} (GB = 10^9 bytes; per device, {devices} device(s))",
        "",
        "| component | parameters | weights GB | quantized | step activations GB |",
        "|---|---:|---:|---|---:|",
    ]
    for c in plan.components.values():
        lines.append(
            f"| {c.name} | {c.params / 1e9:.3f} B | {gb(c.weight_bytes)} | {c.quantized or '-'} | {gb(c.activation_bytes)} |"
        )
    lines += ["", "| phase | peak GB | made of |", "|---|---:|---|"]
    for phase, parts in plan.phases.items():
        made = ", ".join(f"{k} {gb(v)}" for k, v in parts.items() if v)
        lines.append(f"| {phase} | {gb(plan.peak(phase))} | {made} |")
    if gpu_bytes is not None:
        phase, peak = plan.largest()
        verdict = "fits" if peak <= gpu_bytes else "does NOT fit"
        lines += ["", f"Peak {gb(peak)} GB ({phase}) {verdict} in {gb(gpu_bytes)} GB per GPU."]
    return "\n".join(lines)


def read_run_config(paths: list[str]) -> tuple[BackboneConfig, int, HeadConfig, int]:
    """The backbone, batch size, head and device count of a ``fit`` config (several files merge
    as the CLI merges them)."""
    from grounded_diffusion.cli import GroundedDiffusionCLI

    class Parsed(GroundedDiffusionCLI):
        def before_instantiate_classes(self) -> None:  # nothing is built: only the config is read
            pass

        def instantiate_classes(self) -> None:
            pass

        def after_instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    args = ["fit", *(a for path in paths for a in ("--config", path))]
    cli = Parsed(args=args, run=True, parser_kwargs={"fit": {"parser_mode": "omegaconf+"}})
    resolved = cli._resolved("fit").as_dict()
    model = resolved["model"]["init_args"]
    backbone = BackboneConfig(
        **{k: v for k, v in model["backbone"].items() if k in BackboneConfig.__dataclass_fields__}
    )
    head = HeadConfig(**model.get("head") or {})
    devices = resolved["trainer"].get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    return backbone, int(resolved["data"]["init_args"].get("batch_size", 1)), head, devices


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="grounded-diffusion plan",
        description="Peak GPU memory per device of predict, fit and grounded generation, before the run "
        "(no GPU and no weights needed).",
    )
    parser.add_argument("--config", action="append", required=True, help="the run's config files, as for fit")
    parser.add_argument("--gpu-memory", help="the GPU's memory (e.g. 80GB, 24GB); default: the GPU present")
    parser.add_argument("--batch-size", type=int, help="override data.init_args.batch_size")
    parser.add_argument("--image-size", type=int, help="override the generated images' side")
    args = parser.parse_args(argv)
    backbone, batch, head, devices = read_run_config(args.config)
    batch = args.batch_size or batch
    gpu = (
        parse_memory(args.gpu_memory)
        if args.gpu_memory
        else (torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None)
    )
    plan = plan_memory(backbone, batch, head, args.image_size)
    print(format_plan(plan, gpu, devices))
    if gpu is not None and plan.largest()[1] > gpu:
        change = smallest_change(backbone, batch, head, gpu, args.image_size, plan)
        print(
            f"Smallest change that fits: {change}" if change else "No single change fits; use a larger GPU."
        )
    elif gpu is None:
        print("No GPU here and no --gpu-memory given: pass --gpu-memory 80GB (or 24GB, ...) to check a fit.")
