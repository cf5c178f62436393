"""Counts as a person writes them: ``1 test triple``, ``2,000 test triples``."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` with thousands separators and ``noun`` in the singular for 1, else ``plural`` (``noun + "s"``)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
