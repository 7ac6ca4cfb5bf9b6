"""MemoryMamba learns NEU-CLS defects with the shipped from-scratch recipe (mmengine Runner, CPU).

A reduced model on three NEU classes at 48x48 for a few epochs: it must beat chance by far, or the
test fails. Skips when the shared NEU-CLS copy is absent.
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
SIZE, EPOCHS = 48, 12
#: Chance is 1/3; a model that stops learning stays near it.
MIN_ACCURACY = 0.75

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (NEU / "train").is_dir(), reason=f"NEU-CLS not found under {NEU}"),
]


def subset(root: Path) -> None:
    for split, count in PER_CLASS.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for path in sorted((NEU / split / name).iterdir())[:count]:
                (folder / path.name).symlink_to(path.resolve())


def test_memory_mamba_learns_neu_with_the_scratch_recipe(tmp_path: Path) -> None:
    subset(tmp_path / "data")
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
    cfg.train_cfg.max_epochs = cfg.train_cfg.val_interval = EPOCHS
    cfg.param_scheduler[0]["end"] = cfg.param_scheduler[1]["begin"] = 1
    cfg.param_scheduler[1]["end"] = EPOCHS
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=EPOCHS)
    cfg.work_dir = str(tmp_path / "work")
    cfg.log_level = "WARNING"
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    assert metrics["accuracy/top1"] / 100 >= MIN_ACCURACY, metrics
