"""What bad input gets from MemoryMamba: one table, one row per case.

Each row is ``(id, setup, expected exception, message pattern)``. ``setup`` builds the bad input in a
fresh folder and runs what a user would run on it (the backbone or classifier, ``init_cfg`` loading,
``DefectFolderDataset``, the start-of-run hook, a few iterations of mmengine's ``Runner``). A row whose
exception is ``None`` is input that must work; its ``setup`` asserts the result itself. Everything is a
toy (8-wide stages, 32 px images) and runs offline on CPU in a few seconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmpretrain")
cv2 = pytest.importorskip("cv2")

from mmengine.logging import MessageHub  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmpretrain.registry import DATASETS, MODELS  # noqa: E402
from mmpretrain.structures import DataSample  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import memmamba_plugins.memory_mamba  # noqa: E402, F401  (registers the modules)
from memmamba_plugins.memory_mamba import (  # noqa: E402
    CorruptCheckpointError,
    MemoryMamba,
    NonFiniteLossError,
    PartialCheckpointError,
)
from memmamba_plugins.memory_mamba.checkpoint import synthetic_vmamba_state_dict  # noqa: E402
from memmamba_plugins.memory_mamba.hooks import ClassListCheckHook  # noqa: E402

#: A two-stage toy arch (stride 8) and a four-stage one (stride 32), both 8 wide.
TOY = {"depths": (1, 1), "embed_dim": 8}
FOUR_STAGES = {"depths": (1, 1, 1, 1), "embed_dim": 8}
#: Side of the images; the toy's width of the last stage (its head's in_channels).
IMG = 32
TOY_WIDTH = 16
#: Iteration (1-based, as mmengine logs it) at which the Runner row feeds a NaN image.
NAN_ITERATION = 3

WORKS = None  # the exception of a row whose input must be accepted


def _toy(**kwargs) -> MemoryMamba:
    torch.manual_seed(0)
    return MemoryMamba(
        arch=dict(kwargs.pop("arch", TOY)), coarse_slots=4, fine_slots=4, drop_path_rate=0.0, **kwargs
    )


def _classifier_cfg(in_channels: int | None = None, num_classes: int = 2) -> dict:
    return dict(
        type="MemoryMambaClassifier",
        backbone=dict(type="MemoryMamba", arch=dict(TOY), coarse_slots=4, fine_slots=4, drop_path_rate=0.0),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="MemoryMambaClsHead", num_classes=num_classes, in_channels=in_channels),
    )


def _classifier(**kwargs):
    torch.manual_seed(0)
    return MODELS.build(_classifier_cfg(**kwargs))


def _folders(root: Path, splits: dict[str, list[str]], per_class: int = 2) -> Path:
    for split, classes in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                cv2.imwrite(str(folder / f"{i}.png"), np.full((8, 8), 40 * i, np.uint8))
    return root


def _dataset(root: Path, split: str = "train", **kwargs):
    return DATASETS.build(dict(type="DefectFolderDataset", data_root=str(root), data_prefix=split, **kwargs))


def _checkpoint(path: Path, state: dict) -> Path:
    torch.save(state, path)
    return path


def _pretrained(tmp: Path, **init_cfg) -> None:
    """Build the toy backbone with ``init_cfg=dict(type='Pretrained', ...)`` and initialise it."""
    _toy(init_cfg={"type": "Pretrained", **init_cfg}).init_weights()


def _vmamba(tmp: Path, arch: dict = TOY) -> Path:
    """A checkpoint under the official VMamba names, shaped like a backbone of ``arch``."""
    return _checkpoint(tmp / "vssm.pth", {"model": synthetic_vmamba_state_dict(_toy(arch=arch))})


# -- 1. input tensors ---------------------------------------------------------------------------
def grey_1_channel(tmp: Path) -> None:
    _toy()(torch.rand(2, 1, IMG, IMG))


def rgba_4_channel_classifier(tmp: Path) -> None:
    _classifier()(torch.rand(2, 4, IMG, IMG), mode="tensor")


def unbatched_image(tmp: Path) -> None:
    _toy()(torch.rand(3, IMG, IMG))


def too_small_for_four_stages(tmp: Path) -> None:
    _toy(arch=FOUR_STAGES)(torch.rand(1, 3, 16, 16))


def smallest_input_works(tmp: Path) -> None:
    """The stride of the last stage is the smallest side: 32 for four stages, 8 for the two-stage toy."""
    (out,) = _toy(arch=FOUR_STAGES)(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 64, 1, 1)
    (out,) = _toy()(torch.rand(1, 3, 8, 8))
    assert out.shape == (1, TOY_WIDTH, 1, 1)


# -- 2. pretrained checkpoints (init_cfg) --------------------------------------------------------
def truncated_checkpoint(tmp: Path) -> None:
    data = _vmamba(tmp).read_bytes()
    (tmp / "truncated.pth").write_bytes(data[: len(data) // 2])
    _pretrained(tmp, checkpoint=str(tmp / "truncated.pth"))


def not_a_checkpoint(tmp: Path) -> None:
    (tmp / "vssm_tiny.pth").write_text("<html>404 Not Found</html>")  # a failed download
    _pretrained(tmp, checkpoint=str(tmp / "vssm_tiny.pth"))


def bit_flipped_checkpoint(tmp: Path) -> None:
    data = bytearray(_vmamba(tmp).read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a tensor: torch.load alone would load it silently
    (tmp / "bitflip.pth").write_bytes(bytes(data))
    _pretrained(tmp, checkpoint=str(tmp / "bitflip.pth"))


def missing_checkpoint(tmp: Path) -> None:
    _pretrained(tmp, checkpoint=str(tmp / "nowhere.pth"))


def classifier_checkpoint_without_prefix(tmp: Path) -> None:
    """A whole-classifier checkpoint (``backbone.*`` keys) loads nothing without ``prefix='backbone.'``."""
    state = {f"backbone.{k}": v for k, v in _toy().state_dict().items()}
    _pretrained(tmp, checkpoint=str(_checkpoint(tmp / "classifier.pth", {"state_dict": state})))


def wrong_prefix(tmp: Path) -> None:
    _pretrained(tmp, checkpoint=str(_vmamba(tmp)), prefix="backbone.")


def wrong_arch(tmp: Path) -> None:
    wider = {"depths": (1, 1), "embed_dim": 16}
    _pretrained(tmp, checkpoint=str(_vmamba(tmp, arch=wider)))


def partial_load_on_purpose(tmp: Path) -> None:
    """``allow_partial=True`` keeps today's behaviour: load what matches, log the rest."""
    wider = {"depths": (1, 1), "embed_dim": 16}
    _pretrained(tmp, checkpoint=str(_vmamba(tmp, arch=wider)), allow_partial=True)


def matching_checkpoint_loads(tmp: Path) -> None:
    path = _vmamba(tmp)
    model = _toy(init_cfg={"type": "Pretrained", "checkpoint": str(path)})
    model.init_weights()
    official = torch.load(path, weights_only=True)["model"]
    assert torch.equal(
        model.state_dict()["stages.0.blocks.0.op.A_logs"], official["layers.0.blocks.0.op.A_logs"]
    )


# -- 3. NaN / Inf loss in training ---------------------------------------------------------------
def _batch(images: torch.Tensor) -> dict:
    return {
        "inputs": list(images),
        "data_samples": [DataSample().set_gt_label(i % 2) for i in range(len(images))],
    }


class _OverflowingLoss(torch.nn.Module):
    """A classification loss that overflows, as cross-entropy does on logits that grew too large."""

    def forward(self, cls_score: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        return cls_score.sum() * float("inf")


def inf_loss_train_step(tmp: Path) -> None:
    """An infinite ``loss_cls`` from finite weights: the run stops, and the step is not taken."""
    model = _classifier(in_channels=TOY_WIDTH)
    model.head.loss_module = _OverflowingLoss()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hub = MessageHub.get_current_instance()
    hub.update_info("iter", 6)
    hub.update_info("epoch", 1)
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        model.train_step(_batch(torch.rand(2, 3, IMG, IMG) * 255), optim)
    finally:
        hub.runtime_info.pop("iter", None)
        hub.runtime_info.pop("epoch", None)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())  # no step reached the weights


class _NaNAtIteration(torch.utils.data.Dataset):
    """Finite images, except the one of iteration :data:`NAN_ITERATION` (batch size 1)."""

    def __len__(self) -> int:
        return 2 * NAN_ITERATION

    def __getitem__(self, index: int) -> dict:
        image = torch.rand(3, IMG, IMG) * 255
        if index == NAN_ITERATION - 1:
            image[:, 0, 0] = float("nan")
        return {"inputs": image, "data_samples": DataSample().set_gt_label(index % 2)}


def nan_image_in_runner(tmp: Path) -> None:
    """Through mmengine's Runner: the iteration is the one mmengine logs."""
    loader = DataLoader(
        _NaNAtIteration(), batch_size=1, collate_fn=lambda b: {k: [d[k] for d in b] for k in b[0]}
    )
    runner = Runner(
        model=_classifier_cfg(in_channels=TOY_WIDTH),
        work_dir=str(tmp / "work"),
        train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=2 * NAN_ITERATION),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=1e-3)),
        default_hooks=dict(logger=None, checkpoint=None),
        experiment_name=f"nan-{tmp.name}",
        default_scope="mmpretrain",
    )
    runner.train()


# -- 4. dataset folders --------------------------------------------------------------------------
def empty_class_folder(tmp: Path) -> None:
    root = _folders(tmp / "data", {"train": ["crack", "dent"], "val": ["crack", "dent"]})
    (root / "train" / "scratch").mkdir()
    _dataset(root, "train")


def class_folder_with_only_a_non_image(tmp: Path) -> None:
    root = _folders(tmp / "data", {"train": ["crack", "dent"]})
    (root / "train" / "scratch").mkdir()
    (root / "train" / "scratch" / "notes.txt").write_text("to do: copy the images")
    _dataset(root, "train")


def non_image_file_next_to_images(tmp: Path) -> None:
    """``CustomDataset`` keeps only image extensions: a stray ``Thumbs.db`` or ``notes.txt`` is skipped."""
    root = _folders(tmp / "data", {"train": ["crack", "dent"]})
    (root / "train" / "crack" / "notes.txt").write_text("shot on line 3")
    (root / "train" / "crack" / "Thumbs.db").write_bytes(b"\0" * 16)
    assert len(_dataset(root, "train")) == 4


def data_root_is_a_file(tmp: Path) -> None:
    archive = tmp / "neu.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    _dataset(archive, "train")


def data_root_does_not_exist(tmp: Path) -> None:
    _dataset(tmp / "nowhere", "train")


def val_class_not_in_train(tmp: Path) -> None:
    root = _folders(tmp / "data", {"train": ["crack", "dent"], "val": ["crack", "rust"]})
    _dataset(root, "val")


def val_missing_a_class_works(tmp: Path) -> None:
    """A class absent from val keeps every other label (a warning, not an error)."""
    root = _folders(tmp / "data", {"train": ["crack", "dent", "scratch"], "val": ["crack", "scratch"]})
    labels = {Path(d["img_path"]).parent.name: d["gt_label"] for d in _dataset(root, "val").load_data_list()}
    assert labels == {"crack": 0, "scratch": 2}


class _Loader:
    def __init__(self, dataset) -> None:
        self.dataset = dataset


class _Runner:
    """What ClassListCheckHook reads of a Runner."""

    def __init__(self, model, train, val) -> None:
        self.model = model
        self.train_dataloader = train
        self._val_loop = self.val_loop = type("Loop", (), {"dataloader": val})()


def num_classes_mismatch(tmp: Path) -> None:
    root = _folders(
        tmp / "data", {"train": ["crack", "dent", "scratch"], "val": ["crack", "dent", "scratch"]}
    )
    model = _classifier(num_classes=2)
    ClassListCheckHook().before_train(
        _Runner(model, _Loader(_dataset(root, "train")), _Loader(_dataset(root, "val")))
    )


# -- 5. model config -----------------------------------------------------------------------------
def head_in_channels_mismatch(tmp: Path) -> None:
    _classifier(in_channels=768)


CASES: list[tuple[str, Callable[[Path], None], type[BaseException] | None, str | None]] = [
    ("grey-1-channel", grey_1_channel, ValueError, r"in_channels=3\) expects 3-channel images, got 1 channel.*color_type='color'"),
    ("rgba-4-channel-classifier", rgba_4_channel_classifier, ValueError, r"got 4 channel\(s\).*drops alpha"),
    ("unbatched-image", unbatched_image, ValueError, r"\(batch, 3, height, width\).*got shape \(3, 32, 32\).*unsqueeze\(0\)"),
    ("too-small-for-4-stages", too_small_for_four_stages, ValueError, r"4 stages down-samples by 32.*at least 32x32.*got 16x16.*Resize"),
    ("smallest-input-works", smallest_input_works, WORKS, None),
    ("truncated-checkpoint", truncated_checkpoint, CorruptCheckpointError, r"truncated\.pth' is truncated or corrupt.*no complete zip"),
    ("not-a-checkpoint", not_a_checkpoint, CorruptCheckpointError, r"vssm_tiny\.pth' is truncated or corrupt.*download it again"),
    ("bit-flipped-checkpoint", bit_flipped_checkpoint, CorruptCheckpointError, r"bitflip\.pth' is truncated or corrupt.*CRC"),
    ("missing-checkpoint", missing_checkpoint, FileNotFoundError, r"nowhere\.pth' does not exist"),
    ("classifier-checkpoint-without-prefix", classifier_checkpoint_without_prefix, PartialCheckpointError, r"matched only 0 of the backbone's \d+ .*pass `prefix='backbone\.'`.*allow_partial=True"),
    ("wrong-prefix", wrong_prefix, PartialCheckpointError, r"matched only 0 .*drop `prefix='backbone\.'`"),
    ("wrong-arch", wrong_arch, PartialCheckpointError, r"matched only 0 .*\d+ differ in shape.*Set `arch`.*allow_partial=True"),
    ("partial-load-on-purpose", partial_load_on_purpose, WORKS, None),
    ("matching-checkpoint-loads", matching_checkpoint_loads, WORKS, None),
    ("inf-loss-train-step", inf_loss_train_step, NonFiniteLossError, r"diverged at iteration 7 \(epoch 2\): loss_cls is NaN/Inf.*learning rate too high.*wrong scale"),
    ("nan-image-in-runner", nan_image_in_runner, NonFiniteLossError, rf"diverged at iteration {NAN_ITERATION} \(epoch 1\).*input batch holds NaN/Inf.*lr 0\.001"),
    ("empty-class-folder", empty_class_folder, ValueError, r"train' defines the class list, but class\(es\) \['scratch'\] have no image"),
    ("class-folder-with-only-a-non-image", class_folder_with_only_a_non_image, ValueError, r"\['scratch'\] have no image there \(1 file\(s\) without an image extension.*'notes\.txt'"),
    ("non-image-file-next-to-images", non_image_file_next_to_images, WORKS, None),
    ("data-root-is-a-file", data_root_is_a_file, NotADirectoryError, r"neu\.zip' is a file, not a folder.*extract an archive"),
    ("data-root-does-not-exist", data_root_does_not_exist, FileNotFoundError, r"nowhere/train' does not exist.*prepare_dataset\.py"),
    ("val-class-not-in-train", val_class_not_in_train, ValueError, r"\['rust'\] that are not in the class list"),
    ("val-missing-a-class-works", val_missing_a_class_works, WORKS, None),
    ("num-classes-mismatch", num_classes_mismatch, ValueError, r"num_classes=2 but the dataset has 3 classes.*num_classes=3"),
    ("head-in-channels-mismatch", head_in_channels_mismatch, ValueError, r"head\.in_channels=768 does not match .* 16; set head\.in_channels=16"),
]  # fmt: skip


@pytest.mark.parametrize(("setup", "error", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(
    setup: Callable[[Path], None], error: type[BaseException] | None, pattern: str | None, tmp_path: Path
) -> None:
    if error is None:
        setup(tmp_path)
        return
    with pytest.raises(error) as info:
        setup(tmp_path)
    assert re.search(pattern, str(info.value), flags=re.DOTALL), str(info.value)
