"""The generated CO3Dv2 tree, read with nothing but the format's own rules.

No project reader is used in the first tests (gzip + json, PIL + float16 reinterpretation), so a
writer bug cannot be cancelled by the same bug in our reader. The reader is then checked against
the same raw values, and against bad input.
"""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mvcustom.data import co3d

FRAME_KEYS = [
    "sequence_name",
    "frame_number",
    "frame_timestamp",
    "image",
    "depth",
    "mask",
    "viewpoint",
    "meta",
]
SEQ_KEYS = ["sequence_name", "category", "video", "point_cloud", "viewpoint_quality_score"]


def _raw_depth(path, scale):
    with Image.open(path) as im:
        depth = (
            np.frombuffer(np.array(im, dtype=np.uint16), dtype=np.float16)
            .astype(np.float32)
            .reshape(im.size[1], im.size[0])
        )
    return depth * scale


def test_layout_and_annotations_follow_co3dv2(sample_data):
    root = sample_data / "co3d"
    subset_map = json.loads((root / "category_to_subset_name_list.json").read_text())
    assert set(subset_map) == {"teddybear", "car"}
    for cat, subsets in subset_map.items():
        frames = json.loads(gzip.decompress((root / cat / "frame_annotations.jgz").read_bytes()))
        seqs = json.loads(gzip.decompress((root / cat / "sequence_annotations.jgz").read_bytes()))
        assert isinstance(frames, list) and isinstance(seqs, list) and len(seqs) == 2
        for s in seqs:
            assert list(s) == SEQ_KEYS and s["category"] == cat
            assert (
                (root / s["point_cloud"]["path"])
                .read_bytes()
                .startswith(b"ply\nformat binary_little_endian 1.0\n")
            )
        by_seq = {}
        for f in frames:
            assert list(f) == FRAME_KEYS
            assert list(f["viewpoint"]) == ["R", "T", "focal_length", "principal_point", "intrinsics_format"]
            for key in ("image", "mask"):
                assert f[key]["path"].startswith(f"{cat}/{f['sequence_name']}/")
            assert f["depth"]["path"] == f["image"]["path"].replace("/images/", "/depths/") + ".geometric.png"
            assert np.array(f["viewpoint"]["R"]).shape == (3, 3)
            by_seq.setdefault(f["sequence_name"], []).append(f["frame_number"])
        for numbers in by_seq.values():  # 0-based, continuous
            assert sorted(numbers) == list(range(len(numbers)))
        for subset in subsets:
            sl = json.loads((root / cat / "set_lists" / f"set_lists_{subset}.json").read_text())
            assert set(sl) == {"train", "val", "test"}
            known = {(f["sequence_name"], f["frame_number"], f["image"]["path"]) for f in frames}
            for split_entries in sl.values():
                for e in split_entries:
                    assert tuple(e) in known
            batches = json.loads((root / cat / "eval_batches" / f"eval_batches_{subset}.json").read_text())
            test = {tuple(e) for e in sl["test"]}
            assert batches and all(tuple(b[0]) in test for b in batches)


def test_images_masks_depths_decode_to_ground_truth(sample_data):
    root = sample_data / "co3d"
    checked = 0
    for cat in ("teddybear", "car"):
        frames = json.loads(gzip.decompress((root / cat / "frame_annotations.jgz").read_bytes()))
        for f in frames:
            gt = np.load(sample_data / "ground_truth" / "co3d" / cat / f"{f['sequence_name']}.npz")
            i = f["frame_number"]
            with Image.open(root / f["image"]["path"]) as im:
                assert im.format == "JPEG" and [im.size[1], im.size[0]] == f["image"]["size"]
            mask = np.array(Image.open(root / f["mask"]["path"]))
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
            assert np.array_equal(mask > 127, gt["foreground"][i])
            assert f["mask"]["mass"] == pytest.approx(gt["foreground"][i].sum())
            depth = _raw_depth(root / f["depth"]["path"], f["depth"]["scale_adjustment"])
            valid = np.array(Image.open(root / f["depth"]["mask_path"]).convert("L")) > 0
            assert 0.0 < valid.mean() < 1.0  # holes exist, as in MVS depth
            assert (depth[~valid] == 0).all()
            true = gt["depth"][i]
            rel = np.abs(depth[valid] - true[valid]) / true[valid]
            assert rel.max() < 1e-3  # float16 storage
            checked += 1
    assert checked == 4 * 8


def test_reader_matches_raw_format(sample_data):
    root = str(sample_data / "co3d")
    cat = co3d.load_category(root, "car")
    assert len(cat.sequences) == 2 and sum(len(v) for v in cat.frames_by_sequence.values()) == 16
    fa = cat.frames_by_sequence[next(iter(cat.sequences))][3]
    gt = np.load(sample_data / "ground_truth" / "co3d" / "car" / f"{fa.sequence_name}.npz")
    depth = co3d.load_depth(root, fa.depth)
    valid = co3d.load_depth_mask(root, fa.depth)
    np.testing.assert_allclose(depth[valid], gt["depth"][3][valid], rtol=1e-3)
    assert np.array_equal(co3d.load_mask(root, fa.mask) > 0.5, gt["foreground"][3])
    assert co3d.load_image(root, fa.image).shape == (*fa.image.size, 3)
    assert co3d.available_subsets(root, "car") == ["fewview_dev", "manyview_dev_0"]
    sl = co3d.load_set_list(root, "car", "manyview_dev_0")
    assert len(sl["train"]) + len(sl["test"]) == 8


def test_depth_png_round_trip():
    d = np.array([[0.0, 0.5], [3.25, 12.0]], np.float32)
    out = co3d.decode_depth_png(co3d.encode_depth_png(d, 0.7), 0.7)
    np.testing.assert_allclose(out, d, rtol=1e-3)


# --------------------------------------------------------------------------- bad input
def _write_jgz(path, obj):
    path.write_bytes(gzip.compress(json.dumps(obj).encode()))


@pytest.fixture()
def co3d_copy(sample_data, tmp_path):
    dst = tmp_path / "co3d"
    shutil.copytree(sample_data / "co3d", dst)
    return dst


def test_corrupt_annotation_file_is_named(co3d_copy):
    (co3d_copy / "car" / "frame_annotations.jgz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"car/frame_annotations\.jgz: not a valid gzip-compressed JSON"):
        co3d.load_category(str(co3d_copy), "car")


def test_missing_file_is_named(co3d_copy):
    (co3d_copy / "car" / "sequence_annotations.jgz").unlink()
    with pytest.raises(FileNotFoundError, match=r"car/sequence_annotations\.jgz"):
        co3d.load_category(str(co3d_copy), "car")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda f: f["viewpoint"].pop("R"), "viewpoint.R"),
        (lambda f: f["viewpoint"].update(T=[1, 2]), "viewpoint.T"),
        (lambda f: f["viewpoint"].update(intrinsics_format="screen"), "viewpoint.intrinsics_format"),
        (lambda f: f["image"].update(size=[0, 10]), "image.size"),
        (lambda f: f.update(frame_number="three"), "frame_number"),
        (lambda f: f["depth"].update(scale_adjustment=-1), "depth.scale_adjustment"),
        (lambda f: f.pop("image"), "image"),
    ],
)
def test_malformed_frame_record_names_file_and_field(co3d_copy, mutate, field):
    path = co3d_copy / "car" / "frame_annotations.jgz"
    frames = json.loads(gzip.decompress(path.read_bytes()))
    mutate(frames[5])
    _write_jgz(path, frames)
    with pytest.raises(ValueError, match=rf"frame_annotations\.jgz: frame record 5 .*field '{field}'"):
        co3d.load_category(str(co3d_copy), "car")


def test_corrupt_depth_and_image_are_named(co3d_copy):
    cat = co3d.load_category(str(co3d_copy), "car")
    fa = cat.frames[0]
    (co3d_copy / fa.depth.path).write_bytes(b"\x89PNG broken")
    with pytest.raises(
        ValueError, match=r"depths/frame000001\.jpg\.geometric\.png: not a readable 16-bit depth PNG"
    ):
        co3d.load_depth(str(co3d_copy), fa.depth)
    (co3d_copy / fa.image.path).unlink()
    with pytest.raises(FileNotFoundError, match=r"images/frame000001\.jpg: file not found"):
        co3d.load_image(str(co3d_copy), fa.image)
    fb = cat.frames[1]
    Image.new("RGB", (7, 5)).save(co3d_copy / fb.image.path, format="JPEG")
    with pytest.raises(ValueError, match="annotation 'image.size' says"):
        co3d.load_image(str(co3d_copy), fb.image)


def test_bad_set_list_entry_is_named(co3d_copy):
    p = co3d_copy / "car" / "set_lists" / "set_lists_fewview_dev.json"
    p.write_text(json.dumps({"train": [["seq", "x"]], "val": [], "test": []}))
    with pytest.raises(ValueError, match=r"set_lists_fewview_dev\.json: field 'train\[0\]'"):
        co3d.load_set_list(str(co3d_copy), "car", "fewview_dev")
