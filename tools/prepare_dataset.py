#!/usr/bin/env python
"""Convert a defect dataset's public release into mmpretrain ``CustomDataset`` class folders.

    python tools/prepare_dataset.py {gc10,neu,mt,aluminum} SRC DST [--seed 0] [--link] [--overwrite]

writes ``DST/train/<class>/*`` and ``DST/val/<class>/*`` with a deterministic per-class split
(sorted file names, shuffled with ``--seed``) whose train fraction is the MemoryMamba paper's
(Table 1). Accepted layouts (anything else is refused with a message listing these):

* ``gc10``: GC10-DET -- the original release's class folders ``1`` ... ``10`` (renamed to the
  class names), or named class folders such as the Kaggle copy's ``images/images/<class>/``
  (``waist folding``, ``punching_hole``, ...). Names are normalised (lower case, spaces and
  hyphens -> ``_``), so both layouts give the same 10 classes. The XML folders are ignored.
* ``neu``: NEU-CLS -- one flat folder of ``Cr_1.bmp``, ``In_*``, ``Pa_*``, ``PS_*``, ``RS_*``,
  ``Sc_*`` images, or class folders.
* ``mt``: Magnetic-tile defects -- ``MT_Blowhole/Imgs/*.jpg`` ... ``MT_Uneven``; the ``*.png``
  masks next to the images are skipped (the paper classifies the images).
* ``aluminum``: the NETgonight/Aluminum-defect release (``dataset_toolbox/aluminum``):
  ``images/*.jpg`` with labelme ``json/<stem>.json`` and/or ``masks/<stem>.png`` (pixel values
  1-4 = ``zhe_zhou``, ``ca_shang``, ``zang_wu``, ``zhen_kong``, 0 = background), or class
  folders. Most images hold several defect types, so each gets ONE class: the defect type that
  covers the largest area -- pixels counted per value in its mask; without a mask, the labelme
  shapes' areas summed per label (polygons by the shoelace formula; ``linestrip`` scratches as
  length x 10 px, the width the release's toolbox draws them into the masks with). Ties go to the
  earlier type in the order above. An image with neither a mask nor a json, or with no defect
  pixels / shapes, is refused.

A SRC that already holds ``train/`` and ``val/`` (or ``test/``) class folders keeps its split.
Folders that hold only a single folder (archive wrappers) are descended into. Annotation folders
(``masks``, ``mask``, ``json``, ``labels``, ``label``, ``lable``, ``annotations``) are never
classes; hidden files and folders and ``__MACOSX`` are skipped.

Every image is decoded (OpenCV) before anything is written; a file that is not an image -- for
example the Git-LFS pointer files a git mirror holds until ``git lfs pull`` -- stops the run with
its path. Output goes to a temporary folder next to DST that is renamed into place only when
everything succeeded; an existing non-empty DST is refused unless ``--overwrite`` is given.
Input errors print ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

#: Image suffixes read from the releases (CustomDataset reads all of them).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
#: Folder names (compared case-insensitively) that hold annotations and are never classes.
ANNOTATION_DIRS: frozenset[str] = frozenset(
    {"masks", "mask", "json", "labels", "label", "lable", "annotations"}
)
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
#: Aluminum labelme labels in mask-value order (value 1 ... 4); ties go to the earlier one.
#: (zhe_zhou: fold, ca_shang: scratch, zang_wu: dirt, zhen_kong: pinhole.)
ALUMINUM_LABELS: tuple[str, ...] = ("zhe_zhou", "ca_shang", "zang_wu", "zhen_kong")
#: Width (px) the release's toolbox (``1.label_tool.py``) draws ``linestrip`` shapes with.
ALUMINUM_LINE_WIDTH: float = 10.0
#: labelme's colour map (RGB) for values 1 ... 4, for masks saved as colour images.
LABELME_COLOURS: tuple[tuple[int, int, int], ...] = ((128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128))
EXPECTED_LAYOUTS: dict[str, str] = {
    "gc10": "SRC/1 ... SRC/10 (GC10-DET class folders, images inside), or SRC/<class>/*.jpg "
    "such as the Kaggle copy's SRC/images/images/<class name>/*.jpg",
    "neu": "SRC/Cr_1.bmp, SRC/In_1.bmp, ... (prefixes Cr In Pa PS RS Sc), or SRC/<class>/*.bmp",
    "mt": "SRC/MT_Blowhole/Imgs/*.jpg ... SRC/MT_Uneven/Imgs/*.jpg (masks *.png are skipped)",
    "aluminum": "SRC/images/*.jpg with SRC/masks/<stem>.png and/or SRC/json/<stem>.json (labelme), "
    "or SRC/<class>/*.jpg (at least two class folders)",
}
#: Names under which a pre-split SRC keeps its evaluation part.
EVAL_SPLIT_NAMES: tuple[str, ...] = ("val", "test")
#: First bytes of a Git-LFS pointer file (what a git mirror holds instead of the image).
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"

ClassFiles = dict[str, list[Path]]


class LayoutError(ValueError):
    """SRC does not look like any layout this tool knows for the dataset, or holds bad files."""


# --------------------------------------------------------------------------- reading folders


def is_skipped(path: Path) -> bool:
    return path.name.startswith(".") or path.name == "__MACOSX"


def is_annotation_dir(path: Path) -> bool:
    return path.name.lower() in ANNOTATION_DIRS


def subdirs(folder: Path) -> list[Path]:
    """Sub-folders that may hold classes (no annotation, hidden or ``__MACOSX`` folders)."""
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not is_skipped(p) and not is_annotation_dir(p)
    )


def images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not is_skipped(p) and p.suffix.lower() in IMAGE_SUFFIXES
    )


def normalise_name(name: str) -> str:
    """``'Waist folding'`` -> ``'waist_folding'`` (lower case; spaces and hyphens -> ``_``)."""
    return re.sub(r"_+", "_", re.sub(r"[\s-]+", "_", name.strip().lower())).strip("_")


def class_folders(
    src: Path, names: dict[str, str] | None = None, rename: Callable[[str], str] | None = None
) -> ClassFiles:
    """``SRC/<class>/<images>``; ``names`` renames folders (and then only those are read),
    ``rename`` maps every other folder name. Folders that map to one name are merged."""
    result: ClassFiles = {}
    for folder in subdirs(src):
        if names is not None and folder.name not in names:
            continue
        files = images_in(folder)
        if files:
            name = names[folder.name] if names is not None else rename(folder.name) if rename else folder.name
            result.setdefault(name, []).extend(files)
    return result


def unwrap(src: Path) -> Path:
    """Descend through wrapper folders: no images, one candidate sub-folder without images."""
    while not images_in(src):
        inner = subdirs(src)
        if len(inner) != 1 or images_in(inner[0]):
            break
        src = inner[0]
    return src


def read_gc10(src: Path) -> ClassFiles:
    numbered = class_folders(src, GC10_CLASSES)
    return numbered if numbered else class_folders(src, rename=normalise_name)


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


# --------------------------------------------------------------------------- decoding


def lfs_message(path: Path) -> str:
    return (
        f"{path} is a Git-LFS pointer file, not an image: this copy comes from a git mirror whose "
        "large files were not fetched. Fetch the real files with `git lfs pull` in the clone, or "
        "download the dataset release itself."
    )


def decode(path: Path) -> np.ndarray:
    """The decoded image (``cv2.IMREAD_UNCHANGED``); LayoutError naming ``path`` if it is none."""
    try:
        with path.open("rb") as f:
            head = f.read(len(LFS_POINTER_PREFIX))
    except OSError as err:
        raise LayoutError(f"cannot read {path}: {err}") from err
    if head == LFS_POINTER_PREFIX:
        raise LayoutError(lfs_message(path))
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise LayoutError(f"{path} is not an image (OpenCV cannot decode it); remove or replace it.")
    return image


def check_image(path: Path) -> None:
    decode(path)


def check_images(paths: Iterable[Path]) -> None:
    """Decode every file (a few threads; OpenCV releases the GIL); the first bad one in order raises."""
    paths = list(paths)
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    try:
        for _ in pool.map(check_image, paths):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- aluminum


def mask_areas(mask_path: Path) -> list[float]:
    """Pixels per mask value 1 ... 4 (in ``ALUMINUM_LABELS`` order)."""
    mask = decode(mask_path)
    if mask.ndim == 3:
        channels = mask[..., :3]
        if (channels == channels[..., :1]).all():
            mask = channels[..., 0]
        else:  # a colour (labelme palette) mask, read as BGR
            index = np.full(mask.shape[:2], -1, dtype=np.int64)
            index[(channels == 0).all(axis=-1)] = 0
            for value, (r, g, b) in enumerate(LABELME_COLOURS, start=1):
                index[(channels == (b, g, r)).all(axis=-1)] = value
            if (index < 0).any():
                raise LayoutError(
                    f"{mask_path}: a colour mask with colours other than labelme's for values 0-4."
                )
            mask = index
    values = np.unique(mask)
    bad = [int(v) for v in values if not 0 <= v <= len(ALUMINUM_LABELS)]
    if bad:
        raise LayoutError(
            f"{mask_path}: mask values {bad[:10]} outside 0-{len(ALUMINUM_LABELS)} "
            f"(0 = background, 1-{len(ALUMINUM_LABELS)} = {', '.join(ALUMINUM_LABELS)})."
        )
    counts = np.bincount(mask.astype(np.int64).ravel(), minlength=len(ALUMINUM_LABELS) + 1)
    return [float(c) for c in counts[1 : len(ALUMINUM_LABELS) + 1]]


def shoelace(points: list[tuple[float, float]]) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2


def shape_area(shape: dict, where: Path) -> float:
    """Area (px) of one labelme shape; ``linestrip``/``line`` count as length x line width."""
    try:
        points = [(float(x), float(y)) for x, y in shape.get("points") or []]
    except (TypeError, ValueError) as err:
        raise LayoutError(f"{where}: shape {shape.get('label')!r} has malformed points.") from err
    kind = shape.get("shape_type") or "polygon"
    if kind == "polygon":
        return shoelace(points) if len(points) >= 3 else 0.0
    if kind in ("linestrip", "line"):
        return ALUMINUM_LINE_WIDTH * sum(math.dist(a, b) for a, b in zip(points, points[1:]))
    if kind == "rectangle" and len(points) == 2:
        return abs((points[1][0] - points[0][0]) * (points[1][1] - points[0][1]))
    if kind == "circle" and len(points) == 2:
        return math.pi * math.dist(points[0], points[1]) ** 2
    return 0.0


def json_areas(json_path: Path) -> list[float]:
    """Summed shape areas per label (in ``ALUMINUM_LABELS`` order) of a labelme json."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LayoutError(f"{json_path} is not a readable labelme json: {err}") from err
    shapes = data.get("shapes") if isinstance(data, dict) else None
    if not isinstance(shapes, list):
        raise LayoutError(f"{json_path} is not a labelme json (no top-level 'shapes' list).")
    areas = [0.0] * len(ALUMINUM_LABELS)
    for shape in shapes:
        if isinstance(shape, dict) and shape.get("label") in ALUMINUM_LABELS:
            areas[ALUMINUM_LABELS.index(shape["label"])] += shape_area(shape, json_path)
    return areas


def largest(areas: list[float]) -> int | None:
    """Index of the largest area, the earlier on ties; ``None`` when all are zero."""
    best = max(range(len(areas)), key=lambda i: (areas[i], -i))
    return best if areas[best] > 0 else None


def find_dir(src: Path, names: tuple[str, ...]) -> Path | None:
    for p in sorted(src.iterdir()):
        if p.is_dir() and p.name.lower() in names:
            return p
    return None


def labelme_index(folders: Iterable[Path]) -> dict[str, Path]:
    """Image stem -> labelme json, by json file stem and by the json's ``imagePath``."""
    by_stem: dict[str, Path] = {}
    by_image: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            by_stem.setdefault(path.stem, path)
            try:
                image_path = json.loads(path.read_text(encoding="utf-8")).get("imagePath")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                continue  # reported when (if) this json is used
            if isinstance(image_path, str) and image_path:
                by_image.setdefault(Path(image_path.replace("\\", "/")).stem, path)
    return {**by_image, **by_stem}


def aluminum_class(image: Path, masks: Path | None, jsons: dict[str, Path]) -> str:
    """The class of one Aluminum image (largest defect area; see the module docstring)."""
    mask = masks / f"{image.stem}.png" if masks is not None else None
    if mask is not None and mask.is_file():
        best = largest(mask_areas(mask))
        if best is None:
            raise LayoutError(
                f"{image}: its mask {mask} has no defect pixels (values 1-{len(ALUMINUM_LABELS)}), "
                "so it has no class."
            )
        return ALUMINUM_LABELS[best]
    annotation = jsons.get(image.stem)
    if annotation is not None:
        best = largest(json_areas(annotation))
        if best is None:
            raise LayoutError(
                f"{image}: its labelme json {annotation} has no {'/'.join(ALUMINUM_LABELS)} shape "
                "with an area, so it has no class."
            )
        return ALUMINUM_LABELS[best]
    raise LayoutError(
        f"{image} has no annotation: neither a mask masks/{image.stem}.png nor a labelme json "
        f"json/{image.stem}.json exists, so it has no class."
    )


def read_aluminum(src: Path) -> ClassFiles:
    images_dir = find_dir(src, ("images",))
    if images_dir is None or not images_in(images_dir):
        return class_folders(src)
    masks = find_dir(src, ("masks", "mask"))
    json_dirs = [d for d in (find_dir(src, ("json", "annotations")), images_dir) if d is not None]
    jsons = labelme_index(json_dirs)
    result: ClassFiles = {}
    for image in images_in(images_dir):
        result.setdefault(aluminum_class(image, masks, jsons), []).append(image)
    return result


READERS: dict[str, Callable[[Path], ClassFiles]] = {
    "aluminum": read_aluminum,
    "gc10": read_gc10,
    "mt": read_mt,
    "neu": read_neu,
}


# --------------------------------------------------------------------------- planning


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


def check_unique_names(layout: dict[str, ClassFiles]) -> None:
    """Two sources that would land on one output file (merged class folders) are refused."""
    for split, classes in layout.items():
        for name, files in classes.items():
            seen: dict[str, Path] = {}
            for path in files:
                other = seen.setdefault(path.name, path)
                if other is not path:
                    raise LayoutError(
                        f"{other} and {path} would both become {split}/{name}/{path.name}; "
                        "rename one of them."
                    )


def plan(dataset: str, src: Path, seed: int = 0) -> dict[str, ClassFiles]:
    """``{'train': {class: files}, 'val': {...}}`` for ``dataset`` read from ``src``.

    Every planned image is decoded; LayoutError for an unknown layout or a file that is no image.
    """
    if dataset not in READERS:
        raise LayoutError(f"Unknown dataset {dataset!r}; choose from {sorted(READERS)}.")
    if not src.is_dir():
        raise LayoutError(f"Source folder {src} does not exist.")
    root = unwrap(src)
    existing = pre_split(root)
    if existing is not None and existing[0] and existing[1]:
        layout = {"train": existing[0], "val": existing[1]}
    else:
        classes = READERS[dataset](root)
        if len(classes) < 2:
            read_as = f" (read as {root})" if root != src else ""
            raise LayoutError(
                f"{src}{read_as} does not look like the {dataset} release (found {len(classes)} "
                f"class(es): {sorted(classes)}). Expected: {EXPECTED_LAYOUTS[dataset]}; or an "
                "already split SRC/train/<class> + SRC/val/<class>."
            )
        n_train, n_test = PAPER_SPLITS[dataset]
        fraction = n_train / (n_train + n_test)
        rng = random.Random(seed)
        layout = {"train": {}, "val": {}}
        for name in sorted(classes):
            layout["train"][name], layout["val"][name] = split_class(classes[name], fraction, rng)
    check_unique_names(layout)
    check_images(p for classes in layout.values() for name in sorted(classes) for p in classes[name])
    return layout


# --------------------------------------------------------------------------- writing


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and any(path.iterdir())


def check_destination(dst: Path, src: Path | None = None, overwrite: bool = False) -> None:
    """LayoutError when DST cannot be (re)placed: a file, non-empty without ``overwrite``, or SRC's parent."""
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        if not overwrite:
            raise LayoutError(f"{dst} exists and is not a folder; pass --overwrite to replace it.")
    elif is_nonempty_dir(dst) and not overwrite:
        raise LayoutError(f"{dst} already exists and is not empty; pass --overwrite to replace it.")
    if src is not None and dst.exists():
        s, d = src.resolve(), dst.resolve()
        if s == d or d in s.parents:
            raise LayoutError(f"{dst} holds SRC {src}; write the output somewhere else.")


def _sibling(dst: Path, tag: str) -> Path:
    """A new, unused name next to DST: ``DST.<tag>-<random>``."""
    while True:
        path = dst.parent / f"{dst.name}.{tag}-{secrets.token_hex(4)}"
        if not path.exists() and not path.is_symlink():
            return path


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def write(
    layout: dict[str, ClassFiles], dst: Path, link: bool = False, overwrite: bool = False
) -> dict[str, int]:
    """Copy (or symlink) the planned files; returns the image count per split.

    Files go to ``DST.partial-<random>`` next to DST, renamed to DST at the end; an existing DST
    (only with ``overwrite`` unless empty) is renamed away first and deleted after. On failure
    neither the temporary folder nor a new DST is left behind.
    """
    check_destination(dst, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dst, "partial")
    tmp.mkdir()
    old: Path | None = None
    counts: dict[str, int] = {}
    try:
        for split, classes in layout.items():
            counts[split] = 0
            for name, files in classes.items():
                folder = tmp / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for path in files:
                    target = folder / path.name
                    if link:
                        target.symlink_to(path.resolve())
                    else:
                        shutil.copy2(path, target)
                    counts[split] += 1
        if dst.exists() or dst.is_symlink():
            if is_nonempty_dir(dst) or not dst.is_dir() or dst.is_symlink():
                old = _sibling(dst, "old")
                os.rename(dst, old)
            else:
                dst.rmdir()  # empty: nothing to keep
        try:
            os.rename(tmp, dst)
        except OSError:
            if old is not None:
                os.rename(old, dst)  # put the previous output back
                old = None
            raise
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
    if old is not None:
        _remove(old)
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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty DST (atomically)"
    )
    args = parser.parse_args(argv)
    try:
        check_destination(args.dst, args.src, args.overwrite)
        layout = plan(args.dataset, args.src, args.seed)
        counts = write(layout, args.dst, args.link, args.overwrite)
    except LayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: writing {args.dst} failed: {err}", file=sys.stderr)
        return 1
    classes = sorted(layout["train"])
    print(
        f"{args.dataset}: {len(classes)} classes {classes}; train {counts['train']}, val {counts['val']} -> {args.dst}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
