"""Textured analytic scenes and an exact ray-casting renderer (pure torch, CPU or GPU).

The generator needs images whose cameras, depth and foreground are known *exactly*, so it
ray-casts analytic primitives instead of rasterising meshes: each pixel's ray (through the pixel
centre, corner-origin convention of :mod:`mvcustom.geometry.camera`) is intersected in closed form
with spheres/ellipsoids, boxes and capped cylinders. Ray directions are scaled to unit camera z,
so the ray parameter at a hit *is* the z-depth.

Textures are solid (3D) "random colour cell" mosaics at two scales, in a randomly rotated frame
per primitive, with Lambertian shading from a fixed light. They are view-independent, so the same
surface point has the same colour in every frame, which is what structure-from-motion and
multi-view consistency checks need; the cell edges give corners and blobs for SIFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mvcustom.geometry.camera import Cameras

Tensor = torch.Tensor

KINDS = ("sphere", "box", "cylinder")
_EPS = 1e-6


def uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    """One float drawn uniformly from ``[lo, hi)`` with a seeded generator."""
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def random_rotation(gen: torch.Generator) -> Tensor:
    """A uniformly random rotation (QR of a Gaussian matrix with sign fix)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def rotation_z(deg: float) -> Tensor:
    a = torch.deg2rad(torch.tensor(float(deg), dtype=torch.float64))
    c, s = torch.cos(a), torch.sin(a)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def rotation_x(deg: float) -> Tensor:
    a = torch.deg2rad(torch.tensor(float(deg), dtype=torch.float64))
    c, s = torch.cos(a), torch.sin(a)
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)


@dataclass
class Primitive:
    """One analytic shape: the unit shape scaled by ``half_size``, rotated by ``R``, moved to ``center``.

    Unit shapes: sphere ``|p| <= 1``; box ``[-1, 1]^3``; cylinder ``x^2 + y^2 <= 1, |z| <= 1``.
    ``inside=True`` renders a box from the inside (the room around the scene).
    """

    kind: str
    center: Tensor
    half_size: Tensor
    R: Tensor
    palette: Tensor  # (C, 3) float colours in [0, 1]
    cell_size: float  # texture cell edge, world units
    texture_R: Tensor  # rotation of the texture lattice
    seed: int
    foreground: bool = False
    inside: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown primitive kind {self.kind!r}; expected one of {KINDS}")
        if self.inside and self.kind != "box":
            raise ValueError("only boxes can be rendered from the inside")


@dataclass
class Scene:
    """A list of primitives plus a light; ``foreground`` primitives make up the subject."""

    primitives: list[Primitive]
    light_dir: Tensor = field(default_factory=lambda: torch.tensor([0.4, -0.3, 0.87], dtype=torch.float64))
    ambient: float = 0.55

    def to(self, device) -> Scene:
        prims = [
            Primitive(
                p.kind,
                p.center.to(device),
                p.half_size.to(device),
                p.R.to(device),
                p.palette.to(device),
                p.cell_size,
                p.texture_R.to(device),
                p.seed,
                p.foreground,
                p.inside,
            )
            for p in self.primitives
        ]
        return Scene(prims, self.light_dir.to(device), self.ambient)


# --------------------------------------------------------------------------- intersections
def _intersect_unit(kind: str, o: Tensor, d: Tensor, inside: bool) -> tuple[Tensor, Tensor]:
    """Nearest hit ``t`` (inf where none) and local normal of rays ``o + t d`` with a unit shape."""
    inf = torch.full(o.shape[:-1], float("inf"), dtype=o.dtype, device=o.device)
    if kind == "sphere":
        a = (d * d).sum(-1)
        b = 2 * (o * d).sum(-1)
        c = (o * o).sum(-1) - 1
        disc = b * b - 4 * a * c
        sq = torch.sqrt(disc.clamp_min(0))
        t0 = (-b - sq) / (2 * a)
        t1 = (-b + sq) / (2 * a)
        t = torch.where(t0 > _EPS, t0, torch.where(t1 > _EPS, t1, inf))
        t = torch.where(disc >= 0, t, inf)
        n = o + t.unsqueeze(-1).nan_to_num(posinf=0) * d
        return t, n
    if kind == "box":
        inv = 1.0 / d  # +-inf for axis-parallel rays: the slab test handles it
        t1 = (-1 - o) * inv
        t2 = (1 - o) * inv
        tmin = torch.minimum(t1, t2).amax(-1)
        tmax = torch.maximum(t1, t2).amin(-1)
        hit = tmax >= torch.maximum(tmin, torch.zeros_like(tmin))
        if inside:
            t = torch.where(hit & (tmax > _EPS), tmax, inf)
        else:
            t = torch.where(
                hit & (tmin > _EPS), tmin, torch.where(hit & (tmax > _EPS) & (tmin <= _EPS), tmax, inf)
            )
        p = o + t.unsqueeze(-1).nan_to_num(posinf=0) * d
        axis = p.abs().argmax(-1, keepdim=True)
        n = torch.zeros_like(p).scatter(-1, axis, torch.sign(p.gather(-1, axis)))
        if inside:
            n = -n
        return t, n
    # capped cylinder along local z
    a = d[..., 0] ** 2 + d[..., 1] ** 2
    b = 2 * (o[..., 0] * d[..., 0] + o[..., 1] * d[..., 1])
    c = o[..., 0] ** 2 + o[..., 1] ** 2 - 1
    disc = b * b - 4 * a * c
    sq = torch.sqrt(disc.clamp_min(0))
    a_safe = torch.where(a.abs() < 1e-12, torch.ones_like(a), a)
    cands = []
    for root in ((-b - sq) / (2 * a_safe), (-b + sq) / (2 * a_safe)):
        z = o[..., 2] + root * d[..., 2]
        ok = (disc >= 0) & (a.abs() >= 1e-12) & (root > _EPS) & (z.abs() <= 1)
        cands.append(torch.where(ok, root, inf))
    dz = torch.where(d[..., 2].abs() < 1e-12, torch.full_like(d[..., 2], 1e-12), d[..., 2])
    for zc in (-1.0, 1.0):
        root = (zc - o[..., 2]) / dz
        x = o[..., 0] + root * d[..., 0]
        y = o[..., 1] + root * d[..., 1]
        ok = (root > _EPS) & (x * x + y * y <= 1)
        cands.append(torch.where(ok, root, inf))
    t = torch.stack(cands, -1).amin(-1)
    p = o + t.unsqueeze(-1).nan_to_num(posinf=0) * d
    on_cap = (p[..., 2].abs() > 1 - 1e-6) & (p[..., 0] ** 2 + p[..., 1] ** 2 < 1 - 1e-6)
    n_side = torch.stack([p[..., 0], p[..., 1], torch.zeros_like(p[..., 0])], -1)
    n_cap = torch.stack([torch.zeros_like(p[..., 0]), torch.zeros_like(p[..., 0]), torch.sign(p[..., 2])], -1)
    n = torch.where(on_cap.unsqueeze(-1), n_cap, n_side)
    return t, n


def _hash3(cells: Tensor, seed: int) -> Tensor:
    """Deterministic non-negative int64 hash of integer lattice coordinates ``(..., 3)``."""
    x, y, z = cells.unbind(-1)
    # the seed reduced first: primitive seeds grow with the sample seed (x 1_000_003 x 131), and
    # an int64 product of a larger one overflowed (sample seeds above ~26 crashed)
    h = (x * 73856093) ^ (y * 19349663) ^ (z * 83492791) ^ ((seed % 2**31) * 2654435761)
    h = h & 0x7FFFFFFF
    h = ((h >> 16) ^ h) * 0x45D9F3B & 0x7FFFFFFF
    h = ((h >> 16) ^ h) * 0x45D9F3B & 0x7FFFFFFF
    return (h >> 16) ^ h


def _texture(prim: Primitive, p_obj: Tensor) -> Tensor:
    """Albedo ``(..., 3)`` at object-space points (world units, relative to the primitive centre)."""
    q = p_obj @ prim.texture_R
    coarse = torch.floor(q / prim.cell_size).to(torch.int64)
    fine = torch.floor(q / (prim.cell_size / 3.1)).to(torch.int64)
    hc = _hash3(coarse, prim.seed)
    hf = _hash3(fine, prim.seed + 7919)
    base = prim.palette[hc % prim.palette.shape[0]]
    jitter = 0.75 + 0.5 * ((hf % 1000).to(p_obj.dtype) / 999.0)
    return (base * jitter.unsqueeze(-1)).clamp(0, 1)


@dataclass
class Render:
    """Output of :func:`render`: ``rgb (N,H,W,3)`` uint8, ``depth (N,H,W)`` z-depth (0 = no hit),
    ``foreground (N,H,W)`` bool, ``points (N,H,W,3)`` world hit points (NaN = no hit)."""

    rgb: Tensor
    depth: Tensor
    foreground: Tensor
    points: Tensor


@torch.no_grad()
def render(scene: Scene, cams: Cameras, device: str | torch.device = "cpu") -> Render:
    """Ray-cast ``scene`` from every camera (all cameras must share one image size)."""
    cams = cams.to(device=device, dtype=torch.float64)
    scene = scene.to(device)
    grid = cams.pixel_grid(1)  # (H, W, 2) pixel centres
    H, W = grid.shape[:2]
    ones = torch.ones(H, W, 1, dtype=torch.float64, device=device)
    pix = torch.cat([grid, ones], -1).reshape(-1, 3)
    light = scene.light_dir / scene.light_dir.norm()
    rgbs, depths, fgs, pts = [], [], [], []
    for i in range(len(cams)):
        d_cam = pix @ torch.linalg.inv(cams.K[i]).T  # z = 1: ray parameter == z-depth
        d = d_cam @ cams.R[i]  # world directions (R^T d)
        o = cams.centers[i].expand_as(d)
        best_t = torch.full((d.shape[0],), float("inf"), dtype=torch.float64, device=device)
        best_idx = torch.full((d.shape[0],), -1, dtype=torch.int64, device=device)
        best_n = torch.zeros_like(d)
        for k, prim in enumerate(scene.primitives):
            o_l = ((o - prim.center) @ prim.R) / prim.half_size
            d_l = (d @ prim.R) / prim.half_size
            t, n_l = _intersect_unit(prim.kind, o_l, d_l, prim.inside)
            closer = t < best_t
            best_t = torch.where(closer, t, best_t)
            best_idx = torch.where(closer, torch.full_like(best_idx, k), best_idx)
            n_w = (n_l / prim.half_size) @ prim.R.T
            best_n = torch.where(closer.unsqueeze(-1), n_w, best_n)
        hit = torch.isfinite(best_t)
        p = o + best_t.nan_to_num(posinf=0).unsqueeze(-1) * d
        color = torch.zeros_like(d)
        fg = torch.zeros(d.shape[0], dtype=torch.bool, device=device)
        for k, prim in enumerate(scene.primitives):
            sel = best_idx == k
            if sel.any():
                color[sel] = _texture(prim, p[sel] - prim.center)
                fg[sel] = prim.foreground
        n = best_n / best_n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        shade = scene.ambient + (1 - scene.ambient) * (n @ light).clamp_min(0)
        color = color * shade.unsqueeze(-1)
        color[~hit] = 0
        rgbs.append((color * 255).round().clamp(0, 255).to(torch.uint8).reshape(H, W, 3))
        depths.append(torch.where(hit, best_t, torch.zeros_like(best_t)).reshape(H, W))
        fgs.append(fg.reshape(H, W))
        p[~hit] = float("nan")
        pts.append(p.reshape(H, W, 3))
    return Render(
        torch.stack(rgbs).cpu(), torch.stack(depths).cpu(), torch.stack(fgs).cpu(), torch.stack(pts).cpu()
    )
