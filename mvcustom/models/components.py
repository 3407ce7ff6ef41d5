"""The diffusers/transformers components of the backbone: tiny random ones, or pretrained ones.

Both paths end in the same objects (``UNetMotionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
``CLIPTokenizer``, a DDIM scheduler config), so tests on the tiny ones exercise the code real
weights go through.

* :func:`tiny_components`: SD 1.5's block layout (4 levels, 2 layers per level, 16 spatial
  transformer blocks, motion modules in every block plus the middle) at widths of 16-64, an 8x
  VAE, a character-level CLIP tokenizer. Seconds on a CPU.
* :func:`load_components`: Stable Diffusion 1.5 (a ``from_pretrained`` folder or hub id with the
  usual ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` subfolders) plus an AnimateDiff
  ``MotionAdapter`` (folder or hub id, e.g. ``guoyww/animatediff-motion-adapter-v1-5-3``),
  combined with ``UNetMotionModel.from_unet2d`` as diffusers' ``AnimateDiffPipeline`` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
"""Stable Diffusion 1.5's DDIM settings (its ``scheduler/scheduler_config.json``)."""


@dataclass
class Components:
    unet: torch.nn.Module  # diffusers UNetMotionModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    scheduler: dict  # DDIMScheduler config


def tiny_unet2d_config() -> dict:
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (16, 32, 32, 32),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 32,
        "attention_head_dim": 2,
        "norm_num_groups": 8,
    }


def tiny_motion_adapter_config() -> dict:
    return {
        "block_out_channels": (16, 32, 32, 32),
        "motion_layers_per_block": 2,
        "motion_num_attention_heads": 2,
        "motion_norm_num_groups": 8,
        "motion_max_seq_length": 32,
        "use_motion_mid_block": True,
    }


def tiny_vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (8, 16, 16, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
    }


def tiny_components(seed: int = 0, prediction_type: str = "epsilon") -> Components:
    """Randomly initialised components in SD 1.5's layout, tiny widths (deterministic in ``seed``)."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mvcustom.models.text import tiny_text_encoder_config, tiny_tokenizer

    torch.manual_seed(seed)
    unet2d = UNet2DConditionModel(**tiny_unet2d_config())
    adapter = MotionAdapter(**tiny_motion_adapter_config())
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    vae = AutoencoderKL(**tiny_vae_config())
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(len(tokenizer))))
    return Components(unet, vae, text_encoder, tokenizer, dict(SD_SCHEDULER, prediction_type=prediction_type))


def sd15_architecture_components(seed: int = 0, prediction_type: str = "epsilon") -> Components:
    """Randomly initialised components at Stable Diffusion 1.5's real sizes, built from configs
    (nothing is downloaded): SD 1.5's UNet (320-1280 channels, cross-attention 768), diffusers'
    default ``MotionAdapter`` (AnimateDiff v1.5's motion modules), SD's VAE (128-512 channels) and
    CLIP ViT-L/14's text encoder (12 layers, 768 wide, 49408 tokens). The tokenizer is the tiny
    character-level one: its ids are valid rows of the real vocabulary, which is all random weights
    need. For cost measurements (memory, speed) of the real architecture, not for images."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mvcustom.models.text import tiny_tokenizer

    torch.manual_seed(seed)
    unet2d = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    unet = UNetMotionModel.from_unet2d(unet2d, MotionAdapter())
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    return Components(
        unet, vae, text_encoder, tiny_tokenizer(), dict(SD_SCHEDULER, prediction_type=prediction_type)
    )


def save_tiny_pretrained(root: str, seed: int = 0) -> tuple[str, str]:
    """Write a tiny SD-1.5-layout pipeline folder and a tiny motion-adapter folder.

    Exactly what ``save_pretrained`` of the real models writes, so :func:`load_components` and
    stock diffusers pipelines read them. Returns ``(sd_folder, adapter_folder)``.
    """
    import os

    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        MotionAdapter,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from mvcustom.models.text import tiny_text_encoder_config, tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**tiny_unet2d_config()),
        vae=AutoencoderKL(**tiny_vae_config()),
        text_encoder=CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(len(tokenizer)))),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd, adapter = os.path.join(root, "sd15"), os.path.join(root, "motion_adapter")
    pipe.save_pretrained(sd)
    MotionAdapter(**tiny_motion_adapter_config()).save_pretrained(adapter)
    return sd, adapter


def load_components(
    pretrained: str, motion_adapter: str | None, dtype: torch.dtype | None = None
) -> Components:
    """Load SD 1.5 components and an AnimateDiff motion adapter (folders or hub ids).

    Without ``motion_adapter`` the motion modules are freshly initialised (diffusers' default),
    which is only sensible for training them from scratch.
    """
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def load(cls, sub: str | None, source: str = pretrained):
        try:
            kwargs = {"subfolder": sub} if sub else {}
            if dtype is not None and cls is not CLIPTokenizer:
                kwargs["torch_dtype"] = dtype
            return cls.from_pretrained(source, **kwargs)
        except OSError as e:
            where = f"{source}/{sub}" if sub else source
            raise OSError(
                f"could not load {cls.__name__} from {where!r}: {e}. model.pretrained must be a "
                "Stable Diffusion 1.5 folder or hub id (unet/ vae/ text_encoder/ tokenizer/ "
                "scheduler/) and model.motion_adapter an AnimateDiff MotionAdapter"
            ) from e

    unet2d = load(UNet2DConditionModel, "unet")
    adapter = load(MotionAdapter, None, motion_adapter) if motion_adapter else None
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    if dtype is not None:
        unet = unet.to(dtype)
    scheduler = dict(SD_SCHEDULER)
    try:
        from diffusers import DDIMScheduler

        # every key of the folder's schedule (PNDM's or DDIM's): MVCustomModel checks them
        # (mvcustom.models.schedule), so none is silently dropped
        scheduler.update(DDIMScheduler.load_config(pretrained, subfolder="scheduler"))
    except OSError:
        logging.getLogger(__name__).warning(
            "%s has no scheduler/ config; using Stable Diffusion 1.5's DDIM settings", pretrained
        )
    return Components(
        unet=unet,
        vae=load(AutoencoderKL, "vae"),
        text_encoder=load(CLIPTextModel, "text_encoder"),
        tokenizer=load(CLIPTokenizer, "tokenizer"),
        scheduler=scheduler,
    )
