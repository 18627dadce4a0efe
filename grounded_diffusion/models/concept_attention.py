"""ConceptAttention (Helbling et al., 2025): the training-free maps of diffusion transformers.

Each category is a *concept*: its own tokens, embedded by the backbone's own text path (the text
encoders, then the transformer's context embedder). In the joint blocks, the concept tokens go
through the text stream's modulation, q/k/v projections and norms, attend over [concepts; image]
keys and values, and take the text stream's residual and MLP updates, block after block. Nothing
attends to them: the image and text tokens' attention, and so the generated image, is the model's
own. In each traced block, the map of a concept is the dot product of its tokens' attention
outputs with the image tokens' (both in the heads' output space, before the output projection),
averaged over its tokens and softmaxed over the sample's concepts at each image token; the maps
are then averaged over the traced blocks and transformer calls (steps).

Memory is O(N·K) for N image and K concept tokens: the concepts' attention is K queries over K + N
keys, and the image tokens' attention outputs are the ones the model computes anyway (read where
its processor calls torch's ``scaled_dot_product_attention``, as the joint-attention tracer reads
its queries and keys); no N x N matrix is kept.

Concept tokens take text position 0 in FLUX's rotary embedding, the position of FLUX.1's text
tokens, where the rotation is the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torch's own, taken before any tracer patches it (a concept step must not reach another tracer).
SCALED_DOT_PRODUCT_ATTENTION = F.scaled_dot_product_attention

# A family's text-stream modulation of the concept tokens in one block: (block, concepts [B, K, D],
# the block's call arguments, B) -> (modulated concepts, the update that takes the concepts'
# attention output [B, K, D] to the concepts after the block, or None where the text stream ends).
Modulation = Callable[[nn.Module, Tensor, dict, int], tuple[Tensor, Callable[[Tensor], Tensor] | None]]


def ada_norm_zero_modulation(block: nn.Module, concepts: Tensor, call: dict, batch: int):
    """SD3 / SD3.5 and FLUX.1 joint blocks: the context stream's AdaLayerNormZero on ``temb``."""
    temb = call["temb"][-batch:]
    if getattr(block, "context_pre_only", False):  # SD3's last block: the text stream ends here
        return block.norm1_context(concepts, temb), None
    modulated, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(concepts, emb=temb)

    def update(attention: Tensor) -> Tensor:
        after = concepts + gate_msa.unsqueeze(1) * block.attn.to_add_out(attention)
        normed = block.norm2_context(after) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return after + gate_mlp.unsqueeze(1) * block.ff_context(normed)

    return modulated, update


def flux2_modulation(block: nn.Module, concepts: Tensor, call: dict, batch: int):
    """FLUX.2 double-stream blocks: the text stream's shift, scale and gate (``temb_mod_txt``),
    computed once per call by the transformer."""
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    mod = call["temb_mod_txt"]
    (shift, scale, gate), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(mod[-batch:], 2)
    modulated = (1 + scale) * block.norm1_context(concepts) + shift

    def update(attention: Tensor) -> Tensor:
        after = concepts + gate * block.attn.to_add_out(attention)
        normed = block.norm2_context(after) * (1 + scale_mlp) + shift_mlp
        return after + gate_mlp * block.ff_context(normed)

    return modulated, update


class ConceptRecordingProcessor:
    """Wraps a joint block's attention processor: when the block's concept step is pending, it
    reads the key, value and output of the model's own attention and runs the concepts' step."""

    def __init__(self, processor, tracer: ConceptAttentionTracer, block: int) -> None:
        self.processor, self.tracer, self.block = processor, tracer, block

    def __call__(self, attn: nn.Module, *args, **kwargs):
        sdpa = F.scaled_dot_product_attention

        def recording(query, key, value, *rest, **options):
            output = sdpa(query, key, value, *rest, **options)
            self.tracer.attend(self.block, attn, key, value, output, options.get("scale"))
            return output

        F.scaled_dot_product_attention = recording
        try:
            return self.processor(attn, *args, **kwargs)
        finally:
            F.scaled_dot_product_attention = sdpa


class ConceptAttentionTracer:
    """Runs concept tokens alongside every transformer call made inside ``trace`` (that ``gate``
    lets through) and collects their maps.

    Args:
        blocks: the transformer's joint (double-stream) blocks, in order: the concept tokens go
            through each of them up to the last traced one.
        traced: the positions in ``blocks`` whose maps are kept.
        modulation: the family's text-stream modulation (``ada_norm_zero_modulation``,
            ``flux2_modulation``).
        image_first: the joint sequence is [image, text] (SD3) rather than [text, image] (FLUX).
        gate: when given, only the transformer calls it lets through are traced (its ``open``).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        traced: Sequence[int],
        modulation: Modulation,
        image_first: bool,
        gate=None,
    ) -> None:
        self.blocks, self.traced = list(blocks), sorted(set(traced))
        self.modulation, self.image_first, self.gate = modulation, image_first, gate
        if not self.traced or self.traced[0] < 0 or self.traced[-1] >= len(self.blocks):
            raise ValueError(
                f"traced blocks {list(traced)} are not positions among {len(self.blocks)} blocks"
            )

    @contextlib.contextmanager
    def trace(
        self,
        tokens: Tensor,
        token_mask: Tensor,
        concept_weights: Tensor,
        categories: int,
        grid: tuple[int, int],
    ) -> Iterator[ConceptAttentionTracer]:
        """``tokens`` [B, K, D]: the concept tokens of the B conditional samples after the context
        embedder, padded (``token_mask`` [B, K]: real tokens); ``concept_weights`` [B, C, K]: each
        concept's mean over its tokens (a padded concept has none); the first ``categories`` of the
        C concepts are the categories, the rest background concepts; ``grid``: the image tokens'
        (rows, columns). The conditional branch is the last B samples of each call."""
        self.tokens, self.token_mask, self.weights = tokens, token_mask.bool(), concept_weights
        self.categories, self.grid = categories, tuple(grid)
        self.sums: dict[int, Tensor] = {}
        self.calls: dict[int, int] = {}
        self.pending: dict[int, tuple] = {}
        last = self.traced[-1]
        handles = [
            block.register_forward_pre_hook(self._before(number), with_kwargs=True)
            for number, block in enumerate(self.blocks[: last + 1])
        ]
        originals = [block.attn.processor for block in self.blocks[: last + 1]]
        for number, block in enumerate(self.blocks[: last + 1]):
            block.attn.set_processor(ConceptRecordingProcessor(block.attn.processor, self, number))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for block, processor in zip(self.blocks, originals):
                block.attn.set_processor(processor)

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def _before(self, number: int):
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.gate is not None and not self.gate.open:
                return
            if number == 0:  # a new transformer call: the concepts start from their embedding
                self.state = self.tokens.to(self._dtype(block))
            modulated, update = self.modulation(block, self.state, kwargs, self.batch)
            self.pending[number] = (modulated, update)

        return hook

    @staticmethod
    def _dtype(block: nn.Module) -> torch.dtype:
        return next(block.parameters()).dtype

    def attend(self, number: int, attn: nn.Module, key: Tensor, value: Tensor, output: Tensor, scale) -> None:
        """One joint attention of block ``number`` (key, value, output [B', heads, S, d]): the
        concepts' attention over [concepts; image], their map, and their update."""
        if number not in self.pending:
            return
        modulated, update = self.pending.pop(number)
        batch, pixels = self.batch, self.grid[0] * self.grid[1]
        length = key.shape[2]
        image = slice(0, pixels) if self.image_first else slice(length - pixels, length)
        key, value, output = key[-batch:, :, image], value[-batch:, :, image], output[-batch:, :, image]
        heads = key.shape[1]
        query_c, key_c, value_c = (
            projection(modulated).unflatten(-1, (heads, -1))
            for projection in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if getattr(attn, "norm_added_q", None) is not None:
            query_c = attn.norm_added_q(query_c)
        if getattr(attn, "norm_added_k", None) is not None:
            key_c = attn.norm_added_k(key_c)
        query_c, key_c, value_c = (t.transpose(1, 2) for t in (query_c, key_c, value_c))  # [B, heads, K, d]
        visible = torch.cat(  # keys a concept attends to: the real concept tokens, every image token
            [self.token_mask.to(key.device), torch.ones(batch, pixels, dtype=torch.bool, device=key.device)],
            1,
        )[:, None, None, :]
        attended = SCALED_DOT_PRODUCT_ATTENTION(
            query_c,
            torch.cat([key_c, key], 2),
            torch.cat([value_c, value], 2),
            attn_mask=visible,
            scale=scale,
        )
        concept_out = attended.transpose(1, 2).flatten(2)  # [B, K, heads * d], the heads' output space
        if number in self.traced:
            image_out = output.transpose(1, 2).flatten(2)  # [B, N, heads * d]
            scores = concept_out.float() @ image_out.float().transpose(1, 2)  # [B, K, N]
            weights = self.weights.to(scores.device, scores.dtype)
            pooled = weights @ scores  # [B, C, N]
            present = weights.sum(-1) > 0
            pooled = pooled.masked_fill(~present[..., None], float("-inf"))
            self.sums[number] = self.sums.get(number, 0) + pooled.softmax(1)
            self.calls[number] = self.calls.get(number, 0) + 1
        if update is not None and number < self.traced[-1]:
            self.state = update(concept_out.to(modulated.dtype))

    def concept_maps(self) -> Tensor:
        """[B, C, rows, columns]: each concept's probability (softmax over the sample's concepts),
        averaged over the traced blocks and calls."""
        if not self.sums:
            raise RuntimeError(
                "No concept attention was traced: run the transformer inside `trace(...)`, with torch's "
                "scaled_dot_product_attention as its attention backend"
            )
        mean = sum(self.sums[n] / self.calls[n] for n in self.sums) / len(self.sums)
        return mean.unflatten(-1, self.grid)

    def word_maps(self) -> Tensor:
        """[B, O, rows, columns]: the categories' maps (the first ``categories`` concepts)."""
        return self.concept_maps()[:, : self.categories]


def argmax_masks(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, O, H, W] bool: each pixel goes to the concept of highest probability, as
    ConceptAttention scores several classes, among the categories' maps [B, O, h, w] (upsampled
    bilinearly) and the background concepts' total, 1 minus theirs (with one background concept,
    exactly its probability)."""
    probabilities = F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=False)
    background = (1 - probabilities.sum(1, keepdim=True)).clamp(min=0)
    winner = torch.cat([probabilities, background], 1).argmax(1)  # [B, H, W]
    return winner[:, None] == torch.arange(maps.shape[1], device=maps.device)[None, :, None, None]
