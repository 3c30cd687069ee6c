"""The ``frozen_bits`` setting: the precision the frozen weights are held in."""

from __future__ import annotations

from da3.errors import Da3Error

FROZEN_BITS = (32, 16, 8)


def frozen_bits_value(text: str | int | None) -> int | None:
    """``--frozen-bits`` as 32, 16 or 8 (None: not given); a one-line Da3Error otherwise."""
    if text is None:
        return None
    try:
        bits = int(str(text).strip())
    except ValueError:
        bits = None
    if bits not in FROZEN_BITS:
        shown = repr(text) if len(repr(text)) <= 60 else repr(text)[:57] + "..."
        raise Da3Error(f"--frozen-bits must be 32, 16 or 8, got {shown}")
    return bits
