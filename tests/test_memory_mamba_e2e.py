"""End to end through mim: train 1 epoch on a generated folder dataset, test its checkpoint, resume.

Runs ``mim train/test mmpretrain`` in subprocesses exactly as a user would (torch >= 2.6
``weights_only`` loading included), on a toy two-stage MemoryMamba and 32x32 images.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mmpretrain")
cv2 = pytest.importorskip("cv2")

REPO = Path(__file__).resolve().parents[1]
MIM = Path(sys.executable).with_name("mim")
CLASSES = ("dent", "scratch")
TIMEOUT_S = 300

TOY_CONFIG = """
_base_ = [{base!r}]
img_size = 32
model = dict(
    backbone=dict(arch=dict(depths=(1, 1), embed_dim=8, _delete_=True), coarse_slots=4, fine_slots=4,
                  drop_path_rate=0.0),
    head=dict(num_classes=2, in_channels=16))
data_preprocessor = dict(num_classes=2)
pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(img_size, img_size)),
            dict(type='PackInputs')]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root={root!r}, pipeline=pipeline))
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root={root!r}, pipeline=pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=1)
default_hooks = dict(logger=dict(interval=1))
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MIM.exists(), reason="mim not installed next to this Python"),
]


def make_dataset(root: Path, per_class: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                img = (rng.random((32, 32)) * (90 + 160 * k)).astype(np.uint8)
                cv2.imwrite(str(folder / f"{i}.jpg"), img)


def run_mim(args: list[str], cwd: Path) -> str:
    env = dict(
        os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(
        [str(MIM), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def test_mim_train_test_resume(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_dataset(data, {"train": 6, "val": 3})
    cfg = tmp_path / "toy.py"
    cfg.write_text(TOY_CONFIG.format(base=str(REPO / "configs" / "memorymamba_gc10.py"), root=str(data)))
    work = tmp_path / "work"

    out = run_mim(["train", "mmpretrain", str(cfg), "--work-dir", str(work)], tmp_path)
    for key in ("loss_cls:", "loss_contrastive:", "loss_nce:", "accuracy/top1:", "single-label/f1-score:"):
        assert key in out
    checkpoint = work / "epoch_1.pth"
    assert checkpoint.exists()

    out = run_mim(
        ["test", "mmpretrain", str(cfg), "--checkpoint", str(checkpoint), "--work-dir", str(work)], tmp_path
    )
    assert "Epoch(test)" in out and "accuracy/top1:" in out

    out = run_mim(
        [
            "train",
            "mmpretrain",
            str(cfg),
            "--work-dir",
            str(work),
            "--resume",
            "--cfg-options",
            "train_cfg.max_epochs=2",
        ],
        tmp_path,
    )
    assert "resumed epoch: 1" in out and "Epoch(train) [2]" in out
    assert (work / "epoch_2.pth").exists()


def test_mim_train_missing_data_root_is_explained(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            str(MIM),
            "train",
            "mmpretrain",
            str(REPO / "configs" / "memorymamba_gc10.py"),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode != 0
    assert "prepare_dataset.py" in proc.stdout + proc.stderr


def test_mim_train_distributed_two_cpu_processes(tmp_path: Path) -> None:
    """``--launcher pytorch --gpus 2`` on CPU (gloo): the multi-GPU code path, 2 processes."""
    data = tmp_path / "data"
    make_dataset(data, {"train": 8, "val": 2})
    cfg = tmp_path / "toy.py"
    cfg.write_text(TOY_CONFIG.format(base=str(REPO / "configs" / "memorymamba_gc10.py"), root=str(data)))
    out = run_mim(
        [
            "train",
            "mmpretrain",
            str(cfg),
            "--work-dir",
            str(tmp_path / "work"),
            "--launcher",
            "pytorch",
            "--gpus",
            "2",
            "--cfg-options",
            "env_cfg.dist_cfg.backend=gloo",
            "runner_type=CPUDistributedRunner",
            "model_wrapper_cfg.type=MMDistributedDataParallel",
            "model_wrapper_cfg.device_ids=None",
        ],
        tmp_path,
    )
    assert "Distributed training: True" in out
    # 16 images, batch 4 per process, 2 processes -> 2 iterations per epoch
    assert "Epoch(train) [1][2/2]" in out and "accuracy/top1:" in out
