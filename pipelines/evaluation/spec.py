"""What an evaluation generates: the spec, a typed config (:class:`EvalSpec`) loaded through the
one config loader (:func:`mvcustom.configs.load_config`) and checked before any model loads.

YAML, a cross product::

    subjects:                       # reference views come from the subject's shards
      - {name: teddy, shards: .demo/shards/co3d, sequence: null, num_references: 2}
      # a subject from our generator: ground_truth (its ground_truth folder) adds the scores
      # against the true view at every requested camera (PSNR, SSIM, identity to truth)
      - {name: chair, shards: .demo/shards/co3d, sequence: 101_1234_5678, ground_truth: .demo/data/ground_truth}
    prompts: ["a photo of a <sks> teddybear on a beach"]
    trajectories:                   # placed around the subject (geometry.place_trajectory)
      - {name: arc60, kind: arc, span_deg: 60}
      - {name: dolly, kind: forward}
    seeds: [0, 1]
    variants:                       # optional: inference options per variant (ablations)
      mvcustom: {}
      no_rendering: {feature_rendering: false}

or parquet with one row per sample and the columns of :data:`SPEC_COLUMNS` (``trajectory`` and
``options`` as JSON strings). A sample's id is ``{subject}-{variant}-{trajectory}-p{prompt
index}-s{seed}``, so a rerun of the same spec finds what is already done.

Checked at load, so a typo is one :class:`~mvcustom.configs.ConfigError` naming the file and the
key, never N failed samples: unknown keys, wrong types, a trajectory kind or parameter its
generator does not take (:func:`~mvcustom.geometry.trajectories.check_trajectory`), a variant
option that is not an :class:`~mvcustom.inference.pipeline.InferenceOptions` field or has the
wrong type, and two samples with one id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec

from mvcustom.configs.base import ConfigError, check, from_dict, load_config

SPEC_COLUMNS = (
    "subject",
    "shards",
    "sequence",
    "num_references",
    "prompt",
    "prompt_index",
    "trajectory",
    "seed",
    "variant",
    "options",
    "ground_truth",
)
SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(text: str) -> str:
    """``text`` as a file name (what is not ``[A-Za-z0-9_.-]`` becomes ``_``)."""
    return SAFE.sub("_", str(text))


def check_trajectory_spec(t: dict) -> None:
    """A trajectory entry: ``kind``, optional ``name`` and ``num_frames``, then the generator's
    own parameters (a wrong one is refused naming those it takes)."""
    from mvcustom.geometry.trajectories import check_trajectory

    if not isinstance(t, dict) or "kind" not in t:
        raise ValueError(f"every trajectory needs a 'kind', got {t!r}")
    params = {k: v for k, v in t.items() if k not in ("kind", "name", "num_frames")}
    check_trajectory(t["kind"], params)
    if "num_frames" in t:
        check(
            isinstance(t["num_frames"], int) and t["num_frames"] >= 2,
            f"trajectory {t}: num_frames must be >= 2",
        )


def check_variant(name: str, options: dict) -> None:
    """A variant's options must be :class:`InferenceOptions` fields of the right type."""
    from mvcustom.inference.pipeline import InferenceOptions

    try:
        from_dict(InferenceOptions, dict(options or {}), f"variants.{name}")
    except ConfigError as e:  # re-raised plain, so the loader prefixes the spec's file
        raise ValueError(str(e).replace("variants.", "variant ", 1)) from None


@dataclass
class SubjectSpec:
    """A subject: its ``name`` (in sample ids and the report), the ``shards`` its reference
    views come from, the ``sequence`` to take them from (``None``: the first clip) and how many
    (``None``: the evaluation config's ``num_references``). ``ground_truth``: for a subject our
    generator made, its ``ground_truth`` folder (``mvcustom.data.generator.truth``); each sample
    is then also scored against the true view at every requested camera."""

    name: str
    shards: str
    sequence: str | None = None
    num_references: int | None = None
    ground_truth: str | None = None

    def __post_init__(self) -> None:
        check(bool(self.name) and bool(self.shards), "a subject needs a 'name' and 'shards'")
        check(self.num_references is None or self.num_references >= 1, "num_references must be >= 1")


@dataclass
class EvalSpec:
    """subjects x trajectories x prompts x seeds x variants (see the module docstring)."""

    subjects: list[SubjectSpec] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    trajectories: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"mvcustom": {}})

    def __post_init__(self) -> None:
        for key in ("subjects", "prompts", "trajectories", "seeds", "variants"):
            check(bool(getattr(self, key)), f"{key!r} must be non-empty")
        for i, t in enumerate(self.trajectories):
            try:
                check_trajectory_spec(t)
            except ValueError as e:
                raise ValueError(f"trajectories[{i}]: {e}") from None
        for name, options in self.variants.items():
            check_variant(name, options)
        ids = [sample_id(r) for r in self.rows(1)]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        check(not dup, f"samples {dup} share an id (duplicate subject or trajectory names?)")

    def rows(self, default_references: int) -> list[dict]:
        """One row per sample, the columns of :data:`SPEC_COLUMNS` plus ``sample_id``."""
        rows = []
        for subject in self.subjects:
            for t in self.trajectories:
                for pi, prompt in enumerate(self.prompts):
                    for seed in self.seeds:
                        for vname, vopts in self.variants.items():
                            row = {
                                "subject": subject.name,
                                "shards": subject.shards,
                                "sequence": subject.sequence,
                                "num_references": subject.num_references or default_references,
                                "prompt": prompt,
                                "prompt_index": pi,
                                "trajectory": json.dumps(t, sort_keys=True),
                                "seed": seed,
                                "variant": vname,
                                "options": json.dumps(vopts or {}, sort_keys=True),
                                "ground_truth": subject.ground_truth,
                            }
                            row["sample_id"] = sample_id(row)
                            rows.append(row)
        return rows


def sample_id(row: dict) -> str:
    traj = json.loads(row["trajectory"])
    parts = (
        row["subject"],
        row["variant"],
        traj.get("name", traj["kind"]),
        f"p{row['prompt_index']}",
        f"s{row['seed']}",
    )
    return "-".join(safe_name(p) for p in parts)


def _parquet_rows(path: str, default_references: int) -> list[dict]:
    import pandas as pd

    with fsspec.open(path, "rb") as f:
        df = pd.read_parquet(f)
    missing = {"subject", "shards", "prompt", "trajectory", "seed"} - set(df.columns)
    if missing:
        raise ConfigError(f"{path}: a parquet spec needs the columns {sorted(missing)}")
    rows, bad = [], []
    for i, r in enumerate(df.to_dict("records")):
        row = {
            "subject": str(r["subject"]),
            "shards": str(r["shards"]),
            "sequence": r.get("sequence"),
            "num_references": int(r.get("num_references") or default_references),
            "prompt": str(r["prompt"]),
            "prompt_index": int(r.get("prompt_index", i)),
            "trajectory": r["trajectory"]
            if isinstance(r["trajectory"], str)
            else json.dumps(r["trajectory"]),
            "seed": int(r["seed"]),
            "variant": str(r.get("variant") or "mvcustom"),
            "options": r.get("options") or "{}",
            "ground_truth": r.get("ground_truth") if isinstance(r.get("ground_truth"), str) else None,
        }
        try:
            check_trajectory_spec(json.loads(row["trajectory"]))
            check_variant(row["variant"], json.loads(row["options"]))
        except (ValueError, TypeError) as e:
            bad.append(f"row {i}: {e}")
            continue
        row["sample_id"] = sample_id(row)
        rows.append(row)
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ConfigError(f"{path}: " + "; ".join(bad[:3]) + more)
    ids = [r["sample_id"] for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{path}: samples {dup} share an id (subject/variant/trajectory names)")
    return rows


def load_spec(path: str, default_references: int) -> list[dict]:
    """The rows of a YAML (:class:`EvalSpec`) or parquet spec at any fsspec URL, checked."""
    if not path:
        raise ConfigError("spec must name the evaluation spec (YAML or parquet)")
    if path.endswith(".parquet"):
        try:
            return _parquet_rows(path, default_references)
        except FileNotFoundError:
            raise ConfigError(f"{path}: spec file not found") from None
    return load_config(EvalSpec, path).rows(default_references)
