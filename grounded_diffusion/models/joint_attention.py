"""The training-free baseline on diffusion transformers: per-word maps from joint attention.

An MM-DiT (SD3, FLUX.1, FLUX.2) has no cross-attention: image and text tokens attend jointly in one
softmax over all of them. DAAM's counterpart reads, in each traced block, the probability that an
image query gives each traced text key, under the real softmax over every key. Only image-query x
traced-text-key probabilities are kept, and the image queries go through in chunks, so that
memory is O(N·K) plus one chunk's logits, never the N x N image part. Per word, as DAAM: summed
over the traced denoising steps, averaged over heads and blocks, pooled over the word's tokens
(in every text stream: SD3's CLIP and T5 tokens alike), with DAAM's whole-category matching.

Token order: SD3 puts [image, text] in its joint sequence, FLUX.1 and FLUX.2 [text, image] (their
single-stream blocks too). The query and key the model itself computed (after its q/k norms and the FLUX rotary
embedding) are read where the block's processor hands them to torch's
``scaled_dot_product_attention``, so no processor is re-implemented here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from grounded_diffusion.models.daam import TextStream, WordMatching, word_token_table

CHUNK_ELEMENTS = 2**25  # logits of one query chunk: 128 MB in float32


class RecordingProcessor:
    """Wraps a block's attention processor; hands the query and key it attends with to the tracer."""

    def __init__(self, processor, tracer: JointAttentionTracer, layer: int) -> None:
        self.processor, self.tracer, self.layer = processor, tracer, layer

    def __call__(self, attn: nn.Module, *args, **kwargs):
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def recording(query, key, value, *rest, **options):
            self.tracer.add(self.layer, query, key, options.get("scale"))
            return sdpa(query, key, value, *rest, **options)

        torch.nn.functional.scaled_dot_product_attention = recording
        try:
            return self.processor(attn, *args, **kwargs)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa


class JointAttentionTracer:
    """Collects per-word joint-attention maps over every transformer call made inside ``trace``.

    Args:
        attentions: the attention modules to trace (one per block).
        image_first: the joint sequence is [image, text] (SD3) rather than [text, image] (FLUX).
        gate: when given, only the transformer calls it lets through are traced (its ``open``).
    """

    def __init__(self, attentions: Sequence[nn.Module], image_first: bool, gate=None) -> None:
        self.attentions, self.image_first, self.gate = list(attentions), image_first, gate

    @contextlib.contextmanager
    def trace(
        self,
        streams: Sequence[TextStream],
        prompts: Sequence[str],
        words: Sequence[Sequence[str]],
        text_length: int,
        grid: tuple[int, int],
        matching: WordMatching = "whole",
    ) -> Iterator[JointAttentionTracer]:
        """Trace ``words`` (one list per prompt) of the B ``prompts``, whose text tokens are the
        ``streams`` (``text_length`` in all); the conditional branch is the last B samples of each
        call (a guidance batch is [uncond, cond]); ``grid``: the image tokens' (rows, columns)."""
        self.token_index, self.word_weights = word_token_table(list(streams), prompts, words, matching)
        self.text_length = text_length
        self.grid, self.sums = tuple(grid), {}
        originals = [attention.processor for attention in self.attentions]
        for number, attention in enumerate(self.attentions):
            attention.set_processor(RecordingProcessor(attention.processor, self, number))
        try:
            yield self
        finally:
            for attention, processor in zip(self.attentions, originals):
                attention.set_processor(processor)

    @property
    def batch(self) -> int:
        return self.token_index.shape[0]

    def add(self, layer: int, query: Tensor, key: Tensor, scale: float | None = None) -> None:
        """query, key [B', heads, S, d] of one joint attention; keeps the conditional branch's
        image-query x traced-text-key probabilities, summed over heads: [B, N, K]."""
        if self.gate is not None and not self.gate.open:
            return
        if self.token_index.device != query.device:  # once per trace
            self.token_index = self.token_index.to(query.device)
        query, key = query[-self.batch :], key[-self.batch :]
        batch, heads, length, dim = key.shape
        pixels = length - self.text_length
        text_start = pixels if self.image_first else 0
        image = slice(0, pixels) if self.image_first else slice(self.text_length, length)
        scale = dim**-0.5 if scale is None else scale
        index = (text_start + self.token_index)[:, None, :, None].expand(batch, heads, -1, dim)
        key = key.float()
        traced_keys = key.gather(2, index)  # [B, heads, K, d]
        queries = query[:, :, image].float()
        chunk = max(1, CHUNK_ELEMENTS // (batch * heads * length))
        kept = []
        for start in range(0, pixels, chunk):
            q = queries[:, :, start : start + chunk] * scale
            normaliser = (q @ key.transpose(-1, -2)).logsumexp(-1, keepdim=True)
            kept.append((q @ traced_keys.transpose(-1, -2) - normaliser).exp().sum(1))
        self.sums[layer] = self.sums.get(layer, 0) + torch.cat(kept, dim=1) / heads

    def token_maps(self) -> Tensor:
        """[B, K, rows, columns]: the traced tokens' probabilities summed over calls, averaged
        over heads and blocks."""
        if not self.sums:
            raise RuntimeError(
                "No joint attention was traced: run the transformer inside `trace(...)`, with torch's "
                "scaled_dot_product_attention as its attention backend"
            )
        mean = sum(self.sums.values()) / len(self.sums)  # [B, N, K]
        return mean.transpose(1, 2).unflatten(-1, self.grid)

    def word_maps(self) -> Tensor:
        """[B, O, rows, columns]: each traced word's map, the mean of its tokens' maps."""
        token_maps = self.token_maps()
        return torch.einsum("bok,bkhw->bohw", self.word_weights.to(token_maps.device), token_maps)
