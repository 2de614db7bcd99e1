"""Seeded factories of a fake UK Biobank: a phenotype export and matching Dixon NIfTIs.

The export has a few hundred columns named ``<field>-<instance>.<array>`` (standard
fields, phenotype fields with several array entries, signed genetic PCs, and filler
fields), negative codes, missing instances and a participant with repeat imaging. The
images are tiny body phantoms (24 × 20 × 40 voxels at 10 mm, RAS index order): an
elliptic torso over two legs, a subcutaneous fat shell around water-rich tissue. Some are
written in LPS orientation; some are broken on purpose (see :data:`SCANS`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

SHAPE = (24, 20, 40)
SPACING = 10.0
#: slices (z) of the station swapped in the partly swapped scan: 160 mm, like a UKB station
SWAP_STATION = (16, 32)
#: first slice zeroed in the truncated scan (the neck and shoulders are missing)
TRUNCATE_AT = 26

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Visit:
    """One assessment-centre visit of a participant in the fake export."""

    date: str | None  # field 53, "YYYY-MM-DD"
    centre: int | None  # field 54
    age: int | None  # field 21003 (whole years)
    bmi: float | None  # field 21001 (may be a negative code)
    diabetes: int | None = 0  # field 2443 (may be -1/-3)
    sbp: tuple[int | None, int | None] = (130, 134)  # field 4080, arrays 0 and 1
    illness: tuple[int, ...] = ()  # field 20002 codes (arrays 0..)


@dataclass(frozen=True)
class Participant:
    """A row of the fake export."""

    eid: str
    sex: int | None  # field 31: 0 F, 1 M (None: empty, negative: a code)
    birth_year: int | None
    birth_month: int | None
    visits: dict[int, Visit] = field(default_factory=dict)
    pc1: float = 0.0  # field 22009 array 1 (signed)


def _v(date: str | None, age: int | None, centre: int | None = 11025, bmi: float | None = 26.5, **kw) -> Visit:
    return Visit(date=date, centre=centre, age=age, bmi=bmi, **kw)


#: the participants of the fake export (eids are 7 digits like UK Biobank's)
PARTICIPANTS: tuple[Participant, ...] = (
    Participant(
        "1000011", 0, 1955, 3, {0: _v("2008-06-02", 53), 2: _v("2016-04-20", 61, bmi=24.0, diabetes=0)}, pc1=-1.25
    ),
    Participant(
        "1000022",
        1,
        1948,
        11,
        {
            0: _v("2009-01-15", 60, centre=11009),
            2: _v("2015-09-01", 66, centre=11027, bmi=31.2, diabetes=1, illness=(1065, 1220)),
            3: _v("2019-10-03", 70, centre=11027, bmi=30.4, diabetes=1, sbp=(140, None), illness=(1220,)),
        },
        pc1=2.5,
    ),
    Participant("1000033", 0, 1962, 7, {2: _v("2017-02-11", 54, centre=11026, bmi=22.1)}, pc1=-3.0),
    Participant("1000044", 1, 1950, 1, {2: _v("2016-08-30", 66, centre=11028)}),
    Participant("1000055", 0, 1958, 5, {2: _v("2018-05-04", 59, centre=11026, illness=(1223,))}),
    Participant("1000066", 1, 1953, 12, {2: _v("2016-12-24", 63)}),
    Participant("1000077", 0, 1960, 2, {2: _v("2017-03-03", 57)}),
    Participant("1000088", 1, 1957, 9, {2: _v("2016-10-10", 59)}),
    Participant("1000099", 0, 1961, 4, {2: _v("2018-01-08", 56)}),
    # 1000101 has images but is not in the export
    Participant(
        "1000112",
        1,
        1952,
        6,
        {2: _v("2015-06-30", 63, centre=11027, bmi=28.0)},  # no instance 3 although there is a scan
    ),
    Participant("1000123", 0, 1959, 8, {2: _v("2017-07-07", 57, centre=11028)}),
    # age from 21003 only (no visit date); negative codes for BMI and diabetes; an unknown centre
    Participant(
        "1000134", 1, 1956, None, {2: _v(None, 60, centre=11099, bmi=-1, diabetes=-3, sbp=(-1, 128))}, pc1=-1.0
    ),
    Participant("1000145", 0, 1954, 10, {2: _v("2016-05-05", 61)}),
    Participant("1000156", 1, 1949, 1, {0: _v("2008-01-01", 58)}),  # in the export, never imaged
    Participant("1000167", 0, 1951, 2, {0: _v("2008-02-02", 56), 2: _v("2016-03-03", 65)}),  # no images
    Participant("1000178", -3, 1955, 5, {2: _v("2016-09-09", 61)}),  # sex: a negative code -> missing
)

#: the scans written to the images folder: (eid, instance) -> what is special about them
SCANS: dict[tuple[str, int], str] = {
    ("1000011", 2): "clean",
    ("1000022", 2): "lps",
    ("1000022", 3): "clean",
    ("1000033", 2): "lps",
    ("1000044", 2): "swap_all",
    ("1000055", 2): "swap_station",
    ("1000066", 2): "truncated",
    ("1000077", 2): "corrupt_water",
    ("1000088", 2): "grid_mismatch",
    ("1000099", 2): "no_fat",
    ("1000101", 2): "clean",  # not in the export
    ("1000112", 2): "clean",
    ("1000112", 3): "clean",  # the export has no instance 3 for this participant
    ("1000123", 2): "nan",
    ("1000134", 2): "lps",
    ("1000145", 2): "bright",
    ("1000178", 2): "clean",
}

#: scans that end up in cohort.csv
KEPT: tuple[str, ...] = (
    "1000011_2",
    "1000022_2",
    "1000022_3",
    "1000033_2",
    "1000044_2",
    "1000055_2",
    "1000066_2",
    "1000112_2",
    "1000123_2",
    "1000134_2",
    "1000145_2",
)
#: scans in failures.csv and their reasons
REJECTED: dict[str, str] = {
    "1000077_2": "unreadable",
    "1000088_2": "grid_mismatch",
    "1000099_2": "missing_channel",
    "1000101_2": "not_in_export",
    "1000112_3": "missing_age",
    "1000178_2": "missing_sex",
}
#: the QC flag each kept scan must raise (clean scans: none)
EXPECTED_FLAGS: dict[str, str] = {
    "1000044_2": "fat_water_swap",
    "1000055_2": "fat_water_swap",
    "1000066_2": "missing_coverage",
    "1000123_2": "nonfinite",
    "1000145_2": "extreme_intensity",
}

#: filler fields (realistic ids that bodyage does not read) to make the export wide
_FILLER_FIELDS = tuple(range(3000, 3000 + 7 * 120, 7))


# ----------------------------------------------------------------------------- export


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def export_frame(participants: tuple[Participant, ...] = PARTICIPANTS, seed: int = 0) -> pd.DataFrame:
    """The fake export as a table of strings (columns sorted by field, instance, array)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[str]] = {"eid": [p.eid for p in participants]}

    def put(name: str, values: list[object]) -> None:
        cols[name] = [_cell(v) for v in values]

    put("31-0.0", [p.sex for p in participants])
    put("34-0.0", [p.birth_year for p in participants])
    put("52-0.0", [p.birth_month for p in participants])
    for inst in range(4):
        get = [p.visits.get(inst) for p in participants]
        put(f"53-{inst}.0", [v.date if v else None for v in get])
        put(f"54-{inst}.0", [v.centre if v else None for v in get])
        put(f"2443-{inst}.0", [v.diabetes if v else None for v in get])
        for a in range(2):
            put(f"4080-{inst}.{a}", [v.sbp[a] if v else None for v in get])
        for a in range(6):
            put(f"20002-{inst}.{a}", [v.illness[a] if v and a < len(v.illness) else None for v in get])
        put(f"21001-{inst}.0", [v.bmi if v else None for v in get])
        put(f"21003-{inst}.0", [v.age if v else None for v in get])
    for a in range(1, 11):
        put(f"22009-0.{a}", [p.pc1 if a == 1 else round(float(rng.normal()), 4) for p in participants])
    n = len(participants)
    for fid in _FILLER_FIELDS:
        for inst in (0, 2):
            kind = fid % 3
            if kind == 0:
                vals: list[object] = [int(x) if x >= 0 else None for x in rng.integers(-2, 9, n)]
            elif kind == 1:
                vals = [round(float(x), 3) for x in rng.normal(50, 10, n)]
            else:
                vals = [int(x) for x in rng.choice([-1, -3, 1, 2, 3], n)]
            put(f"{fid}-{inst}.0", vals)

    def order(c: str) -> tuple[int, int, int]:
        if c == "eid":
            return (-1, 0, 0)
        f, rest = c.split("-")
        i, a = rest.split(".")
        return (int(f), int(i), int(a))

    frame = pd.DataFrame(cols, dtype=object)
    return frame[sorted(frame.columns, key=order)]


def write_export(path: Path, participants: tuple[Participant, ...] = PARTICIPANTS, seed: int = 0) -> Path:
    """Write the fake export as CSV (empty cells for missing values)."""
    export_frame(participants, seed).to_csv(path, index=False)
    return path


def expected_age(p: Participant, instance: int) -> float:
    """The age bodyage should compute, by a route independent of its code (day 15, 365.25 d)."""
    v = p.visits[instance]
    if v.date and p.birth_year and p.birth_month:
        born = dt.date(p.birth_year, p.birth_month, 15)
        return (dt.date.fromisoformat(v.date) - born).days / 365.25
    assert v.age is not None
    return v.age + 0.5


# ----------------------------------------------------------------------------- images


def body_phantom(rng: np.random.Generator, *, shape: tuple[int, int, int] = SHAPE) -> tuple[Array, Array]:
    """A tiny neck-to-knee Dixon phantom: ``(water, fat)`` in RAS index order.

    Two legs (the lower third) below an elliptic torso; a subcutaneous fat shell about
    1.6 voxels thick (fat ~0.9, water ~0.1) around water-rich tissue (water ~0.8, fat
    ~0.15) with a visceral fat blob; Rician-like noise.
    """
    from scipy import ndimage

    nx, ny, nz = shape
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    cx, cy = (nx - 1) / 2 + rng.uniform(-0.5, 0.5), (ny - 1) / 2 + rng.uniform(-0.5, 0.5)
    rx, ry = nx * 0.40 + rng.uniform(-0.7, 0.7), ny * 0.36 + rng.uniform(-0.5, 0.5)
    body = np.zeros(shape, dtype=bool)
    legs_top = nz // 3
    for z in range(nz):
        if z < legs_top:
            r = nx * 0.17
            sl = ((x - (cx - nx * 0.2)) ** 2 + (y - cy) ** 2 < r**2) | (
                (x - (cx + nx * 0.2)) ** 2 + (y - cy) ** 2 < r**2
            )
        else:
            sl = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0
        body[:, :, z] = sl
    depth = np.stack([ndimage.distance_transform_edt(body[:, :, z]) for z in range(nz)], axis=2)
    sat = body & (depth <= 1.6)
    inner = body & ~sat
    visceral = inner & (((x - cx) / (rx * 0.4)) ** 2 + ((y - cy) / (ry * 0.4)) ** 2 < 1.0)[:, :, None]
    visceral[:, :, : legs_top + 3] = False
    water = np.zeros(shape, dtype=np.float32)
    fat = np.zeros(shape, dtype=np.float32)
    water[sat], fat[sat] = 0.10, 0.90
    water[inner], fat[inner] = 0.80, 0.15
    water[visceral], fat[visceral] = 0.15, 0.85
    noise = 0.02
    water = np.abs(water + rng.normal(0, noise, shape)).astype(np.float32)
    fat = np.abs(fat + rng.normal(0, noise, shape)).astype(np.float32)
    return water, fat


def _affine(shape: tuple[int, int, int], orientation: str) -> npt.NDArray[np.float64]:
    origin = np.array([-(shape[0] - 1) / 2, -(shape[1] - 1) / 2, -(shape[2] - 1) / 2]) * SPACING
    aff = np.diag([SPACING, SPACING, SPACING, 1.0])
    aff[:3, 3] = origin
    if orientation == "LPS":  # same world grid, voxels stored with x and y reversed
        aff[0, 0] = aff[1, 1] = -SPACING
        aff[:3, 3] = origin + np.array([SPACING * (shape[0] - 1), SPACING * (shape[1] - 1), 0.0])
    return aff


def save_ras(path: Path, data: Array, orientation: str = "RAS", dtype: npt.DTypeLike = np.float32) -> Path:
    """Save RAS-ordered ``data`` as NIfTI, stored in ``orientation`` (RAS or LPS)."""
    import nibabel as nib

    arr = data[::-1, ::-1, :] if orientation == "LPS" else data
    img = nib.Nifti1Image(np.ascontiguousarray(arr).astype(dtype), _affine(data.shape, orientation))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def save_singular(path: Path, data: Array) -> Path:
    """Save ``data`` with a singular affine: the z column of the sform is zero, no qform."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(data), _affine(data.shape, "RAS"))
    img.header.set_qform(None, code=0)
    img.header["sform_code"] = 1
    img.header["srow_z"] = [0.0, 0.0, 0.0, 0.0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), None, img.header), str(path))
    return path


def make_scan(kind: str, rng: np.random.Generator) -> tuple[Array, Array]:
    """The phantom of one scan of :data:`SCANS`, broken as ``kind`` says (RAS order)."""
    water, fat = body_phantom(rng)
    if kind == "swap_all":
        water, fat = fat, water
    elif kind == "swap_station":
        lo, hi = SWAP_STATION
        w = water[:, :, lo:hi].copy()
        water[:, :, lo:hi] = fat[:, :, lo:hi]
        fat[:, :, lo:hi] = w
    elif kind == "truncated":
        water[:, :, TRUNCATE_AT:] = np.abs(rng.normal(0, 0.02, water[:, :, TRUNCATE_AT:].shape))
        fat[:, :, TRUNCATE_AT:] = np.abs(rng.normal(0, 0.02, fat[:, :, TRUNCATE_AT:].shape))
    elif kind == "nan":
        water[10:13, 8:11, 20:22] = np.nan
    elif kind == "bright":  # both channels 8 times too bright (a scaling error)
        water, fat = water * 8.0, fat * 8.0
    return water, fat


@dataclass(frozen=True)
class FakeUKB:
    """Paths of a fake UK Biobank download."""

    export: Path
    images: Path


def write_images(folder: Path, seed: int = 1, scans: dict[tuple[str, int], str] = SCANS) -> Path:
    """Write the NIfTIs of :data:`SCANS` as ``<eid>_<instance>_<channel>.nii.gz`` plus noise files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for (eid, inst), kind in scans.items():
        water, fat = make_scan(kind, rng)
        orient = "LPS" if kind == "lps" else "RAS"
        dtype = np.float32 if kind == "nan" else np.int16  # UK Biobank stores integers
        scale = 1000.0
        wp = folder / f"{eid}_{inst}_water.nii.gz"
        fp = folder / f"{eid}_{inst}_fat.nii.gz"
        save_ras(wp, water * scale, orient, dtype)
        if kind == "grid_mismatch":
            save_ras(fp, fat[:, :, :36], orient, dtype)
        elif kind != "no_fat":
            save_ras(fp, fat * scale, orient, dtype)
        if kind == "corrupt_water":
            raw = bytearray(wp.read_bytes())
            for i in range(len(raw) // 2, len(raw) // 2 + 64):
                raw[i] ^= 0xFF
            wp.write_bytes(bytes(raw[: len(raw) - 100]))
    # files bodyage must ignore: another instance, and a file that matches no pattern
    save_ras(folder / "1000011_0_water.nii.gz", body_phantom(rng)[0] * 1000.0, dtype=np.int16)
    (folder / "README.txt").write_text("exported 2024\n", encoding="utf-8")
    return folder


def fake_ukb(root: Path, seed: int = 0) -> FakeUKB:
    """Write the fake export and images under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    return FakeUKB(export=write_export(root / "ukb_export.csv", seed=seed), images=write_images(root / "images", seed))
