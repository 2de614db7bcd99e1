"""Captions of the LaTeX tables from a file: table stem -> caption.

``bodyage stats --captions FILE`` (and ``run_stats(captions=...)``) replaces the built-in
captions. The file is YAML (``.yaml``/``.yml``) or JSON (``.json``), one mapping::

    phenotype_models: Effects of each phenotype on the brain-age gap
    region_models: "Regional {method} attribution: phenotype effects"
    region_models_ablation: Occlusion of each organ (years of predicted age)

A key is a table's file stem (``region_models_ablation`` for ``region_models_ablation.tex``),
or the stem without its method (``region_models``) for every method's table, where
``{method}`` is replaced by the method's name; a stem with its method wins. Captions are
plain text and escaped like every other text. An unknown stem is an error naming it, so a
typo does not silently keep the built-in caption.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from bodyage.errors import InputError

#: tables ``stats`` writes once
SINGLE_TABLES: tuple[str, ...] = ("age_accuracy", "phenotype_models")
#: tables ``stats`` writes once per attribution method, as ``<stem>_<method>.tex``
PER_METHOD_TABLES: tuple[str, ...] = ("region_models", "region_joint", "region_gap_correlations")

CaptionsInput = str | os.PathLike[str] | Mapping[str, str] | None


def table_stems(methods: Iterable[str]) -> list[str]:
    """Every stem a captions file may name, for a run with these attribution methods."""
    return [
        *SINGLE_TABLES,
        *PER_METHOD_TABLES,
        *(f"{stem}_{m}" for stem in PER_METHOD_TABLES for m in methods),
    ]


def load_captions(source: CaptionsInput, *, methods: Iterable[str] = ()) -> dict[str, str]:
    """Read and check a captions file (or mapping).

    Parameters
    ----------
    source
        Path of a YAML/JSON file, a mapping, or ``None`` (no captions: ``{}``).
    methods
        The run's attribution methods (which per-method stems exist).

    Returns
    -------
    dict
        Stem -> caption.

    Raises
    ------
    InputError
        If the file is missing, unreadable, not a mapping of text to text, or names a
        stem that is not one of :func:`table_stems` (the message names the stem).
    """
    if source is None:
        return {}
    where = "captions"
    if isinstance(source, Mapping):
        data: object = dict(source)
    else:
        path = Path(source)
        where = str(path)
        data = _read(path)
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a mapping of table stem to caption, found {type(data).__name__}")
    known = table_stems(methods)
    out: dict[str, str] = {}
    for key, value in data.items():
        if key not in known:
            raise InputError(f"{where}: unknown table {key!r}; known tables: {', '.join(known)}")
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: the caption of {key!r} must be non-empty text, found {value!r}")
        out[str(key)] = value.strip()
    return out


def _read(path: Path) -> object:
    import yaml

    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise InputError(f"{path}: a captions file must be .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: captions file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the captions file ({err})") from err
    try:
        return json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: not valid {'JSON' if suffix == '.json' else 'YAML'} ({first})") from err


def caption_for(captions: Mapping[str, str], stem: str) -> str | None:
    """The caption of the table ``<stem>.tex`` (``None``: keep the built-in one).

    ``captions`` as :func:`load_captions` returns it; for a per-method table
    (``region_models_ablation``) the generic stem (``region_models``) applies when the
    stem itself is not there, with ``{method}`` replaced.
    """
    if stem in captions:
        return captions[stem]
    for generic in PER_METHOD_TABLES:
        if stem.startswith(generic + "_") and generic in captions:
            return captions[generic].replace("{method}", stem[len(generic) + 1 :])
    return None
