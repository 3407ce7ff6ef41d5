"""The evaluation job (issue 6): spec expansion, trajectory placement, and the Ray Data job end
to end with a tiny model (generation actors, scoring, results, report, MLflow, resume)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mvcustom.configs import ConfigError, from_dict
from mvcustom.geometry.trajectories import orbit, place_trajectory, subject_frame
from pipelines.evaluation.spec import EvalSpec, load_spec


def test_subject_frame_recovers_the_circle_the_references_lie_on():
    refs = orbit(
        5,
        radius=2.5,
        elevation_deg=30,
        start_azimuth_deg=40,
        span_deg=120,
        target=(0.1, -0.2, 0.3),
        image_hw=(64, 64),
        fov_deg=45,
    )
    f = subject_frame(refs)
    assert torch.allclose(
        torch.tensor(f["target"], dtype=torch.float64),
        torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64),
        atol=1e-9,
    )
    assert torch.allclose(
        torch.tensor(f["up"], dtype=torch.float64),
        torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64),
        atol=1e-9,
    )
    assert f["radius"] == pytest.approx(2.5) and f["elevation_deg"] == pytest.approx(30)
    # an arc placed there starts at the first reference camera (same pose; intrinsics rescaled)
    arc = place_trajectory("arc", 4, refs, (32, 32), span_deg=60)
    assert torch.allclose(arc.w2c[0], refs.w2c[0], atol=1e-9)
    assert torch.allclose(arc.K[0], refs.resize(32, 32).K[0], atol=1e-9)
    assert len(place_trajectory("forward", 3, refs, (32, 32))) == 3
    with pytest.raises(ValueError, match="no parameter"):
        place_trajectory("forward", 3, refs, (32, 32), span_deg=10)
    with pytest.raises(ValueError, match="at least 2"):
        subject_frame(refs[:1])


def test_spec_expands_to_stable_unique_sample_ids(tmp_path):
    spec = {
        "subjects": [{"name": "teddy", "shards": "s"}],
        "prompts": ["a <sks> toy", "a <sks> toy on grass"],
        "trajectories": [{"name": "arc", "kind": "arc", "span_deg": 60}],
        "seeds": [0, 1],
        "variants": {"mvcustom": {}, "plain": {"feature_rendering": False}},
    }
    rows = from_dict(EvalSpec, spec).rows(default_references=3)
    assert len(rows) == 2 * 2 * 2
    assert rows[0]["sample_id"] == "teddy-mvcustom-arc-p0-s0" and rows[0]["num_references"] == 3
    assert len({r["sample_id"] for r in rows}) == 8
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert [r["sample_id"] for r in load_spec(str(path), 3)] == [r["sample_id"] for r in rows]
    pd.DataFrame(rows).to_parquet(tmp_path / "spec.parquet")
    assert [r["sample_id"] for r in load_spec(str(tmp_path / "spec.parquet"), 3)] == [
        r["sample_id"] for r in rows
    ]
    # a typo is one config error at load time naming the file and the key, before any model
    for bad, match in (
        (
            {"trajectories": [{"name": "arc", "kind": "arcc"}]},
            r"trajectories\[0\]: unknown trajectory 'arcc'",
        ),
        (
            {"trajectories": [{"name": "z", "kind": "zoom", "span_deg": 9}]},
            r"'zoom' has no parameter\(s\) \['span_deg'\]",
        ),
        ({"trajectories": [{"name": "x"}]}, "needs a 'kind'"),
        ({"variants": {"v": {"feature_rendring": False}}}, "variant v: unknown key 'feature_rendring'"),
        ({"variants": {"v": {"feature_rendering": "no"}}}, "feature_rendering: expected true/false"),
        ({"seeds": ["one"]}, r"seeds\[0\]: expected an integer"),
        ({"subject": []}, "unknown key 'subject'"),
        ({"subjects": [{"name": "t"}]}, "shards"),
        ({"prompts": []}, "'prompts' must be non-empty"),
        ({"trajectories": [{"name": "a", "kind": "arc"}, {"name": "a", "kind": "orbit"}]}, "share an id"),
    ):
        path.write_text(yaml.safe_dump({**spec, **bad}))
        with pytest.raises(ConfigError, match=match) as e:
            load_spec(str(path), 3)
        assert str(e.value).startswith(str(path))
    bad_rows = pd.DataFrame(rows).assign(trajectory=json.dumps({"kind": "loop"}))
    bad_rows.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match=r"bad.parquet: row 0: unknown trajectory 'loop'.*\(and 5 more\)"):
        load_spec(str(tmp_path / "bad.parquet"), 3)
    with pytest.raises(ConfigError, match="not found"):
        load_spec(str(tmp_path / "missing.yaml"), 3)
    # through fsspec, like every other input
    import fsspec

    with fsspec.open("memory://specs/spec.yaml", "w") as f:
        f.write(yaml.safe_dump(spec))
    assert len(load_spec("memory://specs/spec.yaml", 3)) == 8


@pytest.mark.slow
def test_evaluation_job_generates_scores_reports_and_resumes(
    train_shards, tiny_zoedepth, tmp_path, ray_local, capsys
):
    import mlflow

    from jobs.evaluate import main
    from mvcustom.models import MVCustomModel
    from mvcustom.models.mvcustom import MVCustomConfig

    model = MVCustomModel.tiny(MVCustomConfig(subject_tokens=["<sks>"], subject_init_words=["toy"]), seed=0)
    model.save_pretrained(str(tmp_path / "model"))
    spec = {
        "subjects": [
            {"name": "teddy", "shards": train_shards, "num_references": 2},
            {"name": "ghost", "shards": train_shards, "sequence": "no-such-sequence"},
        ],
        "prompts": ["a photo of a <sks> teddybear"],
        "trajectories": [{"name": "arc40", "kind": "arc", "span_deg": 40}],
        "seeds": [0],
        "variants": {"mvcustom": {}, "plain": {"feature_rendering": False}},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--config", "jobs/configs/evaluate_debug.yaml"]
    for s in (
        f"model={tmp_path / 'model'}",
        f"depth_model={tiny_zoedepth}",
        f"spec={tmp_path / 'spec.yaml'}",
        f"output={tmp_path / 'eval'}",
        f"mlflow.tracking_uri={uri}",
        "actors=2",
    ):
        argv += ["--set", s]

    def evaluate(argv):  # the job's library call (the entry point exits 1 while samples fail)
        from mvcustom.configs import EvaluateConfig, load_config
        from pipelines.evaluation.job import run_evaluate

        return run_evaluate(load_config(EvaluateConfig, argv[1], argv[3::2]))

    first = evaluate(argv)
    assert not first["complete"] and first["lost"] == 0
    assert first["samples"] == 4 and first["scored"] == 2 and first["failed"] == 2
    assert first["generated_now"] == 2 and first["samples_per_min"] > 0
    # the ghost subject failed with a reason naming it; the others went on
    reasons = first["failure_reasons"]
    assert set(reasons) == {"ghost-mvcustom-arc40-p0-s0", "ghost-plain-arc40-p0-s0"}
    assert all("no-such-sequence" in r for r in reasons.values())
    # and the console gets that reason once, counted (pose failures of scored samples likewise)
    (ghost,) = [f for f in first["failures_by_reason"] if f["what"] == "generation_failed"]
    assert ghost["count"] == 2 and "no-such-sequence" in ghost["reason"]
    assert sorted(ghost["examples"]) == sorted(reasons)
    pose_zero = sum(f["count"] for f in first["failures_by_reason"] if f["what"] == "pose accuracy 0")
    results = pd.read_parquet(tmp_path / "eval" / "results.parquet")
    assert len(results) == 4
    ok = results[results.status == "scored"]
    for m in ("pose_accuracy", "multiview_consistency", "identity", "text_alignment"):
        assert ok[m].notna().all()
    # text alignment is scored against the class word (CLIP has never seen the subject token)
    from mvcustom.metrics import class_word_prompt

    for r in ok.itertuples():
        assert r.subject_category in ("car", "teddybear") and "<sks>" not in r.text_alignment_prompt
        assert r.text_alignment_prompt == class_word_prompt(r.prompt, r.subject_category)
    assert (ok.colmap_points >= 0).all() and ok.peak_gpu_memory_gib.isna().all()  # CPU: no GPU figure
    # a model saved without a training record samples at -1, stated per sample and for the run
    assert (ok.stt_radius == -1).all() and ok.stt_radius_source.str.startswith("default -1 (no ").all()
    assert first["stt_radius"] == -1 and first["stt_radius_source"].startswith("default -1 (no ")
    # 32x32 frames of a random model do not reconstruct: scored 0 and flagged, not dropped
    assert (ok.pose_accuracy[ok.pose_failed] == 0).all()
    assert pose_zero == int(ok.pose_failed.sum())
    rendered = ok[ok.variant == "mvcustom"].iloc[0]
    assert 0 < rendered.covered_fraction <= 1
    agg = pd.read_csv(tmp_path / "eval" / "aggregate.csv")
    assert set(agg.variant) == {"mvcustom", "plain"} and "pose_accuracy_mean" in agg
    sample = tmp_path / "eval" / "samples" / "teddy-mvcustom-arc40-p0-s0"
    assert (sample / "frame_003.png").exists() and (sample / "trajectory.png").exists()
    report = Path(first["report"])
    page = report.read_text()
    assert "teddy-plain-arc40-p0-s0" in page
    # a results section: Table 2's layout per variant beside the paper's rows, the models named
    # and flagged as tiny, why each failed sample failed, and images that resolve beside the page
    assert "<h2 id='summary'>" in page and "CPA ↑" in page and "MV-cons ↓" in page and "CLIP-I ↑" in page
    assert "MVCustom (paper)" in page and "0.735 ± 0.100" in page and "tiny and random" in page
    assert "no-such-sequence" in page and "rendered anchor covers" in page
    assert "Subject(s): ghost (sequence no-such-sequence), teddy." in page
    images = re.findall(r"src='([^']+)'", page)
    assert len(images) == 2 * 2 and all((report.parent / i).is_file() for i in images)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(first["mlflow_run_id"])
    assert {"mvcustom/pose_accuracy_mean", "plain/identity_mean", "scored"} <= set(run.data.metrics)
    assert run.data.params["stt_radius_used"] == "-1" and run.data.params["sampling.stt_radius"] == "None"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.parquet", "aggregate.csv", "report", "samples", "results_table.json"} <= arts
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/index.html", "report/images"} <= logged  # the page stands alone in MLflow

    # rerun: the scored samples are skipped, the failed ones tried again
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "evaluation INCOMPLETE: 2 of 4" in err
    assert len(re.findall(r"^  2 x generation_failed: .*no-such-sequence", err, re.M)) == 1, err
    second = evaluate(argv)
    assert second["skipped_already_scored"] == 2 and second["generated_now"] == 0 and second["failed"] == 2
    # a generated but unscored sample is scored without generating it again
    (sample / "result.json").unlink()
    before = (sample / "frame_000.png").stat().st_mtime_ns
    third = evaluate(argv)
    assert third["scored_only"] == 1 and third["skipped_already_scored"] == 1 and third["scored"] == 2
    assert (sample / "frame_000.png").stat().st_mtime_ns == before
    again = json.loads((sample / "result.json").read_text())
    assert again["multiview_consistency"] == pytest.approx(
        ok[ok.sample_id == sample.name].multiview_consistency.iloc[0]
    )

    # a truncated result.json (a writer killed mid-write) is redone, not a crash
    (sample / "result.json").write_text('{"sample_id": "teddy-mvc')
    fourth = evaluate(argv)
    assert fourth["scored_only"] == 1 and fourth["scored"] == 2
    assert json.loads((sample / "result.json").read_text())["status"] == "scored"
    assert not list((tmp_path / "eval").rglob("*.tmp-*")), "atomic writes leave no temporaries"

    # another model (or other sampling) into the same output is refused before anything runs
    other = MVCustomModel.tiny(MVCustomConfig(subject_tokens=["<sks>"], subject_init_words=["toy"]), seed=1)
    other.save_pretrained(str(tmp_path / "model2"))
    with pytest.raises(ValueError, match="model.*new output"):
        evaluate([*argv, "--set", f"model={tmp_path / 'model2'}"])
    with pytest.raises(ValueError, match="sampling.num_inference_steps"):
        evaluate([*argv, "--set", "sampling.num_inference_steps=3"])


def test_evaluation_samples_at_the_radius_the_model_was_trained_at(train_shards, tmp_path, monkeypatch):
    """A stage 1 stopped before its radius schedule ends exports a model trained up to radius 1
    (its ``mvcustom_training.json``, here in object storage: memory:// stands in for s3://): the
    evaluation samples at 1 unless ``sampling.stt_radius`` overrides it; a folder without the
    record samples at -1 and says so. Checked at what reaches the pipeline and in the results."""
    import fsspec

    from mvcustom.configs import EvaluateConfig, from_dict
    from mvcustom.configs.base import to_dict
    from mvcustom.inference.pipeline import MVCustomOutput, MVCustomPipeline
    from mvcustom.models import MVCustomModel
    from mvcustom.models.mvcustom import MVCustomConfig
    from mvcustom.training.loop import TRAINING_RECORD
    from pipelines.evaluation.generate import GenerateSamples
    from pipelines.evaluation.job import eval_fingerprint

    model = MVCustomModel.tiny(MVCustomConfig(subject_tokens=["<sks>"], subject_init_words=["toy"]), seed=0)
    model.save_pretrained(str(tmp_path / "plain"))  # weights saved by hand: no training record
    memory = fsspec.filesystem("memory")
    memory.put(f"{tmp_path / 'plain'}/", "/evaluate-radius/export", recursive=True)
    export = "memory://evaluate-radius/export"
    with fsspec.open(f"{export}/{TRAINING_RECORD}", "w") as f:  # what export_model writes
        json.dump({"stage": "backbone", "steps": 3, "final_stt_radius": 1}, f)
    spec = {
        "subjects": [{"name": "teddy", "shards": train_shards, "num_references": 2}],
        "prompts": ["a photo of a <sks> teddybear"],
        "trajectories": [{"name": "arc", "kind": "arc", "span_deg": 40, "num_frames": 2}],
        "seeds": [0],
        "variants": {"main": {}, "r0": {"radius": 0}},  # a variant's radius wins over both
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    rows = load_spec(str(tmp_path / "spec.yaml"), 2)
    radii = []

    def spy(self, prompt, cameras, refs, *, options, **kwargs):
        # the options the pipeline is called with; the frames of a real call cost seconds of
        # UNet each and say nothing about the radius (the end-to-end test above generates)
        radii.append(options.radius)
        frames = np.zeros((1, len(cameras), *cameras.image_hw[0].tolist(), 3), np.uint8)
        return MVCustomOutput(frames, [{}])

    monkeypatch.setattr(MVCustomPipeline, "__call__", spy)

    def config(model: str, **sampling):
        raw = to_dict(EvaluateConfig.debug())
        raw["sampling"].update(sampling)
        return from_dict(EvaluateConfig, {**raw, "model": model, "output": str(tmp_path / "eval")}, "test")

    def generate(cfg) -> list[tuple]:
        radii.clear()
        gen = GenerateSamples(to_dict(cfg))
        metas = [gen.generate(row) for row in rows]
        assert radii == [m["stt_radius"] for m in metas]  # what reached the pipeline, per sample
        return [(m["variant"], m["stt_radius"], m["stt_radius_source"]) for m in metas]

    assert generate(config(export)) == [("main", 1, TRAINING_RECORD), ("r0", 0, "variant option radius")]
    assert generate(config(export, stt_radius=-1)) == [
        ("main", -1, "sampling.stt_radius"),
        ("r0", 0, "variant option radius"),
    ]
    fallback = f"default -1 (no {TRAINING_RECORD} in the model folder)"
    assert generate(config(str(tmp_path / "plain")))[0] == ("main", -1, fallback)
    # resuming compares the radius used, not how it was asked for
    assert eval_fingerprint(config(export)) == eval_fingerprint(config(export, stt_radius=1))
    assert eval_fingerprint(config(export)) != eval_fingerprint(config(export, stt_radius=-1))
    # a record that cannot be read is refused by name before any sample, never taken as -1
    with fsspec.open(f"{export}/{TRAINING_RECORD}", "w") as f:
        json.dump({"stage": "backbone", "final_stt_radius": "full"}, f)
    with pytest.raises(
        ValueError, match=r"export/mvcustom_training.json: final_stt_radius must be an integer"
    ):
        GenerateSamples(to_dict(config(export)))
    with pytest.raises(ConfigError, match=r"sampling.stt_radius must be >= 0, -1 .* or null"):
        config(export, stt_radius=-2)
    memory.rm("/evaluate-radius", recursive=True)


def test_report_and_aggregate_name_the_stt_radius_of_the_samples(tmp_path):
    import pandas as pd

    from pipelines.evaluation.report import write_report
    from pipelines.evaluation.score import METRICS, aggregate

    traj = json.dumps({"kind": "arc", "name": "arc"})
    base = {
        "status": "scored",
        "prompt": "p",
        "trajectory": traj,
        "generate_seconds": 1.0,
        "peak_gpu_memory_gib": None,
        **dict.fromkeys(METRICS, 0.5),
    }
    results = pd.DataFrame(
        [
            {
                **base,
                "sample_id": "a",
                "variant": "main",
                "stt_radius": 1,
                "stt_radius_source": "mvcustom_training.json",
            },
            {
                **base,
                "sample_id": "b",
                "variant": "r0",
                "stt_radius": 0,
                "stt_radius_source": "variant option radius",
            },
            {
                "sample_id": "c",
                "variant": "main",
                "status": "generation_failed",
                "prompt": "p",
                "trajectory": traj,
            },
        ]
    )
    table = aggregate(results)
    overall = table[table.level == "all"]
    assert dict(zip(overall.variant, overall.stt_radius, strict=True)) == {"main": "1", "r0": "0"}
    page = Path(write_report(str(tmp_path / "out"), results, table)).read_text()
    assert "STT radius: 0 (variant option radius); 1 (mvcustom_training.json)." in page
    assert "STT radius 1" in page


def test_model_identity_hashes_each_local_file_once_per_change(tmp_path):
    """Weights are hashed by content, and the hash is reused while size and mtime stand."""
    import os

    from pipelines.evaluation.job import model_identity

    (tmp_path / "m").mkdir()
    w = tmp_path / "m" / "weights.bin"
    w.write_bytes(b"a" * 100)
    cache: dict = {}
    first = model_identity(str(tmp_path / "m"), cache)
    assert list(cache) == [str(w)] and cache[str(w)][2] == first["weights.bin"]
    st = os.stat(w)
    w.write_bytes(b"b" * 100)  # same size; put the mtime back: the cached hash stands
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_identity(str(tmp_path / "m"), cache) == first
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    assert model_identity(str(tmp_path / "m"), cache) != first
    assert model_identity(str(tmp_path / "m")) == model_identity(str(tmp_path / "m"), {})


def test_remote_outputs_log_the_same_artifacts_as_local_ones(tmp_path):
    """An evaluation writing to an object store (memory:// stands in for s3://) logs its files
    and folders to MLflow by copying them through fsspec."""
    import fsspec
    import mlflow

    from mvcustom.training.tracking import log_artifact

    fs = fsspec.filesystem("memory")
    fs.pipe("/evalout/results.parquet", b"table")
    fs.pipe("/evalout/report/index.html", b"<html></html>")
    fs.pipe("/evalout/report/images/a_grid.png", b"png")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("remote-artifacts", artifact_location=str(tmp_path / "artifacts"))
    rid = client.create_run(exp).info.run_id
    log_artifact(client, rid, "memory://evalout/results.parquet", None)
    log_artifact(client, rid, "memory://evalout/report", "report")
    log_artifact(client, rid, "memory://evalout/missing.csv", None)  # absent: skipped
    assert {a.path for a in client.list_artifacts(rid)} == {"results.parquet", "report"}
    assert {a.path for a in client.list_artifacts(rid, "report")} == {"report/index.html", "report/images"}
    local = client.download_artifacts(rid, "report/images/a_grid.png", str(tmp_path))
    assert Path(local).read_bytes() == b"png"


def test_summary_rows_with_a_metric_column_missing_entirely():
    """Results scored without some metric (its columns absent from the aggregate) still make the
    report's rows; the missing cells are blank (this raised a TypeError comparing None with ints)."""
    import pandas as pd

    from pipelines.evaluation.report import REPORT_COLUMNS, summary_rows

    table = pd.DataFrame(
        [
            {
                "level": "all",
                "variant": "main",
                "pose_accuracy_mean": 0.5,
                "pose_accuracy_std": 0.1,
                "pose_accuracy_count": 3,
            }
        ]
    )
    (row,) = summary_rows(table, "all")
    assert row["label"] == "main" and row["n"] == 3
    cpa = next(short for c, short, *_ in REPORT_COLUMNS if c == "pose_accuracy")
    assert "0.500" in row[cpa]
