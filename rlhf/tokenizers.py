"""CLIP tokenizers built locally, without a model hub.

open_clip ships the OpenAI CLIP byte-level BPE (``bpe_simple_vocab_16e6.txt.gz``) inside its
package. The vocabulary and merges built from it here are the ones of
``openai/clip-vit-large-patch14`` (49408 tokens), so a tiny text encoder sees the same token
ids as SD3's real CLIP encoders.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

from rewards.bpe import bytes_to_unicode

# 49152 - 256 - 2 merges: the count OpenAI's CLIP uses from this file.
_N_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary (token -> id) and merge list, from open_clip's bundled file."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : _N_MERGES + 1]]
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(config: dict | str | Path) -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` from a tokenizer config (a dict or a ``config.json``).

    Config keys: ``model_max_length`` (context length, 77 for SD3), ``pad_token``.
    """
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=config.get("bos_token", "<|startoftext|>"),
        eos_token=config.get("eos_token", "<|endoftext|>"),
        pad_token=config.get("pad_token", "<|endoftext|>"),
        unk_token=config.get("unk_token", "<|endoftext|>"),
        model_max_length=int(config.get("model_max_length", 77)),
    )
