"""Geometric primitives of the phantom, evaluated on axis-aligned grids.

Every shape lives in the *body frame* (mm; x to the subject's right, y anterior, z
superior, origin between the femoral heads). A shape answers two questions: its bounding
box, and which points of a rectilinear sub-grid (given as three 1-D coordinate arrays) lie
inside. Evaluating on the bounding box of each shape only keeps a 64×48×128 phantom at a
few tens of milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


def rotation(axis: str, degrees: float) -> Array:
    """Return the 3×3 rotation matrix about body axis ``x``, ``y`` or ``z``."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=float)
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=float)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=float)


class Shape:
    """Interface of a primitive."""

    def bbox(self) -> tuple[Array, Array]:
        """Return (lower, upper) corners in the body frame (mm)."""
        raise NotImplementedError

    def inside(self, x: Array, y: Array, z: Array) -> Mask:
        """Boolean array of shape ``(len(x), len(y), len(z))``: points inside the shape."""
        raise NotImplementedError


@dataclass(frozen=True)
class Ellipsoid(Shape):
    """An ellipsoid with semi-axes ``radii``, optionally rotated (local -> body) by ``rot``."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    rot: Array | None = None

    def bbox(self) -> tuple[Array, Array]:
        c = np.asarray(self.center, dtype=float)
        r = np.asarray(self.radii, dtype=float)
        # extent of a (rotated) ellipsoid along each body axis
        ext = r if self.rot is None else np.sqrt(((self.rot * r[None, :]) ** 2).sum(axis=1))
        return c - ext, c + ext

    def inside(self, x: Array, y: Array, z: Array) -> Mask:
        cx, cy, cz = self.center
        rx, ry, rz = self.radii
        dx = (x - cx)[:, None, None]
        dy = (y - cy)[None, :, None]
        dz = (z - cz)[None, None, :]
        if self.rot is None:
            return np.asarray((dx / rx) ** 2 + (dy / ry) ** 2 + (dz / rz) ** 2 <= 1.0)
        rt = self.rot.T  # body -> local
        lx = rt[0, 0] * dx + rt[0, 1] * dy + rt[0, 2] * dz
        ly = rt[1, 0] * dx + rt[1, 1] * dy + rt[1, 2] * dz
        lz = rt[2, 0] * dx + rt[2, 1] * dy + rt[2, 2] * dz
        return np.asarray((lx / rx) ** 2 + (ly / ry) ** 2 + (lz / rz) ** 2 <= 1.0)


@dataclass(frozen=True)
class Tube(Shape):
    """A tube around a polyline; the radius is interpolated linearly along each segment."""

    points: tuple[tuple[float, float, float], ...]
    radii: tuple[float, ...]

    def bbox(self) -> tuple[Array, Array]:
        p = np.asarray(self.points, dtype=float)
        r = float(max(self.radii))
        return p.min(axis=0) - r, p.max(axis=0) + r

    def inside(self, x: Array, y: Array, z: Array) -> Mask:
        px = x[:, None, None]
        py = y[None, :, None]
        pz = z[None, None, :]
        out = np.zeros((len(x), len(y), len(z)), dtype=bool)
        pts = np.asarray(self.points, dtype=float)
        for i in range(len(pts) - 1):
            a, b = pts[i], pts[i + 1]
            ra, rb = self.radii[i], self.radii[i + 1]
            d = b - a
            length2 = float(d @ d)
            t = ((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / max(length2, 1e-9)
            t = np.clip(t, 0.0, 1.0)
            qx = px - (a[0] + t * d[0])
            qy = py - (a[1] + t * d[1])
            qz = pz - (a[2] + t * d[2])
            radius = ra + t * (rb - ra)
            out |= qx * qx + qy * qy + qz * qz <= radius * radius
        return out


@dataclass(frozen=True)
class Profile(Shape):
    """A stack of axial ellipses: centre, semi-axes interpolated along z between knots.

    ``scale`` multiplies the semi-axes and ``grow`` (mm) is added to them afterwards, so
    a shell of thickness t around a core is ``Profile(..., grow=t)`` minus the core.
    """

    z: tuple[float, ...]
    cx: tuple[float, ...]
    cy: tuple[float, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]
    scale: float = 1.0
    grow: float = 0.0

    def _at(self, z: Array) -> tuple[Array, Array, Array, Array]:
        zk = np.asarray(self.z, dtype=float)
        cx = np.interp(z, zk, self.cx)
        cy = np.interp(z, zk, self.cy)
        a = np.interp(z, zk, self.a) * self.scale + self.grow
        b = np.interp(z, zk, self.b) * self.scale + self.grow
        return cx, cy, a, b

    def bbox(self) -> tuple[Array, Array]:
        zz = np.linspace(self.z[0], self.z[-1], 64)
        cx, cy, a, b = self._at(zz)
        lo = np.array([(cx - a).min(), (cy - b).min(), self.z[0]])
        hi = np.array([(cx + a).max(), (cy + b).max(), self.z[-1]])
        return lo, hi

    def inside(self, x: Array, y: Array, z: Array) -> Mask:
        cx, cy, a, b = self._at(z)
        inz = (z >= self.z[0]) & (z <= self.z[-1])
        dx = (x[:, None, None] - cx[None, None, :]) / a[None, None, :]
        dy = (y[None, :, None] - cy[None, None, :]) / b[None, None, :]
        return np.asarray((dx * dx + dy * dy <= 1.0) & inz[None, None, :])


@dataclass(frozen=True)
class Box(Shape):
    """An axis-aligned box."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    def bbox(self) -> tuple[Array, Array]:
        return np.asarray(self.lo, dtype=float), np.asarray(self.hi, dtype=float)

    def inside(self, x: Array, y: Array, z: Array) -> Mask:
        return np.asarray(
            ((x >= self.lo[0]) & (x <= self.hi[0]))[:, None, None]
            & ((y >= self.lo[1]) & (y <= self.hi[1]))[None, :, None]
            & ((z >= self.lo[2]) & (z <= self.hi[2]))[None, None, :]
        )


@dataclass(frozen=True)
class Difference(Shape):
    """Points inside ``outer`` but not inside ``inner`` (a shell)."""

    outer: Shape
    inner: Shape

    def bbox(self) -> tuple[Array, Array]:
        return self.outer.bbox()

    def inside(self, x: Array, y: Array, z: Array) -> Mask:
        return np.asarray(self.outer.inside(x, y, z) & ~self.inner.inside(x, y, z))


@dataclass(frozen=True)
class Stretched(Shape):
    """``shape`` stretched by ``factor`` along body axis ``axis`` about ``center``, at constant volume.

    The other two axes shrink by ``sqrt(factor)``. The map is diagonal, so a rectilinear
    query grid maps back to a rectilinear grid of the original shape.
    """

    shape: Shape
    center: tuple[float, float, float]
    axis: int
    factor: float

    def _scales(self) -> Array:
        s = np.full(3, self.factor**-0.5)
        s[self.axis] = self.factor
        return s

    def bbox(self) -> tuple[Array, Array]:
        lo, hi = self.shape.bbox()
        c = np.asarray(self.center, dtype=float)
        s = self._scales()
        a, b = c + (lo - c) * s, c + (hi - c) * s
        return np.minimum(a, b), np.maximum(a, b)

    def inside(self, x: Array, y: Array, z: Array) -> Mask:
        c = self.center
        s = self._scales()
        return self.shape.inside(c[0] + (x - c[0]) / s[0], c[1] + (y - c[1]) / s[1], c[2] + (z - c[2]) / s[2])
