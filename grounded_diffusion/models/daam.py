"""DAAM heat maps (Tang et al., 2023), batched: cross-attention of words, aggregated over the UNet.

What the reference ``daam`` package computes, per word of the prompt:

1. every cross-attention layer of the UNet's down and up blocks (not the middle block) gives the
   softmax probabilities of each latent pixel over the 77 text tokens, conditional branch only;
   layers at 1/8 of the latent resolution are left out;
2. per (layer, head), the maps are summed over all denoising steps, upsampled bicubically to the
   latent resolution and clamped at 0;
3. the mean over all (layer, head) pairs is the token's heat map; a word's map is the mean over
   its BPE tokens (every occurrence of the word in the prompt).

Here a batch of prompts is traced at once, only the tokens of the requested words are kept, and
the latent size is read from the model (the reference assumes 64² or 96²).

Word matching: the reference pools a word's tokens wherever they occur, so in "a photograph of a
hot dog and a dog" the map of "dog" also takes the "dog" of "hot dog" (COCO: "bear" / "teddy
bear", "dog" / "hot dog"). ``whole`` matching (our default for the reported baseline) leaves out
the occurrences that lie inside an occurrence of a longer category named in the same prompt;
``reference`` keeps them all, as the package does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

from grounded_diffusion.errors import check_choice

WordMatching = Literal["whole", "reference"]


def _bpe_words(tokenizer, text: str) -> list[str]:
    # CLIP's BPE ends a word's last token with </w>; sentencepiece (T5) starts a word with ▁;
    # byte-level BPE (Qwen, FLUX.2) with Ġ, its leading space.
    marks = ("</w>", "\u2581", "\u0120")
    words = tokenizer.tokenize(text)
    for mark in marks:
        words = [t.replace(mark, "") for t in words]
    return [t.lower() for t in words]


def leading_special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer puts before the text: 1 for CLIP's BOS, 0 for T5."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return tokenizer("a").input_ids.index(plain[0])


def word_token_indices(
    tokenizer, prompt: str, word: str, others: Sequence[str] = (), max_length: int | None = None
) -> list[int]:
    """Positions of ``word``'s tokens in the encoded prompt (CLIP: BOS = 0; T5, Qwen: no BOS), every
    occurrence, as the reference's ``compute_token_merge_indices``. With ``others`` (the other
    categories named in the prompt), occurrences inside an occurrence of a longer one are left out
    (whole-category matching), unless that would leave none. ``max_length``: the encoded length
    (default the tokenizer's ``model_max_length``)."""
    tokens = _bpe_words(tokenizer, prompt)

    def spans(text: str) -> list[range]:
        # Byte-level BPE (Qwen) tokenizes a word differently at the start of a text and after a
        # space: both forms are looked for.
        forms = {tuple(_bpe_words(tokenizer, form)) for form in (text, " " + text)}
        return sorted(
            {
                range(i, i + len(f))
                for f in forms
                for i in range(len(tokens))
                if tuple(tokens[i : i + len(f)]) == f
            },
            key=lambda span: span.start,
        )

    found = spans(word)
    if not found:
        raise ValueError(f"The word {word!r} is not in the prompt {prompt!r}")
    longer = [span for other in others for span in spans(other)]
    whole = [
        s
        for s in found
        if not any(s.start >= o.start and s.stop <= o.stop and len(o) > len(s) for o in longer)
    ]
    start = leading_special_tokens(tokenizer)
    positions = [start + k for span in (whole or found) for k in span]
    max_length = max_length or tokenizer.model_max_length
    if max(positions) >= max_length:
        raise ValueError(f"The word {word!r} lies beyond the {max_length} tokens of {prompt!r}")
    return positions


def cross_attention_layers(unet: nn.Module) -> list[Attention]:
    """The cross-attention modules DAAM reads: ``attn2`` of every transformer block in the
    down and up blocks."""
    layers = []
    for block in list(unet.up_blocks) + list(unet.down_blocks):  # the reference's order
        for transformer in getattr(block, "attentions", None) or []:
            layers += [t.attn2 for t in transformer.transformer_blocks]
    return layers


class HeatMapProcessor(AttnProcessor2_0):
    """The usual attention, plus the explicit probabilities of the traced tokens for DAAM."""

    def __init__(self, tracer: DAAMTracer, layer: int) -> None:
        super().__init__()
        self.tracer, self.layer = tracer, layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        if encoder_hidden_states is not None and self.tracer.traces(hidden_states.shape[1]):
            # Only the conditional branch is traced: the last B samples of a guidance batch.
            cond = -self.tracer.batch
            context = (
                attn.norm_encoder_hidden_states(encoder_hidden_states)
                if attn.norm_cross
                else encoder_hidden_states
            )
            query = attn.head_to_batch_dim(attn.to_q(hidden_states[cond:]))
            key = attn.head_to_batch_dim(attn.to_k(context[cond:]))
            probs = attn.get_attention_scores(query, key, None)  # [B * heads, pixels, tokens]
            self.tracer.add(self.layer, probs.unflatten(0, (-1, attn.heads)))
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


class DAAMTracer:
    """Collects DAAM heat maps of chosen words over every UNet call made inside ``trace``."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.layers = cross_attention_layers(unet)

    @contextlib.contextmanager
    def trace(
        self,
        tokenizer,
        prompts: Sequence[str],
        words: Sequence[Sequence[str]],
        latent_size: int | None = None,
        matching: WordMatching = "whole",
    ) -> Iterator[DAAMTracer]:
        """Trace ``words`` (one list per prompt) of the B ``prompts`` (the conditional branch is
        the last B samples of each UNet call, as in diffusers' guidance batches); ``matching``:
        ``whole`` or ``reference`` (see the module's docstring)."""
        self.token_index, self.word_weights = word_token_table(tokenizer, prompts, words, matching)
        self.sums = {}
        self.latent_size = latent_size or self.unet.config.sample_size
        originals = [layer.processor for layer in self.layers]
        for number, layer in enumerate(self.layers):
            layer.set_processor(HeatMapProcessor(self, number))
        try:
            yield self
        finally:
            for layer, processor in zip(self.layers, originals):
                layer.set_processor(processor)

    def traces(self, pixels: int) -> bool:
        """Whether a layer with this many pixels counts: the reference leaves out the 1/8
        resolution (its probabilities are then not even computed)."""
        return self.latent_size // int(pixels**0.5) != 8

    @property
    def batch(self) -> int:
        """B, the number of traced prompts."""
        return self.token_index.shape[0]

    def add(self, layer: int, probs: Tensor) -> None:
        """probs [B, heads, pixels, 77] of one call, its conditional branch."""
        if not self.traces(probs.shape[2]):
            return
        if self.token_index.device != probs.device:  # once per trace, not on every attention call
            self.token_index = self.token_index.to(probs.device)
        index = self.token_index[:, None, None, :]
        probs = probs.float()
        kept = probs.gather(-1, index.expand(*probs.shape[:3], index.shape[-1]))  # [B, heads, pixels, K]
        self.sums[layer] = self.sums.get(layer, 0) + kept

    def layer_sides(self) -> dict[int, int]:
        """The side (in latent pixels) of each traced layer's attention map."""
        return {layer: int(kept.shape[2] ** 0.5) for layer, kept in self.sums.items()}

    def token_maps(self, layers: Collection[int] | None = None) -> Tensor:
        """[B, K, latent, latent]: mean over (layer, head) of clamp(bicubic(Σ_steps probs)), over
        the traced layers (DAAM) or only ``layers`` (numbers of ``layer_sides``)."""
        if not self.sums:
            raise RuntimeError("No cross-attention was traced: run the UNet inside `trace(...)`")
        total, count = 0, 0
        for layer, kept in self.sums.items():
            if layers is not None and layer not in layers:
                continue
            batch, heads, pixels, tokens = kept.shape
            side = int(pixels**0.5)
            maps = kept.permute(0, 1, 3, 2).reshape(batch * heads * tokens, 1, side, side)
            maps = F.interpolate(maps, size=(self.latent_size, self.latent_size), mode="bicubic").clamp_(
                min=0
            )
            total = total + maps.view(batch, heads, tokens, self.latent_size, self.latent_size).sum(1)
            count += heads
        if not count:
            raise ValueError(f"None of the layers {sorted(layers)} was traced (traced: {sorted(self.sums)})")
        return total / count

    def word_maps(self, layers: Collection[int] | None = None) -> Tensor:
        """[B, O, latent, latent]: each traced word's map, the mean of its tokens' maps."""
        token_maps = self.token_maps(layers)
        return torch.einsum("bok,bkhw->bohw", self.word_weights.to(token_maps.device), token_maps)


@dataclass(frozen=True)
class TextStream:
    """One tokenizer's stretch of the text tokens a model attends to: SD's one CLIP context,
    SD3's 77 CLIP tokens followed by its T5 tokens, or FLUX.2's prompt inside its chat markup
    (``start``: the position of the prompt's first token, ``length``: how many can follow)."""

    tokenizer: Any
    start: int
    length: int


def word_token_table(
    tokenizer, prompts: Sequence[str], words: Sequence[Sequence[str]], matching: WordMatching = "whole"
) -> tuple[Tensor, Tensor]:
    """The tokens to trace and how they make words: ``token_index`` [B, K] and ``word_weights``
    [B, O, K] (O = the most words of a prompt; empty slots weigh nothing). ``tokenizer``: one
    tokenizer (its tokens from position 0), or the ``TextStream``s of a model with several, whose
    tokens of a word are pooled together."""
    check_choice("DAAM word matching", matching, WordMatching)
    streams = (
        tokenizer
        if isinstance(tokenizer, (list, tuple))
        else [TextStream(tokenizer, 0, tokenizer.model_max_length)]
    )

    def positions_of(prompt: str, word: str, others: Sequence[str]) -> list[int]:
        others = others if matching == "whole" else ()
        return [
            s.start + k
            for s in streams
            for k in word_token_indices(s.tokenizer, prompt, word, others, s.length)
        ]

    positions = [[positions_of(p, w, ws) for w in ws] for p, ws in zip(prompts, words)]
    num_tokens = max(1, max(sum(len(p) for p in ps) for ps in positions))
    num_words = max(1, max(len(ws) for ws in words))
    token_index = torch.zeros(len(prompts), num_tokens, dtype=torch.long)
    word_weights = torch.zeros(len(prompts), num_words, num_tokens)
    for b, per_word in enumerate(positions):
        k = 0
        for o, tokens in enumerate(per_word):
            token_index[b, k : k + len(tokens)] = torch.tensor(tokens)
            word_weights[b, o, k : k + len(tokens)] = 1 / len(tokens)
            k += len(tokens)
    return token_index, word_weights


def normalized_heat_maps(heat_maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Word heat maps [B, O, h, w] -> image size, each min-max normalised to [0, 1], as the
    reference's ``WordHeatMap.expand_as`` (bicubic upsampling, not absolute)."""
    maps = F.interpolate(heat_maps.float(), size=tuple(size), mode="bicubic")
    low = maps.flatten(2).min(-1).values[..., None, None]
    high = maps.flatten(2).max(-1).values[..., None, None]
    return (maps - low) / (high - low + 1e-8)


def daam_masks(heat_maps: Tensor, size: tuple[int, int], threshold: float = 0.4) -> Tensor:
    """DAAM's segmentation: the normalised heat map above ``threshold`` (τ = 0.4 by default)."""
    return normalized_heat_maps(heat_maps, size) > threshold
