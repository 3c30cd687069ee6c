"""Plain-text tables for the terminal."""

from __future__ import annotations


def text_table(rows: list[tuple], left: tuple[int, ...] = (0,)) -> str:
    """Rows as aligned text columns (those in ``left`` left-aligned, the others right)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            str(c).ljust(w) if j in left else str(c).rjust(w)
            for j, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    )
