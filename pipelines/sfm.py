"""Re-export of the SfM core, which lives in the library: :mod:`mvcustom.geometry.sfm`.

The preprocessing pipeline (WebVid poses) and the camera-pose-accuracy metric
(:mod:`mvcustom.metrics.pose`) share it; the library never imports ``pipelines``, so the code sits
there and this module only keeps ``from pipelines.sfm import run_sfm`` working.
"""

from mvcustom.geometry.sfm import SfmResult, _interpolate_missing, run_sfm  # noqa: F401
