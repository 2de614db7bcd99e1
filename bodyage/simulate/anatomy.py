"""The phantom's anatomy: a neck-to-knee body built from primitives, and its rasterisation.

Positions are in the *body frame* of a reference male (mm; x to the subject's right, y
anterior, z superior, origin between the femoral heads; knees at z ≈ −430, C7 at
z ≈ +650). A subject's body is this reference scaled by height, width and depth, with
per-organ position and size jitter, a subcutaneous fat layer whose thickness follows sex
and BMI, and planted volume changes. Rasterising paints shapes in anatomical order (fat,
muscle, cavity, organs, vessels, muscles, bones), later shapes winning.

Internal label ids above :data:`FIRST_INTERNAL_ID` mark tissue that has an intensity but
no TotalSegmentator label (mediastinum, cerebrospinal fluid, airway); they become 0 in the
written masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from bodyage.simulate.shapes import Box, Ellipsoid, Profile, Shape, Stretched, Tube, rotation

#: internal ids >= this value are unlabelled tissue (mask value 0)
FIRST_INTERNAL_ID = 200
#: unlabelled tissues with an intensity
INTERNAL_TISSUES: dict[str, int] = {"mediastinum": 200, "csf": 201, "airway": 202}

#: body-frame z range a neck-to-knee field of view is centred on (reference male, mm)
BODY_Z_RANGE: tuple[float, float] = (-370.0, 660.0)
#: body-frame extent the phantom needs in x and y (mm, arms included)
BODY_XY_EXTENT: tuple[float, float] = (440.0, 300.0)

#: subcutaneous fat thickness (mm) of a reference subject at the scenario's mean BMI
SAT_MM = {"F": 27.0, "M": 18.0}
#: trunk wall (muscle) thickness around the abdominal cavity (mm)
WALL_MM = 14.0

# spine: (prefix, number of levels, body height, disc height, body semi-axes x, y) bottom-up
_SPINE = (("L", 5, 26.0, 10.0, 24.0, 18.0), ("T", 12, 18.0, 6.0, 17.0, 14.0), ("C", 5, 13.0, 5.0, 12.0, 9.0))
_SPINE_BASE_Z = 100.0
# spine centre line (vertebral body centre, y) along z: lordosis and kyphosis
_SPINE_Z = (40.0, 100.0, 180.0, 280.0, 420.0, 568.0, 700.0)
_SPINE_Y = (-75.0, -55.0, -42.0, -48.0, -68.0, -58.0, -40.0)


def spine_y(z: float) -> float:
    """Vertebral body centre (y, mm) at height ``z`` of the reference body frame."""
    return float(np.interp(z, _SPINE_Z, _SPINE_Y))


@dataclass(frozen=True)
class BodyParams:
    """Everything about a subject's anatomy that does not change between visits.

    Attributes
    ----------
    sex
        ``"F"`` or ``"M"`` (prostate only for males; wider hips and thicker fat for females).
    height_scale, width_scale, depth_scale
        Body-frame scaling along z, x and y.
    sat_mm
        Subcutaneous fat thickness (mm, body frame).
    region_offset
        Per-region position jitter (mm, body frame).
    region_volume
        Per-region volume factor (size jitter × planted ageing × phenotype anatomy).
    region_shape
        Per-region planted shape change: (body axis 0/1/2, stretch along it at constant
        volume).
    cavity_scale
        Scale of the abdominal cavity cross-section (sets the torso fat volume).
    """

    sex: str
    height_scale: float = 1.0
    width_scale: float = 1.0
    depth_scale: float = 1.0
    sat_mm: float = 20.0
    region_offset: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    region_volume: Mapping[str, float] = field(default_factory=dict)
    region_shape: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    cavity_scale: float = 1.0


@dataclass(frozen=True)
class Pose:
    """Where the body lies in the scanner at one visit (mm, world frame)."""

    dx: float = 0.0
    dy: float = 0.0
    dz: float = 0.0


# ----------------------------------------------------------------------------- the body


def _lr(name: str) -> list[tuple[str, float]]:
    """``[(name_right, +1), (name_left, -1)]``: right is +x in RAS+."""
    return [(f"{name}_right", 1.0), (f"{name}_left", -1.0)]


def _trunk_core() -> Profile:
    return Profile(
        z=(-70.0, 0.0, 80.0, 180.0, 280.0, 380.0, 450.0, 520.0, 570.0, 600.0, 625.0, 645.0, 720.0),
        cx=(0.0,) * 13,
        cy=(-12.0, -12.0, -10.0, -6.0, -2.0, 0.0, 0.0, 0.0, -6.0, -12.0, -20.0, -22.0, -22.0),
        a=(160.0, 165.0, 160.0, 146.0, 138.0, 142.0, 150.0, 155.0, 150.0, 128.0, 80.0, 55.0, 52.0),
        b=(112.0, 118.0, 118.0, 110.0, 108.0, 112.0, 118.0, 120.0, 112.0, 95.0, 65.0, 55.0, 52.0),
    )


def cavity_profile(scale: float = 1.0, grow: float = 0.0) -> Profile:
    """Abdominal + pelvic cavity (torso fat around the organs).

    Parameters
    ----------
    scale : float
        Factor on the semi-axes (sets the torso fat volume).
    grow : float
        Millimetres added to the semi-axes after scaling: the trunk wall and the
        subcutaneous fat are painted as the cavity grown by their thickness.

    Returns
    -------
    Profile
        The cavity's elliptical cross-sections along z.
    """
    return Profile(
        z=(-25.0, 0.0, 80.0, 180.0, 280.0, 380.0, 425.0),
        cx=(0.0,) * 7,
        cy=(12.0, 12.0, 10.0, 14.0, 16.0, 14.0, 10.0),
        a=(95.0, 125.0, 132.0, 124.0, 118.0, 124.0, 118.0),
        b=(55.0, 70.0, 80.0, 80.0, 82.0, 88.0, 85.0),
        scale=scale,
        grow=grow,
    )


def _thorax() -> Profile:
    return Profile(
        z=(410.0, 450.0, 520.0, 570.0, 600.0),
        cx=(0.0,) * 5,
        cy=(2.0, 2.0, 2.0, -4.0, -10.0),
        a=(125.0, 135.0, 138.0, 125.0, 80.0),
        b=(92.0, 98.0, 100.0, 92.0, 60.0),
    )


def _thigh(sign: float, extra: float = 0.0) -> Tube:
    return Tube(
        points=((sign * 92.0, -5.0, -20.0), (sign * 92.0, 0.0, -200.0), (sign * 84.0, 5.0, -460.0)),
        radii=(80.0 + extra, 72.0 + extra, 56.0 + extra),
    )


def _arm(sign: float, extra: float = 0.0) -> Tube:
    return Tube(
        points=(
            (sign * 180.0, -8.0, 585.0),
            (sign * 200.0, -2.0, 420.0),
            (sign * 205.0, 2.0, 270.0),
            (sign * 210.0, 10.0, 40.0),
        ),
        radii=(40.0 + extra, 38.0 + extra, 33.0 + extra, 28.0 + extra),
    )


def nominal_regions(sex: str) -> list[tuple[str, Shape]]:
    """The reference body as ``(region, shape)`` pairs in painting order (later wins).

    Region names are TotalSegmentator's; names in :data:`INTERNAL_TISSUES` are unlabelled
    tissue. Subcutaneous fat, skeletal muscle and torso fat are added by
    :func:`subject_regions`, which knows the subject's fat thickness and cavity size.
    """
    regions: list[tuple[str, Shape]] = []
    add = regions.append

    # --- thorax contents and hollow abdominal organs
    add(("mediastinum", _thorax()))
    add(("small_bowel", Ellipsoid((0.0, 36.0, 178.0), (112.0, 56.0, 92.0))))
    add(
        (
            "colon",
            Tube(
                points=(
                    (92.0, 25.0, 70.0),
                    (98.0, 15.0, 275.0),
                    (78.0, 50.0, 298.0),
                    (-78.0, 55.0, 298.0),
                    (-95.0, 10.0, 322.0),
                    (-100.0, 10.0, 110.0),
                    (-45.0, 30.0, 55.0),
                    (0.0, -45.0, 35.0),
                    (0.0, -50.0, -25.0),
                ),
                radii=(22.0, 20.0, 20.0, 20.0, 20.0, 18.0, 18.0, 18.0, 15.0),
            ),
        )
    )
    add(("stomach", Ellipsoid((-45.0, 35.0, 365.0), (46.0, 36.0, 52.0))))
    add(("urinary_bladder", Ellipsoid((0.0, 50.0, 25.0), (36.0, 30.0, 30.0))))
    if sex == "M":
        add(("prostate", Ellipsoid((0.0, 25.0, -25.0), (20.0, 15.0, 16.0))))
    # --- solid organs
    add(("liver", Ellipsoid((55.0, 5.0, 372.0), (92.0, 78.0, 68.0))))
    add(("liver", Ellipsoid((-15.0, 35.0, 392.0), (52.0, 33.0, 36.0))))
    add(("gallbladder", Ellipsoid((62.0, 55.0, 318.0), (14.0, 14.0, 30.0))))
    add(("spleen", Ellipsoid((-90.0, -35.0, 355.0), (32.0, 28.0, 50.0))))
    add(("pancreas", Tube(((25.0, 15.0, 305.0), (-20.0, 5.0, 318.0), (-72.0, -15.0, 338.0)), (18.0, 15.0, 12.0))))
    add(
        (
            "duodenum",
            Tube(((35.0, 30.0, 342.0), (54.0, 18.0, 305.0), (46.0, 10.0, 268.0), (0.0, 8.0, 270.0)), (11.0,) * 4),
        )
    )
    for name, s in _lr("kidney"):
        add(
            (
                name,
                Ellipsoid((s * 68.0, -38.0, 195.0 if s > 0 else 210.0), (27.0, 23.0, 52.0), rotation("y", -s * 12.0)),
            )
        )
    for name, s in _lr("adrenal_gland"):
        add((name, Ellipsoid((s * 50.0, -28.0, 258.0 if s > 0 else 272.0), (12.0, 8.0, 15.0))))
    for name, s in _lr("lung"):
        add((name, Ellipsoid((s * 76.0, -5.0, 492.0), (60.0, 80.0, 105.0))))
    add(("heart", Ellipsoid((-25.0, 35.0, 470.0), (58.0, 46.0, 56.0), rotation("z", 30.0))))
    # liver dome under the right lung: repaint the upper liver over the lung base
    add(("liver", Ellipsoid((55.0, 5.0, 372.0), (92.0, 78.0, 68.0))))
    add(
        (
            "esophagus",
            Tube(((-35.0, 25.0, 395.0), (-12.0, -18.0, 440.0), (-5.0, -40.0, 520.0), (0.0, -28.0, 660.0)), (9.0,) * 4),
        )
    )
    add(("airway", Tube(((0.0, -10.0, 560.0), (0.0, 0.0, 600.0), (0.0, 5.0, 700.0)), (9.0, 9.0, 9.0))))
    # --- vessels
    add(
        (
            "aorta",
            Tube(
                points=(
                    (-5.0, 30.0, 490.0),
                    (-5.0, 18.0, 545.0),
                    (-20.0, -15.0, 560.0),
                    (-24.0, -34.0, 520.0),
                    (-20.0, -22.0, 300.0),
                    (-12.0, -14.0, 135.0),
                ),
                radii=(14.0, 14.0, 13.0, 12.0, 11.0, 10.0),
            ),
        )
    )
    add(
        (
            "inferior_vena_cava",
            Tube(((22.0, 10.0, 440.0), (24.0, -14.0, 300.0), (15.0, -18.0, 125.0)), (13.0, 12.0, 11.0)),
        )
    )
    add(
        (
            "portal_vein_and_splenic_vein",
            Tube(((45.0, 5.0, 380.0), (0.0, 0.0, 342.0), (-75.0, -22.0, 360.0)), (8.0, 7.0, 6.0)),
        )
    )
    for name, s in _lr("iliac_artery"):
        add(
            (
                name,
                Tube(
                    ((-12.0, -14.0, 135.0), (s * 55.0, 0.0, 60.0), (s * 75.0, 25.0, -10.0), (s * 85.0, 35.0, -60.0)),
                    (7.0,) * 4,
                ),
            )
        )
    for name, s in _lr("iliac_vena"):
        add(
            (
                name,
                Tube(
                    ((15.0, -18.0, 125.0), (s * 50.0, -10.0, 55.0), (s * 72.0, 18.0, -10.0), (s * 82.0, 28.0, -60.0)),
                    (8.0,) * 4,
                ),
            )
        )
    # --- named muscles
    for name, s in _lr("gluteus_maximus"):
        add((name, Ellipsoid((s * 80.0, -98.0, 15.0), (60.0, 34.0, 90.0))))
    for name, s in _lr("gluteus_medius"):
        add((name, Ellipsoid((s * 118.0, -45.0, 82.0), (36.0, 40.0, 48.0))))
    for name, s in _lr("gluteus_minimus"):
        add((name, Ellipsoid((s * 108.0, -22.0, 55.0), (22.0, 28.0, 32.0))))
    for name, s in _lr("iliopsoas"):
        add(
            (
                name,
                Tube(
                    points=(
                        (s * 38.0, -38.0, 275.0),
                        (s * 50.0, -26.0, 170.0),
                        (s * 70.0, 10.0, 40.0),
                        (s * 86.0, 24.0, -20.0),
                        (s * 108.0, 5.0, -62.0),
                    ),
                    radii=(12.0, 20.0, 23.0, 21.0, 15.0),
                ),
            )
        )
    for name, s in _lr("autochthon"):
        zs = (60.0, 150.0, 280.0, 420.0, 560.0, 650.0)
        pts = tuple((s * 30.0, spine_y(z) - 50.0, z) for z in zs)
        add((name, Tube(points=pts, radii=(16.0, 25.0, 25.0, 21.0, 17.0, 13.0))))
    # --- bones
    for name, s in _lr("hip"):
        add((name, Ellipsoid((s * 88.0, 0.0, 5.0), (30.0, 32.0, 32.0))))  # acetabulum
        add((name, Ellipsoid((s * 105.0, -28.0, 85.0), (16.0, 58.0, 52.0), rotation("z", -s * 35.0))))  # ilium
        add((name, Tube(((s * 85.0, 25.0, -10.0), (s * 15.0, 55.0, -20.0)), (11.0, 10.0))))  # pubis
        add((name, Tube(((s * 80.0, -25.0, -15.0), (s * 60.0, -35.0, -70.0)), (13.0, 12.0))))  # ischium
    add(("sacrum", Ellipsoid((0.0, -78.0, 55.0), (44.0, 19.0, 52.0), rotation("x", -25.0))))
    for name, s in _lr("femur"):
        add((name, Ellipsoid((s * 90.0, 0.0, 0.0), (24.0, 24.0, 24.0))))  # head
        add((name, Tube(((s * 90.0, 0.0, 0.0), (s * 118.0, -5.0, -38.0)), (15.0, 15.0))))  # neck
        add((name, Ellipsoid((s * 124.0, -8.0, -35.0), (16.0, 16.0, 20.0))))  # greater trochanter
        add((name, Tube(((s * 118.0, -5.0, -45.0), (s * 88.0, 5.0, -460.0)), (14.0, 13.0))))  # shaft
    for name, s in _lr("humerus"):
        add((name, Ellipsoid((s * 180.0, -10.0, 585.0), (22.0, 22.0, 22.0))))
        add((name, Tube(((s * 188.0, -10.0, 580.0), (s * 204.0, 0.0, 275.0)), (12.0, 11.0))))
    for name, s in _lr("scapula"):
        add((name, Ellipsoid((s * 112.0, -112.0, 500.0), (44.0, 9.0, 62.0), rotation("z", s * 20.0))))
    for name, s in _lr("clavicula"):
        add((name, Tube(((s * 20.0, 45.0, 598.0), (s * 150.0, 12.0, 612.0)), (8.0, 8.0))))
    return regions


def spine_regions(disc_min_mm: float = 0.0) -> list[tuple[str, Shape]]:
    """Vertebrae, intervertebral discs, spinal canal and cord, bottom-up.

    Discs are at least ``disc_min_mm`` thick (the grid's z spacing in body mm, so every
    disc reaches at least one slice), taking the height from the vertebral body.
    """
    out: list[tuple[str, Shape]] = []
    z = _SPINE_BASE_Z
    for _prefix, count, body_h, disc_h, rx, ry in _SPINE:
        pitch = body_h + disc_h
        disc = float(np.clip(max(disc_h, disc_min_mm), disc_h, 0.45 * pitch))
        for _ in range(count):
            yc = spine_y(z + pitch / 2)
            out.append(
                ("intervertebral_discs", Box((-rx - 1.0, yc - ry - 1.0, z), (rx + 1.0, yc + ry + 1.0, z + disc)))
            )
            zb0, zb1 = z + disc, z + pitch
            out.append(("vertebrae", Profile(z=(zb0, zb1), cx=(0.0, 0.0), cy=(yc, yc), a=(rx, rx), b=(ry, ry))))
            # posterior arch and spinous process
            out.append(("vertebrae", Box((-0.45 * rx, yc - ry - 38.0, zb0), (0.45 * rx, yc - ry - 6.0, zb1))))
            out.append(("vertebrae", Box((-0.9 * rx, yc - ry - 20.0, zb0), (0.9 * rx, yc - ry - 12.0, zb1))))
            z += pitch
    top = z
    zs = (_SPINE_BASE_Z - 20.0, 200.0, 280.0, 420.0, 568.0, top + 40.0)
    canal = tuple((0.0, spine_y(zz) - _ry_at(zz) - 9.0, zz) for zz in zs)
    out.append(("csf", Tube(points=canal, radii=(8.0,) * len(zs))))
    cord = tuple(p for p in canal if p[2] >= 260.0)
    out.append(
        ("spinal_cord", Tube(points=((0.0, spine_y(265.0) - 18.0 - 9.0, 265.0), *cord), radii=(5.0,) * (len(cord) + 1)))
    )
    return out


def _ry_at(z: float) -> float:
    return float(np.interp(z, (100.0, 280.0, 568.0, 660.0), (18.0, 18.0, 14.0, 9.0)))


def _scaled(shape: Shape, factor: float, offset: tuple[float, float, float]) -> Shape:
    """Scale a shape's volume by ``factor`` about its centre and move it by ``offset``."""
    ox, oy, oz = offset
    if isinstance(shape, Ellipsoid):
        k = factor ** (1.0 / 3.0)
        c = shape.center
        return replace(shape, center=(c[0] + ox, c[1] + oy, c[2] + oz), radii=tuple(r * k for r in shape.radii))
    if isinstance(shape, Tube):
        k = factor**0.5
        pts = tuple((p[0] + ox, p[1] + oy, p[2] + oz) for p in shape.points)
        return Tube(points=pts, radii=tuple(r * k for r in shape.radii))
    if isinstance(shape, Box):
        k = factor**0.5
        cx, cy = (shape.lo[0] + shape.hi[0]) / 2, (shape.lo[1] + shape.hi[1]) / 2
        hx, hy = (shape.hi[0] - shape.lo[0]) / 2 * k, (shape.hi[1] - shape.lo[1]) / 2 * k
        return Box(
            (cx - hx + ox, cy - hy + oy, shape.lo[2] + oz),
            (cx + hx + ox, cy + hy + oy, shape.hi[2] + oz),
        )
    if isinstance(shape, Profile):
        return replace(
            shape,
            z=tuple(z + oz for z in shape.z),
            cx=tuple(c + ox for c in shape.cx),
            cy=tuple(c + oy for c in shape.cy),
            scale=shape.scale * factor**0.5,
        )
    return shape


def subject_regions(body: BodyParams, disc_min_mm: float = 0.0) -> list[tuple[str, Shape]]:
    """The subject's body as ``(region, shape)`` pairs in painting order.

    Applies per-region jitter and volume factors, the subcutaneous fat thickness and the
    torso fat (cavity) scale.
    """
    sat = body.sat_mm
    muscle_k = body.region_volume.get("skeletal_muscle", 1.0)
    extra_hip = 12.0 if body.sex == "F" else 0.0
    core = _trunk_core()
    if extra_hip:
        core = replace(core, a=tuple(a + (extra_hip if z < 120 else 0.0) for a, z in zip(core.a, core.z, strict=True)))
    thigh_extra = (muscle_k**0.5 - 1.0) * 75.0
    arm_extra = (muscle_k**0.5 - 1.0) * 38.0
    cav_scale = body.cavity_scale

    regions: list[tuple[str, Shape]] = []
    # subcutaneous fat: everything inside the skin; later shapes carve the inside
    regions.append(("subcutaneous_fat", replace(core, grow=sat)))
    regions.append(("subcutaneous_fat", cavity_profile(cav_scale, WALL_MM + sat)))
    for _name, s in _lr("x"):
        regions.append(("subcutaneous_fat", _thigh(s, thigh_extra + 0.8 * sat)))
        regions.append(("subcutaneous_fat", _arm(s, arm_extra + 0.5 * sat)))
        regions.append(("subcutaneous_fat", Ellipsoid((s * 80.0, -98.0, 15.0), (60.0 + sat, 34.0 + sat, 90.0 + sat))))
    # skeletal muscle: trunk wall, limbs
    regions.append(("skeletal_muscle", core))
    regions.append(("skeletal_muscle", cavity_profile(cav_scale, WALL_MM)))
    for _name, s in _lr("x"):
        regions.append(("skeletal_muscle", _thigh(s, thigh_extra)))
        regions.append(("skeletal_muscle", _arm(s, arm_extra)))
    # abdominal and pelvic cavity: torso fat around the organs
    regions.append(("torso_fat", cavity_profile(cav_scale)))

    for name, shape in nominal_regions(body.sex) + spine_regions(disc_min_mm):
        factor = body.region_volume.get(name, 1.0)
        offset = body.region_offset.get(name, (0.0, 0.0, 0.0))
        if name in ("vertebrae", "intervertebral_discs", "csf", "spinal_cord"):
            offset = body.region_offset.get("spine", (0.0, 0.0, 0.0))
        if factor != 1.0 or offset != (0.0, 0.0, 0.0):
            shape = _scaled(shape, factor, offset)
        regions.append((name, shape))
    return _reshaped(regions, body.region_shape) if body.region_shape else regions


def _reshaped(regions: list[tuple[str, Shape]], stretch: Mapping[str, tuple[int, float]]) -> list[tuple[str, Shape]]:
    """Stretch the parts of each region in ``stretch`` (axis, factor) about the centre of all its parts."""
    out = list(regions)
    for name, (axis, factor) in stretch.items():
        if factor == 1.0:
            continue
        parts = [i for i, (n, _) in enumerate(out) if n == name]
        if not parts:
            continue
        boxes = [out[i][1].bbox() for i in parts]
        lo = np.min([b[0] for b in boxes], axis=0)
        hi = np.max([b[1] for b in boxes], axis=0)
        c = (lo + hi) / 2.0
        centre = (float(c[0]), float(c[1]), float(c[2]))
        for i in parts:
            out[i] = (name, Stretched(out[i][1], centre, axis, factor))
    return out


# ----------------------------------------------------------------------------- rasterising


@dataclass(frozen=True)
class GridSpec:
    """A scan grid: shape, spacing (mm) and the RAS+ affine of voxel centres."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """Voxel -> world (mm) matrix; world origin at the centre of the field of view."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(self.shape, self.spacing, strict=True)]
        return aff

    def world_axes(self) -> tuple[npt.NDArray[np.float64], ...]:
        """World coordinates (mm) of voxel centres along each axis."""
        return tuple(
            np.asarray((np.arange(n) - (n - 1) / 2.0) * s, dtype=np.float64)
            for n, s in zip(self.shape, self.spacing, strict=True)
        )

    @property
    def fov(self) -> tuple[float, float, float]:
        """Field of view (mm) along each axis."""
        n, s = self.shape, self.spacing
        return (n[0] * s[0], n[1] * s[1], n[2] * s[2])


def fov_scale(grid: GridSpec) -> float:
    """Shrink factor so a neck-to-knee body fits a field of view smaller than ~1040×520×300 mm."""
    fx, fy, fz = grid.fov
    zr = BODY_Z_RANGE[1] - BODY_Z_RANGE[0]
    return float(min(1.0, fz / zr, fx / BODY_XY_EXTENT[0] * 1.0, fy / BODY_XY_EXTENT[1]))


def body_axes(
    grid: GridSpec, body: BodyParams, pose: Pose
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Body-frame coordinates (mm) of the grid's voxel centres along x, y and z."""
    s = fov_scale(grid)
    wx, wy, wz = grid.world_axes()
    z_mid = (BODY_Z_RANGE[0] + BODY_Z_RANGE[1]) / 2.0
    bx = (wx - pose.dx) / (body.width_scale * s)
    by = (wy - pose.dy) / (body.depth_scale * s)
    bz = (wz - pose.dz) / (body.height_scale * s) + z_mid
    return bx, by, bz


def rasterise(
    regions: Sequence[tuple[str, Shape]],
    grid: GridSpec,
    body: BodyParams,
    pose: Pose,
    ids: Mapping[str, int],
) -> npt.NDArray[np.int16]:
    """Paint ``regions`` onto ``grid``: an int16 map of internal label ids (0: air).

    Each shape is evaluated only on the voxels of its bounding box.
    """
    bx, by, bz = body_axes(grid, body, pose)
    out = np.zeros(grid.shape, dtype=np.int16)
    for name, shape in regions:
        lo, hi = shape.bbox()
        ix = np.nonzero((bx >= lo[0]) & (bx <= hi[0]))[0]
        iy = np.nonzero((by >= lo[1]) & (by <= hi[1]))[0]
        iz = np.nonzero((bz >= lo[2]) & (bz <= hi[2]))[0]
        if not (len(ix) and len(iy) and len(iz)):
            continue
        sx = slice(ix[0], ix[-1] + 1)
        sy = slice(iy[0], iy[-1] + 1)
        sz = slice(iz[0], iz[-1] + 1)
        inside = shape.inside(bx[sx], by[sy], bz[sz])
        view = out[sx, sy, sz]
        view[inside] = ids[name]
    return out


def body_z_scale(grid: GridSpec, body: BodyParams) -> float:
    """World mm per body-frame mm along z for this subject and grid."""
    return body.height_scale * fov_scale(grid)
