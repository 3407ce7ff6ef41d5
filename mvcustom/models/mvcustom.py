"""The MVCustom model: the AnimateDiff backbone plus everything MVCustom adds to it.

What is added, and where (DESIGN.md §1):

* **STT**: every motion-module self-attention gets :class:`SpatioTemporalAttnProcessor`; a
  forward pre-hook on each motion module hands it the feature-map size and the radius in force.
* **Camera encoder** (our addition; ``camera_encoder=False`` is the paper's configuration):
  Plücker maps relative to the first frame -> :class:`CameraEncoder` -> added to the output of
  ``proj_in`` of every motion module of the down levels through zero-initialised merges.
* **Pose-conditioned transformer blocks** (CD360, PAPER.md §3): for each chosen spatial
  transformer block a :class:`FeatureNeRF` renders the reference views' features of that block at
  the target cameras and ``fuse = Linear(2C -> C)`` mixes them into the block's output
  (initialised to pass the block's output through unchanged).
* **Subject token**: :mod:`mvcustom.models.text`.

The diffusers modules stay stock (the additions are hooks and sibling modules), so the UNet's
state dict is the diffusers layout: ``model.unet.save_pretrained`` gives a folder any
``AnimateDiffPipeline`` reads. Blocks are counted in forward order: down levels, middle, up
levels; SD 1.5 has 16 spatial transformer blocks (down 0-5, middle 6, up 7-15).

Default FeatureNeRF blocks ``4-10``: the paper says "7 of the 16" without a list that could be
read here (PAPER.md §3, NF), so ours are the seven lowest-resolution ones (down level 2, the
middle block, up level 1 and the first block of up level 2), where the maps are smallest and
carry layout rather than texture; CD360 (SDXL) instead uses every second block.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import asdict, dataclass, field

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mvcustom.configs.model import ArchitectureConfig, reconcile
from mvcustom.geometry.camera import rigid_inverse
from mvcustom.models.attention import SpatioTemporalAttnProcessor
from mvcustom.models.camera_encoder import CameraEncoder, clip_plucker, relative_to_first
from mvcustom.models.components import Components, load_components, tiny_components
from mvcustom.models.featurenerf import FeatureNeRF, RenderOutput
from mvcustom.models.schedule import build_scheduler, clean_scheduler_config
from mvcustom.models.text import TEXT_INVERSION_FILE, SubjectEmbedding, add_subject_tokens

Tensor = torch.Tensor

#: The export's sub-folder (and ``model_index.json`` entry) of :class:`MVCustomAdditions`.
ADDITIONS = "mvcustom"
ADDITIONS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class MVCustomConfig(ArchitectureConfig):
    """Architecture of the additions (:class:`mvcustom.configs.model.ArchitectureConfig`, the one
    definition shared with the training config's ``model`` section) plus the subject tokens.

    Attributes:
        subject_tokens: textual-inversion tokens the text encoder carries.
        subject_init_words: per token, the word initialising it (``[]``: random).
    """

    subject_tokens: list[str] = field(default_factory=list)
    subject_init_words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.subject_init_words and len(self.subject_init_words) != len(self.subject_tokens):
            raise ValueError("subject_init_words needs one word per subject token (or none)")


@dataclass
class ClipCameras:
    """Cameras of a batch of clips: ``w2c (B, F, 4, 4)`` OpenCV, ``K (B, F, 3, 3)`` in pixels of
    ``image_hw`` (the frames' size, ``8x`` the latents')."""

    w2c: Tensor
    K: Tensor
    image_hw: tuple[int, int]

    def __post_init__(self) -> None:
        if self.w2c.ndim != 4 or self.w2c.shape[-2:] != (4, 4) or self.K.shape != (*self.w2c.shape[:2], 3, 3):
            raise ValueError(
                f"cameras need w2c (B, F, 4, 4) and K (B, F, 3, 3), got {tuple(self.w2c.shape)}, {tuple(self.K.shape)}"
            )
        self.image_hw = (int(self.image_hw[0]), int(self.image_hw[1]))


@dataclass
class References:
    """The subject's reference views: ``latents (B, K, C, h, w)`` (clean, VAE-scaled) and cameras
    in the same world frame as the target cameras. ``features``: the per-block features of a
    previous :meth:`MVCustomModel.reference_features` call (reused across denoising steps)."""

    latents: Tensor | None
    cameras: ClipCameras
    features: dict[int, Tensor] | None = None


@dataclass
class DenoiseOutput:
    """``sample (B, F, C, h, w)`` (what the scheduler's prediction type says) and the
    FeatureNeRF renders per block (for its losses and the depth alignment at inference)."""

    sample: Tensor
    renders: dict[int, RenderOutput] = field(default_factory=dict)


class _State:
    """What the hooks read during one forward (set by :meth:`MVCustomModel.forward`).

    It is left in place after the forward so gradient checkpointing can replay the hooks during
    the backward pass; the next forward overwrites it.
    """

    def __init__(self) -> None:
        self.radius = 0
        self.tile: int | None = None
        self.camera_features: list[Tensor] | None = None
        self.mode = "plain"  # plain | capture | inject
        self.latent_hw: tuple[int, int] = (0, 0)
        self.captured: dict[int, Tensor] = {}
        self.references: References | None = None
        self.targets: ClipCameras | None = None
        self.near: Tensor | None = None
        self.far: Tensor | None = None
        self.renders: dict[int, RenderOutput] = {}


class CameraMerge(nn.Module):
    """CameraCtrl's fusion: ``h + merge(h + proj(camera))`` with ``merge`` initialised to zero."""

    def __init__(self, camera_channels: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(camera_channels, channels)
        self.merge = nn.Linear(channels, channels)
        nn.init.zeros_(self.merge.weight)
        nn.init.zeros_(self.merge.bias)

    def forward(self, hidden: Tensor, camera: Tensor) -> Tensor:
        return hidden + self.merge(hidden + self.proj(camera))


class PoseConditioning(nn.Module):
    """A FeatureNeRF and the fusion ``Linear(2C -> C)`` of one pose-conditioned block."""

    def __init__(self, channels: int, cfg: MVCustomConfig):
        super().__init__()
        self.nerf = FeatureNeRF(channels, cfg.nerf_hidden, cfg.nerf_samples, cfg.near, cfg.far)
        self.fuse = nn.Linear(2 * channels, channels)
        with torch.no_grad():  # pass-through at initialisation (CD360)
            self.fuse.weight.zero_()
            self.fuse.weight[:, :channels] = torch.eye(channels)
            self.fuse.bias.zero_()


# Hooks are small objects holding the shared state and the module they apply (not closures over
# the model), so ``copy.deepcopy`` and pickling give a model whose hooks use its own state.
class _MotionHook:
    """Pre-hook of a motion module: hand STT the feature-map size and the radius in force."""

    def __init__(self, state: _State):
        self.state = state

    def __call__(self, module, args, kwargs):
        # AnimateDiffTransformer3D.forward(hidden_states, encoder_hidden_states, timestep,
        # class_labels, num_frames, cross_attention_kwargs): diffusers' blocks call it both ways.
        hidden = args[0] if args else kwargs["hidden_states"]
        positional = len(args) > 5
        extra = dict((args[5] if positional else kwargs.get("cross_attention_kwargs")) or {})
        extra.update(spatial_shape=tuple(hidden.shape[-2:]), radius=self.state.radius, tile=self.state.tile)
        if positional:
            args = (*args[:5], extra, *args[6:])
        else:
            kwargs["cross_attention_kwargs"] = extra
        return args, kwargs


class _CameraHook:
    """Forward hook on a down-level motion module's ``proj_in``: add the camera features."""

    def __init__(self, state: _State, merge: CameraMerge, level: int):
        self.state, self.merge, self.level = state, merge, level

    def __call__(self, module, inputs, output):
        feats = self.state.camera_features
        if feats is None:
            return None
        cam = feats[self.level]  # (B*F, C, H, W); output: (B*H*W, F, inner)
        BF, C, H, W = cam.shape
        Fr = output.shape[1]
        cam = cam.reshape(BF // Fr, Fr, C, H, W).permute(0, 3, 4, 1, 2).reshape(-1, Fr, C)
        return self.merge(output, cam.to(output.dtype))


class _PoseHook:
    """Forward hook on a pose-conditioned spatial block: capture reference features, or render
    them at the target cameras and fuse them into the block's output."""

    def __init__(self, state: _State, block: PoseConditioning, index: int):
        self.state, self.block, self.index = state, block, index

    def __call__(self, module, inputs, output):
        state = self.state
        if state.mode == "capture":
            state.captured[self.index] = output
            return None
        if state.mode != "inject":
            return None
        BF, tokens, C = output.shape
        h, w = feature_hw(state.latent_hw, tokens)
        refs = state.references
        B, Kv = refs.cameras.w2c.shape[:2]
        ref = refs.features[self.index].reshape(B, Kv, h, w, C).permute(0, 1, 4, 2, 3)
        render = self.block.nerf(
            ref,
            refs.cameras.w2c,
            refs.cameras.K,
            state.targets.w2c,
            state.targets.K,
            state.targets.image_hw,
            (h, w),
            state.near,
            state.far,
        )
        state.renders[self.index] = render
        rendered = render.features.permute(0, 1, 3, 4, 2).reshape(BF, tokens, C).to(output.dtype)
        return self.block.fuse(torch.cat([output, rendered], -1))


def feature_hw(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The ``(h, w)`` of a UNet feature map with ``tokens`` pixels: the latent size halved (SD's
    stride-2 convolutions round up) until it matches."""
    h, w = latent_hw
    while h * w > tokens and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise ValueError(f"no feature map of a {latent_hw} latent has {tokens} pixels")
    return h, w


def motion_modules(unet) -> list[tuple[str, int | None, nn.Module]]:
    """``(name, down_level or None, module)`` of every motion module, in forward order."""
    out = []
    for i, block in enumerate(unet.down_blocks):
        out += [(f"down{i}_{j}", i, m) for j, m in enumerate(block.motion_modules)]
    if getattr(unet.mid_block, "motion_modules", None) is not None:
        out += [(f"mid_{j}", None, m) for j, m in enumerate(unet.mid_block.motion_modules)]
    for i, block in enumerate(unet.up_blocks):
        out += [(f"up{i}_{j}", None, m) for j, m in enumerate(block.motion_modules)]
    return out


def spatial_transformer_blocks(unet) -> list[nn.Module]:
    """The spatial ``BasicTransformerBlock``s in forward order (16 in SD 1.5)."""
    blocks = []
    for part in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for attn in getattr(part, "attentions", None) or []:
            blocks += list(attn.transformer_blocks)
    return blocks


class MVCustomAdditions(ModelMixin, ConfigMixin):
    """Everything MVCustom adds to the backbone, as one diffusers component (``mvcustom/`` of an
    export): the camera encoder and its merges, and the pose-conditioned blocks (FeatureNeRF +
    fusion). Built from the shapes :class:`MVCustomModel` reads off its UNet; loads standalone
    with ``MVCustomAdditions.from_pretrained(export, subfolder="mvcustom")``.

    Args:
        architecture: the :class:`MVCustomConfig` as a dict (recorded in ``config.json``).
        camera_channels: the UNet's ``block_out_channels``. vae_scale: the VAE's downscale.
        merge_channels: motion-module name -> ``[camera channels, module width]`` of its merge.
        pose_block_channels: block index -> its width.
    """

    @register_to_config
    def __init__(
        self,
        architecture: dict,
        camera_channels: list[int],
        vae_scale: int,
        merge_channels: dict[str, list[int]],
        pose_block_channels: dict[str, int],
    ):
        super().__init__()
        cfg = MVCustomConfig(**architecture)
        self.camera_encoder = None
        if cfg.camera_encoder:
            self.camera_encoder = CameraEncoder(
                tuple(camera_channels), vae_scale, cfg.camera_encoder_blocks, cfg.camera_encoder_heads
            )
        self.camera_merges = nn.ModuleDict({n: CameraMerge(a, b) for n, (a, b) in merge_channels.items()})
        self.pose_blocks = nn.ModuleDict(
            {i: PoseConditioning(c, cfg) for i, c in pose_block_channels.items()}
        )


class MVCustomModel(nn.Module):
    """The whole assembly; see the module docstring. Build with :meth:`tiny`,
    :meth:`from_sd15` or :meth:`from_pretrained` (a folder written by :meth:`save_pretrained`)."""

    def __init__(self, components: Components, config: MVCustomConfig):
        super().__init__()
        self.config = config
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        # the schedule the model is trained and sampled on (mvcustom.models.schedule): checked
        # here, so a config that sampling would misread fails when the model is built
        self.scheduler_config = clean_scheduler_config(components.scheduler)
        self._state = _State()
        # The tokenizer is saved without the subject tokens; loading re-adds them together with
        # the text encoder's matching rows (one code path for fresh and loaded models).
        self._base_tokenizer = copy.deepcopy(self.tokenizer)
        if config.subject_tokens:
            add_subject_tokens(
                self.tokenizer, self.text_encoder, config.subject_tokens, config.subject_init_words or None
            )
        channels = tuple(self.unet.config.block_out_channels)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

        modules = motion_modules(self.unet)
        for _, _, module in modules:
            for block in module.transformer_blocks:
                for attn in (block.attn1, block.attn2):
                    if attn is not None:
                        attn.set_processor(SpatioTemporalAttnProcessor())
            module.register_forward_pre_hook(_MotionHook(self._state), with_kwargs=True)

        blocks = spatial_transformer_blocks(self.unet)
        bad = [b for b in config.featurenerf_blocks if not 0 <= b < len(blocks)]
        if bad:
            raise ValueError(
                f"featurenerf_blocks {bad} out of range: this UNet has {len(blocks)} transformer blocks"
            )
        merges = {}
        if config.camera_encoder:
            merges = {n: [channels[lv], m.proj_in.out_features] for n, lv, m in modules if lv is not None}
        additions = MVCustomAdditions(
            architecture=asdict(config),
            camera_channels=list(channels),
            vae_scale=self.vae_scale,
            merge_channels=merges,
            pose_block_channels={
                str(i): blocks[i].norm1.normalized_shape[0] for i in config.featurenerf_blocks
            },
        )
        # The additions are their own diffusers component on disk (``mvcustom/``); the model
        # adopts its children under their usual names and keeps the container outside its
        # submodules, so the state dict names each weight once.
        object.__setattr__(self, "_additions", additions)
        self.camera_encoder = additions.camera_encoder
        self.camera_merges = additions.camera_merges
        self.pose_blocks = additions.pose_blocks
        for name, level, module in modules:
            if name in self.camera_merges:
                module.proj_in.register_forward_hook(
                    _CameraHook(self._state, self.camera_merges[name], level)
                )
        for index in config.featurenerf_blocks:
            blocks[index].register_forward_hook(_PoseHook(self._state, self.pose_blocks[str(index)], index))

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny(
        cls, config: MVCustomConfig | None = None, seed: int = 0, prediction_type: str = "epsilon"
    ) -> MVCustomModel:
        """Random tiny model in SD 1.5's layout (tests, the demo)."""
        return cls(tiny_components(seed, prediction_type), config or MVCustomConfig())

    @classmethod
    def from_sd15(
        cls, pretrained: str, motion_adapter: str | None, config: MVCustomConfig | None = None, dtype=None
    ) -> MVCustomModel:
        """SD 1.5 (folder or hub id) + AnimateDiff motion adapter; additions freshly initialised."""
        return cls(load_components(pretrained, motion_adapter, dtype), config or MVCustomConfig())

    def save_pretrained(self, path: str) -> None:
        """Write a diffusers pipeline folder (local or fsspec URL), the training export:

        ``model_index.json`` and one sub-folder per component, each in its library's own format:
        ``unet/`` (``UNetMotionModel``: SD 1.5's image layers with the motion modules), ``vae/``,
        ``text_encoder/`` and ``tokenizer/`` (the pretrained vocabulary, without subject tokens),
        ``scheduler/`` (DDIM), ``mvcustom/`` (:class:`MVCustomAdditions`: the camera encoder and
        the FeatureNeRF blocks, with the architecture config), and per subject token diffusers'
        textual-inversion file (``learned_embeds.safetensors``; with several tokens
        ``learned_embeds-<i>.safetensors``). ``model_index.json`` names ``AnimateDiffPipeline``,
        so ``DiffusionPipeline.from_pretrained`` gives the backbone in stock diffusers (its
        image and motion layers; MVCustom's additions, which stock pipelines cannot run, are
        ignored with diffusers' warning) and ``pipe.load_textual_inversion(folder)`` adds the
        token; :meth:`from_pretrained` reads all of it.
        """
        import diffusers

        from mvcustom.models.text import save_textual_inversion, subject_vectors

        with _local_folder(path, write=True) as local:
            index = {
                "_class_name": "AnimateDiffPipeline",
                "_diffusers_version": diffusers.__version__,
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNetMotionModel"],
                "motion_adapter": [None, None],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                ADDITIONS: ["mvcustom.models.mvcustom", "MVCustomAdditions"],
            }
            with open(os.path.join(local, "model_index.json"), "w") as f:
                json.dump(index, f, indent=2)
            self.unet.save_pretrained(os.path.join(local, "unet"))
            self.vae.save_pretrained(os.path.join(local, "vae"))
            with _base_text_encoder(self.text_encoder) as base:
                base.save_pretrained(os.path.join(local, "text_encoder"))
            self._base_tokenizer.save_pretrained(os.path.join(local, "tokenizer"))
            build_scheduler(self.scheduler_config).save_pretrained(os.path.join(local, "scheduler"))
            self._additions.save_pretrained(os.path.join(local, ADDITIONS))
            tokens = list(subject_vectors(self.tokenizer, self.text_encoder))
            for i, token in enumerate(tokens):
                name = TEXT_INVERSION_FILE if len(tokens) == 1 else f"learned_embeds-{i}.safetensors"
                save_textual_inversion(self.tokenizer, self.text_encoder, os.path.join(local, name), token)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: torch.dtype | None = None,
        subject_tokens: list[str] | None = None,
        subject_init_words: list[str] | None = None,
        architecture: ArchitectureConfig | None = None,
    ) -> MVCustomModel:
        """Rebuild from a :meth:`save_pretrained` folder (local path, fsspec URL or hub id).

        ``subject_tokens`` replaces the saved model's subject tokens (stage 2 starting from the
        stage-1 export): everything else loads strictly, the new tokens start from
        ``subject_init_words`` (or random). ``architecture``: the config the caller asks for; a
        shape field that differs from the saved model's is a ``ValueError`` naming it, the
        runtime fields are applied (:func:`mvcustom.configs.model.reconcile`).
        """
        from diffusers import AutoencoderKL, DDIMScheduler, UNetMotionModel
        from safetensors.torch import load_file
        from transformers import CLIPTextModel, CLIPTokenizer

        with _local_folder(path, write=False) as local:
            if not is_export(local):
                raise FileNotFoundError(
                    f"{path} has no model_index.json with an {ADDITIONS!r} component: not a folder "
                    "written by MVCustomModel.save_pretrained (a training run's export/ is one)"
                )
            with open(os.path.join(local, ADDITIONS, "config.json")) as f:
                saved = json.load(f)["architecture"]
            saved_tokens = list(saved.get("subject_tokens", []))
            if architecture is not None:
                saved = reconcile(saved, architecture, path)
            cfg = MVCustomConfig(**saved)
            retoken = subject_tokens is not None and list(subject_tokens) != saved_tokens
            if retoken:
                cfg.subject_tokens = list(subject_tokens)
                cfg.subject_init_words = list(subject_init_words or [])
                cfg.__post_init__()
            kw = {"torch_dtype": dtype} if dtype is not None else {}
            scheduler = clean_scheduler_config(
                DDIMScheduler.load_config(local, subfolder="scheduler"), f"{path}/scheduler"
            )
            components = Components(
                unet=UNetMotionModel.from_pretrained(local, subfolder="unet", **kw),
                vae=AutoencoderKL.from_pretrained(local, subfolder="vae", **kw),
                text_encoder=CLIPTextModel.from_pretrained(local, subfolder="text_encoder", **kw),
                tokenizer=CLIPTokenizer.from_pretrained(local, subfolder="tokenizer"),
                scheduler=scheduler,
            )
            model = cls(components, cfg)
            weights = os.path.join(local, ADDITIONS, ADDITIONS_WEIGHTS)
            # a model without additions (no camera encoder, FeatureNeRF or tokens: a baseline)
            # has no weights to save, and diffusers writes no file for it
            state = load_file(weights) if os.path.exists(weights) or model._additions.state_dict() else {}
            missing, unexpected = model._additions.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"{path}/{ADDITIONS}: weights do not match its config (missing {sorted(missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]})"
                )
            if cfg.subject_tokens and not retoken:
                vectors = {}
                for name in sorted(os.listdir(local)):
                    if name.startswith("learned_embeds") and name.endswith(".safetensors"):
                        vectors.update(load_file(os.path.join(local, name)))
                _set_subject_rows(model, vectors, path)
        if dtype is not None:
            model.to(dtype)
        return model

    # ------------------------------------------------------------------ forward
    def encode_prompt(self, prompts: list[str]) -> Tensor:
        """Prompts -> ``(B, 77, D)`` CLIP hidden states (SD 1.5's conditioning)."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    @property
    def device(self) -> torch.device:
        """Where the model computes: the UNet's device, or under diffusers' model CPU offload the
        device its hook moves the UNet to for each call."""
        hook = getattr(self.unet, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _camera_features(self, cameras: ClipCameras | None) -> list[Tensor] | None:
        if self.camera_encoder is None or cameras is None:
            return None
        plucker = clip_plucker(cameras.w2c.float(), cameras.K.float(), cameras.image_hw)
        return self.camera_encoder(plucker.to(self.dtype))

    def _unet(self, latents: Tensor, timesteps: Tensor, text: Tensor) -> Tensor:
        """``latents (B, F, C, h, w)`` -> UNet output, same layout."""
        self._state.latent_hw = tuple(latents.shape[-2:])
        # UNetMotionModel wants the prompt per frame (AnimateDiffPipeline repeats it likewise).
        text = text.to(self.dtype).repeat_interleave(latents.shape[1], dim=0)
        out = self.unet(latents.permute(0, 2, 1, 3, 4), timesteps, text).sample
        return out.permute(0, 2, 1, 3, 4)

    def reference_features(self, references: References, text: Tensor, radius: int = 0) -> dict[int, Tensor]:
        """Run the backbone on the clean reference latents (timestep 0, their own cameras as a
        K-frame clip) and keep each pose-conditioned block's output. Reuse the result across
        denoising steps by putting it in ``References.features``."""
        if references.latents is None:
            raise ValueError("references need latents to compute their features")
        state = self._state
        state.radius, state.tile = radius, self.config.stt_tile
        state.camera_features = self._camera_features(references.cameras)
        state.mode, state.captured = "capture", {}
        B = references.latents.shape[0]
        zeros = torch.zeros(B, dtype=torch.long, device=references.latents.device)
        self._unet(references.latents.to(self.dtype), zeros, text)
        state.mode = "plain"
        return dict(state.captured)

    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        encoder_hidden_states: Tensor,
        cameras: ClipCameras | None = None,
        references: References | None = None,
        radius: int = 0,
        near: Tensor | None = None,
        far: Tensor | None = None,
    ) -> DenoiseOutput:
        """Denoise a batch of clips.

        Args:
            latents: ``(B, F, C, h, w)`` noisy latents. timesteps: ``(B,)``.
            encoder_hidden_states: ``(B, 77, D)`` (:meth:`encode_prompt`).
            cameras: target cameras (camera encoder and FeatureNeRF); ``None``: unconditioned.
            references: the subject's reference views (FeatureNeRF); ``None``: plain backbone.
            radius: STT radius in force (0 = AnimateDiff's temporal attention, -1 = full).
            near, far: ``(B,)`` FeatureNeRF ray bounds (default: the config's).
        """
        if latents.ndim != 5:
            raise ValueError(f"latents must have shape (B, F, C, h, w), got {tuple(latents.shape)}")
        B, Fr = latents.shape[:2]
        if cameras is not None and cameras.w2c.shape[:2] != (B, Fr):
            raise ValueError(
                f"cameras cover {tuple(cameras.w2c.shape[:2])} views for latents of (B, F) = {(B, Fr)}"
            )
        use_refs = references is not None and len(self.pose_blocks) > 0
        if use_refs and cameras is None:
            raise ValueError("FeatureNeRF conditioning needs the target cameras")
        state = self._state
        if use_refs and references.features is None:
            references = References(
                references.latents,
                references.cameras,
                self.reference_features(references, encoder_hidden_states, radius),
            )
        state.radius, state.tile = radius, self.config.stt_tile
        state.camera_features = self._camera_features(cameras)
        state.renders = {}
        if use_refs:
            # FeatureNeRF works in one world frame: express both camera sets relative to the
            # clip's first target camera, like the camera encoder (rigid-motion invariance).
            anchor = cameras.w2c[:, :1]
            state.targets = ClipCameras(relative_to_first(cameras.w2c), cameras.K, cameras.image_hw)
            inv_anchor = rigid_inverse(anchor)
            state.references = References(
                None,
                ClipCameras(
                    references.cameras.w2c @ inv_anchor, references.cameras.K, references.cameras.image_hw
                ),
                references.features,
            )
            state.near, state.far = near, far
            state.mode = "inject"
        else:
            state.mode = "plain"
        sample = self._unet(latents.to(self.dtype), timesteps, encoder_hidden_states)
        return DenoiseOutput(sample=sample, renders=dict(state.renders))

    # ------------------------------------------------------------------ VAE
    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.scaling_factor)

    def encode_frames(self, frames: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``frames (B, F, 3, H, W)`` in ``[-1, 1]`` -> scaled latents ``(B, F, 4, H/8, W/8)``."""
        B, Fr = frames.shape[:2]
        dist = self.vae.encode(frames.reshape(B * Fr, *frames.shape[2:]).to(self.dtype)).latent_dist
        latents = dist.sample(generator) * self.latent_scaling
        return latents.reshape(B, Fr, *latents.shape[1:])

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents ``(B, F, 4, h, w)`` -> frames ``(B, F, 3, 8h, 8w)`` in ``[-1, 1]``."""
        B, Fr = latents.shape[:2]
        frames = self.vae.decode(latents.reshape(B * Fr, *latents.shape[2:]) / self.latent_scaling).sample
        return frames.reshape(B, Fr, *frames.shape[1:])


def is_export(folder: str) -> bool:
    """Whether a local folder is a :meth:`MVCustomModel.save_pretrained` export."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return False
    with open(index) as f:
        return ADDITIONS in json.load(f)


@contextlib.contextmanager
def _base_text_encoder(text_encoder):
    """The text encoder with its pretrained embedding only (the subject rows lifted off)."""
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, SubjectEmbedding):
        yield text_encoder
        return
    text_encoder.set_input_embeddings(emb.base)
    try:
        yield text_encoder
    finally:
        text_encoder.set_input_embeddings(emb)


def _set_subject_rows(model: MVCustomModel, vectors: dict[str, Tensor], source: str) -> None:
    missing = [t for t in model.config.subject_tokens if t not in vectors]
    if missing:
        raise ValueError(f"{source}: no learned embedding for subject token(s) {missing}")
    emb = model.text_encoder.get_input_embeddings()
    first = emb.base.num_embeddings
    with torch.no_grad():
        for token in model.config.subject_tokens:
            row = model.tokenizer.convert_tokens_to_ids(token) - first
            emb.extra[row] = vectors[token].to(emb.extra.dtype)


@contextlib.contextmanager
def _local_folder(path: str, write: bool):
    """A local folder standing for ``path``: itself when local; for an fsspec URL a temporary
    copy (downloaded before, or uploaded after when ``write``); a hub id is downloaded."""
    if "://" not in path:
        if write:
            os.makedirs(path, exist_ok=True)
        elif not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path)
        yield path
        return
    import tempfile

    import fsspec

    fs, remote = fsspec.core.url_to_fs(path)
    with tempfile.TemporaryDirectory(prefix="mvcustom-model-") as tmp:
        if not write:
            if not fs.isdir(remote):
                raise FileNotFoundError(f"{path} is not a folder")
            fs.get(remote.rstrip("/") + "/", tmp, recursive=True)
        yield tmp
        if write:
            fs.put(tmp.rstrip("/") + "/", remote, recursive=True)
