"""Pyramid-Mamba as a plain :class:`torch.nn.Module` (no Lightning, no anomalib training glue).

Reference:
    Iqbal et al., "Pyramid-based Mamba Multi-class Unsupervised Anomaly Detection", 2025
    (``shared/papers/002``). Sec. 3: a frozen pre-trained encoder, a Multi-scale Feature Fusion
    (MFF) bottleneck, feature-level Gaussian noise during training, and a decoder of Context-aware
    State Space (CSS) modules. A CSS module runs the Pyramidal Scanning Strategy (PSS: the same
    SS2D over the whole map and its 2^k x 2^k sub-regions, averaged) next to the Local Enhancement
    Convolution (LEC: depthwise 5x5 and 7x7 branches), fuses them with a 1x1 conv and adds the
    input back. The architecture details that the paper leaves open follow its official code
    (a MambaAD fork), as summarised in ``shared/FACTS.md``.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from timm.layers import DropPath
from torch import Tensor, nn

from memmamba_plugins import pretrained
from memmamba_plugins.ssm import LINEAR_INIT_STD, SS2D, init_linear_and_norm

from .anomaly_map import AnomalyMapGenerator, SeparableGaussianBlur2d

#: Paper defaults (Sec. 4 "Implementation details" and the official code).
DEFAULT_BACKBONE = "resnet34"
DEFAULT_LAYERS: tuple[str, ...] = ("layer1", "layer2", "layer3")
DEFAULT_INPUT_SIZE: tuple[int, int] = (256, 256)
DEFAULT_DIMS: tuple[int, ...] = (512, 256, 128, 64)
DEFAULT_DEPTHS: tuple[int, ...] = (3, 4, 6, 3)
#: CSS modules per decoder stage: depth 3 -> 1 module of 3 blocks, 4 -> 2 x 2, 6 -> 2 x 3.
DEFAULT_CSS_MODULES: tuple[int, ...] = (1, 2, 2, 1)
DEFAULT_PYRAMID_LEVELS: tuple[int, ...] = (0, 1)
DEFAULT_LEC_KERNELS: tuple[int, ...] = (5, 7)
DEFAULT_D_STATE = 16
DEFAULT_SSM_EXPAND = 2.0
DEFAULT_NOISE_STD = 0.05
DEFAULT_DROP_PATH = 0.2
DEFAULT_MFF_BLOCKS = 3
#: Gaussian blur of the anomaly map at the paper's 256x256 input; other sizes scale it (see blur_sigma_for).
PAPER_BLUR_SIGMA = 4.0
PAPER_INPUT_SIDE = 256
#: ResNet bottleneck expansion used by the MFF's Bottleneck blocks.
BOTTLENECK_EXPANSION = 4
#: Images are RGB: the ImageNet encoders' first convolution takes three channels.
IMAGE_CHANNELS = 3
#: Inputs of another size are resized as the pre-processor's ``Resize(antialias=True)`` does on tensors,
#: so a model fed raw-sized images gives the same scores as one fed pre-processed images.
RESIZE_MODE = "bilinear"


#: Host of timm's pre-trained weights.
HF_HUB_HOST = "huggingface.co"


class PretrainedWeightsUnavailableError(RuntimeError):
    """The encoder's pre-trained weights could not be loaded (typically: offline)."""


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------
def _layer_indices(backbone: str, layers: Sequence[str | int]) -> list[int]:
    """Map timm feature names (``"layer1"``) or integer indices to ``out_indices``."""
    import timm

    probe = timm.create_model(backbone, pretrained=False, features_only=True)
    names = list(probe.feature_info.module_name())
    indices = []
    for layer in layers:
        if isinstance(layer, int) or (isinstance(layer, str) and layer.isdigit()):
            indices.append(int(layer))
        elif layer in names:
            indices.append(names.index(layer))
        else:
            msg = f"Layer {layer!r} is not a feature of timm model {backbone!r}; available: {names}."
            raise ValueError(msg)
    return indices


@contextlib.contextmanager
def _offline_unless_hub_resolves() -> Iterator[None]:
    """Use only the local weights cache when the hub's host does not even resolve.

    Without this, huggingface_hub retries with back-off for about a minute before failing offline.
    """
    try:
        socket.getaddrinfo(HF_HUB_HOST, 443)
        online = True
    except OSError:
        online = False
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not online
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def build_encoder(
    backbone: str,
    layers: Sequence[str | int],
    pre_trained: bool,
    weights_path: str | Path | None = None,
) -> nn.Module:
    """Create the frozen timm ``features_only`` encoder.

    Args:
        backbone: any timm CNN that supports ``features_only``.
        layers: feature names (``feature_info.module_name()``) or indices.
        pre_trained: load ImageNet weights: from a locally installed package where there is one
            (``tf_efficientnet_lite0``, see :mod:`memmamba_plugins.pretrained`), else from timm's hub
            (needs network or a warm cache).
        weights_path: a local timm or torchvision checkpoint of ``backbone``; wins over
            ``pre_trained`` and never touches the network.

    Raises:
        PretrainedWeightsUnavailableError: when ``pre_trained=True`` and the hub cannot be reached,
            naming the two ways out.
    """
    import timm

    indices = _layer_indices(backbone, layers)
    kwargs: dict = {"features_only": True, "out_indices": indices}
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            msg = f"weights_path {str(path)!r} does not exist."
            raise FileNotFoundError(msg)
        # timm's own loader applies the model's checkpoint filter, so torchvision layouts work.
        return timm.create_model(
            backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    if not pre_trained:
        return timm.create_model(backbone, pretrained=False, **kwargs)
    overlay = pretrained.pretrained_cfg_overlay(backbone)
    if overlay is not None:  # ImageNet weights installed from the package index: no network
        return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    try:
        with _offline_unless_hub_resolves():
            return timm.create_model(backbone, pretrained=True, **kwargs)
    except Exception as exc:  # hub errors come in many types (OSError, HTTP, LocalEntryNotFound...)
        msg = (
            f"Could not load the pre-trained ImageNet weights of {backbone!r} ({type(exc).__name__}: {exc}). "
            "The machine is probably offline. Either train without them with `pre_trained=False` "
            "(`--model.pre_trained false`), pass a local timm/torchvision checkpoint of the backbone "
            "with `weights_path=<file>` (`--model.weights_path <file>`), or use an encoder whose weights "
            f"install offline (`--model.backbone tf_efficientnet_lite0`). {pretrained.missing_weights_hint(backbone)}"
        )
        raise PretrainedWeightsUnavailableError(msg) from exc


# --------------------------------------------------------------------------------------------
# MFF bottleneck
# --------------------------------------------------------------------------------------------
def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1 -> 3x3 -> 1x1, x4 expansion) with a projection shortcut."""

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * BOTTLENECK_EXPANSION
        self.body = nn.Sequential(
            _conv_bn_relu(c_in, width, 1),
            _conv_bn_relu(width, width, 3, stride),
            nn.Conv2d(width, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class MFF(nn.Module):
    """Multi-scale Feature Fusion bottleneck (paper Sec. 3.1; RD4AD's OCBE as used by the code).

    Each finer encoder map is brought down with a stride-2 3x3 conv and added to a 1x1 projection of
    the next coarser map; the fused coarsest map goes through a 1x1 conv and ResNet Bottleneck
    blocks, the first with stride 2, giving ``out_dim`` channels at half the coarsest resolution.

    Args:
        in_channels: encoder channels, finest first (resnet34: 64, 128, 256).
        out_dim: output channels (the first decoder dim, 512); must be divisible by 4.
        num_blocks: Bottleneck blocks.
    """

    def __init__(
        self, in_channels: Sequence[int], out_dim: int, num_blocks: int = DEFAULT_MFF_BLOCKS
    ) -> None:
        super().__init__()
        if out_dim % BOTTLENECK_EXPANSION:
            msg = f"MFF out_dim must be divisible by {BOTTLENECK_EXPANSION}, got {out_dim}."
            raise ValueError(msg)
        chans = list(in_channels)
        self.down = nn.ModuleList(_conv_bn_relu(chans[i], chans[i + 1], 3, 2) for i in range(len(chans) - 1))
        self.lateral = nn.ModuleList(_conv_bn_relu(c, c, 1) for c in chans[1:])
        self.fuse = _conv_bn_relu(chans[-1], chans[-1], 1)
        width = out_dim // BOTTLENECK_EXPANSION
        blocks = [Bottleneck(chans[-1], width, stride=2)]
        blocks += [Bottleneck(out_dim, width) for _ in range(num_blocks - 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = features[0]
        for down, lateral, feat in zip(self.down, self.lateral, features[1:], strict=True):
            x = down(x) + lateral(feat)
        return self.blocks(self.fuse(x))


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------
class PSSBlock(nn.Module):
    """One pre-norm residual SS2D block: ``x + DropPath(SS2D(LN(x)))``, channel-last."""

    def __init__(
        self, dim: int, d_state: int, expand: float, pyramid_levels: Sequence[int], drop_path: float
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = SS2D(dim, d_state=d_state, expand=expand, pyramid_levels=pyramid_levels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class LECBranch(nn.Module):
    """Local Enhancement Convolution branch: 1x1 -> depthwise kxk -> 1x1, each InstanceNorm + SiLU."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        if kernel % 2 == 0:
            msg = f"LEC kernels must be odd to keep the map size, got {kernel}."
            raise ValueError(msg)
        layers: list[nn.Module] = []
        for k, groups in ((1, 1), (kernel, dim), (1, 1)):
            layers += [
                nn.Conv2d(dim, dim, k, padding=k // 2, groups=groups),
                nn.InstanceNorm2d(dim),
                nn.SiLU(),
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class CSSModule(nn.Module):
    """Context-aware State Space module (paper Sec. 3.2, Fig. 2), channel-last ``(B, H, W, C)``.

    PSS branch (SS2D blocks in series over the pyramid levels) in parallel with the LEC branches,
    concatenated, fused by a 1x1 conv and added to the input.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int,
        drop_paths: Sequence[float],
        d_state: int,
        expand: float,
        pyramid_levels: Sequence[int],
        lec_kernels: Sequence[int],
    ) -> None:
        super().__init__()
        self.pss = nn.Sequential(
            *(PSSBlock(dim, d_state, expand, pyramid_levels, drop_paths[i]) for i in range(num_blocks))
        )
        self.lec = nn.ModuleList(LECBranch(dim, k) for k in lec_kernels)
        self.fuse = nn.Conv2d(dim * (1 + len(self.lec)), dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        channel_first = x.permute(0, 3, 1, 2)
        branches = [self.pss(x).permute(0, 3, 1, 2)] + [lec(channel_first) for lec in self.lec]
        return x + self.fuse(torch.cat(branches, dim=1)).permute(0, 2, 3, 1)


class PatchExpand(nn.Module):
    """x2 up-sampling: Linear ``C -> 2C``, 2x2 pixel shuffle to ``C/2`` channels, LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = self.expand(x).reshape(b, h, w, 2, 2, c // 2)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 2)
        return self.norm(x)


def module_drop_path_rates(num_modules: int, max_rate: float) -> list[float]:
    """Stochastic-depth rate of each CSS module, coarsest first: ``max_rate`` down to 0.

    The official code gives all blocks of a CSS module one rate and reverses the usual linear
    ramp, so the coarse (8x8) modules, which hold most of the decoder's capacity, drop most.
    """
    if num_modules == 1:
        return [float(max_rate)]
    return torch.linspace(0, max_rate, num_modules).flip(0).tolist()


class PyramidMambaDecoder(nn.Module):
    """Stages of CSS modules; every stage after the first starts with a :class:`PatchExpand`.

    Returns the outputs of stages 2..n (coarsest first), channel-first, to be compared with the
    encoder maps.
    """

    def __init__(
        self,
        dims: Sequence[int],
        depths: Sequence[int],
        css_modules: Sequence[int],
        d_state: int,
        expand: float,
        pyramid_levels: Sequence[int],
        lec_kernels: Sequence[int],
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        if not len(dims) == len(depths) == len(css_modules):
            msg = (
                f"dims, depths and css_modules need one entry per stage, got {dims}, {depths}, {css_modules}."
            )
            raise ValueError(msg)
        for i in range(1, len(dims)):
            if dims[i] * 2 != dims[i - 1]:
                msg = f"Each decoder stage halves the channels (patch expand); got dims {tuple(dims)}."
                raise ValueError(msg)
        for depth, modules in zip(depths, css_modules, strict=True):
            if modules < 1 or depth % modules:
                msg = f"Stage depth {depth} does not split into {modules} CSS modules of equal size."
                raise ValueError(msg)
        rates = module_drop_path_rates(sum(css_modules), drop_path_rate)
        self.expands = nn.ModuleList()
        self.stages = nn.ModuleList()
        module_index = 0
        for i, (dim, depth, modules) in enumerate(zip(dims, depths, css_modules, strict=True)):
            self.expands.append(PatchExpand(dims[i - 1]) if i > 0 else nn.Identity())
            per_module = depth // modules
            stage = []
            for _ in range(modules):
                block_rates = [rates[module_index]] * per_module
                stage.append(
                    CSSModule(dim, per_module, block_rates, d_state, expand, pyramid_levels, lec_kernels)
                )
                module_index += 1
            self.stages.append(nn.Sequential(*stage))
        self.apply(init_linear_and_norm)  # official code

    def forward(self, x: Tensor) -> list[Tensor]:
        x = x.permute(0, 2, 3, 1)  # SS2D and LayerNorm work channel-last
        outputs = []
        for i, (expand, stage) in enumerate(zip(self.expands, self.stages, strict=True)):
            x = stage(expand(x))
            if i > 0:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------
def blur_sigma_for(input_size: tuple[int, int]) -> float:
    """The paper's blur (sigma 4 at 256x256) scaled to ``input_size``.

    Measured on ``bench/industrial_ad.py``'s data at 128x128, one trained model: sigma 4 gave mean image
    AUROC 0.782 / pixel AUPRO 0.561, the scaled sigma 2 gave 0.806 / 0.581 (docs/pyramid_mamba.md).
    """
    return PAPER_BLUR_SIGMA * min(input_size) / PAPER_INPUT_SIDE


def valid_input_sizes(unit: int, limit: int = 1024) -> list[int]:
    """Square input sides up to ``limit`` that are multiples of ``unit``."""
    return list(range(unit, limit + 1, unit))


def check_images(images: Tensor) -> None:
    """Refuse anything but a ``(B, 3, H, W)`` batch, before a convolution fails with its own message.

    Raises:
        ValueError: naming the shape that came in and how to make RGB batches of it.
    """
    if images.dim() != 4:
        msg = (
            f"Pyramid-Mamba expects a batch of images shaped (batch, {IMAGE_CHANNELS}, height, width), got shape "
            f"{tuple(images.shape)}. Add the batch dimension of a single image with `image.unsqueeze(0)`."
        )
        raise ValueError(msg)
    channels = images.shape[1]
    if channels != IMAGE_CHANNELS:
        msg = (
            f"Pyramid-Mamba expects {IMAGE_CHANNELS}-channel RGB images, got {channels} channel(s) (batch shape "
            f"{tuple(images.shape)}). Convert grey images to RGB, e.g. `images.expand(-1, {IMAGE_CHANNELS}, -1, -1)` "
            "for a (B, 1, H, W) batch or `PIL.Image.open(path).convert('RGB')` when reading; drop an alpha "
            f"channel with `images[:, :{IMAGE_CHANNELS}]`. anomalib's datasets already read every file as RGB."
        )
        raise ValueError(msg)


class PyramidMambaModel(nn.Module):
    """Pyramid-Mamba: frozen encoder, MFF, feature noise, pyramid Mamba decoder (paper Fig. 1).

    Args:
        backbone: timm CNN with ``features_only`` support (paper: ``resnet34``).
        layers: encoder features compared with the decoder, finest first (paper: layer1-3).
        pre_trained: ImageNet weights for the encoder (paper: yes). Offline, use ``weights_path``.
        weights_path: local timm/torchvision checkpoint of ``backbone``; never touches the network.
        input_size: ``(H, W)`` the network runs at; validated against the pyramid. Inputs of another
            size are resized to it (bilinear, antialiased: what the pre-processor's ``Resize`` does) and
            the anomaly map comes back at the input's size, as anomalib's PatchCore, PaDiM and STFPM
            return maps at their input's size.
        decoder_dims: channels of the decoder stages, coarsest first (paper: 512/256/128/64).
        decoder_depths: SS2D blocks per stage (paper: 3/4/6/3).
        css_modules: CSS modules per stage; each gets ``depth / modules`` blocks (code: 1/2/2/1).
        d_state: SSM state size (paper: 16).
        ssm_expand: SS2D inner width factor (code: 2).
        pyramid_levels: PSS levels; level ``k`` scans ``2^k x 2^k`` sub-regions (paper: 2 levels).
        lec_kernels: depthwise kernels of the LEC branches (paper: 5, 7).
        noise_std: std of the Gaussian noise added to the bottleneck output in training (0.05).
        drop_path_rate: stochastic depth of the coarsest CSS module, falling linearly to 0 at the
            finest; one rate per module (official code: 0.2).
        mff_blocks: Bottleneck blocks in the MFF (3).
        blur_sigma: sigma of the Gaussian blur of the anomaly map in pixels; ``None`` = the paper's 4 at
            256x256, scaled with the input side (2 at 128x128), so it covers the same part of the image.
        use_pyramid: ablation switch; ``False`` scans the whole map only (level 0).
        use_lec: ablation switch; ``False`` drops the LEC branches.
        use_noise: ablation switch; ``False`` trains without feature noise.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] = DEFAULT_LAYERS,
        pre_trained: bool = True,
        weights_path: str | Path | None = None,
        input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
        decoder_dims: Sequence[int] = DEFAULT_DIMS,
        decoder_depths: Sequence[int] = DEFAULT_DEPTHS,
        css_modules: Sequence[int] = DEFAULT_CSS_MODULES,
        d_state: int = DEFAULT_D_STATE,
        ssm_expand: float = DEFAULT_SSM_EXPAND,
        pyramid_levels: Sequence[int] = DEFAULT_PYRAMID_LEVELS,
        lec_kernels: Sequence[int] = DEFAULT_LEC_KERNELS,
        noise_std: float = DEFAULT_NOISE_STD,
        drop_path_rate: float = DEFAULT_DROP_PATH,
        mff_blocks: int = DEFAULT_MFF_BLOCKS,
        blur_sigma: float | None = None,
        use_pyramid: bool = True,
        use_lec: bool = True,
        use_noise: bool = True,
    ) -> None:
        super().__init__()
        if len(decoder_dims) != len(layers) + 1:
            msg = (
                f"The decoder needs one stage per encoder layer plus the bottleneck stage: {len(layers)} layers "
                f"-> {len(layers) + 1} decoder dims, got {tuple(decoder_dims)}."
            )
            raise ValueError(msg)
        self.pyramid_levels = tuple(pyramid_levels) if use_pyramid else (0,)
        self.noise_std = noise_std if use_noise else 0.0
        self.input_size = (int(input_size[0]), int(input_size[1]))

        self.encoder = build_encoder(backbone, layers, pre_trained, weights_path)
        self.encoder.eval()
        for param in self.encoder.parameters():
            param.requires_grad_(False)
        channels = list(self.encoder.feature_info.channels())
        reductions = list(self.encoder.feature_info.reduction())
        self._check_input_size(reductions)

        self.bottleneck = MFF(channels, decoder_dims[0], mff_blocks)
        self.decoder = PyramidMambaDecoder(
            decoder_dims,
            decoder_depths,
            css_modules,
            d_state,
            ssm_expand,
            self.pyramid_levels,
            tuple(lec_kernels) if use_lec else (),
            drop_path_rate,
        )
        # Decoder stage outputs are compared with encoder maps coarsest first; a 1x1 projection is
        # only needed for encoders whose channels differ from the decoder dims (not resnet34).
        self.heads = nn.ModuleList(
            nn.Identity() if dim == chan else nn.Conv2d(dim, chan, 1)
            for dim, chan in zip(decoder_dims[1:], reversed(channels), strict=True)
        )
        self.anomaly_map_generator = AnomalyMapGenerator(self.input_size)
        sigma = blur_sigma_for(self.input_size) if blur_sigma is None else float(blur_sigma)
        self.blur: nn.Module = (
            SeparableGaussianBlur2d(sigma=sigma, channels=1) if sigma > 0 else nn.Identity()
        )

    def _check_input_size(self, reductions: Sequence[int]) -> None:
        for fine, coarse in zip(reductions, reductions[1:], strict=False):
            if coarse != 2 * fine:
                msg = (
                    f"The encoder layers must be consecutive x2 reductions for the decoder; got {reductions}."
                )
                raise ValueError(msg)
        # The bottleneck halves the coarsest encoder map; every pyramid level halves it again.
        unit = 2 * reductions[-1] * 2 ** max(self.pyramid_levels)
        h, w = self.input_size
        square_needed = max(self.pyramid_levels) > 0
        if h % unit or w % unit or (square_needed and h != w):
            shape = "square " if square_needed else ""
            sizes = ", ".join(str(s) for s in valid_input_sizes(unit, limit=8 * unit))
            msg = (
                f"Input size {h}x{w} does not suit Pyramid-Mamba with pyramid levels {self.pyramid_levels}: every "
                f"decoder map must split evenly into 2^level regions, so the input must be {shape}with sides that "
                f"are multiples of {unit} (e.g. {sizes}, ...). Change the pre-processor's Resize "
                f"(`--model.input_size`) or use fewer pyramid levels."
            )
            raise ValueError(msg)

    def train(self, mode: bool = True) -> PyramidMambaModel:
        """Switch train/eval mode but keep the frozen encoder in eval (BatchNorm statistics)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def encode(self, images: Tensor) -> list[Tensor]:
        """Frozen encoder features, finest first, detached."""
        with torch.no_grad():
            return [f.detach() for f in self.encoder(images)]

    def reconstruct(self, features: Sequence[Tensor]) -> list[Tensor]:
        """MFF, training-time noise, decoder; returns reconstructions finest first."""
        x = self.bottleneck(features)
        if self.training and self.noise_std > 0:
            x = x + torch.randn_like(x) * self.noise_std  # paper Sec. 3: synthetic feature-level anomalies
        outputs = self.decoder(x)
        outputs = [head(out) for head, out in zip(self.heads, outputs, strict=True)]
        return outputs[::-1]

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]] | InferenceBatch:
        """Training: ``(encoder_features, decoder_features)``; eval: ``InferenceBatch``.

        ``images`` is a ``(B, 3, H, W)`` batch, normalised for the encoder. When ``(H, W)`` is not the
        built ``input_size``, the batch is resized to it first and the anomaly map is resized back to
        ``(H, W)``; the score is the maximum of the map at ``input_size``, so it equals the score of the
        same images resized by the pre-processor.

        Raises:
            ValueError: for a batch that is not ``(B, 3, H, W)`` (see :func:`check_images`).
        """
        check_images(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if size != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode=RESIZE_MODE, antialias=True)
        features = self.encode(images)
        reconstructions = self.reconstruct(features)
        if self.training:
            return features, reconstructions
        anomaly_map = self.blur(self.anomaly_map_generator(features, reconstructions))
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        if size != self.input_size:
            anomaly_map = F.interpolate(anomaly_map, size=size, mode=RESIZE_MODE, antialias=True)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of the parts (paper: decoder 13.4 M, MFF 1.5 M, encoder 21.3 M)."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "encoder": count(self.encoder),
            "bottleneck": count(self.bottleneck),
            "decoder": count(self.decoder) + count(self.heads),
        }


__all__ = [
    "CSSModule",
    "LINEAR_INIT_STD",
    "MFF",
    "PatchExpand",
    "PretrainedWeightsUnavailableError",
    "PyramidMambaDecoder",
    "PyramidMambaModel",
    "build_encoder",
    "check_images",
    "valid_input_sizes",
]
