"""Coarse/fine memory encoding and fusion of the Mem-SSM block.

Reference:
    MemoryMamba: Memory-Augmented State Space Model for Defect Recognition, Sec. 4.2.1
    (memory encoding, Eqs. 14-18) and Sec. 4.2.2 (fusion module, Eqs. 19-22).

The memory read-outs and the fusion sit inside SS2D, between the depthwise convolution and the
SiLU before the scan -- where the official MemoryMamba code puts them. :class:`MemSS2D` overrides
the :meth:`SS2D.channel_offset` hook for this and stashes what the memory losses need
(:class:`MemoryState`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memmamba_plugins.ssm import SS2D

#: Similarity functions of the fusion module compared in the paper (Sec. 5.5, Fig. 3).
SIMILARITIES: tuple[str, ...] = ("cosine", "l1", "l2")
#: Fusion forms: the paper's per-sample vector (Eqs. 19-22) and the official code's 1x1 conv.
FUSIONS: tuple[str, ...] = ("vector", "conv")
#: Scale of the fused memory read-outs added to Z (the official code adds ``0.1 * x_c' + 0.1 * x_f'``).
DEFAULT_FUSION_SCALE = 0.1
#: Memory slots per memory (the official code's M = 12, coarse and fine alike).
DEFAULT_SLOTS = 12
#: Query-MLP hidden width relative to the SS2D inner width.
DEFAULT_MEM_HIDDEN_RATIO = 0.25
#: Width of the InfoNCE projections.
DEFAULT_NCE_DIM = 64
#: Std of the truncated-normal init of the memory slots (small, like token embeddings).
SLOT_INIT_STD = 0.02


@dataclass
class MemoryState:
    """What one Mem-SSM block hands to the memory losses (Sec. 4.3).

    Attributes:
        coarse_query: ``(B, c)`` coarse query vectors ``h_c`` (Eq. 16), or ``None`` without coarse memory.
        coarse_attn: ``(B, c)`` softmax attention ``alpha_c`` over the coarse slots (Eq. 17).
        fine_attn: ``(B, f)`` softmax attention ``alpha_f`` over the fine slots.
        fine_z: ``(B, E)`` projection of the pooled intermediate feature ``Z_i`` for InfoNCE (Eq. 24).
        fine_readout: ``(B, E)`` projection of the fine read-out ``M_f`` ("processed through an MLP").
    """

    coarse_query: Tensor | None = None
    coarse_attn: Tensor | None = None
    fine_attn: Tensor | None = None
    fine_z: Tensor | None = None
    fine_readout: Tensor | None = None


def similarity(a: Tensor, b: Tensor, kind: str = "cosine") -> Tensor:
    """Similarity score ``beta`` between pooled vectors (Eq. 21), over the last axis: ``(..., D) -> (..., 1)``.

    ``a`` and ``b`` broadcast against each other (e.g. ``(B, K, D)`` read-outs against ``(B, 1, D)``).
    ``cosine`` lies in ``[-1, 1]``. The distances are turned into similarities in ``(0, 1]`` by
    ``1 / (1 + d)``, with ``d`` the mean absolute (L1) or root-mean-square (L2) difference so that
    the score does not depend on the channel count.
    """
    if kind == "cosine":
        return F.cosine_similarity(a, b, dim=-1).unsqueeze(-1)
    if kind == "l1":
        dist = (a - b).abs().mean(-1, keepdim=True)
    elif kind == "l2":
        dist = (a - b).pow(2).mean(-1, keepdim=True).sqrt()
    else:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {kind!r}.")
    return 1.0 / (1.0 + dist)


class MemoryBank(nn.Module):
    """A memory of learned slots read by softmax attention (Eqs. 16-18).

    The query MLP of Eq. 16 is ``mem_conv -> GELU -> query``; its first layer and activation are
    shared by the coarse and fine memories of a block, so they live in :class:`MemSS2D` and this
    module holds the second layer.

    Args:
        dim: channels of the feature map and of each memory slot.
        num_slots: memory size (``c`` or ``f`` in the paper).
        hidden: width of the activated feature the query reads.
    """

    def __init__(self, dim: int, num_slots: int, hidden: int) -> None:
        super().__init__()
        if num_slots < 1:
            raise ValueError(f"A memory needs at least one slot, got {num_slots}.")
        self.query = nn.Linear(hidden, num_slots)
        self.slots = nn.Parameter(torch.empty(num_slots, dim))
        nn.init.trunc_normal_(self.slots, std=SLOT_INIT_STD)
        self._register_load_state_dict_pre_hook(_rename_sequential_query)

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, hidden)`` activated feature -> query ``h`` ``(B, S)``, attention ``alpha`` ``(B, S)``, read-out ``(B, D)``."""
        query = self.query(feat)
        attn = query.softmax(dim=-1)
        return query, attn, attn @ self.slots


def _rename_sequential_query(state_dict: dict, prefix: str, *args) -> None:
    """Accept checkpoints from before the query's activation moved to :class:`MemSS2D`.

    The bank then held ``Sequential(GELU, Linear)``, so its keys were ``query.1.weight`` / ``query.1.bias``.
    """
    for name in ("weight", "bias"):
        old = f"{prefix}query.1.{name}"
        if old in state_dict:
            state_dict[f"{prefix}query.{name}"] = state_dict.pop(old)


class MemSS2D(SS2D):
    """SS2D with the coarse/fine memories and the fusion module at its conditioning hook.

    Two fusion forms are offered (``fusion``):

    - ``"vector"`` (default), the paper's Eqs. 19-22: ``Z + s * sum_k beta_k M_k`` with
      ``beta_k = sim(Pool(M_k), Pool(Z))``; the read-outs are vectors per sample, so this adds the
      same offset at every position (and the CPU inference kernel fuses it into the conv).
    - ``"conv"``, the official code's form: ``Z + s * sum_k beta_k Conv1x1([Z, M_k])``, which
      varies over the map because the 1x1 conv also sees ``Z`` at every position.

    Args:
        d_model: block channels (see :class:`SS2D`).
        coarse_slots: coarse memory size ``c``; ``0`` removes the coarse memory (ablation "w/o CMN").
        fine_slots: fine memory size ``f``; ``0`` removes the fine memory (ablation "w/o FMN").
        use_fusion: weight the read-outs by their similarity to ``Z`` (Eqs. 19-22); ``False`` adds
            them unweighted (ablation "w/o Fusion").
        similarity: ``"cosine"``, ``"l1"`` or ``"l2"`` (Sec. 5.5).
        fusion: ``"vector"`` (paper) or ``"conv"`` (official code), see above.
        fusion_scale: factor ``s`` on the fused read-outs (the official code's 0.1).
        mem_hidden_ratio: hidden width of the query MLPs as a fraction of the inner width.
        nce_dim: width of the InfoNCE projections of ``Z`` and the fine read-out.
        **ss2d_kwargs: forwarded to :class:`SS2D`.
    """

    def __init__(
        self,
        d_model: int,
        coarse_slots: int = DEFAULT_SLOTS,
        fine_slots: int = DEFAULT_SLOTS,
        use_fusion: bool = True,
        similarity: str = "cosine",
        fusion: str = "vector",
        fusion_scale: float = DEFAULT_FUSION_SCALE,
        mem_hidden_ratio: float = DEFAULT_MEM_HIDDEN_RATIO,
        nce_dim: int = DEFAULT_NCE_DIM,
        **ss2d_kwargs,
    ) -> None:
        super().__init__(d_model, **ss2d_kwargs)
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}.")
        d = self.d_inner
        self.similarity = similarity
        self.use_fusion = use_fusion
        self.fusion = fusion
        self.fusion_scale = fusion_scale
        self.has_memory = coarse_slots > 0 or fine_slots > 0
        hidden = max(8, int(d * mem_hidden_ratio))
        # Eq. 14's convolution, narrowed to ``hidden`` channels: it is the first layer of both
        # query MLPs (Eq. 16). A 1x1 conv followed by the global pooling the queries need equals
        # pooling followed by a linear map, which costs H*W times less; that is how it is computed.
        self.mem_conv = nn.Linear(d, hidden) if self.has_memory else None
        self.mem_act = nn.GELU() if self.has_memory else None
        self.coarse = MemoryBank(d, coarse_slots, hidden) if coarse_slots > 0 else None
        self.fine = MemoryBank(d, fine_slots, hidden) if fine_slots > 0 else None
        # the official fusion's Conv1x1(concat[Z, M_k]), one per memory
        self.fusion_convs = (
            nn.ModuleList(nn.Conv2d(2 * d, d, 1) for bank in (self.coarse, self.fine) if bank is not None)
            if self.has_memory and use_fusion and fusion == "conv"
            else None
        )
        if self.fine is not None:
            # "Z_i and their memory representations M_f, processed through an MLP" (Sec. 4.3.2).
            self.nce_z = nn.Linear(d, nce_dim)
            self.nce_mem = nn.Sequential(nn.Linear(d, nce_dim), nn.GELU(), nn.Linear(nce_dim, nce_dim))
        self.last_state: MemoryState | None = None
        #: build :attr:`last_state` for the memory losses (set by the backbone per forward)
        self.record_state = False

    @property
    def has_channel_offset(self) -> bool:  # type: ignore[override]
        return self.has_memory

    def _condition_is_channel_offset(self) -> bool:
        return self.fusion_convs is None

    def read_memories(self, pooled: Tensor) -> list[Tensor]:
        """The coarse / fine read-outs ``M_k`` ``(B, D)`` for pooled ``Z`` (Eqs. 14-18).

        The :class:`MemoryState` for the losses (with its InfoNCE projections) is built only when
        :attr:`record_state` is set -- the backbone sets it for ``return_memory=True`` -- so
        inference pays for the read-outs and the fusion only.
        """
        z = pooled
        encoded = self.mem_act(self.mem_conv(z))
        state = MemoryState() if self.record_state else None
        readouts = []
        for name, bank in (("coarse", self.coarse), ("fine", self.fine)):
            if bank is None:
                continue
            query, attn, readout = bank(encoded)
            readouts.append(readout)
            if state is None:
                continue
            if name == "coarse":
                state.coarse_query, state.coarse_attn = query, attn
            else:
                state.fine_attn = attn
                state.fine_z = self.nce_z(z)
                state.fine_readout = self.nce_mem(readout)
        self.last_state = state
        return readouts

    def channel_offset(self, pooled: Tensor) -> Tensor | None:
        """The vector-fused read-outs for ``Z`` (Eqs. 16-22), added to every position of ``Z``.

        Args:
            pooled: ``(B, D)`` spatial mean of ``Z``, ``Pooling(Z_i)`` of Eq. 20 (SS2D computes it).

        Returns:
            ``fusion_scale * sum_k beta_k M_k`` ``(B, D)``, or ``None`` without memories.
        """
        self.last_state = None
        if not self.has_memory:
            return None
        # Both read-outs are weighted and summed at once: at batch 1 the block's small operations
        # cost more in dispatch than in arithmetic, so they are kept few. A read-out is already a
        # vector per sample, so Pooling(M) (Eq. 19) is the identity.
        stacked = torch.stack(self.read_memories(pooled), dim=1)  # (B, memories, D)
        if self.use_fusion:
            fused = (similarity(stacked, pooled.unsqueeze(1), self.similarity) * stacked).sum(dim=1)
        else:
            fused = stacked.sum(dim=1)
        return fused * self.fusion_scale

    def condition(self, x: Tensor) -> Tensor:
        """``Z`` ``(B, D, H, W)`` plus its fused memory read-outs (vector or official conv form)."""
        if self.fusion_convs is None:
            return super().condition(x)
        self.last_state = None
        pooled = x.mean(dim=(2, 3))
        out = x
        d = x.shape[1]
        for conv, readout in zip(self.fusion_convs, self.read_memories(pooled)):
            # Conv1x1 over [Z, M broadcast] = W_z * Z + (W_m M + b): the memory half is a vector,
            # so the broadcast copy of M is never built.
            w = conv.weight[:, :, 0, 0]
            spatial = F.conv2d(x, w[:, :d, None, None])
            vector = F.linear(readout, w[:, d:], conv.bias)
            beta = similarity(readout, pooled, self.similarity)  # (B, 1)
            out = out + (self.fusion_scale * beta)[:, :, None, None] * (spatial + vector[:, :, None, None])
        return out
