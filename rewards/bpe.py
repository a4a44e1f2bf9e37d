"""Byte-level BPE pieces shared by the CLIP tokenizers built here (no hub download)."""

from __future__ import annotations


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable characters for the 256 byte values, in CLIP's vocabulary order
    (printable bytes first, the rest after)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]
