"""The region registry: label ids and names, region groups and region kinds.

Names and ids come from TotalSegmentator's own class maps (``total_mr`` ids 1–50 keep
their ids; the tissue classes of ``tissue_types_mr`` get ids 51–53), read from
:mod:`totalsegmentator.map_to_binary`, which imports neither torch nor weights, or from the
copy in :mod:`bodyage.ts_classes` when TotalSegmentator is not installed. This module
itself imports nothing heavy, so :mod:`analysis` can use the groups and kinds;
:func:`display_name` lives in :mod:`bodyage.region_names`, which the layer contract lets
:mod:`analysis` import (this module reaches TotalSegmentator's class map inside a function).

A study's ``labels.json`` is always the authority for that study: use
:func:`LabelTable.from_json` to read it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bodyage.errors import InputError, quoted
from bodyage.region_names import display_name as display_name  # re-exported: the names users read

#: TotalSegmentator task whose classes keep their ids (1–50)
ORGAN_TASK = "total_mr"
#: TotalSegmentator task whose classes are appended after the organ ids
TISSUE_TASK = "tissue_types_mr"
#: first id given to the tissue classes in the combined map
TISSUE_ID_OFFSET = 50

#: largest label id: masks are stored as uint16, and per-label tables are sized by the largest id
MAX_LABEL_ID = 65535

RegionKind = Literal["organ", "bone", "muscle", "vessel", "fat", "nervous", "other"]

#: named groups of regions used by attribution and statistics (group -> member names)
REGION_GROUPS: dict[str, tuple[str, ...]] = {
    "kidney": ("kidney_left", "kidney_right"),
    "adrenal_gland": ("adrenal_gland_left", "adrenal_gland_right"),
    "lung": ("lung_left", "lung_right"),
    "iliac_vessels": (
        "iliac_artery_left",
        "iliac_artery_right",
        "iliac_vena_left",
        "iliac_vena_right",
    ),
    "humerus": ("humerus_left", "humerus_right"),
    "scapula": ("scapula_left", "scapula_right"),
    "clavicula": ("clavicula_left", "clavicula_right"),
    "femur": ("femur_left", "femur_right"),
    "hip": ("hip_left", "hip_right"),
    "gluteus": (
        "gluteus_maximus_left",
        "gluteus_maximus_right",
        "gluteus_medius_left",
        "gluteus_medius_right",
        "gluteus_minimus_left",
        "gluteus_minimus_right",
    ),
    "gluteus_maximus": ("gluteus_maximus_left", "gluteus_maximus_right"),
    "autochthon": ("autochthon_left", "autochthon_right"),
    "iliopsoas": ("iliopsoas_left", "iliopsoas_right"),
}

#: regions that only one sex has (region -> "F"/"M"): absent in the other sex is expected, not missing
SEX_SPECIFIC_REGIONS: dict[str, str] = {"prostate": "M"}

_KIND_BY_NAME: dict[str, RegionKind] = {
    "sacrum": "bone",
    "vertebrae": "bone",
    "intervertebral_discs": "bone",
    "spinal_cord": "nervous",
    "brain": "nervous",
    "aorta": "vessel",
    "inferior_vena_cava": "vessel",
    "portal_vein_and_splenic_vein": "vessel",
    "subcutaneous_fat": "fat",
    "torso_fat": "fat",
    "skeletal_muscle": "muscle",
}
_KIND_BY_PREFIX: tuple[tuple[str, RegionKind], ...] = (
    ("iliac_", "vessel"),
    ("humerus", "bone"),
    ("scapula", "bone"),
    ("clavicula", "bone"),
    ("femur", "bone"),
    ("hip_", "bone"),
    ("gluteus", "muscle"),
    ("autochthon", "muscle"),
    ("iliopsoas", "muscle"),
)


def region_kind(name: str) -> RegionKind:
    """Return the kind of a region (organ, bone, muscle, vessel, fat, nervous)."""
    if name in _KIND_BY_NAME:
        return _KIND_BY_NAME[name]
    for prefix, kind in _KIND_BY_PREFIX:
        if name.startswith(prefix):
            return kind
    return "organ"


def group_of(name: str) -> str:
    """Return the coarsest-but-one group a region belongs to (itself when ungrouped).

    ``gluteus_maximus_left`` -> ``gluteus_maximus``; ``kidney_left`` -> ``kidney``.
    Groups listed later that are subsets of earlier ones win (more specific).
    """
    best: str | None = None
    for group, members in REGION_GROUPS.items():
        if name in members and (best is None or len(members) < len(REGION_GROUPS[best])):
            best = group
    return best if best is not None else name


@dataclass(frozen=True)
class LabelTable:
    """Mapping between integer label ids and region names.

    Attributes
    ----------
    names
        ``{id: name}``, ids from 1 to :data:`MAX_LABEL_ID` (0 is background).
    """

    names: Mapping[int, str]

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for label_id, name in self.names.items():
            if not isinstance(label_id, int) or label_id <= 0:
                raise InputError(f"label ids must be positive integers; got {quoted(label_id)} for {quoted(name)}")
            if label_id > MAX_LABEL_ID:
                raise InputError(f"label id {label_id} of {quoted(name)} is larger than {MAX_LABEL_ID}")
            if name in seen:
                raise InputError(f"region name {name!r} has two ids: {seen[name]} and {label_id}")
            seen[name] = label_id

    @property
    def ids(self) -> list[int]:
        """Label ids in increasing order."""
        return sorted(self.names)

    @property
    def regions(self) -> list[str]:
        """Region names in id order."""
        return [self.names[i] for i in self.ids]

    @property
    def max_id(self) -> int:
        """Largest label id."""
        return max(self.names) if self.names else 0

    def id_of(self, name: str) -> int:
        """Return the id of region ``name``; raise :class:`InputError` if unknown."""
        for label_id, n in self.names.items():
            if n == name:
                return label_id
        raise InputError(f"unknown region {name!r}; known regions: {', '.join(self.regions)}")

    def __contains__(self, name: object) -> bool:
        return name in self.names.values()

    def subset(self, names: Iterable[str]) -> LabelTable:
        """Return the table restricted to ``names`` (ids kept)."""
        wanted = set(names)
        return LabelTable({i: n for i, n in self.names.items() if n in wanted})

    def to_json_dict(self) -> dict[str, str]:
        """``{"1": "spleen", ...}`` as written to ``labels.json``."""
        return {str(i): self.names[i] for i in self.ids}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write ``labels.json`` atomically."""
        from bodyage.atomic import write_json

        return write_json(path, self.to_json_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> LabelTable:
        """Read a ``labels.json``; raise :class:`InputError` naming the file on problems.

        Raises
        ------
        InputError
            If the file is missing, not UTF-8, not a JSON object ``{id: name}``, or an id
            is not an integer from 1 to :data:`MAX_LABEL_ID`.
        """
        p = Path(path)
        try:
            raw = json.loads(p.read_bytes().decode("utf-8-sig"))
        except FileNotFoundError as err:
            raise InputError(f"{p}: label table not found") from err
        except UnicodeDecodeError as err:
            raise InputError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from err
        except json.JSONDecodeError as err:
            raise InputError(f"{p}: not valid JSON ({err.msg} at line {err.lineno})") from err
        if not isinstance(raw, dict):
            raise InputError(f"{p}: expected an object {{id: name}}, found {type(raw).__name__}")
        names: dict[int, str] = {}
        for key, value in raw.items():
            try:
                label_id = int(key)
            except ValueError as err:
                raise InputError(f"{p}: label id {quoted(key)} is not an integer") from err
            if not 1 <= label_id <= MAX_LABEL_ID:
                raise InputError(f"{p}: label id {quoted(key)} is outside 1-{MAX_LABEL_ID} (0 is the background)")
            if not isinstance(value, str):
                raise InputError(f"{p}: label {quoted(key)} has name {quoted(value)}, expected a string")
            if label_id in names:
                raise InputError(f"{p}: label id {label_id} is given twice")
            names[label_id] = value
        try:
            return cls(names)
        except InputError as err:
            raise InputError(f"{p}: {err}") from err


def totalsegmentator_class_map(task: str) -> dict[int, str]:
    """Return TotalSegmentator's ``{id: name}`` map for ``task`` (no torch, no weights).

    Read from :mod:`totalsegmentator.map_to_binary` when TotalSegmentator is installed,
    else from the copy shipped in :mod:`bodyage.ts_classes` (the tasks bodyage uses), so the
    minimal install (without the ``segment`` extra) simulates and imports masks.

    Raises
    ------
    InputError
        If TotalSegmentator does not know ``task`` (or, when it is not installed, the
        shipped copy has no such task).
    """
    from bodyage.ts_classes import CLASS_MAPS

    try:
        from totalsegmentator.map_to_binary import class_map
    except ImportError:
        if task not in CLASS_MAPS:
            raise InputError(
                f"TotalSegmentator task {task!r} is not one of {', '.join(CLASS_MAPS)} and TotalSegmentator is "
                "not installed to look it up; install it with: pip install 'bodyage[segment]'"
            ) from None
        return dict(CLASS_MAPS[task])
    if task not in class_map:
        raise InputError(f"TotalSegmentator has no task {task!r}")
    return {int(k): str(v) for k, v in class_map[task].items()}


def combined_label_table() -> LabelTable:
    """Return the combined label table: ``total_mr`` ids 1–50, ``tissue_types_mr`` 51–53."""
    names = dict(totalsegmentator_class_map(ORGAN_TASK))
    for label_id, name in sorted(totalsegmentator_class_map(TISSUE_TASK).items()):
        names[TISSUE_ID_OFFSET + label_id] = name
    return LabelTable(names)
