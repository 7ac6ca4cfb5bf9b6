"""tools/prepare_dataset.py on generated copies of each public layout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prepare_dataset", REPO / "tools" / "prepare_dataset.py")
prep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prep)


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8fake")  # only copied, never decoded


def listing(dst: Path) -> dict[str, dict[str, list[str]]]:
    return {
        split: {c.name: sorted(f.name for f in c.iterdir()) for c in sorted((dst / split).iterdir())}
        for split in ("train", "val")
    }


def test_gc10_numbered_folders(tmp_path: Path) -> None:
    src = tmp_path / "gc10"
    for k in range(1, 11):
        for i in range(10):
            touch(src / str(k) / f"img_{k:02d}_{i}.jpg")
    touch(src / "lable" / "img_01_0.xml")
    assert prep.main(["gc10", str(src), str(tmp_path / "out")]) == 0
    out = listing(tmp_path / "out")
    assert sorted(out["train"]) == sorted(prep.GC10_CLASSES.values())
    assert all(len(v) == 8 for v in out["train"].values()) and all(len(v) == 2 for v in out["val"].values())
    # deterministic: a second run gives the same split; another seed a different one
    assert prep.main(["gc10", str(src), str(tmp_path / "again")]) == 0
    assert listing(tmp_path / "again") == out
    assert prep.main(["gc10", str(src), str(tmp_path / "seed1"), "--seed", "1"]) == 0
    assert listing(tmp_path / "seed1") != out


def test_neu_flat_release(tmp_path: Path) -> None:
    src = tmp_path / "NEU-CLS"
    for prefix in ("Cr", "In", "Pa", "PS", "RS", "Sc"):
        for i in range(1, 31):
            touch(src / f"{prefix}_{i}.bmp")
    assert prep.main(["neu", str(src), str(tmp_path / "out")]) == 0
    out = listing(tmp_path / "out")
    assert set(out["train"]) == set(prep.NEU_CLASSES.values())
    n_train = sum(map(len, out["train"].values()))
    assert n_train == 6 * round(30 * 228 / 3600) and n_train + sum(map(len, out["val"].values())) == 180


def test_mt_skips_masks(tmp_path: Path) -> None:
    src = tmp_path / "Magnetic-tile-defect-datasets."
    for folder in prep.MT_CLASSES:
        for i in range(10):
            touch(src / folder / "Imgs" / f"exp{i}.jpg")
            touch(src / folder / "Imgs" / f"exp{i}.png")
    assert prep.main(["mt", str(src), str(tmp_path / "out"), "--link"]) == 0
    out = listing(tmp_path / "out")
    files = [f for split in out.values() for names in split.values() for f in names]
    assert len(files) == 60 and all(f.endswith(".jpg") for f in files)
    assert (tmp_path / "out" / "train" / "blowhole" / out["train"]["blowhole"][0]).is_symlink()


def test_aluminum_and_presplit(tmp_path: Path) -> None:
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
    touch(src / "readme.txt")
    assert prep.main([dataset, str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Expected:" in err and prep.EXPECTED_LAYOUTS[dataset] in err
