"""The real CLIP BPE tokenizer, built offline from the vocabulary file that ships in open_clip_torch
(and, for FLUX.2's Qwen3 slot, a byte-level BPE tokenizer of Qwen's class trained here).

OpenAI's CLIP stores its byte-pair merges as ``bpe_simple_vocab_16e6.txt.gz``; Hugging Face's
``CLIPTokenizer`` wants ``vocab.json`` + ``merges.txt``. The conversion below is the one CLIP's own
``SimpleTokenizer`` performs when it builds its encoder table, so token ids are identical.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, Qwen2TokenizerFast

# CLIP keeps the first 48894 merges of the file (49152 tokens - 256 bytes - 2 specials).
NUM_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_vocab_file() -> Path:
    try:
        path = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "The CLIP BPE vocabulary ships inside open_clip_torch; install it with "
            "`pip install open_clip_torch`."
        ) from err
    return Path(str(path))


def write_clip_tokenizer_files(out_dir: str | Path, pad_token: str | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (and the tokenizer config) into ``out_dir``.

    ``pad_token``: default ``<|endoftext|>`` (OpenAI CLIP, SD-1.x); SD-2.x's OpenCLIP pads with "!".
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_vocab_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    extra = {"pad_token": pad_token} if pad_token else {}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH, **extra)
    tokenizer.save_pretrained(out_dir)
    # Recent transformers save tokenizer.json only; older readers need vocab.json + merges.txt.
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out_dir


def load_clip_tokenizer(folder: str | Path, pad_token: str | None = None) -> CLIPTokenizer:
    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MODEL_MAX_LENGTH, **extra)


# Qwen3's chat markup for one user turn, as FLUX.2 [klein]'s pipeline renders it (generation
# prompt on, thinking off): the prompt sits between these, so its tokens start after the prefix.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def byte_level_chat_tokenizer(corpus: list[str], vocab_size: int = 1024) -> Qwen2TokenizerFast:
    """A Qwen2-class tokenizer (byte-level BPE: a word's leading space is its first token's "Ġ";
    no BOS; Qwen3's chat markup) whose merges are learned here from ``corpus`` with the
    ``tokenizers`` trainer. Offline, Qwen3's own 151k-token vocabulary is not available; any text
    still encodes (every byte is a token)."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(corpus, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=model,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=512,
    )
