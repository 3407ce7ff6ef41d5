"""Depth map -> triangle mesh, and a z-buffer rasteriser in pure torch (CPU or GPU).

Depth-aware feature rendering (paper §3.4, Fig. 3a; DESIGN.md §1) lifts an anchor frame to a
mesh textured with its UNet features and renders that mesh into every target camera. The paper
leaves the mesh construction and the renderer open (PAPER.md §5, NF); ours:

* **Mesh** (:func:`depth_to_mesh`): one vertex per pixel *centre* (corner-origin pixels,
  :mod:`mvcustom.geometry.camera`), unprojected with its z-depth; every 2x2 block of pixel
  centres gives two triangles. A triangle is dropped when a vertex has no depth (0) or when its
  depths differ by more than ``max_depth_ratio`` (a depth discontinuity: an occluding contour must
  tear the surface open, or rendering would stretch a "rubber sheet" over the disocclusion).
  Vertex ``k`` is pixel ``(k // W, k % W)``, so a per-pixel feature map flattened row-major *is*
  the per-vertex texture.
* **Rasteriser** (:func:`rasterize`): every triangle is projected into every camera; the pixel
  centres inside its screen-space bounding box are enumerated (vectorised, in chunks so memory
  stays bounded), tested with edge functions, and a z-buffer keeps the nearest surface per pixel
  (``scatter_reduce`` amin, ties broken by the larger face index, so it is deterministic).
  Attributes are interpolated with perspective-correct barycentric weights.

Only fixed geometry is rasterised once; the per-step cost of feature rendering is then one
gather and a weighted sum (:func:`interpolate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mvcustom.geometry.camera import Cameras

Tensor = torch.Tensor


@dataclass
class Mesh:
    """A triangle mesh in world coordinates.

    Attributes:
        vertices: ``(V, 3)`` world points.
        faces: ``(T, 3)`` int64 vertex indices.
    """

    vertices: Tensor
    faces: Tensor

    @staticmethod
    def cat(meshes: list[Mesh]) -> Mesh:
        """One mesh holding all of ``meshes`` (vertex order: the inputs', concatenated)."""
        offsets, n = [], 0
        for m in meshes:
            offsets.append(n)
            n += m.vertices.shape[0]
        return Mesh(
            torch.cat([m.vertices for m in meshes]),
            torch.cat([m.faces + o for m, o in zip(meshes, offsets, strict=True)]),
        )


@dataclass
class Fragments:
    """What each pixel of each camera sees.

    Attributes:
        face: ``(N, H, W)`` int64 index of the visible face, ``-1`` where nothing is rendered.
        bary: ``(N, H, W, 3)`` perspective-correct barycentric weights of the face's vertices.
        depth: ``(N, H, W)`` z-depth of the visible surface, ``0`` where nothing is rendered.
    """

    face: Tensor
    bary: Tensor
    depth: Tensor

    @property
    def mask(self) -> Tensor:
        """``(N, H, W)`` bool: pixels covered by the mesh."""
        return self.face >= 0


def depth_to_mesh(
    depth: Tensor, cam: Cameras, max_grazing_deg: float = 86.0, max_depth_ratio: float | None = None
) -> Mesh:
    """Lift a z-depth map seen by one camera to a mesh (see the module docstring).

    Args:
        depth: ``(H, W)`` z-depth in the camera's world units; ``0`` (or negative) = unknown.
        cam: one camera whose ``image_hw`` is ``(H, W)``.
        max_grazing_deg: a triangle seen at a grazing angle above this (the angle between its
            normal and the viewing ray through its centroid) is treated as spanning a depth
            discontinuity and dropped. Scale-free: a "rubber sheet" stretched between a
            foreground and a background pixel lies almost along the viewing ray, whatever the
            depths; a slanted floor at 80 degrees stays.
        max_depth_ratio: optionally also drop triangles whose largest / smallest vertex depth
            exceeds this (resolution-dependent; ``None``: off).
    """
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {tuple(depth.shape)}")
    if len(cam) != 1:
        raise ValueError(f"depth_to_mesh takes one camera, got {len(cam)}")
    H, W = depth.shape
    if tuple(cam.image_hw[0].tolist()) != (H, W):
        raise ValueError(f"camera image size {cam.image_hw[0].tolist()} != depth size {[H, W]}")
    if not 0 < max_grazing_deg <= 90:
        raise ValueError(f"max_grazing_deg must be in (0, 90], got {max_grazing_deg}")
    if max_depth_ratio is not None and max_depth_ratio <= 1:
        raise ValueError(f"max_depth_ratio must be > 1, got {max_depth_ratio}")
    grid = cam.pixel_grid(1).reshape(1, -1, 2)
    z = depth.to(cam.w2c.dtype).reshape(1, -1)
    vertices = cam.unproject(grid, z)[0]
    idx = torch.arange(H * W, device=depth.device).reshape(H, W)
    a, b = idx[:-1, :-1].reshape(-1), idx[:-1, 1:].reshape(-1)  # top-left, top-right
    c, d = idx[1:, :-1].reshape(-1), idx[1:, 1:].reshape(-1)  # bottom-left, bottom-right
    faces = torch.cat([torch.stack([a, c, b], -1), torch.stack([b, c, d], -1)])
    zf = z[0][faces]  # (T, 3)
    keep = (zf > 0).all(-1)
    if max_depth_ratio is not None:
        keep &= zf.amax(-1) <= max_depth_ratio * zf.amin(-1)
    p = vertices[faces]  # (T, 3, 3)
    normal = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1)
    ray = p.mean(1) - cam.centers[0]
    cos = (normal * ray).sum(-1).abs() / (normal.norm(dim=-1) * ray.norm(dim=-1)).clamp_min(1e-30)
    keep &= cos >= torch.cos(torch.deg2rad(torch.tensor(float(max_grazing_deg), dtype=cos.dtype)))
    return Mesh(vertices, faces[keep])


def _edge(ax: Tensor, ay: Tensor, bx: Tensor, by: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Twice the signed area of triangle (a, b, p)."""
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


def _screen_bary(tri_uv: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Screen-space barycentrics ``(..., 3)`` of points ``(px, py)`` in triangles ``(..., 3, 2)``."""
    x0, y0 = tri_uv[..., 0, 0], tri_uv[..., 0, 1]
    x1, y1 = tri_uv[..., 1, 0], tri_uv[..., 1, 1]
    x2, y2 = tri_uv[..., 2, 0], tri_uv[..., 2, 1]
    area = _edge(x0, y0, x1, y1, x2, y2)
    w0 = _edge(x1, y1, x2, y2, px, py) / area
    w1 = _edge(x2, y2, x0, y0, px, py) / area
    return torch.stack([w0, w1, 1 - w0 - w1], -1)


def _perspective(bary: Tensor, tri_z: Tensor) -> tuple[Tensor, Tensor]:
    """Screen-space barycentrics -> (perspective-correct barycentrics, z-depth): 1/z is linear
    in screen space, attributes are linear in 3D."""
    w = bary / tri_z
    inv_z = w.sum(-1)
    return w / inv_z.unsqueeze(-1), 1.0 / inv_z


def rasterize(
    mesh: Mesh, cams: Cameras, near: float = 1e-4, chunk: int = 1 << 22, eps: float = 1e-6
) -> Fragments:
    """Render ``mesh`` into every camera with a z-buffer.

    Args:
        mesh: the mesh (world coordinates).
        cams: ``N`` cameras sharing one image size ``(H, W)``.
        near: triangles with a vertex closer than this (z-depth) are culled.
        chunk: most candidate (triangle, pixel) pairs held at once.
        eps: inside-test tolerance on barycentrics, so pixel centres on shared edges are covered.
    Returns:
        :class:`Fragments` of shape ``(N, H, W)``.
    """
    hw = cams.image_hw[0]
    if not (cams.image_hw == hw).all():
        raise ValueError("rasterize needs all cameras to share one image size")
    H, W = int(hw[0]), int(hw[1])
    N, dev = len(cams), mesh.vertices.device
    dt = cams.w2c.dtype
    uv, z = cams.to(device=dev).project(mesh.vertices.to(dt))  # (N, V, 2), (N, V)
    tri_uv, tri_z = uv[:, mesh.faces], z[:, mesh.faces]  # (N, T, 3, 2), (N, T, 3)

    # candidate pixel columns/rows whose centre (i + 0.5) lies in the triangle's bounding box
    x0 = torch.ceil(tri_uv[..., 0].amin(-1) - 0.5 - 1e-6).clamp(min=0)
    x1 = torch.floor(tri_uv[..., 0].amax(-1) - 0.5 + 1e-6).clamp(max=W - 1)
    y0 = torch.ceil(tri_uv[..., 1].amin(-1) - 0.5 - 1e-6).clamp(min=0)
    y1 = torch.floor(tri_uv[..., 1].amax(-1) - 0.5 + 1e-6).clamp(max=H - 1)
    area = _edge(
        tri_uv[..., 0, 0],
        tri_uv[..., 0, 1],
        tri_uv[..., 1, 0],
        tri_uv[..., 1, 1],
        tri_uv[..., 2, 0],
        tri_uv[..., 2, 1],
    )
    ok = (tri_z > near).all(-1) & (x1 >= x0) & (y1 >= y0) & (area.abs() > 1e-12)
    ok &= torch.isfinite(tri_uv).all(-1).all(-1)
    cam_i, tri_i = ok.nonzero(as_tuple=True)
    nx = (x1 - x0 + 1)[cam_i, tri_i].long()
    ny = (y1 - y0 + 1)[cam_i, tri_i].long()
    counts = nx * ny
    bx, by = x0[cam_i, tri_i].long(), y0[cam_i, tri_i].long()

    def candidates(lo: int, hi: int):
        """Inside (camera, triangle, pixel) candidates of triangles ``lo:hi`` (of ``cam_i``)."""
        c = counts[lo:hi]
        owner = torch.repeat_interleave(torch.arange(lo, hi, device=dev), c)
        start = torch.cumsum(c, 0) - c
        offset = torch.arange(int(c.sum()), device=dev) - torch.repeat_interleave(start, c)
        px = bx[owner] + offset % nx[owner]
        py = by[owner] + offset // nx[owner]
        n, t = cam_i[owner], tri_i[owner]
        bary = _screen_bary(tri_uv[n, t], px.to(dt) + 0.5, py.to(dt) + 0.5)
        inside = (bary >= -eps).all(-1)
        n, t, px, py, bary = n[inside], t[inside], px[inside], py[inside], bary[inside]
        _, depth = _perspective(bary, tri_z[n, t])
        return (n * H + py) * W + px, t, depth

    # split the triangle list so that each piece enumerates at most ``chunk`` candidates
    bounds = [0]
    csum = torch.cumsum(counts, 0)
    while bounds[-1] < len(counts):
        base = int(csum[bounds[-1] - 1]) if bounds[-1] > 0 else 0
        nxt = int(torch.searchsorted(csum, torch.tensor(base + chunk, device=dev), right=True))
        bounds.append(max(nxt, bounds[-1] + 1))
    zbuf = torch.full((N * H * W,), float("inf"), dtype=dt, device=dev)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):  # pass 1: nearest depth per pixel
        key, _, depth = candidates(lo, hi)
        zbuf.scatter_reduce_(0, key, depth, reduce="amin")
    face = torch.full((N * H * W,), -1, dtype=torch.int64, device=dev)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):  # pass 2: which face holds it
        key, t, depth = candidates(lo, hi)
        win = depth == zbuf[key]
        face.scatter_reduce_(0, key[win], t[win], reduce="amax")
    face = face.reshape(N, H, W)
    # barycentrics of each covered pixel in its face
    n, py, px = (face >= 0).nonzero(as_tuple=True)
    f = face[n, py, px]
    bary_s = _screen_bary(tri_uv[n, f], px.to(dt) + 0.5, py.to(dt) + 0.5)
    bary_p, depth = _perspective(bary_s, tri_z[n, f])
    bary = torch.zeros(N, H, W, 3, dtype=dt, device=dev)
    zmap = torch.zeros(N, H, W, dtype=dt, device=dev)
    bary[n, py, px] = bary_p
    zmap[n, py, px] = depth
    return Fragments(face, bary, zmap)


def interpolate(frags: Fragments, faces: Tensor, attributes: Tensor) -> Tensor:
    """Per-pixel attributes from per-vertex ones.

    Args:
        frags: rasteriser output for ``N`` cameras of size ``(H, W)``.
        faces: ``(T, 3)`` the mesh's faces.
        attributes: ``(V, C)`` shared by all cameras, or ``(B, V, C)`` a batch of textures
            (e.g. the same anchor's features at several batch entries).
    Returns:
        ``(N, C, H, W)`` or ``(B, N, C, H, W)``; zero where nothing is rendered.
    """
    batched = attributes.ndim == 3
    attr = attributes if batched else attributes.unsqueeze(0)
    B, _, C = attr.shape
    N, H, W = frags.face.shape
    covered = frags.face >= 0
    n_idx = covered.nonzero(as_tuple=True)
    verts = faces[frags.face[n_idx]]  # (P, 3)
    w = frags.bary[n_idx].to(attr.dtype)  # (P, 3)
    vals = (attr[:, verts] * w.unsqueeze(0).unsqueeze(-1)).sum(2)  # (B, P, C)
    out = attr.new_zeros(B, N, H, W, C)
    out[:, n_idx[0], n_idx[1], n_idx[2]] = vals
    out = out.permute(0, 1, 4, 2, 3)
    return out if batched else out[0]
