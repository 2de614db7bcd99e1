"""The NIfTI files of scans: finding them by a file pattern, checking them.

:func:`compile_pattern` turns ``--pattern`` (``{eid}_{instance}_{channel}.nii.gz``) into a
matcher, :func:`find_images` walks a folder and groups the matching files per scan, and
:func:`check_scan_images` checks one scan's files without raising: a bad file is a
result (a reason of :data:`IMAGE_REJECT_REASONS` and a message naming the file), so a
cohort of 40,000 scans is never stopped by one broken download.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bodyage.errors import InputError
from bodyage.study import DEFAULT_CHANNELS

#: the file layout of ``--images`` unless ``--pattern`` says otherwise
DEFAULT_PATTERN = "{eid}_{instance}_{channel}.nii.gz"
#: voxel sizes (mm) outside this range mean a broken header (UK Biobank: 2.23 × 2.23 × 3.0)
DEFAULT_SPACING_RANGE_MM: tuple[float, float] = (0.5, 15.0)

#: why :func:`check_scan_images` rejects a scan (checked in this order)
IMAGE_REJECT_REASONS: dict[str, str] = {
    "unreadable": "a file is not a readable 3D NIfTI",
    "bad_affine": "an affine is singular or not finite",
    "spacing_out_of_range": "a voxel size is outside the plausible range",
    "grid_mismatch": "the channels are not on the same grid",
}

_PLACEHOLDERS = ("eid", "instance", "channel")


def parse_channels(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """Parse ``--channels``: which ``{channel}`` token in file names is which channel.

    ``"water,fat"`` (the default) means the files say ``water`` and ``fat``;
    ``"water=W,fat=F"`` maps the tokens ``W`` and ``F``.

    Raises
    ------
    InputError
        If the channels are not exactly water and fat, or two share a token.
    """
    if spec is None:
        return {c: c for c in DEFAULT_CHANNELS}
    if isinstance(spec, Mapping):
        pairs = dict(spec)
    else:
        pairs = {}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, _, token = part.partition("=")
            pairs[name.strip()] = token.strip() or name.strip()
    if sorted(pairs) != sorted(DEFAULT_CHANNELS):
        raise InputError(
            f"--channels {spec!r}: expected the channels {', '.join(DEFAULT_CHANNELS)} "
            f"(optionally NAME=TOKEN, e.g. water=W,fat=F), got {', '.join(pairs) or 'none'}"
        )
    if len(set(pairs.values())) != len(pairs):
        raise InputError(f"--channels {spec!r}: two channels share the file-name token")
    return {c: pairs[c] for c in DEFAULT_CHANNELS}


def parse_instances(spec: str | Iterable[int]) -> tuple[int, ...]:
    """Parse ``--instances`` (``"2,3"``) into distinct non-negative integers.

    Raises
    ------
    InputError
        Naming the value that is not a non-negative integer.
    """
    parts: list[object] = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    out: list[int] = []
    for p in parts:
        try:
            i = int(str(p))
        except ValueError as err:
            raise InputError(f"--instances: {p!r} is not an instance number (UK Biobank imaging: 2,3)") from err
        if i < 0:
            raise InputError(f"--instances: {i} is negative")
        if i not in out:
            out.append(i)
    if not out:
        raise InputError("--instances: give at least one instance (UK Biobank imaging: 2,3)")
    return tuple(out)


@dataclass(frozen=True)
class ImagePattern:
    """A compiled ``--pattern``: relative file path -> (eid, instance, channel token)."""

    text: str
    regex: re.Pattern[str] = field(repr=False)
    has_instance: bool
    depth: int

    def match(self, relative: str) -> tuple[str, int | None, str] | None:
        """Return ``(eid, instance or None, channel token)`` for a matching path."""
        m = self.regex.fullmatch(relative)
        if m is None:
            return None
        inst = int(m["instance"]) if self.has_instance else None
        return m["eid"], inst, m["channel"]


def compile_pattern(pattern: str, channel_tokens: Iterable[str]) -> ImagePattern:
    """Compile a file pattern with ``{eid}``, ``{instance}``, ``{channel}`` placeholders.

    A placeholder may appear more than once (``{eid}/{eid}_{instance}_{channel}.nii.gz``);
    later occurrences must repeat the first's value. ``*`` matches any characters except
    ``/``. Paths use ``/`` between folders.

    Raises
    ------
    InputError
        If a placeholder is unknown, or ``{eid}`` or ``{channel}`` is missing.
    """
    text = pattern.strip().replace(os.sep, "/").lstrip("/")
    names = re.findall(r"\{([^{}]*)\}", text)
    unknown = sorted({n for n in names if n not in _PLACEHOLDERS})
    if unknown:
        raise InputError(
            f"--pattern {pattern!r}: unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
            "use {eid}, {instance} and {channel}"
        )
    for required in ("eid", "channel"):
        if required not in names:
            raise InputError(f"--pattern {pattern!r}: needs a {{{required}}} placeholder")
    tokens = sorted(channel_tokens, key=len, reverse=True)
    groups = {
        "eid": r"[^/]+?",
        "instance": r"\d+",
        "channel": "|".join(re.escape(t) for t in tokens),
    }
    out = []
    seen: set[str] = set()
    for piece in re.split(r"(\{[^{}]*\})", text):
        if piece.startswith("{") and piece.endswith("}"):
            name = piece[1:-1]
            out.append(f"(?P={name})" if name in seen else f"(?P<{name}>{groups[name]})")
            seen.add(name)
        else:
            out.append("[^/]*".join(re.escape(s) for s in piece.split("*")))
    return ImagePattern(
        text=text, regex=re.compile("".join(out)), has_instance="instance" in names, depth=text.count("/")
    )


# ----------------------------------------------------------------------------- finding


@dataclass(frozen=True)
class ImageInventory:
    """Scans found under the images folder.

    Attributes
    ----------
    scans
        ``{(eid, instance): {channel: path}}`` for the instances asked for.
    n_other_instance
        Matching files of instances not asked for (ignored).
    n_unmatched
        Files at the pattern's depth that do not match it (ignored).
    unmatched_example
        One such file name, for error messages.
    """

    scans: Mapping[tuple[str, int], Mapping[str, Path]]
    n_other_instance: int = 0
    n_unmatched: int = 0
    unmatched_example: str | None = None


def find_images(
    folder: str | os.PathLike[str],
    pattern: ImagePattern,
    channels: Mapping[str, str],
    instances: Sequence[int],
) -> ImageInventory:
    """Walk ``folder`` and group the files matching ``pattern`` into scans.

    Parameters
    ----------
    folder
        The images folder.
    pattern
        From :func:`compile_pattern`.
    channels
        ``{channel: file-name token}`` (:func:`parse_channels`).
    instances
        Instances to keep. Without ``{instance}`` in the pattern, there must be one.

    Raises
    ------
    InputError
        If the folder is missing, or two files claim the same scan and channel.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: images folder not found")
    if not pattern.has_instance and len(instances) != 1:
        raise InputError(
            f"--pattern {pattern.text!r} has no {{instance}}: pass the one instance the files belong to, "
            "e.g. --instances 2"
        )
    by_token = {t: c for c, t in channels.items()}
    scans: dict[tuple[str, int], dict[str, Path]] = {}
    n_other = n_unmatched = 0
    example: str | None = None
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        level = 0 if rel_dir == "." else rel_dir.count("/") + 1
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if level < pattern.depth else []
        if level != pattern.depth:
            continue
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = name if level == 0 else f"{rel_dir}/{name}"
            hit = pattern.match(rel)
            if hit is None:
                n_unmatched += 1
                example = example or rel
                continue
            eid, inst, token = hit
            instance = inst if inst is not None else instances[0]
            if instance not in instances:
                n_other += 1
                continue
            channel = by_token[token]
            chans = scans.setdefault((eid, instance), {})
            if channel in chans:
                raise InputError(
                    f"{root}: files {chans[channel].relative_to(root)} and {rel} both match --pattern "
                    f"{pattern.text!r} for the same scan and channel {channel}"
                )
            chans[channel] = Path(dirpath) / name
    return ImageInventory(scans=scans, n_other_instance=n_other, n_unmatched=n_unmatched, unmatched_example=example)


# ----------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class ImageCheck:
    """The outcome of checking one scan's files.

    Attributes
    ----------
    ok
        Whether every check passed.
    reason
        A key of :data:`REJECT_REASONS` when not ``ok``.
    detail
        A message naming the file and what was found.
    shape
        Grid shape after reorientation to RAS+.
    spacing
        Voxel size (mm) after reorientation.
    orientation
        ``{channel: axis codes on disk}``, e.g. ``{"water": "LPS"}``.
    dtype
        ``{channel: on-disk data type}``.
    """

    ok: bool
    reason: str | None = None
    detail: str = ""
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    orientation: Mapping[str, str] = field(default_factory=dict)
    dtype: Mapping[str, str] = field(default_factory=dict)


def _canonical_grid(
    shape: tuple[int, ...], affine: npt.NDArray[np.float64]
) -> tuple[tuple[int, int, int], npt.NDArray[np.float64]]:
    """Shape and affine after the RAS+ reorientation :func:`~bodyage.volumes.load_volume` does."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape[:3])
    order = np.argsort(ornt[:, 0])
    new_shape = tuple(int(shape[i]) for i in order)
    return (new_shape[0], new_shape[1], new_shape[2]), np.asarray(new_affine, dtype=np.float64)


def check_scan_images(
    paths: Mapping[str, str | os.PathLike[str]],
    *,
    read_data: bool = True,
    spacing_range_mm: tuple[float, float] = DEFAULT_SPACING_RANGE_MM,
) -> ImageCheck:
    """Check the files of one scan (never raises for a bad file: it is a result).

    Parameters
    ----------
    paths
        ``{channel: file}``.
    read_data
        Decompress and read the voxel data (finds truncated or corrupt files; costs
        ~0.1–0.3 s per UK Biobank volume). Off: headers only.
    spacing_range_mm
        Plausible voxel sizes (mm), inclusive.

    Returns
    -------
    ImageCheck
        ``ok`` or the first failed check with a detail naming the file.
    """
    import zlib

    import nibabel as nib

    from bodyage.volumes import AFFINE_ATOL_MM

    grids: dict[str, tuple[tuple[int, int, int], npt.NDArray[np.float64]]] = {}
    orientation: dict[str, str] = {}
    dtype: dict[str, str] = {}
    lo, hi = spacing_range_mm
    for channel, raw in paths.items():
        p = Path(raw)
        try:
            img = nib.load(str(p))
            if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
                return ImageCheck(False, "unreadable", f"{p}: not a NIfTI image ({type(img).__name__})")
            shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
        except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
            return ImageCheck(False, "unreadable", f"{p}: cannot read NIfTI ({err})")
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3 or min(shape) < 1:
            return ImageCheck(False, "unreadable", f"{p}: expected a 3D volume, found shape {shape}")
        if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            return ImageCheck(False, "bad_affine", f"{p}: affine is singular or not finite")
        sp = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        if (sp < lo).any() or (sp > hi).any():
            return ImageCheck(
                False,
                "spacing_out_of_range",
                f"{p}: voxel size {' x '.join(f'{s:.3g}' for s in sp)} mm is outside {lo:g}–{hi:g} mm",
            )
        grids[channel] = _canonical_grid(shape, affine)
        orientation[channel] = "".join(str(c) for c in nib.aff2axcodes(affine))
        dtype[channel] = str(img.get_data_dtype())
    names = list(grids)
    ref_shape, ref_affine = grids[names[0]]
    for other in names[1:]:
        shape, affine = grids[other]
        if shape != ref_shape or not np.allclose(affine, ref_affine, atol=AFFINE_ATOL_MM):
            what = (
                f"shape {'x'.join(map(str, ref_shape))} vs {'x'.join(map(str, shape))}"
                if shape != ref_shape
                else "same shape, different affine (voxel size, origin or direction)"
            )
            return ImageCheck(
                False,
                "grid_mismatch",
                f"{Path(paths[names[0]]).name} and {Path(paths[other]).name} are on different grids ({what})",
            )
    if read_data:
        for raw in paths.values():
            p = Path(raw)
            try:
                data_img = nib.load(str(p))
                if isinstance(data_img, nib.Nifti1Image | nib.Nifti2Image):
                    np.asanyarray(data_img.dataobj)  # decompress everything: a truncated file fails here
            except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
                return ImageCheck(False, "unreadable", f"{p}: cannot read the voxel data ({err})")
    spacing = np.sqrt((ref_affine[:3, :3] ** 2).sum(axis=0))
    return ImageCheck(
        True,
        shape=ref_shape,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        orientation=orientation,
        dtype=dtype,
    )
