"""The VMamba key mapping against the parameter names and shapes of the official VMamba tiny.

``tests/data/vmamba_tiny_keys.txt`` lists the ``state_dict()`` of the official model definition
(MzeroMiko/VMamba ``classification/models/vmamba.py``, built with the ``vssm1_tiny_0230`` config
the MemoryMamba fork starts from; its header says how it was produced). Unlike
``synthetic_vmamba_state_dict`` -- the inverse of our own mapping -- it is independent of our code,
so these tests catch a naming or layout drift between the release checkpoint and our backbone.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmpretrain")

from memmamba_plugins.memory_mamba import MemoryMamba
from memmamba_plugins.memory_mamba.checkpoint import (
    MEMORY_KEY_PARTS,
    load_vmamba_pretrained,
    synthetic_vmamba_state_dict,
)

KEYS_FILE = Path(__file__).resolve().parent / "data" / "vmamba_tiny_keys.txt"
DEPTHS = (2, 2, 5, 2)
DIMS = (96, 192, 384, 768)
#: Official tensors our backbone has no counterpart for: the ImageNet classifier's Linear. (Its
#: ``classifier.norm`` is the final norm and goes to our last output norm.)
NO_COUNTERPART = {"classifier.head.weight", "classifier.head.bias"}
#: What every official VSSBlock holds (``v05_noz``: no z gate, so in_proj is ``d_inner x C``; no
#: conv / projection biases).
BLOCK_TENSORS = {
    "norm.weight", "norm.bias",
    "op.x_proj_weight", "op.dt_projs_weight", "op.dt_projs_bias", "op.A_logs", "op.Ds",
    "op.out_norm.weight", "op.out_norm.bias", "op.in_proj.weight", "op.conv2d.weight", "op.out_proj.weight",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
}  # fmt: skip


def read_official_keys(path: Path = KEYS_FILE) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of the fixture (``#`` lines are comments)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split("\t")
        assert name not in shapes, f"duplicate {name}"
        shapes[name] = tuple(int(s) for s in shape.split(","))
    return shapes


def expected_name(official: str) -> str | None:
    """Our name for an official one, spelled out here independently of ``VMAMBA_KEY_MAP``."""
    if official in NO_COUNTERPART:
        return None
    literal = {
        "patch_embed.0.": "patch_embed.conv1.",
        "patch_embed.2.": "patch_embed.norm1.",
        "patch_embed.5.": "patch_embed.conv2.",
        "patch_embed.7.": "patch_embed.norm2.",
        "classifier.norm.": "norm3.",
    }
    for theirs, ours in literal.items():
        if official.startswith(theirs):
            return ours + official[len(theirs) :]
    parts = official.split(".")
    assert parts[0] == "layers", official
    if parts[2] == "downsample":
        parts[3] = {"1": "conv", "3": "norm"}[parts[3]]
    return ".".join(["stages", *parts[1:]])


def _is_memory(name: str) -> bool:
    return any(part in f".{name}" for part in MEMORY_KEY_PARTS)


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    """Random tensors under the official names and shapes, as the release ships them."""
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) for name, shape in read_official_keys().items()}


def test_fixture_is_the_official_tiny() -> None:
    shapes = read_official_keys()
    assert len(shapes) == 222
    assert sum(math.prod(s) for s in shapes.values()) == 30_705_832  # VMamba-T: 30M parameters
    blocks = sorted({tuple(map(int, k.split(".")[1:4:2])) for k in shapes if ".blocks." in k})
    assert len(blocks) == sum(DEPTHS) == 11
    assert blocks == [(i, j) for i, depth in enumerate(DEPTHS) for j in range(depth)]
    for i, j in blocks:
        prefix = f"layers.{i}.blocks.{j}."
        assert {k[len(prefix) :] for k in shapes if k.startswith(prefix)} == BLOCK_TENSORS
        c, rank = DIMS[i], math.ceil(DIMS[i] / 16)
        assert shapes[prefix + "op.in_proj.weight"] == (2 * c, c)  # ssm_ratio 2, no z gate
        assert shapes[prefix + "op.x_proj_weight"] == (4, rank + 2, 2 * c)  # d_state 1
        assert shapes[prefix + "op.A_logs"] == (4 * 2 * c, 1)
        assert shapes[prefix + "op.conv2d.weight"] == (2 * c, 1, 3, 3)
    downsamples = {k for k in shapes if ".downsample." in k}
    assert {k.split(".")[1] for k in downsamples} == {"0", "1", "2"}  # none after the last stage
    assert shapes["layers.2.downsample.1.weight"] == (768, 384, 3, 3)
    assert shapes["classifier.head.weight"] == (1000, 768)


def test_official_tiny_checkpoint_loads_into_memory_mamba_tiny(official: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = MemoryMamba(arch="tiny", out_indices=(3,))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    report = load_vmamba_pretrained(model, {"model": official})

    state = model.state_dict()
    assert report.missing == []  # every non-memory tensor of ours came from the checkpoint
    assert report.shape_mismatch == []
    assert set(report.unexpected) == NO_COUNTERPART
    assert len(report.loaded) == len(official) - len(NO_COUNTERPART)
    assert set(report.loaded) | set(report.fresh_memory) == set(state)
    assert report.fresh_memory and all(_is_memory(k) for k in report.fresh_memory)
    for name in report.fresh_memory:  # the memories keep their fresh initialisation
        assert torch.equal(state[name], before[name]), name

    for name, value in official.items():
        ours = expected_name(name)
        if ours is not None:
            assert torch.equal(state[ours], value), f"{name} -> {ours}"

    spot_checks = {
        "layers.0.blocks.0.op.A_logs": "stages.0.blocks.0.op.A_logs",
        "layers.0.blocks.1.op.Ds": "stages.0.blocks.1.op.Ds",
        "layers.1.blocks.0.op.dt_projs_weight": "stages.1.blocks.0.op.dt_projs_weight",
        "layers.1.blocks.1.op.dt_projs_bias": "stages.1.blocks.1.op.dt_projs_bias",
        "layers.2.blocks.4.op.x_proj_weight": "stages.2.blocks.4.op.x_proj_weight",
        "layers.2.blocks.0.op.conv2d.weight": "stages.2.blocks.0.op.conv2d.weight",
        "layers.3.blocks.1.op.in_proj.weight": "stages.3.blocks.1.op.in_proj.weight",
        "layers.3.blocks.0.op.out_norm.weight": "stages.3.blocks.0.op.out_norm.weight",
        "layers.3.blocks.0.op.out_proj.weight": "stages.3.blocks.0.op.out_proj.weight",
        "layers.0.blocks.0.mlp.fc1.weight": "stages.0.blocks.0.mlp.fc1.weight",
        "layers.0.blocks.0.norm2.bias": "stages.0.blocks.0.norm2.bias",
        "patch_embed.0.weight": "patch_embed.conv1.weight",
        "patch_embed.2.weight": "patch_embed.norm1.weight",
        "patch_embed.5.bias": "patch_embed.conv2.bias",
        "patch_embed.7.bias": "patch_embed.norm2.bias",
        "layers.0.downsample.1.weight": "stages.0.downsample.conv.weight",
        "layers.2.downsample.3.bias": "stages.2.downsample.norm.bias",
        "classifier.norm.weight": "norm3.weight",
        "classifier.norm.bias": "norm3.bias",
    }
    for theirs, ours in spot_checks.items():
        assert torch.equal(state[ours], official[theirs]), f"{theirs} -> {ours}"
        assert not torch.equal(state[ours], before[ours]), f"{ours} kept its initialisation"
    # the stride-2 convs keep their channel-last layout through loading
    assert model.patch_embed.conv2.weight.is_contiguous(memory_format=torch.channels_last)

    # the synthetic checkpoint the other tests use has exactly the official names and shapes
    synthetic = synthetic_vmamba_state_dict(model)
    assert {k: tuple(v.shape) for k, v in synthetic.items()} == read_official_keys()


def test_conv_fusion_layers_count_as_fresh_memory(official: dict[str, torch.Tensor]) -> None:
    """``fusion="conv"`` adds 1x1 fusion convs: no VMamba counterpart, so fresh, not "missing"."""
    torch.manual_seed(0)
    model = MemoryMamba(arch="tiny", out_indices=(3,), fusion="conv")
    report = load_vmamba_pretrained(model, {"model": official})
    assert report.missing == [] and report.shape_mismatch == []
    assert set(report.unexpected) == NO_COUNTERPART
    assert len(report.loaded) == len(official) - len(NO_COUNTERPART)
    convs = [k for k in report.fresh_memory if ".op.fusion_convs." in k]
    assert len(convs) == 2 * 2 * sum(DEPTHS)  # weight + bias of one conv per memory, per block
    synthetic = synthetic_vmamba_state_dict(model)
    assert {k: tuple(v.shape) for k, v in synthetic.items()} == read_official_keys()
