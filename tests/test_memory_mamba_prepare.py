"""tools/prepare_dataset.py on generated copies of each public layout (tiny real images)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prepare_dataset", REPO / "tools" / "prepare_dataset.py")
prep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prep)

LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 12345\n"
)


def touch(path: Path, grey: bool = False, value: int = 0) -> None:
    """A real 8x8 image (format from the suffix): every file is decoded by the tool."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (8, 8) if grey else (8, 8, 3)
    assert cv2.imwrite(str(path), np.full(shape, value % 256, np.uint8))


def write_mask(path: Path, counts: dict[int, int], size: int = 8) -> None:
    """A single-channel PNG mask holding ``counts[v]`` pixels of value ``v`` (rest background)."""
    flat = np.zeros(size * size, np.uint8)
    start = 0
    for value, n in counts.items():
        flat[start : start + n] = value
        start += n
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), flat.reshape(size, size))


def square(label: str, side: float, x: float = 0.0) -> dict:
    pts = [[x, 0.0], [x + side, 0.0], [x + side, side], [x, side]]
    return {"label": label, "points": pts, "shape_type": "polygon"}


def write_json(path: Path, image_name: str, shapes: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": "5.4.1", "shapes": shapes, "imagePath": f"..\\images\\{image_name}", "imageData": None}
    path.write_text(json.dumps(doc), encoding="utf-8")


def listing(dst: Path) -> dict[str, dict[str, list[str]]]:
    return {
        split: {c.name: sorted(f.name for f in c.iterdir()) for c in sorted((dst / split).iterdir())}
        for split in ("train", "val")
    }


def leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name))


def test_gc10_numbered_folders(tmp_path: Path) -> None:
    src = tmp_path / "gc10"
    for k in range(1, 11):
        for i in range(10):
            touch(src / str(k) / f"img_{k:02d}_{i}.jpg")
    (src / "lable").mkdir()
    (src / "lable" / "img_01_0.xml").write_text("<annotation/>")
    assert prep.main(["gc10", str(src), str(tmp_path / "out")]) == 0
    out = listing(tmp_path / "out")
    assert sorted(out["train"]) == sorted(prep.GC10_CLASSES.values())
    assert all(len(v) == 8 for v in out["train"].values()) and all(len(v) == 2 for v in out["val"].values())
    # deterministic: a second run gives the same split; another seed a different one
    assert prep.main(["gc10", str(src), str(tmp_path / "again")]) == 0
    assert listing(tmp_path / "again") == out
    assert prep.main(["gc10", str(src), str(tmp_path / "seed1"), "--seed", "1"]) == 0
    assert listing(tmp_path / "seed1") != out


def test_gc10_kaggle_copy_names_normalised(tmp_path: Path) -> None:
    src = tmp_path / "kaggle"
    names = [
        "punching_hole",
        "welding line",
        "crescent_gap",
        "Water_spot",
        "oil-spot",
        "silk_spot",
        "inclusion",
        "rolled_pit",
        "crease",
        "waist folding",
    ]
    for name in names:
        for i in range(5):
            touch(src / "images" / "images" / name / f"img_{name[:3]}_{i}.jpg")
    (src / "label" / "label").mkdir(parents=True)
    (src / "label" / "label" / "img_pun_0.xml").write_text("<annotation/>")
    assert prep.main(["gc10", str(src), str(tmp_path / "out")]) == 0
    out = listing(tmp_path / "out")
    assert sorted(out["train"]) == sorted(out["val"]) == sorted(prep.GC10_CLASSES.values())
    assert sum(len(v) for split in out.values() for v in split.values()) == 50
    assert prep.normalise_name("Waist  Folding") == "waist_folding"


def test_git_lfs_pointer_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "NEU-CLS"
    for prefix in ("Cr", "In"):
        for i in range(1, 4):
            touch(src / f"{prefix}_{i}.bmp")
    pointer = src / "In_2.bmp"
    pointer.write_bytes(LFS_POINTER)
    assert len(LFS_POINTER) < 200
    assert prep.main(["neu", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(pointer) in err
    assert "Git-LFS" in err and "git lfs pull" in err
    assert leftovers(tmp_path) == []


def test_non_image_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "gc10"
    for k in ("1", "2"):
        for i in range(3):
            touch(src / k / f"{k}_{i}.jpg")
    fake = src / "2" / "2_9.jpg"
    fake.write_text("not an image at all\n")
    assert prep.main(["gc10", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(fake) in err and "not an image" in err
    assert leftovers(tmp_path) == []


def aluminum_release(root: Path) -> dict[str, str]:
    """A tiny copy of dataset_toolbox/aluminum; returns the expected class per image stem."""
    expected = {}
    # mask areas decide (the json, which disagrees, is not used when there is a mask)
    cases = {
        "1": ({1: 10, 3: 20}, "zang_wu"),  # two types: the larger wins
        "2": ({2: 30, 4: 5}, "ca_shang"),
        "3": ({1: 7, 2: 7}, "zhe_zhou"),  # tie: the earlier label
        "4": ({4: 9}, "zhen_kong"),
        "5": ({3: 6, 4: 2, 1: 1}, "zang_wu"),
        "6": ({1: 12, 2: 3}, "zhe_zhou"),
    }
    for stem, (counts, cls) in cases.items():
        touch(root / "images" / f"{stem}.jpg", grey=stem in "135")  # grey and colour mixed
        write_mask(root / "masks" / f"{stem}.png", counts)
        write_json(root / "json" / f"{stem}.json", f"{stem}.jpg", [square("zhen_kong", 100)])
        expected[stem] = cls
    return expected


def test_aluminum_release_largest_mask_area(tmp_path: Path) -> None:
    src = tmp_path / "dataset_toolbox" / "aluminum"
    expected = aluminum_release(src)
    (src / "masklabel").mkdir()  # the toolbox's plot folder: no images, not a class
    assert prep.main(["aluminum", str(src), str(tmp_path / "out")]) == 0
    out = listing(tmp_path / "out")
    got = {Path(f).stem: cls for split in out.values() for cls, files in split.items() for f in files}
    assert got == expected
    assert set(out["train"]) | set(out["val"]) <= set(prep.ALUMINUM_LABELS)
    assert not {"images", "masks", "json"} & (set(out["train"]) | set(out["val"]))
    # the toolbox's parent folder is a wrapper and is descended into
    assert prep.plan("aluminum", tmp_path / "dataset_toolbox") == prep.plan("aluminum", src)


def test_aluminum_json_fallback(tmp_path: Path) -> None:
    src = tmp_path / "aluminum"
    shapes = {
        # polygons by area: 4x4 zhe_zhou vs 3x3 + 3x3 zang_wu (18 > 16)
        "a": ([square("zhe_zhou", 4), square("zang_wu", 3), square("zang_wu", 3, x=5)], "zang_wu"),
        # a scratch polyline counts as length x 10 px: 5 x 10 = 50 > 6x6 = 36
        "b": (
            [
                square("zhen_kong", 6),
                {"label": "ca_shang", "points": [[0, 0], [3, 4]], "shape_type": "linestrip"},
            ],
            "ca_shang",
        ),
        "c": ([square("zhen_kong", 2), square("ca_shang", 2)], "ca_shang"),  # tie: earlier label
        "d": ([square("zhe_zhou", 5), {"label": "unknown", "points": [[0, 0], [9, 0], [9, 9]]}], "zhe_zhou"),
    }
    for stem, (shape_list, _) in shapes.items():
        touch(src / "images" / f"{stem}.jpg")
        write_json(src / "json" / f"{stem}.json", f"{stem}.jpg", shape_list)
    jsons = prep.labelme_index([src / "json"])
    for stem, (_, cls) in shapes.items():
        assert prep.aluminum_class(src / "images" / f"{stem}.jpg", None, jsons) == cls
    assert prep.shoelace([(0, 0), (4, 0), (4, 3)]) == 6
    # a mask, where present, takes precedence over the json
    write_mask(src / "masks" / "a.png", {1: 3})
    assert prep.aluminum_class(src / "images" / "a.jpg", src / "masks", jsons) == "zhe_zhou"
    assert prep.main(["aluminum", str(src), str(tmp_path / "out")]) == 0
    out = listing(tmp_path / "out")
    assert sorted(set(out["train"]) | set(out["val"])) == ["ca_shang", "zhe_zhou"]


def test_aluminum_unannotated_image_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "aluminum"
    aluminum_release(src)
    lonely = src / "images" / "99.jpg"
    touch(lonely)
    assert prep.main(["aluminum", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(lonely) in err and "no annotation" in err
    assert leftovers(tmp_path) == []
    # a mask without defect pixels is refused too
    lonely.unlink()
    write_mask(src / "masks" / "4.png", {})
    assert prep.main(["aluminum", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(src / "images" / "4.jpg") in err and "no defect pixels" in err
    # images/ alone is never read as a class
    bare = tmp_path / "bare"
    for i in range(3):
        touch(bare / "images" / f"{i}.jpg")
    assert prep.main(["aluminum", str(bare), str(tmp_path / "out")]) == 2
    assert str(bare / "images" / "0.jpg") in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_annotation_folders_never_classes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "gc10"
    for folder in ("crease", "inclusion", "masks", "json", "Annotations", "LABELS", "mask"):
        for i in range(4):
            touch(src / folder / f"{folder}_{i}.png")
    assert prep.main(["gc10", str(src), str(tmp_path / "out")]) == 0
    out = listing(tmp_path / "out")
    assert sorted(out["train"]) == sorted(out["val"]) == ["crease", "inclusion"]
    # one real class plus annotation folders: refused, not read as two classes
    one = tmp_path / "one"
    for folder in ("images", "masks"):
        for i in range(3):
            touch(one / folder / f"{i}.png")
    for dataset in ("gc10", "neu", "aluminum"):
        assert prep.main([dataset, str(one), str(tmp_path / f"o_{dataset}")]) == 2
        err = capsys.readouterr().err
        assert "'masks'" not in err and ("['images']" in err or "no defect pixels" in err)
    # pre-split SRC: a masks folder inside train/ is no class either
    split = tmp_path / "split"
    for part in ("train", "val"):
        for folder in ("a", "b", "masks"):
            touch(split / part / folder / f"{part}_{folder}.png")
    assert prep.main(["neu", str(split), str(tmp_path / "copy")]) == 0
    assert listing(tmp_path / "copy") == {
        "train": {"a": ["train_a.png"], "b": ["train_b.png"]},
        "val": {"a": ["val_a.png"], "b": ["val_b.png"]},
    }


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "gc10"
    for k in ("1", "2"):
        for i in range(4):
            touch(src / k / f"{k}_{i}.jpg")
    calls = []

    def failing_copy(a, b, *args, **kwargs):
        calls.append(a)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return prep.shutil.copyfile(a, b)

    monkeypatch.setattr(prep.shutil, "copy2", failing_copy)
    assert prep.main(["gc10", str(src), str(tmp_path / "out")]) == 1
    assert len(calls) == 3 and leftovers(tmp_path) == []
    # an existing output survives a failed --overwrite untouched
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    calls.clear()
    assert prep.main(["gc10", str(src), str(tmp_path / "out"), "--overwrite"]) == 1
    assert leftovers(tmp_path) == ["out"] and (tmp_path / "out" / "keep.txt").read_text() == "old"


def test_existing_destination(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "gc10"
    for k in ("1", "2"):
        for i in range(4):
            touch(src / k / f"{k}_{i}.jpg")
    dst = tmp_path / "out"
    dst.mkdir()  # an empty folder is simply filled
    assert prep.main(["gc10", str(src), str(dst)]) == 0
    first = listing(dst)
    (dst / "stale.txt").write_text("old")
    assert prep.main(["gc10", str(src), str(dst), "--seed", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (dst / "stale.txt").exists() and listing(dst) == first
    assert prep.main(["gc10", str(src), str(dst), "--seed", "3", "--overwrite"]) == 0
    assert not (dst / "stale.txt").exists() and sorted(listing(dst)["train"]) == [
        "punching_hole",
        "welding_line",
    ]
    assert leftovers(tmp_path) == ["out"]
    # the output may not swallow its own source
    assert prep.main(["gc10", str(dst / "train"), str(dst), "--overwrite"]) == 2
    assert "SRC" in capsys.readouterr().err and (dst / "train").is_dir()


def test_neu_flat_release(tmp_path: Path) -> None:
    src = tmp_path / "NEU-CLS"
    for prefix in ("Cr", "In", "Pa", "PS", "RS", "Sc"):
        for i in range(1, 31):
            touch(src / f"{prefix}_{i}.bmp", grey=True)
    assert prep.main(["neu", str(src), str(tmp_path / "out")]) == 0
    out = listing(tmp_path / "out")
    assert set(out["train"]) == set(prep.NEU_CLASSES.values())
    n_train = sum(map(len, out["train"].values()))
    assert n_train == 6 * round(30 * 228 / 3600) and n_train + sum(map(len, out["val"].values())) == 180


def test_mt_skips_masks(tmp_path: Path) -> None:
    src = tmp_path / "Magnetic-tile-defect-datasets."
    for folder in prep.MT_CLASSES:
        for i in range(10):
            touch(src / folder / "Imgs" / f"exp{i}.jpg", grey=True)
            (src / folder / "Imgs" / f"exp{i}.png").write_bytes(LFS_POINTER)  # masks: never read
    assert prep.main(["mt", str(src), str(tmp_path / "out"), "--link"]) == 0
    out = listing(tmp_path / "out")
    files = [f for split in out.values() for names in split.values() for f in names]
    assert len(files) == 60 and all(f.endswith(".jpg") for f in files)
    assert (tmp_path / "out" / "train" / "blowhole" / out["train"]["blowhole"][0]).is_symlink()


def test_aluminum_class_folders_and_presplit(tmp_path: Path) -> None:
    src = tmp_path / "alu"
    for name in ("dirty", "scratch"):
        for i in range(5):
            touch(src / name / f"{i}.png")
    assert prep.main(["aluminum", str(src), str(tmp_path / "out")]) == 0
    assert prep.main(["neu", str(tmp_path / "out"), str(tmp_path / "copy")]) == 0  # already split: kept
    assert listing(tmp_path / "copy") == listing(tmp_path / "out")


@pytest.mark.parametrize("dataset", ["gc10", "neu", "mt", "aluminum"])
def test_unknown_layout_lists_expectations(
    tmp_path: Path, dataset: str, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "weird"
    src.mkdir()
    (src / "readme.txt").write_text("hello")
    assert prep.main([dataset, str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Expected:" in err and prep.EXPECTED_LAYOUTS[dataset] in err
