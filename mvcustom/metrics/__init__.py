"""Evaluation metrics of PAPER.md §6 / Table 2 (DESIGN.md §1 "Metrics").

* :func:`pose_accuracy`: camera pose accuracy (pycolmap SfM on the generated views, relative
  poses against the requested cameras);
* :func:`multiview_consistency`, :func:`identity_distance`, :func:`text_alignment`,
  :func:`clip_image_similarity`, :func:`score_views`: embedding-similarity metrics over an
  :class:`ImageTextEncoder` (CLIP; an image backbone) or a :class:`DreamSimEncoder` (the paper's
  DreamSim, through the ``dreamsim`` package).

Heavy dependencies (pycolmap, transformers) are imported inside the functions that need them.
"""

from mvcustom.metrics.features import DreamSimEncoder, ImageTextEncoder
from mvcustom.metrics.pose import PoseScore, default_sfm_config, pose_accuracy
from mvcustom.metrics.similarity import (
    class_word_prompt,
    clip_image_similarity,
    distance_label,
    identity_distance,
    multiview_consistency,
    score_views,
    text_alignment,
    truth_distance,
)

__all__ = [
    "DreamSimEncoder",
    "ImageTextEncoder",
    "PoseScore",
    "class_word_prompt",
    "clip_image_similarity",
    "distance_label",
    "default_sfm_config",
    "identity_distance",
    "multiview_consistency",
    "pose_accuracy",
    "score_views",
    "text_alignment",
    "truth_distance",
]
