"""MemoryMamba learns defect classes with the shipped from-scratch recipe (mmengine Runner, CPU).

A reduced model on three classes at 48x48 for a few epochs must beat chance (1/3) by far, or the
test fails: three NEU-CLS classes when the shared copy is there, else generated textures (grain,
grain with a planted scratch or spot, stripes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("mmpretrain")

from mmengine.config import Config
from mmengine.runner import Runner

import memmamba_plugins.memory_mamba  # noqa: F401  (registers the modules)

REPO = Path(__file__).resolve().parents[1]
NEU = Path(os.environ.get("MEMMAMBA_NEU", REPO.parent / "shared" / "data" / "neu_cls"))
CLASSES = ("crazing", "patches", "scratches")
PER_CLASS = {"train": 40, "val": 30}
SIZE = 48
#: Epochs per source: the planted defects are small, so the generated set takes longer.
EPOCHS = {"neu": 12, "synthetic": 24}
#: Chance is 1/3; a model that stops learning stays near it.
MIN_ACCURACY = 0.75

#: Generated stand-ins: (class, texture, planted defect).
SYNTHETIC = (("grain", "grain", False), ("grain_defect", "grain", True), ("stripes", "stripes", False))

pytestmark = pytest.mark.slow


def neu_subset(root: Path) -> None:
    for split, count in PER_CLASS.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for path in sorted((NEU / split / name).iterdir())[:count]:
                (folder / path.name).symlink_to(path.resolve())


def synthetic_classes(root: Path) -> None:
    import cv2
    import numpy as np

    from memmamba_plugins.pyramid_mamba.synthetic import planted_defect_images

    for seed, (split, count) in enumerate(PER_CLASS.items()):
        for k, (name, texture, defective) in enumerate(SYNTHETIC):
            images, _ = planted_defect_images(count, SIZE, texture, defective, seed=10 * seed + k)
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(images):
                cv2.imwrite(str(folder / f"{i}.png"), (image * 255).astype(np.uint8))


@pytest.mark.parametrize("source", ["neu", "synthetic"])
def test_memory_mamba_learns_with_the_scratch_recipe(tmp_path: Path, source: str) -> None:
    if source == "neu":
        if not (NEU / "train").is_dir():
            pytest.skip(f"NEU-CLS not found under {NEU}")
        neu_subset(tmp_path / "data")
    else:
        synthetic_classes(tmp_path / "data")
    cfg = Config.fromfile(str(REPO / "configs" / "memorymamba_neu_scratch.py"))
    cfg.model.backbone.arch = {"depths": (1, 1, 1), "embed_dim": 16}
    cfg.model.head.num_classes = cfg.data_preprocessor.num_classes = len(CLASSES)
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg[key]
        loader.num_workers, loader.persistent_workers, loader.batch_size = 0, False, 16
        loader.dataset.data_root = str(tmp_path / "data")
        for step in loader.dataset.pipeline:
            if "scale" in step:
                step["scale"] = SIZE if step["type"] == "RandomResizedCrop" else (SIZE, SIZE)
    epochs = EPOCHS[source]
    cfg.train_cfg.max_epochs = cfg.train_cfg.val_interval = epochs
    cfg.param_scheduler[0]["end"] = cfg.param_scheduler[1]["begin"] = 1
    cfg.param_scheduler[1]["end"] = epochs
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=epochs)
    cfg.work_dir = str(tmp_path / "work")
    cfg.log_level = "WARNING"
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    print(f"{source}: {metrics}")
    assert metrics["accuracy/top1"] / 100 >= MIN_ACCURACY, metrics
