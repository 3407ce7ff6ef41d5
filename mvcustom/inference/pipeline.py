"""``MVCustomPipeline``: prompt + subject references + a camera path -> a multi-view video.

The sampler is DDIM (50 steps by default) with classifier-free guidance, around
:class:`mvcustom.models.MVCustomModel`; on top of plain sampling it runs the paper's two inference
strategies (§3.4; DESIGN.md §1):

1. **Anchor pass** (how the anchor gets a depth before the clip exists; the paper does not say,
   PAPER.md §5): the anchor frames alone are sampled first as a ``K``-frame clip from the *same*
   initial noise they have in the full clip; their latent at every step is kept. ZoeDepth on the
   decoded anchors gives their depth; its scale is aligned to the FeatureNeRF's rendered depth
   (:func:`median_scale`, then :func:`search_depth_scale` against the reference masks).
2. **Main pass**: the full clip, with the anchor frames' latents replayed from the anchor pass at
   every step (so the anchor's features match the depth), **depth-aware feature rendering** in
   the chosen blocks for the first ``feature_rendering_steps`` steps and **consistency-aware
   latent completion** of the disoccluded latents for the first ``completion_until_step``.

The anchor pass costs ``K / F`` of a clip in FLOPs (one frame of 16: ~6%), more in time where a
small batch uses the hardware badly (16% on our 2-core CPU); ``anchor_steps`` cuts it further.
Rendering is one ``grid_sample`` per chosen block and step (the mesh is rasterised once per
resolution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from mvcustom.geometry.camera import Cameras
from mvcustom.inference.feature_rendering import (
    FeatureRenderer,
    FeatureRenderingHook,
    median_scale,
    search_depth_scale,
)
from mvcustom.inference.latent_completion import complete_latents
from mvcustom.inference.sampler import ddim_sample
from mvcustom.models.mvcustom import ClipCameras, MVCustomModel, References, spatial_transformer_blocks
from mvcustom.models.schedule import build_scheduler, check_same_schedule

Tensor = torch.Tensor

#: Spatial transformer blocks whose outputs take rendered features by default: the decoder's
#: (SD 1.5 indices 7-15; the paper's "designated U-Net layers" are NF). The decoder decides the
#: layout of the output, and its three resolutions carry both coarse and fine geometry.
DEFAULT_RENDERING_BLOCKS = (7, 8, 9, 10, 11, 12, 13, 14, 15)


@dataclass
class ReferenceViews:
    """The subject's reference photos with their cameras (same world frame as the target path).

    Attributes:
        images: ``(K, H, W, 3)`` uint8 RGB (``H, W`` = the generated size).
        cameras: ``K`` cameras of those images.
        masks: optional ``(K, H, W)`` bool foreground masks (used by the depth-scale search).
    """

    images: np.ndarray
    cameras: Cameras
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"reference images must be uint8 (K, H, W, 3), got {self.images.dtype} {self.images.shape}"
            )
        if len(self.cameras) != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} reference images but {len(self.cameras)} cameras")
        if self.masks is not None and self.masks.shape != self.images.shape[:3]:
            raise ValueError(
                f"reference masks must be (K, H, W) = {self.images.shape[:3]}, got {self.masks.shape}"
            )


@dataclass
class InferenceOptions:
    """What runs on top of plain DDIM (defaults: the paper's, where it gives them).

    Attributes:
        feature_rendering: depth-aware feature rendering on/off.
        feature_rendering_steps: replace features during the first steps (35 of 50 in the paper).
        completion_until_step: latent completion during the first steps (tau; NF -> ours 10).
        anchors: anchor frame indices (one in the paper; several fused by z-buffer is ours).
        anchor_steps: DDIM steps of the anchor pass (``None``: as many as the main pass). With
            fewer, the main pass replays the anchors by the forward process instead of their
            trajectory: at each step the anchors are their final clean latent re-noised to that
            step with their own initial noise (the same at step 0), and the final frames are
            exactly the anchor pass's. The anchor pass then costs ``anchor_steps / steps`` of
            what it costs otherwise (ours; the paper does not say how the anchor is made).
        rendering_blocks: spatial transformer blocks whose outputs are replaced.
        depth_scale: ``"auto"`` (FeatureNeRF median + search), or a fixed factor.
        depth_scale_search: relative range of the grid search (0.4 = ±40%).
        opacity_threshold: FeatureNeRF opacity that marks the subject (depth alignment).
        radius: STT radius at inference (-1 = whole feature map, where training ends).
        max_grazing_deg: mesh tearing threshold.
    """

    feature_rendering: bool = True
    feature_rendering_steps: int = 35
    completion_until_step: int = 10
    anchors: tuple[int, ...] = (0,)
    anchor_steps: int | None = None
    rendering_blocks: tuple[int, ...] = DEFAULT_RENDERING_BLOCKS
    depth_scale: str | float = "auto"
    depth_scale_search: float = 0.4
    opacity_threshold: float = 0.5
    radius: int = -1
    max_grazing_deg: float = 86.0


@dataclass
class MVCustomOutput:
    """``frames``: PIL images per clip, ``(B, F, H, W, 3)`` uint8 array, ``(B, F, 3, H, W)``
    tensor in ``[-1, 1]`` or, for ``output_type="latent"``, the final latents ``(B, F, C, h, w)``
    (VAE-scaled, not decoded), by ``output_type``. ``debug``: per clip, what the strategies saw
    (anchor depth, coverage masks, covered fraction, depth scale and how it was found)."""

    frames: object
    debug: list[dict] = field(default_factory=list)


class MVCustomPipeline(DiffusionPipeline):
    """See the module docstring. ``depth_estimator``: ``frames (N, H, W, 3) uint8 -> (N, H, W)``
    depth (a :class:`mvcustom.models.zoedepth.DepthEstimator`; any callable, e.g. ground truth).
    ``scheduler``: ``None`` (the default) samples on the model's own schedule, the one training
    drew its noise from (:func:`mvcustom.models.schedule.build_scheduler`); a scheduler passed in
    must have the same noise levels and prediction type, or it is refused.

    Its ``components`` are the model's parts (``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
    ``mvcustom``: the :class:`~mvcustom.models.mvcustom.MVCustomAdditions`, ``scheduler``), so
    diffusers' ``enable_model_cpu_offload()`` works as for ``AnimateDiffPipeline``: the text
    encoder, the UNet and the VAE take turns on the GPU; MVCustom's additions (the camera encoder
    and the FeatureNeRF blocks, small, called from inside the UNet) stay on it.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _exclude_from_cpu_offload = ["mvcustom"]

    def __init__(self, model: MVCustomModel, scheduler=None, depth_estimator: Callable | None = None):
        super().__init__()
        if scheduler is None:
            scheduler = build_scheduler(model.scheduler_config)
        else:
            check_same_schedule(scheduler, model.scheduler_config)
        model.eval()  # FeatureNeRF samples its rays stratified (randomly) in training mode
        self.register_modules(model=model, scheduler=scheduler)
        self.depth_estimator = depth_estimator

    @property
    def components(self) -> dict:
        m = self.model
        return {
            "vae": m.vae,
            "text_encoder": m.text_encoder,
            "tokenizer": m.tokenizer,
            "unet": m.unet,
            "mvcustom": m._additions,
            "scheduler": self.scheduler,
        }

    @classmethod
    def from_pretrained(cls, path: str, depth_model: str | None = None, dtype=None, device=None, **kwargs):
        """A trained model folder (``MVCustomModel.save_pretrained``); ``depth_model``: a ZoeDepth
        ``from_pretrained`` path or hub id (needed for feature rendering)."""
        model = MVCustomModel.from_pretrained(path, dtype=dtype, **kwargs)
        depth = None
        if depth_model is not None:
            from mvcustom.models.zoedepth import DepthEstimator

            depth = DepthEstimator(depth_model, device=device)
        pipe = cls(model, depth_estimator=depth)
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)

    # ---------------------------------------------------------------------------- pieces
    def _text(self, prompt: str, negative: str, guidance: float) -> Tensor:
        prompts = [negative, prompt] if guidance > 1 else [prompt]
        return self.model.encode_prompt(prompts)

    def _clip_cameras(self, cams: Cameras, batch: int) -> ClipCameras:
        dev, dt = self.model.device, torch.float32
        w2c = cams.w2c.to(dev, dt).unsqueeze(0).expand(batch, -1, -1, -1)
        K = cams.K.to(dev, dt).unsqueeze(0).expand(batch, -1, -1, -1)
        return ClipCameras(w2c, K, tuple(cams.image_hw[0].tolist()))

    def _references(self, refs: ReferenceViews | None, text: Tensor, radius: int) -> References | None:
        if refs is None or len(self.model.pose_blocks) == 0:
            return None
        x = torch.from_numpy(refs.images).to(self.model.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        vae = self.model.vae  # the posterior's mode: references are conditioning, not samples
        latents = vae.encode(x.to(self.model.dtype)).latent_dist.mode() * self.model.latent_scaling
        latents = latents.float().unsqueeze(0)  # (1, K, C, h, w)
        batch = text.shape[0]
        latents = latents.expand(batch, -1, -1, -1, -1)
        cams = self._clip_cameras(refs.cameras, batch)
        partial = References(latents, cams)
        return References(latents, cams, self.model.reference_features(partial, text, radius))

    def _denoiser(self, text: Tensor, cams: Cameras, refs: References | None, guidance: float, radius: int):
        batch = text.shape[0]
        clip = self._clip_cameras(cams, batch)
        last: dict = {}

        def denoise(latents: Tensor, t: Tensor) -> Tensor:
            x = latents.expand(batch, -1, -1, -1, -1) if batch > 1 else latents
            out = self.model(x, t.expand(batch), text, clip, refs, radius)
            last["renders"] = out.renders
            pred = out.sample.float()
            if batch > 1:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance * (cond - uncond)
            return pred

        return denoise, last

    def _sample(self, denoise, noise: Tensor, steps: int, generator, on_step=None):
        """DDIM from ``noise`` (:func:`mvcustom.inference.sampler.ddim_sample`)."""
        return ddim_sample(
            denoise,
            self.scheduler,
            tuple(noise.shape),
            steps,
            generator=generator,
            device=noise.device,
            dtype=self.model.dtype,
            step_hook=on_step,
            noise=noise,
            progress=self.progress_bar,
        )

    def _anchor_depth(self, images: np.ndarray, renders: dict, refs: ReferenceViews | None, cams, opts):
        """ZoeDepth of the anchors (``images``, one per camera of ``cams``: the anchor frames'
        cameras, in the order of ``options.anchors``), scaled into the cameras' world units;
        returns the depth and how the scale was found. The scale is aligned on the first anchor."""
        if self.depth_estimator is None:
            raise ValueError(
                "feature rendering needs a depth estimator: pass depth_model= to from_pretrained "
                "(a ZoeDepth folder or hub id) or depth_estimator= to the pipeline, or turn it off"
            )
        depth = torch.from_numpy(np.asarray(self.depth_estimator(images), dtype=np.float64))
        info: dict = {"depth_scale_source": "fixed", "depth_scale": 1.0}
        if opts.depth_scale != "auto":
            s = float(opts.depth_scale)
            info["depth_scale"] = s
            return depth * s, info
        if not renders:
            info["depth_scale_source"] = "none: no FeatureNeRF render (no references or no pose blocks)"
            return depth, info
        H, W = images.shape[1:3]
        finest = max(renders.values(), key=lambda r: r.depth.shape[-1])
        nerf_depth = F.interpolate(finest.depth[-1:].float(), (H, W), mode="nearest")[0].double().cpu()
        opacity = F.interpolate(finest.opacity[-1:].float(), (H, W), mode="nearest")[0].cpu()
        subject = opacity > opts.opacity_threshold
        if int(subject.sum()) == 0:
            info["depth_scale_source"] = (
                f"none: FeatureNeRF opacity never exceeds {opts.opacity_threshold} (untrained model?)"
            )
            return depth, info
        scale = median_scale(depth, nerf_depth, subject)
        info.update(depth_scale_source="featurenerf median", depth_scale=scale, median_scale=scale)
        if refs is not None and refs.masks is not None and opts.depth_scale_search > 0:
            s, _, scores = search_depth_scale(
                depth[0],
                cams[0],  # the first anchor's camera (cams holds the anchors' cameras only)
                subject[0],
                refs.cameras,
                torch.from_numpy(refs.masks),
                init=scale,
                search=opts.depth_scale_search,
            )
            info.update(
                depth_scale_source="featurenerf median + mask search",
                depth_scale=s,
                search_best_iou=float(scores.max()),
            )
            scale = s
        return depth * scale, info

    # ---------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        cameras: Cameras,
        references: ReferenceViews | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        generator: torch.Generator | None = None,
        options: InferenceOptions | None = None,
        output_type: str = "pil",
        return_debug: bool = False,
    ) -> MVCustomOutput:
        """Generate one clip per prompt along the camera path ``cameras`` (``F`` cameras; the
        frames' size is their ``image_hw``, one every UNet level tiles evenly, e.g. 256x384)."""
        opts = options or InferenceOptions()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        H, W = (int(v) for v in cameras.image_hw[0].tolist())
        # every UNet feature map (SD's stride-2 convolutions round up) must tile the image with
        # square cells, or the FeatureNeRF's rays and the rendered maps would not line up
        h, w = H // self.model.vae_scale, W // self.model.vae_scale
        for _ in range(len(self.model.unet.config.block_out_channels)):
            if H % h or W % w or H // h != W // w:
                raise ValueError(
                    f"image size {H}x{W}: a {h}x{w} UNet feature map does not tile it evenly; use sides "
                    f"that are multiples of {self.model.vae_scale * 2 ** (len(self.model.unet.config.block_out_channels) - 1)} (e.g. 256x384)"
                )
            h, w = -(-h // 2), -(-w // 2)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        if opts.feature_rendering and not all(0 <= a < len(cameras) for a in opts.anchors):
            raise ValueError(f"anchors {list(opts.anchors)} must be frame indices below {len(cameras)}")
        if opts.anchor_steps is not None and not 1 <= opts.anchor_steps <= num_inference_steps:
            raise ValueError(
                f"anchor_steps={opts.anchor_steps} must be within 1..num_inference_steps ({num_inference_steps})"
            )
        clips, debug = [], []
        for p in prompts:
            latents, info = self._generate(
                p, cameras, references, num_inference_steps, guidance_scale, negative_prompt, generator, opts
            )
            if output_type == "latent":
                clips.append(latents.float().cpu())
            else:
                clips.append(
                    self.model.decode_latents(latents.to(self.model.dtype)).float().clamp(-1, 1).cpu()
                )
            debug.append(info)
        frames = torch.cat(clips)
        if output_type in ("pt", "latent"):
            out = frames
        else:
            arr = ((frames + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
            if output_type == "np":
                out = arr
            else:
                from PIL import Image

                out = [[Image.fromarray(f) for f in clip] for clip in arr]
        return MVCustomOutput(out, debug if return_debug else [])

    def _generate(
        self, prompt, cameras, refs, steps, guidance, negative, generator, opts
    ) -> tuple[Tensor, dict]:
        model = self.model
        text = self._text(prompt, negative, guidance)
        references = self._references(refs, text, opts.radius)
        Fr = len(cameras)
        H, W = (int(v) for v in cameras.image_hw[0].tolist())
        h, w = H // model.vae_scale, W // model.vae_scale
        C = model.unet.config.in_channels
        noise = torch.randn((1, Fr, C, h, w), generator=generator, device=model.device, dtype=torch.float32)
        info: dict = {}
        if not opts.feature_rendering:
            denoise, _ = self._denoiser(text, cameras, references, guidance, opts.radius)
            return self._sample(denoise, noise, steps, generator), info

        # 1. the anchor pass: the anchors alone, from their noise in the full clip
        anchors = list(opts.anchors)
        trace: list[Tensor] = []

        def keep(i, t_next, latents, x0):
            trace.append(latents.clone())
            return latents

        anchor_steps = opts.anchor_steps or steps
        exact = anchor_steps == steps
        denoise_a, last_a = self._denoiser(text, cameras[anchors], references, guidance, opts.radius)
        anchor_latents = self._sample(
            denoise_a, noise[:, anchors], anchor_steps, generator, keep if exact else None
        )
        images = model.decode_latents(anchor_latents.to(model.dtype)).float().clamp(-1, 1)
        images = ((images[0] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        depth, info = self._anchor_depth(images, last_a.get("renders", {}), refs, cameras[anchors], opts)

        # 2. the main pass with feature rendering, anchor replay and latent completion
        renderer = FeatureRenderer(
            depth.to(model.device), cameras.to(device=model.device), anchors, opts.max_grazing_deg
        )
        blocks = spatial_transformer_blocks(model.unet)
        bad = [b for b in opts.rendering_blocks if not 0 <= b < len(blocks)]
        if bad:
            raise ValueError(
                f"rendering_blocks {bad} out of range: this UNet has {len(blocks)} transformer blocks"
            )
        hook = FeatureRenderingHook(renderer, Fr, (h, w))
        handles = [blocks[b].register_forward_hook(hook) for b in opts.rendering_blocks]
        covered = renderer.coverage(h, w)
        denoise_m, _ = self._denoiser(text, cameras, references, guidance, opts.radius)
        step = {"i": 0}

        def denoise(latents, t):
            hook.active = step["i"] < opts.feature_rendering_steps
            return denoise_m(latents, t)

        def on_step(i, t_next, latents, x0):
            step["i"] = i + 1
            if t_next is not None and i + 1 <= opts.completion_until_step:
                latents = complete_latents(latents, x0, covered, self.scheduler, t_next, generator)
            # replay: the anchors stay the frames the depth is of (their own trajectory, or their
            # clean latent put back to this step's noise level with their own initial noise)
            if exact:
                latents[:, anchors] = trace[i]
            elif t_next is None:
                latents[:, anchors] = anchor_latents
            else:
                latents[:, anchors] = self.scheduler.add_noise(anchor_latents, noise[:, anchors], t_next)
            return latents

        try:
            latents = self._sample(denoise, noise, steps, generator, on_step)
        finally:
            for handle in handles:
                handle.remove()
            hook.active = False
        info.update(
            anchors=anchors,
            anchor_images=images,
            anchor_depth=depth.float().numpy(),
            coverage=covered.cpu().numpy(),
            covered_fraction=renderer.covered_fraction(h, w),
        )
        return latents, info
