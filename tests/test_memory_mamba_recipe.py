"""MemoryMamba's official fusion form, head width by arch, fixed class lists and start-of-run checks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmpretrain")
pytest.importorskip("cv2")

import cv2  # noqa: E402  (after the skip above)
from mmengine.config import Config
from mmpretrain.registry import DATASETS, MODELS

import memmamba_plugins.memory_mamba  # noqa: F401  (registers the modules)
from memmamba_plugins.memory_mamba import MemoryMamba
from memmamba_plugins.memory_mamba.hooks import ClassListCheckHook, PretrainedRequiredHook

REPO = Path(__file__).resolve().parents[1]
TOY = {"depths": (1, 1), "embed_dim": 8}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def conv_op(**kwargs):
    model = MemoryMamba(
        arch=dict(TOY), coarse_slots=4, fine_slots=5, drop_path_rate=0.0, fusion="conv", **kwargs
    )
    return model, model.stages[0].blocks[0].op


# -- the official fusion form ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "l2"])
def test_conv_fusion_is_the_official_formula(kind: str) -> None:
    """x' = x + s * sum_k cos(GAP(x), M_k) * Conv1x1(concat[x, M_k broadcast]), built literally."""
    _, op = conv_op(similarity=kind)
    x = torch.randn(3, op.d_inner, 6, 5)
    pooled = x.mean(dim=(2, 3))
    encoded = torch.nn.functional.gelu(op.mem_conv(pooled))
    expected = x.clone()
    for bank, conv in zip((op.coarse, op.fine), op.fusion_convs):
        readout = bank.query(encoded).softmax(-1) @ bank.slots
        broadcast = readout[:, :, None, None].expand_as(x)
        term = conv(torch.cat([x, broadcast], dim=1))
        if kind == "cosine":
            beta = torch.nn.functional.cosine_similarity(readout, pooled, dim=-1)
        else:
            beta = 1 / (1 + (readout - pooled).pow(2).mean(-1).sqrt())
        expected = expected + op.fusion_scale * beta[:, None, None, None] * term
    with torch.no_grad():
        out = op.condition(x)
    assert torch.allclose(out, expected, atol=1e-5)
    # spatially varying, unlike the paper's per-sample vector
    assert not torch.allclose(out - x, (out - x).mean(dim=(2, 3), keepdim=True), atol=1e-4)


def test_conv_fusion_trains_and_infers_the_same() -> None:
    model, op = conv_op()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    (train_path,) = model(x)  # parameters require grad: torch path
    with torch.no_grad():
        (inference,) = model(x)
    assert torch.allclose(train_path, inference, atol=1e-5)
    (out,), states = model(x, return_memory=True)
    out.sum().backward()
    assert op.fusion_convs[0].weight.grad is not None and states[0].coarse_query is not None


def test_unknown_fusion_is_refused() -> None:
    with pytest.raises(ValueError, match="fusion must be one of"):
        MemoryMamba(arch=dict(TOY), fusion="attention")


# -- head width follows the arch -------------------------------------------------------------
def classifier_cfg(arch, in_channels):
    return dict(
        type="MemoryMambaClassifier",
        backbone=dict(type="MemoryMamba", arch=arch),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="MemoryMambaClsHead", num_classes=3, in_channels=in_channels),
    )


@pytest.mark.parametrize(("arch", "width"), [("tiny", 768), ("base", 1024), (TOY, 16)])
def test_head_width_follows_the_arch(arch, width: int) -> None:
    assert MemoryMamba.output_channels(arch)[-1] == width
    if arch == TOY:
        model = MODELS.build(classifier_cfg(dict(arch), None))
        assert model.head.in_channels == width
        assert model(torch.randn(1, 3, 32, 32), mode="tensor").shape == (1, 3)


def test_head_width_mismatch_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="head.in_channels=768 does not match .* 16"):
        MODELS.build(classifier_cfg(dict(TOY), 768))
    with pytest.raises(ValueError, match="MemoryMambaClassifier"):
        MODELS.build(dict(type="MemoryMambaClsHead", num_classes=3, in_channels=None))


def test_mlp_head_of_eq5() -> None:
    head = MODELS.build(dict(type="MemoryMambaClsHead", num_classes=3, in_channels=16, hidden_channels=32))
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Dropout", "Linear"]
    assert head((torch.randn(2, 16),)).shape == (2, 3)


# -- labels that cannot shift ----------------------------------------------------------------
def make_folders(root: Path, splits: dict[str, list[str]]) -> None:
    for split, classes in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                cv2.imwrite(str(folder / f"{i}.png"), np.full((8, 8), 40 * i, np.uint8))


def build(root: Path, split: str, **kwargs):
    return DATASETS.build(dict(type="DefectFolderDataset", data_root=str(root), data_prefix=split, **kwargs))


def test_a_class_missing_from_val_does_not_shift_labels(tmp_path: Path) -> None:
    make_folders(tmp_path, {"train": ["crack", "dent", "scratch"], "val": ["crack", "scratch"]})
    train, val = build(tmp_path, "train"), build(tmp_path, "val")
    assert train.metainfo["classes"] == val.metainfo["classes"] == ("crack", "dent", "scratch")
    labels = {Path(d["img_path"]).parent.name: d["gt_label"] for d in val.load_data_list()}
    assert labels == {"crack": 0, "scratch": 2}  # plain CustomDataset would give scratch label 1


def test_an_unknown_val_class_and_a_classes_list(tmp_path: Path) -> None:
    make_folders(tmp_path, {"train": ["crack", "dent"], "val": ["crack", "rust"]})
    with pytest.raises(ValueError, match=r"\['rust'\] that are not in the class list"):
        build(tmp_path, "val")
    # an explicit `classes` sets the label order for every split
    val = build(tmp_path, "val", classes=["rust", "dent", "crack"])
    labels = {Path(d["img_path"]).parent.name: d["gt_label"] for d in val.load_data_list()}
    assert labels == {"rust": 0, "crack": 2}


class _Loader:
    def __init__(self, dataset) -> None:
        self.dataset = dataset


class _Runner:
    def __init__(self, model, train=None, val=None, load_from=None) -> None:
        self.model = model
        self.train_dataloader = train
        self._val_loop = None if val is None else type("Loop", (), {"dataloader": val})()
        self.val_loop = self._val_loop
        self._load_from = load_from
        self._resume = False


def test_num_classes_mismatch_stops_the_run(tmp_path: Path) -> None:
    make_folders(tmp_path, {"train": ["crack", "dent", "scratch"], "val": ["crack", "dent", "scratch"]})
    model = MODELS.build(classifier_cfg(dict(TOY), None))  # num_classes=3
    runner = _Runner(model, _Loader(build(tmp_path, "train")), _Loader(build(tmp_path, "val")))
    ClassListCheckHook().before_train(runner)  # agrees: no error
    model.head.num_classes = 10
    with pytest.raises(ValueError, match=r"num_classes=10 but the dataset has 3 classes"):
        ClassListCheckHook().before_train(runner)
    model.head.num_classes = 3
    val = build(tmp_path, "val", classes=["crack", "dent", "scratch", "rust"])
    other = _Runner(model, _Loader(build(tmp_path, "train")), _Loader(val))
    with pytest.raises(ValueError, match="val classes .* differ from the train classes"):
        ClassListCheckHook().before_train(other)


def test_paper_schedule_without_checkpoint_warns() -> None:
    model = MODELS.build(classifier_cfg(dict(TOY), None))
    with pytest.warns(UserWarning, match="memorymamba_neu_scratch.py"):
        PretrainedRequiredHook().before_train(_Runner(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PretrainedRequiredHook().before_train(_Runner(model, load_from="ckpt.pth"))
    cfg = Config.fromfile(str(REPO / "configs" / "memorymamba_gc10.py"))
    assert {"type": "PretrainedRequiredHook"} in cfg.custom_hooks


@pytest.mark.parametrize(("name", "classes"), [("gc10", 10), ("neu", 6), ("mt", 6), ("aluminum", 4)])
def test_from_scratch_recipe_configs(name: str, classes: int) -> None:
    cfg = Config.fromfile(str(REPO / "configs" / f"memorymamba_{name}_scratch.py"))
    assert cfg.model.head.num_classes == classes == cfg.data_preprocessor.num_classes
    assert cfg.train_dataloader.dataset.data_root == f"data/{name}"
    assert cfg.optim_wrapper.optimizer.type == "AdamW"
    assert [s.type for s in cfg.param_scheduler] == ["LinearLR", "CosineAnnealingLR"]
    assert cfg.train_dataloader.dataset.pipeline[1].type == "RandomResizedCrop"
    assert cfg.model.head.loss == {"type": "LabelSmoothLoss", "label_smooth_val": 0.1}
    assert all(h.type != "PretrainedRequiredHook" for h in cfg.custom_hooks)
    assert "save_best" not in cfg.default_hooks.checkpoint
    model = MODELS.build(cfg.model)
    assert model.head.in_channels == 768


#: Training images per class-folder split written by tools/prepare_dataset.py (paper Table 1; MT's
#: counts include its masks, so its 1,344 images split 70 / 30).
TRAIN_IMAGES = {"gc10": 1834, "neu": 228, "mt": 939, "aluminum": 277}


@pytest.mark.parametrize("name", sorted(TRAIN_IMAGES))
def test_from_scratch_schedules_give_enough_steps(name: str) -> None:
    """300 steps leave MemoryMamba underfitted on a small set, 1,200 do not (docs/memory_mamba.md)."""
    cfg = Config.fromfile(str(REPO / "configs" / f"memorymamba_{name}_scratch.py"))
    epochs = cfg.train_cfg.max_epochs
    iterations = epochs * -(-TRAIN_IMAGES[name] // cfg.train_dataloader.batch_size)
    assert iterations >= 900, f"{name}: {iterations} iterations"
    warmup, cosine = cfg.param_scheduler
    assert warmup.end == cosine.begin and cosine.end == epochs == cfg.train_cfg.val_interval
    assert 60 <= iterations * warmup.end / epochs <= 120  # ~80 warm-up iterations
