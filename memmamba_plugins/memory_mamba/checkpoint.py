"""Load ImageNet-pretrained VMamba weights into :class:`~.backbone.MemoryMamba`.

The Mem-SSM block keeps VMamba's parameter names inside ``op`` (in_proj, conv2d, x_proj_weight,
dt_projs_weight, dt_projs_bias, A_logs, Ds, out_norm, out_proj), so only the container names
differ. The memory parts (``mem_conv``, ``coarse``, ``fine``, ``nce_*`` and, for
``fusion="conv"``, ``fusion_convs``) have no VMamba counterpart and stay freshly initialised.
The mapping is checked against shapes: a tensor whose shape differs (another SS2D variant, a 4x4
patchify stem, another class count) is skipped and reported, never loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from mmengine.logging import print_log
from mmengine.runner import CheckpointLoader
from torch import Tensor, nn

#: ``(official VMamba pattern, our replacement)``, applied in order with :func:`re.sub`.
#: Covers VMamba v2/v3 (``layers.i.blocks.j.op``, Sequential stem and down-sampling) and the
#: original v0 release (``ln_1`` / ``self_attention``; its 4x4 stem and patch merging have no
#: counterpart and are reported as unmatched).
VMAMBA_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^patch_embed\.0\.", "patch_embed.conv1."),
    (r"^patch_embed\.2\.", "patch_embed.norm1."),
    (r"^patch_embed\.5\.", "patch_embed.conv2."),
    (r"^patch_embed\.7\.", "patch_embed.norm2."),
    (r"^layers\.(\d+)\.downsample\.1\.", r"stages.\1.downsample.conv."),
    (r"^layers\.(\d+)\.downsample\.3\.", r"stages.\1.downsample.norm."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.ln_1\.", r"stages.\1.blocks.\2.norm."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.self_attention\.", r"stages.\1.blocks.\2.op."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.blocks.\2."),
)
#: Official final-norm names; they map onto our norm of the last stage when it is an output.
VMAMBA_FINAL_NORMS: tuple[str, ...] = ("classifier.norm.", "norm.")
#: Substrings of our parameter names that belong to the memories (fresh, never in VMamba).
#: ``.fusion_convs.`` are the official-style 1x1 fusion convs of ``fusion="conv"``: fresh as well,
#: not "missing" (checked against the official tiny's names in tests/test_memory_mamba_checkpoint.py).
MEMORY_KEY_PARTS: tuple[str, ...] = (
    ".mem_conv.",
    ".coarse.",
    ".fine.",
    ".nce_z.",
    ".nce_mem.",
    ".fusion_convs.",
)
#: Wrappers under which checkpoints keep their weights.
STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model", "model_ema")


@dataclass
class LoadReport:
    """Outcome of :func:`load_vmamba_pretrained`."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ours, not memory, not in the checkpoint
    fresh_memory: list[str] = field(default_factory=list)  # ours, memory parts (expected missing)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys with no counterpart
    shape_mismatch: list[str] = field(default_factory=list)


def extract_state_dict(checkpoint: Mapping, prefix: str | None = None) -> dict[str, Tensor]:
    """Unwrap ``{'model': ...}``-style checkpoints and strip ``module.`` / ``prefix``."""
    state = checkpoint
    for key in STATE_DICT_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    result = {}
    for name, value in state.items():
        if not isinstance(value, Tensor):
            continue
        name = name.removeprefix("module.")
        if prefix:
            if not name.startswith(prefix):
                continue
            name = name[len(prefix) :]
        result[name] = value
    return result


def map_vmamba_key(name: str, last_norm: str | None) -> str | None:
    """Official VMamba key -> our key, or ``None`` when it has no counterpart (e.g. the classifier)."""
    for final in VMAMBA_FINAL_NORMS:
        if name.startswith(final):
            return None if last_norm is None else last_norm + name[len(final) :]
    if name.startswith(("classifier.", "head.")):
        return None
    for pattern, replacement in VMAMBA_KEY_MAP:
        mapped, count = re.subn(pattern, replacement, name)
        if count:
            return mapped
    return name  # already our naming (e.g. one of our own checkpoints)


def load_vmamba_pretrained(
    model: nn.Module, checkpoint: str | Mapping, prefix: str | None = None, logger: str = "current"
) -> LoadReport:
    """Load a VMamba (or MemoryMamba) checkpoint into ``model`` and log what was loaded.

    Args:
        model: a :class:`~.backbone.MemoryMamba`.
        checkpoint: path / URL (read by mmengine's ``CheckpointLoader``, which uses torch's
            ``weights_only`` loading on torch >= 2.6) or an already loaded dict.
        prefix: keep only keys under this prefix and strip it (e.g. ``"backbone."``).
        logger: mmengine logger name for the report.

    Returns:
        The :class:`LoadReport`.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = CheckpointLoader.load_checkpoint(checkpoint, map_location="cpu")
    source = extract_state_dict(checkpoint, prefix)
    ours = model.state_dict()
    last = max(getattr(model, "out_indices", ()) or (-1,))
    last_norm = f"norm{last}." if f"norm{last}.weight" in ours else None

    report = LoadReport()
    to_load: dict[str, Tensor] = {}
    for name, value in source.items():
        mapped = map_vmamba_key(name, last_norm)
        if mapped is None or mapped not in ours:
            report.unexpected.append(name)
        elif ours[mapped].shape != value.shape:
            report.shape_mismatch.append(
                f"{name} -> {mapped}: {tuple(value.shape)} vs {tuple(ours[mapped].shape)}"
            )
        else:
            to_load[mapped] = value
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    for name in ours:
        if name in to_load:
            continue
        if any(part in f".{name}" for part in MEMORY_KEY_PARTS):
            report.fresh_memory.append(name)
        else:
            report.missing.append(name)

    print_log(
        f"MemoryMamba pretrained: loaded {len(report.loaded)}/{len(ours)} tensors; "
        f"{len(report.fresh_memory)} memory tensors stay freshly initialised; "
        f"{len(report.missing)} missing: {report.missing}; "
        f"{len(report.shape_mismatch)} shape mismatches: {report.shape_mismatch}; "
        f"{len(report.unexpected)} unused checkpoint keys: {report.unexpected}",
        logger=logger,
    )
    return report


@torch.no_grad()
def synthetic_vmamba_state_dict(model: nn.Module, num_classes: int = 1000) -> dict[str, Tensor]:
    """Random tensors under official VMamba v2 names, shaped like ``model`` (for tests)."""
    inverse = {
        "patch_embed.conv1.": "patch_embed.0.",
        "patch_embed.norm1.": "patch_embed.2.",
        "patch_embed.conv2.": "patch_embed.5.",
        "patch_embed.norm2.": "patch_embed.7.",
    }
    result: dict[str, Tensor] = {}
    last = max(model.out_indices)
    for name, value in model.state_dict().items():
        if any(part in f".{name}" for part in MEMORY_KEY_PARTS):
            continue
        official = name
        for ours, theirs in inverse.items():
            official = official.replace(ours, theirs)
        official = re.sub(r"^stages\.(\d+)\.downsample\.conv\.", r"layers.\1.downsample.1.", official)
        official = re.sub(r"^stages\.(\d+)\.downsample\.norm\.", r"layers.\1.downsample.3.", official)
        official = re.sub(r"^stages\.", "layers.", official)
        official = re.sub(rf"^norm{last}\.", "classifier.norm.", official)
        if re.match(r"^norm\d+\.", official):
            continue  # VMamba has no per-stage output norms
        result[official] = torch.randn_like(value.float()).to(value.dtype)
    width = model.dims[-1]
    result["classifier.head.weight"] = torch.randn(num_classes, width)
    result["classifier.head.bias"] = torch.randn(num_classes)
    return result
