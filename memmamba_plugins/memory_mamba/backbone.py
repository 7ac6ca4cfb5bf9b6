"""The MemoryMamba backbone: VMamba-style patch embedding and stages of Mem-SSM blocks.

Reference:
    MemoryMamba: Memory-Augmented State Space Model for Defect Recognition, Sec. 4.1 (overall
    architecture, Eqs. 3-4) and Sec. 4.2 (Mem-SSM block, Eqs. 8-13).
    Liu et al., VMamba: Visual State Space Model (stem, down-sampling and model sizes).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from mmcv.cnn.bricks import DropPath
from mmpretrain.models.backbones.base_backbone import BaseBackbone
from mmpretrain.registry import MODELS
from torch import Tensor, nn

from memmamba_plugins.ssm import init_linear_and_norm

from .checkpoint import load_vmamba_pretrained, read_checkpoint, require_enough_loaded
from .memory import (
    DEFAULT_FUSION_SCALE,
    DEFAULT_MEM_HIDDEN_RATIO,
    DEFAULT_NCE_DIM,
    DEFAULT_SLOTS,
    MemoryState,
    MemSS2D,
)

#: Stage depths / stem width of the presets. ``tiny`` is the official MemoryMamba tiny (2/2/5/2,
#: a VMamba fork); ``small`` and ``base`` are VMamba's S and B sizes.
#: All three share the SS2D settings of the official code's ``vssm_tiny/small/base`` (VMamba's
#: ``0229``/``0230`` ImageNet checkpoints): see the ``SSM_*`` constants below.
ARCH_SETTINGS: dict[str, dict] = {
    "tiny": {"depths": (2, 2, 5, 2), "embed_dim": 96},
    "small": {"depths": (2, 2, 15, 2), "embed_dim": 96},
    "base": {"depths": (2, 2, 15, 2), "embed_dim": 128},
}
#: SS2D settings of the official MemoryMamba models (VMamba ``forward_type="v3noz"``): state size 1,
#: inner width 2x, no gate branch, depthwise conv without bias, and an MLP branch of ratio 4.
SSM_D_STATE = 1
SSM_RATIO = 2.0
SSM_GATED = False
SSM_CONV_BIAS = False
MLP_RATIO = 4.0
#: Keys a custom ``arch`` dict must carry.
ARCH_KEYS: tuple[str, ...] = ("depths", "embed_dim")
#: Down-sampling of the stem (two stride-2 convs); every later stage halves the map again.
PATCH_STRIDE = 4


class ChannelLastLayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis; named so the intent (channel-last maps) is explicit."""


def _channel_last_weights(module: nn.Module) -> None:
    """Store the module's conv weights channel-last (``torch.channels_last``), as the maps they see.

    The blocks work channel-last, so a conv's input is a permuted, channel-last view. With the
    weight laid out the same way, oneDNN (CPU) and cuDNN run the conv without re-laying out either
    operand on every call; with a default-layout weight the CPU conv re-laid out one of them on every
    call. ``load_state_dict`` copies into the existing parameters, so the layout survives loading.
    """
    module.to(memory_format=torch.channels_last)


class PatchEmbed(nn.Module):
    """VMamba's stem: two 3x3 stride-2 convs (stride 4 in all) with LayerNorm, output channel-last.

    ``(B, 3, H, W) -> (B, H/4, W/4, C)`` (Eq. 3).
    """

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        mid = embed_dim // 2
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=2, padding=1)
        self.norm1 = ChannelLastLayerNorm(mid)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(mid, embed_dim, 3, stride=2, padding=1)
        self.norm2 = ChannelLastLayerNorm(embed_dim)
        _channel_last_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.conv2(self.act(x)).permute(0, 2, 3, 1)
        return self.norm2(x)


class Downsample(nn.Module):
    """VMamba's down-sampling between stages: 3x3 stride-2 conv + LayerNorm, channel-last in and out."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = ChannelLastLayerNorm(out_dim)
        _channel_last_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    """Optional feed-forward branch of a VMamba block (``mlp_ratio > 0``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MemSSMBlock(nn.Module):
    """Mem-SSM block (Sec. 4.2), channel-last ``(B, H, W, C) -> (B, H, W, C)``.

    ``x + DropPath(MemSS2D(LN(x)))``: inside :class:`MemSS2D` the in-projection is the first
    Linear (Eq. 8), the memories and fusion follow the depthwise conv (Eqs. 9-10, as in the
    official code), then the selective scan (Eq. 11), LayerNorm (Eq. 12) and the out-projection,
    the second Linear of Eq. 13. Like the official VMamba-based code, that Linear sits inside the
    residual branch. An optional MLP branch (``mlp_ratio > 0``) matches VMamba's later blocks.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 0.0, **mem_kwargs) -> None:
        super().__init__()
        self.norm = ChannelLastLayerNorm(dim)
        self.op = MemSS2D(dim, **mem_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = None
        if mlp_ratio > 0:
            self.norm2 = ChannelLastLayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class MemoryMambaStage(nn.Module):
    """Mem-SSM blocks followed (except in the last stage) by a :class:`Downsample`."""

    def __init__(self, blocks: list[MemSSMBlock], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


@MODELS.register_module()
class MemoryMamba(BaseBackbone):
    """MemoryMamba backbone (Sec. 4.1): patch embedding, then stages of Mem-SSM blocks.

    Each stage halves the resolution and doubles the channels of the previous one. Outputs are
    channel-first ``(B, C_i, H_i, W_i)`` maps of the stages in ``out_indices``, each LayerNorm-ed.

    Args:
        arch: ``"tiny"``, ``"small"``, ``"base"`` or a dict with ``depths`` and ``embed_dim``.
        in_channels: image channels.
        out_indices: stages whose (normalised) outputs are returned; negative indices count from
            the end.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        frozen_stages: freeze the stem (``>= 0``) and stages ``< frozen_stages``; ``-1`` freezes nothing.
        coarse_slots: coarse memory size ``c`` (0 = no coarse memory).
        fine_slots: fine memory size ``f`` (0 = no fine memory).
        use_fusion: similarity-weighted fusion (``False`` = plain add, the "w/o Fusion" ablation).
        similarity: ``"cosine"``, ``"l1"`` or ``"l2"``.
        fusion: ``"vector"`` (the paper's Eqs. 19-22) or ``"conv"`` (the official code's spatial
            ``Conv1x1(concat[Z, M])`` form); see :class:`~.memory.MemSS2D`.
        fusion_scale: factor on the fused read-outs.
        mem_hidden_ratio: query-MLP hidden width relative to the SS2D inner width.
        nce_dim: width of the InfoNCE projections.
        mlp_ratio: VMamba MLP branch width (4 as the official models; 0 removes the branch).
        d_state, ssm_ratio, dt_rank, d_conv: SS2D settings (``ssm_ratio`` is SS2D's ``expand``);
            the defaults are the official models' (state size 1, ratio 2).
        gated: SS2D's ``SiLU(z)`` gate branch (off in the official models, VMamba v1 had it).
        conv_bias: bias of SS2D's depthwise conv (off in the official models).
        ss2d_cfg: further :class:`~memmamba_plugins.ssm.SS2D` keyword arguments.
        init_cfg: mmengine init config; ``dict(type='Pretrained', checkpoint=...)`` loads a VMamba
            checkpoint through the key mapping in :mod:`.checkpoint` (optional ``prefix``); it is
            refused when it matches under :data:`~.checkpoint.MIN_LOADED_FRACTION` of the backbone,
            unless ``allow_partial=True``.

    Inputs must be ``(B, in_channels, H, W)`` with ``H, W >= min_input_size``
    (``PATCH_STRIDE * 2 ** (num_stages - 1)``: 32 for four stages), else a ``ValueError`` says how
    to fix them.
    """

    arch_settings = ARCH_SETTINGS

    def __init__(
        self,
        arch: str | dict = "tiny",
        in_channels: int = 3,
        out_indices: Sequence[int] = (-1,),
        drop_path_rate: float = 0.2,
        frozen_stages: int = -1,
        coarse_slots: int = DEFAULT_SLOTS,
        fine_slots: int = DEFAULT_SLOTS,
        use_fusion: bool = True,
        similarity: str = "cosine",
        fusion: str = "vector",
        fusion_scale: float = DEFAULT_FUSION_SCALE,
        mem_hidden_ratio: float = DEFAULT_MEM_HIDDEN_RATIO,
        nce_dim: int = DEFAULT_NCE_DIM,
        mlp_ratio: float = MLP_RATIO,
        d_state: int = SSM_D_STATE,
        ssm_ratio: float = SSM_RATIO,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        gated: bool = SSM_GATED,
        conv_bias: bool = SSM_CONV_BIAS,
        ss2d_cfg: dict | None = None,
        init_cfg: dict | list | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        settings = self._arch_settings(arch)
        depths = tuple(int(d) for d in settings["depths"])
        embed_dim = int(settings["embed_dim"])
        self.depths = depths
        self.num_stages = len(depths)
        self.dims = [embed_dim * 2**i for i in range(self.num_stages)]
        self.out_indices = self._normalise_indices(out_indices)
        self.frozen_stages = frozen_stages
        self.in_channels = in_channels
        # Smaller inputs reach the last stages as 1x1 maps that the stride-2 convs only pad further.
        self.min_input_size = PATCH_STRIDE * 2 ** (self.num_stages - 1)

        mem_kwargs = dict(
            coarse_slots=coarse_slots,
            fine_slots=fine_slots,
            use_fusion=use_fusion,
            similarity=similarity,
            fusion=fusion,
            fusion_scale=fusion_scale,
            mem_hidden_ratio=mem_hidden_ratio,
            nce_dim=nce_dim,
            d_state=d_state,
            expand=ssm_ratio,
            dt_rank=dt_rank,
            d_conv=d_conv,
            gated=gated,
            conv_bias=conv_bias,
        )
        mem_kwargs.update(ss2d_cfg or {})
        self.patch_embed = PatchEmbed(in_channels, embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            blocks = [
                MemSSMBlock(self.dims[i], drop_path=rates[start + j], mlp_ratio=mlp_ratio, **mem_kwargs)
                for j in range(depth)
            ]
            last = i == self.num_stages - 1
            self.stages.append(
                MemoryMambaStage(blocks, None if last else Downsample(self.dims[i], self.dims[i + 1]))
            )
        for i in self.out_indices:
            self.add_module(f"norm{i}", ChannelLastLayerNorm(self.dims[i]))
        self.apply(init_linear_and_norm)
        for module in self.modules():
            if isinstance(module, MemSS2D):
                module.reset_ssm_parameters()  # the Linear init must not clobber Mamba's dt/A/D init
        self._freeze_stages()

    # -- construction helpers ----------------------------------------------------------------
    @classmethod
    def output_channels(cls, arch: str | dict, out_indices: Sequence[int] | int = (-1,)) -> tuple[int, ...]:
        """Channels of the outputs ``out_indices`` of a backbone of ``arch``, without building it."""
        settings = cls._arch_settings(arch)
        stages = len(settings["depths"])
        indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        return tuple(int(settings["embed_dim"]) * 2 ** (i % stages) for i in indices)

    @classmethod
    def _arch_settings(cls, arch: str | dict) -> dict:
        if isinstance(arch, str):
            if arch not in cls.arch_settings:
                raise KeyError(
                    f"Unknown MemoryMamba arch {arch!r}; choose from {sorted(cls.arch_settings)} or a dict."
                )
            return cls.arch_settings[arch]
        if not isinstance(arch, dict) or not set(ARCH_KEYS) <= set(arch):
            raise ValueError(f"A custom arch must be a dict with keys {ARCH_KEYS}, got {arch!r}.")
        return copy.deepcopy(arch)

    def _normalise_indices(self, out_indices: Sequence[int] | int) -> tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        result = []
        for index in out_indices:
            resolved = index + self.num_stages if index < 0 else index
            if not 0 <= resolved < self.num_stages:
                raise ValueError(f"out_indices entry {index} is out of range for {self.num_stages} stages.")
            result.append(resolved)
        return tuple(result)

    # -- mmengine / mmpretrain hooks ---------------------------------------------------------
    def init_weights(self) -> None:
        """Load VMamba weights through the key mapping for ``type='Pretrained'``, else mmengine's default."""
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get("type") == "Pretrained":
            checkpoint = read_checkpoint(cfg["checkpoint"])
            report = load_vmamba_pretrained(self, checkpoint, prefix=cfg.get("prefix"))
            if not cfg.get("allow_partial", False):
                require_enough_loaded(
                    self, report, checkpoint, cfg.get("prefix"), source=repr(cfg["checkpoint"])
                )
            self._is_init = True
            return
        super().init_weights()

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            self.patch_embed.eval()
            for p in self.patch_embed.parameters():
                p.requires_grad = False
        for i in range(min(self.frozen_stages, self.num_stages)):
            modules = [self.stages[i]]
            if i in self.out_indices:
                modules.append(getattr(self, f"norm{i}"))
            for module in modules:
                module.eval()
                for p in module.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True) -> MemoryMamba:
        super().train(mode)
        self._freeze_stages()
        return self

    # -- forward -----------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """Raise a ``ValueError`` that says how to fix ``x`` unless it is ``(B, in_channels, H, W)``, large enough.

        Without it a grey or RGBA batch fails in the stem conv with a raw channel error, and a batch
        smaller than :attr:`min_input_size` runs through stages of padding-only 1x1 maps.
        """
        if x.dim() != 4:
            raise ValueError(
                f"MemoryMamba expects a (batch, {self.in_channels}, height, width) tensor, got shape "
                f"{tuple(x.shape)}; add the batch axis with x.unsqueeze(0) for a single image."
            )
        channels, height, width = (int(s) for s in x.shape[1:])
        if channels != self.in_channels:
            raise ValueError(
                f"MemoryMamba(in_channels={self.in_channels}) expects {self.in_channels}-channel images, got "
                f"{channels} channel(s) (shape {tuple(x.shape)}). Load images as colour, which repeats a grey "
                "channel and drops alpha: LoadImageFromFile(color_type='color'), mmpretrain's default (for a "
                "tensor: x.expand(-1, 3, -1, -1) for grey, x[:, :3] for RGBA); or set "
                f"model.backbone.in_channels={channels} (the stem then cannot use ImageNet weights)."
            )
        if min(height, width) < self.min_input_size:
            raise ValueError(
                f"MemoryMamba with {self.num_stages} stages down-samples by {self.min_input_size}, so images "
                f"must be at least {self.min_input_size}x{self.min_input_size} pixels; got {height}x{width}. "
                "Resize them in the pipeline (e.g. dict(type='Resize', scale=224), the paper's size) or use an "
                "arch with fewer stages."
            )

    def forward(self, x: Tensor, return_memory: bool = False) -> tuple:
        """``(B, 3, H, W)`` -> tuple of ``(B, C_i, H_i, W_i)`` for ``out_indices``.

        Args:
            x: images.
            return_memory: also return the :class:`MemoryState` of every Mem-SSM block (what the
                memory losses need); then the result is ``(outs, states)``.
        """
        self.check_input(x)
        x = self.patch_embed(x)
        outs: list[Tensor] = []
        states: list[MemoryState] = []
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                block.op.record_state = return_memory
                x = block(x)
                if return_memory and block.op.last_state is not None:
                    states.append(block.op.last_state)
                block.op.last_state = None  # do not keep the graph alive past this forward
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)
        if return_memory:
            return tuple(outs), states
        return tuple(outs)
