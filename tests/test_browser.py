"""The HTML pages in a real browser (issue 17): headless Chromium (the Debian packages ``chromium``
and ``chromium-driver``, which ``make test`` installs when missing) through Selenium.

Both pages, the shard inspector and the evaluation report, must load without console errors,
every image must resolve, the summary table must be there, and nothing may need sideways
scrolling at 1280 px. Screenshots stay in the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

CHECKS = """
const imgs = Array.from(document.images);
return {
  images: imgs.length,
  broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
  tables: document.querySelectorAll('table').length,
  summary: !!document.querySelector('#summary') && !!document.querySelector('table.summary'),
  overflow: document.documentElement.scrollWidth - window.innerWidth,
  title: document.title,
};
"""


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(
            "the browser test needs Debian's chromium and chromium-driver: `make test` installs them "
            "(apt-get install chromium chromium-driver)"
        )
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager reach for a download
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    b = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
    yield b
    b.quit()


def _render(browser, page, screenshot) -> dict:
    browser.get(f"file://{page}")
    state = browser.execute_script(CHECKS)
    state["errors"] = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    browser.save_screenshot(str(screenshot))
    return state


def test_shard_inspector_page_renders(browser, train_shards, tmp_path):
    from mvcustom.data.inspector import inspect_shards

    (page,) = inspect_shards(train_shards, str(tmp_path / "inspect"), samples=2)
    state = _render(browser, page, tmp_path / "inspector.png")
    assert state["errors"] == [] and state["broken"] == [], state
    assert state["summary"] and state["images"] == 2 * 4 and state["overflow"] <= 0, state
    assert (tmp_path / "inspector.png").stat().st_size > 0


def test_evaluation_report_renders(browser, tmp_path):
    """The report of two scored samples and a failed one (rows as ScoreSamples writes them)."""
    from pipelines.evaluation.report import write_report
    from pipelines.evaluation.score import aggregate

    out = tmp_path / "eval"
    rows = []
    for i, (variant, status) in enumerate(
        (("mvcustom", "scored"), ("plain", "scored"), ("plain", "generation_failed"))
    ):
        sid = f"teddy-{variant}-arc-p0-s{i}"
        d = out / "samples" / sid
        d.mkdir(parents=True)
        if status == "scored":
            for name, size in (("grid", (128, 512)), ("trajectory", (256, 512))):
                Image.fromarray(np.full((*size, 3), 40 * (i + 1), np.uint8)).save(d / f"{name}.png")
        rows.append(
            {
                "sample_id": sid,
                "subject": "teddy",
                "sequence": None,
                "variant": variant,
                "status": status,
                "prompt": "a photo of a <sks> teddybear",
                "trajectory": json.dumps({"kind": "arc", "name": "arc", "span_deg": 60}),
                "num_frames": 8,
                "failure_reason": None if status == "scored" else "RuntimeError: out of memory",
                "pose_accuracy": 0.5 + 0.1 * i if status == "scored" else None,
                "pose_failed": False,
                "pose_method": "sfm",
                "registered_frames": 8,
                "multiview_consistency": 0.2,
                "identity": 0.4,
                "text_alignment": 0.25,
                "clip_image_similarity": 0.8,
                "generate_seconds": 3.0,
                "peak_gpu_memory_gib": None,
                "covered_fraction": 0.7,
                "clip_model": "tiny random CLIP (seed 0)",
                "distance_model": "tiny random CLIP (seed 0), embedding cosine (not DreamSim)",
            }
        )
    results = pd.DataFrame(rows)
    page = write_report(str(out), results, aggregate(results))
    state = _render(browser, page, tmp_path / "report.png")
    assert state["errors"] == [] and state["broken"] == [], state
    assert state["summary"] and state["images"] == 2 * 2 and state["overflow"] <= 0, state
    text = browser.find_element("tag name", "body").text
    assert "MVCustom (paper)" in text and "generation_failed: RuntimeError: out of memory" in text
    assert "Subject(s): teddy." in text
    assert (tmp_path / "report.png").stat().st_size > 0
