"""How amounts are written in messages and tables: ``1 credit``, ``0.5 credits``, ``95.17``."""

from __future__ import annotations

__all__ = ["amount", "number"]


def number(value: float) -> str:
    """A balance without float noise: ``3``, ``0.5``, ``95.17``."""
    if value == int(value):
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def amount(value: float, unit: str) -> str:
    """``value`` of ``unit`` in words: ``1 credit``, ``2.5 credits``, ``0 credits``.

    Units are ids named in the plural (a credit system such as ``credits``): exactly 1 of
    them reads in the singular.
    """
    if value == 1 and len(unit) > 1 and unit.endswith("s") and not unit.endswith("ss"):
        unit = unit[:-1]
    return f"{number(value)} {unit}"
