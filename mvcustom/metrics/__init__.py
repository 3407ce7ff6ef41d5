"""Evaluation metrics of PAPER.md §6 / Table 2 (DESIGN.md §1 "Metrics").

* :func:`pose_accuracy`: camera pose accuracy (pycolmap SfM on the generated views, relative
  poses against the requested cameras);
* :func:`multiview_consistency`, :func:`identity_distance`, :func:`text_alignment`,
  :func:`score_views`: embedding-similarity metrics over an :class:`ImageTextEncoder` (CLIP, or
  an image backbone as the DreamSim-style distance).

Heavy dependencies (pycolmap, transformers) are imported inside the functions that need them.
"""

from mvcustom.metrics.features import ImageTextEncoder
from mvcustom.metrics.pose import PoseScore, default_sfm_config, pose_accuracy
from mvcustom.metrics.similarity import (
    class_word_prompt,
    identity_distance,
    multiview_consistency,
    score_views,
    text_alignment,
)

__all__ = [
    "ImageTextEncoder",
    "PoseScore",
    "class_word_prompt",
    "default_sfm_config",
    "identity_distance",
    "multiview_consistency",
    "pose_accuracy",
    "score_views",
    "text_alignment",
]
