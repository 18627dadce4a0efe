"""``grounded-diffusion demo``: a Gradio page over a trained head (``pip install -e ".[demo]"``).

    grounded-diffusion demo --head outputs/shapes/head          # the head `make quickstart` exports
    grounded-diffusion demo --checkpoint outputs/scenes/checkpoints/last.ckpt

Tab "Generate": prompt and category names in; the image with one coloured mask per category and a
legend out (seed and steps controls); a pixel shows its most probable category, as the label maps.
Tab "Segment an image": an uploaded image and names in, its masks out. Both are also an API
(``gradio_client``: ``/generate`` and ``/segment``).
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np

from grounded_diffusion.api import GroundedGenerator, GroundedImages
from grounded_diffusion.data.voc import PALETTE_RGB
from grounded_diffusion.errors import ConfigError, UserError
from grounded_diffusion.inference import HEAD
from grounded_diffusion.reports import TRAINING_FREE
from grounded_diffusion.shapes_world.models import SHAPES_SD_ID

logger = logging.getLogger(__name__)
TITLE = "Grounded diffusion"
# The prompt, names and seed the page opens with. Shapes world: two categories unseen by split 1's
# head, which the miniature SD draws more often than most (it draws what a prompt names about 60 %
# of the time; "green triangle" almost never): both found by the oracle in 5 of the first 8 seeds.
EXAMPLES = {
    SHAPES_SD_ID: ("a photograph of a blue cross and a yellow square", "blue cross, yellow square", 0)
}
DEFAULT_EXAMPLE = ("a photograph of a dog and a cat", "dog, cat", 0)


def category_names(text: str) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def annotation(result: GroundedImages) -> tuple[tuple, dict[str, str]]:
    """The first image of ``result`` and its masks as ``gr.AnnotatedImage`` takes them, and the
    colour of each category (its VOC palette colour, as in the overlays). A category's mask is
    where it wins the label map (``GroundedImages.label_maps``: each pixel its most probable
    category above the threshold), so that overlapping masks do not hide each other."""
    names, labels = result.categories[0], result.label_maps()[0]
    colours = {
        n: "#{:02x}{:02x}{:02x}".format(*(int(v) for v in PALETTE_RGB[k + 1])) for k, n in enumerate(names)
    }
    masks = [((labels == k + 1).astype(np.float32), n) for k, n in enumerate(names)]
    return (np.asarray(result.images[0]), masks), colours


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def say_unreadable_uploads(gr, image):
    """``image`` (a ``gr.Image``) says an upload that is not an image (a text file, a damaged
    file) in one line on the page, instead of failing inside Gradio's own decoding. (Wrapped on
    the instance: a subclass of a Gradio component makes Gradio write a .pyi file beside this one.)"""
    decode = image.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except gr.Error:
            raise
        except Exception as error:  # PIL's UnidentifiedImageError, a truncated file, ...
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(
                f"{name} cannot be read as an image ({one_line(error)}): upload a PNG, JPEG or WebP"
            ) from None

    image.preprocess = preprocess
    return image


def build_demo(generator: GroundedGenerator, show_example: bool = True):
    """The Blocks app (not launched); ``show_example``: the page opens with the example prompt's
    result (generated once, here)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    backbone = generator.backbone
    steps = backbone.step_counts_through_capture(limit=100)
    prompt_example, names_example, seed_example = EXAMPLES.get(
        generator.pretrained.backbone.model_id, DEFAULT_EXAMPLE
    )

    def run(call):
        # Every error is said on the page in one line, as gr.Error shows it (Gradio's own message
        # for anything else is "upstream app raised an exception"); the server logs the rest.
        try:
            value, colours = annotation(call())
            return gr.AnnotatedImage(value=value, color_map=colours)
        except UserError as error:  # a bad name or image: shown on the page, nothing else breaks
            raise gr.Error(str(error)) from None
        except Exception as error:
            logger.exception("the demo's call failed")
            raise gr.Error(
                f"unexpected error ({type(error).__name__}: {one_line(error)}); see the server's log"
            ) from None

    def generate(prompt: str, names: str, seed: float | None, num_steps: int | None, method: str = HEAD):
        if not (prompt or "").strip():
            raise gr.Error("Write a prompt.")
        if seed is None or num_steps is None:
            raise gr.Error(
                "The seed is empty: enter a whole number, e.g. 0." if seed is None else "Choose a step count."
            )
        return run(
            lambda: generator(
                prompt,
                category_names(names),
                seed=seed,
                num_inference_steps=num_steps,
                progress=False,
                method=method,
            )
        )

    def segment(image, names: str, prompt: str, mode: str, method: str = HEAD):
        if image is None:
            raise gr.Error("Upload an image.")
        return run(
            lambda: generator.segment(
                image,
                category_names(names),
                prompt=(prompt or "").strip() or None,
                mode=mode,
                progress=False,
                method=method,
            )
        )

    # The head's masks, or a training-free method's beside it (ConceptAttention on a DiT).
    methods = [("grounding head", HEAD), (TRAINING_FREE[backbone.baseline_method], backbone.baseline_method)]
    if backbone.concept_attention:
        methods.append((TRAINING_FREE["concept_attention"], "concept_attention"))

    def method_choice():
        return gr.Radio(
            methods,
            value=HEAD,
            label="Masks from",
            info="training-free methods: τ 0.4; ConceptAttention: argmax",
        )

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(
            f"# {TITLE}\nA frozen diffusion model (`{generator.pretrained.backbone.model_id}`) and a trained grounding "
            "head: one mask for every category you name, seen in training or not."
        )
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", value=prompt_example)
                    names = gr.Textbox(label="Categories (comma-separated)", value=names_example)
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=seed_example, precision=0)
                        num_steps = gr.Dropdown(
                            label="Steps",
                            choices=steps,
                            value=backbone.config.num_inference_steps,
                            info="the schedules that pass the head's capture step",
                        )
                    method = method_choice()
                    button = gr.Button("Generate", variant="primary")
                value, colours = None, None
                if show_example:
                    example = generator(
                        prompt_example, category_names(names_example), seed=seed_example, progress=False
                    )
                    value, colours = annotation(example)
                output = gr.AnnotatedImage(
                    value=value, color_map=colours, label="Image and masks", height=420, format="png"
                )
            button.click(generate, [prompt, names, seed, num_steps, method], output, api_name="generate")
        with gr.Tab("Segment an image"):
            with gr.Row():
                with gr.Column():
                    image = say_unreadable_uploads(gr, gr.Image(label="Image", type="pil"))
                    seg_names = gr.Textbox(label="Categories (comma-separated)", value=names_example)
                    seg_prompt = gr.Textbox(
                        label="Prompt (optional)", placeholder="default: a photograph of a {c1} and a {c2}"
                    )
                    mode = gr.Radio(
                        ["noise", "ddim_inversion"],
                        value=generator.pretrained.real_image_mode,
                        label="To the capture step by",
                    )
                    seg_method = method_choice()
                    seg_button = gr.Button("Segment", variant="primary")
                seg_output = gr.AnnotatedImage(label="Masks", height=420, format="png")
            seg_button.click(
                segment, [image, seg_names, seg_prompt, mode, seg_method], seg_output, api_name="segment"
            )
    return demo


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="grounded-diffusion demo", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--head", help="a head folder (grounded-diffusion export) or Hub repository id")
    source.add_argument("--checkpoint", help="a `fit` checkpoint of a GroundingModule")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="default: the head's on a GPU, float32 on a CPU",
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError('the demo needs Gradio: pip install -e ".[demo]"') from None
    if args.head:
        generator = GroundedGenerator.from_pretrained(args.head, device=args.device, dtype=args.dtype)
    else:
        generator = GroundedGenerator.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
    build_demo(generator).launch(server_name=args.host, server_port=args.port)
