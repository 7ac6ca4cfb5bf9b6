"""A small generated dataset in the MVTec AD folder layout, for demos and smoke tests offline.

Each category is a flat grey texture (its own brightness) with sensor noise; defective test images
carry one bright square whose mask is written to ``ground_truth``. Categories alternate between
RGB and single-channel PNG files, so both kinds of input go through the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: Name of the defect type in ``test/`` and ``ground_truth/``.
DEFECT = "dent"


def make_synthetic_mvtec(
    root: Path,
    categories: Sequence[str] = ("alpha", "beta"),
    size: int = 64,
    n_train: int = 4,
    n_test: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``root/<category>/{train/good, test/good, test/dent, ground_truth/dent}``; return ``root``.

    Args:
        root: folder to create (parents too).
        categories: category folder names.
        size: square image side in pixels.
        n_train: defect-free training images per category.
        n_test: test images per category and label (``good`` and ``dent``).
        seed: random seed; the same arguments always give the same files.
    """
    rng = np.random.default_rng(seed)
    defect_side = max(1, size // 4)
    for index, category in enumerate(categories):
        level = int(rng.integers(60, 200))
        for split, label, count in (
            ("train", "good", n_train),
            ("test", "good", n_test),
            ("test", DEFECT, n_test),
        ):
            folder = root / category / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = np.clip(level + rng.normal(0, 8, (size, size)), 0, 255).astype(np.uint8)
                if label != "good":
                    mask = np.zeros((size, size), np.uint8)
                    y, x = rng.integers(0, size - defect_side + 1, 2)
                    mask[y : y + defect_side, x : x + defect_side] = 255
                    image[mask > 0] = 255
                    masks = root / category / "ground_truth" / label
                    masks.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(masks / f"{i:03d}_mask.png")
                if index % 2 == 0:  # alternate RGB and grey files: grey must work too
                    image = np.stack([image] * 3, axis=-1)
                Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root
