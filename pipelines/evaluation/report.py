"""The HTML report (``<output>/report/index.html``): Table 2's layout per variant beside the
paper's published rows, per-trajectory rows, then per sample its frames, cameras, STT radius,
anchor coverage and why a score is 0."""

from __future__ import annotations

import json

import fsspec

from pipelines.evaluation.spec import safe_name

#: Table 2's columns: (results column, short name, better direction, format).
REPORT_COLUMNS = (
    ("pose_accuracy", "CPA", "↑", "{:.3f}"),
    ("multiview_consistency", "MV-cons", "↓", "{:.3f}"),
    ("identity", "ID", "↓", "{:.3f}"),
    ("text_alignment", "Text", "↑", "{:.3f}"),
    ("clip_image_similarity", "CLIP-I", "↑", "{:.3f}"),
    ("generate_seconds", "s/sample", "↓", "{:.1f}"),
    ("peak_gpu_memory_gib", "GiB", "↓", "{:.1f}"),
)

#: Against the true view at each requested camera (subjects with ``ground_truth``): shown as a
#: second table when the results have them.
TRUTH_COLUMNS = (
    ("psnr_truth", "PSNR", "↑", "{:.2f}"),
    ("psnr_truth_subject", "PSNR subj.", "↑", "{:.2f}"),
    ("ssim_truth", "SSIM", "↑", "{:.3f}"),
    ("ssim_truth_subject", "SSIM subj.", "↑", "{:.3f}"),
    ("identity_truth", "ID-truth", "↓", "{:.3f}"),
    ("rotation_error_deg", "rot. err °", "↓", "{:.1f}"),
    ("translation_error_deg", "transl. dir. err °", "↓", "{:.1f}"),
)

#: The paper's published figures (PAPER.md §6, Table 2 and Table A1), for the report's context:
#: mean, or (mean, std). They come from the paper's models and its (partly unstated) metric
#: definitions, never from this code.
PUBLISHED = {
    "MVCustom (paper)": {
        "pose_accuracy": (0.735, 0.10),
        "multiview_consistency": (0.121, 0.10),
        "identity": (0.448, 0.11),
        "text_alignment": 0.744,
        "clip_image_similarity": (0.933, 0.048),
        "generate_seconds": 130.92,
        "peak_gpu_memory_gib": 19.29,
    },
    "CustomDiffusion360 (paper)": {
        "pose_accuracy": (0.0, 0.0),
        "multiview_consistency": 0.190,
        "identity": 0.417,
        "text_alignment": 0.806,
    },
    "Txt-MV gen, CameraCtrl + DB/LoRA (paper)": {
        "pose_accuracy": 0.283,
        "multiview_consistency": 0.116,
        "identity": 0.557,
        "text_alignment": 0.723,
    },
    "Custom Img + Img-MV gen, SEVA (paper)": {
        "pose_accuracy": 0.675,
        "multiview_consistency": (0.214, 0.15),
        "identity": (0.504, 0.12),
        "text_alignment": 0.676,
        "clip_image_similarity": (0.877, 0.067),
    },
}


def _cell(value, fmt: str, std=None) -> str:
    if value is None or value != value:
        return "–"
    out = fmt.format(value)
    if std is not None and std == std:
        out += " ± " + fmt.format(std)
    return out


def summary_rows(table, level: str, columns=REPORT_COLUMNS) -> list[dict]:
    """Rows of Table 2's layout (or another of ``columns``) from :func:`aggregate`'s table at
    ``level`` (``all`` or ``by_trajectory``): per row its label, ``n`` and one formatted cell
    per column."""
    if table is None or not len(table):
        return []
    rows = []
    for r in table[table["level"] == level].to_dict("records"):
        label = r["variant"] + (f" / {r['trajectory_name']}" if level == "by_trajectory" else "")
        # a column absent from the results (None) or empty for this row (NaN) counts no sample
        counts = [n for c, *_ in columns if (n := r.get(f"{c}_count")) is not None and n == n]
        cells = {short: _cell(r.get(f"{c}_mean"), fmt, r.get(f"{c}_std")) for c, short, _, fmt in columns}
        rows.append({"label": label, "n": int(max(counts)) if counts else 0, **cells})
    return rows


def _html_table(rows: list[dict], css_class: str = "", columns=REPORT_COLUMNS) -> str:
    import html

    head = "<th>method</th><th>n</th>" + "".join(
        f"<th>{short} {arrow}</th>" for _, short, arrow, _ in columns
    )
    body = "".join(
        f"<tr class='{css_class}'><td>{html.escape(r['label'])}</td><td>{r['n']}</td>"
        + "".join(f"<td>{html.escape(r[short])}</td>" for _, short, _, _ in columns)
        + "</tr>"
        for r in rows
    )
    return f"<table class='summary'><tr>{head}</tr>{body}</table>"


def _published_rows() -> list[dict]:
    rows = []
    for label, figures in PUBLISHED.items():
        cells = {}
        for c, short, _, fmt in REPORT_COLUMNS:
            v = figures.get(c)
            mean, std = (v if isinstance(v, tuple) else (v, None)) if v is not None else (None, None)
            cells[short] = _cell(mean, fmt, std)
        rows.append({"label": label, "n": "–", **cells})
    return rows


def _zero_reason(r: dict) -> str:
    """Why a sample failed or a pose score is 0, in words (empty when nothing needs saying)."""
    if r.get("status") != "scored":
        return f"{r.get('status')}: {r.get('failure_reason') or 'no reason recorded'}"
    if r.get("pose_failed"):
        return f"pose accuracy 0: {r.get('pose_failure_reason') or 'the reconstruction failed'}"
    if r.get("pose_accuracy") == 0:
        return f"pose accuracy 0: no frame pair within the pose threshold ({r.get('pose_method')})"
    return ""


def write_report(output: str, results, table, run_url: str | None = None) -> str:
    """``<output>/report/index.html``, read like a results section: the metric models and what
    the figures can be compared with; a summary per variant in Table 2's layout (mean ± std, n)
    beside the paper's published rows; per-trajectory rows; then per sample its frames, the
    requested vs recovered cameras, the rendered anchor's coverage and why a score is 0. The
    images are copied beside the page, so the ``report/`` folder stands alone (MLflow logs it)."""
    import html

    out = output.rstrip("/")
    fs, root = fsspec.core.url_to_fs(f"{out}/report")
    fs.makedirs(f"{root}/images", exist_ok=True)
    records = results.to_dict("records") if len(results) else []
    scored = [r for r in records if r.get("status") == "scored"]
    models = {k: sorted({str(r[k]) for r in scored if r.get(k)}) for k in ("clip_model", "distance_model")}
    tiny = any("tiny random" in m for m in models["clip_model"])
    dreamsim = bool(models["distance_model"]) and all(
        m.startswith("DreamSim") for m in models["distance_model"]
    )
    subjects = sorted(
        {
            str(r["subject"]) + (f" (sequence {r['sequence']})" if isinstance(r.get("sequence"), str) else "")
            for r in records
            if r.get("subject")
        }
    )
    notes = [
        f"{len(scored)} of {len(records)} sample(s) scored. Subject(s): {html.escape(', '.join(subjects) or '–')}.",
        f"Text alignment and CLIP-I: {html.escape(', '.join(models['clip_model']) or '–')}. "
        f"MV-cons and ID: {html.escape(', '.join(models['distance_model']) or '–')}.",
    ]
    # which STT radius the samples were made at, and why (the model's training record, the
    # config, a variant, or the stated -1 default): figures at another radius are another model
    radii = sorted(
        {
            (int(r["stt_radius"]), str(r.get("stt_radius_source") or "source not recorded"))
            for r in records
            if isinstance(r.get("stt_radius"), int | float) and r["stt_radius"] == r["stt_radius"]
        }
    )
    if radii:
        notes.append("STT radius: " + html.escape("; ".join(f"{v} ({src})" for v, src in radii)) + ".")
    if tiny:
        notes.append(
            "<b>These metric models are tiny and random (the demo, tests): the figures check that the "
            "pipeline runs and mean nothing about the model; they are not comparable with the published rows.</b>"
        )
    elif not dreamsim:
        notes.append(
            "MV-cons and ID are not DreamSim distances here (a labelled fallback): not comparable with the paper's."
        )
    notes.append(
        "Published rows are the paper's figures (Table 2; CLIP-I from Table A1; cost as reported, GPU unstated), "
        "from its models and its metric definitions, which the paper leaves partly open (our CPA is our own "
        "definition): context, not a like-for-like comparison."
    )
    truth = any(isinstance(r.get("psnr_truth"), int | float) for r in scored)
    samples = []
    for r in records:
        sid = r["sample_id"]
        imgs = []
        for name in ("grid", "truth_grid", "trajectory"):
            src = f"{out}/samples/{sid}/{name}.png"
            sfs, spath = fsspec.core.url_to_fs(src)
            if sfs.exists(spath):
                dest = f"{root}/images/{safe_name(sid)}_{name}.png"
                if not fs.exists(dest) or fs.size(dest) != sfs.size(spath):  # a rerun copies what changed
                    with sfs.open(spath, "rb") as f, fs.open(dest, "wb") as g:
                        g.write(f.read())
                imgs.append(f"<img alt='{name}' src='images/{safe_name(sid)}_{name}.png'>")
        figures = " · ".join(
            f"{short} {fmt.format(r[c])}"
            for c, short, _, fmt in (*REPORT_COLUMNS, *TRUTH_COLUMNS)
            if isinstance(r.get(c), int | float) and r.get(c) == r.get(c)
        )
        cov = r.get("covered_fraction")
        extra = [
            f"trajectory {html.escape(str(json.loads(r['trajectory']).get('name', '')))}",
            html.escape(r["variant"]),
        ]
        radius = r.get("stt_radius")
        if isinstance(radius, int | float) and radius == radius:
            extra.append(f"STT radius {int(radius)}")
        if isinstance(cov, int | float) and cov == cov:
            extra.append(f"rendered anchor covers {100 * cov:.0f}% of the target latents")
        if r.get("pose_method"):
            extra.append(
                f"pose by {html.escape(str(r['pose_method']))}, {r.get('registered_frames')} of {r.get('num_frames')} frames registered"
            )
        why = _zero_reason(r)
        samples.append(
            f"<div class='sample'><h3>{html.escape(sid)}</h3><p><i>{html.escape(str(r['prompt']))}</i><br>"
            f"{'; '.join(extra)}<br>{html.escape(figures) or '–'}</p>"
            + (f"<p class='why'>{html.escape(why)}</p>" if why else "")
            + "".join(imgs)
            + "</div>"
        )
    css = (
        "body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1000px;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
        "tr.published td{color:#666;font-style:italic}img{max-width:100%;height:auto}"
        ".sample{border-top:1px solid #aaa;margin-top:1em}.why{color:#a00}.notes li{margin:.2em 0}"
    )
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>mvcustom evaluation</title>"
        f"<style>{css}</style></head><body><h1>Evaluation</h1>"
        + (f"<p>MLflow run: {html.escape(run_url)}</p>" if run_url else "")
        + "<ul class='notes'>"
        + "".join(f"<li>{n}</li>" for n in notes)
        + "</ul>"
        + "<h2 id='summary'>Summary (mean ± std over scored samples)</h2>"
        + _html_table(summary_rows(table, "all"))
        + "<p>The paper's published figures, for context:</p>"
        + _html_table(_published_rows(), "published")
        + (
            "<h2 id='truth'>Against the true views (mean ± std over scored samples)</h2>"
            "<p>The generator renders what its camera would have photographed at every requested "
            "camera: PSNR and SSIM of each frame against that true view (the whole frame, and the "
            "subject's pixels), identity to truth (the distance model's distance of each frame to "
            "its true view) and the median SfM pose errors against the requested cameras. "
            "Below each sample: its frames above the true views.</p>"
            + _html_table(summary_rows(table, "all", TRUTH_COLUMNS), columns=TRUTH_COLUMNS)
            if truth
            else ""
        )
        + "<h2>Per trajectory</h2>"
        + _html_table(summary_rows(table, "by_trajectory"))
        + "<h2>Samples</h2>"
        + "\n".join(samples)
        + "</body></html>"
    )
    url = f"{out}/report/index.html"
    with fsspec.open(url, "w") as f:
        f.write(body)
    return url
