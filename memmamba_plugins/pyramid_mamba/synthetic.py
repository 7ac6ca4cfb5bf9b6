"""Generated images with planted defects, in memory or as an MVTec AD folder tree, for offline demos and tests.

Each category is a texture with random phase and jitter (stripes, a checkerboard or smooth grain), so
normal images differ from each other and a detector has to learn what normal looks like: a defect is
not simply "something bright". Defective images carry a scratch (a thin line at a random angle) or a
spot (a disc of a flat level) whose pixel mask is returned (or written to ``ground_truth``). Files
alternate between RGB and single-channel PNG, so both kinds of input go through the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: Name of the defect type in ``test/`` and ``ground_truth/``.
DEFECT = "defect"
#: Textures, cycled over the categories.
TEXTURES = ("stripes", "checker", "grain")


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One normal image in [0, 1]: the category's pattern at a random phase, plus sensor noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "stripes":
        freq = 6 * (1 + rng.uniform(-0.05, 0.05))
        base = 0.5 + 0.35 * np.sin(2 * np.pi * (freq * xx + rng.uniform()))
    elif kind == "checker":
        freq = 4
        base = 0.5 + 0.3 * np.sign(
            np.sin(2 * np.pi * (freq * xx + rng.uniform())) * np.sin(2 * np.pi * (freq * yy + rng.uniform()))
        )
    elif kind == "grain":
        coarse = rng.normal(0, 1, (size // 8 + 1, size // 8 + 1)).astype(np.float32)
        up = np.kron(coarse, np.ones((8, 8), np.float32))[:size, :size]
        kernel = np.ones(5, np.float32) / 5
        for axis in (0, 1):
            up = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, up)
        base = 0.5 + 0.15 * up
    else:
        msg = f"Unknown texture {kind!r}; choose from {TEXTURES}."
        raise ValueError(msg)
    return np.clip(base + rng.normal(0, 0.03, (size, size)), 0, 1).astype(np.float32)


def _defect_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A scratch (line of width ~size/32 at a random angle) or a spot (disc of radius ~size/10)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    if rng.uniform() < 0.5:
        angle = rng.uniform(0, np.pi)
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        return (np.abs(across) <= max(1.0, size / 32)) & (np.abs(along) <= size / 4)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= (size / 10) ** 2


def planted_defect_images(
    n: int, size: int, texture: str, defective: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` grey images ``(n, size, size)`` in [0, 1] and their boolean defect masks.

    Args:
        n: number of images.
        size: square side in pixels.
        texture: one of :data:`TEXTURES`.
        defective: plant one defect per image (else the masks are empty).
        seed: random seed; the same arguments always give the same images.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        images[i] = _texture(texture, size, rng)
        if defective:
            masks[i] = _defect_mask(size, rng)
            level = rng.choice([0.05, 0.95])
            images[i][masks[i]] = level + rng.normal(0, 0.03, int(masks[i].sum()))
    return np.clip(images, 0, 1), masks


def make_synthetic_mvtec(
    root: Path,
    categories: Sequence[str] = ("alpha", "beta"),
    size: int = 64,
    n_train: int = 4,
    n_test: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``root/<category>/{train/good, test/good, test/defect, ground_truth/defect}``; return ``root``.

    Args:
        root: folder to create (parents too).
        categories: category folder names; their textures cycle through :data:`TEXTURES`.
        size: square image side in pixels.
        n_train: defect-free training images per category.
        n_test: test images per category and label (``good`` and ``defect``).
        seed: random seed; the same arguments always give the same files.
    """
    for index, category in enumerate(categories):
        texture = TEXTURES[index % len(TEXTURES)]
        for offset, (split, label, count) in enumerate(
            (("train", "good", n_train), ("test", "good", n_test), ("test", DEFECT, n_test))
        ):
            images, masks = planted_defect_images(
                count, size, texture, label == DEFECT, seed=seed + 1000 * index + offset
            )
            folder = root / category / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i, (image, mask) in enumerate(zip(images, masks)):
                pixels = (image * 255).round().astype(np.uint8)
                if label == DEFECT:
                    mask_dir = root / category / "ground_truth" / label
                    mask_dir.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{i:03d}_mask.png")
                if index % 2 == 0:  # alternate RGB and grey files: grey must work too
                    pixels = np.stack([pixels] * 3, axis=-1)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root
