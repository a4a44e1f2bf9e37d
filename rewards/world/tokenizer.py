"""The world CLIP's tokenizer: a word-level BPE over the world's vocabulary.

It is a ``transformers.CLIPTokenizer`` whose merges build every world word into one token
(other text falls back to bytes, so nothing is unknown); its ~1k-token vocabulary keeps the
text tower small enough to ship. The end-of-text token has the highest id, so open_clip's
argmax pooling and transformers' first-EOS pooling pick the same position.
"""

from __future__ import annotations

from rewards.bpe import bytes_to_unicode
from rewards.world import scenes as S

CONTEXT_LENGTH = 32


def world_words() -> list[str]:
    words = {"a", "an", "and", "of", "with", "texture", "lighting", "background", "one"}
    for group in (
        S.SHAPES,
        S.PLURAL.values(),
        S.COLOURS,
        S.BACKGROUNDS,
        S.COUNT_WORDS.values(),
        S.RELATIONS,
        S.TEXTURES,
        S.LIGHTING,
        S.SHADING,
        S.BACKDROPS,
    ):
        for phrase in group:
            words.update(phrase.split())
    return sorted(words)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word under ``ranks`` (lowest rank merges first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges: CLIP's 512 byte tokens, then for each world word the merges that
    join what the earlier merges make of it into one ``word</w>`` token (later merges rank
    higher, so they never split an earlier word), then the two specials."""
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    known = set(tokens)
    ranks: dict[tuple[str, str], int] = {}
    for word in world_words():
        parts = _bpe(word, ranks)
        left = parts[0]
        for right in parts[1:]:
            ranks[(left, right)] = len(ranks)
            left = left + right
            if left not in known:
                tokens.append(left)
                known.add(left)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    merges = sorted(ranks, key=ranks.get)
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(context_length: int = CONTEXT_LENGTH):
    """The world's ``CLIPTokenizer`` (pads with end-of-text to ``context_length``)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=context_length,
    )
