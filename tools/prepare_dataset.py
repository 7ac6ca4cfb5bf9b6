#!/usr/bin/env python
"""Convert a defect dataset's public release into mmpretrain ``CustomDataset`` class folders.

    python tools/prepare_dataset.py {gc10,neu,mt,aluminum} SRC DST [--seed 0] [--link]

writes ``DST/train/<class>/*`` and ``DST/val/<class>/*`` with a deterministic per-class split
(sorted file names, shuffled with ``--seed``) whose train fraction is the MemoryMamba paper's
(Table 1). Accepted layouts (anything else is refused with a message listing these):

* ``gc10``: GC10-DET release -- class folders ``1`` ... ``10`` (or already named class folders);
  the ``lable``/``label`` XML folder is ignored.
* ``neu``: NEU-CLS -- one flat folder of ``Cr_1.bmp``, ``In_*``, ``Pa_*``, ``PS_*``, ``RS_*``,
  ``Sc_*`` images, or class folders.
* ``mt``: Magnetic-tile defects -- ``MT_Blowhole/Imgs/*.jpg`` ... ``MT_Uneven``; the ``*.png``
  masks next to the images are skipped (the paper classifies the images).
* ``aluminum``: class folders of images.

A SRC that already holds ``train/`` and ``val/`` (or ``test/``) class folders keeps its split.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

#: Image suffixes read from the releases (CustomDataset reads all of them).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
#: Paper Table 1 (train, test) sizes; the train fraction of each split comes from these.
PAPER_SPLITS: dict[str, tuple[int, int]] = {
    "aluminum": (277, 123),
    "gc10": (1834, 458),
    # The MT counts equal twice the 1,344 images: the paper evidently counted the masks too; the
    # fraction is what carries over.
    "mt": (1878, 810),
    "neu": (228, 3372),
}
#: GC10-DET folder number -> class name (GC10-DET paper).
GC10_CLASSES: dict[str, str] = {
    "1": "punching_hole",
    "2": "welding_line",
    "3": "crescent_gap",
    "4": "water_spot",
    "5": "oil_spot",
    "6": "silk_spot",
    "7": "inclusion",
    "8": "rolled_pit",
    "9": "crease",
    "10": "waist_folding",
}
#: NEU-CLS file prefix -> class name.
NEU_CLASSES: dict[str, str] = {
    "cr": "crazing",
    "in": "inclusion",
    "pa": "patches",
    "ps": "pitted_surface",
    "rs": "rolled-in_scale",
    "sc": "scratches",
}
#: Magnetic-tile folder -> class name.
MT_CLASSES: dict[str, str] = {
    "MT_Blowhole": "blowhole",
    "MT_Break": "break",
    "MT_Crack": "crack",
    "MT_Fray": "fray",
    "MT_Free": "free",
    "MT_Uneven": "uneven",
}
EXPECTED_LAYOUTS: dict[str, str] = {
    "gc10": "SRC/1 ... SRC/10 (GC10-DET class folders, images inside), or SRC/<class>/*.jpg",
    "neu": "SRC/Cr_1.bmp, SRC/In_1.bmp, ... (prefixes Cr In Pa PS RS Sc), or SRC/<class>/*.bmp",
    "mt": "SRC/MT_Blowhole/Imgs/*.jpg ... SRC/MT_Uneven/Imgs/*.jpg (masks *.png are skipped)",
    "aluminum": "SRC/<class>/*.jpg (at least two class folders)",
}
#: Names under which a pre-split SRC keeps its evaluation part.
EVAL_SPLIT_NAMES: tuple[str, ...] = ("val", "test")

ClassFiles = dict[str, list[Path]]


class LayoutError(ValueError):
    """SRC does not look like any layout this tool knows for the dataset."""


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(src: Path, names: dict[str, str] | None = None) -> ClassFiles:
    """``SRC/<class>/<images>``; ``names`` renames folders (and then only those are read)."""
    result: ClassFiles = {}
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        if names is not None and folder.name not in names:
            continue
        files = images_in(folder)
        if files:
            result[names[folder.name] if names else folder.name] = files
    return result


def read_gc10(src: Path) -> ClassFiles:
    numbered = class_folders(src, GC10_CLASSES)
    return numbered if numbered else class_folders(src)


def read_neu(src: Path) -> ClassFiles:
    result: ClassFiles = {}
    for path in images_in(src):
        prefix = path.name.split("_", 1)[0].lower()
        if prefix in NEU_CLASSES:
            result.setdefault(NEU_CLASSES[prefix], []).append(path)
    return result if result else class_folders(src)


def read_mt(src: Path) -> ClassFiles:
    result: ClassFiles = {}
    for folder, name in MT_CLASSES.items():
        imgs = src / folder / "Imgs"
        if imgs.is_dir():
            files = [p for p in images_in(imgs) if p.suffix.lower() != ".png"]
            if files:
                result[name] = files
    return result


READERS: dict[str, Callable[[Path], ClassFiles]] = {
    "aluminum": class_folders,
    "gc10": read_gc10,
    "mt": read_mt,
    "neu": read_neu,
}


def split_class(
    files: list[Path], train_fraction: float, rng: random.Random
) -> tuple[list[Path], list[Path]]:
    """Shuffle (sorted first, so the result only depends on the seed) and cut; both sides non-empty when possible."""
    files = sorted(files)
    rng.shuffle(files)
    n_train = round(len(files) * train_fraction)
    if len(files) >= 2:
        n_train = min(max(n_train, 1), len(files) - 1)
    return files[:n_train], files[n_train:]


def pre_split(src: Path) -> tuple[ClassFiles, ClassFiles] | None:
    """``(train, val)`` class folders when SRC is already split, else ``None``."""
    eval_dir = next((src / n for n in EVAL_SPLIT_NAMES if (src / n).is_dir()), None)
    if not (src / "train").is_dir() or eval_dir is None:
        return None
    return class_folders(src / "train"), class_folders(eval_dir)


def plan(dataset: str, src: Path, seed: int = 0) -> dict[str, ClassFiles]:
    """``{'train': {class: files}, 'val': {...}}`` for ``dataset`` read from ``src``."""
    if dataset not in READERS:
        raise LayoutError(f"Unknown dataset {dataset!r}; choose from {sorted(READERS)}.")
    if not src.is_dir():
        raise LayoutError(f"Source folder {src} does not exist.")
    existing = pre_split(src)
    if existing is not None and existing[0] and existing[1]:
        return {"train": existing[0], "val": existing[1]}
    classes = READERS[dataset](src)
    if len(classes) < 2:
        raise LayoutError(
            f"{src} does not look like the {dataset} release (found {len(classes)} class(es)). Expected: "
            f"{EXPECTED_LAYOUTS[dataset]}; or an already split SRC/train/<class> + SRC/val/<class>."
        )
    n_train, n_test = PAPER_SPLITS[dataset]
    fraction = n_train / (n_train + n_test)
    rng = random.Random(seed)
    result: dict[str, ClassFiles] = {"train": {}, "val": {}}
    for name in sorted(classes):
        result["train"][name], result["val"][name] = split_class(classes[name], fraction, rng)
    return result


def write(layout: dict[str, ClassFiles], dst: Path, link: bool = False) -> dict[str, int]:
    """Copy (or symlink) the planned files; returns the image count per split."""
    counts = {}
    for split, classes in layout.items():
        counts[split] = 0
        for name, files in classes.items():
            folder = dst / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for path in files:
                target = folder / path.name
                if target.exists() or target.is_symlink():
                    target.unlink()
                if link:
                    target.symlink_to(path.resolve())
                else:
                    shutil.copy2(path, target)
                counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=sorted(READERS))
    parser.add_argument("src", type=Path, help="the unpacked public release")
    parser.add_argument("dst", type=Path, help="output root (gets train/ and val/)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--link", action="store_true", help="symlink instead of copying")
    args = parser.parse_args(argv)
    try:
        layout = plan(args.dataset, args.src, args.seed)
    except LayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = write(layout, args.dst, args.link)
    classes = sorted(layout["train"])
    print(
        f"{args.dataset}: {len(classes)} classes {classes}; train {counts['train']}, val {counts['val']} -> {args.dst}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
