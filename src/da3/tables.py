"""Plain-text tables for the terminal."""

from __future__ import annotations


def text_table(rows: list[tuple]) -> str:
    """Rows as aligned text columns (the first left-aligned, the others right)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            str(c).ljust(w) if j == 0 else str(c).rjust(w)
            for j, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )
