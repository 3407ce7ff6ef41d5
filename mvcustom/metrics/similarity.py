"""Embedding-similarity metrics of Table 2 (PAPER.md §6): consistency, identity, text alignment.

All are cosines between embeddings (:class:`~mvcustom.metrics.features.ImageTextEncoder`, or
:class:`~mvcustom.metrics.features.DreamSimEncoder` for the DreamSim distances);
inputs are re-normalised here, so any ``(N, D)`` features work. Units are raw cosines in [-1, 1]
(distances ``1 - cos`` in [0, 2]), not the x100 "CLIP score" some papers print.

* **Multi-view consistency** (lower is better): the paper uses a DreamSim distance between
  generated views; which pairs is NF. Ours: the mean cosine distance between *adjacent* views
  ``(f, f + 1)`` of the trajectory (neighbours overlap most, so content drift shows there first
  and the figure does not grow with the trajectory's total span).
* **Identity** (lower is better): DreamSim between generated views and the reference images
  (masking/cropping NF). Ours: the mean cosine distance over every (generated view, reference
  image) pair, whole frames, no masking.
* **CLIP image similarity** (higher is better; appendix Table A1): the mean cosine between the
  CLIP image embeddings of every (generated view, reference image) pair.
* **Text alignment** (higher is better): "text alignment", probably CLIP text-image (NF). Ours:
  the mean cosine between each view's CLIP image embedding and the prompt's CLIP text embedding.
  The caller decides the prompt text (e.g. the subject token ``V*`` replaced by its class word,
  since a stock CLIP does not know the learned token).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from mvcustom.metrics.features import ImageTextEncoder

Tensor = torch.Tensor


def _features(x: Tensor, name: str, min_rows: int = 1) -> Tensor:
    """Validate ``(N, D)`` features and return them L2-normalised in float64."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, D) with N >= {min_rows}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return F.normalize(x.to(torch.float64), dim=-1)


def multiview_consistency(view_features: Tensor) -> float:
    """Mean cosine distance ``1 - cos`` between adjacent generated views (lower is better).

    Args:
        view_features: ``(F, D)`` embeddings of the ``F >= 2`` views, in trajectory order.
    Returns:
        ``mean_f (1 - cos(e_f, e_{f+1}))`` over the ``F - 1`` adjacent pairs, in [0, 2].
    """
    e = _features(view_features, "view_features", min_rows=2)
    return float((1.0 - (e[:-1] * e[1:]).sum(-1)).mean())


def identity_distance(view_features: Tensor, reference_features: Tensor) -> float:
    """Mean cosine distance between every generated view and every reference image (lower is better).

    Args:
        view_features: ``(F, D)`` embeddings of the generated views.
        reference_features: ``(R, D)`` embeddings of the subject's reference images.
    Returns:
        ``mean_{f, r} (1 - cos(e_f, e_r))``, in [0, 2].
    """
    g = _features(view_features, "view_features")
    r = _features(reference_features, "reference_features")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"view_features have D={g.shape[1]} but reference_features D={r.shape[1]}")
    return float((1.0 - g @ r.T).mean())


def truth_distance(view_features: Tensor, truth_features: Tensor) -> float:
    """Mean cosine distance between each generated view and the true view at its camera (lower
    is better): identity measured against the subject's true renders, view by view.

    Args:
        view_features: ``(F, D)`` embeddings of the generated views.
        truth_features: ``(F, D)`` embeddings of the true views at the same cameras, same order.
    Returns:
        ``mean_f (1 - cos(e_f, t_f))``, in [0, 2].
    """
    g = _features(view_features, "view_features")
    t = _features(truth_features, "truth_features")
    if g.shape != t.shape:
        raise ValueError(f"view_features {tuple(g.shape)} and truth_features {tuple(t.shape)} must pair up")
    return float((1.0 - (g * t).sum(-1)).mean())


def text_alignment(image_features: Tensor, text_feature: Tensor) -> float:
    """Mean CLIP cosine similarity between the views and the prompt (higher is better).

    Args:
        image_features: ``(F, D)`` CLIP image embeddings of the views.
        text_feature: ``(D,)`` (or ``(1, D)``) CLIP text embedding of the prompt.
    Returns:
        ``mean_f cos(e_f, t)``, a raw cosine in [-1, 1] (not multiplied by 100).
    """
    e = _features(image_features, "image_features")
    t = torch.as_tensor(text_feature)
    t = _features(t.reshape(1, -1) if t.ndim == 1 else t, "text_feature")
    if t.shape[0] != 1:
        raise ValueError(f"text_feature must be one embedding (D,) or (1, D), got {tuple(t.shape)}")
    if t.shape[1] != e.shape[1]:
        raise ValueError(f"image_features have D={e.shape[1]} but text_feature D={t.shape[1]}")
    return float((e @ t[0]).mean())


_TOKEN = re.compile(r"<[^<>\s]+>")


def class_word_prompt(prompt: str, class_word: str | None) -> str:
    """The prompt CLIP scores text alignment against: the subject token (``<sks>``; CLIP has
    never seen it) replaced by the class word, as personalization papers score it (DreamBooth,
    CustomDiffusion). A token already followed by the class word is dropped ("a <sks> teddybear"
    -> "a teddybear"); without a class word the token is dropped."""
    word = (class_word or "").strip()

    def swap(m: re.Match) -> str:
        rest = prompt[m.end() :].lstrip()
        follows = bool(word) and rest.lower().startswith(word.lower())
        return "" if follows or not word else word

    return re.sub(r"\s+", " ", _TOKEN.sub(swap, prompt)).strip()


def clip_image_similarity(view_features: Tensor, reference_features: Tensor) -> float:
    """Mean CLIP image-image cosine over every (view, reference) pair (higher is better).

    Args:
        view_features: ``(F, D)`` CLIP image embeddings of the views; reference_features: ``(R, D)``.
    """
    return 1.0 - identity_distance(view_features, reference_features)


def distance_label(encoder) -> str:
    """What the results call the distance model: DreamSim by name, anything else as the
    fallback it is (never a CLIP or DINO distance under DreamSim's name)."""
    from mvcustom.metrics.features import DreamSimEncoder

    label = getattr(encoder, "label", type(encoder).__name__)
    return label if isinstance(encoder, DreamSimEncoder) else f"{label}, embedding cosine (not DreamSim)"


def score_views(
    encoder: ImageTextEncoder,
    frames: np.ndarray | Tensor,
    references: np.ndarray | Tensor,
    prompt: str,
    distance_encoder: ImageTextEncoder | None = None,
) -> dict[str, float]:
    """The three similarity metrics of one generated sample.

    Args:
        encoder: a CLIP :class:`ImageTextEncoder` (text alignment; also the distances by default).
        frames: ``(F, H, W, 3)`` uint8 generated views in trajectory order, ``F >= 2``.
        references: ``(R, H', W', 3)`` uint8 reference images of the subject.
        prompt: the text the views are scored against.
        distance_encoder: the model of the consistency and identity distances (a
            :class:`~mvcustom.metrics.features.DreamSimEncoder`, or an image backbone as the
            labelled fallback); ``None`` uses ``encoder``.
    Returns:
        ``{"multiview_consistency", "identity", "text_alignment", "clip_image_similarity",
        "distance_model", "clip_model"}`` (PAPER.md §6, Table 2 and appendix Table A1);
        ``distance_model`` names what the two distances were computed with
        (:func:`distance_label`), ``clip_model`` the CLIP of the other two.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    dist = distance_encoder or encoder
    view_dist = dist.encode_images(frames)  # validates frames
    if view_dist.shape[0] < 2:
        raise ValueError(f"frames must hold at least 2 views for consistency, got {view_dist.shape[0]}")
    ref_dist = dist.encode_images(references)
    view_clip = view_dist if dist is encoder else encoder.encode_images(frames)
    ref_clip = ref_dist if dist is encoder else encoder.encode_images(references)
    text = encoder.encode_texts([prompt])[0]
    return {
        "multiview_consistency": multiview_consistency(view_dist),
        "identity": identity_distance(view_dist, ref_dist),
        "text_alignment": text_alignment(view_clip, text),
        "clip_image_similarity": clip_image_similarity(view_clip, ref_clip),
        "distance_model": distance_label(dist),
        "clip_model": getattr(encoder, "label", type(encoder).__name__),
    }
