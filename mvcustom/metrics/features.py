"""Image / text embeddings for the similarity metrics (PAPER.md §6, Table 2).

:class:`ImageTextEncoder` wraps one transformers model loaded with ``from_pretrained``:

* a ``CLIPModel`` (``model_type == "clip"``) plus its tokenizer: image *and* text embeddings, the
  projected CLIP features (text alignment, CLIP image similarity);
* any image backbone ``AutoModel`` loads (DINOv2, a CLIP vision tower, ...): image embeddings
  only, the labelled fallback for the DreamSim distances (multi-view consistency and identity,
  PAPER.md §6): the cosine distance between the backbone's pooled embeddings (DINOv2: CLS after
  the final layer norm; CLIP vision: the pooled, or with ``CLIPVisionModelWithProjection`` the
  projected, CLS token). That is DreamSim's form (``1 - cos`` of ViT embeddings) without its
  fine-tuned LoRA heads, so the results never call it DreamSim
  (:func:`mvcustom.metrics.similarity.distance_label`).

:class:`DreamSimEncoder` is the real DreamSim, through the PyPI ``dreamsim`` package (weights
from a folder; the package needs torchvision, installed in the Docker image, not in the CPU
environment).

Preprocessing is pure torch (no torchvision, no image-processor download): resize the shortest
side to ``resize_to`` (bicubic, antialiased), centre-crop ``crop_size`` square, scale to [0, 1],
normalise by the model's mean/std. These values come from the folder's
``preprocessor_config.json`` (the format ``CLIPImageProcessor`` and DINOv2's ``BitImageProcessor``
write) when there is one, otherwise from the model config (CLIP mean/std for CLIP models,
ImageNet's for others). :meth:`ImageTextEncoder.save_pretrained` writes that file, so a saved
encoder reloads with identical preprocessing.

:meth:`ImageTextEncoder.tiny` builds a seeded, randomly initialised CLIP at test size, with the
offline character-level tokenizer of :mod:`mvcustom.models.text` (DESIGN.md §5: tiny random
metric models in tests, ``from_pretrained`` paths at scale).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_FILE = "preprocessor_config.json"


def as_image_batch(images: np.ndarray | Tensor, name: str = "images") -> Tensor:
    """Validate images and return ``(N, 3, H, W)`` float32 in [0, 1].

    Args:
        images: ``(N, H, W, 3)`` RGB, uint8 (numpy or torch), or a floating torch tensor in [0, 1].
        name: what to call the argument in error messages.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(images).__name__}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (N, H, W, 3) (RGB), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} is empty")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError(
                f"floating-point {name} must lie in [0, 1], got [{float(x.min())}, {float(x.max())}]"
            )
        x = x.float()
    else:
        raise ValueError(f"{name} must be uint8 (or floating in [0, 1]), got {x.dtype}")
    return x.permute(0, 3, 1, 2).contiguous()


def _pooled(out) -> Tensor:
    """The pooled embedding of a transformers output (or a bare tensor, transformers 4.x)."""
    if isinstance(out, Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out.last_hidden_state[:, 0]  # CLS token of backbones without a pooler


def _side(value, default: int) -> int:
    """An image-processor size entry (int, ``{"shortest_edge"}`` or ``{"height", "width"}``) -> int."""
    if value is None:
        return default
    if isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    if value.get("height") != value.get("width"):
        raise ValueError(f"only square crops are supported, got {value}")
    return int(value["height"])


class ImageTextEncoder:
    """L2-normalised image (and, for CLIP, text) embeddings of one transformers model.

    Args:
        model: a ``CLIPModel`` or an image backbone taking ``pixel_values`` (eval mode is set).
        tokenizer: the CLIP tokenizer (required for :meth:`encode_texts`; ``None`` for backbones).
        crop_size: side of the square network input, pixels.
        resize_to: shortest-side size before the centre crop (default ``crop_size``).
        mean, std: per-channel normalisation of [0, 1] RGB.
        batch_size: images or texts per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        crop_size: int = 224,
        resize_to: int | None = None,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        batch_size: int = 32,
    ):
        if crop_size < 1 or (resize_to is not None and resize_to < crop_size):
            raise ValueError(f"need crop_size >= 1 and resize_to >= crop_size, got {crop_size}, {resize_to}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.crop_size = int(crop_size)
        self.resize_to = int(resize_to or crop_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.batch_size = batch_size
        #: what the results call this model (set by the constructors; ``label`` kwarg overrides)
        self.label = type(model).__name__

    @property
    def is_clip(self) -> bool:
        """Whether the model has a text tower (a ``CLIPModel``)."""
        return hasattr(self.model, "get_text_features") and hasattr(self.model, "get_image_features")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs
    ) -> ImageTextEncoder:
        """Load a folder or hub id: ``CLIPModel`` + tokenizer for CLIP configs, else ``AutoModel``.

        ``kwargs`` override the preprocessing (``crop_size``, ``resize_to``, ``mean``, ``std``)
        and ``batch_size``.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPModel
        from transformers.utils import cached_file

        config = AutoConfig.from_pretrained(path)
        if config.model_type == "clip":
            model = CLIPModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_size = config.vision_config.image_size
            mean, std = CLIP_MEAN, CLIP_STD
        else:
            model = AutoModel.from_pretrained(path)
            tokenizer = None
            vision = getattr(config, "vision_config", config)
            image_size = int(getattr(vision, "image_size", 224))
            is_clip_family = "clip" in config.model_type
            mean, std = (CLIP_MEAN, CLIP_STD) if is_clip_family else (IMAGENET_MEAN, IMAGENET_STD)
        # A folder or a (cached / downloadable) hub id; None when the model ships no processor file.
        found = cached_file(
            path,
            PREPROCESSOR_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        pre = {}
        if found:
            with open(found) as f:
                pre = json.load(f)
        resize = _side(pre.get("size"), image_size)
        # Always a square centre crop (the ViT input); without one in the file, crop the resized side.
        crop = _side(pre.get("crop_size"), resize) if pre.get("do_center_crop", True) else resize
        opts = {
            "crop_size": crop,
            "resize_to": max(resize, crop),
            "mean": tuple(pre.get("image_mean", mean)),
            "std": tuple(pre.get("image_std", std)),
        }
        label = kwargs.pop("label", None)
        opts.update(kwargs)
        encoder = cls(model.to(device=device, dtype=dtype), tokenizer, **opts)
        encoder.label = label or f"{config.model_type} {path}"
        return encoder

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        image_size: int = 32,
        patch_size: int = 8,
        hidden_size: int = 32,
        num_layers: int = 2,
        projection_dim: int = 32,
    ) -> ImageTextEncoder:
        """A seeded, randomly initialised small ``CLIPModel`` with the offline tiny tokenizer (tests)."""
        from transformers import CLIPConfig, CLIPModel

        from mvcustom.models.text import tiny_text_encoder_config, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        text = tiny_text_encoder_config(len(tokenizer))
        text.update(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers)
        text.pop("projection_dim", None)
        vision = {
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
        }
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            model = CLIPModel(config)
        encoder = cls(model, tokenizer, crop_size=image_size)
        encoder.label = f"tiny random CLIP (seed {seed})"
        return encoder

    def save_pretrained(self, path: str) -> None:
        """Write model, tokenizer and a ``preprocessor_config.json`` that reloads identically."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        pre = {
            "image_processor_type": "CLIPImageProcessor" if self.is_clip else "BitImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.resize_to},
            "do_center_crop": True,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": 3,  # bicubic
        }
        with open(os.path.join(path, PREPROCESSOR_FILE), "w") as f:
            json.dump(pre, f, indent=2)

    # ------------------------------------------------------------------ encoding
    def preprocess(self, images: np.ndarray | Tensor) -> Tensor:
        """``(N, H, W, 3)`` uint8 (or float in [0, 1]) -> ``pixel_values (N, 3, S, S)`` normalised."""
        x = as_image_batch(images)
        H, W = x.shape[-2:]
        scale = self.resize_to / min(H, W)
        size = (max(self.crop_size, round(H * scale)), max(self.crop_size, round(W * scale)))
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top = (size[0] - self.crop_size) // 2
        left = (size[1] - self.crop_size) // 2
        x = x[:, :, top : top + self.crop_size, left : left + self.crop_size]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | Tensor) -> Tensor:
        """``images (N, H, W, 3)`` -> ``(N, D)`` float32 L2-normalised embeddings (on CPU)."""
        pixels = self.preprocess(images)
        feats = []
        for chunk in pixels.split(self.batch_size):
            chunk = chunk.to(self.device, self.dtype)
            if self.is_clip:
                out = self.model.get_image_features(pixel_values=chunk)
            else:
                out = self.model(pixel_values=chunk)
            feats.append(_pooled(out).float().cpu())
        return F.normalize(torch.cat(feats), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> Tensor:
        """``texts`` (T strings) -> ``(T, D)`` float32 L2-normalised CLIP text embeddings (on CPU)."""
        if not self.is_clip or self.tokenizer is None:
            raise ValueError(
                f"{type(self.model).__name__} has no text tower: text embeddings need a CLIP model and tokenizer"
            )
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
        feats = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                texts[i : i + self.batch_size],
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            out = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            feats.append(_pooled(out).float().cpu())
        return F.normalize(torch.cat(feats), dim=-1)


class DreamSimEncoder:
    """DreamSim (Fu et al. 2023) image embeddings through the PyPI ``dreamsim`` package: the
    paper's distance for multi-view consistency and identity (PAPER.md §6).

    DreamSim's distance between two images is ``1 - cos`` of their embeddings
    (``PerceptualModel.forward``), so :func:`mvcustom.metrics.similarity.multiview_consistency` and
    :func:`~mvcustom.metrics.similarity.identity_distance` on these embeddings are DreamSim
    distances. Preprocessing is the package's own (bicubic resize to 224x224, no crop).

    The package imports torchvision, which this project's CPU torch build cannot load, so it is
    not a dependency of the CPU environment: the Docker image installs it
    (``infra/docker/Dockerfile``). Weights come from a folder (the package's ``cache_dir``,
    holding what ``dreamsim(pretrained=True, cache_dir=...)`` downloads once); a folder without
    them makes the package try to download, which an offline node refuses.
    """

    def __init__(self, model, preprocess, dreamsim_type: str = "ensemble", batch_size: int = 16):
        self.model = model
        self._preprocess = preprocess
        self.batch_size = batch_size
        self.label = f"DreamSim ({dreamsim_type})"

    @classmethod
    def from_pretrained(
        cls, weights: str, device: str | torch.device = "cpu", dreamsim_type: str = "ensemble"
    ) -> DreamSimEncoder:
        """Load DreamSim from the local folder ``weights`` (see the class docstring)."""
        import inspect

        try:
            from dreamsim import dreamsim
        except ImportError as e:
            raise ImportError(
                "metric_models.distance=dreamsim needs the `dreamsim` package (pip install dreamsim==0.2.1 "
                "torchvision matching torch; the Docker image has both). Without it, set "
                "metric_models.distance to backbone (metric_models.distance_backbone: a DINOv2 / CLIP "
                "vision folder) or clip: the results then label the distances as that fallback"
            ) from e
        if not os.path.isdir(weights):
            raise FileNotFoundError(
                f"metric_models.dreamsim={weights!r} is not a local folder: it must hold DreamSim's "
                "checkpoints (the cache_dir of dreamsim(pretrained=True, cache_dir=...))"
            )
        kwargs = {"pretrained": True, "device": str(device), "cache_dir": weights, "normalize_embeds": True}
        if "dreamsim_type" in inspect.signature(dreamsim).parameters:
            kwargs["dreamsim_type"] = dreamsim_type
        elif dreamsim_type != "ensemble":
            raise ValueError(f"this dreamsim package has only the ensemble model, not {dreamsim_type!r}")
        model, preprocess = dreamsim(**kwargs)
        return cls(model, preprocess, dreamsim_type)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | Tensor) -> Tensor:
        """``images (N, H, W, 3)`` -> ``(N, D)`` float32 L2-normalised DreamSim embeddings (CPU)."""
        from PIL import Image

        x = as_image_batch(images)
        pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in x]
        device = next(self.model.parameters()).device
        feats = []
        for i in range(0, len(pil), self.batch_size):
            batch = torch.cat([self._preprocess(p) for p in pil[i : i + self.batch_size]]).to(device)
            feats.append(self.model.embed(batch).reshape(batch.shape[0], -1).float().cpu())
        return F.normalize(torch.cat(feats), dim=-1)
