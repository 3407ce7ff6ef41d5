"""Subjects (several CO3D-like categories) and surroundings built from textured primitives.

Canonical scene frame: +z up, the floor is ``z = 0``, the subject stands on the floor centred on
the z axis and fits in a sphere of radius ~0.5 around ``(0, 0, subject_height / 2)``. Every shape
is randomised from a seeded ``torch.Generator`` so a (category, seed) pair always gives the same
subject.
"""

from __future__ import annotations

import math

import torch

from mvcustom.data.generator.scene import Primitive, Scene, random_rotation, rotation_x, rotation_z
from mvcustom.data.generator.scene import uniform as _u

CATEGORIES = ("teddybear", "chair", "car", "hydrant", "apple")

_I3 = torch.eye(3, dtype=torch.float64)


def _palette(gen: torch.Generator, n: int = 6, saturation: float = 0.8) -> torch.Tensor:
    """``n`` random, clearly distinct colours around a random hue."""
    base = _u(gen, 0, 1)
    hues = (base + torch.arange(n, dtype=torch.float64) / n * _u(gen, 0.3, 1.0)) % 1.0
    vals = 0.35 + 0.65 * torch.rand(n, generator=gen, dtype=torch.float64)
    # HSV -> RGB for full saturation variants
    k = torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)
    kk = (k + hues.unsqueeze(-1) * 6) % 6
    rgb = vals.unsqueeze(-1) * (1 - saturation * torch.clamp(torch.minimum(kk, 4 - kk), 0, 1))
    return rgb


class _Builder:
    def __init__(self, gen: torch.Generator, seed: int, foreground: bool, cell: float):
        self.gen = gen
        self.seed = seed
        self.fg = foreground
        self.cell = cell
        self.palette = _palette(gen)
        self.prims: list[Primitive] = []

    def add(self, kind, center, half, R=None, palette=None, cell=None, inside=False):
        self.prims.append(
            Primitive(
                kind=kind,
                center=torch.tensor(center, dtype=torch.float64),
                half_size=torch.tensor(half, dtype=torch.float64),
                R=_I3.clone() if R is None else R,
                palette=self.palette if palette is None else palette,
                cell_size=self.cell if cell is None else cell,
                texture_R=random_rotation(self.gen),
                seed=self.seed * 131 + len(self.prims),
                foreground=self.fg,
                inside=inside,
            )
        )


def make_subject(category: str, seed: int) -> list[Primitive]:
    """Foreground primitives of one subject of ``category`` (see :data:`CATEGORIES`)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; the generator knows {CATEGORIES}")
    gen = torch.Generator().manual_seed(seed)
    b = _Builder(gen, seed, foreground=True, cell=_u(gen, 0.05, 0.09))
    if category == "teddybear":
        r = _u(gen, 0.2, 0.26)
        b.add("sphere", (0, 0, r * 1.05), (r, r * 0.9, r * 1.05))
        hr = r * _u(gen, 0.6, 0.75)
        hz = r * 2.1 + hr * 0.8
        b.add("sphere", (0, 0, hz), (hr, hr, hr))
        for sx in (-1, 1):
            b.add("sphere", (sx * hr * 0.75, 0, hz + hr * 0.8), (hr * 0.35,) * 3)
            b.add("sphere", (sx * r * 1.05, -r * 0.2, r * 1.3), (r * 0.3, r * 0.3, r * 0.55))
            b.add("sphere", (sx * r * 0.5, -r * 0.6, r * 0.3), (r * 0.3, r * 0.45, r * 0.3))
    elif category == "chair":
        w, d, h = _u(gen, 0.45, 0.6), _u(gen, 0.4, 0.55), _u(gen, 0.4, 0.5)
        leg = _u(gen, 0.025, 0.04)
        b.add("box", (0, 0, h), (w / 2, d / 2, 0.03))
        for sx in (-1, 1):
            for sy in (-1, 1):
                b.add("box", (sx * (w / 2 - leg), sy * (d / 2 - leg), h / 2), (leg, leg, h / 2))
        bh = _u(gen, 0.35, 0.5)
        b.add("box", (0, d / 2 - 0.03, h + bh / 2), (w / 2, 0.03, bh / 2), R=rotation_x(_u(gen, -8, 0)))
    elif category == "car":
        L, Wd, Hb = _u(gen, 0.8, 1.0), _u(gen, 0.38, 0.45), _u(gen, 0.14, 0.2)
        wr = _u(gen, 0.09, 0.12)
        b.add("box", (0, 0, wr + Hb / 2 + 0.02), (L / 2, Wd / 2, Hb / 2))
        b.add("box", (-L * 0.05, 0, wr + Hb + 0.02 + Hb * 0.4), (L * 0.28, Wd * 0.45, Hb * 0.4))
        wheel_R = rotation_x(90)
        dark = _palette(gen, 4, saturation=0.2) * 0.4
        for sx in (-1, 1):
            for sy in (-1, 1):
                b.add("cylinder", (sx * L * 0.32, sy * Wd / 2, wr), (wr, wr, 0.04), R=wheel_R, palette=dark)
    elif category == "hydrant":
        r = _u(gen, 0.12, 0.16)
        h = _u(gen, 0.5, 0.65)
        b.add("cylinder", (0, 0, h / 2), (r, r, h / 2))
        b.add("sphere", (0, 0, h), (r, r, r * 0.8))
        b.add("cylinder", (0, 0, 0.03), (r * 1.4, r * 1.4, 0.03))
        side = rotation_x(90)
        for sy in (-1, 1):
            b.add("cylinder", (0, sy * r, h * 0.65), (r * 0.35, r * 0.35, r * 0.5), R=side)
    else:  # apple
        r = _u(gen, 0.22, 0.3)
        b.add("sphere", (0, 0, r * 0.92), (r, r, r * 0.92))
        b.add("cylinder", (0, 0, r * 1.9), (0.015, 0.015, r * 0.15), R=rotation_x(_u(gen, -15, 15)))
    # A random yaw so subjects of one category do not all face the same way.
    Rz = rotation_z(_u(gen, 0, 360))
    for p in b.prims:
        p.center = Rz @ p.center
        p.R = Rz @ p.R
    return b.prims


def make_room(
    seed: int, half_extent: float = 3.6, height: float = 2.8, num_props: int = 8
) -> list[Primitive]:
    """Textured surroundings: a room (box seen from inside) and props in a ring near the walls."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    b = _Builder(gen, 10_000 + seed, foreground=False, cell=_u(gen, 0.18, 0.3))
    e = half_extent
    b.add("box", (0, 0, height / 2), (e, e, height / 2), inside=True)
    for k in range(num_props):
        ang = 2 * math.pi * (k + _u(gen, 0, 0.6)) / max(num_props, 1)
        # Props stand in a ring outside the camera paths of the generator (radius <= 2.3).
        rad = _u(gen, 2.65, e - 0.45)
        kind = ("box", "sphere", "cylinder")[k % 3]
        s = _u(gen, 0.15, 0.35)
        z = s if kind != "box" else _u(gen, s, 1.2)
        b.palette = _palette(gen)
        b.add(
            kind,
            (rad * math.cos(ang), rad * math.sin(ang), z),
            (s, s * _u(gen, 0.6, 1.4), s),
            R=rotation_z(_u(gen, 0, 90)),
            cell=_u(gen, 0.06, 0.12),
        )
    return b.prims


def make_scene(category: str, subject_seed: int, room_seed: int, with_subject: bool = True) -> Scene:
    """A subject of ``category`` standing in a textured room."""
    prims = make_room(room_seed)
    if with_subject:
        prims = make_subject(category, subject_seed) + prims
    return Scene(prims)


def subject_extent(prims: list[Primitive]) -> tuple[torch.Tensor, float]:
    """Bounding-sphere centre and radius of primitives (conservative: uses half-size norms)."""
    centers = torch.stack([p.center for p in prims])
    radii = torch.stack([p.half_size.norm() for p in prims])
    lo = (centers - radii.unsqueeze(-1)).amin(0)
    hi = (centers + radii.unsqueeze(-1)).amax(0)
    c = (lo + hi) / 2
    return c, float(((centers - c).norm(dim=-1) + radii).max())
