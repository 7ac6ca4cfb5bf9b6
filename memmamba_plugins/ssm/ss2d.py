"""SS2D: the 2-D selective-scan mixer of VMamba, with the region (pyramid) scan of Pyramid-Mamba.

References:
    Liu et al., "VMamba: Visual State Space Model", NeurIPS 2024 -- SS2D: in-projection,
    depthwise conv + SiLU, cross-scan in four directions with per-direction projections, merge,
    LayerNorm, SiLU(z) gate, out-projection.
    Iqbal et al., "Pyramid-based Mamba Multi-class Unsupervised Anomaly Detection", 2025 -- the
    Pyramidal Scanning Strategy: the same SSM scans the whole map and its 2^k x 2^k sub-regions,
    the levels are averaged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .selective_scan import (
    ScanOrders,
    resolve_backend,
    selective_scan_channel_last,
    selective_scan_orders,
    set_numba_threads,
)

#: Scan directions, in the order of the per-direction parameters (VMamba's order).
DIRECTIONS: tuple[str, ...] = ("row", "column", "row_reversed", "column_reversed")
#: Highest step-size rank the CPU kernel projects itself at inference (``R`` FMAs per channel and
#: step) instead of reading a precomputed ``(K, L, D)`` tensor; measured on MemoryMamba-tiny's
#: stages, ranks 6 and 12 gain, 24 and 48 lose to the batched matmul.
MAX_IN_KERNEL_DT_RANK = 16


def dt_rank_for(d_model: int, dt_rank: int | str = "auto") -> int:
    """Rank of the step-size projection; ``"auto"`` is ``ceil(d_model / 16)`` as in Mamba."""
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"dt_rank must be a positive int or 'auto', got {dt_rank!r}.")
    return dt_rank


def check_region_size(height: int, width: int, levels: Sequence[int]) -> None:
    """Raise :class:`ValueError` unless a ``height x width`` map splits evenly at every level.

    Level ``k`` cuts the map into ``2^k x 2^k`` regions, so levels above 0 need a square map whose
    side is divisible by ``2^max(levels)``.
    """
    top = max(levels)
    if top == 0:
        return
    split = 2**top
    if height != width or height % split:
        raise ValueError(
            f"Pyramid levels {tuple(levels)} split the feature map into {split}x{split} regions, which needs a "
            f"square map with a side divisible by {split}; got {height}x{width}. Use a square input whose "
            f"feature maps have sides that are multiples of {split}, or fewer pyramid levels."
        )


def split_regions(x: Tensor, splits: int) -> Tensor:
    """``(B, H, W, D)`` -> ``(B * splits^2, H / splits, W / splits, D)``, regions row-major."""
    b, h, w, d = x.shape
    x = x.reshape(b, splits, h // splits, splits, w // splits, d)
    return x.transpose(2, 3).reshape(b * splits * splits, h // splits, w // splits, d)


def merge_regions(x: Tensor, splits: int) -> Tensor:
    """Inverse of :func:`split_regions`."""
    bs, h, w, d = x.shape
    x = x.reshape(bs // (splits * splits), splits, splits, h, w, d)
    return x.transpose(2, 3).reshape(bs // (splits * splits), splits * h, splits * w, d)


def _direction_orders(height: int, width: int) -> np.ndarray:
    """Grid positions visited by each direction of a ``height x width`` map: ``(4, H * W)``."""
    grid = np.arange(height * width, dtype=np.int64).reshape(height, width)
    rows = grid.reshape(-1)
    cols = grid.T.reshape(-1)
    return np.stack([rows, cols, rows[::-1], cols[::-1]])


@functools.lru_cache(maxsize=64)
def cross_scan_orders(
    height: int, width: int, levels: tuple[int, ...], per_direction_output: bool
) -> ScanOrders:
    """The fused kernel's orders for SS2D over a ``height x width`` map and pyramid ``levels``.

    Level ``k`` visits the ``2^k x 2^k`` regions one after another (the state restarts at each
    region) and each region in the four directions of :data:`DIRECTIONS` -- exactly what scanning
    the split regions as a batch does, without the split. Direction ``d`` uses parameter group
    ``d``; every order reads the one shared input and adds into output slot 0, or into slot ``d``
    when ``per_direction_output``.
    """
    positions, segments, groups = [], [], []
    grid = np.arange(height * width, dtype=np.int64).reshape(height, width)
    for level in levels:
        splits = 2**level
        rh, rw = height // splits, width // splits
        regions = [
            grid[i * rh : (i + 1) * rh, j * rw : (j + 1) * rw] for i in range(splits) for j in range(splits)
        ]
        local = _direction_orders(rh, rw)  # positions inside one region
        for direction in range(len(DIRECTIONS)):
            positions.append(np.concatenate([region.reshape(-1)[local[direction]] for region in regions]))
            segments.append(rh * rw)
            groups.append(direction)
    group_of = np.asarray(groups, dtype=np.int64)
    return ScanOrders(
        positions=np.ascontiguousarray(np.stack(positions)),
        segment=np.asarray(segments, dtype=np.int64),
        group_of=group_of,
        u_of=np.zeros_like(group_of),
        y_of=group_of.copy() if per_direction_output else np.zeros_like(group_of),
        n_outputs=len(DIRECTIONS) if per_direction_output else 1,
    )


class SS2D(nn.Module):
    """2-D selective scan block, channel-last ``(B, H, W, C) -> (B, H, W, C)``.

    Args:
        d_model: channels ``C`` of input and output.
        d_state: SSM state size ``N``.
        expand: inner width factor; the scan runs on ``int(expand * d_model)`` channels.
        dt_rank: rank of the step-size projection, or ``"auto"`` (``ceil(d_model / 16)``).
        d_conv: kernel of the depthwise convolution before the scan.
        conv_bias: bias in the depthwise convolution.
        bias: bias in the in/out projections.
        dt_min, dt_max: range of the initial step sizes (log-uniform), as Mamba.
        dt_init: ``"random"`` or ``"constant"`` init of the step-size projection weight.
        dt_scale: scale of that init.
        dt_init_floor: lower clamp of the initial step sizes.
        dropout: dropout on the output.
        pyramid_levels: levels of the region scan; level ``k`` scans ``2^k x 2^k`` sub-regions
            with the same weights, and the levels are averaged. ``(0,)`` is plain SS2D.
        gated: multiply by ``SiLU(z)`` from a second in-projection branch (VMamba default).
        backend: selective-scan backend (``None`` = automatic, see
            :func:`memmamba_plugins.ssm.selective_scan`).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = True,
        bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        dropout: float = 0.0,
        pyramid_levels: Sequence[int] = (0,),
        gated: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        levels = tuple(int(level) for level in pyramid_levels)
        if not levels or min(levels) < 0 or len(set(levels)) != len(levels):
            raise ValueError(f"pyramid_levels must be distinct non-negative ints, got {pyramid_levels!r}.")
        if d_conv % 2 == 0:
            raise ValueError(f"d_conv must be odd to keep the map size, got {d_conv}.")
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = dt_rank_for(d_model, dt_rank)
        self.pyramid_levels = levels
        self.gated = gated
        self.backend = backend
        k = len(DIRECTIONS)

        self.in_proj = nn.Linear(d_model, self.d_inner * (2 if gated else 1), bias=bias)
        self.conv2d = nn.Conv2d(
            self.d_inner, self.d_inner, d_conv, padding=(d_conv - 1) // 2, groups=self.d_inner, bias=conv_bias
        )
        self.act = nn.SiLU()
        x_proj = [nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False).weight for _ in range(k)]
        self.x_proj_weight = nn.Parameter(torch.stack(x_proj))  # (K, R + 2N, D)
        self.dt_projs_weight = nn.Parameter(torch.empty(k, self.d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, self.d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * self.d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * self.d_inner))
        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._dt_init = dict(
            dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale, floor=dt_init_floor
        )
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation: S4D-real ``A``, unit ``D``, inverse-softplus step-size bias."""
        cfg = self._dt_init
        std = self.dt_rank**-0.5 * cfg["dt_scale"]
        if cfg["dt_init"] == "constant":
            self.dt_projs_weight.fill_(std)
        elif cfg["dt_init"] == "random":
            self.dt_projs_weight.uniform_(-std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {cfg['dt_init']!r}.")
        log_min, log_max = math.log(cfg["dt_min"]), math.log(cfg["dt_max"])
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (log_max - log_min) + log_min).clamp(
            min=cfg["floor"]
        )
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(torch.log(a).expand_as(self.A_logs))
        self.Ds.fill_(1.0)
        for p in (self.A_logs, self.Ds):
            p._no_weight_decay = True  # read by optimiser builders that honour it

    # -- stages -----------------------------------------------------------------------------
    #: Whether :meth:`channel_offset` adds anything (subclasses that override it set this); without
    #: it the conv output's spatial mean is not computed.
    has_channel_offset: bool = False

    def channel_offset(self, pooled: Tensor) -> Tensor | None:
        """Hook between the depthwise conv and the SiLU: a per-channel offset for the map.

        Args:
            pooled: ``(B, D)`` spatial mean of the conv output.

        Returns:
            ``(B, D)``, broadcast-added to the conv output before the SiLU, or ``None``; nothing here.
            Subclasses inject extra context at this point (e.g. MemoryMamba's memory read-outs).
        """
        return None

    def condition(self, x: Tensor) -> Tensor:
        """The conv output ``(B, D, H, W)`` plus :meth:`channel_offset` of its spatial mean."""
        if not self.has_channel_offset:
            return x
        offset = self.channel_offset(x.mean(dim=(2, 3)))
        return x if offset is None else x + offset[:, :, None, None]

    def _conv_offset_silu_fused(self, x: Tensor) -> Tensor:
        """Inference on CPU: depthwise conv, :meth:`channel_offset` and SiLU in two kernel passes.

        ``(B, H, W, D) -> (B, H, W, D)``, what ``SiLU(condition(conv2d(x)))`` computes (float32
        rounding apart), without its four passes over the map (see :mod:`.cpu_kernel`).
        """
        from . import cpu_kernel

        set_numba_threads()
        x = x.detach().contiguous()
        b, h, w, d = x.shape
        conv = self.conv2d
        weight = conv.weight.detach()[:, 0].permute(1, 2, 0).contiguous()  # (k, k, D)
        bias = conv.bias.detach() if conv.bias is not None else x.new_zeros(d)
        out = torch.empty_like(x)
        sums = cpu_kernel.depthwise_conv(x.numpy(), weight.numpy(), bias.numpy(), out.numpy())
        offset = None
        if self.has_channel_offset:
            offset = self.channel_offset(torch.from_numpy(sums / (h * w)).float())
        offset = x.new_zeros(b, d) if offset is None else offset.detach().float().contiguous()
        cpu_kernel.offset_silu(out.numpy(), offset.numpy())
        return out

    def _condition_is_channel_offset(self) -> bool:
        """Whether :meth:`condition` is the base one (a channel offset the fused kernel can add)."""
        return type(self).condition is SS2D.condition

    def _fuses_conv(self, x: Tensor) -> bool:
        """Whether :meth:`_conv_offset_silu_fused` applies: numba backend, float32, no gradient needed.

        A subclass that overrides :meth:`condition` itself (rather than :meth:`channel_offset`)
        keeps the torch path, which calls it.
        """
        if not self._condition_is_channel_offset():
            return False
        if x.dtype != torch.float32 or not self._uses_fused_kernel(x):
            return False
        # any trainable parameter counts (e.g. memories trained behind a frozen conv): the kernels
        # are not differentiable (the first parameter usually decides it, so this costs little)
        return not (
            torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        )

    def _scan(self, x: Tensor) -> Tensor:
        """Scan ``x`` ``(B, H, W, D)`` in the four directions; ``(B, L, 4, D)`` in scan order."""
        b, h, w, d = x.shape
        length = h * w
        k = len(DIRECTIONS)
        rows = x.reshape(b, length, d)
        cols = x.transpose(1, 2).reshape(b, length, d)
        # channel-last all the way: the CPU kernel reads it without copies
        xs = torch.stack([rows, cols, rows.flip(1), cols.flip(1)], dim=2)  # (B, L, K, D)
        x_dbl = torch.einsum("blkd,kcd->blkc", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=3)
        dts = torch.einsum("blkr,kdr->blkd", dts, self.dt_projs_weight)
        y = selective_scan_channel_last(
            xs.reshape(b, length, k * d),
            dts.reshape(b, length, k * d),
            -torch.exp(self.A_logs.float()),
            Bs.transpose(1, 2),
            Cs.transpose(1, 2),
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            backend=self.backend,
        )
        return y.reshape(b, length, k, d)

    @staticmethod
    def _to_grid(y: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Put each direction's ``(B, L, 4, D)`` output back on the ``(B, H, W, D)`` grid."""
        b, _, _, d = y.shape
        row = y[:, :, 0].reshape(b, h, w, d)
        col = y[:, :, 1].reshape(b, w, h, d).transpose(1, 2)
        row_rev = y[:, :, 2].flip(1).reshape(b, h, w, d)
        col_rev = y[:, :, 3].flip(1).reshape(b, w, h, d).transpose(1, 2)
        return row, col, row_rev, col_rev

    def _uses_fused_kernel(self, x: Tensor) -> bool:
        return resolve_backend(self.backend, x) == "numba"

    def _scan_fused(self, x: Tensor, levels: tuple[int, ...], per_direction_output: bool) -> Tensor:
        """All directions (and pyramid levels) in one fused CPU kernel call, on the grid order.

        The projections are per position, so the step sizes and ``B``/``C`` of each direction are
        computed once on the grid; only the kernel's visiting order differs between directions.
        Returns ``(B, H, W, 4 or 1, D)``: per direction, or summed over directions and levels.
        """
        b, h, w, d = x.shape
        length = h * w
        k = len(DIRECTIONS)
        seq = x.reshape(b, length, d)
        x_dbl = (seq @ self.x_proj_weight.reshape(-1, d).t()).reshape(b, length, k, -1)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=3)
        weight = self.dt_projs_weight
        needs_grad = torch.is_grad_enabled() and (dts.requires_grad or weight.requires_grad)
        if self.dt_rank <= MAX_IN_KERNEL_DT_RANK and not needs_grad:
            # inference: the kernel projects the step sizes itself, so the (K, B*L, D) step-size
            # tensor, the largest of the block, is never allocated (at batch 1 its fresh pages
            # cost more than the whole projection). Training keeps the matmul: the backward
            # pass needs that tensor anyway.
            delta, delta_weight = dts, weight.transpose(1, 2)
        else:
            # (K, B*L, D) straight out of one batched matmul is the kernel's delta layout; the
            # kernel adds the bias and applies softplus as it reads it, so no second copy is stored
            delta = torch.bmm(
                dts.reshape(b * length, k, self.dt_rank).transpose(0, 1), weight.transpose(1, 2)
            )
            delta = delta.reshape(k, b, length, d)
            delta_weight = None
        y, _ = selective_scan_orders(
            seq.unsqueeze(2),
            delta,
            -torch.exp(self.A_logs.float()).reshape(k, d, self.d_state).transpose(1, 2),
            Bs,
            Cs,
            self.Ds.float().reshape(k, d),
            cross_scan_orders(h, w, levels, per_direction_output),
            delta_bias=self.dt_projs_bias.float(),
            delta_softplus=True,
            delta_weight=delta_weight,
        )
        return y.reshape(b, h, w, -1, d)

    def scan_directions(self, x: Tensor) -> Tensor:
        """Each direction's output on the grid: ``(B, H, W, D) -> (B, 4, H, W, D)`` (order of ``DIRECTIONS``)."""
        if self._uses_fused_kernel(x):
            return self._scan_fused(x, (0,), per_direction_output=True).permute(0, 3, 1, 2, 4)
        return torch.stack(self._to_grid(self._scan(x), x.shape[1], x.shape[2]), dim=1)

    def scan2d(self, x: Tensor) -> Tensor:
        """Cross-scan, merge by sum and average the pyramid levels: ``(B, H, W, D) -> (B, H, W, D)``."""
        check_region_size(x.shape[1], x.shape[2], self.pyramid_levels)
        if self._uses_fused_kernel(x):
            y = self._scan_fused(x, self.pyramid_levels, per_direction_output=False)[:, :, :, 0]
            return y if len(self.pyramid_levels) == 1 else y / len(self.pyramid_levels)
        out = None
        for level in self.pyramid_levels:
            splits = 2**level
            regions = split_regions(x, splits) if splits > 1 else x
            row, col, row_rev, col_rev = self._to_grid(
                self._scan(regions), regions.shape[1], regions.shape[2]
            )
            y = row + col + row_rev + col_rev
            y = merge_regions(y, splits) if splits > 1 else y
            out = y if out is None else out + y
        return out if len(self.pyramid_levels) == 1 else out / len(self.pyramid_levels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"SS2D expects channel-last (B, H, W, {self.d_model}), got {tuple(x.shape)}.")
        xz = self.in_proj(x)
        if self.gated:
            x, z = xz.chunk(2, dim=-1)
        else:
            x, z = xz, None
        if self._fuses_conv(x):
            x = self._conv_offset_silu_fused(x)
        else:
            x = self.conv2d(x.permute(0, 3, 1, 2))
            x = self.act(self.condition(x)).permute(0, 2, 3, 1)
        y = self.scan2d(x).to(x.dtype)
        y = self.out_norm(y)
        if z is not None:
            y = y * F.silu(z)
        return self.dropout(self.out_proj(y))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
            f"pyramid_levels={self.pyramid_levels}, gated={self.gated}"
        )


#: Std of the truncated-normal init of Linear layers in VMamba-style models (both official codes).
LINEAR_INIT_STD = 0.02


def init_linear_and_norm(module: nn.Module) -> None:
    """VMamba-style init for ``model.apply``: Linear trunc-normal(0.02) with zero bias; LayerNorm 1 / 0.

    SS2D's scan parameters (``A``, ``D``, step sizes) are plain parameters, not Linear layers, so
    they keep Mamba's initialisation.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=LINEAR_INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
