"""Byte-level BPE pieces shared by the CLIP tokenizers built here (no hub download)."""

from __future__ import annotations

from open_clip.tokenizer import bytes_to_unicode as _byte_table


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable characters for the 256 byte values, in CLIP's vocabulary order
    (printable bytes first, the rest after): open_clip's byte table, as its tokenizer lists it."""
    return list(_byte_table().values())
