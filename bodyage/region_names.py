"""How region names read in figures and LaTeX tables (no imports: :mod:`analysis` uses it).

Tables on disk keep TotalSegmentator's names (``gluteus_maximus_left``); what a person
reads shows :func:`display_name` (``gluteus maximus (left)``).
"""

from __future__ import annotations

#: side suffixes of region names and how they read: ``kidney_left`` -> ``kidney (left)``
_SIDES: tuple[str, ...] = ("left", "right")


def display_name(region: str) -> str:
    """The readable name of a region for figures and LaTeX tables.

    Underscores become spaces and a side suffix becomes a parenthesis:
    ``gluteus_maximus_left`` -> ``gluteus maximus (left)``, ``portal_vein_and_splenic_vein``
    -> ``portal vein and splenic vein``. Names without underscores are returned unchanged.
    Tables on disk (CSV, parquet) keep the raw names; only what a person reads uses this.

    Parameters
    ----------
    region
        A region name as in ``labels.json`` (or a group name of :data:`REGION_GROUPS`).

    Returns
    -------
    str
        The name to print.
    """
    stem, _, side = region.rpartition("_")
    if stem and side in _SIDES:
        return f"{stem.replace('_', ' ')} ({side})"
    return region.replace("_", " ")
