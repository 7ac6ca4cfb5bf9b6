"""Unit tests of the MemoryMamba mmpretrain components (CPU, offline, small inputs)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmpretrain")

from mmengine.config import Config
from mmengine.logging import HistoryBuffer
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

import memmamba_plugins.memory_mamba  # noqa: F401  (registers the modules)
from memmamba_plugins.memory_mamba import MemoryMamba, MemSS2D
from memmamba_plugins.memory_mamba.checkpoint import (
    load_vmamba_pretrained,
    synthetic_vmamba_state_dict,
)
from memmamba_plugins.memory_mamba.compat import mmengine_safe_globals, restricted_getattr
from memmamba_plugins.memory_mamba.losses import info_nce, margin_contrastive

REPO = Path(__file__).resolve().parents[1]
#: A two-stage toy arch that runs in milliseconds.
TOY = {"depths": (1, 1), "embed_dim": 8}
IMG = 32


def toy(**kwargs) -> MemoryMamba:
    kwargs.setdefault("coarse_slots", 4)
    kwargs.setdefault("fine_slots", 5)
    kwargs.setdefault("drop_path_rate", 0.0)
    return MemoryMamba(arch=dict(TOY), **kwargs)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# -- backbone ---------------------------------------------------------------------------------
def test_custom_arch_shapes_all_stages() -> None:
    model = MemoryMamba(
        arch={"depths": (1, 1, 1, 1), "embed_dim": 8}, out_indices=(0, 1, 2, 3), coarse_slots=3
    )
    outs = model(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]


def test_tiny_preset_forward() -> None:
    model = MemoryMamba("tiny").eval()
    assert model.depths == (2, 2, 5, 2) and model.dims == [96, 192, 384, 768]
    with torch.no_grad():
        (out,) = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 768, 2, 2)


def test_stride_two_convs_stay_channel_last_through_loading() -> None:
    model = toy().eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # a default-layout checkpoint
    model.load_state_dict(state)
    convs = [model.patch_embed.conv1, model.patch_embed.conv2, model.stages[0].downsample.conv]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    down = model.stages[0].downsample
    x = torch.randn(2, 16, 16, 8)
    expected = torch.nn.functional.conv2d(
        x.permute(0, 3, 1, 2).contiguous(), down.conv.weight.contiguous(), down.conv.bias, stride=2, padding=1
    )
    with torch.no_grad():
        assert torch.allclose(down(x), down.norm(expected.permute(0, 2, 3, 1)), atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "depths", "dim"), [("small", (2, 2, 15, 2), 96), ("base", (2, 2, 15, 2), 128)]
)
def test_small_base_presets(arch: str, depths: tuple[int, ...], dim: int) -> None:
    model = MemoryMamba(arch, out_indices=(-2, -1))
    assert model.depths == depths and model.out_indices == (2, 3)
    with torch.no_grad():
        outs = model.eval()(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [4 * dim, 8 * dim]


def test_bad_arch_and_indices() -> None:
    with pytest.raises(KeyError, match="Unknown MemoryMamba arch"):
        MemoryMamba("huge")
    with pytest.raises(ValueError, match="custom arch"):
        MemoryMamba({"depths": (1,)})
    with pytest.raises(ValueError, match="out of range"):
        toy(out_indices=(5,))
    with pytest.raises(ValueError, match="similarity"):
        toy(similarity="dot")


@pytest.mark.parametrize(
    ("kwargs", "coarse", "fine"),
    [
        ({}, True, True),
        ({"coarse_slots": 0}, False, True),  # w/o CMN
        ({"fine_slots": 0}, True, False),  # w/o FMN
        ({"use_fusion": False}, True, True),  # w/o Fusion
        ({"coarse_slots": 0, "use_fusion": False}, False, True),
        ({"similarity": "l1"}, True, True),
        ({"similarity": "l2"}, True, True),
    ],
)
def test_ablation_switches(kwargs: dict, coarse: bool, fine: bool) -> None:
    model = toy(out_indices=(0, 1), **kwargs)
    outs, states = model(torch.randn(3, 3, IMG, IMG), return_memory=True)
    assert [tuple(o.shape) for o in outs] == [(3, 8, 8, 8), (3, 16, 4, 4)]
    assert len(states) == sum(TOY["depths"])
    for state in states:
        assert (state.coarse_query is not None) == coarse
        assert (state.fine_z is not None) == fine


def test_all_memories_off_is_plain_vmamba() -> None:
    model = toy(coarse_slots=0, fine_slots=0)
    names = [n for n, _ in model.named_parameters()]
    assert not any(part in n for n in names for part in ("mem_conv", "coarse", "fine", "nce"))
    outs, states = model(torch.randn(1, 3, IMG, IMG), return_memory=True)
    assert states == [] and outs[0].shape == (1, 16, 4, 4)


def test_memory_attention_sums_to_one() -> None:
    model = toy()
    _, states = model(torch.randn(4, 3, IMG, IMG), return_memory=True)
    for state in states:
        for attn, slots in ((state.coarse_attn, 4), (state.fine_attn, 5)):
            assert attn.shape == (4, slots)
            assert torch.allclose(attn.sum(-1), torch.ones(4), atol=1e-6)
            assert (attn >= 0).all()


def test_fusion_changes_features_and_state_not_kept() -> None:
    on, off = toy(), toy(coarse_slots=0, fine_slots=0)
    x = torch.randn(2, 3, IMG, IMG)
    block_on = on.stages[0].blocks[0].op
    assert isinstance(block_on, MemSS2D)
    z = torch.randn(2, block_on.d_inner, 8, 8)
    assert not torch.allclose(block_on.condition(z), z)
    on(x)
    assert block_on.last_state is None  # cleared after each forward: no graph kept alive
    assert off.stages[0].blocks[0].op.condition(z) is z


@pytest.mark.parametrize("kind", ["cosine", "l1", "l2", None])
def test_fused_readouts_follow_the_per_memory_formula(kind: str | None) -> None:
    """Eqs. 16-22 written out memory by memory: beta_k = sim(M_k, Pool(Z)), Z + s * sum_k beta_k M_k."""
    op = toy(similarity=kind or "cosine", use_fusion=kind is not None).stages[0].blocks[0].op
    x = torch.randn(3, op.d_inner, 8, 8)
    z = x.mean(dim=(2, 3))
    encoded = torch.nn.functional.gelu(op.mem_conv(z))
    fused = 0
    for bank in (op.coarse, op.fine):
        readout = bank.query(encoded).softmax(-1) @ bank.slots
        if kind == "cosine":
            beta = torch.nn.functional.cosine_similarity(readout, z, dim=-1)[:, None]
        elif kind == "l1":
            beta = 1 / (1 + (readout - z).abs().mean(-1, keepdim=True))
        elif kind == "l2":
            beta = 1 / (1 + (readout - z).pow(2).mean(-1, keepdim=True).sqrt())
        else:
            beta = 1
        fused = fused + beta * readout
    expected = x + op.fusion_scale * fused[:, :, None, None]
    with torch.no_grad():
        assert torch.allclose(op.condition(x), expected, atol=1e-6)


def test_inference_path_equals_the_training_path() -> None:
    """Under no_grad SS2D fuses conv, memory offset and SiLU in the CPU kernels; same result."""
    model = toy(out_indices=(0, 1)).eval()
    x = torch.randn(2, 3, IMG, IMG)
    outs, states = model(x, return_memory=True)  # parameters require grad: torch operations
    with torch.no_grad():
        outs_fused, states_fused = model(x, return_memory=True)
    for a, b in zip(outs, outs_fused):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(states, states_fused):
        assert torch.allclose(a.coarse_attn, b.coarse_attn, atol=1e-5)
        assert torch.allclose(a.fine_readout, b.fine_readout, atol=1e-5)


def test_memories_trained_behind_frozen_layers_get_gradients() -> None:
    model = toy()
    for name, p in model.named_parameters():
        p.requires_grad = any(part in name for part in ("mem_conv", "coarse", "fine"))
    op = model.stages[0].blocks[0].op
    model(torch.randn(2, 3, IMG, IMG))[0].sum().backward()
    assert op.mem_conv.weight.grad is not None and op.fine.query.weight.grad is not None


def test_checkpoints_with_the_former_query_keys_load() -> None:
    model = toy()
    state = {
        k.replace(".query.", ".query.1.") if (".coarse." in k or ".fine." in k) else k: v
        for k, v in model.state_dict().items()
    }
    assert any(".query.1." in k for k in state)
    fresh = toy()
    fresh.load_state_dict(state)  # strict: every key is placed
    assert torch.equal(
        fresh.stages[0].blocks[0].op.fine.query.weight, model.stages[0].blocks[0].op.fine.query.weight
    )


def test_drop_path_and_frozen_stages() -> None:
    model = toy(drop_path_rate=0.3, frozen_stages=1)
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert not any(p.requires_grad for p in model.stages[0].parameters())
    assert all(p.requires_grad for p in model.stages[1].parameters())
    model.train()
    assert not model.stages[0].training and model.stages[1].training
    assert model.stages[1].blocks[0].drop_path.drop_prob == pytest.approx(0.3)


# -- losses and head --------------------------------------------------------------------------
def test_contrastive_margin_loss_sanity() -> None:
    same = torch.ones(3, 6)
    assert margin_contrastive(same, margin=0.5).item() == pytest.approx(0.5)  # identical -> positive
    separated = torch.eye(3, 6)  # orthogonal: cosine distance 1 >= margin
    assert margin_contrastive(separated, margin=0.5).item() == 0.0
    opposite = torch.stack([torch.ones(6), -torch.ones(6)])
    assert margin_contrastive(opposite, margin=1.0).item() == 0.0
    assert margin_contrastive(torch.ones(1, 6), margin=0.5).item() == 0.0  # one class: nothing to push


def test_info_nce_sanity() -> None:
    anchors = torch.randn(8, 16)
    matched = info_nce(anchors, anchors.clone(), temperature=0.1)
    shuffled = info_nce(anchors, anchors.roll(1, 0), temperature=0.1)
    assert matched.item() < 0.1 < shuffled.item()


def _model_cfg(**backbone) -> dict:
    backbone = {"coarse_slots": 4, "fine_slots": 4, **backbone}
    return {
        "type": "MemoryMambaClassifier",
        "backbone": dict(type="MemoryMamba", arch=dict(TOY), **backbone),
        "neck": {"type": "GlobalAveragePooling"},
        "head": {
            "type": "MemoryMambaClsHead",
            "num_classes": 3,
            "in_channels": 16,
            "hidden_channels": 8,
            "coarse_loss": {"type": "MemoryContrastiveLoss", "margin": 0.5, "loss_weight": 0.1},
            "fine_loss": {"type": "MemoryInfoNCELoss", "temperature": 0.5, "loss_weight": 0.05},
        },
    }


def _samples(labels: list[int]) -> list[DataSample]:
    return [DataSample().set_gt_label(k) for k in labels]


def test_classifier_logs_each_loss_and_backpropagates_to_memory() -> None:
    model = MODELS.build(_model_cfg())
    losses = model(torch.randn(4, 3, IMG, IMG), _samples([0, 1, 2, 0]), mode="loss")
    assert set(losses) == {"loss_cls", "loss_contrastive", "loss_nce"}
    sum(losses.values()).backward()
    op = model.backbone.stages[0].blocks[0].op
    assert op.coarse.slots.grad is not None and op.fine.query.weight.grad is not None
    preds = model(torch.randn(2, 3, IMG, IMG), mode="predict")
    assert preds[0].pred_score.shape == (3,)


def test_ablated_classifier_drops_the_matching_loss() -> None:
    model = MODELS.build(_model_cfg(coarse_slots=0))
    losses = model(torch.randn(2, 3, IMG, IMG), _samples([0, 1]), mode="loss")
    assert set(losses) == {"loss_cls", "loss_nce"}


# -- pretrained VMamba mapping ----------------------------------------------------------------
def test_vmamba_key_mapping_loads_all_but_memory(tmp_path: Path) -> None:
    source = toy(out_indices=(0, 1))
    official = synthetic_vmamba_state_dict(source)
    assert "layers.0.blocks.0.op.A_logs" in official and "patch_embed.5.weight" in official
    assert "layers.0.downsample.1.weight" in official and "classifier.norm.weight" in official
    path = tmp_path / "vssm.pth"
    torch.save({"model": official}, path)

    model = toy(out_indices=(0, 1), init_cfg={"type": "Pretrained", "checkpoint": str(path)})
    model.init_weights()
    state = model.state_dict()
    assert torch.equal(state["stages.0.blocks.0.op.A_logs"], official["layers.0.blocks.0.op.A_logs"])
    assert torch.equal(state["patch_embed.conv2.weight"], official["patch_embed.5.weight"])
    assert torch.equal(state["norm1.weight"], official["classifier.norm.weight"])

    report = load_vmamba_pretrained(toy(out_indices=(0, 1)), {"model": official})
    assert report.missing == ["norm0.weight", "norm0.bias"]  # VMamba has no per-stage out norms
    assert report.unexpected == ["classifier.head.weight", "classifier.head.bias"]
    assert report.fresh_memory and all(".op." in k for k in report.fresh_memory)
    assert not report.shape_mismatch


def test_vmamba_v0_names_and_shape_mismatch() -> None:
    model = toy()
    official = {
        "layers.0.blocks.0.ln_1.weight": torch.randn(8),
        "layers.0.blocks.0.self_attention.Ds": torch.randn(64),
        # VMamba v0 has the z branch, our default block has not: a shape mismatch
        "layers.0.blocks.0.self_attention.in_proj.weight": torch.randn(32, 8),
    }
    report = load_vmamba_pretrained(model, official)
    assert report.loaded == ["stages.0.blocks.0.norm.weight", "stages.0.blocks.0.op.Ds"]
    assert len(report.shape_mismatch) == 1 and "in_proj" in report.shape_mismatch[0]


# -- checkpoints under torch's weights_only loading -------------------------------------------
class _Evil:
    def __reduce__(self):
        return (getattr, (HistoryBuffer, "__init__"))


def test_weights_only_loads_history_buffers_but_not_arbitrary_getattr() -> None:
    """Inside the plugin's scoped allow-list (its loads, mmengine's through its loader); see test_checkpoint_safety."""
    buffer = HistoryBuffer()
    buffer.update(1.5)
    blob = io.BytesIO()
    torch.save({"message_hub": {"loss": buffer}, "w": torch.ones(2)}, blob)
    blob.seek(0)
    with mmengine_safe_globals():
        loaded = torch.load(blob, weights_only=True)
    assert loaded["message_hub"]["loss"].current() == 1.5

    blob = io.BytesIO()
    torch.save({"x": _Evil()}, blob)
    blob.seek(0)
    with pytest.raises(Exception, match="Refusing getattr"), mmengine_safe_globals():
        torch.load(blob, weights_only=True)
    with pytest.raises(Exception, match="Refusing"):
        restricted_getattr(torch, "load")


# -- configs and dataset ----------------------------------------------------------------------
@pytest.mark.parametrize(("name", "classes"), [("gc10", 10), ("neu", 6), ("mt", 6), ("aluminum", 4)])
def test_configs(name: str, classes: int) -> None:
    cfg = Config.fromfile(str(REPO / "configs" / f"memorymamba_{name}.py"))
    assert cfg.custom_imports == {"imports": ["memmamba_plugins.memory_mamba"], "allow_failed_imports": False}
    assert cfg.model.head.num_classes == classes == cfg.data_preprocessor.num_classes
    assert cfg.optim_wrapper.optimizer == {"type": "Adam", "lr": 2e-5, "weight_decay": 0.01}
    assert cfg.train_cfg.max_epochs == 10 and cfg.train_dataloader.batch_size == 64
    assert cfg.param_scheduler[0].end == pytest.approx(0.5)  # 5 % of 10 epochs warm-up
    assert [e.type for e in cfg.val_evaluator] == ["Accuracy", "SingleLabelMetric"]
    assert cfg.train_dataloader.dataset.data_root == f"data/{name}"
    assert cfg.test_dataloader.dataset.data_root == f"data/{name}"


def test_missing_data_root_is_explained(tmp_path: Path) -> None:
    from mmpretrain.registry import DATASETS

    with pytest.raises(FileNotFoundError, match="prepare_dataset.py"):
        DATASETS.build(
            {"type": "DefectFolderDataset", "data_root": str(tmp_path / "nope"), "data_prefix": "train"}
        )
