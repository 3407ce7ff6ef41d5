"""The one camera type of the project.

Conventions (DESIGN.md §4), stated once here and relied on everywhere:

* **Extrinsics** are *world-to-camera* 4x4 matrices ``w2c = [[R, t], [0, 1]]`` acting on column
  vectors: ``X_cam = R @ X_world + t``.
* **Axes** are OpenCV's: camera +x right, +y down, +z forward (looking direction).
* **Intrinsics** ``K`` are in pixels of the image whose size is stored alongside (``image_hw``).
* **Pixel coordinates** put the image's top-left *corner* at (0, 0), so the centre of the pixel in
  column ``i``, row ``j`` is ``(i + 0.5, j + 0.5)`` and the image spans ``[0, W] x [0, H]``. This is
  COLMAP's convention and the one PyTorch3D's ``opencv_from_cameras_projection`` produces; it
  makes resizing exact (``K' = diag(sx, sy, 1) @ K``).
* **Depth** means z-depth (distance along the optical axis), not ray length.

Tensors are batched: ``N`` cameras, ``w2c (N, 4, 4)``, ``K (N, 3, 3)``, ``image_hw (N, 2)``
integers ``(height, width)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mvcustom.geometry.crop import center_crop_box

Tensor = torch.Tensor


def _as_batch(x: Tensor, shape_tail: tuple[int, ...], name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.shape == shape_tail:
        x = x.unsqueeze(0)
    if x.ndim != len(shape_tail) + 1 or tuple(x.shape[1:]) != shape_tail:
        raise ValueError(
            f"{name} must have shape (N, {', '.join(map(str, shape_tail))}), got {tuple(x.shape)}"
        )
    return x


@dataclass(frozen=True)
class Cameras:
    """A batch of OpenCV pinhole cameras (world-to-camera, K in pixels, corner-origin pixels).

    Attributes:
        w2c: ``(N, 4, 4)`` world-to-camera transforms, OpenCV axes.
        K: ``(N, 3, 3)`` intrinsics in pixels of an image of size ``image_hw``.
        image_hw: ``(N, 2)`` int64 ``(height, width)`` in pixels.
    """

    w2c: Tensor
    K: Tensor
    image_hw: Tensor

    def __post_init__(self) -> None:
        w2c = _as_batch(self.w2c, (4, 4), "w2c")
        K = _as_batch(self.K, (3, 3), "K").to(w2c.dtype)
        hw = torch.as_tensor(self.image_hw, dtype=torch.int64, device=w2c.device)
        if hw.shape == (2,):
            hw = hw.expand(w2c.shape[0], 2).clone()
        if hw.shape != (w2c.shape[0], 2):
            raise ValueError(f"image_hw must have shape (N, 2) or (2,), got {tuple(hw.shape)}")
        if K.shape[0] != w2c.shape[0]:
            raise ValueError(f"w2c has {w2c.shape[0]} cameras but K has {K.shape[0]}")
        if (hw <= 0).any():
            raise ValueError(f"image_hw must be positive, got {hw.tolist()}")
        object.__setattr__(self, "w2c", w2c)
        object.__setattr__(self, "K", K.to(w2c.device))
        object.__setattr__(self, "image_hw", hw)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_Rt(cls, R: Tensor, t: Tensor, K: Tensor, image_hw) -> Cameras:
        """Build from world-to-camera rotation ``R (N,3,3)`` and translation ``t (N,3)``."""
        R = _as_batch(R, (3, 3), "R")
        t = _as_batch(t, (3,), "t").to(R.dtype)
        w2c = torch.zeros(R.shape[0], 4, 4, dtype=R.dtype, device=R.device)
        w2c[:, :3, :3] = R
        w2c[:, :3, 3] = t
        w2c[:, 3, 3] = 1
        return cls(w2c, K, image_hw)

    @classmethod
    def from_c2w(cls, c2w: Tensor, K: Tensor, image_hw) -> Cameras:
        """Build from camera-to-world transforms (OpenCV axes)."""
        return cls(rigid_inverse(_as_batch(c2w, (4, 4), "c2w")), K, image_hw)

    # ------------------------------------------------------------------ basic access
    def __len__(self) -> int:
        return self.w2c.shape[0]

    def __getitem__(self, idx) -> Cameras:
        if isinstance(idx, int):  # one camera, still a Cameras of length 1
            n = len(self)
            if not -n <= idx < n:
                raise IndexError(f"camera index {idx} out of range for {n} cameras")
            idx = idx % n
            idx = slice(idx, idx + 1)
        return Cameras(self.w2c[idx], self.K[idx], self.image_hw[idx])

    @staticmethod
    def cat(cams: list[Cameras]) -> Cameras:
        return Cameras(
            torch.cat([c.w2c for c in cams]),
            torch.cat([c.K for c in cams]),
            torch.cat([c.image_hw for c in cams]),
        )

    def to(self, device=None, dtype=None) -> Cameras:
        return Cameras(
            self.w2c.to(device=device, dtype=dtype),
            self.K.to(device=device, dtype=dtype),
            self.image_hw.to(device=device),
        )

    @property
    def R(self) -> Tensor:
        """``(N, 3, 3)`` world-to-camera rotation."""
        return self.w2c[:, :3, :3]

    @property
    def t(self) -> Tensor:
        """``(N, 3)`` world-to-camera translation."""
        return self.w2c[:, :3, 3]

    @property
    def c2w(self) -> Tensor:
        """``(N, 4, 4)`` camera-to-world transforms."""
        return rigid_inverse(self.w2c)

    @property
    def centers(self) -> Tensor:
        """``(N, 3)`` camera centres in world coordinates (``-R^T t``)."""
        return -(self.R.transpose(1, 2) @ self.t.unsqueeze(-1)).squeeze(-1)

    @property
    def height(self) -> Tensor:
        return self.image_hw[:, 0]

    @property
    def width(self) -> Tensor:
        return self.image_hw[:, 1]

    # ------------------------------------------------------------------ projection
    def world_to_camera(self, points: Tensor) -> Tensor:
        """``points (N, P, 3)`` or ``(P, 3)`` world -> ``(N, P, 3)`` camera coordinates."""
        points = points.to(self.w2c.dtype)
        if points.ndim == 2:
            points = points.unsqueeze(0).expand(len(self), -1, -1)
        return points @ self.R.transpose(1, 2) + self.t.unsqueeze(1)

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Project world points to pixels.

        Args:
            points: ``(N, P, 3)`` or ``(P, 3)`` world points.
        Returns:
            ``uv (N, P, 2)`` corner-origin pixel coordinates and ``depth (N, P)`` z-depth. Points
            behind the camera get a negative depth; their ``uv`` is meaningless.
        """
        cam = self.world_to_camera(points)
        z = cam[..., 2]
        pix = cam @ self.K.transpose(1, 2)
        uv = pix[..., :2] / pix[..., 2:3]
        return uv, z

    def unproject(self, uv: Tensor, depth: Tensor) -> Tensor:
        """Lift pixels with z-depth to world points.

        Args:
            uv: ``(N, P, 2)`` corner-origin pixel coordinates.
            depth: ``(N, P)`` z-depth.
        Returns:
            ``(N, P, 3)`` world points.
        """
        uv = uv.to(self.w2c.dtype)
        ones = torch.ones_like(uv[..., :1])
        rays_cam = torch.cat([uv, ones], -1) @ torch.linalg.inv(self.K).transpose(1, 2)
        cam = rays_cam * depth.to(self.w2c.dtype).unsqueeze(-1)
        return (cam - self.t.unsqueeze(1)) @ self.R  # R^T (x - t), row-vector form

    def pixel_grid(self, stride: int = 1) -> Tensor:
        """``(H', W', 2)`` pixel-centre coordinates of a ``stride``-subsampled grid.

        All cameras must share one image size. With ``stride > 1`` the centres are those of the
        ``stride x stride`` cells, so the grid matches an image downsampled by ``stride``.
        """
        hw = self.image_hw[0]
        if not (self.image_hw == hw).all():
            raise ValueError("pixel_grid needs all cameras to share one image size")
        H, W = int(hw[0]), int(hw[1])
        if H % stride or W % stride:
            raise ValueError(f"stride {stride} does not divide image size {H}x{W}")
        ys = (torch.arange(H // stride, dtype=self.w2c.dtype, device=self.w2c.device) + 0.5) * stride
        xs = (torch.arange(W // stride, dtype=self.w2c.dtype, device=self.w2c.device) + 0.5) * stride
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx, gy], -1)

    def rays(self, uv: Tensor) -> tuple[Tensor, Tensor]:
        """World-space rays through pixels.

        Args:
            uv: ``(N, P, 2)`` or ``(P, 2)`` pixel coordinates.
        Returns:
            ``origins (N, P, 3)`` (camera centres) and ``directions (N, P, 3)``, unit length.
        """
        uv = uv.to(self.w2c.dtype)
        if uv.ndim == 2:
            uv = uv.unsqueeze(0).expand(len(self), -1, -1)
        ones = torch.ones_like(uv[..., :1])
        d_cam = torch.cat([uv, ones], -1) @ torch.linalg.inv(self.K).transpose(1, 2)
        d_world = d_cam @ self.R  # (R^T d)^T = d^T R
        d_world = d_world / d_world.norm(dim=-1, keepdim=True)
        origins = self.centers.unsqueeze(1).expand_as(d_world)
        return origins, d_world

    # ------------------------------------------------------------------ image edits
    def crop(self, x0, y0, width, height) -> Cameras:
        """Cameras of the crop ``[x0, x0+width) x [y0, y0+height)`` (pixels, may be per camera)."""
        K = self.K.clone()
        dev, dt = K.device, K.dtype
        K[:, 0, 2] -= torch.as_tensor(x0, dtype=dt, device=dev)
        K[:, 1, 2] -= torch.as_tensor(y0, dtype=dt, device=dev)
        hw = torch.stack(
            [
                torch.as_tensor(height, dtype=torch.int64, device=dev).expand(len(self)),
                torch.as_tensor(width, dtype=torch.int64, device=dev).expand(len(self)),
            ],
            -1,
        )
        return Cameras(self.w2c, K, hw)

    def resize(self, height: int, width: int) -> Cameras:
        """Cameras of the images resized (whole image, any aspect change) to ``height x width``."""
        K = self.K.clone()
        sx = width / self.width.to(K.dtype)
        sy = height / self.height.to(K.dtype)
        K[:, 0, :] *= sx.unsqueeze(-1)
        K[:, 1, :] *= sy.unsqueeze(-1)
        return Cameras(self.w2c, K, torch.tensor([height, width]).expand(len(self), 2))

    def center_crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The largest centred crop of the (shared) image with aspect ``width/height``.

        Returns ``(x0, y0, crop_w, crop_h)`` in integer pixels, so image and K stay in step.
        """
        H, W = int(self.image_hw[0, 0]), int(self.image_hw[0, 1])
        return center_crop_box(H, W, height, width)

    def crop_resize(self, height: int, width: int) -> Cameras:
        """Centre-crop to the target aspect, then resize: what preprocessing does to frames."""
        x0, y0, cw, ch = self.center_crop_box(height, width)
        return self.crop(x0, y0, cw, ch).resize(height, width)

    # ------------------------------------------------------------------ frames of reference
    def transform_world(self, T_new_from_old: Tensor, scale: float | Tensor = 1.0) -> Cameras:
        """Re-express cameras in a new world frame ``X_new = s * (R X_old + t)``.

        ``T_new_from_old`` is a rigid 4x4 (R, t) and ``scale`` s the similarity scale applied
        after it. Image content is unchanged, so pixel projections of re-expressed points are
        unchanged; depths scale by ``s``.
        """
        T = torch.as_tensor(T_new_from_old, dtype=self.w2c.dtype, device=self.w2c.device)
        s = torch.as_tensor(scale, dtype=self.w2c.dtype, device=self.w2c.device)
        w2c = self.w2c @ rigid_inverse(T.unsqueeze(0)).expand(len(self), 4, 4)
        w2c = w2c.clone()
        w2c[:, :3, 3] = w2c[:, :3, 3] * s
        return Cameras(w2c, self.K, self.image_hw)

    def relative_to(self, index: int = 0) -> Cameras:
        """Express all cameras in the frame of camera ``index`` (which becomes the identity)."""
        ref_c2w = self.c2w[index]
        return Cameras(self.w2c @ ref_c2w.unsqueeze(0), self.K, self.image_hw)


def rigid_inverse(T: Tensor) -> Tensor:
    """Inverse of rigid transforms ``(..., 4, 4)`` without a general matrix inverse."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1
    return out


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """World-to-camera matrices (OpenCV axes) for cameras at ``eye`` looking at ``target``.

    Args:
        eye, target: ``(N, 3)`` world points.
        up: ``(3,)`` or ``(N, 3)`` world up direction; image "up" (camera -y) follows it.
    Returns:
        ``(N, 4, 4)`` world-to-camera.
    """
    eye = torch.as_tensor(eye)
    target = torch.as_tensor(target, dtype=eye.dtype)
    up = torch.as_tensor(up, dtype=eye.dtype).expand_as(eye)
    z = target - eye
    z = z / z.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(z, up)  # camera +x (right) = forward x up
    n = x.norm(dim=-1, keepdim=True)
    if (n < 1e-8).any():
        raise ValueError("look_at: viewing direction is parallel to the up vector")
    x = x / n
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z], dim=-2)  # rows: camera axes in world coordinates
    w2c = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype)
    w2c[:, :3, :3] = R
    w2c[:, :3, 3] = -(R @ eye.unsqueeze(-1)).squeeze(-1)
    w2c[:, 3, 3] = 1
    return w2c


def intrinsics_matrix(fx, fy, cx, cy, dtype=torch.float64) -> Tensor:
    """``(N, 3, 3)`` pixel intrinsics from per-camera (or scalar) focal lengths and principal points."""
    fx, fy, cx, cy = (torch.as_tensor(v, dtype=dtype).reshape(-1) for v in (fx, fy, cx, cy))
    n = max(v.numel() for v in (fx, fy, cx, cy))
    K = torch.zeros(n, 3, 3, dtype=dtype)
    K[:, 0, 0] = fx.expand(n)
    K[:, 1, 1] = fy.expand(n)
    K[:, 0, 2] = cx.expand(n)
    K[:, 1, 2] = cy.expand(n)
    K[:, 2, 2] = 1
    return K


def look_at_point(cams: Cameras) -> torch.Tensor:
    """Least-squares intersection of the cameras' optical axes (world coordinates)."""
    C = cams.centers.to(torch.float64)
    d = cams.R[:, 2, :].to(torch.float64)  # optical axis (camera +z) in world coordinates
    P = torch.eye(3, dtype=torch.float64) - d.unsqueeze(-1) * d.unsqueeze(-2)
    A = P.sum(0)
    b = (P @ C.unsqueeze(-1)).sum(0).squeeze(-1)
    if torch.linalg.cond(A) > 1e6:
        raise ValueError(
            "camera optical axes are (nearly) parallel; no look-at point to normalise the scene by"
        )
    return torch.linalg.solve(A, b)
