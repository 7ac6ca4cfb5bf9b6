"""Load ImageNet-pretrained VMamba weights into :class:`~.backbone.MemoryMamba`.

The Mem-SSM block keeps VMamba's parameter names inside ``op`` (in_proj, conv2d, x_proj_weight,
dt_projs_weight, dt_projs_bias, A_logs, Ds, out_norm, out_proj), so only the container names
differ. The memory parts (``mem_conv``, ``coarse``, ``fine``, ``nce_*`` and, for
``fusion="conv"``, ``fusion_convs``) have no VMamba counterpart and stay freshly initialised.
The mapping is checked against shapes: a tensor whose shape differs (another SS2D variant, a 4x4
patchify stem, another class count) is skipped and reported, never loaded. Through
``init_cfg=dict(type='Pretrained', ...)`` a checkpoint that matches less than
:data:`MIN_LOADED_FRACTION` of the backbone is refused (:class:`PartialCheckpointError`) unless
``allow_partial=True``: a wrong ``prefix`` or ``arch`` would otherwise train from random weights.

Local files are read by :func:`load_from_local_checked`, which :func:`allow_mmengine_checkpoints`
also registers with mmengine's ``CheckpointLoader`` (its public ``register_scheme``) for every local
path, so ``load_from``, ``--resume`` and ``mim test --checkpoint`` take it too. It checks the file
first (:func:`check_checkpoint_file`: a truncated or bit-flipped file is named as such), then calls
``torch.load(weights_only=True)`` inside :func:`~.compat.mmengine_safe_globals`, the only place
the mmengine allow-list applies, and turns torch's refusal of a pickled callable into
:class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import os.path as osp
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from mmengine.logging import print_log
from mmengine.runner import CheckpointLoader
from torch import Tensor, nn

from .compat import mmengine_safe_globals

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
#: Least share of the backbone's pretrainable (non-memory) tensors that ``init_cfg=dict(type='Pretrained')``
#: must load. A matching VMamba release loads all of them; a few per-stage output norms (``out_indices``
#: with several stages) or a stem for other ``in_channels`` stay below 10 %, while a wrong prefix, arch or
#: SS2D variant loads far less.
MIN_LOADED_FRACTION = 0.9
#: The mmengine ``CheckpointLoader`` prefix of local paths (it matches every path; longer prefixes win).
LOCAL_SCHEME = ""
#: First byte of a pickle (protocol 2+): ``torch.save(..., _use_new_zipfile_serialization=False)`` files
#: are plain pickles, not zips; they are left to ``torch.load``.
PICKLE_PROTOCOL_MARKER = b"\x80"
#: Bytes read at a time while the CRC-32 of an entry is checked.
CRC_CHUNK_BYTES = 1 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or corrupt (or no checkpoint at all)."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """``torch.load(weights_only=True)`` refused a checkpoint: it pickles something other than weights."""


class PartialCheckpointError(ValueError):
    """A pretrained checkpoint matches too little of the backbone (wrong ``prefix`` or ``arch``)."""


def _corrupt(path: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Checkpoint {path!r} is truncated or corrupt: {problem}. It cannot be loaded; copy or download it "
        "again (an interrupted download or copy leaves exactly this), or use another checkpoint, e.g. an "
        "earlier `epoch_N.pth` of the run."
    )


def check_checkpoint_file(path: str) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``path`` is a complete, undamaged ``torch.save`` file.

    ``torch.load`` reports a truncated archive as a bare ``OSError`` or ``EOFError``, a file that is no
    checkpoint as ``KeyError: 101``, and loads a flipped bit silently: it does not verify the CRC-32
    that ``torch.save`` records for every entry. This checks both with the standard library and never
    unpickles anything. Legacy (non-zip) ``torch.save`` files are left to ``torch.load``.

    Raises:
        FileNotFoundError: ``path`` does not exist or is a folder.
        CorruptCheckpointError: the archive is incomplete, an entry's CRC-32 does not match, or the file
            is neither a zip archive nor a pickle.
    """
    if not osp.isfile(path):
        where = "is a folder" if osp.isdir(path) else "does not exist"
        raise FileNotFoundError(f"Checkpoint {path!r} {where}; pass the `.pth` file itself.")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            if file.read(len(PICKLE_PROTOCOL_MARKER)) == PICKLE_PROTOCOL_MARKER:
                return
        size = osp.getsize(path)
        raise _corrupt(path, f"its {size} bytes hold no complete zip archive, which every torch.save file is")
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                # torch.serialization.set_crc32_options(False) writes 0 for every CRC: nothing to verify.
                if entry.CRC == 0:
                    continue
                with archive.open(entry) as member:  # raises BadZipFile at the end on a CRC mismatch
                    while member.read(CRC_CHUNK_BYTES):
                        pass
    # A damaged directory surfaces as any of these (a flipped name byte: UnicodeDecodeError, a flipped
    # method or flag field: NotImplementedError or RuntimeError), each meaning "not a readable zip".
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise _corrupt(path, f"the zip archive is damaged ({exc})") from exc


def _refused(path: str, exc: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """The error for a file that ``weights_only`` unpickling refused, naming the offending globals."""
    try:
        with mmengine_safe_globals():
            offending = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError):  # a legacy (non-zip) file: only torch's own reason is known
        offending = []
    reason = f"it pickles {offending}" if offending else str(exc).strip().splitlines()[-1]
    return UnsafeCheckpointError(
        f"Checkpoint {path!r} was refused by torch's weights_only loading: {reason}. Beyond tensors and plain "
        "containers only mmengine's HistoryBuffer and numpy arrays are allowed; anything else could run code "
        "while loading. Do not switch weights_only off; use a checkpoint from a source you trust, or have the "
        "code that wrote this one save only tensors (e.g. `torch.save(model.state_dict(), path)`)."
    )


def load_from_local_checked(filename: str, map_location: Any = None) -> Any:  # noqa: ANN401 - torch.load's types
    """``torch.load(weights_only=True)`` of a local file, checked first, with the mmengine allow-list.

    The loader :func:`allow_mmengine_checkpoints` registers with mmengine's ``CheckpointLoader`` (its
    log line reads "Loads checkpoint by local_checked backend").

    Args:
        filename: local path (``~`` is expanded).
        map_location: as for :func:`torch.load`.

    Raises:
        FileNotFoundError: no such file.
        CorruptCheckpointError: the file is truncated or damaged (see :func:`check_checkpoint_file`).
        UnsafeCheckpointError: the file pickles a global outside the allow-list (e.g. a function).
    """
    path = osp.expanduser(filename)
    check_checkpoint_file(path)
    try:
        with mmengine_safe_globals():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc) from exc
    except EOFError as exc:  # a truncated legacy (non-zip) file; zips were checked above
        raise _corrupt(path, "the pickle ends early") from exc


def allow_mmengine_checkpoints() -> None:
    """Make mmengine load local checkpoints with :func:`load_from_local_checked`; idempotent.

    Registered through mmengine's public ``CheckpointLoader.register_scheme`` for local paths, which
    ``load_from``, ``resume`` and ``init_cfg`` loads all go through. torch's own allow-list is not
    touched: a ``torch.load`` elsewhere in the process behaves exactly as without the plugin.
    """
    CheckpointLoader.register_scheme(prefixes=LOCAL_SCHEME, loader=load_from_local_checked, force=True)


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


def read_checkpoint(checkpoint: str) -> Any:  # noqa: ANN401 - whatever the file holds
    """A local file through :func:`load_from_local_checked`, a URL (``https://``, ``s3://``, ...) through mmengine."""
    if "://" in str(checkpoint):
        return CheckpointLoader.load_checkpoint(checkpoint, map_location="cpu")
    return load_from_local_checked(str(checkpoint), map_location="cpu")


def load_vmamba_pretrained(
    model: nn.Module, checkpoint: str | Mapping, prefix: str | None = None, logger: str = "current"
) -> LoadReport:
    """Load a VMamba (or MemoryMamba) checkpoint into ``model`` and log what was loaded.

    The report is for the caller to judge; ``init_cfg=dict(type='Pretrained')`` refuses a partial
    load with :func:`require_enough_loaded`.

    Args:
        model: a :class:`~.backbone.MemoryMamba`.
        checkpoint: local path (read by :func:`load_from_local_checked`), URL (mmengine's
            ``CheckpointLoader``) or an already loaded dict.
        prefix: keep only keys under this prefix and strip it (e.g. ``"backbone."``).
        logger: mmengine logger name for the report.

    Returns:
        The :class:`LoadReport`.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
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


def _best_prefix(checkpoint: Mapping, ours: Mapping[str, Tensor], last_norm: str | None) -> tuple[str, int]:
    """The ``prefix`` (``""``: none, else a leading ``name.``) under which most tensors fit ``ours``, and how many."""
    votes: Counter[str] = Counter()
    for name, value in extract_state_dict(checkpoint).items():
        head, dot, rest = name.partition(".")
        for candidate, key in (("", name), (head + dot, rest)):
            mapped = map_vmamba_key(key, last_norm) if key else None
            if mapped in ours and ours[mapped].shape == value.shape:
                votes[candidate] += 1
    return votes.most_common(1)[0] if votes else ("", 0)


def require_enough_loaded(
    model: nn.Module,
    report: LoadReport,
    checkpoint: Mapping,
    prefix: str | None = None,
    source: str = "(a state dict)",
) -> None:
    """Raise :class:`PartialCheckpointError` when ``report`` loaded under :data:`MIN_LOADED_FRACTION`.

    The message says how many tensors matched and what to change: the ``prefix`` the checkpoint's
    keys carry, the ``arch`` / SS2D settings when shapes differ, or ``allow_partial=True``.

    Args:
        model: the backbone ``report`` is about.
        report: what :func:`load_vmamba_pretrained` loaded.
        checkpoint: the loaded checkpoint (searched for a better ``prefix``).
        prefix: the ``prefix`` that was used.
        source: the checkpoint's path, for the message.
    """
    wanted = len(report.loaded) + len(report.missing)
    if not wanted or len(report.loaded) >= MIN_LOADED_FRACTION * wanted:
        return
    ours = model.state_dict()
    last = max(getattr(model, "out_indices", ()) or (-1,))
    last_norm = f"norm{last}." if f"norm{last}.weight" in ours else None
    suggested, fits = _best_prefix(checkpoint, ours, last_norm)
    if fits >= MIN_LOADED_FRACTION * wanted and suggested != (prefix or ""):
        fix = (
            f"Its tensors are named under {suggested!r}: pass `prefix={suggested!r}` in init_cfg."
            if suggested
            else f"Without a prefix {fits} tensors match: drop `prefix={prefix!r}` from init_cfg."
        )
    elif prefix and not (report.loaded or report.shape_mismatch or report.unexpected):
        fix = f"No tensor of the checkpoint is named under prefix={prefix!r}; correct or drop `prefix`."
    elif report.shape_mismatch:
        fix = (
            f"{len(report.shape_mismatch)} tensors differ in shape (e.g. {report.shape_mismatch[0]}): the "
            "checkpoint is of another size or SS2D variant. Set `arch` ('tiny', 'small', 'base' or depths / "
            "embed_dim) and d_state, ssm_ratio, mlp_ratio, gated, conv_bias to the checkpoint's."
        )
    else:
        fix = (
            f"The backbone's {report.missing[0]!r} and {len(report.missing) - 1} more are not in the "
            "checkpoint: it is of a smaller arch (fewer blocks) or not a VMamba checkpoint. Set `arch` to "
            "the checkpoint's."
        )
    raise PartialCheckpointError(
        f"The MemoryMamba pretrained checkpoint {source} matched only {len(report.loaded)} of the backbone's "
        f"{wanted} pretrainable tensors (at least {MIN_LOADED_FRACTION:.0%} must load; "
        f"{len(report.unexpected)} checkpoint tensors have no counterpart, {len(report.shape_mismatch)} "
        f"differ in shape). {fix} To train from this partial load on purpose, add `allow_partial=True` "
        "to init_cfg."
    )


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
