"""Depth-aware feature rendering (paper §3.4, Fig. 3a; DESIGN.md §1, inference).

An anchor frame's depth is lifted to a mesh (:mod:`mvcustom.geometry.mesh`) and rendered into
every other frame's camera. During the first denoising steps, the features of the chosen UNet
blocks at the covered pixels of the other frames are replaced by the anchor's features seen
through that mesh: ``F_n <- M_n * R(F_a, phi_n) + (1 - M_n) * F_n`` (paper's Eq. for F̂_n).

How we render features (the paper leaves it open, PAPER.md §5): the mesh is built once at the
depth map's resolution (so discontinuities are found at full resolution) and rasterised once per
feature-map resolution. Each covered target pixel then knows the sub-pixel position in the anchor
it sees (perspective-correct interpolation of the vertices' anchor coordinates), so rendering a
feature map at a denoising step is one ``grid_sample`` of the anchor's features (bilinear
texture lookup), batched over frames, clips and the CFG halves. Several anchors (our extension
beyond the paper) are fused by the z-buffer: one mesh holding all of them.

Depth scale (paper App. B.2 aligns ZoeDepth's scale to the trajectory's; the method is NF): ours
is :func:`median_scale` against a reference depth (the FeatureNeRF's rendered depth on the
subject), refined by :func:`search_depth_scale`, a grid search over ``±search`` that maximises the
overlap of the anchor's subject, rendered into the reference views, with their masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mvcustom.geometry.camera import Cameras
from mvcustom.geometry.mesh import Mesh, depth_to_mesh, interpolate, rasterize
from mvcustom.models.mvcustom import feature_hw

Tensor = torch.Tensor


# ---------------------------------------------------------------------------- depth scale
def median_scale(depth: Tensor, reference: Tensor, mask: Tensor | None = None) -> float:
    """``s`` with ``median(reference / (s * depth)) = 1`` over ``mask`` and valid pixels."""
    valid = (depth > 0) & (reference > 0) & torch.isfinite(reference)
    if mask is not None:
        valid &= mask.bool()
    if int(valid.sum()) == 0:
        raise ValueError("median_scale: no pixel has both depths (check the mask / opacity threshold)")
    return float((reference[valid] / depth[valid]).median())


def search_depth_scale(
    depth: Tensor,
    camera: Cameras,
    mask: Tensor,
    ref_cameras: Cameras,
    ref_masks: Tensor,
    init: float = 1.0,
    search: float = 0.4,
    steps: int = 33,
) -> tuple[float, Tensor, Tensor]:
    """Grid search of the anchor depth's scale over ``init * (1 + [-search, search])``.

    The anchor's subject (``mask``) is lifted with each candidate scale and rendered into the
    reference views; the score is the mean IoU of the rendered silhouette with the references'
    masks (a wrong scale moves and resizes the subject in every view with a baseline).

    Args:
        depth: ``(H, W)`` anchor z-depth (any scale). camera: the anchor camera (one).
        mask: ``(H, W)`` bool, the subject in the anchor.
        ref_cameras: ``K`` reference cameras (same world frame) with masks ``ref_masks (K, h, w)``.
    Returns:
        ``(best_scale, scales (steps,), scores (steps,))``.
    """
    if not 0 <= search < 1:
        raise ValueError(f"search must be in [0, 1), got {search}")
    if ref_masks.shape[0] != len(ref_cameras):
        raise ValueError(f"{ref_masks.shape[0]} reference masks for {len(ref_cameras)} reference cameras")
    h, w = ref_masks.shape[-2:]
    cams = ref_cameras.resize(h, w)
    subject = torch.where(mask.bool(), depth, torch.zeros_like(depth))
    scales = init * (1 + torch.linspace(-search, search, steps, dtype=torch.float64))
    scores = torch.empty(steps, dtype=torch.float64)
    ref = ref_masks.bool().to(depth.device)
    for i, s in enumerate(scales.tolist()):
        cover = rasterize(depth_to_mesh(subject * s, camera), cams).mask
        inter = (cover & ref).flatten(1).sum(-1).double()
        union = (cover | ref).flatten(1).sum(-1).double().clamp_min(1)
        scores[i] = (inter / union).mean()
    best = int(scores.argmax())
    return float(scales[best]), scales, scores


# ---------------------------------------------------------------------------- the renderer
@dataclass
class RenderMap:
    """Where each pixel of each frame looks in the anchors, at one feature resolution.

    Attributes:
        source: ``(F, h, w)`` int64 index into the anchor list of the anchor seen there, ``-1``
            where no anchor covers the pixel (disocclusions, outside the anchors' frusta), and
            ``-1`` on the anchor frames themselves (they keep their own features).
        grid: ``(F, h, w, 2)`` the position seen, in ``grid_sample``'s normalised coordinates of
            the anchor's feature map.
    """

    source: Tensor
    grid: Tensor

    @property
    def covered(self) -> Tensor:
        return self.source >= 0


class FeatureRenderer:
    """Render anchor frames' features into the other frames of a clip (one camera path).

    Args:
        depths: ``(K, H, W)`` z-depth of the ``K`` anchor frames, in the cameras' world units.
        cameras: the clip's ``F`` cameras (``image_hw`` = the depth maps' size).
        anchors: the ``K`` anchor frame indices.
        max_grazing_deg: mesh tearing threshold (:func:`mvcustom.geometry.mesh.depth_to_mesh`).
    """

    def __init__(self, depths: Tensor, cameras: Cameras, anchors: list[int], max_grazing_deg: float = 86.0):
        if depths.ndim != 3 or depths.shape[0] != len(anchors):
            raise ValueError(
                f"depths must be (K, H, W) for {len(anchors)} anchors, got {tuple(depths.shape)}"
            )
        if not all(0 <= a < len(cameras) for a in anchors) or len(set(anchors)) != len(anchors):
            raise ValueError(f"anchors {anchors} must be distinct frame indices below {len(cameras)}")
        H, W = depths.shape[-2:]
        if tuple(cameras.image_hw[0].tolist()) != (H, W):
            raise ValueError(f"cameras are {cameras.image_hw[0].tolist()} pixels but depths are {[H, W]}")
        self.cameras = cameras.to(device=depths.device)
        self.anchors = list(anchors)
        self.image_hw = (H, W)
        meshes = [
            depth_to_mesh(d, self.cameras[a], max_grazing_deg) for d, a in zip(depths, anchors, strict=True)
        ]
        self.mesh = Mesh.cat(meshes)
        # per vertex: its anchor and its (normalised-later) pixel position in that anchor
        grid = self.cameras.pixel_grid(1).reshape(-1, 2)
        self._vertex_uv = torch.cat([grid] * len(anchors))  # (K*H*W, 2) image pixels
        self._vertex_anchor = torch.arange(len(anchors), device=depths.device).repeat_interleave(H * W)
        self._maps: dict[tuple[int, int], RenderMap] = {}

    def render_map(self, h: int, w: int) -> RenderMap:
        """The :class:`RenderMap` at feature resolution ``(h, w)`` (rasterised once, cached)."""
        key = (h, w)
        if key not in self._maps:
            H, W = self.image_hw
            frags = rasterize(self.mesh, self.cameras.resize(h, w))
            uv = interpolate(frags, self.mesh.faces, self._vertex_uv)  # (F, 2, h, w) anchor pixels
            # the anchor of a pixel is the anchor of its face (all three vertices share it)
            face = frags.face.clamp_min(0)
            source = self._vertex_anchor[self.mesh.faces[face, 0]]
            source = torch.where(frags.mask, source, torch.full_like(source, -1))
            source[self.anchors] = -1
            # image pixels -> grid_sample's [-1, 1] of an (h, w) map (align_corners=False)
            scale = torch.tensor([2.0 / W, 2.0 / H], dtype=uv.dtype, device=uv.device)
            g = uv.permute(0, 2, 3, 1) * scale - 1
            self._maps[key] = RenderMap(source, g)
        return self._maps[key]

    def coverage(self, h: int, w: int) -> Tensor:
        """``(F, h, w)`` bool: pixels that take rendered features, plus the anchor frames whole
        (they are the source: nothing there is disoccluded)."""
        m = self.render_map(h, w).covered.clone()
        m[self.anchors] = True
        return m

    def covered_fraction(self, h: int, w: int) -> float:
        """Share of the non-anchor frames' pixels that the anchors cover."""
        others = [f for f in range(len(self.cameras)) if f not in self.anchors]
        if not others:
            return 1.0
        return float(self.render_map(h, w).covered[others].float().mean())

    def render(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Features of every frame seen through the anchors.

        Args:
            features: ``(B, F, C, h, w)`` a batch of clips on this camera path.
        Returns:
            ``rendered (B, F, C, h, w)`` (zero where not covered) and ``covered (F, h, w)``.
        """
        B, Fr, C, h, w = features.shape
        rmap = self.render_map(h, w)
        out = torch.zeros_like(features)
        grid = rmap.grid.to(features.dtype)
        for k, a in enumerate(self.anchors):
            sel = rmap.source == k  # (F, h, w)
            frames = sel.flatten(1).any(-1).nonzero(as_tuple=True)[0]
            if len(frames) == 0:
                continue
            src = features[:, a].unsqueeze(1).expand(B, len(frames), C, h, w).reshape(-1, C, h, w)
            g = grid[frames].unsqueeze(0).expand(B, -1, -1, -1, -1).reshape(-1, h, w, 2)
            sampled = F.grid_sample(src, g, mode="bilinear", padding_mode="border", align_corners=False)
            sampled = sampled.reshape(B, len(frames), C, h, w)
            keep = sel[frames].unsqueeze(0).unsqueeze(2)
            out[:, frames] = torch.where(keep, sampled, out[:, frames])
        return out, rmap.covered

    def replace(self, features: Tensor) -> Tensor:
        """``M * rendered + (1 - M) * features`` (the paper's F̂_n), ``(B, F, C, h, w)``."""
        rendered, covered = self.render(features)
        return torch.where(covered.unsqueeze(0).unsqueeze(2), rendered, features)


class FeatureRenderingHook:
    """Forward hook on a spatial ``BasicTransformerBlock``: while ``active``, replace the covered
    features of its output (tokens ``(B*F, h*w, C)``) with the anchors' rendered ones."""

    def __init__(self, renderer: FeatureRenderer, num_frames: int, latent_hw: tuple[int, int]):
        self.renderer, self.num_frames, self.latent_hw = renderer, num_frames, latent_hw
        self.active = False

    def __call__(self, module, inputs, output):
        if not self.active:
            return None
        BF, tokens, C = output.shape
        h, w = feature_hw(self.latent_hw, tokens)
        x = output.reshape(BF // self.num_frames, self.num_frames, h, w, C).permute(0, 1, 4, 2, 3)
        x = self.renderer.replace(x)
        return x.permute(0, 1, 3, 4, 2).reshape(BF, tokens, C)
