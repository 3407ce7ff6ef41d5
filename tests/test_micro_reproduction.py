"""The micro-reproduction benchmark's bookkeeping (benchmarks/micro_reproduction.py): the rows it
tabulates from evaluation results and how it judges the paper's directions. The benchmark itself
runs minutes to an hour (``--quick``, default), outside the test budget; its ``--toy`` scale runs
the same code path in ~4 minutes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "micro_reproduction", ROOT / "benchmarks" / "micro_reproduction.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(variant, status="scored", **metrics):
    return {
        "variant": variant,
        "status": status,
        "trajectory": json.dumps({"name": "arc90"}),
        "seed": 0,
        **metrics,
    }


def test_table_has_mean_std_and_n_per_row_and_counts_failures(bench):
    results = pd.DataFrame(
        [
            _row("ours", psnr_truth=20.0, multiview_consistency=0.1),
            _row("ours", psnr_truth=22.0, multiview_consistency=0.3),
            _row("ours", status="generation_failed"),
            _row("no_camera", psnr_truth=15.0, multiview_consistency=None),
        ]
    )
    table = bench.table_of(results)
    assert set(table) == set(bench.ROWS)
    assert table["ours"]["n"] == 2 and table["ours"]["failed"] == 1
    assert table["ours"]["psnr_truth"] == {"mean": 21.0, "std": pytest.approx(1.4142, abs=1e-4), "n": 2}
    assert table["no_camera"]["psnr_truth"] == {"mean": 15.0, "std": None, "n": 1}
    assert table["no_camera"]["multiview_consistency"]["mean"] is None
    assert table["paper"]["n"] == 0


def test_directions_are_judged_by_sign_and_overlap_never_by_a_tuned_threshold(bench):
    def f(mean, std):
        return {"mean": mean, "std": std, "n": 3}

    table = {
        "ours": {
            "psnr_truth": f(20.0, 1.0),
            "rotation_error_deg": f(10.0, 1.0),
            "multiview_consistency": f(0.20, 0.01),
            "identity": f(0.5, 0.1),
            "identity_truth": f(0.3, 0.01),
        },
        "no_camera": {"psnr_truth": f(15.0, 1.0), "rotation_error_deg": f(30.0, 1.0)},
        "paper": {"psnr_truth": f(15.5, 1.0)},
        "ours_no_rendering": {"multiview_consistency": f(0.10, 0.01), "psnr_truth": f(19.5, 1.0)},
        "ours_before_stage2": {"identity": f(0.55, 0.1)},
        "ours_stt0": {"multiview_consistency": f(0.21, 0.02)},
    }
    verdicts = {(d["claim"], d["metric"]): d["verdict"] for d in bench.directions_of(table)}
    assert verdicts[("camera-conditioned beats no-camera on PSNR to the true view", "psnr_truth")] == "held"
    assert verdicts[("camera-conditioned beats no-camera on rotation error", "rotation_error_deg")] == "held"
    # overlapping intervals: 15.5 +- 1 against 15 +- 1
    assert (
        verdicts[("the paper's preset beats no-camera on PSNR to the true view", "psnr_truth")]
        == "inconclusive"
    )
    # lower is better for consistency: 0.20 against 0.10 without overlap is the other way round
    assert (
        verdicts[("feature rendering improves multi-view consistency", "multiview_consistency")]
        == "did not hold"
    )
    assert verdicts[("stage 2 improves identity", "identity")] == "inconclusive"
    assert verdicts[("stage 2 improves identity to the true views", "identity_truth")] == "not measured"
    # "at least as consistent": better within the spread still holds
    assert (
        verdicts[("dense STT is at least as consistent as 1D", "multiview_consistency")]
        == "held (within the spread)"
    )
